"""reid_jax.evaluation wired to the config: the feature path, distances, AQE, TPR@FPR,
the CUHK03 protocol, several test sets and the memory refusals, on a tiny model's
features against the numpy references of tests/eval_reference.py."""

import dataclasses
import json
import os
from typing import Any, NamedTuple

import numpy as np
import pytest

from configs import market_to_partial_ilids
from eval import distance as distance_lib
from eval import metrics
from eval import rerank
from eval_reference import distance_matrix, fastreid_aqe, fastreid_tpr_at_fpr, l2_normalize
from eval_reference import reference_cuhk03_cmc, reference_market
from input_pipeline import data_source
from input_pipeline import reader_utils
from input_pipeline import synthetic
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import evaluation
from reid_jax import features
from reid_jax import scoring
from reid_jax import train
from reid_jax import train_step as step_lib
from test_train import _RecordingWriter, H, W, tiny_config


def _generate(root, seed):
  synthetic.generate(str(root), seed=seed, num_train_ids=8, num_test_ids=10,
                     train_images_per_id=(4, 6), gallery_images_per_camera=(1, 2),
                     cameras_per_id=(2, 3), num_distractors=4, num_junk=2, height=H,
                     width=W, num_workers=0)
  return str(root)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return _generate(tmp_path_factory.mktemp('synthetic_a'), seed=5)


class TinyModel(NamedTuple):
  """A randomly initialised tiny model and its test features (see `tiny_model`)."""
  exp: train.Experiment
  state: Any  # on the devices, the BNNeck's statistics set from the test features
  q_feats: np.ndarray  # float64
  g_feats: np.ndarray  # float64
  data_dir: str


def centred_model(exp, config):
  """An untrained experiment's state with its BNNeck centred on the first test set.

  At initialisation the BNNeck's statistics are (0, 1), so the features are pooled
  ReLU outputs in a narrow cone (cosine similarities 0.88-1, where float32 rounding
  reorders near-ties); the neck's statistics are set from the test features, as
  training would, so that the features are centred.

  Returns:
    (state on the devices, query features, gallery features), features float64.
  """
  test_set = exp.test_sources[0].dataset
  records = list(test_set.query) + list(test_set.gallery)
  on_devices = step_lib.on_devices
  raw = features.extract_features(exp.p_eval_step, on_devices(exp.state), records, config)
  stats = dict(exp.state.batch_stats)
  stats['bottleneck'] = {'mean': raw.mean(0), 'var': raw.var(0)}
  state = on_devices(exp.state.replace(batch_stats=stats))
  feats = features.extract_features(exp.p_eval_step, state, records, config)
  num_q = len(test_set.query)
  return state, feats[:num_q].astype(np.float64), feats[num_q:].astype(np.float64)


@pytest.fixture(scope='module')
def tiny_model(data_dir) -> TinyModel:
  """A randomly initialised tiny model, its state on the devices, and its features
  (the BNNeck centred on them: `centred_model`)."""
  config = tiny_config(data_dir)
  exp = train.build_experiment(config)
  return TinyModel(exp, *centred_model(exp, config), data_dir)


def _labels(records):
  return np.array([r.pid for r in records]), np.array([r.camid for r in records])


def numpy_labels(exp):
  """(q pids, g pids, q cameras, g cameras) of the experiment's first test set."""
  test_set = exp.test_sources[0].dataset
  (qp, qc), (gp, gc) = _labels(test_set.query), _labels(test_set.gallery)
  return qp, gp, qc, gc


def _evaluate(tiny_model, tmp_path, **overrides):
  exp, state, _, _, data_dir = tiny_model
  config = tiny_config(data_dir, **overrides)
  return evaluation.evaluate_state(exp.p_eval_step, state, exp.test_sources, config,
                                   str(tmp_path))


