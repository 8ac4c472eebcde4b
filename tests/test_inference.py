"""Export, inference, extraction and ranking outside the training code.

A tiny ResNet-18 (one block per stage, width 8, 64x32 images) with perturbed BN
statistics is saved as a training run would (orbax checkpoint + config.json). Every
feature is compared with a reference computed here from the definition: numpy
normalisation, the flax model's apply in eval mode, numpy flip-averaging and L2
normalisation; images decoded and resized with PIL.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from configs import default as default_config
from eval import report
from input_pipeline import reader_utils
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import export as export_lib
from reid_jax import extract as extract_lib
from reid_jax import inference
from reid_jax import models
from reid_jax import rank as rank_lib
from reid_jax import train_step as step_lib

IMAGE_SIZE = (64, 32)
NUM_CLASSES = 7
STEP = 5


def _config():
  config = default_config.get_config()
  config.model.name = 'resnet18'
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 8
  config.input.image_size = IMAGE_SIZE
  config.input.pixel_mean = (0.5, 0.4, 0.3)
  config.input.pixel_std = (0.2, 0.25, 0.3)
  config.test.flip = True
  config.test.feat_norm = True
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir with config.json and a checkpoint at step 5, and the model's variables."""
  workdir = tmp_path_factory.mktemp('workdir')
  config = _config()
  model = models.create_model(config.model, NUM_CLASSES)
  state = step_lib.create_train_state(jax.random.key(0), model, optax.sgd(0.1), IMAGE_SIZE,
                                      NUM_CLASSES, use_center=True)
  rng = np.random.default_rng(0)
  # Non-trivial running statistics and neck scale, so 'after' differs from 'before'.
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda p, v: (rng.uniform(0.5, 2.0, v.shape) if p[-1].key == 'var'
                    else rng.normal(0, 0.3, v.shape)).astype(np.float32), state.batch_stats)
  params = jax.tree.map(np.asarray, state.params)
  params['bottleneck']['scale'] = rng.uniform(0.5, 2.0, (model.feature_dim,)).astype(np.float32)
  state = state.replace(step=STEP, params=params, batch_stats=batch_stats)
  checkpoint_lib.save(checkpoint_lib.create_manager(str(workdir)), state, wait=True)
  (workdir / 'config.json').write_text(config.to_json())
  variables = {'params': step_lib.model_params(params), 'batch_stats': batch_stats}
  return {'workdir': str(workdir), 'config': config, 'model': model,
          'variables': variables}


@functools.lru_cache(maxsize=None)
def _eval_apply(model, neck_feat):
  """The flax model's apply in eval mode, jitted once per neck_feat."""
  model = model.clone(neck_feat=neck_feat)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def _reference(run, images, flip=True, feat_norm=True, neck_feat='after'):
  """Features from the definition: numpy normalisation, model apply, flip, L2."""
  config = run['config']
  mean = np.asarray(config.input.pixel_mean, np.float32)
  std = np.asarray(config.input.pixel_std, np.float32)
  x = ((np.asarray(images, np.float32) / np.float32(255) - mean) / std).astype(np.float32)
  apply = _eval_apply(run['model'], neck_feat)
  feats = np.asarray(apply(run['variables'], x), np.float64)
  if flip:
    feats = 0.5 * (feats + np.asarray(apply(run['variables'], x[:, :, ::-1]), np.float64))
  if feat_norm:
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
  return feats


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """The run exported through the CLI (--workdir, config.json)."""
  out = str(tmp_path_factory.mktemp('export') / 'model.jaxexport')
  meta = export_lib.main(['export', '--workdir', run['workdir'], '--out', out])
  return out, meta


@pytest.fixture(scope='module')
def model(exported):
  return inference.load(exported[0])


def _images(n, size=IMAGE_SIZE, seed=1):
  """Smooth random colour images (JPEG-friendly, each distinct)."""
  rng = np.random.default_rng(seed)
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  out = []
  for _ in range(n):
    a = rng.uniform(-3, 3, (3, 3))
    base = rng.uniform(40, 215, 3)
    img = base + 40 * np.sin(a[:, 0] * yy[..., None] * 6 + a[:, 1] * xx[..., None] * 6 + a[:, 2])
    img += rng.normal(0, 8, img.shape)
    out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
  return np.stack(out)


def test_export_writes_metadata(exported, run):
  path, meta = exported
  with open(path + '.json') as f:
    on_disk = json.load(f)
  assert on_disk == meta
  assert meta['format_version'] == inference.FORMAT_VERSION == 1
  assert meta['image_size'] == list(IMAGE_SIZE)
  assert meta['feature_dim'] == 64  # 8 * 2**3 channels of a basic-block ResNet
  assert meta['num_classes'] == NUM_CLASSES
  assert meta['step'] == STEP
  assert meta['checkpoint'].endswith(os.path.join('checkpoints', str(STEP)))
  assert meta['flip'] is True and meta['feat_norm'] is True
  assert meta['pixel_mean'] == pytest.approx([0.5, 0.4, 0.3])
  assert meta['config']['model']['width'] == 8
  assert set(meta['platforms']) >= {'cpu', 'cuda', 'tpu'}


