"""Several processes on jax.distributed: start-up, agreement checks, training, preemption,
evaluation.

The multi-process tests start two processes of `reid_jax.main` (through
`multihost_worker.py`, which records what each process restored, saved, logged,
evaluated and wrote) with two virtual CPU devices each, on 127.0.0.1 with JAX's CPU
collectives (gloo), and compare with one process of four devices (this pytest process,
see conftest.py).
"""

import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest

import multihost_harness
import multihost_worker
from eval import feature_metrics
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import evaluation
from reid_jax import multihost
from reid_jax import multihost_eval
from reid_jax import train
from reid_jax import train_step as step_lib
from test_train import data_dir  # pylint: disable=unused-import  (the synthetic dataset)
from test_train import _RecordingWriter, TINY as train_tiny, tiny_config

# The tiny run of tests/test_train.py, 3 epochs of 2 steps, evaluated at the end only.
TINY = dict(train_tiny, num_epochs=3, eval_every_epochs=3)
TOTAL_STEPS = 6
TIMEOUT = 420  # seconds for one two-process run on a loaded 2-core machine
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


def _config(data_dir):
  return tiny_config(data_dir, **TINY)


def _cli_flags(data_dir, workdir, **overrides):
  values = dict(TINY, data_dir=data_dir, **overrides)
  return (['--config=configs/demo.py', f'--workdir={workdir}']
          + [f'--config.{k}={v}' for k, v in values.items()])


def _run_two(args, log_dir, out=None, env=None):
  """Two processes; `args(i)` after python; worker records go to `out`."""

  def extra(i):
    del i
    return {**({'REID_TEST_OUT': str(out)} if out else {}), **(env or {})}

  return multihost_harness.run_processes(args, 2, log_dir=str(log_dir), timeout=TIMEOUT,
                                         env=extra)


def _records(out):
  return [json.load(open(os.path.join(out, f'process-{i}.json'))) for i in range(2)]


def _state(out, i):
  with np.load(os.path.join(out, f'state-{i}.npz')) as f:
    return dict(f)


def _assert_states_close(a, b, what):
  assert sorted(a) == sorted(b), what
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                               err_msg=f'{what}: {key}')


@pytest.fixture(scope='module')
def one_process_four_devices(data_dir, tmp_path_factory):
  """The reference: this process (4 CPU devices), same config: final state, losses,
  results, a state template and the experiment (its compiled evaluation step)."""
  assert jax.process_count() == 1 and jax.device_count() == 4
  saved, built = {}, []
  writer = _RecordingWriter()

  save = checkpoint_lib.save

  def recording_save(manager, state, wait=False):
    saved['state'], saved['template'] = multihost_worker.flat_state(state), jax.device_get(state)
    return save(manager, state, wait)

  build = train.build_experiment

  def recording_build(config, *args, **kwargs):
    built.append(build(config, *args, **kwargs))
    return built[-1]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train.metric_writers, 'create_default_writer', lambda *a, **k: writer)
    mp.setattr(checkpoint_lib, 'save', recording_save)
    mp.setattr(train, 'build_experiment', recording_build)
    results = train.train_and_evaluate(_config(data_dir),
                                       str(tmp_path_factory.mktemp('one_process')))
  return saved['state'], writer.scalars, results, saved['template'], built[-1]


@pytest.fixture(scope='module')
def two_processes(data_dir, tmp_path_factory):
  """An uninterrupted two-process run of the same config through the CLI."""
  root = tmp_path_factory.mktemp('two_processes')
  workdir, out = root / 'workdir', root / 'out'
  results = _run_two(lambda i: [WORKER, *_cli_flags(data_dir, workdir)], root / 'logs', out)
  assert [r.returncode for r in results] == [0, 0], multihost_harness.format_logs(results)
  return str(workdir), str(out), results


