"""Test-wide setup: 4 virtual CPU devices so pmap paths are exercised on CPU.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
The measured XLA:CPU speed flags of `reid_jax.cpu_tuning` are added as `main` does.
"""

import os

from reid_jax import cpu_tuning

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
cpu_tuning.set_cpu_xla_flags()
