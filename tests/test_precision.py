"""Compute-dtype choice and flax DynamicScale behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from reid_jax import precision


@pytest.mark.parametrize('dtype,half,platform,cc,expected', [
    ('', False, 'gpu', 9.0, 'float32'),
    ('', False, 'tpu', None, 'float32'),
    ('', True, 'gpu', 7.0, 'float16'),     # V100: no bfloat16 tensor cores
    ('', True, 'cuda', 7.5, 'float16'),    # T4
    ('', True, 'gpu', None, 'float16'),    # unknown capability: the safe choice
    ('', True, 'rocm', None, 'float16'),
    ('', True, 'gpu', 8.0, 'bfloat16'),    # A100
    ('', True, 'cuda', 9.0, 'bfloat16'),   # H100
    ('', True, 'tpu', None, 'bfloat16'),
    ('', True, 'cpu', None, 'bfloat16'),
    ('float32', True, 'gpu', 9.0, 'float32'),
    ('bfloat16', False, 'gpu', 7.0, 'bfloat16'),
    ('float16', True, 'gpu', 9.0, 'float16'),  # an fp16 recipe stays fp16 on an H100
    ('float16', False, 'tpu', None, 'float16'),
])
def test_compute_dtype_table(dtype, half, platform, cc, expected):
  config = default.get_config()
  config.dtype = dtype
  config.half_precision = half
  got, why = precision.choose_compute_dtype(config, platform, cc)
  assert got == jnp.dtype(expected)
  assert precision.compute_dtype(config, platform, cc) == got
  assert precision.needs_loss_scale(got) == (expected == 'float16')
  assert why  # the log states the reason
  if dtype:
    assert 'explicitly' in why


def test_compute_dtype_default_platform_and_invalid():
  config = default.get_config()
  config.half_precision = True
  expected = 'float16' if jax.default_backend() == 'gpu' else 'bfloat16'
  if jax.default_backend() == 'gpu':
    expected = ('bfloat16' if float(jax.devices()[0].compute_capability) >= 8
                else 'float16')
  assert precision.compute_dtype(config) == jnp.dtype(expected)
  config.dtype = 'fp8'
  with pytest.raises(ValueError, match='config.dtype'):
    precision.compute_dtype(config)


def test_fp16_recipe_configs_set_float16_explicitly():
  from configs import multigpu_veri  # pylint: disable=g-import-not-at-top
  config = multigpu_veri.get_config()
  assert config.dtype == 'float16'
  assert precision.compute_dtype(config, 'gpu', 9.0) == jnp.dtype('float16')


def test_create_dynamic_scale():
  assert precision.create_dynamic_scale(jnp.float32) is None
  assert precision.create_dynamic_scale(jnp.bfloat16) is None
  ds = precision.create_dynamic_scale(jnp.float16)
  assert ds.growth_interval == 2000 and float(ds.scale) == 2.0 ** 16
  floor = precision.create_dynamic_scale(jnp.float16, initial_scale=4.0, minimum_scale=2.0)
  grad_fn = floor.value_and_grad(lambda x: jnp.sum(x) * jnp.inf)
  for _ in range(3):  # halves 4 -> 2, then stays at the floor
    floor, _, _, _ = grad_fn(jnp.ones(2, jnp.float16))
  assert float(floor.scale) == 2.0


def test_all_finite():
  assert bool(precision.all_finite({'a': jnp.ones(3), 'b': [jnp.zeros(2)]}))
  assert not bool(precision.all_finite({'a': jnp.ones(3),
                                        'b': jnp.array([1.0, jnp.nan])}))
  assert not bool(precision.all_finite(jnp.array([jnp.inf], jnp.float16)))
  assert bool(precision.all_finite({}))


def test_dynamic_scale_backoff_and_growth():
  interval = 3
  ds = precision.create_dynamic_scale('float16', growth_interval=interval,
                                      initial_scale=1024.0)
  w = jnp.ones(2, jnp.float32)

  def loss_fn(w, x):
    return jnp.sum(w * x)

  grad_fn = jax.jit(lambda ds, w, x: ds.value_and_grad(loss_fn)(w, x))
  finite_x = jnp.array([2.0, 3.0])

  # An inf in the input gives an inf gradient: not finite, scale halves.
  ds, is_fin, _, grad = grad_fn(ds, w, jnp.array([jnp.inf, 1.0]))
  assert not bool(is_fin)
  assert not bool(precision.all_finite(grad))
  assert float(ds.scale) == 512.0

  # Finite steps: gradients unscaled; the scale doubles on the step after
  # `interval` consecutive finite steps (flax counts fin_steps from 0).
  for i in range(interval):
    ds, is_fin, loss, grad = grad_fn(ds, w, finite_x)
    assert bool(is_fin)
    np.testing.assert_allclose(grad, finite_x)
    np.testing.assert_allclose(loss, 5.0)
    assert float(ds.scale) == 512.0, i
  ds, is_fin, _, _ = grad_fn(ds, w, finite_x)
  assert bool(is_fin) and float(ds.scale) == 1024.0