@pytest.fixture(scope='module')
def eval_only_two_processes(data_dir, two_processes, tmp_path_factory):
  """`--eval_only` on two processes, on a copy of the two-process run's workdir; the
  processes first run `multihost_worker.scoring_check`."""
  root = tmp_path_factory.mktemp('eval_only')
  workdir, out = root / 'workdir', root / 'out'
  shutil.copytree(os.path.join(two_processes[0], 'checkpoints'), workdir / 'checkpoints')
  results = _run_two(lambda i: [WORKER, *_cli_flags(data_dir, workdir), '--eval_only'],
                     root / 'logs', out, env={'REID_TEST_SCORING_CHECK': '1'})
  assert [r.returncode for r in results] == [0, 0], multihost_harness.format_logs(results)
  return str(workdir), str(out), results


@pytest.fixture(scope='module')
def one_process_evaluation(data_dir, two_processes, one_process_four_devices,
                           tmp_path_factory):
  """The two-process run's final checkpoint evaluated in this process (4 devices)."""
  template, exp = one_process_four_devices[3:]
  manager = checkpoint_lib.create_manager(two_processes[0], read_only=True)
  state = checkpoint_lib.restore(manager, template)
  assert int(state.step) == TOTAL_STEPS
  return evaluation.evaluate_state(exp.p_eval_step, step_lib.on_devices(state),
                                   exp.test_sources, _config(data_dir),
                                   str(tmp_path_factory.mktemp('one_process_eval')))


def _metrics(results):
  """CMC ranks, mAP and mINP of evaluation results."""
  return {k: v for k, v in results.items() if k.startswith('rank') or k in ('mAP', 'mINP')}


# ----------------------------------------------------------- start-up (one process)


def test_startup_on_this_machine_stays_single_process():
  """No flags and no cluster here: no jax.distributed, never a hang or a failure."""
  assert multihost.detect_cluster() is None
  line = multihost.start()
  assert line.startswith('Single process (no --coordinator_address, and no cluster')
  assert not jax.distributed.is_initialized() and jax.process_count() == 1
  # The agreement checks are no-ops with one process.
  multihost.check_agreement({'a': 1})
  with multihost.together('testing'):
    pass


def test_slurm_is_detected_as_jax_detects_it(monkeypatch):
  """SLURM's variables inside `srun`: one task runs single-process, several initialize."""
  from jax._src.clusters import slurm_cluster  # pylint: disable=g-import-not-at-top
  for key, value in dict(SLURM_JOB_ID='1234', SLURM_STEP_NODELIST='node[001-002]',
                         SLURM_NTASKS='2', SLURM_PROCID='1', SLURM_LOCALID='0').items():
    monkeypatch.setenv(key, value)
  assert slurm_cluster.SlurmCluster.is_env_present()  # what JAX itself would use
  assert multihost.detect_cluster() == multihost.Cluster('slurm', 2)
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert multihost.initialize() == 'Single process (slurm detected with one process).'
  assert not jax.distributed.is_initialized()
  monkeypatch.delenv('SLURM_STEP_NODELIST')  # outside srun (e.g. salloc's shell)
  assert multihost.detect_cluster() is None


def test_local_device_ids_without_a_multi_process_run_is_a_clear_error():
  with pytest.raises(ValueError, match='no cluster was detected.*CUDA_VISIBLE_DEVICES'):
    multihost.initialize(local_device_ids=[0, 1])
  with pytest.raises(ValueError, match='non-negative integers.*0,1,2,3'):
    multihost.parse_device_ids(['0', 'gpu1'])
  assert multihost.parse_device_ids(['0', '3']) == [0, 3]


