"""Training and feature-extraction throughput: reid_jax vs the same step in PyTorch.

Measures images/s of the Bag-of-Tricks ResNet-50 step (`configs/market.py`'s recipe:
`ReIDModel` with BNNeck and last stride 1 for 751 identities, loss 'softmax_triplet',
Adam with the BoT parameter groups), global batch P x K (default 16 = 4 x 4) at 256x128,
float32 (or `--precision bf16`), through the path `reid_jax.train` runs:

  * JAX train: Market-like 128x64 JPEGs written to a temporary folder (as
    `benchmarks/input_throughput.py` writes them) -> `pipeline.create_train_stream`
    (PK sampler, decode, resize, uint8, the cache `config.input.cache='auto'` picks:
    on CPU devices the device cache, `train.device_image_cache`) ->
    `pipeline.prefetch_to_device` -> the pmapped `p_train_step(state, acc, batch, cache)` of
    `train_step.make_parallel_steps` (augmentation on the device, state and metrics
    accumulator donated, no host sync inside a run).
  * JAX features: `p_eval_step` on a uint8 batch already on the devices (normalised
    on the device).
  * PyTorch train / features: the same network (`tests/torch_reference.py`'s
    `make_torch_strong_baseline`, torchvision's ResNet-50 layout, with torchvision's
    in-place ReLUs), label-smoothed cross entropy + batch-hard triplet (margin 0.3),
    `torch.optim.Adam` with BoT's per-parameter groups, on one fixed, already
    normalised float32 batch (the step alone: no input pipeline, no augmentation).
    bf16: CPU (or CUDA) autocast to bfloat16.

Both sides are compiled / warmed up first (`--warmup` steps; the first JAX call,
compilation included, is reported). Then `--runs` rounds alternate the two: JAX run i,
PyTorch run i, JAX run i + 1, ... Each run times `--steps` consecutive steps, blocking
only at its end; its figure is steps * batch / wall time. Reported per kind: every run's
figure, their median and the CPU seconds per step (all threads of the process: on a
machine shared with other jobs wall time swings much more than CPU time), and the
ratio of the medians JAX / PyTorch. Run on an otherwise idle machine for wall-clock
numbers; the load average is printed before and after.

Usage:
  python benchmarks/train_throughput.py [--runs 5] [--steps 4] [--warmup 2]
      [--batch_size 16] [--precision fp32|bf16] [--num_images 512]
      [--skip_torch] [--skip_eval] [--torch_threads N] [--nocpu_xla_flags]
  python benchmarks/train_throughput.py --quick   (the same comparison on a
      ResNet-50-type network with one bottleneck block per stage and width 16, at
      128x64, batch 8, 2 steps per run: a smoke run in about a minute; not the
      figure of the ResNet-50 comparison)
"""

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
NUM_CLASSES = 751  # Market-1501 training identities.
IMAGE_SIZE = (256, 128)
NUM_INSTANCES = 4  # K
RESNET50_LAYERS = (3, 4, 6, 3)


def load_average() -> str:
  """The 1/5/15-minute load averages as a string ('n/a' where unavailable)."""
  try:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return 'n/a'


def timed(run: Callable[[], None]) -> tuple[float, float]:
  """(wall s, CPU s of all threads of this process) of `run()`, which must block."""
  cpu, wall = time.process_time(), time.perf_counter()
  run()
  return time.perf_counter() - wall, time.process_time() - cpu


def _import_sibling(directory: str, name: str) -> Any:
  """Imports module `name` from `directory` (benchmarks/ or tests/, not packages)."""
  if directory not in sys.path:
    sys.path.insert(0, directory)
  return __import__(name)


def make_config(args: argparse.Namespace) -> Any:
  """The Market recipe at the benchmark's batch size, size, network and precision."""
  from configs import market  # pylint: disable=g-import-not-at-top
  config = market.get_config()
  config.batch_size = args.batch_size
  config.num_instances = NUM_INSTANCES
  config.input.image_size = args.image_size
  config.model.stage_sizes = args.layers if args.layers != RESNET50_LAYERS else ()
  config.model.width = args.width
  config.dtype = 'bfloat16' if args.precision == 'bf16' else 'float32'
  return config


# ----------------------------------------------------------------------------------
# JAX: the training loop's path.


