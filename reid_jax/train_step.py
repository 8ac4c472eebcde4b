"""Pure training and evaluation steps; collectives run over the axis 'batch'.

Both steps are written for `jax.pmap(step, axis_name='batch', in_axes=(None, 0),
out_axes=(None, 0))` (see `make_parallel_steps`): the state goes in unreplicated and
comes back identical on every device because gradients are averaged and batch norm
statistics are computed over the global batch (cross-device BN).

Images arrive as uint8 at the training size. The train step augments them on the
device (`input_pipeline.device_augment`: flip, pad and crop, normalise, random erasing)
with one PRNG key per image derived from (config.seed, epoch, position of the image in
the epoch's global batch order), so a batch is the same whatever the device or
process count; the eval step only normalises. With a device cache
(`input_pipeline.device_cache`) the batch carries record indices instead of images, and
the step crops each image straight out of the cache (bit for bit the same augmentation).

The loop calls `train_step` through `accumulate_step`, which also sums the step's
metrics into a small on-device accumulator (`init_metrics_acc`), so the host fetches
metrics only at log steps: no host sync per step. A step whose gradients are not
finite is skipped on the device in every precision (params, optimizer state and BN
statistics keep their old values; `state.step` still advances) and the accumulator
records how many were skipped, the current streak of consecutive skipped steps, and
the window's first skipped step with its loss terms.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state

from input_pipeline import device_augment
from input_pipeline import device_cache
from input_pipeline.choices import check_choice
from reid_jax import losses
from reid_jax import precision

AXIS_NAME = 'batch'
CENTER_KEY = 'center'


class TrainState(train_state.TrainState):
  """Params (with the center-loss centers under 'center'), BN statistics and loss scale."""
  batch_stats: Any = None
  dynamic_scale: Optional[dynamic_scale_lib.DynamicScale] = None


def model_params(params: Any) -> Any:
  """The model's own parameters, without the center-loss centers."""
  return {k: v for k, v in params.items() if k != CENTER_KEY}


# config.loss.type: the terms of the total loss, joined by '_' (BoT's MODEL.METRIC_LOSS_TYPE).
LOSS_TYPES = ('softmax', 'triplet', 'softmax_triplet', 'softmax_triplet_center')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """`config.loss` parsed once: which loss terms the step adds, and their settings.

  Frozen, hence hashable and compared by value: `make_parallel_steps` binds it into
  the pmapped step as a static setting, so equal settings give the same compiled step.

  Attributes:
    use_softmax: the (label-smoothed) cross-entropy on the classifier's logits.
    use_triplet: the batch-hard triplet loss on the features.
    use_center: the center loss on the features (centers under params['center']).
    label_smoothing: epsilon of the cross-entropy; 0 disables it.
    triplet_margin: the triplet margin; None: soft margin.
    center_loss_weight: the center loss's weight in the total loss (the center
      optimiser of `optim.create_optimizer` divides its gradient by it too).
  """
  use_softmax: bool
  use_triplet: bool
  use_center: bool
  label_smoothing: float
  triplet_margin: Optional[float]
  center_loss_weight: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'LossConfig':
    """Parses `config.loss` (type, label_smoothing, triplet_margin, center_loss_weight).

    Args:
      config: the run's config.

    Returns:
      The LossConfig.

    Raises:
      ValueError: loss.type is not one of LOSS_TYPES, or a center loss has a
        non-positive center_loss_weight.
    """
    check_choice('config.loss.type', config.loss.type, LOSS_TYPES)
    terms = config.loss.type.split('_')
    center_loss_weight = float(config.loss.center_loss_weight)
    if 'center' in terms and not center_loss_weight > 0:
      raise ValueError(
          f'config.loss.center_loss_weight must be positive with '
          f'config.loss.type={config.loss.type!r}, got {center_loss_weight}.')
    margin = config.loss.triplet_margin
    return cls(use_softmax='softmax' in terms, use_triplet='triplet' in terms,
               use_center='center' in terms,
               label_smoothing=float(config.loss.label_smoothing),
               triplet_margin=None if margin is None else float(margin),
               center_loss_weight=center_loss_weight)


