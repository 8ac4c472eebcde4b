"""Restoring checkpoints into a state of the same shapes, past unreadable steps.

- `restore` falls back to the previous step when the latest is unreadable (a file
  missing or truncated): it warns naming both and moves the bad folder aside to
  `<step>.corrupt-<time>` (kept for inspection, ignored by orbax), so that the step
  is written again when training passes it.
- `restore_from_path` reads an explicit step folder, checkpoints folder or workdir
  and never changes it.
- A folder that is not a reid_jax checkpoint raises `NotAReidCheckpointError`; one
  written for another model raises `CheckpointMismatchError` naming the arrays.
"""

import logging
import os
import time
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from reid_jax import checkpoint_layout as layout
from reid_jax import checkpoint_save
from reid_jax import multihost
from reid_jax.checkpoint_layout import CheckpointCorruptError
from reid_jax.checkpoint_layout import CheckpointMismatchError
from reid_jax.checkpoint_layout import NotAReidCheckpointError
from reid_jax.checkpoint_save import CheckpointManager


def _shape(value: Any) -> tuple:
  return tuple(value.shape) if hasattr(value, 'shape') else np.shape(value)


def _flatten(tree: Any) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(tree, sep='/') if isinstance(tree, Mapping) else {}
  return {k: v for k, v in flat.items() if v is not None}


def _check_compatible(target: dict, restored: dict, source: str) -> None:
  want, got = _flatten(target), _flatten(restored)
  problems = []
  for key in sorted(set(want) - set(got)):
    problems.append(f'  missing in checkpoint: {key} (expected shape {_shape(want[key])})')
  for key in sorted(set(got) - set(want)):
    problems.append(f'  not in the model: {key} (shape {_shape(got[key])})')
  for key in sorted(set(want) & set(got)):
    if _shape(want[key]) != _shape(got[key]):
      problems.append(f'  {key}: checkpoint has shape {_shape(got[key])}, '
                      f'the model expects {_shape(want[key])}')
  if problems:
    shown = problems[:20] + ([f'  ... and {len(problems) - 20} more'] if len(problems) > 20 else [])
    raise CheckpointMismatchError(
        f'Checkpoint {source} does not match the model built from the config '
        f'({len(problems)} differences). Was it written with another config.model.name, '
        'config.loss.type or number of training identities?\n' + '\n'.join(shown))


def _looks_like_orbax_step(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, name)) for name in (
      '_CHECKPOINT_METADATA', 'default/_METADATA', 'default/manifest.ocdbt'))


def _restore_step(manager: CheckpointManager, step: int, state: Any) -> Any:
  """Restores one step; CheckpointCorruptError if its files cannot be read."""
  source = os.path.join(str(manager.directory), str(step))
  if not _looks_like_orbax_step(source):
    raise CheckpointCorruptError(f'{source} holds no orbax checkpoint files')
  try:
    custom = dict(manager.metadata(step).custom_metadata or {})
    tree = manager.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointCorruptError(layout.short_error(e)) from e
  tree = getattr(tree, 'tree', tree)
  if custom.get('format') not in (None, layout.FORMAT_NAME):
    raise NotAReidCheckpointError(
        f'{source} is not a reid_jax checkpoint (its format is {custom["format"]!r}).')
  if custom.get('format_version', 0) > layout.FORMAT_VERSION:
    raise NotAReidCheckpointError(
        f'{source} was written by a newer reid_jax (format version '
        f'{custom["format_version"]} > {layout.FORMAT_VERSION}): update reid_jax to read it.')
  if isinstance(tree, Mapping) and not set(layout.STATE_KEYS) <= set(tree):
    raise NotAReidCheckpointError(
        f'{source} is not a reid_jax checkpoint: it holds {sorted(tree)}, a reid_jax '
        f'checkpoint holds {list(layout.STATE_KEYS)}.')
  if not isinstance(tree, Mapping) and custom.get('format') is None:
    raise CheckpointCorruptError(f'{source}: neither its marker nor its tree is readable')
  target = layout.to_numpy_state_dict(state)
  if isinstance(tree, Mapping):
    _check_compatible(target, tree, source)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(layout.restore_target(target)))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointCorruptError(layout.short_error(e)) from e
  _check_compatible(target, restored, source)
  return flax.serialization.from_state_dict(state, jax.tree.map(np.asarray, restored))


