"""Tests for reid_jax.cpu_tuning (environment handling only; no JAX started)."""

from unittest import mock

from reid_jax import cpu_tuning


def test_adds_the_flags_on_cpu_and_keeps_existing_ones():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
  with mock.patch('importlib.metadata.version', return_value='0.10.2'):
    added = cpu_tuning.set_cpu_xla_flags(env)
  assert added == list(cpu_tuning.CPU_XLA_FLAGS)
  assert env['XLA_FLAGS'].split() == [
      '--xla_force_host_platform_device_count=4', *cpu_tuning.CPU_XLA_FLAGS]
  with mock.patch('importlib.metadata.version', return_value='0.10.2'):
    assert cpu_tuning.set_cpu_xla_flags(env) == []  # idempotent


def test_user_setting_of_a_flag_wins():
  env = {'XLA_FLAGS': '--xla_disable_hlo_passes=foo', 'JAX_PLATFORMS': 'cpu'}
  with mock.patch('importlib.metadata.version', return_value='0.10.2'):
    added = cpu_tuning.set_cpu_xla_flags(env)
  assert added == [cpu_tuning.CPU_XLA_FLAGS[0]]
  assert '--xla_disable_hlo_passes=foo' in env['XLA_FLAGS']


def test_nothing_added_on_accelerators_or_untested_jaxlib():
  env = {'JAX_PLATFORMS': 'cuda,cpu'}
  with mock.patch('importlib.metadata.version', return_value='0.10.2'):
    assert cpu_tuning.set_cpu_xla_flags(env) == []
  env = {'JAX_PLATFORMS': 'cpu'}
  with mock.patch('importlib.metadata.version', return_value='0.9.0'):
    assert cpu_tuning.set_cpu_xla_flags(env) == []
  assert 'XLA_FLAGS' not in env
  assert cpu_tuning.set_cpu_xla_flags(env, force=True) == list(cpu_tuning.CPU_XLA_FLAGS)


def test_runs_on_cpu_without_accelerator_plugins():
  with mock.patch('importlib.util.find_spec', return_value=None):
    assert cpu_tuning.runs_on_cpu({})
  with mock.patch('importlib.util.find_spec', return_value=object()):
    assert not cpu_tuning.runs_on_cpu({})
  assert not cpu_tuning.runs_on_cpu({'JAX_PLATFORMS': 'tpu'})