def compute_loss(params: Any, batch_stats: Any, apply_fn: Callable, batch: dict,
                 loss_config: LossConfig, axis_name: Optional[str] = AXIS_NAME):
  """The baseline's total loss on one device's share of the batch.

  Args:
    params: model params, plus the centers under 'center' when center loss is on.
    batch_stats: BN statistics.
    apply_fn: the model's apply.
    batch: {'image': (b, H, W, 3), 'label': (b,)}.
    loss_config: which terms to use.
    axis_name: the device axis over which triplets are mined (features and labels are
      gathered so mining sees the global batch); None on a single device without pmap.

  Returns:
    (loss, (new_batch_stats, metrics)).
  """
  labels = batch['label']
  (logits, feat), new_model_state = apply_fn(
      {'params': model_params(params), 'batch_stats': batch_stats},
      batch['image'], train=True, mutable=['batch_stats'])
  logits = logits.astype(jnp.float32)
  feat = feat.astype(jnp.float32)
  metrics = {}
  loss = jnp.zeros((), jnp.float32)
  if loss_config.use_softmax:
    ce = losses.cross_entropy_label_smooth(logits, labels, loss_config.label_smoothing)
    metrics['ce_loss'] = ce
    loss += ce
  if loss_config.use_triplet:
    if axis_name is None:
      all_feat, all_labels = feat, labels
    else:
      # Each device sees the whole global batch, so hard examples are mined among all
      # identities. The gradient of the gathered copy flows back to every device (the
      # transpose of all_gather sums over devices), which the later pmean undoes.
      all_feat = jax.lax.all_gather(feat, axis_name, tiled=True)
      all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
    tri, dist_ap, dist_an = losses.batch_hard_triplet_loss(
        all_feat, all_labels, loss_config.triplet_margin)
    metrics['triplet_loss'] = tri
    metrics['dist_ap'] = jnp.mean(dist_ap)
    metrics['dist_an'] = jnp.mean(dist_an)
    loss += tri
  if loss_config.use_center:
    cen = losses.center_loss(feat, labels, params[CENTER_KEY])
    metrics['center_loss'] = cen
    loss += loss_config.center_loss_weight * cen
  metrics['loss'] = loss
  metrics['accuracy'] = losses.accuracy(logits, labels)
  return loss, (new_model_state['batch_stats'], metrics)


