"""The multi-GPU variant's recipes (DTennant/reid_baseline_with_syncbn), value for value.

Every expected value below is written out from the variant's own files (its
`configs/*.yml` over its `config.py` defaults, `dataset/__init__.py`, `losses/__init__.py`,
`optim.py`, `trainer.py`), not read from our configs. Also tested: the per-GPU batch
semantics (`config.num_reference_gpus`), a train step whose identities span devices
against one device, the recipes' erasing fill and plain cross-entropy, and the generic
folder reader's options from the config.
"""

import dataclasses
import importlib
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline import data_source
from input_pipeline import device_augment
from input_pipeline import reader_utils
from reid_jax import config_lib
from reid_jax import losses
from reid_jax import precision
from reid_jax import train_step as step_lib
# The pmap-vs-one-device machinery of the train-step tests.
from test_train_step import (  # pylint: disable=g-bad-import-order
    IMAGE_SIZE, NUM_CLASSES, NUM_DEVICES, _assert_trees_close, _config, _shard, _state,
    _steps)
from test_datasets import write_tree  # pylint: disable=g-bad-import-order

# The variant's SOLVER.STEPS, as written in every one of its YAMLs.
STEPS = (20, 30, 45, 60, 75, 90, 105, 120, 135, 150, 165, 180, 195, 210, 225, 240, 255)

# Values shared by the five YAMLs (their own values and the config.py defaults they
# keep), as config field -> value.
SHARED = {
    'dataset': 'folder',  # init_dataset: one generic folder reader for every dataset
    'folder.pattern': r'([-\d]+)_c(\d+)',
    'input.flip_prob': 0.5,  # PROB
    'input.random_erasing_prob': 0.5,  # RE_PROB
    'input.padding': 0,  # PADDING
    'input.pixel_mean': (0.5, 0.5, 0.5),
    'input.pixel_std': (0.5, 0.5, 0.5),
    'sampler': 'pk',  # SAMPLER 'softmax_triplet': RandomIdentitySampler
    'model.name': 'resnet50',
    'model.last_stride': 1,
    'model.neck': 'bnneck',  # Baseline: BatchNorm1d neck, bias frozen
    'model.neck_feat': 'after',  # eval: the neck BN's output
    'model.pooling': 'avg',  # AdaptiveAvgPool2d
    'loss.type': 'softmax_triplet',  # xent(score) + triplet(feat)
    'loss.label_smoothing': 0.0,  # LABEL_SMOOTH False: F.cross_entropy
    'loss.triplet_margin': 0.3,  # SOLVER.MARGIN
    'optim.name': 'adam',
    'optim.base_lr': 1e-4,
    'optim.bias_lr_factor': 1.0,
    'optim.weight_decay': 5e-4,
    'optim.weight_decay_bias': 5e-4,
    'schedule.name': 'warmup_multistep',
    'schedule.milestones': STEPS,
    'schedule.gamma': 0.6,
    'schedule.warmup_factor': 0.01,
    'schedule.warmup_epochs': 10,  # WARMUP_ITERS, stepped per epoch
    'schedule.warmup_method': 'linear',
    'log_every_steps': 100,  # LOG_PERIOD
    'test.batch_size': 16,  # TEST.IMS_PER_BATCH, per GPU
    'test.feat_norm': False,  # euclidean_dist on the raw features
    'test.distance': 'euclidean',
    'test.flip': False,
    'test.rerank': False,  # the trainer's evaluation does not re-rank
    'test.max_rank': 50,  # eval_func's default
    'num_reference_gpus': 0,  # a one-GPU run unless asked
    'half_precision': False,
}

# Each recipe's own values: config module -> (YAML it reproduces, values in the order of
# RECIPE_FIELDS).
RECIPE_FIELDS = (
    'data_dir', 'folder.train_dir', 'folder.query_dir', 'folder.gallery_dir',  # DATASETS
    'test_datasets',
    'input.image_size',  # SIZE_TRAIN = SIZE_TEST
    'batch_size', 'num_instances', 'num_epochs', 'dtype',
    'checkpoint_every_epochs', 'eval_every_epochs',
    'test.cmc_ranks',  # TEST.CMC
)
RECIPES = {
    'syncbn_market': ('debug.yml', (
        'data/Market-1501-v15.09.15', 'bounding_box_train', 'query', 'bounding_box_test',
        (), (224, 224), 64, 8, 30, '', 1, 1, (1, 5, 10))),
    'syncbn_veri': ('veri.yml', (
        'data/VeRi', 'image_train', 'image_query', 'image_test',
        (), (384, 384), 36, 6, 260, 'float16', 5, 5, (1, 5, 10))),
    'syncbn_veriwild': ('veriwild.yml', (
        'data/veriwild', 'train', 'query', 'test',
        (), (384, 384), 36, 6, 260, 'float16', 5, 5, (1, 5, 10))),
    'syncbn_market_to_partial_ilids': ('market2partilibds.yml', (
        'data/Market-1501-v15.09.15', 'bounding_box_train', 'query', 'bounding_box_test',
        ('partial_ilids:data/Partial_iLIDS',), (384, 256), 64, 8, 120, 'float16', 1, 1,
        (1, 3))),
}


