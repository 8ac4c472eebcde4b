"""The strong baseline's backbones besides torchvision's ResNet (`reid_jax.models`).

One module per family, each mirroring michuanhaohao/reid-strong-baseline's
`modeling/backbones/` file, with the names its `modeling/baseline.py` accepts as
`MODEL.NAME`:

  resnet_ibn_a  'resnet50_ibn_a', 'resnet101_ibn_a', 'resnet152_ibn_a'
  senet         'se_resnet50', 'se_resnet101', 'se_resnet152', 'se_resnext50',
                'se_resnext101', 'senet154'

(`resnet101_ibn_a` / `resnet152_ibn_a` are defined in the reference's
`resnet_ibn_a.py`; its `baseline.py` only wires up the 50-layer one.) Every backbone
returns layer4's feature map with 2048 channels at the standard width. `layers`
holds the primitives shared with `reid_jax.models`.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from reid_jax.backbones import layers
from reid_jax.backbones import resnet_ibn_a
from reid_jax.backbones import senet

NAMES: Tuple[str, ...] = tuple(resnet_ibn_a.SPECS) + tuple(senet.SPECS)


def stage_sizes(name: str) -> Tuple[int, ...]:
  """Blocks per stage of the named backbone."""
  layers.check_choice('backbone', name, NAMES)
  if name in resnet_ibn_a.SPECS:
    return tuple(resnet_ibn_a.SPECS[name])
  return tuple(senet.SPECS[name].stage_sizes)


def feature_dim(name: str, stages: Optional[Sequence[int]] = None,
                width: int = 64) -> int:
  """Channels of the final feature map (2048 at the standard width and depth).

  Args:
    name: one of NAMES.
    stages: an override of the blocks per stage (only its length matters).
    width: layer1's planes (64).

  Returns:
    4 * width * 2**(number of stages - 1).
  """
  num_stages = len(stages if stages is not None else stage_sizes(name))
  return 4 * width * 2**(num_stages - 1)


def create(name: str, *, last_stride: int = 1, dtype: Any = jnp.float32,
           bn_axis_name: Optional[str] = None, conv_input_barrier: bool = False,
           stages: Optional[Sequence[int]] = None, width: int = 64,
           module_name: Optional[str] = None) -> nn.Module:
  """Builds a named backbone as the strong baseline's `Baseline.__init__` does.

  Args:
    name: one of NAMES.
    last_stride: stride of layer4 (1 or 2).
    dtype: activation dtype (params and statistics stay float32).
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see `reid_jax.models` (CPU speed only).
    stages: blocks per stage override (tiny test models); None = the named one.
    width: layer1's planes, 64 as published; other values scale every stage, the
      SENet stems and the SENet group counts (tiny test models only).
    module_name: flax name of the module (e.g. 'backbone').

  Returns:
    The unbound module; `module(x, train)` maps (N, H, W, 3) images to layer4's map.
  """
  sizes = tuple(stages) if stages is not None else stage_sizes(name)
  common = dict(stage_sizes=sizes, last_stride=last_stride, width=width, dtype=dtype,
                bn_axis_name=bn_axis_name, conv_input_barrier=conv_input_barrier,
                name=module_name)
  if name in resnet_ibn_a.SPECS:
    return resnet_ibn_a.ResNetIBNa(**common)
  spec = senet.SPECS[name]
  return senet.SENet(block=spec.block, groups=max(1, spec.groups * width // 64),
                     reduction=spec.reduction,
                     inplanes=spec.inplanes * width // 64, input_3x3=spec.input_3x3,
                     downsample_kernel_size=spec.downsample_kernel_size, **common)
