"""PyTorch reference models written with torch.nn (torchvision is not installed).

The one home of the tests' (and benchmarks') PyTorch references, each written from
its definition and keeping its module names, so `state_dict()` has the released
files' keys:

  `TorchResNet`          torchvision's ResNet (v1.5, no fc) with `last_stride` and a
                         width option (BasicBlock / Bottleneck);
  `TorchStrongBaseline`  michuanhaohao/reid-strong-baseline's `modeling/baseline.py`
                         `Baseline` (GAP, BNNeck BatchNorm1d with a frozen zero bias,
                         bias-free classifier; neck='no': classifier with bias);
  `TorchResNetIBNa`      its `modeling/backbones/resnet_ibn_a.py` (`layer1.0.bn1.IN.*`);
  `TorchSENet`           its `modeling/backbones/senet.py`, Cadene's SENet
                         (`layer0.conv1.*`, `layer1.0.se_module.fc1.*`).

Test-only knobs: `width` (layer1's planes, 64 in the references; every stage scales
with it) and, for the SENets, the group count passed in. `num_classes` adds the
ImageNet classifier (`fc` / `last_linear`) for parameter counts; the backbones'
forward returns layer4's map as the strong baseline's do. Importers skip first when
torch is missing (`pytest.importorskip('torch')`).
"""

import math
from collections import OrderedDict

import numpy as np
import torch

tnn = torch.nn


class TorchResidual(tnn.Module):
  """torchvision's blocks' and Cadene's `Bottleneck`'s forward: relu(branch + skip)."""

  def branch(self, x):
    raise NotImplementedError

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(self.branch(x) + identity)