def test_differing_fields_names_each_field_and_the_processes_that_differ():
  names = ['config.batch_size', 'config.seed', 'records']
  values = [{'config.batch_size': 8, 'config.seed': 0, 'records': 'abc'},
            {'config.batch_size': 16, 'config.seed': 0, 'records': 'abc'},
            {'config.batch_size': 8, 'config.seed': 0, 'records': 'abd'},
            {'config.batch_size': 16, 'config.seed': 0, 'records': 'abd'}]
  gathered = np.stack([np.stack([multihost._hash(v[n]) for n in names])  # pylint: disable=protected-access
                       for v in values])
  # From the definition: a field differs on process p when its value differs from
  # process 0's.
  expected = {n: [p for p in range(4) if values[p][n] != values[0][n]] for n in names}
  expected = {n: p for n, p in expected.items() if p}
  assert multihost.differing_fields(names, gathered) == expected == {
      'config.batch_size': [1, 3], 'records': [2, 3]}


def test_fingerprint_has_one_field_per_config_leaf_and_record_list(data_dir):
  config = _config(data_dir)
  from input_pipeline import data_source  # pylint: disable=g-import-not-at-top
  train_source, tests = data_source.load_train_test(config)
  datasets = [train_source.dataset, *(t.dataset for t in tests)]
  config_fields = multihost.config_fields(config)
  assert config_fields['config.batch_size'] == 8
  assert config_fields['config.model.stage_sizes'] == [1, 1, 1, 1]
  assert len(config_fields) == len(flax.traverse_util.flatten_dict(config.to_dict()))
  fields = multihost.data_fields(datasets, 8, 2)
  assert fields['class count'] == 8 and fields['steps per epoch'] == 2
  assert len([k for k in fields if k.endswith('records')]) == 3 * len(datasets)
  # Relative paths: the same files under another root give the same digests.
  moved = [r._replace(path='/elsewhere/' + os.path.relpath(r.path, data_dir))
           for r in train_source.dataset.train]
  key = f'dataset 0 ({train_source.dataset.name}) train records'
  assert multihost._records_digest(moved) == fields[key]  # pylint: disable=protected-access
  assert multihost._records_digest(moved[:-1]) != fields[key]  # pylint: disable=protected-access


# ------------------------------------------------------------ two processes


def test_two_processes_train_equal_to_one_process_with_four_devices(
    two_processes, one_process_four_devices):
  workdir, out, results = two_processes
  reference, reference_scalars, reference_results, template, _ = one_process_four_devices
  records = _records(out)
  for i, record in enumerate(records):
    assert record['restored_step'] == 0
    assert record['saved_steps'] == [2, 4, 6]
    # The same losses at every step as one process with four devices.
    for step in range(1, TOTAL_STEPS + 1):
      for key in ('loss', 'ce_loss', 'triplet_loss'):
        np.testing.assert_allclose(record['scalars'][str(step)][key],
                                   reference_scalars[step][key], rtol=1e-5,
                                   err_msg=f'process {i}, step {step}, {key}')
    # The same params and BN statistics.
    _assert_states_close(_state(out, i), reference, f'process {i} vs one process')
  # What orbax saved with both processes restores here, in one process.
  restored = checkpoint_lib.restore(checkpoint_lib.create_manager(workdir), template)
  assert int(restored.step) == TOTAL_STEPS
  _assert_states_close(multihost_worker.flat_state(restored), _state(out, 0),
                       'checkpoint vs process 0')
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    assert json.load(f)['mAP'] == pytest.approx(reference_results['mAP'], abs=1e-4)
  # One log: process 0's table names both processes' devices; process 1 logs no INFO.
  log0, log1 = results[0].log, results[1].log
  assert 'cpu:0 (cpu), cpu:1 (cpu)' in log0 and 'cpu:2048 (cpu), cpu:2049 (cpu)' in log0
  assert 'process 0 of 2' in log0 and 'Training resnet18' in log0
  assert 'Training resnet18' not in log1 and 'No checkpoint in' not in log1
  # TensorBoard from process 0 only; the markers and the lock are gone.
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert len(events) == 1
  assert not os.path.exists(os.path.join(workdir, multihost.MARKER_DIR))
  assert not os.path.exists(os.path.join(workdir, '.lock'))


