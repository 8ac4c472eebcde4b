"""Tests of the device cache (input_pipeline.cache, device_cache) against references.

References: `_np_apply` of test_device_augment (flip, zero pad, crop, normalise and
erase written in numpy from the definitions), PIL-decoded images resized as in
test_pipeline, the sampler-driven 'none' stream (every image decoded per step), and
`device_augment.augment` on the images that stream ships.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline import cache as cache_lib
from input_pipeline import device_augment as da
from input_pipeline import device_cache
from input_pipeline import image_check
from input_pipeline import pipeline
from input_pipeline.records import Record
from test_device_augment import _cfg, _compare, _images, _np_apply, _np_crop, _np_params
from test_pipeline import HEIGHT, SPE, WIDTH, _config, _counting_loader, _stack, _stream
from test_pipeline import records, reference_images  # pylint: disable=unused-import

MARKET = 12_936  # Market-1501's training images
MARKET_DEVICE_BYTES = MARKET * 276 * 148 * 3  # 256x128 padded by 10


def test_choose_cache_device_rules():
  choose = functools.partial(cache_lib.choose_cache, 'auto', MARKET, (256, 128), 16.0,
                             padding=10, device_max_gb=4.0)
  gpu = choose(platform='gpu', num_local_devices=8, device_bytes_limit=80e9)
  assert gpu.mode == 'device' and gpu.nbytes == MARKET_DEVICE_BYTES
  assert '1.59 GB on each of 8 gpu device(s)' in gpu.reason
  # A quarter of a 4 GB device is 1 GB: too small; the host cache instead.
  small_gpu = choose(platform='gpu', num_local_devices=1, device_bytes_limit=4e9)
  assert small_gpu.mode == 'host' and small_gpu.nbytes == MARKET * 256 * 128 * 3
  assert '1.59 GB > 0.25 of the 4.00 GB of device memory' in small_gpu.reason
  assert 'cache_device_max_gb' not in small_gpu.reason  # a budget it kept is not named
  # CPU devices share the host's memory: 2 copies fit 16 GB, 16 copies do not.
  assert choose(platform='cpu', num_local_devices=2).mode == 'device'
  many_cpus = choose(platform='cpu', num_local_devices=16)
  assert many_cpus.mode == 'host'
  assert '16 copies = 25.36 GB > config.input.cache_max_gb=16' in many_cpus.reason
  assert 'cache_device_max_gb' not in many_cpus.reason
  assert cache_lib.choose_cache('auto', MARKET, (256, 128), 16.0, padding=10,
                                device_max_gb=1.5, platform='gpu').mode == 'host'
  # VeRi-Wild's 277,797 images fit neither budget.
  assert cache_lib.choose_cache('auto', 277_797, (256, 128), 16.0, padding=10,
                                device_max_gb=4.0, platform='gpu').mode == 'none'
  forced = cache_lib.choose_cache('device', MARKET, (256, 128), 0.0, padding=10)
  assert forced.mode == 'device' and forced.nbytes == MARKET_DEVICE_BYTES
  with pytest.raises(ValueError, match=r'cache=device needs 1\.59 GB.*1\.00 GB'):
    cache_lib.choose_cache('device', MARKET, (256, 128), 16.0, padding=10,
                           platform='gpu', device_bytes_limit=1e9)
  assert cache_lib.cached_image_shape((256, 128), 10) == (276, 148, 3)
  assert cache_lib.cached_image_shape((256, 128), 0) == (256, 128, 3)
  with pytest.raises(ValueError, match='padding must be >= 0, got -1'):
    cache_lib.cached_image_shape((256, 128), -1)


def _replicated(devices):
  mesh = jax.sharding.Mesh(np.asarray(devices), ('batch',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _addressable_copies(array):
  return [np.asarray(s.data) for s in array.addressable_shards]


@pytest.mark.parametrize('padding,chunk_size', [(3, 7), (0, 64)])
def test_fill_device_cache_holds_the_padded_pil_images_on_every_device(
    records, reference_images, padding, chunk_size):
  devices = jax.local_devices()[:2]
  chunks = image_check.image_chunks(records, (HEIGHT, WIDTH), chunk_size=chunk_size)
  cache = device_cache.fill_device_cache(chunks, len(records), (HEIGHT, WIDTH), padding,
                                         _replicated(devices))
  expected = np.pad(reference_images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  copies = _addressable_copies(cache)
  assert len(copies) == 2 and {s.device for s in cache.addressable_shards} == set(devices)
  for copy in copies:
    np.testing.assert_array_equal(copy, expected)


def test_fill_device_cache_refuses_the_wrong_number_or_shape_of_images():
  chunk = np.zeros((4, HEIGHT, WIDTH, 3), np.uint8)
  sharding = _replicated(jax.local_devices()[:1])
  with pytest.raises(ValueError, match='held 4 images, expected 5'):
    device_cache.fill_device_cache([chunk], 5, (HEIGHT, WIDTH), 2, sharding)
  with pytest.raises(ValueError, match=r'more than the 3 images expected \(0 \+ 4\)'):
    device_cache.fill_device_cache([chunk], 3, (HEIGHT, WIDTH), 2, sharding)
  with pytest.raises(ValueError, match=r'float32 \(4, 64, 32, 3\).*expected uint8'):
    device_cache.fill_device_cache([chunk.astype(np.float32)], 4, (HEIGHT, WIDTH), 2,
                                   sharding)


def test_fill_names_an_undecodable_training_image(records, tmp_path):
  bad = tmp_path / '0001_c1_bad.jpg'
  bad.write_bytes(b'\xff\xd8 not a jpeg')
  broken = list(records[:9]) + [Record(str(bad), 1, 1)] + list(records[9:12])
  with pytest.raises(image_check.UndecodableImageError) as info:
    device_cache.fill_device_cache(
        image_check.image_chunks(broken, (HEIGHT, WIDTH), chunk_size=4), len(broken),
        (HEIGHT, WIDTH), 2, _replicated(jax.local_devices()[:1]))
  text = str(info.value)
  assert str(bad) in text and 'filling the device cache (training images 9-12 of 13)' in text


def test_device_stream_ships_the_plan_only_and_decodes_nothing(records):
  config = _config()
  calls = []
  device = _stream(records, config, num=2 * SPE, devices=4, cache='device',
                   load_image=_counting_loader(calls))
  assert device.cache.mode == 'device' and device.device_keys == pipeline.DEVICE_CACHE_KEYS
  got = _stack(list(device))
  want = _stack(list(_stream(records, config, num=2 * SPE, devices=4, cache='none')))
  assert calls == [] and 'image' not in got
  assert set(got) == set(pipeline.DEVICE_CACHE_KEYS)
  for key in got:
    np.testing.assert_array_equal(got[key], want[key])


@pytest.fixture(scope='module')
def jitted_cached():
  return jax.jit(device_cache.augment_cached, static_argnums=(3, 4))


@pytest.mark.parametrize('size,padding,erase', [
    ((32, 16), 0, 1.0), ((64, 32), 10, 0.5), ((64, 32), 3, 0.0)])
def test_augment_cached_matches_numpy_and_augment(jitted_cached, size, padding, erase):
  cfg = _cfg(size, flip=0.5, padding=padding, erase=erase)
  images = _images(10, size, seed=padding)
  cache = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  index = np.random.default_rng(padding).integers(0, 10, 24).astype(np.int32)  # repeats
  n = index.size
  keys = da.image_keys(5, jnp.full(n, 1, jnp.int32), jnp.arange(n))
  p = _np_params(da.sample_params(keys, cfg))
  assert 0 < p['flip'].sum() < n
  ref = _np_apply(images[index], p, cfg)
  for dtype in (jnp.float32, jnp.bfloat16):
    out = jitted_cached(jnp.asarray(cache), jnp.asarray(index), keys, cfg, dtype)
    _compare(out, ref, dtype)
    same = da.augment(jnp.asarray(images[index]), keys, cfg, dtype)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint8),
                                  np.asarray(same).view(np.uint8))


def test_crop_from_cache_at_the_window_edges_equals_numpy():
  """Flipped and not, at the extreme crop offsets 0 and 2p (which map to 2p and 0)."""
  padding, size = 3, (8, 6)
  cfg = _cfg(size, padding=padding)
  images = _images(2, size, seed=1)
  cache = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  grid = [(flip, top, left) for flip in (0, 1) for top in (0, 2 * padding)
          for left in (0, 1, 2 * padding)]
  p = {'flip': np.array([g[0] for g in grid], bool),
       'crop_top': np.array([g[1] for g in grid], np.int32),
       'crop_left': np.array([g[2] for g in grid], np.int32)}
  index = np.arange(len(grid), dtype=np.int32) % 2
  got = device_cache._crop_from_cache(  # pylint: disable=protected-access
      jnp.asarray(cache), jnp.asarray(index), p, cfg)
  np.testing.assert_array_equal(np.asarray(got), _np_crop(images[index], p, padding))


def test_augment_cached_refuses_an_unpadded_cache(jitted_cached):
  cfg = _cfg((32, 16), padding=4)
  keys = da.image_keys(0, jnp.zeros(2, jnp.int32), jnp.arange(2))
  with pytest.raises(ValueError, match=r'uint8 \(N, 40, 24, 3\).*padded by 4'):
    jitted_cached(jnp.zeros((3, 32, 16, 3), jnp.uint8), jnp.arange(2), keys, cfg,
                  jnp.float32)
  with pytest.raises(ValueError, match='keys and index'):
    jitted_cached(jnp.zeros((3, 40, 24, 3), jnp.uint8), jnp.arange(3), keys, cfg,
                  jnp.float32)


def test_device_cached_batches_equal_the_streamed_batches_augmented(records):
  """The whole path: stream + fill + cached augmentation on 4 devices gives, bit for
  bit, the augmentation of the images the uncached stream decodes per step."""
  config = _config()
  cfg = da.AugmentConfig.from_config(config.input)
  seed = int(config.seed)

  def from_images(image, epoch, position):
    return da.augment(image, da.image_keys(seed, epoch, position), cfg, jnp.float32)

  def from_cache(cache, index, epoch, position):
    return device_cache.augment_cached(cache, index, da.image_keys(seed, epoch, position),
                                       cfg, jnp.float32)

  p_images = jax.pmap(from_images)
  p_cache = jax.pmap(from_cache, in_axes=(None, 0, 0, 0))
  cache = device_cache.fill_device_cache(
      image_check.image_chunks(records, (HEIGHT, WIDTH), chunk_size=16), len(records),
      (HEIGHT, WIDTH), config.input.padding, _replicated(jax.local_devices()))
  streamed = _stream(records, config, num=2 * SPE, devices=4, cache='none')
  device = _stream(records, config, num=2 * SPE, devices=4, cache='device')
  for a, b in zip(streamed, device, strict=True):
    want = p_images(a['image'], a['epoch'], a['position'])
    got = p_cache(cache, b['index'], b['epoch'], b['position'])
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                  np.asarray(want).view(np.uint32))
