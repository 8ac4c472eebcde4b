"""Tests for reid_jax.convert: name mapping, file formats and error reporting.

State dicts are generated here with torchvision's naming and shapes (written out
independently of the converter), so no torch is needed except for `.pth` files.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import convert
from reid_jax import models


def torchvision_state_dict(stage_sizes, block, width=64, seed=0,
                           num_classes=10):
  """Random arrays named and shaped like torchvision's ResNet state_dict()."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, out, inp, k):
    sd[f'{name}.weight'] = rng.standard_normal((out, inp, k, k)).astype(
        np.float32)

  def bn(name, c):
    sd[f'{name}.weight'] = rng.random(c).astype(np.float32) + 0.5
    sd[f'{name}.bias'] = rng.standard_normal(c).astype(np.float32)
    sd[f'{name}.running_mean'] = rng.standard_normal(c).astype(np.float32)
    sd[f'{name}.running_var'] = rng.random(c).astype(np.float32) + 0.5
    sd[f'{name}.num_batches_tracked'] = np.array(7, np.int64)

  expansion = 4 if block == 'bottleneck' else 1
  conv('conv1', width, 3, 7)
  bn('bn1', width)
  inplanes = width
  for i, n in enumerate(stage_sizes):
    planes = width * 2**i
    for j in range(n):
      p = f'layer{i + 1}.{j}'
      if block == 'bottleneck':
        conv(f'{p}.conv1', planes, inplanes, 1)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
        conv(f'{p}.conv3', planes * 4, planes, 1)
        bn(f'{p}.bn3', planes * 4)
      else:
        conv(f'{p}.conv1', planes, inplanes, 3)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
      if j == 0 and (i > 0 or inplanes != planes * expansion):
        conv(f'{p}.downsample.0', planes * expansion, inplanes, 1)
        bn(f'{p}.downsample.1', planes * expansion)
      inplanes = planes * expansion
  sd['fc.weight'] = rng.standard_normal((num_classes, inplanes)).astype(
      np.float32)
  sd['fc.bias'] = np.zeros(num_classes, np.float32)
  return sd


TINY_STAGES = (1, 1)
TINY_WIDTH = 4


@pytest.fixture
def tiny_sd():
  return torchvision_state_dict(TINY_STAGES, 'bottleneck', TINY_WIDTH)


@pytest.fixture(scope='module')
def tiny_model_vars():
  """Freshly 'initialised' variables of a tiny ReIDModel (shapes only, no compile)."""
  model = models.ReIDModel(num_classes=3, backbone='resnet50',
                           stage_sizes=TINY_STAGES, width=TINY_WIDTH)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 16, 3)), train=False))
  rng = np.random.default_rng(5)
  variables = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  return variables['params'], variables['batch_stats']


def test_mapping_and_layout(tiny_sd):
  sd = {'module.' + k: v for k, v in tiny_sd.items()}  # DataParallel prefix
  params, stats = convert.torch_state_dict_to_flax(sd)
  w = tiny_sd['layer2.0.conv2.weight']  # (O, I, kh, kw)
  kernel = params['layer2_0']['conv2']['kernel']  # (kh, kw, I, O)
  assert kernel.shape == (3, 3, 8, 8)
  assert kernel[2, 0, 5, 1] == w[1, 5, 2, 0]
  np.testing.assert_array_equal(params['conv1']['kernel'][1, 4, 2, 3],
                                tiny_sd['conv1.weight'][3, 2, 1, 4])
  np.testing.assert_array_equal(params['layer1_0']['downsample_conv']['kernel'],
                                tiny_sd['layer1.0.downsample.0.weight']
                                .transpose(2, 3, 1, 0))
  bn = params['layer1_0']['downsample_bn']
  np.testing.assert_array_equal(bn['scale'], tiny_sd['layer1.0.downsample.1.weight'])
  np.testing.assert_array_equal(bn['bias'], tiny_sd['layer1.0.downsample.1.bias'])
  np.testing.assert_array_equal(stats['bn1']['mean'], tiny_sd['bn1.running_mean'])
  np.testing.assert_array_equal(stats['layer2_0']['bn3']['var'],
                                tiny_sd['layer2.0.bn3.running_var'])
  assert 'fc' not in params
  assert set(params['layer1_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3',
                                     'bn3', 'downsample_conv', 'downsample_bn'}
  assert set(stats['layer1_0']) == {'bn1', 'bn2', 'bn3', 'downsample_bn'}
  for leaf in jax.tree_util.tree_leaves((params, stats)):
    assert leaf.dtype == np.float32


@pytest.mark.parametrize('depth,block', [(18, 'basic'), (50, 'bottleneck')])
def test_full_depth_names_match_model(depth, block):
  stage_sizes, _ = models.RESNET_SPECS[f'resnet{depth}']
  sd = torchvision_state_dict(stage_sizes, block, width=8)
  params, stats = convert.torch_state_dict_to_flax(sd, depth=depth)
  module = models.ResNet(stage_sizes=stage_sizes, block=block, width=8)
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 16, 3)), train=False))
  assert (jax.tree_util.tree_structure(params)
          == jax.tree_util.tree_structure(shapes['params']))
  assert (jax.tree_util.tree_structure(stats)
          == jax.tree_util.tree_structure(shapes['batch_stats']))
  jax.tree_util.tree_map(lambda a, s: np.testing.assert_equal(a.shape, s.shape),
                         (params, stats),
                         (shapes['params'], shapes['batch_stats']))
  other = 34 if depth == 18 else 101
  with pytest.raises(ValueError, match=f'resnet{other}'):
    convert.torch_state_dict_to_flax(sd, depth=other)
  with pytest.raises(ValueError, match='depth'):
    convert.torch_state_dict_to_flax(sd, depth=42)
  wrong_block = 34 if depth == 50 else 50
  with pytest.raises(ValueError, match='blocks'):
    convert.torch_state_dict_to_flax(sd, depth=wrong_block)


