"""TFDS builders for the catalog datasets (manual download), and readers of their data.

One `tfds.core.GeneratorBasedBuilder` class per catalog entry, made on first
use by `builder_class(name)` (TFDS name `reid_<name>`, e.g. `reid_market1501`;
kept out of TFDS's global registry, so `tfds.load('reid_market1501')` does not
know it: use the functions here). Nothing is ever downloaded: the dataset
folder (as the folder readers expect it) is the manual dir, parsed by the
catalog reader (images are checked with `verify_images`; undecodable ones are
left out).

Each split (`train`, `query`, `gallery`; test-only sets have no `train`) holds
examples with the features

  image:  the original encoded file bytes (JPEG; PNG for CUHK03-NP),
  pid:    int64, train pids relabelled to 0..C-1, query/gallery original ids,
  camid:  int64, from 0,
  path:   text, the file's path relative to the dataset folder,
  index:  int64, the example's position in the folder reader's (sorted) split.

What the pipeline gets:

* `read_tfds_dataset(name, data_dir, manual_dir)` -> `ReIDDataset` whose
  records are in `index` order (so `records[i]` is the example with index i)
  and equal the folder reader's records (path: `manual_dir/path` when a
  manual dir is given, else the relative path);
* `read_tfds_dataset_and_images(name, data_dir, manual_dir)` -> the same
  dataset and every split's encoded images in record order, each split read
  once (what `input_pipeline.data_source` uses for `data_format='tfds'`);
* `read_tfds_arrays(name, split, data_dir)` -> numpy arrays `index`, `pid`,
  `camid`, `path` in `index` order (e.g. for the PK sampler);
* `as_tf_dataset(name, split, data_dir)` -> `tf.data.Dataset` of dicts
  {'image': encoded bytes (tf.string), 'pid', 'camid', 'path', 'index'} in
  storage order (not index order; use 'index' to match records), to decode
  in a tf.data pipeline.

TensorFlow / TFDS are imported only inside functions.
"""

import functools
import os
from typing import Any

import numpy as np

from input_pipeline import catalog
from input_pipeline import reader_utils
from input_pipeline.records import Record
from input_pipeline.records import ReIDDataset
from input_pipeline.records import SPLITS

VERSION = '1.0.0'
BUILDER_PREFIX = 'reid_'
_META_KEYS = ('index', 'pid', 'camid', 'path')


def builder_name(name: str) -> str:
  """Returns the TFDS name of a catalog dataset, e.g. 'reid_market1501'."""
  return BUILDER_PREFIX + name


def _camel(name: str) -> str:
  return 'Reid' + ''.join(part.capitalize() for part in name.split('_'))


@functools.cache
def builder_class(name: str) -> type[Any]:
  """Makes (once per process) the TFDS builder class of a catalog dataset.

  Args:
    name: a key of `catalog.DATASETS`.

  Returns:
    A `tfds.core.GeneratorBasedBuilder` subclass named `reid_<name>`.

  Raises:
    reader_utils.DatasetError: unknown name.
  """
  reader = catalog.get_reader(name)
  spec = catalog.SPECS[name]
  from etils import epath  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  instructions = (
      f'Place {spec.title} in the manual dir (the folder the catalog reader '
      f'{name!r} accepts) and pass it as '
      f'`download_config=tfds.download.DownloadConfig(manual_dir=...)`.\n'
      f'{reader_utils.layout_help(spec)}\n')
  encoding = 'png' if name.startswith('cuhk03') else 'jpeg'

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'{spec.title} re-identification dataset '
                     '(train/query/gallery), read from the original folders.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=encoding),
            'pid': tfds.features.Scalar(dtype=np.int64),
            'camid': tfds.features.Scalar(dtype=np.int64),
            'path': tfds.features.Text(),
            'index': tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=('image', 'pid'),
    )

  def _split_generators(self, dl_manager):
    root = os.path.abspath(os.fspath(dl_manager.manual_dir))
    dataset = reader(root, verify=True)
    return {split: self._generate_examples(getattr(dataset, split), root)
            for split in SPLITS if getattr(dataset, split)}

  def _generate_examples(self, records, root):
    del self  # unused
    for index, record in enumerate(records):
      yield index, {
          'image': record.path,
          'pid': record.pid,
          'camid': record.camid,
          'path': os.path.relpath(record.path, root),
          'index': index,
      }

  attributes = {
      'name': builder_name(name),
      'VERSION': tfds.core.Version(VERSION),
      'RELEASE_NOTES': {VERSION: 'Initial release.'},
      'MANUAL_DOWNLOAD_INSTRUCTIONS': instructions,
      '_info': _info,
      '_split_generators': _split_generators,
      '_generate_examples': _generate_examples,
      '__module__': __name__,
      # Explicit paths: TFDS would otherwise locate the code through
      # importlib resources (and look for a checksums file next to it).
      'code_path': None,
      'pkg_dir_path': epath.Path(os.path.dirname(os.path.abspath(__file__))),
      '__doc__': f'TFDS builder of {spec.title} (manual download).',
  }
  with tfds.core.registered.skip_registration():
    return type(_camel(name), (tfds.core.GeneratorBasedBuilder,), attributes)


