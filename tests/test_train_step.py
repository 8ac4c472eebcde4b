"""The pmapped train step: cross-device BN and global triplet mining equal one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from input_pipeline import device_augment
from reid_jax import models
from reid_jax import optim
from reid_jax import precision
from reid_jax import train
from reid_jax import train_step as step_lib

NUM_DEVICES = 4
IMAGE_SIZE = (32, 16)
P, K = 4, 4  # one identity per device
NUM_CLASSES = 6


def _config(loss_type='softmax_triplet_center', dtype='', tiny=False):
  config = default.get_config()
  config.model.name = 'resnet18'
  if tiny:  # one block per stage, width 8: for tests of the step's bookkeeping
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.width = 8
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
  # Float32 rounding noise (~3e-6 in layer 4) can flip a ReLU whose float64
  # pre-activation is nearer zero than that, in either BN form, and move that layer's
  # gradients by a few percent; batch 1 has no pre-activation that close in the forms
  # tested (flax's two-pass pmean and the one-collective BN).
  batch = _batch(1)
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


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_nonfinite_gradients_skip_the_step_on_device(dtype):
  """In every precision a non-finite step keeps params, BN stats and optimizer state."""
  config = _config('softmax', dtype=dtype, tiny=True)
  state = _state(config, dtype=jnp.dtype(dtype))
  if dtype == 'float16':  # a scale whose finite gradients fit in float16 from the start
    state = state.replace(dynamic_scale=precision.create_dynamic_scale(
        jnp.float16, initial_scale=2.0 ** 8))
  assert (state.dynamic_scale is not None) == (dtype == 'float16')
  p_train, _ = _steps(config, jax.devices()[:1])
  batch = _batch(2)
  batch['image'][0, 0, 0, 0] = np.inf
  new_state, metrics = p_train(state, _shard(batch, 1))
  assert float(metrics['skipped'][0]) == 1.0
  assert int(new_state.step) == int(state.step) + 1  # the counter still advances
  for name in ('params', 'batch_stats', 'opt_state'):
    _assert_trees_close(jax.device_get(getattr(new_state, name)),
                        jax.device_get(getattr(state, name)), rtol=0, atol=0)
  if dtype == 'float16':
    assert float(new_state.dynamic_scale.scale) == float(state.dynamic_scale.scale) / 2
  # A finite batch afterwards is applied.
  newer_state, metrics = p_train(new_state, _shard(_batch(2), 1))
  assert float(metrics['skipped'][0]) == 0.0
  assert int(newer_state.step) == int(new_state.step) + 1
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                       jax.device_get(newer_state.params), jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 0


def _reference_window(steps):
  """The accumulator's contract as a plain loop over (step, metrics) pairs."""
  sums, finite, skipped, streak, first, first_metrics = {}, 0, 0, 0, -1, None
  for step, m in steps:
    if m['skipped']:
      skipped += 1
      streak += 1
      if first < 0:
        first, first_metrics = step + 1, m
    else:
      finite += 1
      streak = 0
      for k, v in m.items():
        if k not in ('skipped', 'learning_rate'):
          sums[k] = sums.get(k, 0.0) + v
  return sums, finite, skipped, streak, first, first_metrics


def _accumulate(steps):
  acc = step_lib.init_metrics_acc(steps[0][1])
  accumulate = jax.jit(step_lib.accumulate_metrics)
  for step, m in steps:
    acc = accumulate(acc, {k: jnp.float32(v) for k, v in m.items()}, jnp.int32(step))
  return jax.device_get(acc)


