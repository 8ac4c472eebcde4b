"""Drawing of the synthetic pedestrians: identities, cameras and the rendering of one image.

`input_pipeline.synthetic` plans the dataset (who is seen by which camera, file names)
and writes the files; this module holds what a picture is made of: the attribute
palettes, `Identity` and `Camera` sampling, and `render(job)`.
"""

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Render at SUPERSAMPLE x the output size, then downsample (anti-aliasing).
SUPERSAMPLE = 2

# Clothing palettes (RGB, before the camera's photometric transform).
UPPER_PALETTE = (
    (205, 30, 35),     # red
    (245, 135, 20),    # orange
    (235, 215, 40),    # yellow
    (40, 160, 60),     # green
    (20, 165, 175),    # teal
    (35, 70, 200),     # blue
    (125, 45, 170),    # purple
    (240, 110, 180),   # pink
    (240, 240, 235),   # white
    (28, 28, 30),      # black
)
LOWER_PALETTE = (
    (25, 28, 35),      # black
    (35, 45, 120),     # navy
    (110, 110, 115),   # grey
    (200, 180, 120),   # khaki
    (115, 70, 35),     # brown
    (235, 235, 230),   # white
    (180, 30, 40),     # red
    (45, 120, 55),     # green
)
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


@dataclasses.dataclass(frozen=True)
class Job:
  """One image to render and write.

  Attributes:
    path: output file path.
    kind: 'person', 'distractor' or 'junk'.
    identity: the person's appearance (None for distractors/junk, which draw their own).
    camera: the camera the image was taken with.
    stream: entropy of the image's random stream (seed, split, index).
    height: output height in pixels.
    width: output width in pixels.
    quality: JPEG quality.
  """
  path: str
  kind: str
  identity: Optional[Identity]
  camera: Camera
  stream: tuple[int, int, int]
  height: int
  width: int
  quality: int



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


def _random_colour(rng: np.random.Generator, base: Optional[Colour] = None,
                   mute: float = 0.0) -> Colour:
  """Returns a clutter colour: a clothing colour half of the time, else uniform.

  Args:
    rng: random generator.
    base: colour to blend towards (e.g. the scene's wall).
    mute: blend weight of `base`.

  Returns:
    An RGB colour.
  """
  if rng.random() < 0.5:
    palette = UPPER_PALETTE + LOWER_PALETTE
    colour = np.asarray(palette[int(rng.integers(len(palette)))]) + rng.integers(-25, 26, 3)
  else:
    colour = rng.integers(0, 256, 3)
  if base is not None:
    colour = (1.0 - mute) * colour + mute * np.asarray(base)
  return tuple(int(c) for c in np.clip(colour, 0, 255))


def _jitter(colour: Colour, rng: np.random.Generator, amount: int = 12) -> Colour:
  """Returns `colour` with a small per-image random offset."""
  return tuple(int(c) for c in np.clip(
      np.asarray(colour) + rng.integers(-amount, amount + 1, 3), 0, 255))


def _draw_background(draw: ImageDraw.ImageDraw, size: tuple[int, int],
                     camera: Camera, rng: np.random.Generator,
                     num_shapes: tuple[int, int] = (3, 9)) -> None:
  """Draws the camera's scene and random clutter.

  Args:
    draw: drawing context of the canvas.
    size: canvas (width, height).
    camera: the camera (scene colours).
    rng: random generator.
    num_shapes: range [low, high) of the number of clutter shapes.
  """
  w, h = size
  horizon = int(h * np.clip(camera.horizon + rng.normal(0, 0.06), 0.2, 0.95))
  draw.rectangle((0, 0, w, horizon), fill=_jitter(camera.wall, rng, 20))
  draw.rectangle((0, horizon, w, h), fill=_jitter(camera.floor, rng, 20))
  for _ in range(int(rng.integers(*num_shapes))):
    colour = _random_colour(rng, camera.wall, rng.uniform(0.2, 0.6))
    x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 1.0) * h
    bw, bh = rng.uniform(0.08, 0.5) * w, rng.uniform(0.04, 0.4) * h
    shape = rng.integers(4)
    if shape == 0:
      draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=colour)
    elif shape == 1:
      draw.ellipse((x0, y0, x0 + bw, y0 + bh), fill=colour)
    elif shape == 2:
      draw.line((x0, y0, x0 + rng.uniform(-1, 1) * w, y0 + rng.uniform(-1, 1) * h),
                fill=colour, width=int(rng.integers(2, 9)))
    else:
      pts = [(x0 + rng.uniform(0, bw), y0 + rng.uniform(0, bh)) for _ in range(3)]
      draw.polygon(pts, fill=colour)


