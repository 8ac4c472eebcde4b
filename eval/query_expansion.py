"""Average (alpha-weighted) query expansion, as fast-reid's `aqe`.

fast-reid (`fastreid/evaluation/query_expansion.py`, after PyRetri): query and
gallery features are pooled; for `qe_times` rounds, each feature is replaced by
the mean over its `qe_k` most cosine-similar features (itself included, as
its own nearest) of `feature * similarity ** alpha`, where the features are
the current (unnormalised) ones and the similarities those of their L2
normalisations. The returned features are not normalised.

Here the similarity rows are computed a block of rows at a time and reduced
to running top-k lists over column blocks (JAX), so no N x N matrix exists:
memory is O(N * D) for N = Q + G features. fast-reid picks the neighbours
with `np.argpartition`, whose choice among equal similarities at the k-th
place is unspecified; here ties go to the lower index (queries first).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eval import distance as distance_lib

ArrayLike = Any

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=('k',))
def _top_similar(rows: jax.Array, cols: jax.Array, base: jax.Array, vals: jax.Array,
                 idx: jax.Array, num_valid: jax.Array, k: int):
  """Merges a column block into the running k most similar columns of `rows`."""
  sims = jnp.matmul(rows, cols.T, precision=_HIGHEST)
  lane = jnp.arange(cols.shape[0], dtype=jnp.int32)
  sims = jnp.where((lane < num_valid)[None], sims, -jnp.inf)
  v, p = jax.lax.top_k(sims, min(k, cols.shape[0]))
  # Earlier column blocks first: on ties the lower index wins.
  v, pos = jax.lax.top_k(jnp.concatenate([vals, v], axis=1), k)
  i = jnp.take_along_axis(jnp.concatenate([idx, base + p.astype(jnp.int32)], axis=1), pos,
                          axis=1)
  return v, i


@functools.partial(jax.jit, static_argnames=('alpha',))
def _weighted_mean(feats: jax.Array, vals: jax.Array, idx: jax.Array, alpha: float):
  """mean_k(feats[idx[:, k]] * vals[:, k] ** alpha) for a block of rows."""
  weights = jnp.power(vals, alpha)
  return jnp.einsum('bk,bkd->bd', weights, feats[idx], precision=_HIGHEST) / vals.shape[1]


def aqe(q_feats: ArrayLike,
        g_feats: ArrayLike,
        qe_times: int = 1,
        qe_k: int = 10,
        alpha: float = 3.0,
        *,
        block_size: int = 256,
        column_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """fast-reid's alpha-weighted average query expansion, blocked.

  Args:
    q_feats: (Q, D) query features.
    g_feats: (G, D) gallery features.
    qe_times: number of expansion rounds (0: features returned unchanged).
    qe_k: neighbours averaged per feature (itself included), 1 <= qe_k <= Q + G.
    alpha: exponent of the cosine-similarity weights (fast-reid: 3.0).
    block_size: rows per block.
    column_block: columns per similarity block (memory: block_size x
      column_block floats).

  Returns:
    (expanded query features (Q, D), expanded gallery features (G, D)),
    float32 numpy arrays.

  Raises:
    ValueError: for malformed features or out-of-range parameters.
  """
  q = np.asarray(q_feats, np.float32)
  g = np.asarray(g_feats, np.float32)
  distance_lib.check_feature_shapes(q.shape, g.shape)
  num = q.shape[0] + g.shape[0]
  if int(qe_times) < 0:
    raise ValueError(f'qe_times must be >= 0, got {qe_times}.')
  if not 1 <= int(qe_k) <= num:
    raise ValueError(f'qe_k must be in [1, {num}] (number of features), got {qe_k}.')
  if int(block_size) < 1 or int(column_block) < 1:
    raise ValueError(f'block_size and column_block must be >= 1, got {block_size}, '
                     f'{column_block}.')
  k = int(qe_k)
  bs, cb = min(int(block_size), num), min(int(column_block), num)
  feats = jnp.asarray(np.concatenate([q, g]))
  if not bool(jnp.isfinite(feats).all()):
    raise ValueError('Features contain NaN or infinite values.')
  for _ in range(int(qe_times)):
    normed = distance_lib.l2_normalize(feats)
    padded = jnp.pad(normed, ((0, -num % bs), (0, 0)))
    padded_cols = jnp.pad(normed, ((0, -num % cb), (0, 0)))
    out = []
    for start in range(0, num, bs):
      rows = distance_lib.row_block(padded, jnp.int32(start), bs)
      vals = jnp.full((bs, k), -jnp.inf, jnp.float32)
      idx = jnp.zeros((bs, k), jnp.int32)
      for c0 in range(0, num, cb):
        vals, idx = _top_similar(rows, distance_lib.row_block(padded_cols, jnp.int32(c0), cb),
                                 jnp.int32(c0), vals, idx, jnp.int32(min(cb, num - c0)), k=k)
      out.append(_weighted_mean(feats, vals, idx, float(alpha)))
    feats = jnp.concatenate(out)[:num]
  result = np.asarray(feats)
  return result[:q.shape[0]], result[q.shape[0]:]
