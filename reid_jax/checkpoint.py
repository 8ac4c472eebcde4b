"""Checkpoints of the TrainState with orbax, kept in `<workdir>/checkpoints`.

Layout: `<workdir>/checkpoints/<step>` (the latest `max_to_keep` steps) and
`<workdir>/checkpoints/best/<step>` (the best evaluation so far, `save_best`). The
state is saved as its flax state dict (params, batch_stats, opt_state, step,
dynamic_scale) so that a checkpoint can be read without the model code, and every
step carries a marker (`{'format': 'reid_jax', 'format_version': 1}` in orbax's step
metadata) that tells it apart from another program's orbax checkpoint. Checkpoints
of earlier reid_jax versions (no marker, the same top-level keys) still restore.

Faults:
- orbax writes each step to `<step>.orbax-checkpoint-tmp-<n>` and renames it when
  complete, so a process killed while saving leaves the previous steps usable; the
  unfinished folder is removed at the next start (`create_manager`).
- A save that fails in the background (disk full...) is reported by
  `check_errors` (call it every step: it reads no device array) or by the next
  save, as `CheckpointSaveError` naming the folder, the free space on its
  filesystem and the last complete checkpoint, which is left intact.
- `restore` falls back to the previous step when the latest is unreadable (a file
  missing or truncated): it warns naming both and moves the bad folder aside to
  `<step>.corrupt-<time>` (kept for inspection, ignored by orbax), so that the step
  is written again when training passes it.
- A folder that is not a reid_jax checkpoint raises `NotAReidCheckpointError`; one
  written for another model raises `CheckpointMismatchError` naming the arrays.

Several processes (`jax.distributed`): every process calls `save` and `restore` at
the same steps; the state is saved as jax.Arrays replicated over all devices, which
orbax writes with every process taking part and every process reads back
(`_to_saved_tree`). The workdir must then be on a filesystem shared by all hosts
(`reid_jax.multihost.check_shared_workdir` checks it at start-up).

Workdirs are local or shared (NFS-like) filesystems; cloud buckets are not
supported here. `reid_jax.workdir` keeps the lock and config files beside.
"""

import dataclasses
import errno
import logging
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT_NAME = 'reid_jax'
FORMAT_VERSION = 1
_MARKER = {'format': FORMAT_NAME, 'format_version': FORMAT_VERSION}
# The top-level keys of a TrainState's state dict (checkpoints without a marker).
STATE_KEYS = ('params', 'batch_stats', 'opt_state', 'step')
BEST_DIR = 'best'
_ORBAX_TMP = '.orbax-checkpoint-tmp'


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the state it is restored into."""


class NotAReidCheckpointError(ValueError):
  """A folder holds no reid_jax checkpoint (another program's, or other files)."""


class CheckpointCorruptError(ValueError):
  """A checkpoint's files are missing or damaged."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, ...)."""


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
  return not str(record.msg).startswith('Given directory is read only')


class CheckpointManager(ocp.CheckpointManager):
  """orbax's manager, for one TrainState, that reports failed saves clearly.

  Before writing, it checks that the filesystem has at least the state's size free
  (after the previous save has finished), so that a full disk stops the run at the
  step that saves, before anything is written. It remembers the step whose
  asynchronous save is in flight so that `check_errors` can surface any other failure
  as soon as the background write ends, and turns every failure into a
  `CheckpointSaveError` with the path and free space.
  """

  def __init__(self, directory: str, options: ocp.CheckpointManagerOptions,
               best_metric: Optional[str] = None):
    absl_logger = logging.getLogger('absl')
    absl_logger.addFilter(_drop_read_only_notice)  # orbax warns for every reader
    try:
      super().__init__(directory, options=options,
                       item_handlers=ocp.StandardCheckpointHandler())
    finally:
      absl_logger.removeFilter(_drop_read_only_notice)
    self.read_only = options.read_only
    self.best_metric = best_metric
    self._pending_step: Optional[int] = None

  def save(self, step: int, *args, **kwargs) -> bool:  # pylint: disable=signature-differs
    self.wait_until_finished()  # as orbax's save does first: the space is then known
    try:
      _check_free_space(str(self.directory), step, kwargs.get('args'))
      saved = super().save(step, *args, **kwargs)
    except CheckpointSaveError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _save_error(self, step, e) from e
    if saved:
      self._pending_step = step
    return saved

  def wait_until_finished(self) -> None:
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      step, self._pending_step = self._pending_step, None
      raise _save_error(self, step, e) from e
    self._pending_step = None

  def check_errors(self) -> None:
    """Raises `CheckpointSaveError` if the last background save has failed.

    Host-only and non-blocking while the save runs: it joins orbax's finalize
    thread once that thread has ended. (orbax's own `check_for_errors` is not
    called: it would consume the error that orbax's finalize thread relies on to
    skip deleting the older checkpoints.)
    """
    if self._pending_step is not None and not self.is_saving_in_progress():
      self.wait_until_finished()


def _disk_usage(directory: str) -> Any:
  """`shutil.disk_usage` of the nearest existing folder (raises OSError)."""
  path = directory
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path)


