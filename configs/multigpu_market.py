"""The multi-GPU variant of the baseline on Market-1501: synchronized BN, its own recipe.

224x224 input, P=8 identities x K=8 images, Adam at 1e-4, linear warmup from 0.01 over
10 epochs, lr x0.6 at epochs 20, 30 and every 15 epochs after, 30 epochs. Batch norm
statistics are always synchronized across devices in reid_jax (cross-device BN).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.input.image_size = (224, 224)
  config.batch_size = 64
  config.num_instances = 8
  config.optim.base_lr = 1e-4
  config.schedule.warmup_factor = 0.01
  config.schedule.warmup_epochs = 10
  config.schedule.gamma = 0.6
  config.schedule.milestones = (20, 30, 45, 60, 75, 90, 105)
  config.num_epochs = 30
  config.checkpoint_every_epochs = 10
  config.eval_every_epochs = 10
  return config
