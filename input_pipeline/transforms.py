"""The host side of the baseline's transforms: PIL's bilinear resize, as TF ops.

The host decodes and resizes to the training size and ships uint8; everything
after the resize (flip, pad, crop, ToTensor, Normalize, random erasing, cast)
runs on the accelerator, `input_pipeline.device_augment`.

Fidelity notes (resize):
  * torchvision's `Resize(H, W)` resizes the PIL image with PIL's bilinear
    filter and gets uint8 back. PIL resamples in two separable passes,
    horizontal then vertical, rounding half up to uint8 after each pass, with a
    triangle filter whose support widens when downscaling.
  * We do the same passes with TF's antialiased triangle filter
    (`tf.image.resize(..., 'bilinear', antialias=True)`): bit-exact for
    power-of-two upscaling (Market-1501's 128x64 -> 256x128), at most 1 grey
    level off otherwise, on a fraction of the pixels (PIL's 22-bit fixed-point
    weights; tests/test_transforms.py measures it against Pillow).
  * Fast paths, same values: an image already at the size is returned as is;
    a power-of-two upscale of each axis (factors 1, 2, 4, ...) uses TF's plain
    bilinear kernel (`ResizeBilinear`, half-pixel centres, edge clamping),
    whose taps and weights are then those of the antialiased filter (support 1
    when upscaling; PIL's border renormalisation equals edge clamping). Its
    weights are multiples of 1 / (2 * factor), so every intermediate value is
    exact in float32 and the rounding after each pass gives the same integers
    as the general path and as PIL (checked in tests/test_transforms.py). The
    general path costs ~1.1 ms per 128x64 -> 256x128 image on one core, the
    fast path ~0.15 ms.
"""

from collections.abc import Sequence

import tensorflow as tf


def _round_half_up(x: tf.Tensor) -> tf.Tensor:
  """PIL's rounding of a pass's result (+0.5, truncate), kept in [0, 255]."""
  return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)


def _is_power_of_two_upscale(size_in: tf.Tensor, size_out: int) -> tf.Tensor:
  """True when size_out = size_in * 2**k for some k >= 0 (dynamic size_in)."""
  size_in = tf.maximum(size_in, 1)
  ratio = size_out // size_in
  return tf.logical_and(
      tf.equal(size_out % size_in, 0),
      tf.logical_and(ratio >= 1, tf.equal(tf.bitwise.bitwise_and(ratio, ratio - 1), 0)))


def _resize_general(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Two antialiased triangle-filter passes (horizontal, vertical), as PIL."""
  image = tf.cast(image, tf.float32)
  in_height = tf.shape(image)[0]

  def _pass(x, size):
    return _round_half_up(
        tf.image.resize(x, size, method='bilinear', antialias=True))

  image = _pass(image, tf.stack([in_height, width]))
  image = _pass(image, (height, width))
  return tf.cast(image, tf.uint8)


def _resize_power_of_two_up(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Power-of-two upscale of each axis; values equal `_resize_general`'s."""
  in_height = tf.shape(image)[0]
  # Horizontal pass (the vertical lerp is 0: rows are copied exactly).
  x = tf.image.resize(image, tf.stack([in_height, width]), method='bilinear',
                      antialias=False)
  # A convex combination of uint8 values: no clipping needed.
  x = tf.floor(x + 0.5)
  x = tf.image.resize(x, (height, width), method='bilinear', antialias=False)
  return tf.cast(tf.floor(x + 0.5), tf.uint8)


def resize(image: tf.Tensor, image_size: Sequence[int]) -> tf.Tensor:
  """Resizes like PIL's bilinear resize of a uint8 image (see module notes).

  Args:
    image: (h, w, 3) uint8 (or a real dtype holding integers in 0..255),
      static or dynamic h and w.
    image_size: (H, W) target size.

  Returns:
    uint8 (H, W, 3).
  """
  height, width = int(image_size[0]), int(image_size[1])
  if height < 1 or width < 1:
    raise ValueError(f'image_size must be positive (height, width), got {tuple(image_size)}.')
  shape = tf.shape(image)
  in_height, in_width = shape[0], shape[1]
  as_uint8 = lambda: tf.cast(image, tf.uint8)
  same = tf.logical_and(tf.equal(in_height, height), tf.equal(in_width, width))
  fast = tf.logical_and(_is_power_of_two_upscale(in_height, height),
                        _is_power_of_two_upscale(in_width, width))
  out = tf.case([(same, as_uint8),
                 (fast, lambda: _resize_power_of_two_up(image, height, width))],
                default=lambda: _resize_general(image, height, width))
  return tf.ensure_shape(out, (height, width, None))
