"""Deprecated: the multi-GPU variant's Market recipe is configs/syncbn_market.py.

This file used to approximate that recipe with the strong baseline's ImageNet mean/std,
padding 10 and label smoothing; it now returns configs/syncbn_market.py unchanged.
"""

import logging

import ml_collections

from configs import syncbn_market


def get_config() -> ml_collections.ConfigDict:
  """Returns configs/syncbn_market.py's recipe (and logs that this name is deprecated)."""
  logging.warning('configs/multigpu_market.py is deprecated: use configs/syncbn_market.py '
                  '(the same recipe).')
  return syncbn_market.get_config()
