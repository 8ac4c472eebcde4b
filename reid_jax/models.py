"""ResNet backbones and the BoT re-ID model (BNNeck head) in flax.linen.

The strong baseline's other backbones (ResNet-IBN-a, SE-ResNet, SE-ResNeXt,
SENet-154) live in `reid_jax.backbones`; `ReIDModel` builds any of MODEL_NAMES.

Layout follows torchvision's ResNet (v1.5: the stride of a Bottleneck sits on its
3x3 conv) with explicit symmetric padding, so converted torchvision weights give
the same outputs as PyTorch (see `reid_jax.convert` for the name mapping).
Images are NHWC.

Parameter tree of `ReIDModel` (variables `params` and `batch_stats`):

  backbone/conv1, backbone/bn1,
  backbone/layer{1..4}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_conv,
                             downsample_bn]}
  gem/p                  (pooling='gem' only; learnable GeM exponent)
  bottleneck             (neck='bnneck' only; BatchNorm1d without bias)
  classifier/kernel[, classifier/bias]   (bias only for neck='no')

BatchNorm note: flax's BatchNorm updates `batch_stats['var']` with the *biased*
batch variance, whereas PyTorch's running_var uses the *unbiased* one
(n / (n - 1) times larger, n = N*H*W). The normalisation of the batch itself in
training mode is identical (both use the biased variance); only the running
statistics used at test time differ slightly. We keep flax's behaviour.
PyTorch momentum 0.1 equals flax momentum 0.9.

CPU speed note (`conv_input_barrier`): the weight gradient of a convolution on XLA:CPU
transposes the conv input to (C, H, W, N); XLA fuses the whole cheap elementwise
producer chain of that input (BN apply, residual adds and ReLUs of the previous
blocks) into the transpose and recomputes it with a transposed, cache-hostile access
pattern, which made those transposes ~40% of a ResNet-50 train step. With
`conv_input_barrier` every conv input passes `jax.lax.optimization_barrier`, so the
transpose reads the materialised activation instead. XLA:CPU drops barriers early
unless run with `--xla_disable_hlo_passes=cse_barrier_expander` (`reid_jax.main`
adds it on CPU, see `reid_jax.cpu_tuning`); without it the barriers are no-ops.
Values are unchanged either way.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reid_jax import backbones
from reid_jax.backbones import layers

Array = jax.Array
Dtype = Any

# name -> (stage sizes, block type)
RESNET_SPECS = {
    'resnet18': ((2, 2, 2, 2), 'basic'),
    'resnet34': ((3, 4, 6, 3), 'basic'),
    'resnet50': ((3, 4, 6, 3), 'bottleneck'),
    'resnet101': ((3, 4, 23, 3), 'bottleneck'),
    'resnet152': ((3, 8, 36, 3), 'bottleneck'),
}


def basic_convs(planes: int, stride: int) -> Tuple[layers.ConvSpec, ...]:
  """torchvision's BasicBlock: 3x3 with the stride, 3x3."""
  return (layers.ConvSpec(planes, 3, stride), layers.ConvSpec(planes, 3))


# Block type -> (its branch's convs for (planes, stride), its expansion): torchvision's
# BasicBlock and Bottleneck (v1.5), as `layers.ResidualBlock`s.
BLOCKS = {'basic': (basic_convs, 1), 'bottleneck': (layers.bottleneck_convs, 4)}
BLOCK_TYPES = tuple(BLOCKS)
# Every `ReIDModel.backbone` / `config.model.name`: torchvision ResNets (here) and
# the strong baseline's other backbones (`reid_jax.backbones`).
MODEL_NAMES = tuple(RESNET_SPECS) + backbones.NAMES
NECKS = ('bnneck', 'no')
NECK_FEATS = ('after', 'before')
POOLINGS = ('avg', 'gem')
# BoT's weights_init_classifier: normal(std=0.001).
classifier_kernel_init = nn.initializers.normal(stddev=0.001)


