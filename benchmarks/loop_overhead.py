"""Training-loop overhead: the whole loop against the bare pmapped step.

Both run the same compiled `p_train_step` (ResNet-18 at 128x64, global batch 64,
8 virtual CPU devices: where per-step host overhead shows most) on the same
batches, in the same process, interleaved (loop, bare, loop, bare, ...):

  * loop: `reid_jax.train._train_loop` as `train_and_evaluate` runs it: the host
    input stream (tf.data decode + resize, uint8, the cache of `--cache`: by
    default the host cache; 'device': the device cache), the background
    prefetch to the devices, the step with device augmentation, the on-device
    metric accumulation, logging every `--log_every` steps and at epoch ends, the
    checkpoint policy's host checks, over `--epochs` epochs so that epoch
    boundaries count. Evaluation is switched off (it is not training time).
  * bare: the same number of `p_train_step` calls on batches already on the
    devices, nothing else.

Time runs from the first log step after the warm-up epoch (a sync point) to the
log line of the last step (the loop fetches the metrics there, a sync; the bare
run blocks on the state), so the final evaluation and checkpoint are not counted.
Each figure is the median over --runs runs (run 0, which compiles, is dropped).
Also printed: CPU seconds per step of the whole process for both sides (a machine
shared with other jobs disturbs them less than wall time) and, for the loop, the
CPU seconds per step of each group of threads (the XLA devices and their pool,
tf.data, the prefetch thread, the main thread).

Usage:
  python benchmarks/loop_overhead.py [--runs 5] [--epochs 4] [--steps_per_epoch 5]
      [--data_dir DIR]   (default: a synthetic dataset generated in a temp dir)
      [--cache host|device|none|auto]
  python benchmarks/loop_overhead.py --quick   (a 1-block, width-8 ResNet at 64x32,
      global batch 32: a smoke run of the benchmark in about a minute; its overhead
      is not the goal's figure, the step being ~100x shorter)
"""

import argparse
import collections
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from reid_jax import cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_tuning.set_cpu_xla_flags()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import cache as cache_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import preemption  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
# benchmarks/thread_cpu.py: the folder of this script is on sys.path.
import thread_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(data_dir: str, args: argparse.Namespace):
  """The demo config at the benchmark's model, size and schedule."""
  config = demo.get_config()
  config.data_dir = data_dir
  config.model.name = 'resnet18'
  if args.quick:
    config.input.image_size = (64, 32)
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.width = 8
    config.batch_size = 32
  else:
    config.input.image_size = (128, 64)
    config.batch_size = 64
  config.num_instances = 4  # K = 4: whole identities on every device
  config.steps_per_epoch = args.steps_per_epoch
  config.num_epochs = args.epochs
  config.log_every_steps = args.log_every
  config.checkpoint_every_epochs = 1000
  config.checkpoint_every_minutes = 0.0
  config.eval_every_epochs = 1000
  config.input.cache = args.cache
  return config


class _StepClock:
  """Records wall time, process CPU time and per-thread CPU at the log steps.

  Stands in for the metric writer; the first write of a step is its log line (the
  loop has just fetched the metrics: a sync point). Later writes of the same step
  (the final evaluation's summary) are ignored.
  """

  def __init__(self):
    self.marks: dict[int, tuple[float, float, dict]] = {}

  def write_scalars(self, step, scalars):
    del scalars
    if step not in self.marks:
      self.marks[step] = (time.perf_counter(), time.process_time(), thread_cpu.snapshot())

  def flush(self):
    pass


@dataclasses.dataclass
class _Timing:
  """One side of one run: timed steps, wall and CPU seconds per step, CPU by thread."""
  steps: int
  wall: float
  cpu: float
  groups: collections.Counter


def _time_loop(exp, config, state, workdir: str) -> _Timing:
  """The whole loop after its first epoch."""
  clock = _StepClock()
  writer_factory = train.metric_writers.create_default_writer
  evaluate_state = train.evaluation.evaluate_state
  train.metric_writers.create_default_writer = lambda *a, **k: clock
  train.evaluation.evaluate_state = lambda *a, **k: {'mAP': 0.0}
  try:
    manager = checkpoint_lib.create_manager(workdir, 1)
    best = checkpoint_lib.create_best_manager(workdir)
    with preemption.PreemptionWatch() as watch:
      train._train_loop(exp, config, workdir, state, manager, best, watch)  # pylint: disable=protected-access
  finally:
    train.metric_writers.create_default_writer = writer_factory
    train.evaluation.evaluate_state = evaluate_state
  first = exp.steps_per_epoch  # the end of the first epoch: compiled, cache full
  last = max(clock.marks)
  if last <= first:
    raise ValueError(f'No timed steps: the run logged steps {sorted(clock.marks)}; '
                     'use --epochs >= 2.')
  (wall0, cpu0, threads0), (wall1, cpu1, threads1) = clock.marks[first], clock.marks[last]
  steps = last - first
  return _Timing(steps, (wall1 - wall0) / steps, (cpu1 - cpu0) / steps,
                 thread_cpu.by_group(threads0, threads1, cpu1 - cpu0))


