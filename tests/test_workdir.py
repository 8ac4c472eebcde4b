"""The workdir's lock, config and identity files, and the config comparison."""

import json
import logging
import os
import socket
import subprocess
import threading
import time

import pytest

from configs import default as default_config
from reid_jax import workdir as workdir_lib


def _write_lock(path, **fields):
  owner = {'run_id': 'first', 'pid': os.getpid(), 'host': socket.gethostname(),
           'started': '2024-01-01 00:00:00 UTC', 'pid_start_time': None}
  owner.update(fields)
  path.write_text(json.dumps(owner))


def test_lock_file_names_the_owner_and_is_removed_on_release(tmp_path):
  lock = workdir_lib.WorkdirLock(str(tmp_path / 'run'), run_id='abc')
  with lock:
    written = json.loads((tmp_path / 'run' / '.lock').read_text())
    assert written['run_id'] == 'abc'
    assert written['pid'] == os.getpid()
    assert written['host'] == socket.gethostname()
    assert written['pid_start_time'] == int(
        open(f'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[19])
  assert not (tmp_path / 'run' / '.lock').exists()


def test_a_second_run_stops_naming_the_first(tmp_path):
  first = workdir_lib.WorkdirLock(str(tmp_path), run_id='first').acquire()
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match=rf'in use by run first \(pid {os.getpid()} on host '
                           rf'{socket.gethostname()}, started .*\), which is still running'):
    workdir_lib.WorkdirLock(str(tmp_path), run_id='second').acquire()
  first.release()
  workdir_lib.WorkdirLock(str(tmp_path), run_id='second').acquire().release()


def test_a_live_process_on_this_host_holds_the_lock(tmp_path):
  sleeper = subprocess.Popen(['sleep', '30'])
  try:
    _write_lock(tmp_path / '.lock', pid=sleeper.pid,
                pid_start_time=workdir_lib._pid_start_time(sleeper.pid))
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f'pid {sleeper.pid}'):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  # The same pid, now dead: the lock is stale and taken over.
  lock = workdir_lib.WorkdirLock(str(tmp_path), run_id='new').acquire()
  assert json.loads((tmp_path / '.lock').read_text())['run_id'] == 'new'
  lock.release()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = subprocess.Popen(['true'])
  dead.wait()
  _write_lock(tmp_path / '.lock', pid=dead.pid)
  with caplog.at_level(logging.WARNING):
    lock = workdir_lib.WorkdirLock(str(tmp_path), run_id='new').acquire()
  assert any(f'stale lock {tmp_path}/.lock of run first (pid {dead.pid}' in m
             for m in caplog.messages)
  assert json.loads((tmp_path / '.lock').read_text())['run_id'] == 'new'
  assert os.listdir(tmp_path) == ['.lock']
  lock.release()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
  # Our own pid, but written by a process that started at another time.
  _write_lock(tmp_path / '.lock', pid_start_time=workdir_lib._pid_start_time(os.getpid()) - 1)
  workdir_lib.WorkdirLock(str(tmp_path), run_id='new').acquire().release()


def test_a_lock_of_another_host_says_how_to_remove_it(tmp_path):
  _write_lock(tmp_path / '.lock', host='elsewhere', pid=1)
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match=rf'pid 1 on host elsewhere.*If that run is no longer running, '
                           rf'delete {tmp_path}/.lock'):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_an_unreadable_lock_is_a_clear_error(tmp_path):
  (tmp_path / '.lock').write_text('garbage')
  with pytest.raises(workdir_lib.WorkdirLockedError, match='not readable'):
    workdir_lib.WorkdirLock(str(tmp_path)).read_owner()


