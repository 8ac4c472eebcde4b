"""Building blocks of the Market re-ID protocol shared by the metric modules.

The Market protocol (torchreid's `eval_market1501`, the BoT baseline's
`eval_func`): for each query the gallery entries with the query's pid *and*
camera are removed ("junk"); the remaining entries with the query's pid are the
positives. CMC, AP and INP of a query depend only on the 0-based ranks of its
positives among the kept gallery entries, which is what both the dense
(`eval.metrics.evaluate`) and the streamed (`eval.feature_metrics`) paths
compute before reducing them here, into the `RankingMetrics` both return.
"""

import dataclasses
from typing import Any, Optional

import numpy as np

ArrayLike = Any


@dataclasses.dataclass(frozen=True)
class RankingMetrics:
  """Metrics of a ranking: the mean ones and those of each query.

  Returned by `eval.metrics.rank_distances` (a distance matrix),
  `eval.feature_metrics.rank_features` (features, streamed) and
  `reid_jax.multihost_eval.rank_sharded` (features, across processes).

  Attributes:
    cmc: (min(max_rank, G),) float32 CMC.
    mAP: mean average precision over the queries with a positive.
    mINP: mean inverse negative penalty over the same queries.
    query: indices of the queries with at least one positive, ascending.
    ap: float64 AP of each of them.
    inp: float64 INP of each of them.
    first_rank: 0-based rank of each one's first positive among kept entries.
    tpr_at_fpr: {fpr: tpr} (fast-reid's verification metric), or None.
  """
  cmc: np.ndarray
  mAP: float  # pylint: disable=invalid-name
  mINP: float  # pylint: disable=invalid-name
  query: np.ndarray
  ap: np.ndarray
  inp: np.ndarray
  first_rank: np.ndarray
  tpr_at_fpr: Optional[dict[float, float]] = None


def ranking_metrics(query: np.ndarray, ap: np.ndarray, inp: np.ndarray,
                    first_rank: np.ndarray, max_rank: int, *,
                    cmc: Optional[np.ndarray] = None,
                    tpr_at_fpr: Optional[dict[float, float]] = None) -> RankingMetrics:
  """The `RankingMetrics` of per-query results given in ascending query order.

  Args:
    query: indices of the queries with a positive, ascending.
    ap: their AP.
    inp: their INP.
    first_rank: their first positive's 0-based rank.
    max_rank: length of the CMC (`cmc_from_first_ranks`).
    cmc: another protocol's CMC (CUHK03's single-gallery-shot draws) in place of
      the Market CMC of `first_rank`.
    tpr_at_fpr: the TPR@FPR results, if computed.

  Returns:
    The `RankingMetrics`; mAP and mINP are the means of `ap` and `inp` (in that
    order: the same bits as any other mean of them in query order).
  """
  if cmc is None:
    cmc = cmc_from_first_ranks(first_rank, max_rank)
  return RankingMetrics(cmc=np.asarray(cmc).astype(np.float32), mAP=float(np.mean(ap)),
                        mINP=float(np.mean(inp)), query=query, ap=ap, inp=inp,
                        first_rank=first_rank, tpr_at_fpr=tpr_at_fpr)


def as_1d(name: str, values: ArrayLike) -> np.ndarray:
  """Returns `values` as a 1-D numpy array, raising ValueError otherwise."""
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {arr.shape}.')
  return arr


def dense_codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def label_codes(q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                g_camids: np.ndarray) -> tuple[np.ndarray, ...]:
  """(q pid, g pid, q camera, g camera) int32 codes (`dense_codes` of each pair)."""
  qp, gp = dense_codes(q_pids, g_pids)
  qc, gc = dense_codes(q_camids, g_camids)
  return qp, gp, qc, gc


def pid_cam_codes(qp: np.ndarray, gp: np.ndarray, qc: np.ndarray,
                  gc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Shared int32 codes of the (pid, camera) pairs of queries and gallery.

  Args:
    qp: (Q,) query pid codes (non-negative ints).
    gp: (G,) gallery pid codes.
    qc: (Q,) query camera codes.
    gc: (G,) gallery camera codes.

  Returns:
    (q_code, g_code): equal exactly where pid and camera are both equal, i.e.
    where a gallery entry is junk for a query.
  """
  num_cams = int(max(qc.max(initial=0), gc.max(initial=0))) + 1
  return dense_codes(qp.astype(np.int64) * num_cams + qc, gp.astype(np.int64) * num_cams + gc)


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


def num_kept(q_code: np.ndarray, g_code: np.ndarray) -> np.ndarray:
  """Number of kept (non-junk) gallery entries of each query.

  Args:
    q_code: (Q,) (pid, camera) codes of the queries (`pid_cam_codes`).
    g_code: (G,) (pid, camera) codes of the gallery.

  Returns:
    (Q,) int64 counts: G minus the gallery entries sharing the query's code.
  """
  counts = np.bincount(g_code, minlength=int(max(q_code.max(initial=0),
                                                  g_code.max(initial=0))) + 1)
  return len(g_code) - counts[q_code].astype(np.int64)


def cmc_from_first_ranks(first: np.ndarray, max_rank: int) -> np.ndarray:
  """Mean CMC curve (float64) from each valid query's 0-based first-hit rank."""
  hist = np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)
  return np.cumsum(hist[:max_rank]) / len(first)


def ap_inp(pos_q: np.ndarray, ranks: np.ndarray, num_q: int):
  """Per-query AP, INP and first rank from the positives' ranks.

  Args:
    pos_q: (T,) query index of each positive.
    ranks: (T,) 0-based rank of each positive among its query's kept entries.
    num_q: number of queries.

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
