"""Bag-of-Tricks strong baseline on CUHK03-NP (labeled; set dataset=cuhk03_detected)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'cuhk03_labeled'
  config.data_dir = 'data/cuhk03-np'
  return config
