"""Training and feature-extraction throughput: reid_jax vs an equivalent PyTorch step.

Measures images/s, at 256x128 and a given global batch (P x K, K = 4), of

  * JAX train: the real `reid_jax.train_step.train_step`, pmapped over every local
    device by `make_parallel_steps` (cross-device BN, triplet mining over the gathered
    batch), on `configs/market.py`'s recipe: ResNet-50 `ReIDModel` (BNNeck, last
    stride 1) for 751 identities, loss 'softmax_triplet', Adam with the BoT parameter
    groups (`reid_jax.optim.create_optimizer`). The state is first put on the
    replicated sharding the pmapped step returns it with (else its second call
    compiles the step again), the batch on the devices as `prefetch_to_device` does.
  * JAX eval: the pmapped `eval_step` (test feature after the neck).
  * torch train / eval: the same model (a torchvision-equivalent ResNet-50 written
    here, torchvision is not needed), the same losses (label-smoothed cross entropy +
    batch-hard triplet with margin 0.3), `torch.optim.Adam` with BoT's per-parameter
    groups, on the same batch, in the same process (run after the JAX part).

for 'fp32' and 'half' precision: bfloat16 activations on CPU/TPU (torch: CPU autocast
to bfloat16), float16 with dynamic loss scaling on GPU (`reid_jax.precision`; torch:
CUDA autocast + GradScaler). Each measurement runs `--warmup` untimed steps (the
first one includes compilation, reported separately) and `--steps` timed steps, each
timed on its own after blocking on its outputs; img/s uses the median step time.

Usage:
  python benchmarks/train_throughput.py [--batch_size 16] [--steps 5] [--warmup 2]
      [--precisions fp32,half] [--skip_half] [--skip_torch] [--skip_jax]
      [--skip_eval] [--jax_impl pmap|jit|both] [--cpu_tuning auto|on|off]
      [--xla_flags FLAGS]
      [--torch_threads N] [--channels_last]

XLA's CPU behaviour is set through XLA_FLAGS, read when JAX starts its backends:
`--xla_flags` appends to it; `--cpu_tuning on` appends the recommended CPU flags
(`reid_jax.cpu_tuning.CPU_XLA_FLAGS` where that module exists, else CPU_XLA_FLAGS
below), `auto` (default) does what `reid_jax.main` does (`set_cpu_xla_flags()` where
that exists, else nothing), `off` nothing; the flags in effect are printed. `--jax_impl jit` also measures
`jax.jit(train_step, axis_name=None)` on one device (no pmap, per-device BN, state
donated). The model is whatever `reid_jax.models.create_model` builds (its
`conv_input_barrier`, where it has one, is printed).

Each step's CPU time (all threads) is printed next to its wall time: on a machine
shared with other jobs the wall time of a 2-core run can double, the CPU time much
less so. Run it on an otherwise idle machine for wall-clock numbers; the load
average is printed before, during and after.
"""

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

NUM_CLASSES = 751  # Market-1501 training identities.
IMAGE_SIZE = (256, 128)
NUM_INSTANCES = 4  # K
# Recommended XLA:CPU flags (see BENCHMARKS.md); mirrors reid_jax.cpu_tuning.
CPU_XLA_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
    '--xla_disable_hlo_passes=cse_barrier_expander',
)


# ----------------------------------------------------------------------------------
# Timing helpers.


def load_average() -> str:
  """The 1/5/15-minute load averages as a string ('n/a' where unavailable)."""
  try:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return 'n/a'


def time_steps(step: Callable[[], Any], warmup: int, steps: int
               ) -> tuple[float, list[float], list[float]]:
  """Runs `step` (which must block until its results are ready) and times it.

  Args:
    step: a callable doing one blocking step.
    warmup: untimed steps first (at least one; the first one's duration is returned).
    steps: timed steps.

  Returns:
    (wall time of the first call in s, wall times of the timed steps in s, CPU times
    (user + system, all threads of this process) of the timed steps in s).
  """
  first = 0.0
  for i in range(max(warmup, 1)):
    t0 = time.perf_counter()
    step()
    if i == 0:
      first = time.perf_counter() - t0
  walls, cpus = [], []
  for _ in range(steps):
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return first, walls, cpus


