"""Loading PyTorch weights (ImageNet backbones, BoT re-ID models) into a ReIDModel.

File layouts recognised (and logged) by `convert_state_dict` / `load_pretrained`:

  imagenet         a bare backbone: torchvision ResNet (`conv1.*`, `layer1.0.*`, ...;
                   `fc.*` is ignored), ResNet-IBN-a (the same plus `layer{i}.{j}.
                   bn1.IN.*` / `bn1.BN.*`, e.g. IBN-Net's `resnet50_ibn_a.pth`) or
                   Cadene's SENet (`layer0.*`, `layer1.0.se_module.*`, ...;
                   `last_linear.*` is ignored; `se_resnet50-ce0d4300.pth`,
                   `se_resnext50_32x4d-a260b3a4.pth`, ...);
  strong_baseline  michuanhaohao/reid-strong-baseline `modeling/baseline.py`:
                   `base.*` (the backbone), `bottleneck.*` (BNNeck BatchNorm1d) and
                   `classifier.weight` (bias-free Linear; `classifier.bias` too for
                   neck='no', which has no `bottleneck.*`).
  Either may be saved from nn.DataParallel / DistributedDataParallel (SyncBN has
  BatchNorm's names): a `module.` prefix on every key is stripped. A checkpoint dict
  wrapping the state dict under 'state_dict', 'model' or 'net' is unwrapped.
  `*.num_batches_tracked` is ignored everywhere.

Name mapping (torch key -> flax path from the model root; P = `params`,
S = `batch_stats`; conv OIHW -> HWIO, Linear (out, in) -> Dense (in, out); a BN's
weight, bias -> P scale, bias and running_mean, running_var -> S mean, var):

  [base.]conv1.*, bn1.*                 -> backbone/conv1/kernel, backbone/bn1/*
  [base.]layer{i}.{j}.conv{k}.*, bn{k}.* -> backbone/layer{i}_{j}/conv{k}, bn{k}
  [base.]layer{i}.{j}.downsample.0/1.*  -> backbone/layer{i}_{j}/downsample_conv/_bn
  [base.]layer{i}.{j}.bn1.IN.weight/bias -> P backbone/layer{i}_{j}/bn1/IN/scale, bias
  [base.]layer{i}.{j}.bn1.BN.*          -> backbone/layer{i}_{j}/bn1/BN/*  (IBN-a)
  [base.]layer0.conv{k}.*, bn{k}.*      -> backbone/conv{k}/kernel, backbone/bn{k}/*
  [base.]layer{i}.{j}.se_module.fc{k}.weight, bias -> P backbone/layer{i}_{j}/
      se_module/fc{k}/kernel (a 1x1 conv), bias  (SENet)
  bottleneck.*                          -> bottleneck/*, except bias: our BNNeck has
      none (BoT freezes it at 0); a zero one is dropped, a nonzero one is an error
      (the file's neck cannot be represented)
  classifier.weight [/ bias]            -> P classifier/kernel [/ bias]

`choice` (`PRETRAIN_CHOICES`, `config.model.pretrain_choice`):
  'imagenet'  loads the backbone only, from either layout; a file's BNNeck and
              classifier are left out with a warning (fine-tuning a re-ID backbone).
  'self'      loads the whole model (evaluate or continue a trained model). A
              classifier of another class count is left as given (the fresh init)
              with a warning naming both shapes. An ImageNet-only file is an error
              (it has no BNNeck or classifier; a 'self' run evaluated with a random
              BNNeck would be silently wrong): use 'imagenet' for it. Every other
              model variable (e.g. `gem/p`) must be in the file.
Every missing, unexpected and mis-shaped variable is listed in ONE ValueError.

Backbone families (`BACKBONE_FAMILIES`): a `BackboneFamily` supplies
`detect(keys) -> bool` (keys without `module.`/`base.`), `ignore(key) -> bool`
(e.g. the ImageNet `fc.*`) and `map_key(key) -> (collection, flax path under
'backbone', transform) | None` (transform 'conv', 'dense' or 'copy'; None = not a
key of this family, reported as unexpected). The first family that detects the keys
wins, so add a new family (defined next to its flax backbone) before 'resnet'.

Our `.npz` (CLI below) stores the torch names as found in the file (float32, torch
layout), so it is read by the same mapping and logs the same layout.

CLI: `python -m reid_jax.convert --src model.pth --out model.npz`. Training reads
a `.pth` directly when torch is installed; without torch it says to convert first.
Nothing is ever downloaded.
"""

