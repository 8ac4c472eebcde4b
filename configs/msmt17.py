"""Bag-of-Tricks strong baseline on MSMT17 (same recipe as Market-1501)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'msmt17'
  config.data_dir = 'data/MSMT17_V1'
  return config
