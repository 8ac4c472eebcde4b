"""End to end: train, checkpoint, resume, evaluate, NaN abort, CLI, on tiny synthetic data."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import demo
from eval_reference import distance_matrix, l2_normalize, reference_market
from input_pipeline import data_source
from input_pipeline import pipeline
from input_pipeline import synthetic
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import eval_only
from reid_jax import train

H, W = 64, 32


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  synthetic.generate(str(root), seed=3, num_train_ids=8, num_test_ids=6,
                     train_images_per_id=(4, 6), gallery_images_per_camera=(1, 2),
                     cameras_per_id=(2, 3), num_distractors=4, num_junk=2, height=H,
                     width=W, num_workers=0)
  return str(root)


# tiny_config's changes to the demo config (dotted field names).
TINY = {
    'input.image_size': (H, W), 'model.stage_sizes': (1, 1, 1, 1), 'model.width': 8,
    'batch_size': 8, 'num_instances': 2, 'num_epochs': 2, 'steps_per_epoch': 2,
    'log_every_steps': 1, 'checkpoint_every_epochs': 1, 'eval_every_epochs': 2,
    'test.batch_size': 12, 'test.report_queries': 3, 'test.report_top_k': 4,
    'test.max_rank': 5,
}


def tiny_config(data_dir, **overrides):
  """The demo config shrunk to a 1-block-per-stage, width-8 ResNet on 64x32 images."""
  config = demo.get_config()
  config.data_dir = data_dir
  for key, value in {**TINY, **overrides}.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


class _InputLog(logging.Handler):
  """Keeps the 'Training input: ...' log lines (which cache a run chose)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    if record.getMessage().startswith('Training input:'):
      self.lines.append(record.getMessage())


class _Trained(tuple):
  """(config, workdir, results) of the `trained` run; .input_log: its 'Training input'
  log lines (which cache 'auto' chose)."""
  input_log: list


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('workdir'))
  config = tiny_config(data_dir)
  root, handler = logging.getLogger(), _InputLog()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    results = train.train_and_evaluate(config, workdir)
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  run = _Trained((config, workdir, results))
  run.input_log = handler.lines
  return run


