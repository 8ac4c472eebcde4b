"""The training loop: data, state, pmapped steps, logging, checkpoints, evaluation."""

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from input_pipeline import catalog
from input_pipeline import pipeline
from input_pipeline.records import ReIDDataset
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import config_lib
from reid_jax import evaluate as evaluate_lib
from reid_jax import models
from reid_jax import optim
from reid_jax import precision
from reid_jax import train_step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the last good state was checkpointed."""


@dataclasses.dataclass
class Setup:
  """Everything `train_and_evaluate` and `evaluate_checkpoint` build from a config."""
  train_set: ReIDDataset
  test_set: ReIDDataset
  state: step_lib.TrainState
  p_train_step: Any
  p_eval_step: Any
  dtype: Any
  steps_per_epoch: int
  learning_rate_fn: Any
  # Image readers for TFDS-prepared data (None: read the record paths).
  train_loader: Optional[Callable] = None
  test_loader: Optional[Callable] = None


def tfds_loaders(config: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
  """Readers of the train and query+gallery images from the TFDS TFRecord shards."""
  from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top
  data_dir = config.tfds_data_dir or None
  test_name = config.test_dataset or config.dataset
  train = tfds_builders.encoded_images(config.dataset, 'train', data_dir)
  test = (tfds_builders.encoded_images(test_name, 'query', data_dir)
          + tfds_builders.encoded_images(test_name, 'gallery', data_dir))
  return pipeline.in_memory_loader(train), pipeline.in_memory_loader(test)


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds datasets, model, state and the pmapped steps.

  Args:
    config: the run's config.

  Returns:
    A `Setup` with a freshly initialised state (not restored).
  """
  num_devices = jax.device_count()
  config_lib.validate(config, num_devices)
  dtype = precision.compute_dtype(config)
  train_set, test_set = catalog.load_train_test(config)
  num_classes = train_set.num_train_pids
  steps_per_epoch = pipeline.steps_per_epoch(train_set.train, config, num_devices)
  image_size = tuple(config.input.image_size)
  model = models.create_model(config.model, num_classes, dtype=dtype,
                              bn_axis_name=step_lib.AXIS_NAME)
  tx = optim.create_optimizer(config, steps_per_epoch)
  learning_rate_fn = optim.create_lr_schedule(config, steps_per_epoch)
  state = step_lib.create_train_state(
      jax.random.key(config.seed), model, tx, image_size, num_classes,
      use_center=config_lib.uses_center_loss(config),
      dynamic_scale=precision.create_dynamic_scale(dtype))
  if config.model.pretrained:
    params, batch_stats = models_pretrained(config.model.pretrained, state)
    state = state.replace(params=params, batch_stats=batch_stats)
  p_train_step, p_eval_step = step_lib.make_parallel_steps(
      step_lib.LossConfig.from_config(config), learning_rate_fn, flip_test=config.test.flip)
  logging.info('Training %s on %s: %d identities, %d images, %d steps per epoch, '
               '%d devices, compute dtype %s.', config.model.name, train_set.name,
               num_classes, len(train_set.train), steps_per_epoch, num_devices,
               np.dtype(dtype).name)
  loaders = tfds_loaders(config) if config.data_format == 'tfds' else (None, None)
  return Setup(train_set, test_set, state, p_train_step, p_eval_step, dtype,
               steps_per_epoch, learning_rate_fn, *loaders)


def models_pretrained(path: str, state: step_lib.TrainState) -> tuple[Any, Any]:
  """Loads converted ImageNet weights into the backbone of a fresh state."""
  from reid_jax import convert  # pylint: disable=g-import-not-at-top
  params = step_lib.model_params(state.params)
  params, batch_stats = convert.load_pretrained(path, params, state.batch_stats)
  params = dict(params)
  if step_lib.CENTER_KEY in state.params:
    params[step_lib.CENTER_KEY] = state.params[step_lib.CENTER_KEY]
  return params, batch_stats


def _host_metrics(metrics: dict) -> dict[str, float]:
  """Per-device metrics (already averaged over devices) to host floats."""
  return {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}


