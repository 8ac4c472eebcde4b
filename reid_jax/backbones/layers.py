"""Building blocks shared by every backbone (`reid_jax.models` and this package).

PyTorch-faithful primitives: bias-free convolutions with PyTorch's explicit
symmetric padding, the BatchNorm used everywhere (PyTorch defaults, cross-device
statistics through `axis_name`), PyTorch's default initialisers and its stem max
pooling. They live here, below both `reid_jax.models` and the backbone modules, so
that neither imports the other's module. `reid_jax.models` re-exports them under
their historical names (`_batch_norm`, `_conv`, `Conv`, `conv_kernel_init`,
`stem_max_pool`, ...).

`Conv.input_barrier`: see the CPU speed note (`conv_input_barrier`) in
`reid_jax.models`; values are unchanged either way.
"""

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reid_jax import batch_norm as batch_norm_lib


Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu'),
# i.e. an (untruncated) normal with std sqrt(2 / (kh * kw * out_channels)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default nn.Linear / nn.Conv2d weight init, kaiming_uniform_(a=sqrt(5)) ==
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_channels / groups * kh * kw.
torch_linear_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default nn.Linear / nn.Conv2d bias init, U(+-1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check_choice(field: str, value: Any, allowed: Sequence[Any]) -> None:
  """Raises ValueError naming `field` if `value` is not in `allowed`."""
  if value not in allowed:
    raise ValueError(
        f'Unknown {field}={value!r}; allowed values: {", ".join(map(repr, allowed))}.')


def batch_norm(train: bool, dtype: Dtype, axis_name: Optional[str],
               name: str, use_bias: bool = True) -> batch_norm_lib.BatchNorm:
  """The BatchNorm used everywhere (PyTorch defaults: momentum 0.1, eps 1e-5).

  `reid_jax.batch_norm.BatchNorm`: flax's variables and single-device values, with
  exact (two-pass) statistics and one collective per layer across devices.

  Args:
    train: use (and update) batch statistics; False uses the running ones.
    dtype: activation dtype (statistics and params stay float32).
    axis_name: pmap/shard_map axis for cross-device statistics, or None.
    name: the module name.
    use_bias: whether the BN has a shift (`bias`).

  Returns:
    The (unbound) BatchNorm module.
  """
  return batch_norm_lib.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      use_bias=use_bias,
      scale_init=nn.initializers.ones,
      bias_init=nn.initializers.zeros,
      axis_name=axis_name,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name)


class Conv(nn.Conv):
  """`nn.Conv` that can materialise its input (see `conv_input_barrier`).

  Attributes:
    input_barrier: pass the input through `jax.lax.optimization_barrier` first.
  """
  input_barrier: bool = False

  def __call__(self, inputs: Array) -> Array:
    """Applies the convolution (same parameters and values as `nn.Conv`)."""
    if self.input_barrier:
      inputs = jax.lax.optimization_barrier(inputs)
    return super().__call__(inputs)


def conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str,
         input_barrier: bool = False, *, groups: int = 1,
         padding: Optional[int] = None,
         kernel_init: Initializer = conv_kernel_init) -> Conv:
  """Bias-free square conv with PyTorch's explicit symmetric padding.

  Args:
    features: output channels.
    kernel: kernel size (square).
    stride: stride (both dimensions).
    dtype: activation dtype (the kernel stays float32).
    name: the module name.
    input_barrier: see `Conv`.
    groups: torch's `groups` (flax `feature_group_count`).
    padding: torch's `padding`; None = `kernel // 2`.
    kernel_init: initialiser (default torchvision's ResNet init).

  Returns:
    The (unbound) Conv module.
  """
  pad = kernel // 2 if padding is None else padding
  return Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=False,
      kernel_init=kernel_init,
      dtype=dtype,
      param_dtype=jnp.float32,
      input_barrier=input_barrier,
      name=name)


def stem_max_pool(x: Array) -> Array:
  """torch's MaxPool2d(kernel_size=3, stride=2, padding=1) on NHWC input.

  Args:
    x: (N, H, W, C) input.

  Returns:
    (N, ceil(H/2), ceil(W/2), C); the padding acts as -inf as in PyTorch.
  """
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _ceil_mode_extra(size: int, kernel: int, stride: int) -> int:
  """Right padding that makes a VALID pool produce torch's ceil_mode=True size."""
  if size < kernel:
    raise ValueError(f'Feature map of size {size} is smaller than the {kernel}x{kernel} '
                     'pooling window; use a larger input image.')
  out = -(-(size - kernel) // stride) + 1  # ceil((size - kernel) / stride) + 1
  if (out - 1) * stride >= size:  # torch drops a window starting past the input
    out -= 1
  return (out - 1) * stride + kernel - size


def max_pool_ceil(x: Array, kernel: int = 3, stride: int = 2) -> Array:
  """torch's MaxPool2d(kernel, stride, padding=0, ceil_mode=True) on NHWC input.

  Cadene's SENet stem uses it (kept for compatibility with the Caffe weights). The
  last window may hang over the bottom/right edge; it covers only the valid
  elements (the extra padding acts as -inf, as in PyTorch).

  Args:
    x: (N, H, W, C) input with H, W >= kernel.
    kernel: window size.
    stride: stride.

  Returns:
    (N, ceil((H - kernel) / stride) + 1, ceil((W - kernel) / stride) + 1, C).
  """
  pads: Tuple[Tuple[int, int], ...] = tuple(
      (0, _ceil_mode_extra(int(s), kernel, stride)) for s in x.shape[1:3])
  return nn.max_pool(x, (kernel, kernel), strides=(stride, stride), padding=pads)
