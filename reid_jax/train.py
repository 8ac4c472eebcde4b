"""The training loop: data, state, pmapped steps, logging, checkpoints, evaluation.

The loop never waits for the device between log steps: batches are prefetched to
the devices by a background thread from one input stream for the whole run (epoch
boundaries cost nothing; a resumed run starts the stream at its first unseen batch; with
the device cache every training image is decoded once, before the first step, and the
stream carries only indices),
the state and the metrics accumulator are donated to the step, and metrics are summed
on the device and fetched only at log steps and epoch ends. Non-finite steps are
skipped on the device; the host stops the run at the next fetch (see `_check_skipped`).
"""

import dataclasses
import functools
import logging
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from input_pipeline import data_source
from input_pipeline import device_augment
from input_pipeline import device_cache
from input_pipeline import image_check
from input_pipeline import pipeline
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import config_lib
from reid_jax import convert
from reid_jax import evaluation
from reid_jax import models
from reid_jax import multihost
from reid_jax import optim
from reid_jax import precision
from reid_jax import preemption
from reid_jax import train_step as step_lib
from reid_jax import workdir as workdir_lib


class NonFiniteLossError(FloatingPointError):
  """Training produced non-finite gradients; the last good state was checkpointed."""


@dataclasses.dataclass
class Experiment:
  """What `train_and_evaluate` and `eval_only.evaluate_checkpoint` build from a config."""
  train_source: data_source.DataSource
  # The test sets of config.test_datasets, in order (the first one's mAP is the run's).
  test_sources: tuple[data_source.DataSource, ...]
  state: step_lib.TrainState
  p_train_step: Any
  p_eval_step: Any
  dtype: Any
  steps_per_epoch: int
  learning_rate_fn: Any
  # The keyword arguments `p_train_step` binds to `train_step.train_step`.
  train_step_kwargs: dict


def build_experiment(config: ml_collections.ConfigDict,
                     load_pretrained: bool = True) -> Experiment:
  """Validates the config and builds datasets, model, state and the pmapped steps.

  Args:
    config: the run's config. With `num_reference_gpus` > 0 it is first resolved in
      place into global values (`config_lib.resolve_reference_gpus`), which the
      caller then reads too (batch sizes, lr, config.json).
    load_pretrained: load `config.model.pretrained` (if set) into the state, as
      `config.model.pretrain_choice` says; False leaves it to the caller.

  Returns:
    An `Experiment` with a freshly initialised state (not restored).
  """
  num_devices = jax.device_count()
  config_lib.resolve_reference_gpus(config)  # before anything reads the config
  config_lib.validate(config, num_devices)
  dtype, why = precision.choose_compute_dtype(config)
  logging.info('Compute dtype %s: %s.', np.dtype(dtype).name, why)
  train_source, test_sources = data_source.load_train_test(config)
  train_set = train_source.dataset
  num_classes = train_set.num_train_pids
  steps_per_epoch = pipeline.steps_per_epoch(train_set.train, config, num_devices)
  model = models.create_model(config.model, num_classes, dtype=dtype,
                              bn_axis_name=step_lib.AXIS_NAME)
  # Dense evaluations (re-ranking, CUHK03 protocol) too big for config.test.max_dense_gb
  # are refused now, not after training.
  evaluation.check_test_sets(test_sources, config, model.feature_dim)
  parts = build_train_parts(config, model, num_classes, steps_per_epoch, dtype)
  state = parts.state
  if config.model.pretrained and load_pretrained:
    state = convert.load_pretrained_into_state(config.model.pretrained,
                                               config.model.pretrain_choice, state)
  logging.info('Training %s on %s: %d identities, %d images, %d steps per epoch, '
               '%d devices.', config.model.name, train_set.name, num_classes,
               len(train_set.train), steps_per_epoch, num_devices)
  return Experiment(train_source, tuple(test_sources), state, parts.p_train_step,
                    parts.p_eval_step, dtype, steps_per_epoch, parts.learning_rate_fn,
                    parts.train_step_kwargs)


