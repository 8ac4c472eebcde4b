"""Tests of the dataset readers and the catalog on tiny generated folder trees."""

import logging
import os

import ml_collections
from PIL import Image
import pytest

from input_pipeline import base
from input_pipeline import catalog
from input_pipeline import data_source
from input_pipeline import cuhk03
from input_pipeline import cuhk03_classic
from input_pipeline import market
from input_pipeline import msmt17
from input_pipeline import partial
from input_pipeline import veri
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
  stats = base.dataset_stats(ds)
  assert stats['train'] == base.SplitStats(3, 5, 4)
  table = base.stats_table('market1501', stats, market.MARKET1501.published)
  assert '3 / 751' in table and '5 / 12936' in table and '4 / 6' in table


def test_compare_with_published_matches_and_camera_none():
  published = {'train': base.SplitStats(2, 3, None),
               'query': base.SplitStats(1, 1, 2)}
  stats = {'train': base.SplitStats(2, 3, 5), 'query': base.SplitStats(1, 1, 2)}
  assert base.compare_with_published('x', stats, published) == []
  messages = base.compare_with_published(
      'x', {'train': base.SplitStats(2, 4, 1)}, published)
  assert len(messages) == 2
  assert "split 'train'" in messages[0] and '4 images (published 3)' in messages[0]
  assert "split 'query'" in messages[1] and '0 images (published 1)' in messages[1]


def test_missing_root_shows_layout_and_source(tmp_path):
  with pytest.raises(base.DatasetError) as e:
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
  with pytest.raises(base.DatasetError) as e:
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
  with pytest.raises(base.DatasetError, match=r'no images .* in the query folder'):
    market.read_market1501(root)


def test_unparsed_names_count_and_examples(tmp_path):
  tree = dict(MARKET_TREE)
  bad = [f'img_{i}.jpg' for i in range(7)]
  tree['bounding_box_train'] = MARKET_TREE['bounding_box_train'] + bad
  root = make_market(tmp_path, tree)
  with pytest.raises(base.DatasetError) as e:
    market.read_market1501(root)
  message = str(e.value)
  assert '7 of 12 entries of the train split do not parse' in message
  assert "'img_0.jpg'" in message and "'img_4.jpg'" in message
  assert "'img_5.jpg'" not in message and '(and 2 more)' in message
  assert r"([-\d]+)_c(\d)" in message


def test_camera_zero_does_not_parse(tmp_path):
  tree = dict(MARKET_TREE)
  tree['query'] = ['0002_c0s1_000003_00.jpg']
  with pytest.raises(base.DatasetError, match='0002_c0s1_000003_00.jpg'):
    market.read_market1501(make_market(tmp_path, tree))


def test_empty_query_after_junk(tmp_path):
  tree = dict(MARKET_TREE)
  tree['query'] = ['-1_c1s1_000001_00.jpg', '-1_c2s1_000001_00.jpg']
  with pytest.raises(base.DatasetError, match='the query split is empty'):
    market.read_market1501(make_market(tmp_path, tree))


def test_empty_gallery_after_junk(tmp_path):
  tree = dict(MARKET_TREE)
  tree['bounding_box_test'] = ['-1_c1s1_000001_00.jpg']
  with pytest.raises(base.DatasetError, match='the gallery split is empty'):
    market.read_market1501(make_market(tmp_path, tree))


def test_query_ids_absent_from_gallery(tmp_path):
  tree = dict(MARKET_TREE)
  tree['query'] = MARKET_TREE['query'] + ['0031_c1s1_000001_00.jpg',
                                          '0012_c1s1_000001_00.jpg']
  with pytest.raises(base.DatasetError) as e:
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
    good, num_bad = base.verify_images(records, num_threads=2)
  assert num_bad == 2 and good == (records[0],)
  assert 'Skipped 2 of 3 images' in caplog.text
  assert truncated in caplog.text and garbage in caplog.text
  assert base.verify_images([], num_threads=2) == ((), 0)


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


# --- DukeMTMC-reID, CUHK03-NP, MSMT17 ----------------------------------------


