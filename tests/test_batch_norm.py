"""One-collective cross-device BatchNorm: float64 numpy, one device and flax as references."""

import collections

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import batch_norm

NUM_DEVICES = 4
AXIS = 'batch'
SHARE = (16, 6, 6)  # per-device (N, H, W): 576 elements per channel, 2304 in all
CHANNELS = 5
MOMENTUM = 0.9
EPS = 1e-5
COLLECTIVES = ('all_gather', 'psum', 'pmax', 'pmin', 'ppermute', 'all_to_all',
               'reduce_scatter', 'psum_invariant', 'all_gather_invariant')


@pytest.fixture(scope='module', autouse=True)
def _devices():
  assert jax.device_count() >= NUM_DEVICES, 'tests/conftest.py sets 4 CPU devices'


def _x(loc, scale, seed=0, share=SHARE, channels=CHANNELS):
  """(devices, *share, C) float32 input, channel c offset by c * scale."""
  rng = np.random.default_rng(seed)
  x = rng.normal(loc, scale, size=(NUM_DEVICES, *share, channels))
  return (x + scale * np.arange(channels)).astype(np.float32)


def _variables(channels=CHANNELS, seed=1):
  """Non-trivial params and running statistics (float32)."""
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {'params': {'scale': f32(rng.uniform(0.5, 2.0, channels)),
                     'bias': f32(rng.normal(size=channels))},
          'batch_stats': {'mean': f32(rng.normal(size=channels)),
                          'var': f32(rng.uniform(0.5, 2.0, channels))}}


def _numpy_bn(x, variables):
  """float64 train-mode BN over all axes but the last, from the definition.

  Returns:
    (y, new running mean, new running var, batch var); the running var is updated
    with the biased batch variance, as flax does.
  """
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  p = {k: np.asarray(v, np.float64) for k, v in variables['params'].items()}
  s = {k: np.asarray(v, np.float64) for k, v in variables['batch_stats'].items()}
  n = x.shape[0]
  mean = sum(x[i] for i in range(n)) / n
  var = sum((x[i] - mean)**2 for i in range(n)) / n
  y = (x - mean) / np.sqrt(var + EPS) * p['scale'] + p['bias']
  return (y, MOMENTUM * s['mean'] + (1 - MOMENTUM) * mean,
          MOMENTUM * s['var'] + (1 - MOMENTUM) * var, var)


def _train_apply(module, variables, x):
  return module.apply(variables, x, mutable=['batch_stats'])


def _loss_weights(shape, seed=2):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape), jnp.float32),
          jnp.asarray(rng.normal(size=shape), jnp.float32))


def _share_loss(y, w, u):
  """One device's loss: a mean over its share (weighted so BN's gradient is not 0)."""
  return jnp.mean(w * y + u * y * y)


@pytest.fixture(scope='module')
def pmapped():
  """pmapped train-mode BN: (variables, x, w, u) -> (y, stats, loss, grads)."""
  module = batch_norm.BatchNorm(use_running_average=False, axis_name=AXIS,
                                momentum=MOMENTUM, epsilon=EPS)

  def fwd_bwd(variables, x, w, u):
    def loss_fn(params, x):
      y, upd = _train_apply(module, {'params': params,
                                     'batch_stats': variables['batch_stats']}, x)
      return _share_loss(y, w, u), (y, upd['batch_stats'])

    (loss, (y, stats)), (g_params, g_x) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(variables['params'], x)
    # Each device's param gradient is the partial of its own loss; the global loss
    # is the sum of the devices' losses, so sum them (the train step pmeans instead).
    return y, stats, jax.lax.psum(loss, AXIS), jax.lax.psum(g_params, AXIS), g_x

  return jax.pmap(fwd_bwd, axis_name=AXIS, in_axes=(None, 0, 0, 0))


def test_pmap_equals_float64_global_batch_at_mean_100(pmapped):
  x = _x(100.0, 1.0)
  variables = _variables()
  w, u = _loss_weights(x.shape)
  y, stats, _, _, _ = pmapped(variables, x, w, u)
  y_ref, mean_ref, var_ref, _ = _numpy_bn(x, variables)
  # y is O(1); the float32 mean of values ~100 is off by a few ulp (ulp 7.6e-6),
  # which y sees times scale / std: ~5e-5 here, as for flax's pmapped two-pass BN.
  np.testing.assert_allclose(np.asarray(y).reshape(y_ref.shape), y_ref, atol=1e-4)
  for d in range(NUM_DEVICES):  # every device holds the same, global statistics
    np.testing.assert_allclose(stats['mean'][d], mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats['var'][d], var_ref, rtol=2e-6)


