"""Tests of the tf image transforms against PIL / numpy / the baseline's rules."""

import math
import random

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from input_pipeline import transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _cfg(flip=0.5, padding=10, erase=0.5):
  cfg = ml_collections.ConfigDict()
  cfg.image_size = (256, 128)
  cfg.flip_prob = flip
  cfg.padding = padding
  cfg.random_erasing_prob = erase
  cfg.pixel_mean = MEAN
  cfg.pixel_std = STD
  return cfg


def _noise(h, w, seed=0, low=0):
  return np.random.default_rng(seed).integers(low, 256, (h, w, 3)).astype(
      np.uint8)


def _np_normalize(x):
  return ((x.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) /
          np.array(STD, np.float32))


def _many(fn, n):
  """Runs fn(seed) for seeds (0, i), i < n, through tf.data; stacks results."""
  ds = tf.data.Dataset.range(n).map(
      lambda i: fn(tf.stack([tf.constant(0, tf.int64), i])),
      num_parallel_calls=tf.data.AUTOTUNE)
  return np.stack(list(ds.as_numpy_iterator()))


@pytest.mark.parametrize('shape', [(128, 64), (64, 32), (100, 50), (300, 150),
                                   (512, 256), (400, 90), (181, 56)])
def test_resize_matches_pil_bilinear(shape):
  img = _noise(*shape, seed=shape[0])
  ref = np.asarray(Image.fromarray(img).resize((128, 256), Image.BILINEAR))
  ours = transforms.resize(tf.constant(img), (256, 128)).numpy()
  diff = np.abs(ours - ref.astype(np.float32))
  assert diff.max() <= 1.0  # at most one grey level
  if 256 % shape[0] == 0 and 128 % shape[1] == 0:  # integer upscaling
    assert diff.max() == 0.0  # bit-exact (Market-1501: 128x64 -> 256x128)
  else:
    assert diff.mean() < 0.3


def test_eval_transform_normalisation_vs_numpy():
  img = _noise(256, 128, seed=1)  # already at size: resize is the identity
  out = transforms.eval_transform(tf.constant(img), (256, 128), _cfg()).numpy()
  np.testing.assert_allclose(out, _np_normalize(img), atol=1e-6)
  small = _noise(128, 64, seed=2)
  ref = np.asarray(Image.fromarray(small).resize((128, 256), Image.BILINEAR))
  out = transforms.eval_transform(tf.constant(small), (256, 128), _cfg(),
                                  tf.bfloat16)
  assert out.dtype == tf.bfloat16 and out.shape == (256, 128, 3)
  np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(),
                             _np_normalize(ref), atol=0.02)


def test_flip_frequency():
  img = _noise(64, 32, seed=3)
  cfg = _cfg(flip=0.5, padding=0, erase=0.0)
  n = 400
  outs = _many(lambda s: transforms.train_transform(
      tf.constant(img), s, cfg, (64, 32)), n)
  plain, flipped = _np_normalize(img), _np_normalize(img[:, ::-1])
  is_plain = np.all(np.abs(outs - plain) < 1e-6, axis=(1, 2, 3))
  is_flip = np.all(np.abs(outs - flipped) < 1e-6, axis=(1, 2, 3))
  assert np.all(is_plain ^ is_flip)
  # Binomial(400, 0.5): sd 10; allow 4.5 sd.
  assert abs(is_flip.sum() - n / 2) <= 45


def test_pad_and_crop_shift_bounded():
  height, width = 64, 32
  img = _noise(height, width, seed=4, low=1)  # no zeros: padding recognisable
  cfg = _cfg(flip=0.0, padding=10, erase=0.0)
  outs = _many(lambda s: transforms.train_transform(
      tf.constant(img), s, cfg, (height, width)), 300)
  # Reference: numpy zero pad in uint8 space, then the crop at (top, left).
  padded = np.pad(img, ((10, 10), (10, 10), (0, 0)))
  pad_value = (-np.array(MEAN) / np.array(STD)).astype(np.float32)
  shifts = []
  for out in outs:
    is_pad = np.all(np.abs(out - pad_value) < 1e-5, axis=-1)
    top_rows = np.argmin(is_pad.all(axis=1))  # padding rows at the top
    bottom_rows = np.argmin(is_pad.all(axis=1)[::-1])
    left_cols = np.argmin(is_pad.all(axis=0))
    right_cols = np.argmin(is_pad.all(axis=0)[::-1])
    top = 10 - top_rows if top_rows else 10 + bottom_rows
    left = 10 - left_cols if left_cols else 10 + right_cols
    crop = padded[top:top + height, left:left + width]
    np.testing.assert_allclose(out, _np_normalize(crop), atol=1e-5)
    shifts.append((top - 10, left - 10))
  shifts = np.array(shifts)
  # Bounded by the padding; uniform over 21 values: both extremes show up.
  assert np.abs(shifts).max() == 10
  assert shifts.min(axis=0).tolist() == [-10, -10]
  assert shifts.max(axis=0).tolist() == [10, 10]


