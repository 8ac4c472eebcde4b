"""XLA:CPU settings that make training faster on CPUs.

Measured with `benchmarks/train_throughput.py` (ResNet-50 BoT train step, batch 16 at
256x128, 2 cores, jax/jaxlib 0.10.2): the two flags below, together with the models'
`conv_input_barrier` (on by default on CPU, see `reid_jax.models`), take the fp32 step
from 3.6 s to 1.9 s (4.5 -> 8.4 img/s, PyTorch's rate); the values are unchanged.

  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
      convolutions run on XLA's Eigen kernels instead of YNNPACK, whose weight-gradient
      convolutions are 2-4x slower here.
  --xla_disable_hlo_passes=cse_barrier_expander
      keeps `jax.lax.optimization_barrier` until fusion, so the barriers on the conv
      inputs stop XLA from recomputing whole residual chains inside the transposes of
      the weight-gradient convolutions.

The flags must be in XLA_FLAGS before JAX starts its backends, hence
`set_cpu_xla_flags()` is called first thing by `reid_jax.main` (and the benchmark).
They are only added on CPU-only installs of a jaxlib where they were measured: an
unknown XLA flag aborts the process.
"""

import importlib.metadata
import importlib.util
import os
from collections.abc import MutableMapping
from typing import Optional

CPU_XLA_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
    '--xla_disable_hlo_passes=cse_barrier_expander',
)
# jaxlib versions whose XLA knows (and was measured with) CPU_XLA_FLAGS.
TESTED_JAXLIB_PREFIXES = ('0.10.',)
# Modules whose presence means JAX may pick an accelerator over the CPU.
_ACCELERATOR_MODULES = ('jax_plugins', 'libtpu', 'jax_cuda12_plugin',
                        'jax_cuda13_plugin')


def runs_on_cpu(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting JAX.

  Args:
    environ: the environment (default os.environ); JAX_PLATFORMS wins when set.

  Returns:
    True if JAX_PLATFORMS starts with 'cpu', or it is unset and no accelerator plugin
    (jax_plugins, libtpu, jax_cuda*_plugin) is installed.
  """
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def set_cpu_xla_flags(environ: Optional[MutableMapping[str, str]] = None,
                      force: bool = False) -> list[str]:
  """Appends CPU_XLA_FLAGS to XLA_FLAGS when JAX will run on the CPU.

  Must run before JAX initialises its backends (the first computation or device
  query). A flag whose name is already in XLA_FLAGS is left as the user set it.

  Args:
    environ: the environment to change (default os.environ).
    force: add the flags whatever the platform and jaxlib version.

  Returns:
    The flags added (empty when none were).
  """
  environ = os.environ if environ is None else environ
  if not force:
    try:
      version = importlib.metadata.version('jaxlib')
    except importlib.metadata.PackageNotFoundError:
      return []
    if not version.startswith(TESTED_JAXLIB_PREFIXES) or not runs_on_cpu(environ):
      return []
  current = environ.get('XLA_FLAGS', '')
  added = [f for f in CPU_XLA_FLAGS if f.split('=')[0] not in current]
  if added:
    environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added
