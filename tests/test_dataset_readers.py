"""The readers of DukeMTMC-reID, CUHK03-NP, MSMT17, VeRi-776, VeRi-Wild, Partial-iLIDS
and Partial-REID on tiny generated folder trees (Market-1501 and the shared reader
behaviour: test_datasets.py)."""

import os

import pytest

from input_pipeline import catalog
from input_pipeline import cuhk03
from input_pipeline import market
from input_pipeline import msmt17
from input_pipeline import partial_reid
from input_pipeline import reader_utils
from input_pipeline import veri
from test_datasets import write_image, write_text, write_tree


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
  with pytest.raises(reader_utils.DatasetError, match='DukeMTMC-reID'):
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
  with pytest.raises(reader_utils.DatasetError, match='variant must be one of'):
    cuhk03.read_cuhk03(str(tmp_path), variant='both')
  os.makedirs(tmp_path / 'cuhk03-np' / 'labeled' / 'query')
  with pytest.raises(reader_utils.DatasetError) as e:
    cuhk03.read_cuhk03(str(tmp_path), variant='labeled')
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
  with pytest.raises(reader_utils.DatasetError) as e:
    msmt17.read_msmt17(folder)
  assert '2 of 3 entries of the query split do not parse' in str(e.value)
  assert 'list_query.txt:2' in str(e.value) and 'list_query.txt:3' in str(e.value)
  write_text(os.path.join(folder, 'list_query.txt'),
             ['0011/0011_009_03_0303morning_0009_0.jpg 11'])
  with pytest.raises(reader_utils.DatasetError, match='1 of 1 images listed for the query'):
    msmt17.read_msmt17(folder)
  write_text(os.path.join(folder, 'list_query.txt'), [])
  with pytest.raises(reader_utils.DatasetError, match='no images listed'):
    msmt17.read_msmt17(folder)
  os.remove(os.path.join(folder, 'list_val.txt'))
  with pytest.raises(reader_utils.DatasetError, match="missing 'list_val.txt'"):
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
  with pytest.raises(reader_utils.DatasetError, match='test_size must be one of'):
    veri.read_veriwild(folder, test_size='huge')
  write_text(os.path.join(folder, 'train_test_split', 'test_3000_query.txt'),
             ['00100/009999'])
  with pytest.raises(reader_utils.DatasetError,
                     match=r"1 images of the query split .* vehicle_info.txt"):
    veri.read_veriwild(folder, test_size='small')
  os.remove(os.path.join(folder, 'train_test_split', 'test_3000.txt'))
  with pytest.raises(reader_utils.DatasetError) as e:
    veri.read_veriwild(folder, test_size='small')
  assert "missing 'train_test_split/test_3000.txt'" in str(e.value)
  assert 'VERI-Wild' in str(e.value)


# --- partial re-ID -----------------------------------------------------------


@pytest.mark.parametrize('layout', [('Partial_iLIDS', 'Probe', 'Gallery'),
                                    ('PartialiLIDS', 'query', 'gallery')])
def test_partial_ilids(tmp_path, layout):
  folder, q, g = layout
  write_tree(os.path.join(tmp_path, folder),
             {q: ['001.jpg', '002.jpg'], g: ['001.jpg', '002.jpg', '003.jpg']})
  ds = partial_reid.read_partial_ilids(str(tmp_path))
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
  with pytest.raises(reader_utils.DatasetError, match="1 of 3 .* gallery .*'person.jpg'"):
    partial_reid.read_partial_reid(str(tmp_path))
