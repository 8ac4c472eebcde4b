"""Faults a user meets, as the issue's probe met them: an image that does not decode
(named, in training after saving the last good state, and in evaluation); and through
the command line: a second run on a workdir in use, SIGTERM, a full disk."""

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from input_pipeline import data_source
from input_pipeline import image_check
from input_pipeline import pipeline
from input_pipeline.records import Record
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import features
from reid_jax import train
from test_train import data_dir  # pylint: disable=unused-import  (the synthetic dataset)
from test_train import H, W, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CLI's tiny model: tiny_config as command-line overrides.
CLI_TINY = ('--config=configs/demo.py', f'--config.input.image_size=({H}, {W})',
            '--config.model.stage_sizes=(1, 1, 1, 1)', '--config.model.width=8',
            '--config.batch_size=8', '--config.num_instances=2',
            '--config.test.batch_size=12', '--config.test.max_rank=10',
            '--config.log_every_steps=1')


@pytest.fixture(scope='module')
def tiny_state(data_dir):
  """A freshly initialised state of the tiny model (the template to restore into)."""
  return train.build_experiment(tiny_config(data_dir, **{'test.max_rank': 10})).state


def _encoded(seed: int, fmt: str) -> bytes:
  """A random H x W image, encoded."""
  pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format=fmt)
  return out.getvalue()


# name -> (the bytes written to a .jpg, what the message must say about the file,
# TensorFlow's reason). None: no file at all.
BAD_FILES = {
    'empty': (b'', 'empty file (0 bytes)', 'Input is empty'),
    'truncated': (_encoded(1, 'JPEG')[:600], '600 bytes', 'jpeg::Uncompress failed'),
    'not_an_image': (b'<html>404 Not Found</html>\n', '27 bytes',
                     'Unknown image file format'),
    'missing': (None, 'no such file', 'NotFoundError'),
}


