"""The synthetic pedestrians' identities and cameras: attribute palettes and sampling.

`input_pipeline.synthetic` plans the dataset with `sample_identities` and
`sample_cameras`; `input_pipeline.synthetic_render` draws an image of an `Identity`
seen by a `Camera`.
"""

import dataclasses

import numpy as np

# Clothing palettes (RGB, before the camera's photometric transform).
# red, orange, yellow, green, teal, blue, purple, pink, white, black:
UPPER_PALETTE = ((205, 30, 35), (245, 135, 20), (235, 215, 40), (40, 160, 60),
                 (20, 165, 175), (35, 70, 200), (125, 45, 170), (240, 110, 180),
                 (240, 240, 235), (28, 28, 30))
# black, navy, grey, khaki, brown, white, red, green:
LOWER_PALETTE = ((25, 28, 35), (35, 45, 120), (110, 110, 115), (200, 180, 120),
                 (115, 70, 35), (235, 235, 230), (180, 30, 40), (45, 120, 55))
ACCESSORY_PALETTE = (
    (20, 20, 20), (200, 40, 40), (40, 60, 180), (230, 200, 40), (240, 240, 240),
    (140, 90, 50), (40, 140, 70),
)
SKIN_TONES = ((230, 190, 160), (190, 140, 100), (120, 80, 55))
HAIR_COLOURS = ((20, 18, 15), (95, 60, 30), (210, 180, 110), (160, 160, 160))
SHOE_COLOURS = ((15, 15, 15), (235, 235, 235), (110, 60, 30), (180, 30, 30))

UPPER_PATTERNS = ('solid', 'hstripes', 'vstripes', 'checks', 'logo')
LOWER_TYPES = ('trousers', 'shorts', 'skirt')
SLEEVES = ('long', 'short')
ACCESSORIES = ('none', 'bag', 'hat', 'backpack')
LOGO_SHAPES = ('circle', 'diamond', 'bar')

# Camera photometry: fixed, well-spread sets, permuted and jittered per seed so
# that every dataset has strong camera differences.
_CAMERA_GAINS = (0.7, 1.25, 0.82, 1.12, 0.95, 1.05, 0.76, 1.18, 0.9)
_CAMERA_CASTS = (
    (1.12, 1.0, 0.86), (0.89, 0.98, 1.14), (0.94, 1.09, 0.92), (1.08, 0.9, 1.06),
    (1.0, 1.0, 1.0), (1.09, 1.05, 0.88), (0.91, 1.04, 1.09), (1.05, 0.96, 0.98),
    (0.98, 1.02, 1.05),
)
_CAMERA_GAMMAS = (0.85, 1.15, 0.92, 1.08, 1.0, 0.88, 1.12, 0.96, 1.04)

Colour = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Identity:
  """The appearance of one synthetic person (fixed across images).

  Attributes:
    upper: index into UPPER_PALETTE.
    upper_secondary: index into UPPER_PALETTE used by the pattern.
    pattern: index into UPPER_PATTERNS.
    pattern_scale: stripe/check period or logo size factor.
    logo_shape: index into LOGO_SHAPES.
    sleeves: index into SLEEVES.
    lower: index into LOWER_PALETTE.
    lower_type: index into LOWER_TYPES.
    accessory: index into ACCESSORIES.
    accessory_colour: index into ACCESSORY_PALETTE.
    skin: index into SKIN_TONES.
    hair: index into HAIR_COLOURS.
    shoes: index into SHOE_COLOURS.
    height: relative height (fraction of the frame it fills at scale 1).
    width: relative body width.
    leg: leg length as a fraction of the body height.
  """
  upper: int
  upper_secondary: int
  pattern: int
  pattern_scale: float
  logo_shape: int
  sleeves: int
  lower: int
  lower_type: int
  accessory: int
  accessory_colour: int
  skin: int
  hair: int
  shoes: int
  height: float
  width: float
  leg: float

  def key(self) -> tuple[int, ...]:
    """Returns the discrete signature that must be unique across identities."""
    secondary = self.upper_secondary if self.pattern else -1
    acc_colour = self.accessory_colour if self.accessory else -1
    return (self.upper, secondary, self.pattern, self.lower, self.lower_type,
            self.accessory, acc_colour, self.sleeves)


