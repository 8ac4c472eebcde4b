"""Where a run's images come from: the one place that decides it.

`load_train_test(config)` reads the datasets a config names and returns, for training
and for testing, a `DataSource`: the records and how to load an image of them.

* `config.data_format='folder'`: the catalog readers parse the original folder tree;
  images are read from the record paths (`load_*_image` is None).
* `config.data_format='tfds'`: the TFRecord shards of our TFDS builders
  (`input_pipeline.tfds_builders`, prepared from the folder given as data dir when
  they are not prepared yet) are read ONCE per split: the records and the encoded
  image bytes in the same pass, and images are decoded from those bytes in memory.

Both paths give the same records (same order, pids, camids), so everything after
this layer (sampler, tf.data pipeline, evaluation) is the same.
"""

import dataclasses
from typing import Any, Optional

from input_pipeline import base
from input_pipeline import catalog
from input_pipeline import pipeline
from input_pipeline.records import ReIDDataset

DATA_FORMATS = ('folder', 'tfds')


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A dataset and how to read its images.

  Attributes:
    dataset: the records (train, query, gallery).
    load_train_image: `pipeline.LoadImageFn` for `dataset.train` (called with the
      record's path and its index in `dataset.train`), or None to read the paths.
    load_test_image: the same for `list(dataset.query) + list(dataset.gallery)`.
  """
  dataset: ReIDDataset
  load_train_image: Optional[pipeline.LoadImageFn] = None
  load_test_image: Optional[pipeline.LoadImageFn] = None


def _read_tfds(name: str, root: str, tfds_data_dir: Optional[str]) -> DataSource:
  """A TFDS-prepared dataset: records and image bytes from one read of each split."""
  from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top
  dataset, images = tfds_builders.read_tfds_dataset_and_images(
      name, data_dir=tfds_data_dir, manual_dir=root or None)
  load_train = (pipeline.in_memory_loader(images['train']) if images['train'] else None)
  return DataSource(dataset, load_train,
                    pipeline.in_memory_loader(images['query'] + images['gallery']))


def load_train_test(config: Any) -> tuple[DataSource, DataSource]:
  """Loads the training dataset and the (possibly different) test dataset.

  Config fields: `dataset`, `data_dir`, `test_dataset` (empty: test on the training
  dataset), `test_data_dir`, `data_format` (one of DATA_FORMATS), `tfds_data_dir`,
  `verify_images` (folder format only).

  Args:
    config: an ml_collections.ConfigDict as `configs/default.py`.

  Returns:
    (train, test): use `train.dataset.train` for training and `test.dataset.query` /
    `.gallery` for evaluation. Without a different test dataset both are the same
    object.

  Raises:
    base.DatasetError: unknown names or format, a test-only training dataset, a
      missing test data dir, or any reader error.
  """
  data_format = config.data_format
  if data_format not in DATA_FORMATS:
    raise base.DatasetError(f'config.data_format must be one of {DATA_FORMATS}, '
                            f'got {data_format!r}.')
  tfds_data_dir = config.tfds_data_dir or None

  def load(name: str, root: str) -> DataSource:
    if data_format == 'tfds':
      return _read_tfds(name, root, tfds_data_dir)
    return DataSource(catalog.load_dataset(name, root, verify=bool(config.verify_images)))

  # Check the names and directories before reading anything.
  train_name = config.dataset
  catalog.get_reader(train_name)
  if train_name in catalog.TEST_ONLY:
    raise base.DatasetError(
        f'config.dataset={train_name!r} is a test-only dataset (no train split); train '
        f'on another dataset and set config.test_dataset={train_name!r}.')
  test_name = config.test_dataset or ''
  test_dir = config.test_data_dir or ''
  if test_name:
    catalog.get_reader(test_name)
    if not test_dir:
      if test_name == train_name:
        test_dir = config.data_dir
      elif data_format == 'folder':
        raise base.DatasetError(
            f'config.test_dataset={test_name!r} needs config.test_data_dir (the folder '
            f'of {test_name!r}).')
  train = load(train_name, config.data_dir)
  if not train.dataset.train:
    raise base.DatasetError(f'Dataset {train_name!r} has no training images.')
  if not test_name or (test_name == train_name and test_dir == config.data_dir):
    return train, train
  return train, load(test_name, test_dir)
