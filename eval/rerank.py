"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory.

Computes the same distances as the numpy `re_ranking(probFea, galFea, k1, k2,
lambda_value)` shared by the PyTorch re-ID baselines (BoT `utils/re_ranking.py`,
with float32 in place of its float16 `V`), without ever holding an N x N
matrix (N = num_query + num_gallery):

1. One pass over the squared euclidean distances of all N points in
   (block_size, block_size) tiles (JAX, `eval.rerank_neighbours`) yields each
   row's maximum (the reference scales row i by it: D is symmetric, so its
   per-column maximum followed by the transpose is a per-row scaling), the
   row's nearest neighbours (only `initial_rank[:, :max(k1 + 1, k2)]` is ever
   read, kept as running top-k lists) and the query-gallery block of the
   distances, written into the output. By symmetry only the upper triangle of
   tiles is computed, each tile serving its rows and (transposed) its columns.
2. The k1-reciprocal sets and their 2/3 expansion with k1/2-reciprocal sets
   are sparse matrix products (scipy) of the neighbour lists alone.
3. `V` is a sparse CSR matrix (scipy) whose weights exp(-scaled distance)
   come, for the members of each row's expanded set, from the distances the
   neighbour pass kept (most members are in the row's neighbour list or the
   row in theirs, or are query-gallery pairs; the others are computed from the
   features); the local query expansion (mean of `V` over the k2 nearest rows)
   is a sparse product.
4. The Jaccard distance `1 - s / (2 - s)`, s = sum_k min(V[i, k], V[j, k]), is
   accumulated over a few query rows at a time (a dense accumulator that
   stays in the cache) against a CSC copy of the gallery rows of `V`, and
   combined in place with the distances scaled by their row maximum.