def test_duke(tmp_path):
  tree = {
      'bounding_box_train': ['0001_c2_f0046182.jpg', '0003_c8_f0000001.jpg'],
      'query': ['0005_c1_f0000002.jpg'],
      'bounding_box_test': ['0005_c7_f0000003.jpg', '0004_c8_f0000004.jpg'],
  }
  write_tree(os.path.join(tmp_path, 'dukemtmc-reid', 'DukeMTMC-reID'), tree)
  ds = market.read_dukemtmcreid(str(tmp_path))
  assert ds.name == 'dukemtmcreid'
  assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (1, 7)]
  assert [(r.pid, r.camid) for r in ds.gallery] == [(4, 7), (5, 6)]
  with pytest.raises(base.DatasetError, match='DukeMTMC-reID'):
    market.read_dukemtmcreid(str(tmp_path / 'dukemtmc-reid' / 'empty'))


@pytest.mark.parametrize('variant', ['labeled', 'detected'])
def test_cuhk03_np(tmp_path, variant):
  for v in cuhk03.VARIANTS:
    for folder, files in {
        'bounding_box_train': ['0001_c1_1.png', '0001_c2_2.png', '0003_c2_1.png'],
        'query': ['0010_c1_1.png'],
        'bounding_box_test': ['0010_c2_1.png', '0011_c2_1.png'],
    }.items():
      for f in files:
        write_image(os.path.join(tmp_path, 'cuhk03-np', v, folder, f), fmt='PNG')
  for root in (tmp_path, tmp_path / 'cuhk03-np'):
    ds = catalog.load_dataset(f'cuhk03_{variant}', str(root))
    assert ds.name == f'cuhk03_{variant}'
    assert f'{os.sep}{variant}{os.sep}' in ds.train[0].path
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 1), (1, 1)]
    assert [(r.pid, r.camid) for r in ds.query] == [(10, 0)]


def test_cuhk03_errors(tmp_path):
  with pytest.raises(base.DatasetError, match='variant must be one of'):
    cuhk03.read_cuhk03(str(tmp_path), variant='both')
  os.makedirs(tmp_path / 'cuhk03-np' / 'labeled' / 'query')
  with pytest.raises(base.DatasetError) as e:
    cuhk03.read_cuhk03_labeled(str(tmp_path))
  assert "missing 'bounding_box_train', 'bounding_box_test'" in str(e.value)
  assert 'CUHK03-NP' in str(e.value) and 'detected/' in str(e.value)


def make_msmt(tmp_path, version='V1'):
  folder = os.path.join(tmp_path, f'MSMT17_{version}')
  train_dir, test_dir = msmt17.VERSIONS[version]
  lists = {
      'list_train.txt': (train_dir, ['0000/0000_000_01_0303morning_0015_0.jpg 0',
                                     '0000/0000_001_05_0303morning_0016_0.jpg 0',
                                     '0003/0003_000_15_0303noon_0001_1.jpg 3']),
      'list_val.txt': (train_dir, ['0003/0003_001_02_0303noon_0002_0.jpg 3']),
      'list_query.txt': (test_dir, ['0011/0011_000_03_0303morning_0001_0.jpg 11']),
      'list_gallery.txt': (test_dir, ['0011/0011_001_04_0303morning_0002_0.jpg 11',
                                      '0012/0012_000_15_0303noon_0003_0.jpg 12']),
  }
  for list_name, (image_dir, lines) in lists.items():
    write_text(os.path.join(folder, list_name), lines)
    for line in lines:
      write_image(os.path.join(folder, image_dir, line.split()[0]))
  return folder


@pytest.mark.parametrize('version', ['V1', 'V2'])
def test_msmt17_versions_and_val_merge(tmp_path, version):
  folder = make_msmt(tmp_path, version)
  ds = msmt17.read_msmt17(str(tmp_path))
  assert ds.name == 'msmt17'
  train_dir = msmt17.VERSIONS[version][0]
  assert all(f'{os.sep}{train_dir}{os.sep}' in r.path for r in ds.train)
  # train + val merged; camid from the third field of the name, from 0.
  assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 4), (1, 14), (1, 1)]
  assert [(r.pid, r.camid) for r in ds.query] == [(11, 2)]
  assert [(r.pid, r.camid) for r in ds.gallery] == [(11, 3), (12, 14)]
  no_val = msmt17.read_msmt17(folder, merge_val=False)
  assert len(no_val.train) == 3


