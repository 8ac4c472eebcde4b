"""Loading PyTorch weights (ImageNet backbones, BoT re-ID models) into a ReIDModel.

The public entry of the converter: `load_pretrained` (a file into a model's
variables), `load_pretrained_into_state` (into a fresh train state),
`check_pretrained_file` (the start-up check) and the CLI below. The torch key maps
of each backbone family and the file layouts they recognise (an ImageNet backbone, a
reid-strong-baseline model) are `reid_jax.convert_keys`'. A file may be a bare state
dict or a checkpoint dict wrapping it under 'state_dict', 'model' or 'net' (it is
unwrapped).

`choice` (`PRETRAIN_CHOICES`, `config.model.pretrain_choice`):
  'imagenet'  loads the backbone only, from either layout; a file's BNNeck and
              classifier are left out with a warning (fine-tuning a re-ID backbone).
  'self'      loads the whole model (evaluate or continue a trained model). A
              classifier of another class count is left as given (the fresh init)
              with a warning naming both shapes. An ImageNet-only file is an error
              (it has no BNNeck or classifier; a 'self' run evaluated with a random
              BNNeck would be silently wrong): use 'imagenet' for it. Every other
              model variable (e.g. `gem/p`) must be in the file.
Every missing, unexpected and mis-shaped variable is listed in ONE ValueError; so is
a nonzero BNNeck bias (ours has none: BoT freezes it at 0).

Our `.npz` (CLI below) stores the torch names as found in the file (float32, torch
layout), so it is read by the same mapping and logs the same layout.

CLI: `python -m reid_jax.convert --src model.pth --out model.npz`. Training reads
a `.pth` directly when torch is installed; without torch it says to convert first.
Nothing is ever downloaded.
"""

import argparse
import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

from reid_jax import convert_keys
from reid_jax import models
from reid_jax import train_step as step_lib
from reid_jax.backbones import layers

PRETRAIN_CHOICES = ('imagenet', 'self')
WRAPPER_KEYS = ('state_dict', 'model', 'net')
# The weight files read: our converted .npz, and PyTorch's .pth / .pt (with torch).
WEIGHT_FILE_SUFFIXES = ('.npz', '.pth', '.pt')