def test_unknown_key_raises(tiny_sd):
  tiny_sd['layer1.0.attention.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  with pytest.raises(ValueError, match='layer1.0.attention.weight'):
    convert.torch_state_dict_to_flax(tiny_sd)


def check_loaded(loaded, tiny_sd, fresh):
  params, stats = loaded
  fresh_params, fresh_stats = fresh
  np.testing.assert_array_equal(params['backbone']['layer1_0']['conv3']['kernel'],
                                tiny_sd['layer1.0.conv3.weight']
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats['backbone']['layer2_0']['bn2']['mean'],
                                tiny_sd['layer2.0.bn2.running_mean'])
  np.testing.assert_array_equal(params['backbone']['bn1']['scale'],
                                tiny_sd['bn1.weight'])
  # Head untouched.
  for name in ('bottleneck', 'classifier'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, params[name],
                           fresh_params[name])
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats['bottleneck'],
                         fresh_stats['bottleneck'])


def test_npz_round_trip(tmp_path, tiny_sd, tiny_model_vars):
  path = str(tmp_path / 'tiny.npz')
  assert convert.save_npz(tiny_sd, path) == len(tiny_sd) - 9  # 9 BatchNorms
  with np.load(path) as data:
    assert 'fc.weight' in data.files
    assert not any(k.endswith('num_batches_tracked') for k in data.files)
    np.testing.assert_array_equal(data['conv1.weight'], tiny_sd['conv1.weight'])
  loaded = convert.load_pretrained(path, *tiny_model_vars)
  check_loaded(loaded, tiny_sd, tiny_model_vars)


def test_pth_and_cli(tmp_path, tiny_sd, tiny_model_vars):
  torch = pytest.importorskip('torch')
  src = str(tmp_path / 'tiny.pth')
  torch.save({'state_dict': {'module.' + k: torch.from_numpy(v)
                             for k, v in tiny_sd.items()}}, src)
  loaded = convert.load_pretrained(src, *tiny_model_vars)
  check_loaded(loaded, tiny_sd, tiny_model_vars)

  out = str(tmp_path / 'converted.npz')
  convert.main(['--src', src, '--out', out])
  loaded = convert.load_pretrained(out, *tiny_model_vars)
  check_loaded(loaded, tiny_sd, tiny_model_vars)


def test_shape_mismatch_reported(tmp_path, tiny_sd, tiny_model_vars):
  tiny_sd['conv1.weight'] = np.zeros((4, 3, 5, 5), np.float32)
  tiny_sd['layer2.0.bn1.running_var'] = np.ones(9, np.float32)
  path = str(tmp_path / 'bad.npz')
  convert.save_npz(tiny_sd, path)
  with pytest.raises(ValueError) as e:
    convert.load_pretrained(path, *tiny_model_vars)
  msg = str(e.value)
  assert 'conv1/kernel: expected shape (7, 7, 3, 4), got (5, 5, 3, 4)' in msg
  assert 'layer2_0/bn1/var: expected shape (8,), got (9,)' in msg


def test_missing_and_unexpected_reported(tmp_path, tiny_sd, tiny_model_vars):
  del tiny_sd['layer1.0.bn2.running_var']
  del tiny_sd['layer2.0.conv3.weight']
  extra = torchvision_state_dict((1, 1, 1), 'bottleneck', TINY_WIDTH)
  tiny_sd['layer3.0.conv1.weight'] = extra['layer3.0.conv1.weight']
  path = str(tmp_path / 'bad.npz')
  convert.save_npz(tiny_sd, path)
  with pytest.raises(ValueError) as e:
    convert.load_pretrained(path, *tiny_model_vars)
  msg = str(e.value)
  assert 'missing batch_stats layer1_0/bn2/var: expected shape (4,)' in msg
  assert 'missing params layer2_0/conv3/kernel: expected shape (1, 1, 8, 32)' in msg
  assert 'unexpected params layer3_0/conv1/kernel' in msg


def test_unsupported_extension(tmp_path, tiny_model_vars):
  path = tmp_path / 'weights.h5'
  path.write_bytes(b'')
  with pytest.raises(ValueError, match='.npz'):
    convert.load_pretrained(str(path), *tiny_model_vars)
