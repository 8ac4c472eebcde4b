"""Partial re-ID test sets: Partial-iLIDS and Partial-REID (fast-reid's layouts).

Both are test-only (the model is trained on another dataset, usually
Market-1501): query = partial-body images, gallery = whole-body images. The
file names carry only the pid (`001.jpg`; Partial-REID `001_01.jpg`, the
second number an image index), so every query gets camid 0 and every gallery
image camid 1 (the usual same-camera filter then removes nothing).
"""

import os
import re

from input_pipeline import reader_utils
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.dataset_stats import SplitStats
from input_pipeline.records import ReIDDataset

PID_PATTERN = r'^(\d+)'
QUERY_CAMID = 0
GALLERY_CAMID = 1

PARTIAL_ILIDS = DatasetSpec(
    title='Partial-iLIDS',
    layout="""
Partial_iLIDS/
  Probe/     001.jpg ...  (119 partial-body query images, one per id)
  Gallery/   001.jpg ...  (119 whole-body gallery images)
(fast-reid's PartialiLIDS/query and PartialiLIDS/gallery also work)
""",
    source=('the Partial-iLIDS release (He et al., "Deep Spatial Feature '
            'Reconstruction for Partial Person Re-identification", CVPR 2018; '
            'derived from i-LIDS), distributed with partial re-ID code'),
    published={
        'query': SplitStats(119, 119, 1),
        'gallery': SplitStats(119, 119, 1),
    })

PARTIAL_REID = DatasetSpec(
    title='Partial-REID',
    layout="""
Partial_REID/
  partial_body_images/   001_01.jpg ... 060_05.jpg  (300 query images)
  whole_body_images/     001_01.jpg ... 060_05.jpg  (300 gallery images)
""",
    source=('the Partial-REID release (Zheng et al., "Partial Person '
            'Re-identification", ICCV 2015)'),
    published={
        'query': SplitStats(60, 300, 1),
        'gallery': SplitStats(60, 300, 1),
    })


def parse_pids(paths: list[str], camid: int, *, spec: DatasetSpec,
               split: str, pattern: str = PID_PATTERN) -> list[reader_utils.Item]:
  """Parses the pid at the start of each file name; all get `camid`.

  Args:
    paths: image paths.
    camid: camera index given to every image.
    spec: the dataset's description (for error messages).
    split: split name for messages.
    pattern: regex on the file name, group 1 the pid.

  Returns:
    [(path, pid, camid)].

  Raises:
    reader_utils.DatasetError: names that do not start with a pid.
  """
  regex = re.compile(pattern)
  items, bad = [], []
  for path in paths:
    match = regex.search(os.path.basename(path))
    if match is None:
      bad.append(os.path.basename(path))
      continue
    items.append((path, int(match.group(1)), camid))
  reader_utils.raise_unparsed(spec, split, bad, len(paths),
                              f'pattern "{pattern}" (pid first)')
  return items


def _read_partial(root: str, *, name: str, spec: DatasetSpec,
                  layouts: list[tuple[str, str]], candidates: tuple[str, ...],
                  verify: bool, num_threads: int) -> ReIDDataset:
  """Reads a test-only query/gallery folder pair."""
  folder, index = reader_utils.find_root(root, spec, [list(l) for l in layouts],
                                         candidates)
  query_dir, gallery_dir = (os.path.join(folder, d) for d in layouts[index])
  query = parse_pids(reader_utils.list_images(query_dir, spec=spec, split='query'),
                     QUERY_CAMID, spec=spec, split='query')
  gallery = parse_pids(reader_utils.list_images(gallery_dir, spec=spec, split='gallery'),
                       GALLERY_CAMID, spec=spec, split='gallery')
  return reader_utils.build_dataset(name, spec, train=[], query=query, gallery=gallery,
                                    verify=verify, num_threads=num_threads,
                                    has_train=False)


def read_partial_ilids(root: str, *, verify: bool = False,
                       num_threads: int = 8) -> ReIDDataset:
  """Reads Partial-iLIDS (test only: empty train split).

  Args:
    root: `Partial_iLIDS` (or fast-reid's `PartialiLIDS`) or its parent.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'partial_ilids'.
  """
  return _read_partial(
      root, name='partial_ilids', spec=PARTIAL_ILIDS,
      layouts=[('Probe', 'Gallery'), ('query', 'gallery')],
      candidates=('', 'Partial_iLIDS', 'PartialiLIDS', 'Partial-iLIDS',
                  'partial_ilids'),
      verify=verify, num_threads=num_threads)


def read_partial_reid(root: str, *, verify: bool = False,
                      num_threads: int = 8) -> ReIDDataset:
  """Reads Partial-REID (test only: empty train split).

  Args:
    root: `Partial_REID` or its parent.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'partial_reid'.
  """
  return _read_partial(
      root, name='partial_reid', spec=PARTIAL_REID,
      layouts=[('partial_body_images', 'whole_body_images')],
      candidates=('', 'Partial_REID', 'Partial-REID', 'PartialREID',
                  'Partial-REID_Dataset', 'partial_reid'),
      verify=verify, num_threads=num_threads)
