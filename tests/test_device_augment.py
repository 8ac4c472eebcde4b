"""Tests of input_pipeline.device_augment against numpy references.

References written here from the definitions (the baseline's transforms):
  * `_np_apply`: flip, zero pad, crop, (x / 255 - mean) / std in float32,
    erased box set to the fill, with plain numpy slicing, one image at a time.
  * `_baseline_erasing`: the baseline's sequential RandomErasing loop with
    Python's `random`, used for the distribution of the erased boxes.
"""

import math
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from configs import default as default_config
from input_pipeline import device_augment as da

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _cfg(size=(64, 32), flip=0.5, padding=10, erase=0.5, value=None):
  return da.AugmentConfig(image_size=size, flip_prob=flip, padding=padding,
                          random_erasing_prob=erase, pixel_mean=MEAN,
                          pixel_std=STD, erase_value=value)


def _images(n, size, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (n, *size, 3), dtype=np.uint8)


def _np_params(params):
  return {k: np.asarray(v) for k, v in params.items()}


def _np_normalize(x):
  return ((x.astype(np.float32) / np.float32(255.0) -
           np.array(MEAN, np.float32)) / np.array(STD, np.float32))


def _np_crop(images, p, padding):
  """Flip, zero-pad and crop in uint8 with loops and slices."""
  out = []
  for i, img in enumerate(images):
    if p['flip'][i]:
      img = img[:, ::-1]
    h, w = img.shape[:2]
    padded = np.zeros((h + 2 * padding, w + 2 * padding, 3), np.uint8)
    padded[padding:padding + h, padding:padding + w] = img
    top, left = p['crop_top'][i], p['crop_left'][i]
    out.append(padded[top:top + h, left:left + w])
  return np.stack(out)


def _np_apply(images, p, cfg):
  """The whole augmentation in numpy (float32 result)."""
  out = _np_normalize(_np_crop(images, p, cfg.padding))
  fill = np.array(MEAN if cfg.erase_value is None else cfg.erase_value,
                  np.float32)
  for i in range(len(images)):
    if p['erase'][i]:
      t, l = p['erase_top'][i], p['erase_left'][i]
      out[i, t:t + p['erase_h'][i], l:l + p['erase_w'][i]] = fill
  return out


def _assert_max_ulp_16bit(actual, desired):
  """|difference| <= 1 unit in the last place for 16-bit floats (same sign)."""
  a = np.asarray(actual).view(np.int16).astype(np.int32)
  d = np.asarray(desired).view(np.int16).astype(np.int32)
  same_sign = (a < 0) == (d < 0)
  np.testing.assert_array_equal(same_sign, True)
  assert np.abs(a - d).max() <= 1


def _compare(out, ref_f32, dtype):
  out = np.asarray(out)
  assert out.dtype == np.dtype(dtype)
  if np.dtype(dtype) == np.float32:
    np.testing.assert_array_max_ulp(out, ref_f32, maxulp=1)
  else:
    _assert_max_ulp_16bit(out, ref_f32.astype(np.dtype(dtype)))


@pytest.fixture(scope='module')
def jitted():
  return {
      'keys': jax.jit(da.image_keys),
      'sample': jax.jit(da.sample_params, static_argnums=1),
      'apply': jax.jit(da.apply_params, static_argnums=(2, 3)),
      'augment': jax.jit(da.augment, static_argnums=(2, 3)),
  }


def test_fill_is_not_a_grey_level():
  # Makes "equal to the reference" imply "same erased box": no pixel value
  # normalises to the fill.
  levels = _np_normalize(np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1))
  assert not np.any(levels == np.array(MEAN, np.float32))


@pytest.mark.parametrize('size,padding,erase', [
    ((32, 16), 0, 0.0), ((32, 16), 10, 1.0), ((64, 32), 10, 0.0),
    ((64, 32), 0, 1.0), ((64, 32), 3, 0.5)])
