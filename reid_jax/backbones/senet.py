"""SE-ResNet, SE-ResNeXt and SENet-154 as the strong baseline ships them.

Follows michuanhaohao/reid-strong-baseline `modeling/backbones/senet.py` (Cadene's
`pretrainedmodels` SENet, the layout of `se_resnet50-ce0d4300.pth`,
`se_resnext50_32x4d-a260b3a4.pth`, ...) built as its `modeling/baseline.py` does:

  se_resnet{50,101,152}  SEResNetBottleneck, groups 1, 7x7 stem, inplanes 64,
                         1x1 downsample (padding 0);
  se_resnext{50,101}     SEResNeXtBottleneck, groups 32 (32x4d), same stem;
  senet154               SEBottleneck, groups 64, three-3x3-conv stem (64, 64, 128),
                         inplanes 128, 3x3 downsample (padding 1) in layer2-4.

All use SE reduction 16 and `last_stride` on layer4. The stem ends with
MaxPool2d(3, stride=2, ceil_mode=True) (padding 0), not torchvision's padding 1.
Where each block puts its stride (this is Cadene's Caffe-compatible layout, not
torchvision's): SEResNetBottleneck on conv1 (the first 1x1), SEResNeXtBottleneck and
SEBottleneck on conv2 (the 3x3). Channel widths per block (planes = 64 * 2**i):

  SEResNetBottleneck   conv1 planes,      conv2 planes (3x3, groups), conv3 4*planes
  SEResNeXtBottleneck  w = floor(planes * base_width / 64) * groups for conv1/conv2
  SEBottleneck         conv1 2*planes,    conv2 4*planes (3x3, groups), conv3 4*planes

then SE: global average pool -> 1x1 conv (bias) to 4*planes // reduction -> ReLU ->
1x1 conv (bias) -> sigmoid, scaling the block output before the residual add.

Fidelity notes:
  - The reference's `dropout_p` (0.2 for senet154) is never applied in its
    `forward` (which returns layer4's map), so there is no dropout here.
  - Init: Cadene's SENet has no init loop, so every conv (and SE conv bias) starts at
    PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BN at scale 1, bias 0.
  - The SE pooled mean is computed in float32 (cast back to `dtype`).
  - Variable names mirror the torch keys (`layer0.conv1` -> `conv1`, `layer1.0.
    se_module.fc1` -> `layer1_0/se_module/fc1`; see `reid_jax.convert`).
"""

import dataclasses
import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reid_jax.backbones import layers

Array = jax.Array
Dtype = Any
BLOCKS = ('se_resnet', 'se_resnext', 'se')


@dataclasses.dataclass(frozen=True)
class SENetSpec:
  """A named SENet (the arguments `modeling/baseline.py` passes to `SENet`)."""
  stage_sizes: Sequence[int]
  block: str
  groups: int
  reduction: int = 16
  inplanes: int = 64
  input_3x3: bool = False
  downsample_kernel_size: int = 1


SPECS = {
    'se_resnet50': SENetSpec((3, 4, 6, 3), 'se_resnet', groups=1),
    'se_resnet101': SENetSpec((3, 4, 23, 3), 'se_resnet', groups=1),
    'se_resnet152': SENetSpec((3, 8, 36, 3), 'se_resnet', groups=1),
    'se_resnext50': SENetSpec((3, 4, 6, 3), 'se_resnext', groups=32),
    'se_resnext101': SENetSpec((3, 4, 23, 3), 'se_resnext', groups=32),
    'senet154': SENetSpec((3, 8, 36, 3), 'se', groups=64, inplanes=128,
                          input_3x3=True, downsample_kernel_size=3),
}


