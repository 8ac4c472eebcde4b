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
num_gallery) and the result does not depend on the block size. The per-positive ranks are
integers; AP and mINP are then reduced in float64 with numpy.
"""

import functools
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any

_PROTOCOLS = ('market', 'cuhk03')
# The count kernel is memory-bound once its (rows, num_gallery) working array
# leaves the cache; rows per call are capped so that it holds about this many
# elements (measured on CPU: 128 rows for Market's 15,913 gallery images).
_WORKING_ELEMENTS = 2**21


def _as_1d(name: str, values: ArrayLike) -> np.ndarray:
  """Returns `values` as a 1-D numpy array, raising ValueError otherwise."""
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {arr.shape}.')
  return arr


def _dense_codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps the labels of `a` and `b` to shared int32 codes 0..K-1.

  Args:
    a: 1-D labels (any comparable dtype).
    b: 1-D labels of the same kind.

  Returns:
    (codes_a, codes_b), equal codes exactly where the labels are equal.
  """
  _, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
  inverse = inverse.reshape(-1).astype(np.int32)
  return inverse[:len(a)], inverse[len(a):]


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
  """Checks the inputs of `evaluate` and puts them in canonical form.

  Returns:
    (q_pid codes, g_pid codes, q_cam codes, g_cam codes, max_rank clipped to
    the gallery size).
  """
  if protocol not in _PROTOCOLS:
    raise ValueError(f'Unknown protocol {protocol!r}; expected one of {_PROTOCOLS}.')
  if int(block_size) < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  if int(max_rank) < 1:
    raise ValueError(f'max_rank must be >= 1, got {max_rank}.')
  shape = tuple(np.shape(distmat))
  if len(shape) != 2:
    raise ValueError(f'distmat must be 2-D (num_query, num_gallery), got shape {shape}.')
  num_q, num_g = shape
  q_pids = _as_1d('q_pids', q_pids)
  g_pids = _as_1d('g_pids', g_pids)
  q_camids = _as_1d('q_camids', q_camids)
  g_camids = _as_1d('g_camids', g_camids)
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
  qp, gp = _dense_codes(q_pids, g_pids)
  qc, gc = _dense_codes(q_camids, g_camids)
  return qp, gp, qc, gc, int(max_rank)


def positive_pairs(q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                   g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Lists the (query, gallery) positive pairs of the Market protocol.

  A positive has the query's pid and a different camera (same pid and same
  camera entries are removed by the protocol).

  Args:
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.

  Returns:
    (pos_q, pos_g) int32 arrays, sorted by query then gallery index.
  """
  q_pids = np.asarray(q_pids)
  g_pids = np.asarray(g_pids)
  order = np.argsort(g_pids, kind='stable')
  sorted_pids = g_pids[order]
  lo = np.searchsorted(sorted_pids, q_pids, side='left')
  hi = np.searchsorted(sorted_pids, q_pids, side='right')
  counts = hi - lo
  pos_q = np.repeat(np.arange(len(q_pids)), counts)
  starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
  pos_g = order[starts + np.arange(len(pos_q))]
  keep = np.asarray(g_camids)[pos_g] != np.asarray(q_camids)[pos_q]
  return pos_q[keep].astype(np.int32), pos_g[keep].astype(np.int32)


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
  num_cams = int(max(qc.max(), gc.max())) + 1
  q_code, g_code = _dense_codes(qp.astype(np.int64) * num_cams + qc,
                                gp.astype(np.int64) * num_cams + gc)
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


def _cmc_from_first_ranks(first: np.ndarray, max_rank: int) -> np.ndarray:
  """Mean CMC curve (float64) from each valid query's 0-based first-hit rank."""
  hist = np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)
  return np.cumsum(hist[:max_rank]) / len(first)


