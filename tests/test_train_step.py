"""The pmapped train step: cross-device BN and global triplet mining equal one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from reid_jax import models
from reid_jax import optim
from reid_jax import precision
from reid_jax import train_step as step_lib

NUM_DEVICES = 4
IMAGE_SIZE = (32, 16)
P, K = 4, 4  # one identity per device
NUM_CLASSES = 6


def _config(loss_type='softmax_triplet_center', dtype=''):
  config = default.get_config()
  config.model.name = 'resnet18'
  config.loss.type = loss_type
  config.batch_size = P * K
  config.num_instances = K
  config.dtype = dtype
  config.optim.base_lr = 1e-3
  config.schedule.warmup_epochs = 0
  return config


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(P * K, *IMAGE_SIZE, 3)).astype(np.float32)
  labels = np.repeat(rng.choice(NUM_CLASSES, P, replace=False), K).astype(np.int32)
  return {'image': images, 'label': labels}


def _shard(batch, n):
  return jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)


def _state(config, dtype=jnp.float32):
  model = models.create_model(config.model, NUM_CLASSES, dtype=dtype,
                              bn_axis_name=step_lib.AXIS_NAME)
  tx = optim.create_optimizer(config, steps_per_epoch=10)
  state = step_lib.create_train_state(
      jax.random.key(0), model, tx, IMAGE_SIZE, NUM_CLASSES,
      use_center=config.loss.type.endswith('center'),
      dynamic_scale=precision.create_dynamic_scale(dtype))
  return state


def _steps(config, devices):
  loss_config = step_lib.LossConfig.from_config(config)
  lr_fn = optim.create_lr_schedule(config, 10)
  p_train = jax.pmap(
      functools.partial(step_lib.train_step, loss_config=loss_config, learning_rate_fn=lr_fn),
      axis_name=step_lib.AXIS_NAME, in_axes=(None, 0), out_axes=(None, 0), devices=devices)
  p_eval = jax.pmap(step_lib.eval_step, axis_name=step_lib.AXIS_NAME, in_axes=(None, 0),
                    devices=devices)
  return p_train, p_eval


@pytest.fixture(scope='module')
def runs():
  """One train step and one eval step on 4 devices and on 1 device, same global batch."""
  assert jax.device_count() >= NUM_DEVICES, 'tests/conftest.py sets 4 CPU devices'
  config = _config()
  # SGD: its update is proportional to the gradient, so parameter differences measure
  # gradient differences (Adam's first step is lr * sign(g) and flips on ~0 gradients).
  config.optim.name = 'sgd'
  config.optim.base_lr = 0.1
  state = _state(config)
  batch = _batch()
  out = {}
  for n in (1, NUM_DEVICES):
    p_train, p_eval = _steps(config, jax.devices()[:n])
    new_state, metrics = p_train(state, _shard(batch, n))
    feats = p_eval(new_state, _shard({'image': batch['image']}, n))
    out[n] = (jax.device_get(new_state), jax.device_get(metrics),
              np.asarray(feats).reshape(P * K, -1))
  return state, out


def _assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_pmap_train_step_loss_equals_single_device(runs):
  _, out = runs
  for key in ('loss', 'ce_loss', 'triplet_loss', 'center_loss', 'accuracy'):
    np.testing.assert_allclose(np.mean(out[4][1][key]), out[1][1][key][0], rtol=1e-5,
                               err_msg=key)


def test_pmap_batch_stats_equal_single_device(runs):
  _, out = runs
  _assert_trees_close(out[4][0].batch_stats, out[1][0].batch_stats)


def test_pmap_updated_params_equal_single_device(runs):
  state, out = runs
  _assert_trees_close(out[4][0].params, out[1][0].params)
  # The step really moved the params (else the comparison would be vacuous).
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                       out[1][0].params, jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 1e-5


def test_pmap_eval_features_equal_single_device(runs):
  _, out = runs
  # Features reach ~50: compare with an absolute tolerance relative to their scale.
  scale = np.abs(out[1][2]).max()
  np.testing.assert_allclose(out[4][2], out[1][2], rtol=1e-4, atol=2e-5 * scale)


def test_triplet_sees_global_batch(runs):
  # With one identity per device, per-device mining would find no negative at all;
  # the hardest negative distance must be the single-device (whole batch) one.
  _, out = runs
  np.testing.assert_allclose(out[4][1]['dist_an'][0], out[1][1]['dist_an'][0], rtol=1e-5)
  assert 0 < out[1][1]['dist_an'][0] < 1e3


def test_few_steps_lower_the_loss():
  config = _config('softmax_triplet')
  state = _state(config)
  p_train, _ = _steps(config, jax.devices()[:1])
  batch = _shard(_batch(1), 1)
  losses = []
  for _ in range(6):
    state, metrics = p_train(state, batch)
    losses.append(float(metrics['loss'][0]))
  assert losses[-1] < 0.7 * losses[0], losses


def test_float16_nonfinite_gradients_skip_step_and_halve_scale():
  config = _config('softmax', dtype='float16')
  state = _state(config, dtype=jnp.float16)
  assert state.dynamic_scale is not None
  p_train, _ = _steps(config, jax.devices()[:1])
  batch = _batch(2)
  batch['image'][0, 0, 0, 0] = np.inf
  new_state, metrics = p_train(state, _shard(batch, 1))
  assert float(metrics['grads_finite'][0]) == 0.0
  assert float(new_state.dynamic_scale.scale) == float(state.dynamic_scale.scale) / 2
  _assert_trees_close(jax.device_get(new_state.params), jax.device_get(state.params),
                      rtol=0, atol=0)
  _assert_trees_close(jax.device_get(new_state.batch_stats),
                      jax.device_get(state.batch_stats), rtol=0, atol=0)
  # A finite batch afterwards is applied.
  newer_state, metrics = p_train(new_state, _shard(_batch(2), 1))
  assert float(metrics['grads_finite'][0]) == 1.0
  assert int(newer_state.step) == int(new_state.step) + 1
