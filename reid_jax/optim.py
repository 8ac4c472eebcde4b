"""Learning-rate schedules and the optimiser with the baseline's parameter groups.

Schedule. BoT (`solver/lr_scheduler.py`) uses `WarmupMultiStepLR`, an epoch-level
torch scheduler whose factor at `last_epoch` is

  warmup(last_epoch) * gamma ** bisect_right(milestones, last_epoch),
  warmup(t) = warmup_factor * (1 - t / warmup_epochs) + t / warmup_epochs
              ('linear', t < warmup_epochs), warmup_factor ('constant',
              t < warmup_epochs), 1 otherwise.

The constructor already steps once (`last_epoch` -1 -> 0) and the training loop
calls `scheduler.step()` on ignite's EPOCH_STARTED, i.e. *before* each epoch,
so the baseline's (1-based) epoch k trains at `last_epoch = k`. With our 0-based
epochs, epoch e therefore uses `last_epoch = e + 1`: the first epoch already
runs at `warmup(1)`, and the lr drops at 0-based epochs `milestone - 1`.

'cosine' (not in BoT; fast-reid style) keeps the same warmup on `t = e + 1`
while `t < warmup_epochs`, then uses `0.5 * (1 + cos(pi * e / num_epochs))`.

Optimiser. As BoT's `make_optimizer`: every parameter whose name is `bias` gets
`base_lr * bias_lr_factor` and `weight_decay_bias`, all others (`kernel`,
`scale`, ...) `base_lr` and `weight_decay`. Weight decay is torch's L2 term
added to the gradient before the update rule (`torch.optim.Adam` /
`torch.optim.SGD(momentum)` semantics, not AdamW). A top-level `center` entry
of the params (the center-loss centers) is updated, as BoT's
`optimizer_center`, with plain SGD at `loss.center_lr`, without schedule or
decay, on its gradient divided by `loss.center_loss_weight` (the gradient of
the weighted total loss thus becomes that of the unweighted center loss).
"""

import bisect
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from input_pipeline.choices import check_choice
from reid_jax import train_step as step_lib

OPTIMIZERS = ('adam', 'sgd')
SCHEDULES = ('warmup_multistep', 'cosine')
WARMUP_METHODS = ('linear', 'constant')

# Parameter-group labels.
WEIGHT = 'weight'
BIAS = 'bias'
CENTER = 'center'


def validate_schedule_config(schedule_config: ml_collections.ConfigDict) -> None:
  """Checks the schedule config fields used here.

  Args:
    schedule_config: `config.schedule`.

  Raises:
    ValueError: unknown `schedule.name` / `schedule.warmup_method`, or
      milestones not in increasing order (as the baseline).
  """
  check_choice('config.schedule.name', schedule_config.name, SCHEDULES)
  check_choice('config.schedule.warmup_method', schedule_config.warmup_method,
               WARMUP_METHODS)
  milestones = list(schedule_config.milestones)
  if milestones != sorted(milestones):
    raise ValueError('config.schedule.milestones should be a list of increasing '
                     f'integers, got {milestones}.')


def _warmup_factor(schedule_config: ml_collections.ConfigDict,
                   last_epoch: int) -> float:
  """BoT's warmup multiplier at torch's `last_epoch`."""
  if last_epoch < schedule_config.warmup_epochs:
    if schedule_config.warmup_method == 'constant':
      return float(schedule_config.warmup_factor)
    alpha = last_epoch / schedule_config.warmup_epochs
    return float(schedule_config.warmup_factor * (1 - alpha) + alpha)
  return 1.0


def lr_factor_at_epoch(schedule_config: ml_collections.ConfigDict, epoch: int,
                       num_epochs: int) -> float:
  """Multiplier of the base learning rate during a (0-based) epoch.

  Args:
    schedule_config: `config.schedule` (name, milestones, gamma, warmup_factor,
      warmup_epochs, warmup_method).
    epoch: 0-based epoch index; uses the baseline's formula at
      `last_epoch = epoch + 1` (see the module docstring).
    num_epochs: total number of epochs (used by 'cosine').

  Returns:
    The factor as a Python float.

  Raises:
    ValueError: on an invalid schedule config.
  """
  validate_schedule_config(schedule_config)
  last_epoch = epoch + 1
  if schedule_config.name == 'warmup_multistep':
    decay = schedule_config.gamma ** bisect.bisect_right(
        list(schedule_config.milestones), last_epoch)
    return float(_warmup_factor(schedule_config, last_epoch) * decay)
  # 'cosine'.
  if last_epoch < schedule_config.warmup_epochs:
    return _warmup_factor(schedule_config, last_epoch)
  return float(0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs)))


