"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory.

Computes the same distances as the numpy `re_ranking(probFea, galFea, k1, k2,
lambda_value)` shared by the PyTorch re-ID baselines (BoT `utils/re_ranking.py`,
with float32 in place of its float16 `V`), without ever holding an N x N
matrix (N = num_query + num_gallery):

1. One pass over the squared euclidean distances of all N points in
   (block_size, block_size) tiles (JAX) yields each row's maximum (the
   reference scales row i by it: D is symmetric, so its per-column maximum
   followed by the transpose is a per-row scaling), the row's nearest
   neighbours (only `initial_rank[:, :max(k1 + 1, k2)]` is ever read, kept as
   running top-k lists) and the scaled query-gallery block of the output.
   By symmetry only the upper triangle of tiles is computed, each tile
   serving its rows and (transposed) its columns.
2. The k1-reciprocal sets and their 2/3 expansion with k1/2-reciprocal sets
   are vectorised over row blocks (JAX) from the neighbour lists alone.
3. `V` is a sparse CSR matrix (scipy) whose weights exp(-scaled distance)
   come, for the members of each row's expanded set, from the distances the
   neighbour pass kept (most members are in the row's neighbour list or the
   row in theirs; the others are computed from the features); the local query
   expansion (mean of `V` over the k2 nearest rows) is a sparse product.
4. The Jaccard distance `1 - s / (2 - s)`, s = sum_k min(V[i, k], V[j, k]), is
   accumulated blockwise over query rows against a CSC copy of the gallery
   rows of `V`, and combined with the scaled original distance in place
   (densely in float32 for s = 0, i.e. Jaccard distance 1; then corrected
   where s > 0).

Peak memory is the (num_query, num_gallery) float32 output plus two copies of
the features, plus O(block_size * N) working memory, the sparse `V` and the
Jaccard working set bounded by `max_pairs` (`memory_bytes` estimates it);
above `max_bytes` the computation is refused before it starts.

Distances: 'euclidean' is the baselines' squared Euclidean distance.
'cosine' re-ranks the L2-normalised features, as fast-reid does for its
cosine metric: on unit vectors the squared Euclidean distance is 2 * (1 - cos),
and since the original distance enters only through its ranking and its
per-row scaling by the row maximum, this is exactly the re-ranking with the
cosine distance as original distance (up to float32 rounding).
Unlike fast-reid, which combines the Jaccard distance with the unscaled
original distance, the BoT formula (row-max-scaled distance) is kept for both.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from eval import distance as distance_lib
from eval.distance import aligned_empty

ArrayLike = Any

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=('k',))
def _merge_top(vals: tuple[jax.Array, ...], idx: tuple[jax.Array, ...],
               k: int) -> tuple[jax.Array, jax.Array]:
  """Keeps the k largest of several candidate lists, preferring earlier lists on ties."""
  v, pos = jax.lax.top_k(jnp.concatenate(vals, axis=1), k)
  return v, jnp.take_along_axis(jnp.concatenate(idx, axis=1), pos, axis=1)


# Tile results merged into a block's neighbour list at a time (one top_k for
# several tiles: XLA:CPU's TopK has a sizeable cost per row).
_MERGE_EVERY = 8


