"""The files a run keeps in its workdir beside the checkpoints: lock, config, identities.

- `WorkdirLock`: `<workdir>/.lock` names the run that uses the workdir (run id, pid,
  host, start time), so that a second run started on the same workdir stops at
  start-up with a message naming the first instead of both writing checkpoints.
- `write_run_files` / `read_run_config` / `read_pid_map`: `config.json` (the run's
  config) and `identities.json` (the training identity -> class index map), so that
  `--eval_only` and a resumed run can tell whether the model they build is the one
  the checkpoints were written by (`config_differences`).

Workdirs are local or shared (NFS-like, with atomic rename and O_EXCL create)
filesystems; cloud buckets (gs://, s3://) are not supported here.

This module imports no JAX at import time (the lock is taken before JAX starts).
"""

import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Mapping, Optional, Sequence

LOCK_NAME = '.lock'
CONFIG_NAME = 'config.json'
IDENTITIES_NAME = 'identities.json'

# Config fields whose values change the model's parameters or what it computes at
# test time. 'num_classes' (the size of the classifier) is compared separately.
MODEL_FIELDS = (
    'model.name', 'model.stage_sizes', 'model.width', 'model.last_stride',
    'model.neck', 'model.neck_feat', 'model.pooling', 'model.gem_p',
    'input.image_size', 'input.pixel_mean', 'input.pixel_std',
)


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


@dataclasses.dataclass(frozen=True)
class LockOwner:
  """Who holds a workdir lock, as written in `<workdir>/.lock`."""
  run_id: str
  pid: int
  host: str
  started: str
  pid_start_time: Optional[int] = None

  def describe(self) -> str:
    return (f'run {self.run_id} (pid {self.pid} on host {self.host}, '
            f'started {self.started})')


def new_run_id() -> str:
  """A random run id (12 hex digits)."""
  return uuid.uuid4().hex[:12]


def shared_run_id() -> str:
  """A run id that every process of a multi-host run agrees on.

  Process 0 draws it and broadcasts it (one small collective; call it once at
  start-up, on every process, after `jax.distributed.initialize`).

  Returns:
    The run id (12 hex digits).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  run_id = new_run_id()
  if jax.process_count() == 1:
    return run_id
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digits = np.frombuffer(bytes.fromhex(run_id), np.uint8).astype(np.int32)
  digits = np.asarray(multihost_utils.broadcast_one_to_all(digits))
  return bytes(digits.astype(np.uint8).tolist()).hex()


def _pid_start_time(pid: int) -> Optional[int]:
  """The start time of a process (clock ticks after boot, Linux), None if unknown."""
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      stat = f.read().decode(errors='replace')
  except OSError:
    return None
  # Field 22 counts from the `pid (comm) state ...` line; comm may hold spaces.
  fields = stat[stat.rfind(')') + 2:].split()
  try:
    return int(fields[19])
  except (IndexError, ValueError):
    return None


def _pid_alive(pid: int, start_time: Optional[int]) -> bool:
  """Whether `pid` runs on this host and is the process that wrote the lock."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, owned by another user
  if start_time is not None:
    current = _pid_start_time(pid)
    if current is not None and current != start_time:
      return False  # the pid was reused by another process
  return True


