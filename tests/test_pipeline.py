"""Tests of the host input pipelines (train stream, eval batches, device prefetch).

References are independent of the code under test: PIL for decoding and the 2x
resize, the resize written out in the test for other sizes, the sampler classes
called directly for the batch composition.
"""

import collections
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import default
from input_pipeline import cache as cache_lib
from input_pipeline import decode
from input_pipeline import pipeline
from input_pipeline import sampler as sampler_lib
from input_pipeline.records import Record

SRC_H, SRC_W = 32, 16      # most source images; 2x = the training size
ODD_H, ODD_W = 24, 13      # a few others: the general resize path
HEIGHT, WIDTH = 64, 32     # training size
SPE = 3                    # steps per epoch used by the stream tests


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """12 identities with 1..7 JPEGs (some fewer than K = 4), a few odd-sized."""
  root = tmp_path_factory.mktemp('jpegs')
  rng = np.random.default_rng(0)
  recs = []
  for pid in range(12):
    for j in range(1 + pid % 7):
      shape = (ODD_H, ODD_W) if (pid + j) % 5 == 0 else (SRC_H, SRC_W)
      path = str(root / f'{pid:04d}_c{j % 3}_{j}.jpg')
      Image.fromarray(rng.integers(0, 256, shape + (3,)).astype(np.uint8)).save(
          path, quality=95)
      recs.append(Record(path, pid, j % 3))
  order = rng.permutation(len(recs))
  return [recs[i] for i in order]


def _reference_resize(img, height, width):
  """PIL for power-of-two upscales (bit-exact); otherwise the two antialiased
  float passes with rounding after each, as the pipeline computed before."""
  if (height % img.shape[0] == 0 and width % img.shape[1] == 0
      and (height // img.shape[0]) in (1, 2, 4) and (width // img.shape[1]) in (1, 2, 4)):
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))
  x = tf.cast(tf.constant(img), tf.float32)
  x = tf.image.resize(x, (img.shape[0], width), 'bilinear', antialias=True)
  x = tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)
  x = tf.image.resize(x, (height, width), 'bilinear', antialias=True)
  return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0).numpy().astype(np.uint8)


@pytest.fixture(scope='module')
def reference_images(records):
  """PIL-decoded, resized uint8 image of every record."""
  return np.stack([
      _reference_resize(np.asarray(Image.open(r.path).convert('RGB')), HEIGHT, WIDTH)
      for r in records])


def _config(batch_size=16, k=4, sampler='pk'):
  config = default.get_config()
  config.input.image_size = (HEIGHT, WIDTH)
  config.input.cache = 'none'
  config.input.cache_max_gb = 16.0
  config.batch_size = batch_size
  config.num_instances = k
  config.sampler = sampler
  config.test.batch_size = 8
  return config


def _stack(batches):
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def _stream(records, config, *, start=0, num=2 * SPE, devices=4, **kwargs):
  return pipeline.create_train_stream(
      records, config, steps_per_epoch=SPE, start_step=start, num_steps=num,
      num_local_devices=devices, **kwargs)


def _expected(records, config, num_shards, start, num):
  """Index / epoch / position of global steps [start, start + num), (num, B),
  from the sampler class directly."""
  pids = [r.pid for r in records]
  if config.sampler == 'pk':
    sampler = sampler_lib.RandomIdentitySampler(
        pids, config.batch_size, config.num_instances, config.seed, num_shards)
  else:
    sampler = sampler_lib.ShuffleSampler(len(pids), config.batch_size, config.seed,
                                         num_shards)
  index, epoch, position = [], [], []
  for step in range(start, start + num):
    e, s = divmod(step, SPE)
    index.append(sampler.epoch_batches(e, num_steps=SPE)[s])
    epoch.append(np.full(config.batch_size, e))
    position.append(s * config.batch_size + np.arange(config.batch_size))
  return np.stack(index), np.stack(epoch), np.stack(position)


def _counting_loader(calls):
  """A load_image hook that records every index it decodes."""
  def note(index):
    calls.append(int(index.numpy()))
    return index

  def load(path, index):
    noted = tf.py_function(note, [index], tf.int64)
    with tf.control_dependencies([noted]):
      return decode.decode_image(tf.io.read_file(path))
  return load