class TrainParts(NamedTuple):
  """What `build_train_parts` builds: the fresh state and the pmapped steps."""
  state: step_lib.TrainState
  learning_rate_fn: Any
  # The keyword arguments `p_train_step` binds to `train_step.train_step`.
  train_step_kwargs: dict
  p_train_step: Any
  p_eval_step: Any


def build_train_parts(config: ml_collections.ConfigDict, model: Any, num_classes: int,
                      steps_per_epoch: int, dtype: Any) -> TrainParts:
  """The fresh train state, lr schedule and pmapped steps of `model` (reads no data).

  Args:
    config: the run's (validated) config.
    model: from `models.create_model(config.model, num_classes, dtype, ...)`.
    num_classes: training identities.
    steps_per_epoch: steps in one epoch (the schedule's unit).
    dtype: the compute dtype (`precision.choose_compute_dtype`).

  Returns:
    A `TrainParts`; the state is not loaded from a pretrained file.
  """
  loss_config = step_lib.LossConfig.from_config(config)
  tx = optim.create_optimizer(config, steps_per_epoch)
  learning_rate_fn = optim.create_lr_schedule(config, steps_per_epoch)
  state = step_lib.create_train_state(
      jax.random.key(config.seed), model, tx, tuple(config.input.image_size), num_classes,
      use_center=loss_config.use_center,
      dynamic_scale=precision.create_dynamic_scale(
          dtype, minimum_scale=config.min_loss_scale))
  train_step_kwargs = dict(
      loss_config=loss_config,
      learning_rate_fn=learning_rate_fn,
      augment_config=device_augment.AugmentConfig.from_config(config.input),
      seed=config.seed, image_dtype=dtype)
  p_train_step, p_eval_step = step_lib.make_parallel_steps(
      flip_test=config.test.flip, **train_step_kwargs)
  return TrainParts(state, learning_rate_fn, train_step_kwargs, p_train_step, p_eval_step)


def initial_metrics_acc(train_step_kwargs: dict, state: step_lib.TrainState,
                        config: ml_collections.ConfigDict) -> dict:
  """A zero metrics accumulator shaped by what the train step (bound to
  `train_step_kwargs`, as `p_train_step` is) returns."""
  height, width = config.input.image_size
  per_device = config.batch_size // jax.device_count()
  batch = {'image': jax.ShapeDtypeStruct((1, per_device, height, width, 3), np.uint8),
           **{k: jax.ShapeDtypeStruct((1, per_device), np.int32)
              for k in ('label', 'epoch', 'position')}}
  step = functools.partial(step_lib.train_step, **train_step_kwargs)
  # vmap over one "device" binds the axis name of the collectives, as pmap does.
  _, metric_shapes = jax.eval_shape(
      jax.vmap(step, in_axes=(None, 0), axis_name=step_lib.AXIS_NAME), state, batch)
  return step_lib.init_metrics_acc(metric_shapes)


def _window_scalars(acc: dict) -> dict[str, float]:
  """Means over the window's finite steps, last values, and the skipped count."""
  finite = int(acc['finite_steps'])
  out = {k: float(v) / finite for k, v in acc['sums'].items()} if finite else {}
  out.update({k: float(v) for k, v in acc['last'].items()})
  out['skipped_steps'] = float(acc['skipped_steps'])
  return out


