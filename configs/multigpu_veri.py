"""The multi-GPU variant on VeRi-776: 384x384 input in half precision (fp16 on GPU)."""

import ml_collections

from configs import multigpu_market


def get_config() -> ml_collections.ConfigDict:
  config = multigpu_market.get_config()
  config.dataset = 'veri776'
  config.data_dir = 'data/VeRi'
  config.input.image_size = (384, 384)
  # The recipe's fp16 (apex): explicit, so bfloat16-capable GPUs do not change it.
  config.dtype = 'float16'
  return config
