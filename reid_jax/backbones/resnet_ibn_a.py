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

from typing import Any, Optional

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


class ResNetIBNa(layers.Backbone):
  """The reference's ResNet_IBN without avgpool/fc (returns the feature map).

  Its fields are `layers.Backbone`'s; `width` is the reference's `scale` (64), also
  the stem's channels.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """See `layers.Backbone`; C = 4 * width * 2**(stages - 1)."""
    return layers.torchvision_resnet(  # the reference's Bottleneck_IBN blocks
        self, x, train, layers.bottleneck_convs, 4,
        norm1=lambda stage: IBN if stage < NUM_IBN_STAGES else layers.batch_norm)