def _free_space(directory: str) -> str:
  try:
    usage = _disk_usage(directory)
  except OSError as e:
    return f'unknown ({e})'
  return f'{_size(usage.free)} free of {_size(usage.total)}'


def _check_free_space(directory: str, step: int, args: Any) -> None:
  """Raises OSError(ENOSPC) when `directory` has less free space than the arrays.

  The arrays' size is a lower bound of what orbax writes (it adds metadata), so a
  save that passes can still run out of space; `check_errors` reports that. All
  processes agree (one collective) so that none starts a save the others refuse.
  """
  need = sum(int(getattr(x, 'nbytes', 0))
             for x in jax.tree.leaves(getattr(args, 'item', None)))
  try:
    free = _disk_usage(directory).free
  except OSError:
    free = None  # unknown: let the write try
  if _all_processes(free is None or free >= need):
    return
  raise OSError(errno.ENOSPC, f'Not enough free space for checkpoint step {step}: its '
                f'arrays need {_size(need)}, the filesystem has {_size(free or 0)} free',
                directory)


def _size(num_bytes: int) -> str:
  return (f'{num_bytes / 2**30:.2f} GiB' if num_bytes >= 2**30
          else f'{num_bytes / 2**20:.1f} MiB')


def _save_error(manager: CheckpointManager, step: Optional[int],
                error: BaseException) -> CheckpointSaveError:
  directory = str(manager.directory)
  try:
    manager.reload()  # orbax dropped the steps it meant to delete from its list
    last = manager.latest_step()
  except Exception:  # pylint: disable=broad-exception-caught
    last = None
  kept = (f'The last complete checkpoint, step {last} ({os.path.join(directory, str(last))}), '
          'is intact; training resumes from it when started again.' if last is not None
          else 'No complete checkpoint is left in it.')
  return CheckpointSaveError(
      f'Saving checkpoint step {step} in {directory} failed: {_short(error, 1000)}\n'
      f'Filesystem of {directory}: {_free_space(directory)}.\n{kept} Free '
      'some space (or lower config.keep_checkpoints, or use a workdir on a larger '
      'disk) and start the same command again.')