def test_variance_accuracy_at_mean_100():
  """The combined variance keeps ~1e-7 relative error where E[x^2] - E[x]^2 fails."""
  x = _x(100.0, 1.0, seed=3)
  axes = (0, 1, 2)
  mean, var = jax.pmap(lambda v: batch_norm.batch_moments(v, axes, AXIS),
                       axis_name=AXIS)(x)
  _, _, _, var_ref = _numpy_bn(x, _variables())
  mean_ref = x.reshape(-1, CHANNELS).astype(np.float64).mean(0)
  np.testing.assert_allclose(mean[0], mean_ref, rtol=1e-6)  # a few float32 ulp
  rel_err = np.max(np.abs(np.asarray(var[0], np.float64) - var_ref) / var_ref)
  assert rel_err < 2e-6, rel_err
  # Contrast: one all-reduce of E[x] and E[x^2] (or of moments shifted by a running
  # mean that is still 0) computes var = E[x^2] - E[x]^2 in float32, which cancels
  # ~1e4 down to ~1 and keeps only ~1e-3 of relative accuracy (ulp(1e4) ~ 1e-3).
  xg = jnp.asarray(x.reshape(-1, CHANNELS))
  naive = jnp.mean(xg * xg, 0) - jnp.square(jnp.mean(xg, 0))
  naive_err = np.max(np.abs(np.asarray(naive, np.float64) - var_ref) / var_ref)
  assert naive_err > 1e-4, naive_err  # the input is hard enough to tell them apart
  assert rel_err * 100 < naive_err, (rel_err, naive_err)


@pytest.mark.parametrize('loc, scale', [(0.0, 1.0), (100.0, 1.0)])
def test_pmap_equals_single_device(pmapped, loc, scale):
  x = _x(loc, scale, seed=4)
  variables = _variables()
  w, u = _loss_weights(x.shape)
  y, stats, loss, g_params, g_x = pmapped(variables, x, w, u)

  single = batch_norm.BatchNorm(use_running_average=False, momentum=MOMENTUM,
                                epsilon=EPS)

  def global_loss(params, xg):
    y, upd = _train_apply(single, {'params': params,
                                   'batch_stats': variables['batch_stats']}, xg)
    y = y.reshape(x.shape)
    # The same sum over devices of per-share means as the pmapped version.
    losses = jax.vmap(_share_loss)(y, w, u)
    return jnp.sum(losses), (y, upd['batch_stats'])

  (loss_1, (y_1, stats_1)), (g_params_1, g_x_1) = jax.jit(jax.value_and_grad(
      global_loss, argnums=(0, 1), has_aux=True))(
          variables['params'], x.reshape(-1, *x.shape[2:]))
  tol = dict(rtol=1e-5, atol=2e-5 * max(1.0, loc / 10))
  np.testing.assert_allclose(y, y_1, **tol)
  np.testing.assert_allclose(loss[0], loss_1, atol=1e-5)  # a mean of O(1) terms
  for name in ('mean', 'var'):
    np.testing.assert_allclose(stats[name][0], stats_1[name], rtol=2e-6, atol=1e-6)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(g_params[name][0], g_params_1[name], rtol=1e-4, atol=1e-5)
  g_x_1 = np.asarray(g_x_1).reshape(g_x.shape)
  assert np.max(np.abs(g_x_1)) > 1e-4  # a non-trivial gradient
  np.testing.assert_allclose(g_x, g_x_1, rtol=1e-4, atol=1e-4 * np.max(np.abs(g_x_1)))


def _flax_bn(**kwargs):
  return nn.BatchNorm(use_fast_variance=False, **kwargs)


@pytest.mark.parametrize('shape, dtype, use_bias', [
    ((6, 5, 4, 7), jnp.float32, True),
    ((9, 7), jnp.float32, False),
    ((6, 5, 4, 7), jnp.bfloat16, True),
])
def test_equals_flax_single_device(shape, dtype, use_bias):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(3.0, 2.0, size=shape), jnp.float32).astype(dtype)
  kwargs = dict(momentum=MOMENTUM, epsilon=EPS, use_bias=use_bias, dtype=dtype,
                param_dtype=jnp.float32, scale_init=nn.initializers.ones,
                bias_init=nn.initializers.zeros)
  ours_vars = batch_norm.BatchNorm(use_running_average=True, **kwargs).init(
      jax.random.key(0), x)
  flax_vars = _flax_bn(use_running_average=True, **kwargs).init(jax.random.key(0), x)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), ours_vars)
          == jax.tree.map(lambda a: (a.shape, a.dtype), flax_vars))
  jax.tree.map(np.testing.assert_array_equal, ours_vars, flax_vars)

  variables = _variables(shape[-1])
  if not use_bias:
    del variables['params']['bias']
  w, _ = _loss_weights(shape)
  results = {}
  # use_running_average given at call time this time.
  for name, module in (('ours', batch_norm.BatchNorm(**kwargs)),
                       ('flax', _flax_bn(**kwargs))):
    def loss_fn(params, x, module=module):
      y, upd = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                            x, use_running_average=False, mutable=['batch_stats'])
      return jnp.sum(w * y.astype(jnp.float32)), (y, upd['batch_stats'])

    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True))(variables['params'], x)
    y_eval = jax.jit(lambda v, x, m=module: m.apply(v, x, use_running_average=True))(
        variables, x)
    results[name] = (y, stats, grads, y_eval)
  ours, ref = results['ours'], results['flax']
  assert ours[0].dtype == ref[0].dtype == dtype
  assert ours[1]['var'].dtype == jnp.float32  # statistics stay float32 for bf16

  def close(a, b):
    assert a.dtype == b.dtype
    atol = 1e-6 if a.dtype == jnp.float32 else 1e-2  # 1e-2: ~1 bfloat16 ulp
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-6, atol=atol)

  jax.tree.map(close, ours, ref)