def train_step(state: TrainState, batch: dict, image_cache: Optional[jax.Array] = None,
               *, loss_config: LossConfig,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               augment_config: Optional[device_augment.AugmentConfig] = None,
               seed: int = 0, image_dtype: Any = jnp.float32,
               axis_name: Optional[str] = AXIS_NAME) -> tuple[TrainState, dict]:
  """One optimisation step on one device's share of the global batch.

  Args:
    state: the train state (identical on every device).
    batch: this device's slice: {'image': uint8 (b, H, W, 3), 'label': (b,),
      'epoch': int32 (b,), 'position': int32 (b,)} when `augment_config` is given
      (with `image_cache`: 'index' int32 (b,) instead of 'image');
      otherwise {'image': (b, H, W, 3) model input, 'label': (b,)}.
    image_cache: the device cache (`device_cache.fill_device_cache`: uint8 (N, H +
      2p, W + 2p, 3)) the images are read from by batch['index'], or None.
    loss_config: the loss terms.
    learning_rate_fn: step -> base lr, only for logging.
    augment_config: the training augmentation, done here on the device; None: the
      images are used as given.
    seed: config.seed, the root of every image's augmentation key.
    image_dtype: dtype of the augmented images (the compute dtype).
    axis_name: the pmap axis, or None when called without pmap on one device.

  Returns:
    (new_state, metrics). A step whose gradients (or loss) are not finite, in any
    precision, leaves params, BN statistics and optimizer state unchanged (with a
    float16 loss scale it also lowers the scale); metrics['skipped'] is 1.0 then.
  """
  if image_cache is not None and augment_config is None:
    raise ValueError('train_step: an image_cache needs augment_config.')
  if augment_config is not None:
    keys = device_augment.image_keys(seed, batch['epoch'], batch['position'])
    if image_cache is None:
      if 'image' not in batch:
        raise ValueError(f"train_step: the batch has no 'image' (it has {sorted(batch)}); "
                         "a device-cache batch ('index') needs the cache as image_cache.")
      images = device_augment.augment(batch['image'], keys, augment_config, image_dtype)
    else:
      images = device_cache.augment_cached(image_cache, batch['index'], keys,
                                           augment_config, image_dtype)
    batch = dict(batch, image=images)
  loss_fn = functools.partial(compute_loss, batch_stats=state.batch_stats,
                              apply_fn=state.apply_fn, batch=batch,
                              loss_config=loss_config, axis_name=axis_name)
  dynamic_scale = state.dynamic_scale
  if dynamic_scale is not None:
    grad_fn = dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name=axis_name)
    dynamic_scale, is_finite, (_, (batch_stats, metrics)), grads = grad_fn(state.params)
  else:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (batch_stats, metrics)), grads = grad_fn(state.params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    is_finite = None
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  if is_finite is None:
    # After the pmean every device sees the same gradients, so all agree.
    is_finite = precision.all_finite(grads) & jnp.isfinite(metrics['loss'])
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats,
                                    dynamic_scale=dynamic_scale)
  keep_old = functools.partial(jnp.where, is_finite)
  new_state = new_state.replace(
      params=jax.tree.map(keep_old, new_state.params, state.params),
      opt_state=jax.tree.map(keep_old, new_state.opt_state, state.opt_state),
      batch_stats=jax.tree.map(keep_old, new_state.batch_stats, state.batch_stats))
  metrics['skipped'] = 1.0 - is_finite.astype(jnp.float32)
  if dynamic_scale is not None:
    metrics['loss_scale'] = dynamic_scale.scale
  metrics['learning_rate'] = learning_rate_fn(state.step)
  return new_state, metrics


# Metrics that describe the state rather than the step: the window keeps the last value.
_LAST_VALUE_METRICS = ('loss_scale', 'learning_rate')


def init_metrics_acc(metric_shapes: dict) -> dict:
  """A zero accumulator for the metrics `train_step` returns.

  Args:
    metric_shapes: train_step's metrics (arrays or jax.ShapeDtypeStruct, e.g. from
      `jax.eval_shape`); only the names are used.

  Returns:
    {'sums': name -> float32 0 (sums over the finite steps of the window),
     'finite_steps', 'skipped_steps' (in the window), 'consecutive_skipped' (the
     current streak of skipped steps, kept across windows), 'first_skipped_step'
     (-1: none; the step number, counted from 1, of the window's first skipped step)
     and 'first_skipped_metrics' (that step's metrics), 'last' (last values of
     learning_rate / loss_scale)}.
  """
  names = sorted(k for k in metric_shapes if k != 'skipped')
  # numpy leaves, each its own buffer once on the devices (a donated argument must
  # not hold the same buffer twice).
  zeros = lambda keys: {k: np.zeros((), np.float32) for k in keys}  # pylint: disable=unnecessary-lambda-assignment
  return {
      'sums': zeros(k for k in names if k not in _LAST_VALUE_METRICS),
      'last': zeros(k for k in names if k in _LAST_VALUE_METRICS),
      'finite_steps': np.zeros((), np.int32),
      'skipped_steps': np.zeros((), np.int32),
      'consecutive_skipped': np.zeros((), np.int32),
      'first_skipped_step': np.full((), -1, np.int32),
      'first_skipped_metrics': zeros(names),
  }


