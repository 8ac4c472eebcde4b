"""Tests for reid_jax.models against independent references.

References: torchvision's published parameter counts, a PyTorch ResNet written
here in the torchvision layout (torchvision itself is not installed), and numpy
formulas for pooling, BNNeck and the classifier.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from reid_jax import convert_keys
from reid_jax import models
from reid_jax.backbones import layers

torch = pytest.importorskip('torch')
tnn = torch.nn

EPS = 1e-5


# The PyTorch reference ResNet (torchvision layout) lives in torch_reference.py,
# shared with test_convert; imported after the importorskip above.
from torch_reference import (  # pylint: disable=g-import-not-at-top,g-bad-import-order
    TorchBasicBlock, TorchBottleneck, make_torch_resnet, state_dict_numpy,
    train_forward_flax_stats)


def assert_close(actual, expected, rtol=1e-4):
  """Elementwise closeness with a tolerance relative to the output's scale."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  np.testing.assert_allclose(
      actual, expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()))


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def eval_shape_init(module, shape):
  return jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


def initialize(model, rng, image_size):
  """(params, batch_stats) of a jitted eval-mode init on a (1, H, W, 3) input."""
  variables = jax.jit(lambda key: model.init(
      key, jnp.zeros((1,) + tuple(image_size) + (3,), jnp.float32), train=False))(rng)
  return variables['params'], variables['batch_stats']


# --------------------------------------------------------------------------
# Shapes and parameter counts (nothing compiled).


@pytest.mark.parametrize('name,expected', [
    ('resnet18', 11_176_512),  # torchvision resnet18 (11,689,512) minus fc
    ('resnet34', 21_284_672),  # torchvision resnet34 (21,797,672) minus fc
    ('resnet50', 23_508_032),  # torchvision resnet50 (25,557,032) minus fc
    ('resnet101', 42_500_160),  # torchvision resnet101 (44,549,160) minus fc
])
def test_backbone_param_count(name, expected):
  variables = eval_shape_init(models.create_backbone(name), (1, 64, 32, 3))
  assert count(variables['params']) == expected
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32


def test_reid_model_param_count_and_names():
  model = models.ReIDModel(num_classes=751)
  variables = eval_shape_init(model, (1, 256, 128, 3))
  params = variables['params']
  # Backbone + neck BN scale (no bias) + bias-free classifier.
  assert count(params) == 23_508_032 + 2048 + 2048 * 751
  assert set(params) == {'backbone', 'bottleneck', 'classifier'}
  assert set(params['bottleneck']) == {'scale'}
  assert set(params['classifier']) == {'kernel'}
  assert set(variables['batch_stats']['bottleneck']) == {'mean', 'var'}
  assert model.feature_dim == 2048


@pytest.mark.parametrize('last_stride,expected', [(1, (16, 8)), (2, (8, 4))])
def test_last_stride_feature_map(last_stride, expected):
  module = models.create_backbone('resnet50', last_stride=last_stride)
  x = jnp.zeros((2, 256, 128, 3))
  variables = eval_shape_init(module, x.shape)
  out = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
  assert out.shape == (2,) + expected + (2048,)


# --------------------------------------------------------------------------
# Numerical equivalence with the PyTorch reference.

TORCH_CASES = {
    # ResNet-18 at full width.
    'basic18': dict(block='basic', layers=(2, 2, 2, 2), width=64, last_stride=1),
    # Bottleneck with every kind of block (downsampling and plain), reduced width.
    'bottleneck': dict(block='bottleneck', layers=(2, 1, 2, 1), width=16,
                       last_stride=2),
}


@pytest.fixture(scope='module', params=sorted(TORCH_CASES))
def torch_case(request):
  case = TORCH_CASES[request.param]
  block = TorchBasicBlock if case['block'] == 'basic' else TorchBottleneck
  net = make_torch_resnet(block, case['layers'], case['last_stride'],
                          case['width'], seed=0)
  module = models.ResNet(stage_sizes=case['layers'], block=case['block'],
                         last_stride=case['last_stride'], width=case['width'])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 3, 64, 32)).astype(np.float32)
  return net, module, x


def test_eval_forward_matches_torch(torch_case):
  net, module, x = torch_case
  params, stats = convert_keys.torch_state_dict_to_flax(state_dict_numpy(net))
  net.eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  out = jax.jit(lambda v, x: module.apply(v, x, train=False))(
      {'params': params, 'batch_stats': stats}, x.transpose(0, 2, 3, 1))
  assert_close(out, expected)


