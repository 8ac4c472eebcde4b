"""`python -m reid_jax.main` with recording hooks, for the multi-process tests.

Runs main exactly (same flags, same start-up) after wrapping three functions, and
writes what it saw to `$REID_TEST_OUT/process-<i>.json` (updated as it goes):
`restored_step` (what `checkpoint.restore` returned), `saved_steps`, and `scalars`
(step -> logged scalars); and the state of the last save (params and BN statistics,
flattened) to `$REID_TEST_OUT/state-<i>.npz`.
`REID_TEST_SIGTERM=<process>:<step>` makes that process send itself SIGTERM after
that step, as a preemption notice would; `REID_TEST_FAIL_BUILD=<process>` makes
`train.build_experiment` raise on that process (a host whose start-up fails).

Evaluation: `eval_results` (the metrics each evaluation returned on this process),
`written` (each call of `evaluation.write_results` / `evaluation.write_reports_png`
here) and `ranked_queries` (the number of queries of each `rank_features` call here).
`REID_TEST_SCORING_CHECK=1` first runs `scoring_check` in `eval_only.evaluate_checkpoint`
(the processes are started by then): the cross-process gather and ranking on
`scoring_problem`'s features, saved to `$REID_TEST_OUT/scoring-<i>.npz`.
"""

import json
import os
import signal
import sys

import numpy as np


def flat_state(state) -> dict:
  """{'params/...', 'batch_stats/...': numpy array} of a train state (what is compared)."""
  import flax  # pylint: disable=g-import-not-at-top
  tree = flax.serialization.to_state_dict(state)
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
      {'params': tree['params'], 'batch_stats': tree['batch_stats']}, sep='/').items()}


def scoring_problem() -> dict:
  """Random clustered features of several query blocks (600 queries, 2,000 gallery)."""
  rng = np.random.default_rng(0)
  num_q, num_g, dim, num_ids = 600, 2000, 32, 50
  centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
  q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
  q_cams, g_cams = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
  q = centres[q_pids] + rng.standard_normal((num_q, dim)).astype(np.float32)
  g = centres[g_pids] + rng.standard_normal((num_g, dim)).astype(np.float32)
  return dict(q_feats=q, g_feats=g, q_pids=q_pids, g_pids=g_pids, q_camids=q_cams,
              g_camids=g_cams)