def test_feature_path_equals_numpy_reference_for_both_distances(tiny_model, tmp_path):
  _, _, q, g, _ = tiny_model
  labels = numpy_labels(tiny_model.exp)
  refs = {}
  for distance in ('euclidean', 'cosine'):
    out = _evaluate(tiny_model, tmp_path / distance, **{
        'test.distance': distance, 'test.feat_norm': False, 'test.cmc_ranks': (1, 3)})
    cmc, m_ap, m_inp, _ = reference_market(distance_matrix(q, g, distance), *labels, 5)
    refs[distance] = m_ap
    assert {k for k in out if k.startswith('rank')} == {'rank1', 'rank3'}
    assert out['rank1'] == pytest.approx(cmc[0], abs=1e-6)
    assert out['rank3'] == pytest.approx(cmc[2], abs=1e-6)
    assert out['mAP'] == pytest.approx(m_ap, abs=1e-6)
    assert out['mINP'] == pytest.approx(m_inp, abs=1e-6)
    assert out['distance'] == distance and out['protocol'] == 'market'
    with open(tmp_path / distance / 'eval_results.json') as f:
      saved = json.load(f)
    assert saved['mAP'] == pytest.approx(m_ap, abs=1e-6)
    assert saved['test_sets']['market1501']['mAP'] == saved['mAP']
    assert saved['test_set'] == 'market1501'
    for name in ('worst_queries.png', 'cmc.png'):  # one test set: today's paths
      assert os.path.getsize(tmp_path / distance / name) > 0
  # Unnormalised features rank differently under the two distances.
  assert abs(refs['euclidean'] - refs['cosine']) > 1e-3


def test_aqe_and_tpr_at_fpr_from_the_config(tiny_model, tmp_path):
  _, _, q, g, _ = tiny_model
  labels = numpy_labels(tiny_model.exp)
  out = _evaluate(tiny_model, tmp_path, **{
      'test.distance': 'cosine', 'test.aqe': True, 'test.aqe_k': 3, 'test.aqe_times': 2,
      'test.aqe_alpha': 2.0, 'test.tpr_at_fpr': True})
  qn, gn = l2_normalize(q).astype(np.float32), l2_normalize(g).astype(np.float32)
  qe, ge = fastreid_aqe(qn, gn, qe_times=2, qe_k=3, alpha=2.0)
  distmat = distance_matrix(qe.astype(np.float64), ge.astype(np.float64), 'cosine')
  cmc, m_ap, m_inp, _ = reference_market(distmat, *labels, 5)
  assert out['mAP'] == pytest.approx(m_ap, abs=1e-6)
  assert out['mINP'] == pytest.approx(m_inp, abs=1e-6)
  assert out['rank1'] == pytest.approx(cmc[0], abs=1e-6)
  plain = reference_market(distance_matrix(qn, gn, 'cosine'), *labels, 5)[1]
  assert abs(plain - m_ap) > 1e-4  # the expansion changed the ranking
  tprs = fastreid_tpr_at_fpr(distmat, *labels, (1e-4, 1e-3, 1e-2))
  for fpr, tpr in tprs.items():
    assert out[f'TPR@FPR={fpr:.0e}'] == pytest.approx(tpr, abs=1e-12)
  assert 'TPR@FPR=1e-02' in evaluation.format_results(out)


