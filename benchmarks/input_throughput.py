"""Training input throughput: images/s delivered to the devices, augmented.

Three loaders produce the baseline's training batches (P x K sampling, resize
to 256x128, flip, pad 10 + random crop, normalise, random erasing) from the
same Market-like JPEGs (128x64, as Market-1501's crops), in the same run,
interleaved (run i of every loader, then run i + 1, ...):

  * stream: `pipeline.create_train_stream(cache='none')` (tf.data: read,
    PIL-exact decode and resize, uint8) -> `pipeline.prefetch_to_device` ->
    `device_augment.augment` under `jax.pmap` on the (CPU) devices.
  * cached: the same with `cache='host'`, timed after its first epoch (which
    fills the cache): every batch is a gather from the uint8 cache.
  * device cache: `cache='device'`: every image decoded once into a padded uint8
    copy on each device (`device_cache.fill_device_cache`, before the timings);
    the stream ships only the plan (record indices, labels, epoch, position) and
    `device_cache.augment_cached` crops each image straight out of the cache.
  * PIL: what the PyTorch baselines do: a `multiprocessing.Pool` of workers,
    each building whole batches with PIL (resize, flip, pad, crop) and numpy
    (normalise, erase), the float32 batches pickled back to the main process,
    which puts them on the devices.

Each figure is the median over --runs runs; every run ends when the last
augmented batch is ready on the devices. Also printed: the host-only rates (no
devices, no augmentation) of the stream and the cached path, the cached path's
delivery to the devices without augmentation, the device augmentation alone on
a batch already on the devices (the host cache's ceiling here: no host work at
all), the device cache's fill rate, and for every row the images per CPU-second
(CPU time of all threads of this process, plus the PIL workers'), i.e. images/s
per core, which a shared machine disturbs less than wall time.

Usage:
  python benchmarks/input_throughput.py [--num_images 2048] [--steps 40]
      [--cached_steps 160] [--runs 5] [--workers 2] [--devices 2]
  python benchmarks/input_throughput.py --quick   (256 images, 4 / 16 timed
      batches per run: a smoke run in well under a minute, noisier figures)

The JAX devices are `--devices` virtual CPU devices (XLA_FLAGS is set below,
before JAX starts, with `reid_jax.cpu_tuning`'s flags as `reid_jax.main` sets
them): the augmentation shares the machine's cores with the host pipeline. Run it
on an otherwise idle machine for meaningful numbers. The cached paths' CPU time
is also split by thread (the XLA CPU devices and their pool, the prefetch
thread, tf.data, the main thread), summed over its runs.
"""

import argparse
import collections
from collections.abc import Sequence
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

# benchmarks/thread_cpu.py: the folder of this script is on sys.path.
import thread_cpu  # pylint: disable=g-import-not-at-top


def _set_device_count(argv: Sequence[str] | None) -> None:
  """XLA_FLAGS for --devices virtual CPU devices (before JAX is imported)."""
  count = 2
  args = list(sys.argv[1:] if argv is None else argv)
  for i, arg in enumerate(args):
    if arg.startswith('--devices='):
      count = int(arg.split('=', 1)[1])
    elif arg == '--devices' and i + 1 < len(args):
      count = int(args[i + 1])
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = (
        f'{flags} --xla_force_host_platform_device_count={count}').strip()
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from reid_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.set_cpu_xla_flags()  # as reid_jax.main does, before JAX starts


_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
_STD = np.array((0.229, 0.224, 0.225), np.float32)
_SIZE = (256, 128)