Peak memory is the (num_query, num_gallery) float32 output plus one copy of
the features (on CPU the device shares the host's; two with an accelerator),
plus O(block_size * N) working memory, the sparse `V` and the
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

import mmap
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from eval import distance as distance_lib
from eval import rerank_neighbours

ArrayLike = Any

_HIGHEST = jax.lax.Precision.HIGHEST


def _lists_matrix(nn: np.ndarray, k: int) -> scipy.sparse.csr_matrix:
  """(N, N) 0/1 matrix of the first k entries of each neighbour list."""
  num = nn.shape[0]
  return scipy.sparse.csr_matrix(
      (np.ones(num * k, np.int32), nn[:, :k].reshape(-1), np.arange(0, num * k + 1, k)),
      shape=(num, num))


def _expanded_sets(nn: np.ndarray, k1p: int, h1: int) -> scipy.sparse.csr_matrix:
  """Members of the expanded k-reciprocal sets of all rows, as sparse products.

  Args:
    nn: (N, K) nearest-neighbour lists (K >= k1p).
    k1p: k1 + 1 (clipped to N), length of the forward lists.
    h1: round(k1 / 2) + 1 (clipped to N), length of the candidates' lists.

  Returns:
    (N, N) CSR matrix (sorted indices) whose row i holds the members of i's
    set: its k1-reciprocal neighbours R(i) = {j in nn[i, :k1p]: i in
    nn[j, :k1p]} and the k1/2-reciprocal sets H(j) (from the h1-lists) of
    those j in R(i) with |H(j) & R(i)| > 2/3 |H(j)|.
  """
  forward = _lists_matrix(nn, k1p)
  recip = forward.multiply(forward.T).tocsr()
  half = _lists_matrix(nn, h1)
  half = half.multiply(half.T).tocsr()
  overlap = (recip @ half.T).multiply(recip).tocsr()  # |H(j) & R(i)| for j in R(i)
  rows = np.repeat(np.arange(nn.shape[0]), np.diff(overlap.indptr))
  # len(intersection) > 2/3 * len(candidate set), exactly in integers.
  accept = 3 * overlap.data > 2 * np.diff(half.indptr)[overlap.indices]
  accepted = scipy.sparse.csr_matrix(
      (np.ones(int(accept.sum()), np.int32), (rows[accept], overlap.indices[accept])),
      shape=recip.shape)
  members = (recip + accepted @ half).tocsr()
  members.sum_duplicates()
  members.sort_indices()
  return members


# Pairs per call of `_pair_distances`: their gathered features (8 KB a row at
# 2048-d) stay in the cache (4096 pairs: 3x slower, measured).
_PAIR_BLOCK = 512


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
                      nn: np.ndarray, nn_dist: np.ndarray, qg_dist: np.ndarray) -> np.ndarray:
  """Squared distances of the (row, member) entries of V.

  Most members are in the row's own neighbour list, or the row in the
  member's, whose distances the neighbour pass kept; query-gallery distances
  are in its output; the others are computed once per unordered pair. All
  but the last are the values the neighbour pass ranked.

  Args:
    feats_host: (N, D) float32 features (further rows are ignored).
    row_ids: (E,) row of each entry.
    indices: (E,) member of each entry.
    nn: (N, K) neighbour lists.
    nn_dist: (N, K) their distances.
    qg_dist: (Q, N - Q) query-gallery distances.

  Returns:
    (E,) float32 distances.
  """
  num, num_query = nn.shape[0], qg_dist.shape[0]
  dist = np.empty(len(row_ids), np.float32)
  pos = _find_in_lists(nn, row_ids, indices)
  own = pos >= 0
  dist[own] = nn_dist[row_ids[own], pos[own]]
  rest = np.nonzero(~own)[0]
  pos = _find_in_lists(nn, indices[rest], row_ids[rest])
  back = pos >= 0
  dist[rest[back]] = nn_dist[indices[rest[back]], pos[back]]
  rest = rest[~back]
  lo = np.minimum(row_ids[rest], indices[rest])
  hi = np.maximum(row_ids[rest], indices[rest])
  in_out = (lo < num_query) & (hi >= num_query)
  dist[rest[in_out]] = qg_dist[lo[in_out], hi[in_out] - num_query]
  rest, lo, hi = rest[~in_out], lo[~in_out], hi[~in_out]
  if len(rest):
    keys, inverse = np.unique(lo.astype(np.int64) * num + hi, return_inverse=True)
    pair_a = (keys // num).astype(np.int32)  # sorted: its rows stay in the cache
    pair_b = (keys % num).astype(np.int32)
    feats = jax.device_put(feats_host)
    sq = rerank_neighbours.squared_norms(feats)
    pair_dist = np.empty(len(keys), np.float32)
    for start in range(0, len(keys), _PAIR_BLOCK):
      stop = min(start + _PAIR_BLOCK, len(keys))
      d = _pair_distances(feats, sq, _pad_to(pair_a[start:stop], _PAIR_BLOCK),
                          _pad_to(pair_b[start:stop], _PAIR_BLOCK))
      pair_dist[start:stop] = np.asarray(d)[:stop - start]
    dist[rest] = pair_dist[inverse.reshape(-1)]
  return dist


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads a 1-D array to `size` entries."""
  return np.pad(a, (0, size - len(a)))


def _mapped_empty(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
  """Uninitialised page-aligned array in its own anonymous memory map.

  Unlike numpy's large allocations it is not advised to use transparent huge
  pages: where the kernel must compact memory for them (a busy machine), the
  first touch of Market's 214 MB (Q, G) output cost 0.47-0.51 s of system
  time, against 0.07-0.10 s in 4 KB pages (measured). Page-aligned, the device
  can share its memory.

  Args:
    shape: array shape.
    dtype: element type.

  Returns:
    The array (its memory is unmapped when the array is freed).
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype, count=nbytes // dtype.itemsize
                       ).reshape(shape)


def _check_inputs(q_feats, g_feats, k1, k2, lambda_value, block_size, max_pairs):
  """Validates `re_ranking`'s arguments.

  Returns:
    The features, queries first, in a page-aligned (M, D) float32 array
    whose rows beyond the N = Q + G features (the padding of the neighbour
    pass's last block) are zero.
  """
  q = np.asarray(q_feats)
  g = np.asarray(g_feats)
  distance_lib.check_feature_shapes(q.shape, g.shape, nonempty=True)
  if int(k1) < 1 or int(k2) < 1:
    raise ValueError(f'k1 and k2 must be >= 1, got k1={k1}, k2={k2}.')
  if not 0.0 <= float(lambda_value) <= 1.0:
    raise ValueError(f'lambda_value must be in [0, 1], got {lambda_value}.')
  if int(block_size) < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  if int(max_pairs) < 1:
    raise ValueError(f'max_pairs must be >= 1, got {max_pairs}.')
  num = q.shape[0] + g.shape[0]
  rows = rerank_neighbours.padded_rows(num, min(int(block_size), num))
  feats = _mapped_empty((rows, q.shape[1]), np.float32)  # zero-filled
  feats[:q.shape[0]] = q
  feats[q.shape[0]:num] = g
  if not np.isfinite(feats.sum()) and not np.isfinite(feats).all():
    raise ValueError('Features contain NaN or infinite values.')
  return feats


