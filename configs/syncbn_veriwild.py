"""The multi-GPU variant's VeRi-Wild recipe (DTennant/reid_baseline_with_syncbn).

Reproduces its `configs/veriwild.yml`: configs/syncbn_veri.py (384x384, batch 36 with
K=6, 260 epochs, float16, every 5 epochs) on VeRi-Wild, read by the variant's generic
folder reader from pre-renamed folders DATA_PATH/train, query and test whose images are
named `(pid)_c(camid)_(iid).jpg` (the variant's `init_dataset` expects that layout; the
renaming script is not part of it). The project's own VeRi-Wild readers
(`veriwild_small`, ...) read the original release instead.

Published VeRi-Wild figures (small test set, the variant's README): rank-1 90.43,
rank-5 96.85, rank-10 98.19, mAP 74.27 (re-ranked: rank-1 89.66, mAP 77.42).
"""

import ml_collections

from configs import syncbn_market
from configs import syncbn_veri


def get_config() -> ml_collections.ConfigDict:
  """Returns the variant's `configs/veriwild.yml` recipe."""
  config = syncbn_veri.get_config()
  syncbn_market.read_folders(config, 'data/veriwild', 'train', 'query', 'test')
  return config