class TorchBasicBlock(TorchResidual):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.relu = tnn.ReLU()
    self.downsample = downsample

  def branch(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    return self.bn2(self.conv2(out))


class TorchBottleneck(TorchResidual):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.relu = tnn.ReLU()
    self.downsample = downsample

  def branch(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.bn3(self.conv3(out))


def make_layer(inplanes, block, planes, blocks, stride, expansion, downsample_kernel=1,
               downsample_padding=0):
  """torchvision's `ResNet._make_layer` (Cadene's with its downsample kernel, padding).

  Args:
    inplanes: channels entering the layer.
    block: builds a block as block(inplanes, planes, stride, downsample).
    planes: the layer's planes.
    blocks: number of blocks.
    stride: the first block's stride.
    expansion: a block's output channels over its planes.
    downsample_kernel: kernel of the downsample conv.
    downsample_padding: its padding.

  Returns:
    (the layer as an nn.Sequential, the channels leaving it).
  """
  downsample = None
  if stride != 1 or inplanes != planes * expansion:
    downsample = tnn.Sequential(
        tnn.Conv2d(inplanes, planes * expansion, downsample_kernel, stride,
                   downsample_padding, bias=False),
        tnn.BatchNorm2d(planes * expansion))
  layers = [block(inplanes, planes, stride, downsample)]
  layers += [block(planes * expansion, planes, 1, None) for _ in range(1, blocks)]
  return tnn.Sequential(*layers), planes * expansion


class TorchResNet(tnn.Module):
  """torchvision.models.ResNet with `last_stride`, a width option and no fc."""

  def __init__(self, block, layers, last_stride=1, width=64):
    super().__init__()
    self.inplanes = width
    self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    for i, (n, s) in enumerate(zip(layers, (1, 2, 2, last_stride))):
      layer, self.inplanes = make_layer(self.inplanes, self.stage_block(block, i),
                                        width * 2**i, n, s, block.expansion)
      setattr(self, f'layer{i + 1}', layer)

  def stage_block(self, block, stage):  # pylint: disable=unused-argument
    """What builds the blocks of a stage (IBN-a's differ by stage)."""
    return block

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomize_(net, seed):
  """Random conv weights (and biases), norm affine parameters and BN statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.Conv2d):
        tnn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if m.bias is not None:
          m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
      elif isinstance(m, (tnn.BatchNorm2d, tnn.InstanceNorm2d)):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=gen))
        m.bias.copy_(0.2 * torch.randn(c, generator=gen))
        if isinstance(m, tnn.BatchNorm2d):
          m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
          m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
  return net


def make_torch_resnet(block, layers, last_stride, width, seed):
  """Random weights plus random BN affine parameters and running statistics."""
  torch.manual_seed(seed)
  return randomize_(TorchResNet(block, layers, last_stride, width), seed + 1)


def state_dict_numpy(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def train_forward_flax_stats(net, x):
  """One train-mode forward; the state dict after it as flax's BatchNorm makes it.

  torch updates running_var with the unbiased batch variance, flax with the biased
  one (n / (n - 1) smaller, n = N * H * W of the BN input): the returned state dict
  has each BatchNorm2d's running_var recomputed so.

  Args:
    net: the torch model (left in train mode, with torch's statistics updated).
    x: its input.

  Returns:
    (output, state dict (numpy) with flax's running_var, BN name -> n).
  """
  before = state_dict_numpy(net)
  sizes = {}
  hooks = [m.register_forward_hook(
      lambda mod, inp, out, name=n: sizes.__setitem__(
          name, inp[0].numel() // inp[0].shape[1]))
           for n, m in net.named_modules() if isinstance(m, tnn.BatchNorm2d)]
  net.train()
  with torch.no_grad():
    out = net(x)
  for h in hooks:
    h.remove()
  expected = state_dict_numpy(net)
  for name, n in sizes.items():
    old = before[f'{name}.running_var']
    unbiased = (expected[f'{name}.running_var'] - 0.9 * old) / 0.1
    expected[f'{name}.running_var'] = 0.9 * old + 0.1 * unbiased * (n - 1) / n
  return out, expected, sizes


class TorchStrongBaseline(tnn.Module):
  """reid-strong-baseline's Baseline: `base` ResNet, GAP, BNNeck, classifier."""

  def __init__(self, base, in_planes, num_classes, neck='bnneck', neck_feat='after'):
    super().__init__()
    self.base = base
    self.neck, self.neck_feat = neck, neck_feat
    if neck == 'no':
      self.classifier = tnn.Linear(in_planes, num_classes)
    else:
      self.bottleneck = tnn.BatchNorm1d(in_planes)
      self.bottleneck.bias.requires_grad_(False)  # no shift
      self.classifier = tnn.Linear(in_planes, num_classes, bias=False)

  def forward(self, x):
    global_feat = self.base(x).mean(dim=(2, 3))
    feat = global_feat if self.neck == 'no' else self.bottleneck(global_feat)
    if self.training:
      return self.classifier(feat), global_feat
    return feat if self.neck_feat == 'after' else global_feat


def make_torch_strong_baseline(layers, last_stride, num_classes, seed, width=64,
                               neck='bnneck'):
  """A bottleneck-ResNet Baseline with random weights and BN/BNNeck statistics."""
  base = make_torch_resnet(TorchBottleneck, layers, last_stride, width, seed)
  in_planes = width * 2**(len(layers) - 1) * TorchBottleneck.expansion
  net = TorchStrongBaseline(base, in_planes, num_classes, neck)
  return randomize_head(net, seed + 2)


def randomize_head(net, seed):
  """Random classifier weights (and bias with neck='no') and BNNeck weight and running
  statistics of a `TorchStrongBaseline`, drawn in that order; returns it in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    net.classifier.weight.copy_(0.05 * torch.randn(
        net.classifier.weight.shape, generator=gen))
    if net.neck == 'no':
      net.classifier.bias.copy_(0.1 * torch.randn(net.classifier.out_features,
                                                  generator=gen))
    else:
      c = net.bottleneck.num_features
      net.bottleneck.weight.copy_(0.5 + torch.rand(c, generator=gen))
      net.bottleneck.running_mean.copy_(torch.rand(c, generator=gen))
      net.bottleneck.running_var.copy_(0.5 + torch.rand(c, generator=gen))
  return net.eval()


# --------------------------------------------------------------------------
# The strong baseline's other backbones: ResNet-IBN-a and Cadene's SENet.


class TorchIBN(tnn.Module):
  """InstanceNorm2d(affine) on the first planes // 2 channels, BatchNorm2d on the rest."""

  def __init__(self, planes):
    super().__init__()
    self.half = planes // 2
    self.IN = tnn.InstanceNorm2d(self.half, affine=True)  # pylint: disable=invalid-name
    self.BN = tnn.BatchNorm2d(planes - self.half)  # pylint: disable=invalid-name

  def forward(self, x):
    first, rest = x[:, :self.half], x[:, self.half:]
    return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)


class TorchBottleneckIBN(TorchBottleneck):
  """torchvision's Bottleneck whose bn1 is an IBN layer when `ibn` (IBN-a)."""

  def __init__(self, inplanes, planes, stride=1, downsample=None, ibn=False):
    super().__init__(inplanes, planes, stride, downsample)
    if ibn:
      self.bn1 = TorchIBN(planes)


class TorchResNetIBNa(TorchResNet):
  """ResNet_IBN: torchvision's ResNet with IBN in layer1-3 (not layer4)."""

  def __init__(self, layers, last_stride=1, width=64, num_classes=None):
    super().__init__(TorchBottleneckIBN, layers, last_stride, width)
    if num_classes:
      self.fc = tnn.Linear(width * 32, num_classes)

  def stage_block(self, block, stage):
    return lambda *args: block(*args, ibn=stage < 3)


class TorchSEModule(tnn.Module):

  def __init__(self, channels, reduction):
    super().__init__()
    self.fc1 = tnn.Conv2d(channels, channels // reduction, 1)
    self.fc2 = tnn.Conv2d(channels // reduction, channels, 1)

  def forward(self, x):
    s = x.mean(dim=(2, 3), keepdim=True)
    return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class TorchSEBlock(TorchResidual):
  """Cadene's SEResNetBottleneck ('se_resnet': stride on conv1),
  SEResNeXtBottleneck ('se_resnext': stride on conv2, width floor(planes *
  base_width / 64) * groups) and SEBottleneck ('se': 2*planes, 4*planes, stride on
  conv2); their `Bottleneck.forward` adds `se_module(out)` to the residual."""
  expansion = 4

  def __init__(self, kind, inplanes, planes, groups, reduction, stride=1,
               downsample=None, base_width=4):
    super().__init__()
    if kind == 'se_resnet':
      w1, w2, s1, s2 = planes, planes, stride, 1
    elif kind == 'se_resnext':
      w1 = w2 = math.floor(planes * (base_width / 64)) * groups
      s1, s2 = 1, stride
    else:
      w1, w2, s1, s2 = planes * 2, planes * 4, 1, stride
    self.conv1 = tnn.Conv2d(inplanes, w1, 1, s1, bias=False)
    self.bn1 = tnn.BatchNorm2d(w1)
    self.conv2 = tnn.Conv2d(w1, w2, 3, s2, 1, groups=groups, bias=False)
    self.bn2 = tnn.BatchNorm2d(w2)
    self.conv3 = tnn.Conv2d(w2, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.relu = tnn.ReLU()
    self.se_module = TorchSEModule(planes * 4, reduction)
    self.downsample = downsample

  def branch(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.se_module(self.bn3(self.conv3(out)))


class TorchSENet(tnn.Module):
  """Cadene's SENet (layer0 stem with a ceil_mode max pool, layer1..4)."""

  def __init__(self, kind, layers, groups, reduction=16, inplanes=64, input_3x3=False,
               downsample_kernel_size=1, downsample_padding=0, last_stride=2,
               width=64, base_width=4, num_classes=None):
    super().__init__()
    self.inplanes = inplanes
    if input_3x3:
      stem = [('conv1', tnn.Conv2d(3, width, 3, 2, 1, bias=False)),
              ('bn1', tnn.BatchNorm2d(width)), ('relu1', tnn.ReLU()),
              ('conv2', tnn.Conv2d(width, width, 3, 1, 1, bias=False)),
              ('bn2', tnn.BatchNorm2d(width)), ('relu2', tnn.ReLU()),
              ('conv3', tnn.Conv2d(width, inplanes, 3, 1, 1, bias=False)),
              ('bn3', tnn.BatchNorm2d(inplanes)), ('relu3', tnn.ReLU())]
    else:
      stem = [('conv1', tnn.Conv2d(3, inplanes, 7, 2, 3, bias=False)),
              ('bn1', tnn.BatchNorm2d(inplanes)), ('relu1', tnn.ReLU())]
    stem.append(('pool', tnn.MaxPool2d(3, stride=2, ceil_mode=True)))
    self.layer0 = tnn.Sequential(OrderedDict(stem))

    def block(inplanes, planes, stride, downsample):
      return TorchSEBlock(kind, inplanes, planes, groups, reduction, stride, downsample,
                          base_width)

    for i, (n, s) in enumerate(zip(layers, (1, 2, 2, last_stride))):
      k, p = (1, 0) if i == 0 else (downsample_kernel_size, downsample_padding)
      layer, self.inplanes = make_layer(self.inplanes, block, width * 2**i, n, s, 4, k, p)
      setattr(self, f'layer{i + 1}', layer)
    if num_classes:
      self.last_linear = tnn.Linear(width * 32, num_classes)

  def forward(self, x):
    x = self.layer0(x)
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# The strong baseline's `modeling/baseline.py` arguments per model name:
# (kind, groups, inplanes, input_3x3, downsample kernel, downsample padding).
SENET_ARGS = {
    'se_resnet': ('se_resnet', 1, 64, False, 1, 0),
    'se_resnext': ('se_resnext', 32, 64, False, 1, 0),
    'senet': ('se', 64, 128, True, 3, 1),
}


def make_torch_backbone(name, layers, last_stride=1, width=64, seed=0,
                        num_classes=None, randomize=True):
  """A reference backbone: name 'resnet_ibn_a', 'se_resnet', 'se_resnext' or 'senet'.

  With width != 64 the SENet group count and inplanes scale by width / 64 (as
  `reid_jax.backbones.create` documents for tiny models). randomize: random conv
  weights, SE biases, norm affine parameters and BN running statistics.
  """
  torch.manual_seed(seed)
  if name == 'resnet_ibn_a':
    net = TorchResNetIBNa(layers, last_stride, width, num_classes)
  else:
    kind, groups, inplanes, input_3x3, ds_k, ds_p = SENET_ARGS[name]
    net = TorchSENet(kind, layers, max(1, groups * width // 64), 16,
                     inplanes * width // 64, input_3x3, ds_k, ds_p, last_stride,
                     width, num_classes=num_classes)
  return randomize_(net, seed + 1) if randomize else net


# --------------------------------------------------------------------------
# Helpers of the tests that compare converted models with these references.


def assert_close_to_scale(actual, expected, rel=1e-4):
  """max |actual - expected| <= rel * max |expected| (the feature scale)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = float(np.max(np.abs(expected)))
  assert scale > 0
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def save_torch(path, state_dict, prefix='', wrapper=None):
  """Saves `state_dict` with `prefix` on every key (e.g. DataParallel's 'module.'),
  under `{wrapper: ...}` when given (a checkpoint dict); returns the path."""
  obj = {prefix + k: v for k, v in state_dict.items()}
  torch.save({wrapper: obj} if wrapper else obj, path)
  return str(path)
