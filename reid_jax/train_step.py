"""Pure training and evaluation steps; collectives run over the axis 'batch'.

Both steps are written for `jax.pmap(step, axis_name='batch', in_axes=(None, 0),
out_axes=(None, 0))` (see `make_parallel_steps`): the state goes in unreplicated and
comes back identical on every device because gradients are averaged and batch norm
statistics are computed over the global batch (cross-device BN).
"""

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

from reid_jax import losses

AXIS_NAME = 'batch'
CENTER_KEY = 'center'


class TrainState(train_state.TrainState):
  """Params (with the center-loss centers under 'center'), BN statistics and loss scale."""
  batch_stats: Any = None
  dynamic_scale: Optional[dynamic_scale_lib.DynamicScale] = None


def model_params(params: Any) -> Any:
  """The model's own parameters, without the center-loss centers."""
  return {k: v for k, v in params.items() if k != CENTER_KEY}


@flax.struct.dataclass
class LossConfig:
  """The loss terms and their settings, static under jit."""
  use_softmax: bool = flax.struct.field(pytree_node=False, default=True)
  use_triplet: bool = flax.struct.field(pytree_node=False, default=True)
  use_center: bool = flax.struct.field(pytree_node=False, default=False)
  label_smoothing: float = flax.struct.field(pytree_node=False, default=0.1)
  triplet_margin: Optional[float] = flax.struct.field(pytree_node=False, default=0.3)
  center_loss_weight: float = flax.struct.field(pytree_node=False, default=5e-4)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'LossConfig':
    kind = config.loss.type
    return cls(
        use_softmax='softmax' in kind,
        use_triplet='triplet' in kind,
        use_center='center' in kind,
        label_smoothing=float(config.loss.label_smoothing),
        triplet_margin=(None if config.loss.triplet_margin is None
                        else float(config.loss.triplet_margin)),
        center_loss_weight=float(config.loss.center_loss_weight))


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


def train_step(state: TrainState, batch: dict, *, loss_config: LossConfig,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               axis_name: Optional[str] = AXIS_NAME) -> tuple[TrainState, dict]:
  """One optimisation step on one device's share of the global batch.

  Args:
    state: the train state (identical on every device).
    batch: {'image': (b, H, W, 3), 'label': (b,)}, this device's slice.
    loss_config: the loss terms.
    learning_rate_fn: step -> base lr, only for logging.
    axis_name: the pmap axis, or None when called without pmap on one device.

  Returns:
    (new_state, metrics). With a float16 loss scale, a step whose gradients are not
    finite leaves params, BN statistics and optimizer state unchanged and lowers the
    scale; metrics['grads_finite'] tells.
  """
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
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats,
                                    dynamic_scale=dynamic_scale)
  if is_finite is not None:
    keep_old = functools.partial(jnp.where, is_finite)
    new_state = new_state.replace(
        params=jax.tree.map(keep_old, new_state.params, state.params),
        opt_state=jax.tree.map(keep_old, new_state.opt_state, state.opt_state),
        batch_stats=jax.tree.map(keep_old, new_state.batch_stats, state.batch_stats))
    metrics['grads_finite'] = is_finite.astype(jnp.float32)
    metrics['loss_scale'] = dynamic_scale.scale
  metrics['learning_rate'] = learning_rate_fn(state.step)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, flip: bool = False) -> jax.Array:
  """Test features of one device's share of an evaluation batch.

  Args:
    state: the train state.
    batch: {'image': (b, H, W, 3), ...}.
    flip: average the features of each image and its horizontal mirror (flip test).

  Returns:
    float32 features (b, D), chosen by the model's `neck_feat`.
  """
  variables = {'params': model_params(state.params), 'batch_stats': state.batch_stats}
  feats = state.apply_fn(variables, batch['image'], train=False).astype(jnp.float32)
  if flip:
    mirrored = state.apply_fn(variables, batch['image'][:, :, ::-1, :], train=False)
    feats = 0.5 * (feats + mirrored.astype(jnp.float32))
  return feats


def make_parallel_steps(loss_config: LossConfig, learning_rate_fn: Callable,
                        flip_test: bool = False) -> tuple[Callable, Callable]:
  """pmapped train and eval steps over all local devices.

  Args:
    loss_config: the loss terms.
    learning_rate_fn: step -> lr, for logging.
    flip_test: whether evaluation averages with the mirrored image.

  Returns:
    (p_train_step(state, batch) -> (state, metrics per device),
     p_eval_step(state, batch) -> features (devices, b, D)).
  """
  p_train = jax.pmap(
      functools.partial(train_step, loss_config=loss_config,
                        learning_rate_fn=learning_rate_fn),
      axis_name=AXIS_NAME, in_axes=(None, 0), out_axes=(None, 0))
  p_eval = jax.pmap(functools.partial(eval_step, flip=flip_test),
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
  model_rng, center_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(model_rng, dummy)
  params = dict(variables['params'])
  if use_center:
    params[CENTER_KEY] = losses.init_centers(center_rng, num_classes, model.feature_dim)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=variables['batch_stats'],
                           dynamic_scale=dynamic_scale)