class ResNet(layers.Backbone):
  """torchvision-layout ResNet backbone without the fc layer.

  Attributes (besides `layers.Backbone`'s; width is also the stem's channels):
    block: 'basic' or 'bottleneck'.
  """
  block: str = 'bottleneck'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """See `layers.Backbone`; C = 8 * width ('basic') or 32 * width ('bottleneck')."""
    layers.check_choice('block', self.block, BLOCK_TYPES)
    return layers.torchvision_resnet(self, x, train, *BLOCKS[self.block])


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
  """Builds any of MODEL_NAMES' backbones (a ResNet here, or `backbones.create`'s).

  Args:
    name: one of MODEL_NAMES.
    **kwargs: `reid_jax.backbones.create`'s keyword arguments (last_stride, dtype,
      bn_axis_name, conv_input_barrier, stages, width, module_name).

  Returns:
    The unbound module; `module(x, train)` maps (N, H, W, 3) images to layer4's map.
  """
  layers.check_choice('backbone', name, MODEL_NAMES)
  if name not in RESNET_SPECS:
    return backbones.create(name, **kwargs)
  stage_sizes, block = RESNET_SPECS[name]
  stages = kwargs.pop('stages', None)
  return ResNet(stage_sizes=stage_sizes if stages is None else tuple(stages),
                block=block, name=kwargs.pop('module_name', None), **kwargs)


