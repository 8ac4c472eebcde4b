"""Several processes (hosts) on JAX's distributed runtime: start-up and agreement checks.

Every host runs the same program; `jax.pmap` then spans the devices of all hosts, so
gradient averaging, cross-device batch norm and triplet mining span them too, and each
process reads its own share of every global batch (`input_pipeline.pipeline`).

- `initialize`: `jax.distributed.initialize` with the flags given (`main`'s
  `--coordinator_address`, `--num_processes`, `--process_id`, `--local_device_ids`);
  with none given, only when JAX's own cluster detection finds a cluster of several
  processes (SLURM, Open MPI, Cloud TPU pod slices, Kubernetes where the `kubernetes`
  package is installed: `detect_cluster`); otherwise the run is single-process.
- `process_table`: every process's host and devices, gathered once and logged by
  process 0.
- `check_agreement` (with `config_fields`, `data_fields`): all processes compare one
  hash per field (each config field, each record list, class count, steps per epoch,
  the restored step); a difference stops every process with `ProcessMismatchError`
  naming the fields and the processes.
- `together`: a start-up stage that every process passes or none does.
- `check_shared_workdir`: every process writes a marker file into the workdir and
  checks that it sees all of them; else `WorkdirNotSharedError` on every process.

Single-process runs skip every collective here. No import-time side effects.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np

# The folder of the marker files of `check_shared_workdir` (removed afterwards).
MARKER_DIR = '.hosts'


class ProcessMismatchError(RuntimeError):
  """The processes of a multi-host run disagree on the config, the data or the step."""


class WorkdirNotSharedError(RuntimeError):
  """The processes of a multi-host run do not see the same workdir."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A cluster environment that JAX's auto-detection recognises.

  Attributes:
    name: JAX's name for it ('slurm', 'ompi', 'gce_tpu', 'gke_tpu', 'k8s').
    process_count: the number of processes it launched.
  """
  name: str
  process_count: int


def detect_cluster() -> Optional[Cluster]:
  """The cluster `jax.distributed.initialize()` would detect, or None.

  The same search as JAX's (`jax._src.clusters.ClusterEnv`, jax 0.10): the first
  environment class that is not opt-in only (mpi4py is) and says it is present.
  SLURM needs SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
  SLURM_LOCALID (set inside `srun`); Open MPI OMPI_MCA_orte_hnp_uri; a Cloud TPU VM
  its metadata server; Kubernetes KUBERNETES_SERVICE_HOST and the `kubernetes`
  package. Nothing is contacted on a machine without these.

  Returns:
    The cluster and its process count; None when nothing is detected (or this JAX
    has no such detection).
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    candidates = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return None
  for env in candidates:
    if getattr(env, 'opt_in_only_method', False) or not env.is_env_present():
      continue
    return Cluster(getattr(env, 'name', env.__name__), int(env.get_process_count()))
  return None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None) -> str:
  """Starts JAX's distributed runtime when the run has several processes.

  Call before anything starts JAX's backends. Explicit arguments (or JAX's own
  JAX_COORDINATOR_ADDRESS variable) go to `jax.distributed.initialize`, which fills
  the missing ones from the detected cluster. With none given, it is called without
  arguments only when `detect_cluster` finds several processes (or one, with
  `local_device_ids`); a one-process cluster job, or a plain machine, runs
  single-process on all local devices.

  Args:
    coordinator_address: host:port of process 0.
    num_processes: the number of processes.
    process_id: this process, in [0, num_processes).
    local_device_ids: the local devices this process uses (default: JAX's; under
      SLURM that is the one GPU numbered SLURM_LOCALID).

  Returns:
    A line saying how the run was started, for the log.

  Raises:
    ValueError: `local_device_ids` alone, with no flags and no cluster detected.
  """
  explicit = {k: v for k, v in dict(
      coordinator_address=coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'),
      num_processes=num_processes, process_id=process_id).items() if v is not None}
  cluster = None if explicit else detect_cluster()
  if not explicit and cluster is None:
    if local_device_ids:
      raise ValueError(
          f'--local_device_ids={",".join(map(str, local_device_ids))} restricts the '
          'devices of one process of a multi-process run, but there is none: no '
          '--coordinator_address / --num_processes / --process_id and no cluster was '
          'detected. On one machine, choose the devices with CUDA_VISIBLE_DEVICES.')
    return 'Single process (no --coordinator_address, and no cluster detected).'
  if not explicit and cluster.process_count <= 1 and not local_device_ids:
    # (JAX would restrict a one-task SLURM job to the GPU numbered SLURM_LOCALID.)
    return f'Single process ({cluster.name} detected with one process).'
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      local_device_ids=list(local_device_ids) if local_device_ids else None, **explicit)
  how = (f'{cluster.name} detected' if cluster else
         'flags: ' + ', '.join(f'{k}={v}' for k, v in sorted(explicit.items())))
  return (f'jax.distributed initialized ({how}): process {jax.process_index()} of '
          f'{jax.process_count()}.')


