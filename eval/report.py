"""Evaluation reports: the worst-ranked queries as an image grid, and CMC plots.

Nothing here touches global plotting state: the CMC plot draws on a
`matplotlib.figure.Figure` with an explicit Agg canvas created inside the
function, so importing this module never selects a backend.
"""

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from eval import metrics

ArrayLike = Any

# Layout of the worst-queries grid, in pixels (see `grid_cell_origin`).
BORDER = 4  # coloured frame around each image
PAD = 6  # space between cells and around the grid
CAPTION = 14  # caption strip above each row
QUERY_GAP = 12  # extra space between the query and its ranked gallery
QUERY_COLOUR = (40, 90, 230)
MATCH_COLOUR = (0, 190, 0)
WRONG_COLOUR = (220, 0, 0)
BACKGROUND = (255, 255, 255)
MISSING = (160, 160, 160)


@dataclasses.dataclass(frozen=True)
class WorstQueries:
  """What `save_worst_queries_png` drew, row by row.

  Attributes:
    query: (R,) query indices, worst AP first.
    ap: (R,) their average precision.
    gallery: (R, top_k) gallery indices shown (-1 where the row is shorter).
    match: (R, top_k) whether each shown entry has the query's pid.
  """
  query: np.ndarray
  ap: np.ndarray
  gallery: np.ndarray
  match: np.ndarray


def grid_cell_origin(row: int, column: int, image_size: tuple[int, int]) -> tuple[int, int]:
  """Top-left pixel (x, y) of the bordered cell at (row, column) of the grid.

  Column 0 is the query, columns 1..top_k its ranked gallery entries.

  Args:
    row: grid row (0 = worst query).
    column: grid column.
    image_size: (height, width) each image is resized to.

  Returns:
    (x, y) of the cell's outer border corner.
  """
  height, width = image_size
  cell_w, cell_h = width + 2 * BORDER, height + 2 * BORDER
  x = PAD + column * (cell_w + PAD) + (QUERY_GAP if column > 0 else 0)
  y = PAD + row * (cell_h + CAPTION + PAD) + CAPTION
  return x, y


def grid_size(num_rows: int, top_k: int, image_size: tuple[int, int]) -> tuple[int, int]:
  """(width, height) in pixels of a worst-queries grid."""
  height, width = image_size
  x, _ = grid_cell_origin(0, top_k, image_size)
  _, y = grid_cell_origin(num_rows, 0, image_size)
  return x + width + 2 * BORDER + PAD, y - CAPTION


def _worst_queries(ranking: metrics.RankingMetrics,
                   num_queries: int) -> tuple[np.ndarray, np.ndarray]:
  """(query indices, AP) of the `num_queries` lowest-AP queries (ties: lower index first)."""
  order = np.lexsort((ranking.query, ranking.ap))[:num_queries]
  return np.asarray(ranking.query)[order], np.asarray(ranking.ap)[order]


def _check_sizes(q_paths: Sequence[str], g_paths: Sequence[str], q_pids: np.ndarray,
                 g_pids: np.ndarray, num_queries: int, top_k: int) -> None:
  """Raises ValueError for paths and labels of different lengths or sizes below 1."""
  if len(q_paths) != len(q_pids) or len(g_paths) != len(g_pids):
    raise ValueError(f'Path/label length mismatch: {len(q_paths)} query paths for '
                     f'{len(q_pids)} pids, {len(g_paths)} gallery paths for {len(g_pids)}.')
  if num_queries < 1 or top_k < 1:
    raise ValueError(f'num_queries and top_k must be >= 1, got {num_queries}, {top_k}.')