import argparse
import dataclasses
import logging
import os
import re
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

import jax
import jax.numpy as jnp

from reid_jax import backbones
from reid_jax import models

PRETRAIN_CHOICES = ('imagenet', 'self')
LAYOUTS = ('imagenet', 'strong_baseline')
WRAPPER_KEYS = ('state_dict', 'model', 'net')
Path = Tuple[str, ...]
Mapped = Optional[Tuple[str, Path, str]]  # (collection, flax path, transform)

_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'),
              'running_var': ('batch_stats', 'var')}
_RESNET_KEY = re.compile(
    r'^(?:layer(\d+)\.(\d+)\.)?(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)$')
_HEAD_KEYS = {f'bottleneck.{leaf}': (c, ('bottleneck', name), 'copy')
              for leaf, (c, name) in _BN_LEAVES.items()} | {
                  'classifier.weight': ('params', ('classifier', 'kernel'), 'dense'),
                  'classifier.bias': ('params', ('classifier', 'bias'), 'copy')}
_TRANSFORMS = {'conv': lambda a: np.transpose(a, (2, 3, 1, 0)),
               'dense': lambda a: np.transpose(a, (1, 0)),
               'copy': lambda a: a}
_TRANSFORM_NDIM = {'conv': 4, 'dense': 2}


@dataclasses.dataclass(frozen=True)
class BackboneFamily:
  """How one backbone family's torch keys map onto its flax module (see above)."""
  name: str
  description: str
  detect: Callable[[Collection[str]], bool]
  ignore: Callable[[str], bool]
  map_key: Callable[[str], Mapped]


def resnet_map_key(key: str) -> Mapped:
  """torchvision ResNet key -> (collection, path under 'backbone', transform) or None."""
  match = _RESNET_KEY.match(key)
  if not match:
    return None
  stage, block, module, leaf = match.groups()
  module = {'downsample.0': 'downsample_conv',
            'downsample.1': 'downsample_bn'}.get(module, module)
  prefix = (f'layer{stage}_{block}',) if stage else ()
  if module.endswith('conv') or module.startswith('conv'):
    return ('params', prefix + (module, 'kernel'), 'conv') if leaf == 'weight' else None
  if leaf not in _BN_LEAVES:
    return None
  collection, name = _BN_LEAVES[leaf]
  return collection, prefix + (module, name), 'copy'


RESNET = BackboneFamily(
    name='resnet',
    description='torchvision ResNet',
    detect=lambda keys: 'conv1.weight' in keys and any(
        k.startswith('layer1.0.') for k in keys),
    ignore=lambda key: key.startswith('fc.'),
    map_key=resnet_map_key)

_IBN_KEY = re.compile(r'^layer(\d+)\.(\d+)\.bn1\.(IN|BN)\.(\w+)$')
_IN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias')}
_SE_KEY = re.compile(r'^layer(\d+)\.(\d+)\.se_module\.(fc[12])\.(weight|bias)$')


def resnet_ibn_a_map_key(key: str) -> Mapped:
  """ResNet-IBN-a key (`reid_jax.backbones.resnet_ibn_a`) -> mapping or None."""
  match = _IBN_KEY.match(key)
  if not match:
    return resnet_map_key(key)
  stage, block, norm, leaf = match.groups()
  table = _IN_LEAVES if norm == 'IN' else _BN_LEAVES
  if leaf not in table:
    return None
  collection, name = table[leaf]
  return collection, (f'layer{stage}_{block}', 'bn1', norm, name), 'copy'


def senet_map_key(key: str) -> Mapped:
  """Cadene SENet key (`reid_jax.backbones.senet`) -> mapping or None."""
  match = _SE_KEY.match(key)
  if match:
    stage, block, fc, leaf = match.groups()
    path = (f'layer{stage}_{block}', 'se_module', fc)
    if leaf == 'weight':
      return 'params', path + ('kernel',), 'conv'
    return 'params', path + ('bias',), 'copy'
  if key.startswith('layer0.'):  # the stem: conv1..3 / bn1..3 at the backbone root
    return resnet_map_key(key[len('layer0.'):])
  # Blocks only: a root-level `conv1.*` is not a SENet key.
  return resnet_map_key(key) if re.match(r'^layer[1-9]\d*\.\d+\.', key) else None


