"""The dataset catalog: name -> reader (see `data_source` for what a config loads).

Every reader is called as `reader(root, *, verify=False, num_threads=8, ...)`
and returns a `ReIDDataset` (see `input_pipeline.reader_utils` for the conventions).
"""

from collections.abc import Mapping
from typing import Any

from input_pipeline import cuhk03
from input_pipeline import cuhk03_classic
from input_pipeline import market
from input_pipeline import msmt17
from input_pipeline import partial_reid
from input_pipeline import reader_utils
from input_pipeline import veri
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.records import ReIDDataset

DatasetError = reader_utils.DatasetError

DATASETS: Mapping[str, reader_utils.Reader] = {
    'market1501': market.read_market1501,
    'dukemtmcreid': market.read_dukemtmcreid,
    **cuhk03.READERS,  # 'cuhk03_labeled', 'cuhk03_detected'
    # The classic splits of the original release: 'cuhk03_classic_labeled' (split 0),
    # 'cuhk03_classic_labeled_split1' ... '_split19', and the same for 'detected'.
    **cuhk03_classic.READERS,
    'msmt17': msmt17.read_msmt17,
    'veri776': veri.read_veri776,
    **veri.VERIWILD_READERS,  # 'veriwild_small', 'veriwild_medium', 'veriwild_large'
    'partial_ilids': partial_reid.read_partial_ilids,
    'partial_reid': partial_reid.read_partial_reid,
    'folder': market.read_folder,
}

# name -> description (layout, source, published statistics).
SPECS: Mapping[str, DatasetSpec] = {
    'market1501': market.MARKET1501,
    'dukemtmcreid': market.DUKEMTMC,
    'cuhk03_labeled': cuhk03.SPECS['labeled'],
    'cuhk03_detected': cuhk03.SPECS['detected'],
    **{name: cuhk03_classic.SPECS[variant]
       for name, (variant, _) in cuhk03_classic.SPLITS.items()},
    'msmt17': msmt17.MSMT17,
    'veri776': veri.VERI776,
    'veriwild_small': veri.VERIWILD,
    'veriwild_medium': veri.VERIWILD,
    'veriwild_large': veri.VERIWILD,
    'partial_ilids': partial_reid.PARTIAL_ILIDS,
    'partial_reid': partial_reid.PARTIAL_REID,
    'folder': DatasetSpec(
        title='folder dataset',
        layout=('ROOT/\n  bounding_box_train/   PID_cCAM....jpg\n'
                '  query/\n  bounding_box_test/'),
        source='your own data (any Market-style folder tree)'),
}

# Datasets without a train split (evaluation only).
TEST_ONLY = frozenset({'partial_ilids', 'partial_reid'})


def get_reader(name: str) -> reader_utils.Reader:
  """Returns the reader of a catalog name.

  Args:
    name: a key of `DATASETS`.

  Returns:
    The reader function.

  Raises:
    DatasetError: unknown name (the message lists the known ones).
  """
  try:
    return DATASETS[name]
  except KeyError:
    shown = sorted(n for n in DATASETS if cuhk03_classic.SPLITS.get(n, ('', 0))[1] == 0)
    raise DatasetError(
        f'Unknown dataset {name!r}; known datasets: {", ".join(shown)} (and '
        f'cuhk03_classic_<variant>_split<k>, k = 1..{cuhk03_classic.NUM_SPLITS - 1}, '
        'the other classic CUHK03 splits).') from None


def load_dataset(name: str, root: str, /, **kwargs: Any) -> ReIDDataset:
  """Reads a catalog dataset from its folder.

  Args:
    name: a key of `DATASETS`.
    root: the dataset folder or its parent.
    **kwargs: passed to the reader (`verify`, `num_threads`, reader options
      such as `train_dir=` for 'folder' or `merge_val=` for 'msmt17').

  Returns:
    The dataset.

  Raises:
    DatasetError: unknown name, empty root or a bad dataset folder.
  """
  reader = get_reader(name)
  if not root:
    raise DatasetError(f'No root directory given for dataset {name!r}.')
  return reader(root, **kwargs)
