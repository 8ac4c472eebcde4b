"""Bag-of-Tricks strong baseline on VeRi-Wild (small test set): configs/veri.py's vehicle
recipe (square 256x256 input) on another dataset."""

import ml_collections

from configs import veri


def get_config() -> ml_collections.ConfigDict:
  config = veri.get_config()
  config.dataset = 'veriwild_small'
  config.data_dir = 'data/VERI-Wild'
  return config
