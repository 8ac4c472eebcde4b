"""Saving checkpoints: a workdir's orbax managers, failed saves reported, when to save.

Layout: `<workdir>/checkpoints/<step>` (the latest `max_to_keep` steps: `create_manager`,
`save`) and `<workdir>/checkpoints/best/<step>` (the best evaluation so far:
`create_best_manager`, `save_best`); what a step holds: `checkpoint_layout`.

Faults:
- orbax writes each step to `<step>.orbax-checkpoint-tmp-<n>` and renames it when
  complete, so a process killed while saving leaves the previous steps usable; the
  unfinished folder is removed at the next start (`create_manager`).
- A save that fails in the background (disk full...) is reported by
  `check_errors` (call it every step: it reads no device array) or by the next
  save, as `CheckpointSaveError` naming the folder, the free space on its
  filesystem and the last complete checkpoint, which is left intact.

`SavePolicy` decides on the host at which steps the training loop saves.
"""

import dataclasses
import errno
import logging
import os
import shutil
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from reid_jax import checkpoint_layout as layout
from reid_jax import multihost
from reid_jax.checkpoint_layout import CheckpointSaveError

BEST_DIR = 'best'
_ORBAX_TMP = '.orbax-checkpoint-tmp'


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
  return f'{layout.size_text(usage.free)} free of {layout.size_text(usage.total)}'


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
  if multihost.all_true(free is None or free >= need):
    return
  raise OSError(errno.ENOSPC, f'Not enough free space for checkpoint step {step}: its '
                f'arrays need {layout.size_text(need)}, the filesystem has '
                f'{layout.size_text(free or 0)} free', directory)


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
      f'Saving checkpoint step {step} in {directory} failed: {layout.short_error(error, 1000)}\n'
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
    """From `config.checkpoint_every_{steps,epochs,minutes}`, `num_epochs` and
    `log_every_steps` (the clock is looked at on log steps)."""
    return cls(steps_per_epoch=steps_per_epoch,
               total_steps=config.num_epochs * steps_per_epoch,
               every_steps=config.checkpoint_every_steps,
               every_epochs=config.checkpoint_every_epochs,
               every_minutes=config.checkpoint_every_minutes,
               time_check_every_steps=config.log_every_steps,
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
    manager.save(step, args=ocp.args.StandardSave(layout.to_saved_tree(state)),
                 custom_metadata=dict(layout.MARKER), force=True)
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
  manager.save(step, args=ocp.args.StandardSave(layout.to_saved_tree(state)),
               metrics=numbers, custom_metadata=dict(layout.MARKER), force=True)
  logging.info('New best %s %.4f at step %d: saving it in %s.', metric, value, step,
               manager.directory)
  return True


def check_errors(manager: CheckpointManager) -> None:
  """Raises `CheckpointSaveError` if a background save has failed (see the class)."""
  manager.check_errors()