def _write(path: str, data: bytes | None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if data is not None:
    with open(path, 'wb') as f:
      f.write(data)


def _good_records(folder: str, n: int) -> list[Record]:
  records = []
  for i in range(n):
    path = os.path.join(folder, f'{i:04d}_c1s1_000001_00.jpg')
    _write(path, _encoded(100 + i, 'PNG'))  # lossless: PIL and TF decode alike
    records.append(Record(path, i, 0))
  return records


@pytest.mark.parametrize('kind', sorted(BAD_FILES))
def test_each_kind_of_undecodable_file_is_named_with_why(tmp_path, kind):
  data, what, reason = BAD_FILES[kind]
  records = _good_records(str(tmp_path), 4)
  bad_path = str(tmp_path / 'bad' / '0009_c2s1_000001_00.jpg')
  _write(bad_path, data)
  records.insert(2, Record(bad_path, 9, 1))
  found = image_check.find_undecodable(records, range(len(records)), num_threads=2)
  assert [b.path for b in found] == [bad_path]
  line = found[0].describe()
  assert line.startswith(f'{bad_path}: {what}: ') and reason in line, line
  assert not found[0].pil_reads_it and 'function_node' not in line and '[Op:' not in line
  # Only the indices asked for are decoded.
  assert image_check.find_undecodable(records, [0, 1, 3, -1]) == []


def test_a_file_pil_reads_but_tensorflow_cannot_is_told_apart(tmp_path):
  records = _good_records(str(tmp_path), 1)
  tiff = str(tmp_path / '0003_c1s1_000002_00.jpg')  # a TIFF named .jpg
  _write(tiff, _encoded(3, 'TIFF'))
  records.append(Record(tiff, 3, 0))
  (found,) = image_check.find_undecodable(records, [0, 1])
  assert found.path == tiff and found.pil_reads_it
  assert 'config.verify_images keeps it: re-encode it' in found.describe()


def test_images_from_the_datasets_records_are_named_with_their_own_fix():
  # data_format='tfds': the bytes come from the records, through a load_image hook.
  records = [Record(f'/absent/{i:04d}_c1s1_000001_00.jpg', i, 0) for i in range(3)]
  encoded = [_encoded(0, 'JPEG'), BAD_FILES['truncated'][0], _encoded(2, 'PNG')]
  bad = image_check.find_undecodable(records, range(3),
                                     pipeline.in_memory_loader(encoded))
  assert [(b.path, b.from_file) for b in bad] == [(records[1].path, False)]
  message = str(image_check.UndecodableImageError(bad, 'evaluation batch 1'))
  assert (f"{records[1].path}: the dataset's encoded image: InvalidArgumentError: "
          'jpeg::Uncompress failed') in message
  assert 'prepare the records again' in message and 'verify_images' not in message


def test_evaluation_names_the_undecodable_file_of_the_failing_batch(tmp_path):
  records = _good_records(str(tmp_path), 12)
  config = tiny_config(str(tmp_path), **{'test.batch_size': 4})

  def mean_colour(state, batch):  # stands in for the pmapped eval step
    del state
    return batch['image'].astype(jnp.float32).mean(axis=(2, 3))

  # All images decode: every batch arrives, in order (PIL + numpy as the reference).
  feats = features.extract_features(mean_colour, None, records, config)
  expected = np.stack([np.asarray(Image.open(r.path).convert('RGB'), np.float32)
                       .mean(axis=(0, 1)) for r in records])
  np.testing.assert_allclose(feats, expected, rtol=1e-6)
  # Image 10 (in batch 3 of 4 images) is truncated.
  _write(records[9].path, BAD_FILES['truncated'][0])
  with pytest.raises(image_check.UndecodableImageError) as info:
    features.extract_features(mean_colour, None, records, config)
  message = str(info.value)
  assert message.startswith('Cannot decode 1 image of evaluation batch 3 (images 9-12 of '
                            f'12):\n  {records[9].path}: 600 bytes: ')
  assert '--config.verify_images=True' in message
  assert sum(r.path in message for r in records) == 1


def test_undecodable_images_stop_training_and_its_evaluation_after_saving(
    data_dir, tiny_state, tmp_path):
  folder = str(tmp_path / 'data')
  shutil.copytree(data_dir, folder)
  # The host cache: its stream decodes each image at the first step that reads it.
  config = tiny_config(folder, checkpoint_every_epochs=10, eval_every_epochs=10,
                       **{'test.max_rank': 10, 'input.cache': 'host'})
  assert not config.verify_images
  records = data_source.load_train_test(config)[0].dataset.train
  # The data order is the sampler's (seed, epoch): pick an image that step 2 reads
  # and step 1 does not.
  epoch_0 = pipeline.make_sampler(records, config, jax.device_count()).epoch_batches(
      0, num_steps=config.steps_per_epoch)
  target = records[next(i for i in epoch_0[1] if i not in epoch_0[0])].path
  with open(target, 'rb') as f:
    data = f.read()
  with open(target, 'wb') as f:
    f.write(data[:len(data) // 2])
  # The device cache decodes every image before the first step: the run stops there.
  device_workdir = str(tmp_path / 'device_wd')
  with pytest.raises(image_check.UndecodableImageError) as info:
    train.train_and_evaluate(tiny_config(folder, **{'input.cache': 'device'}),
                             device_workdir)
  assert str(info.value).startswith(
      f'Cannot decode 1 image of filling the device cache (training images 1-'
      f'{len(records)} of {len(records)}):\n  {target}: {len(data) // 2} bytes: ')
  assert checkpoint_lib.create_manager(device_workdir).all_steps() == []
  workdir = str(tmp_path / 'wd')
  with pytest.raises(image_check.UndecodableImageError) as info:
    train.train_and_evaluate(config, workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  message = str(info.value)
  assert message.startswith('Cannot decode 1 image of training step 2 (epoch 1):\n'
                            f'  {target}: {len(data) // 2} bytes: InvalidArgumentError: '
                            'jpeg::Uncompress failed')
  assert '--config.verify_images=True' in message
  assert f'The last good state is saved in {checkpoints}/1; rerun' in message
  # The state after the one good step, on disk (no periodic save was due).
  manager = checkpoint_lib.create_manager(workdir)
  assert manager.all_steps() == [1]
  restored = checkpoint_lib.restore(manager, tiny_state)
  assert int(restored.step) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored.params),
                                                       jax.tree.leaves(tiny_state.params))]
  assert any(changed)  # the good step was applied before the bad one stopped the run
  # The file replaced, the rerun resumes from step 1; a truncated gallery image then
  # stops the evaluation at the end of training, after saving step 2.
  with open(target, 'wb') as f:
    f.write(data)
  gallery = os.path.join(folder, 'bounding_box_test')
  bad_gallery = os.path.join(gallery, sorted(n for n in os.listdir(gallery)
                                             if not n.startswith('-1'))[3])
  with open(bad_gallery, 'r+b') as f:
    f.truncate(os.path.getsize(bad_gallery) // 2)
  with pytest.raises(image_check.UndecodableImageError) as info:
    train.train_and_evaluate(tiny_config(folder, num_epochs=1, **{'test.max_rank': 10}),
                             workdir)
  message = str(info.value)
  assert re.match(rf'Cannot decode 1 image of evaluation batch \d+ \(images .*\):\n'
                  rf'  {re.escape(bad_gallery)}: \d+ bytes: ', message), message
  assert f'The last good state is saved in {checkpoints}/2; rerun' in message
  assert checkpoint_lib.create_manager(workdir).all_steps() == [1, 2]


# --- The command line ------------------------------------------------------------------


def _cli_env() -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
  return subprocess.run([*prefix, sys.executable, '-m', 'reid_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, env=_cli_env(), timeout=600)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 600) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert process.poll() is None, 'the first run ended early'
    assert time.monotonic() < deadline, 'the first run did not start training'
    time.sleep(0.2)


def test_cli_second_run_stops_naming_the_first_which_sigterm_saves_and_stops(
    data_dir, tmp_path):
  workdir = tmp_path / 'wd'
  log_path = tmp_path / 'first.log'
  args = (*CLI_TINY, f'--workdir={workdir}', f'--config.data_dir={data_dir}')
  with open(log_path, 'w') as log:  # the first run: trains until stopped
    first = subprocess.Popen(
        [sys.executable, '-m', 'reid_jax.main', *args, '--config.steps_per_epoch=2',
         '--config.num_epochs=10000', '--config.checkpoint_every_epochs=10000',
         '--config.eval_every_epochs=10000'],
        cwd=REPO, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=log)
  try:
    _wait_for(lambda: re.search(r'logging_writer\.py:\d+\] \[1\] ', log_path.read_text()),
              first)
    owner = json.loads((workdir / '.lock').read_text())
    first.send_signal(signal.SIGSTOP)  # holds the lock, spends no CPU meanwhile
    second = _cli(*args)
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    returncode = first.wait(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  # The second run stopped at start-up, naming the first, before reading any data.
  assert second.returncode != 0
  assert (f'{workdir} is in use by run {owner["run_id"]} (pid {first.pid} on host '
          f'{socket.gethostname()}, started ') in second.stderr, second.stderr[-3000:]
  assert 'which is still running. Stop it first, or pass another --workdir.' in second.stderr
  assert 'market1501 statistics' not in second.stderr
  # SIGTERM: the first run finished its step, saved it, said so and exited 143.
  log = log_path.read_text()
  assert returncode == 143, log[-3000:]
  stopped = re.search(r'Stopped by SIGTERM after step (\d+); the state is saved in '
                      r'(\S+)/(\d+)\. Rerun the same command to resume from there\.', log)
  step = int(stopped.group(1))
  assert stopped.group(2, 3) == (str(workdir / 'checkpoints'), str(step))
  logged = [int(s) for s in re.findall(r'logging_writer\.py:\d+\] \[(\d+)\] ', log)]
  assert max(logged) == step
  assert sorted(n for n in os.listdir(workdir / 'checkpoints') if n.isdigit()) == [str(step)]
  assert not (workdir / '.lock').exists()  # released on the way out


def _mount_namespaces_work(directory: str) -> bool:
  """Whether this user may mount a tmpfs in its own user and mount namespace."""
  try:
    return subprocess.run(
        ['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
         f'mount -t tmpfs -o size=64k tmpfs {directory}'],
        capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def test_cli_full_disk_stops_the_run_at_the_save_naming_path_and_free_space(
    data_dir, tiny_state, tmp_path):
  if not _mount_namespaces_work(str(tmp_path)):
    pytest.skip('needs `unshare --user --mount` to put the checkpoints on a small tmpfs')
  need = sum(np.asarray(x).nbytes  # the arrays a checkpoint holds
             for x in jax.tree.leaves(flax.serialization.to_state_dict(tiny_state)))
  # Room for one checkpoint (its arrays plus orbax's metadata, ~10% here), not two.
  size_kib = int(1.6 * need / 1024) // 4 * 4
  workdir = tmp_path / 'wd'
  checkpoints = workdir / 'checkpoints'
  kept = tmp_path / 'kept'  # the tmpfs vanishes with the namespace: copy it out
  checkpoints.mkdir(parents=True)
  script = (f'mount -t tmpfs -o size={size_kib}k tmpfs {checkpoints} || exit 99; '
            '"$@"; rc=$?; cp -a ' f'{checkpoints} {kept}; exit $rc')
  proc = _cli(*CLI_TINY, f'--workdir={workdir}', f'--config.data_dir={data_dir}',
              '--config.steps_per_epoch=2', '--config.num_epochs=4',
              '--config.checkpoint_every_epochs=1', '--config.eval_every_epochs=10',
              prefix=('unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                      script, 'sh'))
  assert proc.returncode == 1, proc.stderr[-3000:]
  err = proc.stderr
  assert (f'CheckpointSaveError: Saving checkpoint step 4 in {checkpoints} failed: '
          'OSError: [Errno 28]') in err, err[-3000:]
  free, total = re.search(rf'Filesystem of {checkpoints}: ([\d.]+) MiB free of '
                          r'([\d.]+) MiB\.', err).groups()
  assert float(total) == round(size_kib / 1024, 1)
  assert float(free) * 2**20 < need
  assert f'step 2 ({checkpoints}/2), is intact' in err
  # Stopped at once: no step after the one that saved.
  logged = [int(s) for s in re.findall(r'logging_writer\.py:\d+\] \[(\d+)\] ', err)]
  assert max(logged) == 4, logged
  # Nothing of step 4 was written; step 2 restores.
  assert sorted(os.listdir(kept)) == ['2', 'best']
  restored = checkpoint_lib.restore_from_path(str(kept / '2'), tiny_state)
  assert int(restored.step) == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
