"""Row maxima and nearest-neighbour lists of all query and gallery points (re-ranking).

The first pass of `eval.rerank.re_ranking`: one sweep over the squared
euclidean distances of all N points in (block, block) tiles (JAX) yields each
row's maximum, the row's k nearest neighbours (ties to the lower index) with
their distances, and the query-gallery block of the distances. By symmetry
only the upper triangle of tiles is computed, each tile serving its rows and
(transposed) its columns; every block receives the column blocks in
increasing order.

The neighbour lists are selected in one of two exact ways:

- on the host (the default on CPU): the running k-th distance of each row is
  an upper bound of what can still enter its list, so the tile kernel also
  returns which entries lie below the bounds of their row or column (fused
  into the distance computation). The host merges those few candidates into
  the lists (numpy) while the next tile is computed. A list that is not full
  yet gets the tile's k-th smallest distance per row as bound (a partial
  selection). XLA:CPU's top-k (single-threaded) of a tile and its transpose
  costs half the CPU time of the tile's matmul (measured at 1000 x 1000 x
  2048): the tiles took twice the wall time of their matmuls on 2 cores.
- on the device (the default elsewhere): `jax.lax.top_k` of every tile and of
  its transpose, merged a few tiles at a time.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST

# Host selection: candidates buffered per row (on average) before a merge.
_MERGE_CANDIDATES_PER_ROW = 8

# Device selection: tile results merged into a block's list at a time (one
# top_k for several tiles).
_MERGE_EVERY = 8


def even_blocks(start: int, stop: int, block_size: int) -> list[tuple[int, int, int]]:
  """Splits [start, stop) into ceil(n / block_size) near-equal blocks.

  Returns:
    (start, stop, padded size) per block; sizes are the largest block rounded
    up to a multiple of 8 (one tile shape, little padding).
  """
  n = stop - start
  if n <= 0:
    return []
  count = -(-n // block_size)
  step = -(-n // count)
  size = -(-step // 8) * 8
  return [(s, min(s + step, stop), size) for s in range(start, stop, step)]


def padded_rows(num: int, block_size: int) -> int:
  """Rows `neighbour_pass` reads from its features (N and the last block's padding)."""
  start, _, size = even_blocks(0, num, block_size)[-1]
  return start + size


@jax.jit
def squared_norms(f: jax.Array) -> jax.Array:
  """(B,) squared norms of the rows of f (B, D)."""
  return jnp.sum(f * f, axis=1)


@jax.jit
def _tile_bounded(f_i: jax.Array, sq_i: jax.Array, f_j: jax.Array, sq_j: jax.Array,
                  max_i: jax.Array, max_j: jax.Array, bound_i: jax.Array, bound_j: jax.Array):
  """One tile of the symmetric squared distances, for host selection.

  Args:
    f_i: (B_i, D) features of row block i.
    sq_i: (B_i,) their squared norms, -inf for padding rows (an input:
      computed inside, XLA:CPU would recompute the reduction for every output
      element). Padding entries of the tile are thus -inf, below every row
      maximum, without a select.
    f_j: (B_j, D) features of block j.
    sq_j: (B_j,) their squared norms, -inf for padding rows.
    max_i: (B_i,) running row maxima of block i.
    max_j: (B_j,) those of block j.
    bound_i: (B_i,) bounds of block i's rows (-inf: none wanted).
    bound_j: (B_j,) bounds of block j's rows.

  Returns:
    (max_i updated with the tile's rows, max_j updated with its columns,
    the tile (B_i, B_j), bool (B_i, B_j): real entries below the bound of
    their row or of their column).
  """
  d = sq_i[:, None] + sq_j[None, :] - 2.0 * jnp.matmul(f_i, f_j.T, precision=_HIGHEST)
  below = (d > -jnp.inf) & ((d < bound_i[:, None]) | (d < bound_j[None, :]))
  return jnp.maximum(max_i, d.max(axis=1)), jnp.maximum(max_j, d.max(axis=0)), d, below


@functools.partial(jax.jit, static_argnames=('k', 'same'))
def _tile_top_k(f_i: jax.Array, sq_i: jax.Array, f_j: jax.Array, sq_j: jax.Array,
                n_i: jax.Array, n_j: jax.Array, base_j: jax.Array, base_i: jax.Array,
                max_i: jax.Array, max_j: jax.Array, k: int, same: bool):
  """One tile, for device selection (arguments as `_tile_bounded`).

  Args:
    base_j: index of the first row of block j.
    base_i: index of the first row of block i.
    k: neighbours kept.
    same: whether i == j (the transpose update is skipped).

  Returns:
    ((max_i, neg. distances (B_i, k), indices (B_i, k)), the same for block j
    or None when `same`, the tile (B_i, B_j)).
  """
  d = sq_i[:, None] + sq_j[None, :] - 2.0 * jnp.matmul(f_i, f_j.T, precision=_HIGHEST)
  valid = (jnp.arange(d.shape[0]) < n_i)[:, None] & (jnp.arange(d.shape[1]) < n_j)[None, :]

  def update(row_max, dist, ok, base):
    row_max = jnp.maximum(row_max, jnp.max(jnp.where(ok, dist, -jnp.inf), axis=1))
    v, pos = jax.lax.top_k(jnp.where(ok, -dist, -jnp.inf), min(k, dist.shape[1]))
    return row_max, v, (pos + base).astype(jnp.int32)

  out_i = update(max_i, d, valid, base_j)
  out_j = None if same else update(max_j, d.T, valid.T, base_i)
  return out_i, out_j, d


@functools.partial(jax.jit, static_argnames=('k',))
def _merge_top(vals: tuple[jax.Array, ...], idx: tuple[jax.Array, ...],
               k: int) -> tuple[jax.Array, jax.Array]:
  """Keeps the k largest of several candidate lists, preferring earlier lists on ties."""
  v, pos = jax.lax.top_k(jnp.concatenate(vals, axis=1), k)
  return v, jnp.take_along_axis(jnp.concatenate(idx, axis=1), pos, axis=1)


def _merge(vals: np.ndarray, idx: np.ndarray, rows: np.ndarray, cols: np.ndarray,
           dist: np.ndarray) -> None:
  """Merges candidates into sorted neighbour lists, in place.

  Args:
    vals: (n, k) distances of the lists, increasing (inf: empty slot).
    idx: (n, k) their indices; equal distances are ordered by index.
    rows: (c,) list of each candidate, non-decreasing.
    cols: (c,) index of each candidate: increasing within a row, and above
      every index already in that row's list (what makes a stable sort by
      distance order ties by index).
    dist: (c,) distance of each candidate.
  """
  n, k = vals.shape
  counts = np.bincount(rows, minlength=n)
  hit = np.flatnonzero(counts)
  width = k + int(counts.max())
  slot = np.empty(n, np.intp)
  slot[hit] = np.arange(len(hit))
  cand_v = np.full((len(hit), width), np.inf, np.float32)
  cand_i = np.zeros((len(hit), width), np.int32)
  cand_v[:, :k] = vals[hit]
  cand_i[:, :k] = idx[hit]
  pos = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows] + k
  cand_v[slot[rows], pos] = dist
  cand_i[slot[rows], pos] = cols
  order = np.argsort(cand_v, axis=1, kind='stable')[:, :k]
  vals[hit] = np.take_along_axis(cand_v, order, axis=1)
  idx[hit] = np.take_along_axis(cand_i, order, axis=1)