class SEModule(nn.Module):
  """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean_hw(x))))).

  Attributes:
    reduction: hidden width is channels // reduction.
    dtype: activation dtype.
  """
  reduction: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Rescales the channels of `x` (N, H, W, C)."""
    channels = x.shape[-1]
    hidden = channels // self.reduction
    if hidden == 0:
      raise ValueError(f'SE reduction {self.reduction} leaves no hidden channel for '
                       f'{channels} channels.')
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)

    def fc(features, fan_in, name):
      return nn.Conv(features, (1, 1), use_bias=True,
                     kernel_init=layers.torch_linear_kernel_init,
                     bias_init=layers.torch_linear_bias_init(fan_in),
                     dtype=self.dtype, param_dtype=jnp.float32, name=name)

    s = nn.relu(fc(hidden, channels, 'fc1')(s))
    s = nn.sigmoid(fc(channels, hidden, 'fc2')(s))
    return x * s


def se_convs(block: str, planes: int, stride: int, groups: int,
             base_width: int) -> Tuple[layers.ConvSpec, ...]:
  """The branch convs of one of Cadene's SE bottlenecks (see the module docstring).

  Args:
    block: 'se_resnet', 'se_resnext' or 'se' (SENet-154).
    planes: stage width; the output has 4 * planes channels.
    stride: the block's stride (on conv1 for 'se_resnet', else on conv2).
    groups: groups of the 3x3 conv.
    base_width: SE-ResNeXt's width per group at planes = 64 (4 for 32x4d).

  Returns:
    conv1 (1x1), conv2 (3x3, grouped), conv3 (1x1 to 4 * planes).
  """
  if block == 'se_resnet':
    width1, width2, stride1, stride2 = planes, planes, stride, 1
  elif block == 'se_resnext':
    width1 = width2 = (planes * base_width // 64) * groups
    stride1, stride2 = 1, stride
  else:
    width1, width2, stride1, stride2 = 2 * planes, 4 * planes, 1, stride
  return (layers.ConvSpec(width1, 1, stride1),
          layers.ConvSpec(width2, 3, stride2, groups),
          layers.ConvSpec(4 * planes, 1))


class SENet(layers.Backbone):
  """Cadene's SENet without avgpool/dropout/last_linear (returns layer4's map).

  Attributes (besides `layers.Backbone`'s; a width other than 64 is for tiny test
  models only, and is also the first two 3x3 stem convs' width):
    block: 'se_resnet', 'se_resnext' or 'se'.
    groups: groups of every 3x3 block conv.
    reduction: SE reduction.
    inplanes: channels after the stem (64; 128 for SENet-154).
    input_3x3: stem of three 3x3 convs (width, width, inplanes) instead of a 7x7.
    downsample_kernel_size: kernel of the layer2-4 downsample convs (padding
      kernel // 2); layer1's is always 1x1.
    base_width: SE-ResNeXt's width per group (4).
  """
  block: str = 'se_resnet'
  groups: int = 1
  reduction: int = 16
  inplanes: int = 64
  input_3x3: bool = False
  downsample_kernel_size: int = 1
  base_width: int = 4

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """See `layers.Backbone`; C = 4 * width * 2**(stages - 1); H, W >= 7 (stem pool)."""
    layers.check_choice('block', self.block, BLOCKS)
    conv = layers.ConvSpec
    if self.input_3x3:
      stem = (conv(self.width, 3, 2), conv(self.width, 3, 1), conv(self.inplanes, 3, 1))
    else:
      stem = (conv(self.inplanes, 7, 2),)
    x = layers.stem(x, train, stem, kernel_init=layers.torch_linear_kernel_init,
                    **self.settings())
    x = layers.max_pool_ceil(x, 3, 2)
    for place in layers.residual_stages(self.stage_sizes, self.width, self.last_stride,
                                        self.inplanes, expansion=4):
      x = layers.ResidualBlock(  # SEResNetBottleneck, SEResNeXtBottleneck, SEBottleneck
          convs=se_convs(self.block, place.planes, place.stride, self.groups,
                         self.base_width),
          downsample_kernel=(0 if not place.downsample else
                             1 if place.stage == 0 else self.downsample_kernel_size),
          kernel_init=layers.torch_linear_kernel_init,
          excite=functools.partial(SEModule, self.reduction, self.dtype,
                                   name='se_module'),
          name=place.name, **self.settings())(x, train)
    return x
