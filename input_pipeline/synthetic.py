"""Synthetic pedestrian re-ID data in the exact Market-1501 layout.

`generate(out_dir, seed=0, ...)` (or `python -m input_pipeline.synthetic --out DIR`)
draws pedestrians with PIL and writes

  DIR/bounding_box_train/0002_c1s1_000451_03.jpg   train identities
  DIR/query/...                                    one image per test id per camera
  DIR/bounding_box_test/...                        gallery, plus distractors (0000_...)
                                                   and junk (-1_...)
  DIR/.complete                                    JSON stamp, written last

Names follow Market-1501: 4-digit pid, `c<camera 1..9>s<sequence>_<frame, 6 digits>_
<bbox, 2 digits>.jpg`; junk images are named `-1_c...`.

An identity is a combination of attributes (upper/lower clothing colours and
patterns, accessories, hair, shoes, body proportions), each value shared by many
identities. Every camera has its own scene, illumination and colour cast, and every
image varies scale, position, background clutter, blur, pose, viewpoint and
occlusion, so raw pixels and colour histograms match poorly across cameras while a
trained network can learn the identity (see benchmarks/synthetic_baselines.py).

Output is deterministic for a seed: every image has its own random stream derived
from (seed, split, index), so the bytes do not depend on the number of workers.
"""

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from input_pipeline import synthetic_render
from input_pipeline import synthetic_sampling
from input_pipeline.synthetic_render import Job, render
from input_pipeline.synthetic_sampling import sample_cameras, sample_identities

TRAIN_DIR = 'bounding_box_train'
QUERY_DIR = 'query'
GALLERY_DIR = 'bounding_box_test'
COMPLETE_FILE = '.complete'
# Split codes for the per-image random streams.
_TRAIN, _QUERY, _GALLERY, _DISTRACTOR, _JUNK = range(5)

def _params_key(params: dict[str, Any]) -> dict[str, Any]:
  """Returns the stamp stored in `.complete`: the parameters plus a code hash.

  Args:
    params: generation parameters (JSON-serialisable).

  Returns:
    A dict; a dataset is reused only when its stamp is equal.
  """
  digest = hashlib.sha256()
  for source in (__file__, synthetic_sampling.__file__, synthetic_render.__file__):
    with open(source, 'rb') as f:
      digest.update(f.read())
  code_hash = digest.hexdigest()[:16]
  return {'params': params, 'code': code_hash}



def _render_and_write(job: Job) -> None:
  """Renders `job` and writes it as a JPEG with fixed settings."""
  Image.fromarray(render(job)).save(job.path, format='JPEG', quality=job.quality,
                                    subsampling=0, optimize=False)


def _render_chunk(jobs: Sequence[Job]) -> int:
  """Writes a chunk of jobs (the unit of work of the process pool)."""
  for job in jobs:
    _render_and_write(job)
  return len(jobs)


class _Namer:
  """Allocates unique Market-style file names (frames increase per camera/sequence)."""

  def __init__(self, rng: np.random.Generator, num_sequences: int = 6):
    self._rng = rng
    self._num_sequences = num_sequences
    self._frames: dict[tuple[int, int], int] = {}

  def name(self, pid: int, cam: int) -> str:
    """Returns a new name for an image of `pid` (-1, 0 or 1..9999) by camera `cam` (0-based)."""
    seq = int(self._rng.integers(1, self._num_sequences + 1))
    frame = self._frames.get((cam, seq), 0) + int(self._rng.integers(1, 60))
    self._frames[(cam, seq)] = frame
    bbox = int(self._rng.integers(1, 9))
    pid_str = '-1' if pid == -1 else f'{pid:04d}'
    return f'{pid_str}_c{cam + 1}s{seq}_{frame:06d}_{bbox:02d}.jpg'