class JaxBench:
  """reid_jax's train step fed by the host stream, and its eval step."""

  def __init__(self, args: argparse.Namespace, config: Any, records: Sequence[Any],
               eval_batch: dict[str, np.ndarray]):
    """Builds the state, the stream and the steps, and compiles them.

    Args:
      args: parsed flags.
      config: from `make_config`.
      records: the training records (generated JPEGs).
      eval_batch: a host uint8 batch laid out (D, b, ...) for the eval step.
    """
    import jax  # pylint: disable=g-import-not-at-top
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    from reid_jax import models, precision, train  # pylint: disable=g-import-not-at-top
    from reid_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top
    self.jax, self.args = jax, args
    num_devices = jax.local_device_count()
    dtype = precision.compute_dtype(config)
    spe = pipeline.steps_per_epoch(records, config, num_devices)
    # As `train.build_experiment` builds them (which also reads a dataset folder).
    model = models.create_model(config.model, NUM_CLASSES, dtype=dtype,
                                bn_axis_name=step_lib.AXIS_NAME)
    print(f'  jax: {num_devices} device(s), compute dtype {np.dtype(dtype).name}, '
          f'conv_input_barrier {model.conv_input_barrier}, {spe} steps per epoch',
          flush=True)
    parts = train.build_train_parts(config, model, NUM_CLASSES, spe, dtype)
    self.p_train, self.p_eval = parts.p_train_step, parts.p_eval_step
    # The training loop's own helpers: the zero metrics accumulator, and the state
    # and accumulator on the devices as the pmapped step returns them (else its
    # second call compiles again).
    acc = train.initial_metrics_acc(parts.train_step_kwargs, parts.state, config)
    self.state, self.acc = step_lib.on_devices((parts.state, acc))
    num_steps = args.warmup + args.runs * args.steps
    stream = pipeline.create_train_stream(
        records, config, steps_per_epoch=spe, start_step=0, num_steps=num_steps,
        num_local_devices=num_devices)
    print(f'  jax input: {stream.cache.reason}', flush=True)
    self.image_cache = (train.device_image_cache(records, config)
                        if stream.cache.mode == 'device' else None)
    self.batches = pipeline.prefetch_to_device(stream, config.prefetch_batches,
                                               keys=stream.device_keys)
    self.eval_batch = next(pipeline.prefetch_to_device(iter([eval_batch]), 1))
    self.first_train_s, _ = timed(lambda: self._train(1))
    self._train(args.warmup - 1)
    self.first_eval_s, _ = timed(lambda: self._eval(1))
    self._eval(args.warmup - 1)

  def _train(self, steps: int) -> None:
    for _ in range(steps):
      self.state, self.acc = self.p_train(self.state, self.acc, next(self.batches),
                                          self.image_cache)
    self.jax.block_until_ready((self.state, self.acc))

  def _eval(self, steps: int) -> None:
    out = None
    for _ in range(steps):
      out = self.p_eval(self.state, self.eval_batch)
    self.jax.block_until_ready(out)

  def train_run(self) -> tuple[float, float]:
    return timed(lambda: self._train(self.args.steps))

  def eval_run(self) -> tuple[float, float]:
    return timed(lambda: self._eval(self.args.steps))

  def summary(self) -> str:
    """Mean loss and skipped steps over every step run (fetched once, at the end)."""
    acc = self.jax.device_get(self.acc)
    self.batches.close()
    finite = max(int(acc['finite_steps']), 1)
    terms = ', '.join(f'{k} {float(acc["sums"][k]) / finite:.4f}'
                      for k in ('loss', 'ce_loss', 'triplet_loss'))
    return (f'means over {int(acc["finite_steps"])} steps: {terms}; '
            f'{int(acc["skipped_steps"])} skipped')


# ----------------------------------------------------------------------------------
# PyTorch: the same model, losses and optimizer.


