"""Evaluation-only mode (`reid_jax.main --eval_only`): restore a model, evaluate it.

`evaluate_checkpoint` builds the experiment as training does
(`train.start_experiment`), restores the state to evaluate (the workdir's latest
checkpoint, a checkpoint folder, or a converted / PyTorch re-ID model) and evaluates
it on the test sets with `evaluation.evaluate_state`, as training's periodic
evaluation does: same results, files and reports.
"""

import logging
from typing import Optional

import jax
import ml_collections

from reid_jax import checkpoint as checkpoint_lib
from reid_jax import convert
from reid_jax import evaluation
from reid_jax import multihost
from reid_jax import train
from reid_jax import train_step as step_lib
from reid_jax import workdir as workdir_lib


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: Optional[str] = None) -> dict:
  """Evaluation-only mode: restores a checkpoint and evaluates it.

  The results table is printed on stdout (process 0), as at the end of training.

  Args:
    config: the run's config.
    workdir: results are written here; its latest checkpoint is used unless
      `checkpoint` (or config.checkpoint) names one.
    checkpoint: an explicit checkpoint path: a checkpoint folder, or a converted
      .npz / PyTorch .pth re-ID model (loaded as `pretrain_choice='self'`).

  Returns:
    The evaluation results (see `evaluation.evaluate_state`).

  Raises:
    FileNotFoundError: no checkpoint to evaluate.
  """
  # Several processes: the same config, a workdir all of them see, the same step.
  multihost.check_agreement(multihost.config_fields(config), 'start-up (config)')
  multihost.check_shared_workdir(workdir, workdir_lib.shared_run_id())
  exp = train.start_experiment(config, workdir)
  path = checkpoint or config.checkpoint
  with multihost.together('restoring the checkpoint'):
    if path and path.lower().endswith(convert.WEIGHT_FILE_SUFFIXES):
      # A converted (or PyTorch) re-ID model: the whole model, as pretrain_choice='self'.
      state = convert.load_pretrained_into_state(path, 'self', exp.state)
    elif path:
      state = checkpoint_lib.restore_from_path(path, exp.state)
    else:
      manager = checkpoint_lib.create_manager(workdir, read_only=True)
      if manager.latest_step() is not None:
        state = checkpoint_lib.restore(manager, exp.state)
      elif config.model.pretrained:
        state = _pretrained_model(config, exp.state, manager.directory)
      else:
        raise FileNotFoundError(
            f'No checkpoint in {manager.directory} to evaluate: train first, or pass '
            '--config.checkpoint=PATH (a checkpoint folder, or a converted .npz / .pth '
            're-ID model).')
  multihost.check_agreement({'restored step': int(state.step)}, 'restore')
  # Put on the devices once (as the pmapped steps lay it out), not re-sent with every batch.
  state = jax.device_put(state, step_lib.replicated_sharding())
  results = evaluation.evaluate_state(exp.p_eval_step, state, exp.test_sources, config,
                                      workdir)
  evaluation.print_results(results)
  return results


def _pretrained_model(config: ml_collections.ConfigDict, state: step_lib.TrainState,
                      directory: str) -> step_lib.TrainState:
  """The state to evaluate when there is no checkpoint but `config.model.pretrained`.

  A re-ID model file (a reid-strong-baseline `.pth` or its `.npz`) is evaluated whole,
  whatever `pretrain_choice` says: `train.start_experiment` loaded only its backbone
  under the default 'imagenet', so the whole model is loaded here as 'self' (its
  classifier is left out with a warning when the class count differs: evaluation does
  not use it). An ImageNet backbone file is evaluated as loaded (its BNNeck is the
  fresh one: an identity in eval mode), with a warning.
  """
  path = config.model.pretrained
  layout = convert.file_layout(path)
  logging.info('No checkpoint in %s: evaluating the model in %s (%s).', directory,
               path, layout)
  if config.model.pretrain_choice == 'self':
    return state
  if layout == 'imagenet':
    logging.warning('%s holds an ImageNet backbone, not a re-ID model: evaluating it '
                    'with a fresh BNNeck.', path)
    return state
  return convert.load_pretrained_into_state(path, 'self', state)
