"""The device cache: every training image, decoded once, kept on each local device.

With `config.input.cache='device'` (or 'auto' choosing it, see `input_pipeline.cache`)
the training stream carries only record indices (`pipeline.DEVICE_CACHE_KEYS`); the
images come from a uint8 array on every local device, filled before the first step
by `fill_device_cache`:

  cache[i] = zero padding of `padding` px around the record i's image, read, decoded
  (PIL-exact) and resized to the training size exactly as the streaming and host
  cache paths do (`pipeline.create_image_chunks`): (N, H + 2p, W + 2p, 3).

`augment_cached` is the training augmentation of cache[index]: each image's
flip, pad and crop is a window cut out of its padded entry, so the batch of uint8
images is never gathered apart, and the result is bit for bit
`device_augment.augment` of the unpadded images with the same keys. The host's work
per step is the sampler's plan; on an accelerator the images never cross the host
link again after the fill.
"""

from collections.abc import Iterable, Sequence
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import cache as cache_lib
from input_pipeline import device_augment


def fill_device_cache(chunks: Iterable[np.ndarray], num_images: int,
                      image_size: Sequence[int], padding: int,
                      sharding: jax.sharding.Sharding) -> jax.Array:
  """Writes the decoded training images into a padded cache replicated on `devices`.

  Each chunk is written into the devices' copies in place (the cache is donated to
  the write), so the host never holds more than the chunks in flight.

  Args:
    chunks: uint8 (c, H, W, 3) arrays, the records' images in record order
      (`image_check.image_chunks`: `pipeline.create_image_chunks`, naming any file
      that does not decode).
    num_images: the number of records N; the chunks must hold exactly N images.
    image_size: (H, W), the training size.
    padding: config.input.padding: zero pixels kept around each image.
    sharding: where the copies go: replicated over the local devices, as the pmapped
      step takes its state (`train_step.replicated_sharding()`).

  Returns:
    uint8 jax.Array (N, H + 2p, W + 2p, 3) with `sharding` (what the pmapped train
    step takes with in_axes=None).

  Raises:
    ValueError: for a chunk that is not uint8 (c, H, W, 3), or chunks that hold more
      or fewer than N images.
  """
  shape = (int(num_images),) + cache_lib.cached_image_shape(image_size, padding)
  pad = int(padding)
  image_shape = tuple(int(s) for s in image_size) + (3,)
  start_time = time.time()
  cache = jax.jit(lambda: jnp.zeros(shape, jnp.uint8), out_shardings=sharding)()
  write = jax.jit(
      lambda c, x, start: jax.lax.dynamic_update_slice(c, x, (start, pad, pad, 0)),
      donate_argnums=0, out_shardings=sharding)
  done = 0
  for chunk in chunks:
    chunk = np.asarray(chunk)
    if chunk.shape[1:] != image_shape or chunk.dtype != np.uint8:
      raise ValueError(f'fill_device_cache: a chunk of {chunk.dtype} {chunk.shape} after '
                       f'{done} images; expected uint8 (c, {image_shape[0]}, '
                       f'{image_shape[1]}, 3).')
    if done + len(chunk) > shape[0]:
      raise ValueError(f'fill_device_cache: the chunks hold more than the {shape[0]} '
                       f'images expected ({done} + {len(chunk)}).')
    cache = write(cache, jax.device_put(chunk, sharding), np.int32(done))
    done += len(chunk)
  if done != shape[0]:
    raise ValueError(f'fill_device_cache: the chunks held {done} images, expected '
                     f'{shape[0]}.')
  cache.block_until_ready()
  logging.info('Device cache filled: %d images, %.2f GB on each of %d devices, in '
               '%.1f s.', shape[0], math.prod(shape) / 1e9,
               len(sharding.addressable_devices), time.time() - start_time)
  return cache


def _crop_from_cache(cache: jax.Array, index: jax.Array, params: dict[str, jax.Array],
                     cfg: device_augment.AugmentConfig) -> jax.Array:
  """Flip, pad and crop of the images cache[index], cut straight out of the padded cache.

  The crop at (top, left) of pad(flip(x)) is the mirror of the crop at (top,
  2 * padding - left) of pad(x) (zero padding is symmetric), so each image is one
  (H, W, 3) window of its padded cache entry, mirrored when flipped: XLA fuses the
  windows into the pixel pass, and no batch of padded copies is made.
  """
  height, width = cfg.image_size
  pad = cfg.padding  # >= 0 (AugmentConfig checks it)
  flip = jnp.asarray(params['flip'], jnp.bool_)
  top = jnp.asarray(params['crop_top'], jnp.int32)
  left = jnp.asarray(params['crop_left'], jnp.int32)
  left = jnp.where(flip, 2 * pad - left, left)
  window = lambda i, t, l: jax.lax.dynamic_slice(  # pylint: disable=unnecessary-lambda-assignment
      cache, (i, t, l, 0), (1, height, width, 3))[0]
  crops = jax.vmap(window)(jnp.asarray(index, jnp.int32), top, left)
  return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def augment_cached(cache: jax.Array, index: jax.Array, keys: jax.Array,
                   cfg: device_augment.AugmentConfig, dtype: Any) -> jax.Array:
  """`device_augment.augment` of the images cache[index], read from the padded cache.

  Bit for bit `augment(unpadded images, keys, cfg, dtype)`: flip, pad, crop, erase
  and normalise act on the same uint8 values (see `_crop_from_cache`).

  Args:
    cache: uint8 (N, H + 2p, W + 2p, 3), the training images zero padded by p =
      cfg.padding on each side (`fill_device_cache`).
    index: int (b,) record indices into the cache.
    keys: typed PRNG keys of shape (b,) (see `device_augment.image_keys`).
    cfg: the augmentation settings.
    dtype: output dtype.

  Returns:
    (b, H, W, 3) augmented images of `dtype`.

  Raises:
    ValueError: for a cache of another layout, or keys and index of other shapes.
  """
  expected = cache_lib.cached_image_shape(cfg.image_size, cfg.padding)
  if cache.ndim != 4 or tuple(cache.shape[1:]) != expected or cache.dtype != jnp.uint8:
    raise ValueError(f'The device cache must be uint8 (N, {expected[0]}, {expected[1]}, 3)'
                     f' (image_size {tuple(cfg.image_size)} padded by {cfg.padding}), '
                     f'got {cache.dtype} {tuple(cache.shape)}.')
  if keys.ndim != 1 or keys.shape != jnp.shape(index):
    raise ValueError(f'keys and index must both have shape (b,), one per image, got '
                     f'{keys.shape} and {jnp.shape(index)}.')
  # The barrier as in `device_augment.augment`: the parameters once per image.
  params = jax.lax.optimization_barrier(device_augment.sample_params(keys, cfg))
  return device_augment.normalize_and_erase(
      _crop_from_cache(cache, index, params, cfg), params, cfg, dtype)
