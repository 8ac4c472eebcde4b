"""Stopping a run cleanly when it is preempted (SIGTERM) or interrupted (SIGINT).

One process: the project's own handler records the signal, and the training loop
checks it after every step (a host-only flag read), saves, and raises
`PreemptedError`; `main` exits non-zero with a line saying that rerunning the same
command resumes. (orbax's `reached_preemption` works only once `jax.distributed` is
initialised.)

Several processes (`jax.distributed`): JAX's own preemption notifier receives SIGTERM
and `multihost_utils.reached_preemption_sync_point(step)` turns true at the same step
on every host, so all hosts save the same step, even when only one host got the signal
(tests/test_multihost.py). No Python SIGTERM handler is installed then: it would replace
JAX's notifier. Ctrl-C (SIGINT) is not synchronised: it stops only the process that
receives it, without saving; stop a multi-host run with SIGTERM (`scancel`, `kill`).
"""

import signal
import threading
from typing import Any, Optional

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptedError(RuntimeError):
  """The run was stopped by a signal after saving; rerunning the command resumes it."""


class PreemptionWatch:
  """Context manager telling the training loop when to save and stop.

  Usage:
    with PreemptionWatch() as watch:
      for step in ...:
        ...
        if watch.should_stop(step):
          save, then raise PreemptedError(...)
  """

  def __init__(self, multi_process: Optional[bool] = None):
    self.multi_process = (jax.process_count() > 1 if multi_process is None
                          else multi_process)
    self.received: Optional[str] = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signal.Signals(signum).name

  def __enter__(self) -> 'PreemptionWatch':
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (host-only; the same step on every host).

    Args:
      step: the number of steps done.

    Returns:
      True once a stop signal arrived.
    """
    if self.multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = 'SIGTERM'
        return True
      return False
    return self.received is not None
