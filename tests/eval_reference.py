"""Numpy references of the evaluation metrics, written from their sources.

Shared by the eval tests: torchreid's `eval_market1501` loop (plus AGW's mINP),
fast-reid's ROC loop (`evaluate_roc_py`) and sklearn's `roc_curve`.
"""

import numpy as np


def reference_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
  """torchreid's eval_market1501 loop with a stable sort, plus AGW's mINP.

  Returns:
    (cmc, mAP, mINP, per-query dict {query index: (AP, INP, first rank)}).
    Queries with fewer kept entries than max_rank get their CMC extended with 1.
  """
  num_q, num_g = distmat.shape
  max_rank = min(max_rank, num_g)
  indices = np.argsort(distmat, axis=1, kind='stable')
  matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
  all_cmc, all_ap, all_inp, per_query = [], [], [], {}
  for q_idx in range(num_q):
    order = indices[q_idx]
    remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
    raw_cmc = matches[q_idx][~remove]
    if not np.any(raw_cmc):
      continue
    cmc = raw_cmc.cumsum()
    max_pos_idx = np.max(np.where(raw_cmc == 1))
    inp = cmc[max_pos_idx] / (max_pos_idx + 1.0)
    cmc[cmc > 1] = 1
    padded = np.ones(max_rank)
    padded[:min(max_rank, len(cmc))] = cmc[:max_rank]
    tmp_cmc = np.asarray([x / (i + 1.0) for i, x in enumerate(raw_cmc.cumsum())]) * raw_cmc
    ap = tmp_cmc.sum() / raw_cmc.sum()
    all_cmc.append(padded)
    all_ap.append(ap)
    all_inp.append(inp)
    per_query[q_idx] = (ap, inp, int(np.argmax(raw_cmc)))
  assert all_ap, 'test data must have a valid query'
  return (np.asarray(all_cmc, np.float32).sum(0) / len(all_ap), np.mean(all_ap),
          np.mean(all_inp), per_query)


def sklearn_roc_curve(y_true, y_score):
  """sklearn.metrics.roc_curve(y_true, y_score) (pos_label 1, drop_intermediate)."""
  desc = np.argsort(y_score, kind='mergesort')[::-1]
  y_score, y_true = y_score[desc], y_true[desc]
  distinct = np.where(np.diff(y_score))[0]
  threshold_idxs = np.r_[distinct, y_true.size - 1]
  tps = np.cumsum(y_true, dtype=np.float64)[threshold_idxs]
  fps = 1 + threshold_idxs - tps
  if len(fps) > 2:
    optimal = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
    fps, tps = fps[optimal], tps[optimal]
  tps, fps = np.r_[0, tps], np.r_[0, fps]
  return fps / fps[-1], tps / tps[-1]


def fastreid_tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs):
  """fast-reid evaluate_roc_py + the TPR@FPR lines of ReidEvaluator.evaluate."""
  indices = np.argsort(distmat, axis=1)
  matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
  pos, neg = [], []
  for q_idx in range(distmat.shape[0]):
    order = indices[q_idx]
    remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
    keep = np.invert(remove)
    raw_cmc = matches[q_idx][keep]
    sort_idx = order[keep]
    q_dist = distmat[q_idx]
    pos.extend(q_dist[sort_idx[np.where(raw_cmc == 1)[0]]])
    neg.extend(q_dist[sort_idx[np.where(raw_cmc == 0)[0]]])
  scores = np.hstack((pos, neg))
  labels = np.hstack((np.zeros(len(pos)), np.ones(len(neg))))
  fpr_curve, tpr_curve = sklearn_roc_curve(labels, scores)
  return {f: tpr_curve[np.argmin(np.abs(fpr_curve - f))] for f in fprs}