def _draw_pattern(canvas: Image.Image, polygon: Sequence[tuple[float, float]],
                  identity: Identity, person_h: float, colour: Colour) -> None:
  """Draws the upper-body pattern inside the torso polygon.

  Args:
    canvas: the RGB canvas.
    polygon: torso outline.
    identity: the person (pattern, scale, logo shape).
    person_h: person height in canvas pixels.
    colour: the (jittered) secondary colour.
  """
  pattern = UPPER_PATTERNS[identity.pattern]
  if pattern == 'solid':
    return
  xs = [p[0] for p in polygon]
  ys = [p[1] for p in polygon]
  x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
  if pattern == 'logo':
    draw = ImageDraw.Draw(canvas)
    cx, cy = (x0 + x1) / 2, y0 + 0.4 * (y1 - y0)
    r = 0.055 * person_h * identity.pattern_scale
    shape = LOGO_SHAPES[identity.logo_shape]
    if shape == 'circle':
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == 'diamond':
      draw.polygon(((cx, cy - 1.3 * r), (cx + r, cy), (cx, cy + 1.3 * r), (cx - r, cy)),
                   fill=colour)
    else:
      draw.rectangle((x0, cy - 0.6 * r, x1, cy + 0.6 * r), fill=colour)
    return
  period = max(4.0, 0.075 * person_h * identity.pattern_scale)
  mask = Image.new('L', canvas.size, 0)
  ImageDraw.Draw(mask).polygon(polygon, fill=255)
  layer = Image.new('L', canvas.size, 0)
  draw = ImageDraw.Draw(layer)
  if pattern == 'hstripes':
    y = y0
    while y < y1:
      draw.rectangle((x0, y, x1, y + period / 2), fill=255)
      y += period
  elif pattern == 'vstripes':
    x = x0
    while x < x1:
      draw.rectangle((x, y0, x + period / 2, y1), fill=255)
      x += period
  else:  # checks
    nx = int(math.ceil((x1 - x0) / period)) + 1
    ny = int(math.ceil((y1 - y0) / period)) + 1
    for i in range(nx):
      for j in range(ny):
        if (i + j) % 2 == 0:
          draw.rectangle((x0 + i * period, y0 + j * period,
                          x0 + (i + 1) * period, y0 + (j + 1) * period), fill=255)
  combined = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(layer)))
  canvas.paste(colour, mask=combined)


