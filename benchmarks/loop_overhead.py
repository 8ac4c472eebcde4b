"""Training-loop overhead: the whole loop against the bare pmapped step.

Both run the same compiled `p_train_step` (ResNet-18 at 128x64, global batch 64,
8 virtual CPU devices: where per-step host overhead shows most) on the same
batches, in the same process, interleaved (loop, bare, loop, bare, ...):

  * loop: `reid_jax.train._train_loop` as `train_and_evaluate` runs it: the host
    input stream (tf.data decode + resize, uint8, host cache), the background
    prefetch to the devices, the step with device augmentation, the on-device
    metric accumulation, logging every `--log_every` steps and at epoch ends, the
    checkpoint policy's host checks, over `--epochs` epochs so that epoch
    boundaries count. Evaluation is switched off (it is not training time).
  * bare: the same number of `p_train_step` calls on batches already on the
    devices, nothing else.

Time runs from the first log step after the warm-up epoch (a sync point) to the
end of the last step (the loop syncs there too; the bare run blocks on the
state). Each figure is the median over --runs runs.

Usage:
  python benchmarks/loop_overhead.py [--runs 5] [--epochs 4] [--steps_per_epoch 5]
      [--data_dir DIR]   (default: a synthetic dataset generated in a temp dir)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

from reid_jax import cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_tuning.set_cpu_xla_flags()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import preemption  # pylint: disable=g-import-not-at-top,wrong-import-position
from reid_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(data_dir: str, args: argparse.Namespace):
  config = demo.get_config()
  config.data_dir = data_dir
  config.input.image_size = (128, 64)
  config.model.name = 'resnet18'
  config.batch_size = 64
  config.num_instances = 4  # P = 16: two identities per device
  config.steps_per_epoch = args.steps_per_epoch
  config.num_epochs = args.epochs
  config.log_every_steps = args.log_every
  config.checkpoint_every_epochs = 1000
  config.checkpoint_every_minutes = 0.0
  config.eval_every_epochs = 1000
  config.input.cache = 'host'
  return config


class _StepClock:
  """Records the host time at the loop's sync points (the log steps)."""

  def __init__(self):
    self.times: dict[int, float] = {}

  def write_scalars(self, step, scalars):
    del scalars
    self.times[step] = time.perf_counter()

  def flush(self):
    pass


def _time_loop(exp, config, state, workdir: str) -> tuple[float, int]:
  """Seconds per step of the whole loop after the first epoch."""
  clock = _StepClock()
  train.metric_writers.create_default_writer = lambda *a, **k: clock
  evaluate_lib_run = train.evaluate_lib.run_evaluation
  train.evaluate_lib.run_evaluation = lambda *a, **k: {'mAP': 0.0}
  try:
    manager = checkpoint_lib.create_manager(workdir, 1)
    best = checkpoint_lib.create_best_manager(workdir)
    with preemption.PreemptionWatch() as watch:
      train._train_loop(exp, config, workdir, state, manager, best, watch)  # pylint: disable=protected-access
  finally:
    train.evaluate_lib.run_evaluation = evaluate_lib_run
  first = exp.steps_per_epoch  # the end of the first epoch: compiled, cache full
  last = max(clock.times)
  return (clock.times[last] - clock.times[first]) / (last - first), last - first


def _time_bare(exp, config, state, batches, num_steps: int) -> float:
  """Seconds per step of p_train_step alone on device-resident batches."""
  state = train._on_devices(state)  # pylint: disable=protected-access
  acc = train._on_devices(train._initial_metrics_acc(exp, state, config))  # pylint: disable=protected-access
  state, acc = exp.p_train_step(state, acc, batches[0])  # warm (compiled already)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(num_steps):
    state, acc = exp.p_train_step(state, acc, batches[1 + i % (len(batches) - 1)])
  jax.block_until_ready((state, acc))
  return (time.perf_counter() - start) / num_steps


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--steps_per_epoch', type=int, default=5)
  parser.add_argument('--log_every', type=int, default=5)
  parser.add_argument('--data_dir', default='')
  args = parser.parse_args(argv)
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
  batches = list(pipeline.prefetch_to_device(stream, 2))
  # A host copy: every run puts its own buffers on the devices (the step donates them).
  host_state = jax.device_get(exp.state)
  loop_times, bare_times = [], []
  for run in range(args.runs + 1):  # run 0 compiles and warms both
    per_step, steps = _time_loop(exp, config, host_state, os.path.join(tmp, f'wd{run}'))
    bare = _time_bare(exp, config, host_state, batches, steps)
    if run:
      loop_times.append(per_step)
      bare_times.append(bare)
      print(f'run {run}: loop {per_step * 1e3:.1f} ms/step, bare {bare * 1e3:.1f} ms/step, '
            f'overhead {per_step / bare - 1:+.1%}', flush=True)
  loop, bare = statistics.median(loop_times), statistics.median(bare_times)
  images = config.batch_size
  print(f'\nResNet-18 128x64, global batch {images}, {jax.device_count()} CPU devices, '
        f'{args.epochs} epochs of {exp.steps_per_epoch} steps, median of {args.runs}:')
  print(f'  loop: {loop * 1e3:.1f} ms/step ({images / loop:.1f} img/s)')
  print(f'  bare: {bare * 1e3:.1f} ms/step ({images / bare:.1f} img/s)')
  print(f'  loop overhead: {loop / bare - 1:+.1%} (goal: at most +5%)')
  ratios = sorted(l / b - 1 for l, b in zip(loop_times, bare_times))
  print(f'  per-run overheads: {", ".join(f"{r:+.1%}" for r in ratios)}')


if __name__ == '__main__':
  main(sys.argv[1:])
