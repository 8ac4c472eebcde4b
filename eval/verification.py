"""Verification metric of fast-reid: TPR at fixed FPR over query-gallery pairs.

Definition (fast-reid `fastreid/evaluation/roc.py` and `reid_evaluation.py`):
every (query, gallery) pair that the Market protocol keeps (same pid *and*
same camera removed) is scored by its distance; pairs of the same identity
("genuine") get label 0, the others ("impostors") label 1, and
`sklearn.metrics.roc_curve(labels, distances)` is evaluated; for each target
FPR f in (1e-4, 1e-3, 1e-2) the reported value is `tpr[argmin |fpr - f|]`.
Note the orientation: with impostors as sklearn's positive class and the
distance as score, "FPR" is the fraction of genuine pairs at or above the
threshold and "TPR" the fraction of impostor pairs at or above it (impostors
rejected while a fraction f of the genuine pairs is rejected). Queries
without a genuine match contribute their impostor pairs, as in fast-reid.

No pair list is built and nothing is sorted. sklearn's curve has one point per
distinct distance (in decreasing order) with (fps, tps) = (#genuine >= t,
#impostors >= t), minus the points `drop_intermediate` removes (equal second
differences), plus a first point (0, 0). The points that can win the argmin
are the first point and, per distinct genuine distance v, the curve's first
point with fps = #genuine >= v, which is v's own point whenever it is kept.
Whether it is kept, and its tps, depend only on counts of impostors equal to
and greater than each genuine distance (and on whether impostor distances lie
between consecutive genuine distances), which `impostor_counts` accumulates a
block of distances at a time (jitted, bounded memory: any matrix size).
`tpr_from_counts` then reproduces sklearn + argmin exactly (ties included).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eval import protocol

ArrayLike = Any

FAST_REID_FPRS = (1e-4, 1e-3, 1e-2)


@jax.jit
def impostor_counts(dist: jax.Array, impostor: jax.Array, values: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Counts impostor distances against sorted genuine distances.

  Args:
    dist: (B, G) distances.
    impostor: (B, G) bool, which entries are impostor pairs.
    values: (U,) distinct genuine distances, ascending.

  Returns:
    (below, equal): (U + 1,) int32 `below[i]` = number of impostors with
    exactly i genuine values below them (searchsorted 'left' position i), and
    (U + 1,) int32 `equal[i]` = number of impostors equal to values[i] (last
    entry unused).
  """
  num = values.shape[0]
  d = dist.reshape(-1)
  imp = impostor.reshape(-1).astype(jnp.int32)
  pos = jnp.searchsorted(values, d, side='left').astype(jnp.int32)
  eq = imp * (values[jnp.minimum(pos, num - 1)] == d).astype(jnp.int32)
  below = jnp.zeros(num + 1, jnp.int32).at[pos].add(imp)
  equal = jnp.zeros(num + 1, jnp.int32).at[pos].add(eq)
  return below, equal


def tpr_from_counts(values: np.ndarray, genuine: np.ndarray, below: np.ndarray,
                    equal: np.ndarray, fprs: Sequence[float] = FAST_REID_FPRS
                    ) -> dict[float, float]:
  """fast-reid's TPR@FPR from genuine distances and impostor counts.

  Args:
    values: (U,) distinct genuine distances, ascending.
    genuine: (U,) number of genuine pairs at each value.
    below: (U + 1,) int64 totals of `impostor_counts`'s first output.
    equal: (U + 1,) int64 totals of its second output.
    fprs: target false positive rates.

  Returns:
    {fpr: tpr} as sklearn.metrics.roc_curve(labels, distances) followed by
    `tpr[argmin(|fpr_curve - fpr|)]` gives them (see the module docstring).

  Raises:
    ValueError: without genuine or without impostor pairs (the curve is
      undefined; sklearn returns NaN with a warning).
  """
  genuine = np.asarray(genuine, np.int64)
  below = np.asarray(below, np.int64)
  equal = np.asarray(equal, np.int64)[:len(values)]
  num_gen, num_imp = int(genuine.sum()), int(below.sum())
  if num_gen == 0 or num_imp == 0:
    raise ValueError(f'TPR@FPR needs genuine and impostor pairs; got {num_gen} genuine '
                     f'and {num_imp} impostor pairs.')
  # Ascending value index u. Impostors above values[u]: those with more than u
  # genuine values below them; strictly between values[u - 1] and values[u]
  # (below values[0] for u = 0): those with exactly u below, minus the equal.
  greater = np.cumsum(below[::-1])[::-1][1:]
  between = below[:-1] - equal
  fps = np.cumsum(genuine[::-1])[::-1]  # genuine pairs >= values[u]
  tps = greater + equal  # impostor pairs >= values[u]
  # sklearn keeps a point whose (fps, tps) steps in and out differ, and the
  # first and last points. A value followed by impostor-only points (between > 0)
  # has a zero fps step out, so it is kept; otherwise its step out is the next
  # lower value's step in, (genuine[u - 1], equal[u - 1]).
  kept = between > 0
  kept[1:] |= (genuine[1:] != genuine[:-1]) | (equal[1:] != equal[:-1])
  kept[0] = True  # the last point, or followed by impostor-only points
  kept[-1] |= greater[-1] == 0  # the first point overall
  order = np.nonzero(kept)[0][::-1]  # curve order: decreasing distance
  fpr_curve = np.concatenate([[0], fps[order]]).astype(np.float64) / num_gen
  tpr_curve = np.concatenate([[0], tps[order]]).astype(np.float64) / num_imp
  return {float(f): float(tpr_curve[np.argmin(np.abs(fpr_curve - f))]) for f in fprs}


