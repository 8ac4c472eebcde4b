"""The CUHK03 single-gallery-shot protocol (torchreid's `eval_cuhk03`).

For each query, each of `num_repeats` draws samples one gallery entry per
gallery identity (among the entries kept by the Market protocol: same pid and
same camera removed; for the query's own identity, one of its positives), and
the CMC is the rank of the drawn positive among the drawn entries, averaged
over draws and queries.

torchreid draws with numpy's global RNG, a loop per query; here the random
numbers come from a counter-based hash of (seed, repeat, query index, slot), so
a draw is a pure function of those indices: it does not depend on the blocking
nor on which other queries are evaluated, and a run is reproducible from
`seed` alone. The figures therefore differ from torchreid's draw by draw but
follow the same distribution (tested to be uniform per identity).

`eval.metrics.rank_distances(..., protocol='cuhk03')` (and `evaluate`) use these
draws on a dense distance matrix; AP and mINP come from the whole kept gallery, as
torchreid's.
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eval import protocol

ArrayLike = Any


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
def drawn_ranks(dist_rows: jax.Array, sel: jax.Array, pos: jax.Array) -> jax.Array:
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
  q_pids, g_pids = protocol.as_1d('q_pids', q_pids), protocol.as_1d('g_pids', g_pids)
  qp, gp, qc, gc = protocol.label_codes(q_pids, g_pids,
                                        protocol.as_1d('q_camids', q_camids),
                                        protocol.as_1d('g_camids', g_camids))
  pos_q, pos_g = protocol.positive_pairs(qp, gp, qc, gc)
  queries = np.unique(pos_q)
  if len(queries) == 0:
    raise ValueError('No query has a valid match in the gallery.')
  sels = [np.asarray(sel)[:, :n] for _, n, sel, _ in cuhk03_draws(
      qp, gp, pos_q, pos_g, queries, num_repeats, seed, int(block_size))]
  return queries, np.concatenate(sels, axis=1)



def cuhk03_cmc(fetch_rows: Callable[[np.ndarray], jax.Array], qp: np.ndarray, gp: np.ndarray,
               pos_q: np.ndarray, pos_g: np.ndarray, queries: np.ndarray, max_rank: int,
               num_repeats: int, seed: int, block_size: int) -> np.ndarray:
  """Mean single-gallery-shot CMC over `num_repeats` draws.

  Args:
    fetch_rows: returns the (B, G) distance rows of the given query indices as
      a device array (the only part of the distance matrix read at a time).
    qp: (Q,) query pid codes.
    gp: (G,) gallery pid codes.
    pos_q: (T,) query index of each positive pair (sorted by query).
    pos_g: (T,) gallery index of each positive pair.
    queries: indices of the queries with at least one positive.
    max_rank: length of the curve.
    num_repeats: number of draws (>= 1).
    seed: seed of the draws.
    block_size: queries per block.

  Returns:
    (max_rank,) float64 CMC.
  """
  if int(num_repeats) < 1:
    raise ValueError(f'num_repeats must be >= 1, got {num_repeats}.')
  hits = np.zeros(max_rank + 1, np.int64)
  for block, n, sel, pos in cuhk03_draws(qp, gp, pos_q, pos_g, queries, int(num_repeats),
                                         seed, int(block_size)):
    r = np.asarray(drawn_ranks(fetch_rows(block), sel, pos))[:, :n].reshape(-1)
    hits += np.bincount(np.minimum(r, max_rank), minlength=max_rank + 1)
  return np.cumsum(hits[:max_rank]) / (len(queries) * int(num_repeats))
