"""Schedules and optimiser groups against torch's optimisers and a torch scheduler."""

import bisect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
torch = pytest.importorskip('torch')

from reid_jax import optim


class _WarmupMultiStepLR(torch.optim.lr_scheduler._LRScheduler):
  """BoT solver/lr_scheduler.py, transcribed."""

  def __init__(self, optimizer, milestones, gamma=0.1, warmup_factor=1.0 / 3,
               warmup_iters=500, warmup_method='linear', last_epoch=-1):
    self.milestones = milestones
    self.gamma = gamma
    self.warmup_factor = warmup_factor
    self.warmup_iters = warmup_iters
    self.warmup_method = warmup_method
    super().__init__(optimizer, last_epoch)

  def get_lr(self):
    warmup_factor = 1
    if self.last_epoch < self.warmup_iters:
      if self.warmup_method == 'constant':
        warmup_factor = self.warmup_factor
      elif self.warmup_method == 'linear':
        alpha = self.last_epoch / self.warmup_iters
        warmup_factor = self.warmup_factor * (1 - alpha) + alpha
    return [base_lr * warmup_factor
            * self.gamma ** bisect.bisect_right(self.milestones, self.last_epoch)
            for base_lr in self.base_lrs]


def _market_config():
  return default.get_config()


def _partial_ilids_config():
  from configs import market_to_partial_ilids  # pylint: disable=g-import-not-at-top
  return market_to_partial_ilids.get_config()


def _variant_config():
  """A different recipe exercising the other branches (constant warmup, gamma)."""
  config = default.get_config()
  config.optim.base_lr = 1e-3
  config.schedule.milestones = (30, 55)
  config.schedule.gamma = 0.5
  config.schedule.warmup_factor = 0.1
  config.schedule.warmup_epochs = 5
  config.schedule.warmup_method = 'constant'
  return config


def _torch_epoch_lrs(config, base_lrs=None):
  """The lr the baseline trains each epoch with (ignite: step at EPOCH_STARTED)."""
  base_lrs = base_lrs or [config.optim.base_lr]
  params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
  opt = torch.optim.Adam([{'params': [p], 'lr': lr}
                          for p, lr in zip(params, base_lrs)])
  sched = _WarmupMultiStepLR(
      opt, list(config.schedule.milestones), config.schedule.gamma,
      config.schedule.warmup_factor, config.schedule.warmup_epochs,
      config.schedule.warmup_method)
  lrs = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for _ in range(config.num_epochs):
      sched.step()  # EPOCH_STARTED
      lrs.append([g['lr'] for g in opt.param_groups])
      opt.step()  # an iteration (no grads: nothing moves)
  return np.array(lrs)


@pytest.mark.parametrize('make_config', [_market_config, _partial_ilids_config, _variant_config])
def test_epoch_lr_matches_torch_scheduler(make_config):
  config = make_config()
  ref = _torch_epoch_lrs(config)[:, 0]
  got = np.array([config.optim.base_lr
                  * optim.lr_factor_at_epoch(config.schedule, e, config.num_epochs)
                  for e in range(config.num_epochs)])
  np.testing.assert_allclose(got, ref, rtol=1e-12)
  # create_lr_schedule at the first and last step of every epoch.
  spe = 7
  schedule = jax.jit(optim.create_lr_schedule(config, spe))
  steps = np.stack([np.arange(config.num_epochs) * spe,
                    np.arange(config.num_epochs) * spe + spe - 1], 1)
  lrs = np.asarray(jax.vmap(jax.vmap(schedule))(jnp.asarray(steps)))
  np.testing.assert_allclose(lrs, np.stack([ref, ref], 1), rtol=1e-6)
  # Past the end: the last epoch's lr.
  np.testing.assert_allclose(schedule(config.num_epochs * spe + 100), ref[-1],
                             rtol=1e-6)


def test_market_lr_landmarks():
  config = _market_config()
  f = [optim.lr_factor_at_epoch(config.schedule, e, 120) for e in range(120)]
  assert f[0] == pytest.approx(0.01 * 0.9 + 0.1)  # last_epoch 1
  assert f[8] == pytest.approx(0.01 * 0.1 + 0.9)  # last_epoch 9
  assert f[9] == f[38] == 1.0  # last_epoch 10 .. 39
  assert f[39] == f[68] == pytest.approx(0.1)  # drops at 1-based epoch 40
  assert f[69] == f[119] == pytest.approx(0.01)