def test_fresh_process_features_match_eval_at_two_batch_sizes(exported, run, tmp_path):
  images = _images(5)
  np.save(tmp_path / 'images.npy', images)
  script = f"""
import sys
import numpy as np
import jax
import reid_jax.inference as I
m = I.load({exported[0]!r})
x = np.load({str(tmp_path / 'images.npy')!r})
np.save({str(tmp_path / 'b2.npy')!r}, m(x[:2]))
np.save({str(tmp_path / 'b5.npy')!r}, m(x))
TRAINING = ('optax', 'orbax', 'flax', 'ml_collections', 'reid_jax.models',
            'reid_jax.train_step', 'reid_jax.train')
for name in TRAINING + ('tensorflow',):
  assert name not in sys.modules, name
import reid_jax.extract, reid_jax.rank  # the CLIs need no training code either
for name in TRAINING:
  assert name not in sys.modules, name
print('ok', m.image_size, m.feature_dim)
"""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ok (64, 32) 64' in result.stdout
  ref = _reference(run, images)
  b2, b5 = np.load(tmp_path / 'b2.npy'), np.load(tmp_path / 'b5.npy')
  assert b2.dtype == np.float32 and b2.shape == (2, 64) and b5.shape == (5, 64)
  np.testing.assert_allclose(b5, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b2, ref[:2], rtol=1e-5, atol=1e-6)
  # The test feature is the BN output, flip-averaged: not the unflipped feature.
  assert np.abs(ref - _reference(run, images, flip=False)).max() > 1e-3
  assert np.abs(ref - _reference(run, images, neck_feat='before')).max() > 1e-3


def test_model_rejects_wrong_input(model):
  with pytest.raises(ValueError, match=r'uint8 images of shape \(N, 64, 32, 3\)'):
    model(np.zeros((2, 64, 32, 3), np.float32))
  with pytest.raises(ValueError, match='float32'):
    model(np.zeros((2, 32, 32, 3), np.float32))


def test_saved_model_matches_jax(run, model, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'saved')
  meta = export_lib.main(['export', '--workdir', run['workdir'], '--out', out,
                          '--format', 'saved_model', '--platforms', 'cpu'])
  assert meta['format'] == 'saved_model'
  assert os.path.isfile(os.path.join(out, inference.SAVED_MODEL_METADATA))
  images = _images(4, seed=2)
  jax_feats = model(images)
  # TensorFlow alone: the serving signature, two batch sizes.
  loaded = tf.saved_model.load(out)
  serve = loaded.signatures['serving_default']
  for n in (1, 4):
    tf_feats = serve(images=tf.constant(images[:n]))['features'].numpy()
    np.testing.assert_allclose(tf_feats, jax_feats[:n], rtol=1e-5, atol=1e-6)
  # And through inference.load / extract.
  tf_model = inference.load(out)
  assert tf_model.image_size == IMAGE_SIZE and tf_model.feature_dim == 64
  np.testing.assert_allclose(inference.extract(tf_model, images, batch_size=3),
                             _reference(run, images), rtol=1e-5, atol=1e-6)


def _write_jpegs(folder, names, images, quality=90):
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, img in zip(names, images):
    path = folder / name
    Image.fromarray(img).save(path, format='JPEG', quality=quality)
    paths.append(str(path))
  return paths


def _pil_eval_images(paths, size=IMAGE_SIZE):
  """Decode with PIL and resize with PIL's bilinear filter (torchvision's Resize)."""
  out = []
  for p in paths:
    with Image.open(p) as img:
      out.append(np.asarray(img.convert('RGB').resize((size[1], size[0]), Image.BILINEAR)))
  return np.stack(out)


def test_extract_folder_resizes_like_evaluation(model, run, exported, tmp_path):
  # 32x16 JPEGs: the 2x upscale to 64x32 is where transforms.resize is bit-exact with PIL.
  names = [f'{pid:04d}_c{cam}s1_{i:06d}_00.jpg'
           for i, (pid, cam) in enumerate([(1, 1), (1, 2), (2, 3), (-1, 1), (10, 6)])]
  paths = _write_jpegs(tmp_path / 'images', names, _images(5, size=(32, 16), seed=3))
  expected_images = _pil_eval_images(sorted(paths))
  np.testing.assert_array_equal(inference.load_images(str(tmp_path / 'images'), IMAGE_SIZE),
                                expected_images)
  out = str(tmp_path / 'features.npz')
  extract_lib.main(['extract', '--model', exported[0], '--images', str(tmp_path / 'images'),
                    '--out', out, '--batch_size', '2', '--noprogress'])
  data = extract_lib.load_features(out)
  assert data['paths'] == sorted(paths)
  assert data['features'].dtype == np.float32
  np.testing.assert_allclose(data['features'], _reference(run, expected_images),
                             rtol=1e-5, atol=1e-6)
  # Sorted names: -001_c1, 0001_c1, 0001_c2, 0002_c3, 0010_c6; camids from 0.
  np.testing.assert_array_equal(data['pids'], [-1, 1, 1, 2, 10])
  np.testing.assert_array_equal(data['camids'], [0, 0, 1, 2, 5])
  assert data['model']['fingerprint'] == exported[1]['fingerprint']


