"""The baseline's training augmentation on the accelerator, in JAX.

The host only decodes and resizes (`input_pipeline.transforms.resize`) and
ships uint8 (b, H, W, 3) batches at the training size; the per-pixel work runs
inside the (pmapped) train step:

  RandomHorizontalFlip(flip_prob) -> Pad(padding) -> RandomCrop(H, W) ->
  ToTensor (/255) -> Normalize(mean, std) -> RandomErasing(p) -> cast.

Randomness is split from the pixel work: `sample_params` draws every random
decision of a batch (a few numbers per image, from one typed PRNG key per
image, see `image_keys`) and `apply_params` applies them; `augment` is the
two together.

Fidelity notes (what equals the baseline, Bag-of-Tricks `build_transforms`, and
`input_pipeline.transforms`, the TF host version):
  * Same operations, order and distributions; only the random numbers differ
    (JAX's threefry instead of Python's `random` / torch's generator / TF's
    stateless ops), so an image gets different, equally distributed draws.
    Each image's draws are the 206 32-bit words of one `jax.random.bits`
    call: floats in [0, 1) from the top 23 bits (as `jax.random.uniform`),
    integers in [0, n) as word mod n (uniform up to a relative bias below
    n / 2**32, where Python's and torch's integers are exactly uniform).
  * Flip: u ~ U[0, 1) per image, flipped when u < flip_prob (torchvision's
    `torch.rand(1) < p`).
  * Pad + crop: zero padding by `padding` px on each side in uint8 space
    (black, as `Pad(fill=0)` on the PIL image), then a crop back to (H, W) with
    top, left uniform integers in [0, 2 * padding] (torchvision `RandomCrop`).
    Flip, pad and crop act on the uint8 values and are exact.
  * Normalisation: (x / 255 - mean) / std computed in float32 in that order
    with correctly rounded divisions, as torchvision's ToTensor + Normalize
    (CPU and GPU: bit-identical to numpy by construction, a table computed
    with numpy, see `_normalize_erase`; TPU: the platform's float32
    arithmetic), then one cast to the compute dtype (bfloat16/float16: round
    to nearest even) after erasing, as the baseline's order.
  * Random erasing (the baseline's `RandomErasing`: sl=0.02, sh=0.4, r1=0.3):
    with probability p, up to 100 attempts of area ~ U(sl, sh) * H * W and
    aspect ~ U(r1, 1 / r1); h = round(sqrt(area * aspect)), w =
    round(sqrt(area / aspect)) (round half to even, as Python's `round`); an
    attempt is accepted when h < H and w < W; top ~ U{0..H-h}, left ~
    U{0..W-w} inclusive (`random.randint`). The 100 attempts are drawn at once
    and the first valid one is used: the same distribution as the sequential
    loop (the loop's draws are i.i.d. and it stops at the first valid one).
    When no attempt is valid (or u >= p) nothing is erased. Area and aspect
    are drawn and multiplied in float32 (the baseline uses float64): h or w can
    differ only when sqrt(...) lands within ~1e-6 of a half-integer.
  * The erased box is set to the fill value written as is into the
    normalised tensor. The baseline builds RandomErasing with
    `mean=cfg.INPUT.PIXEL_MEAN`, so the fill is the raw pixel mean (0.485,
    0.456, 0.406), not 0 (the normalised mean); `AugmentConfig.erase_value`
    overrides it (`config.input.random_erasing_value`, empty by default).
  * Keys: `image_keys` folds (epoch, position in the epoch's global batch
    order) into `jax.random.key(seed)`, so an image's augmentation does not
    depend on the device or process count, or on how the batch is laid out.

Performance: everything is batched (vmap or broadcast ops, no loop over
images). Flip, pad and crop stay in uint8 (a select between the image and its
mirror, a pad and a batched `dynamic_slice`). Normalisation, erasing and the
cast are one lookup per element in a (257, 3) table of the output dtype's bit
patterns (256 normalised grey levels computed with numpy at trace time, then
the fill), indexed by the grey level or by 256 inside the erased box (the
outer product of a row and a column mask): exact, and XLA fuses the whole
augmentation into a single elementwise pass. On TPU the normalisation is
float32 arithmetic instead (see `_normalize_erase`). `augment` puts an
optimization barrier between the parameters and the pixel pass: without it XLA
fuses the parameters' arithmetic into that pass and recomputes it per element
(XLA:CPU keeps the barrier until fusion only with `reid_jax.cpu_tuning`'s flags,
which `reid_jax.main` sets; without them the result is the same, only slower).
Measured on XLA:CPU (one thread, 2 x 256x128 uint8 -> float32): ~0.5 ns per
output element, against ~0.2 ns for a bare uint8 -> float32 conversion: the
table lookup is a scalar load per element (XLA emits no vector gather), and
exact division-based arithmetic is not available (XLA turns a division by a
constant into a multiplication by its reciprocal).
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.choices import check_choice

# The baseline's RandomErasing constants.
ERASE_SL = 0.02
ERASE_SH = 0.4
ERASE_R1 = 0.3
ERASE_ATTEMPTS = 100

PARAM_NAMES = ('flip', 'crop_top', 'crop_left', 'erase', 'erase_top',
               'erase_left', 'erase_h', 'erase_w')


def _triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
  values = tuple(float(v) for v in values)
  if len(values) != 3:
    raise ValueError(f'{name} must have 3 values (one per RGB channel), '
                     f'got {values}.')
  return values  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Static augmentation settings (hashable: a static argument under jit).

  Attributes:
    image_size: (H, W) of the images (input and output).
    flip_prob: probability of a horizontal flip.
    padding: zero padding on each side before the random crop (0: no crop).
    random_erasing_prob: probability of random erasing (0: never).
    pixel_mean: per-channel mean of [0, 1] images.
    pixel_std: per-channel standard deviation.
    erase_value: fill of the erased box written into the normalised tensor;
      None: `pixel_mean` (what the baseline does).
  """
  image_size: tuple[int, int]
  flip_prob: float
  padding: int
  random_erasing_prob: float
  pixel_mean: tuple[float, float, float]
  pixel_std: tuple[float, float, float]
  erase_value: tuple[float, float, float] | None = None

  def __post_init__(self):
    size = tuple(int(s) for s in self.image_size)
    if len(size) != 2 or min(size) < 1:
      raise ValueError(f'image_size must be (height, width) with positive '
                       f'sizes, got {self.image_size}.')
    if not 0.0 <= float(self.flip_prob) <= 1.0:
      raise ValueError(f'flip_prob must be in [0, 1], got {self.flip_prob}.')
    if not 0.0 <= float(self.random_erasing_prob) <= 1.0:
      raise ValueError('random_erasing_prob must be in [0, 1], got '
                       f'{self.random_erasing_prob}.')
    if int(self.padding) < 0:
      raise ValueError(f'padding must be >= 0, got {self.padding}.')
    std = _triple(self.pixel_std, 'pixel_std')
    if min(std) <= 0:
      raise ValueError(f'pixel_std must be positive, got {std}.')
    # Normalise the types so that equal settings hash equally.
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_('image_size', size)
    set_('flip_prob', float(self.flip_prob))
    set_('padding', int(self.padding))
    set_('random_erasing_prob', float(self.random_erasing_prob))
    set_('pixel_mean', _triple(self.pixel_mean, 'pixel_mean'))
    set_('pixel_std', std)
    if self.erase_value is not None:
      set_('erase_value', _triple(self.erase_value, 'erase_value'))

  @classmethod
  def from_config(cls, cfg_input: Any) -> 'AugmentConfig':
    """Builds the settings from `config.input` (see configs/default.py).

    Args:
      cfg_input: `config.input`: image_size, flip_prob, padding,
        random_erasing_prob, pixel_mean, pixel_std and random_erasing_value
        (empty: the pixel mean).

    Returns:
      the AugmentConfig.
    """
    value = tuple(cfg_input.random_erasing_value)
    return cls(
        image_size=tuple(cfg_input.image_size),
        flip_prob=cfg_input.flip_prob,
        padding=cfg_input.padding,
        random_erasing_prob=cfg_input.random_erasing_prob,
        pixel_mean=tuple(cfg_input.pixel_mean),
        pixel_std=tuple(cfg_input.pixel_std),
        erase_value=value or None)

  @property
  def fill(self) -> tuple[float, float, float]:
    """The erasing fill value (erase_value, else pixel_mean)."""
    return self.pixel_mean if self.erase_value is None else self.erase_value


