"""CMC, mAP and mINP streamed from features, without a query x gallery matrix.

Same results as `eval.metrics.evaluate` on the distance matrix of the
features (Market protocol: same pid and same camera removed, ties ranked by
gallery index, queries without a positive left out), at any gallery size: the
host holds the features and O(num_query + number of positives); the device
holds one (block_size x gallery_block) distance tile at a time plus small
per-query state.

1. Positive distances. For each block of queries, the gallery rows of its
   positives are gathered into tiles of the main pass's shape and the tile
   kernel `eval.distance.distance_tile` gives each positive's distance (its
   per-row operands from `eval.distance.prepare_rows`).
2. Main pass over gallery blocks (each read once), and for each, over the
   query blocks: the tile of distances is computed on the device and, for each
   (query, positive) pair, the kept gallery entries ordered before the
   positive by (distance, gallery index) are counted and summed over the
   gallery blocks: the positive's rank. Optionally fast-reid's verification
   counts (`eval.verification`) are updated from the same tile.
3. AP, INP and CMC follow from the ranks on the host (`eval.protocol`), as the
   `eval.protocol.RankingMetrics` that the dense path (`eval.metrics.rank_distances`)
   returns too.

`nearest_kept` (the top-k lists of the reports) makes the same pass over the
gallery blocks (`_gallery_pass`), merging each tile into running top-k lists.

Fidelity: a distance is computed by the same compiled tile kernel (same shape,
same query rows) in steps 1 and 2; XLA:CPU gives bitwise the same value for a
(query, gallery) pair whatever the other gallery rows of the tile are, so a
positive compares against its own distance exactly. The tile's values can
differ from `eval.distance.euclidean_distance`'s (other matmul shapes) in the
last bit, so a dense evaluation can differ at near-ties only; with exactly
representable distances (tests) the results are identical. A positive whose
two values differ (another backend) is counted and warned about.
"""

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eval import distance as distance_lib
from eval import protocol
from eval import verification
# Re-exported: the result of `rank_features` (eval.protocol owns it).
from eval.protocol import RankingMetrics  # pylint: disable=unused-import

ArrayLike = Any

# Pairs per count step: the (pairs, gallery_block) working array holds about
# this many elements (cache-sized on CPU, as eval.metrics).
_WORKING_ELEMENTS = 2**21
# Gallery blocks dispatched ahead of the host (bounds their memory).
_IN_FLIGHT = 2


def _check(q_feats, g_feats, labels, max_rank, block_size, gallery_block):
  """Validates the inputs; returns (num_q, num_g, dim, label arrays, max_rank)."""
  for name, v in (('block_size', block_size), ('gallery_block', gallery_block),
                  ('max_rank', max_rank)):
    if int(v) < 1:
      raise ValueError(f'{name} must be >= 1, got {v}.')
  q_shape, g_shape = tuple(np.shape(q_feats)), tuple(np.shape(g_feats))
  distance_lib.check_feature_shapes(q_shape, g_shape, nonempty=True)
  arrays = []
  for name, values, n, what in zip(('q_pids', 'g_pids', 'q_camids', 'g_camids'), labels,
                                   (q_shape[0], g_shape[0]) * 2,
                                   ('q_feats', 'g_feats') * 2):
    arr = protocol.as_1d(name, values)
    if len(arr) != n:
      raise ValueError(f'Length mismatch: {what} has {n} rows but {name} has '
                       f'{len(arr)} entries.')
    arrays.append(arr)
  if max_rank > g_shape[0]:
    warnings.warn(f'max_rank={max_rank} exceeds the gallery size {g_shape[0]}; '
                  f'clipping it to {g_shape[0]}.', stacklevel=4)
    max_rank = g_shape[0]
  return q_shape[0], g_shape[0], q_shape[1], arrays, int(max_rank)


def _query_blocks(q_dev: jax.Array, bq: int, distance: str) -> list[tuple[jax.Array, ...]]:
  """The query rows as consecutive blocks of `bq` (zero-padded), prepared for tiles."""
  num_q = q_dev.shape[0]
  q_dev = jnp.pad(q_dev, ((0, -num_q % bq), (0, 0)))
  return [distance_lib.prepare_rows(distance_lib.row_block(q_dev, jnp.int32(s), bq),
                                    distance) for s in range(0, num_q, bq)]


