"""ResNet-IBN-a (IBN-Net, Pan et al. 2018) as the strong baseline ships it.

Follows michuanhaohao/reid-strong-baseline `modeling/backbones/resnet_ibn_a.py`
(the layout of the IBN-Net release `resnet50_ibn_a.pth`): torchvision's ResNet
(7x7 stem, v1.5 bottleneck with the stride on the 3x3 conv, `last_stride` on
layer4) whose bottlenecks in layer1-3 replace `bn1` (after the first 1x1 conv) by
an IBN layer: InstanceNorm2d(affine=True) on the first `planes // 2` channels and
BatchNorm2d on the other `planes - planes // 2`, concatenated in that order.
layer4 (the reference's `planes == 512`; here: the 4th stage, the same at the
standard width) keeps a plain BatchNorm.

Fidelity notes:
  - Instance norm normalises each sample and channel over H, W with the biased
    variance, eps 1e-5 (PyTorch's defaults), in train and eval mode alike (no
    running statistics, as `track_running_stats=False`); it has no cross-device
    statistics, so only the BN half uses `bn_axis_name`.
  - Conv init: normal(0, sqrt(2 / (k * k * out_channels))) (the reference's loop,
    identical to torchvision's); norms start at scale 1, bias 0.
  - Variable names mirror the torch keys: `layer{i}_{j}/bn1/IN/{scale,bias}` and
    `layer{i}_{j}/bn1/BN/...` (see `reid_jax.convert`).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reid_jax.backbones import layers

Array = jax.Array
Dtype = Any

# name -> blocks per stage (reference: resnet{50,101,152}_ibn_a).
SPECS = {
    'resnet50_ibn_a': (3, 4, 6, 3),
    'resnet101_ibn_a': (3, 4, 23, 3),
    'resnet152_ibn_a': (3, 8, 36, 3),
}
NUM_IBN_STAGES = 3  # layer1..layer3 use IBN; layer4 does not.


class IBN(nn.Module):
  """IBN-a normalisation: InstanceNorm on the first half, BatchNorm on the rest.

  Attributes:
    train: BatchNorm half uses (and updates) batch statistics if True.
    dtype: activation dtype (params and statistics float32).
    bn_axis_name: axis name for the BatchNorm half's cross-device statistics.
  """
  train: bool
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises `x` (N, H, W, C): IN on channels [0, C // 2), BN on the rest."""
    channels = x.shape[-1]
    half = channels // 2
    if half == 0:
      raise ValueError(f'IBN needs at least 2 channels, got {channels}.')
    inst = nn.InstanceNorm(
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name='IN')(x[..., :half])
    bn = layers.batch_norm(self.train, self.dtype, self.bn_axis_name, 'BN')(
        x[..., half:])
    return jnp.concatenate([inst.astype(self.dtype), bn.astype(self.dtype)], axis=-1)


class BottleneckIBN(nn.Module):
  """The reference's Bottleneck_IBN: 1x1 - IBN/BN - 3x3 (stride) - 1x1 (x4), + skip.

  Attributes:
    planes: width of the 1x1/3x3 convs; output channels are 4 * planes.
    ibn: IBN (True) or BatchNorm (False) after the first conv.
    stride: stride of the 3x3 conv (and of the downsample conv).
    downsample: whether the skip path is a 1x1 conv + BN.
    dtype: compute dtype.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see `reid_jax.models` (CPU speed only).
  """
  planes: int
  ibn: bool
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  conv_input_barrier: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies the block to (N, H, W, C); returns (N, H', W', 4 * planes)."""
    bn = functools.partial(layers.batch_norm, train, self.dtype, self.bn_axis_name)
    conv = functools.partial(layers.conv, dtype=self.dtype,
                             input_barrier=self.conv_input_barrier)
    out = conv(self.planes, 1, 1, name='conv1')(x)
    if self.ibn:
      out = IBN(train, self.dtype, self.bn_axis_name, name='bn1')(out)
    else:
      out = bn('bn1')(out)
    out = nn.relu(out)
    out = conv(self.planes, 3, self.stride, name='conv2')(out)
    out = nn.relu(bn('bn2')(out))
    out = conv(self.planes * 4, 1, 1, name='conv3')(out)
    out = bn('bn3')(out)
    identity = x
    if self.downsample:
      identity = conv(self.planes * 4, 1, self.stride, name='downsample_conv')(x)
      identity = bn('downsample_bn')(identity)
    return nn.relu(out + identity)


class ResNetIBNa(nn.Module):
  """The reference's ResNet_IBN without avgpool/fc (returns the feature map).

  Attributes:
    stage_sizes: blocks in layer1..layer4.
    last_stride: stride of layer4 (1 for the re-ID baseline).
    width: stem channels (the reference's `scale`, 64); stage i uses width * 2**i.
    dtype: compute dtype of activations; params and statistics stay float32.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see `reid_jax.models` (CPU speed only).
  """
  stage_sizes: Sequence[int]
  last_stride: int = 1
  width: int = 64
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  conv_input_barrier: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Computes the final feature map.

    Args:
      x: (N, H, W, 3) images.
      train: use batch statistics (and update running ones) if True.

    Returns:
      (N, H/16 or H/32, W/16 or W/32, 4 * width * 2**(stages - 1)) in `dtype`.
    """
    layers.check_choice('last_stride', self.last_stride, (1, 2))
    x = jnp.asarray(x, self.dtype)
    x = layers.conv(self.width, 7, 2, self.dtype, 'conv1', self.conv_input_barrier)(x)
    x = layers.batch_norm(train, self.dtype, self.bn_axis_name, 'bn1')(x)
    x = layers.stem_max_pool(nn.relu(x))
    in_channels = self.width
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**i
      stage_stride = 1 if i == 0 else (self.last_stride if i == 3 else 2)
      for j in range(num_blocks):
        stride = stage_stride if j == 0 else 1
        x = BottleneckIBN(
            planes=planes,
            ibn=i < NUM_IBN_STAGES,
            stride=stride,
            downsample=j == 0 and (stride != 1 or in_channels != planes * 4),
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            conv_input_barrier=self.conv_input_barrier,
            name=f'layer{i + 1}_{j}')(x, train)
        in_channels = planes * 4
    return x
