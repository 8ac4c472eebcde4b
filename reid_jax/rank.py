"""Rank a gallery for query images with an exported model and draw the result.

  python -m reid_jax.rank --model model.jaxexport --query IMG_OR_DIR \
      --gallery DIR_OR_features.npz --topk 10 --out ranked.png

Each query image (or each image of a query folder, or each row of a features .npz of
`reid_jax.extract`) is embedded with the exported model (whose features are
L2-normalised when it was exported with test.feat_norm) and the gallery is sorted by
Euclidean distance, as torchreid's `visrank` and fast-reid's demo do. The picture has
one row per query: the query (blue frame), then its top-k gallery images, each
captioned with its rank and distance; with identities known from Market-style file
names (`([-\\d]+)_c(\\d)`, e.g. 0002_c1s1_000451_03.jpg) frames are green for the
query's identity and red otherwise, and gallery images of the query's identity seen
by the query's camera are left out (the Market protocol; --keep_same_camera keeps
them). A query file that is itself in the gallery is never ranked against itself
(a copy under another name is). The grid layout is `eval.report`'s
(`grid_cell_origin`, `grid_size`). Uses only `reid_jax.inference` (no training code).
"""

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

from eval import distance as distance_lib
from eval import report
from reid_jax import extract as extract_lib
from reid_jax import inference