def test_hosts_of_one_run_do_not_lock_each_other_out(tmp_path):
  path = str(tmp_path)
  # Process 1 starts before process 0 has taken the lock: it waits for it.
  process_1 = workdir_lib.WorkdirLock(path, run_id='run-a', wait_seconds=30)
  waiter = threading.Thread(target=process_1.acquire, kwargs={'process_index': 1})
  waiter.start()
  time.sleep(0.2)
  assert waiter.is_alive()
  process_0 = workdir_lib.WorkdirLock(path, run_id='run-a').acquire(process_index=0)
  waiter.join(timeout=10)
  assert not waiter.is_alive()
  process_1.release()  # process 1 never owns the file
  assert os.path.exists(os.path.join(path, '.lock'))
  # A process of another run is told who holds the workdir.
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match='Process 1 of run run-b: process 0 did not lock .* held by run run-a'):
    workdir_lib.WorkdirLock(path, run_id='run-b', wait_seconds=0.3).acquire(process_index=1)
  process_0.release()
  assert not os.path.exists(os.path.join(path, '.lock'))


def test_run_id_is_fresh_per_run():
  assert workdir_lib.new_run_id() != workdir_lib.new_run_id()
  assert len(workdir_lib.shared_run_id()) == 12  # single process: no collective


def test_run_files_round_trip(tmp_path):
  config = default_config.get_config()
  pid_map = {1: 0, 7: 1, 12: 2}
  workdir_lib.write_run_files(str(tmp_path), config, pid_map)
  saved = workdir_lib.read_run_config(str(tmp_path))
  assert saved['model']['name'] == config.model.name
  assert saved['input']['image_size'] == list(config.input.image_size)
  assert saved['optim']['base_lr'] == config.optim.base_lr
  assert workdir_lib.read_pid_map(str(tmp_path)) == pid_map
  assert json.loads((tmp_path / 'identities.json').read_text())['num_classes'] == 3
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'identities.json']  # no temp files
  assert workdir_lib.read_run_config(str(tmp_path / 'empty')) is None
  assert workdir_lib.read_pid_map(str(tmp_path / 'empty')) is None


def test_config_differences_name_the_model_fields_only(tmp_path):
  config = default_config.get_config()
  workdir_lib.write_run_files(str(tmp_path), config, {0: 0, 1: 1})
  saved = workdir_lib.read_run_config(str(tmp_path))  # tuples came back as lists
  assert workdir_lib.config_differences(saved, config) == {}
  given = default_config.get_config()
  given.model.name = 'resnet18'
  given.model.last_stride = 2
  given.input.image_size = (128, 64)
  given.optim.base_lr = 1.0  # training only: not reported
  diffs = workdir_lib.config_differences(saved, given, saved_num_classes=2,
                                         given_num_classes=751)
  assert diffs == {'model.name': ('resnet50', 'resnet18'), 'model.last_stride': (1, 2),
                   'input.image_size': ([256, 128], (128, 64)), 'num_classes': (2, 751)}
  text = workdir_lib.format_differences(diffs)
  assert "model.name: 'resnet50' in the workdir, 'resnet18' now" in text
  # Fields that an older config lacks are skipped, not reported.
  del saved['model']['neck']
  given = default_config.get_config()
  given.model.neck = 'no'
  assert workdir_lib.config_differences(saved, given) == {}


def test_eval_only_warns_when_the_workdir_was_trained_with_another_model(tmp_path, caplog):
  from reid_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  trained = default_config.get_config()
  workdir_lib.write_run_files(workdir, trained, {f'p{i}': i for i in range(751)})
  with caplog.at_level(logging.WARNING):
    train._warn_if_model_changed(workdir, default_config.get_config(), 751)
  assert not caplog.records  # the same model: nothing to say
  given = default_config.get_config()
  given.model.last_stride = 2
  given.optim.base_lr = 1.0  # not a model field
  with caplog.at_level(logging.WARNING):
    train._warn_if_model_changed(workdir, given, 702)
  (record,) = caplog.records
  assert record.getMessage() == (
      f'The config differs from the one the checkpoints in {workdir} were trained with, '
      'in fields that change the model:\n'
      '  model.last_stride: 1 in the workdir, 2 now\n'
      '  num_classes: 751 in the workdir, 702 now')