def summarize(name: str, batch_size: int, first: float, walls: Sequence[float],
              cpus: Sequence[float]) -> dict[str, Any]:
  """Prints and returns a result row (img/s from the median wall time of a step).

  The CPU seconds per step (all threads) are printed too: on a shared machine they
  vary much less than wall time and still compare implementations' work (an idle
  machine with n cores would need at least cpu_s / n wall seconds per step).
  """
  median = statistics.median(walls)
  row = {
      'name': name,
      'img_s': batch_size / median,
      'median_s': median,
      'min_s': min(walls),
      'max_s': max(walls),
      'cpu_s': statistics.median(cpus),
      'first_s': first,
  }
  print(f'  {name:<28s} {row["img_s"]:7.2f} img/s  step median {median:.3f} s '
        f'(min {row["min_s"]:.3f}, max {row["max_s"]:.3f}), cpu {row["cpu_s"]:.2f} '
        f's/step; first call {first:.1f} s; load {load_average()}', flush=True)
  return row


def pk_labels(batch_size: int, num_classes: int, seed: int = 0) -> np.ndarray:
  """Labels of a P x K batch: P distinct identities, K consecutive images each."""
  rng = np.random.default_rng(seed)
  pids = rng.choice(num_classes, batch_size // NUM_INSTANCES, replace=False)
  return np.repeat(pids, NUM_INSTANCES).astype(np.int32)


# ----------------------------------------------------------------------------------
# JAX.


def jax_benchmark(args: argparse.Namespace, precision_name: str,
                  images: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
  """Times the pmapped train and eval steps of reid_jax in one precision.

  Args:
    args: parsed flags.
    precision_name: 'fp32' or 'half'.
    images: (B, H, W, 3) float32 normalised images.
    labels: (B,) int32 PK labels.

  Returns:
    The result rows.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from configs import market  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  from reid_jax import models, optim, precision  # pylint: disable=g-import-not-at-top
  from reid_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top

  config = market.get_config()
  config.batch_size = args.batch_size
  config.half_precision = precision_name == 'half'
  dtype = precision.compute_dtype(config)
  num_devices = jax.local_device_count()
  if args.batch_size % num_devices:
    raise SystemExit(f'--batch_size {args.batch_size} is not divisible by the '
                     f'{num_devices} local devices.')
  steps_per_epoch = 100  # Only affects the lr schedule's epoch boundaries.
  tx = optim.create_optimizer(config, steps_per_epoch)
  lr_fn = optim.create_lr_schedule(config, steps_per_epoch)
  loss_config = step_lib.LossConfig.from_config(config)
  rows = []
  label = f'jax {np.dtype(dtype).name}'

  def make_state(bn_axis_name: Optional[str]) -> step_lib.TrainState:
    model = models.create_model(config.model, NUM_CLASSES, dtype=dtype,
                                bn_axis_name=bn_axis_name)
    if bn_axis_name is not None:
      print(f'    model conv_input_barrier: '
            f'{getattr(model, "conv_input_barrier", "n/a (not in this models.py)")}')
    return step_lib.create_train_state(
        jax.random.key(0), model, tx, IMAGE_SIZE, NUM_CLASSES,
        dynamic_scale=precision.create_dynamic_scale(dtype))

  if args.jax_impl in ('pmap', 'both'):
    state = make_state(step_lib.AXIS_NAME)
    p_train, p_eval = step_lib.make_parallel_steps(loss_config, lr_fn)
    per_device = args.batch_size // num_devices
    batch = {
        'image': np.asarray(images, dtype).reshape(
            num_devices, per_device, *images.shape[1:]),
        'label': labels.reshape(num_devices, per_device),
    }
    # Sharded over the local devices as the training loop's prefetch_to_device does.
    batch = next(jax_utils.prefetch_to_device(iter([batch]), 1))
    # pmap (a shard_map over the local devices in this jax) returns the state with a
    # replicated NamedSharding; handing it in with another sharding (as
    # create_train_state makes it) compiles the step again on its second call.
    if hasattr(step_lib, 'replicated_sharding'):
      sharding = step_lib.replicated_sharding()
    else:
      mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (step_lib.AXIS_NAME,))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(state, sharding)
    holder = {'state': state}

    def train_once():
      holder['state'], metrics = p_train(holder['state'], batch)
      jax.block_until_ready((holder['state'], metrics))

    first, walls, cpus = time_steps(train_once, args.warmup, args.steps)
    rows.append(summarize(f'{label} train (pmap)', args.batch_size, first, walls, cpus))
    loss = float(np.mean(jax.device_get(
        p_train(holder['state'], batch)[1]['loss'])))
    print(f'    (loss after {args.warmup + args.steps + 1} steps: {loss:.4f})')
    if not args.skip_eval:
      def eval_once():
        jax.block_until_ready(p_eval(holder['state'], batch))

      first, walls, cpus = time_steps(eval_once, args.warmup, args.steps)
      rows.append(summarize(f'{label} eval (pmap)', args.batch_size, first, walls, cpus))
    del holder, state

  if args.jax_impl in ('jit', 'both'):
    state = make_state(None)
    device = jax.local_devices()[0]
    batch = jax.device_put(
        {'image': np.asarray(images, dtype), 'label': labels}, device)
    j_train = jax.jit(
        functools.partial(step_lib.train_step, loss_config=loss_config,
                          learning_rate_fn=lr_fn, axis_name=None),
        donate_argnums=0)
    j_eval = jax.jit(step_lib.eval_step)
    holder = {'state': jax.device_put(state, device)}

    def train_once_jit():
      holder['state'], metrics = j_train(holder['state'], batch)
      jax.block_until_ready((holder['state'], metrics))

    first, walls, cpus = time_steps(train_once_jit, args.warmup, args.steps)
    rows.append(summarize(f'{label} train (jit, 1 dev)', args.batch_size, first,
                          walls, cpus))
    if not args.skip_eval:
      def eval_once_jit():
        jax.block_until_ready(j_eval(holder['state'], batch))

      first, walls, cpus = time_steps(eval_once_jit, args.warmup, args.steps)
      rows.append(summarize(f'{label} eval (jit, 1 dev)', args.batch_size, first,
                            walls, cpus))
    del holder, state
  return rows


# ----------------------------------------------------------------------------------
# PyTorch: torchvision-equivalent ResNet-50 + BNNeck and the BoT losses.


def build_torch_model(num_classes: int, last_stride: int = 1) -> Any:
  """BoT's Baseline model (ResNet-50, BNNeck, neck_feat 'after') in plain torch.

  Args:
    num_classes: training identities.
    last_stride: stride of layer4.

  Returns:
    An nn.Module whose forward returns (logits, global_feat) in training mode and
    the BN-neck feature in eval mode.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3x3 conv)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      if self.downsample is not None:
        identity = self.downsample(x)
      return self.relu(out + identity)

  class ResNet50(nn.Module):
    """torchvision resnet50 without avgpool/fc, with a configurable last stride."""

    def __init__(self, last_stride: int):
      super().__init__()
      self.inplanes = 64
      self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
      self.layer1 = self._make_layer(64, 3, 1)
      self.layer2 = self._make_layer(128, 4, 2)
      self.layer3 = self._make_layer(256, 6, 2)
      self.layer4 = self._make_layer(512, 3, last_stride)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
          nn.init.constant_(m.weight, 1)
          nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Module:
      downsample = None
      if stride != 1 or self.inplanes != planes * 4:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * 4))
      layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * 4
      layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  class Baseline(nn.Module):
    """BoT's Baseline: backbone, global average pooling, BNNeck, classifier."""

    def __init__(self):
      super().__init__()
      self.base = ResNet50(last_stride)
      self.gap = nn.AdaptiveAvgPool2d(1)
      self.bottleneck = nn.BatchNorm1d(2048)
      self.bottleneck.bias.requires_grad_(False)
      nn.init.constant_(self.bottleneck.weight, 1)
      nn.init.constant_(self.bottleneck.bias, 0)
      self.classifier = nn.Linear(2048, num_classes, bias=False)
      nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x):
      global_feat = self.gap(self.base(x)).flatten(1)
      feat = self.bottleneck(global_feat)
      if self.training:
        return self.classifier(feat), global_feat
      return feat

  del torch
  return Baseline()