def get_builder(name: str, data_dir: str | None = None) -> Any:
  """Returns a builder instance of a catalog dataset.

  Args:
    name: a key of `catalog.DATASETS`.
    data_dir: TFDS data dir (None: TFDS's default, ~/tensorflow_datasets).

  Returns:
    The `tfds.core.DatasetBuilder`.
  """
  return builder_class(name)(data_dir=data_dir or None)


def prepare(name: str, manual_dir: str, data_dir: str | None = None) -> Any:
  """Builds the TFDS data of a dataset from its folder (no download).

  Args:
    name: a key of `catalog.DATASETS`.
    manual_dir: the dataset folder (as for the catalog reader).
    data_dir: TFDS data dir.

  Returns:
    The prepared builder.

  Raises:
    reader_utils.DatasetError: the folder is missing or does not parse.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = get_builder(name, data_dir)
  if not os.path.isdir(manual_dir):
    raise reader_utils.DatasetError(
        f'{builder.name}: manual dir {manual_dir!r} does not exist.\n'
        f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(manual_dir), try_download_gcs=False,
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def _prepared_builder(name: str, data_dir: str | None,
                      manual_dir: str | None = None) -> Any:
  """Returns a prepared builder, preparing it from `manual_dir` if needed."""
  builder = get_builder(name, data_dir)
  if builder.is_prepared():
    return builder
  if manual_dir:
    return prepare(name, manual_dir, data_dir)
  raise reader_utils.DatasetError(
      f'TFDS dataset {builder.name} {VERSION} is not prepared in '
      f'{builder.data_dir!r}; run '
      f'input_pipeline.tfds_builders.prepare({name!r}, MANUAL_DIR, data_dir) '
      f'or give the dataset folder as data dir.')


def as_tf_dataset(name: str, split: str, data_dir: str | None = None) -> Any:
  """Reads a prepared split as a `tf.data.Dataset` of dicts, images left encoded.

  Args:
    name: a key of `catalog.DATASETS`.
    split: 'train', 'query' or 'gallery' (any TFDS split string).
    data_dir: TFDS data dir.

  Returns:
    Dataset of {'image' (the encoded bytes, a scalar tf.string: the pipeline decodes
    them as PIL does, `input_pipeline.decode`), 'pid', 'camid', 'path', 'index'}, in
    storage order.

  Raises:
    reader_utils.DatasetError: not prepared.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _prepared_builder(name, data_dir)
  return builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})