def accumulate_metrics(acc: dict, metrics: dict, step: jax.Array) -> dict:
  """Adds one step's metrics to the accumulator (pure; runs on the device).

  Args:
    acc: from `init_metrics_acc` or a previous call.
    metrics: `train_step`'s metrics (already averaged over devices).
    step: the state's step before the update (0-based); the step number reported
      is step + 1.

  Returns:
    The updated accumulator. A skipped step adds nothing to the sums (a NaN would
    poison the window), counts in 'skipped_steps' and, when it is the window's
    first, is recorded with its metrics in 'first_skipped_*'.
  """
  skipped = metrics['skipped'] > 0
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items() if k != 'skipped'}
  sums = {k: acc['sums'][k] + jnp.where(skipped, 0.0, metrics[k]) for k in acc['sums']}
  first = skipped & (acc['first_skipped_step'] < 0)
  return {
      'sums': sums,
      'last': {k: metrics[k] for k in acc['last']},
      'finite_steps': acc['finite_steps'] + (~skipped).astype(jnp.int32),
      'skipped_steps': acc['skipped_steps'] + skipped.astype(jnp.int32),
      'consecutive_skipped': jnp.where(skipped, acc['consecutive_skipped'] + 1, 0),
      'first_skipped_step': jnp.where(first, jnp.asarray(step, jnp.int32) + 1,
                                      acc['first_skipped_step']),
      'first_skipped_metrics': {
          k: jnp.where(first, metrics[k], acc['first_skipped_metrics'][k])
          for k in acc['first_skipped_metrics']},
  }


def reset_window(acc: dict) -> dict:
  """The accumulator for a new logging window: all zeroed but the streak and last values.

  Args:
    acc: the accumulator fetched to the host.

  Returns:
    A new host (numpy) accumulator, each leaf its own array.
  """
  zero = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), acc)
  zero['first_skipped_step'] = np.full((), -1, np.int32)
  keep = ('consecutive_skipped', 'last')
  return dict(zero, **{k: jax.tree.map(np.array, acc[k]) for k in keep})


def accumulate_step(state: TrainState, acc: dict, batch: dict,
                    image_cache: Optional[jax.Array] = None, **kwargs: Any
                    ) -> tuple[TrainState, dict]:
  """`train_step`, then its metrics added to `acc`; what the training loop pmaps.

  Args:
    state: the train state.
    acc: the metrics accumulator (identical on every device).
    batch: this device's slice (see `train_step`).
    image_cache: the device cache, or None (see `train_step`).
    **kwargs: train_step's keyword arguments.

  Returns:
    (new_state, new_acc).
  """
  new_state, metrics = train_step(state, batch, image_cache, **kwargs)
  return new_state, accumulate_metrics(acc, metrics, state.step)


def eval_step(state: TrainState, batch: dict, *, flip: bool = False,
              augment_config: Optional[device_augment.AugmentConfig] = None,
              image_dtype: Any = jnp.float32) -> jax.Array:
  """Test features of one device's share of an evaluation batch.

  Args:
    state: the train state.
    batch: {'image': (b, H, W, 3), ...}: uint8, normalised here with the mean and std
      of `augment_config`; without `augment_config`, the model input as given.
    flip: average the features of each image and its horizontal mirror (flip test).
    augment_config: gives pixel_mean and pixel_std.
    image_dtype: dtype of the normalised images.

  Returns:
    float32 features (b, D), chosen by the model's `neck_feat`.
  """
  images = batch['image']
  if augment_config is not None:
    images = device_augment.normalize(images, augment_config.pixel_mean,
                                      augment_config.pixel_std, image_dtype)
  variables = {'params': model_params(state.params), 'batch_stats': state.batch_stats}
  feats = state.apply_fn(variables, images, train=False).astype(jnp.float32)
  if flip:
    mirrored = state.apply_fn(variables, images[:, :, ::-1, :], train=False)
    feats = 0.5 * (feats + mirrored.astype(jnp.float32))
  return feats


