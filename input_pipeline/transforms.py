"""Image transforms of the baseline as TensorFlow ops (graph-mode friendly).

Train (Bag-of-Tricks `build_transforms`, same order):
  Resize(H, W) -> RandomHorizontalFlip(flip_prob) -> Pad(padding) ->
  RandomCrop(H, W) -> ToTensor (/255) -> Normalize(mean, std) ->
  RandomErasing(random_erasing_prob) -> cast to the compute dtype.
Eval: Resize(H, W) -> /255 -> Normalize -> cast.

Fidelity notes:
  * Resize: torchvision resizes the PIL image with PIL's bilinear filter and
    gets uint8 back. We use `tf.image.resize(..., 'bilinear', antialias=True)`
    (a triangle filter whose support widens when downscaling, as PIL's) in
    PIL's two passes (horizontal, then vertical, rounding half up to integers
    after each): bit-exact for integer-factor upscaling (Market's 128x64 ->
    256x128), at most 1 grey level off otherwise (tests/test_transforms.py).
  * Flip, pad and crop act on those integral values (the PIL image): padding
    is zeros in uint8 space, i.e. black before normalisation, as torchvision's
    `Pad(fill=0)` on the PIL image.
  * Random erasing follows the baseline's `RandomErasing` (sl=0.02, sh=0.4,
    r1=0.3, up to 100 attempts; h = round(sqrt(area * aspect)), w =
    round(sqrt(area / aspect)); accepted when h < H and w < W; top-left
    uniform over the valid positions) applied to the *normalised* tensor. The
    fill value: the class default is (0.4914, 0.4822, 0.4465), but BoT builds
    it with `mean=cfg.INPUT.PIXEL_MEAN`, so the baseline writes the raw pixel
    mean (0.485, 0.456, 0.406) into the normalised tensor (it is not the
    normalised mean, which would be 0). We reproduce that: the fill is
    `cfg_input.pixel_mean`, unless `cfg_input.random_erasing_value` exists.
    The 100 attempts are drawn at once and the first valid one is used, which
    has the distribution of the sequential loop.
  * Randomness: stateless ops only. Each image gets a seed (shape [2]) from
    the pipeline, derived from (config.seed, epoch, position in the epoch), and
    every random decision uses a sub-seed split from it, so results do not
    depend on threading, sharding or the order the map runs in.
"""

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

_ERASE_SL = 0.02
_ERASE_SH = 0.4
_ERASE_R1 = 0.3
_ERASE_ATTEMPTS = 100


def resize(image: tf.Tensor, image_size: Sequence[int]) -> tf.Tensor:
  """Resizes like PIL's bilinear resize of a uint8 image.

  PIL resamples in two separable passes, horizontal then vertical, rounding to
  uint8 in between; we do the same with TF's antialiased triangle filter
  (bilinear with a support that widens when downscaling, as PIL's). Measured
  against Pillow 13: bit-exact for integer-factor upscaling (Market-1501's
  128x64 -> 256x128), otherwise within 1 grey level, on a fraction of the
  pixels (PIL's fixed-point weights; for some strong vertical downscales PIL
  appears to run the vertical pass first, ~25% of pixels 1 level off).

  Args:
    image: (h, w, 3) uint8 (or float holding 0..255 values), static or
      dynamic h and w.
    image_size: (H, W) target size.

  Returns:
    float32 (H, W, 3) holding integral values in [0, 255].
  """
  height, width = int(image_size[0]), int(image_size[1])
  image = tf.cast(image, tf.float32)
  in_height = tf.shape(image)[0]

  def _pass(x, size):
    x = tf.image.resize(x, size, method='bilinear', antialias=True)
    return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)

  image = _pass(image, tf.stack([in_height, width]))
  image = _pass(image, (height, width))
  return tf.ensure_shape(image, (height, width, None))


