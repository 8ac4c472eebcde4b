"""Conversion of torchvision ResNet weights into the flax backbone of models.py.

Name mapping (torch state_dict key -> flax variable path under the backbone;
`P` = collection `params`, `S` = collection `batch_stats`):

  conv1.weight                        -> P conv1/kernel       (OIHW -> HWIO)
  bn1.weight / bn1.bias               -> P bn1/scale, bn1/bias
  bn1.running_mean / running_var      -> S bn1/mean, bn1/var
  layer{i}.{j}.conv{k}.weight         -> P layer{i}_{j}/conv{k}/kernel
  layer{i}.{j}.bn{k}.{...}            -> P/S layer{i}_{j}/bn{k}/{...}
  layer{i}.{j}.downsample.0.weight    -> P layer{i}_{j}/downsample_conv/kernel
  layer{i}.{j}.downsample.1.{...}     -> P/S layer{i}_{j}/downsample_bn/{...}
  *.num_batches_tracked, fc.*         -> ignored

A `module.` prefix (DataParallel checkpoints) is stripped. Our `.npz` format
stores the torch names and float32 arrays in the torch layout (OIHW), so it is
read by the same mapping.

CLI: `python -m reid_jax.convert --src resnet50.pth --out resnet50.npz`.
Nothing is ever downloaded.
"""

import argparse
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

from reid_jax import models

_BN_PARAMS = {'weight': ('params', 'scale'), 'bias': ('params', 'bias')}
_BN_STATS = {'running_mean': ('batch_stats', 'mean'),
             'running_var': ('batch_stats', 'var')}
_LAYER_RE = re.compile(r'^layer(\d+)\.(\d+)\.(.+)$')


def _is_ignored(key: str) -> bool:
  return key.startswith('fc.') or key.endswith('num_batches_tracked')


def _map_module(module: str) -> str:
  """Maps a torch module name inside a block or the stem to its flax name."""
  if module == 'downsample.0':
    return 'downsample_conv'
  if module == 'downsample.1':
    return 'downsample_bn'
  return module


def _map_key(key: str) -> Tuple[str, Tuple[str, ...], bool]:
  """Maps a torch key to (collection, flax path, is_conv_kernel).

  Raises:
    ValueError: for a key that is not part of a torchvision ResNet.
  """
  match = _LAYER_RE.match(key)
  prefix: Tuple[str, ...] = ()
  rest = key
  if match:
    prefix = (f'layer{match.group(1)}_{match.group(2)}',)
    rest = match.group(3)
  module, _, leaf = rest.rpartition('.')
  module = _map_module(module)
  if not re.fullmatch(r'conv\d|bn\d|downsample_conv|downsample_bn', module):
    raise ValueError(f'Unexpected key in ResNet state dict: {key!r}')
  if module.startswith('conv') or module == 'downsample_conv':
    if leaf != 'weight':
      raise ValueError(f'Unexpected key in ResNet state dict: {key!r}')
    return 'params', prefix + (module, 'kernel'), True
  if leaf in _BN_PARAMS:
    collection, name = _BN_PARAMS[leaf]
  elif leaf in _BN_STATS:
    collection, name = _BN_STATS[leaf]
  else:
    raise ValueError(f'Unexpected key in ResNet state dict: {key!r}')
  return collection, prefix + (module, name), False


def _expected_layout(depth: int) -> Tuple[Sequence[int], str]:
  name = f'resnet{depth}'
  if name not in models.RESNET_SPECS:
    raise ValueError(
        f'Unknown depth={depth!r}; allowed values: '
        f'{", ".join(k[len("resnet"):] for k in models.RESNET_SPECS)}.')
  return models.RESNET_SPECS[name]


