"""Orbax checkpoints of the TrainState: round trip, keep-last, explicit paths, mismatches,
save policy, markers, best checkpoint (faults: test_checkpoint_faults.py)."""

import logging
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import dynamic_scale as dynamic_scale_lib

from configs import default
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import train_step as step_lib

# A failed restore or save leaves tensorstore callbacks for a closed asyncio loop;
# Python reports them as unraisable exceptions during a later test.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


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


@flax.struct.dataclass
class _Small:
  """A state-like struct of small numpy arrays (no model, nothing to compile)."""
  params: dict
  batch_stats: dict
  opt_state: dict
  step: Any


def _small(step, fill):
  return _Small(params={'w': np.full((3, 4), fill, np.float32)},
                batch_stats={'m': np.full((4,), fill + 1, np.float32)},
                opt_state={'mu': np.full((3, 4), fill + 2, np.float32)},
                step=np.int32(step))


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


def test_restore_from_explicit_step_folder_and_workdir(tmp_path, caplog):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  state = _advance(_state(), 1)
  checkpoint_lib.save(manager, state)
  checkpoint_lib.save(manager, _advance(state, 1), wait=True)
  step_dir = tmp_path / 'checkpoints' / '1'
  caplog.set_level(logging.INFO)
  assert int(checkpoint_lib.restore_from_path(str(step_dir), _state()).step) == 1
  assert int(checkpoint_lib.restore_from_path(str(tmp_path), _state()).step) == 2
  read_only = checkpoint_lib.create_manager(str(tmp_path), read_only=True)
  assert int(checkpoint_lib.restore(read_only, _state()).step) == 2
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


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


# --- Save policy ------------------------------------------------------------------


def _saved_steps(policy, times):
  return [step for step, now in enumerate(times, start=1) if policy.should_save(step, now)]


def test_save_policy_by_steps_epochs_and_end():
  policy = checkpoint_lib.SavePolicy(steps_per_epoch=10, total_steps=45, every_steps=7,
                                     every_epochs=2)
  # Multiples of 7, ends of epochs 2 and 4 (steps 20, 40), and the last step.
  assert _saved_steps(policy, [0.0] * 45) == [7, 14, 20, 21, 28, 35, 40, 42, 45]


def test_save_policy_by_minutes_restarts_the_clock_at_each_save():
  policy = checkpoint_lib.SavePolicy(steps_per_epoch=100, every_minutes=1.0, every_steps=5)
  policy.start(0.0)
  # One step every 25 s: 25, 50, 75 (>= 60 s: save), 100, 125 (step 5: saved by
  # step), 150, 175, 200 (75 s since 125: save), ...
  times = [25.0 * i for i in range(1, 11)]
  assert _saved_steps(policy, times) == [3, 5, 8, 10]


def test_save_policy_looks_at_the_clock_only_at_check_steps():
  policy = checkpoint_lib.SavePolicy(steps_per_epoch=100, every_minutes=1.0,
                                     time_check_every_steps=4)
  policy.start(0.0)
  times = [25.0 * i for i in range(1, 13)]  # due at step 3, looked at step 4; 8 is 100 s later
  assert _saved_steps(policy, times) == [4, 8, 12]


def test_save_policy_agree_makes_processes_save_at_the_same_steps():
  sent = []  # a broadcast of process 0's decisions, read by process 1 in order
  read = []

  def agree_0(flag):
    sent.append(bool(flag))
    return flag

  def agree_1(flag):
    del flag
    read.append(sent[len(read)])
    return read[-1]

  p0 = checkpoint_lib.SavePolicy(steps_per_epoch=100, every_minutes=1.0, agree=agree_0)
  p1 = checkpoint_lib.SavePolicy(steps_per_epoch=100, every_minutes=1.0, agree=agree_1)
  p0.start(0.0)
  p1.start(0.0)
  saved0, saved1 = [], []
  for step in range(1, 9):  # process 1's clock is stuck: alone it would never save
    if p0.should_save(step, 25.0 * step):
      saved0.append(step)
    if p1.should_save(step, 0.0):
      saved1.append(step)
  assert saved0 == saved1 == [3, 6]
  assert len(sent) == len(read) == 8  # every process takes part at every clock check
  alone = checkpoint_lib.SavePolicy(steps_per_epoch=100, every_minutes=1.0)
  assert _saved_steps(alone, [0.0] * 8) == []


def test_save_policy_from_config():
  config = default.get_config()
  config.num_epochs, config.checkpoint_every_epochs = 3, 2
  config.checkpoint_every_minutes, config.log_every_steps = 30.0, 5
  policy = checkpoint_lib.SavePolicy.from_config(config, steps_per_epoch=10)
  assert (policy.total_steps, policy.every_epochs, policy.every_steps, policy.every_minutes,
          policy.time_check_every_steps) == (30, 2, 0, 30.0, 5)
  assert _saved_steps(policy, [0.0] * 30) == [20, 30]


