"""The classic CUHK03 splits (Li et al., CVPR 2014) from the original `cuhk-03.mat`.

As torchreid's `CUHK03(cuhk03_classic_split=True)` (the BoT baseline's
`data/datasets/cuhk03.py`): the release (MATLAB v7.3, i.e. HDF5) holds, for the
'labeled' (hand-drawn) and 'detected' (DPM) boxes, 5 camera pairs of M x 10 cells
(images 1-5 from the pair's first camera, 6-10 from its second; some empty) and
'testsets', 20 tables of 100 (camera pair, person) test identities. Split k trains on
the 1,367 other identities and tests on its 100: every test image is both a query and
a gallery image, scored with the CUHK03 single-gallery-shot protocol (the query's own
camera is excluded), which `reid_jax.evaluation.resolve_protocol` picks under 'auto' for
`PROTOCOL_NAMES`.

On first use the images of a variant are written once as PNG files
(`images_<variant>/<pair>_<person:03d>_<view>_<image:02d>.png`, the reference's names,
all 1-based) and the identities and test sets as `cuhk03_classic_<variant>.json`, both
next to `cuhk03_release/`; later reads need only those. Pids and camids are the
reference's: train pids 0..1366 and test pids 0..99, each in (pair, person) order;
camid 0 or 1, the view.
"""

import concurrent.futures
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from input_pipeline import cuhk03
from input_pipeline import reader_utils
from input_pipeline.choices import check_choice
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.dataset_stats import SplitStats
from input_pipeline.records import ReIDDataset

VARIANTS = cuhk03.VARIANTS  # the release's two kinds of boxes, as CUHK03-NP's
NUM_SPLITS = 20  # the release's 'testsets'
MAT_PATH = os.path.join('cuhk03_release', 'cuhk-03.mat')
# The published sizes: 1,467 identities in 5 camera pairs, 100 test identities a split.
PAIR_IDS = (843, 440, 77, 58, 49)
NUM_TEST_IDS = 100
NUM_TRAIN_IDS = sum(PAIR_IDS) - NUM_TEST_IDS
# Images of each variant in the release: the totals of CUHK03-NP's published splits,
# which hold every image (labeled 7,368 + 1,400 + 5,328; detected 7,365 + 1,400 + 5,332).
RELEASE_IMAGES = {'labeled': 14096, 'detected': 14097}
_FORMAT = 'reid_jax cuhk03 classic v1'
_WRITABLE = ('the images are extracted once next to cuhk03_release/: use a writable '
             'copy of the dataset folder.')
# PNG files being encoded at once during the extraction.
_WRITES_IN_FLIGHT = 256



def image_dir_name(variant: str) -> str:
  """The folder (in the release's folder) of the extracted images of `variant`."""
  return f'images_{variant}'


def index_file_name(variant: str) -> str:
  """The index file (in the release's folder) that `extract` writes for `variant`."""
  return f'cuhk03_classic_{variant}.json'


def catalog_name(variant: str, split: int = 0) -> str:
  """The catalog name of a classic split: split 0 has none, e.g. 'cuhk03_classic_labeled'.

  Args:
    variant: one of VARIANTS.
    split: 0..NUM_SPLITS-1.

  Returns:
    'cuhk03_classic_<variant>' for split 0, 'cuhk03_classic_<variant>_split<k>' else.
  """
  return f'cuhk03_classic_{variant}' + (f'_split{split}' if split else '')


# name -> (variant, split index), every classic split of both variants.
SPLITS: Mapping[str, tuple[str, int]] = {
    catalog_name(v, k): (v, k) for v in VARIANTS for k in range(NUM_SPLITS)}
# The datasets `config.test.protocol='auto'` scores with the CUHK03 protocol.
PROTOCOL_NAMES = frozenset(SPLITS)

_LAYOUT = """
cuhk03/
  cuhk03_release/
    cuhk-03.mat        the original release (MATLAB v7.3): 'labeled', 'detected'
                       (5 camera pairs of 843/440/77/58/49 x 10 images), 'testsets'
                       (20 x 100 (pair, person) test identities)
  images_labeled/      written on first use: 1_001_1_01.png ...
  images_detected/
  cuhk03_classic_labeled.json    written on first use: identities, test sets
  cuhk03_classic_detected.json
"""
_SOURCE = ('the CUHK03 release (Li et al., "DeepReID", CVPR 2014: the archive '
           '`cuhk03_release.zip` from the authors\' page, holding cuhk-03.mat)')

SPECS = {
    variant: DatasetSpec(title=f'CUHK03 classic splits ({variant})',
                         layout=_LAYOUT, source=_SOURCE)
    for variant in VARIANTS}