@functools.partial(jax.jit, static_argnames=('k', 'same', 'with_output'))
def _tile(f_i: jax.Array, sq_i: jax.Array, f_j: jax.Array, sq_j: jax.Array, n_i: jax.Array,
          n_j: jax.Array, base_j: jax.Array, base_i: jax.Array, max_i: jax.Array,
          max_j: jax.Array, k: int, same: bool, with_output: bool):
  """One (B_i, B_j) tile of the symmetric squared-distance matrix.

  Updates the running row maxima and gives the k nearest candidates in the
  tile of its rows (block i) and, through the transpose, of its columns
  (block j). Each block receives the column blocks in increasing order, so
  keeping the earlier candidate on ties ranks equal distances by index.

  Args:
    f_i: (B_i, D) features of row block i (zero-padded).
    sq_i: (B_i,) their squared norms (an input: computed inside, XLA:CPU would
      recompute the reduction for every output element).
    f_j: (B_j, D) features of block j (zero-padded).
    sq_j: (B_j,) their squared norms.
    n_i: number of real rows in block i.
    n_j: number of real rows in block j.
    base_j: index of the first row of block j.
    base_i: index of the first row of block i.
    max_i: (B_i,) running row maxima of block i.
    max_j: (B_j,) those of block j (ignored when `same`).
    k: neighbours kept.
    same: whether i == j (the transpose update is skipped).
    with_output: also return the tile itself.

  Returns:
    ((max_i, neg. distances (B_i, k), indices (B_i, k)), the same for block j
    or None when `same`, tile (B_i, B_j) or None).
  """
  d = sq_i[:, None] + sq_j[None, :] - 2.0 * jnp.matmul(f_i, f_j.T, precision=_HIGHEST)

  def update(row_max, dist, n_cols, base):
    valid = (jnp.arange(dist.shape[1]) < n_cols)[None, :]
    row_max = jnp.maximum(row_max, jnp.max(jnp.where(valid, dist, -jnp.inf), axis=1))
    v, pos = jax.lax.top_k(jnp.where(valid, -dist, -jnp.inf), min(k, dist.shape[1]))
    return row_max, v, (pos + base).astype(jnp.int32)

  out_i = update(max_i, d, n_j, base_j)
  out_j = None if same else update(max_j, d.T, n_i, base_i)
  return out_i, out_j, (d if with_output else None)


