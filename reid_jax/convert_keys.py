"""Torch key -> flax variable maps of the backbone families, and the file layouts.

`reid_jax.convert` reads, merges and loads pretrained files through this module.

File layouts recognised (and logged) by `convert_state_dict`:

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
  BatchNorm's names): a `module.` prefix on every key is stripped.
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
      none (BoT freezes it at 0); `reid_jax.convert.merge_converted` drops a zero
      one and reports a nonzero one (the file's neck cannot be represented)
  classifier.weight [/ bias]            -> P classifier/kernel [/ bias]

Backbone families (`BACKBONE_FAMILIES`): a `BackboneFamily` supplies
`detect(keys) -> bool` (keys without `module.`/`base.`), `ignore(key) -> bool`
(e.g. the ImageNet `fc.*`) and `map_key(key) -> (collection, flax path under
'backbone', transform) | None` (transform 'conv', 'dense' or 'copy'; None = not a
key of this family, reported as unexpected). The first family that detects the keys
wins, so add a new family (defined next to its flax backbone) before 'resnet'.

`torch_state_dict_to_flax` converts a backbone file on its own and checks it against
a named backbone (`check_backbone`) or depth (`python -m reid_jax.convert --depth`).
"""

import dataclasses
import re
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from reid_jax import models

LAYOUTS = ('imagenet', 'strong_baseline')
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


def shape_of(x: Any) -> Tuple[int, ...]:
  """The shape of an array-like, () for None."""
  return () if x is None else tuple(np.shape(x))


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (without importing torch) or array-like as a numpy array."""
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
    array = to_numpy(value).astype(np.float32)
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
  module = models.create_backbone(name)
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False))
  kinds = {'missing': [], 'unexpected': [], 'mis-shaped': []}
  order = lambda item: [int(t) if t.isdigit() else t  # layer3_6 before layer3_10
                        for t in re.split(r'(\d+)', item[0])]
  for c, tree in (('params', params), ('batch_stats', batch_stats)):
    want = {'/'.join(p): tuple(v.shape)
            for p, v in traverse_util.flatten_dict(dict(shapes[c])).items()}
    have = {'/'.join(p): shape_of(v) for p, v in traverse_util.flatten_dict(dict(tree)).items()}
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