def test_apply_matches_numpy(jitted, size, padding, erase):
  cfg = _cfg(size, flip=0.5, padding=padding, erase=erase)
  n = 24
  images = _images(n, size, seed=size[0] + padding)
  keys = jitted['keys'](3, jnp.full(n, 2, jnp.int32), jnp.arange(n))
  p = _np_params(jitted['sample'](keys, cfg))
  assert 0 < p['flip'].sum() < n  # both branches exercised
  if padding:
    assert p['crop_top'].max() > 0 and p['crop_left'].max() > 0
  else:
    assert not p['crop_top'].any() and not p['crop_left'].any()
  if erase in (0.0, 1.0):
    assert (p['erase'] == bool(erase)).all()
  else:
    assert 0 < p['erase'].sum() < n
  ref = _np_apply(images, p, cfg)
  # uint8 stage exact: invert the (monotonic) normalisation of the output.
  out32 = np.asarray(jitted['apply'](jnp.asarray(images), p, cfg, jnp.float32))
  kept = np.ones(out32.shape[:3], bool)
  for i in np.flatnonzero(p['erase']):
    t, l = p['erase_top'][i], p['erase_left'][i]
    kept[i, t:t + p['erase_h'][i], l:l + p['erase_w'][i]] = False
  grey = np.rint((out32 * np.array(STD) + np.array(MEAN)) * 255)
  np.testing.assert_array_equal(grey[kept],
                                _np_crop(images, p, padding)[kept])
  for dtype in DTYPES:
    out = jitted['apply'](jnp.asarray(images), p, cfg, dtype)
    _compare(out, ref, dtype)
  if 0 < erase < 1:  # augment = apply_params(sample_params)
    out = jitted['augment'](jnp.asarray(images), keys, cfg, jnp.bfloat16)
    _compare(out, ref, jnp.bfloat16)


def test_erased_boxes_and_custom_fill(jitted):
  cfg = _cfg((64, 32), flip=0.0, padding=0, erase=1.0, value=(1.5, -2.0, 0.25))
  images = _images(8, (64, 32), seed=5)
  p = _np_params(jitted['sample'](jitted['keys'](0, 0, jnp.arange(8)), cfg))
  assert p['erase'].all() and not p['flip'].any()
  out = np.asarray(jitted['apply'](jnp.asarray(images), p, cfg, jnp.float32))
  for i in range(8):
    box = np.all(out[i] == np.array([1.5, -2.0, 0.25], np.float32), axis=-1)
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    assert (rows[0], len(rows)) == (p['erase_top'][i], p['erase_h'][i])
    assert (cols[0], len(cols)) == (p['erase_left'][i], p['erase_w'][i])
    assert box.sum() == p['erase_h'][i] * p['erase_w'][i]
  np.testing.assert_array_max_ulp(out, _np_apply(images, p, cfg), maxulp=1)


def test_params_override_flag(jitted):
  # 'erase' False wins over a (hand-made) box; 'flip' True alone flips.
  cfg = _cfg((32, 16), padding=2, erase=0.5)
  images = _images(2, (32, 16), seed=9)
  p = {'flip': np.array([True, False]), 'crop_top': np.array([2, 0]),
       'crop_left': np.array([2, 4]), 'erase': np.array([False, True]),
       'erase_top': np.array([3, 31]), 'erase_left': np.array([1, 15]),
       'erase_h': np.array([10, 1]), 'erase_w': np.array([5, 1])}
  p = {k: v.astype(bool if v.dtype == bool else np.int32) for k, v in p.items()}
  out = jitted['apply'](jnp.asarray(images), p, cfg, jnp.float32)
  np.testing.assert_array_max_ulp(np.asarray(out), _np_apply(images, p, cfg),
                                  maxulp=1)


def test_arithmetic_path_matches_numpy():
  # The TPU path (float32 arithmetic, XLA may multiply by reciprocals).
  images = _images(4, (16, 8), seed=2)
  erased = np.zeros((4, 16, 8, 1), bool)
  erased[1, 2:5, 3:7] = True
  ref = _np_normalize(images)
  ref[1, 2:5, 3:7] = np.array(MEAN, np.float32)
  for dtype in DTYPES:
    out = jax.jit(da._arithmetic, static_argnums=(2, 3, 4, 5))(
        jnp.asarray(images), erased, MEAN, STD, MEAN, np.dtype(dtype))
    assert out.dtype == dtype
    tol = 2e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol)


def test_normalize_eval_path():
  images = np.concatenate([_images(2, (16, 8), seed=4),
                           np.arange(256, dtype=np.uint8).reshape(
                               1, 16, 16, 1).repeat(3, -1)[:, :, :8]], 0)
  ref = _np_normalize(images)
  fn = jax.jit(da.normalize, static_argnums=(1, 2, 3))
  for dtype in DTYPES:
    _compare(fn(jnp.asarray(images), MEAN, STD, dtype), ref, dtype)


def _baseline_erasing(rng, height, width, sl=0.02, sh=0.4, r1=0.3):
  """The baseline's RandomErasing loop (given that u < p): (top, left, h, w)."""
  for _ in range(100):
    area = rng.uniform(sl, sh) * height * width
    aspect = rng.uniform(r1, 1 / r1)
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if w < width and h < height:
      return rng.randint(0, height - h), rng.randint(0, width - w), h, w
  return None


