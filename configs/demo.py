"""A demo small enough to train on two CPU cores in minutes on the synthetic dataset.

`make demo` generates the dataset (python -m input_pipeline.synthetic --out
data/synthetic) and trains this config. Same losses, sampler, augmentation and
schedule shape as the BoT recipe; a ResNet-18 from scratch at 128x64.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'market1501'  # the synthetic data uses the Market-1501 layout
  config.data_dir = 'data/synthetic'
  config.input.image_size = (128, 64)
  config.input.padding = 5
  config.model.name = 'resnet18'
  config.batch_size = 32
  config.num_instances = 4
  config.optim.base_lr = 1e-3
  config.schedule.warmup_epochs = 2
  config.schedule.milestones = (8, 11)
  config.num_epochs = 12
  config.log_every_steps = 10
  config.checkpoint_every_epochs = 4
  config.eval_every_epochs = 12
  config.test.batch_size = 64
  return config
