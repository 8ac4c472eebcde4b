"""Evaluation reports: the worst-ranked queries as an image grid, and CMC plots.

Nothing here touches global plotting state: the CMC plot draws on a
`matplotlib.figure.Figure` with an explicit Agg canvas created inside the
function, so importing this module never selects a backend.
"""

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

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


def _ranked_lists(distmat, ranked, rows, q_pids, g_pids, q_camids, g_camids, length):
  """Per selected query: kept gallery indices best first (at most `length`)."""
  out = []
  for q in rows:
    order = ranked[q] if ranked is not None else np.argsort(
        np.asarray(distmat[q], np.float64), kind='stable')
    order = np.asarray(order)
    order = order[order >= 0]
    keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
    out.append(order[keep][:length])
  return out


def _ap_from_ranking(order, g_pids, g_camids, q_pid, q_camid):
  """AP of one query from its ranked gallery list (NaN without positives)."""
  order = np.asarray(order)
  order = order[order >= 0]
  keep = ~((g_pids[order] == q_pid) & (g_camids[order] == q_camid))
  hits = (g_pids[order][keep] == q_pid).astype(np.float64)
  if not hits.any():
    return np.nan
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(np.sum(precision * hits) / hits.sum())


def load_tile(path: str, image_size: tuple[int, int],
              purpose: str = 'the report') -> Image.Image:
  """Opens an image for a picture grid (this module's, `reid_jax.rank`'s).

  Args:
    path: image file.
    image_size: (height, width) of the tile.
    purpose: what the image is read for, in the warning.

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
                  stacklevel=3)
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
                           ranked: bool = False,
                           per_query: Optional[Mapping[str, np.ndarray]] = None,
                           image_size: tuple[int, int] = (128, 64)) -> WorstQueries:
  """Draws the queries with the lowest AP and their top-k gallery matches.

  Each row is a query (blue frame) followed by its `top_k` nearest gallery
  images after the protocol's removal of same-pid-same-camera entries, framed
  green when the identity matches and red otherwise; a caption gives the query
  index, pid, camera and AP. Only queries with at least one positive are
  ranked; ties in AP go to the lower query index.

  Args:
    path: output PNG file.
    q_paths: (Q,) query image files.
    g_paths: (G,) gallery image files.
    distmat: (Q, G) distances, or with `ranked=True` a (Q, L) integer array of
      gallery indices per query, best first (entries < 0 ignored; AP is then
      computed over these L entries).
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    num_queries: number of rows (fewer if fewer queries have a positive).
    top_k: gallery images per row.
    ranked: whether `distmat` holds ranked gallery indices.
    per_query: the queries' AP, as {'query': indices of the queries with a
      positive, 'ap': their AP} (`eval.metrics.per_query_metrics` or a
      `FeatureRanking`'s fields); then AP is not recomputed (with `ranked`,
      only the drawn rows of the table need to be filled).
    image_size: (height, width) of each drawn image.

  Returns:
    A `WorstQueries` record of what was drawn.

  Raises:
    ValueError: for inconsistent lengths or no query with a positive.
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  if len(q_paths) != len(q_pids) or len(g_paths) != len(g_pids):
    raise ValueError(f'Path/label length mismatch: {len(q_paths)} query paths for '
                     f'{len(q_pids)} pids, {len(g_paths)} gallery paths for {len(g_pids)}.')
  if num_queries < 1 or top_k < 1:
    raise ValueError(f'num_queries and top_k must be >= 1, got {num_queries}, {top_k}.')
  table = None
  if ranked:
    table = np.asarray(distmat)
    if table.ndim != 2 or table.shape[0] != len(q_pids):
      raise ValueError(f'ranked indices must have shape ({len(q_pids)}, L), got {table.shape}.')
  if per_query is not None:
    queries, aps = np.asarray(per_query['query']), np.asarray(per_query['ap'])
    if len(queries) == 0:
      raise ValueError('No query has a valid match (per_query is empty).')
  elif ranked:
    aps = np.array([_ap_from_ranking(table[q], g_pids, g_camids, q_pids[q], q_camids[q])
                    for q in range(len(q_pids))])
    queries = np.nonzero(~np.isnan(aps))[0]
    if len(queries) == 0:
      raise ValueError('No query has a valid match in the ranked lists.')
    aps = aps[queries]
  else:
    stats = metrics.per_query_metrics(distmat, q_pids, g_pids, q_camids, g_camids)
    queries, aps = stats['query'], stats['ap']
  order = np.lexsort((queries, aps))[:num_queries]
  rows, row_aps = queries[order], aps[order]
  lists = _ranked_lists(distmat, table, rows, q_pids, g_pids, q_camids, g_camids, top_k)

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
    paste(load_tile(q_paths[q], image_size), r, 0, QUERY_COLOUR)
    for c, g in enumerate(ranked_g):
      gallery[r, c] = g
      match[r, c] = g_pids[g] == q_pids[q]
      paste(load_tile(g_paths[g], image_size), r, c + 1,
            MATCH_COLOUR if match[r, c] else WRONG_COLOUR)
  canvas.save(path, format='PNG')
  return WorstQueries(query=rows, ap=row_aps, gallery=gallery, match=match)


def save_worst_queries_from_features(path: str,
                                     q_paths: Sequence[str],
                                     g_paths: Sequence[str],
                                     q_feats: ArrayLike,
                                     g_feats: ArrayLike,
                                     q_pids: ArrayLike,
                                     g_pids: ArrayLike,
                                     q_camids: ArrayLike,
                                     g_camids: ArrayLike,
                                     ranking: 'metrics.FeatureRanking',
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
    ranking: the `FeatureRanking` of these features.
    distance: the distance `ranking` used.
    num_queries: number of rows.
    top_k: gallery images per row.
    image_size: (height, width) of each drawn image.

  Returns:
    A `WorstQueries` record of what was drawn.
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  if num_queries < 1 or top_k < 1:
    raise ValueError(f'num_queries and top_k must be >= 1, got {num_queries}, {top_k}.')
  rows = ranking.query[np.lexsort((ranking.query, ranking.ap))[:num_queries]]
  table = np.full((len(q_pids), top_k), -1, np.int64)
  table[rows] = metrics.nearest_kept(np.asarray(q_feats)[rows], g_feats, q_pids[rows], g_pids,
                                     q_camids[rows], g_camids, top_k, distance)
  return save_worst_queries_png(path, q_paths, g_paths, table, q_pids, g_pids, q_camids,
                                g_camids, num_queries, top_k, ranked=True,
                                per_query={'query': ranking.query, 'ap': ranking.ap},
                                image_size=image_size)


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