def torch_losses(logits: Any, feat: Any, labels: Any, epsilon: float = 0.1,
                 margin: float = 0.3) -> Any:
  """BoT's CrossEntropyLabelSmooth + TripletLoss (hard mining) on float32 inputs."""
  import torch  # pylint: disable=g-import-not-at-top
  logits, feat = logits.float(), feat.float()
  log_probs = torch.log_softmax(logits, dim=1)
  targets = torch.zeros_like(log_probs).scatter_(1, labels.unsqueeze(1), 1)
  targets = (1 - epsilon) * targets + epsilon / logits.shape[1]
  ce = (-targets * log_probs).mean(0).sum()
  n = feat.shape[0]
  sq = feat.pow(2).sum(dim=1, keepdim=True).expand(n, n)
  dist = (sq + sq.t()).addmm(feat, feat.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()
  is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
  dist_ap = torch.max(dist[is_pos].contiguous().view(n, -1), 1)[0]
  dist_an = torch.min(dist[~is_pos].contiguous().view(n, -1), 1)[0]
  tri = torch.nn.functional.margin_ranking_loss(
      dist_an, dist_ap, torch.ones_like(dist_an), margin=margin)
  return ce + tri


class TorchBench:
  """The PyTorch train and eval steps on one fixed batch."""

  def __init__(self, args: argparse.Namespace, images: np.ndarray, labels: np.ndarray):
    """Builds the model and optimizer and warms them up.

    Args:
      args: parsed flags.
      images: (B, H, W, 3) float32 normalised images.
      labels: (B,) int labels.
    """
    import torch  # pylint: disable=g-import-not-at-top
    torch_reference = _import_sibling(os.path.join(_ROOT, 'tests'), 'torch_reference')
    self.torch, self.args = torch, args
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = torch_reference.make_torch_strong_baseline(
        args.layers, last_stride=1, num_classes=NUM_CLASSES, seed=0, width=args.width)
    for module in model.modules():  # torchvision's ResNet uses in-place ReLUs
      if isinstance(module, torch.nn.ReLU):
        module.inplace = True
    self.model = model.to(self.device)
    # BoT's make_optimizer: one group per tensor (the bias lr factor and weight decay
    # equal the defaults in this recipe).
    self.optimizer = torch.optim.Adam(
        [{'params': [p], 'lr': 3.5e-4, 'weight_decay': 5e-4}
         for p in self.model.parameters() if p.requires_grad])
    self.x = torch.from_numpy(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device)
    self.y = torch.from_numpy(labels.astype(np.int64)).to(self.device)
    self.loss = None
    self._train(args.warmup)
    self._eval(args.warmup)

  def _autocast(self) -> Any:
    if self.args.precision == 'bf16':
      return self.torch.autocast(device_type=self.device.type, dtype=self.torch.bfloat16)
    return contextlib.nullcontext()

  def _sync(self) -> None:
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def _train(self, steps: int) -> None:
    self.model.train()
    for _ in range(steps):
      self.optimizer.zero_grad(set_to_none=True)
      with self._autocast():
        logits, feat = self.model(self.x)
      loss = torch_losses(logits, feat, self.y)
      loss.backward()
      self.optimizer.step()
      self.loss = loss.detach()
    self._sync()

  def _eval(self, steps: int) -> None:
    self.model.eval()
    with self.torch.no_grad(), self._autocast():
      for _ in range(steps):
        self.model(self.x)
    self._sync()

  def train_run(self) -> tuple[float, float]:
    return timed(lambda: self._train(self.args.steps))

  def eval_run(self) -> tuple[float, float]:
    return timed(lambda: self._eval(self.args.steps))

  def summary(self) -> str:
    return f'last loss {float(self.loss):.4f}'


# ----------------------------------------------------------------------------------
# Main.


def make_data(args: argparse.Namespace, config: Any, tmp: str
              ) -> tuple[list[Any], dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Writes the JPEGs and reads one batch through the host stream.

  Returns:
    (training records, the host uint8 batch (D, b, ...) for JAX's eval step, that
    batch normalised as float32 (B, H, W, 3) and its labels (B,) for PyTorch).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from input_pipeline.records import Record  # pylint: disable=g-import-not-at-top
  input_throughput = _import_sibling(_HERE, 'input_throughput')
  items = input_throughput.make_images(tmp, args.num_images, NUM_INSTANCES)
  records = [Record(path, pid, 0) for path, pid in items]
  num_devices = jax.local_device_count()
  batch = next(pipeline.create_train_stream(
      records, config, steps_per_epoch=1, start_step=0, num_steps=1,
      num_local_devices=num_devices, cache='none'))
  eval_batch = {'image': batch['image']}
  uint8 = batch['image'].reshape(-1, *args.image_size, 3)
  mean = np.asarray(config.input.pixel_mean, np.float32)
  std = np.asarray(config.input.pixel_std, np.float32)
  images = (uint8.astype(np.float32) / 255.0 - mean) / std
  return records, eval_batch, images, batch['label'].reshape(-1)


def print_environment(args: argparse.Namespace, added_flags: Sequence[str]) -> None:
  """Prints versions, devices, thread settings and the load average."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  print(f'python {platform.python_version()}, jax {jax.__version__}, jaxlib '
        f'{jaxlib.__version__}, numpy {np.__version__}; {jax.default_backend()}: '
        f'{len(devices)} x {devices[0].device_kind}; cpu_count {os.cpu_count()}, usable '
        f'{cpus}, {platform.processor() or platform.machine()}')
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r} (cpu_tuning added '
        f'{list(added_flags)})')
  if not args.skip_torch:
    import torch  # pylint: disable=g-import-not-at-top
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    print(f'torch {torch.__version__}: intra-op threads {torch.get_num_threads()}, '
          f'inter-op threads {torch.get_num_interop_threads()}, cuda '
          f'{torch.cuda.is_available()}')
  network = ('ResNet-50' if args.layers == RESNET50_LAYERS and args.width == 64 else
             f'bottleneck ResNet {args.layers} width {args.width}')
  print(f'{network}, batch {args.batch_size} (P={args.batch_size // NUM_INSTANCES} x '
        f'K={NUM_INSTANCES}) at {args.image_size[0]}x{args.image_size[1]}, '
        f'{NUM_CLASSES} classes, '
        f'{args.precision}; {args.runs} runs x {args.steps} steps, warmup '
        f'{args.warmup}; load average {load_average()}', flush=True)


def report(name: str, batch_size: int, steps: int,
           runs: Sequence[tuple[float, float]]) -> float:
  """Prints one kind's per-run img/s and median; returns the median img/s."""
  rates = [steps * batch_size / wall for wall, _ in runs]
  median = statistics.median(rates)
  cpu = statistics.median(c / steps for _, c in runs)
  print(f'  {name:<16s} median {median:7.2f} img/s  (runs: '
        f'{" ".join(f"{r:.2f}" for r in rates)}), cpu {cpu:.2f} s/step')
  return median


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses and checks the command line."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=16,
                      help='global batch, P * K with K = 4')
  parser.add_argument('--runs', type=int, default=5, help='interleaved runs per side')
  parser.add_argument('--steps', type=int, default=4, help='timed steps per run')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps first (the first JAX call compiles)')
  parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'))
  parser.add_argument('--num_images', type=int, default=512,
                      help='generated 128x64 JPEGs (K=4 per identity)')
  parser.add_argument('--skip_torch', action='store_true', help='JAX only')
  parser.add_argument('--skip_eval', action='store_true',
                      help='train steps only (no feature extraction)')
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='torch.set_num_threads (0: torch default)')
  parser.add_argument('--cpu_xla_flags', action=argparse.BooleanOptionalAction,
                      default=True, help='reid_jax.cpu_tuning.set_cpu_xla_flags(), '
                      'as reid_jax.main does')
  parser.add_argument('--quick', action='store_true',
                      help='a smoke run: one bottleneck block per stage, width 16, '
                      '128x64, batch 8, 2 steps per run, 64 images')
  args = parser.parse_args(argv)
  args.layers, args.width, args.image_size = RESNET50_LAYERS, 64, IMAGE_SIZE
  if args.quick:
    args.layers, args.width, args.image_size = (1, 1, 1, 1), 16, (128, 64)
    args.batch_size, args.steps, args.warmup, args.num_images = 8, 2, 1, 64
  if args.batch_size <= 0 or args.batch_size % NUM_INSTANCES:
    parser.error(f'--batch_size must be a positive multiple of K={NUM_INSTANCES}, '
                 f'got {args.batch_size}.')
  if args.batch_size // NUM_INSTANCES < 2:
    parser.error('--batch_size needs at least P=2 identities for triplet mining.')
  for name in ('runs', 'steps', 'warmup'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1, got {getattr(args, name)}.')
  if args.num_images < 2 * args.batch_size:
    parser.error(f'--num_images must be at least twice --batch_size, got '
                 f'{args.num_images}.')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs JAX and PyTorch interleaved and prints the medians and their ratio."""
  args = parse_args(argv)
  added = []
  if args.cpu_xla_flags:
    from reid_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
    added = cpu_tuning.set_cpu_xla_flags()  # before anything starts JAX's backends
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # tf.data only, as reid_jax.main
  print_environment(args, added)
  config = make_config(args)
  with tempfile.TemporaryDirectory() as tmp:
    records, eval_batch, images, labels = make_data(args, config, tmp)
    benches = {'jax': JaxBench(args, config, records, eval_batch)}
    print(f'  jax first train call (compiles) {benches["jax"].first_train_s:.1f} s, '
          f'first eval call {benches["jax"].first_eval_s:.1f} s', flush=True)
    if not args.skip_torch:
      benches['torch'] = TorchBench(args, images, labels)
    kinds = ['train'] + ([] if args.skip_eval else ['eval'])
    times = {(side, kind): [] for side in benches for kind in kinds}
    for i in range(args.runs):
      for kind in kinds:
        for side, bench in benches.items():
          times[side, kind].append(getattr(bench, f'{kind}_run')())
      print(f'  run {i + 1}/{args.runs} done; load {load_average()}', flush=True)
    for side, bench in benches.items():
      print(f'  {side}: {bench.summary()}')
  print(f'\nload average after: {load_average()}')
  medians = {}
  for key, runs in times.items():
    medians[key] = report(' '.join(key), args.batch_size, args.steps, runs)
  if 'torch' in benches:
    for kind in kinds:
      print(f'  JAX / PyTorch {kind}: {medians["jax", kind] / medians["torch", kind]:.2f}'
            f' (ratio of the medians)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