def _gallery_pass(g_feats: ArrayLike, bg: int, distance: str,
                  visit: Callable[[int, tuple, int, int], jax.Array]) -> None:
  """The pass over the gallery blocks that `rank_features` and `nearest_kept` make.

  Each block of `bg` rows is read once (`_rows`, zero-padded) and prepared for the
  tiles; `visit(n, g_ops, start, stop)` dispatches the work of block n (rows
  start..stop) against every query block and returns one array of it, which the
  host waits for `_IN_FLIGHT` blocks later (a throttle, not a data transfer).
  """
  num_g = len(g_feats)
  in_flight = []
  for n, start in enumerate(range(0, num_g, bg)):
    stop = min(start + bg, num_g)
    g_ops = distance_lib.prepare_rows(_rows(g_feats, slice(start, stop), bg), distance)
    in_flight.append(visit(n, g_ops, start, stop))
    if len(in_flight) > _IN_FLIGHT:
      in_flight.pop(0).block_until_ready()


def _rows(feats: ArrayLike, index, size: int) -> jax.Array:
  """float32 device block of the rows `index` (slice or indices), zero-padded."""
  if isinstance(feats, jax.Array):
    block = feats[index].astype(jnp.float32)
    n = block.shape[0]
    return block if n == size else jnp.pad(block, ((0, size - n), (0, 0)))
  if isinstance(index, slice) and index.stop - index.start == size:
    return jax.device_put(np.asarray(feats[index], dtype=np.float32))
  rows = np.arange(index.start, index.stop) if isinstance(index, slice) else index
  block = distance_lib.aligned_empty((size, feats.shape[1]), np.float32)
  block[len(rows):] = 0.0
  if isinstance(index, slice):
    block[:len(rows)] = feats[index]
  elif feats.dtype == np.float32:
    np.take(feats, rows, axis=0, out=block[:len(rows)])
  else:
    block[:len(rows)] = np.take(feats, rows, axis=0)
  return jax.device_put(block)