def test_cuhk03_protocol_is_chosen_from_the_config(tiny_model, tmp_path):
  exp, state, q, g, data_dir = tiny_model
  qp, gp, qc, gc = numpy_labels(exp)
  distmat = distance_matrix(l2_normalize(q), l2_normalize(g), 'euclidean')
  queries, sel = metrics.cuhk03_samples(qp, gp, qc, gc, num_repeats=10, seed=0)
  cuhk03_cmc = reference_cuhk03_cmc(distmat, qp, gp, qc, gc, 5, queries, sel)
  market_cmc, m_ap = reference_market(distmat, qp, gp, qc, gc, 5)[0:2]
  assert not np.allclose(cuhk03_cmc[:3], market_cmc[:3])  # the data tells them apart
  ranks = {'test.cmc_ranks': (1, 2, 3)}

  def check(out, cmc):
    assert [out[f'rank{r}'] for r in (1, 2, 3)] == pytest.approx(cmc[:3], abs=1e-6)
    assert out['mAP'] == pytest.approx(m_ap, abs=1e-6)  # AP: the whole kept gallery

  explicit = _evaluate(tiny_model, tmp_path / 'explicit', **{'test.protocol': 'cuhk03'}, **ranks)
  assert explicit['protocol'] == 'cuhk03'
  check(explicit, cuhk03_cmc)
  check(_evaluate(tiny_model, tmp_path / 'auto', **ranks), market_cmc)  # Market-1501: market
  # 'auto' on classic-split CUHK03 data (a classic split's name, not CUHK03-NP's).
  source = exp.test_sources[0]
  classic = dataclasses.replace(source, dataset=dataclasses.replace(
      source.dataset, name='cuhk03_classic_labeled'))
  config = tiny_config(data_dir, **ranks)
  out = evaluation.evaluate_state(exp.p_eval_step, state, [classic], config,
                                  str(tmp_path / 'classic'))
  assert out['protocol'] == 'cuhk03'
  check(out, cuhk03_cmc)
  assert evaluation.resolve_protocol('auto', 'cuhk03_labeled') == 'market'  # CUHK03-NP
  assert evaluation.resolve_protocol('auto', 'cuhk03_detected') == 'market'
  assert evaluation.resolve_protocol('market', 'cuhk03') == 'market'


def test_two_test_sets_in_one_training_run(data_dir, tmp_path_factory, monkeypatch):
  other = _generate(tmp_path_factory.mktemp('synthetic_b'), seed=6)
  writer = _RecordingWriter()
  monkeypatch.setattr(train.metric_writers, 'create_default_writer', lambda *a, **k: writer)
  workdir = tmp_path_factory.mktemp('two_sets')
  config = tiny_config(data_dir, num_epochs=1, steps_per_epoch=1, eval_every_epochs=1,
                       test_datasets=(f'a=market1501:{data_dir}', f'b=market1501:{other}'))
  results = train.train_and_evaluate(config, str(workdir))
  with open(workdir / 'eval_results.json') as f:
    saved = json.load(f)
  assert list(results['test_sets']) == ['a', 'b'] and saved['test_set'] == 'a'
  # Each set against the numpy reference on the trained state's features.
  exp = train.build_experiment(config)
  state = step_lib.on_devices(
      checkpoint_lib.restore(checkpoint_lib.create_manager(str(workdir)), exp.state))
  for name, source in zip(('a', 'b'), exp.test_sources):
    test_set = source.dataset
    feats = features.extract_features(exp.p_eval_step, state,
                                      list(test_set.query) + list(test_set.gallery), config)
    feats = l2_normalize(feats.astype(np.float64))
    (qp, qc), (gp, gc) = _labels(test_set.query), _labels(test_set.gallery)
    num_q = len(qp)
    _, m_ap, m_inp, _ = reference_market(
        distance_matrix(feats[:num_q], feats[num_q:], 'euclidean'), qp, gp, qc, gc, 5)
    assert saved['test_sets'][name]['mAP'] == pytest.approx(m_ap, abs=1e-6)
    assert saved['test_sets'][name]['mINP'] == pytest.approx(m_inp, abs=1e-6)
    assert writer.scalars[1][f'eval/{name}/mAP'] == pytest.approx(m_ap, abs=1e-6)
    for report in ('worst_queries.png', 'cmc.png'):
      assert os.path.getsize(workdir / 'eval' / name / report) > 0
  assert saved['test_sets']['a']['mAP'] != saved['test_sets']['b']['mAP']
  assert saved['mAP'] == saved['test_sets']['a']['mAP']  # the first set is "the" mAP
  assert not (workdir / 'worst_queries.png').exists()
  best = checkpoint_lib.create_best_manager(str(workdir))
  assert best.metrics(best.best_step())['mAP'] == pytest.approx(saved['mAP'])
  table = evaluation.format_results(results)
  assert 'Results on a:' in table and 'Results on b:' in table