def read_tfds_arrays(name: str, split: str, data_dir: str | None = None,
                     ) -> dict[str, np.ndarray]:
  """Reads the labels of a prepared split (image bytes are skipped).

  Args:
    name: a key of `catalog.DATASETS`.
    split: 'train', 'query' or 'gallery'.
    data_dir: TFDS data dir.

  Returns:
    {'index', 'pid', 'camid': int64 arrays; 'path': str array}, sorted by
    index (so row i is the folder reader's record i).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dataset = as_tf_dataset(name, split, data_dir)
  dataset = dataset.map(lambda ex: {k: ex[k] for k in _META_KEYS}).batch(4096)
  parts = {k: [] for k in _META_KEYS}
  for batch in tfds.as_numpy(dataset):
    for k in _META_KEYS:
      parts[k].append(batch[k])
  arrays = {k: (np.concatenate(v) if v else np.zeros((0,), np.int64))
            for k, v in parts.items()}
  arrays['path'] = np.array([p.decode('utf-8') if isinstance(p, bytes) else p
                             for p in arrays['path']], dtype=str)
  order = np.argsort(arrays['index'], kind='stable')
  return {k: v[order] for k, v in arrays.items()}


def read_tfds_split(name: str, split: str, data_dir: str | None = None,
                    image_root: str | None = None) -> tuple[Record, ...]:
  """Reads a prepared split as Records in index order.

  Args:
    name: a key of `catalog.DATASETS`.
    split: 'train', 'query' or 'gallery'.
    data_dir: TFDS data dir.
    image_root: the dataset folder; when given, record paths are absolute
      (`image_root/path`), else the stored relative paths.

  Returns:
    Records equal to the folder reader's (same order, pids, camids).
  """
  arrays = read_tfds_arrays(name, split, data_dir)
  return tuple(
      Record(os.path.join(image_root, str(p)) if image_root else str(p),
             int(pid), int(camid))
      for p, pid, camid in zip(arrays['path'], arrays['pid'], arrays['camid']))


def read_tfds_dataset(name: str, data_dir: str | None = None,
                      manual_dir: str | None = None) -> ReIDDataset:
  """Reads all splits of a TFDS-prepared dataset, preparing it if needed.

  Args:
    name: a key of `catalog.DATASETS`.
    data_dir: TFDS data dir.
    manual_dir: the dataset folder: used to prepare the data when it is not
      prepared yet, and as root of the record paths.

  Returns:
    The dataset (missing splits, e.g. train of a test-only set, are empty).

  Raises:
    reader_utils.DatasetError: not prepared and no manual dir.
  """
  builder = _prepared_builder(name, data_dir, manual_dir)
  image_root = os.path.abspath(manual_dir) if manual_dir else None
  splits = {split: (read_tfds_split(name, split, data_dir, image_root)
                    if split in builder.info.splits else ())
            for split in SPLITS}
  return ReIDDataset(name=name, **splits)


def _read_split_and_images(name: str, split: str, data_dir: str | None,
                           image_root: str | None) -> tuple[tuple[Record, ...], list[bytes]]:
  """One pass over a prepared split: its records and encoded images, in index order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rows = []
  for ex in tfds.as_numpy(as_tf_dataset(name, split, data_dir)):
    path = ex['path'].decode('utf-8') if isinstance(ex['path'], bytes) else str(ex['path'])
    rows.append((int(ex['index']), path, int(ex['pid']), int(ex['camid']),
                 bytes(ex['image'])))
  rows.sort(key=lambda row: row[0])
  records = tuple(Record(os.path.join(image_root, p) if image_root else p, pid, camid)
                  for _, p, pid, camid, _ in rows)
  return records, [row[4] for row in rows]


def read_tfds_dataset_and_images(name: str, data_dir: str | None = None,
                                 manual_dir: str | None = None
                                 ) -> tuple[ReIDDataset, dict[str, list[bytes]]]:
  """`read_tfds_dataset` plus every split's encoded images, each split read once.

  Args:
    name: a key of `catalog.DATASETS`.
    data_dir: TFDS data dir.
    manual_dir: the dataset folder (to prepare from; root of the record paths).

  Returns:
    (dataset, images): images[split][i] is the encoded image of the split's record i
    (empty lists for absent splits).
  """
  builder = _prepared_builder(name, data_dir, manual_dir)
  image_root = os.path.abspath(manual_dir) if manual_dir else None
  splits, images = {}, {}
  for split in SPLITS:
    if split in builder.info.splits:
      splits[split], images[split] = _read_split_and_images(name, split, data_dir,
                                                            image_root)
    else:
      splits[split], images[split] = (), []
  return ReIDDataset(name=name, **splits), images