def make_parallel_steps(loss_config: LossConfig, learning_rate_fn: Callable,
                        flip_test: bool = False,
                        augment_config: Optional[device_augment.AugmentConfig] = None,
                        seed: int = 0, image_dtype: Any = jnp.float32
                        ) -> tuple[Callable, Callable]:
  """pmapped train (with metric accumulation) and eval steps over all local devices.

  Args:
    loss_config: the loss terms.
    learning_rate_fn: step -> lr, for logging.
    flip_test: whether evaluation averages with the mirrored image.
    augment_config: device augmentation and normalisation; None: batches carry the
      model input.
    seed: config.seed (augmentation keys).
    image_dtype: the compute dtype images are converted to.

  Returns:
    (p_train_step(state, acc, batch, image_cache=None) -> (state, acc), with state
     and acc donated (image_cache: the device cache, replicated, or None);
     p_eval_step(state, batch) -> features (devices, b, D)).
  """
  pmapped = jax.pmap(
      functools.partial(accumulate_step, loss_config=loss_config,
                        learning_rate_fn=learning_rate_fn, augment_config=augment_config,
                        seed=seed, image_dtype=image_dtype),
      axis_name=AXIS_NAME, in_axes=(None, None, 0, None), out_axes=(None, None),
      donate_argnums=(0, 1))

  def p_train(state: TrainState, acc: dict, batch: dict,
              image_cache: Optional[jax.Array] = None) -> tuple[TrainState, dict]:
    """The pmapped `accumulate_step`; image_cache defaults to None (no device cache)."""
    return pmapped(state, acc, batch, image_cache)

  p_eval = jax.pmap(functools.partial(eval_step, flip=flip_test,
                                      augment_config=augment_config,
                                      image_dtype=image_dtype),
                    axis_name=AXIS_NAME, in_axes=(None, 0), out_axes=0)
  return p_train, p_eval


def replicated_sharding() -> jax.sharding.NamedSharding:
  """The sharding the pmapped train step gives the state it returns.

  The state replicated over the local devices on a mesh with axis 'batch'. A state
  from `create_train_state` or a checkpoint restore lives on one device instead, and
  the step is compiled once more on its second call unless the state is first put
  there: `jax.device_put(state, replicated_sharding())`.

  Returns:
    NamedSharding(Mesh(local devices, ('batch',)), PartitionSpec()).
  """
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (AXIS_NAME,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def on_devices(tree: Any) -> Any:
  """Replicates `tree` over the local devices as the pmapped steps return their state.

  Also with several processes: there, donating a state that is not yet laid out so
  fails ("Array has been deleted", jax 0.10).
  """
  return jax.device_put(tree, replicated_sharding())


def create_train_state(rng: jax.Array, model: flax.linen.Module,
                       tx: optax.GradientTransformation, image_size: tuple[int, int],
                       num_classes: int,
                       use_center: bool = False,
                       dynamic_scale: Optional[dynamic_scale_lib.DynamicScale] = None
                       ) -> TrainState:
  """Initialises the model (and the centers) and the optimizer.

  Args:
    rng: PRNG key.
    model: a `models.ReIDModel`; its apply becomes the state's apply_fn, so build it
      with bn_axis_name='batch' for pmap (init runs in eval mode, without collectives).
    tx: the optimizer (from `optim.create_optimizer`).
    image_size: (H, W).
    num_classes: training identities.
    use_center: add center-loss centers to the params.
    dynamic_scale: a loss scale for float16, else None.

  Returns:
    A TrainState at step 0.
  """

  def init(rng: jax.Array) -> tuple[dict, Any, Any]:
    model_rng, center_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *image_size, 3), jnp.float32)
    variables = model.init(model_rng, dummy, train=False)
    params = dict(variables['params'])
    if use_center:
      params[CENTER_KEY] = losses.init_centers(center_rng, num_classes, model.feature_dim)
    return params, variables['batch_stats'], tx.init(params)

  # One compiled program for the model, the centers and the optimizer state (what
  # TrainState.create does, whose eager tx.init compiles one small program per leaf).
  params, batch_stats, opt_state = jax.jit(init)(rng)
  return TrainState(step=0, apply_fn=model.apply, params=params, tx=tx,
                    opt_state=opt_state, batch_stats=batch_stats,
                    dynamic_scale=dynamic_scale)
