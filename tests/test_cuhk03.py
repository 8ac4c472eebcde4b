"""The classic CUHK03 splits: a tiny `cuhk-03.mat` in the release's HDF5 structure, read
by `input_pipeline.cuhk03_classic` and compared with the reference's split logic
(reid-strong-baseline / torchreid `CUHK03._preprocess`, transcribed below); the 'auto'
protocol by name; a short evaluation on a classic split under the CUHK03 protocol."""

import logging
import os
import os.path as osp
import shutil

import h5py
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from eval import metrics
from eval_reference import distance_matrix, l2_normalize, reference_cuhk03_cmc
from eval_reference import reference_market
from input_pipeline import catalog
from input_pipeline import cuhk03_classic
from input_pipeline import dataset_stats
from input_pipeline import decode
from input_pipeline import reader_utils
from reid_jax import evaluation
from reid_jax import train
from test_evaluate import centred_model, numpy_labels
from test_train import H, W, tiny_config

# Persons per camera pair (the release: 843, 440, 77, 58, 49).
PAIR_PERSONS = (4, 3, 2, 2, 3)
# The test identities (pair, person) of each test set (the release: 20 x 100).
TESTSETS = (((1, 2), (2, 1), (3, 2), (5, 3)),
            ((1, 1), (1, 4), (2, 3), (4, 1), (5, 2)),
            ((2, 2), (3, 1), (4, 2), (5, 1)))
# Persons with images from one view only (as a few of the release).
ONE_VIEW = {(1, 3), (2, 2), (4, 2)}
_HEADER = b'MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .'


