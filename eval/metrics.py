"""Re-ID ranking metrics: CMC, mAP and mINP (Market-1501 and CUHK03 protocols).

The Market protocol is the one of torchreid's `eval_market1501` and the BoT
baseline's `eval_func` (mINP as in AGW): for each query the gallery is ranked by
distance (ties broken by gallery index, i.e. a stable sort), gallery entries
with the query's pid *and* camera are removed, and the remaining entries with
the query's pid are the positives. Queries without a positive are left out.

No sort is needed: CMC, AP and mINP depend only on the ranks of the positives,
and the rank of a positive is the number of kept gallery entries that come
before it, a count. Queries are processed in blocks of `block_size` rows (only
those rows of the distance matrix are copied to the device), and a jitted JAX
kernel counts, for up to `block_size` (query, positive) pairs at a time, the
kept entries before each positive: the working set is at most (block_size,
num_gallery) and the result does not depend on the block size. The per-positive
ranks are integers; AP and mINP are then reduced in float64 with numpy.

Which path serves what (both return an `eval.protocol.RankingMetrics`: CMC, mAP,
mINP and each query's AP, INP and first-match rank; `evaluate` and
`evaluate_features` give its (cmc, mAP, mINP)):
- `rank_features` / `evaluate_features` (eval.feature_metrics): straight from
  features (and optionally fast-reid's TPR@FPR), streamed over gallery blocks:
  any gallery size, no distance matrix.
- `rank_distances` / `evaluate`: from a dense distance matrix (a re-ranked one,
  say), plus the CUHK03 protocol (`eval.cuhk03_protocol`), which needs the
  matrix; build it with `eval.distance.distance_matrix`, which refuses above its
  memory limit.
- TPR@FPR (eval.verification) streams in both forms; re-ranking
  (eval.rerank) needs the dense (Q, G) result and refuses above its limit.
"""

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eval import cuhk03_protocol
from eval import protocol as proto
from input_pipeline.choices import check_choice  # the project's one choice check
# Re-exported: the public API of the metrics lives here.
from eval.cuhk03_protocol import cuhk03_samples  # pylint: disable=unused-import
from eval.feature_metrics import evaluate_features  # pylint: disable=unused-import
from eval.feature_metrics import nearest_kept  # pylint: disable=unused-import
from eval.feature_metrics import rank_features  # pylint: disable=unused-import
from eval.protocol import positive_pairs  # pylint: disable=unused-import
from eval.protocol import RankingMetrics  # pylint: disable=unused-import

ArrayLike = Any

PROTOCOLS = ('market', 'cuhk03')  # the `protocol` values of `rank_distances`
# The count kernel is memory-bound once its (rows, num_gallery) working array
# leaves the cache; rows per call are capped so that it holds about this many
# elements (measured on CPU: 128 rows for Market's 15,913 gallery images).
_WORKING_ELEMENTS = 2**21


@jax.jit
def _has_nan(x: jax.Array) -> jax.Array:
  """Whether a jax array holds a NaN (scalar bool array)."""
  return jnp.isnan(x).any()


def _contains_nan(distmat: ArrayLike) -> bool:
  """Whether a numpy or jax array holds a NaN."""
  if isinstance(distmat, jax.Array):
    return bool(_has_nan(distmat))
  host = np.asarray(distmat)
  if host.dtype.kind not in 'fc':
    return False
  # A sum without NaN proves there is none (fast); otherwise look element-wise
  # (the sum is also NaN for +inf + -inf).
  return bool(np.isnan(host.sum())) and bool(np.isnan(host).any())


def _compute_dtype(distmat: ArrayLike) -> np.dtype:
  """float64 for float64 input in jax x64 mode, float32 otherwise."""
  src = np.dtype(getattr(distmat, 'dtype', np.float32))
  return np.dtype(np.float64 if (jax.config.jax_enable_x64 and src == np.float64)
                  else np.float32)


def _fetch_rows(distmat: ArrayLike, rows: np.ndarray, dtype: np.dtype) -> jax.Array:
  """Rows of a numpy or jax distance matrix as a device array.

  Only these rows are copied (never the whole matrix).

  Args:
    distmat: (Q, G) distances.
    rows: (B,) row indices (a contiguous range is sliced, not gathered).
    dtype: element type of the result.

  Returns:
    (B, G) jax array.
  """
  contiguous = len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1 and np.all(
      np.diff(rows) == 1)
  index = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
  if isinstance(distmat, jax.Array):
    return distmat[index].astype(dtype)
  return jax.device_put(np.ascontiguousarray(np.asarray(distmat)[index], dtype=dtype))