def _count_collectives(fn, *args):
  """Collective primitives in the jaxpr of `fn(*args)`, nested jaxprs included."""
  counts = collections.Counter()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in COLLECTIVES:
        counts[eqn.primitive.name] += 1
    for sub in jex_core.subjaxprs(jaxpr):
      visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return dict(counts)


@pytest.mark.parametrize('module_cls, forward, backward', [
    (batch_norm.BatchNorm, {'all_gather': 1}, {'reduce_scatter': 1}),
    # flax's two-pass form, for contrast (and to show the counter sees psums).
    (_flax_bn, {'psum': 2}, {'psum': 2}),
])
def test_one_collective_per_layer(module_cls, forward, backward):
  module = module_cls(use_running_average=False, axis_name=AXIS, momentum=MOMENTUM)
  x = jnp.asarray(_x(1.0, 1.0, share=(2, 3, 3), channels=3))
  variables = module.init(jax.random.key(0), x[0])

  def fwd(v, x):
    return _train_apply(module, v, x)

  def fwd_bwd(v, x):
    def loss_fn(params, x):
      y, upd = _train_apply(module, {'params': params,
                                     'batch_stats': v['batch_stats']}, x)
      return jnp.sum(y * jnp.arange(3.0)), upd
    return jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(v['params'], x)

  pmap = lambda f: jax.pmap(f, axis_name=AXIS, in_axes=(None, 0))
  assert _count_collectives(pmap(fwd), variables, x) == forward
  expected = collections.Counter(forward) + collections.Counter(backward)
  assert _count_collectives(pmap(fwd_bwd), variables, x) == dict(expected)
  # Eval mode and init run no collective.
  evaluate = lambda v, x: module.clone(use_running_average=True).apply(v, x)
  assert _count_collectives(pmap(evaluate), variables, x) == {}
  assert _count_collectives(lambda x: module.init(jax.random.key(0), x), x[0]) == {}


def test_combine_moments_unequal_counts():
  rng = np.random.default_rng(6)
  sizes = (1, 3, 10, 50, 7)
  parts = [rng.normal(100.0 + i, 1.0 + i, size=(n, 4)).astype(np.float32)
           for i, n in enumerate(sizes)]
  means = np.stack([p.astype(np.float64).mean(0) for p in parts]).astype(np.float32)
  m2s = np.stack([((p.astype(np.float64) - p.astype(np.float64).mean(0))**2).sum(0)
                  for p in parts]).astype(np.float32)
  count, mean, m2 = batch_norm.combine_moments(np.array(sizes), jnp.asarray(means),
                                               jnp.asarray(m2s))
  whole = np.concatenate(parts).astype(np.float64)
  assert float(count) == sum(sizes)
  np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-6)
  np.testing.assert_allclose(m2, ((whole - whole.mean(0))**2).sum(0), rtol=1e-5)
  # A tree of combinations equals the flat one.
  c_a, mean_a, m2_a = batch_norm.combine_moments(np.array(sizes[:2]), means[:2], m2s[:2])
  c_b, mean_b, m2_b = batch_norm.combine_moments(np.array(sizes[2:]), means[2:], m2s[2:])
  _, mean_t, m2_t = batch_norm.combine_moments(
      jnp.stack([c_a, c_b]), jnp.stack([mean_a, mean_b]), jnp.stack([m2_a, m2_b]))
  np.testing.assert_allclose(mean_t, whole.mean(0), rtol=1e-6)
  np.testing.assert_allclose(m2_t, ((whole - whole.mean(0))**2).sum(0), rtol=1e-5)


def test_local_moments_from_definition():
  x = _x(100.0, 1.0, seed=7)[0]
  count, mean, m2 = batch_norm.local_moments(jnp.asarray(x), (0, 1, 2))
  xf = x.reshape(-1, CHANNELS).astype(np.float64)
  assert count == xf.shape[0]
  np.testing.assert_allclose(mean, xf.mean(0), rtol=1e-6)  # a few float32 ulp
  np.testing.assert_allclose(m2, ((xf - xf.mean(0))**2).sum(0), rtol=2e-6)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='at least 2 dimensions'):
    batch_norm.BatchNorm(use_running_average=False).init(
        jax.random.key(0), jnp.zeros((4,)))
  with pytest.raises(ValueError, match='counts'):
    batch_norm.combine_moments(np.ones(3), jnp.zeros((2, 4)), jnp.zeros((2, 4)))
