"""Tests for reid_jax.backbones (ResNet-IBN-a, SE-ResNet, SE-ResNeXt, SENet-154).

References: PyTorch models written with torch.nn in `torch_reference.py` (from the
strong baseline's `resnet_ibn_a.py` / `senet.py` and its `Baseline` head), converted
through `reid_jax.convert_keys` so the key maps are tested with the models;
published ImageNet parameter counts; a single-device run for the cross-device check.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from reid_jax import backbones
from reid_jax import config_lib
from reid_jax import convert
from reid_jax import convert_keys
from reid_jax import models
from reid_jax.backbones import layers

torch = pytest.importorskip('torch')
tnn = torch.nn
# Imported after the importorskip above (it imports torch).
import torch_reference  # pylint: disable=g-import-not-at-top,g-bad-import-order

# Published ImageNet parameter counts (with the 1000-class classifier):
# - timm's model index, huggingface/pytorch-image-models docs/models/
#   legacy-se-resnet.md, legacy-se-resnext.md, legacy-senet.md ("Parameters",
#   given to 0.01M, for Cadene's weights: se_resnet50-ce0d4300.pth, ...);
# - ResNet-IBN-a: instance norm's affine parameters replace BatchNorm's one for
#   one, so the count is torchvision's ResNet's (torchvision resnet.py `num_params`
#   25557032 / 44549160 / 60192808, exact).
PUBLISHED_PARAMS = {
    'resnet50_ibn_a': 25_557_032,
    'resnet101_ibn_a': 44_549_160,
    'resnet152_ibn_a': 60_192_808,
    'se_resnet50': 28_090_000,
    'se_resnet101': 49_330_000,
    'se_resnet152': 66_820_000,
    'se_resnext50': 27_560_000,
    'se_resnext101': 48_960_000,
    'senet154': 115_090_000,
}
# Model name -> (torch_backbones family, blocks per stage).
TORCH_FAMILY = {
    'resnet50_ibn_a': ('resnet_ibn_a', (3, 4, 6, 3)),
    'resnet101_ibn_a': ('resnet_ibn_a', (3, 4, 23, 3)),
    'resnet152_ibn_a': ('resnet_ibn_a', (3, 8, 36, 3)),
    'se_resnet50': ('se_resnet', (3, 4, 6, 3)),
    'se_resnet101': ('se_resnet', (3, 4, 23, 3)),
    'se_resnet152': ('se_resnet', (3, 8, 36, 3)),
    'se_resnext50': ('se_resnext', (3, 4, 6, 3)),
    'se_resnext101': ('se_resnext', (3, 4, 23, 3)),
    'senet154': ('senet', (3, 8, 36, 3)),
}
FC = 2048 * 1000 + 1000


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def init_shapes(module, image_shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False))


@functools.lru_cache(maxsize=None)
def full_shapes(name):
  """Variable shapes of the full-size named backbone (traced once per name)."""
  return init_shapes(backbones.create(name))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def meta_state_dict(name):
  """Zero arrays named and shaped like the full-size torch model's state_dict()."""
  family, stages = TORCH_FAMILY[name]
  with torch.device('meta'):
    net = torch_reference.make_torch_backbone(family, stages, num_classes=1000,
                                              randomize=False)
  return {k: np.zeros(v.shape, np.float32) for k, v in net.state_dict().items()
          if not k.endswith('num_batches_tracked')}


# --------------------------------------------------------------------------
# Structure: parameter counts, names, feature maps (shapes only, no compile).


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMS))
def test_param_count_matches_published_and_torch(name):
  ours = count(full_shapes(name)['params']) + FC
  family, stages = TORCH_FAMILY[name]
  with torch.device('meta'):
    net = torch_reference.make_torch_backbone(family, stages, num_classes=1000,
                                              randomize=False)
  assert ours == sum(p.numel() for p in net.parameters())
  published = PUBLISHED_PARAMS[name]
  if published % 10_000:  # exact figure
    assert ours == published
  else:  # published to 0.01M
    assert round(ours / 10_000) * 10_000 == published, ours