def _validate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int,
              protocol: str, block_size: int):
  """Checks the inputs of `rank_distances` and puts them in canonical form.

  Returns:
    (q_pid codes, g_pid codes, q_cam codes, g_cam codes, max_rank clipped to
    the gallery size).
  """
  check_choice('protocol', protocol, PROTOCOLS)
  if int(block_size) < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  if int(max_rank) < 1:
    raise ValueError(f'max_rank must be >= 1, got {max_rank}.')
  shape = tuple(np.shape(distmat))
  if len(shape) != 2:
    raise ValueError(f'distmat must be 2-D (num_query, num_gallery), got shape {shape}.')
  num_q, num_g = shape
  q_pids = proto.as_1d('q_pids', q_pids)
  g_pids = proto.as_1d('g_pids', g_pids)
  q_camids = proto.as_1d('q_camids', q_camids)
  g_camids = proto.as_1d('g_camids', g_camids)
  for name, arr, n, what in (('q_pids', q_pids, num_q, 'rows'),
                             ('q_camids', q_camids, num_q, 'rows'),
                             ('g_pids', g_pids, num_g, 'columns'),
                             ('g_camids', g_camids, num_g, 'columns')):
    if len(arr) != n:
      raise ValueError(f'Length mismatch: distmat has {n} {what} but {name} has '
                       f'{len(arr)} entries.')
  if num_q == 0:
    raise ValueError('Empty query set: distmat has no rows.')
  if num_g == 0:
    raise ValueError('Empty gallery: distmat has no columns.')

  if _contains_nan(distmat):
    raise ValueError('distmat contains NaN distances.')

  if max_rank > num_g:
    warnings.warn(f'max_rank={max_rank} exceeds the gallery size {num_g}; '
                  f'clipping it to {num_g}.', stacklevel=4)
    max_rank = num_g
  return (*proto.label_codes(q_pids, g_pids, q_camids, g_camids), int(max_rank))


@jax.jit
def _count_before(dist: jax.Array, g_code: jax.Array, rows: jax.Array, cols: jax.Array,
                  r_code: jax.Array) -> jax.Array:
  """Ranks of the gallery entries `cols` in the rows `rows` of `dist`.

  Args:
    dist: (B, G) distances of a block of queries.
    g_code: (G,) gallery (pid, camera) codes.
    rows: (C,) row of `dist` of each query-positive pair.
    cols: (C,) gallery index whose rank is wanted.
    r_code: (C,) (pid, camera) code of each row's query.

  Returns:
    (C,) int32: the number of kept gallery entries (those whose (pid, camera)
    differs from the query's) ordered before `cols` by (distance, gallery index).
  """
  d = jnp.take(dist, rows, axis=0)
  dj = dist[rows, cols][:, None]
  index = jnp.arange(dist.shape[1], dtype=jnp.int32)[None]
  kept = g_code[None] != r_code[:, None]
  before = (d < dj) | ((d == dj) & (index < cols[:, None]))
  # A float32 sum of ones is exact below 2**24 entries and vectorises better
  # than an integer reduction on CPU.
  if dist.shape[1] < 2**24:
    return jnp.sum(jnp.where(kept & before, 1.0, 0.0), axis=1).astype(jnp.int32)
  return jnp.sum(kept & before, axis=1, dtype=jnp.int32)


def _query_blocks(num_q: int, block_size: int):
  """Yields (start, stop, padded row indices) of consecutive query blocks."""
  for start in range(0, num_q, block_size):
    stop = min(start + block_size, num_q)
    rows = np.arange(start, stop)
    if len(rows) < block_size and num_q > block_size:
      rows = np.pad(rows, (0, block_size - len(rows)), mode='edge')
    yield start, stop, rows


