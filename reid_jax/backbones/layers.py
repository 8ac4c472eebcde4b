"""Building blocks shared by every backbone (`reid_jax.models` and this package).

PyTorch-faithful primitives: bias-free convolutions with PyTorch's explicit
symmetric padding, the BatchNorm used everywhere (PyTorch defaults, cross-device
statistics through `axis_name`), PyTorch's default initialisers and its stem max
pooling; and the residual structure every backbone shares: `ResidualBlock` (a
conv-BN chain, an optional channel rescaling such as SE, the skip path) and
`residual_stages` (where torchvision's layer1..layer4 put their blocks, strides and
downsamples). They live here, below both `reid_jax.models` and the backbone
modules, so that neither imports the other's module.

`Conv.input_barrier`: see the CPU speed note (`conv_input_barrier`) in
`reid_jax.models`; values are unchanged either way.
"""

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from input_pipeline.choices import check_choice  # the project's one choice check
from reid_jax import batch_norm as batch_norm_lib

# config.model.last_stride: the fourth stage's stride (1: BoT's last-stride trick).
LAST_STRIDES = (1, 2)


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


class ConvNetModule(nn.Module):
  """The settings every backbone module shares (keyword-only fields).

  Attributes:
    dtype: compute dtype of activations; params and statistics stay float32.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see `reid_jax.models` (CPU speed only; values unchanged).
  """
  dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)
  bn_axis_name: Optional[str] = dataclasses.field(default=None, kw_only=True)
  conv_input_barrier: bool = dataclasses.field(default=False, kw_only=True)

  @nn.nowrap
  def settings(self) -> dict:
    """These settings, as keyword arguments for a submodule."""
    return dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                conv_input_barrier=self.conv_input_barrier)


class Backbone(ConvNetModule):
  """A backbone: `module(x, train)` maps (N, H, W, 3) images to layer4's feature map.

  Attributes:
    stage_sizes: blocks in layer1..layer4.
    last_stride: stride of layer4 (1 for the re-ID baseline, 2 in torchvision).
    width: planes of layer1 (64 as published); stage i uses width * 2**i.
  """
  stage_sizes: Sequence[int]
  last_stride: int = 1
  width: int = 64

  def __call__(self, x: Array, train: bool) -> Array:
    """Computes layer4's feature map (subclasses: a compact method).

    Args:
      x: (N, H, W, 3) images.
      train: use batch statistics (and update running ones) if True.

    Returns:
      (N, H', W', C) in `dtype`, about (H, W) / 16 with last_stride 1 and / 32 with
      2; each subclass says C.
    """
    raise NotImplementedError


class ConvSpec(NamedTuple):
  """One conv of a residual branch (bias-free, padding kernel // 2).

  Attributes:
    features: output channels.
    kernel: square kernel size.
    stride: stride (both dimensions).
    groups: torch's `groups`.
  """
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1


def bottleneck_convs(planes: int, stride: int) -> Tuple[ConvSpec, ...]:
  """torchvision's Bottleneck (v1.5): 1x1, 3x3 with the stride, 1x1 to 4 * planes."""
  return (ConvSpec(planes, 1), ConvSpec(planes, 3, stride), ConvSpec(4 * planes, 1))


def stem(x: Array, train: bool, convs: Sequence[ConvSpec], dtype: Dtype,
         bn_axis_name: Optional[str], conv_input_barrier: bool,
         kernel_init: Initializer = conv_kernel_init) -> Array:
  """A backbone's stem before its pooling: `conv{k}` - `bn{k}` - ReLU for each conv.

  torchvision's (and IBN-a's) is one 7x7 conv with stride 2; Cadene's SENets use one
  7x7 or three 3x3 convs. Call it inside the backbone's compact `__call__`.

  Args:
    x: (N, H, W, 3) images, cast to `dtype` first.
    train: use batch statistics (and update running ones) if True.
    convs: the stem's convs, in order.
    dtype: compute dtype.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see `reid_jax.models` (CPU speed only).
    kernel_init: initialiser of the conv kernels.

  Returns:
    The (N, H', W', convs[-1].features) activations, before the stem's max pool.
  """
  x = jnp.asarray(x, dtype)
  for k, spec in enumerate(convs, start=1):
    x = conv(spec.features, spec.kernel, spec.stride, dtype, f'conv{k}',
             conv_input_barrier, groups=spec.groups, kernel_init=kernel_init)(x)
    x = nn.relu(batch_norm(train, dtype, bn_axis_name, f'bn{k}')(x))
  return x