@pytest.mark.parametrize('name', ['resnet50_ibn_a', 'se_resnet50', 'se_resnext50',
                                  'senet154'])  # one per stem / block type
@pytest.mark.parametrize('last_stride,expected_hw', [(1, (16, 8)), (2, (8, 4))])
def test_feature_map_shape(name, last_stride, expected_hw):
  module = backbones.create(name, last_stride=last_stride)
  out, _ = jax.eval_shape(lambda: module.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 256, 128, 3)), train=False))
  assert out.shape == (2,) + expected_hw + (2048,)


@pytest.mark.parametrize('name', backbones.NAMES)
def test_feature_dim(name):
  assert backbones.feature_dim(name) == 2048
  assert models.ReIDModel(num_classes=3, backbone=name).feature_dim == 2048
  assert backbones.feature_dim(name, (1, 1), width=8) == 64


def test_ibn_a_structure():
  params = full_shapes('resnet50_ibn_a')['params']
  for stage, planes in ((1, 64), (2, 128), (3, 256)):
    bn1 = params[f'layer{stage}_0']['bn1']
    assert set(bn1) == {'IN', 'BN'}
    assert bn1['IN']['scale'].shape == bn1['BN']['scale'].shape == (planes // 2,)
  assert set(params['layer4_2']['bn1']) == {'scale', 'bias'}  # no IBN in layer4
  assert params['layer4_0']['bn1']['scale'].shape == (512,)


def test_senet_structure():
  rx = full_shapes('se_resnext50')['params']
  assert rx['layer1_0']['conv2']['kernel'].shape == (3, 3, 4, 128)  # 32 groups x 4
  assert rx['layer4_0']['conv2']['kernel'].shape == (3, 3, 32, 1024)
  assert rx['layer1_0']['se_module']['fc1']['kernel'].shape == (1, 1, 256, 16)
  assert rx['conv1']['kernel'].shape == (7, 7, 3, 64) and 'conv2' not in rx
  s154 = full_shapes('senet154')['params']
  assert [s154[f'conv{k}']['kernel'].shape for k in (1, 2, 3)] == [
      (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128)]
  assert s154['layer2_0']['downsample_conv']['kernel'].shape == (3, 3, 256, 512)
  assert s154['layer1_0']['downsample_conv']['kernel'].shape == (1, 1, 128, 256)


@pytest.mark.parametrize('hw', [(8, 8), (7, 5), (32, 16), (33, 4)])
def test_max_pool_ceil_matches_torch(hw):
  # All-negative input: a zero-padded window would change the last row/column.
  x = -np.abs(np.random.default_rng(0).standard_normal((2,) + hw + (3,)))
  x = x.astype(np.float32)
  expected = tnn.MaxPool2d(3, stride=2, ceil_mode=True)(nchw(x))
  np.testing.assert_array_equal(layers.max_pool_ceil(jnp.asarray(x)), nhwc(expected))


def test_bad_names_and_sizes():
  with pytest.raises(ValueError, match="backbone='se_resnet51'"):
    models.ReIDModel(num_classes=3, backbone='se_resnet51')
  with pytest.raises(ValueError, match='smaller than the 3x3 pooling window'):
    layers.max_pool_ceil(jnp.zeros((1, 2, 8, 1)))
  for name in backbones.NAMES:
    assert name in config_lib.MODEL_NAMES


# --------------------------------------------------------------------------
# Numbers against the torch references (tiny widths; converted via convert).

TINY = {  # model name -> (torch family, blocks per stage); width 16
    'resnet50_ibn_a': ('resnet_ibn_a', (2, 1, 1, 1)),
    'se_resnet50': ('se_resnet', (2, 1, 1, 1)),
    'se_resnext50': ('se_resnext', (1, 2, 1, 1)),
    'senet154': ('senet', (1, 1, 1, 1)),
}
TINY_WIDTH = 16


@pytest.mark.parametrize('name', sorted(TINY))
@pytest.mark.parametrize('last_stride', [1, 2])
def test_backbone_matches_torch(name, last_stride):
  family, stages = TINY[name]
  net = torch_reference.make_torch_backbone(
      family, stages, last_stride, TINY_WIDTH, seed=last_stride, num_classes=10)
  before = torch_reference.state_dict_numpy(net)
  converted = convert_keys.convert_state_dict(before)
  assert converted.family == (family if family == 'resnet_ibn_a' else 'senet')
  # Drops fc / last_linear.
  params, stats = convert_keys.torch_state_dict_to_flax(before)
  module = backbones.create(name, last_stride=last_stride, stages=stages,
                            width=TINY_WIDTH)
  x = np.random.default_rng(last_stride).standard_normal((2, 64, 32, 3))
  x = (x * 2 + 0.5).astype(np.float32)

  with torch.no_grad():
    expected_eval = nhwc(net.eval()(nchw(x)))
  # torch's running_var uses the unbiased variance: expected_sd has flax's.
  expected_train, expected_sd, sizes = torch_reference.train_forward_flax_stats(
      net, nchw(x))
  expected_train = nhwc(expected_train)

  @jax.jit
  def run(variables, x):
    out_eval = module.apply(variables, x, train=False)
    out_train, updated = module.apply(variables, x, train=True,
                                      mutable=['batch_stats'])
    return out_eval, out_train, updated['batch_stats']

  out_eval, out_train, new_stats = run({'params': params, 'batch_stats': stats}, x)
  assert out_eval.shape[-1] == 4 * TINY_WIDTH * 8
  torch_reference.assert_close_to_scale(out_eval, expected_eval)
  torch_reference.assert_close_to_scale(out_train, expected_train)

  _, expected_stats = convert_keys.torch_state_dict_to_flax(expected_sd)
  got = dict(jax.tree_util.tree_leaves_with_path(new_stats))
  want = dict(jax.tree_util.tree_leaves_with_path(expected_stats))
  assert set(got) == set(want) and len(want) == 2 * len(sizes)
  for path, value in want.items():
    np.testing.assert_allclose(got[path], value, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_se_resnext50_strong_baseline_checkpoint_matches_torch(tmp_path):
  """A full-size BoT SE-ResNeXt-50 checkpoint (base.*, BNNeck, classifier)."""
  base = torch_reference.make_torch_backbone('se_resnext', (3, 4, 6, 3), 1, seed=7)
  net = torch_reference.randomize_head(
      torch_reference.TorchStrongBaseline(base, 2048, num_classes=7), seed=8)
  path = torch_reference.save_torch(tmp_path / 'bot.pth', net.state_dict(), 'module.')
  model = models.create_model(ml_collections.ConfigDict(dict(
      name='se_resnext50', last_stride=1, neck='bnneck', neck_feat='after',
      pooling='avg', gem_p=3.0, stage_sizes=(), width=64)), num_classes=7)
  shapes = init_shapes(model, (1, 64, 32, 3))
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params, stats = convert.load_pretrained(path, zeros['params'],
                                          zeros['batch_stats'], choice='self')
  assert convert_keys.convert_state_dict(net.state_dict()).description.startswith(
      'reid-strong-baseline model (SENet')
  x = np.random.default_rng(3).standard_normal((4, 64, 32, 3)).astype(np.float32)
  with torch.no_grad():
    feat = net.eval()(nchw(x)).numpy()
    logits, global_feat = (t.numpy() for t in net.train()(nchw(x)))

  @jax.jit
  def run(variables, x):
    logits, global_feat = model.apply(variables, x, train=True,
                                      mutable=['batch_stats'])[0]
    return model.apply(variables, x, train=False), logits, global_feat

  actual = run({'params': params, 'batch_stats': stats}, x)
  assert actual[0].shape == (4, 2048)
  for a, e in zip(actual, (feat, logits, global_feat)):
    torch_reference.assert_close_to_scale(a, e)


def test_cross_device_equals_single_device():
  """pmap over 4 devices with bn_axis_name == one device on the whole batch."""
  n = jax.local_device_count()
  kwargs = dict(num_classes=5, backbone='resnet50_ibn_a', stage_sizes=(1, 1, 1, 1),
                width=8)
  model = models.ReIDModel(bn_axis_name='batch', **kwargs)
  single = models.ReIDModel(**kwargs)
  x = np.random.default_rng(0).standard_normal((2 * n, 64, 32, 3)).astype(np.float32)
  shapes = init_shapes(single, (1, 64, 32, 3))
  rng = np.random.default_rng(1)
  variables = {
      'params': jax.tree_util.tree_map(
          lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
          shapes['params']),
      'batch_stats': jax.tree_util.tree_map(
          lambda s: (0.5 + rng.random(s.shape)).astype(np.float32),
          shapes['batch_stats'])}
  step = jax.pmap(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
                  axis_name='batch', in_axes=(None, 0))
  (logits, feat), updated = step(variables, x.reshape((n, 2) + x.shape[1:]))
  (logits_ref, feat_ref), updated_ref = jax.jit(
      lambda v, x: single.apply(v, x, train=True, mutable=['batch_stats']))(
          variables, x)
  torch_reference.assert_close_to_scale(np.asarray(logits).reshape(logits_ref.shape), logits_ref)
  torch_reference.assert_close_to_scale(np.asarray(feat).reshape(feat_ref.shape), feat_ref)
  got = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], updated)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5), got, updated_ref)