def test_two_process_evaluation_equals_one_process_evaluation_of_the_same_state(
    two_processes, eval_only_two_processes, one_process_evaluation):
  """The two-process run's final evaluation and `--eval_only` on two processes give the
  CMC, mAP and mINP of one process evaluating the same checkpoint; process 0 alone
  writes the results and the reports; the queries are ranked once, shared out."""
  expected = _metrics(one_process_evaluation)
  assert set(expected) >= {'rank1', 'rank5', 'mAP', 'mINP'}
  num_query = one_process_evaluation['num_query']
  for name, (workdir, out, _) in (('training', two_processes),
                                  ('eval_only', eval_only_two_processes)):
    records = _records(out)
    with open(os.path.join(workdir, 'eval_results.json')) as f:
      assert _metrics(json.load(f)) == pytest.approx(expected, abs=1e-7), name
    for i, record in enumerate(records):  # every process returned process 0's results
      assert record['eval_results'] == [_metrics(json.load(
          open(os.path.join(workdir, 'eval_results.json'))))], (name, i)
    assert records[0]['written'] == ['reports', 'eval_results.json'], name
    assert records[1]['written'] == [], name
    assert os.path.getsize(os.path.join(workdir, 'worst_queries.png')) > 0
    # Each process ranked its share of the queries once (the last call: the eval-only
    # processes ran `scoring_check` before).
    shares = [record['ranked_queries'][-1] for record in records]
    assert sum(shares) == num_query and min(shares) > 0, (name, shares)
  assert [r['restored_step'] for r in _records(eval_only_two_processes[1])] == [
      TOTAL_STEPS] * 2


def test_gather_and_shared_out_ranking_equal_one_process_at_block_scale(
    eval_only_two_processes):
  """600 queries (3 blocks of 256), unequal shares gathered in 4 KiB rounds: the
  combined ranking is the one of `rank_features` on one process, bit for bit."""
  out = eval_only_two_processes[1]
  p = multihost_worker.scoring_problem()
  expected = feature_metrics.rank_features(p['q_feats'], p['g_feats'], p['q_pids'],
                                           p['g_pids'], p['q_camids'], p['g_camids'],
                                           'euclidean', 20)
  assert [len(s) for s in multihost_eval.query_shards(p['q_pids'], 2, 256)] == [256, 344]
  for i in range(2):
    with np.load(os.path.join(out, f'scoring-{i}.npz')) as got:
      assert bool(got['gathered_equal']) and np.all(got['sent'] == 1)
      for key in ('cmc', 'query', 'ap', 'inp', 'first_rank'):
        np.testing.assert_array_equal(got[key], getattr(expected, key), err_msg=key)
      assert float(got['mAP']) == expected.mAP and float(got['mINP']) == expected.mINP
      error = str(got['error'])
    if i == 0:
      assert error == 'ZeroDivisionError: division by zero'
    else:
      assert error.startswith('ProcessFailedError: Process 0 failed while dividing by '
                              'zero (ZeroDivisionError: division by zero)')


def test_query_shards_cut_the_pid_order_at_block_boundaries():
  pids = np.array([5, 1, 3, 1, 5, 2, 9, 3])
  order = np.argsort(pids, kind='stable')
  # 4 blocks of 2 over 3 shards: blocks 0 | 1 | 2-3; fewer blocks than shards: even.
  assert [s.tolist() for s in multihost_eval.query_shards(pids, 3, 2)] == [
      order[:2].tolist(), order[2:4].tolist(), order[4:].tolist()]
  assert [len(s) for s in multihost_eval.query_shards(pids, 3, 4)] == [2, 3, 3]
  assert [len(s) for s in multihost_eval.query_shards(pids[:1], 2, 256)] == [0, 1]