RESNET_IBN_A = BackboneFamily(
    name='resnet_ibn_a',
    description='ResNet-IBN-a',
    detect=lambda keys: 'conv1.weight' in keys and any('.bn1.IN.' in k for k in keys),
    ignore=lambda key: key.startswith('fc.'),
    map_key=resnet_ibn_a_map_key)

SENET = BackboneFamily(
    name='senet',
    description='SENet (SE-ResNet / SE-ResNeXt / SENet-154)',
    detect=lambda keys: 'layer0.conv1.weight' in keys,
    ignore=lambda key: key.startswith('last_linear.'),
    map_key=senet_map_key)

# Most specific first; the first family whose `detect` accepts the keys is used.
BACKBONE_FAMILIES: Tuple[BackboneFamily, ...] = (SENET, RESNET_IBN_A, RESNET)


@dataclasses.dataclass
class Converted:
  """A torch state dict mapped onto flax names (see `convert_state_dict`).

  Attributes:
    layout: one of LAYOUTS.
    family: the backbone family's name.
    description: what was found, in words (logged).
    variables: collection -> flat flax path from the model root -> array (flax layout).
    sources: (collection, path) -> the torch key it came from.
    unknown: torch keys that cannot be mapped -> why (with their shape).
    num_classes: rows of the file's classifier (None without one).
  """
  layout: str
  family: str
  description: str
  variables: Dict[str, Dict[Path, np.ndarray]]
  sources: Dict[Tuple[str, Path], str]
  unknown: Dict[str, str]
  num_classes: Optional[int] = None


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    value = (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def convert_state_dict(
    state_dict: Mapping[str, Any],
    families: Sequence[BackboneFamily] = BACKBONE_FAMILIES) -> Converted:
  """Detects the layout and backbone family and maps every key to flax.

  Args:
    state_dict: torch key -> tensor/array in the torch layout (unwrapped).
    families: backbone families to try, in order.

  Returns:
    The `Converted` variables; unmappable keys are collected in `unknown`.

  Raises:
    ValueError: empty state dict, or no family recognises the backbone keys.
  """
  sd = {k: v for k, v in state_dict.items()
        if not k.endswith('num_batches_tracked')}
  if not sd:
    raise ValueError('The state dict holds no weights.')
  notes = []
  if all(k.startswith('module.') for k in sd):
    sd = {k[len('module.'):]: v for k, v in sd.items()}
    notes.append("saved from nn.DataParallel/DistributedDataParallel ('module.' "
                 'prefix stripped)')
  if any(k.startswith('base.') for k in sd):
    layout = 'strong_baseline'
    backbone = {k[len('base.'):]: v for k, v in sd.items() if k.startswith('base.')}
    head = {k: v for k, v in sd.items() if not k.startswith('base.')}
  else:
    layout, backbone, head = 'imagenet', sd, {}
  family = next((f for f in families if f.detect(backbone)), None)
  if family is None:
    raise ValueError(
        f'Unrecognised {layout} backbone: no family in '
        f'{[f.name for f in families]} matches its keys (first keys: '
        f'{sorted(backbone)[:6]}). Known layouts: a torchvision-style backbone, or a '
        "reid-strong-baseline model with 'base.*', 'bottleneck.*', 'classifier.*'.")
  out = Converted(layout, family.name, '', {'params': {}, 'batch_stats': {}}, {}, {})
  prefix = 'base.' if layout == 'strong_baseline' else ''
  entries = [(prefix + k, v, family.map_key(k), ('backbone',))
             for k, v in backbone.items() if not family.ignore(k)]
  entries += [(k, v, _HEAD_KEYS.get(k), ()) for k, v in head.items()]
  for key, value, mapped, root in entries:
    array = _to_numpy(value).astype(np.float32)
    if mapped is None:
      out.unknown[key] = (f'shape {array.shape}: not part of a {layout} model with '
                          f'a {family.name} backbone')
      continue
    collection, path, transform = mapped
    if array.ndim != _TRANSFORM_NDIM.get(transform, array.ndim):
      out.unknown[key] = (f'shape {array.shape}: expected a {_TRANSFORM_NDIM[transform]}'
                          f'-D {transform} weight')
      continue
    out.variables[collection][root + path] = _TRANSFORMS[transform](array)
    out.sources[(collection, root + path)] = key
  kernel = out.variables['params'].get(('classifier', 'kernel'))
  out.num_classes = None if kernel is None else int(kernel.shape[-1])
  what = f'ImageNet {family.description} backbone'
  if layout == 'strong_baseline':
    neck = ('BNNeck' if ('bottleneck', 'scale') in out.variables['params']
            else "no neck (neck='no')")
    classes = f'classifier of {out.num_classes} classes' if kernel is not None else (
        'no classifier')
    what = f'reid-strong-baseline model ({family.description} backbone, {neck}, {classes})'
  out.description = ', '.join([what] + notes)
  return out


def torch_state_dict_to_flax(
    state_dict: Mapping[str, Any], depth: Optional[int] = None,
    backbone: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Converts a backbone state dict (either layout) into the backbone's variables.

  Args:
    state_dict: torch key -> array (numpy arrays or torch tensors), torch layout.
    depth: check the blocks match the file family's `depth`-layer model:
      resnet{depth} (18/34/50/101/152), resnet{depth}_ibn_a, se_resnet{depth} or
      se_resnext{depth} (told apart by the grouped 3x3 conv), senet154; None: any.
    backbone: check every variable and shape against this `models.MODEL_NAMES`
      backbone (e.g. 'se_resnext50'); None: no check.

  Returns:
    (params, batch_stats) of the backbone (`params['backbone']` etc. of a
    ReIDModel), float32; a head is dropped.

  Raises:
    ValueError: unknown keys, or a file that does not match `depth` / `backbone`.
  """
  converted = convert_state_dict(state_dict)
  if converted.unknown:
    raise ValueError(f'Unexpected keys in {converted.family} state dict: '
                     f'{converted.unknown}')
  trees = [traverse_util.unflatten_dict(
      {p[1:]: a for p, a in converted.variables[c].items() if p[0] == 'backbone'})
           for c in ('params', 'batch_stats')]
  if depth is not None and converted.family == RESNET.name:
    _check_depth(trees[0], depth)
  elif depth is not None:
    check_backbone(trees[0], trees[1], _name_for_depth(converted.family, trees[0], depth))
  if backbone is not None:
    check_backbone(trees[0], trees[1], backbone)
  return trees[0], trees[1]


def _name_for_depth(family: str, params: Mapping[str, Any], depth: int) -> str:
  """The `depth`-layer backbone name of a (non-torchvision) family's file."""
  if family == RESNET_IBN_A.name:
    name = f'resnet{depth}_ibn_a'
  elif 'conv3' in params:  # SENet-154's three-conv stem
    name = f'senet{depth}'
  else:
    kernel = params.get('layer1_0', {}).get('conv2', {}).get('kernel')
    grouped = kernel is not None and kernel.shape[2] != kernel.shape[3]
    name = f'se_resnext{depth}' if grouped else f'se_resnet{depth}'
  if name not in models.MODEL_NAMES:
    raise ValueError(f'Unknown depth={depth!r} for this {family} file: there is no '
                     f'{name}; allowed backbones: {", ".join(models.MODEL_NAMES)}.')
  return name


def check_backbone(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                   name: str) -> None:
  """Checks converted backbone variables against a named backbone's (shapes only).

  Args:
    params: the backbone's params (as from `torch_state_dict_to_flax`).
    batch_stats: the backbone's batch_stats.
    name: one of `models.MODEL_NAMES`.

  Raises:
    ValueError: unknown name, or every missing, unexpected and mis-shaped variable.
  """
  models._check_choice('backbone', name, models.MODEL_NAMES)  # pylint: disable=protected-access
  module = (models.resnet(name) if name in models.RESNET_SPECS
            else backbones.create(name))
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False))
  kinds = {'missing': [], 'unexpected': [], 'mis-shaped': []}
  order = lambda item: [int(t) if t.isdigit() else t  # layer3_6 before layer3_10
                        for t in re.split(r'(\d+)', item[0])]
  for c, tree in (('params', params), ('batch_stats', batch_stats)):
    want = {'/'.join(p): tuple(v.shape)
            for p, v in traverse_util.flatten_dict(dict(shapes[c])).items()}
    have = {'/'.join(p): _shape(v) for p, v in traverse_util.flatten_dict(dict(tree)).items()}
    for k, v in sorted(want.items(), key=order):
      if k not in have:
        kinds['missing'].append(f'{c} {k} {v}')
      elif have[k] != v:
        kinds['mis-shaped'].append(f'{c} {k}: expected {v}, found {have[k]}')
    kinds['unexpected'] += [f'{c} {k} {v}' for k, v in sorted(have.items(), key=order)
                            if k not in want]
  total = sum(map(len, kinds.values()))
  if total:
    lines = [f'{kind} {item}' for kind, items in kinds.items() for item in items[:8]]
    lines += [f'... {len(items) - 8} more {kind}' for kind, items in kinds.items()
              if len(items) > 8]
    raise ValueError(f'State dict does not match {name}: {total} problem(s):\n  '
                     + '\n  '.join(lines))