@jax.jit
def _take_pairs(tile: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  return tile[rows, cols]


def _pad_pow2(a: np.ndarray, minimum: int = 256) -> np.ndarray:
  size = max(minimum, 1 << int(np.ceil(np.log2(max(len(a), 1)))))
  return np.pad(a, (0, size - len(a)))


def _positive_distances(q_blocks, g_feats, pos_g, pos_local, bounds, bg, distance):
  """Distances of every positive pair from tiles of the main pass's shape."""
  parts = []
  for b, q_block in enumerate(q_blocks):
    lo, hi = int(bounds[b]), int(bounds[b + 1])
    if lo == hi:
      continue
    cols, inv = np.unique(pos_g[lo:hi], return_inverse=True)
    inv = inv.reshape(-1)
    for c0 in range(0, len(cols), bg):
      g_ops = distance_lib.prepare_rows(_rows(g_feats, cols[c0:c0 + bg], bg), distance)
      tile = distance_lib.distance_tile(*q_block, *g_ops, distance)
      sel = np.nonzero((inv >= c0) & (inv < c0 + bg))[0]
      vals = _take_pairs(tile, jnp.asarray(_pad_pow2(pos_local[lo + sel])),
                         jnp.asarray(_pad_pow2(inv[sel] - c0)))
      parts.append((lo + sel, vals))
  dist = np.empty(len(pos_g), np.float32)
  for index, vals in parts:
    dist[index] = np.asarray(vals)[:len(index)]
  return dist


def _step(tile, state, pairs, q_meta, g_meta, values, *, tpr: bool):
  """Updates a query block's state with one tile of distances.

  Args:
    tile: (B, C) distances.
    state: dict of the block's running results (see `rank_features`).
    pairs: (rows, cols, dist, code), each (chunks, chunk): local row, gallery
      index (-1: padding), distance and (pid, camera) code of each pair.
    q_meta: (q_code, q_pid, row_valid), each (B,).
    g_meta: (g_code, g_pid, start, num_valid): (C,) codes and pids of the
      gallery block, its first index and its number of real rows.
    values: (U,) distinct genuine distances (verification only).
    tpr: update the verification counts.

  Returns:
    The new state.
  """
  rows, cols, dist, code = pairs
  q_code, q_pid, row_valid = q_meta
  g_code, g_pid, start, num_valid = g_meta
  width = tile.shape[1]
  lane = jnp.arange(width, dtype=jnp.int32)
  col_valid = lane < num_valid
  gidx = start + lane

  def count(chunk):
    r, c, v, cd = chunk
    d = jnp.take(tile, r, axis=0)
    before = (d < v[:, None]) | ((d == v[:, None]) & (gidx[None] < c[:, None]))
    before &= (gidx[None] != c[:, None]) & (g_code[None] != cd[:, None]) & col_valid[None]
    # A float32 sum of ones is exact below 2**24 and vectorises better on CPU.
    return jnp.sum(jnp.where(before, 1.0, 0.0), axis=1).astype(jnp.int32)

  new = dict(state)
  new['counts'] = state['counts'] + jax.lax.map(count, (rows, cols, dist, code))
  local = cols - start
  inside = (local >= 0) & (local < num_valid)
  own = tile[rows, jnp.clip(local, 0, width - 1)]
  new['mismatch'] = state['mismatch'] + jnp.sum(inside & (own != dist), dtype=jnp.int32)
  valid = col_valid[None] & row_valid[:, None]
  new['nonfinite'] = state['nonfinite'] | jnp.any(valid & ~jnp.isfinite(tile))
  if tpr:
    kept = (g_code[None] != q_code[:, None]) & valid
    below, equal = verification.impostor_counts(tile, kept & (g_pid[None] != q_pid[:, None]),
                                                values)
    new['below'] = state['below'] + below
    new['equal'] = state['equal'] + equal
  return new


_step_jit = jax.jit(_step, static_argnames=('tpr',))


def rank_features(q_feats: ArrayLike,
                  g_feats: ArrayLike,
                  q_pids: ArrayLike,
                  g_pids: ArrayLike,
                  q_camids: ArrayLike,
                  g_camids: ArrayLike,
                  distance: str = 'euclidean',
                  max_rank: int = 50,
                  *,
                  fprs: Sequence[float] = (),
                  block_size: int = 256,
                  gallery_block: int = 1024) -> protocol.RankingMetrics:
  """Market-protocol metrics of features, streamed over gallery blocks.

  Args:
    q_feats: (Q, D) query features (numpy or jax array).
    g_feats: (G, D) gallery features (numpy array, memmap or jax array); read
      one block of rows at a time, never copied whole.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    distance: one of `eval.distance.DISTANCES` ('euclidean' is squared).
    max_rank: length of the CMC curve; clipped (with a warning) to G.
    fprs: also compute fast-reid's TPR at these FPRs (e.g.
      `eval.verification.FAST_REID_FPRS`); costs a binary search per distance.
    block_size: queries per tile.
    gallery_block: gallery rows per tile. Results do not depend on the block
      sizes; device memory is O(block_size * gallery_block).

  Returns:
    An `eval.protocol.RankingMetrics` (per-query results in query order).

  Raises:
    ValueError: on malformed inputs, an unknown distance, non-finite
      distances, or when no query has a valid match in the gallery.
  """
  distance_lib.check_distance(distance)
  num_q, num_g, _, labels, max_rank = _check(q_feats, g_feats,
                                             (q_pids, g_pids, q_camids, g_camids),
                                             max_rank, block_size, gallery_block)
  qp, gp, qc, gc = protocol.label_codes(*labels)
  # Queries are processed in pid order (fewer distinct positives per block);
  # `qperm[i]` is the query at position i.
  qperm = np.argsort(qp, kind='stable')
  qp, qc = qp[qperm], qc[qperm]
  q_code, g_code = protocol.pid_cam_codes(qp, gp, qc, gc)
  pos_q, pos_g = protocol.positive_pairs(qp, gp, qc, gc)
  if len(pos_q) == 0:
    raise ValueError('No query has a valid match in the gallery (same identity '
                     'seen by a different camera); metrics are undefined.')
  bq, bg = min(int(block_size), num_q), min(int(gallery_block), num_g)
  tpr = len(fprs) > 0
  num_blocks = -(-num_q // bq)
  q_dev = jnp.asarray(q_feats, jnp.float32)[jnp.asarray(qperm)]
  if not bool(jnp.isfinite(q_dev).all()):
    raise ValueError('q_feats contain NaN or infinite values.')
  q_blocks = _query_blocks(q_dev, bq, distance)
  bounds = np.searchsorted(pos_q, np.arange(num_blocks + 1) * bq)
  pos_local = (pos_q - np.repeat(np.arange(num_blocks) * bq, np.diff(bounds))).astype(np.int32)
  pos_dist = _positive_distances(q_blocks, g_feats, pos_g, pos_local, bounds, bg, distance)

  # Pairs of each query block, padded to the same (chunks, chunk) layout.
  chunk = max(1, min(int(np.diff(bounds).max()), _WORKING_ELEMENTS // bg))
  length = -(-int(np.diff(bounds).max()) // chunk) * chunk
  values = genuine = None
  if tpr:
    values, genuine = verification.genuine_table(pos_dist)
  dev_values = jnp.asarray(values if tpr else np.zeros(1, np.float32))
  blocks = []
  for b in range(num_blocks):
    lo, hi = int(bounds[b]), int(bounds[b + 1])
    pad = length - (hi - lo)

    def lay(a, fill, dtype, lo=lo, hi=hi, pad=pad):
      return jnp.asarray(np.pad(a[lo:hi], (0, pad), constant_values=fill).astype(dtype)
                         .reshape(-1, chunk))

    rows_q = np.arange(b * bq, (b + 1) * bq)
    real = rows_q < num_q
    rows_q = np.minimum(rows_q, num_q - 1)
    state = dict(counts=jnp.zeros((length // chunk, chunk), jnp.int32),
                 mismatch=jnp.zeros((), jnp.int32), nonfinite=jnp.zeros((), bool))
    if tpr:
      state.update(below=jnp.zeros(len(values) + 1, jnp.int32),
                   equal=jnp.zeros(len(values) + 1, jnp.int32))
    blocks.append(dict(
        state=state,
        pairs=(lay(pos_local, 0, np.int32), lay(pos_g, -1, np.int32),
               lay(pos_dist, -np.inf, np.float32), lay(q_code[pos_q], 0, np.int32)),
        q_meta=(jnp.asarray(q_code[rows_q]), jnp.asarray(qp[rows_q]), jnp.asarray(real))))

  # Verification counts are int32 on the device: flush them before they could
  # overflow (more than 2**31 - 1 impostor pairs in one query block).
  flush_every = max(1, (2**31 - 1) // (bq * bg))
  flushed = []
  g_code_pad = np.pad(g_code, (0, -num_g % bg), constant_values=-1)
  g_pid_pad = np.pad(gp, (0, -num_g % bg), constant_values=-1)

  def visit(n, g_ops, start, stop):
    g_meta = (jnp.asarray(g_code_pad[start:start + bg]),
              jnp.asarray(g_pid_pad[start:start + bg]), jnp.int32(start),
              jnp.int32(stop - start))
    for blk, q_block in zip(blocks, q_blocks):
      tile = distance_lib.distance_tile(*q_block, *g_ops, distance)
      blk['state'] = _step_jit(tile, blk['state'], blk['pairs'], blk['q_meta'], g_meta,
                               dev_values, tpr=tpr)
    if tpr and (n + 1) % flush_every == 0:
      for blk in blocks:
        flushed.append((blk['state']['below'], blk['state']['equal']))
        blk['state'] = dict(blk['state'], below=jnp.zeros_like(blk['state']['below']),
                            equal=jnp.zeros_like(blk['state']['equal']))
    return blocks[-1]['state']['counts']

  _gallery_pass(g_feats, bg, distance, visit)
  states = jax.device_get([blk['state'] for blk in blocks])
  if any(bool(s['nonfinite']) for s in states):
    raise ValueError('Non-finite distances: g_feats contain NaN or infinite values, or '
                     'the distances overflow float32.')
  mismatch = sum(int(s['mismatch']) for s in states)
  if mismatch:
    warnings.warn(f'{mismatch} of {len(pos_q)} positive distances differ between tiles on '
                  f'this backend; ranks may differ from a dense evaluation at exact ties.',
                  stacklevel=2)
  ranks = np.concatenate([s['counts'].reshape(-1)[:int(bounds[b + 1] - bounds[b])]
                          for b, s in enumerate(states)]).astype(np.int64)
  valid, ap, inp, first = protocol.ap_inp(pos_q, ranks, num_q)
  order = np.argsort(qperm[valid])
  valid, ap, inp, first = qperm[valid][order], ap[order], inp[order], first[order]
  tprs = None
  if tpr:
    below = sum(np.asarray(s['below'], np.int64) for s in states)
    equal = sum(np.asarray(s['equal'], np.int64) for s in states)
    for b_arr, e_arr in jax.device_get(flushed):
      below, equal = below + b_arr.astype(np.int64), equal + e_arr.astype(np.int64)
    tprs = verification.tpr_from_counts(values, genuine, below, equal, fprs)
  return protocol.ranking_metrics(valid, ap, inp, first, max_rank, tpr_at_fpr=tprs)


def evaluate_features(q_feats: ArrayLike, g_feats: ArrayLike, q_pids: ArrayLike,
                      g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike,
                      distance: str = 'euclidean', max_rank: int = 50, *,
                      block_size: int = 256,
                      gallery_block: int = 1024) -> tuple[np.ndarray, float, float]:
  """CMC, mAP and mINP of features: `evaluate()` on their distances, streamed.

  Equal to `eval.metrics.evaluate(distance_matrix(q_feats, g_feats, distance),
  ...)` (Market protocol; see the module docstring for the last-bit caveat)
  without building the matrix; `rank_features` also gives per-query results
  and TPR@FPR, `nearest_kept` the top-k lists of reports.

  Args:
    q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, distance, max_rank,
    block_size, gallery_block: as `rank_features`.

  Returns:
    (cmc, mAP, mINP) as `eval.metrics.evaluate`.
  """
  res = rank_features(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, distance,
                      max_rank, block_size=block_size, gallery_block=gallery_block)
  return res.cmc, res.mAP, res.mINP


@functools.partial(jax.jit, static_argnames=('k', 'distance'))
def _top_k_step(q_ops, g_ops, q_code, g_code, start, num_valid, top_v, top_i, *, k: int,
                distance: str):
  """Merges a gallery block into the running k nearest kept entries."""
  tile = distance_lib.distance_tile(*q_ops, *g_ops, distance)
  lane = jnp.arange(tile.shape[1], dtype=jnp.int32)
  kept = (g_code[None] != q_code[:, None]) & (lane < num_valid)[None]
  v, p = jax.lax.top_k(jnp.where(kept, -tile, -jnp.inf), min(k, tile.shape[1]))
  # The running list holds lower gallery indices: it wins ties (lax.top_k keeps
  # the earlier of equal values).
  v, pos = jax.lax.top_k(jnp.concatenate([top_v, v], axis=1), k)
  idx = jnp.concatenate([top_i, start + p.astype(jnp.int32)], axis=1)
  return v, jnp.take_along_axis(idx, pos, axis=1)


def nearest_kept(q_feats: ArrayLike, g_feats: ArrayLike, q_pids: ArrayLike,
                 g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike, k: int = 10,
                 distance: str = 'euclidean', *, block_size: int = 256,
                 gallery_block: int = 4096) -> np.ndarray:
  """Each query's k nearest kept gallery entries, streamed (for reports).

  Kept as in the Market protocol (same pid and same camera removed), ranked
  by (distance, gallery index). Meant for a few queries (e.g. the worst ones
  of `rank_features`): the cost is a pass over the gallery per query block.

  Args:
    q_feats, g_feats, q_pids, g_pids, q_camids, g_camids: as `rank_features`.
    k: list length (clipped to G).
    distance: one of `eval.distance.DISTANCES`.
    block_size: queries per tile.
    gallery_block: gallery rows per tile.

  Returns:
    (Q, k) int64 gallery indices, best first; -1 past a query's kept entries.
  """
  distance_lib.check_distance(distance)
  if int(k) < 1:
    raise ValueError(f'k must be >= 1, got {k}.')
  num_q, num_g, _, labels, _ = _check(q_feats, g_feats, (q_pids, g_pids, q_camids, g_camids),
                                      1, block_size, gallery_block)
  q_code, g_code = protocol.pid_cam_codes(*protocol.label_codes(*labels))
  bq, bg, k = min(int(block_size), num_q), min(int(gallery_block), num_g), min(int(k), num_g)
  q_code = np.pad(q_code, (0, -num_q % bq))
  g_code = np.pad(g_code, (0, -num_g % bg), constant_values=-1)
  state = [(jnp.full((bq, k), -jnp.inf, jnp.float32), jnp.full((bq, k), -1, jnp.int32))
           for _ in range(0, num_q, bq)]
  q_blocks = _query_blocks(jnp.asarray(q_feats, jnp.float32), bq, distance)

  def visit(n, g_ops, start, stop):
    del n  # the lists need no per-block bookkeeping
    for b, q_block in enumerate(q_blocks):
      state[b] = _top_k_step(q_block, g_ops, jnp.asarray(q_code[b * bq:(b + 1) * bq]),
                             jnp.asarray(g_code[start:start + bg]), jnp.int32(start),
                             jnp.int32(stop - start), *state[b], k=k, distance=distance)
    return state[-1][0]

  _gallery_pass(g_feats, bg, distance, visit)
  state = jax.device_get(state)
  values = np.concatenate([v for v, _ in state])[:num_q]
  top = np.concatenate([i for _, i in state])[:num_q].astype(np.int64)
  top[values == -np.inf] = -1
  return top
