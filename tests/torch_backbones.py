"""PyTorch references (torch.nn) of the strong baseline's other backbones.

Written from the definitions in michuanhaohao/reid-strong-baseline
`modeling/backbones/resnet_ibn_a.py` and `senet.py` (Cadene's SENet), keeping their
module names so `state_dict()` has the released files' keys (`layer1.0.bn1.IN.*`,
`layer0.conv1.*`, `layer1.0.se_module.fc1.*`, ...). Two test-only knobs: `width`
(layer1's planes, 64 in the references; every stage scales with it) and, for the
SENets, the group count passed in. `num_classes` adds the ImageNet classifier
(`fc` / `last_linear`) for parameter counts; the forward pass returns layer4's map
as the strong baseline's backbones do. Importers skip first when torch is missing.
"""

import math
from collections import OrderedDict

import torch

from torch_reference import TorchBottleneck

tnn = torch.nn


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

  def __init__(self, inplanes, planes, ibn, stride=1, downsample=None):
    super().__init__(inplanes, planes, stride, downsample)
    if ibn:
      self.bn1 = TorchIBN(planes)


class TorchResNetIBNa(tnn.Module):
  """ResNet_IBN: torchvision's ResNet with IBN in layer1-3 (not layer4)."""

  def __init__(self, layers, last_stride=1, width=64, num_classes=None):
    super().__init__()
    self.inplanes = width
    self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    for i, (n, s) in enumerate(zip(layers, (1, 2, 2, last_stride))):
      setattr(self, f'layer{i + 1}', self._make_layer(width * 2**i, n, s, ibn=i < 3))
    if num_classes:
      self.fc = tnn.Linear(width * 32, num_classes)

  def _make_layer(self, planes, blocks, stride, ibn):
    downsample = None
    if stride != 1 or self.inplanes != planes * 4:
      downsample = tnn.Sequential(
          tnn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
          tnn.BatchNorm2d(planes * 4))
    layers = [TorchBottleneckIBN(self.inplanes, planes, ibn, stride, downsample)]
    self.inplanes = planes * 4
    layers += [TorchBottleneckIBN(self.inplanes, planes, ibn) for _ in range(1, blocks)]
    return tnn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchSEModule(tnn.Module):

  def __init__(self, channels, reduction):
    super().__init__()
    self.fc1 = tnn.Conv2d(channels, channels // reduction, 1)
    self.fc2 = tnn.Conv2d(channels // reduction, channels, 1)

  def forward(self, x):
    s = x.mean(dim=(2, 3), keepdim=True)
    return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class TorchSEBlock(tnn.Module):
  """Cadene's SEResNetBottleneck ('se_resnet': stride on conv1),
  SEResNeXtBottleneck ('se_resnext': stride on conv2, width floor(planes *
  base_width / 64) * groups) and SEBottleneck ('se': 2*planes, 4*planes, stride on
  conv2)."""
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

  def forward(self, x):
    residual = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(self.se_module(out) + residual)


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
    for i, (n, s) in enumerate(zip(layers, (1, 2, 2, last_stride))):
      k, p = (1, 0) if i == 0 else (downsample_kernel_size, downsample_padding)
      setattr(self, f'layer{i + 1}', self._make_layer(
          kind, width * 2**i, n, groups, reduction, s, k, p, base_width))
    if num_classes:
      self.last_linear = tnn.Linear(width * 32, num_classes)

  def _make_layer(self, kind, planes, blocks, groups, reduction, stride, ds_kernel,
                  ds_padding, base_width):
    downsample = None
    if stride != 1 or self.inplanes != planes * 4:
      downsample = tnn.Sequential(
          tnn.Conv2d(self.inplanes, planes * 4, ds_kernel, stride, ds_padding,
                     bias=False),
          tnn.BatchNorm2d(planes * 4))
    layers = [TorchSEBlock(kind, self.inplanes, planes, groups, reduction, stride,
                           downsample, base_width)]
    self.inplanes = planes * 4
    layers += [TorchSEBlock(kind, self.inplanes, planes, groups, reduction,
                            base_width=base_width) for _ in range(1, blocks)]
    return tnn.Sequential(*layers)

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
  if randomize:
    gen = torch.Generator().manual_seed(seed + 1)
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
