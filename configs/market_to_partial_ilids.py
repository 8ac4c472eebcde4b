"""Train the BoT recipe on Market-1501, test on Partial-iLIDS (cross-domain partial re-ID)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.test_datasets = ('partial_ilids:data/Partial_iLIDS',)
  return config