def test_msmt17_bad_lines_and_missing_files(tmp_path):
  folder = make_msmt(tmp_path)
  write_text(os.path.join(folder, 'list_query.txt'),
             ['0011/0011_000_03_0303morning_0001_0.jpg 11', 'garbage',
              '0011/0011_x.jpg 11'])
  with pytest.raises(base.DatasetError) as e:
    msmt17.read_msmt17(folder)
  assert '2 of 3 entries of the query split do not parse' in str(e.value)
  assert 'list_query.txt:2' in str(e.value) and 'list_query.txt:3' in str(e.value)
  write_text(os.path.join(folder, 'list_query.txt'),
             ['0011/0011_009_03_0303morning_0009_0.jpg 11'])
  with pytest.raises(base.DatasetError, match='1 of 1 images listed for the query'):
    msmt17.read_msmt17(folder)
  write_text(os.path.join(folder, 'list_query.txt'), [])
  with pytest.raises(base.DatasetError, match='no images listed'):
    msmt17.read_msmt17(folder)
  os.remove(os.path.join(folder, 'list_val.txt'))
  with pytest.raises(base.DatasetError, match="missing 'list_val.txt'"):
    msmt17.read_msmt17(folder)


# --- vehicles ----------------------------------------------------------------


def test_veri776(tmp_path):
  write_tree(os.path.join(tmp_path, 'VeRi'), {
      'image_train': ['0001_c001_00016450_0.jpg', '0004_c020_00016450_0.jpg'],
      'image_query': ['0002_c002_00030600_0.jpg'],
      'image_test': ['0002_c019_00030600_0.jpg', '0006_c003_00000000_0.jpg'],
  })
  ds = catalog.load_dataset('veri776', str(tmp_path))
  assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (1, 19)]
  assert [(r.pid, r.camid) for r in ds.query] == [(2, 1)]
  assert [(r.pid, r.camid) for r in ds.gallery] == [(2, 18), (6, 2)]


def make_veriwild(tmp_path, info_in_split_dir=True):
  folder = os.path.join(tmp_path, 'VERI-Wild')
  split = os.path.join(folder, 'train_test_split')
  info = ['id/image;Camera ID;Time;Model;Type;Color']
  images = {
      '00001/000001': 40, '00001/000002': 7, '00003/000010': 40,  # train
      '00100/001000': 12, '00100/001001': 7, '00101/001010': 174,  # test
  }
  for key, cam in images.items():
    info.append(f'{key};{cam};2018-03-11 11:40:31;Audi;SUV;Black')
    write_image(os.path.join(folder, 'images', key + '.jpg'))
  write_text(os.path.join(split if info_in_split_dir else folder,
                          'vehicle_info.txt'), info)
  write_text(os.path.join(split, 'train_list.txt'),
             ['00001/000001', '00001/000002', '00003/000010'])
  for size in ('3000', '5000', '10000'):
    write_text(os.path.join(split, f'test_{size}_query.txt'), ['00100/001000'])
    write_text(os.path.join(split, f'test_{size}.txt'),
               ['00100/001001', '00101/001010'])
  return folder


@pytest.mark.parametrize('size', ['small', 'medium', 'large'])
def test_veriwild(tmp_path, size):
  make_veriwild(tmp_path, info_in_split_dir=(size != 'large'))
  ds = catalog.load_dataset(f'veriwild_{size}', str(tmp_path))
  assert ds.name == f'veriwild_{size}'
  # Cameras 7, 12, 40, 174 -> 0, 1, 2, 3.
  assert [(r.pid, r.camid) for r in ds.train] == [(0, 2), (0, 0), (1, 2)]
  assert [(r.pid, r.camid) for r in ds.query] == [(100, 1)]
  assert [(r.pid, r.camid) for r in ds.gallery] == [(100, 0), (101, 3)]
  assert ds.train[0].path.endswith(os.path.join('images', '00001', '000001.jpg'))