def load_tile(path: str, image_size: tuple[int, int], purpose: str = 'the report',
              stacklevel: int = 3) -> Image.Image:
  """Opens an image for a picture grid (this module's, `reid_jax.rank`'s).

  Args:
    path: image file.
    image_size: (height, width) of the tile.
    purpose: what the image is read for, in the warning.
    stacklevel: the warning's `stacklevel` (3: the caller of the function that
      calls this one).

  Returns:
    The RGB image resized to (width, height), or a MISSING-grey tile (with a warning
    attributed to the drawing function's caller) if it cannot be read.
  """
  height, width = image_size
  try:
    with Image.open(path) as img:
      return img.convert('RGB').resize((width, height), Image.BILINEAR)
  except (OSError, ValueError) as e:
    warnings.warn(f'Cannot read {path!r} for {purpose} ({e}); drawing a grey tile.',
                  stacklevel=stacklevel)
    return Image.new('RGB', (width, height), MISSING)


def save_worst_queries_png(path: str,
                           q_paths: Sequence[str],
                           g_paths: Sequence[str],
                           distmat: ArrayLike,
                           q_pids: ArrayLike,
                           g_pids: ArrayLike,
                           q_camids: ArrayLike,
                           g_camids: ArrayLike,
                           num_queries: int = 10,
                           top_k: int = 10,
                           *,
                           image_size: tuple[int, int] = (128, 64)) -> WorstQueries:
  """Draws the queries with the lowest AP and their top-k gallery matches.

  Each row is a query (blue frame) followed by its `top_k` nearest gallery
  images after the protocol's removal of same-pid-same-camera entries, framed
  green when the identity matches and red otherwise; a caption gives the query
  index, pid, camera and AP (`eval.metrics.rank_distances` of `distmat`). Only
  queries with at least one positive are ranked; ties in AP go to the lower query
  index.

  Args:
    path: output PNG file.
    q_paths: (Q,) query image files.
    g_paths: (G,) gallery image files.
    distmat: (Q, G) distances.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    num_queries: number of rows (fewer if fewer queries have a positive).
    top_k: gallery images per row.
    image_size: (height, width) of each drawn image.

  Returns:
    A `WorstQueries` record of what was drawn.

  Raises:
    ValueError: for inconsistent lengths or no query with a positive.
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  _check_sizes(q_paths, g_paths, q_pids, g_pids, num_queries, top_k)
  ranking = metrics.rank_distances(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=1)
  rows, row_aps = _worst_queries(ranking, num_queries)
  lists = []
  for q in rows:
    order = np.argsort(np.asarray(distmat[q], np.float64), kind='stable')
    keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
    lists.append(order[keep][:top_k])
  return _draw_rows(path, q_paths, g_paths, q_pids, g_pids, q_camids, rows, row_aps, lists,
                    top_k, image_size)


def save_worst_queries_from_features(path: str,
                                     q_paths: Sequence[str],
                                     g_paths: Sequence[str],
                                     q_feats: ArrayLike,
                                     g_feats: ArrayLike,
                                     q_pids: ArrayLike,
                                     g_pids: ArrayLike,
                                     q_camids: ArrayLike,
                                     g_camids: ArrayLike,
                                     ranking: metrics.RankingMetrics,
                                     distance: str = 'euclidean',
                                     num_queries: int = 10,
                                     top_k: int = 10,
                                     *,
                                     image_size: tuple[int, int] = (128, 64)) -> WorstQueries:
  """`save_worst_queries_png` without a distance matrix (any gallery size).

  The worst queries come from `ranking` (`eval.metrics.rank_features` of the
  same features, labels and distance); only their top-k lists are computed,
  streamed over the gallery (`eval.metrics.nearest_kept`).

  Args:
    path: output PNG file.
    q_paths: (Q,) query image files.
    g_paths: (G,) gallery image files.
    q_feats: (Q, D) query features.
    g_feats: (G, D) gallery features.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    ranking: the `eval.metrics.RankingMetrics` of these features.
    distance: the distance `ranking` used.
    num_queries: number of rows.
    top_k: gallery images per row.
    image_size: (height, width) of each drawn image.

  Returns:
    A `WorstQueries` record of what was drawn.
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  _check_sizes(q_paths, g_paths, q_pids, g_pids, num_queries, top_k)
  rows, row_aps = _worst_queries(ranking, num_queries)
  table = metrics.nearest_kept(np.asarray(q_feats)[rows], g_feats, q_pids[rows], g_pids,
                               q_camids[rows], g_camids, top_k, distance)
  lists = [t[t >= 0] for t in table]
  return _draw_rows(path, q_paths, g_paths, q_pids, g_pids, q_camids, rows, row_aps, lists,
                    top_k, image_size)


