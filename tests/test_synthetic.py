"""Tests of input_pipeline.synthetic: Market layout, counts, determinism, stamp."""

import collections
import json
import os
import re

import numpy as np
from PIL import Image
import pytest

from input_pipeline import synthetic

_MARKET = re.compile(r'([-\d]+)_c(\d)')
_FULL_NAME = re.compile(r'^(-1|\d{4})_c([1-9])s(\d)_(\d{6})_(\d{2})\.jpg$')
_TINY = dict(num_train_ids=6, num_test_ids=6, train_images_per_id=(3, 5),
             gallery_images_per_camera=(1, 2), cameras_per_id=(2, 3), num_distractors=4,
             num_junk=3, num_workers=0)


def _parse(folder: str) -> list[tuple[str, int, int]]:
  """Returns (name, pid, camera) of every file of a split, as the Market readers do."""
  out = []
  for name in sorted(os.listdir(folder)):
    pid, cam = map(int, _MARKET.search(name).groups())
    out.append((name, pid, cam))
  return out


def _read_tree(root: str) -> dict[str, bytes]:
  """Returns relative path -> bytes of every image of a dataset."""
  out = {}
  for sub in (synthetic.TRAIN_DIR, synthetic.QUERY_DIR, synthetic.GALLERY_DIR):
    for name in sorted(os.listdir(os.path.join(root, sub))):
      with open(os.path.join(root, sub, name), 'rb') as f:
        out[f'{sub}/{name}'] = f.read()
  return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A tiny dataset generated once for the module: (root, counts)."""
  root = str(tmp_path_factory.mktemp('synthetic') / 'data')
  counts = synthetic.generate(root, seed=0, **_TINY)
  return root, counts


def test_layout_and_names(tiny):
  root, _ = tiny
  assert os.path.isfile(os.path.join(root, synthetic.COMPLETE_FILE))
  for sub in ('bounding_box_train', 'query', 'bounding_box_test'):
    names = os.listdir(os.path.join(root, sub))
    assert names
    for name in names:
      assert _FULL_NAME.match(name), name


def test_counts(tiny):
  root, counts = tiny
  train = _parse(os.path.join(root, 'bounding_box_train'))
  query = _parse(os.path.join(root, 'query'))
  gallery = _parse(os.path.join(root, 'bounding_box_test'))
  train_ids = {pid for _, pid, _ in train}
  query_ids = {pid for _, pid, _ in query}
  gallery_ids = {pid for _, pid, _ in gallery if pid > 0}
  assert len(train_ids) == counts['train_ids'] == 6
  assert len(query_ids) == counts['query_ids'] == 6
  assert gallery_ids == query_ids
  assert not train_ids & query_ids
  assert min(train_ids | query_ids) >= 1
  assert len(train) == counts['train_images']
  assert len(query) == counts['query_images']
  assert len(gallery) == counts['gallery_images']
  per_id = collections.Counter(pid for _, pid, _ in train)
  assert all(3 <= n <= 5 for n in per_id.values())
  # Every train identity is seen by at least two cameras.
  train_cams = collections.defaultdict(set)
  for _, pid, cam in train:
    train_cams[pid].add(cam)
  assert all(len(c) >= 2 for c in train_cams.values())


def test_junk_and_distractors(tiny):
  root, counts = tiny
  gallery = _parse(os.path.join(root, 'bounding_box_test'))
  pids = collections.Counter(pid for _, pid, _ in gallery)
  assert pids[0] == counts['distractors'] == 4
  assert pids[-1] == counts['junk'] == 3
  assert all(name.startswith('-1_c') for name, pid, _ in gallery if pid == -1)
  assert all(name.startswith('0000_c') for name, pid, _ in gallery if pid == 0)
  for sub in ('bounding_box_train', 'query'):
    assert all(pid > 0 for _, pid, _ in _parse(os.path.join(root, sub)))


def test_queries_have_cross_camera_matches(tiny):
  root, _ = tiny
  query = _parse(os.path.join(root, 'query'))
  gallery = _parse(os.path.join(root, 'bounding_box_test'))
  gallery_cams = collections.defaultdict(set)
  for _, pid, cam in gallery:
    gallery_cams[pid].add(cam)
  per_id_cam = collections.Counter((pid, cam) for _, pid, cam in query)
  assert max(per_id_cam.values()) == 1  # One query per identity per camera.
  for _, pid, cam in query:
    assert gallery_cams[pid] - {cam}, (pid, cam)
    assert cam in gallery_cams[pid]  # Queried in every camera the id appears in.
  assert len({cam for _, _, cam in query}) >= 2


def test_images_are_128x64_rgb_jpeg(tiny):
  root, _ = tiny
  for sub in ('bounding_box_train', 'query', 'bounding_box_test'):
    for name in os.listdir(os.path.join(root, sub)):
      with Image.open(os.path.join(root, sub, name)) as im:
        assert im.format == 'JPEG'
        assert im.mode == 'RGB'
        assert im.size == (64, 128)  # (width, height)


def test_deterministic(tiny, tmp_path):
  root, _ = tiny
  again = str(tmp_path / 'again')
  synthetic.generate(again, seed=0, **_TINY)
  assert _read_tree(again) == _read_tree(root)
  other = str(tmp_path / 'other')
  synthetic.generate(other, seed=1, **_TINY)
  a, b = _read_tree(root), _read_tree(other)
  assert sorted(a) != sorted(b)
  assert sorted(a.values()) != sorted(b.values())


def test_workers_do_not_change_output(tiny, tmp_path):
  root, _ = tiny
  pooled = str(tmp_path / 'pooled')
  synthetic.generate(pooled, seed=0, **dict(_TINY, num_workers=2))
  assert _read_tree(pooled) == _read_tree(root)


def test_idempotent_and_regenerates(tmp_path):
  root = str(tmp_path / 'data')
  params = dict(_TINY, num_train_ids=2, num_test_ids=2)
  counts = synthetic.generate(root, seed=3, **params)
  probe = os.path.join(root, synthetic.TRAIN_DIR, sorted(
      os.listdir(os.path.join(root, synthetic.TRAIN_DIR)))[0])
  os.utime(probe, (1, 1))
  assert synthetic.generate(root, seed=3, **params) == counts
  assert os.stat(probe).st_mtime == 1  # Skipped: nothing rewritten.

  with open(os.path.join(root, synthetic.COMPLETE_FILE)) as f:
    assert json.load(f)['counts'] == counts
  # Other parameters: the old images are replaced.
  counts = synthetic.generate(root, seed=3, **dict(params, num_junk=1))
  gallery = _parse(os.path.join(root, synthetic.GALLERY_DIR))
  assert sum(pid == -1 for _, pid, _ in gallery) == counts['junk'] == 1
  # An incomplete dataset (no stamp) is regenerated.
  os.remove(os.path.join(root, synthetic.COMPLETE_FILE))
  os.utime(probe, (1, 1))
  synthetic.generate(root, seed=3, **dict(params, num_junk=1))
  assert os.stat(probe).st_mtime != 1
  assert os.path.isfile(os.path.join(root, synthetic.COMPLETE_FILE))


def test_cli(tmp_path):
  root = str(tmp_path / 'cli')
  synthetic.main(['--out', root, '--seed', '0', '--num_train_ids', '2', '--num_test_ids',
                  '2', '--train_images_per_id', '2,3', '--num_distractors', '1',
                  '--num_junk', '1', '--num_workers', '0'])
  assert os.path.isfile(os.path.join(root, synthetic.COMPLETE_FILE))
  assert len({pid for _, pid, _ in _parse(os.path.join(root, 'query'))}) == 2


def test_invalid_parameters(tmp_path):
  with pytest.raises(ValueError):
    synthetic.generate(str(tmp_path / 'x'), cameras_per_id=(1, 2))
  with pytest.raises(ValueError):
    synthetic.generate(str(tmp_path / 'x'), num_cameras=10)


def test_identities_are_attribute_combinations():
  identities = synthetic.sample_identities(np.random.default_rng(0), 200)
  keys = np.asarray([identity.key() for identity in identities])
  distances = (keys[:, None] != keys[None]).sum(-1)
  np.fill_diagonal(distances, 99)
  assert distances.min() >= 2  # No two identities look alike...
  for field in ('upper', 'pattern', 'lower', 'lower_type', 'accessory', 'sleeves'):
    values = collections.Counter(getattr(identity, field) for identity in identities)
    assert min(values.values()) >= 5, field  # ...yet no attribute value identifies one.