def torch_losses(logits: Any, feat: Any, labels: Any, epsilon: float = 0.1,
                 margin: float = 0.3) -> Any:
  """BoT's CrossEntropyLabelSmooth + TripletLoss (hard mining) on float32 inputs."""
  import torch  # pylint: disable=g-import-not-at-top
  logits = logits.float()
  feat = feat.float()
  num_classes = logits.shape[1]
  log_probs = torch.log_softmax(logits, dim=1)
  targets = torch.zeros_like(log_probs).scatter_(1, labels.unsqueeze(1), 1)
  targets = (1 - epsilon) * targets + epsilon / num_classes
  ce = (-targets * log_probs).mean(0).sum()
  n = feat.shape[0]
  sq = feat.pow(2).sum(dim=1, keepdim=True).expand(n, n)
  dist = sq + sq.t()
  dist = dist.addmm(feat, feat.t(), beta=1, alpha=-2)
  dist = dist.clamp(min=1e-12).sqrt()
  is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
  dist_ap = torch.max(dist[is_pos].contiguous().view(n, -1), 1)[0]
  dist_an = torch.min(dist[~is_pos].contiguous().view(n, -1), 1)[0]
  tri = torch.nn.functional.margin_ranking_loss(
      dist_an, dist_ap, torch.ones_like(dist_an), margin=margin)
  return ce + tri