def test_train_forward_and_stats_match_torch(torch_case):
  net, module, x = torch_case
  params, stats = convert_keys.torch_state_dict_to_flax(state_dict_numpy(net))
  # torch: new = 0.9 old + 0.1 unbiased; expected_sd has flax's 0.9 old + 0.1 biased.
  expected, expected_sd, sizes = train_forward_flax_stats(net, torch.from_numpy(x))
  expected = expected.numpy().transpose(0, 2, 3, 1)

  out, updated = jax.jit(
      lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats']))(
          {'params': params, 'batch_stats': stats}, x.transpose(0, 2, 3, 1))
  assert_close(out, expected)

  _, expected_stats = convert_keys.torch_state_dict_to_flax(expected_sd)
  flat_out = jax.tree_util.tree_leaves_with_path(updated['batch_stats'])
  flat_exp = dict(jax.tree_util.tree_leaves_with_path(expected_stats))
  assert len(flat_out) == len(flat_exp) == 2 * len(sizes)
  for path, value in flat_out:
    np.testing.assert_allclose(value, flat_exp[path], rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('hw', [(8, 8), (7, 5)])
def test_stem_max_pool_matches_torch(hw):
  # All-negative input: zero padding instead of -inf would change the border.
  x = -np.abs(np.random.default_rng(0).standard_normal((2,) + hw + (3,)))
  x = x.astype(np.float32)
  expected = tnn.MaxPool2d(3, 2, 1)(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  out = layers.stem_max_pool(jnp.asarray(x))
  np.testing.assert_array_equal(out, expected.numpy().transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------
# Head: pooling, BNNeck and classifier, checked against numpy.

TINY = dict(backbone='resnet18', stage_sizes=(1,), width=8)  # stem + 1 block
TINY_SHAPE = (4, 16, 8, 3)
TINY_BACKBONE = models.ResNet(stage_sizes=(1,), block='basic', width=8)


@functools.partial(jax.jit, static_argnums=0)
def apply_eval(model, variables, x):
  return model.apply(variables, x, train=False)


@functools.partial(jax.jit, static_argnums=0)
def apply_train(model, variables, x):
  return model.apply(variables, x, train=True, mutable=['batch_stats'])


def backbone_pooled(variables, x, train):
  """Pooled feature from the (torch-verified) backbone, averaged in numpy."""
  backbone_vars = {'params': variables['params']['backbone'],
                   'batch_stats': variables['batch_stats']['backbone']}
  if train:
    fmap, _ = apply_train(TINY_BACKBONE, backbone_vars, x)
  else:
    fmap = apply_eval(TINY_BACKBONE, backbone_vars, x)
  return np.asarray(fmap, np.float64).mean(axis=(1, 2))


def bn_numpy(x, mean, var, scale):
  return (x - mean) / np.sqrt(var + EPS) * scale


@pytest.fixture(scope='module')
def tiny_input():
  return np.random.default_rng(1).standard_normal(TINY_SHAPE).astype(np.float32)


@pytest.fixture(scope='module')
def bnneck_variables():
  """BNNeck model variables with a random neck scale and running statistics."""
  model = models.ReIDModel(num_classes=7, **TINY)
  params, stats = initialize(model, jax.random.PRNGKey(0), TINY_SHAPE[1:3])
  variables = jax.tree_util.tree_map(np.asarray,
                                     {'params': params, 'batch_stats': stats})
  rng = np.random.default_rng(0)
  d = model.feature_dim
  assert variables['params']['bottleneck']['scale'].shape == (d,)
  variables['params']['bottleneck']['scale'] = (0.5 + rng.random(d)).astype(
      np.float32)
  variables['batch_stats']['bottleneck'] = {
      'mean': (0.1 * rng.standard_normal(d)).astype(np.float32),
      'var': (0.5 + rng.random(d)).astype(np.float32)}
  return variables


@pytest.mark.parametrize('neck_feat', ['after', 'before'])
def test_bnneck_eval_feature(neck_feat, tiny_input, bnneck_variables):
  model = models.ReIDModel(num_classes=7, neck_feat=neck_feat, **TINY)
  variables = bnneck_variables
  out = apply_eval(model, variables, tiny_input)
  assert out.dtype == jnp.float32 and out.shape == (4, model.feature_dim)
  pooled = backbone_pooled(variables, tiny_input, train=False)
  if neck_feat == 'before':
    expected = pooled
  else:
    s = variables['batch_stats']['bottleneck']
    expected = bn_numpy(pooled, s['mean'], s['var'],
                        variables['params']['bottleneck']['scale'])
  assert_close(out, expected)


def test_bnneck_train_outputs(tiny_input, bnneck_variables):
  model = models.ReIDModel(num_classes=7, **TINY)
  variables = bnneck_variables
  (logits, feat), updated = apply_train(model, variables, tiny_input)
  assert logits.shape == (4, 7) and feat.shape == (4, model.feature_dim)
  assert logits.dtype == feat.dtype == jnp.float32
  pooled = backbone_pooled(variables, tiny_input, train=True)
  assert_close(feat, pooled)  # the feature before the neck
  mu, var = pooled.mean(0), pooled.var(0)
  bn = bn_numpy(pooled, mu, var, variables['params']['bottleneck']['scale'])
  assert_close(logits, bn @ variables['params']['classifier']['kernel'])
  old = variables['batch_stats']['bottleneck']
  new = updated['batch_stats']['bottleneck']
  assert_close(new['mean'], 0.9 * old['mean'] + 0.1 * mu)
  assert_close(new['var'], 0.9 * old['var'] + 0.1 * var)


def test_no_neck(tiny_input):
  model = models.ReIDModel(num_classes=5, neck='no', neck_feat='after', **TINY)
  params, stats = initialize(model, jax.random.PRNGKey(0), TINY_SHAPE[1:3])
  assert 'bottleneck' not in params and 'bottleneck' not in stats
  assert set(params['classifier']) == {'kernel', 'bias'}
  # BoT leaves this classifier at PyTorch's default Linear init:
  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
  bound = 1 / math.sqrt(model.feature_dim)
  assert np.abs(params['classifier']['kernel']).max() <= bound
  assert np.abs(params['classifier']['kernel']).max() > 0.5 * bound
  assert np.abs(params['classifier']['bias']).max() <= bound
  variables = {'params': params, 'batch_stats': stats}
  out = apply_eval(model, variables, tiny_input)
  assert_close(out, backbone_pooled(variables, tiny_input, train=False))
  (logits, feat), _ = apply_train(model, variables, tiny_input)
  pooled = backbone_pooled(variables, tiny_input, train=True)
  assert_close(feat, pooled)
  c = params['classifier']
  assert_close(logits, pooled @ c['kernel'] + c['bias'])


def gem_numpy(x, p, eps=1e-6):
  x = np.maximum(np.asarray(x, np.float64), eps)
  return np.mean(x**p, axis=(1, 2))**(1.0 / p)


def test_gem_pooling_formula():
  x = np.random.default_rng(2).standard_normal((3, 5, 4, 6)).astype(np.float32)
  pool = models.GeneralizedMeanPooling(init_p=3.0)
  variables = pool.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(variables['params']['p'], [3.0])
  assert_close(pool.apply(variables, x), gem_numpy(x, 3.0))
  assert_close(pool.apply({'params': {'p': jnp.array([1.7])}}, x),
               gem_numpy(x, 1.7))
  # Learnable: p gets a gradient.
  grad = jax.grad(lambda v: pool.apply(v, x).sum())(variables)
  assert np.abs(grad['params']['p']).max() > 0


def test_gem_in_model(tiny_input, bnneck_variables):
  model = models.ReIDModel(num_classes=7, pooling='gem', gem_p=4.0,
                           neck_feat='before', **TINY)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(TINY_SHAPE), train=False))
  assert shapes['params']['gem']['p'].shape == (1,)
  variables = {'params': dict(bnneck_variables['params'],
                              gem={'p': np.array([4.0], np.float32)}),
               'batch_stats': bnneck_variables['batch_stats']}
  fmap = apply_eval(TINY_BACKBONE,
                    {'params': variables['params']['backbone'],
                     'batch_stats': variables['batch_stats']['backbone']},
                    tiny_input)
  assert_close(apply_eval(model, variables, tiny_input), gem_numpy(fmap, 4.0))


def test_initialization_statistics():
  model = models.ReIDModel(num_classes=1000, backbone='resnet50',
                           stage_sizes=(1,), width=32, pooling='gem')
  params, stats = initialize(model, jax.random.PRNGKey(0), (16, 8))
  for leaf in jax.tree_util.tree_leaves((params, stats)):
    assert leaf.dtype == jnp.float32
  np.testing.assert_array_equal(params['gem']['p'], [3.0])
  # torchvision: kaiming_normal_(mode='fan_out'): std = sqrt(2 / (k*k*out)).
  kernel = np.asarray(params['backbone']['layer1_0']['conv2']['kernel'])
  kh, kw, _, out = kernel.shape
  assert kernel.std() == pytest.approx(math.sqrt(2 / (kh * kw * out)), rel=0.03)
  assert abs(kernel.mean()) < 0.05 * kernel.std()
  # Not truncated: values beyond 2 std exist (~4.6% for a normal).
  assert (np.abs(kernel) > 2 * kernel.std()).mean() > 0.03
  classifier = np.asarray(params['classifier']['kernel'])
  assert classifier.shape == (128, 1000)
  assert classifier.std() == pytest.approx(0.001, rel=0.03)
  for path, leaf in jax.tree_util.tree_leaves_with_path((params, stats)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']") or name.endswith("['var']"):
      np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
    elif name.endswith("['bias']") or name.endswith("['mean']"):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=name)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_compute(dtype, tiny_input, bnneck_variables):
  ref = models.ReIDModel(num_classes=7, **TINY)
  model = models.ReIDModel(num_classes=7, dtype=dtype, **TINY)
  variables = bnneck_variables
  out = apply_eval(model, variables, tiny_input)
  assert out.dtype == jnp.float32
  expected = apply_eval(ref, variables, tiny_input)
  np.testing.assert_allclose(out, expected, rtol=0.1,
                             atol=0.05 * float(np.abs(expected).max()))
  (logits, feat), updated = apply_train(model, variables, tiny_input)
  assert logits.dtype == feat.dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(updated):
    assert leaf.dtype == jnp.float32


def test_cross_device_batch_norm(tiny_input, bnneck_variables):
  """With bn_axis_name under pmap, statistics equal the full-batch ones."""
  n = jax.local_device_count()
  assert TINY_SHAPE[0] % n == 0
  model = models.ReIDModel(num_classes=7, bn_axis_name='batch', **TINY)
  single = models.ReIDModel(num_classes=7, **TINY)
  variables = bnneck_variables
  step = jax.pmap(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
      axis_name='batch', in_axes=(None, 0))
  shards = tiny_input.reshape((n, -1) + TINY_SHAPE[1:])
  (logits, _), updated = step(variables, shards)
  (logits_ref, _), updated_ref = apply_train(single, variables, tiny_input)
  assert_close(np.asarray(logits).reshape(logits_ref.shape), logits_ref)
  got = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], updated)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5), got, updated_ref)