def _checked_extension(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in WEIGHT_FILE_SUFFIXES:
    raise ValueError(f'Unsupported weights file {path!r}: expected .npz, .pth or .pt')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Pretrained weights file {path!r} does not exist.')
  return ext


def _torch_or_explain(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    npz = os.path.splitext(path)[0] + '.npz'
    raise ImportError(
        f'Reading the PyTorch file {path} needs PyTorch, which is not installed. '
        f'Convert it first where torch is installed: `python -m reid_jax.convert '
        f'--src {path} --out {npz}`, then pass {npz} (e.g. '
        f'--config.model.pretrained={npz}).') from e
  return torch


def read_state_dict(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """Reads a torch-named state dict from `.npz` or `.pth`/`.pt`.

  Args:
    path: file path. `.pth`/`.pt` needs torch (imported lazily); a checkpoint
      dict holding the weights under one of WRAPPER_KEYS is unwrapped.

  Returns:
    (torch key -> numpy array in the torch layout, '' for a bare state dict or
    e.g. "checkpoint dict, weights under 'state_dict'").

  Raises:
    ImportError: torch missing for a `.pth`/`.pt` file (says to convert first).
    FileNotFoundError, ValueError: no such file; unsupported extension or content.
  """
  ext = _checked_extension(path)
  if ext == '.npz':
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}, ''
  torch = _torch_or_explain(path)
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle errors have no common public base class
    raise ValueError(
        f'{path} is not a plain state dict (torch.load(weights_only=True) failed: '
        f'{str(e).splitlines()[0]}). If it holds a whole pickled nn.Module, load it in '
        'PyTorch and save model.state_dict() instead.') from e
  note = ''
  while isinstance(obj, Mapping) and not any(hasattr(v, 'shape')
                                             for v in obj.values()):
    wrapper = next((w for w in WRAPPER_KEYS if isinstance(obj.get(w), Mapping)), None)
    if wrapper is None:
      break
    obj, note = obj[wrapper], f'checkpoint dict, weights under {wrapper!r}'
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} does not hold a state dict (got {type(obj).__name__}).')
  arrays = {k: convert_keys.to_numpy(v) for k, v in obj.items() if hasattr(v, 'shape')}
  if not arrays:
    raise ValueError(f'{path} holds no tensors (top-level keys: {sorted(obj)[:10]}); '
                     f'expected a state dict, optionally under one of {WRAPPER_KEYS}.')
  return arrays, note


def check_pretrained_file(path: str, choice: str = 'imagenet') -> None:
  """Cheap start-up check of `config.model.pretrained` / `pretrain_choice`.

  Raises:
    ValueError: unknown choice or unsupported extension.
    FileNotFoundError: no such file.
    ImportError: a `.pth`/`.pt` file without torch installed (says to convert it).
  """
  layers.check_choice('pretrain_choice', choice, PRETRAIN_CHOICES)
  ext = _checked_extension(path)
  if ext != '.npz':
    _torch_or_explain(path)


def merge_converted(converted: convert_keys.Converted, params: Mapping[str, Any],
                    batch_stats: Mapping[str, Any], *, choice: str = 'imagenet',
                    source: str = 'state dict') -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Puts converted variables into a model's params/batch_stats (see module doc).

  Args:
    converted: from `convert_keys.convert_state_dict`.
    params: the ReIDModel's params (no center-loss entry).
    batch_stats: the ReIDModel's batch_stats.
    choice: one of PRETRAIN_CHOICES.
    source: name used in messages.

  Returns:
    New (params, batch_stats): loaded leaves are float32 numpy arrays, the others
    are the given ones.

  Raises:
    ValueError: bad choice, 'self' with an ImageNet file, or (in one error) every
      missing, unexpected and mis-shaped variable and a nonzero BNNeck bias.
  """
  layers.check_choice('pretrain_choice', choice, PRETRAIN_CHOICES)
  if choice == 'self' and converted.layout == 'imagenet':
    raise ValueError(
        f"{source} holds an {converted.description}: no BNNeck or classifier, so "
        "pretrain_choice='self' (the whole re-ID model) cannot load it. Use "
        "pretrain_choice='imagenet' to initialise the backbone from it.")

  def wanted(path: convert_keys.Path) -> bool:
    return choice == 'self' or path[0] == 'backbone'

  def name(c: str, path: convert_keys.Path) -> str:
    return f"{c} {'/'.join(path)} (torch {converted.sources[(c, path)]})"

  targets = {c: traverse_util.flatten_dict(dict(v))
             for c, v in (('params', params), ('batch_stats', batch_stats))}
  loaded = {c: {p: a for p, a in v.items() if wanted(p)}
            for c, v in converted.variables.items()}
  left_out = sorted({converted.sources[(c, p)] for c, v in converted.variables.items()
                     for p in v if not wanted(p)})
  if left_out:
    logging.warning("%s: pretrain_choice='imagenet' loads the backbone only; left out "
                    "%s (use pretrain_choice='self' to load them).", source, left_out)
  problems = [f'unexpected torch key {k} {why}'
              for k, why in sorted(converted.unknown.items())]
  bias_path = ('bottleneck', 'bias')
  bias = loaded['params'].get(bias_path)
  if bias is not None and bias_path not in targets['params']:
    if np.any(bias != 0):
      problems.append(
          f'nonzero {name("params", bias_path)}: max |bias| {np.abs(bias).max():.4g}; '
          "this model's BNNeck has no bias (BoT freezes it at 0), so the file's "
          'neck cannot be represented')
    del loaded['params'][bias_path]
  # A classifier for another class count (same feature size) is left as given.
  target_cls = convert_keys.shape_of(targets['params'].get(('classifier', 'kernel')))
  file_cls = convert_keys.shape_of(loaded['params'].get(('classifier', 'kernel')))
  keep_classifier = (len(target_cls) == len(file_cls) == 2 and target_cls != file_cls
                     and target_cls[0] == file_cls[0])
  if keep_classifier:
    logging.warning(
        '%s: classifier left as given (re-initialised): the file has %d classes '
        '(torch classifier.weight %s), the model %d (flax classifier/kernel %s).',
        source, file_cls[1], file_cls[::-1], target_cls[1], target_cls)
    for c in loaded:
      loaded[c] = {p: a for p, a in loaded[c].items() if p[0] != 'classifier'}
  new = {}
  for c, target in targets.items():
    for path, value in sorted(target.items()):
      if not wanted(path) or (keep_classifier and path[0] == 'classifier'):
        continue
      want = convert_keys.shape_of(value)
      if path not in loaded[c]:
        problems.append(f"missing {c} {'/'.join(path)}: expected shape "
                        f'{want}, not in the file')
      elif loaded[c][path].shape != want:
        problems.append(f'mis-shaped {name(c, path)}: expected shape '
                        f'{want}, found {loaded[c][path].shape}')
    for path in sorted(set(loaded[c]) - set(target)):
      problems.append(f'unexpected {name(c, path)} shape {loaded[c][path].shape}: '
                      'no such variable in the model')
    merged = {p: np.asarray(loaded[c][p], np.float32) if p in loaded[c] else v
              for p, v in target.items()}
    new[c] = traverse_util.unflatten_dict(merged)
  if problems:
    raise ValueError(
        f"Cannot load {source} ({converted.description}) with pretrain_choice="
        f"{choice!r}; {len(problems)} problem(s):\n  " + '\n  '.join(problems))
  return new['params'], new['batch_stats']


def _read_and_convert(path: str, families: Sequence[convert_keys.BackboneFamily]
                      ) -> Tuple[Dict[str, np.ndarray], convert_keys.Converted]:
  state_dict, container = read_state_dict(path)
  converted = convert_keys.convert_state_dict(state_dict, families)
  converted.description += f', {container}' if container else ''
  return state_dict, converted


def load_pretrained(
    path: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
    choice: str = 'imagenet',
    families: Sequence[convert_keys.BackboneFamily] = convert_keys.BACKBONE_FAMILIES
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Loads a `.pth`/`.pt` or converted `.npz` file into a ReIDModel's variables.

  Args:
    path: an ImageNet backbone or a reid-strong-baseline model, either saved
      plainly, from DataParallel/DDP, or inside a checkpoint dict; or its `.npz`.
    params: the model's initialised params (no center-loss entry).
    batch_stats: the model's initialised batch_stats.
    choice: 'imagenet' (backbone only) or 'self' (whole model); see module doc.
    families: backbone families to try, in order.

  Returns:
    (params, batch_stats) with what the file holds (per `choice`) loaded.

  Raises:
    ValueError: see `merge_converted`; ImportError: a `.pth` file without torch.
  """
  layers.check_choice('pretrain_choice', choice, PRETRAIN_CHOICES)
  _, converted = _read_and_convert(path, families)
  logging.info('%s: found %s; loading with pretrain_choice=%r.', path,
               converted.description, choice)
  return merge_converted(converted, params, batch_stats, choice=choice, source=path)


def load_pretrained_into_state(path: str, choice: str, state: step_lib.TrainState
                               ) -> step_lib.TrainState:
  """A fresh state with converted PyTorch weights loaded (see `load_pretrained`).

  Args:
    path: a .npz from reid_jax.convert, or a .pth when torch is installed.
    choice: 'imagenet' (backbone only) or 'self' (the whole re-ID model).
    state: a freshly initialised state; the center-loss centers are kept.

  Returns:
    The state with the file's weights in its params and BN statistics.
  """
  params, batch_stats = load_pretrained(
      path, step_lib.model_params(state.params), state.batch_stats, choice=choice)
  return _with_variables(state, params, batch_stats)


def load_model_into_state(path: str, state: step_lib.TrainState) -> step_lib.TrainState:
  """A fresh state with all the model a file holds, for evaluation (file read once).

  A re-ID model (a reid-strong-baseline `.pth` or its `.npz`) loads whole, as
  `choice='self'` (a classifier of another class count is left as given, with a
  warning: evaluation does not use it); an ImageNet backbone loads as 'imagenet',
  with a warning that its BNNeck is the fresh one (an identity in eval mode).

  Args:
    path: a .npz from reid_jax.convert, or a .pth when torch is installed.
    state: a freshly initialised state; the center-loss centers are kept.

  Returns:
    The state with the file's weights in its params and BN statistics.
  """
  _, converted = _read_and_convert(path, convert_keys.BACKBONE_FAMILIES)
  choice = 'imagenet' if converted.layout == 'imagenet' else 'self'
  logging.info('%s: found %s; loading the whole model it holds (pretrain_choice=%r).',
               path, converted.description, choice)
  if choice == 'imagenet':
    logging.warning('%s holds an ImageNet backbone, not a re-ID model: evaluating it '
                    'with a fresh BNNeck.', path)
  params, batch_stats = merge_converted(converted, step_lib.model_params(state.params),
                                        state.batch_stats, choice=choice, source=path)
  return _with_variables(state, params, batch_stats)


def _with_variables(state: step_lib.TrainState, params: Mapping[str, Any],
                    batch_stats: Mapping[str, Any]) -> step_lib.TrainState:
  """`state` with the model's params and batch_stats replaced (centers kept)."""
  params = dict(params)
  if step_lib.CENTER_KEY in state.params:
    params[step_lib.CENTER_KEY] = state.params[step_lib.CENTER_KEY]
  return state.replace(params=params, batch_stats=batch_stats)


def save_npz(state_dict: Mapping[str, Any], out: str) -> int:
  """Writes a torch state dict as our `.npz` (torch names and layout, float32).

  Args:
    state_dict: torch key -> tensor/array; num_batches_tracked is dropped.
    out: output path (numpy appends `.npz` if it is missing).

  Returns:
    The number of arrays written.
  """
  arrays = {k: convert_keys.to_numpy(v).astype(np.float32)
            for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  np.savez(out, **arrays)
  return len(arrays)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI entry point: converts a PyTorch `.pth`/`.pt` file into our `.npz`."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--src', required=True, help='PyTorch .pth/.pt file')
  parser.add_argument('--out', required=True, help='output .npz file')
  parser.add_argument('--depth', type=int, default=None,
                      help="check the backbone matches the file family's depth-layer "
                      'model: resnet{depth}, resnet{depth}_ibn_a, se_resnet{depth} / '
                      'se_resnext{depth}, senet154')
  parser.add_argument('--backbone', default=None, choices=models.MODEL_NAMES,
                      help='check every variable and shape against this backbone '
                      '(config.model.name)')
  args = parser.parse_args(argv)
  state_dict, converted = _read_and_convert(args.src, convert_keys.BACKBONE_FAMILIES)
  print(f'{args.src}: found {converted.description}')
  if converted.unknown:
    raise SystemExit(f'Unrecognised keys (not converted): {converted.unknown}')
  if args.depth is not None or args.backbone is not None:
    convert_keys.torch_state_dict_to_flax(state_dict, args.depth, args.backbone)
  count = save_npz(state_dict, args.out)
  print(f'Wrote {count} arrays to {args.out}')


if __name__ == '__main__':
  main()