def _ap_inp(pos_q: np.ndarray, ranks: np.ndarray, num_q: int):
  """Per-query AP, INP and first rank from the positives' ranks.

  Returns:
    (valid query indices, AP per valid query, INP per valid query, first-hit rank
    per valid query), all float64 / int64 numpy arrays.
  """
  order = np.lexsort((ranks, pos_q))
  q_sorted, r_sorted = pos_q[order], ranks[order]
  num_rel = np.bincount(q_sorted, minlength=num_q)
  starts = np.concatenate([[0], np.cumsum(num_rel)[:-1]])
  within = np.arange(len(q_sorted)) - starts[q_sorted]  # 0-based index among positives
  precision = (within + 1.0) / (r_sorted + 1.0)
  valid = np.nonzero(num_rel)[0]
  ap_sum = np.bincount(q_sorted, weights=precision, minlength=num_q)
  ap = ap_sum[valid] / num_rel[valid]
  last = r_sorted[starts[valid] + num_rel[valid] - 1]
  inp = num_rel[valid] / (last + 1.0)
  first = r_sorted[starts[valid]]
  return valid, ap, inp, first


def _hash32(x: jax.Array) -> jax.Array:
  """A 32-bit integer mixing function (lowbias32), elementwise on uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _uniform(seed: jax.Array, repeat: jax.Array, query: jax.Array,
             slot: jax.Array) -> jax.Array:
  """Counter-based uniform [0, 1) numbers, a pure function of the four indices."""
  h = _hash32(seed.astype(jnp.uint32) + jnp.uint32(0x9E3779B9))
  h = _hash32(h ^ repeat.astype(jnp.uint32))
  h = _hash32(h ^ query.astype(jnp.uint32))
  h = _hash32(h ^ slot.astype(jnp.uint32))
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


@functools.partial(jax.jit, static_argnames=('num_repeats',))
def _cuhk03_draw(q_index: jax.Array, q_group: jax.Array, pos_list: jax.Array,
                 pos_mask: jax.Array, group_start: jax.Array, group_size: jax.Array,
                 g_order: jax.Array, seed: jax.Array, num_repeats: int):
  """Draws one gallery entry per gallery identity for each (repeat, query).

  The random numbers come from a counter-based hash of (seed, repeat, query
  index, slot), so a draw never depends on the blocking.

  Args:
    q_index: (B,) query indices.
    q_group: (B,) index of the query's identity among the gallery identities.
    pos_list: (B, P) gallery indices of each query's positives (padded).
    pos_mask: (B, P) validity of `pos_list`.
    group_start: (K,) start of each gallery identity in `g_order`.
    group_size: (K,) number of gallery entries of each identity.
    g_order: (G,) gallery indices sorted by identity.
    seed: int32 scalar seed.
    num_repeats: number of draws.

  Returns:
    (sel, pos): (R, B, K) drawn gallery index per identity (the query's own
    identity entry replaced by the drawn positive) and (R, B) the drawn positive.
  """
  num_k, num_p = group_size.shape[0], pos_list.shape[1]
  r = jnp.arange(num_repeats)[:, None, None]
  q = q_index[None, :, None]
  u = _uniform(seed, r, q, jnp.arange(num_k)[None, None, :])  # (R, B, K)
  off = jnp.minimum(jnp.floor(u * group_size).astype(jnp.int32), group_size - 1)
  sel = g_order[group_start + off]
  up = _uniform(seed, r, q, num_k + jnp.arange(num_p)[None, None, :])  # (R, B, P)
  up = jnp.where(pos_mask[None], up, -1.0)
  pos = jnp.take_along_axis(jnp.broadcast_to(pos_list[None], up.shape),
                            jnp.argmax(up, axis=2)[..., None], axis=2)[..., 0]  # (R, B)
  own = jnp.arange(num_k)[None, None, :] == q_group[None, :, None]
  return jnp.where(own, pos[..., None], sel), pos


@jax.jit
def _cuhk03_ranks(dist_rows: jax.Array, sel: jax.Array, pos: jax.Array) -> jax.Array:
  """Rank of the drawn positive among the drawn entries.

  Args:
    dist_rows: (B, G) distances of the block's queries.
    sel: (R, B, K) drawn gallery entries, one per gallery identity.
    pos: (R, B) drawn positive (also present in `sel`).

  Returns:
    (R, B) int32 0-based ranks.
  """
  d_sel = jnp.take_along_axis(dist_rows[None], sel, axis=2)
  d_pos = jnp.take_along_axis(dist_rows[None], pos[..., None], axis=2)
  before = (d_sel < d_pos) | ((d_sel == d_pos) & (sel < pos[..., None]))
  return jnp.sum(before, axis=2, dtype=jnp.int32)


def cuhk03_draws(qp: np.ndarray, gp: np.ndarray, pos_q: np.ndarray, pos_g: np.ndarray,
                 queries: np.ndarray, num_repeats: int, seed: int,
                 block_size: int) -> Iterator[tuple[np.ndarray, int, jax.Array, jax.Array]]:
  """Single-gallery-shot draws of the CUHK03 protocol.

  Each (repeat, query) draw is a function of (seed, repeat, query index) only,
  so it does not depend on `block_size` or on which other queries are drawn.

  Args:
    qp: (Q,) query pid codes.
    gp: (G,) gallery pid codes.
    pos_q: (T,) query index of each positive pair (sorted by query).
    pos_g: (T,) gallery index of each positive pair.
    queries: (B,) indices of queries with at least one positive.
    num_repeats: number of random draws.
    seed: PRNG seed.
    block_size: queries drawn per jitted call.

  Yields:
    (block, n, sel, pos) per block of `queries`: block (block_size,) query
    indices (the last block padded by repeating its last query, n of them
    real), sel (R, block_size, K) one drawn gallery index per gallery identity
    (K identities in code order; the query's own identity holds the drawn
    positive) and pos (R, block_size) the drawn positive, as jax arrays.
  """
  g_order = np.argsort(gp, kind='stable').astype(np.int32)
  groups, group_start, group_size = np.unique(gp[g_order], return_index=True,
                                              return_counts=True)
  num_pos = np.bincount(pos_q, minlength=len(qp))
  first = np.concatenate([[0], np.cumsum(num_pos)[:-1]])
  slot = np.arange(max(int(num_pos[queries].max()), 1))
  consts = (jnp.asarray(group_start, jnp.int32), jnp.asarray(group_size, jnp.int32),
            jnp.asarray(g_order))
  seed = jnp.asarray(np.uint32(int(seed) % 2**32).view(np.int32))
  for start in range(0, len(queries), block_size):
    stop = min(start + block_size, len(queries))
    block = np.pad(queries[start:stop], (0, block_size - (stop - start)), mode='edge')
    q_group = np.searchsorted(groups, qp[block]).astype(np.int32)
    pos_mask = slot[None] < num_pos[block][:, None]
    idx = np.where(pos_mask, first[block][:, None] + slot[None], 0)
    pos_list = pos_g[idx].astype(np.int32)
    sel, pos = _cuhk03_draw(jnp.asarray(block, jnp.int32), jnp.asarray(q_group),
                            jnp.asarray(pos_list), jnp.asarray(pos_mask), *consts, seed,
                            num_repeats)
    yield block, stop - start, sel, pos


def _prepare(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, protocol, block_size):
  """Validation, positives and their ranks shared by the public functions."""
  qp, gp, qc, gc, max_rank = _validate(distmat, q_pids, g_pids, q_camids, g_camids,
                                       max_rank, protocol, block_size)
  pos_q, pos_g = positive_pairs(qp, gp, qc, gc)
  if len(pos_q) == 0:
    raise ValueError('No query has a valid match in the gallery (same identity '
                     'seen by a different camera); metrics are undefined.')
  ranks = positive_ranks(distmat, pos_q, pos_g, qp, gp, qc, gc, int(block_size))
  return qp, gp, pos_q, pos_g, ranks, max_rank


def per_query_metrics(distmat: ArrayLike,
                      q_pids: ArrayLike,
                      g_pids: ArrayLike,
                      q_camids: ArrayLike,
                      g_camids: ArrayLike,
                      *,
                      block_size: int = 128) -> dict[str, np.ndarray]:
  """Market-protocol AP, INP and first-hit rank of every query with a match.

  Args:
    distmat: (Q, G) distances.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    block_size: queries per block and at most the rows of the (rows, G)
      working array.

  Returns:
    Dict with 'query' (indices of the queries with at least one positive),
    'ap', 'inp' (float64) and 'first_rank' (0-based rank of the first correct
    match among the kept gallery entries), aligned with 'query'.

  Raises:
    ValueError: as `evaluate`.
  """
  _, _, pos_q, _, ranks, _ = _prepare(distmat, q_pids, g_pids, q_camids, g_camids, 1,
                                         'market', block_size)
  valid, ap, inp, first = _ap_inp(pos_q, ranks, int(np.shape(distmat)[0]))
  return {'query': valid, 'ap': ap, 'inp': inp, 'first_rank': first}


def cuhk03_samples(q_pids: ArrayLike,
                   g_pids: ArrayLike,
                   q_camids: ArrayLike,
                   g_camids: ArrayLike,
                   *,
                   num_repeats: int = 10,
                   seed: int = 0,
                   block_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """The gallery draws `evaluate(protocol='cuhk03')` makes (for inspection).

  Args:
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    num_repeats: number of draws.
    seed: seed of the draws.
    block_size: queries per jitted call (does not change the draws).

  Returns:
    (queries, sel): the indices of the queries with at least one positive, and
    (num_repeats, len(queries), K) int gallery indices, one drawn entry per
    gallery identity (K of them; the query's own identity holds a drawn
    positive, i.e. an entry from another camera).
  """
  q_pids, g_pids = _as_1d('q_pids', q_pids), _as_1d('g_pids', g_pids)
  qp, gp = _dense_codes(q_pids, g_pids)
  qc, gc = _dense_codes(_as_1d('q_camids', q_camids), _as_1d('g_camids', g_camids))
  pos_q, pos_g = positive_pairs(qp, gp, qc, gc)
  queries = np.unique(pos_q)
  if len(queries) == 0:
    raise ValueError('No query has a valid match in the gallery.')
  sels = [np.asarray(sel)[:, :n] for _, n, sel, _ in cuhk03_draws(
      qp, gp, pos_q, pos_g, queries, num_repeats, seed, int(block_size))]
  return queries, np.concatenate(sels, axis=1)


def evaluate(distmat: ArrayLike,
             q_pids: ArrayLike,
             g_pids: ArrayLike,
             q_camids: ArrayLike,
             g_camids: ArrayLike,
             max_rank: int = 50,
             *,
             protocol: str = 'market',
             block_size: int = 128,
             num_repeats: int = 10,
             seed: int = 0) -> tuple[np.ndarray, float, float]:
  """CMC, mAP and mINP of a query-gallery distance matrix.

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
    (cmc, mAP, mINP): cmc a float32 array of length min(max_rank, G); mAP and
    mINP floats in [0, 1], averaged over the queries with at least one positive.

  Raises:
    ValueError: on mismatched lengths, an empty query set or gallery, NaN
      distances, an unknown protocol, a non-positive max_rank or block_size,
      or when no query has a valid match in the gallery.
  """
  qp, gp, pos_q, pos_g, ranks, max_rank = _prepare(
      distmat, q_pids, g_pids, q_camids, g_camids, max_rank, protocol, block_size)
  valid, ap, inp, first = _ap_inp(pos_q, ranks, len(qp))
  if protocol == 'market':
    cmc = _cmc_from_first_ranks(first, max_rank)
  else:
    if int(num_repeats) < 1:
      raise ValueError(f'num_repeats must be >= 1, got {num_repeats}.')
    hits = np.zeros(max_rank + 1, np.int64)
    for block, n, sel, pos in cuhk03_draws(qp, gp, pos_q, pos_g, valid, int(num_repeats),
                                           seed, int(block_size)):
      rows = _fetch_rows(distmat, block, _compute_dtype(distmat))
      r = np.asarray(_cuhk03_ranks(rows, sel, pos))[:, :n].reshape(-1)
      hits += np.bincount(np.minimum(r, max_rank), minlength=max_rank + 1)
    cmc = np.cumsum(hits[:max_rank]) / (len(valid) * int(num_repeats))
  return cmc.astype(np.float32), float(np.mean(ap)), float(np.mean(inp))