# --------------------------------------------------------------------------
# Validation and the config entry point.


@pytest.mark.parametrize('field,value', [
    ('backbone', 'resnet51'), ('neck', 'bn'), ('neck_feat', 'middle'),
    ('pooling', 'max'), ('last_stride', 3)])
def test_bad_field_raises(field, value):
  with pytest.raises(ValueError, match=field):
    models.ReIDModel(num_classes=10, **{field: value})


def test_create_model_from_config():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  model = models.create_model(config.model, num_classes=751, dtype=jnp.bfloat16,
                              bn_axis_name='batch')
  assert (model.backbone, model.last_stride, model.neck, model.neck_feat,
          model.pooling, model.gem_p) == ('resnet50', 1, 'bnneck', 'after',
                                          'avg', 3.0)
  assert model.num_classes == 751 and model.dtype == jnp.bfloat16
  assert model.bn_axis_name == 'batch' and model.stage_sizes is None
  bad = ml_collections.ConfigDict(config.model.to_dict())
  bad.pooling = 'median'
  with pytest.raises(ValueError, match='pooling'):
    models.create_model(bad, num_classes=751)


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet50'])
def test_conv_input_barrier_changes_no_value(backbone):
  # The barriers only steer XLA's fusion (reid_jax.models docstring): same params,
  # outputs, BN statistics and gradients, bit for bit.
  kwargs = dict(num_classes=5, backbone=backbone, stage_sizes=(1, 1), width=8)
  plain = models.ReIDModel(**kwargs)
  barrier = models.ReIDModel(**kwargs, conv_input_barrier=True)
  x = jax.random.normal(jax.random.key(1), (4, 32, 16, 3))
  variables = plain.init(jax.random.key(0), x, train=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables,
                         barrier.init(jax.random.key(0), x, train=False))

  def loss(params, model):
    (logits, feat), state = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
        mutable=['batch_stats'])
    return jnp.sum(logits ** 2) + jnp.sum(feat), (logits, state)

  for fn in (lambda f: f, jax.jit):
    out_plain = fn(jax.value_and_grad(functools.partial(loss, model=plain),
                                      has_aux=True))(variables['params'])
    out_barrier = fn(jax.value_and_grad(functools.partial(loss, model=barrier),
                                        has_aux=True))(variables['params'])
    jax.tree_util.tree_map(np.testing.assert_array_equal, out_plain, out_barrier)


def test_create_model_turns_the_barrier_on_on_cpu():
  config = ml_collections.ConfigDict(dict(
      name='resnet18', last_stride=1, neck='bnneck', neck_feat='after',
      pooling='avg', gem_p=3.0, stage_sizes=(), width=64))
  assert models.create_model(config, 5).conv_input_barrier == (
      jax.default_backend() == 'cpu')
  assert not models.create_model(config, 5, conv_input_barrier=False).conv_input_barrier