def image_keys(seed: int | jax.Array, epoch: jax.Array,
               position: jax.Array) -> jax.Array:
  """One typed PRNG key per image.

  key = fold_in(fold_in(jax.random.key(seed), epoch), position): a function of
  (seed, epoch, position) only, so a batch gets the same draws whatever the
  device count, process count or array layout.

  Args:
    seed: the experiment seed (config.seed).
    epoch: integer array (or scalar) of epochs, broadcastable to `position`.
    position: integer array, index of each image in the epoch's global batch
      order (step * global_batch + column).

  Returns:
    typed key array of shape `position.shape`.
  """
  position = jnp.asarray(position)
  epoch = jnp.asarray(epoch)
  for name, value in (('epoch', epoch), ('position', position)):
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f'{name} must be an integer array, got {value.dtype}.')
  epoch = jnp.broadcast_to(epoch, position.shape).astype(jnp.int32)
  position = position.astype(jnp.int32)
  base = jax.random.key(seed)
  fold = lambda e, p: jax.random.fold_in(jax.random.fold_in(base, e), p)
  keys = jax.vmap(fold)(epoch.reshape(-1), position.reshape(-1))
  return keys.reshape(position.shape)


# Layout of the 32-bit words drawn per image (one threefry call, see
# _sample_one): flip u, erasing u, crop top, crop left, erase top, erase left,
# then the areas and the aspect ratios of the erasing attempts.
_AREA = slice(6, 6 + ERASE_ATTEMPTS)
_ASPECT = slice(6 + ERASE_ATTEMPTS, 6 + 2 * ERASE_ATTEMPTS)
_NUM_WORDS = 6 + 2 * ERASE_ATTEMPTS