def test_parameter_statistics(jitted):
  n, (height, width), padding = 20000, (256, 128), 10
  cfg = _cfg((height, width), flip=0.3, padding=padding, erase=0.5)
  p = _np_params(jitted['sample'](jitted['keys'](7, 0, jnp.arange(n)), cfg))
  sigma = lambda q: 4.5 * math.sqrt(q * (1 - q) / n)
  assert abs(p['flip'].mean() - 0.3) < sigma(0.3)
  for name in ('crop_top', 'crop_left'):
    counts = np.bincount(p[name], minlength=2 * padding + 1)
    assert len(counts) == 2 * padding + 1 and counts.min() > 0  # [0, 20]
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform
  # The baseline's loop, in Python, for the same settings.
  rng = random.Random(0)
  sim = np.array([_baseline_erasing(rng, height, width) for _ in range(n)])
  assert abs(p['erase'].mean() - 0.5) < sigma(0.5)  # P(some valid) ~ 1 here
  e = p['erase']
  assert not (p['erase_h'][~e].any() or p['erase_w'][~e].any() or
              p['erase_top'][~e].any() or p['erase_left'][~e].any())
  top, left, h, w = (p[k][e] for k in ('erase_top', 'erase_left', 'erase_h',
                                       'erase_w'))
  assert (h < height).all() and (w < width).all() and (h > 0).all()
  assert (top >= 0).all() and (top <= height - h).all()
  assert (left >= 0).all() and (left <= width - w).all()
  # Both ends of randint(0, H - h) and randint(0, W - w) are reached.
  assert (top == 0).any() and (top == height - h).any()
  assert (left == 0).any() and (left == width - w).any()
  frac, sim_frac = h * w / (height * width), sim[:, 2] * sim[:, 3] / (
      height * width)
  # Area within [0.02, 0.4] up to rounding of h and w (<= 0.0065 here).
  assert 0.02 - 0.0065 <= frac.min() < 0.025 and 0.39 < frac.max() <= 0.4065
  aspect = h / w
  assert 0.3 * 0.9 < aspect.min() < 0.32 and 3.1 < aspect.max() < 1.1 / 0.3
  for ours, theirs in ((frac, sim_frac), (h, sim[:, 2]), (w, sim[:, 3]),
                       (aspect, sim[:, 2] / sim[:, 3])):
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    np.testing.assert_allclose(np.quantile(ours, [0.1, 0.5, 0.9]),
                               np.quantile(theirs, [0.1, 0.5, 0.9]), rtol=0.05)
  # top ~ U{0..H-h}: (top + U[0, 1)) / (H - h + 1) ~ U[0, 1).
  jitter = np.random.default_rng(1).random((2, len(h)))
  assert stats.kstest((top + jitter[0]) / (height - h + 1),
                      'uniform').pvalue > 1e-3
  assert stats.kstest((left + jitter[1]) / (width - w + 1),
                      'uniform').pvalue > 1e-3


def test_erasing_rate_when_attempts_often_fail(jitted):
  # 3x200 images: only boxes with h <= 2 fit, ~1 attempt in 900 is valid, so
  # P(some of the 100 attempts is valid) is ~0.1: rate = p * that.
  n, (height, width), p_erase = 20000, (3, 200), 0.8
  cfg = _cfg((height, width), padding=0, erase=p_erase)
  p = _np_params(jitted['sample'](jitted['keys'](1, 0, jnp.arange(n)), cfg))
  rng = np.random.default_rng(0)
  area = rng.uniform(0.02, 0.4, 4_000_000) * height * width
  aspect = rng.uniform(0.3, 1 / 0.3, area.size)
  valid = ((np.round(np.sqrt(area * aspect)) < height) &
           (np.round(np.sqrt(area / aspect)) < width))
  expected = p_erase * (1 - (1 - valid.mean())**100)
  assert 0.05 < expected < 0.15
  assert abs(p['erase'].mean() - expected) < 4.5 * math.sqrt(
      expected * (1 - expected) / n) + 0.003
  e = p['erase']
  # h = 1 needs area * aspect < 2.25 < 0.02 * 600 * 0.3: only h = 2 occurs,
  # and top covers exactly [0, H - 2].
  np.testing.assert_array_equal(np.unique(p['erase_h'][e]), [2])
  np.testing.assert_array_equal(np.unique(p['erase_top'][e]), [0, 1])