class GeneralizedMeanPooling(nn.Module):
  """GeM pooling with a learnable exponent (fast-reid's GeneralizedMeanPoolingP).

  y = mean_{h,w}(max(x, eps) ** p) ** (1 / p), computed in float32.

  Attributes:
    init_p: initial value of the learnable exponent `p` (shape (1,)).
    eps: clamp value before the power.
  """
  init_p: float = 3.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Pools the spatial dimensions.

    Args:
      x: (N, H, W, C) feature map.

    Returns:
      (N, C) float32 pooled features.
    """
    p = self.param('p', nn.initializers.constant(self.init_p), (1,), jnp.float32)
    x = jnp.maximum(x.astype(jnp.float32), self.eps)
    return jnp.mean(x**p, axis=(1, 2))**(1.0 / p)


class ReIDModel(nn.Module):
  """The BoT strong-baseline model: backbone + global pooling + (BN)neck + classifier.

  Attributes:
    num_classes: number of training identities.
    backbone: one of MODEL_NAMES: a torchvision ResNet (RESNET_SPECS) or one of
      `reid_jax.backbones.NAMES` (ResNet-IBN-a, SE-ResNet, SE-ResNeXt, SENet-154).
    last_stride: stride of layer4 (1 or 2).
    neck: 'bnneck' (BatchNorm1d without bias before the bias-free classifier) or
      'no' (classifier with bias directly on the pooled feature).
    neck_feat: test feature, 'after' (BN output) or 'before' (pooled feature)
      the neck; with neck='no' the pooled feature is always returned.
    pooling: 'avg' or 'gem' (learnable exponent initialised to `gem_p`).
    gem_p: initial GeM exponent.
    dtype: compute dtype of the backbone activations; pooling, neck, classifier
      and all outputs are float32.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    stage_sizes: optional override of the backbone's blocks per stage (tests,
      tiny models); None uses the named backbone's.
    width: stem width of the backbone (64 = torchvision).
    conv_input_barrier: see the module docstring (CPU speed only; values unchanged).
  """
  num_classes: int
  backbone: str = 'resnet50'
  last_stride: int = 1
  neck: str = 'bnneck'
  neck_feat: str = 'after'
  pooling: str = 'avg'
  gem_p: float = 3.0
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  stage_sizes: Optional[Tuple[int, ...]] = None
  width: int = 64
  conv_input_barrier: bool = False

  def __post_init__(self):
    layers.check_choice('backbone', self.backbone, MODEL_NAMES)
    layers.check_choice('last_stride', self.last_stride, layers.LAST_STRIDES)
    layers.check_choice('neck', self.neck, NECKS)
    layers.check_choice('neck_feat', self.neck_feat, NECK_FEATS)
    layers.check_choice('pooling', self.pooling, POOLINGS)
    super().__post_init__()

  @property
  def feature_dim(self) -> int:
    """Dimension of the pooled feature (2048 for resnet50, 512 for resnet18)."""
    if self.backbone not in RESNET_SPECS:
      return backbones.feature_dim(self.backbone, self.stage_sizes, self.width)
    stage_sizes, block = RESNET_SPECS[self.backbone]
    num_stages = len(self.stage_sizes or stage_sizes)
    return self.width * 2**(num_stages - 1) * BLOCKS[block][1]

  @nn.compact
  def __call__(self, x: Array, train: bool):
    """Runs the model.

    Args:
      x: (N, H, W, 3) normalised images.
      train: training mode (batch statistics, returns logits).

    Returns:
      train=True: (logits (N, num_classes) float32, feat (N, D) float32), feat
        being the pooled feature before the neck (for the triplet loss).
      train=False: the (N, D) float32 test feature selected by `neck_feat`.
    """
    backbone = create_backbone(
        self.backbone,
        last_stride=self.last_stride,
        dtype=self.dtype,
        bn_axis_name=self.bn_axis_name,
        conv_input_barrier=self.conv_input_barrier,
        stages=self.stage_sizes,
        width=self.width,
        module_name='backbone')
    fmap = backbone(x, train)
    if self.pooling == 'gem':
      global_feat = GeneralizedMeanPooling(init_p=self.gem_p, name='gem')(fmap)
    else:
      global_feat = jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))

    if self.neck == 'bnneck':
      # BoT freezes the neck BN's bias at 0: equivalent to having none.
      feat = layers.batch_norm(train, jnp.float32, self.bn_axis_name, 'bottleneck',
                               use_bias=False)(global_feat)
      classifier = nn.Dense(
          self.num_classes,
          use_bias=False,
          kernel_init=classifier_kernel_init,
          dtype=jnp.float32,
          param_dtype=jnp.float32,
          name='classifier')
    else:
      feat = global_feat
      classifier = nn.Dense(
          self.num_classes,
          use_bias=True,
          kernel_init=layers.torch_linear_kernel_init,
          bias_init=layers.torch_linear_bias_init(global_feat.shape[-1]),
          dtype=jnp.float32,
          param_dtype=jnp.float32,
          name='classifier')

    if train:
      logits = classifier(feat)
      return logits.astype(jnp.float32), global_feat.astype(jnp.float32)
    # Create the classifier params at init time even in eval mode.
    if self.is_initializing():
      classifier(feat)
    if self.neck_feat == 'after':
      return feat.astype(jnp.float32)
    return global_feat.astype(jnp.float32)


def create_model(model_config: Any, num_classes: int, dtype: Dtype = jnp.float32,
                 bn_axis_name: Optional[str] = None,
                 conv_input_barrier: Optional[bool] = None) -> ReIDModel:
  """Builds the ReIDModel described by `config.model`.

  Args:
    model_config: `config.model` (fields name, last_stride, neck, neck_feat,
      pooling, gem_p, stage_sizes (() = the named network's) and width).
    num_classes: number of training identities.
    dtype: compute dtype of activations.
    bn_axis_name: axis name for cross-device BatchNorm statistics (e.g. 'batch'
      under pmap), None for per-device statistics.
    conv_input_barrier: see the module docstring; None: on when JAX's default
      backend is the CPU.

  Returns:
    The (unbound) model.
  """
  stage_sizes = model_config.stage_sizes
  if conv_input_barrier is None:
    conv_input_barrier = jax.default_backend() == 'cpu'
  return ReIDModel(
      num_classes=num_classes,
      backbone=model_config.name,
      last_stride=int(model_config.last_stride),
      neck=model_config.neck,
      neck_feat=model_config.neck_feat,
      pooling=model_config.pooling,
      gem_p=float(model_config.gem_p),
      dtype=dtype,
      bn_axis_name=bn_axis_name,
      stage_sizes=tuple(stage_sizes) if stage_sizes else None,
      width=int(model_config.width),
      conv_input_barrier=bool(conv_input_barrier))