def _thick_segment(draw: ImageDraw.ImageDraw, p0: tuple[float, float],
                   p1: tuple[float, float], width: float, fill: Colour) -> None:
  """Draws a segment of the given width with rounded ends."""
  draw.line((p0, p1), fill=fill, width=max(1, int(round(width))))
  r = width / 2
  for x, y in (p0, p1):
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _draw_person(canvas: Image.Image, identity: Identity, rng: np.random.Generator,
                 person_h: float, top: float, cx: float) -> None:
  """Draws one pedestrian (front or back view) with a random pose.

  Args:
    canvas: the RGB canvas.
    identity: the person's appearance.
    rng: random generator (pose, view, colour jitter).
    person_h: height of the person in canvas pixels.
    top: y of the top of the head.
    cx: x of the body axis.
  """
  draw = ImageDraw.Draw(canvas)
  p = person_h
  back_view = rng.random() < 0.3
  skin = _jitter(SKIN_TONES[identity.skin], rng, 8)
  hair = _jitter(HAIR_COLOURS[identity.hair], rng, 8)
  upper = _jitter(UPPER_PALETTE[identity.upper], rng)
  secondary = _jitter(UPPER_PALETTE[identity.upper_secondary], rng)
  lower = _jitter(LOWER_PALETTE[identity.lower], rng)
  shoes = _jitter(SHOE_COLOURS[identity.shoes], rng, 8)
  acc = _jitter(ACCESSORY_PALETTE[identity.accessory_colour], rng)
  accessory = ACCESSORIES[identity.accessory]

  r_head = 0.065 * p
  head_cy = top + r_head
  shoulder_y = top + 2 * r_head + 0.015 * p
  hip_y = top + p * (1.0 - identity.leg)
  foot_y = top + p - 0.02 * p
  tw = 0.24 * p * identity.width * rng.uniform(0.93, 1.07)  # torso width
  waist = 0.85 * tw
  lean = rng.normal(0, 0.015) * p

  # Backpack seen from the front: peeks out behind the shoulders.
  if accessory == 'backpack' and not back_view:
    draw.rectangle((cx - tw * 0.58, shoulder_y + 0.01 * p, cx + tw * 0.58,
                    shoulder_y + 0.55 * (hip_y - shoulder_y)), fill=acc)

  # Legs (behind the torso), with a random stride.
  leg_w = 0.095 * p * identity.width
  stride = rng.uniform(0.0, 0.12) * p
  hip_dx = waist * 0.25
  lower_type = LOWER_TYPES[identity.lower_type]
  for side in (-1, 1):
    hip = (cx + side * hip_dx + lean, hip_y)
    foot = (cx + side * (hip_dx + stride / 2) + rng.normal(0, 0.01) * p, foot_y)
    if lower_type == 'trousers':
      _thick_segment(draw, hip, foot, leg_w, lower)
    else:
      _thick_segment(draw, hip, foot, leg_w * 0.8, skin)
      if lower_type == 'shorts':
        knee = (hip[0] + 0.4 * (foot[0] - hip[0]), hip[1] + 0.4 * (foot[1] - hip[1]))
        _thick_segment(draw, hip, knee, leg_w * 1.05, lower)
    draw.ellipse((foot[0] - leg_w * 0.75 + side * leg_w * 0.2, foot_y - leg_w * 0.35,
                  foot[0] + leg_w * 0.75 + side * leg_w * 0.2, foot_y + leg_w * 0.45),
                 fill=shoes)
  if lower_type == 'skirt':
    skirt_bottom = hip_y + 0.5 * (foot_y - hip_y)
    draw.polygon(((cx - waist / 2 + lean, hip_y - 0.02 * p),
                  (cx + waist / 2 + lean, hip_y - 0.02 * p),
                  (cx + waist * 0.75 + stride / 3, skirt_bottom),
                  (cx - waist * 0.75 - stride / 3, skirt_bottom)), fill=lower)
  else:  # Pelvis block joining the legs.
    draw.rectangle((cx - waist / 2 + lean, hip_y - 0.03 * p,
                    cx + waist / 2 + lean, hip_y + 0.06 * p), fill=lower)

  # Arms, at a random angle from the body.
  arm_len = 0.36 * p
  arm_w = 0.06 * p * identity.width
  for side in (-1, 1):
    angle = math.radians(rng.uniform(3, 22))
    shoulder = (cx + side * (tw / 2 - arm_w * 0.3), shoulder_y + arm_w * 0.6)
    hand = (shoulder[0] + side * arm_len * math.sin(angle),
            shoulder[1] + arm_len * math.cos(angle))
    if SLEEVES[identity.sleeves] == 'long':
      _thick_segment(draw, shoulder, hand, arm_w, upper)
    else:
      elbow = (shoulder[0] + 0.45 * (hand[0] - shoulder[0]),
               shoulder[1] + 0.45 * (hand[1] - shoulder[1]))
      _thick_segment(draw, shoulder, hand, arm_w * 0.85, skin)
      _thick_segment(draw, shoulder, elbow, arm_w * 1.05, upper)
    draw.ellipse((hand[0] - arm_w * 0.6, hand[1] - arm_w * 0.6,
                  hand[0] + arm_w * 0.6, hand[1] + arm_w * 0.6), fill=skin)

  # Torso with its pattern.
  torso = ((cx - tw / 2, shoulder_y), (cx + tw / 2, shoulder_y),
           (cx + waist / 2 + lean, hip_y + 0.02 * p), (cx - waist / 2 + lean, hip_y + 0.02 * p))
  draw.polygon(torso, fill=upper)
  _draw_pattern(canvas, torso, identity, p, secondary)

  # Accessories over the torso.
  if accessory == 'backpack':
    if back_view:
      draw.rectangle((cx - tw * 0.4, shoulder_y + 0.03 * p, cx + tw * 0.4,
                      shoulder_y + 0.7 * (hip_y - shoulder_y)), fill=acc)
    else:
      for side in (-1, 1):
        x = cx + side * tw * 0.3
        draw.line(((x, shoulder_y), (x + lean * 0.5, shoulder_y + 0.6 * (hip_y - shoulder_y))),
                  fill=acc, width=max(1, int(0.025 * p)))
  elif accessory == 'bag':
    side = 1 if rng.random() < 0.5 else -1
    draw.line(((cx - side * tw * 0.4, shoulder_y), (cx + side * tw * 0.45, hip_y)),
              fill=acc, width=max(1, int(0.02 * p)))
    bx = cx + side * (tw * 0.45)
    bw, bh = 0.16 * p, 0.13 * p
    draw.rectangle((bx - bw / 2, hip_y - bh * 0.4, bx + bw / 2, hip_y + bh * 0.6), fill=acc)

  # Head, hair, hat.
  hx = cx + lean * 0.5
  draw.rectangle((hx - r_head * 0.35, head_cy, hx + r_head * 0.35, shoulder_y + 1), fill=skin)
  draw.ellipse((hx - r_head, top, hx + r_head, top + 2 * r_head), fill=skin)
  if back_view:
    draw.ellipse((hx - r_head, top, hx + r_head, top + 2 * r_head), fill=hair)
  else:
    draw.pieslice((hx - r_head, top - 0.1 * r_head, hx + r_head, top + 1.9 * r_head),
                  180, 360, fill=hair)
  if accessory == 'hat':
    draw.rectangle((hx - 1.35 * r_head, top + 0.35 * r_head, hx + 1.35 * r_head,
                    top + 0.6 * r_head), fill=acc)
    draw.ellipse((hx - r_head * 0.95, top - 0.45 * r_head, hx + r_head * 0.95,
                  top + 1.0 * r_head), fill=acc)