def test_save_policy_rejects_bad_values():
  with pytest.raises(ValueError, match='steps_per_epoch'):
    checkpoint_lib.SavePolicy(steps_per_epoch=0)
  with pytest.raises(ValueError, match='every_minutes must be >= 0'):
    checkpoint_lib.SavePolicy(steps_per_epoch=1, every_minutes=-1)


# --- Restore messages, markers, legacy checkpoints ----------------------------------


def _assert_state_equal(a, b):
  for x, y in zip(jax.tree.leaves(flax.serialization.to_state_dict(a)),
                  jax.tree.leaves(flax.serialization.to_state_dict(b)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_says_what_happened_without_orbax_warnings(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  directory = os.path.join(str(tmp_path), 'checkpoints')
  checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), _state())
  assert f'No checkpoint in {directory}: starting from step 0.' in caplog.messages
  checkpoint_lib.save(checkpoint_lib.create_manager(str(tmp_path)), _advance(_state(), 2),
                      wait=True)
  caplog.clear()
  checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), _state())
  assert f'Resuming from step 2 ({directory}/2).' in caplog.messages
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not warnings, warnings  # orbax's "could not be restored" among others


def test_checkpoints_of_earlier_versions_still_restore(tmp_path):
  # What reid_jax wrote before the marker: orbax's default item, no metadata.
  state = _advance(_state(), 2)
  legacy = ocp.CheckpointManager(os.path.join(str(tmp_path), 'checkpoints'))
  legacy.save(2, args=ocp.args.StandardSave(
      jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))))
  legacy.wait_until_finished()
  restored = checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), _state(seed=1))
  _assert_state_equal(restored, state)


def test_another_programs_checkpoint_is_not_a_reid_checkpoint(tmp_path):
  foreign = ocp.CheckpointManager(os.path.join(str(tmp_path), 'checkpoints'))
  foreign.save(7, args=ocp.args.StandardSave({'model': {'w': np.ones((4, 3))},
                                               'optimizer': {'mu': np.ones(3)}}))
  foreign.wait_until_finished()
  with pytest.raises(checkpoint_lib.NotAReidCheckpointError,
                     match=r'checkpoints/7 is not a reid_jax checkpoint: it holds '
                           r"\['model', 'optimizer'\]") as info:
    checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), _state())
  assert 'differences' not in str(info.value)
  assert os.path.isdir(tmp_path / 'checkpoints' / '7')  # not moved aside


def test_a_foreign_format_marker_is_not_a_reid_checkpoint(tmp_path):
  foreign = ocp.CheckpointManager(os.path.join(str(tmp_path), 'checkpoints'))
  foreign.save(1, args=ocp.args.StandardSave(
      jax.tree.map(np.asarray, flax.serialization.to_state_dict(_state()))),
               custom_metadata={'format': 'other_program'})
  foreign.wait_until_finished()
  with pytest.raises(checkpoint_lib.NotAReidCheckpointError, match="format is 'other_program'"):
    checkpoint_lib.restore_from_path(str(tmp_path), _state())


def test_folders_of_random_files_are_not_reid_checkpoints(tmp_path):
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'a.txt').write_text('hello')
  (tmp_path / '12').mkdir()
  (tmp_path / '12' / 'b.bin').write_bytes(b'\0' * 10)
  for path in (tmp_path / 'notes', tmp_path / '12'):
    with pytest.raises(checkpoint_lib.NotAReidCheckpointError, match='not a reid_jax checkpoint'):
      checkpoint_lib.restore_from_path(str(path), _state())


# --- Best checkpoint ------------------------------------------------------------------


def test_best_checkpoint_keeps_the_highest_map_apart(tmp_path):
  main = checkpoint_lib.create_manager(str(tmp_path), max_to_keep=1)
  best = checkpoint_lib.create_best_manager(str(tmp_path))
  results = [(1, 0.30), (2, 0.50), (3, 0.40), (4, float('nan'))]
  saved = []
  for step, m_ap in results:
    state = _small(step, float(step))
    checkpoint_lib.save(main, state)
    saved.append(checkpoint_lib.save_best(best, state, {'mAP': m_ap, 'rank1': 0.9,
                                                        'cmc': [0.9, 0.95]}))
    best.wait_until_finished()
  main.wait_until_finished()
  assert saved == [True, True, False, False]
  assert sorted(os.listdir(checkpoint_lib.best_dir(str(tmp_path)))) == ['2']
  assert main.all_steps() == [4]
  restored = checkpoint_lib.restore_from_path(checkpoint_lib.best_dir(str(tmp_path)),
                                              _small(0, 0.0))
  _assert_state_equal(restored, _small(2, 2.0))
  reopened = checkpoint_lib.create_best_manager(str(tmp_path))
  assert reopened.metrics(2) == {'mAP': 0.5, 'rank1': 0.9}
  assert not checkpoint_lib.save_best(reopened, _small(5, 5.0), {'mAP': 0.45})
  with pytest.raises(KeyError, match="ranks checkpoints by 'mAP'"):
    checkpoint_lib.save_best(reopened, _small(6, 6.0), {'rank1': 0.9})
