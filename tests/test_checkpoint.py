"""Orbax checkpoints of the TrainState: round trip, keep-last, explicit paths, mismatches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import dynamic_scale as dynamic_scale_lib

from reid_jax import checkpoint as checkpoint_lib
from reid_jax import train_step as step_lib


class _Tiny(nn.Module):
  features: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(self.features)(x)


def _state(features=3, seed=0, with_scale=False):
  model = _Tiny(features)
  variables = model.init(jax.random.key(seed), jnp.ones((1, 4)))
  return step_lib.TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=optax.adam(1e-2),
      batch_stats=variables['batch_stats'],
      dynamic_scale=dynamic_scale_lib.DynamicScale() if with_scale else None)


def _advance(state, n):
  for _ in range(n):
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads)
  return state


def test_round_trip_restores_every_array(tmp_path):
  state = _advance(_state(with_scale=True), 3)
  state = state.replace(dynamic_scale=state.dynamic_scale.replace(scale=jnp.float32(128.)))
  manager = checkpoint_lib.create_manager(str(tmp_path))
  assert checkpoint_lib.save(manager, state, wait=True) == 3
  fresh = _state(seed=1, with_scale=True)
  restored = checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), fresh)
  assert int(restored.step) == 3
  assert float(restored.dynamic_scale.scale) == 128.0
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_without_checkpoint_returns_state_unchanged(tmp_path):
  state = _state()
  assert checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), state) is state


def test_keeps_only_the_last_checkpoints(tmp_path):
  manager = checkpoint_lib.create_manager(str(tmp_path), max_to_keep=2)
  state = _state()
  for _ in range(4):
    state = _advance(state, 1)
    checkpoint_lib.save(manager, state)
  manager.wait_until_finished()
  assert manager.all_steps() == [3, 4]


def test_restore_from_explicit_step_folder_and_workdir(tmp_path):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  state = _advance(_state(), 1)
  checkpoint_lib.save(manager, state)
  checkpoint_lib.save(manager, _advance(state, 1), wait=True)
  step_dir = tmp_path / 'checkpoints' / '1'
  assert int(checkpoint_lib.restore_from_path(str(step_dir), _state()).step) == 1
  assert int(checkpoint_lib.restore_from_path(str(tmp_path), _state()).step) == 2


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint_lib.restore_from_path(str(tmp_path / 'nope'), _state())
  with pytest.raises(FileNotFoundError, match='No checkpoint found'):
    checkpoint_lib.restore_from_path(str(tmp_path), _state())


def test_mismatched_checkpoint_names_the_arrays(tmp_path):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  checkpoint_lib.save(manager, _state(features=3), wait=True)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r'params/Dense_0/kernel: checkpoint has shape \(4, 3\), the model '
                           r'expects \(4, 5\)'):
    checkpoint_lib.restore(manager, _state(features=5))
