"""Tests for reid_jax.convert and convert_keys: layouts, name mapping, file formats, errors.

References: state dicts named and shaped like torchvision's (written out here,
independently of the converter). test_convert_torch.py checks converted PyTorch
models (`torch_reference`) against their torch outputs.
"""

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from reid_jax import convert
from reid_jax import convert_keys
from reid_jax import models
from reid_jax import train_step


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


def strong_baseline_state_dict(backbone_sd, num_classes, seed=1):
  """A reid-strong-baseline state dict: `base.*`, BNNeck and classifier."""
  rng = np.random.default_rng(seed)
  sd = {'base.' + k: v for k, v in backbone_sd.items() if not k.startswith('fc.')}
  dim = backbone_sd['fc.weight'].shape[1]
  sd['bottleneck.weight'] = rng.random(dim).astype(np.float32) + 0.5
  sd['bottleneck.bias'] = np.zeros(dim, np.float32)
  sd['bottleneck.running_mean'] = rng.standard_normal(dim).astype(np.float32)
  sd['bottleneck.running_var'] = rng.random(dim).astype(np.float32) + 0.5
  sd['bottleneck.num_batches_tracked'] = np.array(3, np.int64)
  sd['classifier.weight'] = rng.standard_normal((num_classes, dim)).astype(np.float32)
  return sd


TINY_STAGES = (1, 1)
TINY_WIDTH = 4
TINY_CLASSES = 3