def _erased_boxes(outs, fill):
  boxes = []
  for out in outs:
    mask = np.all(out == np.array(fill, np.float32), axis=-1)
    if not mask.any():
      boxes.append(None)
      continue
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert mask.sum() == h * w  # one rectangle
    boxes.append((h, w))
  return boxes


def _bot_erasing_reference(n, height=256, width=128, seed=0):
  """Boxes of the baseline's RandomErasing loop (python random)."""
  rng = random.Random(seed)
  boxes = []
  for _ in range(n):
    box = None
    if rng.uniform(0, 1) < 0.5:
      for _ in range(100):
        target = rng.uniform(0.02, 0.4) * height * width
        aspect = rng.uniform(0.3, 1 / 0.3)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
          box = (h, w)
          break
    boxes.append(box)
  return boxes


def test_random_erasing_statistics():
  height, width = 128, 64
  fill = (0.1, 0.2, 0.3)
  image = tf.fill((height, width, 3), 5.0)
  n = 1000
  outs = _many(lambda s: transforms.random_erasing(image, s, 0.5, fill), n)
  boxes = _erased_boxes(outs, fill)
  erased = [b for b in boxes if b is not None]
  # Binomial(1000, 0.5): sd 15.8; allow 4.5 sd.
  assert abs(len(erased) - n / 2) <= 72
  for h, w in erased:
    assert h < height and w < width
    slack = (0.5 * (h + w) + 0.25) / (height * width)  # rounding of h and w
    assert 0.02 - slack <= h * w / (height * width) <= 0.4 + slack
    assert (h + 0.5) / (w - 0.5) >= 0.3
    assert (h - 0.5) / (w + 0.5) <= 1 / 0.3
  # Same box-size distribution as the baseline's loop (means within 4 se).
  ref = [b for b in _bot_erasing_reference(4000, height, width)
         if b is not None]
  ours_frac = np.array([h * w for h, w in erased]) / (height * width)
  ref_frac = np.array([h * w for h, w in ref]) / (height * width)
  se = math.sqrt(ours_frac.var() / len(ours_frac) +
                 ref_frac.var() / len(ref_frac))
  assert abs(ours_frac.mean() - ref_frac.mean()) < 4 * se
  ours_h = np.array([h for h, _ in erased], float)
  ref_h = np.array([h for h, _ in ref], float)
  se = math.sqrt(ours_h.var() / len(ours_h) + ref_h.var() / len(ref_h))
  assert abs(ours_h.mean() - ref_h.mean()) < 4 * se


def test_train_transform_erases_with_pixel_mean_and_is_deterministic():
  img = _noise(128, 64, seed=5)
  cfg = _cfg(flip=0.5, padding=10, erase=1.0)
  seed = tf.constant([3, 4], tf.int64)
  out = transforms.train_transform(tf.constant(img), seed, cfg, (256, 128))
  again = transforms.train_transform(tf.constant(img), seed, cfg, (256, 128))
  other = transforms.train_transform(tf.constant(img), tf.constant([3, 5]),
                                     cfg, (256, 128))
  np.testing.assert_array_equal(out.numpy(), again.numpy())
  assert not np.array_equal(out.numpy(), other.numpy())
  assert out.shape == (256, 128, 3) and out.dtype == tf.float32
  # BoT writes cfg.INPUT.PIXEL_MEAN into the normalised tensor.
  mask = np.all(out.numpy() == np.array(MEAN, np.float32), axis=-1)
  assert mask.sum() >= 0.02 * 256 * 128 * 0.9
  half = transforms.train_transform(tf.constant(img), seed, cfg, (256, 128),
                                    tf.bfloat16)
  assert half.dtype == tf.bfloat16
