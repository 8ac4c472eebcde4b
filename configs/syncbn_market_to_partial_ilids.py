"""The multi-GPU variant's Market-1501 to Partial-iLIDS recipe (reid_baseline_with_syncbn).

Reproduces its `configs/market2partilibds.yml`: the variant's shared values
(configs/syncbn_market.py) trained on Market-1501 at 384x256 (height x width), batch 64
(P=8 x K=8), 120 epochs, fp16 (float16 with dynamic loss scaling, explicit), checkpoint
and evaluation every epoch, CMC ranks 1 and 3; tested on Partial-iLIDS.

The variant reads its test set through its folder reader from a renamed copy
(QUERY_PATH '../partial_reid/Partial_iLIDS_rename/query', GALLERY_PATH '.../gallery',
relative to the Market folder; its renaming script is not published). Here the
project's `partial_ilids` reader reads the original release (119 partial query
images, 119 whole-body gallery images, one per identity, query and gallery on
different cameras, as the renamed copy must have them: its evaluation drops
same-camera matches). With such a renamed copy, the variant's own reading is
`--config.test_datasets='()' --config.folder.query_dir=../partial_reid/Partial_iLIDS_rename/query
--config.folder.gallery_dir=../partial_reid/Partial_iLIDS_rename/gallery`.

Published figures (the variant's README): rank-1 45.38, rank-3 57.14, mAP 55.76
(re-ranked: rank-1 28.57, rank-3 48.74, mAP 42.62).
"""

import ml_collections

from configs import syncbn_market


def get_config() -> ml_collections.ConfigDict:
  """Returns the variant's `configs/market2partilibds.yml` recipe."""
  # Batch 64 with K=8, checkpoint and evaluation every epoch: syncbn_market's values.
  config = syncbn_market.get_config()
  config.test_datasets = ('partial_ilids:data/Partial_iLIDS',)
  config.input.image_size = (384, 256)
  config.num_epochs = 120
  config.dtype = 'float16'
  config.test.cmc_ranks = (1, 3)
  return config
