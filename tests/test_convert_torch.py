"""Converted PyTorch reid-strong-baseline models reproduce their torch outputs.

References: `torch_reference`'s torchvision-layout ResNet-50 `Baseline` (BNNeck and
neck='no'), saved as plain, DataParallel and checkpoint-dict `.pth` files and loaded
through `reid_jax.convert.load_pretrained` into a ReIDModel (helpers shared with
test_convert.py).
"""

import numpy as np
import pytest

from reid_jax import convert
from reid_jax import models
from test_convert import TINY_WIDTH, assert_same, random_variables, tiny_model


def torch_outputs(torch, net, x):
  """(feature before the neck, after it, logits) of a torch Baseline in eval mode."""
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    net.neck_feat = 'before'
    before = net(xt)
    net.neck_feat = 'after'
    after = net(xt)
    logits = net.classifier(after)
  return before.numpy(), after.numpy(), logits.numpy()


def flax_outputs(model, params, stats, x):
  variables = {'params': params, 'batch_stats': stats}
  before = model.clone(neck_feat='before').apply(variables, x, train=False)
  after = model.clone(neck_feat='after').apply(variables, x, train=False)
  logits = after @ params['classifier']['kernel']
  if 'bias' in params['classifier']:
    logits = logits + params['classifier']['bias']
  return before, after, logits


@pytest.mark.parametrize('last_stride', [1, 2])
def test_resnet50_strong_baseline_matches_torch(tmp_path, last_stride):
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  net = torch_reference.make_torch_strong_baseline((3, 4, 6, 3), last_stride,
                                                   num_classes=7, seed=last_stride)
  sd = net.state_dict()
  paths = [torch_reference.save_torch(tmp_path / 'plain.pth', sd),
           torch_reference.save_torch(tmp_path / 'ddp.pth', sd, 'module.'),
           torch_reference.save_torch(tmp_path / 'ckpt.pth', sd, 'module.', 'state_dict')]
  model = models.ReIDModel(num_classes=7, last_stride=last_stride)
  x = np.random.default_rng(0).standard_normal((2, 64, 32, 3)).astype(np.float32)
  given = random_variables(model, image_shape=(1, 64, 32, 3))
  loaded = [convert.load_pretrained(p, *given, choice='self') for p in paths]
  for other in loaded[1:]:
    assert_same(other, loaded[0])
  expected = torch_outputs(torch, net, x)
  actual = flax_outputs(model, *loaded[last_stride - 1], x)
  assert expected[0].shape == (2, 2048) and expected[2].shape == (2, 7)
  for a, e in zip(actual, expected):
    torch_reference.assert_close_to_scale(a, e)


def test_tiny_neck_no_strong_baseline_matches_torch(tmp_path):
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  stages = (1, 1, 1, 1)  # the torch ResNet has 4 stages
  net = torch_reference.make_torch_strong_baseline(
      stages, 2, num_classes=5, seed=3, width=TINY_WIDTH, neck='no')
  path = torch_reference.save_torch(tmp_path / 'no_neck.pth', net.state_dict(), 'module.')
  model = tiny_model(num_classes=5, stage_sizes=stages, neck='no', last_stride=2)
  params, stats = convert.load_pretrained(path, *random_variables(model),
                                          choice='self')
  x = np.random.default_rng(1).standard_normal((3, 32, 16, 3)).astype(np.float32)
  with torch.no_grad():
    feat = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    logits = net.classifier(feat)
  actual = flax_outputs(model, params, stats, x)
  torch_reference.assert_close_to_scale(actual[0], feat.numpy())
  torch_reference.assert_close_to_scale(actual[2], logits.numpy())
  # A BNNeck model cannot take a neck='no' file (and says why, in one error).
  with pytest.raises(ValueError, match='(?s)missing params bottleneck/scale.*'
                     r'unexpected params classifier/bias \(torch classifier\.bias\)'):
    convert.load_pretrained(
        path, *random_variables(tiny_model(num_classes=5, stage_sizes=stages)),
        choice='self')