def make_images(out_dir: str, num_images: int, num_instances: int = 4,
                seed: int = 0) -> list[tuple[str, int]]:
  """Writes Market-like 128x64 JPEGs (smooth colours + noise).

  Args:
    out_dir: folder for the files.
    num_images: number of images.
    num_instances: images per identity.
    seed: numpy seed.

  Returns:
    list of (path, pid).
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:128, 0:64].astype(np.float32)
  items = []
  for i in range(num_images):
    base = rng.uniform(0, 255, 3)
    grad = rng.uniform(-1.5, 1.5, (2, 3))
    img = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
    img += rng.normal(0, 20, img.shape)
    path = os.path.join(out_dir, f'{i // num_instances:04d}_c1s1_{i:06d}.jpg')
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        path, quality=90)
    items.append((path, i // num_instances))
  return items


def _pil_train_image(path: str, rng: random.Random, size: tuple[int, int],
                     padding: int = 10, flip_prob: float = 0.5,
                     erase_prob: float = 0.5) -> np.ndarray:
  """The baseline's train transform with PIL + numpy (HWC float32)."""
  height, width = size
  img = Image.open(path).convert('RGB').resize((width, height), Image.BILINEAR)
  if rng.random() < flip_prob:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  arr = np.asarray(img)
  arr = np.pad(arr, ((padding, padding), (padding, padding), (0, 0)))
  top = rng.randint(0, 2 * padding)
  left = rng.randint(0, 2 * padding)
  arr = arr[top:top + height, left:left + width]
  arr = (arr.astype(np.float32) / 255.0 - _MEAN) / _STD
  if rng.uniform(0, 1) < erase_prob:
    for _ in range(100):
      area = rng.uniform(0.02, 0.4) * height * width
      aspect = rng.uniform(0.3, 1 / 0.3)
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        x1 = rng.randint(0, height - h)
        y1 = rng.randint(0, width - w)
        arr[x1:x1 + h, y1:y1 + w] = _MEAN
        break
  return arr


def _pil_batch(args: tuple[Sequence[str], Sequence[int], int]) -> dict:
  """One batch (worker side): images (B, H, W, 3) float32 and labels."""
  paths, labels, seed = args
  rng = random.Random(seed)
  images = np.stack([_pil_train_image(p, rng, _SIZE) for p in paths])
  return {'image': images, 'label': np.asarray(labels, np.int32)}


def _cpu_seconds(pids: Sequence[int]) -> float:
  """CPU time (user + system) of this process and of `pids` (Linux /proc)."""
  total = time.process_time()
  ticks = os.sysconf('SC_CLK_TCK')
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    except (OSError, IndexError, ValueError):
      pass
  return total


# (images/s wall, images per CPU-second, images, CPU seconds by thread group).
Rate = tuple[float, float, int, Any]


def _timed(fn, pids: Sequence[int] = ()) -> Rate:
  """Runs fn() -> images.

  CPU time counts every thread of this process (tf.data, XLA, the prefetch
  thread) and the processes `pids` (the PIL workers).

  Returns:
    (images/s wall, images per CPU-second, images, CPU seconds of this process's
    threads by group (`thread_cpu.by_group`)): a `Rate`.
  """
  threads, own = thread_cpu.snapshot(), time.process_time()
  wall, cpu = time.perf_counter(), _cpu_seconds(pids)
  images = fn()
  return (images / (time.perf_counter() - wall),
          images / max(_cpu_seconds(pids) - cpu, 1e-9), images,
          thread_cpu.by_group(threads, thread_cpu.snapshot(), time.process_time() - own))