@dataclasses.dataclass(frozen=True)
class Camera:
  """Scene and photometry of one camera.

  Attributes:
    gain: global brightness multiplier.
    cast: per-channel (R, G, B) multipliers.
    gamma: exponent applied to [0, 1] intensities.
    haze: blend weight towards `haze_colour` (fog / low contrast).
    haze_colour: RGB in [0, 1].
    wall: background wall colour.
    floor: background floor colour.
    horizon: wall/floor boundary as a fraction of the image height.
    blur: base Gaussian blur radius in output pixels.
    noise: Gaussian noise standard deviation in [0, 1] units.
  """
  gain: float
  cast: tuple[float, float, float]
  gamma: float
  haze: float
  haze_colour: tuple[float, float, float]
  wall: Colour
  floor: Colour
  horizon: float
  blur: float
  noise: float


def sample_identity(rng: np.random.Generator) -> Identity:
  """Samples one identity; every attribute is drawn independently.

  Args:
    rng: random generator.

  Returns:
    An Identity.
  """
  upper = int(rng.integers(len(UPPER_PALETTE)))
  secondary = int(rng.integers(len(UPPER_PALETTE) - 1))
  secondary += secondary >= upper  # Different from the main colour.
  return Identity(
      upper=upper,
      upper_secondary=secondary,
      pattern=int(rng.integers(len(UPPER_PATTERNS))),
      pattern_scale=float(rng.uniform(0.8, 1.25)),
      logo_shape=int(rng.integers(len(LOGO_SHAPES))),
      sleeves=int(rng.integers(len(SLEEVES))),
      lower=int(rng.integers(len(LOWER_PALETTE))),
      lower_type=int(rng.choice(len(LOWER_TYPES), p=(0.6, 0.2, 0.2))),
      accessory=int(rng.integers(len(ACCESSORIES))),
      accessory_colour=int(rng.integers(len(ACCESSORY_PALETTE))),
      skin=int(rng.integers(len(SKIN_TONES))),
      hair=int(rng.integers(len(HAIR_COLOURS))),
      shoes=int(rng.integers(len(SHOE_COLOURS))),
      height=float(rng.uniform(0.9, 1.0)),
      width=float(rng.uniform(0.85, 1.2)),
      leg=float(rng.uniform(0.43, 0.52)),
  )


def sample_identities(rng: np.random.Generator, num: int,
                      min_distance: int = 2) -> list[Identity]:
  """Samples `num` identities whose discrete signatures differ pairwise.

  Any two identities differ in at least `min_distance` entries of `Identity.key()`
  (relaxed to 1 if the attribute space runs out), so that no two people look alike
  while every single attribute value stays shared by many.

  Args:
    rng: random generator.
    num: number of identities.
    min_distance: required Hamming distance between signatures.

  Returns:
    A list of Identity.
  """
  out: list[Identity] = []
  keys: list[tuple[int, ...]] = []
  failures = 0
  while len(out) < num:
    identity = sample_identity(rng)
    key = identity.key()
    distance = (np.asarray(keys) != key).sum(1).min() if keys else min_distance
    needed = min_distance if failures < 10_000 else 1
    if distance >= needed:
      out.append(identity)
      keys.append(key)
    else:
      failures += 1
  return out


def sample_cameras(rng: np.random.Generator, num: int) -> list[Camera]:
  """Samples the cameras: spread gains, casts and gammas, random scenes.

  Args:
    rng: random generator.
    num: number of cameras (at most 9).

  Returns:
    A list of Camera.
  """
  gains = rng.permutation(len(_CAMERA_GAINS))[:num]
  casts = rng.permutation(len(_CAMERA_CASTS))[:num]
  gammas = rng.permutation(len(_CAMERA_GAMMAS))[:num]
  cameras = []
  for i in range(num):
    cast = np.asarray(_CAMERA_CASTS[casts[i]]) * rng.uniform(0.95, 1.05, 3)
    cameras.append(Camera(
        gain=float(_CAMERA_GAINS[gains[i]] * rng.uniform(0.95, 1.05)),
        cast=tuple(float(c) for c in cast),
        gamma=float(_CAMERA_GAMMAS[gammas[i]]),
        haze=float(rng.uniform(0.0, 0.15)),
        haze_colour=tuple(float(c) for c in rng.uniform(0.4, 0.9, 3)),
        wall=tuple(int(c) for c in rng.integers(40, 220, 3)),
        floor=tuple(int(c) for c in rng.integers(30, 200, 3)),
        horizon=float(rng.uniform(0.45, 0.8)),
        blur=float(rng.uniform(0.0, 0.6)),
        noise=float(rng.uniform(0.005, 0.025)),
    ))
  return cameras
