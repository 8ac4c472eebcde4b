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

import functools
from typing import Any, Optional, Sequence, Tuple

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
BLOCK_TYPES = ('basic', 'bottleneck')
# Every `ReIDModel.backbone` / `config.model.name`: torchvision ResNets (here) and
# the strong baseline's other backbones (`reid_jax.backbones`).
MODEL_NAMES = tuple(RESNET_SPECS) + backbones.NAMES
NECKS = ('bnneck', 'no')
NECK_FEATS = ('after', 'before')
POOLINGS = ('avg', 'gem')

# Shared primitives (see `reid_jax.backbones.layers`), under their historical names.
conv_kernel_init = layers.conv_kernel_init
torch_linear_kernel_init = layers.torch_linear_kernel_init
_torch_linear_bias_init = layers.torch_linear_bias_init
_check_choice = layers.check_choice
_batch_norm = layers.batch_norm
Conv = layers.Conv
_conv = layers.conv
stem_max_pool = layers.stem_max_pool
# BoT's weights_init_classifier: normal(std=0.001).
classifier_kernel_init = nn.initializers.normal(stddev=0.001)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 conv (stride) - BN - ReLU - 3x3 conv - BN, + skip.

  Attributes:
    planes: output channels.
    stride: stride of the first 3x3 conv (and of the downsample conv).
    downsample: whether the skip path is a 1x1 conv + BN.
    dtype: compute dtype.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see the module docstring (CPU speed only).
  """
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  conv_input_barrier: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies the block.

    Args:
      x: (N, H, W, C) input.
      train: use batch statistics (and update running ones) if True.

    Returns:
      (N, H', W', planes) output.
    """
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    conv = functools.partial(_conv, dtype=self.dtype,
                             input_barrier=self.conv_input_barrier)
    out = conv(self.planes, 3, self.stride, name='conv1')(x)
    out = nn.relu(bn('bn1')(out))
    out = conv(self.planes, 3, 1, name='conv2')(out)
    out = bn('bn2')(out)
    identity = x
    if self.downsample:
      identity = conv(self.planes, 1, self.stride, name='downsample_conv')(x)
      identity = bn('downsample_bn')(identity)
    return nn.relu(out + identity)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 - 3x3 (stride) - 1x1 (x4), + skip.

  Attributes:
    planes: width of the 1x1/3x3 convs; output channels are 4 * planes.
    stride: stride of the 3x3 conv (and of the downsample conv).
    downsample: whether the skip path is a 1x1 conv + BN.
    dtype: compute dtype.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see the module docstring (CPU speed only).
  """
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  conv_input_barrier: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies the block.

    Args:
      x: (N, H, W, C) input.
      train: use batch statistics (and update running ones) if True.

    Returns:
      (N, H', W', 4 * planes) output.
    """
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    conv = functools.partial(_conv, dtype=self.dtype,
                             input_barrier=self.conv_input_barrier)
    out = conv(self.planes, 1, 1, name='conv1')(x)
    out = nn.relu(bn('bn1')(out))
    out = conv(self.planes, 3, self.stride, name='conv2')(out)
    out = nn.relu(bn('bn2')(out))
    out = conv(self.planes * 4, 1, 1, name='conv3')(out)
    out = bn('bn3')(out)
    identity = x
    if self.downsample:
      identity = conv(self.planes * 4, 1, self.stride, name='downsample_conv')(x)
      identity = bn('downsample_bn')(identity)
    return nn.relu(out + identity)


