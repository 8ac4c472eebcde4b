"""Starts N processes of one multi-host run on this machine, for tests.

Each process is `python <args>` (e.g. `-m reid_jax.main ...` or a small script) with
`--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=I`
appended, `devices_per_process` virtual CPU devices (XLA_FLAGS) and JAX's CPU
collectives (gloo, the default of jax 0.10). Their output goes to log files; the run
is bounded by a timeout, every process still running at the end is killed, and
`format_logs` shows the logs in assertion messages.

Usage:
  results = run_processes(lambda i: ['-m', 'reid_jax.main', '--config=...'], 2,
                          log_dir=tmp_path, timeout=300)
  assert all(r.returncode == 0 for r in results), format_logs(results)

A small script run this way parses the three flags and calls
`reid_jax.multihost.start(coordinator_address, num_processes, process_id)` before it
touches JAX (tests/multihost_worker.py instead runs `reid_jax.main` with hooks).
"""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables that would make JAX detect a cluster (reid_jax.multihost.detect_cluster).
_CLUSTER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR',
                     'JAX_LOCAL_DEVICE_IDS', 'KUBERNETES_')


@dataclasses.dataclass
class ProcessResult:
  """How one process ended.

  Attributes:
    process_id: its --process_id.
    returncode: its exit status (negative: killed by that signal; None: still ran
      at the timeout and was killed).
    log: its stdout and stderr, interleaved.
  """
  process_id: int
  returncode: Optional[int]
  log: str


def free_port() -> int:
  """A TCP port that is free on 127.0.0.1 now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, extra: Optional[dict] = None) -> dict:
  """The environment of one process: CPU only, N virtual devices, no cluster variables."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}',
             JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')])))
  env.update(extra or {})
  return env


def format_logs(results: Sequence[ProcessResult], tail: int = 6000) -> str:
  """The end of every process's log, for an assertion message."""
  return '\n'.join(f'----- process {r.process_id} (exit {r.returncode}) -----\n'
                   f'{r.log[-tail:]}' for r in results)


def run_processes(args: Callable[[int], Sequence[str]], num_processes: int, *,
                  log_dir: str, devices_per_process: int = 2, timeout: float = 300.0,
                  env: Optional[Callable[[int], dict]] = None,
                  coordinator_flags: bool = True) -> list[ProcessResult]:
  """Runs `num_processes` processes of one jax.distributed run to their end.

  Args:
    args: process id -> the arguments after `python` (per process, so that a test
      can give one process another flag).
    num_processes: how many processes.
    log_dir: where `process-<i>.log` files are written.
    devices_per_process: virtual CPU devices of each process.
    timeout: seconds for the whole run; then every process is killed and
      AssertionError is raised with their logs.
    env: process id -> extra environment variables.
    coordinator_flags: append --coordinator_address, --num_processes, --process_id.

  Returns:
    One ProcessResult per process, in process order.

  Raises:
    AssertionError: the timeout passed (the message holds the logs).
  """
  os.makedirs(log_dir, exist_ok=True)
  address = f'127.0.0.1:{free_port()}'
  procs, logs, killed = [], [], set()
  try:
    for i in range(num_processes):
      command = [sys.executable, *args(i)]
      if coordinator_flags:
        command += [f'--coordinator_address={address}', f'--num_processes={num_processes}',
                    f'--process_id={i}']
      path = os.path.join(log_dir, f'process-{i}.log')
      logs.append(path)
      with open(path, 'w') as log:
        procs.append(subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=process_env(devices_per_process, env(i) if env else None),
            start_new_session=True))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    for i, p in enumerate(procs):
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and children
        p.wait()
        killed.add(i)
  results = []
  for i, (p, path) in enumerate(zip(procs, logs)):
    with open(path, errors='replace') as f:
      results.append(ProcessResult(i, None if i in killed else p.returncode, f.read()))
  if killed:
    raise AssertionError(f'The {num_processes} processes did not end within {timeout:g} s '
                         f'(killed):\n{format_logs(results)}')
  return results