def _draw_occluder(draw: ImageDraw.ImageDraw, size: tuple[int, int],
                   rng: np.random.Generator) -> None:
  """Draws a pole or a box in front of the person."""
  w, h = size
  colour = _random_colour(rng)
  if rng.random() < 0.5:  # Vertical pole.
    pw = rng.uniform(0.07, 0.16) * w
    x = rng.uniform(0.0, 1.0) * w - pw / 2
    draw.rectangle((x, 0, x + pw, h), fill=colour)
  else:  # Box from the bottom or a side.
    bw, bh = rng.uniform(0.3, 0.9) * w, rng.uniform(0.12, 0.35) * h
    x = rng.uniform(-0.2, 0.8) * w
    draw.rectangle((x, h - bh, x + bw, h), fill=colour)


def _photometric(image: Image.Image, camera: Camera, rng: np.random.Generator,
                 blur_extra: float = 0.0) -> np.ndarray:
  """Applies blur, the camera's photometry, illumination gradient and noise.

  Args:
    image: RGB image at the output size.
    camera: the camera.
    rng: random generator.
    blur_extra: extra blur radius in output pixels.

  Returns:
    uint8 array (H, W, 3).
  """
  radius = camera.blur + rng.uniform(0.0, 0.8) + blur_extra
  if radius > 0.15:
    image = image.filter(ImageFilter.GaussianBlur(radius))
  x = np.asarray(image, dtype=np.float32) / 255.0
  h, w = x.shape[:2]
  x = x ** np.float32(camera.gamma * rng.uniform(0.92, 1.08))
  cast = np.asarray(camera.cast, np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
  gain = np.float32(camera.gain * rng.uniform(0.85, 1.15))
  # Illumination gradient in a random direction.
  theta = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  ramp = ((xx / w - 0.5) * np.cos(theta) + (yy / h - 0.5) * np.sin(theta))
  ramp = 1.0 + np.float32(rng.uniform(0.0, 0.35)) * ramp
  x = x * cast * gain * ramp[..., None]
  haze = np.float32(camera.haze)
  x = x * (1 - haze) + haze * np.asarray(camera.haze_colour, np.float32)
  x = x + rng.normal(0.0, camera.noise, x.shape).astype(np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def render(job: Job) -> np.ndarray:
  """Renders one image.

  Args:
    job: what to render.

  Returns:
    uint8 array (job.height, job.width, 3).
  """
  rng = np.random.default_rng(list(job.stream))
  size = (job.width * SUPERSAMPLE, job.height * SUPERSAMPLE)
  w, h = size
  canvas = Image.new('RGB', size)
  draw = ImageDraw.Draw(canvas)
  _draw_background(draw, size, job.camera, rng)
  blur_extra = 0.0
  if job.kind == 'person':
    person_h = h * job.identity.height * rng.uniform(0.85, 1.0)
    top = rng.uniform(0.01, max(0.011, 0.99 - person_h / h)) * h
    cx = w / 2 + np.clip(rng.normal(0, 0.05), -0.1, 0.1) * w
    _draw_person(canvas, job.identity, rng, person_h, top, cx)
    if rng.random() < 0.12:
      _draw_occluder(draw, size, rng)
  elif job.kind == 'distractor':
    # A false detection: background, or a fragment of a random passer-by.
    if rng.random() < 0.5:
      identity = sample_identity(rng)
      person_h = h * rng.uniform(1.0, 2.2)
      top = -rng.uniform(0.0, person_h - 0.4 * h)
      cx = w / 2 + rng.uniform(-0.6, 0.6) * w
      _draw_person(canvas, identity, rng, person_h, top, cx)
    else:
      _draw_background(draw, size, job.camera, rng, num_shapes=(3, 8))
  elif job.kind == 'junk':
    # A bad detection: a tiny or half-visible person of a random identity, blurred.
    identity = sample_identity(rng)
    if rng.random() < 0.5:
      person_h = h * rng.uniform(0.25, 0.45)
      top = rng.uniform(0.0, 1.0 - person_h / h) * h
    else:
      person_h = h * rng.uniform(0.9, 1.1)
      top = rng.uniform(0.4, 0.7) * h
    cx = w / 2 + rng.uniform(-0.3, 0.3) * w
    _draw_person(canvas, identity, rng, person_h, top, cx)
    blur_extra = rng.uniform(0.5, 1.5)
  else:
    raise ValueError(f'Unknown job kind {job.kind!r}.')
  small = canvas.resize((job.width, job.height), Image.Resampling.BOX)
  return _photometric(small, job.camera, rng, blur_extra)