def write_release(path, seed=0):
  """Writes a tiny `cuhk-03.mat` as MATLAB v7.3 does (HDF5 with a 512-byte header).

  Cells are datasets of object references into '#refs#', arrays are stored
  transposed (an H x W x 3 image as 3 x W x H), empty cells are MATLAB's empty
  marker (a uint64 array of the dimensions, attribute MATLAB_empty).

  Returns:
    {variant: {(pair, person, image): H x W x 3 uint8}} of the non-empty cells.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(osp.dirname(path), exist_ok=True)
  images = {}
  counter = iter(range(10**6))
  with h5py.File(path, 'w', userblock_size=512) as mat:
    refs = mat.create_group('#refs#')

    def store(array, matlab_class, empty=False):
      dset = refs.create_dataset(f'r{next(counter)}', data=array)
      dset.attrs['MATLAB_class'] = np.bytes_(matlab_class)
      if empty:
        dset.attrs['MATLAB_empty'] = np.uint8(1)
      return dset.ref

    def cell(name, cells, group=mat):  # cells: MATLAB rows x columns of references
      dset = group.create_dataset(name, data=np.array(cells, dtype=h5py.ref_dtype).T)
      dset.attrs['MATLAB_class'] = np.bytes_('cell')
      return dset

    for variant in cuhk03_classic.VARIANTS:
      images[variant] = {}
      pairs = []
      for pair, persons in enumerate(PAIR_PERSONS, 1):
        rows = []
        for person in range(1, persons + 1):
          views = [range(0, 5)] if (pair, person) in ONE_VIEW else [range(0, 5),
                                                                    range(5, 10)]
          filled = set()
          for view in views:
            filled.update(rng.choice(view, rng.integers(1, 4), replace=False).tolist())
          row = []
          for image in range(10):
            if image in filled:
              pixels = rng.integers(0, 256, (rng.integers(H - 4, H + 5),
                                             rng.integers(W - 4, W + 5), 3), np.uint8)
              images[variant][(pair, person, image + 1)] = pixels
              row.append(store(pixels.T, 'uint8'))
            else:
              row.append(store(np.zeros(2, np.uint64), 'double', empty=True))
          rows.append(row)
        pairs.append(cell(f'p{next(counter)}', rows, refs).ref)
      cell(variant, [[ref] for ref in pairs])  # a 5 x 1 cell
    tables = [store(np.array(t, np.float64).T, 'double') for t in TESTSETS]
    cell('testsets', [[ref] for ref in tables])  # a 20 x 1 cell
  with open(path, 'r+b') as f:
    f.write(_HEADER)
  return images


def reference_splits(raw_mat_path, imgs_dir, image_type):
  """The reference's `_preprocess` for the classic splits, transcribed (no file writes).

  Returns:
    (splits as [{'train', 'query', 'gallery'}], {path: image array it would save}).
  """
  saved = {}
  mat = h5py.File(raw_mat_path, 'r')

  def _deref(ref):
    return mat[ref][:].T

  def _process_images(img_refs, campid, pid, save_dir):
    img_paths = []  # Note: some persons only have images for one view
    for imgid, img_ref in enumerate(img_refs):
      img = _deref(img_ref)
      # skip empty cell
      if img.size == 0 or img.ndim < 3: continue
      viewid = 1 if imgid < 5 else 2
      img_name = '{:01d}_{:03d}_{:01d}_{:02d}.png'.format(campid + 1, pid + 1, viewid,
                                                          imgid + 1)
      img_path = osp.join(save_dir, img_name)
      saved[img_path] = img  # imsave(img_path, img)
      img_paths.append(img_path)
    return img_paths

  def _extract_img(name):
    meta_data = []
    for campid, camp_ref in enumerate(mat[name][0]):
      camp = _deref(camp_ref)
      num_pids = camp.shape[0]
      for pid in range(num_pids):
        img_paths = _process_images(camp[pid, :], campid, pid, imgs_dir)
        assert len(img_paths) > 0, "campid{}-pid{} has no images".format(campid, pid)
        meta_data.append((campid + 1, pid + 1, img_paths))
    return meta_data

  meta = _extract_img(image_type)

  def _extract_classic_split(meta_data, test_split):
    train, test = [], []
    num_train_pids, num_test_pids = 0, 0
    num_train_imgs, num_test_imgs = 0, 0
    for i, (campid, pid, img_paths) in enumerate(meta_data):

      if [campid, pid] in test_split:
        for img_path in img_paths:
          camid = int(osp.basename(img_path).split('_')[2]) - 1  # make it 0-based
          test.append((img_path, num_test_pids, camid))
        num_test_pids += 1
        num_test_imgs += len(img_paths)
      else:
        for img_path in img_paths:
          camid = int(osp.basename(img_path).split('_')[2]) - 1  # make it 0-based
          train.append((img_path, num_train_pids, camid))
        num_train_pids += 1
        num_train_imgs += len(img_paths)
    return train, num_train_pids, num_train_imgs, test, num_test_pids, num_test_imgs

  splits = []
  for split_ref in mat['testsets'][0]:
    test_split = _deref(split_ref).tolist()
    train, _, _, test, _, _ = _extract_classic_split(meta, test_split)
    splits.append({'train': train, 'query': test, 'gallery': test})
  mat.close()
  return splits, saved


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """A `cuhk03/cuhk03_release/cuhk-03.mat` (read-only source: copied per test)."""
  root = tmp_path_factory.mktemp('cuhk03_release')
  images = write_release(str(root / 'cuhk03' / 'cuhk03_release' / 'cuhk-03.mat'))
  return str(root), images


def _copy(release, tmp_path):
  shutil.copytree(release[0], tmp_path, dirs_exist_ok=True)
  return str(tmp_path)


def test_release_fixture_is_a_matlab_cell_file(release):
  with h5py.File(osp.join(release[0], 'cuhk03', cuhk03_classic.MAT_PATH), 'r') as mat:
    assert mat.userblock_size == 512
    assert mat['labeled'].shape == (1, 5) and mat['testsets'].shape == (1, 3)
    assert mat['labeled'].attrs['MATLAB_class'] == b'cell'
    first = mat[mat['labeled'][0, 0]]
    assert first.shape == (10, PAIR_PERSONS[0])  # 4 x 10 cells, stored transposed


@pytest.mark.parametrize('variant', cuhk03_classic.VARIANTS)
def test_classic_splits_match_the_reference(release, tmp_path, variant):
  root = _copy(release, tmp_path)
  folder = osp.join(root, 'cuhk03')
  mat_path = osp.join(folder, cuhk03_classic.MAT_PATH)
  expected, saved = reference_splits(mat_path, osp.join(folder, f'images_{variant}'),
                                     variant)
  assert len(expected) == len(TESTSETS) == 3
  datasets = {}
  for split in range(len(TESTSETS)):
    name = cuhk03_classic.catalog_name(variant, split)
    ds = catalog.load_dataset(name, root if split % 2 else folder)  # parent or folder
    datasets[split] = ds
    assert ds.name == name
    for part in ('train', 'query', 'gallery'):
      assert [tuple(r) for r in getattr(ds, part)] == expected[split][part], part
    assert ds.num_train_pids == sum(PAIR_PERSONS) - len(TESTSETS[split])
    assert {r.camid for r in ds.train} == {0, 1}
  # Every image was written once, pixel for pixel (H x W x 3, not transposed).
  written = sorted(os.listdir(osp.join(folder, f'images_{variant}')))
  assert written == sorted(osp.basename(p) for p in saved)
  assert len(saved) == len(release[1][variant])
  for path, pixels in saved.items():
    with Image.open(path) as image:
      np.testing.assert_array_equal(np.asarray(image), pixels)
  # ... and decodes in the input pipeline as in PIL.
  path, pixels = next(iter(saved.items()))
  np.testing.assert_array_equal(decode.decode_image(tf.io.read_file(path)).numpy(),
                                pixels)
  # Later reads use the JSON index and the images only.
  assert osp.isfile(osp.join(folder, f'cuhk03_classic_{variant}.json'))
  os.remove(mat_path)
  for split, ds in datasets.items():
    assert catalog.load_dataset(cuhk03_classic.catalog_name(variant, split),
                                folder) == ds


def test_published_statistics_are_checked_on_load(release, tmp_path, caplog):
  root = _copy(release, tmp_path)
  with caplog.at_level(logging.WARNING):
    ds = cuhk03_classic.read_cuhk03_classic(root, variant='detected', split=1)
  test_images = len(ds.query)
  text = caplog.text
  assert ("split 'train' differs from the published statistics: 9 ids (published 1367), "
          f"{len(ds.train)} images (published {14097 - test_images})") in text
  assert ("split 'query' differs from the published statistics: 5 ids (published 100)."
          in text)
  full = cuhk03_classic.published_stats('labeled', 970)
  assert full['train'] == dataset_stats.SplitStats(1367, 14096 - 970, 2)
  assert full['query'] == full['gallery'] == dataset_stats.SplitStats(100, 970, 2)


def test_errors_show_the_expected_layout(release, tmp_path):
  with pytest.raises(reader_utils.DatasetError) as e:
    catalog.load_dataset('cuhk03_classic_labeled', str(tmp_path))
  assert 'cuhk03_release/cuhk-03.mat' in str(e.value) and 'testsets' in str(e.value)
  root = _copy(release, tmp_path / 'ok')
  with pytest.raises(reader_utils.DatasetError, match=r'split must be in 0\.\.2 .* got 5'):
    cuhk03_classic.read_cuhk03_classic(root, split=5)
  with pytest.raises(reader_utils.DatasetError, match='variant must be one of'):
    cuhk03_classic.read_cuhk03_classic(root, variant='both')
  with pytest.raises(reader_utils.DatasetError, match='Unknown dataset'):
    catalog.get_reader('cuhk03_classic_labeled_split20')
  # A file that is not the release: the missing entry and the layout are named.
  bad = tmp_path / 'bad' / 'cuhk03' / 'cuhk03_release' / 'cuhk-03.mat'
  os.makedirs(bad.parent)
  with h5py.File(bad, 'w') as mat:
    mat['labeled'] = np.zeros((1, 5))
  with pytest.raises(reader_utils.DatasetError, match="no 'testsets' entry") as e:
    cuhk03_classic.read_cuhk03_classic(str(tmp_path / 'bad'))
  assert 'Expected layout' in str(e.value)
  bad.write_bytes(b'not hdf5')
  with pytest.raises(reader_utils.DatasetError, match='not an HDF5 file'):
    cuhk03_classic.read_cuhk03_classic(str(tmp_path / 'bad'))
  # A damaged index is named, with how to rebuild it.
  index = tmp_path / 'ok' / 'cuhk03' / 'cuhk03_classic_labeled.json'
  cuhk03_classic.read_cuhk03_classic(root)
  index.write_text('{"format": "other"}')
  with pytest.raises(reader_utils.DatasetError, match='delete it to extract'):
    cuhk03_classic.read_cuhk03_classic(root)
  # Extracted images that went missing are named.
  index.unlink()
  cuhk03_classic.read_cuhk03_classic(root)
  os.remove(min((tmp_path / 'ok' / 'cuhk03' / 'images_labeled').iterdir()))
  with pytest.raises(reader_utils.DatasetError, match='do not exist'):
    cuhk03_classic.read_cuhk03_classic(root)


def test_auto_protocol_is_cuhk03_for_the_classic_names_only():
  classic = {n for n in catalog.DATASETS if n.startswith('cuhk03_classic_')}
  assert classic == set(cuhk03_classic.PROTOCOL_NAMES)
  assert len(classic) == 2 * cuhk03_classic.NUM_SPLITS
  assert {'cuhk03_classic_labeled', 'cuhk03_classic_detected_split19'} <= classic
  for name in classic:
    assert evaluation.resolve_protocol('auto', name) == 'cuhk03'
    assert evaluation.resolve_protocol('market', name) == 'market'
  for name in ('cuhk03_labeled', 'cuhk03_detected', 'market1501', 'cuhk03',
               'cuhk03_classic'):  # CUHK03-NP and names outside the set: Market
    assert evaluation.resolve_protocol('auto', name) == 'market'
  assert evaluation.resolve_protocol('cuhk03', 'market1501') == 'cuhk03'


def test_evaluation_on_a_classic_split_uses_the_cuhk03_protocol(release, tmp_path):
  root = _copy(release, tmp_path / 'data')
  ranks = {'test.cmc_ranks': (1, 2, 3)}
  config = tiny_config(root, dataset='cuhk03_classic_labeled_split1', **ranks)
  exp = train.build_experiment(config)  # reads the split through the data-source layer
  (source,) = exp.test_sources
  test_set = source.dataset
  assert test_set.name == 'cuhk03_classic_labeled_split1'
  assert exp.train_source.dataset.num_train_pids == sum(PAIR_PERSONS) - 5
  # Centre the untrained BNNeck's features on the test images (as training would).
  state, q, g = centred_model(exp, config)
  qp, gp, qc, gc = numpy_labels(exp)
  distmat = distance_matrix(l2_normalize(q), l2_normalize(g), 'euclidean')
  queries, sel = metrics.cuhk03_samples(qp, gp, qc, gc, num_repeats=10, seed=0)
  cuhk03_cmc = reference_cuhk03_cmc(distmat, qp, gp, qc, gc, 5, queries, sel)
  market_cmc, m_ap = reference_market(distmat, qp, gp, qc, gc, 5)[0:2]
  assert not np.allclose(cuhk03_cmc[:3], market_cmc[:3])  # the data tells them apart

  out = evaluation.evaluate_state(exp.p_eval_step, state, exp.test_sources, config,
                                  str(tmp_path / 'workdir'))
  assert out['protocol'] == 'cuhk03'  # config.test.protocol='auto'
  assert [out[f'rank{r}'] for r in (1, 2, 3)] == pytest.approx(cuhk03_cmc[:3], abs=1e-6)
  assert out['mAP'] == pytest.approx(m_ap, abs=1e-6)  # AP: the whole kept gallery