def genuine_table(genuine_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(distinct genuine distances ascending, their multiplicities)."""
  values, counts = np.unique(np.asarray(genuine_dist), return_counts=True)
  return values, counts


@jax.jit
def _impostor_mask(q_pid: jax.Array, q_code: jax.Array, g_pid: jax.Array,
                   g_code: jax.Array, valid_rows: jax.Array) -> jax.Array:
  """(B, G) impostor pairs: kept (code differs), pid differs, real query row."""
  return ((g_code[None] != q_code[:, None]) & (g_pid[None] != q_pid[:, None]) &
          valid_rows[:, None])


def tpr_at_fpr(distmat: ArrayLike,
               q_pids: ArrayLike,
               g_pids: ArrayLike,
               q_camids: ArrayLike,
               g_camids: ArrayLike,
               fprs: Sequence[float] = FAST_REID_FPRS,
               *,
               block_size: int = 128) -> dict[float, float]:
  """fast-reid's TPR at the given FPRs from a query-gallery distance matrix.

  Rows are read `block_size` at a time; memory beyond the matrix is
  O(block_size * G + number of genuine pairs).

  Args:
    distmat: (Q, G) distances (numpy or jax array), compared in float32.
    q_pids: (Q,) query identities.
    g_pids: (G,) gallery identities.
    q_camids: (Q,) query cameras.
    g_camids: (G,) gallery cameras.
    fprs: target FPRs (fast-reid: 1e-4, 1e-3, 1e-2).
    block_size: query rows per block.

  Returns:
    {fpr: tpr}.

  Raises:
    ValueError: on mismatched shapes, NaN distances, or without genuine or
      impostor pairs.
  """
  shape = tuple(np.shape(distmat))
  if len(shape) != 2:
    raise ValueError(f'distmat must be 2-D (num_query, num_gallery), got shape {shape}.')
  if int(block_size) < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  num_q, num_g = shape
  labels = [protocol.as_1d(n, v) for n, v in (('q_pids', q_pids), ('g_pids', g_pids),
                                              ('q_camids', q_camids),
                                              ('g_camids', g_camids))]
  for name, arr, n in zip(('q_pids', 'g_pids', 'q_camids', 'g_camids'), labels,
                          (num_q, num_g, num_q, num_g)):
    if len(arr) != n:
      raise ValueError(f'Length mismatch: distmat has shape {shape} but {name} has '
                       f'{len(arr)} entries.')
  qp, gp, qc, gc = protocol.label_codes(*labels)
  q_code, g_code = protocol.pid_cam_codes(qp, gp, qc, gc)
  pos_q, pos_g = protocol.positive_pairs(qp, gp, qc, gc)
  is_jax = isinstance(distmat, jax.Array)
  host = None if is_jax else np.asarray(distmat)
  if (bool(jnp.isnan(distmat).any()) if is_jax else
      (host.dtype.kind == 'f' and np.isnan(host.sum()) and np.isnan(host).any())):
    raise ValueError('distmat contains NaN distances.')
  gen = (np.asarray(distmat[jnp.asarray(pos_q), jnp.asarray(pos_g)]) if is_jax
         else host[pos_q, pos_g]).astype(np.float32)
  values, genuine = genuine_table(gen)
  if len(values) == 0:
    raise ValueError('TPR@FPR needs genuine pairs (same identity, different camera); '
                     'there are none.')
  dev_values = jnp.asarray(values)
  g_pid_d, g_code_d = jnp.asarray(gp), jnp.asarray(g_code)
  bs = int(block_size)
  below = np.zeros(len(values) + 1, np.int64)
  equal = np.zeros(len(values) + 1, np.int64)
  pending = []
  for start in range(0, num_q, bs):
    stop = min(start + bs, num_q)
    rows = np.arange(start, stop)
    pad = bs - len(rows) if num_q > bs else 0
    rows = np.pad(rows, (0, pad), mode='edge')
    block = (distmat[jnp.asarray(rows)] if is_jax else
             jax.device_put(np.ascontiguousarray(host[rows], np.float32)))
    block = block.astype(jnp.float32)
    valid = np.arange(len(rows)) < stop - start
    mask = _impostor_mask(jnp.asarray(qp[rows]), jnp.asarray(q_code[rows]), g_pid_d,
                          g_code_d, jnp.asarray(valid))
    pending.append(impostor_counts(block, mask, dev_values))
  for b, e in pending:
    below += np.asarray(b, np.int64)
    equal += np.asarray(e, np.int64)
  return tpr_from_counts(values, genuine, below, equal, fprs)