def _move_aside(manager: CheckpointManager, step: int) -> Optional[str]:
  """Renames an unreadable step folder to `<step>.corrupt-<time>` (process 0).

  Returns:
    The new name; None for a read-only manager (nothing moved).
  """
  source = os.path.join(str(manager.directory), str(step))
  target = f'{source}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}'
  if manager.read_only:
    return None
  if jax.process_index() == 0:
    os.replace(source, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'reid_jax_corrupt_checkpoint_{step}')
  manager.reload()
  return target


def restore(manager: CheckpointManager, state: Any, step: Optional[int] = None) -> Any:
  """Restores the latest readable (or a given) checkpoint of a manager into `state`.

  An unreadable latest step (missing or truncated file, unfinished folder) is moved
  aside to `<step>.corrupt-<time>` (unless the manager is read-only) and the previous
  step is tried, with a warning naming both. Logs what was restored.

  Args:
    manager: from `create_manager`.
    state: a freshly created state whose structure and shapes the checkpoint must have.
    step: the step to restore (no fallback); None means the latest readable.

  Returns:
    `state` with every array replaced by the checkpoint's, or `state` unchanged when
    the manager holds no (readable) checkpoint.

  Raises:
    CheckpointMismatchError: the checkpoint's arrays differ from the state's.
    NotAReidCheckpointError: the folder holds another program's checkpoint.
    CheckpointCorruptError: the given `step` cannot be read.
  """
  directory = str(manager.directory)
  if step is not None:
    restored = _restore_step(manager, step, state)
    logging.info('Restored step %d (%s).', step, os.path.join(directory, str(step)))
    return restored
  failed = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    error = None
    try:
      restored = _restore_step(manager, candidate, state)
    except CheckpointCorruptError as e:
      error = e
    if multihost.all_true(error is None):
      path = os.path.join(directory, str(candidate))
      if failed:
        logging.warning('Checkpoint %s: falling back to step %d (%s).',
                        _describe_failures(failed), candidate, path)
      logging.info('Resuming from step %d (%s).', candidate, path)
      return restored
    failed.append((os.path.join(directory, str(candidate)), error,
                   _move_aside(manager, candidate)))
  if failed:
    logging.warning('No readable checkpoint in %s (%s): starting from step 0.',
                    directory, _describe_failures(failed))
  else:
    logging.info('No checkpoint in %s: starting from step 0.', directory)
  return state


def _describe_failures(failed: list[tuple[str, Any, Optional[str]]]) -> str:
  return '; '.join(f'{path} is unreadable ({error}); '
                   + (f'moved it to {moved}' if moved else 'left it in place')
                   for path, error, moved in failed)


def restore_from_path(path: str, state: Any) -> Any:
  """Restores a checkpoint from an explicit path (never modifies it).

  Args:
    path: a step folder written by `save` (`<workdir>/checkpoints/<step>`), or a
      checkpoints folder or workdir, in which case its latest readable step is used.
    state: a freshly created state to restore into.

  Returns:
    The restored state.

  Raises:
    FileNotFoundError: `path` holds no checkpoint.
    NotAReidCheckpointError: `path` holds something else.
    CheckpointMismatchError: the checkpoint's arrays differ from the state's.
    CheckpointCorruptError: the checkpoint's files cannot be read.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Checkpoint path {path} does not exist (config.checkpoint).')
  for folder in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
      restored = restore(checkpoint_save.read_only_manager(folder), state)
      if restored is state:
        raise CheckpointCorruptError(f'No readable checkpoint in {folder} (see the log).')
      return restored
  parent, name = os.path.split(path.rstrip('/'))
  if name.isdigit() and os.path.isdir(path):
    if not _looks_like_orbax_step(path):
      raise NotAReidCheckpointError(f'{path} is not a reid_jax checkpoint (no orbax '
                                    'checkpoint files in it).')
    try:
      return restore(checkpoint_save.read_only_manager(parent), state, step=int(name))
    except CheckpointCorruptError as e:
      raise CheckpointCorruptError(f'Checkpoint {path} is unreadable: {e}') from e
  if os.path.isdir(path) and os.listdir(path):
    raise NotAReidCheckpointError(
        f'{path} is not a reid_jax checkpoint: expected a step folder written by reid_jax '
        '(<workdir>/checkpoints/<step>), a checkpoints folder or a workdir.')
  raise FileNotFoundError(
      f'No checkpoint found at {path}: expected a step folder written by reid_jax '
      '(<workdir>/checkpoints/<step>), a checkpoints folder or a workdir.')