def _candidates(d: np.ndarray, bound: np.ndarray, k: int):
  """Entries of d below their row's bound that can be among its row's k nearest.

  Where a bound is infinite (list not full), the tile's k-th smallest
  distance of the row (all its ties kept) bounds the candidates instead.

  Returns:
    (rows, columns, distances), in row-major order.
  """
  mask = d < bound[:, None]
  if d.shape[1] > k and not np.isfinite(bound).all():
    kth = np.partition(d, k - 1, axis=1)[:, k - 1]
    mask &= d <= kth[:, None]
  flat = np.flatnonzero(mask)
  r, c = np.divmod(flat, d.shape[1])
  return r, c, d[r, c]


class _HostLists:
  """Neighbour lists selected on the host from bounded tiles.

  Candidates are buffered per block and merged a few tiles at a time (most
  of a merge's work is re-sorting the lists); until then the lists, and the
  bounds taken from them, are a little above the exact k-th distances, which
  only lets a few more candidates through.
  """

  def __init__(self, num: int, k: int, merge_size: int):
    self.k = k
    self.vals = np.full((num, k), np.inf, np.float32)
    self.idx = np.zeros((num, k), np.int32)
    self.merge_size = merge_size
    self.pending = {}  # block start -> (stop, [(rows, cols, dists)], count)

  def bound(self, start: int, stop: int, size: int) -> np.ndarray:
    """(size,) current k-th distances of rows [start, stop); -inf if any is unset.

    -inf asks the tile kernel for no candidates: such a block is selected on
    the host alone (`update`).
    """
    kth = self.vals[start:stop, self.k - 1]
    out = np.full(size, -np.inf, np.float32)
    if np.isfinite(kth).all():
      out[:stop - start] = kth
    return out

  def _add(self, start: int, stop: int, rows: np.ndarray, cols: np.ndarray,
           dists: np.ndarray) -> None:
    """Buffers candidates of rows [start, stop) (rows relative to start, in order)."""
    _, parts, count = self.pending.get(start, (stop, [], 0))
    parts.append((rows, cols, dists))
    self.pending[start] = (stop, parts, count + len(rows))
    if count + len(rows) >= self.merge_size or not np.isfinite(self.vals[start:stop, -1]).all():
      self.flush(start)

  def flush(self, start: int) -> None:
    """Merges the buffered candidates of the block starting at `start`."""
    if start not in self.pending:
      return
    stop, parts, _ = self.pending.pop(start)
    rows, cols, dists = (np.concatenate(x) for x in zip(*parts))
    if len(parts) > 1:  # by row; each row's candidates stay in index order
      order = np.argsort(rows, kind='stable')
      rows, cols, dists = rows[order], cols[order], dists[order]
    if len(rows):
      _merge(self.vals[start:stop], self.idx[start:stop], rows, cols, dists)

  def update(self, d: np.ndarray, below: np.ndarray, rows: tuple[int, int], cols: tuple[int, int],
             bounded: tuple[bool, bool], same: bool) -> None:
    """Adds a tile's candidates to its row block's and column block's lists.

    Args:
      d: the tile (its real part is the leading (n_i, n_j) block).
      below: the kernel's candidate mask (false outside the real part).
      rows: (start, stop) of the row block.
      cols: (start, stop) of the column block.
      bounded: whether the kernel used bounds for the rows, for the columns.
      same: diagonal tile (the column side is the row side).
    """
    (si, ei), (sj, ej) = rows, cols
    if bounded[0] or (bounded[1] and not same):
      flat = np.flatnonzero(below)  # much faster than a 2-D nonzero
      r, c = np.divmod(flat, below.shape[1])
      v = d.reshape(-1)[flat]
    d = d[:ei - si, :ej - sj]
    if bounded[0]:
      keep = v < self.vals[si + r, self.k - 1]  # the current bounds may be tighter
      sel = (r[keep], c[keep], v[keep])
    else:
      sel = _candidates(d, self.vals[si:ei, self.k - 1], self.k)
    self._add(si, ei, sel[0], (sel[1] + sj).astype(np.int32), sel[2])
    if same:
      return
    if bounded[1]:
      keep = v < self.vals[sj + c, self.k - 1]
      c, r, v = c[keep], r[keep], v[keep]
      order = np.argsort(c, kind='stable')
      sel = (c[order], r[order], v[order])
    else:
      sel = _candidates(d.T, self.vals[sj:ej, self.k - 1], self.k)
    self._add(sj, ej, sel[0], (sel[1] + si).astype(np.int32), sel[2])


