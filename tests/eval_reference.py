"""Numpy references of the evaluation, written from their sources.

The one home of the independent references that the eval tests and the benchmarks
(`benchmarks/eval_bench.py`, `benchmarks/synthetic_baselines.py`) compare against:

- `reference_market`: torchreid's `eval_market1501` / BoT's `eval_func` loop, plus
  AGW's mINP; `reference_cuhk03_cmc`: torchreid's `eval_cuhk03` CMC loop.
- `fastreid_tpr_at_fpr`: fast-reid's ROC loop (`evaluate_roc_py`) and sklearn's
  `roc_curve` (`sklearn_roc_curve`).
- `fastreid_aqe`: fast-reid's average query expansion.
- `reference_re_ranking`: the numpy k-reciprocal re-ranking of Zhong et al. as the
  PyTorch re-ID baselines ship it.
- `l2_normalize`, `distance_matrix`: the baselines' distances, in numpy.

Plain numpy, independent of `eval` and `reid_jax`.
"""

import numpy as np


def l2_normalize(x):
  """Rows divided by their L2 norm (at least 1e-12, as torch's F.normalize)."""
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def distance_matrix(q, g, distance):
  """'euclidean': the baselines' squared distance; 'cosine': 1 - cosine similarity."""
  if distance == 'euclidean':  # squared, as the baseline's
    return (q**2).sum(1)[:, None] + (g**2).sum(1)[None] - 2 * q @ g.T
  return 1 - l2_normalize(q) @ l2_normalize(g).T


def reference_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, kind='stable'):
  """torchreid's eval_market1501 loop, plus AGW's mINP.

  Args:
    distmat: (Q, G) distances.
    q_pids, g_pids, q_camids, g_camids: the labels.
    max_rank: length of the CMC (clipped to G).
    kind: `np.argsort`'s algorithm: 'stable' (ties to the lower gallery index, as
      `eval.metrics`) or 'quicksort' (the baselines' own default sort).

  Returns:
    (cmc, mAP, mINP, per-query dict {query index: (AP, INP, first rank)}).
    Queries with fewer kept entries than max_rank get their CMC extended with 1.
  """
  num_q, num_g = distmat.shape
  max_rank = min(max_rank, num_g)
  indices = np.argsort(distmat, axis=1, kind=kind)
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


def reference_cuhk03_cmc(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, queries,
                         sel):
  """torchreid's eval_cuhk03 CMC loop, with the random draws given by `sel`.

  Args:
    distmat: (Q, G) distances.
    q_pids, g_pids, q_camids, g_camids: the labels.
    max_rank: length of the CMC.
    queries: indices of the valid queries, as returned by cuhk03_samples.
    sel: (R, len(queries), K) drawn gallery indices (one per gallery identity).

  Returns:
    The CMC averaged over the draws and the queries.
  """
  num_repeats = sel.shape[0]
  indices = np.argsort(distmat, axis=1, kind='stable')
  matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
  all_cmc = []
  for b, q_idx in enumerate(queries):
    order = indices[q_idx]
    keep = ~((g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx]))
    raw_cmc = matches[q_idx][keep]
    kept = order[keep]
    assert raw_cmc.any()
    cmc = 0.0
    for r in range(num_repeats):
      mask = np.isin(kept, sel[r, b])
      assert mask.sum() == len(np.unique(g_pids[kept]))  # one entry per identity
      c = raw_cmc[mask].cumsum()
      c[c > 1] = 1
      cmc += c[:max_rank].astype(np.float32)
    all_cmc.append(cmc / num_repeats)
  return np.asarray(all_cmc, np.float32).sum(0) / len(queries)


def fastreid_aqe(query_feat, gallery_feat, qe_times=1, qe_k=10, alpha=3.0):
  """fast-reid's aqe (fastreid/evaluation/query_expansion.py), torch replaced by
  numpy float32 (F.normalize: x / max(||x||, 1e-12); torch.mm: matmul)."""
  num_query = query_feat.shape[0]
  all_feat = np.concatenate((query_feat, gallery_feat), axis=0).astype(np.float32)
  norm_feat = l2_normalize(all_feat)
  for _ in range(qe_times):
    all_feat_list = []
    sims = norm_feat @ norm_feat.T
    for sim in sims:
      init_rank = np.argpartition(-sim, range(1, qe_k + 1))
      weights = sim[init_rank[:qe_k]].reshape((-1, 1))
      weights = np.power(weights, alpha)
      all_feat_list.append(np.mean(all_feat[init_rank[:qe_k], :] * weights, axis=0))
    all_feat = np.stack(all_feat_list, axis=0)
    norm_feat = l2_normalize(all_feat)
  return all_feat[:num_query], all_feat[num_query:]


def reference_re_ranking(prob_fea, gal_fea, k1=20, k2=6, lambda_value=0.3,
                         metric='euclidean'):
  """The numpy re_ranking(probFea, galFea, k1, k2, lambda_value) of the PyTorch
  re-ID baselines (BoT utils/re_ranking.py), loop by loop, dense N x N, with the
  float32 V of torchreid's copy instead of BoT's float16. metric='cosine' uses
  the cosine distance 1 - cos as the original distance."""
  query_num = prob_fea.shape[0]
  feat = np.concatenate([prob_fea, gal_fea]).astype(np.float32)
  all_num = feat.shape[0]
  if metric == 'cosine':
    unit = feat / np.linalg.norm(feat, axis=1, keepdims=True)
    original_dist = 1.0 - unit @ unit.T
    del unit
  else:
    sq = np.sum(feat ** 2, axis=1, keepdims=True)
    original_dist = sq + sq.T
    original_dist -= 2 * feat @ feat.T  # in place: one N x N temporary fewer
    del sq
  del feat
  gallery_num = original_dist.shape[0]
  original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
  V = np.zeros_like(original_dist).astype(np.float32)
  initial_rank = np.argsort(original_dist).astype(np.int32)

  for i in range(all_num):
    # k-reciprocal neighbours
    forward_k_neigh_index = initial_rank[i, :k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    k_reciprocal_index = forward_k_neigh_index[fi]
    k_reciprocal_expansion_index = k_reciprocal_index
    for j in range(len(k_reciprocal_index)):
      candidate = k_reciprocal_index[j]
      candidate_forward_k_neigh_index = initial_rank[candidate, :int(np.around(k1 / 2)) + 1]
      candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index,
                                                      :int(np.around(k1 / 2)) + 1]
      fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
      candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
      if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
          candidate_k_reciprocal_index):
        k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                 candidate_k_reciprocal_index)
    k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
    weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
    V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)
  original_dist = original_dist[:query_num,]
  if k2 != 1:
    V_qe = np.zeros_like(V, dtype=np.float32)
    for i in range(all_num):
      V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
    V = V_qe
    del V_qe
  del initial_rank
  invIndex = []
  for i in range(gallery_num):
    invIndex.append(np.where(V[:, i] != 0)[0])

  jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
  for i in range(query_num):
    temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
    indNonZero = np.where(V[i, :] != 0)[0]
    indImages = [invIndex[ind] for ind in indNonZero]
    for j in range(len(indNonZero)):
      temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
          V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
    jaccard_dist[i] = 1 - temp_min / (2 - temp_min)

  final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
  return final_dist[:query_num, query_num:]
