"""Bag-of-Tricks strong baseline on Market-1501 (the published recipe)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the full BoT Market-1501 recipe; see configs/default.py."""
  return default.get_config()
