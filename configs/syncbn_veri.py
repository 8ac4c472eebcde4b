"""The multi-GPU variant's VeRi-776 recipe (DTennant/reid_baseline_with_syncbn).

Reproduces its `configs/veri.yml`: the variant's shared values (configs/syncbn_market.py)
with VeRi-776 read by its generic folder reader from DATA_PATH/image_train, image_query
and image_test, 384x384 input, batch 36 (P=6 x K=6), 260 epochs, fp16 (apex O1 there;
float16 with dynamic loss scaling here, set explicitly so that GPUs which would pick
bfloat16 do not change the recipe), checkpoint and evaluation every 5 epochs.

Published VeRi-776 figures (the variant's README, ImageNet-pretrained ResNet-50):
rank-1 95.65, rank-5 97.91, rank-10 99.11, mAP 77.15 (re-ranked: rank-1 97.20, mAP
81.74).
"""

import ml_collections

from configs import syncbn_market


def get_config() -> ml_collections.ConfigDict:
  """Returns the variant's `configs/veri.yml` recipe."""
  config = syncbn_market.get_config()
  syncbn_market.read_folders(config, 'data/VeRi', 'image_train', 'image_query', 'image_test')
  config.input.image_size = (384, 384)
  config.batch_size = 36
  config.num_instances = 6
  config.num_epochs = 260
  config.dtype = 'float16'
  config.checkpoint_every_epochs = 5
  config.eval_every_epochs = 5
  return config