def normalize(image: tf.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> tf.Tensor:
  """ToTensor + Normalize: (image / 255 - mean) / std, float32.

  Args:
    image: (..., 3) values in [0, 255].
    mean: per-channel mean (of [0, 1] images).
    std: per-channel standard deviation.

  Returns:
    float32 tensor of the same shape.
  """
  image = tf.cast(image, tf.float32) / 255.0
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (image - mean) / std


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
  """Flips left-right with probability `prob` (torchvision: rand() < p).

  Args:
    image: (H, W, C).
    seed: stateless seed, shape [2].
    prob: flip probability.

  Returns:
    the image, flipped or not.
  """
  u = tf.random.stateless_uniform([], seed=seed)
  return tf.cond(u < prob, lambda: tf.reverse(image, axis=[1]),
                 lambda: image)


def pad_and_random_crop(image: tf.Tensor, seed: tf.Tensor,
                        padding: int) -> tf.Tensor:
  """Zero-pads by `padding` on every side, then crops back at random.

  Args:
    image: (H, W, C), static H and W.
    seed: stateless seed, shape [2].
    padding: pixels added on each side (0: identity).

  Returns:
    (H, W, C) crop; the content shifts by at most `padding` pixels per axis.
  """
  if padding <= 0:
    return image
  height, width = image.shape[0], image.shape[1]
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  # torchvision RandomCrop: top, left uniform in [0, 2 * padding].
  offsets = tf.random.stateless_uniform(
      [2], seed=seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32)
  return tf.slice(padded, [offsets[0], offsets[1], 0],
                  [height, width, image.shape[2]])


def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float,
                   value: Sequence[float], sl: float = _ERASE_SL,
                   sh: float = _ERASE_SH, r1: float = _ERASE_R1,
                   attempts: int = _ERASE_ATTEMPTS) -> tf.Tensor:
  """The baseline's RandomErasing on a (normalised) float image.

  Args:
    image: (H, W, C) float32, static H and W.
    seed: stateless seed, shape [2].
    prob: probability of erasing.
    value: per-channel fill value, written as is.
    sl: minimum erased area fraction.
    sh: maximum erased area fraction.
    r1: minimum aspect ratio (the maximum is 1 / r1).
    attempts: number of (area, aspect) draws before giving up.

  Returns:
    the image with at most one rectangle set to `value`.
  """
  height, width = image.shape[0], image.shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 5)
  u = tf.random.stateless_uniform([], seed=seeds[0])
  area = tf.random.stateless_uniform(
      [attempts], seed=seeds[1], minval=sl, maxval=sh,
      dtype=tf.float64) * float(height * width)
  aspect = tf.random.stateless_uniform(
      [attempts], seed=seeds[2], minval=r1, maxval=1.0 / r1, dtype=tf.float64)
  # tf.round and Python's round() both round half to even.
  hs = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  valid = tf.logical_and(hs < height, ws < width)
  first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
  h, w = hs[first], ws[first]
  apply = tf.logical_and(u < prob, tf.reduce_any(valid))
  # random.randint(0, H - h) and (0, W - w), inclusive. Clamped so that an
  # invalid (unused) candidate cannot make the range empty.
  top = tf.random.stateless_uniform(
      [], seed=seeds[3], minval=0, maxval=tf.maximum(height - h + 1, 1),
      dtype=tf.int32)
  left = tf.random.stateless_uniform(
      [], seed=seeds[4], minval=0, maxval=tf.maximum(width - w + 1, 1),
      dtype=tf.int32)

  def erase():
    rows = tf.range(height)
    cols = tf.range(width)
    row_in = tf.logical_and(rows >= top, rows < top + h)
    col_in = tf.logical_and(cols >= left, cols < left + w)
    mask = tf.logical_and(row_in[:, None], col_in[None, :])
    fill = tf.cast(tf.constant(value, tf.float32), image.dtype)
    return tf.where(mask[:, :, None], fill[None, None, :], image)

  return tf.cond(apply, erase, lambda: image)


def _erasing_value(cfg_input: Any) -> Sequence[float]:
  """The erasing fill: cfg_input.random_erasing_value or the pixel mean."""
  value = getattr(cfg_input, 'random_erasing_value', None)
  return tuple(cfg_input.pixel_mean) if value is None else tuple(value)


def train_transform(image_uint8: tf.Tensor, rng_seed: tf.Tensor, cfg_input: Any,
                    image_size: Sequence[int], dtype: Any = tf.float32
                    ) -> tf.Tensor:
  """The baseline's training augmentation of one decoded image.

  Args:
    image_uint8: (h, w, 3) uint8 image of any size.
    rng_seed: stateless seed, int32/int64 shape [2], unique per image.
    cfg_input: config.input (flip_prob, padding, random_erasing_prob,
      pixel_mean, pixel_std; optional random_erasing_value).
    image_size: (H, W) output size.
    dtype: output dtype (tf or numpy dtype, e.g. tf.bfloat16).

  Returns:
    (H, W, 3) normalised image of `dtype`.
  """
  seeds = tf.random.experimental.stateless_split(
      tf.cast(rng_seed, tf.int64), 3)
  image = resize(image_uint8, image_size)
  image = random_flip(image, seeds[0], float(cfg_input.flip_prob))
  image = pad_and_random_crop(image, seeds[1], int(cfg_input.padding))
  image = normalize(image, cfg_input.pixel_mean, cfg_input.pixel_std)
  if float(cfg_input.random_erasing_prob) > 0:
    image = random_erasing(image, seeds[2], float(cfg_input.random_erasing_prob),
                           _erasing_value(cfg_input))
  return tf.cast(image, tf.as_dtype(dtype))


def eval_transform(image_uint8: tf.Tensor, image_size: Sequence[int],
                   cfg_input: Any, dtype: Any = tf.float32) -> tf.Tensor:
  """The baseline's test transform: resize, normalise, cast.

  Args:
    image_uint8: (h, w, 3) uint8 image of any size.
    image_size: (H, W) output size.
    cfg_input: config.input (pixel_mean, pixel_std).
    dtype: output dtype.

  Returns:
    (H, W, 3) normalised image of `dtype`.
  """
  image = resize(image_uint8, image_size)
  image = normalize(image, cfg_input.pixel_mean, cfg_input.pixel_std)
  return tf.cast(image, tf.as_dtype(dtype))