def torch_state_dict_to_flax(
    state_dict: Mapping[str, Any],
    depth: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Converts a torchvision ResNet state dict into flax backbone variables.

  Args:
    state_dict: torch key -> array (numpy arrays or torch tensors), torch layout.
    depth: 18/34/50/101/152 to check that the blocks match that ResNet exactly;
      None converts whatever ResNet-shaped keys are present (custom stage sizes).

  Returns:
    (params, batch_stats): nested dicts for the `ResNet` module (i.e. what sits
    under `params['backbone']` / `batch_stats['backbone']` of a ReIDModel), float32.

  Raises:
    ValueError: unknown keys, or (with `depth`) blocks that do not match it.
  """
  flat: Dict[str, Dict[Tuple[str, ...], np.ndarray]] = {
      'params': {}, 'batch_stats': {}}
  for key, value in state_dict.items():
    if key.startswith('module.'):
      key = key[len('module.'):]
    if _is_ignored(key):
      continue
    collection, path, is_kernel = _map_key(key)
    array = _to_numpy(value).astype(np.float32)
    if is_kernel:
      if array.ndim != 4:
        raise ValueError(f'{key}: expected a 4-D OIHW conv weight, got shape '
                         f'{array.shape}')
      array = np.transpose(array, (2, 3, 1, 0))
    flat[collection][path] = array
  if depth is not None:
    stage_sizes, block = _expected_layout(depth)
    _check_layout(flat['params'], stage_sizes, block, depth)
  return (traverse_util.unflatten_dict(flat['params']),
          traverse_util.unflatten_dict(flat['batch_stats']))


def _check_layout(flat_params: Mapping[Tuple[str, ...], np.ndarray],
                  stage_sizes: Sequence[int], block: str, depth: int) -> None:
  """Checks the block names and conv counts against a named ResNet layout."""
  blocks = sorted({path[0] for path in flat_params if path[0].startswith('layer')})
  expected = sorted(f'layer{i + 1}_{j}' for i, n in enumerate(stage_sizes)
                    for j in range(n))
  problems = []
  if blocks != expected:
    problems.append(f'blocks {sorted(set(expected) - set(blocks))} missing, '
                    f'{sorted(set(blocks) - set(expected))} unexpected')
  has_conv3 = any(path[1] == 'conv3' for path in flat_params
                  if path[0].startswith('layer'))
  if has_conv3 != (block == 'bottleneck'):
    problems.append(f'expected {block} blocks')
  if problems:
    raise ValueError(f'State dict does not match resnet{depth}: '
                     + '; '.join(problems))


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a torch-named state dict from `.npz` or `.pth`/`.pt`.

  Args:
    path: file path. `.pth`/`.pt` needs torch (imported lazily); a checkpoint
      dict holding the weights under 'state_dict' or 'model' is unwrapped.

  Returns:
    torch key -> numpy array (torch layout).

  Raises:
    ImportError: torch missing for a `.pth`/`.pt` file.
    ValueError: unsupported extension or content.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext == '.npz':
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if ext in ('.pth', '.pt'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'Reading {path} needs PyTorch (pip install torch), or convert it to '
          '.npz with `python -m reid_jax.convert` on a machine that has torch.'
      ) from e
    obj = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj, Mapping) and wrapper in obj and isinstance(
          obj[wrapper], Mapping):
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
      raise ValueError(f'{path} does not hold a state dict (got {type(obj)}).')
    return {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, 'shape')}
  raise ValueError(f'Unsupported weights file {path!r}: expected .npz, .pth or .pt')


def merge_backbone(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                   backbone_params: Mapping[str, Any],
                   backbone_stats: Mapping[str, Any],
                   source: str = 'state dict') -> Tuple[Dict[str, Any],
                                                        Dict[str, Any]]:
  """Replaces `params['backbone']`/`batch_stats['backbone']` by converted ones.

  Args:
    params: the model's freshly initialised params (with a 'backbone' entry).
    batch_stats: the model's freshly initialised batch_stats.
    backbone_params: converted backbone params (from torch_state_dict_to_flax).
    backbone_stats: converted backbone batch_stats.
    source: name used in error messages.

  Returns:
    New (params, batch_stats); everything outside the backbone is untouched.

  Raises:
    ValueError: listing missing, unexpected and shape-mismatched variables.
  """
  new = {}
  problems = []
  for collection, model_vars, loaded in (
      ('params', params, backbone_params),
      ('batch_stats', batch_stats, backbone_stats)):
    target = traverse_util.flatten_dict(dict(model_vars['backbone']), sep='/')
    got = traverse_util.flatten_dict(dict(loaded), sep='/')
    for name, value in sorted(target.items()):
      if name not in got:
        problems.append(f'missing {collection} {name}: expected shape '
                        f'{tuple(value.shape)}, got nothing')
      elif tuple(got[name].shape) != tuple(value.shape):
        problems.append(f'shape mismatch {collection} {name}: expected shape '
                        f'{tuple(value.shape)}, got {tuple(got[name].shape)}')
    for name in sorted(set(got) - set(target)):
      problems.append(f'unexpected {collection} {name}: got shape '
                      f'{tuple(got[name].shape)}, not in the model')
    merged = {name: np.asarray(got[name], np.float32) if name in got else value
              for name, value in target.items()}
    out = dict(model_vars)
    out['backbone'] = traverse_util.unflatten_dict(merged, sep='/')
    new[collection] = out
  if problems:
    raise ValueError(f'Cannot load backbone weights from {source}:\n  '
                     + '\n  '.join(problems))
  return new['params'], new['batch_stats']


def load_pretrained(path: str, params: Mapping[str, Any],
                    batch_stats: Mapping[str, Any]) -> Tuple[Dict[str, Any],
                                                             Dict[str, Any]]:
  """Loads converted ImageNet weights into a freshly initialised ReIDModel.

  Args:
    path: `.npz` (from this module's CLI) or torchvision `.pth`/`.pt` file.
    params: the model's initialised params (neck/classifier stay as they are).
    batch_stats: the model's initialised batch_stats.

  Returns:
    (params, batch_stats) with the backbone replaced (float32 numpy arrays).

  Raises:
    ValueError: missing, unexpected or shape-mismatched backbone variables.
  """
  state_dict = read_state_dict(path)
  backbone_params, backbone_stats = torch_state_dict_to_flax(state_dict)
  return merge_backbone(params, batch_stats, backbone_params, backbone_stats,
                        source=path)


def save_npz(state_dict: Mapping[str, Any], out: str) -> int:
  """Writes a torch state dict as our `.npz` (torch names and layout, float32).

  Args:
    state_dict: torch key -> tensor/array; num_batches_tracked is dropped.
    out: output path (numpy appends `.npz` if it is missing).

  Returns:
    The number of arrays written.
  """
  arrays = {k: _to_numpy(v).astype(np.float32) for k, v in state_dict.items()
            if not k.endswith('num_batches_tracked')}
  np.savez(out, **arrays)
  return len(arrays)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI entry point: converts a torchvision `.pth` into `.npz`."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--src', required=True, help='torchvision .pth/.pt file')
  parser.add_argument('--out', required=True, help='output .npz file')
  parser.add_argument('--depth', type=int, default=None,
                      help='check the weights match resnet{depth}')
  args = parser.parse_args(argv)
  state_dict = read_state_dict(args.src)
  torch_state_dict_to_flax(state_dict, args.depth)  # validates the names
  count = save_npz(state_dict, args.out)
  print(f'Wrote {count} arrays to {args.out}')


if __name__ == '__main__':
  main()
