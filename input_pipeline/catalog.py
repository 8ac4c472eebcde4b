"""The dataset catalog: name -> reader, and loading the datasets a config names.

Every reader is called as `reader(root, *, verify=False, num_threads=8, ...)`
and returns a `ReIDDataset` (see `input_pipeline.base` for the conventions).
"""

from collections.abc import Mapping
from typing import Any

from input_pipeline import base
from input_pipeline import cuhk03
from input_pipeline import market
from input_pipeline import msmt17
from input_pipeline import partial
from input_pipeline import veri
from input_pipeline.records import ReIDDataset

DatasetError = base.DatasetError

DATASETS: Mapping[str, base.Reader] = {
    'market1501': market.read_market1501,
    'dukemtmcreid': market.read_dukemtmcreid,
    'cuhk03_labeled': cuhk03.read_cuhk03_labeled,
    'cuhk03_detected': cuhk03.read_cuhk03_detected,
    'msmt17': msmt17.read_msmt17,
    'veri776': veri.read_veri776,
    'veriwild_small': veri.read_veriwild_small,
    'veriwild_medium': veri.read_veriwild_medium,
    'veriwild_large': veri.read_veriwild_large,
    'partial_ilids': partial.read_partial_ilids,
    'partial_reid': partial.read_partial_reid,
    'folder': market.read_folder,
}

# name -> description (layout, source, published statistics).
SPECS: Mapping[str, base.DatasetSpec] = {
    'market1501': market.MARKET1501,
    'dukemtmcreid': market.DUKEMTMC,
    'cuhk03_labeled': cuhk03.SPECS['labeled'],
    'cuhk03_detected': cuhk03.SPECS['detected'],
    'msmt17': msmt17.MSMT17,
    'veri776': veri.VERI776,
    'veriwild_small': veri.VERIWILD,
    'veriwild_medium': veri.VERIWILD,
    'veriwild_large': veri.VERIWILD,
    'partial_ilids': partial.PARTIAL_ILIDS,
    'partial_reid': partial.PARTIAL_REID,
    'folder': base.DatasetSpec(
        title='folder dataset',
        layout=('ROOT/\n  bounding_box_train/   PID_cCAM....jpg\n'
                '  query/\n  bounding_box_test/'),
        source='your own data (any Market-style folder tree)'),
}

# Datasets without a train split (evaluation only).
TEST_ONLY = frozenset({'partial_ilids', 'partial_reid'})
DATA_FORMATS = ('folder', 'tfds')


def get_reader(name: str) -> base.Reader:
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
    raise DatasetError(
        f'Unknown dataset {name!r}; known datasets: '
        f'{", ".join(sorted(DATASETS))}.') from None


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


def load_train_test(config: Any) -> tuple[ReIDDataset, ReIDDataset]:
  """Loads the training dataset and the (possibly different) test dataset.

  Config fields: `dataset`, `data_dir`, `test_dataset` (empty: test on the
  training dataset), `test_data_dir`, `data_format` ('folder': read the
  original folder trees; 'tfds': read our TFDS builders' data under
  `tfds_data_dir`, preparing it from the folder given as data dir when it is
  not prepared yet) and, optionally, `verify_images` (folder format only).

  Args:
    config: an ml_collections.ConfigDict as `configs/default.py`.

  Returns:
    (train_dataset, test_dataset): use `train_dataset.train` for training and
    `test_dataset.query` / `.gallery` for evaluation. Without a
    `test_dataset` both are the same object.

  Raises:
    DatasetError: unknown names or format, a test-only training dataset, a
      missing test data dir, or any reader error.
  """
  data_format = config.get('data_format', 'folder') or 'folder'
  if data_format not in DATA_FORMATS:
    raise DatasetError(f'config.data_format must be one of {DATA_FORMATS}, '
                       f'got {data_format!r}.')
  verify = bool(config.get('verify_images', False))
  tfds_data_dir = config.get('tfds_data_dir', '') or None

  def load(name: str, root: str) -> ReIDDataset:
    if data_format == 'folder':
      return load_dataset(name, root, verify=verify)
    from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top
    return tfds_builders.read_tfds_dataset(name, data_dir=tfds_data_dir,
                                           manual_dir=root or None)

  # Check the names and directories before reading anything.
  train_name = config.dataset
  get_reader(train_name)
  if train_name in TEST_ONLY:
    raise DatasetError(
        f'config.dataset={train_name!r} is a test-only dataset (no train '
        f'split); train on another dataset and set '
        f'config.test_dataset={train_name!r}.')
  test_name = config.get('test_dataset', '') or ''
  test_dir = config.get('test_data_dir', '') or ''
  if test_name:
    get_reader(test_name)
    if not test_dir:
      if test_name == train_name:
        test_dir = config.data_dir
      elif data_format == 'folder':
        raise DatasetError(
            f'config.test_dataset={test_name!r} needs config.test_data_dir '
            f'(the folder of {test_name!r}).')
  train = load(train_name, config.data_dir)
  if not train.train:
    raise DatasetError(f'Dataset {train_name!r} has no training images.')
  if not test_name or (test_name == train_name and test_dir == config.data_dir):
    return train, train
  return train, load(test_name, test_dir)
