"""Bag-of-Tricks strong baseline on VeRi-776 (vehicles: square 256x256 input)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'veri776'
  config.data_dir = 'data/VeRi'
  config.input.image_size = (256, 256)
  return config