def test_test_datasets_parsing_and_the_legacy_fields(tmp_path):
  config = tiny_config('/data/train')
  assert data_source.parse_test_datasets(config) == (
      data_source.TestSetSpec('market1501', 'market1501', '/data/train'),)
  config.test_dataset, config.test_data_dir = 'partial_ilids', '/data/ilids'
  assert data_source.parse_test_datasets(config) == (
      data_source.TestSetSpec('partial_ilids', 'partial_ilids', '/data/ilids'),)
  assert data_source.parse_test_datasets(market_to_partial_ilids.get_config()) == (
      data_source.TestSetSpec('partial_ilids', 'partial_ilids', 'data/Partial_iLIDS'),)
  config = tiny_config('/data/train', test_datasets=('market1501',
                                                     'duke=dukemtmcreid:/d/x:y'))
  assert data_source.parse_test_datasets(config) == (
      data_source.TestSetSpec('market1501', 'market1501', ''),
      data_source.TestSetSpec('duke', 'dukemtmcreid', '/d/x:y'))
  for entries, match in [(('a=market1501', 'a=dukemtmcreid:/x'), 'must be unique'),
                         (('../x=market1501',), 'must be letters'),
                         (('market',), 'Unknown dataset'),
                         ('market1501', 'tuple of strings')]:
    with pytest.raises(reader_utils.DatasetError, match=match):
      data_source.parse_test_datasets(tiny_config('/data/train', test_datasets=entries)
                                      if isinstance(entries, tuple) else
                                      _with_string(entries))
  both = tiny_config('/data/train', test_datasets=('market1501',),
                     test_dataset='partial_ilids')
  with pytest.raises(reader_utils.DatasetError, match='both set'):
    data_source.parse_test_datasets(both)


def _with_string(entry):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({'test_datasets': entry, 'dataset': 'market1501',
                                    'data_dir': ''})


def test_legacy_test_dataset_loads_one_test_set(data_dir, tmp_path):
  """A config setting test_dataset / test_data_dir evaluates that one set."""
  config = tiny_config(data_dir, test_dataset='market1501', test_data_dir=data_dir)
  train_source, tests = data_source.load_train_test(config)
  assert [t.label for t in tests] == ['market1501']
  assert tests[0].dataset == train_source.dataset


def test_dense_evaluations_above_the_limit_are_refused_with_the_memory_needed(data_dir):
  # MSMT17 size: the CUHK03 protocol's dense matrix is 4 * Q * G bytes.
  msmt = (11_659, 82_161, 2048)
  config = tiny_config(data_dir, **{'test.max_dense_gb': 2.0})
  with pytest.raises(distance_lib.MemoryLimitError,
                     match=rf'{4 * 11_659 * 82_161 / 2**30:.2f} GiB.*max_dense_gb'):
    scoring.check_dense_memory(*msmt, config.test, 'cuhk03', 'msmt17')
  scoring.check_dense_memory(*msmt, config.test, 'market')  # streamed: no refusal
  # Re-ranking a million-image gallery is refused at the default 16 GiB; the message
  # gives its estimate, which holds at least the (Q, G) float32 output.
  config = tiny_config(data_dir, **{'test.rerank': True})
  needed = rerank.memory_bytes(11_659, 1_000_000, 2048, 20, 6)
  assert needed >= 4 * 11_659 * 1_000_000
  with pytest.raises(distance_lib.MemoryLimitError,
                     match=rf'Re-ranking.*{needed / 2**30:.2f} GiB'):
    scoring.check_dense_memory(11_659, 1_000_000, 2048, config.test, 'market')
  # At start-up, before any training, from the model's feature size.
  tiny = tiny_config(data_dir, **{'test.rerank': True, 'test.max_dense_gb': 1e-6})
  with pytest.raises(distance_lib.MemoryLimitError, match='Re-ranking of test set'):
    train.build_experiment(tiny)