def _get(config, field):
  value = config
  for part in field.split('.'):
    value = value[part]
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _recipe(name):
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipe_values_are_the_variants(name):
  config = _recipe(name)
  yml, own = RECIPES[name]
  assert len(own) == len(RECIPE_FIELDS)
  expected = {**SHARED, **dict(zip(RECIPE_FIELDS, own))}
  wrong = {f: (_get(config, f), v) for f, v in expected.items() if _get(config, f) != v}
  assert not wrong, f'{name} differs from the variant\'s {yml} in (got, want): {wrong}'
  assert yml in importlib.import_module(f'configs.{name}').__doc__
  config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipe_derived_values(name):
  config = _recipe(name)
  # P = 8 identities in the person recipes, 6 in the vehicle ones (36 / 6).
  assert config_lib.num_identities_per_batch(config) == (6 if 'veri' in name else 8)
  # The variant's RandomErasing runs after Normalize with mean=PIXEL_MEAN: the erased
  # box holds 0.5 in the normalised tensor (a grey level of 191.25, not the mean 0).
  aug = device_augment.AugmentConfig.from_config(config.input)
  assert aug.fill == (0.5, 0.5, 0.5) and aug.padding == 0
  loss_config = step_lib.LossConfig.from_config(config)
  assert loss_config.label_smoothing == 0.0 and loss_config.triplet_margin == 0.3
  assert loss_config.use_softmax and loss_config.use_triplet and not loss_config.use_center
  # fp16 recipes stay float16 on GPUs that would pick bfloat16; the others float32.
  want = 'float32' if name == 'syncbn_market' else 'float16'
  assert precision.compute_dtype(config, 'gpu', 9.0) == jnp.dtype(want)
  assert precision.compute_dtype(config, 'gpu', 7.0) == jnp.dtype(want)


@pytest.mark.parametrize('old,new', [('multigpu_market', 'syncbn_market'),
                                     ('multigpu_veri', 'syncbn_veri')])
def test_deprecated_names_are_aliases(old, new):
  assert _recipe(old).to_dict() == _recipe(new).to_dict()


def test_erased_box_holds_the_pixel_mean_in_normalised_space():
  config = _recipe('syncbn_market')
  aug = dataclasses.replace(device_augment.AugmentConfig.from_config(config.input),
                            image_size=(24, 12), flip_prob=0.0, random_erasing_prob=1.0)
  images = np.broadcast_to(np.arange(24 * 12 * 3, dtype=np.int64).reshape(1, 24, 12, 3)
                           % 256, (4, 24, 12, 3)).astype(np.uint8)
  keys = device_augment.image_keys(0, jnp.zeros(4, jnp.int32), jnp.arange(4))
  out = np.asarray(device_augment.augment(jnp.asarray(images), keys, aug, jnp.float32))
  # torchvision: ToTensor, Normalize(0.5, 0.5), then RandomErasing(mean=(0.5,)*3).
  normalised = (images / 255.0 - 0.5) / 0.5
  erased = out == 0.5
  assert erased.any(axis=(1, 2, 3)).all()  # erasing probability 1: every image
  np.testing.assert_allclose(out[~erased], normalised[~erased], atol=1e-6)


def test_plain_cross_entropy_is_torch_cross_entropy():
  torch = pytest.importorskip('torch')
  config = _recipe('syncbn_market')
  eps = step_lib.LossConfig.from_config(config).label_smoothing
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(16, 11)) * 4).astype(np.float32)
  labels = rng.integers(0, 11, size=16)
  got = losses.cross_entropy_label_smooth(logits, labels.astype(np.int32), eps)
  want = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