def _check_skipped(acc: dict, state: step_lib.TrainState, manager: Any,
                   config: ml_collections.ConfigDict) -> None:
  """Stops the run when skipped steps are not to be tolerated.

  float32 / bfloat16: any skipped step stops the run. float16 with a loss scale:
  skipping is how the scale is calibrated, so the run stops only when the scale has
  fallen to config.min_loss_scale or after config.max_skipped_steps consecutive
  skipped steps. The state is still the last good one (skipped steps change nothing
  but the step counter and the scale), so it is saved as is.

  Raises:
    NonFiniteLossError: naming the window's first skipped step, its loss terms and
      the checkpoint left.
  """
  streak = int(acc['consecutive_skipped'])
  if not int(acc['skipped_steps']) and not streak:
    return
  if state.dynamic_scale is not None:
    scale = float(acc['last']['loss_scale'])
    if streak < config.max_skipped_steps and scale > config.min_loss_scale:
      return
    why = (f'the loss scale fell to {scale:g} (config.min_loss_scale='
           f'{config.min_loss_scale:g})' if scale <= config.min_loss_scale else
           f'{streak} consecutive steps were skipped (config.max_skipped_steps='
           f'{config.max_skipped_steps})')
  else:
    why = 'float32/bfloat16 training does not skip steps'
  first = int(acc['first_skipped_step'])
  terms = ', '.join(f'{k}={float(v):.4g}'
                    for k, v in sorted(acc['first_skipped_metrics'].items()))
  saved = checkpoint_lib.save(manager, state, wait=True)
  raise NonFiniteLossError(
      f'Non-finite gradients at step {first} ({terms}): {why}. The last good state '
      f'(step counter {saved}) is saved in {manager.directory}; lower '
      'config.optim.base_lr or check the data.')


class _Profiler:
  """Writes a profiler trace of `num_steps` steps to `logdir` (jax.profiler)."""

  def __init__(self, logdir: str, first_step: int, num_steps: int):
    self.logdir, self.first, self.last = logdir, first_step, first_step + num_steps
    self.running = False

  def __call__(self, step: int, state: Any) -> None:
    if not self.running and step == self.first:
      jax.profiler.start_trace(self.logdir)
      self.running = True
    elif self.running and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.running = False
      logging.info('Profiler trace of steps %d-%d written to %s (open with TensorBoard '
                   'or Perfetto).', self.first + 1, self.last, self.logdir)


def _identity_map(dataset: Any) -> dict[str, int]:
  """{first training image of each class (relative to the data dir's parent): class}."""
  first: dict[int, str] = {}
  for record in dataset.train:
    first.setdefault(record.pid, os.path.join(*record.path.split(os.sep)[-2:]))
  return {path: label for label, path in sorted(first.items())}