def _check_finite(metrics: dict, step: int, state_before: step_lib.TrainState,
                  manager: Any, half_with_scale: bool) -> None:
  if half_with_scale or math.isfinite(metrics['loss']):
    return
  saved = checkpoint_lib.save(manager, state_before, wait=True)
  terms = ', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items()))
  raise NonFiniteLossError(
      f'Loss became {metrics["loss"]} at step {step + 1}: {terms}. The last good state '
      f'(step {saved}) is saved in {manager.directory}; lower config.optim.base_lr or '
      'check the data.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint) and evaluates.

  Args:
    config: the run's config (configs/default.py lists the fields).
    workdir: checkpoints, TensorBoard events, evaluation JSON and reports go here.

  Returns:
    The final evaluation results (see `evaluate.score`).
  """
  s = setup(config)
  manager = checkpoint_lib.create_manager(workdir, config.keep_checkpoints)
  state = checkpoint_lib.restore(manager, s.state)
  if jax.process_count() == 1:
    # As the step returns it: otherwise its second call compiles it again.
    state = jax.device_put(state, step_lib.replicated_sharding())
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info('Resumed from %s at step %d.', manager.directory, start_step)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  total_steps = config.num_epochs * s.steps_per_epoch
  half_with_scale = state.dynamic_scale is not None
  num_local = jax.local_device_count()
  global_batch = config.batch_size
  results: dict = {}
  step = start_step
  window_start, window_steps = time.time(), 0
  for epoch in range(start_step // s.steps_per_epoch, config.num_epochs):
    ds = pipeline.create_train_dataset(
        s.train_set.train, config, epoch=epoch, num_local_devices=num_local,
        process_index=jax.process_index(), process_count=jax.process_count(),
        dtype=s.dtype, steps=s.steps_per_epoch, load_image=s.train_loader)
    skip = step - epoch * s.steps_per_epoch  # resumed inside an epoch
    for i, batch in enumerate(pipeline.prefetch_to_device(ds.as_numpy_iterator(), 2)):
      if i < skip:
        continue
      state_before = state
      state, metrics = s.p_train_step(state, batch)
      host = _host_metrics(metrics)
      _check_finite(host, step, state_before, manager, half_with_scale)
      step += 1
      window_steps += 1
      if step % config.log_every_steps == 0 or step == total_steps:
        elapsed = time.time() - window_start
        host['images_per_sec'] = window_steps * global_batch / max(elapsed, 1e-9)
        host['epoch'] = epoch + 1
        host['eta_minutes'] = (total_steps - step) * elapsed / max(window_steps, 1) / 60
        writer.write_scalars(step, host)
        window_start, window_steps = time.time(), 0
    epoch_done = epoch + 1
    if epoch_done % config.checkpoint_every_epochs == 0 or epoch_done == config.num_epochs:
      checkpoint_lib.save(manager, state)
    if epoch_done % config.eval_every_epochs == 0 or epoch_done == config.num_epochs:
      results = evaluate_lib.run_evaluation(s.p_eval_step, state, s.test_set, config,
                                            workdir, s.dtype, load_image=s.test_loader)
      writer.write_scalars(step, {f'eval/{k}': v for k, v in results.items()
                                  if isinstance(v, float)})
      writer.flush()
  manager.wait_until_finished()
  writer.flush()
  if not results:  # nothing left to train: evaluate the restored state
    results = evaluate_lib.run_evaluation(s.p_eval_step, state, s.test_set, config,
                                          workdir, s.dtype, load_image=s.test_loader)
  print(evaluate_lib.format_results(results), flush=True)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: Optional[str] = None) -> dict:
  """Evaluation-only mode: restores a checkpoint and evaluates it.

  Args:
    config: the run's config.
    workdir: results are written here; its latest checkpoint is used unless
      `checkpoint` (or config.checkpoint) names one.
    checkpoint: an explicit checkpoint path.

  Returns:
    The evaluation results.

  Raises:
    FileNotFoundError: no checkpoint to evaluate.
  """
  s = setup(config)
  path = checkpoint or config.checkpoint
  if path:
    state = checkpoint_lib.restore_from_path(path, s.state)
  else:
    manager = checkpoint_lib.create_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is None:
      raise FileNotFoundError(
          f'No checkpoint in {manager.directory} to evaluate: train first, or pass '
          '--config.checkpoint=PATH.')
    state = checkpoint_lib.restore(manager, s.state)
  results = evaluate_lib.run_evaluation(s.p_eval_step, state, s.test_set, config, workdir,
                                        s.dtype, load_image=s.test_loader)
  print(evaluate_lib.format_results(results), flush=True)
  return results
