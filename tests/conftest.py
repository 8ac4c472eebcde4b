"""Test-wide setup: 4 virtual CPU devices so pmap paths are exercised on CPU.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
