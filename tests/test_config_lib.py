"""Configs: the published recipes, locking, and start-up validation messages."""

import importlib
import re

import pytest

from configs import default
from reid_jax import config_lib

CONFIG_MODULES = ('market', 'duke', 'msmt17', 'cuhk03', 'veri', 'veriwild',
                  'market_to_partial_ilids', 'multigpu_market', 'multigpu_veri', 'demo')


@pytest.mark.parametrize('name', CONFIG_MODULES)
def test_every_config_loads_and_validates_on_one_device(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_lib.validate(config, num_devices=1)


def test_market_config_is_the_bot_recipe():
  c = importlib.import_module('configs.market').get_config()
  assert tuple(c.input.image_size) == (256, 128)
  assert (c.batch_size, c.num_instances) == (64, 4)  # P=16 x K=4
  assert c.optim.name == 'adam' and c.optim.base_lr == 3.5e-4
  assert (c.optim.weight_decay, c.optim.weight_decay_bias) == (5e-4, 5e-4)
  assert tuple(c.schedule.milestones) == (40, 70) and c.schedule.gamma == 0.1
  assert (c.schedule.warmup_factor, c.schedule.warmup_epochs) == (0.01, 10)
  assert c.num_epochs == 120
  assert c.loss.label_smoothing == 0.1 and c.loss.triplet_margin == 0.3
  assert c.model.last_stride == 1 and c.model.neck == 'bnneck'
  assert (c.input.flip_prob, c.input.padding, c.input.random_erasing_prob) == (0.5, 10, 0.5)


def test_multigpu_config_is_its_recipe():
  c = importlib.import_module('configs.multigpu_market').get_config()
  assert tuple(c.input.image_size) == (224, 224)
  assert (c.batch_size // c.num_instances, c.num_instances) == (8, 8)
  assert c.optim.base_lr == 1e-4 and c.schedule.gamma == 0.6
  assert tuple(c.schedule.milestones[:4]) == (20, 30, 45, 60)
  v = importlib.import_module('configs.multigpu_veri').get_config()
  assert tuple(v.input.image_size) == (384, 384) and v.dtype == 'float16'


def test_locked_config_rejects_misspelt_field():
  config = default.get_config()
  config.lock()
  with pytest.raises(AttributeError, match='model'):
    config.modle = 'resnet50'


@pytest.mark.parametrize('field,value,devices,match', [
    ('batch_size', 66, 4, 'config.batch_size=66'),
    ('num_instances', 5, 1, 'config.num_instances=5'),
    ('batch_size', 48, 8, 'P = config.batch_size / config.num_instances = 12'),
    ('model.name', 'resnet51', 1, "config.model.name='resnet51'"),
    ('loss.type', 'softmax_tripplet', 1, "config.loss.type='softmax_tripplet'"),
    ('model.neck', 'bn', 1, 'config.model.neck'),
    ('test.batch_size', 6, 4, 'config.test.batch_size=6'),
    ('optim.base_lr', -0.1, 1, 'config.optim.base_lr=-0.1 must be positive'),
    ('optim.base_lr', 0.0, 1, 'config.optim.base_lr=0.0 must be positive'),
    ('input.image_size', (0, 0), 1, 'config.input.image_size=(0, 0) must be (height, width), both positive'),
    ('input.image_size', (256,), 1, 'must be (height, width)'),
    ('min_loss_scale', 0.0, 1, 'config.min_loss_scale=0.0 must be positive'),
    ('max_skipped_steps', 0, 1, 'config.max_skipped_steps=0 must be positive'),
    ('prefetch_batches', 0, 1, 'config.prefetch_batches=0 must be positive'),
    ('checkpoint_every_steps', -1, 1, 'config.checkpoint_every_steps=-1 must be 0 (off)'),
    ('profile_steps', -2, 1, 'config.profile_steps=-2 must be 0 (off)'),
    ('model.pretrain_choice', 'imagnet', 1, "config.model.pretrain_choice='imagnet'"),
    ('model.last_stride', 3, 1, 'config.model.last_stride must be one of 1, 2; got '
     'config.model.last_stride=3.'),
])
def test_validate_names_the_bad_field(field, value, devices, match):
  config = default.get_config()
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
    config_lib.validate(config, devices)


def test_triplet_loss_needs_pk_sampler():
  config = default.get_config()
  config.sampler = 'shuffle'
  with pytest.raises(config_lib.ConfigError, match='config.sampler'):
    config_lib.validate(config, 1)
  config.loss.type = 'softmax'
  config_lib.validate(config, 1)