def allgather(values: np.ndarray) -> np.ndarray:
  """(processes, *values.shape): every process's non-empty `values` (a collective).

  Any dtype whose items are whole 32-bit words travels bit for bit (as int32 words:
  float64 is not truncated to float32 by JAX).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  values = np.ascontiguousarray(values)
  words = values.reshape(len(values), -1).view(np.int32)
  out = np.asarray(multihost_utils.process_allgather(words))
  return out.view(values.dtype).reshape((out.shape[0],) + values.shape)


def allgather_varlen(values: np.ndarray) -> list[np.ndarray]:
  """Every process's 1-D `values` (lengths may differ), in process order (collective)."""
  lengths = allgather(np.asarray([len(values)], np.int64)).reshape(-1)
  padded = np.zeros(max(int(lengths.max()), 1), values.dtype)
  padded[:len(values)] = values
  return [row[:n] for row, n in zip(allgather(padded), lengths)]


def _allgather_int32(values: Any) -> np.ndarray:
  """(processes, *values.shape): every process's `values` as int32 (a collective)."""
  return allgather(np.asarray(values, np.int32))


def all_true(ok: bool) -> bool:
  """True if `ok` holds on every process (one small collective; call on all)."""
  if jax.process_count() == 1:
    return ok
  return bool(_allgather_int32(np.asarray([ok])).all())


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (two small collectives).

  Args:
    data: this process's bytes (any length).

  Returns:
    One bytes object per process; [data] on a single process.
  """
  if jax.process_count() == 1:
    return [data]
  rows = allgather_varlen(np.frombuffer(data, np.uint8).astype(np.int32))
  return [row.astype(np.uint8).tobytes() for row in rows]


def broadcast_bytes(data: bytes) -> bytes:
  """Process 0's `data` on every process (two small collectives; call on all).

  Args:
    data: process 0's bytes (any length); the other processes' are ignored.

  Returns:
    Process 0's bytes; `data` itself on a single process.
  """
  if jax.process_count() == 1:
    return data
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  length = int(np.asarray(multihost_utils.broadcast_one_to_all(
      np.asarray([len(data)], np.int32)))[0])
  words = np.zeros(-(-max(length, 1) // 4) * 4, np.uint8)
  if jax.process_index() == 0:
    words[:length] = np.frombuffer(data, np.uint8)
  words = np.asarray(multihost_utils.broadcast_one_to_all(words.view(np.int32)))
  return words.astype(np.int32).view(np.uint8)[:length].tobytes()


def process_table() -> str:
  """A table of every process's host and local devices (a collective; call on all).

  Returns:
    One line per process: index, host name, local devices.
  """
  local = ', '.join(f'{d.platform}:{d.id} ({d.device_kind})' for d in jax.local_devices())
  mine = json.dumps([socket.gethostname(), local]).encode()
  rows = [json.loads(b) for b in allgather_bytes(mine)]
  width = max(len('host'), *(len(host) for host, _ in rows))
  lines = [f'{"process":>7}  {"host":<{width}}  devices']
  lines += [f'{i:>7}  {host:<{width}}  {devices}' for i, (host, devices) in enumerate(rows)]
  return '\n'.join(lines)


def _hash(value: Any) -> np.ndarray:
  """Two uint32 words of a blake2b hash of a JSON-able value (str: its bytes)."""
  text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=repr)
  digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
  return np.frombuffer(digest, np.uint32)


def _records_digest(records: Sequence[Any]) -> str:
  """A hash of a record list: relative paths (to the list's common folder), ids, cameras.

  Relative paths, so that the digest names the list's content whatever the root.
  """
  paths = [str(r.path) for r in records]
  try:
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ''
  except ValueError:  # absolute and relative paths mixed
    root = ''
  h = hashlib.blake2b(digest_size=16)
  h.update(f'{len(records)}\n'.encode())
  for path, r in zip(paths, records):
    rel = os.path.relpath(path, root) if root else path
    h.update(f'{rel}\t{int(r.pid)}\t{int(r.camid)}\n'.encode())
  return h.hexdigest()


def config_fields(config: Any) -> dict[str, Any]:
  """{'config.<field>': value} for every leaf field of the config, for `check_agreement`
  (tuples as lists)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {f'config.{k}': list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def data_fields(datasets: Sequence[Any], num_classes: int,
                steps_per_epoch: int) -> dict[str, Any]:
  """The data facts every process of a run must agree on, for `check_agreement`.

  Args:
    datasets: the `ReIDDataset`s read (training, then the test sets): one field per
      record list (train, query, gallery), a digest of its relative paths and ids.
    num_classes: training identities.
    steps_per_epoch: steps in one epoch.

  Returns:
    {field name: value or digest}.
  """
  fields: dict[str, Any] = {}
  for i, dataset in enumerate(datasets):
    for split in ('train', 'query', 'gallery'):
      fields[f'dataset {i} ({dataset.name}) {split} records'] = _records_digest(
          getattr(dataset, split))
  fields['class count'] = int(num_classes)
  fields['steps per epoch'] = int(steps_per_epoch)
  return fields


def differing_fields(names: Sequence[str], gathered: np.ndarray) -> dict[str, list[int]]:
  """The fields whose hash differs from process 0's, with the processes that differ.

  Args:
    names: the field names, in the order of the hashes.
    gathered: (processes, len(names), 2) hashes from every process.

  Returns:
    {field: [processes whose value differs from process 0's]}, in field order.
  """
  differs = np.any(gathered != gathered[:1], axis=-1)  # (processes, fields)
  return {name: np.flatnonzero(differs[:, j]).tolist()
          for j, name in enumerate(names) if differs[:, j].any()}


def check_agreement(fields: Mapping[str, Any], what: str = 'start-up') -> None:
  """Stops every process when the processes' values of `fields` differ.

  All processes must call it with the same field names (a collective; nothing happens
  on a single process). The hashes form a fixed-length vector, so record lists of
  different lengths still compare.

  Args:
    fields: {name: JSON-able value}; see `config_fields` and `data_fields`.
    what: names the check in the message.

  Raises:
    ProcessMismatchError: on every process, naming the differing fields, the processes
      and this process's values.
  """
  if jax.process_count() == 1:
    return
  names = sorted(fields)
  shape = _allgather_int32(np.concatenate([[len(names)], _hash(names).view(np.int32)]))
  if np.any(shape != shape[:1]):
    raise ProcessMismatchError(
        f'The processes check different {what} fields (process {jax.process_index()} '
        f'has {len(names)}; counts per process: {shape[:, 0].tolist()}): do all hosts run '
        'the same reid_jax version?')
  hashes = np.stack([_hash(fields[n]) for n in names]).view(np.int32)
  gathered = _allgather_int32(hashes)
  diffs = differing_fields(names, gathered)
  if not diffs:
    return
  me = jax.process_index()
  lines = [f'  {name}: processes {procs} differ from process 0; here (process {me}): '
           f'{fields[name]!r}' for name, procs in diffs.items()]
  raise ProcessMismatchError(
      f'The {jax.process_count()} processes disagree at {what} in {len(diffs)} '
      'field(s); every process stops. Start every process with the same command, '
      'config and data (and a workdir on a shared filesystem):\n' + '\n'.join(lines))


class ProcessFailedError(RuntimeError):
  """Another process of a multi-host run failed in a stage this process completed."""


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
  """Runs a start-up stage that every process passes or none does.

  A process that raises inside tells the others (one small collective on every
  process, on both paths) and re-raises its own error; the others raise
  `ProcessFailedError` naming it, instead of waiting for it in the next collective.
  Nothing is gathered on a single process.

  Args:
    what: the stage, for the message ('building the experiment').

  Raises:
    ProcessFailedError: another process failed in this stage.
  """
  if jax.process_count() == 1:
    yield
    return
  try:
    yield
  except Exception:
    _allgather_int32(np.asarray([0]))
    raise
  ok = _allgather_int32(np.asarray([1])).reshape(-1)
  if not ok.all():
    raise ProcessFailedError(
        f'Process(es) {np.flatnonzero(ok == 0).tolist()} failed while {what} (their '
        f'log says why); process {jax.process_index()} stops too.')


def check_shared_workdir(workdir: str, run_id: str) -> None:
  """Stops every process unless all of them see each other's files in `workdir`.

  Each process writes `<workdir>/.hosts/<run_id>/<process>`; after a barrier each one
  looks for every marker; what they see is gathered, so every process stops when one
  of them misses a marker (a workdir on a node-local disk). The markers are removed.
  Nothing happens on a single process.

  Args:
    workdir: the run's working directory.
    run_id: the run's id, the same on every process (`workdir.shared_run_id`).

  Raises:
    WorkdirNotSharedError: on every process, saying who sees whom.
  """
  count = jax.process_count()
  if count == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  parent = os.path.join(os.path.abspath(workdir), MARKER_DIR)
  folder = os.path.join(parent, run_id)
  os.makedirs(folder, exist_ok=True)
  me = jax.process_index()
  with open(os.path.join(folder, str(me)), 'w') as f:
    f.write(f'{socket.gethostname()}\n')
  multihost_utils.sync_global_devices(f'reid_jax_workdir_markers_{run_id}')
  seen = np.asarray([os.path.exists(os.path.join(folder, str(p))) for p in range(count)])
  gathered = _allgather_int32(seen)  # (processes, processes); also a barrier
  os.remove(os.path.join(folder, str(me)))
  multihost_utils.sync_global_devices(f'reid_jax_workdir_markers_done_{run_id}')
  for path in (folder, parent):  # left when not shared, or by another run starting now
    try:
      os.rmdir(path)
    except OSError:
      pass
  if gathered.all():
    return
  sees = '; '.join(f'process {p} sees the markers of {np.flatnonzero(row).tolist()}'
                   for p, row in enumerate(gathered))
  raise WorkdirNotSharedError(
      f'The workdir {os.path.abspath(workdir)} is not shared by the {count} processes '
      f'({sees}). The workdir must be on a shared filesystem (NFS, Lustre, GCS FUSE...) '
      'mounted at the same path on every host: checkpoints written by one host are '
      'restored by all.')


def parse_device_ids(values: Optional[Sequence[Any]]) -> Optional[list[int]]:
  """`--local_device_ids` (strings from a flag, or ints) as ints; None when not given.

  Raises:
    ValueError: a value that is not a non-negative integer.
  """
  if not values:
    return None
  try:
    ids = [int(v) for v in values]
  except ValueError:
    ids = [-1]
  if min(ids) < 0:
    raise ValueError(f'--local_device_ids={",".join(map(str, values))} must be '
                     'non-negative integers separated by commas, e.g. 0,1,2,3.')
  return ids


def start(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
          process_id: Optional[int] = None,
          local_device_ids: Optional[Sequence[Any]] = None) -> str:
  """`main`'s start-up: `initialize`, then process 0 logs every process's devices.

  Processes other than 0 log warnings and errors only from here on (absl verbosity),
  so the log is process 0's. Call before anything starts JAX's backends.

  Args:
    coordinator_address, num_processes, process_id, local_device_ids: as
      `initialize` (device ids may be strings, as the flag gives them).

  Returns:
    The line logged by process 0 (how the run started, then `process_table`).
  """
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  started = initialize(coordinator_address, num_processes, process_id,
                       parse_device_ids(local_device_ids))
  text = f'{started}\n{process_table()}'
  if jax.process_index() > 0:
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.info('%s', text)
  return text