def checkpoint_dir(workdir: str) -> str:
  """Returns the folder holding the checkpoints of a workdir."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def best_dir(workdir: str) -> str:
  """Returns the folder holding the best checkpoint of a workdir."""
  return os.path.join(checkpoint_dir(workdir), BEST_DIR)


def _unfinished_writes(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if _ORBAX_TMP in n)


def _create(directory: str, options: ocp.CheckpointManagerOptions,
            best_metric: Optional[str] = None) -> CheckpointManager:
  leftovers = [] if options.read_only else _unfinished_writes(directory)
  options.cleanup_tmp_directories = bool(leftovers)
  if leftovers and jax.process_index() == 0:
    logging.warning('Removing unfinished checkpoint writes in %s (a run stopped while '
                    'saving): %s', directory, ', '.join(leftovers))
  manager = CheckpointManager(directory, options, best_metric)
  if leftovers:  # orbax removes them in the background: finish before going on
    getattr(manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()
  return manager


def _read_only_options() -> ocp.CheckpointManagerOptions:
  # save_interval_steps=0 and create=False as read_only implies (else orbax warns).
  return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


def read_only_manager(directory: str) -> CheckpointManager:
  """A manager that only reads the steps of `directory` (a checkpoints folder)."""
  return CheckpointManager(directory, _read_only_options())


def create_manager(workdir: str, max_to_keep: int = 3, *,
                   read_only: bool = False) -> CheckpointManager:
  """Creates the CheckpointManager of a workdir (`<workdir>/checkpoints/<step>`).

  Take the workdir's lock (`reid_jax.workdir.WorkdirLock`) first: this removes
  the unfinished writes that a killed run left behind.

  Args:
    workdir: the run's working directory.
    max_to_keep: number of most recent checkpoints kept on disk.
    read_only: for evaluation: never writes, moves or deletes anything.

  Returns:
    The manager; save with `save`, restore with `restore`.
  """
  options = (_read_only_options() if read_only else
             ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
  return _create(checkpoint_dir(workdir), options)


def create_best_manager(workdir: str, metric: str = 'mAP', *,
                        read_only: bool = False) -> CheckpointManager:
  """Creates the manager of the best checkpoint (`<workdir>/checkpoints/best/<step>`).

  Args:
    workdir: the run's working directory.
    metric: the evaluation result that ranks checkpoints (higher is better).
    read_only: never write.

  Returns:
    A manager that keeps the one checkpoint with the highest `metric`; save into it
    with `save_best`.
  """
  options = _read_only_options() if read_only else ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m[metric], best_mode='max',
      keep_checkpoints_without_metrics=False, create=True)
  return _create(best_dir(workdir), options, best_metric=metric)


@dataclasses.dataclass
class SavePolicy:
  """When to save: every N steps, every N epochs, every N minutes and at the end.

  A host-side object: it reads only the host's step counter and clock, so the
  training loop touches device arrays only at the steps that save.

  Attributes:
    steps_per_epoch: steps in one epoch.
    total_steps: the last step of training (always saved); 0: none.
    every_steps: save when the step is a multiple of it; 0: never.
    every_epochs: save at the end of every N-th epoch; 0: never.
    every_minutes: save when this much time has passed since the last save (or
      `start`); 0: never.
    time_check_every_steps: the clock is looked at only at multiples of this step
      count; in multi-host runs every process must pass the same value and `agree`.
    agree: multi-host runs: a collective taking this process's time-based decision
      and returning process 0's (e.g. `jax.experimental.multihost_utils.
      broadcast_one_to_all`), called at every clock check on every process so that
      all processes save at the same steps. None: single process.
  """
  steps_per_epoch: int
  total_steps: int = 0
  every_steps: int = 0
  every_epochs: int = 0
  every_minutes: float = 0.0
  time_check_every_steps: int = 1
  agree: Optional[Callable[[bool], Any]] = None
  _last_save: Optional[float] = dataclasses.field(default=None, init=False, repr=False)

  def __post_init__(self):
    if self.steps_per_epoch <= 0 or self.time_check_every_steps <= 0:
      raise ValueError(f'SavePolicy: steps_per_epoch ({self.steps_per_epoch}) and '
                       f'time_check_every_steps ({self.time_check_every_steps}) must be '
                       'positive.')
    for name in ('total_steps', 'every_steps', 'every_epochs', 'every_minutes'):
      if getattr(self, name) < 0:
        raise ValueError(f'SavePolicy.{name} must be >= 0 (0 disables it), got '
                         f'{getattr(self, name)}.')

  @classmethod
  def from_config(cls, config: Any, steps_per_epoch: int,
                  agree: Optional[Callable[[bool], Any]] = None) -> 'SavePolicy':
    """From `config.checkpoint_every_{steps,epochs,minutes}` and `num_epochs`."""
    return cls(steps_per_epoch=steps_per_epoch,
               total_steps=config.num_epochs * steps_per_epoch,
               every_steps=config.get('checkpoint_every_steps', 0),
               every_epochs=config.get('checkpoint_every_epochs', 0),
               every_minutes=config.get('checkpoint_every_minutes', 0.0),
               time_check_every_steps=config.get('log_every_steps', 1),
               agree=agree)

  def start(self, now: float) -> None:
    """Starts the clock (at the start of training, after restoring)."""
    self._last_save = now

  def should_save(self, step: int, now: float) -> bool:
    """Whether to save the state reached after `step` steps.

    Args:
      step: completed training steps (the state's step after the update).
      now: the host clock, `time.time()`.

    Returns:
      True if a checkpoint is due; the clock of `every_minutes` restarts then.
    """
    if self._last_save is None:
      self._last_save = now
    due = bool(self.total_steps and step == self.total_steps)
    due |= bool(self.every_steps and step % self.every_steps == 0)
    due |= bool(self.every_epochs and step % (self.every_epochs * self.steps_per_epoch) == 0)
    if self.every_minutes and step % self.time_check_every_steps == 0:
      timed = now - self._last_save >= 60.0 * self.every_minutes
      if self.agree is not None:
        timed = bool(np.asarray(self.agree(np.asarray(timed))))
      due |= timed
    if due:
      self._last_save = now
    return due


def _to_numpy_state_dict(state: Any) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(flax.serialization.to_state_dict(state)))


def _global_replicated() -> jax.sharding.NamedSharding:
  """A sharding replicating an array over every device of every process."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('replica',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _to_saved_tree(state: Any) -> dict:
  """What is saved: the numpy state dict; with several processes, global arrays.

  One process: numpy arrays. Several (`jax.distributed`): every leaf becomes a
  jax.Array replicated over all the devices of all processes (the state is the same
  on every process), so orbax's multi-host array handler writes it with every
  process taking part (replica-parallel: each writes a slice) and every process
  restores it (`_restore_target`). Both kinds restore into either kind of run.
  """
  tree = _to_numpy_state_dict(state)
  if jax.process_count() == 1:
    return tree
  sharding = _global_replicated()
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def _restore_target(target: dict) -> dict:
  """The restore target for `target` (numpy; abstract global arrays on several processes)."""
  if jax.process_count() == 1:
    return target
  sharding = _global_replicated()
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      target)


def save(manager: CheckpointManager, state: Any, wait: bool = False) -> int:
  """Saves `state` under its step number (asynchronously unless `wait`).

  Args:
    manager: from `create_manager`.
    state: a flax struct (TrainState) or any pytree with a `step` field.
    wait: block until the write has finished.

  Returns:
    The step the checkpoint was saved under.

  Raises:
    CheckpointSaveError: this or the previous save failed.
  """
  step = int(jax.device_get(state.step))
  if step not in manager.all_steps():
    manager.save(step, args=ocp.args.StandardSave(_to_saved_tree(state)),
                 custom_metadata=dict(_MARKER), force=True)
  if wait:
    manager.wait_until_finished()
  return step


def save_best(manager: CheckpointManager, state: Any, metrics: Mapping[str, Any]) -> bool:
  """Saves `state` into the best-checkpoint manager if it beats the one kept.

  Args:
    manager: from `create_best_manager`.
    state: the evaluated state.
    metrics: evaluation results; the numbers among them are stored beside.

  Returns:
    Whether the state was saved (its metric is higher than the kept one's).
  """
  metric = manager.best_metric or 'mAP'
  if metric not in metrics:
    raise KeyError(f'save_best ranks checkpoints by {metric!r}, which the evaluation '
                   f'results lack (they have {sorted(metrics)}).')
  value = float(metrics[metric])
  step = int(jax.device_get(state.step))
  best = manager.best_step()
  if not np.isfinite(value) or step in manager.all_steps():
    return False
  if best is not None and value <= float((manager.metrics(best) or {}).get(metric, -np.inf)):
    return False
  numbers = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
  manager.save(step, args=ocp.args.StandardSave(_to_saved_tree(state)),
               metrics=numbers, custom_metadata=dict(_MARKER), force=True)
  logging.info('New best %s %.4f at step %d: saving it in %s.', metric, value, step,
               manager.directory)
  return True


def check_errors(manager: CheckpointManager) -> None:
  """Raises `CheckpointSaveError` if a background save has failed (see the class)."""
  manager.check_errors()


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
    raise CheckpointCorruptError(_short(e)) from e
  tree = getattr(tree, 'tree', tree)
  if custom.get('format') not in (None, FORMAT_NAME):
    raise NotAReidCheckpointError(
        f'{source} is not a reid_jax checkpoint (its format is {custom["format"]!r}).')
  if custom.get('format_version', 0) > FORMAT_VERSION:
    raise NotAReidCheckpointError(
        f'{source} was written by a newer reid_jax (format version '
        f'{custom["format_version"]} > {FORMAT_VERSION}): update reid_jax to read it.')
  if isinstance(tree, Mapping) and not set(STATE_KEYS) <= set(tree):
    raise NotAReidCheckpointError(
        f'{source} is not a reid_jax checkpoint: it holds {sorted(tree)}, a reid_jax '
        f'checkpoint holds {list(STATE_KEYS)}.')
  if not isinstance(tree, Mapping) and custom.get('format') is None:
    raise CheckpointCorruptError(f'{source}: neither its marker nor its tree is readable')
  target = _to_numpy_state_dict(state)
  if isinstance(tree, Mapping):
    _check_compatible(target, tree, source)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(_restore_target(target)))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointCorruptError(_short(e)) from e
  _check_compatible(target, restored, source)
  return flax.serialization.from_state_dict(state, jax.tree.map(np.asarray, restored))


def _short(error: BaseException, limit: int = 400) -> str:
  """`Type: message`, without tensorstore's long spec, at most `limit` characters."""
  text = str(error).split(' [tensorstore_spec')[0]
  text = f'{type(error).__name__}: {text}'
  return text if len(text) <= limit else text[:limit] + '...'


def _all_processes(ok: bool) -> bool:
  """True if `ok` holds on every process (a collective on multi-host runs)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


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
    if _all_processes(error is None):
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
      restored = restore(read_only_manager(folder), state)
      if restored is state:
        raise CheckpointCorruptError(f'No readable checkpoint in {folder} (see the log).')
      return restored
  parent, name = os.path.split(path.rstrip('/'))
  if name.isdigit() and os.path.isdir(path):
    if not _looks_like_orbax_step(path):
      raise NotAReidCheckpointError(f'{path} is not a reid_jax checkpoint (no orbax '
                                    'checkpoint files in it).')
    try:
      return restore(read_only_manager(parent), state, step=int(name))
    except CheckpointCorruptError as e:
      raise CheckpointCorruptError(f'Checkpoint {path} is unreadable: {e}') from e
  if os.path.isdir(path) and os.listdir(path):
    raise NotAReidCheckpointError(
        f'{path} is not a reid_jax checkpoint: expected a step folder written by reid_jax '
        '(<workdir>/checkpoints/<step>), a checkpoints folder or a workdir.')
  raise FileNotFoundError(
      f'No checkpoint found at {path}: expected a step folder written by reid_jax '
      '(<workdir>/checkpoints/<step>), a checkpoints folder or a workdir.')
