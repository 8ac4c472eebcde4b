"""Tests of the TFDS builders: build from a tiny manual dir, read back."""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import default
from input_pipeline import catalog
from input_pipeline import data_source
from input_pipeline import decode
from input_pipeline import market
from input_pipeline import reader_utils
from input_pipeline import tfds_builders

MARKET_TREE = {
    'bounding_box_train': ['0007_c1s1_000001_00.jpg', '0007_c3s1_000002_00.jpg',
                           '0002_c2s1_000001_00.jpg', '0005_c6s1_000001_00.jpg'],
    'query': ['0002_c1s1_000003_00.jpg', '0005_c2s1_000003_00.jpg',
              '-1_c1s1_000001_00.jpg'],
    'bounding_box_test': ['0002_c3s1_000004_00.jpg', '0005_c4s1_000004_00.jpg',
                          '0000_c1s1_000005_00.jpg', '-1_c2s1_000007_00.jpg'],
}


def write_tree(root, tree):
  """Writes {sub_folder: [file names]} of valid 8x4 JPEGs under root."""
  for folder, names in tree.items():
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i, name in enumerate(names):
      Image.new('RGB', (4, 8), (40 * i, 90, 200)).save(
          os.path.join(root, folder, name))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A Market tree (with one truncated image) prepared as TFDS data."""
  tmp = tmp_path_factory.mktemp('tfds')
  root = str(tmp / 'Market-1501-v15.09.15')
  write_tree(root, MARKET_TREE)
  truncated = os.path.join(root, 'bounding_box_train', '0007_c2s1_000009_00.jpg')
  with open(os.path.join(root, 'bounding_box_train', MARKET_TREE[
      'bounding_box_train'][0]), 'rb') as f:
    data = f.read()
  with open(truncated, 'wb') as f:
    f.write(data[:len(data) // 2])
  data_dir = str(tmp / 'tfds_data')
  builder = tfds_builders.prepare('market1501', root, data_dir)
  return {'root': root, 'data_dir': data_dir, 'builder': builder,
          'truncated': truncated, 'tmp': tmp}


def test_builder_class(prepared):
  cls = tfds_builders.builder_class('market1501')
  assert cls is tfds_builders.builder_class('market1501')  # made once
  assert cls.name == 'reid_market1501'
  assert 'bounding_box_train/' in cls.MANUAL_DOWNLOAD_INSTRUCTIONS
  builder = prepared['builder']
  assert builder.is_prepared()
  assert set(builder.info.splits) == {'train', 'query', 'gallery'}
  assert set(builder.info.features) == {'image', 'pid', 'camid', 'path', 'index'}
  with pytest.raises(reader_utils.DatasetError, match='Unknown dataset'):
    tfds_builders.builder_class('nope')


def test_read_back_equals_folder_reader(prepared):
  folder = market.read_market1501(prepared['root'], verify=True)
  ds = tfds_builders.read_tfds_dataset('market1501', prepared['data_dir'],
                                       manual_dir=prepared['root'])
  assert ds == folder  # same records, order, pids, camids, absolute paths
  # The truncated image was left out of the TFDS data.
  assert prepared['truncated'] not in [r.path for r in ds.train]
  relative = tfds_builders.read_tfds_split('market1501', 'gallery',
                                           prepared['data_dir'])
  assert [r.path for r in relative] == [
      os.path.relpath(r.path, prepared['root']) for r in folder.gallery]
  arrays = tfds_builders.read_tfds_arrays('market1501', 'train',
                                          prepared['data_dir'])
  np.testing.assert_array_equal(arrays['index'], np.arange(len(folder.train)))
  np.testing.assert_array_equal(arrays['pid'], [r.pid for r in folder.train])
  np.testing.assert_array_equal(arrays['camid'], [r.camid for r in folder.train])


def test_as_tf_dataset_encoded_images(prepared):
  folder = market.read_market1501(prepared['root'], verify=True)
  examples = list(tfds_builders.as_tf_dataset(
      'market1501', 'query', prepared['data_dir']).as_numpy_iterator())
  assert len(examples) == len(folder.query)
  for ex in examples:
    record = folder.query[ex['index']]
    assert (ex['pid'], ex['camid']) == (record.pid, record.camid)
    with open(record.path, 'rb') as f:
      assert ex['image'] == f.read()  # the original bytes
    assert Image.open(io.BytesIO(ex['image'])).size == (4, 8)
  # The bytes decode, as the pipeline reads them (decode.in_memory_loader), to 8x4x3.
  decoded = decode.decode_image(tf.constant(examples[0]['image']))
  assert tuple(decoded.shape) == (8, 4, 3)


def test_not_prepared_and_missing_manual_dir(prepared):
  with pytest.raises(reader_utils.DatasetError, match='is not prepared'):
    tfds_builders.read_tfds_dataset('dukemtmcreid', prepared['data_dir'])
  with pytest.raises(reader_utils.DatasetError, match='manual dir .* does not exist'):
    tfds_builders.prepare('dukemtmcreid', str(prepared['tmp'] / 'absent'),
                          prepared['data_dir'])


def test_load_train_test_tfds(prepared):
  ilids = prepared['tmp'] / 'Partial_iLIDS'
  write_tree(str(ilids), {'Probe': ['001.jpg'],
                             'Gallery': ['001.jpg', '002.jpg']})
  config = default.get_config()
  config.update({
      'dataset': 'market1501', 'data_dir': prepared['root'],
      'test_dataset': 'partial_ilids', 'test_data_dir': str(ilids),
      'data_format': 'tfds', 'tfds_data_dir': prepared['data_dir']})
  config.verify_images = False
  train_source, (test_source,) = data_source.load_train_test(config)
  train, test = train_source.dataset, test_source.dataset
  assert train == market.read_market1501(prepared['root'], verify=True)
  assert test == catalog.load_dataset('partial_ilids', str(ilids))
  # The images come from the shards, decoded in memory: equal to the files' bytes.
  for i in (0, len(train.train) - 1):
    from_shards = train_source.load_train_image(tf.constant(''), tf.constant(i, tf.int64))
    from_file = decode.decode_image(tf.io.read_file(train.train[i].path))
    np.testing.assert_array_equal(from_shards.numpy(), from_file.numpy())
  gallery_0 = len(test.query)
  from_shards = test_source.load_test_image(tf.constant(''), tf.constant(gallery_0, tf.int64))
  from_file = decode.decode_image(tf.io.read_file(test.gallery[0].path))
  np.testing.assert_array_equal(from_shards.numpy(), from_file.numpy())
  assert test.train == ()  # test-only: no train split was written
  builder = tfds_builders.get_builder('partial_ilids', prepared['data_dir'])
  assert set(builder.info.splits) == {'query', 'gallery'}
