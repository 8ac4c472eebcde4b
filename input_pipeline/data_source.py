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

Test sets: `config.test_datasets` lists them as `'[label=]dataset[:data_dir]'` strings
(`parse_test_datasets`); each is evaluated and logged under its label (default: the
dataset name). Empty: the legacy `test_dataset` / `test_data_dir` pair as a one-entry
list, or else the training dataset itself.
"""

import dataclasses
import re
from typing import Any, Optional

from input_pipeline import catalog
from input_pipeline import decode
from input_pipeline import reader_utils
from input_pipeline.choices import check_choice
from input_pipeline.records import ReIDDataset

DATA_FORMATS = ('folder', 'tfds')


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A dataset and how to read its images.

  Attributes:
    dataset: the records (train, query, gallery).
    load_train_image: `decode.LoadImageFn` for `dataset.train` (called with the
      record's path and its index in `dataset.train`), or None to read the paths.
    load_test_image: the same for `list(dataset.query) + list(dataset.gallery)`.
    label: the name a test set's results are logged and saved under (see
      `TestSetSpec`); empty for a training source.
  """
  dataset: ReIDDataset
  load_train_image: Optional[decode.LoadImageFn] = None
  load_test_image: Optional[decode.LoadImageFn] = None
  label: str = ''


# Test-set labels name files and TensorBoard tags.
_LABEL = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*')


@dataclasses.dataclass(frozen=True)
class TestSetSpec:
  """One entry of `config.test_datasets`.

  Attributes:
    label: the name results are logged under (unique among the test sets).
    dataset: a catalog name (`catalog.DATASETS`).
    data_dir: its folder ('' : the training data dir when `dataset` is the training
      dataset; TFDS data needs none once prepared).
  """
  __test__ = False  # not a pytest test class
  label: str
  dataset: str
  data_dir: str = ''


def parse_test_datasets(config: Any) -> tuple[TestSetSpec, ...]:
  """The test sets a config names, in order (the first one's mAP ranks checkpoints).

  `config.test_datasets` entries are `'[label=]dataset[:data_dir]'`, e.g.
  `'market1501:/data/market'` or `'duke=dukemtmcreid:/data/duke'`. When it is empty, the
  legacy `config.test_dataset` / `config.test_data_dir` give a one-entry list, and
  without those the training dataset is the test set.

  Args:
    config: the run's config (test_datasets, test_dataset, test_data_dir, dataset,
      data_dir).

  Returns:
    The specs, labels unique.

  Raises:
    reader_utils.DatasetError: a malformed entry, unknown dataset, bad or repeated label, or
      both `test_datasets` and the legacy `test_dataset` set.
  """
  entries = config.test_datasets
  if isinstance(entries, str):
    raise reader_utils.DatasetError(
        f'config.test_datasets must be a tuple of strings, got the string {entries!r}; '
        f'write ({entries!r},).')
  entries = tuple(entries)
  legacy = config.test_dataset
  if entries and legacy:
    raise reader_utils.DatasetError(
        f'config.test_datasets={entries} and the legacy config.test_dataset={legacy!r} '
        'are both set; list every test set in test_datasets only.')
  if not entries:
    if legacy:
      entries = (f'{legacy}:{config.test_data_dir}',)
    else:
      entries = (f'{config.dataset}:{config.data_dir}',)
  specs = []
  for entry in entries:
    if not isinstance(entry, str) or not entry:
      raise reader_utils.DatasetError(
          f'config.test_datasets entries must be non-empty strings '
          f"'[label=]dataset[:data_dir]', got {entry!r}.")
    head, _, data_dir = entry.partition(':')
    label, _, name = head.rpartition('=')
    catalog.get_reader(name)
    label = label or name
    if not _LABEL.fullmatch(label):
      raise reader_utils.DatasetError(
          f'Test set label {label!r} (in {entry!r}) must be letters, digits, _ . or - '
          'and not start with . or -.')
    specs.append(TestSetSpec(label, name, data_dir))
  labels = [s.label for s in specs]
  repeated = sorted({l for l in labels if labels.count(l) > 1})
  if repeated:
    raise reader_utils.DatasetError(
        f'Test set labels must be unique, {repeated} appear more than once in '
        f"config.test_datasets; name them 'label=dataset:data_dir'.")
  return tuple(specs)


