"""Market-1501, DukeMTMC-reID and any folder tree named like Market.

All three use file names `PID_cCAM...` (e.g. `0002_c1s1_000451_03.jpg`):
pid -1 is junk (dropped), Market's pid 0 are distractors (kept in the gallery),
cameras are numbered from 1 in the name and from 0 in the records.
"""

import os
import re

from input_pipeline import reader_utils
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.dataset_stats import SplitStats
from input_pipeline.records import ReIDDataset

# torchreid's pattern for Market-1501 and DukeMTMC-reID (one camera digit).
MARKET_PATTERN = r'([-\d]+)_c(\d)'
# The generic reader's default: any number of camera digits.
FOLDER_PATTERN = r'([-\d]+)_c(\d+)'

MARKET1501 = DatasetSpec(
    title='Market-1501',
    layout="""
Market-1501-v15.09.15/
  bounding_box_train/   0002_c1s1_000451_03.jpg ...  (751 ids, 12,936 images)
  query/                0001_c1s1_001051_00.jpg ...  (3,368 images)
  bounding_box_test/    0000_c1s1_000151_01.jpg ...  (pid 0: distractors, -1: junk)
""",
    source=('the official Market-1501 page (Zheng et al., "Scalable Person '
            'Re-identification: A Benchmark", ICCV 2015)'),
    published={
        'train': SplitStats(751, 12936, 6),
        'query': SplitStats(750, 3368, 6),
        'gallery': SplitStats(751, 15913, 6),
    })

DUKEMTMC = DatasetSpec(
    title='DukeMTMC-reID',
    layout="""
DukeMTMC-reID/
  bounding_box_train/   0001_c2_f0046182.jpg ...  (702 ids, 16,522 images)
  query/                (2,228 images)
  bounding_box_test/    (17,661 images)
""",
    source=('an existing copy of DukeMTMC-reID (Zheng et al., ICCV 2017; the '
            'original DukeMTMC page has been withdrawn by its authors)'),
    published={
        'train': SplitStats(702, 16522, 8),
        'query': SplitStats(702, 2228, 8),
        'gallery': SplitStats(1110, 17661, 8),
    })

MARKET_SPLITS = ('bounding_box_train', 'query', 'bounding_box_test')


def read_market_style(root: str, *, name: str, spec: DatasetSpec,
                      candidates: tuple[str, ...] = ('',),
                      train_dir: str | None = 'bounding_box_train',
                      query_dir: str = 'query',
                      gallery_dir: str = 'bounding_box_test',
                      pattern: str = MARKET_PATTERN, cam_base: int = 1,
                      recursive: bool = False, verify: bool = False,
                      num_threads: int = 8) -> ReIDDataset:
  """Reads a dataset whose splits are folders of `PID_cCAM...` images.

  Args:
    root: the dataset folder or a parent of it.
    name: catalog name stored in the dataset.
    spec: the dataset's description.
    candidates: sub-folders of `root` where the dataset may sit ('' = root).
    train_dir: train sub-folder; None or '' for a test-only dataset.
    query_dir: query sub-folder.
    gallery_dir: gallery sub-folder.
    pattern: regex on the file name; group 1 pid, group 2 camera.
    cam_base: number of the first camera in the names.
    recursive: also read images in sub-folders of the split folders.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset.

  Raises:
    reader_utils.DatasetError: on a missing folder, an empty split, unparsable names
      or query ids absent from the gallery.
  """
  split_dirs = {'train': train_dir, 'query': query_dir, 'gallery': gallery_dir}
  required = [d for d in split_dirs.values() if d]
  folder, _ = reader_utils.find_root(root, spec, [required], candidates)
  items = {}
  for split, sub in split_dirs.items():
    if not sub:
      items[split] = []
      continue
    paths = reader_utils.list_images(os.path.join(folder, sub), spec=spec, split=split,
                                     recursive=recursive)
    items[split] = reader_utils.parse_names(paths, pattern, spec=spec, split=split,
                                            cam_base=cam_base)
  return reader_utils.build_dataset(name, spec, train=items['train'],
                                    query=items['query'], gallery=items['gallery'],
                                    verify=verify, num_threads=num_threads,
                                    has_train=bool(train_dir))


def read_market1501(root: str, *, verify: bool = False,
                    num_threads: int = 8) -> ReIDDataset:
  """Reads Market-1501 (torchreid's `Market1501`).

  Args:
    root: `Market-1501-v15.09.15` or its parent.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'market1501'.
  """
  return read_market_style(
      root, name='market1501', spec=MARKET1501,
      candidates=('', 'Market-1501-v15.09.15', 'Market-1501', 'market1501',
                  'Market1501'),
      verify=verify, num_threads=num_threads)


def read_dukemtmcreid(root: str, *, verify: bool = False,
                      num_threads: int = 8) -> ReIDDataset:
  """Reads DukeMTMC-reID (torchreid's `DukeMTMCreID`).

  Args:
    root: `DukeMTMC-reID` or a parent of it (torchreid's
      `dukemtmc-reid/DukeMTMC-reID` also works).
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'dukemtmcreid'.
  """
  return read_market_style(
      root, name='dukemtmcreid', spec=DUKEMTMC,
      candidates=('', 'DukeMTMC-reID', 'dukemtmc-reid/DukeMTMC-reID',
                  'dukemtmc-reid', 'dukemtmcreid'),
      verify=verify, num_threads=num_threads)


def read_folder(root: str, *, train_dir: str | None = 'bounding_box_train',
                query_dir: str = 'query', gallery_dir: str = 'bounding_box_test',
                pattern: str = FOLDER_PATTERN, cam_base: int = 1,
                recursive: bool = False, name: str = 'folder',
                verify: bool = False, num_threads: int = 8) -> ReIDDataset:
  """Reads any folder tree whose file names follow `PID_cCAM...`.

  The catalog's 'folder' dataset, and the multi-GPU variant's only reader (its
  `init_dataset`: DATA_PATH with TRAIN_PATH, QUERY_PATH, GALLERY_PATH and the
  pattern `FOLDER_PATTERN`); a run passes `config.data_dir` as `root` and
  `config.folder` as the split folders and pattern (see configs/default.py).

  Args:
    root: the folder holding the three split folders.
    train_dir: train sub-folder name; None or '' for a test-only set.
    query_dir: query sub-folder name (relative to `root`; '..' allowed).
    gallery_dir: gallery sub-folder name.
    pattern: regex searched in the file name; group 1 pid (-1: junk, dropped),
      group 2 camera.
    cam_base: number of the first camera in the names (1 for c1, 0 for c0).
    recursive: also read images in sub-folders of the split folders.
    name: name stored in the dataset.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset (no published statistics to compare with).
  """
  if re.compile(pattern).groups < 2:
    raise reader_utils.DatasetError(
        f'pattern {pattern!r} needs two groups: the pid and the camera.')
  tree = '\n'.join(f'  {d}/   PID_cCAM....jpg' for d in
                   (train_dir, query_dir, gallery_dir) if d)
  spec = DatasetSpec(
      title=f'folder dataset {name!r}',
      layout=f'ROOT/\n{tree}\n(file names matching "{pattern}")',
      source=('your own data (any Market-style folder tree): ROOT is config.data_dir, '
              'the folders and the pattern config.folder.*'))
  return read_market_style(
      root, name=name, spec=spec, train_dir=train_dir, query_dir=query_dir,
      gallery_dir=gallery_dir, pattern=pattern, cam_base=cam_base,
      recursive=recursive, verify=verify, num_threads=num_threads)