def _plan(out_dir: str, params: dict[str, Any]) -> tuple[list[Job], dict[str, int]]:
  """Decides every image (identity, camera, name) of the dataset.

  Args:
    out_dir: dataset root.
    params: generation parameters (see `generate`).

  Returns:
    (jobs, counts).
  """
  seed = params['seed']
  rng = np.random.default_rng([seed, 1000])
  num_train, num_test = params['num_train_ids'], params['num_test_ids']
  num_cams = params['num_cameras']
  cameras = sample_cameras(np.random.default_rng([seed, 1001]), num_cams)
  identities = sample_identities(np.random.default_rng([seed, 1002]), num_train + num_test)
  pids = rng.permutation(np.arange(1, num_train + num_test + 1))
  train_pids = sorted(int(p) for p in pids[:num_train])
  test_pids = sorted(int(p) for p in pids[num_train:])
  namer = _Namer(np.random.default_rng([seed, 1003]))
  common = dict(height=params['height'], width=params['width'], quality=params['jpeg_quality'])
  cam_lo, cam_hi = params['cameras_per_id']
  cam_hi = min(cam_hi, num_cams)
  jobs: list[Job] = []
  counts = dict(train_ids=num_train, train_images=0, query_ids=num_test, query_images=0,
                gallery_ids=num_test, gallery_images=0, distractors=0, junk=0)

  def add(subdir: str, kind: str, pid: int, cam: int, split: int, identity=None):
    path = os.path.join(out_dir, subdir, namer.name(pid, cam))
    jobs.append(Job(path=path, kind=kind, identity=identity, camera=cameras[cam],
                    stream=(seed, split, len(jobs)), **common))

  lo, hi = params['train_images_per_id']
  for pid in train_pids:
    identity = identities[pid - 1]
    n = int(rng.integers(lo, hi + 1))
    cams = rng.choice(num_cams, size=min(n, int(rng.integers(cam_lo, cam_hi + 1))),
                      replace=False)
    # Every chosen camera gets at least one image, the rest are spread at random.
    assignment = np.concatenate([cams, rng.choice(cams, size=n - len(cams))])
    for cam in sorted(int(c) for c in assignment):
      add(TRAIN_DIR, 'person', pid, cam, _TRAIN, identity)
    counts['train_images'] += n

  glo, ghi = params['gallery_images_per_camera']
  for pid in test_pids:
    identity = identities[pid - 1]
    cams = sorted(int(c) for c in rng.choice(
        num_cams, size=int(rng.integers(cam_lo, cam_hi + 1)), replace=False))
    for cam in cams:
      add(QUERY_DIR, 'person', pid, cam, _QUERY, identity)
      counts['query_images'] += 1
      for _ in range(int(rng.integers(glo, ghi + 1))):
        add(GALLERY_DIR, 'person', pid, cam, _GALLERY, identity)
        counts['gallery_images'] += 1

  for _ in range(params['num_distractors']):
    add(GALLERY_DIR, 'distractor', 0, int(rng.integers(num_cams)), _DISTRACTOR)
  for _ in range(params['num_junk']):
    add(GALLERY_DIR, 'junk', -1, int(rng.integers(num_cams)), _JUNK)
  counts['distractors'] = params['num_distractors']
  counts['junk'] = params['num_junk']
  counts['gallery_images'] += params['num_distractors'] + params['num_junk']
  counts['total_images'] = len(jobs)
  return jobs, counts


def _check_params(params: dict[str, Any]) -> None:
  """Raises ValueError for parameters that cannot give a valid Market-style dataset."""
  if params['num_train_ids'] < 1 or params['num_test_ids'] < 1:
    raise ValueError('Need at least one train and one test identity.')
  if params['num_train_ids'] + params['num_test_ids'] > 9999:
    raise ValueError('At most 9999 identities fit in 4-digit pids.')
  if not 2 <= params['num_cameras'] <= 9:
    raise ValueError('num_cameras must be in [2, 9] (one-digit camera ids).')
  lo, hi = params['cameras_per_id']
  if not 2 <= lo <= hi:
    raise ValueError('cameras_per_id must be (lo, hi) with 2 <= lo <= hi; every query '
                     'needs a gallery image from another camera.')
  if lo > params['num_cameras']:
    raise ValueError('cameras_per_id[0] exceeds num_cameras.')
  lo, hi = params['train_images_per_id']
  if not 2 <= lo <= hi:
    raise ValueError('train_images_per_id must be (lo, hi) with 2 <= lo <= hi.')
  lo, hi = params['gallery_images_per_camera']
  if not 1 <= lo <= hi:
    raise ValueError('gallery_images_per_camera must be (lo, hi) with 1 <= lo <= hi.')
  if params['num_distractors'] < 0 or params['num_junk'] < 0:
    raise ValueError('num_distractors and num_junk must be >= 0.')