def test_veriwild_errors(tmp_path):
  folder = make_veriwild(tmp_path)
  with pytest.raises(base.DatasetError, match='test_size must be one of'):
    veri.read_veriwild(folder, test_size='huge')
  write_text(os.path.join(folder, 'train_test_split', 'test_3000_query.txt'),
             ['00100/009999'])
  with pytest.raises(base.DatasetError,
                     match=r"1 images of the query split .* vehicle_info.txt"):
    veri.read_veriwild_small(folder)
  os.remove(os.path.join(folder, 'train_test_split', 'test_3000.txt'))
  with pytest.raises(base.DatasetError) as e:
    veri.read_veriwild_small(folder)
  assert "missing 'train_test_split/test_3000.txt'" in str(e.value)
  assert 'VERI-Wild' in str(e.value)


# --- partial re-ID -----------------------------------------------------------


@pytest.mark.parametrize('layout', [('Partial_iLIDS', 'Probe', 'Gallery'),
                                    ('PartialiLIDS', 'query', 'gallery')])
def test_partial_ilids(tmp_path, layout):
  folder, q, g = layout
  write_tree(os.path.join(tmp_path, folder),
             {q: ['001.jpg', '002.jpg'], g: ['001.jpg', '002.jpg', '003.jpg']})
  ds = partial.read_partial_ilids(str(tmp_path))
  assert ds.name == 'partial_ilids' and ds.train == ()
  assert [(r.pid, r.camid) for r in ds.query] == [(1, 0), (2, 0)]
  assert [(r.pid, r.camid) for r in ds.gallery] == [(1, 1), (2, 1), (3, 1)]


def test_partial_reid(tmp_path):
  write_tree(os.path.join(tmp_path, 'Partial_REID'), {
      'partial_body_images': ['001_01.jpg', '001_02.jpg', '060_05.jpg'],
      'whole_body_images': ['001_01.jpg', '060_01.jpg'],
  })
  ds = catalog.load_dataset('partial_reid', str(tmp_path / 'Partial_REID'))
  assert ds.train == ()
  assert [(r.pid, r.camid) for r in ds.query] == [(1, 0), (1, 0), (60, 0)]
  assert [(r.pid, r.camid) for r in ds.gallery] == [(1, 1), (60, 1)]
  write_image(os.path.join(tmp_path, 'Partial_REID', 'whole_body_images',
                           'person.jpg'))
  with pytest.raises(base.DatasetError, match="1 of 3 .* gallery .*'person.jpg'"):
    partial.read_partial_reid(str(tmp_path))


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
  with pytest.raises(base.DatasetError, match='needs two groups'):
    market.read_folder(str(tmp_path), pattern=r'(\d+)')
  with pytest.raises(base.DatasetError) as e:
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
  with pytest.raises(base.DatasetError) as e:
    catalog.load_dataset('market', str(tmp_path))
  assert "Unknown dataset 'market'" in str(e.value)
  assert 'market1501' in str(e.value) and 'partial_ilids' in str(e.value)
  assert isinstance(e.value, ValueError)
  with pytest.raises(base.DatasetError, match='No root directory'):
    catalog.load_dataset('market1501', '')


def make_config(**kwargs):
  config = ml_collections.ConfigDict({
      'dataset': 'market1501', 'data_dir': '', 'test_dataset': '',
      'test_data_dir': '', 'data_format': 'folder', 'tfds_data_dir': '',
      'verify_images': False})
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
  with pytest.raises(base.DatasetError, match='needs config.test_data_dir'):
    data_source.load_train_test(make_config(data_dir=market_root,
                                            test_dataset='partial_ilids'))
  with pytest.raises(base.DatasetError, match='test-only dataset'):
    data_source.load_train_test(make_config(dataset='partial_ilids',
                                            data_dir=str(tmp_path)))
  with pytest.raises(base.DatasetError, match='data_format must be one of'):
    data_source.load_train_test(make_config(data_dir=market_root,
                                            data_format='lmdb'))
  with pytest.raises(base.DatasetError, match='known datasets'):
    data_source.load_train_test(make_config(data_dir=market_root,
                                            test_dataset='ilids'))