def neighbour_pass(feats: np.ndarray, num_rows: int, num_query: int, k: int, block_size: int,
                   out: np.ndarray, on_host: Optional[bool] = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row maxima, k nearest neighbours and the query-gallery distances.

  The N rows are split into near-equal blocks of at most `block_size` rows
  (one tile shape: one compilation, little padding).

  Args:
    feats: (M, D) float32 features, queries first, then the gallery, then
      `padded_rows(N, block_size) - N` (or more) rows of any finite values;
      64-byte aligned for the device to share its memory.
    num_rows: N, the number of query and gallery rows.
    num_query: number of queries.
    k: neighbours per row (<= N).
    block_size: rows per block.
    out: (num_query, N - num_query) float32 array receiving the squared
      query-gallery distances.
    on_host: select the neighbours on the host (default: when the features'
      device is a CPU).

  Returns:
    (row_max (N,) float32, nn (N, k) int32 by increasing distance, ties to the
    lower index, nn_dist (N, k) float32 their distances).
  """
  num = num_rows
  blocks = even_blocks(0, num, block_size)
  size = blocks[0][2]
  if feats.shape[0] < padded_rows(num, block_size):
    raise ValueError(f'feats needs {padded_rows(num, block_size)} rows, has {feats.shape[0]}.')
  operands = []
  for start, stop, _ in blocks:
    f = jax.device_put(feats[start:start + size])
    sq = squared_norms(f)
    if on_host is None:
      on_host = f.devices().pop().platform == 'cpu'
    if on_host:  # padding rows: -inf (see _tile_bounded)
      sq = np.array(sq)
      sq[stop - start:] = -np.inf
      sq = jax.device_put(sq)
    operands.append((f, sq))
  maxima = [jax.device_put(np.full(size, -np.inf, np.float32))] * len(blocks)
  row_max = np.empty(num, np.float32)
  last = len(blocks) - 1

  def write_output(bi, bj, tile):
    """Copies the query-gallery part of tile (bi, bj) into `out`."""
    (si, ei, _), (sj, ej, _) = blocks[bi], blocks[bj]
    rows, cols = (si, min(ei, num_query)), (max(sj, num_query), ej)
    if rows[0] < rows[1] and cols[0] < cols[1]:
      out[rows[0]:rows[1], cols[0] - num_query:cols[1] - num_query] = np.asarray(tile)[
          rows[0] - si:rows[1] - si, cols[0] - sj:cols[1] - sj]

  def tiles():
    """Dispatches the tiles in order; yields each one's results after dispatching the
    next (the host works on a tile while the next one is computed)."""
    queue = []
    for bi in range(len(blocks)):
      for bj in range(bi, len(blocks)):
        queue.append((bi, bj, dispatch(bi, bj)))
        if len(queue) > 1:
          yield queue.pop(0)
    yield from queue

  if on_host:
    lists = _HostLists(num, k, _MERGE_CANDIDATES_PER_ROW * size)
    no_bound = np.full(size, -np.inf, np.float32)

    def dispatch(bi, bj):
      (si, ei, _), (sj, ej, _) = blocks[bi], blocks[bj]
      bound_i = lists.bound(si, ei, size)
      bound_j = lists.bound(sj, ej, size) if bj != bi else no_bound
      mi, mj, d, below = _tile_bounded(*operands[bi], *operands[bj], maxima[bi], maxima[bj],
                                       bound_i, bound_j)
      maxima[bi] = mi
      if bj != bi:
        maxima[bj] = mj
      return mi, d, below, (bound_i[0] > -np.inf, bound_j[0] > -np.inf)

    for bi, bj, (mi, d, below, bounded) in tiles():
      (si, ei, _), (sj, ej, _) = blocks[bi], blocks[bj]
      d = np.asarray(d)
      lists.update(d, np.asarray(below), (si, ei), (sj, ej), bounded, bi == bj)
      write_output(bi, bj, d)
      if bj == last:  # block bi has now seen every column block
        lists.flush(si)
        row_max[si:ei] = np.asarray(mi)[:ei - si]
    return row_max, lists.idx, lists.vals

  lists = [([jnp.full((size, k), -jnp.inf, jnp.float32)], [jnp.full((size, k), -1, jnp.int32)])
           for _ in blocks]

  def add(b, vals, idx, final=False):
    lists[b][0].append(vals)
    lists[b][1].append(idx)
    if final or len(lists[b][0]) > _MERGE_EVERY:
      merged = _merge_top(tuple(lists[b][0]), tuple(lists[b][1]), k)
      lists[b] = ([merged[0]], [merged[1]])

  def dispatch(bi, bj):  # pylint: disable=function-redefined
    (si, ei, _), (sj, ej, _) = blocks[bi], blocks[bj]
    out_i, out_j, tile = _tile_top_k(*operands[bi], *operands[bj], ei - si, ej - sj, sj, si,
                                     maxima[bi], maxima[bj], k, bj == bi)
    maxima[bi] = out_i[0]
    add(bi, *out_i[1:], final=bj == last)
    if bj != bi:
      maxima[bj] = out_j[0]
      add(bj, *out_j[1:])
    return out_i[0], tile, lists[bi] if bj == last else None

  nn = np.empty((num, k), np.int32)
  nn_dist = np.empty((num, k), np.float32)
  for bi, bj, (mi, tile, final) in tiles():
    si, ei, _ = blocks[bi]
    write_output(bi, bj, tile)
    if bj == last:
      (vals,), (idx,) = final
      lists[bi] = None
      nn[si:ei] = np.asarray(idx)[:ei - si]
      nn_dist[si:ei] = -np.asarray(vals)[:ei - si]
      row_max[si:ei] = np.asarray(mi)[:ei - si]
  return row_max, nn, nn_dist
