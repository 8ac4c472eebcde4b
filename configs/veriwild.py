"""Bag-of-Tricks strong baseline on VeRi-Wild (small test set; 256x256 input)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'veriwild_small'
  config.data_dir = 'data/VERI-Wild'
  config.input.image_size = (256, 256)
  return config
