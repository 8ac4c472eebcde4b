"""Scoring of test-set features: CMC, mAP, mINP, TPR@FPR, re-ranking, on one process or several.

CMC, mAP, mINP and TPR@FPR are computed from the features in blocks on the devices
(`eval.metrics.rank_features`): no query x gallery matrix exists at any gallery size.
Re-ranking and the CUHK03 protocol need the dense matrix and are refused, with the
memory they would need, above `config.test.max_dense_gb`.

With several processes (`score_on_processes`), each holding all features, the
ranking is shared out by query blocks (`multihost_eval.rank_sharded`) and what must
run once (the CUHK03 protocol, re-ranking, AQE, TPR@FPR, reports) runs on process 0,
whose results every process receives (`multihost_eval.from_process_0`).
"""

import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from eval import distance as distance_lib
from eval import metrics as metrics_lib
from eval import query_expansion
from eval import rerank as rerank_lib
from eval import verification
from input_pipeline.records import Record
from reid_jax import multihost_eval


def _max_bytes(test_config: ml_collections.ConfigDict) -> int:
  return int(float(test_config.max_dense_gb) * 2**30)


def check_dense_memory(num_query: int, num_gallery: int, dim: int,
                       test_config: ml_collections.ConfigDict, protocol: str,
                       name: str = '') -> None:
  """Refuses the dense evaluations of a test set above `test_config.max_dense_gb`.

  CMC, mAP and mINP are streamed (no Q x G matrix); re-ranking (`eval.rerank.memory_bytes`)
  and the CUHK03 protocol (a dense float32 distance matrix) are not.

  Args:
    num_query: Q.
    num_gallery: G.
    dim: feature size.
    test_config: config.test.
    protocol: the resolved protocol (`evaluation.resolve_protocol`).
    name: the test set, for the message.

  Raises:
    eval.distance.MemoryLimitError: naming the computation and the memory it needs.
  """
  where = f' of test set {name!r}' if name else ''
  limit = _max_bytes(test_config)
  if test_config.rerank:
    distance_lib.check_memory(
        f'Re-ranking{where} ({num_query} queries x {num_gallery} gallery images, {dim}-d)',
        rerank_lib.memory_bytes(num_query, num_gallery, dim, test_config.k1,
                                test_config.k2), limit,
        'Raise config.test.max_dense_gb if the machine has it, or set '
        'config.test.rerank=False (CMC/mAP/mINP need no dense matrix).')
  if protocol == 'cuhk03':
    distance_lib.check_memory(
        f'The CUHK03 protocol{where} (a dense {num_query} x {num_gallery} distance matrix)',
        distance_lib.dense_bytes(num_query, num_gallery), limit,
        "Raise config.test.max_dense_gb, or set config.test.protocol='market'.")


