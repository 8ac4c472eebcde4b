"""Market-1501 and what every reader shares (layout errors, parsing, statistics, image
checks), the generic folder reader, the catalog and the data-source layer, on tiny
generated folder trees (the other readers: test_dataset_readers.py)."""

import logging
import os

from PIL import Image
import pytest

from configs import default
from input_pipeline import catalog
from input_pipeline import cuhk03_classic
from input_pipeline import data_source
from input_pipeline import dataset_stats
from input_pipeline import market
from input_pipeline import reader_utils
from input_pipeline.records import Record
from input_pipeline.records import ReIDDataset


def write_image(path, color=(120, 30, 200), fmt=None):
  """Writes a valid 8x4 (h x w) image, making parent folders."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', (4, 8), color).save(path, format=fmt)


def write_tree(root, tree):
  """Writes {sub_folder: [file names]} of tiny images under root."""
  for folder, names in tree.items():
    for name in names:
      write_image(os.path.join(root, folder, name))


def write_text(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))


MARKET_TREE = {
    'bounding_box_train': ['0007_c1s1_000001_00.jpg', '0007_c3s1_000002_00.jpg',
                           '0002_c2s1_000001_00.jpg', '0005_c6s1_000001_00.jpg',
                           '0005_c6s1_000002_00.jpg'],
    'query': ['0002_c1s1_000003_00.jpg', '0005_c2s1_000003_00.jpg',
              '-1_c1s1_000001_00.jpg'],
    'bounding_box_test': ['0002_c3s1_000004_00.jpg', '0005_c4s1_000004_00.jpg',
                          '0000_c1s1_000005_00.jpg', '0000_c5s1_000006_00.jpg',
                          '-1_c2s1_000007_00.jpg', '0009_c2s1_000008_00.jpg'],
}


def make_market(tmp_path, tree=None, folder='Market-1501-v15.09.15'):
  root = os.path.join(tmp_path, folder)
  write_tree(root, MARKET_TREE if tree is None else tree)
  return root


def names(records):
  return [os.path.basename(r.path) for r in records]


# --- Market-1501 and the shared behaviour -----------------------------------


def test_market_counts_relabel_camids_junk(tmp_path):
  make_market(tmp_path)
  ds = market.read_market1501(str(tmp_path))  # the parent folder works too
  assert isinstance(ds, ReIDDataset) and ds.name == 'market1501'
  assert all(isinstance(r, Record) for r in ds.train + ds.query + ds.gallery)
  assert all(os.path.isabs(r.path) for r in ds.train + ds.query + ds.gallery)
  # Sorted by path; pids 2, 5, 7 relabelled 0, 1, 2 in sorted-pid order.
  assert names(ds.train) == sorted(MARKET_TREE['bounding_box_train'])
  assert [(r.pid, r.camid) for r in ds.train] == [
      (0, 1), (1, 5), (1, 5), (2, 0), (2, 2)]
  assert ds.num_train_pids == 3 and ds.num_train_cams == 4
  # Junk (-1) dropped; distractors (0) kept in the gallery; query pids kept.
  assert [(r.pid, r.camid) for r in ds.query] == [(2, 0), (5, 1)]
  assert sorted({r.pid for r in ds.gallery}) == [0, 2, 5, 9]
  assert len(ds.gallery) == 5
  assert not any('-1_' in n for n in names(ds.query) + names(ds.gallery))


def test_market_root_is_dataset_folder(tmp_path):
  root = make_market(tmp_path)
  assert market.read_market1501(root) == market.read_market1501(str(tmp_path))


def test_stats_warnings_name_splits(tmp_path, caplog):
  make_market(tmp_path)
  caplog.set_level(logging.INFO)
  ds = market.read_market1501(str(tmp_path))
  text = caplog.text
  assert 'market1501 statistics' in text  # the table
  for split in ('train', 'query', 'gallery'):
    assert f"split '{split}' differs from the published statistics" in text
  assert 'published 12936' in text and 'published 751' in text
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3
  stats = dataset_stats.dataset_stats(ds)
  assert stats['train'] == dataset_stats.SplitStats(3, 5, 4)
  table = dataset_stats.stats_table('market1501', stats, market.MARKET1501.published)
  assert '3 / 751' in table and '5 / 12936' in table and '4 / 6' in table


def test_compare_with_published_matches_and_camera_none():
  published = {'train': dataset_stats.SplitStats(2, 3, None),
               'query': dataset_stats.SplitStats(1, 1, 2)}
  stats = {'train': dataset_stats.SplitStats(2, 3, 5), 'query': dataset_stats.SplitStats(1, 1, 2)}
  assert dataset_stats.compare_with_published('x', stats, published) == []
  messages = dataset_stats.compare_with_published(
      'x', {'train': dataset_stats.SplitStats(2, 4, 1)}, published)
  assert len(messages) == 2
  assert "split 'train'" in messages[0] and '4 images (published 3)' in messages[0]
  assert "split 'query'" in messages[1] and '0 images (published 1)' in messages[1]


def test_missing_root_shows_layout_and_source(tmp_path):
  with pytest.raises(reader_utils.DatasetError) as e:
    market.read_market1501(str(tmp_path / 'nowhere'))
  message = str(e.value)
  assert 'does not exist' in message and 'nowhere' in message
  assert 'bounding_box_train/' in message and 'bounding_box_test/' in message
  assert 'official Market-1501 page' in message
  assert 'never downloaded automatically' in message


def test_missing_split_folder(tmp_path):
  tree = dict(MARKET_TREE)
  del tree['query']
  root = make_market(tmp_path, tree)
  with pytest.raises(reader_utils.DatasetError) as e:
    market.read_market1501(str(tmp_path))
  message = str(e.value)
  assert "missing 'query'" in message and root in message
  assert 'Expected layout of Market-1501' in message
  assert 'Market-1501-v15.09.15/' in message


def test_no_images_in_split(tmp_path):
  root = make_market(tmp_path)
  for name in MARKET_TREE['query']:
    os.remove(os.path.join(root, 'query', name))
  write_text(os.path.join(root, 'query', 'Thumbs.db'), ['x'])  # not an image
  with pytest.raises(reader_utils.DatasetError, match=r'no images .* in the query folder'):
    market.read_market1501(root)


def test_unparsed_names_count_and_examples(tmp_path):
  tree = dict(MARKET_TREE)
  bad = [f'img_{i}.jpg' for i in range(7)]
  tree['bounding_box_train'] = MARKET_TREE['bounding_box_train'] + bad
  root = make_market(tmp_path, tree)
  with pytest.raises(reader_utils.DatasetError) as e:
    market.read_market1501(root)
  message = str(e.value)
  assert '7 of 12 entries of the train split do not parse' in message
  assert "'img_0.jpg'" in message and "'img_4.jpg'" in message
  assert "'img_5.jpg'" not in message and '(and 2 more)' in message
  assert r"([-\d]+)_c(\d)" in message


def test_camera_zero_does_not_parse(tmp_path):
  tree = dict(MARKET_TREE)
  tree['query'] = ['0002_c0s1_000003_00.jpg']
  with pytest.raises(reader_utils.DatasetError, match='0002_c0s1_000003_00.jpg'):
    market.read_market1501(make_market(tmp_path, tree))


@pytest.mark.parametrize('folder,junk,split', [
    ('query', ['-1_c1s1_000001_00.jpg', '-1_c2s1_000001_00.jpg'], 'query'),
    ('bounding_box_test', ['-1_c1s1_000001_00.jpg'], 'gallery')])
def test_empty_split_after_junk(tmp_path, folder, junk, split):
  tree = dict(MARKET_TREE)
  tree[folder] = junk
  with pytest.raises(reader_utils.DatasetError, match=f'the {split} split is empty'):
    market.read_market1501(make_market(tmp_path, tree))


def test_query_ids_absent_from_gallery(tmp_path):
  tree = dict(MARKET_TREE)
  tree['query'] = MARKET_TREE['query'] + ['0031_c1s1_000001_00.jpg',
                                          '0012_c1s1_000001_00.jpg']
  with pytest.raises(reader_utils.DatasetError) as e:
    market.read_market1501(make_market(tmp_path, tree))
  assert '2 query ids have no image in the gallery: 12, 31' in str(e.value)


def write_corrupt(root):
  """Adds a truncated JPEG and a non-image .jpg; returns their paths."""
  good = os.path.join(root, 'bounding_box_train', '0007_c1s1_000001_00.jpg')
  with open(good, 'rb') as f:
    data = f.read()
  truncated = os.path.join(root, 'bounding_box_train', '0007_c2s1_000009_00.jpg')
  with open(truncated, 'wb') as f:
    f.write(data[:len(data) // 2])
  garbage = os.path.join(root, 'bounding_box_test', '0002_c5s1_000009_00.jpg')
  with open(garbage, 'wb') as f:
    f.write(b'not an image at all')
  return truncated, garbage


def test_verify_images_counts_and_names_bad_files(tmp_path, caplog):
  root = make_market(tmp_path)
  truncated, garbage = write_corrupt(root)
  records = [Record(os.path.join(root, 'query', MARKET_TREE['query'][0]), 1, 0),
             Record(truncated, 1, 1), Record(garbage, 2, 0)]
  with caplog.at_level(logging.WARNING):
    good, num_bad = reader_utils.verify_images(records, num_threads=2)
  assert num_bad == 2 and good == (records[0],)
  assert 'Skipped 2 of 3 images' in caplog.text
  assert truncated in caplog.text and garbage in caplog.text
  assert reader_utils.verify_images([], num_threads=2) == ((), 0)


def test_reader_verify_skips_corrupt_images(tmp_path):
  root = make_market(tmp_path)
  truncated, garbage = write_corrupt(root)
  unchecked = market.read_market1501(root)
  assert truncated in [r.path for r in unchecked.train]
  checked = market.read_market1501(root, verify=True, num_threads=2)
  assert len(checked.train) == len(unchecked.train) - 1
  assert len(checked.gallery) == len(unchecked.gallery) - 1
  assert truncated not in [r.path for r in checked.train]
  assert garbage not in [r.path for r in checked.gallery]


# --- generic folder reader ---------------------------------------------------


def test_folder_reader_custom_layout(tmp_path):
  write_tree(tmp_path, {
      'train': ['12_c0_a.jpg', '3_c11_b.png', '-1_c2_junk.jpg'],
      'probe/sub': ['3_c4_x.jpg'],
      'gal': ['3_c5_y.jpg', '0_c0_z.jpg'],
  })
  ds = catalog.load_dataset('folder', str(tmp_path), train_dir='train',
                            query_dir='probe', gallery_dir='gal', cam_base=0,
                            recursive=True, name='mine')
  assert ds.name == 'mine'
  assert [(r.pid, r.camid) for r in ds.train] == [(1, 0), (0, 11)]
  assert [(r.pid, r.camid) for r in ds.query] == [(3, 4)]
  assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 0), (3, 5)]


def test_folder_reader_test_only_and_errors(tmp_path):
  write_tree(tmp_path, {'q': ['3_c1_x.jpg'], 'g': ['3_c2_y.jpg']})
  ds = market.read_folder(str(tmp_path), train_dir=None, query_dir='q',
                          gallery_dir='g')
  assert ds.train == () and len(ds.query) == 1
  with pytest.raises(reader_utils.DatasetError, match='needs two groups'):
    market.read_folder(str(tmp_path), pattern=r'(\d+)')
  with pytest.raises(reader_utils.DatasetError) as e:
    market.read_folder(str(tmp_path))
  assert "missing 'bounding_box_train'" in str(e.value)
  assert 'PID_cCAM' in str(e.value)


# --- catalog -----------------------------------------------------------------


def test_catalog_names_and_unknown_name(tmp_path):
  assert set(catalog.DATASETS) == {
      'market1501', 'dukemtmcreid', 'cuhk03_labeled', 'cuhk03_detected',
      'msmt17', 'veri776', 'veriwild_small', 'veriwild_medium',
      'veriwild_large', 'partial_ilids', 'partial_reid', 'folder',
      *cuhk03_classic.SPLITS}  # the classic CUHK03 splits (tests/test_cuhk03.py)
  assert set(catalog.SPECS) == set(catalog.DATASETS)
  with pytest.raises(reader_utils.DatasetError) as e:
    catalog.load_dataset('market', str(tmp_path))
  assert "Unknown dataset 'market'" in str(e.value)
  assert 'market1501' in str(e.value) and 'partial_ilids' in str(e.value)
  assert isinstance(e.value, ValueError)
  with pytest.raises(reader_utils.DatasetError, match='No root directory'):
    catalog.load_dataset('market1501', '')


def make_config(**kwargs):
  config = default.get_config()
  config.data_dir = ''
  config.update(kwargs)
  return config


def test_load_train_test(tmp_path):
  market_root = make_market(tmp_path)
  write_tree(os.path.join(tmp_path, 'Partial_iLIDS'),
             {'Probe': ['001.jpg'], 'Gallery': ['001.jpg', '002.jpg']})
  train, tests = data_source.load_train_test(make_config(data_dir=market_root))
  assert len(tests) == 1 and tests[0].dataset is train.dataset
  assert train.dataset.name == 'market1501' and tests[0].label == 'market1501'
  assert train.load_train_image is None  # folder data: images read from the paths
  train, (test,) = data_source.load_train_test(make_config(
      data_dir=market_root, test_dataset='partial_ilids',
      test_data_dir=str(tmp_path)))
  train, test = train.dataset, test.dataset
  assert train.name == 'market1501' and len(train.train) == 5
  assert test.name == 'partial_ilids' and len(test.gallery) == 2
  with pytest.raises(reader_utils.DatasetError, match='needs config.test_data_dir'):
    data_source.load_train_test(make_config(data_dir=market_root,
                                            test_dataset='partial_ilids'))
  with pytest.raises(reader_utils.DatasetError, match='test-only dataset'):
    data_source.load_train_test(make_config(dataset='partial_ilids',
                                            data_dir=str(tmp_path)))
  with pytest.raises(reader_utils.DatasetError, match='data_format must be one of'):
    data_source.load_train_test(make_config(data_dir=market_root,
                                            data_format='lmdb'))
  with pytest.raises(reader_utils.DatasetError, match='known datasets'):
    data_source.load_train_test(make_config(data_dir=market_root,
                                            test_dataset='ilids'))