def _even_blocks(start: int, stop: int, block_size: int) -> list[tuple[int, int, int]]:
  """Splits [start, stop) into ceil(n / block_size) near-equal blocks.

  Returns:
    (start, stop, padded size) per block; sizes are the largest block rounded
    up to a multiple of 8 (one tile shape per pair of ranges, little padding).
  """
  n = stop - start
  if n <= 0:
    return []
  count = -(-n // block_size)
  step = -(-n // count)
  size = -(-step // 8) * 8
  return [(s, min(s + step, stop), size) for s in range(start, stop, step)]


@jax.jit
def _squared_norms(f: jax.Array) -> jax.Array:
  return jnp.sum(f * f, axis=1)


def _neighbour_pass(feats: np.ndarray, num_query: int, k: int, block_size: int,
                    out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row maxima, k nearest neighbours and the scaled query-gallery distances.

  The squared distances are computed once per pair of row blocks (upper
  triangle of the block grid) and used for both blocks. Query and gallery rows
  are blocked separately, in near-equal blocks of at most `block_size` rows
  (little padding), so that query-gallery tiles map onto `out`.

  Args:
    feats: (N, D) float32 features, queries first.
    num_query: number of queries.
    k: neighbours per row (<= N).
    block_size: rows per block.
    out: (num_query, N - num_query) float32 array receiving the distances
      divided by their row maximum.

  Returns:
    (row_max (N,) float32, nn (N, k) int32 by increasing distance, ties to the
    lower index, nn_dist (N, k) float32 their distances).
  """
  num = feats.shape[0]
  blocks = _even_blocks(0, num_query, block_size) + _even_blocks(num_query, num,
                                                                  block_size)
  operands = []
  for start, stop, size in blocks:
    f = np.zeros((size, feats.shape[1]), np.float32)
    f[:stop - start] = feats[start:stop]
    f = jax.device_put(f)
    operands.append((f, _squared_norms(f)))
  maxima = [jnp.full((size,), -jnp.inf, jnp.float32) for _, _, size in blocks]
  lists = [([jnp.full((size, k), -jnp.inf, jnp.float32)], [jnp.full((size, k), -1, jnp.int32)])
           for _, _, size in blocks]

  def add(b, vals, idx, final=False):
    lists[b][0].append(vals)
    lists[b][1].append(idx)
    if final or len(lists[b][0]) > _MERGE_EVERY:
      merged = _merge_top(tuple(lists[b][0]), tuple(lists[b][1]), k)
      lists[b] = ([merged[0]], [merged[1]])

  row_max = np.empty(num, np.float32)
  nn = np.empty((num, k), np.int32)
  nn_dist = np.empty((num, k), np.float32)
  for bi, (si, ei, _) in enumerate(blocks):
    pending = []
    for bj in range(bi, len(blocks)):
      sj, ej, _ = blocks[bj]
      with_output = si < num_query <= sj
      out_i, out_j, tile = _tile(*operands[bi], *operands[bj], ei - si, ej - sj, sj, si,
                                 maxima[bi], maxima[bj], k, bj == bi, with_output)
      maxima[bi] = out_i[0]
      add(bi, *out_i[1:], final=bj == len(blocks) - 1)
      if bj != bi:
        maxima[bj] = out_j[0]
        add(bj, *out_j[1:])
      if with_output:
        pending.append((sj - num_query, ej - num_query, tile))
    # Block bi has now seen every column block.
    (vals,), (idx,) = lists[bi]
    lists[bi] = None
    row_max[si:ei] = np.asarray(maxima[bi])[:ei - si]
    nn[si:ei] = np.asarray(idx)[:ei - si]
    nn_dist[si:ei] = -np.asarray(vals)[:ei - si]
    for a, b, tile in pending:
      out[si:ei, a:b] = np.asarray(tile)[:ei - si, :b - a]
    if pending:
      out[si:ei] /= row_max[si:ei, None]
  return row_max, nn, nn_dist


@functools.partial(jax.jit, static_argnames=('k1p', 'h1'))
def _expanded_sets(nn: jax.Array, rows: jax.Array, k1p: int, h1: int) -> jax.Array:
  """Members of the expanded k-reciprocal sets of a block of rows.

  Args:
    nn: (N, K) nearest-neighbour lists (K >= k1p).
    rows: (B,) row indices.
    k1p: k1 + 1 (clipped to N), length of the forward lists.
    h1: round(k1 / 2) + 1 (clipped to N), length of the candidates' lists.

  Returns:
    (B, k1p * (1 + h1)) int32 members; unused slots hold N. A row's members
    are its k1-reciprocal neighbours plus the k1/2-reciprocal sets of those
    neighbours whose overlap with the k1-reciprocal set is above 2/3 of their
    size; they may repeat.
  """
  num = nn.shape[0]
  fwd = nn[rows, :k1p]  # (B, k1p)
  back = nn[:, :k1p][fwd]  # (B, k1p, k1p)
  recip = jnp.any(back == rows[:, None, None], axis=-1)  # (B, k1p)
  cand_fwd = back[:, :, :h1]  # (B, k1p, h1): candidate c = fwd[b, m]
  cand_back = nn[:, :h1][cand_fwd]  # (B, k1p, h1, h1)
  cand_recip = jnp.any(cand_back == fwd[:, :, None, None], axis=-1)  # (B, k1p, h1)
  in_set = jnp.any((cand_fwd[..., None] == fwd[:, None, None, :]) &
                   recip[:, None, None, :], axis=-1)
  overlap = jnp.sum(in_set & cand_recip, axis=-1)
  size = jnp.sum(cand_recip, axis=-1)
  # len(intersection) > 2/3 * len(candidate set), exactly in integers.
  accept = recip & (3 * overlap > 2 * size)
  own = jnp.where(recip, fwd, num)
  extra = jnp.where(accept[..., None] & cand_recip, cand_fwd, num)
  return jnp.concatenate([own, extra.reshape(fwd.shape[0], -1)], axis=1)


@jax.jit
def _pair_distances(feats: jax.Array, sq: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared euclidean distances of the pairs (a[p], b[p])."""
  dot = jnp.einsum('pd,pd->p', feats[a], feats[b], precision=_HIGHEST)
  return sq[a] + sq[b] - 2.0 * dot


def _find_in_lists(lists: np.ndarray, rows: np.ndarray, values: np.ndarray,
                   chunk: int = 1 << 18) -> np.ndarray:
  """Position of values[p] in lists[rows[p]] (-1 where absent)."""
  pos = np.full(len(rows), -1, np.int64)
  for start in range(0, len(rows), chunk):
    hit = lists[rows[start:start + chunk]] == values[start:start + chunk, None]
    found = hit.any(axis=1)
    pos[start:start + chunk][found] = hit[found].argmax(axis=1)
  return pos


def _member_distances(feats_host: np.ndarray, row_ids: np.ndarray, indices: np.ndarray,
                      nn: np.ndarray, nn_dist: np.ndarray, block_size: int) -> np.ndarray:
  """Squared distances of the (row, member) entries of V.

  Most members are in the row's own neighbour list, or the row in the
  member's, whose distances the neighbour pass kept (the same values as the
  q-g output); the others are computed once per unordered pair.

  Args:
    feats_host: (N, D) float32 features.
    row_ids: (E,) row of each entry.
    indices: (E,) member of each entry.
    nn: (N, K) neighbour lists.
    nn_dist: (N, K) their distances.
    block_size: sets the pair batch size.

  Returns:
    (E,) float32 distances.
  """
  num = nn.shape[0]
  dist = np.empty(len(row_ids), np.float32)
  pos = _find_in_lists(nn, row_ids, indices)
  own = pos >= 0
  dist[own] = nn_dist[row_ids[own], pos[own]]
  rest = np.nonzero(~own)[0]
  pos = _find_in_lists(nn, indices[rest], row_ids[rest])
  back = pos >= 0
  dist[rest[back]] = nn_dist[indices[rest[back]], pos[back]]
  rest = rest[~back]
  if len(rest):
    keys = (np.minimum(row_ids[rest], indices[rest]).astype(np.int64) * num +
            np.maximum(row_ids[rest], indices[rest]))
    keys, inverse = np.unique(keys, return_inverse=True)
    pair_a = (keys // num).astype(np.int32)
    pair_b = (keys % num).astype(np.int32)
    feats = jax.device_put(feats_host)
    sq = _squared_norms(feats)
    pair_dist = np.empty(len(keys), np.float32)
    pair_block = max(block_size * 32, 4096)
    for start in range(0, len(keys), pair_block):
      stop = min(start + pair_block, len(keys))
      d = _pair_distances(feats, sq, jnp.asarray(_pad_to(pair_a[start:stop], pair_block)),
                          jnp.asarray(_pad_to(pair_b[start:stop], pair_block)))
      pair_dist[start:stop] = np.asarray(d)[:stop - start]
    dist[rest] = pair_dist[inverse.reshape(-1)]
  return dist


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads a 1-D array to `size` entries."""
  return np.pad(a, (0, size - len(a)))


def _check_inputs(q_feats, g_feats, k1, k2, lambda_value, block_size, max_pairs):
  """Validates `re_ranking`'s arguments; returns the concatenated features."""
  q = np.asarray(q_feats)
  g = np.asarray(g_feats)
  if q.ndim != 2 or g.ndim != 2:
    raise ValueError(f'Features must be 2-D (num, dim), got shapes {q.shape} and {g.shape}.')
  if q.shape[1] != g.shape[1]:
    raise ValueError(f'Feature dimensions differ: {q.shape[1]} vs {g.shape[1]}.')
  if q.shape[0] == 0:
    raise ValueError('Empty query set: q_feats has no rows.')
  if g.shape[0] == 0:
    raise ValueError('Empty gallery: g_feats has no rows.')
  if int(k1) < 1 or int(k2) < 1:
    raise ValueError(f'k1 and k2 must be >= 1, got k1={k1}, k2={k2}.')
  if not 0.0 <= float(lambda_value) <= 1.0:
    raise ValueError(f'lambda_value must be in [0, 1], got {lambda_value}.')
  if int(block_size) < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  if int(max_pairs) < 1:
    raise ValueError(f'max_pairs must be >= 1, got {max_pairs}.')
  feats = aligned_empty((q.shape[0] + g.shape[0], q.shape[1]), np.float32)
  feats[:q.shape[0]] = q
  feats[q.shape[0]:] = g
  if not np.isfinite(feats.sum()) and not np.isfinite(feats).all():
    raise ValueError('Features contain NaN or infinite values.')
  return feats


def _jaccard_blocks(rowpairs: np.ndarray, max_rows: int, max_pairs: int):
  """Splits query rows into blocks of at most `max_rows` rows and `max_pairs`
  (query, gallery, feature) triples (a single row may exceed the latter)."""
  start, num = 0, len(rowpairs)
  cum = np.concatenate([[0], np.cumsum(rowpairs)])
  while start < num:
    stop = int(np.searchsorted(cum, cum[start] + max_pairs, side='right')) - 1
    stop = min(max(stop, start + 1), start + max_rows, num)
    yield start, stop
    start = stop


def memory_bytes(num_query: int, num_gallery: int, dim: int, k1: int = 20, k2: int = 6,
                 max_pairs: int = 20_000_000) -> int:
  """Estimated peak memory (bytes) of `re_ranking` on these sizes.

  The (Q, G) float32 output, two float32 copies of the N = Q + G features
  (host and device blocks), the neighbour lists, the sparse V before and after
  the query expansion (about 2 * (k1 + 1) members per row, k2 rows averaged;
  12 bytes an entry with scipy's temporaries) and the Jaccard working set
  (about 48 bytes per triple, at most `max_pairs`).

  Args:
    num_query: Q.
    num_gallery: G.
    dim: feature size.
    k1: as `re_ranking`.
    k2: as `re_ranking`.
    max_pairs: as `re_ranking`.

  Returns:
    The estimate in bytes.
  """
  num = int(num_query) + int(num_gallery)
  members = min(num, 2 * (int(k1) + 1))  # per row of V
  expanded = min(num, members * max(int(k2), 1))  # per row after the expansion
  triples = min(int(max_pairs), int(num_query) * expanded * expanded)
  return int(4 * int(num_query) * int(num_gallery) + 8 * num * int(dim) +
             12 * num * (int(k1) + 1) + 12 * num * (members + expanded) + 48 * triples)


def re_ranking(q_feats: ArrayLike,
               g_feats: ArrayLike,
               k1: int = 20,
               k2: int = 6,
               lambda_value: float = 0.3,
               *,
               distance: str = 'euclidean',
               max_bytes: Optional[int] = distance_lib.DEFAULT_MAX_DENSE_BYTES,
               block_size: int = 1024,
               max_pairs: int = 20_000_000) -> np.ndarray:
  """k-reciprocal re-ranked query-gallery distances.

  Equal, up to float32 rounding, to the numpy reference implementation that
  takes features (squared euclidean distances over all query and gallery
  points, per-column max scaling, k1-reciprocal sets with the 2/3 expansion
  rule using round(k1 / 2) neighbours, Gaussian weights, local query
  expansion over the k2 nearest, Jaccard distance), with V kept in float32.
  Neighbour ties go to the lower index (numpy's default quicksort leaves them
  unspecified).

  Args:
    q_feats: (Q, D) query features.
    g_feats: (G, D) gallery features.
    k1: size of the k-reciprocal neighbourhoods.
    k2: size of the local query expansion.
    lambda_value: weight of the original distance in the result.
    distance: 'euclidean' (squared, the baselines') or 'cosine' (re-ranks the
      L2-normalised features; see the module docstring).
    max_bytes: refuse (MemoryLimitError, before any work) when
      `memory_bytes` exceeds this (None: no limit). A million-image gallery
      is refused with the default: its (Q, G) output alone needs tens of GB.
    block_size: at most this many rows per side of a distance tile (queries
      and gallery are tiled separately, in near-equal blocks), rows per block
      of the neighbour-set computation, and at most this many query rows per
      Jaccard block.
    max_pairs: Jaccard working-set bound: at most this many (query, gallery,
      feature) triples (about 40 bytes each) and this many entries of the
      dense (rows, num_gallery) float64 accumulator per block of query rows.

  Returns:
    (Q, G) float32 numpy array of re-ranked distances.

  Raises:
    ValueError: for malformed or empty features, non-finite values,
      out-of-range parameters or an unknown distance.
    MemoryLimitError: when the estimated memory exceeds `max_bytes`.
  """
  distance_lib.check_distance(distance)
  q_shape, g_shape = np.shape(q_feats), np.shape(g_feats)
  if len(q_shape) == 2 and len(g_shape) == 2:
    distance_lib.check_memory(
        f'Re-ranking {q_shape[0]} queries against {g_shape[0]} gallery images',
        memory_bytes(q_shape[0], g_shape[0], q_shape[1], k1, k2, max_pairs), max_bytes,
        'Re-ranking needs the dense (Q, G) result; evaluate without it '
        '(eval.metrics.evaluate_features) or on a smaller gallery.')
  feats_host = _check_inputs(q_feats, g_feats, k1, k2, lambda_value, block_size,
                             max_pairs)
  if distance == 'cosine':
    norms = np.sqrt(np.sum(np.square(feats_host, dtype=np.float32), axis=1, keepdims=True))
    feats_host /= np.maximum(norms, np.float32(1e-12))
  num_query = int(np.shape(q_feats)[0])
  num = feats_host.shape[0]
  num_gallery = num - num_query
  block_size = int(block_size)
  k1p = min(int(k1) + 1, num)
  h1 = min(int(np.around(int(k1) / 2)) + 1, num)
  kq = min(int(k2), num)
  k_nn = max(k1p, kq)

  # 1. Row maxima, neighbour lists and the scaled original q-g distances.
  out = aligned_empty((num_query, num_gallery), np.float32)
  bs = min(block_size, num)
  row_max, nn, nn_dist = _neighbour_pass(feats_host, num_query, k_nn, bs, out)

  # 2. Expanded k-reciprocal sets -> CSR structure (sorted, unique members).
  nn_dev = jnp.asarray(nn)
  indptr = np.zeros(num + 1, np.int64)
  chunks = []
  for start in range(0, num, bs):
    stop = min(start + bs, num)
    rows = _pad_to(np.arange(start, stop, dtype=np.int32), bs)
    members = np.asarray(_expanded_sets(nn_dev, jnp.asarray(rows), k1p, h1))[:stop - start]
    members = np.sort(members, axis=1)
    first = members != num
    first[:, 1:] &= members[:, 1:] != members[:, :-1]
    indptr[start + 1:stop + 1] = first.sum(axis=1)
    chunks.append(members[first])
  indptr = np.cumsum(indptr)
  indices = np.concatenate(chunks).astype(np.int32)
  del chunks, nn_dev

  # 3. Weights, row-normalised V, local query expansion.
  row_ids = np.repeat(np.arange(num, dtype=np.int32), np.diff(indptr))
  dist = _member_distances(feats_host, row_ids, indices, nn, nn_dist, bs)
  del nn_dist
  data = np.exp(-(dist / row_max[row_ids]))
  del dist
  sums = np.bincount(row_ids, weights=data, minlength=num)
  data = (data / sums[row_ids].astype(np.float32)).astype(np.float32)
  v = scipy.sparse.csr_matrix((data, indices, indptr), shape=(num, num))
  del data, indices, row_ids
  if int(k2) != 1:
    avg = scipy.sparse.csr_matrix(
        (np.ones(num * kq, np.float32), nn[:, :kq].reshape(-1),
         np.arange(0, num * kq + 1, kq)), shape=(num, num))
    v = (avg @ v).tocsr()
    v.data /= np.float32(kq)
  del nn

  # 4. Jaccard distance, blockwise over query rows, combined in place.
  v_q = v[:num_query]
  v_g = v[num_query:].tocsc()
  del v
  col_count = np.diff(v_g.indptr)
  col_start = v_g.indptr[:-1]
  cum_pairs = np.concatenate([[0], np.cumsum(col_count[v_q.indices], dtype=np.int64)])
  rowpairs = cum_pairs[v_q.indptr[1:]] - cum_pairs[v_q.indptr[:-1]]
  lam = float(lambda_value)
  max_rows = max(1, min(block_size, int(max_pairs) // max(num_gallery, 1)))
  for a, b in _jaccard_blocks(rowpairs, max_rows, int(max_pairs)):
    lo, hi = v_q.indptr[a], v_q.indptr[b]
    ks = v_q.indices[lo:hi]
    counts = col_count[ks]
    total = int(counts.sum())
    local = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(v_q.indptr[a:b + 1]))
    offsets = np.repeat(col_start[ks] - (np.cumsum(counts) - counts), counts)
    pos = offsets + np.arange(total)
    m = np.minimum(np.repeat(v_q.data[lo:hi], counts), v_g.data[pos])
    flat = np.repeat(local, counts) * num_gallery + v_g.indices[pos]
    s = np.bincount(flat, weights=m, minlength=(b - a) * num_gallery)
    # Where s = 0 the Jaccard distance is 1: combine densely in float32 as if
    # everywhere, then correct the (few) entries with shared neighbours.
    block = out[a:b]
    block *= np.float32(lam)
    block += np.float32(1.0 - lam)
    nz = np.flatnonzero(s)
    sv = s[nz]
    block.reshape(-1)[nz] -= ((1.0 - lam) * sv / (2.0 - sv)).astype(np.float32)
  return out