def _check_depth(params: Mapping[str, Any], depth: int) -> None:
  """Checks the block names and conv counts against a named ResNet layout."""
  name = f'resnet{depth}'
  if name not in models.RESNET_SPECS:
    raise ValueError(f'Unknown depth={depth!r}; allowed values: '
                     f'{", ".join(k[len("resnet"):] for k in models.RESNET_SPECS)}.')
  stage_sizes, block = models.RESNET_SPECS[name]
  blocks = {k for k in params if k.startswith('layer')}
  expected = {f'layer{i + 1}_{j}' for i, n in enumerate(stage_sizes) for j in range(n)}
  found = 'bottleneck' if any('conv3' in params[b] for b in blocks) else 'basic'
  if blocks != expected or found != block:
    raise ValueError(
        f'State dict does not match {name} ({block} blocks {stage_sizes}): blocks '
        f'{sorted(expected - blocks)} missing, {sorted(blocks - expected)} unexpected, '
        f'{found} blocks found.')


def _check_choice(choice: str) -> None:
  if choice not in PRETRAIN_CHOICES:
    raise ValueError(f'pretrain_choice={choice!r} is not one of '
                     f'{", ".join(PRETRAIN_CHOICES)}.')


def _checked_extension(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.npz', '.pth', '.pt'):
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
  arrays = {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, 'shape')}
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
  _check_choice(choice)
  ext = _checked_extension(path)
  if ext != '.npz':
    _torch_or_explain(path)