def _unit_uniform(bits: jax.Array) -> jax.Array:
  """uint32 words -> float32 uniform in [0, 1) (as jax.random.uniform does)."""
  mantissa = jax.lax.shift_right_logical(bits, jnp.uint32(32 - 23))
  one_to_two = jax.lax.bitcast_convert_type(
      mantissa | jnp.uint32(0x3F800000), jnp.float32)
  return one_to_two - jnp.float32(1.0)


def _uniform_int(bits: jax.Array, n: jax.Array | int) -> jax.Array:
  """uint32 words -> int32 uniform in [0, n) (relative bias below n / 2**32)."""
  return (bits % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


def _sample_one(key: jax.Array, cfg: AugmentConfig) -> dict[str, jax.Array]:
  """Draws the augmentation parameters of one image (see sample_params).

  All draws come from one `jax.random.bits` call (one word per decision):
  several `jax.random` calls per image cost seconds of XLA compile time.
  """
  height, width = cfg.image_size
  bits = jax.random.bits(key, (_NUM_WORDS,), jnp.uint32)
  u = _unit_uniform(bits)
  zero = jnp.zeros((), jnp.int32)
  params = {'flip': u[0] < cfg.flip_prob}
  if cfg.padding > 0:  # torchvision RandomCrop: top, left in [0, 2 * padding]
    params['crop_top'] = _uniform_int(bits[2], 2 * cfg.padding + 1)
    params['crop_left'] = _uniform_int(bits[3], 2 * cfg.padding + 1)
  else:
    params['crop_top'] = params['crop_left'] = zero
  if cfg.random_erasing_prob <= 0:
    params.update(erase=jnp.zeros((), jnp.bool_), erase_top=zero,
                  erase_left=zero, erase_h=zero, erase_w=zero)
    return params
  # random.uniform(a, b) = a + (b - a) * random().
  area = (ERASE_SL + (ERASE_SH - ERASE_SL) * u[_AREA]) * float(height * width)
  aspect = ERASE_R1 + (1.0 / ERASE_R1 - ERASE_R1) * u[_ASPECT]
  # jnp.round rounds half to even, as Python's round().
  hs = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  ws = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  valid = (hs < height) & (ws < width)
  first = jnp.argmax(valid)  # index of the first valid attempt (0 if none)
  erase = (u[1] < cfg.random_erasing_prob) & valid.any()
  h = jnp.where(erase, hs[first], 0)
  w = jnp.where(erase, ws[first], 0)
  # random.randint(0, H - h) and (0, W - w), inclusive; 0 when not erasing.
  top = jnp.where(erase, _uniform_int(bits[4], height - h + 1), 0)
  left = jnp.where(erase, _uniform_int(bits[5], width - w + 1), 0)
  params.update(erase=erase, erase_top=top, erase_left=left, erase_h=h,
                erase_w=w)
  return params


def sample_params(keys: jax.Array, cfg: AugmentConfig) -> dict[str, jax.Array]:
  """Draws every random decision of the augmentation, per image.

  Args:
    keys: typed PRNG key array, one key per image (any shape, usually (b,)).
    cfg: the augmentation settings.

  Returns:
    dict of arrays of shape `keys.shape`: 'flip' (bool), 'crop_top',
    'crop_left' (int32 in [0, 2 * padding]), 'erase' (bool), 'erase_top',
    'erase_left', 'erase_h', 'erase_w' (int32; all 0 where erase is False).
  """
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    raise ValueError('keys must be a typed PRNG key array (jax.random.key / '
                     f'image_keys), got dtype {keys.dtype}.')
  flat = jax.vmap(lambda k: _sample_one(k, cfg))(keys.reshape(-1))
  return {name: flat[name].reshape(keys.shape) for name in PARAM_NAMES}


def _check_images(images: jax.Array, cfg: AugmentConfig | None) -> None:
  if images.dtype != jnp.uint8:
    raise ValueError(f'images must be uint8 (the host ships raw pixels), got '
                     f'{images.dtype}.')
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError('images must have shape (batch, height, width, 3), got '
                     f'{images.shape}.')
  if cfg is not None and tuple(images.shape[1:3]) != cfg.image_size:
    raise ValueError(f'images are {images.shape[1]}x{images.shape[2]} but '
                     f'cfg.image_size is {cfg.image_size[0]}x'
                     f'{cfg.image_size[1]}; the host must resize to the '
                     'training size.')


# The dtypes the augmentation writes (the compute dtypes: reid_jax.precision.DTYPES).
OUTPUT_DTYPES = ('float32', 'bfloat16', 'float16')


def _output_dtype(dtype: Any) -> np.dtype:
  dtype = np.dtype(dtype)
  check_choice('dtype', dtype.name, OUTPUT_DTYPES)
  return dtype


def normalized_values(pixel_mean: Sequence[float],
                      pixel_std: Sequence[float]) -> np.ndarray:
  """(v / 255 - mean) / std for every uint8 value v, in float32 (numpy).

  Args:
    pixel_mean: per-channel mean of [0, 1] images.
    pixel_std: per-channel standard deviation.

  Returns:
    float32 (256, 3) table; row v holds the normalised value of grey level v.
  """
  values = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
  return ((values - np.asarray(pixel_mean, np.float32)) /
          np.asarray(pixel_std, np.float32))


def _bit_table(pixel_mean: Sequence[float], pixel_std: Sequence[float],
               fill: Sequence[float], dtype: np.dtype) -> np.ndarray:
  """(257, 3) table of `dtype` bit patterns: 256 grey levels, then the fill."""
  table = np.concatenate([normalized_values(pixel_mean, pixel_std),
                          np.asarray(fill, np.float32)[None]], axis=0)
  return table.astype(dtype).view(f'uint{8 * dtype.itemsize}')


def _lookup(x: jax.Array, erased: jax.Array | None,
            pixel_mean: Sequence[float], pixel_std: Sequence[float],
            fill: Sequence[float], dtype: np.dtype) -> jax.Array:
  """Normalise (and erase) by one table lookup per element (CPU, GPU)."""
  index = x.astype(jnp.int32)
  if erased is not None:
    index = jnp.where(erased, 256, index)
  table = jnp.asarray(_bit_table(pixel_mean, pixel_std, fill, dtype))
  return jax.lax.bitcast_convert_type(table[index, jnp.arange(3)], dtype)


def _arithmetic(x: jax.Array, erased: jax.Array | None,
                pixel_mean: Sequence[float], pixel_std: Sequence[float],
                fill: Sequence[float], dtype: np.dtype) -> jax.Array:
  """Normalise (and erase) with float32 arithmetic, then cast (TPU)."""
  y = x.astype(jnp.float32) / jnp.float32(255.0)
  y = ((y - np.asarray(pixel_mean, np.float32)) /
       np.asarray(pixel_std, np.float32))
  if erased is not None:
    y = jnp.where(erased, np.asarray(fill, np.float32), y)
  return y.astype(dtype)


def _normalize_erase(x: jax.Array, erased: jax.Array | None,
                     pixel_mean: Sequence[float], pixel_std: Sequence[float],
                     fill: Sequence[float], dtype: np.dtype) -> jax.Array:
  """uint8 (..., 3) -> normalised `dtype`, `fill` where `erased` (..., 1).

  Default (CPU, GPU): one lookup per element in a table computed at trace
  time with numpy: the exact float32 (v / 255 - mean) / std of the 256 grey
  levels, cast to `dtype` as a cast of the float32 result would be, plus the
  fill as row 256. XLA rewrites a division by a broadcast constant into a
  multiplication by its reciprocal, up to hundreds of ulps off where
  x / 255 is close to the mean; the table avoids that, and the slow
  float32 -> bfloat16 conversion on CPU. It holds unsigned bit patterns
  (integer gathers: XLA's CPU backend widens bfloat16 gathers to float32 and
  back), bitcast after the lookup. On TPU, where per-element gathers are
  slow, `_arithmetic` is used instead (float32 as the platform divides, then
  the cast).
  """
  args = (pixel_mean, pixel_std, fill, dtype)
  return jax.lax.platform_dependent(
      x, erased, tpu=lambda x, e: _arithmetic(x, e, *args),
      default=lambda x, e: _lookup(x, e, *args))


def _flip_pad_crop(images: jax.Array, params: dict[str, jax.Array],
                   cfg: AugmentConfig) -> jax.Array:
  """Flip, zero-pad and crop, all on uint8 (b, H, W, 3)."""
  flip = jnp.asarray(params['flip'], jnp.bool_)[:, None, None, None]
  images = jnp.where(flip, images[:, :, ::-1], images)
  pad = cfg.padding
  if pad <= 0:
    return images
  height, width = cfg.image_size
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = lambda im, t, l: jax.lax.dynamic_slice(im, (t, l, 0),
                                                (height, width, 3))
  return jax.vmap(crop)(padded, jnp.asarray(params['crop_top'], jnp.int32),
                        jnp.asarray(params['crop_left'], jnp.int32))


def _erase_mask(params: dict[str, jax.Array],
                cfg: AugmentConfig) -> jax.Array:
  """(b, H, W, 1) bool: inside the erased box (row mask x column mask)."""
  height, width = cfg.image_size
  as_int = lambda n: jnp.asarray(params[n], jnp.int32)[:, None]
  top, left = as_int('erase_top'), as_int('erase_left')
  rows, cols = jnp.arange(height)[None], jnp.arange(width)[None]
  row_in = ((rows >= top) & (rows < top + as_int('erase_h')) &
            jnp.asarray(params['erase'], jnp.bool_)[:, None])
  col_in = (cols >= left) & (cols < left + as_int('erase_w'))
  return row_in[:, :, None, None] & col_in[:, None, :, None]


def apply_params(images: jax.Array, params: dict[str, jax.Array],
                 cfg: AugmentConfig, dtype: Any) -> jax.Array:
  """Applies drawn augmentation parameters to a uint8 batch.

  Args:
    images: uint8 (b, H, W, 3) with (H, W) == cfg.image_size.
    params: from `sample_params`, arrays of shape (b,).
    cfg: the augmentation settings.
    dtype: output dtype (float32, bfloat16, float16).

  Returns:
    (b, H, W, 3) normalised (and erased) images of `dtype`.
  """
  _check_images(images, cfg)
  dtype = _output_dtype(dtype)
  missing = [n for n in PARAM_NAMES if n not in params]
  if missing:
    raise ValueError(f'params lacks {missing}; use sample_params.')
  bad = [n for n in PARAM_NAMES if jnp.shape(params[n]) != images.shape[:1]]
  if bad:
    raise ValueError(f'params {bad} must have shape ({images.shape[0]},), one '
                     'value per image.')
  return normalize_and_erase(_flip_pad_crop(images, params, cfg), params, cfg, dtype)


def normalize_and_erase(x: jax.Array, params: dict[str, jax.Array],
                        cfg: AugmentConfig, dtype: Any) -> jax.Array:
  """The last steps of `apply_params`: normalise, erase, cast.

  Args:
    x: uint8 (b, H, W, 3), already flipped, padded and cropped with `params`.
    params: from `sample_params`.
    cfg: the augmentation settings.
    dtype: output dtype.

  Returns:
    (b, H, W, 3) images of `dtype`.
  """
  dtype = _output_dtype(dtype)
  erased = _erase_mask(params, cfg) if cfg.random_erasing_prob > 0 else None
  return _normalize_erase(x, erased, cfg.pixel_mean, cfg.pixel_std, cfg.fill,
                          dtype)


def augment(images: jax.Array, keys: jax.Array, cfg: AugmentConfig,
            dtype: Any) -> jax.Array:
  """Training augmentation of a uint8 batch, one key per image.

  Args:
    images: uint8 (b, H, W, 3) with (H, W) == cfg.image_size.
    keys: typed PRNG keys of shape (b,) (see `image_keys`).
    cfg: the augmentation settings.
    dtype: output dtype.

  Returns:
    (b, H, W, 3) augmented images of `dtype`.
  """
  _check_images(images, cfg)
  if keys.shape != images.shape[:1]:
    raise ValueError(f'keys must have shape ({images.shape[0]},) (one per '
                     f'image), got {keys.shape}.')
  # The barrier makes XLA compute the few parameters per image once, in their own
  # small kernels, instead of fusing their arithmetic (remainders, selects) into the
  # per-element loop, where it was redone for every element (see the module
  # docstring, Performance).
  params = jax.lax.optimization_barrier(sample_params(keys, cfg))
  return apply_params(images, params, cfg, dtype)


def normalize(images: jax.Array, pixel_mean: Sequence[float],
              pixel_std: Sequence[float], dtype: Any) -> jax.Array:
  """Eval path: uint8 -> (x / 255 - mean) / std in float32, then cast.

  Args:
    images: uint8 (b, H, W, 3).
    pixel_mean: per-channel mean of [0, 1] images.
    pixel_std: per-channel standard deviation.
    dtype: output dtype.

  Returns:
    (b, H, W, 3) normalised images of `dtype`.
  """
  _check_images(images, None)
  dtype = _output_dtype(dtype)
  mean = _triple(pixel_mean, 'pixel_mean')
  std = _triple(pixel_std, 'pixel_std')
  return _normalize_erase(images, None, mean, std, mean, dtype)
