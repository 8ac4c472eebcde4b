"""Deprecated: the multi-GPU variant's VeRi-776 recipe is configs/syncbn_veri.py.

This file used to approximate that recipe (the strong baseline's mean/std, padding 10,
label smoothing; 30 epochs at batch 64 with K=8); it now returns configs/syncbn_veri.py
unchanged.
"""

import logging

import ml_collections

from configs import syncbn_veri


def get_config() -> ml_collections.ConfigDict:
  """Returns configs/syncbn_veri.py's recipe (and logs that this name is deprecated)."""
  logging.warning('configs/multigpu_veri.py is deprecated: use configs/syncbn_veri.py '
                  '(the same recipe).')
  return syncbn_veri.get_config()
