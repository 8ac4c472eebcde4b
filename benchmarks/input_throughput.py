"""Training input throughput: our tf.data pipeline vs a PIL + multiprocessing loader.

Both produce the baseline's training batches (P x K sampling, resize to
256x128, flip, pad 10 + random crop, normalise, random erasing) from the same
Market-like JPEGs (128x64, as Market-1501's crops), in the same run:

  * tf.data: `input_pipeline.pipeline.create_train_dataset` (parallel map,
    AUTOTUNE), iterated as numpy.
  * PIL: what the PyTorch baselines do: a `multiprocessing.Pool` of workers,
    each building whole batches with PIL (resize, flip, pad, crop) and numpy
    (normalise, erase), the batches pickled back to the main process.

Usage:
  python benchmarks/input_throughput.py [--num_images 1024] [--steps 30]
      [--workers 2] [--tf_threads 0]

Prints images/s of both and their ratio. Run it on an otherwise idle machine
for meaningful numbers.
"""

import argparse
from collections.abc import Sequence
import math
import multiprocessing
import os
import random
import tempfile
import time

import numpy as np
from PIL import Image

_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
_STD = np.array((0.229, 0.224, 0.225), np.float32)


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
  images = np.stack([_pil_train_image(p, rng, (256, 128)) for p in paths])
  return {'image': images, 'label': np.asarray(labels, np.int32)}


def bench_pil(items: list[tuple[str, int]], batches: np.ndarray,
              workers: int) -> float:
  """Images/s of the PIL + multiprocessing loader over `batches`."""
  paths = [p for p, _ in items]
  pids = [pid for _, pid in items]
  jobs = [([paths[i] for i in b], [pids[i] for i in b], s)
          for s, b in enumerate(batches)]
  ctx = multiprocessing.get_context('fork')
  with ctx.Pool(workers) as pool:
    it = pool.imap(_pil_batch, jobs, chunksize=1)
    next(it)  # warm-up: first batch
    start = time.perf_counter()
    n = 0
    for batch in it:
      n += batch['image'].shape[0]
    elapsed = time.perf_counter() - start
  return n / elapsed


def bench_tf(items: list[tuple[str, int]], steps: int, batch_size: int,
             tf_threads: int) -> float:
  """Images/s of create_train_dataset over `steps` batches (after 1 warm-up)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from input_pipeline.records import Record  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.batch_size = batch_size
  records = [Record(p, pid, 0) for p, pid in items]
  ds = pipeline.create_train_dataset(records, config, epoch=0,
                                     num_local_devices=1, steps=steps + 1)
  if tf_threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = tf_threads
    ds = ds.with_options(options)
  it = ds.as_numpy_iterator()
  next(it)
  start = time.perf_counter()
  n = 0
  for batch in it:
    n += batch['image'].shape[0] * batch['image'].shape[1]
  elapsed = time.perf_counter() - start
  return n / elapsed


def main(argv: Sequence[str] | None = None) -> None:
  """Runs both loaders and prints their throughput."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=1024)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--tf_threads', type=int, default=0,
                      help='tf.data private threadpool size; 0: TF default')
  args = parser.parse_args(argv)

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  with tempfile.TemporaryDirectory() as tmp:
    items = make_images(tmp, args.num_images)
    rng = np.random.default_rng(0)
    batches = np.stack([rng.choice(len(items), args.batch_size, replace=False)
                        for _ in range(args.steps + 1)])
    # PIL first: the pool forks before TensorFlow starts its threads.
    pil_rate = bench_pil(items, batches, args.workers)
    tf_rate = bench_tf(items, args.steps, args.batch_size, args.tf_threads)
  print(f'cpus={os.cpu_count()} images={args.num_images} steps={args.steps} '
        f'batch={args.batch_size} size=256x128')
  print(f'tf.data pipeline:            {tf_rate:8.1f} images/s')
  print(f'PIL + Pool({args.workers}) loader:      {pil_rate:8.1f} images/s')
  print(f'ratio tf.data / PIL:         {tf_rate / pil_rate:8.2f}')


if __name__ == '__main__':
  main()
