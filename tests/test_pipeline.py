"""Tests of the tf.data train / eval pipelines on tiny JPEG files."""

import collections

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import default
from input_pipeline import pipeline
from input_pipeline import sampler as sampler_lib
from input_pipeline.records import Record

HEIGHT, WIDTH = 32, 16
MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """12 identities with 1..7 images of 32x16 (some fewer than K = 4)."""
  root = tmp_path_factory.mktemp('jpegs')
  rng = np.random.default_rng(0)
  recs = []
  for pid in range(12):
    for j in range(1 + pid % 7):
      path = str(root / f'{pid:04d}_c{j % 3}_{j}.jpg')
      Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3)).astype(
          np.uint8)).save(path, quality=95)
      recs.append(Record(path, pid, j % 3))
  order = rng.permutation(len(recs))
  return [recs[i] for i in order]


def _config(batch_size=16, k=4, sampler='pk'):
  config = default.get_config()
  config.input.image_size = (HEIGHT, WIDTH)
  config.input.padding = 2
  config.batch_size = batch_size
  config.num_instances = k
  config.sampler = sampler
  config.test.batch_size = 8
  return config


def _collect(ds):
  batches = list(ds.as_numpy_iterator())
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def test_train_shapes_labels_and_sampler(records):
  config = _config()
  ds = pipeline.create_train_dataset(records, config, epoch=0,
                                     num_local_devices=4)
  out = _collect(ds)
  steps = pipeline.steps_per_epoch(records, config, 4)
  assert steps == sampler_lib.RandomIdentitySampler(
      [r.pid for r in records], 16, 4, 0, 4).steps_per_epoch
  assert out['image'].shape == (steps, 4, 4, HEIGHT, WIDTH, 3)
  assert out['image'].dtype == np.float32
  assert out['label'].dtype == np.int32 and out['label'].shape == (steps, 4, 4)
  # Each device holds whole identities: P / D = 1 identity x K = 4 images.
  labels = out['label']
  assert (labels == labels[..., :1]).all()
  # Labels are the pids of the sampler's batches, in order.
  expected = sampler_lib.RandomIdentitySampler(
      [r.pid for r in records], 16, 4, 0, 4).epoch_batches(0)
  pids = np.array([r.pid for r in records])
  np.testing.assert_array_equal(labels.reshape(steps, 16), pids[expected])
  assert set(labels.ravel().tolist()) == set(range(12))


def test_train_deterministic_and_epochs_differ(records):
  config = _config()
  a = _collect(pipeline.create_train_dataset(records, config, epoch=1,
                                             num_local_devices=2))
  b = _collect(pipeline.create_train_dataset(records, config, epoch=1,
                                             num_local_devices=2))
  c = _collect(pipeline.create_train_dataset(records, config, epoch=2,
                                             num_local_devices=2))
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(a['image'], c['image'])