def epoch_lr_factors(config: ml_collections.ConfigDict) -> list[float]:
  """Per-epoch lr factors for epochs 0 .. config.num_epochs - 1.

  Args:
    config: the full config.

  Returns:
    List of `config.num_epochs` floats.
  """
  return [lr_factor_at_epoch(config.schedule, e, config.num_epochs)
          for e in range(config.num_epochs)]


def create_lr_schedule(config: ml_collections.ConfigDict,
                       steps_per_epoch: int,
                       lr_multiplier: float = 1.0) -> optax.Schedule:
  """Step-indexed learning rate, constant within each epoch.

  Args:
    config: the full config (`optim.base_lr`, `schedule`, `num_epochs`).
    steps_per_epoch: optimiser steps per epoch (> 0).
    lr_multiplier: extra factor on the base lr (e.g. `optim.bias_lr_factor`).

  Returns:
    A jittable `step -> lr` function: `base_lr * lr_multiplier *
    factor(step // steps_per_epoch)`; steps past the last epoch keep the last
    epoch's lr.

  Raises:
    ValueError: on a non-positive `steps_per_epoch` / `num_epochs` or an
      invalid schedule config.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}.')
  if config.num_epochs <= 0:
    raise ValueError(f'num_epochs must be positive, got {config.num_epochs}.')
  base = float(config.optim.base_lr) * float(lr_multiplier)
  table = [base * f for f in epoch_lr_factors(config)]
  num_epochs = config.num_epochs

  def schedule(step: jax.Array) -> jax.Array:
    lrs = jnp.asarray(table, jnp.float32)
    epoch = jnp.clip(jnp.asarray(step) // steps_per_epoch, 0, num_epochs - 1)
    return lrs[epoch]

  return schedule


def _path_name(key: Any) -> Any:
  """The name of one pytree path entry (dict key, attribute or index)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def param_group_labels(params: Any) -> Any:
  """Labels each parameter with its optimiser group.

  Args:
    params: parameter pytree (nested dicts as flax's `params` collection),
      optionally with a top-level `center` entry.

  Returns:
    Pytree of the same structure with 'center' for everything under the
    top-level `center` key, 'bias' for leaves named `bias`, 'weight' otherwise.
  """

  def label(path: tuple, _: Any) -> str:
    names = [_path_name(k) for k in path]
    if names and names[0] == CENTER:
      return CENTER
    if names and names[-1] == 'bias':
      return BIAS
    return WEIGHT

  return jax.tree_util.tree_map_with_path(label, params)


def _group_transform(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule,
                     weight_decay: float) -> optax.GradientTransformation:
  """torch Adam / SGD(momentum) with L2 weight decay for one parameter group."""
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(float(weight_decay)))
  if config.optim.name == 'adam':
    parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
  else:  # 'sgd': buf = momentum * buf + g (torch: dampening 0, no nesterov).
    if config.optim.momentum:
      parts.append(optax.trace(decay=float(config.optim.momentum),
                               nesterov=False))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  """The baseline's optimiser (and center-loss optimiser) as one transformation.

  Args:
    config: the full config (`optim`, `schedule`, `num_epochs`, `loss`).
    steps_per_epoch: optimiser steps per epoch, for the epoch-wise schedule.

  Returns:
    An optax transformation over the params pytree; groups as in
    `param_group_labels`. The `center` group, if present, gets
    `c <- c - loss.center_lr * grad / loss.center_loss_weight`.

  Raises:
    ValueError: unknown `optim.name`, `schedule.name` or
      `schedule.warmup_method`, or a `config.loss` that `train_step.LossConfig`
      rejects (e.g. a non-positive `loss.center_loss_weight` with a center loss).
  """
  check_choice('config.optim.name', config.optim.name, OPTIMIZERS)
  validate_schedule_config(config.schedule)
  weight_schedule = create_lr_schedule(config, steps_per_epoch)
  bias_schedule = create_lr_schedule(
      config, steps_per_epoch, lr_multiplier=config.optim.bias_lr_factor)
  weight_decay = float(config.optim.weight_decay)
  weight_decay_bias = float(config.optim.weight_decay_bias)

  # The parsed config.loss: it refuses a center loss without a positive weight.
  loss = step_lib.LossConfig.from_config(config)
  if loss.center_loss_weight > 0:
    center_tx = optax.scale(-float(config.loss.center_lr) / loss.center_loss_weight)
  else:
    center_tx = optax.set_to_zero()

  transforms = {
      WEIGHT: _group_transform(config, weight_schedule, weight_decay),
      BIAS: _group_transform(config, bias_schedule, weight_decay_bias),
      CENTER: center_tx,
  }
  return optax.multi_transform(transforms, param_group_labels)