def _read_tfds(name: str, root: str, tfds_data_dir: Optional[str]) -> DataSource:
  """A TFDS-prepared dataset: records and image bytes from one read of each split."""
  from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top
  dataset, images = tfds_builders.read_tfds_dataset_and_images(
      name, data_dir=tfds_data_dir, manual_dir=root or None)
  load_train = (decode.in_memory_loader(images['train']) if images['train'] else None)
  return DataSource(dataset, load_train,
                    decode.in_memory_loader(images['query'] + images['gallery']))


def load_train_test(config: Any) -> tuple[DataSource, list[DataSource]]:
  """Loads the training dataset and the test sets (see `parse_test_datasets`).

  Config fields: `dataset`, `data_dir`, `test_datasets` (or the legacy `test_dataset` /
  `test_data_dir`), `data_format` (one of DATA_FORMATS), `tfds_data_dir`,
  `verify_images` and `folder` (the generic 'folder' reader; folder format only).

  Args:
    config: an ml_collections.ConfigDict as `configs/default.py`.

  Returns:
    (train, tests): use `train.dataset.train` for training and, for each test source,
    `.dataset.query` / `.gallery` for evaluation and `.label` as its name. A test set
    that is the training dataset (same name and folder) shares its records.

  Raises:
    reader_utils.DatasetError: unknown names or format, a test-only training dataset, a
      missing test data dir, a bad `test_datasets` entry, or any reader error.
  """
  data_format = config.data_format
  check_choice('config.data_format', data_format, DATA_FORMATS, reader_utils.DatasetError)
  tfds_data_dir = config.tfds_data_dir or None

  def load(name: str, root: str) -> DataSource:
    if data_format == 'tfds':
      return _read_tfds(name, root, tfds_data_dir)
    options = {}
    if name == 'folder':  # the generic reader's config.folder
      folder = config.folder
      options = {'train_dir': folder.train_dir, 'query_dir': folder.query_dir,
                 'gallery_dir': folder.gallery_dir, 'pattern': folder.pattern}
    return DataSource(catalog.load_dataset(name, root, verify=bool(config.verify_images),
                                           **options))

  # Check the names and directories before reading anything.
  train_name = config.dataset
  catalog.get_reader(train_name)
  if train_name in catalog.TEST_ONLY:
    raise reader_utils.DatasetError(
        f'config.dataset={train_name!r} is a test-only dataset (no train split); train '
        f"on another dataset and set config.test_datasets=('{train_name}:DIR',).")
  specs = []
  for spec in parse_test_datasets(config):
    test_dir = spec.data_dir
    if not test_dir:
      if spec.dataset == train_name:
        test_dir = config.data_dir
      elif data_format == 'folder':
        where = ('config.test_data_dir' if config.test_dataset else
                 f"its folder in config.test_datasets ('{spec.dataset}:DIR')")
        raise reader_utils.DatasetError(
            f'Test set {spec.label!r} ({spec.dataset!r}) needs {where}.')
    specs.append(dataclasses.replace(spec, data_dir=test_dir))
  train = load(train_name, config.data_dir)
  if not train.dataset.train:
    raise reader_utils.DatasetError(f'Dataset {train_name!r} has no training images.')
  loaded: dict[tuple[str, str], DataSource] = {(train_name, config.data_dir): train}
  tests = []
  for spec in specs:
    key = (spec.dataset, spec.data_dir)
    if key not in loaded:
      loaded[key] = load(spec.dataset, spec.data_dir)
    tests.append(dataclasses.replace(loaded[key], label=spec.label))
  return train, tests