def random_variables(model, seed=5, image_shape=(1, 32, 16, 3)):
  """A model's variables filled with random numbers (shapes only, no compile)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False))
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  return variables['params'], variables['batch_stats']


def tiny_model(num_classes=TINY_CLASSES, stage_sizes=TINY_STAGES, **kwargs):
  return models.ReIDModel(num_classes=num_classes, backbone='resnet50',
                          stage_sizes=stage_sizes, width=TINY_WIDTH, **kwargs)


@pytest.fixture
def tiny_sd():
  return torchvision_state_dict(TINY_STAGES, 'bottleneck', TINY_WIDTH)


@pytest.fixture
def tiny_bot_sd(tiny_sd):
  return strong_baseline_state_dict(tiny_sd, TINY_CLASSES)


@pytest.fixture(scope='module')
def tiny_model_vars():
  return random_variables(tiny_model())


def flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep='/')


def save(tmp_path, sd, name='w.npz'):
  path = str(tmp_path / name)
  convert.save_npz(sd, path)
  return path


# --------------------------------------------------------------------------
# Name mapping.


def test_mapping_and_layout(tiny_sd):
  sd = {'module.' + k: v for k, v in tiny_sd.items()}  # DataParallel prefix
  params, stats = convert_keys.torch_state_dict_to_flax(sd)
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
  params, stats = convert_keys.torch_state_dict_to_flax(sd, depth=depth)
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
    convert_keys.torch_state_dict_to_flax(sd, depth=other)
  with pytest.raises(ValueError, match='depth'):
    convert_keys.torch_state_dict_to_flax(sd, depth=42)
  wrong_block = 34 if depth == 50 else 50
  with pytest.raises(ValueError, match='blocks'):
    convert_keys.torch_state_dict_to_flax(sd, depth=wrong_block)


def test_unknown_key_raises(tiny_sd):
  tiny_sd['layer1.0.attention.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r'layer1\.0\.attention\.weight'):
    convert_keys.torch_state_dict_to_flax(tiny_sd)


def test_strong_baseline_head_mapping(tiny_bot_sd):
  converted = convert_keys.convert_state_dict(tiny_bot_sd)
  assert converted.layout == 'strong_baseline' and converted.num_classes == 3
  p, s = converted.variables['params'], converted.variables['batch_stats']
  np.testing.assert_array_equal(p[('classifier', 'kernel')],
                                tiny_bot_sd['classifier.weight'].T)
  np.testing.assert_array_equal(p[('bottleneck', 'scale')],
                                tiny_bot_sd['bottleneck.weight'])
  np.testing.assert_array_equal(s[('bottleneck', 'var')],
                                tiny_bot_sd['bottleneck.running_var'])
  np.testing.assert_array_equal(p[('backbone', 'layer2_0', 'bn1', 'bias')],
                                tiny_bot_sd['base.layer2.0.bn1.bias'])
  assert converted.sources[('params', ('backbone', 'conv1', 'kernel'))] == (
      'base.conv1.weight')


# --------------------------------------------------------------------------
# Layout detection and the choices, on tiny models.


def assert_backbone_loaded(params, stats, backbone_sd):
  np.testing.assert_array_equal(params['backbone']['layer1_0']['conv3']['kernel'],
                                backbone_sd['layer1.0.conv3.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats['backbone']['layer2_0']['bn2']['mean'],
                                backbone_sd['layer2.0.bn2.running_mean'])
  np.testing.assert_array_equal(params['backbone']['bn1']['scale'],
                                backbone_sd['bn1.weight'])
  assert len(flat(params['backbone'])) == len(
      [k for k in backbone_sd if k.endswith(('.weight', '.bias'))
       and not k.startswith('fc.')])


def assert_same(tree, other):
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree, other)


@pytest.mark.parametrize('prefix,wrapper,expected', [
    ('', None, []),
    ('module.', None, ["'module.' prefix"]),
    ('module.', 'state_dict', ["'module.' prefix", "weights under 'state_dict'"]),
    ('', 'model', ["weights under 'model'"]),
])
def test_layout_detection_messages(tmp_path, caplog, tiny_sd, tiny_bot_sd,
                                   tiny_model_vars, prefix, wrapper, expected):
  torch = pytest.importorskip('torch')
  for sd, what in ((tiny_sd, 'ImageNet torchvision ResNet backbone'),
                   (tiny_bot_sd, 'reid-strong-baseline model (torchvision ResNet '
                    'backbone, BNNeck, classifier of 3 classes)')):
    obj = {prefix + k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    if wrapper:
      obj = {wrapper: obj, 'epoch': 120}
    path = str(tmp_path / 'w.pth')
    torch.save(obj, path)
    caplog.clear()
    with caplog.at_level(logging.INFO):
      params, stats = convert.load_pretrained(path, *tiny_model_vars)
    message = ' '.join(r.getMessage() for r in caplog.records
                       if r.levelno == logging.INFO)
    assert f'found {what}' in message
    for part in expected:
      assert part in message
    if not expected:
      assert 'prefix' not in message and 'checkpoint dict' not in message
    assert_backbone_loaded(params, stats, tiny_sd)


def test_imagenet_choice_leaves_head_of_strong_baseline(tmp_path, caplog, tiny_sd,
                                                        tiny_bot_sd, tiny_model_vars):
  path = save(tmp_path, tiny_bot_sd)
  with caplog.at_level(logging.WARNING):
    params, stats = convert.load_pretrained(path, *tiny_model_vars, choice='imagenet')
  assert_backbone_loaded(params, stats, tiny_sd)
  fresh_params, fresh_stats = tiny_model_vars
  for name in ('bottleneck', 'classifier'):
    assert_same(params[name], fresh_params[name])
  assert_same(stats['bottleneck'], fresh_stats['bottleneck'])
  assert "left out ['bottleneck.bias', 'bottleneck.running_mean'" in caplog.text
  assert "'classifier.weight']" in caplog.text and "'self'" in caplog.text


def test_self_choice_loads_whole_model(tmp_path, tiny_sd, tiny_bot_sd, tiny_model_vars):
  path = save(tmp_path, {'module.' + k: v for k, v in tiny_bot_sd.items()})
  params, stats = convert.load_pretrained(path, *tiny_model_vars, choice='self')
  assert_backbone_loaded(params, stats, tiny_sd)
  np.testing.assert_array_equal(params['classifier']['kernel'],
                                tiny_bot_sd['classifier.weight'].T)
  np.testing.assert_array_equal(params['bottleneck']['scale'],
                                tiny_bot_sd['bottleneck.weight'])
  np.testing.assert_array_equal(stats['bottleneck']['mean'],
                                tiny_bot_sd['bottleneck.running_mean'])
  assert set(params['bottleneck']) == {'scale'}  # the zero bias is dropped
  for leaf in jax.tree_util.tree_leaves((params, stats)):
    assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32


def test_load_into_state_keeps_centers_and_optimizer(tmp_path, tiny_sd, tiny_bot_sd,
                                                     tiny_model_vars):
  params, stats = tiny_model_vars
  dim = tiny_model().feature_dim
  centers = np.arange(TINY_CLASSES * dim, dtype=np.float32).reshape(TINY_CLASSES, dim)
  state = train_step.TrainState.create(
      apply_fn=None, params=dict(params, center=centers), tx=optax.sgd(0.1),
      batch_stats=stats)
  path = save(tmp_path, tiny_bot_sd)
  loaded = convert.load_pretrained_into_state(path, 'self', state)
  assert_backbone_loaded(loaded.params, loaded.batch_stats, tiny_sd)
  np.testing.assert_array_equal(loaded.params['classifier']['kernel'],
                                tiny_bot_sd['classifier.weight'].T)
  np.testing.assert_array_equal(loaded.batch_stats['bottleneck']['var'],
                                tiny_bot_sd['bottleneck.running_var'])
  np.testing.assert_array_equal(loaded.params['center'], centers)
  assert loaded.step == state.step and loaded.opt_state is state.opt_state
  head = convert.load_pretrained_into_state(path, 'imagenet', state)
  assert_backbone_loaded(head.params, head.batch_stats, tiny_sd)
  np.testing.assert_array_equal(head.params['classifier']['kernel'],
                                params['classifier']['kernel'])  # left as given
  np.testing.assert_array_equal(head.params['center'], centers)

def test_self_choice_with_imagenet_file_is_an_error(tmp_path, tiny_sd, tiny_model_vars):
  path = save(tmp_path, tiny_sd)
  with pytest.raises(ValueError, match="ImageNet torchvision ResNet backbone: no "
                     "BNNeck or classifier.*pretrain_choice='imagenet'"):
    convert.load_pretrained(path, *tiny_model_vars, choice='self')
  with pytest.raises(ValueError, match='imagenet'):
    convert.load_pretrained(path, *tiny_model_vars, choice='finetune')


def test_class_count_mismatch_keeps_given_classifier(tmp_path, caplog, tiny_sd,
                                                     tiny_bot_sd):
  given = random_variables(tiny_model(num_classes=5))
  path = save(tmp_path, tiny_bot_sd)
  with caplog.at_level(logging.WARNING):
    params, stats = convert.load_pretrained(path, *given, choice='self')
  assert ('the file has 3 classes (torch classifier.weight (3, 32)), the model 5 '
          '(flax classifier/kernel (32, 5))') in caplog.text
  assert_same(params['classifier'], given[0]['classifier'])
  np.testing.assert_array_equal(params['bottleneck']['scale'],
                                tiny_bot_sd['bottleneck.weight'])
  assert_backbone_loaded(params, stats, tiny_sd)


def test_nonzero_neck_bias_is_an_error(tmp_path, tiny_bot_sd, tiny_model_vars):
  tiny_bot_sd['bottleneck.bias'][4] = 0.25
  path = save(tmp_path, tiny_bot_sd)
  with pytest.raises(ValueError, match=r'nonzero params bottleneck/bias \(torch '
                     r'bottleneck\.bias\): max \|bias\| 0\.25'):
    convert.load_pretrained(path, *tiny_model_vars, choice='self')
  # Under 'imagenet' the neck is not loaded, so its bias does not matter.
  convert.load_pretrained(path, *tiny_model_vars, choice='imagenet')


def test_all_problems_in_one_error(tmp_path, tiny_bot_sd, tiny_model_vars):
  del tiny_bot_sd['base.layer1.0.bn2.running_var']
  del tiny_bot_sd['bottleneck.weight']
  tiny_bot_sd['base.conv1.weight'] = np.zeros((4, 3, 5, 5), np.float32)
  tiny_bot_sd['bottleneck.running_mean'] = np.zeros(31, np.float32)
  extra = torchvision_state_dict((1, 1, 1), 'bottleneck', TINY_WIDTH)
  tiny_bot_sd['base.layer3.0.conv1.weight'] = extra['layer3.0.conv1.weight']
  tiny_bot_sd['base.layer1.0.se.fc1.weight'] = np.zeros((2, 16, 1, 1), np.float32)
  tiny_bot_sd['classifier.bias'] = np.zeros(3, np.float32)
  path = save(tmp_path, tiny_bot_sd)
  with pytest.raises(ValueError) as e:
    convert.load_pretrained(path, *tiny_model_vars, choice='self')
  lines = str(e.value).splitlines()
  assert lines[0].startswith(f'Cannot load {path} (reid-strong-baseline model')
  assert "pretrain_choice='self'; 7 problem(s):" in lines[0]
  expected = [
      'unexpected torch key base.layer1.0.se.fc1.weight shape (2, 16, 1, 1): not part'
      ' of a strong_baseline model with a resnet backbone',
      'mis-shaped params backbone/conv1/kernel (torch base.conv1.weight): expected '
      'shape (7, 7, 3, 4), found (5, 5, 3, 4)',
      'missing params bottleneck/scale: expected shape (32,), not in the file',
      'unexpected params backbone/layer3_0/conv1/kernel (torch '
      'base.layer3.0.conv1.weight) shape (1, 1, 32, 16): no such variable',
      'unexpected params classifier/bias (torch classifier.bias) shape (3,)',
      'missing batch_stats backbone/layer1_0/bn2/var: expected shape (4,)',
      'mis-shaped batch_stats bottleneck/mean (torch bottleneck.running_mean): '
      'expected shape (32,), found (31,)',
  ]
  assert len(lines) == 1 + len(expected)
  for part in expected:
    assert sum(part in line for line in lines[1:]) == 1, part


def test_plugged_in_backbone_family(tiny_sd, tiny_model_vars):
  """A family supplies detect/ignore/map_key; the first that detects wins."""
  renamed = {'stem.' + k if k.startswith(('conv1', 'bn1')) else k: v
             for k, v in tiny_sd.items()}

  def map_key(key):
    return convert_keys.resnet_map_key(key[len('stem.'):] if key.startswith('stem.')
                                       else key)

  family = convert_keys.BackboneFamily(
      name='stemmed', description='stem-prefixed ResNet',
      detect=lambda keys: 'stem.conv1.weight' in keys,
      ignore=lambda key: key.startswith('fc.'), map_key=map_key)
  families = (family,) + convert_keys.BACKBONE_FAMILIES
  converted = convert_keys.convert_state_dict(renamed, families)
  assert converted.family == 'stemmed'
  assert converted.description == 'ImageNet stem-prefixed ResNet backbone'
  params, stats = convert.merge_converted(converted, *tiny_model_vars)
  assert_backbone_loaded(params, stats, tiny_sd)
  assert convert_keys.convert_state_dict(tiny_sd, families).family == 'resnet'
  with pytest.raises(ValueError, match=r"Unrecognised imagenet backbone.*'resnet'\]"):
    convert_keys.convert_state_dict(renamed)


# --------------------------------------------------------------------------
# Files: .npz round trip, CLI, no torch, bad input.


def test_npz_round_trip_and_cli(tmp_path, capsys, tiny_sd, tiny_bot_sd,
                                tiny_model_vars):
  torch = pytest.importorskip('torch')
  src = str(tmp_path / 'bot.pth')
  torch.save({'state_dict': {'module.' + k: torch.from_numpy(np.asarray(v))
                             for k, v in tiny_bot_sd.items()}}, src)
  out = str(tmp_path / 'bot.npz')
  convert.main(['--src', src, '--out', out])
  printed = capsys.readouterr().out
  assert ("found reid-strong-baseline model (torchvision ResNet backbone, BNNeck, "
          "classifier of 3 classes), saved from nn.DataParallel") in printed
  assert "checkpoint dict, weights under 'state_dict'" in printed
  n_arrays = len(tiny_bot_sd) - 10  # 10 BatchNorms' num_batches_tracked
  assert f'Wrote {n_arrays} arrays to {out}' in printed
  with np.load(out) as data:
    assert len(data.files) == n_arrays
    np.testing.assert_array_equal(data['module.base.conv1.weight'],
                                  tiny_bot_sd['base.conv1.weight'])
  from_npz = convert.load_pretrained(out, *tiny_model_vars, choice='self')
  from_pth = convert.load_pretrained(src, *tiny_model_vars, choice='self')
  assert_same(from_npz, from_pth)
  np.testing.assert_array_equal(from_npz[0]['classifier']['kernel'],
                                tiny_bot_sd['classifier.weight'].T)
  assert_backbone_loaded(*from_npz, tiny_sd)


def test_cli_depth_and_unknown_keys(tmp_path, capsys, tiny_sd):
  torch = pytest.importorskip('torch')
  sd = torchvision_state_dict((3, 4, 6, 3), 'bottleneck', width=4)
  src = str(tmp_path / 'r50.pth')
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, src)
  convert.main(['--src', src, '--out', str(tmp_path / 'r50.npz'), '--depth', '50'])
  assert 'found ImageNet torchvision ResNet backbone' in capsys.readouterr().out
  with pytest.raises(ValueError, match='resnet101'):
    convert.main(['--src', src, '--out', str(tmp_path / 'x.npz'), '--depth', '101'])
  tiny_sd['layer1.0.attention.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in tiny_sd.items()}, src)
  with pytest.raises(SystemExit, match=r'layer1\.0\.attention\.weight'):
    convert.main(['--src', src, '--out', str(tmp_path / 'y.npz')])
  assert not (tmp_path / 'y.npz').exists()


def test_no_torch_message(tmp_path, monkeypatch, tiny_model_vars):
  path = tmp_path / 'bot.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  npz = str(tmp_path / 'bot.npz')
  for call in (lambda: convert.load_pretrained(str(path), *tiny_model_vars),
               lambda: convert.check_pretrained_file(str(path), 'self'),
               lambda: convert.main(['--src', str(path), '--out', npz])):
    with pytest.raises(ImportError) as e:
      call()
    assert 'needs PyTorch, which is not installed' in str(e.value)
    assert f'python -m reid_jax.convert --src {path} --out {npz}' in str(e.value)
    assert f'--config.model.pretrained={npz}' in str(e.value)


def test_bad_files(tmp_path, tiny_model_vars):
  path = tmp_path / 'weights.h5'
  path.write_bytes(b'')
  with pytest.raises(ValueError, match=r'expected \.npz, \.pth or \.pt'):
    convert.load_pretrained(str(path), *tiny_model_vars)
  with pytest.raises(ValueError, match=r'expected \.npz, \.pth or \.pt'):
    convert.check_pretrained_file(str(path))
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    convert.check_pretrained_file(str(tmp_path / 'missing.npz'))
  with pytest.raises(ValueError, match="pretrain_choice='last'"):
    convert.check_pretrained_file(str(path), 'last')
  empty = save(tmp_path, {'x.num_batches_tracked': np.array(1)})
  with pytest.raises(ValueError, match='no weights'):
    convert.load_pretrained(empty, *tiny_model_vars)
  torch = pytest.importorskip('torch')
  pth = str(tmp_path / 'meta.pth')
  torch.save({'epoch': 3, 'optimizer': {'lr': 0.1}}, pth)
  with pytest.raises(ValueError, match="holds no tensors.*'epoch'"):
    convert.load_pretrained(pth, *tiny_model_vars)
  torch.save(torch.nn.Linear(2, 2), pth)  # a pickled module, not a state dict
  with pytest.raises(ValueError, match=r'save model\.state_dict\(\)'):
    convert.load_pretrained(pth, *tiny_model_vars)