class WorkdirLock:
  """`<workdir>/.lock`: one run at a time per workdir.

  Process 0 creates the lock file (O_EXCL) with the run id, its pid, host and start
  time. A lock left by a process that no longer runs on this host is stale and taken
  over with a warning; a lock held by a live process, or by any process on another
  host (whose liveness cannot be checked), stops the new run with a message naming
  the owner. The other processes of a multi-host run take no lock: they wait until
  process 0's lock carries their run id (`shared_run_id`), so one run's hosts never
  lock each other out.

  Usage:
    with WorkdirLock(workdir, run_id):
      train(...)
  """

  def __init__(self, workdir: str, run_id: Optional[str] = None,
               process_index: int = 0, wait_seconds: float = 120.0):
    """Describes the lock; `acquire` takes it.

    Args:
      workdir: the run's working directory (created if missing).
      run_id: this run's id; every process of a multi-host run must pass the same
        (`shared_run_id`). None draws a new one (single-process runs).
      process_index: `jax.process_index()`; only process 0 writes the lock.
      wait_seconds: how long processes other than 0 wait for process 0's lock.
    """
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.run_id = run_id or new_run_id()
    self.process_index = process_index
    self.wait_seconds = wait_seconds
    self.held = False

  def _me(self) -> LockOwner:
    return LockOwner(run_id=self.run_id, pid=os.getpid(), host=socket.gethostname(),
                     started=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                     pid_start_time=_pid_start_time(os.getpid()))

  def read_owner(self) -> Optional[LockOwner]:
    """The owner written in the lock file; None when there is no lock.

    Raises:
      WorkdirLockedError: the lock file cannot be parsed.
    """
    for attempt in range(20):
      try:
        with open(self.path) as f:
          text = f.read()
      except FileNotFoundError:
        return None
      try:
        fields = json.loads(text)
        return LockOwner(**{k.name: fields.get(k.name, k.default)
                            for k in dataclasses.fields(LockOwner)})
      except (ValueError, TypeError):
        if attempt < 19:  # being written by another process right now
          time.sleep(0.05)
    raise WorkdirLockedError(
        f'The lock file {self.path} is not readable ({text[:200]!r}). If no run uses '
        f'{self.workdir}, delete {self.path} and start again.')

  def _create(self) -> bool:
    """Creates the lock file; False if it exists already."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump(dataclasses.asdict(self._me()), f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    return True

  def acquire(self, process_index: Optional[int] = None,
              run_id: Optional[str] = None) -> 'WorkdirLock':
    """Takes the lock (process 0) or checks that this run holds it (others).

    Args:
      process_index: overrides the constructor's (tests simulate several processes).
      run_id: overrides the constructor's.

    Returns:
      self.

    Raises:
      WorkdirLockedError: another run holds the workdir.
    """
    if process_index is not None:
      self.process_index = process_index
    if run_id is not None:
      self.run_id = run_id
    os.makedirs(self.workdir, exist_ok=True)
    if self.process_index != 0:
      self._wait_for_process_0()
      return self
    for _ in range(10):
      if self._create():
        self.held = True
        return self
      owner = self.read_owner()
      if owner is None:
        continue  # released meanwhile
      if owner.run_id == self.run_id:
        self.held = True  # this run's own lock (process 0 restarted in place)
        return self
      self._take_over_if_stale(owner)
    raise WorkdirLockedError(f'Could not take {self.path}: it changes all the time.')

  def _take_over_if_stale(self, owner: LockOwner) -> None:
    """Moves a stale lock away (at most one of several racing runs succeeds)."""
    here = socket.gethostname()
    if owner.host != here:
      raise WorkdirLockedError(
          f'{self.workdir} is in use by {owner.describe()}; this is host {here}. '
          f'If that run is no longer running, delete {self.path} and start again; '
          'otherwise stop it first or pass another --workdir.')
    if _pid_alive(owner.pid, owner.pid_start_time):
      raise WorkdirLockedError(
          f'{self.workdir} is in use by {owner.describe()}, which is still running. '
          'Stop it first, or pass another --workdir.')
    logging.warning('Taking over the stale lock %s of %s, which no longer runs.',
                    self.path, owner.describe())
    try:  # rename is atomic: of two runs taking over, one renames, one retries
      os.replace(self.path, f'{self.path}.stale-{self.run_id}')
    except FileNotFoundError:
      return
    os.remove(f'{self.path}.stale-{self.run_id}')

  def _wait_for_process_0(self) -> None:
    deadline = time.monotonic() + self.wait_seconds
    while True:
      owner = self.read_owner()
      if owner is not None and owner.run_id == self.run_id:
        return
      if time.monotonic() >= deadline:
        held = owner.describe() if owner else 'nobody'
        raise WorkdirLockedError(
            f'Process {self.process_index} of run {self.run_id}: process 0 did not '
            f'lock {self.workdir} within {self.wait_seconds:g} s (the lock is held by '
            f'{held}). Is another run using this workdir?')
      time.sleep(min(0.1, self.wait_seconds))

  def release(self) -> None:
    """Removes the lock file if this run holds it (process 0 only)."""
    if not self.held:
      return
    self.held = False
    owner = self.read_owner()
    if owner is not None and owner.run_id == self.run_id:
      os.remove(self.path)

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def _write_json_atomically(path: str, value: Any) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
    f.write('\n')
  os.replace(tmp, path)


def _config_dict(config: Any) -> dict:
  if hasattr(config, 'to_json_best_effort'):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def write_run_files(workdir: str, config: Any, pid_map: Mapping[Any, int]) -> None:
  """Writes `config.json` and `identities.json` into the workdir (process 0 only).

  Args:
    workdir: the run's working directory.
    config: the run's config (ConfigDict or dict).
    pid_map: training identity (dataset pid) -> class index of the classifier.
  """
  os.makedirs(workdir, exist_ok=True)
  _write_json_atomically(os.path.join(workdir, CONFIG_NAME), _config_dict(config))
  _write_json_atomically(os.path.join(workdir, IDENTITIES_NAME), {
      'num_classes': len(set(pid_map.values())),
      'pid_to_label': sorted([[k, int(v)] for k, v in pid_map.items()], key=str),
  })


def _read_json(path: str) -> Optional[Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); delete it to start afresh.') from e


def read_run_config(workdir: str) -> Optional[dict]:
  """The config saved by `write_run_files`, as a dict; None if there is none."""
  return _read_json(os.path.join(workdir, CONFIG_NAME))


def read_pid_map(workdir: str) -> Optional[dict]:
  """The identity map saved by `write_run_files` (pid -> class); None if absent."""
  saved = _read_json(os.path.join(workdir, IDENTITIES_NAME))
  return None if saved is None else {k: v for k, v in saved['pid_to_label']}


def _lookup(tree: Any, dotted: str) -> Any:
  for key in dotted.split('.'):
    if hasattr(tree, 'to_dict'):
      tree = tree.to_dict()
    if not isinstance(tree, Mapping) or key not in tree:
      return _MISSING
    tree = tree[key]
  return tree


_MISSING = object()


def _normalise(value: Any) -> Any:
  """JSON turns tuples into lists; compare both the same way."""
  if isinstance(value, (list, tuple)):
    return tuple(_normalise(v) for v in value)
  return value


def config_differences(saved: Any, given: Any, fields: Sequence[str] = MODEL_FIELDS,
                       saved_num_classes: Optional[int] = None,
                       given_num_classes: Optional[int] = None
                       ) -> dict[str, tuple[Any, Any]]:
  """The model-changing fields whose values differ between two configs.

  Args:
    saved: the config the workdir's checkpoints were written with
      (`read_run_config`).
    given: the config of this invocation (ConfigDict or dict).
    fields: dotted field names to compare; fields missing from either are skipped
      (configs of older versions).
    saved_num_classes: classifier size of the saved run (`read_pid_map` length).
    given_num_classes: classifier size of this invocation.

  Returns:
    {field: (saved value, given value)} for each differing field, 'num_classes'
    included when both class counts are given and differ.
  """
  diffs = {}
  for field in fields:
    a, b = _lookup(saved, field), _lookup(given, field)
    if a is _MISSING or b is _MISSING:
      continue
    if _normalise(a) != _normalise(b):
      diffs[field] = (a, b)
  if (saved_num_classes is not None and given_num_classes is not None
      and saved_num_classes != given_num_classes):
    diffs['num_classes'] = (saved_num_classes, given_num_classes)
  return diffs


def format_differences(diffs: Mapping[str, tuple[Any, Any]]) -> str:
  """One line per difference: `field: <saved> in the workdir, <given> now`."""
  return '\n'.join(f'  {k}: {a!r} in the workdir, {b!r} now' for k, (a, b) in diffs.items())
