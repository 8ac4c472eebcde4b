"""Evaluation of a model: feature extraction under pmap, metrics, re-ranking, reports.

Features are embedded on the devices in padded batches (a mask marks the padding, so
every query and gallery image is counted exactly once) and scored on the host with
`eval.metrics` and `eval.rerank`, as big_vision does.
"""

import collections
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
from input_pipeline import data_source
from input_pipeline import pipeline
from input_pipeline.records import ReIDDataset, Record

# Evaluation batches dispatched before the oldest one is fetched.
_EVAL_BATCHES_IN_FLIGHT = 4


def extract_features(p_eval_step: Callable, state: Any, records: Sequence[Record],
                     config: ml_collections.ConfigDict,
                     load_image: Optional[Callable] = None,
                     log_every_secs: float = 10.0) -> np.ndarray:
  """Embeds every record once, in order.

  uint8 batches (prefetched on the host by tf.data) are sent to the devices
  asynchronously and normalised there; outputs are fetched a few batches behind the dispatch, so the device always
  has work queued and the host never waits for a batch it just sent. Progress (images
  done, images/s) is logged every `log_every_secs`.

  Args:
    p_eval_step: pmapped `train_step.eval_step`.
    state: the train state, already on the devices (see `train._on_devices`).
    records: images to embed.
    config: the run's config (config.test.batch_size, config.input).
    load_image: image reader hook of `pipeline.create_eval_dataset` (TFDS data).
    log_every_secs: seconds between progress lines.

  Returns:
    float32 features (len(records), D) in the order of `records`.
  """
  num_local = jax.local_device_count()
  ds = pipeline.create_eval_dataset(records, config, num_local_devices=num_local,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    load_image=load_image)
  feats = None
  seen = np.zeros(len(records), bool)
  pending: collections.deque = collections.deque()
  start = last_log = time.time()
  done = 0

  def collect(out: jax.Array, mask: np.ndarray, index: np.ndarray) -> None:
    nonlocal feats, done
    out = np.asarray(jax.device_get(out))
    out = out.reshape(-1, out.shape[-1])[mask]
    if feats is None:
      feats = np.zeros((len(records), out.shape[-1]), np.float32)
    feats[index[mask]] = out
    seen[index[mask]] = True
    done += int(mask.sum())

  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  for batch in ds.as_numpy_iterator():  # tf.data prefetches on the host
    # Asynchronous transfer and dispatch: only the image goes to the devices.
    image = jax.device_put(batch['image'], sharding)
    out = p_eval_step(state, {'image': image})
    pending.append((out, batch['mask'].reshape(-1), batch['index'].reshape(-1)))
    if len(pending) > _EVAL_BATCHES_IN_FLIGHT:
      collect(*pending.popleft())
    if time.time() - last_log >= log_every_secs:
      last_log = time.time()
      logging.info('Features: %d / %d images (%.0f images/s).', done, len(records),
                   done / (last_log - start))
  while pending:
    collect(*pending.popleft())
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


def run_evaluation(p_eval_step: Callable, state: Any, source: data_source.DataSource,
                   config: ml_collections.ConfigDict, workdir: str,
                   write_reports: bool = True) -> dict:
  """Embeds query and gallery, scores them, writes JSON and pictures to the workdir.

  Args:
    p_eval_step: pmapped `train_step.eval_step`.
    state: the train state.
    source: the test data: its dataset's query and gallery are scored.
    config: the run's config.
    workdir: where `eval_results.json`, `worst_queries.png` and `cmc.png` go.
    write_reports: draw the PNG reports (process 0 only).

  Returns:
    The results dict (see `score`) with the step.
  """
  start = time.time()
  test_set = source.dataset
  feats = extract_features(p_eval_step, state, list(test_set.query) + list(test_set.gallery),
                           config, source.load_test_image)
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