# --- The per-GPU batch semantics (config.num_reference_gpus). ---


@pytest.mark.parametrize('name,n', [('syncbn_market', 2), ('syncbn_market', 8),
                                    ('syncbn_veri', 3)])
def test_reference_gpus_give_the_variants_global_values(name, n):
  config = _recipe(name)
  batch, k, test_batch, lr = (config.batch_size, config.num_instances,
                              config.test.batch_size, config.optim.base_lr)
  bias_lr = lr * config.optim.bias_lr_factor
  config.num_reference_gpus = n
  assert config_lib.resolve_reference_gpus(config) is config
  # dataset/__init__.py: IMS_PER_BATCH * num_gpus, NUM_INSTANCE * num_gpus, TEST
  # IMS_PER_BATCH * num_gpus; optim.py: weights BASE_LR * num_gpus, biases BASE_LR *
  # BIAS_LR_FACTOR.
  assert (config.batch_size, config.num_instances, config.test.batch_size) == (
      batch * n, k * n, test_batch * n)
  assert config.batch_size // config.num_instances == batch // k  # P unchanged
  assert config.optim.base_lr == pytest.approx(lr * n, rel=1e-15)
  assert config.optim.base_lr * config.optim.bias_lr_factor == pytest.approx(
      bias_lr, rel=1e-15)
  assert config.identities_may_span_devices and config.num_reference_gpus == 0
  before = config.to_dict()
  config_lib.resolve_reference_gpus(config)  # resolved once: a second call is a no-op
  assert config.to_dict() == before


def test_reference_gpus_off_changes_nothing():
  config = _recipe('syncbn_market')
  before = config.to_dict()
  config_lib.resolve_reference_gpus(config)
  assert config.to_dict() == before


@pytest.mark.parametrize('value', [-1, True])
def test_reference_gpus_must_be_a_count(value):
  config = _recipe('syncbn_market')
  with config.unlocked():
    config.num_reference_gpus = value
  with pytest.raises(config_lib.ConfigError, match='config.num_reference_gpus'):
    config_lib.resolve_reference_gpus(config)


def test_two_gpu_run_fits_2_8_and_16_devices():
  # The variant's 2-GPU run: global batch 128, P=8 x K=16. On 16 devices every device
  # holds half an identity, allowed in this mode only.
  for devices in (2, 8, 16):
    config = _recipe('syncbn_market')
    config.num_reference_gpus = 2
    config_lib.validate(config, devices)  # checks the resolved values on a copy
    assert config.num_reference_gpus == 2 and config.batch_size == 64
  config = _recipe('syncbn_market')
  config.batch_size, config.num_instances = 128, 16
  with pytest.raises(config_lib.ConfigError, match='identities_may_span_devices'):
    config_lib.validate(config, 16)


def test_build_experiment_resolves_the_config_before_use(monkeypatch):
  """build_experiment resolves in place before anything reads the config."""
  from reid_jax import train  # pylint: disable=g-import-not-at-top
  seen = {}

  def stop(config):  # the data layer is the first reader after validation
    seen.update(batch=config.batch_size, k=config.num_instances,
                test=config.test.batch_size, lr=config.optim.base_lr)
    raise RuntimeError('stop here')

  monkeypatch.setattr(data_source, 'load_train_test', stop)
  config = _recipe('syncbn_market')
  config.num_reference_gpus = 2
  with pytest.raises(RuntimeError, match='stop here'):
    train.build_experiment(config)
  assert seen == {'batch': 128, 'k': 16, 'test': 32, 'lr': pytest.approx(2e-4)}
  assert config.batch_size == 128 and config.num_reference_gpus == 0