@pytest.mark.parametrize('cache', ['none', 'host'])
def test_train_stream_images_equal_pil_decode_and_resize(records, reference_images, cache):
  config = _config()
  stream = _stream(records, config, devices=2, cache=cache)
  out = _stack(list(stream))
  assert out['image'].dtype == np.uint8
  assert out['image'].shape == (2 * SPE, 2, 8, HEIGHT, WIDTH, 3)
  for key in ('label', 'epoch', 'position', 'index'):
    assert out[key].dtype == np.int32 and out[key].shape == (2 * SPE, 2, 8)
  images = out['image'].reshape(-1, HEIGHT, WIDTH, 3)
  np.testing.assert_array_equal(images, reference_images[out['index'].reshape(-1)])
  # Both resize paths are exercised.
  sizes = {Image.open(records[i].path).size for i in out['index'].ravel()}
  assert sizes == {(SRC_W, SRC_H), (ODD_W, ODD_H)}


@pytest.mark.parametrize('devices,processes', [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_stream_follows_sampler_across_epochs(records, devices, processes):
  config = _config()
  start, num = 1, 2 * SPE + 1  # starts inside epoch 0, ends inside epoch 2
  parts = [_stack(list(_stream(records, config, start=start, num=num,
                               devices=devices, process_index=p,
                               process_count=processes)))
           for p in range(processes)]
  # Concatenated over processes and devices: the global batch, in order.
  whole = {k: np.concatenate([p[k] for p in parts], axis=1).reshape(num, -1)
           for k in ('index', 'label', 'epoch', 'position')}
  index, epoch, position = _expected(records, config, devices * processes, start, num)
  np.testing.assert_array_equal(whole['index'], index)
  pids = np.array([r.pid for r in records])
  np.testing.assert_array_equal(whole['label'], pids[index])
  np.testing.assert_array_equal(whole['epoch'], epoch)
  np.testing.assert_array_equal(whole['position'], position)
  assert set(np.unique(epoch)) == {0, 1, 2}
  # PK: every device slice holds whole identities (K = 4 consecutive images).
  for p in parts:
    labels = p['label'].reshape(num, devices, -1, 4)
    assert (labels == labels[..., :1]).all()


def test_shuffle_sampler_stream(records):
  config = _config(batch_size=8, sampler='shuffle')
  out = _stack(list(_stream(records, config, num=SPE + 1, devices=4)))
  index, _, _ = _expected(records, config, 4, 0, SPE + 1)
  np.testing.assert_array_equal(out['index'].reshape(SPE + 1, 8), index)


@pytest.mark.parametrize('cache', ['none', 'host'])
def test_resumed_stream_is_the_tail_and_reads_no_skipped_batch(records, cache):
  config = _config(batch_size=8, k=2)
  spe, start, total = 5, 7, 12
  run = lambda s, n, hook=None: _stack(list(pipeline.create_train_stream(
      records, config, steps_per_epoch=spe, start_step=s, num_steps=n,
      num_local_devices=2, load_image=hook, cache=cache)))
  full = run(0, total)
  calls = []
  resumed = run(start, total - start, _counting_loader(calls))
  for key in full:
    np.testing.assert_array_equal(resumed[key], full[key][start:])
  yielded = resumed['index'].ravel().tolist()
  if cache == 'none':  # every yielded image decoded once, nothing else
    assert collections.Counter(calls) == collections.Counter(yielded)
  else:  # every distinct yielded image decoded once
    assert sorted(calls) == sorted(set(yielded))


def test_cached_equals_uncached_over_epochs(records):
  config = _config()
  calls = {'none': [], 'host': []}
  out = {}
  for cache in calls:
    stream = _stream(records, config, num=4 * SPE, devices=2, cache=cache,
                     load_image=_counting_loader(calls[cache]))
    assert stream.cache.mode == cache
    out[cache] = _stack(list(stream))
  for key in out['none']:
    np.testing.assert_array_equal(out['host'][key], out['none'][key])
  assert len(calls['none']) == 4 * SPE * 16
  assert sorted(calls['host']) == sorted(set(out['none']['index'].ravel().tolist()))


def test_choose_cache_modes_and_log(records, caplog):
  size = len(records) * HEIGHT * WIDTH * 3
  tiny = cache_lib.choose_cache('auto', len(records), (HEIGHT, WIDTH), size / 2e9)
  assert tiny.mode == 'none' and tiny.nbytes == size
  fits = cache_lib.choose_cache('auto', len(records), (HEIGHT, WIDTH), size / 1e9)
  assert fits.mode == 'host' and fits.nbytes == size
  forced = cache_lib.choose_cache('host', len(records), (HEIGHT, WIDTH), 0.0)
  assert forced.mode == 'host'
  veri_wild = cache_lib.choose_cache('auto', 277_797, (256, 128), 16)
  assert veri_wild.mode == 'none' and veri_wild.nbytes == 277_797 * 256 * 128 * 3
  with pytest.raises(ValueError, match='config.input.cache'):
    cache_lib.choose_cache('disk', 1, (2, 2), 1.0)
  config = _config()
  config.input.cache = 'auto'
  config.input.cache_max_gb = size / 2e9
  with caplog.at_level(logging.INFO):
    stream = _stream(records, config, num=1)
  assert stream.cache.mode == 'none' and stream.cache.nbytes == size
  assert f'{size / 1e9:.2f} GB' in caplog.text and 'auto' in caplog.text


def test_train_stream_validation(records):
  with pytest.raises(ValueError, match='config.sampler'):
    _stream(records, _config(sampler='nope'))
  with pytest.raises(ValueError, match='not divisible'):
    _stream(records, _config(batch_size=12, k=4), devices=8)
  with pytest.raises(ValueError, match='start_step'):
    _stream(records, _config(), start=-1)
  with pytest.raises(ValueError, match='config.input.cache'):
    _stream(records, _config(), cache='ram')
  assert list(_stream(records, _config(), num=0)) == []


def test_in_memory_loader_matches_files(records):
  config = _config()
  encoded = [open(r.path, 'rb').read() for r in records]
  from_files = _stack(list(_stream(records, config, num=2, devices=2)))
  from_memory = _stack(list(_stream(
      [r._replace(path='') for r in records], config, num=2, devices=2,
      load_image=decode.in_memory_loader(encoded))))
  np.testing.assert_array_equal(from_files['image'], from_memory['image'])


def test_eval_order_padding_and_values(records, reference_images):
  config = _config()
  n = len(records)  # 39 records: 5 batches of 8, the last one padded
  out = _stack(list(pipeline.create_eval_dataset(
      records, config, num_local_devices=4).as_numpy_iterator()))
  num_batches = -(-n // 8)
  assert out['image'].shape == (num_batches, 4, 2, HEIGHT, WIDTH, 3)
  assert out['image'].dtype == np.uint8
  assert out['mask'].dtype == bool and out['index'].dtype == np.int32
  flat_index = out['index'].reshape(-1)
  flat_mask = out['mask'].reshape(-1)
  np.testing.assert_array_equal(flat_index[:n], np.arange(n))
  assert (flat_index[n:] == -1).all() and flat_mask.sum() == n
  np.testing.assert_array_equal(flat_mask, flat_index >= 0)
  images = out['image'].reshape(-1, HEIGHT, WIDTH, 3)
  assert (images[n:] == 0).all()
  np.testing.assert_array_equal(images[:n], reference_images)


def test_eval_processes_cover_every_image_once(records):
  config = _config()
  seen = []
  for p in range(2):
    out = _stack(list(pipeline.create_eval_dataset(
        records, config, num_local_devices=2, process_index=p,
        process_count=2).as_numpy_iterator()))
    assert out['image'].shape[1:] == (2, 2, HEIGHT, WIDTH, 3)
    seen += out['index'][out['mask']].tolist()
  assert collections.Counter(seen) == collections.Counter(range(len(records)))
  with pytest.raises(ValueError, match='config.test.batch_size'):
    pipeline.create_eval_dataset(records, config, num_local_devices=3)


def test_decode_png_and_jpeg(tmp_path):
  img = np.random.default_rng(1).integers(0, 256, (20, 10, 3)).astype(np.uint8)
  Image.fromarray(img).save(tmp_path / 'a.png')
  Image.fromarray(img).save(tmp_path / 'a.jpg', quality=75)
  png = decode.decode_image(tf.io.read_file(str(tmp_path / 'a.png')))
  np.testing.assert_array_equal(png.numpy(), img)
  jpg = decode.decode_image(tf.io.read_file(str(tmp_path / 'a.jpg')))
  np.testing.assert_array_equal(
      jpg.numpy(), np.asarray(Image.open(tmp_path / 'a.jpg').convert('RGB')))


def _host_batches(num, devices=4):
  rng = np.random.default_rng(3)
  return [{'image': rng.integers(0, 256, (devices, 2, 4, 3, 3), dtype=np.uint8),
           'label': rng.integers(0, 9, (devices, 2)).astype(np.int32)}
          for _ in range(num)]


def test_prefetch_to_device_values_and_sharding():
  devices = jax.local_devices()
  assert len(devices) == 4  # tests/conftest.py
  host = _host_batches(5)
  as_tf = ({k: tf.constant(v) for k, v in b.items()} for b in host)
  for source in (host, as_tf):
    on_device = list(pipeline.prefetch_to_device(source, size=2))
    assert len(on_device) == len(host)
    for h, d in zip(host, on_device):
      for key in h:
        assert isinstance(d[key], jax.Array)
        assert d[key].sharding.device_set == set(devices)
        for i, shard in enumerate(sorted(d[key].addressable_shards,
                                         key=lambda s: s.index[0].start)):
          assert shard.device == devices[i]
          np.testing.assert_array_equal(np.asarray(shard.data)[0], h[key][i])
        np.testing.assert_array_equal(np.asarray(d[key]), h[key])


def test_prefetch_to_device_sends_only_the_given_keys():
  host = [dict(b, index=np.arange(8, dtype=np.int32).reshape(4, 2))
          for b in _host_batches(2)]
  on_device = list(pipeline.prefetch_to_device(host, size=1, keys=('image', 'label')))
  for h, d in zip(host, on_device):
    assert sorted(d) == ['image', 'label']
    np.testing.assert_array_equal(np.asarray(d['label']), h['label'])
  it = pipeline.prefetch_to_device(host, size=1, keys=('image', 'position'))
  with pytest.raises(KeyError, match=r"no \['position'\].*has \['image', 'index', 'label'\]"):
    next(it)


def test_host_buffers_are_reused_only_when_nothing_refers_to_them():
  from input_pipeline.prefetch import HostBuffers  # pylint: disable=g-import-not-at-top
  pool = HostBuffers(max_buffers=2)
  a = pool.empty((3, 50), np.float32)
  first = a.ctypes.data
  assert first % 64 == 0 and a.shape == (3, 50) and a.dtype == np.float32
  b = pool.empty((3, 50), np.float32)
  view = a[1:]  # a view keeps its buffer in use
  del a
  c = pool.empty((3, 50), np.float32)  # both pooled buffers in use: a fresh one
  assert not np.shares_memory(c, view) and not np.shares_memory(c, b)
  del view, c
  d = pool.empty((3, 50), np.float32)
  assert d.ctypes.data == first  # free again: reused
  # A device array using the host memory in place keeps it in use until deleted.
  on_device = jax.device_put(d, jax.local_devices()[0])
  if on_device.unsafe_buffer_pointer() == first:  # jax's CPU client: no copy
    del d
    e = pool.empty((3, 50), np.float32)
    assert e.ctypes.data != first
    del e, on_device
    gc.collect()
    # jax lets go of the host array when the device buffer is freed (maybe a moment
    # later, from one of its threads).
    deadline = time.monotonic() + 10
    while pool.empty((3, 50), np.float32).ctypes.data != first:
      assert time.monotonic() < deadline, 'the buffer was never released'
      time.sleep(0.01)


def test_cached_batches_are_aligned_and_put_on_cpu_devices_without_a_copy(records):
  """The cache's gathers are 64-byte aligned: jax's CPU devices use them in place."""
  stream = _stream(records, _config(), num=2 * SPE, devices=4, cache='host')
  batches = list(stream)
  assert all(b['image'].ctypes.data % 64 == 0 for b in batches)
  assert all(b['image'].flags.c_contiguous for b in batches)
  # Two batches never share memory (a batch may still be read by the devices).
  assert not np.shares_memory(batches[-1]['image'], batches[-2]['image'])
  host = batches[-1]['image']
  on_device = next(pipeline.prefetch_to_device([batches[-1]], size=1,
                                               keys=pipeline.TRAIN_DEVICE_KEYS))
  assert sorted(on_device) == sorted(pipeline.TRAIN_DEVICE_KEYS)  # no 'index'
  shards = sorted(on_device['image'].addressable_shards, key=lambda s: s.index[0].start)
  for i, shard in enumerate(shards):
    assert shard.data.unsafe_buffer_pointer() == host[i].ctypes.data  # in place
  np.testing.assert_array_equal(np.asarray(on_device['image']), host)


def test_prefetch_to_device_reraises_source_errors():
  def source():
    yield from _host_batches(2)
    raise RuntimeError('broken record 17')

  it = pipeline.prefetch_to_device(source(), size=2)
  assert len([next(it), next(it)]) == 2
  with pytest.raises(RuntimeError, match='broken record 17'):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_prefetch_to_device_is_bounded_and_stops_with_the_consumer():
  pulled, closed = [], threading.Event()
  batch = _host_batches(1)[0]

  def endless():
    try:
      while True:
        pulled.append(1)
        yield batch
    finally:
      closed.set()

  it = pipeline.prefetch_to_device(endless(), size=2)
  next(it)
  time.sleep(0.3)
  # 1 taken + 2 queued + at most 1 waiting for room.
  assert 3 <= len(pulled) <= 4
  del it  # the consumer stops early: the thread ends and closes the source
  gc.collect()
  assert closed.wait(5.0)
  for thread in threading.enumerate():
    if thread.name == 'prefetch_to_device':
      thread.join(5.0)
      assert not thread.is_alive()
  with pipeline.prefetch_to_device(_host_batches(3), size=1) as it2:
    next(it2)
  with pytest.raises(ValueError, match='size'):
    pipeline.prefetch_to_device([], size=0)


def test_abandoned_prefetcher_does_not_hold_up_exit(tmp_path):
  """A consumer that stops early and exits without closing: the process ends, and the
  prefetcher is closed at exit (its thread stops and closes the source) rather than
  torn down inside the source's C++ code."""
  script = tmp_path / 'abandon.py'
  script.write_text(textwrap.dedent("""
      import numpy as np
      import tensorflow as tf
      from input_pipeline import pipeline

      class Source:  # an endless tf.data source that says when it is closed
        def __init__(self):
          self.it = iter(tf.data.Dataset.range(10**9).map(
              lambda i: {'x': tf.fill((1, 4), i)}).as_numpy_iterator())
        def __iter__(self):
          return self
        def __next__(self):
          return next(self.it)
        def close(self):
          print('source closed', flush=True)

      it = pipeline.prefetch_to_device(Source(), size=2)
      assert next(it)['x'].shape == (1, 4)
      print('consumed', flush=True)
  """))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env=env, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ['consumed', 'source', 'closed']


def test_augmented_global_batch_is_the_same_on_1_2_4_devices_and_2_processes(records):
  """Host stream + device augmentation under pmap, for every layout, vs one device."""
  from input_pipeline import device_augment  # pylint: disable=g-import-not-at-top
  config = _config()
  config.input.image_size = (HEIGHT, WIDTH)
  config.input.random_erasing_prob = 1.0  # every image erased: a visible difference
  aug = device_augment.AugmentConfig.from_config(config.input)

  def augment(batch):
    keys = device_augment.image_keys(config.seed, batch['epoch'], batch['position'])
    return device_augment.augment(batch['image'], keys, aug, np.float32), batch['label']

  def global_batches(devices, processes):
    outs = []
    p_augment = jax.pmap(augment, devices=jax.devices()[:devices])
    for p in range(processes):
      stream = _stream(records, config, devices=devices, process_index=p,
                       process_count=processes, num=SPE + 1)  # crosses an epoch
      outs.append([jax.device_get(p_augment(
          {k: b[k] for k in ('image', 'epoch', 'position', 'label')})) for b in stream])
    # (process, step, (images (D, b, ...), labels (D, b))) -> per step, global order.
    steps = []
    for s in range(SPE + 1):
      images = np.concatenate([outs[p][s][0].reshape(-1, HEIGHT, WIDTH, 3)
                               for p in range(processes)])
      labels = np.concatenate([outs[p][s][1].reshape(-1) for p in range(processes)])
      steps.append((images, labels))
    return steps

  reference = global_batches(1, 1)
  for devices, processes in ((2, 1), (4, 1), (2, 2)):
    for (images, labels), (ref_images, ref_labels) in zip(
        global_batches(devices, processes), reference):
      np.testing.assert_array_equal(labels, ref_labels)
      np.testing.assert_array_equal(images, ref_images,
                                    err_msg=f'{devices} devices x {processes} processes')
  # Not vacuous: augmentation changed the images, differently per position.
  first = reference[0][0]
  assert not np.array_equal(first[0], first[1])