def published_stats(variant: str, num_test_images: int) -> dict[str, SplitStats]:
  """The published statistics of a classic split.

  Train and test identities and the 2 views are fixed; the test images of a split
  depend on its identities, so the train images are what the release's total leaves.

  Args:
    variant: one of VARIANTS.
    num_test_images: images of the split's test identities.

  Returns:
    split name -> statistics, for `dataset_stats.compare_with_published`.
  """
  test = SplitStats(NUM_TEST_IDS, num_test_images, 2)
  return {'train': SplitStats(NUM_TRAIN_IDS,
                              RELEASE_IMAGES[variant] - num_test_images, 2),
          'query': test, 'gallery': test}


# One identity: (camera pair, person, image file names), all 1-based as the release.
Identity = tuple[int, int, list[str]]


def image_name(pair: int, person: int, image: int) -> str:
  """The reference's file name of an image (1-based pair, person and image numbers)."""
  view = 1 if image <= 5 else 2
  return f'{pair:01d}_{person:03d}_{view:01d}_{image:02d}.png'


def _write_png(path: str, pixels: np.ndarray) -> None:
  """Writes an image atomically (several processes may extract at once)."""
  tmp = f'{path}.tmp{os.getpid()}'
  Image.fromarray(pixels, 'RGB').save(tmp, format='PNG')
  os.replace(tmp, path)


def _wait(writes: list[concurrent.futures.Future], image_dir: str) -> None:
  """Waits for the pending PNG writes (and empties the list)."""
  try:
    for write in writes:
      write.result()
  except OSError as e:
    raise reader_utils.DatasetError(
        f'CUHK03: cannot write the images to {image_dir!r} ({e}); {_WRITABLE}') from e
  writes.clear()


def _mat_error(mat_path: str, what: str) -> reader_utils.DatasetError:
  return reader_utils.DatasetError(
      f'{mat_path}: {what}; expected the CUHK03 release (MATLAB v7.3).\n'
      f'{reader_utils.layout_help(SPECS[VARIANTS[0]])}')


def extract(folder: str, variant: str, num_threads: int = 8
            ) -> tuple[list[Identity], list[list[tuple[int, int]]]]:
  """Reads a variant from `cuhk-03.mat` and writes its PNG files and JSON index.

  The reference's `_preprocess`: an identity with no image is an error; image files
  that exist already are kept.

  Args:
    folder: the dataset folder (holding `cuhk03_release/cuhk-03.mat`).
    variant: one of VARIANTS.
    num_threads: threads encoding the PNG files.

  Returns:
    (identities in (pair, person) order, test sets as lists of (pair, person)).

  Raises:
    reader_utils.DatasetError: a file that is not the release, or a folder not writable.
  """
  import h5py  # pylint: disable=g-import-not-at-top  (only for the one extraction)
  mat_path = os.path.join(folder, MAT_PATH)
  image_dir = os.path.join(folder, image_dir_name(variant))
  logging.info('CUHK03: extracting the %s images of %s to %s (once).', variant,
               mat_path, image_dir)
  try:
    os.makedirs(image_dir, exist_ok=True)
  except OSError as e:
    raise reader_utils.DatasetError(
        f'CUHK03: cannot create {image_dir!r} ({e}); {_WRITABLE}') from e
  try:
    mat = h5py.File(mat_path, 'r')
  except OSError as e:
    raise _mat_error(mat_path, f'not an HDF5 file ({e})') from e
  with mat, concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    missing = [k for k in (variant, 'testsets') if k not in mat]
    if missing:
      raise _mat_error(mat_path, f'no {", ".join(repr(k) for k in missing)} entry '
                       f'(found {sorted(mat.keys())})')

    def deref(ref: Any) -> np.ndarray:
      return mat[ref][()].T  # MATLAB arrays are stored transposed

    identities: list[Identity] = []
    writes = []
    for pair, pair_ref in enumerate(np.ravel(mat[variant][()]), 1):
      cells = deref(pair_ref)
      if cells.ndim != 2 or cells.dtype != object:
        raise _mat_error(mat_path, f'{variant} camera pair {pair} is not a cell array '
                         f'of persons x images (shape {cells.shape})')
      for person, row in enumerate(cells, 1):
        names = []
        for image, ref in enumerate(row, 1):
          pixels = deref(ref)
          if pixels.size == 0 or pixels.ndim < 3:
            continue  # an empty cell
          if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise _mat_error(mat_path, f'{variant} pair {pair} person {person} image '
                             f'{image} is {pixels.dtype} {pixels.shape}, not uint8 H x W x 3')
          names.append(image_name(pair, person, image))
          path = os.path.join(image_dir, names[-1])
          if not os.path.isfile(path):
            writes.append(pool.submit(_write_png, path, np.ascontiguousarray(pixels)))
            if len(writes) >= _WRITES_IN_FLIGHT:  # bounds the images held in memory
              _wait(writes, image_dir)
        if not names:
          raise _mat_error(mat_path, f'{variant} camera pair {pair} person {person} has '
                           'no image')
        identities.append((pair, person, names))
      logging.info('CUHK03 %s: camera pair %d, %d identities.', variant, pair, len(cells))
    testsets = []
    for number, ref in enumerate(np.ravel(mat['testsets'][()]), 1):
      table = deref(ref)
      if table.ndim != 2 or table.shape[1] != 2:
        raise _mat_error(mat_path, f'test set {number} has shape {table.shape}, not '
                         '(identities, 2) (pair, person)')
      testsets.append([(int(p), int(q)) for p, q in table])
    _wait(writes, image_dir)
  index = {'format': _FORMAT, 'variant': variant,
           'identities': [[p, q, names] for p, q, names in identities],
           'testsets': [[list(row) for row in t] for t in testsets]}
  index_path = os.path.join(folder, index_file_name(variant))
  tmp = f'{index_path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(index, f)
    os.replace(tmp, index_path)
  except OSError as e:
    raise reader_utils.DatasetError(
        f'CUHK03: cannot write {index_path!r} ({e}); {_WRITABLE}') from e
  return identities, testsets


