"""Bag-of-Tricks strong baseline on DukeMTMC-reID (same recipe as Market-1501)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'dukemtmcreid'
  config.data_dir = 'data/DukeMTMC-reID'
  return config
