"""Query-gallery distances, computed in blocks with JAX; the list of distances.

All computations are float32 with HIGHEST matmul precision (no TF32/bf16
passes on GPU/TPU). The dense matrices are numpy arrays on the host, assembled
from (block_size, num_gallery) blocks so the device never holds more than one
block of the output at a time beyond the inputs; `distance_tile` is the
(query block x gallery block) kernel of the streamed metrics.

`DISTANCES` is the one list of the distances the evaluation accepts
(metrics, re-ranking, reports): 'euclidean' is the *squared* Euclidean
distance of the BoT baseline and torchreid, 'cosine' is 1 - cos.

Dense forms (a Q x G matrix on the host) are refused above a memory limit
with `MemoryLimitError`, which says how much memory the computation would need.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.choices import check_choice  # the project's one choice check

ArrayLike = Any

_HIGHEST = jax.lax.Precision.HIGHEST

DISTANCES = ('euclidean', 'cosine')
# Default limit of the dense computations (distance matrices, re-ranking).
DEFAULT_MAX_DENSE_BYTES = 16 * 2**30


class MemoryLimitError(MemoryError):
  """A dense computation would need more memory than its limit allows."""


def check_distance(distance: str) -> str:
  """Returns `distance` if it is one of `DISTANCES`, raising ValueError otherwise."""
  check_choice('distance', distance, DISTANCES)
  return distance


def check_memory(what: str, needed_bytes: int, max_bytes: Optional[int], hint: str = '') -> None:
  """Refuses a dense computation whose memory estimate exceeds `max_bytes`.

  Args:
    what: the computation and its size, for the message.
    needed_bytes: estimated peak memory of the computation.
    max_bytes: the limit (None: no limit).
    hint: what to do instead, appended to the message.

  Raises:
    MemoryLimitError: when needed_bytes > max_bytes.
  """
  if max_bytes is not None and needed_bytes > max_bytes:
    raise MemoryLimitError(
        f'{what} would need about {needed_bytes / 2**30:.2f} GiB, more than the limit of '
        f'{max_bytes / 2**30:.2f} GiB (max_bytes); refusing to start it.' +
        (f' {hint}' if hint else ''))


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


@functools.partial(jax.jit, static_argnames=('distance',))
def prepare_rows(x: jax.Array, distance: str) -> tuple[jax.Array, jax.Array]:
  """Per-row operands of `distance_tile`, computed once per block of rows.

  Kept out of the tile kernel on purpose: XLA:CPU fuses a row reduction into
  the elementwise epilogue of the matmul and recomputes it for every output
  element (+40% time on a 512 x 512 x 2048 tile).

  Args:
    x: (B, D) float32 features.
    distance: one of `DISTANCES` (static).

  Returns:
    euclidean: (x, squared norms (B,)); cosine: (x / max(|x|, 1e-12), zeros (B,)).
  """
  if distance == 'euclidean':
    return x, jnp.sum(x * x, axis=1)
  return l2_normalize(x), jnp.zeros(x.shape[0], jnp.float32)


@functools.partial(jax.jit, static_argnames=('distance',))
def distance_tile(q: jax.Array, q_aux: jax.Array, g: jax.Array, g_aux: jax.Array,
                  distance: str) -> jax.Array:
  """(B, C) distances of a block of queries to a block of gallery rows.

  Each entry depends only on its query and gallery rows (verified bitwise on
  XLA:CPU for a fixed tile shape, whatever the other rows hold), which the
  streamed metrics rely on to compare distances computed in different tiles.

  Args:
    q: (B, D) query operand of `prepare_rows`.
    q_aux: (B,) its second output.
    g: (C, D) gallery operand of `prepare_rows`.
    g_aux: (C,) its second output.
    distance: one of `DISTANCES` (static).

  Returns:
    (B, C) float32: squared Euclidean `|q|^2 + |g|^2 - 2 q.g` (as
    `euclidean_distance`) or cosine `1 - cos(q, g)` (as `cosine_distance`).
  """
  dot = jnp.matmul(q, g.T, precision=_HIGHEST)
  if distance == 'euclidean':
    return q_aux[:, None] + g_aux[None, :] - 2.0 * dot
  return 1.0 - dot


def check_feature_shapes(q_shape: tuple[int, ...], g_shape: tuple[int, ...], *,
                         nonempty: bool = False) -> None:
  """The check of query and gallery features every eval module makes.

  Args:
    q_shape: shape of the query features.
    g_shape: shape of the gallery features.
    nonempty: also refuse an empty query set or gallery.

  Raises:
    ValueError: unless both are (num, dim) with the same dim (and rows, when
      `nonempty`), naming the shapes.
  """
  q_shape, g_shape = tuple(q_shape), tuple(g_shape)
  if len(q_shape) != 2 or len(g_shape) != 2:
    raise ValueError(f'Features must be 2-D (num, dim), got shapes {q_shape} and {g_shape}.')
  if q_shape[1] != g_shape[1]:
    raise ValueError(f'Feature dimensions differ: {q_shape[1]} vs {g_shape[1]}.')
  if nonempty and q_shape[0] == 0:
    raise ValueError('Empty query set: q_feats has no rows.')
  if nonempty and g_shape[0] == 0:
    raise ValueError('Empty gallery: g_feats has no rows.')


def _check_features(q: ArrayLike, g: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Returns (q, g) as float32 2-D jax arrays with the same feature size."""
  q = jnp.asarray(q, jnp.float32)
  g = jnp.asarray(g, jnp.float32)
  check_feature_shapes(q.shape, g.shape)
  return q, g


