"""Drawing of the synthetic pedestrians: the rendering of one image.

`input_pipeline.synthetic` plans the dataset (who is seen by which camera, file names)
and writes the files; `input_pipeline.synthetic_sampling` holds what a picture is
made of (the attribute palettes, `Identity` and `Camera`); this module draws one
`Job` with `render(job)`.
"""

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from input_pipeline.synthetic_sampling import (
    ACCESSORIES, ACCESSORY_PALETTE, HAIR_COLOURS, LOGO_SHAPES, LOWER_PALETTE,
    LOWER_TYPES, SHOE_COLOURS, SKIN_TONES, SLEEVES, UPPER_PALETTE, UPPER_PATTERNS,
    Camera, Colour, Identity, sample_identity)

# Render at SUPERSAMPLE x the output size, then downsample (anti-aliasing).
SUPERSAMPLE = 2


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