def test_training_writes_checkpoints_results_reports_and_events(trained):
  config, workdir, results = trained
  manager = checkpoint_lib.create_manager(workdir)
  assert manager.all_steps() == [2, 4]
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    saved = json.load(f)
  assert saved['step'] == 4
  for key in ('rank1', 'rank5', 'mAP', 'mINP'):
    assert 0.0 <= saved[key] <= 1.0 and saved[key] == pytest.approx(results[key])
  for name in ('worst_queries.png', 'cmc.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_reported_map_equals_plain_model_apply_and_numpy_map(trained, data_dir):
  """Features by model.apply on PIL-loaded images (no tf.data) and a numpy mAP loop."""
  config, workdir, results = trained
  exp = train.build_experiment(config)
  state = checkpoint_lib.restore(checkpoint_lib.create_manager(workdir), exp.state)
  variables = {'params': {k: v for k, v in state.params.items() if k != 'center'},
               'batch_stats': state.batch_stats}

  def embed(images):
    return np.asarray(exp.state.apply_fn(variables, images, train=False))

  expected = _reference_map(embed, exp.test_sources[0].dataset, config)
  assert results['mAP'] == pytest.approx(expected, abs=1e-4)


def _reference_map(embed, test_set, config):
  """The numpy Market mAP of `embed` (NHWC float32 -> features) on PIL-loaded,
  normalised images (no tf.data), with L2-normalised features."""
  mean, std = np.array(config.input.pixel_mean), np.array(config.input.pixel_std)

  def features(records):
    images = np.stack([(np.asarray(Image.open(r.path).convert('RGB'), np.float32) / 255
                        - mean) / std for r in records]).astype(np.float32)
    return l2_normalize(embed(images))

  q, g = test_set.query, test_set.gallery
  distmat = distance_matrix(features(q), features(g), 'euclidean')
  return reference_market(distmat, np.array([r.pid for r in q]),
                          np.array([r.pid for r in g]), np.array([r.camid for r in q]),
                          np.array([r.camid for r in g]), len(g))[1]


def test_device_cache_training_equals_host_cache_training(trained, data_dir, tmp_path):
  """`trained` ran with the tiny config's 'auto', which picked the device cache on the
  test's 4 CPU devices (its log says so); the same run reading the host cache ends with
  the same params
  (test_pipeline: the host cache's batches equal the uncached stream's)."""
  config, workdir, _ = trained
  assert len(trained.input_log) == 1
  assert trained.input_log[0].startswith('Training input: device cache of ')
  host_config = tiny_config(data_dir, **{'input.cache': 'host'})
  train.train_and_evaluate(host_config, str(tmp_path / 'host'))
  exp = train.build_experiment(host_config)
  host = checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path / 'host')),
                                exp.state)
  device = checkpoint_lib.restore(checkpoint_lib.create_manager(workdir), exp.state, step=4)
  assert int(host.step) == int(device.step) == 4
  for x, y in zip(jax.tree.leaves(host.params), jax.tree.leaves(device.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rerun_resumes_from_latest_checkpoint(trained, data_dir):
  config, workdir, _ = trained
  longer = tiny_config(data_dir, num_epochs=3)
  train.train_and_evaluate(longer, workdir)
  manager = checkpoint_lib.create_manager(workdir)
  assert manager.latest_step() == 6  # one more epoch of 2 steps, not three


def test_eval_only_restores_and_writes_results(trained):
  config, workdir, results = trained
  os.remove(os.path.join(workdir, 'eval_results.json'))
  rerank_config = tiny_config(config.data_dir, **{'test.rerank': True})
  out = eval_only.evaluate_checkpoint(rerank_config, workdir,
                                      checkpoint=os.path.join(workdir, 'checkpoints', '4'))
  assert out['step'] == 4
  assert out['mAP'] == pytest.approx(results['mAP'], abs=1e-6)
  assert 0.0 <= out['rerank_mAP'] <= 1.0
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    assert json.load(f)['rerank_mAP'] == pytest.approx(out['rerank_mAP'])


def test_eval_only_without_checkpoint_is_a_clear_error(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    eval_only.evaluate_checkpoint(tiny_config(data_dir), str(tmp_path))


def test_eval_only_evaluates_a_converted_pytorch_strong_baseline(data_dir, tmp_path):
  """A torch strong-baseline model, given as --config.model.pretrained (a DataParallel
  .pth, default pretrain_choice) or --config.checkpoint (its converted .npz), is
  evaluated whole: the mAP of the torch model's own features (numpy reference)."""
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  from reid_jax import convert  # pylint: disable=g-import-not-at-top
  net = torch_reference.make_torch_strong_baseline((1, 1, 1, 1), 1, num_classes=8,
                                                   seed=5, width=8)
  pth, npz = str(tmp_path / 'model.pth'), str(tmp_path / 'model.npz')
  torch.save({'module.' + k: v for k, v in net.state_dict().items()}, pth)
  convert.save_npz(net.state_dict(), npz)
  by_pretrained = eval_only.evaluate_checkpoint(
      tiny_config(data_dir, **{'model.name': 'resnet50', 'model.pretrained': pth}), str(tmp_path / 'a'))
  config = tiny_config(data_dir, **{'model.name': 'resnet50'})  # bottleneck blocks
  by_checkpoint = eval_only.evaluate_checkpoint(config, str(tmp_path / 'b'),
                                                checkpoint=npz)

  def embed(images):  # the torch model's features
    with torch.no_grad():
      return net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

  expected = _reference_map(embed, data_source.load_train_test(config)[1][0].dataset,
                            config)
  assert by_pretrained['mAP'] == pytest.approx(expected, abs=1e-4)
  assert by_checkpoint['mAP'] == pytest.approx(by_pretrained['mAP'], abs=1e-6)
  assert by_checkpoint['rank1'] == by_pretrained['rank1']


def _poison_step(monkeypatch, epoch, position=0):
  """Makes the loss of the step holding (epoch, position) NaN, inside the pmapped step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from reid_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top
  original = step_lib.compute_loss

  def poisoned(params, batch_stats, apply_fn, batch, loss_config, axis_name):
    loss, (stats, metrics) = original(params, batch_stats, apply_fn, batch, loss_config,
                                      axis_name)
    hit = jnp.any((batch['epoch'] == epoch) & (batch['position'] == position))
    if axis_name is not None:
      hit = jax.lax.pmax(hit.astype(jnp.int32), axis_name) > 0
    loss = loss * jnp.where(hit, jnp.nan, 1.0)  # NaN gradients too
    return loss, (stats, dict(metrics, loss=loss))

  monkeypatch.setattr(step_lib, 'compute_loss', poisoned)


def test_float32_nonfinite_step_is_skipped_and_stops_the_run_at_the_next_log(
    data_dir, tmp_path, monkeypatch):
  _poison_step(monkeypatch, epoch=1)  # the first step of epoch 1: step 3
  config = tiny_config(data_dir, checkpoint_every_epochs=10, eval_every_epochs=10,
                       log_every_steps=2, num_epochs=3)
  with pytest.raises(train.NonFiniteLossError,
                     match=r'at step 3 \(.*loss=nan.*\).*step counter 4'):
    train.train_and_evaluate(config, str(tmp_path))
  manager = checkpoint_lib.create_manager(str(tmp_path))
  # Stopped at the log step after the bad one (4), saving the state, whose params are
  # still those of step 2 (the bad update was never applied).
  assert manager.all_steps() == [4]
  exp = train.build_experiment(config)
  restored = checkpoint_lib.restore(manager, exp.state)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


class _RecordingWriter:
  """Stands in for clu's metric writer: keeps what the loop logs, step by step."""

  def __init__(self):
    self.scalars: dict[int, dict] = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)

  def flush(self):
    pass


def test_float16_nonfinite_step_halves_the_scale_and_training_goes_on(
    data_dir, tmp_path, monkeypatch):
  _poison_step(monkeypatch, epoch=2)  # step 5, after the scale settled
  writer = _RecordingWriter()
  monkeypatch.setattr(train.metric_writers, 'create_default_writer',
                      lambda *a, **k: writer)
  config = tiny_config(data_dir, dtype='float16', checkpoint_every_epochs=10,
                       eval_every_epochs=10, num_epochs=3)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= results['mAP'] <= 1.0
  logged = writer.scalars
  assert sorted(logged) == [1, 2, 3, 4, 5, 6]
  # (The first steps may be skipped while the scale falls from 2**16 to a value
  # whose gradients fit in float16.) Step 4 was applied, step 5 skipped: the scale
  # halved and training went on.
  assert logged[4]['skipped_steps'] == 0 and np.isfinite(logged[4]['loss'])
  assert logged[5]['skipped_steps'] == 1 and 'loss' not in logged[5]
  assert logged[5]['loss_scale'] == logged[4]['loss_scale'] / 2
  assert logged[6]['skipped_steps'] == 0 and np.isfinite(logged[6]['loss'])
  manager = checkpoint_lib.create_manager(str(tmp_path))
  assert manager.all_steps() == [6]
  exp = train.build_experiment(config)
  restored = checkpoint_lib.restore(manager, exp.state)
  assert float(restored.dynamic_scale.scale) == logged[6]['loss_scale']
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_sigterm_mid_epoch_saves_and_the_rerun_ends_equal_to_an_uninterrupted_run(
    data_dir, tmp_path, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  from reid_jax import preemption  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, steps_per_epoch=3, checkpoint_every_epochs=10,
                       eval_every_epochs=10, log_every_steps=5)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  original = pipeline.create_train_stream
  decoded = []

  class RecordingStream:
    """The stream (its attributes too), noting the global step of every batch read."""

    def __init__(self, stream, start):
      self.stream, self.step = stream, start

    def __getattr__(self, name):
      return getattr(self.stream, name)

    def __iter__(self):
      return self

    def __next__(self):
      batch = next(self.stream)
      decoded.append((self.step, batch['index'].copy()))
      self.step += 1
      return batch

  def recording_stream(*args, **kwargs):
    return RecordingStream(original(*args, **kwargs), kwargs['start_step'])

  monkeypatch.setattr(pipeline, 'create_train_stream', recording_stream)
  check_errors = checkpoint_lib.check_errors
  steps_seen = []

  def check_errors_then_sigterm(manager):  # called by the loop after every step
    steps_seen.append(1)
    if len(steps_seen) == 4:  # after step 4: inside epoch 2 (steps 4-6)
      os.kill(os.getpid(), signal.SIGTERM)
    check_errors(manager)

  monkeypatch.setattr(checkpoint_lib, 'check_errors', check_errors_then_sigterm)
  workdir = str(tmp_path / 'stopped')
  with pytest.raises(preemption.PreemptedError, match='SIGTERM after step 4.*Rerun'):
    train.train_and_evaluate(config, workdir)
  manager = checkpoint_lib.create_manager(workdir)
  stopped_at = manager.latest_step()
  assert stopped_at == 4
  decoded.clear()
  train.train_and_evaluate(config, workdir)
  # The resumed stream started at the first unseen batch.
  assert [step for step, _ in decoded] == [4, 5]
  exp = train.build_experiment(config)
  a = checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path / 'straight')),
                             exp.state)
  b = checkpoint_lib.restore(checkpoint_lib.create_manager(workdir), exp.state)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_training_reads_tfds_records_without_the_image_folder(data_dir, tmp_path):
  """data_format='tfds': images come from the TFRecord shards, not the folder."""
  import shutil  # pylint: disable=g-import-not-at-top
  from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'market'
  shutil.copytree(data_dir, folder)
  tfds_dir = str(tmp_path / 'tfds')
  tfds_builders.prepare('market1501', str(folder), tfds_dir)
  config = tiny_config(str(folder), data_format='tfds', tfds_data_dir=tfds_dir,
                       num_epochs=1, eval_every_epochs=1)
  exp = train.build_experiment(config)  # reads records and images from TFDS
  shutil.rmtree(folder)
  assert exp.train_source.load_train_image is not None
  results = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert 0.0 <= results['mAP'] <= 1.0
  assert not (tmp_path / 'wd' / 'worst_queries.png').exists()