def prepare_features(q_feats: np.ndarray, g_feats: np.ndarray,
                     test_config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The features as `score` ranks them: checked, L2-normalised, expanded.

  Args:
    q_feats: float32 query features (Q, D). With test_config.feat_norm they are
      L2-normalised in place, a block of rows at a time (no second copy of a large
      gallery's features); pass copies to keep them.
    g_feats: float32 gallery features (G, D), the same.
    test_config: config.test (feat_norm, aqe and its parameters).

  Returns:
    (q_feats, g_feats) normalised (test_config.feat_norm), then expanded with AQE
    (test_config.aqe).

  Raises:
    FloatingPointError: non-finite features.
  """
  if not _all_finite(q_feats) or not _all_finite(g_feats):
    raise FloatingPointError('Features contain NaN or inf: the model diverged or the '
                             'checkpoint is corrupt.')
  if test_config.feat_norm:
    q_feats, g_feats = _normalize_in_place(q_feats), _normalize_in_place(g_feats)
  if test_config.aqe:
    q_feats, g_feats = query_expansion.aqe(q_feats, g_feats, test_config.aqe_times,
                                           test_config.aqe_k, test_config.aqe_alpha)
  return q_feats, g_feats


def _labels(query: Sequence[Record], gallery: Sequence[Record]) -> tuple[np.ndarray, ...]:
  """(q_pids, g_pids, q_camids, g_camids)."""
  return (np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
          np.array([r.camid for r in query]), np.array([r.camid for r in gallery]))


def _max_rank(test_config: ml_collections.ConfigDict, num_gallery: int) -> int:
  """The CMC's length: every reported rank (ranks past the gallery size left out)."""
  return min(max(test_config.max_rank, *test_config.cmc_ranks), num_gallery)


def score(q_feats: np.ndarray, g_feats: np.ndarray, query: Sequence[Record],
          gallery: Sequence[Record], test_config: ml_collections.ConfigDict,
          protocol: str = 'market',
          ranking: Optional[metrics_lib.RankingMetrics] = None) -> tuple[dict, dict]:
  """CMC, mAP and mINP (and TPR@FPR, and the same after re-ranking when asked).

  Features are prepared (`prepare_features`: L2-normalised with test_config.feat_norm,
  expanded with test_config.aqe), then scored with test_config.distance: CMC/mAP/mINP
  and TPR@FPR streamed from the features (`eval.metrics.rank_features`, no Q x G
  matrix); the CUHK03 protocol's CMC and re-ranking densely, within
  test_config.max_dense_gb.

  Args:
    q_feats: float32 query features (Q, D); normalised in place (`prepare_features`):
      pass copies to keep them.
    g_feats: float32 gallery features (G, D), the same.
    query: query records (pids and camids).
    gallery: gallery records.
    test_config: config.test.
    protocol: 'market' or 'cuhk03' (`evaluation.resolve_protocol`).
    ranking: the ranking of the features, computed elsewhere (across processes:
      `multihost_eval.rank_sharded`); then q_feats and g_feats must be already
      prepared (`prepare_features`) and are used as given.

  Returns:
    (results, arrays): results maps names to numbers (rank{r} for r in
    test_config.cmc_ranks, mAP, mINP, TPR@FPR=..., rerank_* when re-ranking);
    arrays holds 'cmc', 'ranking' (the `eval.metrics.RankingMetrics`), 'q_feats' and
    'g_feats' (as scored) for the reports, and 'cmc_rerank'.

  Raises:
    FloatingPointError: non-finite features.
    eval.distance.MemoryLimitError: a dense evaluation above the limit.
    ValueError: a given ranking without the TPR@FPR test_config asks for.
  """
  check_dense_memory(len(query), len(gallery), q_feats.shape[1], test_config, protocol)
  distance = test_config.distance
  labels = _labels(query, gallery)
  fprs = verification.FAST_REID_FPRS if test_config.tpr_at_fpr else ()
  ranks = tuple(test_config.cmc_ranks)
  max_rank = _max_rank(test_config, len(gallery))
  if ranking is None:
    q_feats, g_feats = prepare_features(q_feats, g_feats, test_config)
    ranking = metrics_lib.rank_features(q_feats, g_feats, *labels, distance, max_rank,
                                        fprs=fprs)
  elif fprs and ranking.tpr_at_fpr is None:
    raise ValueError('config.test.tpr_at_fpr is set but the given ranking has no TPR@FPR.')
  cmc = ranking.cmc
  if protocol == 'cuhk03':
    distmat = distance_lib.distance_matrix(q_feats, g_feats, distance,
                                           max_bytes=_max_bytes(test_config))
    cmc = metrics_lib.evaluate(distmat, *labels, max_rank=max_rank, protocol='cuhk03')[0]
    del distmat
  results = _summary(cmc, ranking.mAP, ranking.mINP, ranks)
  results.update(_tpr_keys(ranking.tpr_at_fpr))
  arrays = {'cmc': cmc, 'ranking': ranking, 'q_feats': q_feats, 'g_feats': g_feats}
  if test_config.rerank:
    start = time.time()
    rr = rerank_lib.re_ranking(q_feats, g_feats, k1=test_config.k1, k2=test_config.k2,
                               lambda_value=test_config.lambda_value, distance=distance,
                               max_bytes=_max_bytes(test_config))
    cmc_rr, map_rr, minp_rr = metrics_lib.evaluate(rr, *labels, max_rank=max_rank,
                                                   protocol=protocol)
    rerank_results = _summary(cmc_rr, map_rr, minp_rr, ranks)
    if fprs:
      rerank_results.update(_tpr_keys(verification.tpr_at_fpr(rr, *labels, fprs)))
    results.update({f'rerank_{k}': v for k, v in rerank_results.items()})
    results['rerank_seconds'] = time.time() - start
    arrays['cmc_rerank'] = cmc_rr
  return results, arrays


def shardable(test_config: ml_collections.ConfigDict) -> bool:
  """Whether several processes can share the ranking out by query blocks.

  AQE (every feature's neighbours among all) and TPR@FPR (one table of all genuine
  distances) need all queries at once: process 0 then scores alone.
  """
  return not test_config.aqe and not test_config.tpr_at_fpr


def score_on_processes(feats: np.ndarray, num_query: int, query: Sequence[Record],
                       gallery: Sequence[Record], test_config: ml_collections.ConfigDict,
                       protocol: str = 'market',
                       report: Optional[Callable[[dict], None]] = None) -> dict:
  """`score` of one test set on one process or across all processes (a collective).

  Several processes, each holding all features (`features.extract_features`): when
  `shardable`, every process prepares the features (normalisation: cheap) and ranks
  its share of the queries (`multihost_eval.rank_sharded`); then process 0 alone
  completes the results (the CUHK03 protocol, re-ranking) and calls `report`; its
  results are broadcast (`multihost_eval.from_process_0`). Otherwise process 0 scores
  alone. Each computation runs once, on one process or split between them.

  Args:
    feats: (num_query + G, D) float32 features, queries first; normalised in place.
    num_query: Q.
    query: query records.
    gallery: gallery records.
    test_config: config.test.
    protocol: 'market' or 'cuhk03'.
    report: called on process 0 with `score`'s arrays (writes the reports).

  Returns:
    `score`'s results, equal on every process.
  """
  def finish(q_feats, g_feats, ranking=None) -> dict:
    results, arrays = score(q_feats, g_feats, query, gallery, test_config, protocol,
                            ranking=ranking)
    if report is not None:
      report(arrays)
    return results

  q_feats, g_feats = feats[:num_query], feats[num_query:]
  if jax.process_count() == 1:
    return finish(q_feats, g_feats)
  ranking = None
  if shardable(test_config):
    q_feats, g_feats = prepare_features(q_feats, g_feats, test_config)
    ranking = multihost_eval.rank_sharded(
        q_feats, g_feats, *_labels(query, gallery), test_config.distance,
        _max_rank(test_config, len(gallery)))
  return multihost_eval.from_process_0(lambda: finish(q_feats, g_feats, ranking),
                                       'scoring the features')


def _all_finite(feats: np.ndarray, block: int = 8192) -> bool:
  """np.isfinite(feats).all() without a full-size temporary."""
  return all(np.isfinite(feats[s:s + block]).all() for s in range(0, len(feats), block))


def _normalize_in_place(feats: np.ndarray, block: int = 8192) -> np.ndarray:
  """`eval.distance.l2_normalize` of each row, written back block by block."""
  if feats.dtype != np.float32 or not feats.flags.writeable:
    feats = np.array(feats, np.float32)
  for start in range(0, len(feats), block):
    feats[start:start + block] = distance_lib.l2_normalize(feats[start:start + block])
  return feats


def _summary(cmc: np.ndarray, m_ap: float, m_inp: float, ranks: Sequence[int]) -> dict:
  out = {f'rank{r}': float(cmc[r - 1]) for r in ranks if r <= len(cmc)}
  out.update(mAP=float(m_ap), mINP=float(m_inp))
  return out


def _tpr_keys(tprs: Optional[dict]) -> dict:
  """fast-reid's result names: 'TPR@FPR=1e-04' etc."""
  return {f'TPR@FPR={f:.0e}': float(t) for f, t in (tprs or {}).items()}