def test_extract_arrays_and_lists(model, run, tmp_path):
  images = _images(5, seed=4)
  ref = _reference(run, images)
  # A batch at the model's size, padded last batch (5 = 2 + 2 + 1).
  np.testing.assert_allclose(inference.extract(model, images, batch_size=2), ref,
                             rtol=1e-5, atol=1e-6)
  # Single arrays of another size are resized (2x: exact), mixed with files.
  small = _images(2, size=(32, 16), seed=5)
  png = tmp_path / 'b.png'  # lossless: decodes to small[1]
  Image.fromarray(small[1]).save(png)
  feats = inference.extract(model, [small[0], str(png)], batch_size=4)
  np.testing.assert_allclose(feats, _reference(run, _pil_eval_images_from_arrays(small)),
                             rtol=1e-5, atol=1e-6)
  assert extract_lib.parse_identities(['0001_c1s1_0.jpg', 'x.jpg']) is None
  assert inference.IMAGE_EXTENSIONS == reader_utils.IMAGE_EXTENSIONS  # kept in step by hand
  with pytest.raises(FileNotFoundError, match='do not exist'):
    inference.extract(model, [str(tmp_path / 'missing.jpg')])
  with pytest.raises(ValueError, match='image\\[None\\]'):
    inference.extract(model, images[0])


def _pil_eval_images_from_arrays(images, size=IMAGE_SIZE):
  return np.stack([np.asarray(Image.fromarray(x).resize((size[1], size[0]), Image.BILINEAR))
                   for x in images])


@pytest.fixture(scope='module')
def gallery(tmp_path_factory):
  """A query and a gallery holding an exact copy of it under another camera."""
  root = tmp_path_factory.mktemp('rank')
  imgs = _images(6, size=(64, 32), seed=6)
  query = _write_jpegs(root / 'query', ['0001_c1s1_000001_00.jpg'], imgs[:1])[0]
  gdir = root / 'gallery'
  gdir.mkdir()
  data = open(query, 'rb').read()
  for name in ('0001_c3s1_000100_00.jpg',   # exact copy, other camera: rank 1
               '0001_c1s1_000200_00.jpg'):  # exact copy, same camera: left out
    (gdir / name).write_bytes(data)
  _write_jpegs(gdir, ['0002_c2s1_000001_00.jpg', '0003_c2s1_000001_00.jpg',
                      '0004_c4s1_000001_00.jpg', '0001_c5s1_000001_00.jpg'], imgs[1:5])
  return query, str(gdir)


def test_rank_puts_the_copy_first(exported, run, gallery, tmp_path):
  query, gdir = gallery
  out = str(tmp_path / 'ranked.png')
  ranking = rank_lib.main(['rank', '--model', exported[0], '--query', query, '--gallery', gdir,
                           '--topk', '3', '--out', out, '--noprogress'])
  g_paths = inference.list_images(gdir)
  assert ranking.gallery_paths == g_paths
  copy = g_paths.index(os.path.join(gdir, '0001_c3s1_000100_00.jpg'))
  same_cam = g_paths.index(os.path.join(gdir, '0001_c1s1_000200_00.jpg'))
  assert ranking.indices[0, 0] == copy
  assert same_cam not in ranking.indices[0]
  assert ranking.match[0, 0]
  # Distances from reference features (PIL decoding; no resize at 64x32), float64.
  q_ref = _reference(run, _pil_eval_images([query]))
  g_ref = _reference(run, _pil_eval_images(g_paths))
  d_ref = np.linalg.norm(q_ref[:, None] - g_ref[None], axis=-1)[0]
  kept = [g for g in np.argsort(d_ref, kind='stable') if g != same_cam][:3]
  np.testing.assert_array_equal(ranking.indices[0], kept)
  np.testing.assert_allclose(ranking.distances[0], d_ref[kept], atol=2e-3)
  assert d_ref[kept[1]] > 1e-2  # the copy's distance 0 is not a tie
  np.testing.assert_array_equal(ranking.match[0],
                                [os.path.basename(g_paths[g]).startswith('0001_') for g in kept])
  with Image.open(out) as img:
    assert img.size == report.grid_size(1, 3, (128, 64))
    x, y = report.grid_cell_origin(0, 1, (128, 64))
    assert img.convert('RGB').getpixel((x + 1, y + 1)) == report.MATCH_COLOUR
    x, y = report.grid_cell_origin(0, 0, (128, 64))
    assert img.convert('RGB').getpixel((x + 1, y + 1)) == report.QUERY_COLOUR


