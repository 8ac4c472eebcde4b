"""Evaluation of a model: feature extraction under pmap, metrics, re-ranking, reports.

Features are embedded on the devices in padded batches (a mask marks the padding, so
every query and gallery image is counted exactly once) and scored on the host with
`eval.metrics` and `eval.rerank`, as big_vision does.
"""

import json
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from eval import distance as distance_lib
from eval import metrics as metrics_lib
from eval import report as report_lib
from eval import rerank as rerank_lib
from input_pipeline import pipeline
from input_pipeline.records import ReIDDataset, Record


def extract_features(p_eval_step: Callable, state: Any, records: Sequence[Record],
                     config: ml_collections.ConfigDict, dtype: Any,
                     load_image: Optional[Callable] = None) -> np.ndarray:
  """Embeds every record once, in order.

  Args:
    p_eval_step: pmapped `train_step.eval_step`.
    state: the train state.
    records: images to embed.
    config: the run's config (config.test.batch_size, config.input).
    dtype: the compute dtype images are cast to.
    load_image: image reader hook of `pipeline.create_eval_dataset` (TFDS data).

  Returns:
    float32 features (len(records), D) in the order of `records`.
  """
  num_local = jax.local_device_count()
  ds = pipeline.create_eval_dataset(records, config, num_local_devices=num_local,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(), dtype=dtype,
                                    load_image=load_image)
  feats = None
  seen = np.zeros(len(records), bool)
  for batch in ds.as_numpy_iterator():
    out = np.asarray(jax.device_get(p_eval_step(state, {'image': batch['image']})))
    mask = np.asarray(batch['mask']).reshape(-1)
    index = np.asarray(batch['index']).reshape(-1)[mask]
    out = out.reshape(-1, out.shape[-1])[mask]
    if feats is None:
      feats = np.zeros((len(records), out.shape[-1]), np.float32)
    feats[index] = out
    seen[index] = True
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    feats = np.asarray(multihost_utils.process_allgather(feats)).sum(0)
    seen = np.asarray(multihost_utils.process_allgather(seen)).any(0)
  if feats is None or not seen.all():
    raise RuntimeError(f'Feature extraction missed {int((~seen).sum())} of {len(records)} '
                       'images; every image must be embedded exactly once.')
  return feats


def score(q_feats: np.ndarray, g_feats: np.ndarray, query: Sequence[Record],
          gallery: Sequence[Record], test_config: ml_collections.ConfigDict
          ) -> tuple[dict, dict]:
  """CMC, mAP and mINP (and the same after re-ranking when test_config.rerank).

  Args:
    q_feats: query features (Q, D).
    g_feats: gallery features (G, D).
    query: query records (pids and camids).
    gallery: gallery records.
    test_config: config.test.

  Returns:
    (results, arrays): results maps names to floats (rank1, rank5, rank10, mAP, mINP,
    and rerank_* when re-ranking); arrays holds 'cmc' and 'distmat' for the reports.
  """
  if not np.all(np.isfinite(q_feats)) or not np.all(np.isfinite(g_feats)):
    raise FloatingPointError('Features contain NaN or inf: the model diverged or the '
                             'checkpoint is corrupt.')
  if test_config.feat_norm:
    q_feats = np.asarray(distance_lib.l2_normalize(q_feats))
    g_feats = np.asarray(distance_lib.l2_normalize(g_feats))
  q_pids = np.array([r.pid for r in query])
  g_pids = np.array([r.pid for r in gallery])
  q_cams = np.array([r.camid for r in query])
  g_cams = np.array([r.camid for r in gallery])
  distmat = np.asarray(distance_lib.euclidean_distance(q_feats, g_feats))
  cmc, m_ap, m_inp = metrics_lib.evaluate(distmat, q_pids, g_pids, q_cams, g_cams,
                                          max_rank=test_config.max_rank)
  results = _summary(cmc, m_ap, m_inp)
  arrays = {'cmc': cmc, 'distmat': distmat}
  if test_config.rerank:
    start = time.time()
    rr = np.asarray(rerank_lib.re_ranking(q_feats, g_feats, k1=test_config.k1,
                                          k2=test_config.k2,
                                          lambda_value=test_config.lambda_value))
    cmc_rr, map_rr, minp_rr = metrics_lib.evaluate(rr, q_pids, g_pids, q_cams, g_cams,
                                                   max_rank=test_config.max_rank)
    results.update({f'rerank_{k}': v for k, v in _summary(cmc_rr, map_rr, minp_rr).items()})
    results['rerank_seconds'] = time.time() - start
    arrays['cmc_rerank'] = cmc_rr
  return results, arrays


