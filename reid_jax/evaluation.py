"""Evaluation of a model state on the test sets: features, scores, logs, results files.

`evaluate_state` evaluates every test set of `config.test_datasets` in turn: its
features are extracted (`reid_jax.features.extract_features`), scored
(`reid_jax.scoring.score_on_processes`: streamed CMC, mAP, mINP, TPR@FPR; dense
re-ranking and CUHK03 protocol within `config.test.max_dense_gb`; with several
processes the ranking is shared out by query blocks and the rest runs on process 0)
and logged under its label. `eval_results.json` and the reports
(`worst_queries.png`, `cmc.png`) are written by process 0 only. Training calls
`evaluate_state` periodically; the evaluation-only mode (`--eval_only`) is
`reid_jax.eval_only.evaluate_checkpoint`.
"""

import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from eval import metrics as metrics_lib
from eval import report as report_lib
from input_pipeline import cuhk03_classic
from input_pipeline import data_source
from input_pipeline.records import ReIDDataset
from reid_jax import features as features_lib
from reid_jax import scoring

# config.test.protocol: 'auto' resolves per test set (see `resolve_protocol`).
PROTOCOLS = ('auto',) + metrics_lib.PROTOCOLS


def resolve_protocol(setting: str, dataset_name: str) -> str:
  """The metric protocol of a test set: `config.test.protocol` with 'auto' resolved.

  'auto' is the CUHK03 single-gallery-shot protocol for the catalog's classic CUHK03
  splits (`input_pipeline.cuhk03_classic.PROTOCOL_NAMES`) and the Market protocol for
  everything else, CUHK03-NP ('cuhk03_labeled', 'cuhk03_detected') included, as its
  authors evaluate it. Other data gets the CUHK03 protocol explicitly ('cuhk03').

  Args:
    setting: one of PROTOCOLS.
    dataset_name: `ReIDDataset.name` of the test set.

  Returns:
    One of `eval.metrics.PROTOCOLS`.
  """
  if setting != 'auto':
    return setting
  return 'cuhk03' if dataset_name in cuhk03_classic.PROTOCOL_NAMES else 'market'


def check_test_sets(sources: Sequence[data_source.DataSource],
                    config: ml_collections.ConfigDict, dim: int) -> None:
  """`scoring.check_dense_memory` for every test set, at start-up (before any training)."""
  for source in sources:
    scoring.check_dense_memory(
        len(source.dataset.query), len(source.dataset.gallery), dim, config.test,
        resolve_protocol(config.test.protocol, source.dataset.name), _label(source))


def _rank_keys(results: dict, prefix: str) -> list[int]:
  ranks = [k[len(prefix) + 4:] for k in results if k.startswith(prefix + 'rank')]
  return sorted(int(r) for r in ranks if r.isdigit())


def format_results(results: dict) -> str:
  """Human-readable blocks of the metrics, as the baseline logs them (one per test set)."""
  sets = results.get('test_sets') or {'': results}
  lines = []
  for name, res in sets.items():
    on = f' on {name}' if len(sets) > 1 else ''
    for prefix, title in (('', 'Results'), ('rerank_', 'Results with re-ranking')):
      if f'{prefix}mAP' not in res:
        continue
      lines.append(f'{title}{on}:')
      lines.append(f'  mAP: {res[prefix + "mAP"]:.1%}   mINP: {res[prefix + "mINP"]:.1%}')
      for r in _rank_keys(res, prefix):
        lines.append(f'  CMC curve, Rank-{r:<3}: {res[prefix + f"rank{r}"]:.1%}')
      for key in sorted(k for k in res if k.startswith(prefix + 'TPR@FPR=')):
        lines.append(f'  {key[len(prefix):]}: {res[key]:.1%}')
  return '\n'.join(lines)


def print_results(results: dict) -> None:
  """Prints `format_results` on stdout, on process 0 only (the log goes to stderr)."""
  if jax.process_index() == 0:
    print(format_results(results), flush=True)


def summary_scalars(results: dict) -> dict[str, float]:
  """TensorBoard scalars of `evaluate_state`'s results.

  One test set: 'eval/<metric>'; several: 'eval/<label>/<metric>' for each.
  """
  sets = results.get('test_sets') or {'': results}
  out = {}
  for name, res in sets.items():
    prefix = 'eval/' if len(sets) == 1 else f'eval/{name}/'
    out.update({prefix + k: v for k, v in res.items() if isinstance(v, float)})
  return out


def _label(source: data_source.DataSource) -> str:
  return source.label or source.dataset.name


