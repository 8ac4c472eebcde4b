"""Checkpoints of the TrainState with orbax, kept in `<workdir>/checkpoints`.

The state is saved as its flax state dict (params, batch_stats, opt_state, step,
dynamic_scale) so that a checkpoint can be read back without the model code; restoring
checks every array's path and shape against the state it is restored into, and a
mismatch names the arrays that differ instead of failing deep inside orbax.
"""

import os
from typing import Any, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the state it is restored into."""


def checkpoint_dir(workdir: str) -> str:
  """Returns the folder holding the checkpoints of a workdir."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """Creates the orbax CheckpointManager of a workdir.

  Args:
    workdir: the run's working directory.
    max_to_keep: number of most recent checkpoints kept on disk.

  Returns:
    A CheckpointManager writing to `<workdir>/checkpoints/<step>`.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: Any, wait: bool = False) -> int:
  """Saves `state` under its step number.

  Args:
    manager: from `create_manager`.
    state: a flax struct (TrainState) or any pytree with a `step` field.
    wait: block until the (asynchronous) write has finished.

  Returns:
    The step the checkpoint was saved under.
  """
  step = int(jax.device_get(state.step))
  if step not in manager.all_steps():
    manager.save(step, args=ocp.args.StandardSave(_to_numpy_state_dict(state)))
  if wait:
    manager.wait_until_finished()
  return step


def _to_numpy_state_dict(state: Any) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(flax.serialization.to_state_dict(state)))


def _flatten(tree: Any) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(tree, sep='/') if isinstance(tree, dict) else {}
  return {k: v for k, v in flat.items() if v is not None}


def _check_compatible(target: dict, restored: dict, source: str) -> None:
  want, got = _flatten(target), _flatten(restored)
  problems = []
  for key in sorted(set(want) - set(got)):
    problems.append(f'  missing in checkpoint: {key} (expected shape {np.shape(want[key])})')
  for key in sorted(set(got) - set(want)):
    problems.append(f'  not in the model: {key} (shape {np.shape(got[key])})')
  for key in sorted(set(want) & set(got)):
    if np.shape(want[key]) != np.shape(got[key]):
      problems.append(f'  {key}: checkpoint has shape {np.shape(got[key])}, '
                      f'the model expects {np.shape(want[key])}')
  if problems:
    shown = problems[:20] + ([f'  ... and {len(problems) - 20} more'] if len(problems) > 20 else [])
    raise CheckpointMismatchError(
        f'Checkpoint {source} does not match the model built from the config '
        f'({len(problems)} differences). Was it written with another config.model.name, '
        'config.loss.type or number of training identities?\n' + '\n'.join(shown))


def restore(manager: ocp.CheckpointManager, state: Any,
            step: Optional[int] = None) -> Any:
  """Restores the latest (or a given) checkpoint of a manager into `state`.

  Args:
    manager: from `create_manager`.
    state: a freshly created state whose structure and shapes the checkpoint must have.
    step: the step to restore; None means the latest.

  Returns:
    `state` with every array replaced by the checkpoint's, or `state` unchanged when the
    manager holds no checkpoint.

  Raises:
    CheckpointMismatchError: the checkpoint's arrays differ from the state's.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return state
  restored = manager.restore(step)
  source = os.path.join(str(manager.directory), str(step))
  return _from_restored(state, restored, source)


def restore_from_path(path: str, state: Any) -> Any:
  """Restores a checkpoint from an explicit path.

  Args:
    path: a step folder written by `save` (`<workdir>/checkpoints/<step>`), or a
      checkpoints folder or workdir, in which case its latest step is used.
    state: a freshly created state to restore into.

  Returns:
    The restored state.

  Raises:
    FileNotFoundError: `path` holds no checkpoint.
    CheckpointMismatchError: the checkpoint's arrays differ from the state's.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Checkpoint path {path} does not exist (config.checkpoint).')
  for folder in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
      manager = ocp.CheckpointManager(folder)
      return restore(manager, state)
  parent, name = os.path.split(path.rstrip('/'))
  if name.isdigit() and os.path.isdir(path):
    return restore(ocp.CheckpointManager(parent), state, step=int(name))
  raise FileNotFoundError(
      f'No checkpoint found at {path}: expected a step folder written by reid_jax '
      '(<workdir>/checkpoints/<step>), a checkpoints folder or a workdir.')


def _from_restored(state: Any, restored: dict, source: str) -> Any:
  target = flax.serialization.to_state_dict(state)
  _check_compatible(target, restored, source)
  restored = jax.tree.map(np.asarray, restored)
  return flax.serialization.from_state_dict(state, restored)