def _run_cli(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, '-m', 'reid_jax.main', *args], cwd=repo,
                        capture_output=True, text=True, env=env, timeout=600)


def test_cli_rejects_misspelt_config_field(tmp_path):
  proc = _run_cli('--config=configs/demo.py', f'--workdir={tmp_path}',
                  '--config.optim.base_lrr=0.1')
  assert proc.returncode != 0
  assert 'base_lrr' in proc.stderr and 'base_lr' in proc.stderr


def _tiny_eval_only_flags(config, workdir, width):
  """CLI flags of an --eval_only run of tiny_config's model (of the given width)."""
  return ('--config=configs/demo.py', f'--workdir={workdir}', '--eval_only',
          f'--config.data_dir={config.data_dir}', f'--config.input.image_size=({H}, {W})',
          '--config.model.stage_sizes=(1, 1, 1, 1)', f'--config.model.width={width}',
          '--config.batch_size=8', '--config.num_instances=2',
          '--config.test.batch_size=12')


def test_cli_eval_only(trained, tmp_path):
  config, workdir, results = trained
  proc = _run_cli(*_tiny_eval_only_flags(config, tmp_path, width=8),
                  '--config.test.max_rank=5', f'--config.checkpoint={workdir}/checkpoints/4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'mAP' in proc.stdout and 'Rank-1' in proc.stdout
  with open(tmp_path / 'eval_results.json') as f:
    assert json.load(f)['mAP'] == pytest.approx(results['mAP'], abs=1e-6)


def test_cli_mismatched_checkpoint_is_a_clear_error(trained, tmp_path):
  config, workdir, _ = trained
  proc = _run_cli(*_tiny_eval_only_flags(config, tmp_path, width=16),
                  f'--config.checkpoint={workdir}')
  assert proc.returncode != 0
  assert 'does not match the model' in proc.stderr