def generate(out_dir: str,
             seed: int = 0,
             num_train_ids: int = 150,
             num_test_ids: int = 100,
             train_images_per_id: tuple[int, int] = (7, 11),
             gallery_images_per_camera: tuple[int, int] = (2, 4),
             cameras_per_id: tuple[int, int] = (2, 5),
             num_cameras: int = 6,
             num_distractors: int = 100,
             num_junk: int = 50,
             height: int = 128,
             width: int = 64,
             jpeg_quality: int = 90,
             num_workers: Optional[int] = None,
             force: bool = False,
             verbose: bool = False) -> dict[str, int]:
  """Writes a synthetic re-ID dataset in the Market-1501 layout.

  Skips the work when `out_dir/.complete` records the same parameters (and the same
  generator code); otherwise removes the three image folders and regenerates.

  Args:
    out_dir: dataset root (created if needed).
    seed: random seed; the same seed gives byte-identical files.
    num_train_ids: identities in bounding_box_train.
    num_test_ids: identities in query and bounding_box_test (disjoint from train).
    train_images_per_id: inclusive range of train images per identity.
    gallery_images_per_camera: inclusive range of gallery images per test identity
      per camera it appears in.
    cameras_per_id: inclusive range of cameras an identity appears in (>= 2).
    num_cameras: number of cameras (2..9).
    num_distractors: pid-0000 distractor images in bounding_box_test.
    num_junk: pid -1 junk images in bounding_box_test.
    height: image height.
    width: image width.
    jpeg_quality: JPEG quality of every file.
    num_workers: processes used to render; None: up to 4 by CPU count (serial for
      small sets); 0 or 1: serial. Does not change the output.
    force: regenerate even when complete.
    verbose: print progress to stderr.

  Returns:
    Counts: train_ids, train_images, query_ids, query_images, gallery_ids (test
    identities), gallery_images (all files of bounding_box_test, including
    distractors and junk), distractors, junk, total_images.
  """
  params = dict(seed=int(seed), num_train_ids=int(num_train_ids),
                num_test_ids=int(num_test_ids),
                train_images_per_id=[int(v) for v in train_images_per_id],
                gallery_images_per_camera=[int(v) for v in gallery_images_per_camera],
                cameras_per_id=[int(v) for v in cameras_per_id],
                num_cameras=int(num_cameras), num_distractors=int(num_distractors),
                num_junk=int(num_junk), height=int(height), width=int(width),
                jpeg_quality=int(jpeg_quality))
  _check_params(params)
  stamp = _params_key(params)
  complete = os.path.join(out_dir, COMPLETE_FILE)
  if not force and os.path.exists(complete):
    try:
      with open(complete) as f:
        previous = json.load(f)
    except (OSError, ValueError):
      previous = {}
    if previous.get('stamp') == stamp and 'counts' in previous:
      os.utime(complete)  # Newer than the generator, for make.
      if verbose:
        print(f'{out_dir}: complete, skipping.', file=sys.stderr)
      return previous['counts']

  start = time.time()
  if os.path.exists(complete):
    os.remove(complete)
  for sub in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
    shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    os.makedirs(os.path.join(out_dir, sub))
  jobs, counts = _plan(out_dir, params)

  if num_workers is None:  # Not worth starting processes for a handful of images.
    num_workers = min(4, os.cpu_count() or 1) if len(jobs) >= 200 else 0
  if num_workers <= 1:
    for job in jobs:
      _render_and_write(job)
  else:
    chunk = max(1, min(64, len(jobs) // (num_workers * 4)))
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
      for _ in pool.map(_render_chunk, chunks):
        pass

  tmp = complete + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({'stamp': stamp, 'counts': counts}, f, indent=1, sort_keys=True)
  os.replace(tmp, complete)
  if verbose:
    print(f'{out_dir}: wrote {counts["total_images"]} images in '
          f'{time.time() - start:.1f}s: {counts}', file=sys.stderr)
  return counts


def _parse_range(text: str) -> tuple[int, int]:
  """Parses 'LO,HI' (or a single 'N') into an inclusive range."""
  parts = [int(v) for v in text.split(',')]
  if len(parts) == 1:
    return parts[0], parts[0]
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f'Expected LO,HI, got {text!r}.')
  return parts[0], parts[1]


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command line entry point: `python -m input_pipeline.synthetic --out DIR`.

  Args:
    argv: arguments (default: sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='dataset root')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_train_ids', type=int, default=150)
  parser.add_argument('--num_test_ids', type=int, default=100)
  parser.add_argument('--train_images_per_id', type=_parse_range, default=(7, 11),
                      help='LO,HI inclusive')
  parser.add_argument('--gallery_images_per_camera', type=_parse_range, default=(2, 4),
                      help='LO,HI inclusive')
  parser.add_argument('--cameras_per_id', type=_parse_range, default=(2, 5),
                      help='LO,HI inclusive')
  parser.add_argument('--num_cameras', type=int, default=6)
  parser.add_argument('--num_distractors', type=int, default=100)
  parser.add_argument('--num_junk', type=int, default=50)
  parser.add_argument('--height', type=int, default=128)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--jpeg_quality', type=int, default=90)
  parser.add_argument('--num_workers', type=int, default=None)
  parser.add_argument('--force', action='store_true', help='regenerate even if complete')
  args = parser.parse_args(argv)
  counts = generate(
      args.out, seed=args.seed, num_train_ids=args.num_train_ids,
      num_test_ids=args.num_test_ids, train_images_per_id=args.train_images_per_id,
      gallery_images_per_camera=args.gallery_images_per_camera,
      cameras_per_id=args.cameras_per_id, num_cameras=args.num_cameras,
      num_distractors=args.num_distractors, num_junk=args.num_junk, height=args.height,
      width=args.width, jpeg_quality=args.jpeg_quality, num_workers=args.num_workers,
      force=args.force, verbose=True)
  print(json.dumps(counts, sort_keys=True))


if __name__ == '__main__':
  main()