def test_metrics_accumulator_equals_a_plain_loop():
  rng = np.random.default_rng(0)
  steps = []
  for step in range(9):
    bad = step in (3, 4, 7)
    loss = float('nan') if bad else float(rng.uniform(1, 2))
    steps.append((step, {'loss': loss, 'accuracy': float(rng.uniform()),
                         'learning_rate': 0.1 * step, 'skipped': float(bad)}))
  acc = _accumulate(steps)
  sums, finite, skipped, streak, first, first_metrics = _reference_window(steps)
  assert int(acc['finite_steps']) == finite == 6 and int(acc['skipped_steps']) == skipped
  for k, v in sums.items():
    np.testing.assert_allclose(acc['sums'][k], v, rtol=1e-6)
  assert int(acc['consecutive_skipped']) == streak == 0  # step 8 was finite
  # The window's first skipped step is named with its loss terms, even after a
  # finite step followed it.
  assert int(acc['first_skipped_step']) == first == 4
  assert np.isnan(acc['first_skipped_metrics']['loss'])
  assert float(acc['first_skipped_metrics']['accuracy']) == pytest.approx(
      first_metrics['accuracy'])
  assert float(acc['last']['learning_rate']) == pytest.approx(0.8)
  # A window ending inside a streak: the next window keeps the streak, not the rest.
  acc2 = _accumulate(steps[:5])
  _, _, _, streak, _, _ = _reference_window(steps[:5])
  acc2 = step_lib.reset_window(acc2)
  assert int(acc2['consecutive_skipped']) == streak == 2
  assert int(acc2['first_skipped_step']) == -1
  assert int(acc2['finite_steps']) == 0 and float(acc2['sums']['loss']) == 0.0
  assert float(acc2['last']['learning_rate']) == pytest.approx(0.4)


def test_parallel_train_step_donates_state_and_accumulator():
  config = _config('softmax_triplet', tiny=True)
  state = _state(config)
  p_train, _ = step_lib.make_parallel_steps(
      step_lib.LossConfig.from_config(config), optim.create_lr_schedule(config, 10))
  batch = _shard(_batch(3), NUM_DEVICES)
  step = functools.partial(step_lib.train_step,
                           loss_config=step_lib.LossConfig.from_config(config),
                           learning_rate_fn=optim.create_lr_schedule(config, 10))
  metric_shapes = jax.eval_shape(
      jax.vmap(step, in_axes=(None, 0), axis_name=step_lib.AXIS_NAME), state, batch)[1]
  acc = step_lib.init_metrics_acc(metric_shapes)
  sharding = step_lib.replicated_sharding()
  state, acc = jax.device_put((state, acc), sharding)
  old_leaf = jax.tree.leaves(state.params)[0]
  old_acc = acc['finite_steps']
  new_state, new_acc = p_train(state, acc, batch)
  assert old_leaf.is_deleted() and old_acc.is_deleted()
  assert int(new_acc['finite_steps']) == 1 and int(new_state.step) == 1


def test_parallel_train_step_reads_the_device_cache_as_it_reads_the_images():
  """p_train_step(state, acc, {'index', ...}, cache) equals p_train_step on the uint8
  images cache[index] (the augmentation and the update, bit for bit)."""
  config = _config('softmax_triplet', tiny=True)
  config.input.image_size = IMAGE_SIZE
  config.input.padding = 2
  step_kwargs = dict(loss_config=step_lib.LossConfig.from_config(config),
                     learning_rate_fn=optim.create_lr_schedule(config, 10),
                     augment_config=device_augment.AugmentConfig.from_config(config.input),
                     seed=7)
  p_train, _ = step_lib.make_parallel_steps(**step_kwargs)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, *IMAGE_SIZE, 3), dtype=np.uint8)
  index = rng.integers(0, 10, P * K).astype(np.int32)
  plan = {'label': _batch(0)['label'], 'epoch': np.full(P * K, 3, np.int32),
          'position': np.arange(P * K, dtype=np.int32)}
  cache = step_lib.on_devices(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))))
  state = jax.device_get(_state(config))  # on the host: each run donates its own copy
  acc = train.initial_metrics_acc(step_kwargs, state, config)  # as the loop builds it
  results = []
  for batch, image_cache in ((dict(plan, image=images[index]), None),
                             (dict(plan, index=index), cache)):
    results.append(jax.device_get(p_train(*step_lib.on_devices((state, acc)),
                                          _shard(batch, NUM_DEVICES), image_cache)))
  with pytest.raises(ValueError, match="no 'image'.*needs the cache as image_cache"):
    p_train(*step_lib.on_devices((state, acc)), _shard(dict(plan, index=index), NUM_DEVICES))
  (state_a, acc_a), (state_b, acc_b) = results
  assert int(acc_a['finite_steps']) == 1
  for x, y in zip(jax.tree.leaves((state_a.params, acc_a)),
                  jax.tree.leaves((state_b.params, acc_b))):
    np.testing.assert_array_equal(x, y)
