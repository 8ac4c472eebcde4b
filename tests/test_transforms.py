"""Tests of the host resize against Pillow and against today's general TF path."""

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from input_pipeline import transforms


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _pil_resize(img, height, width):
  return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def _two_pass_reference(img, height, width):
  """The resize as it was before the fast paths, written out here: float32,
  antialiased triangle filter horizontally then vertically, rounding half up
  after each pass."""
  x = tf.cast(tf.constant(img), tf.float32)
  x = tf.image.resize(x, (img.shape[0], width), 'bilinear', antialias=True)
  x = tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)
  x = tf.image.resize(x, (height, width), 'bilinear', antialias=True)
  return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0).numpy().astype(np.uint8)


@pytest.mark.parametrize('shape', [(128, 64), (64, 32), (100, 50), (300, 150),
                                   (512, 256), (400, 90), (181, 56)])
def test_resize_matches_pil_bilinear(shape):
  img = _noise(*shape, seed=shape[0])
  ref = _pil_resize(img, 256, 128)
  ours = transforms.resize(tf.constant(img), (256, 128)).numpy()
  assert ours.dtype == np.uint8 and ours.shape == (256, 128, 3)
  diff = np.abs(ours.astype(np.int32) - ref)
  assert diff.max() <= 1  # at most one grey level
  if 256 % shape[0] == 0 and 128 % shape[1] == 0:  # integer upscaling
    assert diff.max() == 0  # bit-exact (Market-1501: 128x64 -> 256x128)
  else:
    assert diff.mean() < 0.3


@pytest.mark.parametrize('shape,size', [
    ((128, 64), (256, 128)),   # 2x both axes: the fast path
    ((64, 32), (256, 128)),    # 4x
    ((32, 16), (256, 128)),    # 8x
    ((256, 64), (256, 128)),   # 1x vertically, 2x horizontally
    ((128, 128), (256, 128)),  # 2x vertically, 1x horizontally
    ((3, 1), (24, 8)),         # 8x, tiny
    ((1, 1), (4, 8)),
    ((256, 128), (256, 128)),  # the identity
    ((96, 64), (256, 128)),    # 2.67x vertically: the general path
    ((130, 66), (256, 128)),   # downscale-ish / non-integer
    ((85, 43), (255, 129)),    # 3x: integer but not a power of two
    ((512, 256), (256, 128)),  # 0.5x downscale
])
def test_resize_equals_two_pass_reference_and_pil_where_exact(shape, size):
  img = _noise(*shape, seed=sum(shape))
  ours = transforms.resize(tf.constant(img), size).numpy()
  np.testing.assert_array_equal(ours, _two_pass_reference(img, *size))
  ratio_h, ratio_w = size[0] / shape[0], size[1] / shape[1]
  power_of_two = lambda r: r >= 1 and r == int(r) and int(r) & (int(r) - 1) == 0
  if power_of_two(ratio_h) and power_of_two(ratio_w):
    np.testing.assert_array_equal(ours, _pil_resize(img, *size))


def test_resize_dynamic_shapes_in_tf_function_and_float_input():
  fn = tf.function(lambda x: transforms.resize(x, (64, 32)),
                   input_signature=[tf.TensorSpec((None, None, 3), tf.uint8)])
  for shape in ((32, 16), (64, 32), (40, 21)):
    img = _noise(*shape, seed=shape[1])
    np.testing.assert_array_equal(fn(tf.constant(img)).numpy(),
                                  _two_pass_reference(img, 64, 32))
  img = _noise(32, 16, seed=9)
  as_float = transforms.resize(tf.constant(img.astype(np.float32)), (64, 32))
  assert as_float.dtype == tf.uint8
  np.testing.assert_array_equal(as_float.numpy(), _pil_resize(img, 64, 32))


def test_resize_rejects_bad_size():
  with pytest.raises(ValueError, match='image_size'):
    transforms.resize(tf.constant(_noise(4, 4)), (0, 4))
