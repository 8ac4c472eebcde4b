"""Checkpoint faults: a process killed while saving, corrupt checkpoints (fallback and
moving aside), saves that fail in the background or for a full disk."""

import errno
import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer

from reid_jax import checkpoint as checkpoint_lib
from test_checkpoint import _assert_state_equal, _small

# A failed restore or save leaves tensorstore callbacks for a closed asyncio loop;
# Python reports them as unraisable exceptions during a later test.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


_KILLED_SAVE = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[2])  # tests/: the same small state as the tests
from orbax.checkpoint._src.checkpointers import async_checkpointer
from reid_jax import checkpoint as checkpoint_lib
from test_checkpoint import _small

def killed(directory, commit_futures, on_commit_callback, **kwargs):
  for f in commit_futures:  # the data is written to the temporary folder...
    f.result()
  os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the rename

manager = checkpoint_lib.create_manager(sys.argv[1])
checkpoint_lib.save(manager, _small(1, 1.0), wait=True)
async_checkpointer._background_wait_for_commit_futures = killed
checkpoint_lib.save(manager, _small(2, 2.0), wait=True)
'''


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path, caplog):
  proc = subprocess.run([sys.executable, '-c', _KILLED_SAVE, str(tmp_path),
                         os.path.dirname(os.path.abspath(__file__))],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  names = sorted(os.listdir(tmp_path / 'checkpoints'))
  assert names[0] == '1' and names[1].startswith('2.orbax-checkpoint-tmp'), names
  assert len(names) == 2 and os.listdir(tmp_path / 'checkpoints' / names[1])
  caplog.set_level(logging.INFO)
  manager = checkpoint_lib.create_manager(str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']  # leftover removed
  assert any('Removing unfinished checkpoint writes' in m for m in caplog.messages)
  restored = checkpoint_lib.restore(manager, _small(0, 0.0))
  _assert_state_equal(restored, _small(1, 1.0))


def _data_files(step_dir):
  return glob.glob(os.path.join(step_dir, 'default', 'd', '*'))


def _delete_data(step_dir):
  for f in _data_files(step_dir):
    os.remove(f)


def _truncate_data(step_dir):
  for f in _data_files(step_dir):
    os.truncate(f, os.path.getsize(f) // 2)


def _truncate_tree_metadata(step_dir):
  path = os.path.join(step_dir, 'default', '_METADATA')
  os.truncate(path, os.path.getsize(path) // 2)


def _unfinished_folder(step_dir):  # a non-atomic filesystem, or a manual copy
  shutil.rmtree(step_dir)
  os.makedirs(os.path.join(step_dir, 'default'))
  with open(os.path.join(step_dir, 'default', 'partial'), 'wb') as f:
    f.write(b'\0' * 100)


@pytest.mark.parametrize('corrupt', [_delete_data, _truncate_data, _truncate_tree_metadata,
                                     _unfinished_folder])
def test_a_corrupt_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path, caplog, corrupt):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  for step in (1, 2, 3):
    checkpoint_lib.save(manager, _small(step, float(step)))
  manager.wait_until_finished()
  directory = os.path.join(str(tmp_path), 'checkpoints')
  corrupt(os.path.join(directory, '3'))
  caplog.set_level(logging.INFO)
  manager = checkpoint_lib.create_manager(str(tmp_path))
  restored = checkpoint_lib.restore(manager, _small(0, 0.0))
  _assert_state_equal(restored, _small(2, 2.0))
  moved = [n for n in os.listdir(directory) if n.startswith('3.corrupt-')]
  assert len(moved) == 1 and not os.path.exists(os.path.join(directory, '3'))
  warning = [r.getMessage() for r in caplog.records
             if r.levelno == logging.WARNING and r.name != 'absl']  # ours, not orbax's
  assert len(warning) == 1, warning
  assert f'{directory}/3 is unreadable' in warning[0]
  assert f'moved it to {directory}/{moved[0]}' in warning[0]
  assert f'falling back to step 2 ({directory}/2)' in warning[0]
  assert manager.all_steps() == [1, 2]
  # Training passes step 3 again: it is saved again, and is the one restored next.
  checkpoint_lib.save(manager, _small(3, 30.0), wait=True)
  restored = checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), _small(0, 0.0))
  _assert_state_equal(restored, _small(3, 30.0))


def test_no_readable_checkpoint_starts_from_zero_and_keeps_the_files(tmp_path, caplog):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  checkpoint_lib.save(manager, _small(1, 1.0), wait=True)
  _delete_data(str(tmp_path / 'checkpoints' / '1'))
  caplog.set_level(logging.INFO)
  fresh = _small(0, 0.0)
  assert checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), fresh) is fresh
  assert any('No readable checkpoint in' in m and 'starting from step 0' in m
             for m in caplog.messages)
  assert [n for n in os.listdir(tmp_path / 'checkpoints') if n.startswith('1.corrupt-')]


def test_explicit_corrupt_step_is_an_error_and_is_left_in_place(tmp_path):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  checkpoint_lib.save(manager, _small(1, 1.0), wait=True)
  step_dir = str(tmp_path / 'checkpoints' / '1')
  _truncate_data(step_dir)
  with pytest.raises(checkpoint_lib.CheckpointCorruptError,
                     match=f'Checkpoint {step_dir} is unreadable: ValueError'):
    checkpoint_lib.restore_from_path(step_dir, _small(0, 0.0))
  assert os.listdir(tmp_path / 'checkpoints') == ['1']


def _disk_full(directory, commit_futures, on_commit_callback, **kwargs):
  del on_commit_callback, kwargs
  for f in commit_futures:
    f.result()
  raise OSError(errno.ENOSPC, 'No space left on device', str(directory))


def test_a_failed_background_save_is_reported_by_check_errors(tmp_path, monkeypatch):
  manager = checkpoint_lib.create_manager(str(tmp_path), max_to_keep=1)
  checkpoint_lib.save(manager, _small(1, 1.0), wait=True)
  checkpoint_lib.check_errors(manager)  # nothing pending: no error
  monkeypatch.setattr(async_checkpointer, '_background_wait_for_commit_futures', _disk_full)
  checkpoint_lib.save(manager, _small(2, 2.0))  # returns at once: the write fails later
  directory = os.path.join(str(tmp_path), 'checkpoints')
  deadline = time.monotonic() + 60
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as info:
    while time.monotonic() < deadline:
      checkpoint_lib.check_errors(manager)
      time.sleep(0.01)
  message = str(info.value)
  assert f'Saving checkpoint step 2 in {directory} failed: OSError' in message
  assert 'No space left on device' in message
  free, unit = re.search(rf'Filesystem of {directory}: ([\d.]+) (GiB|MiB) free',
                         message).groups()
  free_bytes = float(free) * (2**30 if unit == 'GiB' else 2**20)
  assert abs(free_bytes - shutil.disk_usage(directory).free) < 2**26
  assert f'step 1 ({directory}/1), is intact' in message
  # max_to_keep=1 must not have deleted step 1 for the failed step 2.
  assert manager.all_steps() == [1]
  monkeypatch.undo()
  restored = checkpoint_lib.restore(checkpoint_lib.create_manager(str(tmp_path)), _small(0, 0.0))
  _assert_state_equal(restored, _small(1, 1.0))
  # Space freed: the next save works and replaces step 1.
  checkpoint_lib.save(manager, _small(2, 2.0), wait=True)
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ['2']


def test_a_failed_save_is_reported_by_a_waiting_save(tmp_path, monkeypatch):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  checkpoint_lib.save(manager, _small(1, 1.0), wait=True)
  monkeypatch.setattr(async_checkpointer, '_background_wait_for_commit_futures', _disk_full)
  with pytest.raises(checkpoint_lib.CheckpointSaveError, match='No space left on device'):
    checkpoint_lib.save(manager, _small(2, 2.0), wait=True)


def test_a_full_disk_stops_the_save_before_writing_anything(tmp_path, monkeypatch):
  manager = checkpoint_lib.create_manager(str(tmp_path))
  checkpoint_lib.save(manager, _small(1, 1.0), wait=True)
  directory = os.path.join(str(tmp_path), 'checkpoints')
  need = 3 * 4 * 4 + 4 * 4 + 3 * 4 * 4 + 4  # the arrays of _small, in bytes
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: real(path)._replace(free=need - 1, total=2**30))
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as info:
    checkpoint_lib.save(manager, _small(2, 2.0))  # raises at once, not in the background
  message = str(info.value)
  assert (f'Saving checkpoint step 2 in {directory} failed: OSError: [Errno 28] Not '
          'enough free space for checkpoint step 2: its arrays need 0.0 MiB') in message
  assert f'Filesystem of {directory}: 0.0 MiB free of 1.00 GiB.' in message
  assert f'step 1 ({directory}/1), is intact' in message
  assert sorted(os.listdir(directory)) == ['1']  # nothing of step 2 was written
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: real(path)._replace(free=need))
  checkpoint_lib.save(manager, _small(2, 2.0), wait=True)  # exactly enough: saved
  assert manager.all_steps() == [1, 2]