def test_cosine_schedule():
  config = _market_config()
  config.schedule.name = 'cosine'
  n = config.num_epochs
  for e in range(n):
    f = optim.lr_factor_at_epoch(config.schedule, e, n)
    if e + 1 < 10:
      assert f == pytest.approx(0.01 + 0.99 * (e + 1) / 10)
    else:
      assert f == pytest.approx(0.5 * (1 + np.cos(np.pi * e / n)))
  assert 0 < optim.lr_factor_at_epoch(config.schedule, n - 1, n) < 1e-3


@pytest.mark.parametrize('field,value', [
    ('optim.name', 'rmsprop'), ('schedule.name', 'step'),
    ('schedule.warmup_method', 'exp')])
def test_invalid_config_raises(field, value):
  config = _market_config()
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    optim.create_optimizer(config, 10)


def _params(rng):
  return {
      'conv': {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
               'bias': rng.normal(size=(4,)).astype(np.float32)},
      'bn': {'scale': rng.normal(size=(4,)).astype(np.float32),
             'bias': rng.normal(size=(4,)).astype(np.float32)},
      'center': rng.normal(size=(5, 4)).astype(np.float32),
  }


def _run_torch(tp, opt, sched, grads_seq, spe, num_epochs, opt_center=None,
               center_weight=1.0):
  """BoT's loop over torch params `tp`: the scheduler steps before each epoch, then
  `spe` steps of `opt` (and of `opt_center` on the center gradient / center_weight,
  as BoT's do_train with center loss)."""
  step = 0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for _ in range(num_epochs):
      sched.step()
      for _ in range(spe):
        g = grads_seq[step]
        for mod in ('conv', 'bn'):
          for key, value in tp[mod].items():
            value.grad = torch.tensor(g[mod][key])
        if opt_center is not None:
          tp['center'].grad = torch.tensor(g['center'])
        opt.step()
        if opt_center is not None:
          tp['center'].grad.data *= 1.0 / center_weight
          opt_center.step()
        step += 1


def _run_optax(config, spe, params, grads_seq):
  """The params after `optim.create_optimizer(config, spe)` applied `grads_seq`."""
  tx = optim.create_optimizer(config, spe)
  jp = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(jp)

  @jax.jit
  def update(p, s, g):
    u, s = tx.update(g, s, p)
    return jax.tree_util.tree_map(lambda a, b: a + b, p, u), s

  for g in grads_seq:
    jp, state = update(jp, state, g)
  return jp


def test_param_group_labels():
  labels = optim.param_group_labels(_params(np.random.default_rng(0)))
  assert labels == {'conv': {'kernel': 'weight', 'bias': 'bias'},
                    'bn': {'scale': 'weight', 'bias': 'bias'},
                    'center': 'center'}


@pytest.mark.parametrize('name', ['adam', 'sgd'])
def test_optimizer_matches_torch(name):
  config = _market_config()
  config.optim.name = name
  config.optim.base_lr = 0.01
  config.optim.bias_lr_factor = 2.0
  config.optim.weight_decay = 0.05
  config.optim.weight_decay_bias = 0.2
  config.optim.momentum = 0.9
  config.schedule.warmup_epochs = 2
  config.schedule.milestones = (3,)
  config.loss.type = 'softmax_triplet_center'
  config.loss.center_lr = 0.5
  config.loss.center_loss_weight = 0.25
  spe, num_epochs = 2, 4
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads_seq = [jax.tree_util.tree_map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), params)
               for _ in range(spe * num_epochs)]

  # Torch: BoT make_optimizer_with_center + WarmupMultiStepLR, as its loop.
  tp = jax.tree_util.tree_map(
      lambda p: torch.nn.Parameter(torch.tensor(p)), params)
  groups = []
  for mod in ('conv', 'bn'):
    for key, value in tp[mod].items():
      if 'bias' in key:
        groups.append({'params': [value], 'lr': 0.01 * 2.0,
                       'weight_decay': 0.2})
      else:
        groups.append({'params': [value], 'lr': 0.01, 'weight_decay': 0.05})
  if name == 'adam':
    opt = torch.optim.Adam(groups)
  else:
    opt = torch.optim.SGD(groups, momentum=0.9)
  opt_center = torch.optim.SGD([tp['center']], lr=0.5)
  sched = _WarmupMultiStepLR(opt, [3], 0.1, 0.01, 2, 'linear')
  _run_torch(tp, opt, sched, grads_seq, spe, num_epochs, opt_center, center_weight=0.25)

  jp = _run_optax(config, spe, params, grads_seq)
  expected = jax.tree_util.tree_map(lambda t: t.detach().numpy(), tp)
  for path, got in jax.tree_util.tree_leaves_with_path(jp):
    want = expected
    for k in path:
      want = want[k.key]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                               err_msg=str(path))


