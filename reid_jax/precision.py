"""Compute-dtype choice and float16 loss scaling.

`config.dtype` ('float32', 'bfloat16', 'float16') wins when set; otherwise
`config.half_precision` picks float16 on GPUs (which then need dynamic loss
scaling) and bfloat16 elsewhere (TPU, CPU: same exponent range as float32, no
scaling). Loss scaling uses flax's `DynamicScale`.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax.training import dynamic_scale as dynamic_scale_lib

DTYPES = ('float32', 'bfloat16', 'float16')
_GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')


def compute_dtype(config: ml_collections.ConfigDict,
                  platform: Optional[str] = None) -> jnp.dtype:
  """The activation dtype for `config` on `platform`.

  Args:
    config: the full config (`dtype`, `half_precision`).
    platform: 'gpu', 'tpu', 'cpu', ...; defaults to `jax.default_backend()`.

  Returns:
    `config.dtype` if set; else, with `half_precision`, float16 on GPU and
    bfloat16 on any other platform; else float32.

  Raises:
    ValueError: `config.dtype` is set to something other than DTYPES.
  """
  if config.dtype:
    if config.dtype not in DTYPES:
      raise ValueError(f'Unknown config.dtype={config.dtype!r}; allowed '
                       f'values: {", ".join(DTYPES)} (or empty).')
    return jnp.dtype(config.dtype)
  if not config.half_precision:
    return jnp.dtype('float32')
  if platform is None:
    platform = jax.default_backend()
  if platform.lower() in _GPU_PLATFORMS:
    return jnp.dtype('float16')
  return jnp.dtype('bfloat16')


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
) -> Optional[dynamic_scale_lib.DynamicScale]:
  """A flax `DynamicScale` for float16, None otherwise.

  The scale halves on every step with a non-finite gradient (the update should
  then be skipped) and doubles on the step after `growth_interval` consecutive
  finite steps (flax's counting: the (growth_interval + 1)-th finite step).

  Args:
    dtype: the compute dtype.
    growth_interval: finite steps between scale increases (flax/apex: 2000).
    initial_scale: the starting loss scale (flax default 2**16).

  Returns:
    `DynamicScale` or None.
  """
  if not needs_loss_scale(dtype):
    return None
  return dynamic_scale_lib.DynamicScale(
      growth_interval=growth_interval, scale=initial_scale)


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