# Entries of the dense (rows, num_gallery) Jaccard accumulator per block of
# query rows (but at least 4 rows): 1 MB of float64, which stays in the cache
# (16 MB blocks: 5x slower, measured).
_JACCARD_ENTRIES = 1 << 17


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
               max_pairs: int = 20_000_000,
               neighbours_on_host: Optional[bool] = None) -> np.ndarray:
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
    neighbours_on_host: select the nearest neighbours of each distance tile
      on the host, from the few entries below the running k-th distances
      (numpy; the default on CPU, where XLA's top-k costs as much as half of
      the tile's matmul), rather than with `jax.lax.top_k` on the device (the
      default elsewhere). Both give the same lists.

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
  num = num_query + int(np.shape(g_feats)[0])
  num_gallery = num - num_query
  block_size = int(block_size)
  k1p = min(int(k1) + 1, num)
  h1 = min(int(np.around(int(k1) / 2)) + 1, num)
  kq = min(int(k2), num)
  k_nn = max(k1p, kq)

  # 1. Row maxima, neighbour lists and the original q-g distances.
  out = _mapped_empty((num_query, num_gallery), np.float32)
  bs = min(block_size, num)
  row_max, nn, nn_dist = rerank_neighbours.neighbour_pass(feats_host, num, num_query, k_nn, bs,
                                                          out, neighbours_on_host)

  # 2. Expanded k-reciprocal sets -> CSR structure (sorted, unique members).
  members = _expanded_sets(nn, k1p, h1)
  indptr, indices = members.indptr, members.indices.astype(np.int32)
  del members

  # 3. Weights, row-normalised V, local query expansion.
  row_ids = np.repeat(np.arange(num, dtype=np.int32), np.diff(indptr))
  dist = _member_distances(feats_host, row_ids, indices, nn, nn_dist, out)
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

  # 4. Jaccard distance, blockwise over query rows (a few rows per block: the
  # dense accumulator stays in the cache), combined with the scaled distances:
  # lambda * d / row max + (1 - lambda) * (1 - s / (2 - s)), where the second
  # term is written (1 - lambda) * (2 - 2 / (2 - s)).
  v_q = v[:num_query]
  v_g = v[num_query:].tocsc()
  del v
  g_count = np.diff(v_g.indptr)[v_q.indices]  # gallery entries per query entry
  g_start = v_g.indptr[:-1][v_q.indices].astype(np.int64)
  cum = np.concatenate([[0], np.cumsum(g_count, dtype=np.int64)])
  entry_row = np.repeat(np.arange(num_query, dtype=np.int64), np.diff(v_q.indptr))
  lam = float(lambda_value)
  scale = np.float32(lam) / row_max[:num_query]
  max_rows = min(block_size, max(1, int(max_pairs) // num_gallery),
                 max(4, _JACCARD_ENTRIES // num_gallery))
  rowpairs = cum[v_q.indptr[1:]] - cum[v_q.indptr[:-1]]
  for a, b in _jaccard_blocks(rowpairs, max_rows, int(max_pairs)):
    lo, hi = v_q.indptr[a], v_q.indptr[b]
    counts = g_count[lo:hi]
    pos = np.repeat(g_start[lo:hi] - (cum[lo:hi] - cum[lo]), counts)
    pos += np.arange(cum[hi] - cum[lo])
    m = np.repeat(v_q.data[lo:hi], counts)
    np.minimum(m, v_g.data[pos], out=m)
    flat = np.repeat((entry_row[lo:hi] - a) * num_gallery, counts)
    flat += v_g.indices[pos]
    s = np.bincount(flat, weights=m, minlength=(b - a) * num_gallery).reshape(b - a, -1)
    np.subtract(2.0, s, out=s)
    np.divide(-2.0 * (1.0 - lam), s, out=s)
    s += 2.0 * (1.0 - lam)
    block = out[a:b]
    block *= scale[a:b, None]
    block += s
  return out
