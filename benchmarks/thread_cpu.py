"""CPU seconds of this process's threads, by group (Linux /proc), for the benchmarks.

On a machine shared with other jobs, CPU time moves much less than wall time, and
split by thread it says where a pipeline spends its cycles: the XLA CPU devices and
their pool, tf.data, the prefetch thread, the main thread.
"""

import collections
import os
import threading


def snapshot() -> dict[int, tuple[str, float]]:
  """{thread id: (group, CPU seconds so far)} of this process's threads.

  The group is the Python thread's name for Python threads ('MainThread',
  'prefetch_to_device', ...), else the OS thread name (TensorFlow's and XLA's pools
  name their threads, e.g. 'tf_data_private_threadpool', 'tf_XLAEigen'; other native
  threads, such as the XLA CPU devices' own, inherit 'python').

  Returns:
    the snapshot (empty where /proc is not available).
  """
  names = {t.native_id: t.name for t in threading.enumerate()}
  ticks = os.sysconf('SC_CLK_TCK')
  out = {}
  try:
    tids = os.listdir('/proc/self/task')
  except OSError:
    return out
  for tid in tids:
    try:
      with open(f'/proc/self/task/{tid}/stat') as f:
        stat = f.read()
    except OSError:  # the thread ended meanwhile
      continue
    fields = stat.rsplit(')', 1)[1].split()
    name = names.get(int(tid)) or stat[stat.index('(') + 1:stat.rindex(')')]
    out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / ticks)  # utime + stime
  return out


def by_group(start: dict[int, tuple[str, float]], end: dict[int, tuple[str, float]],
             process_seconds: float | None = None) -> collections.Counter:
  """CPU seconds spent by each thread group between two snapshots.

  Args:
    start: an earlier `snapshot()`.
    end: a later one (threads started in between count from 0).
    process_seconds: the process's CPU time over the same interval
      (`time.process_time()` difference), when known: what the threads alive at
      `end` do not account for (threads that ended in between, the 1/100 s
      rounding of /proc) is reported as 'ended threads' when positive.

  Returns:
    Counter {group: CPU seconds}.
  """
  groups = collections.Counter()
  for tid, (name, seconds) in end.items():
    groups[name] += seconds - start.get(tid, (name, 0.0))[1]
  if process_seconds is not None and process_seconds > sum(groups.values()):
    groups['ended threads'] = process_seconds - sum(groups.values())
  return groups


def format_groups(groups: collections.Counter, per: float, unit: str,
                  scale: float = 1.0) -> str:
  """'group value, ...' with the seconds divided by `per` and multiplied by `scale`.

  Args:
    groups: from `by_group` (or several summed).
    per: the count to divide by (steps, images).
    unit: printed after each value.
    scale: e.g. 1e6 for microseconds.

  Returns:
    the groups, largest first, those that used no CPU left out.
  """
  return ', '.join(f'{group} {seconds / per * scale:.3g}{unit}'
                   for group, seconds in groups.most_common() if seconds > 0)