def test_rank_from_features_npz_and_keep_same_camera(model, gallery, tmp_path):
  query, gdir = gallery
  npz = str(tmp_path / 'gallery.npz')
  extract_lib.extract_folder(model, gdir, npz, progress=False)
  direct = rank_lib.rank(model, query, gdir, topk=6)
  from_npz = rank_lib.rank(model, query, npz, topk=6)
  np.testing.assert_array_equal(from_npz.indices, direct.indices)
  np.testing.assert_allclose(from_npz.distances, direct.distances, atol=1e-6)
  assert direct.indices[0, -1] == -1 and np.isnan(direct.distances[0, -1])  # 5 kept of 6
  q_npz = str(tmp_path / 'query.npz')
  extract_lib.extract_folder(model, query, q_npz, progress=False)
  # Both sides from .npz: no model needed.
  kept_all = rank_lib.rank(None, q_npz, npz, topk=2, exclude_same_camera=False)
  names = {os.path.basename(direct.gallery_paths[g]) for g in kept_all.indices[0]}
  assert names == {'0001_c3s1_000100_00.jpg', '0001_c1s1_000200_00.jpg'}
  np.testing.assert_allclose(kept_all.distances[0], 0.0, atol=2e-3)
  # The gallery against itself: no file is its own match; the two copies find each other.
  self_rank = rank_lib.rank(None, npz, npz, topk=1, exclude_same_camera=False)
  assert all(self_rank.indices[i, 0] != i for i in range(len(self_rank.query_paths)))
  names = [os.path.basename(p) for p in self_rank.gallery_paths]
  a, b = names.index('0001_c3s1_000100_00.jpg'), names.index('0001_c1s1_000200_00.jpg')
  assert self_rank.indices[a, 0] == b and self_rank.indices[b, 0] == a


def test_export_with_config_file_and_overrides(run, tmp_path):
  config_py = tmp_path / 'tiny.py'
  config_py.write_text(
      'from configs import default\n'
      'def get_config():\n'
      '  c = default.get_config()\n'
      "  c.model.name = 'resnet18'\n"
      '  c.model.stage_sizes = (1, 1, 1, 1)\n'
      '  c.model.width = 8\n'
      f'  c.input.image_size = {IMAGE_SIZE}\n'
      '  c.input.pixel_mean = (0.5, 0.4, 0.3)\n'
      '  c.input.pixel_std = (0.2, 0.25, 0.3)\n'
      '  return c\n')
  out = str(tmp_path / 'm.jaxexport')
  ckpt = os.path.join(run['workdir'], 'checkpoints', str(STEP))
  meta = export_lib.main(['export', '--checkpoint', ckpt, f'--config={config_py}',
                          '--config.model.neck_feat=before', '--set', 'test.feat_norm=False',
                          '--out', out, '--platforms', 'cpu'])
  assert meta['flip'] is False and meta['feat_norm'] is False
  images = _images(3, seed=7)
  np.testing.assert_allclose(
      inference.load(out)(images),
      _reference(run, images, flip=False, feat_norm=False, neck_feat='before'),
      rtol=1e-5, atol=1e-5)


def test_export_errors(run, tmp_path):
  with pytest.raises(SystemExit, match='exactly one of --workdir or --checkpoint'):
    export_lib.main(['export', '--out', str(tmp_path / 'x')])
  bare = tmp_path / 'bare'
  (bare / 'checkpoints').mkdir(parents=True)
  os.symlink(os.path.join(run['workdir'], 'checkpoints', str(STEP)),
             bare / 'checkpoints' / str(STEP))
  with pytest.raises(SystemExit, match='config.json'):
    export_lib.main(['export', '--workdir', str(bare), '--out', str(tmp_path / 'x')])
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    export_lib.load_checkpoint(str(tmp_path))
  wrong = _config()
  wrong.model.width = 16
  variables, _, _ = export_lib.load_checkpoint(run['workdir'])
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match=r'64 differences.*\n.*backbone/bn1/mean: checkpoint \(8,\), model \(16,\)'):
    export_lib.export_model(wrong, variables, str(tmp_path / 'y.jaxexport'))
  with pytest.raises(ValueError, match='no field'):
    export_lib.apply_overrides(wrong, ['test.fliip=True'])
  with pytest.raises(FileNotFoundError, match='reid_jax.export'):
    inference.load(str(tmp_path / 'none.jaxexport'))