def test_train_step_with_identities_spanning_devices_equals_one_device():
  """The 2-GPU semantics on 4 devices: each identity's K=8 images on two devices."""
  num_devices = NUM_DEVICES
  assert jax.device_count() >= num_devices, 'tests/conftest.py sets 4 CPU devices'
  config = _config('softmax_triplet', tiny=True)
  config.model.stage_sizes = (1,)  # stem + one block: BN collectives, neck, both losses
  config.batch_size, config.num_instances = 8, 4  # per GPU, as the variant writes them
  config.num_reference_gpus = 2
  config.optim.name = 'sgd'  # updates proportional to the gradients (see test_train_step)
  config.optim.base_lr = 0.05
  config_lib.resolve_reference_gpus(config)
  config_lib.validate(config, num_devices)
  p, k = config.batch_size // config.num_instances, config.num_instances
  assert (p, k) == (2, 8) and p < num_devices
  rng = np.random.default_rng(3)
  images = rng.normal(size=(p * k, *IMAGE_SIZE, 3)).astype(np.float32)
  labels = np.repeat(rng.choice(NUM_CLASSES, p, replace=False), k)
  batch = {'image': images, 'label': labels.astype(np.int32)}
  state = _state(config)
  out = {}
  for n in (1, num_devices):
    p_train, _ = _steps(config, jax.devices()[:n])
    sharded = _shard(batch, n)
    if n > 1:  # every identity really spans two devices
      per_device = sharded['label'].reshape(n, -1)
      assert all(len(set(row)) == 1 for row in per_device)
      assert len(set(per_device[:, 0])) == p
    new_state, metrics = p_train(state, sharded)
    out[n] = jax.device_get((new_state, metrics))
  for key in ('loss', 'ce_loss', 'triplet_loss', 'dist_ap', 'dist_an', 'accuracy'):
    np.testing.assert_allclose(np.mean(out[num_devices][1][key]), out[1][1][key][0],
                               rtol=1e-5, atol=1e-7, err_msg=key)
  # Per-device mining would see one identity per device: no negative at all.
  assert 0 < out[1][1]['dist_an'][0] < 1e3
  _assert_trees_close(out[num_devices][0].params, out[1][0].params)
  _assert_trees_close(out[num_devices][0].batch_stats, out[1][0].batch_stats)
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                       out[1][0].params, jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 1e-5


# --- The generic folder reader's options from the config. ---


def test_folder_reader_options_come_from_the_config(tmp_path):
  # The variant's VeRi-Wild layout: pre-renamed train/query/test folders of
  # (pid)_c(camid)_(iid).jpg, the query folder given relative to the root with '..'.
  root = tmp_path / 'veriwild'
  write_tree(str(root), {
      'train': ['00001_c001_1.jpg', '00001_c002_2.jpg', '00007_c003_3.jpg',
                '00007_c010_4.jpg', '-1_c001_5.jpg'],
      'test': ['00003_c011_7.jpg', '00004_c002_8.jpg', '-1_c002_9.jpg']})
  write_tree(str(tmp_path / 'renamed'), {'query': ['00003_c002_6.jpg']})
  config = _recipe('syncbn_veriwild')
  config.data_dir = str(root)
  config.folder.query_dir = '../renamed/query'
  train, tests = data_source.load_train_test(config)
  records = lambda split: sorted((os.path.basename(r.path), r.pid, r.camid) for r in split)
  # Cameras count from 0 (the variant's camid -= 1); pid -1 (junk) is dropped.
  assert [(n, c) for n, _, c in records(train.dataset.train)] == [
      ('00001_c001_1.jpg', 0), ('00001_c002_2.jpg', 1), ('00007_c003_3.jpg', 2),
      ('00007_c010_4.jpg', 9)]
  assert train.dataset.num_train_pids == 2
  test = tests[0].dataset
  assert records(test.query) == [('00003_c002_6.jpg', 3, 1)]
  assert records(test.gallery) == [('00003_c011_7.jpg', 3, 10), ('00004_c002_8.jpg', 4, 1)]
  # Another pattern and other folder names, from the config alone.
  other = tmp_path / 'other'
  write_tree(str(other), {'tr': ['5-cam2.png', '6-cam1.png'], 'q': ['5-cam1.png'],
                          'g': ['5-cam2.png']})
  config.data_dir = str(other)
  config.folder.train_dir, config.folder.query_dir, config.folder.gallery_dir = 'tr', 'q', 'g'
  config.folder.pattern = r'(\d+)-cam(\d+)'
  train, tests = data_source.load_train_test(config)
  assert records(tests[0].dataset.query) == [('5-cam1.png', 5, 0)]
  assert len(train.dataset.train) == 2
  config.folder.gallery_dir = 'missing'
  with pytest.raises(reader_utils.DatasetError, match='missing'):
    data_source.load_train_test(config)


def test_default_folder_options_are_the_readers_defaults():
  from configs import default  # pylint: disable=g-import-not-at-top
  from input_pipeline import market  # pylint: disable=g-import-not-at-top
  params = inspect.signature(market.read_folder).parameters
  folder = default.get_config().folder
  for field in ('train_dir', 'query_dir', 'gallery_dir', 'pattern'):
    assert folder[field] == params[field].default, field