def test_keys_independent_of_layout_and_devices(jitted):
  cfg = _cfg((32, 16), padding=4, erase=0.5)
  epoch, pos = jnp.full(16, 5, jnp.int32), jnp.arange(16, dtype=jnp.int32)
  flat = _np_params(jitted['sample'](jitted['keys'](0, epoch, pos), cfg))
  grid = _np_params(jitted['sample'](
      jitted['keys'](0, epoch.reshape(2, 8), pos.reshape(2, 8)), cfg))
  for k in da.PARAM_NAMES:
    assert grid[k].shape == (2, 8)
    np.testing.assert_array_equal(grid[k].reshape(-1), flat[k])
  # A scalar epoch broadcasts; the keys are those of fold_in chains.
  np.testing.assert_array_equal(
      jax.random.key_data(jitted['keys'](0, 5, pos)),
      jax.random.key_data(jitted['keys'](0, epoch, pos)))
  ref = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 5), 11)
  np.testing.assert_array_equal(jax.random.key_data(ref), jax.random.key_data(
      jitted['keys'](0, epoch, pos)[11]))
  # Other epochs, positions or seeds: other keys, other draws.
  data = lambda *a: np.asarray(jax.random.key_data(jitted['keys'](*a)))
  keysets = [data(0, epoch, pos), data(0, epoch + 1, pos), data(1, epoch, pos),
             data(0, epoch, pos + 16)]
  rows = np.concatenate(keysets).view(np.uint64)
  assert len(np.unique(rows)) == 64
  other = _np_params(jitted['sample'](jitted['keys'](0, epoch + 1, pos), cfg))
  assert any((other[k] != flat[k]).any() for k in ('crop_top', 'crop_left'))
  # pmap over the 4 devices, each computing its own slice: same batch.
  ndev = jax.local_device_count()
  assert ndev == 4  # tests/conftest.py
  images = _images(16, (32, 16), seed=3)
  step = jax.pmap(
      lambda im, e, q: da.augment(im, da.image_keys(0, e, q), cfg,
                                  jnp.float32))
  out = step(jnp.asarray(images.reshape(4, 4, 32, 16, 3)),
             epoch.reshape(4, 4), pos.reshape(4, 4))
  single = jitted['augment'](jnp.asarray(images), jitted['keys'](0, epoch, pos),
                             cfg, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out).reshape(16, 32, 16, 3),
                                np.asarray(single))


def test_from_config_and_hashing():
  cfg_input = default_config.get_config().input
  cfg = da.AugmentConfig.from_config(cfg_input)
  assert cfg == da.AugmentConfig((256, 128), 0.5, 10, 0.5, MEAN, STD)
  assert cfg.fill == MEAN and hash(cfg) == hash(da.AugmentConfig(
      [256, 128], 0.5, 10.0, 0.5, list(MEAN), list(STD)))
  custom = ml_collections.ConfigDict(cfg_input.to_dict())
  custom.random_erasing_value = (0.0, 0.0, 0.0)
  assert da.AugmentConfig.from_config(custom).fill == (0.0, 0.0, 0.0)


def test_bad_inputs_raise(jitted):
  cfg = _cfg((32, 16))
  images = jnp.asarray(_images(2, (32, 16)))
  keys = jitted['keys'](0, 0, jnp.arange(2))
  params = jitted['sample'](keys, cfg)
  with pytest.raises(ValueError, match='uint8.*float32'):
    da.augment(images.astype(jnp.float32), keys, cfg, jnp.float32)
  with pytest.raises(ValueError, match=r'\(batch, height, width, 3\)'):
    da.augment(images[0], keys, cfg, jnp.float32)
  with pytest.raises(ValueError, match=r'\(batch, height, width, 3\)'):
    da.apply_params(images[..., :1], params, cfg, jnp.float32)
  with pytest.raises(ValueError, match='32x16.*image_size is 64x32'):
    da.augment(images, keys, _cfg((64, 32)), jnp.float32)
  with pytest.raises(ValueError, match=r'keys must have shape \(2,\)'):
    da.augment(images, keys[:1], cfg, jnp.float32)
  with pytest.raises(ValueError, match='typed PRNG key'):
    da.sample_params(jax.random.key_data(keys), cfg)
  with pytest.raises(ValueError, match='dtype must be one of'):
    da.apply_params(images, params, cfg, jnp.int32)
  with pytest.raises(ValueError, match='lacks'):
    da.apply_params(images, {'flip': params['flip']}, cfg, jnp.float32)
  with pytest.raises(ValueError, match='one value per image'):
    da.apply_params(images, {k: v[:1] for k, v in params.items()}, cfg,
                    jnp.float32)
  with pytest.raises(ValueError, match='uint8'):
    da.normalize(images.astype(jnp.int32), MEAN, STD, jnp.float32)
  with pytest.raises(ValueError, match='position must be an integer'):
    da.image_keys(0, 0, jnp.arange(2.0))
  for kwargs, match in (({'flip': 1.5}, 'flip_prob'),
                        ({'padding': -1}, 'padding'),
                        ({'erase': -0.1}, 'random_erasing_prob'),
                        ({'size': (0, 4)}, 'image_size')):
    with pytest.raises(ValueError, match=match):
      _cfg(**kwargs)
  with pytest.raises(ValueError, match='pixel_std'):
    da.AugmentConfig((8, 8), 0.5, 0, 0.5, MEAN, (0.2, 0.2))