class Bench:
  """The three loaders over one set of JPEGs (the pool forks before JAX/TF)."""

  def __init__(self, args: argparse.Namespace, items: list[tuple[str, int]]):
    self.args = args
    self.items = items
    # PIL pool first: fork before TensorFlow and JAX start their threads.
    self.pool = multiprocessing.get_context('fork').Pool(args.workers)
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from configs import default  # pylint: disable=g-import-not-at-top
    from input_pipeline import device_augment  # pylint: disable=g-import-not-at-top
    from input_pipeline import device_cache  # pylint: disable=g-import-not-at-top
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    from input_pipeline.records import Record  # pylint: disable=g-import-not-at-top
    self.jax, self.pipeline = jax, pipeline
    self.devices = jax.local_devices()
    self.config = config = default.get_config()
    config.batch_size = args.batch_size
    config.input.image_size = _SIZE
    self.records = [Record(p, pid, 0) for p, pid in items]
    self.spe = pipeline.steps_per_epoch(self.records, config, len(self.devices))
    cfg = device_augment.AugmentConfig.from_config(config.input)
    dtype = jnp.dtype(args.dtype)
    seed = int(config.seed)

    def aug(image, epoch, position):
      keys = device_augment.image_keys(seed, epoch, position)
      return device_augment.augment(image, keys, cfg, dtype)

    self.p_aug = jax.pmap(aug)

    def aug_cached(cache, index, epoch, position):
      keys = device_augment.image_keys(seed, epoch, position)
      return device_cache.augment_cached(cache, index, keys, cfg, dtype)

    self.p_aug_cached = jax.pmap(aug_cached, in_axes=(None, 0, 0, 0))
    mesh = jax.sharding.Mesh(np.asarray(self.devices), ('batch',))
    self.sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec('batch'))
    d = len(self.devices)
    b = args.batch_size // d
    warm = self.p_aug(np.zeros((d, b) + _SIZE + (3,), np.uint8),
                      np.zeros((d, b), np.int32), np.zeros((d, b), np.int32))
    warm.block_until_ready()  # compiled once, outside the timings
    from reid_jax import train  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    self.image_cache = train.device_image_cache(self.records, config)  # as the loop
    self.fill_rate = len(self.records) / (time.perf_counter() - start)
    self.p_aug_cached(self.image_cache, np.zeros((d, b), np.int32),
                      np.zeros((d, b), np.int32), np.zeros((d, b), np.int32)
                      ).block_until_ready()
    rng = np.random.default_rng(0)
    paths = [p for p, _ in items]
    pids = [pid for _, pid in items]
    self.pil_jobs = []
    for s in range(args.steps + 1):
      batch = rng.choice(len(items), args.batch_size, replace=False)
      self.pil_jobs.append(([paths[i] for i in batch], [pids[i] for i in batch], s))

  def _stream(self, cache: str, num_steps: int):
    return self.pipeline.create_train_stream(
        self.records, self.config, steps_per_epoch=self.spe, start_step=0,
        num_steps=num_steps, num_local_devices=len(self.devices), cache=cache)

  def _to_devices(self, stream, skip: int, steps: int,
                  augment: bool = True) -> Rate:
    """Consumes `skip` batches untimed, then times `steps` batches, augmented
    on the devices (or only delivered there)."""
    it = self.pipeline.prefetch_to_device(stream, size=2, devices=self.devices,
                                          keys=self.pipeline.TRAIN_DEVICE_KEYS)
    step = ((lambda b: self.p_aug(b['image'], b['epoch'], b['position']))
            if augment else (lambda b: b['image']))
    for _ in range(skip):
      out = step(next(it))
    out.block_until_ready()
    rate = self._timed_device_steps(lambda _: step(next(it)), steps)
    it.close()
    return rate

  def _timed_device_steps(self, step, steps: int) -> Rate:
    """Times `steps` calls step(i) -> device array, waiting for the last one."""

    def run():
      out = None
      for i in range(steps):
        out = step(i)
      out.block_until_ready()
      return steps * self.args.batch_size

    return _timed(run)

  def stream_devices(self) -> Rate:
    steps = self.args.steps
    return self._to_devices(self._stream('none', steps + 1), 1, steps)

  def cached_devices(self) -> Rate:
    steps = self.args.cached_steps
    return self._to_devices(self._stream('host', self.spe + steps), self.spe, steps)

  def device_cached(self) -> Rate:
    """The device cache: the stream ships the plan, the devices crop from the cache."""
    steps = self.args.cached_steps
    stream = self._stream('device', steps + 1)
    it = self.pipeline.prefetch_to_device(stream, size=2, devices=self.devices,
                                          keys=stream.device_keys)
    step = lambda b: self.p_aug_cached(self.image_cache, b['index'], b['epoch'],  # pylint: disable=unnecessary-lambda-assignment
                                       b['position'])
    step(next(it)).block_until_ready()
    rate = self._timed_device_steps(lambda _: step(next(it)), steps)
    it.close()
    return rate

  def cached_delivery(self) -> Rate:
    steps = self.args.cached_steps
    return self._to_devices(self._stream('host', self.spe + steps), self.spe, steps,
                            augment=False)

  def augment_only(self) -> Rate:
    """The device augmentation alone, on one batch already on the devices: the
    ceiling of the cached path on this machine (no host work at all)."""
    stream = self._stream('host', 1)
    batch = next(stream)
    image = self.jax.device_put(batch['image'], self.sharding)
    epoch = self.jax.device_put(batch['epoch'], self.sharding)
    position = np.asarray(batch['position'])
    self.p_aug(image, epoch, position).block_until_ready()
    # Other positions: other draws every step.
    return self._timed_device_steps(
        lambda i: self.p_aug(image, epoch, position + i * self.args.batch_size),
        self.args.cached_steps)

  def _host_only(self, stream, skip: int, steps: int) -> Rate:
    for _ in range(skip):
      next(stream)

    def run():
      for _ in range(steps):
        next(stream)
      return steps * self.args.batch_size

    return _timed(run)

  def stream_host(self) -> Rate:
    steps = self.args.steps
    return self._host_only(self._stream('none', steps + 1), 1, steps)

  def cached_host(self) -> Rate:
    steps = self.args.cached_steps
    return self._host_only(self._stream('host', self.spe + steps), self.spe, steps)

  def pil_devices(self) -> Rate:
    """The PIL loader's batches, put on the devices as float32."""
    jax, d = self.jax, len(self.devices)
    it = self.pool.imap(_pil_batch, self.pil_jobs, chunksize=1)
    next(it)  # warm-up: the first batch

    def run():
      n, last = 0, None
      for batch in it:
        image = batch['image'].reshape((d, -1) + batch['image'].shape[1:])
        last = jax.device_put(image, self.sharding)
        n += batch['image'].shape[0]
      last.block_until_ready()
      return n

    return _timed(run, [p.pid for p in self.pool._pool])  # pylint: disable=protected-access


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the loaders interleaved and prints their median throughput."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=2048)
  parser.add_argument('--steps', type=int, default=40,
                      help='timed batches of the stream and PIL loaders')
  parser.add_argument('--cached_steps', type=int, default=160,
                      help='timed batches of the cached path (after its first epoch)')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--devices', type=int, default=2)
  parser.add_argument('--dtype', default='float32', help='augmented image dtype')
  parser.add_argument('--quick', action='store_true',
                      help='a smoke run: 256 images, 4 (stream, PIL) and 16 (cached) '
                      'timed batches per run')
  args = parser.parse_args(argv)
  if args.quick:
    args.num_images, args.steps, args.cached_steps = 256, 4, 16
  for name in ('num_images', 'steps', 'cached_steps', 'batch_size', 'runs', 'workers',
               'devices'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1, got {getattr(args, name)}.')
  if args.batch_size % args.devices or args.num_images < 2 * args.batch_size:
    parser.error(f'--batch_size ({args.batch_size}) must be a multiple of --devices '
                 f'({args.devices}) and at most half of --num_images ({args.num_images}).')
  _set_device_count(argv)

  with tempfile.TemporaryDirectory() as tmp:
    items = make_images(tmp, args.num_images)
    bench = Bench(args, items)
    names = {'stream -> devices (augmented)': bench.stream_devices,
             'cached -> devices (augmented)': bench.cached_devices,
             'device cache (augmented)': bench.device_cached,
             f'PIL Pool({args.workers}) -> devices': bench.pil_devices,
             'stream, host only': bench.stream_host,
             'cached, host only': bench.cached_host,
             'cached -> devices, no augment': bench.cached_delivery,
             'augmentation alone (on devices)': bench.augment_only}
    results = {name: [] for name in names}
    for _ in range(args.runs):
      for name, fn in names.items():
        results[name].append(fn())
    bench.pool.close()
  print(f'cpus={os.cpu_count()} devices={len(bench.devices)} ({bench.devices[0].platform}) '
        f'images={args.num_images} (128x64 JPEG) -> {_SIZE[0]}x{_SIZE[1]} '
        f'batch={args.batch_size} steps/epoch={bench.spe} runs={args.runs} dtype={args.dtype}')
  print(f'load average (1, 5, 15 min): {os.getloadavg()}')
  medians = {}
  for name, rates in results.items():
    wall = statistics.median(r[0] for r in rates)
    cpu = statistics.median(r[1] for r in rates)
    medians[name] = wall
    runs = ' '.join(f'{r[0]:.0f}' for r in rates)
    print(f'{name:32s} {wall:9.0f} images/s   {cpu:8.0f} images per CPU-second   (runs: {runs})')
  pil = medians[f'PIL Pool({args.workers}) -> devices']
  print(f'ratio stream / PIL: {medians["stream -> devices (augmented)"] / pil:.2f}   '
        f'cached / PIL: {medians["cached -> devices (augmented)"] / pil:.2f}   '
        f'device cache / PIL: {medians["device cache (augmented)"] / pil:.2f}')
  print(f'device cache fill (once, before the timings): {bench.fill_rate:.0f} images/s')
  for name in ('cached -> devices (augmented)', 'device cache (augmented)',
               'cached -> devices, no augment'):
    groups = collections.Counter()
    for r in results[name]:
      groups.update(r[3])
    images = sum(r[2] for r in results[name])
    print(f'{name}, CPU per image by thread (all runs): '
          f'{thread_cpu.format_groups(groups, images, " us", 1e6)}')


if __name__ == '__main__':
  main()
