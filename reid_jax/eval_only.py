"""Evaluation-only mode (`reid_jax.main --eval_only`): restore a model, evaluate it.

`evaluate_checkpoint` builds the experiment as training does
(`train.start_experiment`), restores the state to evaluate (the workdir's latest
checkpoint, a checkpoint folder, or a converted / PyTorch re-ID model) and evaluates
it on the test sets with `evaluation.evaluate_state`, as training's periodic
evaluation does: same results, files and reports.
"""

import logging
from typing import Optional

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
      .npz / PyTorch .pth re-ID model (loaded as `pretrain_choice='self'`). Without
      one and without a checkpoint in the workdir, `config.model.pretrained` is
      evaluated: a re-ID model file whole whatever `pretrain_choice` says
      (`convert.load_model_into_state`).

  Returns:
    The evaluation results (see `evaluation.evaluate_state`).

  Raises:
    FileNotFoundError: no checkpoint (and no pretrained file) to evaluate.
  """
  # Several processes: the same config, a workdir all of them see, the same step.
  multihost.check_agreement(multihost.config_fields(config), 'start-up (config)')
  multihost.check_shared_workdir(workdir, workdir_lib.shared_run_id())
  path = checkpoint or config.checkpoint
  with multihost.together('looking for a checkpoint'):
    manager = None if path else checkpoint_lib.create_manager(workdir, read_only=True)
    latest = manager.latest_step() if manager else None
  if manager and latest is None and not config.model.pretrained:
    raise FileNotFoundError(
        f'No checkpoint in {manager.directory} to evaluate: train first, or pass '
        '--config.checkpoint=PATH (a checkpoint folder, or a converted .npz / .pth '
        're-ID model), or --config.model.pretrained=FILE.')
  # No checkpoint, only a pretrained file under the default 'imagenet' choice: the
  # whole model it holds is loaded once below, not its backbone at build time.
  whole_pretrained = bool(manager and latest is None and config.model.pretrained
                          and config.model.pretrain_choice == 'imagenet')
  exp = train.start_experiment(config, workdir, load_pretrained=not whole_pretrained)
  with multihost.together('restoring the checkpoint'):
    if path and path.lower().endswith(convert.WEIGHT_FILE_SUFFIXES):
      # A converted (or PyTorch) re-ID model: the whole model, as pretrain_choice='self'.
      state = convert.load_pretrained_into_state(path, 'self', exp.state)
    elif path:
      state = checkpoint_lib.restore_from_path(path, exp.state)
    elif latest is not None:
      state = checkpoint_lib.restore(manager, exp.state)
    else:  # no checkpoint: the pretrained model
      logging.info('No checkpoint in %s: evaluating the model in %s.', manager.directory,
                   config.model.pretrained)
      # pretrain_choice='self': the build loaded the whole model already.
      state = (convert.load_model_into_state(config.model.pretrained, exp.state)
               if whole_pretrained else exp.state)
  multihost.check_agreement({'restored step': int(state.step)}, 'restore')
  # Put on the devices once (as the pmapped steps lay it out), not re-sent with every batch.
  state = step_lib.on_devices(state)
  results = evaluation.evaluate_state(exp.p_eval_step, state, exp.test_sources, config,
                                      workdir)
  evaluation.print_results(results)
  return results