def _warn_if_model_changed(workdir: str, config: ml_collections.ConfigDict,
                           num_classes: int) -> None:
  """Warns when the workdir's saved config differs in a field that changes the model."""
  saved = workdir_lib.read_run_config(workdir)
  if saved is None:
    return
  saved_map = workdir_lib.read_pid_map(workdir)
  diffs = workdir_lib.config_differences(
      saved, config, saved_num_classes=len(set(saved_map.values())) if saved_map else None,
      given_num_classes=num_classes)
  if diffs:
    logging.warning('The config differs from the one the checkpoints in %s were trained '
                    'with, in fields that change the model:\n%s', workdir,
                    workdir_lib.format_differences(diffs))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint) and evaluates.

  Args:
    config: the run's config (configs/default.py lists the fields).
    workdir: checkpoints, TensorBoard events, evaluation JSON and reports go here.

  Returns:
    The final evaluation results (see `evaluation.evaluate_state`), whose table is
    also printed on stdout (process 0).

  Raises:
    preemption.PreemptedError: SIGTERM/SIGINT: the state was saved first.
    NonFiniteLossError: see `_check_skipped`.
    workdir.WorkdirLockedError: another run holds the workdir.
    image_check.UndecodableImageError: naming the training images that do not
      decode; the last good state was saved first.
  """
  # Several processes: the same config, a workdir all of them see, the same data and step.
  multihost.check_agreement(multihost.config_fields(config), 'start-up (config)')
  run_id = workdir_lib.shared_run_id()
  multihost.check_shared_workdir(workdir, run_id)
  # The lock first: a second run on the workdir stops before reading any data.
  with workdir_lib.WorkdirLock(workdir, run_id, process_index=jax.process_index()):
    exp = start_experiment(config, workdir)
    if jax.process_index() == 0:
      workdir_lib.write_run_files(workdir, config, _identity_map(exp.train_source.dataset))
    manager = checkpoint_lib.create_manager(workdir, config.keep_checkpoints)
    best = checkpoint_lib.create_best_manager(workdir)
    state = checkpoint_lib.restore(manager, exp.state)
    multihost.check_agreement({'restored step': int(state.step)}, 'restore')
    with preemption.PreemptionWatch() as watch:
      results = _train_loop(exp, config, workdir, state, manager, best, watch)
  evaluation.print_results(results)
  return results


def start_experiment(config: ml_collections.ConfigDict, workdir: str,
                     load_pretrained: bool = True) -> Experiment:
  """`build_experiment` on every process together, as training and eval-only start.

  Several processes: they build it together (a failure on one stops all) and must
  agree on the records and sizes. A warning names the model fields that differ from
  the config the workdir's checkpoints were trained with.

  Args:
    config: the run's config.
    workdir: the run's workdir (its saved config, if any, is compared).
    load_pretrained: see `build_experiment`.

  Returns:
    The `Experiment` (its state freshly initialised, not restored).
  """
  with multihost.together('building the experiment'):
    exp = build_experiment(config, load_pretrained)
  _check_processes_agree(exp)
  _warn_if_model_changed(workdir, config, exp.train_source.dataset.num_train_pids)
  return exp


def _check_processes_agree(exp: Experiment) -> None:
  """Several processes: stops all of them unless their records and sizes agree."""
  datasets = [exp.train_source.dataset, *(s.dataset for s in exp.test_sources)]
  fields = multihost.data_fields(datasets, exp.train_source.dataset.num_train_pids,
                                 exp.steps_per_epoch)
  multihost.check_agreement(fields, 'start-up (data)')


def _train_loop(exp: Experiment, config: ml_collections.ConfigDict, workdir: str,
                state: step_lib.TrainState, manager: Any, best: Any,
                watch: preemption.PreemptionWatch) -> dict:
  """The steps from the restored state to the end, then the final evaluation."""
  # On the devices as the step returns it: otherwise its second call compiles again.
  state = step_lib.on_devices(state)
  start_step = int(jax.device_get(state.step))
  acc = step_lib.on_devices(initial_metrics_acc(exp.train_step_kwargs, state, config))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  steps_per_epoch = exp.steps_per_epoch
  policy = checkpoint_lib.SavePolicy.from_config(
      config, steps_per_epoch, agree=_broadcast_from_process_0())
  total_steps = policy.total_steps  # the last step, always saved
  policy.start(time.time())
  stream = pipeline.create_train_stream(
      exp.train_source.dataset.train, config, steps_per_epoch=steps_per_epoch,
      start_step=start_step, num_steps=total_steps - start_step,
      num_local_devices=jax.local_device_count(), process_index=jax.process_index(),
      process_count=jax.process_count(), load_image=exp.train_source.load_train_image)
  # Every process must pick the same cache: the two kinds of batch compile other steps.
  multihost.check_agreement({'training cache': stream.cache.mode}, 'training input')
  device_keys = stream.device_keys
  image_cache = None
  if stream.cache.mode == 'device' and total_steps > start_step:
    with multihost.together('filling the device cache'):
      image_cache = device_image_cache(exp.train_source.dataset.train, config,
                                       exp.train_source.load_train_image)
  stream = image_check.train_stream(  # a file that does not decode is named
      stream, exp.train_source.dataset.train, config, steps_per_epoch=steps_per_epoch,
      start_step=start_step, num_devices=jax.device_count(),
      load_image=exp.train_source.load_train_image)
  batches = pipeline.prefetch_to_device(stream, config.prefetch_batches, keys=device_keys)
  profiler = (_Profiler(workdir, start_step + config.profile_first_step,
                        config.profile_steps) if config.profile_steps else None)
  results: dict = {}
  window_start, window_steps = time.time(), 0
  for step in range(start_step, total_steps):
    try:
      batch = next(batches)
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = _save_after_input_error(e, state, manager)
      if error is e:
        raise
      raise error from e.__cause__
    state, acc = exp.p_train_step(state, acc, batch, image_cache)
    done = step + 1
    window_steps += 1
    checkpoint_lib.check_errors(manager)  # host-only: a failed background save stops now
    if profiler is not None:
      profiler(done, state)
    epoch_done, in_epoch = divmod(done, steps_per_epoch)
    if done % config.log_every_steps == 0 or in_epoch == 0:
      host_acc = jax.device_get(acc)  # the only sync with the device between logs
      _check_skipped(host_acc, state, manager, config)
      elapsed = max(time.time() - window_start, 1e-9)
      scalars = _window_scalars(host_acc)
      scalars['images_per_sec'] = window_steps * config.batch_size / elapsed
      scalars['epoch'] = done / steps_per_epoch
      scalars['eta_minutes'] = (total_steps - done) * elapsed / window_steps / 60
      writer.write_scalars(done, scalars)
      acc = step_lib.on_devices(step_lib.reset_window(host_acc))
      window_start, window_steps = time.time(), 0
    if policy.should_save(done, time.time()):
      checkpoint_lib.save(manager, state)
    if watch.should_stop(done):
      saved = checkpoint_lib.save(manager, state, wait=True)
      raise preemption.PreemptedError(
          f'Stopped by {watch.received} after step {done}; the state is saved in '
          f'{manager.directory}/{saved}. Rerun the same command to resume from there.')
    if in_epoch == 0 and (epoch_done % config.eval_every_epochs == 0
                          or epoch_done == config.num_epochs):
      try:
        results = evaluation.evaluate_state(exp.p_eval_step, state, exp.test_sources,
                                            config, workdir)
      except image_check.UndecodableImageError as e:  # keep the training done so far
        raise _save_after_input_error(e, state, manager) from e.__cause__
      checkpoint_lib.save_best(best, state, results)
      writer.write_scalars(done, evaluation.summary_scalars(results))
      writer.flush()
      window_start = time.time()  # evaluation time is not training time
  image_cache = None  # the devices' copies are freed before the final evaluation
  manager.wait_until_finished()
  best.wait_until_finished()
  writer.flush()
  if not results:  # nothing left to train: evaluate the restored state
    results = evaluation.evaluate_state(exp.p_eval_step, state, exp.test_sources, config,
                                        workdir)
  return results


def device_image_cache(records: Any, config: ml_collections.ConfigDict,
                       load_image: Optional[Any] = None) -> jax.Array:
  """Every training image decoded once into the device cache of the local devices.

  Args:
    records: the training records.
    config: the run's config (input.image_size, input.padding).
    load_image: the training source's image loader hook (None: the record's file).

  Returns:
    the cache (`device_cache.fill_device_cache`), for `p_train_step`'s image_cache.

  Raises:
    image_check.UndecodableImageError: naming the files that do not decode.
  """
  return device_cache.fill_device_cache(
      image_check.image_chunks(records, config.input.image_size, load_image),
      len(records), config.input.image_size, config.input.padding,
      step_lib.replicated_sharding())


def _save_after_input_error(error: Exception, state: step_lib.TrainState,
                            manager: Any) -> Exception:
  """Saves the last good state after an input stream failed; returns what to raise.

  A single process saves (and waits for the write); with several processes the
  others are inside the next step's collectives, so nothing is saved and the last
  periodic checkpoint stands.

  Returns:
    `error`, or for an `image_check.UndecodableImageError` the same error saying
    where the state was saved.
  """
  if jax.process_count() > 1:
    return error
  try:
    saved = checkpoint_lib.save(manager, state, wait=True)
  except checkpoint_lib.CheckpointSaveError as save_error:
    logging.error('The input stream failed and saving the last good state failed too: '
                  '%s', save_error)
    return error
  where = os.path.join(str(manager.directory), str(saved))
  if isinstance(error, image_check.UndecodableImageError):
    return error.with_saved_state(where)
  logging.error('The input stream failed (%s); the last good state is saved in %s.',
                type(error).__name__, where)
  return error


def _broadcast_from_process_0() -> Optional[Any]:
  """multihost_utils.broadcast_one_to_all with several processes, else None."""
  if jax.process_count() == 1:
    return None
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.broadcast_one_to_all