def positive_ranks(distmat: ArrayLike, pos_q: np.ndarray, pos_g: np.ndarray,
                   qp: np.ndarray, gp: np.ndarray, qc: np.ndarray, gc: np.ndarray,
                   block_size: int) -> np.ndarray:
  """0-based ranks of the positives among the kept gallery entries.

  Queries are processed in blocks of `block_size` rows (the only part of the
  distance matrix on the device at a time); the positives of a block are
  counted at most `block_size` at a time (fewer for large galleries, so that
  the working array stays cache-sized).

  Args:
    distmat: (Q, G) distances (numpy or jax array).
    pos_q: (T,) query index of each positive pair, sorted.
    pos_g: (T,) gallery index of each positive pair.
    qp: (Q,) query pid codes.
    gp: (G,) gallery pid codes.
    qc: (Q,) query camera codes.
    gc: (G,) gallery camera codes.
    block_size: queries per block, and at most the rows of the (rows, G) count.

  Returns:
    (T,) int64 ranks.
  """
  dtype = _compute_dtype(distmat)
  ranks = np.empty(len(pos_q), np.int64)
  q_code, g_code = proto.pid_cam_codes(qp, gp, qc, gc)
  g_code = jnp.asarray(g_code)
  chunk = max(1, min(block_size, _WORKING_ELEMENTS // len(gp)))
  bounds = np.searchsorted(pos_q, np.arange(0, len(qp) + block_size, block_size))
  pending = []
  for b, (start, _, rows) in enumerate(_query_blocks(len(qp), block_size)):
    lo, hi = int(bounds[b]), int(bounds[b + 1])
    if lo == hi:
      continue
    dist = _fetch_rows(distmat, rows, dtype)
    for a in range(lo, hi, chunk):
      z = min(a + chunk, hi)
      pad = chunk - (z - a)
      local = np.pad(pos_q[a:z] - start, (0, pad)).astype(np.int32)
      cols = np.pad(pos_g[a:z], (0, pad)).astype(np.int32)
      codes = np.pad(q_code[pos_q[a:z]], (0, pad))
      pending.append((a, z, _count_before(dist, g_code, local, cols, codes)))
    if len(pending) > 64:  # bound the queue of in-flight blocks
      for a, z, out in pending:
        ranks[a:z] = np.asarray(out)[:z - a]
      pending = []
  for a, z, out in pending:
    ranks[a:z] = np.asarray(out)[:z - a]
  return ranks


def rank_distances(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike,
                   q_camids: ArrayLike, g_camids: ArrayLike, max_rank: int = 50, *,
                   protocol: str = 'market', block_size: int = 128, num_repeats: int = 10,
                   seed: int = 0) -> proto.RankingMetrics:
  """CMC, mAP, mINP and each query's AP, INP and first-match rank of a distance matrix.

  `protocol='market'` reproduces torchreid's `eval_market1501` / BoT's
  `eval_func` with a stable sort (ties ranked by gallery index), plus mINP as
  in AGW (number of positives / (rank of the hardest positive + 1)).
  `protocol='cuhk03'` is torchreid's `eval_cuhk03` (single gallery shot): in
  each of `num_repeats` draws one gallery entry per identity is sampled for
  each query (from a fixed `seed`; the draws do not depend on `block_size`)
  and the CMC is averaged over draws; AP and mINP use the whole kept gallery,
  as torchreid's AP does. Distances are compared in float32 unless jax x64
  mode is on and `distmat` is float64. If a query has fewer than `max_rank`
  kept gallery entries its CMC is extended with its final value (1).

  Args:
    distmat: (Q, G) distances (numpy or jax array), smaller is more similar.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    max_rank: length of the CMC curve; clipped (with a warning) to G.
    protocol: 'market' or 'cuhk03'.
    block_size: queries per block and at most the rows of the (rows, G)
      working array. Results do not depend on it.
    num_repeats: cuhk03 only: number of random draws.
    seed: cuhk03 only: seed of the draws.

  Returns:
    An `eval.protocol.RankingMetrics`: cmc float32 of length min(max_rank, G); mAP
    and mINP in [0, 1], averaged over the queries with at least one positive; their
    indices, AP, INP and 0-based first-match rank (among the kept gallery
    entries) in query order; no TPR@FPR.

  Raises:
    ValueError: on mismatched lengths, an empty query set or gallery, NaN
      distances, an unknown protocol, a non-positive max_rank or block_size,
      or when no query has a valid match in the gallery.
  """
  qp, gp, qc, gc, max_rank = _validate(distmat, q_pids, g_pids, q_camids, g_camids,
                                       max_rank, protocol, block_size)
  pos_q, pos_g = proto.positive_pairs(qp, gp, qc, gc)
  if len(pos_q) == 0:
    raise ValueError('No query has a valid match in the gallery (same identity '
                     'seen by a different camera); metrics are undefined.')
  ranks = positive_ranks(distmat, pos_q, pos_g, qp, gp, qc, gc, int(block_size))
  valid, ap, inp, first = proto.ap_inp(pos_q, ranks, len(qp))
  cmc = None
  if protocol == 'cuhk03':
    dtype = _compute_dtype(distmat)
    cmc = cuhk03_protocol.cuhk03_cmc(lambda rows: _fetch_rows(distmat, rows, dtype), qp, gp,
                                     pos_q, pos_g, valid, max_rank, num_repeats, seed,
                                     block_size)
  return proto.ranking_metrics(valid, ap, inp, first, max_rank, cmc=cmc)


def evaluate(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
             g_camids: ArrayLike, max_rank: int = 50, *, protocol: str = 'market',
             block_size: int = 128, num_repeats: int = 10,
             seed: int = 0) -> tuple[np.ndarray, float, float]:
  """(cmc, mAP, mINP) of a distance matrix: `rank_distances` without the per-query results.

  Args:
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank, protocol, block_size,
    num_repeats, seed: as `rank_distances`.

  Returns:
    (cmc, mAP, mINP): cmc a float32 array of length min(max_rank, G); mAP and
    mINP floats in [0, 1] (see `rank_distances`).

  Raises:
    ValueError: as `rank_distances`.
  """
  res = rank_distances(distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                       protocol=protocol, block_size=block_size, num_repeats=num_repeats,
                       seed=seed)
  return res.cmc, res.mAP, res.mINP