def _draw_rows(path: str, q_paths: Sequence[str], g_paths: Sequence[str], q_pids: np.ndarray,
               g_pids: np.ndarray, q_camids: np.ndarray, rows: np.ndarray,
               row_aps: np.ndarray, lists: Sequence[np.ndarray], top_k: int,
               image_size: tuple[int, int]) -> WorstQueries:
  """Draws the grid of the queries `rows` and their ranked kept gallery `lists`."""
  gallery = np.full((len(rows), top_k), -1, np.int64)
  match = np.zeros((len(rows), top_k), bool)
  canvas = Image.new('RGB', grid_size(len(rows), top_k, image_size), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  height, width = image_size

  def paste(img, row, column, colour):
    x, y = grid_cell_origin(row, column, image_size)
    draw.rectangle([x, y, x + width + 2 * BORDER - 1, y + height + 2 * BORDER - 1],
                   fill=colour)
    canvas.paste(img, (x + BORDER, y + BORDER))

  for r, (q, ap, ranked_g) in enumerate(zip(rows, row_aps, lists)):
    x, y = grid_cell_origin(r, 0, image_size)
    draw.text((x, y - CAPTION + 1), f'query {q}  pid {q_pids[q]}  cam {q_camids[q]}  '
              f'AP {ap:.3f}', fill=(0, 0, 0))
    # stacklevel 4: the caller of save_worst_queries_*.
    paste(load_tile(q_paths[q], image_size, stacklevel=4), r, 0, QUERY_COLOUR)
    for c, g in enumerate(ranked_g):
      gallery[r, c] = g
      match[r, c] = g_pids[g] == q_pids[q]
      paste(load_tile(g_paths[g], image_size, stacklevel=4), r, c + 1,
            MATCH_COLOUR if match[r, c] else WRONG_COLOUR)
  canvas.save(path, format='PNG')
  return WorstQueries(query=rows, ap=row_aps, gallery=gallery, match=match)


def save_cmc_plot(path: str,
                  cmc: ArrayLike | Mapping[str, ArrayLike],
                  label: str = 'CMC',
                  *,
                  title: str = 'Cumulative matching characteristic',
                  figsize: tuple[float, float] = (6.0, 4.0),
                  dpi: int = 100) -> None:
  """Plots one or more CMC curves (rank 1..len) to a PNG with the Agg backend.

  Args:
    path: output PNG file.
    cmc: a CMC curve (values in [0, 1]) or a mapping label -> curve.
    label: legend entry when `cmc` is a single curve.
    title: plot title.
    figsize: figure size in inches.
    dpi: resolution; the PNG is figsize * dpi pixels.
  """
  # Imported here: no backend selection or pyplot state at import time.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  curves = dict(cmc) if isinstance(cmc, Mapping) else {label: cmc}
  fig = Figure(figsize=figsize, dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for name, curve in curves.items():
    curve = np.asarray(curve, np.float64).reshape(-1)
    ranks = np.arange(1, len(curve) + 1)
    ax.plot(ranks, 100.0 * curve, marker='.', label=f'{name} (R1 {100.0 * curve[0]:.1f}%)')
  ax.set_xlabel('rank')
  ax.set_ylabel('matching rate (%)')
  ax.set_ylim(0, 100)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc='lower right')
  fig.savefig(path, format='png', dpi=dpi)