def test_process_shards_disjoint_and_union_is_global_batch(records):
  config = _config(batch_size=16, k=2)
  whole = _collect(pipeline.create_train_dataset(
      records, config, epoch=0, num_local_devices=4))
  parts = [_collect(pipeline.create_train_dataset(
      records, config, epoch=0, num_local_devices=2, process_index=p,
      process_count=2)) for p in range(2)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(
        np.concatenate([p[key] for p in parts], axis=1), whole[key])
  # Disjoint: every (step, column) slot is read by exactly one process, and
  # the identities of the two processes differ within a step.
  for step in range(whole['label'].shape[0]):
    ids0 = set(parts[0]['label'][step].ravel().tolist())
    ids1 = set(parts[1]['label'][step].ravel().tolist())
    assert not ids0 & ids1


def test_train_steps_cap_and_bfloat16(records):
  config = _config()
  config.steps_per_epoch = 1
  assert pipeline.steps_per_epoch(records, config, 1) == 1
  out = _collect(pipeline.create_train_dataset(
      records, config, epoch=0, num_local_devices=1, dtype=tf.bfloat16))
  assert out['image'].shape == (1, 1, 16, HEIGHT, WIDTH, 3)
  assert out['image'].dtype == tf.bfloat16.as_numpy_dtype
  out = _collect(pipeline.create_train_dataset(
      records, config, epoch=0, num_local_devices=1, steps=3))
  assert out['label'].shape == (3, 1, 16)


def test_shuffle_sampler_and_validation(records):
  config = _config(batch_size=8, sampler='shuffle')
  out = _collect(pipeline.create_train_dataset(records, config, epoch=0,
                                               num_local_devices=4))
  assert out['label'].shape == (len(records) // 8, 4, 2)
  with pytest.raises(ValueError, match='config.sampler'):
    pipeline.create_train_dataset(records, _config(sampler='nope'), epoch=0,
                                  num_local_devices=1)
  with pytest.raises(ValueError, match='config.batch_size'):
    pipeline.create_train_dataset(records, _config(batch_size=12, k=4),
                                  epoch=0, num_local_devices=2)


def _reference_eval_image(path, height, width):
  """PIL decode + PIL bilinear resize + numpy normalisation (torchvision's)."""
  img = Image.open(path).convert('RGB').resize((width, height), Image.BILINEAR)
  return (np.asarray(img, np.float32) / 255.0 - MEAN) / STD


def test_eval_order_padding_and_values(records):
  config = _config()
  config.input.image_size = (2 * HEIGHT, 2 * WIDTH)
  n = len(records)  # 39 records: 5 batches of 8, the last one padded
  out = _collect(pipeline.create_eval_dataset(records, config,
                                              num_local_devices=4))
  num_batches = -(-n // 8)
  assert out['image'].shape == (num_batches, 4, 2, 2 * HEIGHT, 2 * WIDTH, 3)
  assert out['mask'].dtype == bool and out['index'].dtype == np.int32
  flat_index = out['index'].reshape(-1)
  flat_mask = out['mask'].reshape(-1)
  np.testing.assert_array_equal(flat_index[:n], np.arange(n))
  assert (flat_index[n:] == -1).all() and flat_mask.sum() == n
  np.testing.assert_array_equal(flat_mask, flat_index >= 0)
  images = out['image'].reshape(-1, 2 * HEIGHT, 2 * WIDTH, 3)
  assert (images[n:] == 0).all()
  # JPEG decoding and the 2x upscale are bit-exact with PIL: only float
  # rounding of the normalisation differs.
  for i in (0, 7, n - 1):
    np.testing.assert_allclose(
        images[i], _reference_eval_image(records[i].path, 2 * HEIGHT,
                                         2 * WIDTH), atol=1e-5)


def test_decode_png_and_jpeg(tmp_path):
  img = np.random.default_rng(1).integers(0, 256, (20, 10, 3)).astype(np.uint8)
  Image.fromarray(img).save(tmp_path / 'a.png')
  Image.fromarray(img).save(tmp_path / 'a.jpg', quality=75)
  png = pipeline.decode_image(tf.io.read_file(str(tmp_path / 'a.png')))
  np.testing.assert_array_equal(png.numpy(), img)
  jpg = pipeline.decode_image(tf.io.read_file(str(tmp_path / 'a.jpg')))
  np.testing.assert_array_equal(
      jpg.numpy(), np.asarray(Image.open(tmp_path / 'a.jpg').convert('RGB')))


def test_eval_processes_cover_every_image_once(records):
  config = _config()
  seen = []
  for p in range(2):
    out = _collect(pipeline.create_eval_dataset(
        records, config, num_local_devices=2, process_index=p,
        process_count=2, dtype=tf.bfloat16))
    assert out['image'].shape[1:] == (2, 2, HEIGHT, WIDTH, 3)
    seen += out['index'][out['mask']].tolist()
  assert collections.Counter(seen) == collections.Counter(range(len(records)))
  with pytest.raises(ValueError, match='config.test.batch_size'):
    pipeline.create_eval_dataset(records, config, num_local_devices=3)


def test_in_memory_loader_matches_files(records):
  config = _config()
  encoded = [open(r.path, 'rb').read() for r in records]
  from_files = _collect(pipeline.create_train_dataset(
      records, config, epoch=0, num_local_devices=2))
  from_memory = _collect(pipeline.create_train_dataset(
      [r._replace(path='') for r in records], config, epoch=0,
      num_local_devices=2, load_image=pipeline.in_memory_loader(encoded)))
  np.testing.assert_array_equal(from_files['image'], from_memory['image'])


def test_prefetch_to_device(records):
  config = _config()
  devices = jax.local_devices()
  assert len(devices) == 4  # tests/conftest.py
  ds = pipeline.create_train_dataset(records, config, epoch=0,
                                     num_local_devices=len(devices))
  host = list(ds.as_numpy_iterator())
  for source in (ds, iter(ds)):  # a Dataset, or an iterator of tf tensors
    on_device = list(pipeline.prefetch_to_device(source, size=2))
    assert len(on_device) == len(host)
    for h, d in zip(host, on_device):
      assert isinstance(d['image'], jax.Array)
      assert len(d['image'].sharding.device_set) == 4
      np.testing.assert_array_equal(np.asarray(d['image']), h['image'])
      np.testing.assert_array_equal(np.asarray(d['label']), h['label'])