def scoring_check(out: str) -> None:
  """The gather and the shared-out ranking of `reid_jax.multihost_eval` (collectives).

  Process 0 holds rows with i % 7 < 3 of the features, process 1 the others (unequal
  shares), gathered in rounds of 4 KiB; then the queries are ranked shared out; then
  process 0 fails inside `from_process_0`. Saved: whether the gather rebuilt the
  features exactly, how often each row was sent, the combined ranking, the messages.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from reid_jax import multihost_eval  # pylint: disable=g-import-not-at-top
  p = scoring_problem()
  full = np.concatenate([p['q_feats'], p['g_feats']])
  rows = np.arange(len(full))
  mine = rows[(rows % 7 < 3) == (jax.process_index() == 0)]
  feats = np.zeros_like(full)
  feats[mine] = full[mine]
  sent = multihost_eval.gather_rows(feats, mine, chunk_bytes=4096)
  num_q = len(p['q_feats'])
  ranking = multihost_eval.rank_sharded(
      feats[:num_q], feats[num_q:], p['q_pids'], p['g_pids'], p['q_camids'],
      p['g_camids'], 'euclidean', 20)
  try:
    multihost_eval.from_process_0(lambda: 1 / 0, 'dividing by zero')
    error = ''
  except Exception as e:  # pylint: disable=broad-exception-caught
    error = f'{type(e).__name__}: {e}'
  np.savez(os.path.join(out, f'scoring-{jax.process_index()}.npz'),
           gathered_equal=np.array_equal(feats, full), sent=sent, cmc=ranking.cmc,
           mAP=ranking.mAP, mINP=ranking.mINP, query=ranking.query, ap=ranking.ap,
           inp=ranking.inp, first_rank=ranking.first_rank, error=error)


def _install_hooks(out: str) -> None:
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from reid_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  record: dict = {'restored_step': None, 'saved_steps': [], 'scalars': {},
                  'eval_results': [], 'written': [], 'ranked_queries': []}
  sigterm = os.environ.get('REID_TEST_SIGTERM', '')

  def me() -> int:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index()

  def dump() -> None:
    tmp = os.path.join(out, f'process-{me()}.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(record, f)
    os.replace(tmp, os.path.join(out, f'process-{me()}.json'))

  restore, save, check_errors = (checkpoint_lib.restore, checkpoint_lib.save,
                                 checkpoint_lib.check_errors)
  steps_done = []

  def recording_restore(manager, state, step=None):
    restored = restore(manager, state, step)
    record['restored_step'] = int(np.asarray(restored.step))
    dump()
    return restored

  def recording_save(manager, state, wait=False):
    saved = save(manager, state, wait)
    record['saved_steps'].append(saved)
    np.savez(os.path.join(out, f'state-{me()}.npz'), **flat_state(state))
    dump()
    return saved

  def check_errors_then_sigterm(manager):  # the loop calls it after every step
    steps_done.append(1)
    if sigterm and f'{me()}:{len(steps_done)}' == sigterm:
      os.kill(os.getpid(), signal.SIGTERM)
    check_errors(manager)

  original_writer = metric_writers.create_default_writer

  class RecordingWriter:

    def __init__(self, writer):
      self.writer = writer

    def write_scalars(self, step, scalars):
      record['scalars'].setdefault(str(step), {}).update(
          {k: float(v) for k, v in scalars.items()})
      dump()
      self.writer.write_scalars(step, scalars)

    def flush(self):
      self.writer.flush()

  from reid_jax import train  # pylint: disable=g-import-not-at-top
  fail_build, build = os.environ.get('REID_TEST_FAIL_BUILD', ''), train.build_experiment

  def failing_build(config, *args, **kwargs):
    if fail_build == str(me()):
      raise RuntimeError(f'injected failure of build_experiment on process {me()}')
    return build(config, *args, **kwargs)

  train.build_experiment = failing_build
  _install_evaluation_hooks(record, dump, out)
  checkpoint_lib.restore = recording_restore
  checkpoint_lib.save = recording_save
  checkpoint_lib.check_errors = check_errors_then_sigterm
  metric_writers.create_default_writer = (
      lambda *a, **k: RecordingWriter(original_writer(*a, **k)))


def _install_evaluation_hooks(record: dict, dump, out: str) -> None:
  """Records what each evaluation returned, wrote and ranked on this process."""
  from eval import feature_metrics  # pylint: disable=g-import-not-at-top
  from eval import metrics  # pylint: disable=g-import-not-at-top
  from reid_jax import eval_only  # pylint: disable=g-import-not-at-top
  from reid_jax import evaluation  # pylint: disable=g-import-not-at-top
  evaluate_state, rank_features = evaluation.evaluate_state, feature_metrics.rank_features

  def recording_evaluate_state(*args, **kwargs):
    results = evaluate_state(*args, **kwargs)
    record['eval_results'].append({k: v for k, v in results.items()
                                   if k.startswith('rank') or k in ('mAP', 'mINP')})
    dump()
    return results

  def recording_rank_features(q_feats, *args, **kwargs):
    record['ranked_queries'].append(len(q_feats))
    return rank_features(q_feats, *args, **kwargs)

  def recording(name, fn):
    def wrapped(*args, **kwargs):
      record['written'].append(name)
      dump()
      return fn(*args, **kwargs)
    return wrapped

  evaluation.evaluate_state = recording_evaluate_state
  feature_metrics.rank_features = metrics.rank_features = recording_rank_features
  evaluation.write_results = recording('eval_results.json', evaluation.write_results)
  evaluation.write_reports_png = recording('reports', evaluation.write_reports_png)
  if os.environ.get('REID_TEST_SCORING_CHECK'):
    evaluate_checkpoint = eval_only.evaluate_checkpoint

    def checking_evaluate_checkpoint(*args, **kwargs):
      scoring_check(out)
      return evaluate_checkpoint(*args, **kwargs)

    eval_only.evaluate_checkpoint = checking_evaluate_checkpoint


def main() -> None:
  out = os.environ['REID_TEST_OUT']
  os.makedirs(out, exist_ok=True)
  _install_hooks(out)
  from absl import app  # pylint: disable=g-import-not-at-top
  from reid_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  sys.argv[0] = 'reid_jax.main'
  app.run(main_lib.main)


if __name__ == '__main__':
  main()