class ResNet(nn.Module):
  """torchvision-layout ResNet backbone without the fc layer.

  Attributes:
    stage_sizes: number of blocks in layer1..layer4.
    block: 'basic' or 'bottleneck'.
    last_stride: stride of layer4 (1 for the re-ID baseline, 2 in torchvision).
    width: channels of the stem (64 in torchvision); stage i uses width * 2**i.
    dtype: compute dtype of activations; params and statistics stay float32.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    conv_input_barrier: see the module docstring (CPU speed only).
  """
  stage_sizes: Sequence[int]
  block: str = 'bottleneck'
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
      (N, H/16 or H/32, W/16 or W/32, C) feature map in `dtype`, with C = 8 * width
      for 'basic' and 32 * width for 'bottleneck'.
    """
    _check_choice('block', self.block, BLOCK_TYPES)
    _check_choice('last_stride', self.last_stride, (1, 2))
    block_cls = BasicBlock if self.block == 'basic' else Bottleneck
    x = jnp.asarray(x, self.dtype)
    x = _conv(self.width, 7, 2, self.dtype, 'conv1', self.conv_input_barrier)(x)
    x = _batch_norm(train, self.dtype, self.bn_axis_name, 'bn1')(x)
    x = nn.relu(x)
    x = stem_max_pool(x)
    in_channels = self.width
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**i
      stage_stride = 1 if i == 0 else (self.last_stride if i == 3 else 2)
      for j in range(num_blocks):
        stride = stage_stride if j == 0 else 1
        downsample = j == 0 and (stride != 1 or
                                 in_channels != planes * block_cls.expansion)
        x = block_cls(
            planes=planes,
            stride=stride,
            downsample=downsample,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            conv_input_barrier=self.conv_input_barrier,
            name=f'layer{i + 1}_{j}')(x, train)
        in_channels = planes * block_cls.expansion
    return x


def resnet(name: str, **kwargs: Any) -> ResNet:
  """Builds a named torchvision ResNet backbone.

  Args:
    name: one of RESNET_SPECS ('resnet18', ..., 'resnet152').
    **kwargs: further ResNet fields (last_stride, dtype, bn_axis_name, width).

  Returns:
    The ResNet module.
  """
  _check_choice('backbone', name, tuple(RESNET_SPECS))
  stage_sizes, block = RESNET_SPECS[name]
  return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)


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
    _check_choice('backbone', self.backbone, MODEL_NAMES)
    _check_choice('last_stride', self.last_stride, (1, 2))
    _check_choice('neck', self.neck, NECKS)
    _check_choice('neck_feat', self.neck_feat, NECK_FEATS)
    _check_choice('pooling', self.pooling, POOLINGS)
    super().__post_init__()

  @property
  def feature_dim(self) -> int:
    """Dimension of the pooled feature (2048 for resnet50, 512 for resnet18)."""
    if self.backbone not in RESNET_SPECS:
      return backbones.feature_dim(self.backbone, self.stage_sizes, self.width)
    stage_sizes, block = RESNET_SPECS[self.backbone]
    num_stages = len(self.stage_sizes or stage_sizes)
    return self.width * 2**(num_stages - 1) * (4 if block == 'bottleneck' else 1)

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
    if self.backbone in RESNET_SPECS:
      stage_sizes, block = RESNET_SPECS[self.backbone]
      if self.stage_sizes is not None:
        stage_sizes = tuple(self.stage_sizes)
      backbone = ResNet(
          stage_sizes=stage_sizes,
          block=block,
          last_stride=self.last_stride,
          width=self.width,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          conv_input_barrier=self.conv_input_barrier,
          name='backbone')
    else:
      backbone = backbones.create(
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
      feat = _batch_norm(train, jnp.float32, self.bn_axis_name, 'bottleneck',
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
          kernel_init=torch_linear_kernel_init,
          bias_init=_torch_linear_bias_init(global_feat.shape[-1]),
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
      pooling, gem_p; optional stage_sizes and width for tiny test models).
    num_classes: number of training identities.
    dtype: compute dtype of activations.
    bn_axis_name: axis name for cross-device BatchNorm statistics (e.g. 'batch'
      under pmap), None for per-device statistics.
    conv_input_barrier: see the module docstring; None: on when JAX's default
      backend is the CPU.

  Returns:
    The (unbound) model.
  """
  get = model_config.get if hasattr(model_config, 'get') else (
      lambda k, d=None: getattr(model_config, k, d))
  stage_sizes = get('stage_sizes', None)
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
      width=int(get('width', 64) or 64),
      conv_input_barrier=bool(conv_input_barrier))


def initialize(model: nn.Module, rng: Array,
               image_size: Sequence[int]) -> Tuple[Any, Any]:
  """Initialises the model variables with a jitted init on a (1, H, W, 3) input.

  Args:
    model: the module (e.g. from `create_model`).
    rng: PRNG key.
    image_size: (height, width).

  Returns:
    (params, batch_stats) as plain nested dicts of float32 arrays.
  """
  height, width = image_size
  dummy = jnp.zeros((1, height, width, 3), jnp.float32)

  @jax.jit
  def init(key):
    return model.init(key, dummy, train=False)

  variables = init(rng)
  return variables['params'], variables['batch_stats']