def _shape(x: Any) -> Tuple[int, ...]:
  return () if x is None else tuple(np.shape(x))


def merge_converted(converted: Converted, params: Mapping[str, Any],
                    batch_stats: Mapping[str, Any], *, choice: str = 'imagenet',
                    source: str = 'state dict') -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Puts converted variables into a model's params/batch_stats (see module doc).

  Args:
    converted: from `convert_state_dict`.
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
  _check_choice(choice)
  if choice == 'self' and converted.layout == 'imagenet':
    raise ValueError(
        f"{source} holds an {converted.description}: no BNNeck or classifier, so "
        "pretrain_choice='self' (the whole re-ID model) cannot load it. Use "
        "pretrain_choice='imagenet' to initialise the backbone from it.")

  def wanted(path: Path) -> bool:
    return choice == 'self' or path[0] == 'backbone'

  def name(c: str, path: Path) -> str:
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
  target_cls = _shape(targets['params'].get(('classifier', 'kernel')))
  file_cls = _shape(loaded['params'].get(('classifier', 'kernel')))
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
      if path not in loaded[c]:
        problems.append(f"missing {c} {'/'.join(path)}: expected shape "
                        f'{_shape(value)}, not in the file')
      elif loaded[c][path].shape != _shape(value):
        problems.append(f'mis-shaped {name(c, path)}: expected shape '
                        f'{_shape(value)}, found {loaded[c][path].shape}')
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


def _read_and_convert(path: str, families: Sequence[BackboneFamily]
                      ) -> Tuple[Dict[str, np.ndarray], Converted]:
  state_dict, container = read_state_dict(path)
  converted = convert_state_dict(state_dict, families)
  converted.description += f', {container}' if container else ''
  return state_dict, converted


def load_pretrained(path: str, params: Mapping[str, Any],
                    batch_stats: Mapping[str, Any], *, choice: str = 'imagenet',
                    families: Sequence[BackboneFamily] = BACKBONE_FAMILIES
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
  _check_choice(choice)
  _, converted = _read_and_convert(path, families)
  logging.info('%s: found %s; loading with pretrain_choice=%r.', path,
               converted.description, choice)
  return merge_converted(converted, params, batch_stats, choice=choice, source=path)


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
  state_dict, converted = _read_and_convert(args.src, BACKBONE_FAMILIES)
  print(f'{args.src}: found {converted.description}')
  if converted.unknown:
    raise SystemExit(f'Unrecognised keys (not converted): {converted.unknown}')
  if args.depth is not None or args.backbone is not None:
    torch_state_dict_to_flax(state_dict, args.depth, args.backbone)
  count = save_npz(state_dict, args.out)
  print(f'Wrote {count} arrays to {args.out}')


if __name__ == '__main__':
  main()