def test_a_config_mismatch_stops_both_processes_naming_the_field(data_dir, tmp_path):
  """Process 1 is given another batch size: both stop at start-up, with the message."""
  workdir = tmp_path / 'workdir'

  def args(i):
    return ['-m', 'reid_jax.main',
            *_cli_flags(data_dir, workdir, **({'batch_size': 16} if i == 1 else {}))]

  results = _run_two(args, tmp_path / 'logs')
  logs = multihost_harness.format_logs(results)
  assert all(r.returncode not in (0, None) for r in results), logs
  for r in results:
    assert 'ProcessMismatchError' in r.log, logs
    assert 'config.batch_size: processes [1] differ from process 0' in r.log, logs
  assert '(process 1): 16' in results[1].log and '(process 0): 8' in results[0].log
  assert 'start-up (config)' in results[0].log
  assert not os.path.exists(workdir)  # stopped before the workdir was touched


def test_a_process_failing_at_start_up_stops_the_other_naming_it(data_dir, tmp_path):
  """build_experiment raises on process 1 only: process 0 does not wait for it."""
  results = _run_two(lambda i: [WORKER, *_cli_flags(data_dir, tmp_path / 'workdir')],
                     tmp_path / 'logs', tmp_path / 'out', env={'REID_TEST_FAIL_BUILD': '1'})
  logs = multihost_harness.format_logs(results)
  assert all(r.returncode not in (0, None) for r in results), logs
  assert 'RuntimeError: injected failure of build_experiment on process 1' in results[1].log
  assert ('ProcessFailedError: Process(es) [1] failed while building the experiment'
          in results[0].log), logs


def test_a_workdir_not_shared_stops_both_processes(data_dir, tmp_path):
  """Each process its own workdir (as node-local disks): both stop, saying so."""
  results = _run_two(lambda i: ['-m', 'reid_jax.main',
                                *_cli_flags(data_dir, tmp_path / f'local{i}')],
                     tmp_path / 'logs')
  logs = multihost_harness.format_logs(results)
  for r in results:
    assert r.returncode not in (0, None), logs
    assert 'WorkdirNotSharedError' in r.log and 'shared filesystem' in r.log, logs
    assert 'process 0 sees the markers of [0]; process 1 sees the markers of [1]' in r.log
  assert not os.path.exists(tmp_path / 'local0' / 'checkpoints')


def test_sigterm_stops_both_processes_at_one_step_and_the_rerun_resumes_both(
    data_dir, tmp_path, one_process_four_devices):
  """SIGTERM to process 1 only: JAX's sync point stops both at the same step, both
  save it; the rerun resumes both from it and ends equal to an uninterrupted run."""
  workdir, out = tmp_path / 'workdir', tmp_path / 'out'

  def args(i):
    del i  # the same command on both processes
    return [WORKER, *_cli_flags(data_dir, workdir)]

  # After step 3, inside epoch 1 (steps 3-4): only the preemption saves an odd step.
  results = _run_two(args, tmp_path / 'logs1', out, env={'REID_TEST_SIGTERM': '1:3'})
  logs = multihost_harness.format_logs(results)
  assert [r.returncode for r in results] == [143, 143], logs
  stopped = [r['saved_steps'][-1] for r in _records(out)]
  assert stopped[0] == stopped[1] and 3 <= stopped[0] < TOTAL_STEPS, (stopped, logs)
  assert f'after step {stopped[0]}' in results[0].log
  manager = checkpoint_lib.create_manager(str(workdir), read_only=True)
  assert manager.latest_step() == stopped[0]

  results = _run_two(args, tmp_path / 'logs2', out)
  logs = multihost_harness.format_logs(results)
  assert [r.returncode for r in results] == [0, 0], logs
  records = _records(out)
  assert [r['restored_step'] for r in records] == [stopped[0]] * 2, logs
  assert [r['saved_steps'][-1] for r in records] == [TOTAL_STEPS] * 2
  reference = one_process_four_devices[0]
  for i in range(2):
    _assert_states_close(_state(out, i), reference,
                         f'process {i}: resumed vs uninterrupted one process')