# --------------------------------------------------------------------------
# Converter: layouts, families, --depth / --backbone checks.


@pytest.mark.parametrize('name,family,depth', [
    ('resnet50_ibn_a', 'resnet_ibn_a', 50), ('se_resnet50', 'senet', 50),
    ('se_resnext50', 'senet', 50), ('senet154', 'senet', 154)])
def test_imagenet_files_convert_and_check(name, family, depth):
  sd = meta_state_dict(name)
  converted = convert_keys.convert_state_dict(sd)
  assert converted.layout == 'imagenet' and converted.family == family
  assert not converted.unknown  # fc / last_linear ignored
  params, stats = convert_keys.torch_state_dict_to_flax(sd, depth=depth)
  want = full_shapes(name)
  assert count(params) + count(stats) == count(want['params']) + count(
      want['batch_stats'])
  bot = {'base.' + k: v for k, v in sd.items()
         if not k.startswith(('fc.', 'last_linear.'))}
  assert convert_keys.convert_state_dict(bot).layout == 'strong_baseline'


def test_depth_and_backbone_mismatches_are_reported():
  sd = meta_state_dict('se_resnet50')
  with pytest.raises(ValueError, match='(?s)does not match se_resnet101: 323 problem.*'
                     r'missing params layer3_6/bn1/bias \(256,\)'):
    convert_keys.torch_state_dict_to_flax(sd, depth=101)
  with pytest.raises(ValueError, match='(?s)does not match se_resnext50.*mis-shaped params '
                     r'layer1_0/conv1/kernel: expected \(1, 1, 64, 128\), found '
                     r'\(1, 1, 64, 64\)'):
    convert_keys.torch_state_dict_to_flax(sd, backbone='se_resnext50')
  with pytest.raises(ValueError, match='no se_resnet34'):
    convert_keys.torch_state_dict_to_flax(sd, depth=34)
  ibn = meta_state_dict('resnet50_ibn_a')
  with pytest.raises(ValueError, match='(?s)does not match resnet50:.*unexpected params '
                     'layer1_0/bn1/IN/scale'):
    convert_keys.torch_state_dict_to_flax(ibn, backbone='resnet50')
  # A root-level conv in a SENet file is not a SENet key.
  sd['conv1.weight'] = np.zeros((64, 3, 7, 7), np.float32)
  assert 'conv1.weight' in convert_keys.convert_state_dict(sd).unknown


def test_cli_backbone_check(tmp_path, capsys):
  sd = meta_state_dict('se_resnext50')
  src = torch_reference.save_torch(tmp_path / 'se_resnext50_32x4d.pth',
                   {k: torch.from_numpy(v) for k, v in sd.items()})
  out = tmp_path / 'x.npz'
  convert.main(['--src', src, '--out', str(out), '--depth', '50',
                '--backbone', 'se_resnext50'])
  assert 'found ImageNet SENet' in capsys.readouterr().out and out.exists()
  with pytest.raises(ValueError, match='does not match se_resnet50'):
    convert.main(['--src', src, '--out', str(out), '--backbone', 'se_resnet50'])