class ResidualBlock(ConvNetModule):
  """The residual block of every backbone: relu(excite(branch(x)) + skip(x)).

  branch: `conv{k}` - `bn{k}` for the k-th of `convs`, with a ReLU after each but the
  last; skip: the identity, or `downsample_conv` (a `downsample_kernel` conv whose
  stride is the branch's, to the branch's channels) - `downsample_bn`. torchvision's
  BasicBlock / Bottleneck, IBN-a's Bottleneck_IBN (`norm1`) and Cadene's SE
  bottlenecks (`excite`) are instances; variable names mirror their torch keys.

  Attributes:
    convs: the branch's convs, in order.
    downsample_kernel: kernel of the skip conv; 0 = identity skip.
    kernel_init: initialiser of every conv kernel.
    norm1: builds the first norm as `norm1(train, dtype, bn_axis_name, name='bn1')`
      (default `batch_norm`; IBN-a passes its IBN layer).
    excite: builds the module applied to the branch's output before the add (e.g.
      a squeeze-and-excitation module with its name); None: nothing.
  """
  convs: Tuple[ConvSpec, ...]
  downsample_kernel: int = 0
  kernel_init: Initializer = conv_kernel_init
  norm1: Callable[..., nn.Module] = batch_norm
  excite: Optional[Callable[[], nn.Module]] = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies the block.

    Args:
      x: (N, H, W, C) input.
      train: use batch statistics (and update running ones) if True.

    Returns:
      (N, H', W', convs[-1].features) output.
    """
    out = x
    for k, spec in enumerate(self.convs, start=1):
      out = conv(spec.features, spec.kernel, spec.stride, self.dtype, f'conv{k}',
                 self.conv_input_barrier, groups=spec.groups,
                 kernel_init=self.kernel_init)(out)
      norm = self.norm1 if k == 1 else batch_norm
      out = norm(train, self.dtype, self.bn_axis_name, name=f'bn{k}')(out)
      if k < len(self.convs):
        out = nn.relu(out)
    if self.excite is not None:
      out = self.excite()(out)
    identity = x
    if self.downsample_kernel:
      stride = 1
      for spec in self.convs:
        stride *= spec.stride
      identity = conv(self.convs[-1].features, self.downsample_kernel, stride,
                      self.dtype, 'downsample_conv', self.conv_input_barrier,
                      kernel_init=self.kernel_init)(x)
      identity = batch_norm(train, self.dtype, self.bn_axis_name, 'downsample_bn')(
          identity)
    return nn.relu(out + identity)


class BlockPlace(NamedTuple):
  """Where a block sits in the stages (see `residual_stages`).

  Attributes:
    name: the block's module name, `layer{stage + 1}_{index}`.
    stage: 0-based stage.
    planes: the stage's width, `width * 2**stage`.
    stride: the block's stride.
    downsample: whether its skip path needs a conv (it changes the shape).
  """
  name: str
  stage: int
  planes: int
  stride: int
  downsample: bool


def residual_stages(stage_sizes: Sequence[int], width: int, last_stride: int,
                    in_channels: int, expansion: int) -> Iterator[BlockPlace]:
  """The blocks of torchvision's layer1..layer4, which IBN-a and SENet share.

  Stage i has planes width * 2**i and `stage_sizes[i]` blocks; its first block has
  stride 1 (layer1), 2 (layer2, layer3) or `last_stride` (layer4) and a downsampling
  skip path when it changes the stride or the channels (planes * expansion).

  Args:
    stage_sizes: blocks per stage.
    width: planes of the first stage.
    last_stride: stride of the fourth stage.
    in_channels: channels entering the first stage (the stem's).
    expansion: output channels of a block over its planes.

  Yields:
    One `BlockPlace` per block, in order.
  """
  check_choice('last_stride', last_stride, LAST_STRIDES)
  for i, num_blocks in enumerate(stage_sizes):
    planes = width * 2**i
    stage_stride = 1 if i == 0 else (last_stride if i == 3 else 2)
    for j in range(num_blocks):
      stride = stage_stride if j == 0 else 1
      downsample = j == 0 and (stride != 1 or in_channels != planes * expansion)
      yield BlockPlace(f'layer{i + 1}_{j}', i, planes, stride, downsample)
      in_channels = planes * expansion


def torchvision_resnet(backbone: Backbone, x: Array, train: bool,
                       block_convs: Callable[[int, int], Tuple[ConvSpec, ...]],
                       expansion: int,
                       norm1: Optional[Callable[[int], Callable[..., nn.Module]]] = None
                       ) -> Array:
  """torchvision's ResNet layout, inside a backbone's compact `__call__`.

  conv1 (7x7, stride 2, `width` channels) - bn1 - ReLU - max pool (3x3, stride 2,
  padding 1), then the residual stages of `ResidualBlock`s.

  Args:
    backbone: the calling module (its stage sizes, last stride, width, settings).
    x: (N, H, W, 3) images.
    train: use batch statistics (and update running ones) if True.
    block_convs: a block's branch convs for (planes, stride).
    expansion: a block's output channels over its planes.
    norm1: the first norm of the blocks of stage i is norm1(i) (see
      `ResidualBlock.norm1`); None: `batch_norm` everywhere.

  Returns:
    layer4's (N, H/16 or H/32, W/16 or W/32, expansion * width * 2**(stages - 1))
    feature map in `backbone.dtype`.
  """
  x = stem(x, train, (ConvSpec(backbone.width, 7, 2),), **backbone.settings())
  x = stem_max_pool(x)
  for place in residual_stages(backbone.stage_sizes, backbone.width,
                               backbone.last_stride, backbone.width, expansion):
    x = ResidualBlock(convs=block_convs(place.planes, place.stride),
                      downsample_kernel=int(place.downsample),
                      norm1=batch_norm if norm1 is None else norm1(place.stage),
                      name=place.name, **backbone.settings())(x, train)
  return x
