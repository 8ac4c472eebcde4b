"""Start-up checks of a config against the devices, and the values derived from it.

`validate` checks every choice against the allowed values of the module that uses it
(`models.NECKS`, `train_step.LOSS_TYPES`, `pipeline.SAMPLERS`, ...) with the project's
one check, `input_pipeline.choices.check_choice`, raising `ConfigError`.
"""

import copy
import logging
from typing import Any, Callable

import ml_collections

from eval import distance as distance_lib
from input_pipeline import cache as cache_lib
from input_pipeline import data_source
from input_pipeline import device_augment
from input_pipeline import pipeline
from input_pipeline.choices import check_choice
from reid_jax import convert
from reid_jax import evaluation
from reid_jax import models
from reid_jax import optim
from reid_jax import precision
from reid_jax import train_step as step_lib
from reid_jax.backbones import layers


# What config.model.name accepts (owned by reid_jax.models and reid_jax.backbones).
MODEL_NAMES = models.MODEL_NAMES


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def num_identities_per_batch(config: ml_collections.ConfigDict) -> int:
  """P, the number of identities in a global PK batch (batch_size / num_instances)."""
  return config.batch_size // config.num_instances


def resolve_reference_gpus(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns the variant's per-GPU batch semantics into global values, in place.

  With `config.num_reference_gpus = N > 0` (the multi-GPU variant,
  DTennant/reid_baseline_with_syncbn, on N GPUs: its `make_dataloader` draws
  IMS_PER_BATCH * N images with NUM_INSTANCE * N per identity and tests in batches of
  TEST.IMS_PER_BATCH * N; its `make_optimizer` gives weights BASE_LR * N and biases
  BASE_LR * BIAS_LR_FACTOR), the config becomes: batch_size * N, num_instances * N (P
  unchanged), test.batch_size * N, optim.base_lr * N (the weights' lr) and
  optim.bias_lr_factor / N (so that biases keep base_lr * bias_lr_factor),
  identities_may_span_devices = True (on more devices than P an identity's K images
  span several of them), and num_reference_gpus = 0: resolving again changes nothing,
  and the recorded config reruns the same training. N = 0 leaves the config as it is.

  Args:
    config: the run's config; changed in place when num_reference_gpus > 0.

  Returns:
    The same config, now with the global values everything else reads.

  Raises:
    ConfigError: num_reference_gpus is not a non-negative integer.
  """
  n = config.num_reference_gpus
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ConfigError(f'config.num_reference_gpus={n!r} must be 0 (off) or the number '
                      'of GPUs of the multi-GPU variant run to reproduce.')
  if not n:
    return config
  before = (config.batch_size, config.num_instances, config.test.batch_size,
            config.optim.base_lr, config.optim.base_lr * config.optim.bias_lr_factor)
  config.batch_size = config.batch_size * n
  config.num_instances = config.num_instances * n
  config.test.batch_size = config.test.batch_size * n
  config.optim.base_lr = float(config.optim.base_lr) * n
  config.optim.bias_lr_factor = float(config.optim.bias_lr_factor) / n
  config.identities_may_span_devices = True
  config.num_reference_gpus = 0
  logging.info(
      'config.num_reference_gpus=%d (per-GPU batch semantics): global batch %d -> %d, '
      'K %d -> %d, test batch %d -> %d, weights lr %g -> %g, biases lr %g (unscaled).',
      n, before[0], config.batch_size, before[1], config.num_instances, before[2],
      config.test.batch_size, before[3], config.optim.base_lr, before[4])
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks a config before anything is built.

  Args:
    config: the run's config (configs/default.py lists the fields); with
      num_reference_gpus > 0 the global values of `resolve_reference_gpus` (on a
      copy) are checked.
    num_devices: the number of devices the global batch is split over.

  Raises:
    ConfigError: naming the field that is wrong and what was expected.
  """
  if config.num_reference_gpus:
    config = resolve_reference_gpus(copy.deepcopy(config))
  for field, allowed in (
      ('model.name', MODEL_NAMES),
      ('model.neck', models.NECKS),
      ('model.neck_feat', models.NECK_FEATS),
      ('model.pooling', models.POOLINGS),
      ('model.last_stride', layers.LAST_STRIDES),
      ('model.pretrain_choice', convert.PRETRAIN_CHOICES),
      ('sampler', pipeline.SAMPLERS),
      ('data_format', data_source.DATA_FORMATS),
      ('input.cache', cache_lib.CACHE_MODES),
      ('dtype', precision.CONFIG_DTYPES),
      ('optim.name', optim.OPTIMIZERS),
      ('test.distance', distance_lib.DISTANCES),
      ('test.protocol', evaluation.PROTOCOLS)):
    check_choice(f'config.{field}', _field(config, field), allowed, ConfigError)
  loss = _parsed(step_lib.LossConfig.from_config, config)  # checks loss.type (LOSS_TYPES)
  _parsed(optim.validate_schedule_config, config.schedule)
  if config.model.pretrained:
    convert.check_pretrained_file(config.model.pretrained, config.model.pretrain_choice)
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ConfigError(
        f'config.batch_size={config.batch_size} must be a positive multiple of the '
        f'{num_devices} devices, so every device gets the same share.')
  if config.test.batch_size <= 0 or config.test.batch_size % num_devices:
    raise ConfigError(
        f'config.test.batch_size={config.test.batch_size} must be a positive multiple of '
        f'the {num_devices} devices.')
  if loss.use_triplet and config.sampler != 'pk':
    raise ConfigError(
        f'config.loss.type={config.loss.type!r} mines triplets and needs '
        f"config.sampler='pk' (got {config.sampler!r}).")
  if config.sampler == 'pk':
    k = config.num_instances
    if k < 2 or config.batch_size % k:
      raise ConfigError(
          f'config.batch_size={config.batch_size} must be P * K with '
          f'K = config.num_instances={k} >= 2 images per identity.')
    p = num_identities_per_batch(config)
    if p % num_devices and not config.identities_may_span_devices:
      raise ConfigError(
          f'P = config.batch_size / config.num_instances = {p} identities per batch must '
          f'be a multiple of the {num_devices} devices, so each device holds whole '
          'identities (or set config.identities_may_span_devices=True: triplets are '
          'mined over the global batch, so identities may span devices).')
  if config.num_epochs <= 0:
    raise ConfigError(f'config.num_epochs={config.num_epochs} must be positive.')
  for field in ('log_every_steps', 'checkpoint_every_epochs', 'eval_every_epochs',
                'keep_checkpoints'):
    if config[field] <= 0:
      raise ConfigError(f'config.{field}={config[field]} must be positive.')
  if (len(config.input.image_size) != 2
      or any(int(v) <= 0 for v in config.input.image_size)):
    raise ConfigError(
        f'config.input.image_size={config.input.image_size} must be (height, width), '
        'both positive.')
  _parsed(device_augment.AugmentConfig.from_config, config.input)
  if not config.optim.base_lr > 0:
    raise ConfigError(f'config.optim.base_lr={config.optim.base_lr} must be positive (a '
                      'negative rate would ascend the loss).')
  if not config.min_loss_scale > 0:
    raise ConfigError(f'config.min_loss_scale={config.min_loss_scale} must be positive.')
  for field in ('checkpoint_every_steps', 'checkpoint_every_minutes'):
    if config[field] < 0:
      raise ConfigError(f'config.{field}={config[field]} must be 0 (off) or positive.')
  for field in ('max_skipped_steps', 'prefetch_batches'):
    if config[field] <= 0:
      raise ConfigError(f'config.{field}={config[field]} must be positive.')
  if config.profile_steps < 0:
    raise ConfigError(f'config.profile_steps={config.profile_steps} must be 0 (off) or '
                      'positive.')
  _validate_test(config)


def _validate_test(config: ml_collections.ConfigDict) -> None:
  """The evaluation fields (config.test.*, config.test_datasets)."""
  test = config.test
  if test.max_rank < 1:
    raise ConfigError(f'config.test.max_rank={test.max_rank} must be positive.')
  ranks = tuple(test.cmc_ranks)
  if not ranks or any(not isinstance(r, int) or r < 1 for r in ranks):
    raise ConfigError(f'config.test.cmc_ranks={ranks} must be positive integers, at '
                      'least one.')
  if test.aqe and (test.aqe_times < 1 or test.aqe_k < 1):
    raise ConfigError(f'config.test.aqe_times={test.aqe_times} and config.test.aqe_k='
                      f'{test.aqe_k} must be positive with config.test.aqe=True.')
  if not test.max_dense_gb > 0:
    raise ConfigError(f'config.test.max_dense_gb={test.max_dense_gb} must be positive.')
  _parsed(data_source.parse_test_datasets, config)


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """config['a']['b'] for 'a.b'."""
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _parsed(parse: Callable[[Any], Any], value: Any) -> Any:
  """`parse(value)`, its ValueError (a bad field, which it names) as ConfigError."""
  try:
    return parse(value)
  except ValueError as e:
    raise ConfigError(str(e)) from None