def _summary(cmc: np.ndarray, m_ap: float, m_inp: float) -> dict:
  out = {f'rank{r}': float(cmc[r - 1]) for r in (1, 5, 10) if r <= len(cmc)}
  out.update(mAP=float(m_ap), mINP=float(m_inp))
  return out


def format_results(results: dict) -> str:
  """One human-readable block of the metrics, as the baseline logs them."""
  lines = []
  for prefix, title in (('', 'Results'), ('rerank_', 'Results with re-ranking')):
    if f'{prefix}mAP' not in results:
      continue
    lines.append(f'{title}:')
    lines.append(f'  mAP: {results[prefix + "mAP"]:.1%}   mINP: {results[prefix + "mINP"]:.1%}')
    for r in (1, 5, 10):
      if f'{prefix}rank{r}' in results:
        lines.append(f'  CMC curve, Rank-{r:<3}: {results[prefix + f"rank{r}"]:.1%}')
  return '\n'.join(lines)


def run_evaluation(p_eval_step: Callable, state: Any, test_set: ReIDDataset,
                   config: ml_collections.ConfigDict, workdir: str, dtype: Any,
                   write_reports: bool = True,
                   load_image: Optional[Callable] = None) -> dict:
  """Embeds query and gallery, scores them, writes JSON and pictures to the workdir.

  Args:
    p_eval_step: pmapped `train_step.eval_step`.
    state: the train state.
    test_set: the dataset whose query and gallery are scored.
    config: the run's config.
    workdir: where `eval_results.json`, `worst_queries.png` and `cmc.png` go.
    dtype: the compute dtype.
    write_reports: draw the PNG reports (process 0 only).
    load_image: image reader hook for TFDS data (None: read the record paths).

  Returns:
    The results dict (see `score`) with the step.
  """
  start = time.time()
  feats = extract_features(p_eval_step, state, list(test_set.query) + list(test_set.gallery),
                           config, dtype, load_image)
  num_q = len(test_set.query)
  results, arrays = score(feats[:num_q], feats[num_q:], test_set.query, test_set.gallery,
                          config.test)
  results['step'] = int(jax.device_get(state.step))
  results['eval_seconds'] = time.time() - start
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'eval_results.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
    if write_reports and all(os.path.exists(r.path) for r in test_set.query[:1]):
      _write_reports(workdir, test_set, arrays, config.test)
    elif write_reports:
      logging.warning('Image files of %s are not reachable (TFDS data without its '
                      'folder): no worst-query picture.', test_set.name)
  logging.info('Evaluation at step %d on %s (%d query, %d gallery): mAP %.4f, rank-1 %.4f '
               'in %.1f s.', results['step'], test_set.name, num_q, len(test_set.gallery),
               results['mAP'], results.get('rank1', float('nan')), results['eval_seconds'])
  return results


def _write_reports(workdir: str, test_set: ReIDDataset, arrays: dict,
                   test_config: ml_collections.ConfigDict) -> None:
  q, g = test_set.query, test_set.gallery
  report_lib.save_worst_queries_png(
      os.path.join(workdir, 'worst_queries.png'), [r.path for r in q], [r.path for r in g],
      arrays['distmat'], np.array([r.pid for r in q]), np.array([r.pid for r in g]),
      np.array([r.camid for r in q]), np.array([r.camid for r in g]),
      num_queries=test_config.report_queries, top_k=test_config.report_top_k)
  curves = {'euclidean': arrays['cmc']}
  if 'cmc_rerank' in arrays:
    curves['re-ranked'] = arrays['cmc_rerank']
  report_lib.save_cmc_plot(os.path.join(workdir, 'cmc.png'), curves)
