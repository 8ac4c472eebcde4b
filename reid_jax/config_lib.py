"""Start-up checks of a config against the devices, and the values derived from it."""

import ml_collections

from input_pipeline import data_source
from reid_jax import convert
from reid_jax import models

MODEL_NAMES = models.MODEL_NAMES  # owned by the models (and reid_jax.backbones)
LOSS_TYPES = ('softmax', 'triplet', 'softmax_triplet', 'softmax_triplet_center')
SAMPLERS = ('pk', 'shuffle')
NECKS = ('bnneck', 'no')
NECK_FEATS = ('after', 'before')
POOLINGS = ('avg', 'gem')


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def _choice(config: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  if value not in allowed:
    raise ConfigError(f'config.{field}={value!r} is not one of {", ".join(allowed)}.')


def num_identities_per_batch(config: ml_collections.ConfigDict) -> int:
  """P, the number of identities in a global PK batch (batch_size / num_instances)."""
  return config.batch_size // config.num_instances


def uses_center_loss(config: ml_collections.ConfigDict) -> bool:
  return config.loss.type.endswith('center')


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks a config before anything is built.

  Args:
    config: the run's config (configs/default.py lists the fields).
    num_devices: the number of devices the global batch is split over.

  Raises:
    ConfigError: naming the field that is wrong and what was expected.
  """
  _choice(config, 'model.name', MODEL_NAMES)
  _choice(config, 'model.neck', NECKS)
  _choice(config, 'model.neck_feat', NECK_FEATS)
  _choice(config, 'model.pooling', POOLINGS)
  _choice(config, 'loss.type', LOSS_TYPES)
  _choice(config, 'sampler', SAMPLERS)
  _choice(config, 'data_format', data_source.DATA_FORMATS)
  _choice(config, 'model.pretrain_choice', convert.PRETRAIN_CHOICES)
  if config.model.pretrained:
    convert.check_pretrained_file(config.model.pretrained, config.model.pretrain_choice)
  if config.model.last_stride not in (1, 2):
    raise ConfigError(f'config.model.last_stride={config.model.last_stride} must be 1 or 2.')
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ConfigError(
        f'config.batch_size={config.batch_size} must be a positive multiple of the '
        f'{num_devices} devices, so every device gets the same share.')
  if config.test.batch_size <= 0 or config.test.batch_size % num_devices:
    raise ConfigError(
        f'config.test.batch_size={config.test.batch_size} must be a positive multiple of '
        f'the {num_devices} devices.')
  if 'triplet' in config.loss.type and config.sampler != 'pk':
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
    if p % num_devices:
      raise ConfigError(
          f'P = config.batch_size / config.num_instances = {p} identities per batch must '
          f'be a multiple of the {num_devices} devices, so each device holds whole '
          'identities.')
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
