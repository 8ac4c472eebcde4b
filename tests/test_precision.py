"""Compute-dtype choice and flax DynamicScale behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from reid_jax import precision


@pytest.mark.parametrize('dtype,half,platform,expected', [
    ('', False, 'gpu', 'float32'),
    ('', False, 'tpu', 'float32'),
    ('', True, 'gpu', 'float16'),
    ('', True, 'cuda', 'float16'),
    ('', True, 'tpu', 'bfloat16'),
    ('', True, 'cpu', 'bfloat16'),
    ('float32', True, 'gpu', 'float32'),
    ('bfloat16', False, 'gpu', 'bfloat16'),
    ('float16', False, 'tpu', 'float16'),
])
def test_compute_dtype_table(dtype, half, platform, expected):
  config = default.get_config()
  config.dtype = dtype
  config.half_precision = half
  got = precision.compute_dtype(config, platform)
  assert got == jnp.dtype(expected)
  assert precision.needs_loss_scale(got) == (expected == 'float16')


def test_compute_dtype_default_platform_and_invalid():
  config = default.get_config()
  config.half_precision = True
  expected = 'float16' if jax.default_backend() == 'gpu' else 'bfloat16'
  assert precision.compute_dtype(config) == jnp.dtype(expected)
  config.dtype = 'fp8'
  with pytest.raises(ValueError, match='config.dtype'):
    precision.compute_dtype(config)


def test_create_dynamic_scale():
  assert precision.create_dynamic_scale(jnp.float32) is None
  assert precision.create_dynamic_scale(jnp.bfloat16) is None
  ds = precision.create_dynamic_scale(jnp.float16)
  assert ds.growth_interval == 2000 and float(ds.scale) == 2.0 ** 16


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