def _read_index(path: str, variant: str
                ) -> tuple[list[Identity], list[list[tuple[int, int]]]]:
  """Reads the JSON index `extract` wrote."""
  try:
    with open(path, encoding='utf-8') as f:
      index = json.load(f)
    if index.get('format') != _FORMAT or index.get('variant') != variant:
      raise ValueError(f'format {index.get("format")!r}, variant {index.get("variant")!r}')
    identities = [(int(p), int(q), [str(n) for n in names])
                  for p, q, names in index['identities']]
    testsets = [[(int(p), int(q)) for p, q in t] for t in index['testsets']]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise reader_utils.DatasetError(
        f'CUHK03: {path} is not an index written by this reader ({e}); delete it to '
        f'extract {MAT_PATH} again.') from e
  return identities, testsets


def classic_split(identities: Sequence[Identity], test_set: Sequence[tuple[int, int]],
                  image_dir: str) -> tuple[list[reader_utils.Item], list[reader_utils.Item]]:
  """The train and test images of a split (the reference's `_extract_classic_split`).

  Args:
    identities: (pair, person, image names) in (pair, person) order.
    test_set: the (pair, person) test identities.
    image_dir: the folder of the images.

  Returns:
    (train, test) as (path, pid, camid): pids count the train and the test identities
    from 0 in the order of `identities`; camid is the view minus 1.
  """
  test_ids = set(test_set)
  train: list[reader_utils.Item] = []
  test: list[reader_utils.Item] = []
  counts = {'train': 0, 'test': 0}
  for pair, person, names in identities:
    part = 'test' if (pair, person) in test_ids else 'train'
    items = test if part == 'test' else train
    for name in names:
      items.append((os.path.join(image_dir, name), counts[part],
                    int(name.split('_')[2]) - 1))
    counts[part] += 1
  return train, test


def read_cuhk03_classic(root: str, *, variant: str = 'labeled', split: int = 0,
                        verify: bool = False, num_threads: int = 8) -> ReIDDataset:
  """Reads a classic CUHK03 split, extracting the release on first use.

  Args:
    root: the `cuhk03` folder (holding `cuhk03_release/cuhk-03.mat`) or its parent.
    variant: 'labeled' (hand-drawn boxes) or 'detected' (DPM boxes).
    split: the test set, 0..19.
    verify: drop images that cannot be decoded.
    num_threads: threads for the extraction and the image check.

  Returns:
    The dataset named `catalog_name(variant, split)`; its query and gallery are the
    same images (the test identities').

  Raises:
    reader_utils.DatasetError: an unknown variant or split, a missing or malformed release, or
      missing extracted images.
  """
  check_choice('CUHK03 classic variant', variant, VARIANTS, reader_utils.DatasetError)
  spec = SPECS[variant]
  index_name = index_file_name(variant)
  folder, _ = reader_utils.find_root(root, spec, [[MAT_PATH], [index_name]],
                                     candidates=('', 'cuhk03', 'CUHK03'))
  index_path = os.path.join(folder, index_name)
  if os.path.isfile(index_path):
    identities, testsets = _read_index(index_path, variant)
  else:  # the release is there (the layout find_root matched)
    identities, testsets = extract(folder, variant, num_threads)
  if not 0 <= split < len(testsets):
    raise reader_utils.DatasetError(
        f'CUHK03 classic split must be in 0..{len(testsets) - 1} (the release has '
        f'{len(testsets)} test sets), got {split}.')
  image_dir = os.path.join(folder, image_dir_name(variant))
  train, test = classic_split(identities, testsets[split], image_dir)
  for part, items in (('train', train), ('test', test)):
    reader_utils.check_files_exist(items, spec=spec, split=part)
  name = catalog_name(variant, split)
  spec = DatasetSpec(spec.title, spec.layout, spec.source,
                     published_stats(variant, len(test)))
  return reader_utils.build_dataset(name, spec, train=train, query=test, gallery=test,
                                    verify=verify, num_threads=num_threads)


# name -> reader, for the catalog.
READERS: Mapping[str, reader_utils.Reader] = {
    name: functools.partial(read_cuhk03_classic, variant=variant, split=split)
    for name, (variant, split) in SPLITS.items()}
