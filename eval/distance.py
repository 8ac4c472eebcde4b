"""Query-gallery distance matrices, computed in row blocks with JAX.

All computations are float32 with HIGHEST matmul precision (no TF32/bf16
passes on GPU/TPU). The results are numpy arrays on the host, assembled from
(block_size, num_gallery) blocks so the device never holds more than one block
of the output at a time beyond the inputs.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any

_HIGHEST = jax.lax.Precision.HIGHEST


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.float32,
                  alignment: int = 64) -> np.ndarray:
  """Uninitialised C-contiguous numpy array whose data is `alignment`-aligned.

  On the CPU backend `jax.device_put` of a suitably aligned array shares its
  memory instead of copying it, which matters for large distance matrices.

  Args:
    shape: array shape.
    dtype: element type.
    alignment: byte alignment of the first element.

  Returns:
    The array (a view of a slightly larger uint8 buffer).
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buf = np.empty(nbytes + alignment, np.uint8)
  offset = (-buf.ctypes.data) % alignment
  return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def l2_normalize(x: ArrayLike, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Scales vectors to unit L2 norm, as torch.nn.functional.normalize.

  Args:
    x: array of features.
    axis: axis holding the feature dimension.
    eps: lower bound of the norm (zero vectors stay zero).

  Returns:
    float32 jax array `x / max(||x||, eps)`.
  """
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


@functools.partial(jax.jit, static_argnames=('squared',))
def _euclidean_block(q: jax.Array, g: jax.Array, g_sq: jax.Array, squared: bool) -> jax.Array:
  """(B, G) euclidean distances of a block of queries to all gallery rows."""
  q_sq = jnp.sum(q * q, axis=1, keepdims=True)
  d = q_sq + g_sq[None, :] - 2.0 * jnp.matmul(q, g.T, precision=_HIGHEST)
  if squared:
    return d
  return jnp.sqrt(jnp.maximum(d, 0.0))


@jax.jit
def _cosine_block(q: jax.Array, g_normed: jax.Array) -> jax.Array:
  """(B, G) cosine distances of a block of queries to normalised gallery rows."""
  return 1.0 - jnp.matmul(l2_normalize(q), g_normed.T, precision=_HIGHEST)


def _check_features(q: ArrayLike, g: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Returns (q, g) as float32 2-D jax arrays with the same feature size."""
  q = jnp.asarray(q, jnp.float32)
  g = jnp.asarray(g, jnp.float32)
  if q.ndim != 2 or g.ndim != 2:
    raise ValueError(f'Features must be 2-D (num, dim), got shapes {q.shape} and {g.shape}.')
  if q.shape[1] != g.shape[1]:
    raise ValueError(f'Feature dimensions differ: {q.shape[1]} vs {g.shape[1]}.')
  return q, g


def _blockwise(fn, q: jax.Array, block_size: int, *args) -> np.ndarray:
  """Applies `fn(q_block, *args)` over row blocks of `q` into a host array."""
  if block_size < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  num_q = q.shape[0]
  out = None
  for start in range(0, num_q, block_size):
    stop = min(start + block_size, num_q)
    block = q[start:stop]
    if stop - start < block_size and num_q > block_size:
      block = jnp.pad(block, ((0, block_size - (stop - start)), (0, 0)))
    res = np.asarray(fn(block, *args))[:stop - start]
    if out is None:
      out = aligned_empty((num_q, res.shape[1]), res.dtype)
    out[start:stop] = res
  if out is None:
    out = np.empty((0, args[0].shape[0]), np.float32)
  return out


def euclidean_distance(q_feats: ArrayLike, g_feats: ArrayLike, *, squared: bool = True,
                       block_size: int = 1024) -> np.ndarray:
  """Euclidean distance matrix `|q|^2 + |g|^2 - 2 q g^T` (squared by default).

  The squared form is the BoT baseline's and torchreid's 'euclidean'
  `compute_distance_matrix` (not clipped at 0, as theirs). With
  `squared=False` the square root of the distances clipped at 0 is returned.

  Args:
    q_feats: (Q, D) query features.
    g_feats: (G, D) gallery features.
    squared: return squared distances.
    block_size: query rows per block.

  Returns:
    (Q, G) float32 numpy array.
  """
  q, g = _check_features(q_feats, g_feats)
  g_sq = jnp.sum(g * g, axis=1)
  return _blockwise(lambda b, gg, gs: _euclidean_block(b, gg, gs, squared), q, block_size,
                    g, g_sq)


def cosine_distance(q_feats: ArrayLike, g_feats: ArrayLike, *,
                    block_size: int = 1024) -> np.ndarray:
  """Cosine distance matrix `1 - cos(q, g)` (torchreid's 'cosine').

  Args:
    q_feats: (Q, D) query features.
    g_feats: (G, D) gallery features.
    block_size: query rows per block.

  Returns:
    (Q, G) float32 numpy array.
  """
  q, g = _check_features(q_feats, g_feats)
  return _blockwise(_cosine_block, q, block_size, l2_normalize(g))