def _blockwise(q: jax.Array, g: jax.Array, distance: str, block_size: int,
               post=None) -> np.ndarray:
  """Dense (Q, G) host matrix of `distance_tile` over row blocks of `q`."""
  if block_size < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  num_q = q.shape[0]
  out = aligned_empty((num_q, g.shape[0]), np.float32)
  g_ops = prepare_rows(g, distance)
  for start in range(0, num_q, block_size):
    stop = min(start + block_size, num_q)
    block = q[start:stop]
    if stop - start < block_size and num_q > block_size:
      block = jnp.pad(block, ((0, block_size - (stop - start)), (0, 0)))
    res = distance_tile(*prepare_rows(block, distance), *g_ops, distance)
    out[start:stop] = np.asarray(res if post is None else post(res))[:stop - start]
  return out


@jax.jit
def _sqrt_clipped(d: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(d, 0.0))


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
  return _blockwise(q, g, 'euclidean', block_size, None if squared else _sqrt_clipped)


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
  return _blockwise(q, g, 'cosine', block_size)


def dense_bytes(num_query: int, num_gallery: int) -> int:
  """Bytes of a (num_query, num_gallery) float32 distance matrix."""
  return 4 * int(num_query) * int(num_gallery)


def distance_matrix(q_feats: ArrayLike, g_feats: ArrayLike, distance: str = 'euclidean', *,
                    max_bytes: Optional[int] = DEFAULT_MAX_DENSE_BYTES,
                    block_size: int = 1024) -> np.ndarray:
  """The dense (Q, G) distance matrix of one of `DISTANCES`, within a memory limit.

  For what needs the dense matrix (the CUHK03 protocol, reports on a distance
  matrix); CMC/mAP/mINP at any size come from `eval.metrics.evaluate_features`.

  Args:
    q_feats: (Q, D) query features.
    g_feats: (G, D) gallery features.
    distance: 'euclidean' (squared) or 'cosine'.
    max_bytes: refuse when the float32 matrix would exceed this many bytes
      (None: no limit).
    block_size: query rows per block.

  Returns:
    (Q, G) float32 numpy array.

  Raises:
    ValueError: for an unknown distance or malformed features.
    MemoryLimitError: above `max_bytes`.
  """
  check_distance(distance)
  num_q, num_g = int(np.shape(q_feats)[0]), int(np.shape(g_feats)[0])
  check_memory(f'A dense {num_q} x {num_g} {distance} distance matrix',
               dense_bytes(num_q, num_g), max_bytes,
               'Use eval.metrics.evaluate_features for CMC/mAP/mINP at this size.')
  if distance == 'euclidean':
    return euclidean_distance(q_feats, g_feats, block_size=block_size)
  return cosine_distance(q_feats, g_feats, block_size=block_size)


@functools.partial(jax.jit, static_argnames=('size',))
def row_block(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """x[start:start + size] with a traced start (one compilation for all blocks).

  `x` must have at least start + size rows (pad it first).
  """
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)