def test_center_update_is_plain_sgd_on_unweighted_grad():
  config = _market_config()
  config.loss.type = 'softmax_triplet_center'
  config.loss.center_lr = 0.5
  config.loss.center_loss_weight = 5e-4
  params = {'w': {'kernel': jnp.ones((2, 2))},
            'center': jnp.arange(6, dtype=jnp.float32).reshape(3, 2)}
  grads = {'w': {'kernel': jnp.ones((2, 2))},
           'center': jnp.full((3, 2), 2e-4, jnp.float32)}
  tx = optim.create_optimizer(config, 3)
  state = tx.init(params)
  for _ in range(4):  # no schedule, no momentum: the same update each step
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates['center'], -0.5 * 2e-4 / 5e-4 * np.ones(
        (3, 2)), rtol=1e-6)


def test_reference_gpus_scale_weights_lr_but_not_biases_as_the_variant():
  """The variant's make_optimizer on 2 GPUs: weights BASE_LR * 2, biases BASE_LR * factor."""
  from configs import syncbn_market  # pylint: disable=g-import-not-at-top
  from reid_jax import config_lib  # pylint: disable=g-import-not-at-top
  num_gpus, spe, num_epochs = 2, 2, 3
  config = syncbn_market.get_config()
  config.num_reference_gpus = num_gpus
  config_lib.resolve_reference_gpus(config)
  rng = np.random.default_rng(4)
  params = _params(rng)
  del params['center']  # the variant has no center loss
  grads_seq = [jax.tree_util.tree_map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), params)
               for _ in range(spe * num_epochs)]

  # Torch: the variant's optim.py (make_optimizer with num_gpus) and WarmupMultiStepLR,
  # stepped once at construction and once per epoch as its trainer does.
  base_lr, bias_lr_factor, weight_decay, weight_decay_bias = 1e-4, 1, 5e-4, 5e-4
  tp = jax.tree_util.tree_map(lambda p: torch.nn.Parameter(torch.tensor(p)), params)
  groups = []
  for mod in ('conv', 'bn'):
    for key, value in tp[mod].items():
      lr = base_lr * num_gpus  # linear scaling rule
      wd = weight_decay
      if 'bias' in key:
        lr = base_lr * bias_lr_factor
        wd = weight_decay_bias
      groups.append({'params': [value], 'lr': lr, 'weight_decay': wd})
  opt = torch.optim.Adam(groups)
  sched = _WarmupMultiStepLR(opt, list(range(30, 256, 15)), 0.6, 0.01, 10, 'linear')
  _run_torch(tp, opt, sched, grads_seq, spe, num_epochs)
  lrs = sorted({g['lr'] for g in opt.param_groups})
  assert len(lrs) == 2 and lrs[1] == pytest.approx(2 * lrs[0])  # weights, biases

  jp = _run_optax(config, spe, params, grads_seq)
  lr_fn = optim.create_lr_schedule(config, spe)
  factor = optim.lr_factor_at_epoch(config.schedule, num_epochs - 1, config.num_epochs)
  np.testing.assert_allclose(lr_fn(spe * num_epochs - 1), 2e-4 * factor, rtol=1e-6)
  for path, got in jax.tree_util.tree_leaves_with_path(jp):
    want = tp[path[0].key][path[1].key].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=str(path))
  # The two groups really moved by different amounts (else the test could not fail).
  moved = {k: np.abs(np.asarray(jp['conv'][k]) - params['conv'][k]).mean()
           for k in ('kernel', 'bias')}
  assert moved['kernel'] > 1.5 * moved['bias']