def evaluate_state(p_eval_step: Callable, state: Any,
                   sources: Sequence[data_source.DataSource],
                   config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates every test set; writes the JSON and the pictures to the workdir.

  Each set's features are extracted (progress logged), scored
  (`scoring.score_on_processes`: on one process or shared out across processes) and
  logged under its label. `eval_results.json` holds a section per set under 'test_sets' and,
  at the top level, the first set's results (its label under 'test_set'): the first
  listed set's mAP is the run's mAP (best checkpoint, TensorBoard 'eval/mAP' with one
  set). Reports: `worst_queries.png` and `cmc.png` in the workdir with one test set,
  in `WORKDIR/eval/<label>/` with several.

  Args:
    p_eval_step: pmapped `train_step.eval_step`.
    state: the train state, on the devices (see `train_step.on_devices`).
    sources: the test sets (`data_source.load_train_test`).
    config: the run's config.
    workdir: where `eval_results.json` and the reports go.

  Returns:
    {'step', 'eval_seconds', 'test_set', 'test_sets': {label: results}} and the first
    set's results (see `scoring.score`) at the top level; the same on every process (only
    process 0 writes `eval_results.json` and the reports).
  """
  start = time.time()
  step = int(jax.device_get(state.step))
  sections = {}
  for source in sources:
    sections[_label(source)] = _evaluate_one(p_eval_step, state, source, config, workdir,
                                             step, several=len(sources) > 1)
  first = next(iter(sections))
  results = dict(sections[first], step=step, eval_seconds=time.time() - start,
                 test_set=first, test_sets=sections)
  if jax.process_index() == 0:
    write_results(workdir, results)
  return results


def write_results(workdir: str, results: dict) -> None:
  """`WORKDIR/eval_results.json` (process 0 calls it)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'eval_results.json'), 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)


def _evaluate_one(p_eval_step: Callable, state: Any, source: data_source.DataSource,
                  config: ml_collections.ConfigDict, workdir: str, step: int, *,
                  several: bool) -> dict:
  """Extracts, scores, logs and reports one test set; returns its results."""
  start = time.time()
  test_set, name = source.dataset, _label(source)
  num_q, num_g = len(test_set.query), len(test_set.gallery)
  protocol = resolve_protocol(config.test.protocol, test_set.name)
  logging.info('Test set %s (%s): extracting features of %d query and %d gallery images.',
               name, test_set.name, num_q, num_g)
  feats = features_lib.extract_features(p_eval_step, state,
                                       list(test_set.query) + list(test_set.gallery),
                                       config, source.load_test_image)

  def report(arrays: dict) -> None:  # process 0 only
    out_dir = os.path.join(workdir, 'eval', name) if several else workdir
    if all(os.path.exists(r.path) for r in test_set.query[:1]):
      os.makedirs(out_dir, exist_ok=True)
      write_reports_png(out_dir, test_set, arrays, config.test)
    else:
      logging.warning('Image files of %s are not reachable (TFDS data without its '
                      'folder): no worst-query picture.', name)

  results = scoring.score_on_processes(feats, num_q, test_set.query, test_set.gallery,
                                       config.test, protocol, report)
  results.update(num_query=num_q, num_gallery=num_g, distance=config.test.distance,
                 protocol=protocol, eval_seconds=time.time() - start)
  ranks = ', '.join(f'rank-{r} {results[f"rank{r}"]:.4f}' for r in _rank_keys(results, ''))
  logging.info('Evaluation at step %d on %s (%d query, %d gallery, %s, %s protocol): '
               'mAP %.4f, mINP %.4f, %s in %.1f s.', step, name, num_q, num_g,
               config.test.distance, protocol, results['mAP'], results['mINP'], ranks,
               results['eval_seconds'])
  return results


def write_reports_png(out_dir: str, test_set: ReIDDataset, arrays: dict,
                      test_config: ml_collections.ConfigDict) -> None:
  """worst_queries.png (from the feature path's per-query AP) and cmc.png."""
  q, g = test_set.query, test_set.gallery
  report_lib.save_worst_queries_from_features(
      os.path.join(out_dir, 'worst_queries.png'), [r.path for r in q], [r.path for r in g],
      arrays['q_feats'], arrays['g_feats'], np.array([r.pid for r in q]),
      np.array([r.pid for r in g]), np.array([r.camid for r in q]),
      np.array([r.camid for r in g]), arrays['ranking'], test_config.distance,
      num_queries=test_config.report_queries, top_k=test_config.report_top_k)
  curves = {test_config.distance + (' + AQE' if test_config.aqe else ''): arrays['cmc']}
  if 'cmc_rerank' in arrays:
    curves['re-ranked'] = arrays['cmc_rerank']
  report_lib.save_cmc_plot(os.path.join(out_dir, 'cmc.png'), curves)