def _time_bare(exp, config, state, batches, num_steps: int, image_cache=None) -> _Timing:
  """p_train_step alone on device-resident batches (and the device cache, if any)."""
  state = step_lib.on_devices(state)
  acc = step_lib.on_devices(train.initial_metrics_acc(exp.train_step_kwargs, state, config))
  state, acc = exp.p_train_step(state, acc, batches[0], image_cache)  # warm (compiled)
  jax.block_until_ready(state)
  threads0, wall, cpu = thread_cpu.snapshot(), time.perf_counter(), time.process_time()
  for i in range(num_steps):
    state, acc = exp.p_train_step(state, acc, batches[1 + i % (len(batches) - 1)],
                                  image_cache)
  jax.block_until_ready((state, acc))
  cpu = time.process_time() - cpu
  return _Timing(num_steps, (time.perf_counter() - wall) / num_steps, cpu / num_steps,
                 thread_cpu.by_group(threads0, thread_cpu.snapshot(), cpu))


def _print_groups(name: str, timings: list[_Timing]) -> None:
  """CPU seconds per step of each thread group, over all the runs."""
  total = collections.Counter()
  for t in timings:
    total.update(t.groups)
  steps = sum(t.steps for t in timings)
  print(f'  {name} CPU s/step by thread: {thread_cpu.format_groups(total, steps, "")}')


def parse_args(argv=None) -> argparse.Namespace:
  """Parses and checks the command line."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny model and images: a smoke run (see the docstring)')
  parser.add_argument('--runs', type=int, default=5, help='timed runs per side')
  parser.add_argument('--epochs', type=int, default=4,
                      help='epochs per loop run; the first is not timed')
  parser.add_argument('--steps_per_epoch', type=int, default=5)
  parser.add_argument('--log_every', type=int, default=5)
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--cache', default='host', choices=cache_lib.CACHE_MODES,
                      help="config.input.cache of both sides ('device': the loop fills "
                      'the device cache at its start, before the timed epochs)')
  args = parser.parse_args(argv)
  for name in ('runs', 'steps_per_epoch', 'log_every'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1, got {getattr(args, name)}.')
  if args.epochs < 2:
    parser.error(f'--epochs must be at least 2 (the first one is not timed), got '
                 f'{args.epochs}.')
  return args


def main(argv=None) -> int:
  """Runs loop and bare interleaved and prints the medians and the overhead."""
  args = parse_args(argv)
  tmp = tempfile.mkdtemp(prefix='loop_overhead_')
  data_dir = args.data_dir
  if not data_dir:
    data_dir = os.path.join(tmp, 'synthetic')
    synthetic.generate(data_dir, seed=0, num_train_ids=48, num_test_ids=4,
                       num_distractors=2, num_junk=2, num_workers=0)
  config = _config(data_dir, args)
  exp = train.build_experiment(config)
  stream = pipeline.create_train_stream(
      exp.train_source.dataset.train, config, steps_per_epoch=exp.steps_per_epoch,
      start_step=0, num_steps=exp.steps_per_epoch + 1,
      num_local_devices=jax.local_device_count())
  image_cache = (train.device_image_cache(exp.train_source.dataset.train, config)
                 if stream.cache.mode == 'device' else None)
  print(f'input: {stream.cache.reason}', flush=True)
  batches = list(pipeline.prefetch_to_device(stream, 2, keys=stream.device_keys))
  # A host copy: every run puts its own buffers on the devices (the step donates them).
  host_state = jax.device_get(exp.state)
  loops, bares = [], []
  print(f'load average before: {os.getloadavg()}', flush=True)
  for run in range(args.runs + 1):  # run 0 compiles and warms both
    loop = _time_loop(exp, config, host_state, os.path.join(tmp, f'wd{run}'))
    bare = _time_bare(exp, config, host_state, batches, loop.steps, image_cache)
    if run:
      loops.append(loop)
      bares.append(bare)
      print(f'run {run}: loop {loop.wall * 1e3:.1f} ms/step ({loop.cpu:.3f} CPU s), '
            f'bare {bare.wall * 1e3:.1f} ms/step ({bare.cpu:.3f} CPU s), overhead '
            f'{loop.wall / bare.wall - 1:+.1%}; load {os.getloadavg()[0]:.2f}', flush=True)
  median = lambda ts, key: statistics.median(getattr(t, key) for t in ts)
  loop_wall, bare_wall = median(loops, 'wall'), median(bares, 'wall')
  loop_cpu, bare_cpu = median(loops, 'cpu'), median(bares, 'cpu')
  images = config.batch_size
  height, width = config.input.image_size
  model = 'ResNet-18' if not args.quick else 'ResNet (1 block per stage, width 8)'
  print(f'\n{model} {height}x{width}, global batch {images}, {jax.device_count()} CPU '
        f'devices, {args.epochs} epochs of {exp.steps_per_epoch} steps (the first one '
        f'untimed), median of {args.runs} runs; load average after: {os.getloadavg()}')
  print(f'  loop: {loop_wall * 1e3:.1f} ms/step ({images / loop_wall:.1f} img/s), '
        f'{loop_cpu:.3f} CPU s/step')
  print(f'  bare: {bare_wall * 1e3:.1f} ms/step ({images / bare_wall:.1f} img/s), '
        f'{bare_cpu:.3f} CPU s/step')
  print(f'  loop overhead: {loop_wall / bare_wall - 1:+.1%} wall, '
        f'{loop_cpu / bare_cpu - 1:+.1%} CPU (goal: at most +5% wall)')
  ratios = sorted(l.wall / b.wall - 1 for l, b in zip(loops, bares))
  print(f'  per-run overheads: {", ".join(f"{r:+.1%}" for r in ratios)}')
  _print_groups('loop', loops)
  _print_groups('bare', bares)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
