"""Compute-dtype choice and float16 loss scaling.

`config.dtype` ('float32', 'bfloat16', 'float16') wins when set; otherwise
`config.half_precision` picks:
  * bfloat16 on TPU and CPU (float32's exponent range: no loss scaling);
  * bfloat16 on GPUs of compute capability 8.0 and later (A100, H100, ...), which run
    bfloat16 matrix units at the float16 rate, so the loss scale is not needed;
  * float16 with dynamic loss scaling on older GPUs (V100, T4, ...).
Configs that reproduce an fp16 recipe set `dtype='float16'` explicitly, so this
choice never silently changes them. Loss scaling uses flax's `DynamicScale`.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax.training import dynamic_scale as dynamic_scale_lib

from input_pipeline import device_augment
from input_pipeline.choices import check_choice

# The compute dtypes: those the device augmentation writes the images in.
DTYPES = device_augment.OUTPUT_DTYPES
# config.dtype: one of DTYPES, or '' to let config.half_precision choose.
CONFIG_DTYPES = ('',) + DTYPES
_GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')
# GPUs from this compute capability on (Ampere) have bfloat16 tensor cores.
BF16_MIN_COMPUTE_CAPABILITY = 8.0


def _device_compute_capability() -> Optional[float]:
  """The first local device's CUDA compute capability, or None (not a CUDA GPU)."""
  cc = getattr(jax.local_devices()[0], 'compute_capability', None)
  try:
    return float(cc) if cc is not None else None
  except (TypeError, ValueError):
    return None


def choose_compute_dtype(config: ml_collections.ConfigDict,
                         platform: Optional[str] = None,
                         compute_capability: Optional[float] = None
                         ) -> tuple[jnp.dtype, str]:
  """The activation dtype for `config` on this hardware, and why.

  Args:
    config: the full config (`dtype`, `half_precision`).
    platform: 'gpu', 'tpu', 'cpu', ...; defaults to `jax.default_backend()`.
    compute_capability: the GPU's CUDA compute capability (e.g. 8.0); defaults to
      the first local device's when `platform` is a GPU. None on ROCm or unknown.

  Returns:
    (dtype, reason): `config.dtype` if set; else with `half_precision` bfloat16 on
    TPU/CPU and on GPUs of compute capability >= 8.0, float16 on other GPUs; else
    float32. `reason` is one sentence for the log.

  Raises:
    ValueError: `config.dtype` is not one of CONFIG_DTYPES.
  """
  check_choice('config.dtype', config.dtype, CONFIG_DTYPES)
  if config.dtype:
    return jnp.dtype(config.dtype), f'config.dtype={config.dtype!r} set explicitly'
  if not config.half_precision:
    return jnp.dtype('float32'), 'config.half_precision is False'
  if platform is None:
    platform = jax.default_backend()
  platform = platform.lower()
  if platform not in _GPU_PLATFORMS:
    return jnp.dtype('bfloat16'), (f'half precision on {platform}: bfloat16 needs no '
                                   'loss scaling')
  if compute_capability is None and platform == jax.default_backend():
    compute_capability = _device_compute_capability()
  if compute_capability is not None and compute_capability >= BF16_MIN_COMPUTE_CAPABILITY:
    return jnp.dtype('bfloat16'), (
        f'half precision on a GPU of compute capability {compute_capability:g} '
        f'(>= {BF16_MIN_COMPUTE_CAPABILITY:g}): bfloat16, no loss scaling')
  return jnp.dtype('float16'), (
      f'half precision on a GPU of compute capability {compute_capability} '
      f'(< {BF16_MIN_COMPUTE_CAPABILITY:g} or unknown): float16 with dynamic loss scaling')


def compute_dtype(config: ml_collections.ConfigDict,
                  platform: Optional[str] = None,
                  compute_capability: Optional[float] = None) -> jnp.dtype:
  """The activation dtype `choose_compute_dtype` picks (without the reason)."""
  return choose_compute_dtype(config, platform, compute_capability)[0]


def needs_loss_scale(dtype: Any) -> bool:
  """Whether training in `dtype` needs loss scaling (float16 only).

  Args:
    dtype: a dtype or its name.

  Returns:
    True for float16.
  """
  return jnp.dtype(dtype) == jnp.dtype('float16')


def create_dynamic_scale(
    dtype: Any, growth_interval: int = 2000, initial_scale: float = 65536.0,
    minimum_scale: Optional[float] = None,
) -> Optional[dynamic_scale_lib.DynamicScale]:
  """A flax `DynamicScale` for float16, None otherwise.

  The scale halves on every step with a non-finite gradient (the update should
  then be skipped) and doubles on the step after `growth_interval` consecutive
  finite steps (flax's counting: the (growth_interval + 1)-th finite step).

  Args:
    dtype: the compute dtype.
    growth_interval: finite steps between scale increases (flax/apex: 2000).
    initial_scale: the starting loss scale (flax default 2**16).
    minimum_scale: the scale never falls below this (flax's default: the smallest
      normal float32); the training loop stops a run whose scale reached it.

  Returns:
    `DynamicScale` or None.
  """
  if not needs_loss_scale(dtype):
    return None
  kwargs = {} if minimum_scale is None else {'minimum_scale': float(minimum_scale)}
  return dynamic_scale_lib.DynamicScale(
      growth_interval=growth_interval, scale=initial_scale, **kwargs)


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every array leaf of `tree` is finite.

  Args:
    tree: pytree of arrays.

  Returns:
    Scalar bool array (True for an empty tree).
  """
  leaves = jax.tree_util.tree_leaves(tree)
  result = jnp.array(True)
  for leaf in leaves:
    result = result & jnp.all(jnp.isfinite(leaf))
  return result
