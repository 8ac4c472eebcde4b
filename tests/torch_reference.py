"""PyTorch reference models written with torch.nn (torchvision is not installed).

`TorchResNet` follows torchvision's ResNet (v1.5, no fc) with `last_stride` and a
width option; `TorchStrongBaseline` is michuanhaohao/reid-strong-baseline's
`modeling/baseline.py` `Baseline` (GAP, BNNeck BatchNorm1d with a frozen zero bias,
bias-free classifier; neck='no': classifier with bias). Importers skip first when
torch is missing (`pytest.importorskip('torch')`).
"""

import torch

tnn = torch.nn


class TorchBasicBlock(tnn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.relu = tnn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class TorchBottleneck(tnn.Module):
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

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class TorchResNet(tnn.Module):
  """torchvision.models.ResNet with `last_stride`, a width option and no fc."""

  def __init__(self, block, layers, last_stride=1, width=64):
    super().__init__()
    self.inplanes = width
    self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    strides = (1, 2, 2, last_stride)
    for i, (n, s) in enumerate(zip(layers, strides)):
      setattr(self, f'layer{i + 1}', self._make_layer(block, width * 2**i, n, s))

  def _make_layer(self, block, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = tnn.Sequential(
          tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                     bias=False),
          tnn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return tnn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def make_torch_resnet(block, layers, last_stride, width, seed):
  """Random weights plus random BN affine parameters and running statistics."""
  torch.manual_seed(seed)
  net = TorchResNet(block, layers, last_stride, width)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.Conv2d):
        tnn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=gen))
        m.bias.copy_(0.2 * torch.randn(c, generator=gen))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
  return net


def state_dict_numpy(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


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
  gen = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():
    net.classifier.weight.copy_(0.05 * torch.randn(
        net.classifier.weight.shape, generator=gen))
    if neck == 'no':
      net.classifier.bias.copy_(0.1 * torch.randn(num_classes, generator=gen))
    else:
      c = net.bottleneck.num_features
      net.bottleneck.weight.copy_(0.5 + torch.rand(c, generator=gen))
      net.bottleneck.running_mean.copy_(torch.rand(c, generator=gen))
      net.bottleneck.running_var.copy_(0.5 + torch.rand(c, generator=gen))
  return net.eval()