NEUTRAL_COLOUR = (150, 150, 150)  # frame when identities are unknown
Source = Union[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Ranked gallery lists.

  Attributes:
    query_paths: (Q,) query images.
    gallery_paths: (G,) gallery images.
    indices: (Q, k) gallery indices, nearest first (-1 where fewer than k remain).
    distances: (Q, k) float32 Euclidean distances (NaN where indices is -1).
    match: (Q, k) whether the gallery entry has the query's pid; None when the
      identities are unknown.
    query_ids: (pids, camids) of the queries, or None.
    gallery_ids: (pids, camids) of the gallery, or None.
  """
  query_paths: list
  gallery_paths: list
  indices: np.ndarray
  distances: np.ndarray
  match: Optional[np.ndarray]
  query_ids: Optional[tuple]
  gallery_ids: Optional[tuple]


def _features(source: Source, get_model, batch_size: int, progress: bool
              ) -> tuple[list, np.ndarray, Optional[str]]:
  """(paths, features, model fingerprint or None) of a file, folder, list or .npz."""
  if isinstance(source, str) and source.endswith('.npz') and os.path.isfile(source):
    data = extract_lib.load_features(source)
    return data['paths'], data['features'], data['model'].get('fingerprint')
  if isinstance(source, str):
    paths = (inference.list_images(source) if os.path.isdir(source)
             else [os.path.abspath(source)])
  else:
    paths = [os.path.abspath(p) for p in source]
  model = get_model()
  feats = inference.extract(model, paths, batch_size, progress=progress)
  return paths, feats, model.metadata.get('fingerprint')


def rank(model: Union[inference.FeatureExtractor, str, None], query: Source,
         gallery: Source, topk: int = 10, *, out: Optional[str] = None,
         batch_size: int = 64, exclude_same_camera: bool = True, max_rows: int = 20,
         image_size: tuple[int, int] = (128, 64), progress: bool = False) -> Ranking:
  """Ranks the gallery for every query (and draws the first `max_rows` queries).

  Args:
    model: a FeatureExtractor or exported model path (None when both query and
      gallery are features .npz files).
    query: an image, a folder, a list of images, or a features .npz.
    gallery: a folder, a list of images, or a features .npz.
    topk: gallery entries per query.
    out: PNG to draw (None: no picture).
    batch_size: images per model call.
    exclude_same_camera: with known identities, drop gallery entries with the
      query's pid and camera (Market protocol).
    max_rows: queries drawn.
    image_size: (height, width) of each drawn image.
    progress: show progress bars.

  Returns:
    The Ranking.

  Raises:
    ValueError: features of different models or dimensions, topk < 1.
  """
  if topk < 1:
    raise ValueError(f'topk must be >= 1, got {topk}.')
  cache = []

  def get_model():
    if not cache:
      if model is None:
        raise ValueError('A model is needed to embed images (only .npz features were '
                         'expected).')
      cache.append(model if isinstance(model, inference.FeatureExtractor)
                   else inference.load(model))
    return cache[0]

  q_paths, q_feats, q_id = _features(query, get_model, batch_size, progress)
  g_paths, g_feats, g_id = _features(gallery, get_model, batch_size, progress)
  if q_feats.shape[1] != g_feats.shape[1]:
    raise ValueError(f'Query features have dimension {q_feats.shape[1]} but gallery '
                     f'features {g_feats.shape[1]}: they come from different models.')
  if q_id and g_id and q_id != g_id:
    raise ValueError('Query and gallery features come from different exported models '
                     f'(fingerprints {q_id[:12]} and {g_id[:12]}); extract both with the '
                     'same model.')
  dist = distance_lib.euclidean_distance(q_feats, g_feats, squared=False)
  q_ids = extract_lib.parse_identities(q_paths)
  g_ids = extract_lib.parse_identities(g_paths)
  known = q_ids is not None and g_ids is not None
  indices = np.full((len(q_paths), topk), -1, np.int64)
  distances = np.full((len(q_paths), topk), np.nan, np.float32)
  match = np.zeros((len(q_paths), topk), bool) if known else None
  g_index = {os.path.abspath(p): i for i, p in enumerate(g_paths)}
  for q in range(len(q_paths)):
    order = np.argsort(dist[q], kind='stable')
    itself = g_index.get(os.path.abspath(q_paths[q]))
    if itself is not None:  # a query file listed in the gallery is not its own match
      order = order[order != itself]
    if known:
      same = (g_ids[0] == q_ids[0][q])
      if exclude_same_camera:
        order = order[~(same & (g_ids[1] == q_ids[1][q]))[order]]
    order = order[:topk]
    indices[q, :len(order)] = order
    distances[q, :len(order)] = dist[q, order]
    if known:
      match[q, :len(order)] = same[order]
  ranking = Ranking(q_paths, g_paths, indices, distances, match,
                    q_ids if known else None, g_ids if known else None)
  if out:
    draw_ranking(out, ranking, max_rows=max_rows, image_size=image_size)
  return ranking


def draw_ranking(out: str, ranking: Ranking, *, max_rows: int = 20,
                 image_size: tuple[int, int] = (128, 64)) -> tuple[int, int]:
  """Draws the first `max_rows` queries and their ranked gallery to a PNG.

  Args:
    out: PNG file.
    ranking: from `rank`.
    max_rows: queries drawn.
    image_size: (height, width) of each image.

  Returns:
    (width, height) of the picture: `eval.report.grid_size(rows, k, image_size)`.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  rows = min(len(ranking.query_paths), max_rows)
  topk = ranking.indices.shape[1]
  size = report.grid_size(rows, topk, image_size)
  canvas = Image.new('RGB', size, report.BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  height, width = image_size

  def cell(row, column, path, colour, caption):
    x, y = report.grid_cell_origin(row, column, image_size)
    draw.rectangle([x, y, x + width + 2 * report.BORDER - 1,
                    y + height + 2 * report.BORDER - 1], fill=colour)
    canvas.paste(report.load_tile(path, image_size, 'the picture'),
                 (x + report.BORDER, y + report.BORDER))
    draw.text((x, y - report.CAPTION + 1), caption, fill=(0, 0, 0))

  for r in range(rows):
    caption = 'query'
    if ranking.query_ids is not None:
      caption += f' {ranking.query_ids[0][r]} c{ranking.query_ids[1][r] + 1}'
    cell(r, 0, ranking.query_paths[r], report.QUERY_COLOUR, caption)
    for c, g in enumerate(ranking.indices[r]):
      if g < 0:
        break
      colour = NEUTRAL_COLOUR
      if ranking.match is not None:
        colour = report.MATCH_COLOUR if ranking.match[r, c] else report.WRONG_COLOUR
      cell(r, c + 1, ranking.gallery_paths[g], colour,
           f'{c + 1}: {ranking.distances[r, c]:.3f}')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  canvas.save(out, format='PNG')
  return size


def format_ranking(ranking: Ranking, max_rows: int = 20) -> str:
  """A text table: each query's top-k file names and distances."""
  lines = []
  for r in range(min(len(ranking.query_paths), max_rows)):
    lines.append(os.path.basename(ranking.query_paths[r]) + ':')
    for c, g in enumerate(ranking.indices[r]):
      if g < 0:
        break
      mark = '' if ranking.match is None else ('  +' if ranking.match[r, c] else '  -')
      lines.append(f'  {c + 1:3d}  {ranking.distances[r, c]:.4f}  '
                   f'{os.path.basename(ranking.gallery_paths[g])}{mark}')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> Ranking:
  """Command line (argv[0] is the program name); returns the Ranking."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string('model', None, 'Exported model (.jaxexport or SavedModel folder).',
                      flag_values=fv)
  flags.DEFINE_string('query', None, 'Query image, folder or features .npz.',
                      flag_values=fv)
  flags.DEFINE_string('gallery', None, 'Gallery folder or features .npz.', flag_values=fv)
  flags.DEFINE_integer('topk', 10, 'Gallery images per query.', flag_values=fv)
  flags.DEFINE_string('out', 'ranked.png', 'Output PNG.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 64, 'Images per model call.', flag_values=fv)
  flags.DEFINE_integer('max_rows', 20, 'Queries drawn.', flag_values=fv)
  flags.DEFINE_bool('keep_same_camera', False, "Keep gallery images of the query's "
                    'identity and camera.', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show progress bars.', flag_values=fv)
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    raise SystemExit(f'reid_jax.rank: {e}') from None
  if len(rest) > 1 or not (fv.query and fv.gallery):
    raise SystemExit('reid_jax.rank: usage: --model FILE --query IMG_OR_DIR --gallery '
                     'DIR_OR_features.npz [--topk 10] [--out ranked.png]')
  ranking = rank(fv.model, fv.query, fv.gallery, fv.topk, out=fv.out,
                 batch_size=fv.batch_size, exclude_same_camera=not fv.keep_same_camera,
                 max_rows=fv.max_rows, progress=fv.progress)
  print(format_ranking(ranking, fv.max_rows))
  print(f'Wrote {os.path.abspath(fv.out)}.')
  return ranking


if __name__ == '__main__':
  main(sys.argv)