def torch_benchmark(args: argparse.Namespace, precision_name: str,
                    images: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
  """Times the PyTorch train and eval steps in one precision.

  Args:
    args: parsed flags.
    precision_name: 'fp32' or 'half' (bfloat16 autocast on CPU, float16 autocast +
      GradScaler on CUDA).
    images: (B, H, W, 3) float32 images (transposed to NCHW here).
    labels: (B,) int32 labels.

  Returns:
    The result rows.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  half = precision_name == 'half'
  half_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
  model = build_torch_model(NUM_CLASSES).to(device)
  memory_format = (torch.channels_last if args.channels_last
                   else torch.contiguous_format)
  model = model.to(memory_format=memory_format)
  # BoT's make_optimizer: one parameter group per tensor (bias groups would get
  # base_lr * bias_lr_factor and weight_decay_bias, both equal to the defaults here).
  groups = [{'params': [p], 'lr': 3.5e-4, 'weight_decay': 5e-4}
            for _, p in model.named_parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(groups)
  scaler = torch.amp.GradScaler('cuda') if half and device.type == 'cuda' else None
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
  x = x.contiguous(memory_format=memory_format)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)

  def autocast():
    if half:
      return torch.autocast(device_type=device.type, dtype=half_dtype)
    return contextlib.nullcontext()

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def train_once():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      logits, feat = model(x)
    loss = torch_losses(logits, feat, y)
    if scaler is not None:
      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()
    else:
      loss.backward()
      optimizer.step()
    loss.item()
    sync()

  def eval_once():
    model.eval()
    with torch.no_grad(), autocast():
      model(x).float().sum().item()
    sync()

  name = f'torch {str(half_dtype).split(".")[-1] if half else "float32"}'
  if args.channels_last:
    name += ' NHWC'
  rows = []
  first, walls, cpus = time_steps(train_once, args.warmup, args.steps)
  rows.append(summarize(f'{name} train', args.batch_size, first, walls, cpus))
  if not args.skip_eval:
    first, walls, cpus = time_steps(eval_once, args.warmup, args.steps)
    rows.append(summarize(f'{name} eval', args.batch_size, first, walls, cpus))
  return rows


# ----------------------------------------------------------------------------------
# Main.


def set_xla_flags(args: argparse.Namespace) -> None:
  """Appends --xla_flags and (per --cpu_tuning) the CPU flags to XLA_FLAGS.

  Must run before JAX starts its backends.
  """
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = ' '.join(
        [os.environ.get('XLA_FLAGS', ''), args.xla_flags]).strip()
  if args.cpu_tuning == 'off':
    return
  try:
    from reid_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  except ImportError:
    cpu_tuning = None
  if cpu_tuning is not None:
    cpu_tuning.set_cpu_xla_flags(force=args.cpu_tuning == 'on')
  elif args.cpu_tuning == 'on':
    current = os.environ.get('XLA_FLAGS', '')
    extra = [f for f in CPU_XLA_FLAGS if f.split('=')[0] not in current]
    os.environ['XLA_FLAGS'] = ' '.join([current, *extra]).strip()


def print_environment(args: argparse.Namespace) -> None:
  """Prints versions, devices and thread settings."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  print(f'python {platform.python_version()}, jax {jax.__version__}, '
        f'jaxlib {jaxlib.__version__}, numpy {np.__version__}')
  devices = jax.local_devices()
  print(f'jax backend {jax.default_backend()}: {len(devices)} x '
        f'{devices[0].device_kind}')
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  print(f'os.cpu_count()={os.cpu_count()}, usable cpus={cpus}, '
        f'processor={platform.processor() or platform.machine()}')
  for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'TF_NUM_INTRAOP_THREADS'):
    if var in os.environ:
      print(f'{var}={os.environ[var]}')
  if not args.skip_torch:
    import torch  # pylint: disable=g-import-not-at-top
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    print(f'torch {torch.__version__}: intra-op threads {torch.get_num_threads()}, '
          f'inter-op threads {torch.get_num_interop_threads()}, mkldnn '
          f'{torch.backends.mkldnn.is_available()}, cuda {torch.cuda.is_available()}')
  print(f'batch {args.batch_size} (P={args.batch_size // NUM_INSTANCES} x '
        f'K={NUM_INSTANCES}) at {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {NUM_CLASSES} classes, '
        f'warmup {args.warmup}, timed steps {args.steps}; load average '
        f'{load_average()}', flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses the command line."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=16,
                      help='global batch, P * K with K = 4')
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps first (the first compiles)')
  parser.add_argument('--precisions', default='fp32,half',
                      help='comma-separated subset of fp32,half')
  parser.add_argument('--skip_half', action='store_true', help='fp32 only')
  parser.add_argument('--skip_torch', action='store_true', help='JAX only')
  parser.add_argument('--skip_jax', action='store_true', help='PyTorch only')
  parser.add_argument('--skip_eval', action='store_true',
                      help='train steps only (no feature extraction)')
  parser.add_argument('--jax_impl', default='pmap', choices=('pmap', 'jit', 'both'),
                      help='pmap: make_parallel_steps (as training); jit: '
                      'jax.jit(train_step, axis_name=None) on one device')
  parser.add_argument('--cpu_tuning', default='auto', choices=('auto', 'on', 'off'),
                      help='recommended XLA:CPU flags: auto = as reid_jax.main does, '
                      'on = always, off = never')
  parser.add_argument('--xla_flags', default='',
                      help='extra flags appended to XLA_FLAGS (before JAX starts)')
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='torch.set_num_threads (0: torch default)')
  parser.add_argument('--channels_last', action='store_true',
                      help='run the torch model in channels_last (NHWC) memory format')
  args = parser.parse_args(argv)
  if args.batch_size <= 0 or args.batch_size % NUM_INSTANCES:
    parser.error(f'--batch_size must be a positive multiple of K={NUM_INSTANCES}.')
  if args.batch_size // NUM_INSTANCES < 2:
    parser.error('--batch_size needs at least P=2 identities for triplet mining.')
  precisions = [p.strip() for p in args.precisions.split(',') if p.strip()]
  unknown = set(precisions) - {'fp32', 'half'}
  if unknown:
    parser.error(f'unknown --precisions {sorted(unknown)}; use fp32 and/or half.')
  if args.skip_half:
    precisions = [p for p in precisions if p != 'half']
  args.precision_list = precisions
  if args.steps <= 0:
    parser.error('--steps must be positive.')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the benchmark and prints the table."""
  args = parse_args(argv)
  set_xla_flags(args)
  print_environment(args)
  rng = np.random.default_rng(0)
  images = rng.standard_normal(
      (args.batch_size, *IMAGE_SIZE, 3), dtype=np.float32)
  labels = pk_labels(args.batch_size, NUM_CLASSES)
  results: dict[str, list[dict[str, Any]]] = {}
  # All JAX measurements first: torch's OpenMP threads would otherwise spin next to
  # XLA's thread pool.
  if not args.skip_jax:
    for prec in args.precision_list:
      print(f'JAX {prec}:', flush=True)
      results[f'jax {prec}'] = jax_benchmark(args, prec, images, labels)
  if not args.skip_torch:
    for prec in args.precision_list:
      print(f'PyTorch {prec}:', flush=True)
      results[f'torch {prec}'] = torch_benchmark(args, prec, images, labels)

  print(f'\nload average after: {load_average()}')
  print('\n| precision | step | JAX impl | JAX img/s | PyTorch img/s | JAX / PyTorch |')
  print('|---|---|---|---:|---:|---:|')
  for prec in args.precision_list:
    jax_rows = results.get(f'jax {prec}', [])
    torch_rows = {r['name'].split()[-1]: r for r in results.get(f'torch {prec}', [])}
    kinds = ['train'] + ([] if args.skip_eval else ['eval'])
    for kind in kinds:
      matching = [r for r in jax_rows if f' {kind} ' in r['name']] or [None]
      for row in matching:
        other = torch_rows.get(kind)
        impl = row['name'].split('(')[-1].rstrip(')') if row else '-'
        jax_s = f'{row["img_s"]:.2f}' if row else '-'
        torch_s = f'{other["img_s"]:.2f}' if other else '-'
        ratio = (f'{row["img_s"] / other["img_s"]:.2f}' if row and other else '-')
        dtype_name = row['name'].split()[1] if row else prec
        print(f'| {prec} ({dtype_name}) | {kind} | {impl} | {jax_s} | {torch_s} | '
              f'{ratio} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
