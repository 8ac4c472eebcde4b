"""Export a trained model's feature extractor for inference outside the training code.

  python -m reid_jax.export --workdir DIR --out model.jaxexport
  python -m reid_jax.export --checkpoint DIR/checkpoints/12000 --config configs/market.py \
      --out model.jaxexport
  python -m reid_jax.export --workdir DIR --format saved_model --out model_savedmodel

The exported function maps uint8 images (b, H, W, 3) at the training size
(config.input.image_size) to float32 test features (b, D): inside it the images are
normalised ((x / 255 - pixel_mean) / pixel_std in float32, then the compute dtype),
the model runs in eval mode (running BN statistics) and returns the feature chosen
by config.model.neck_feat; with config.test.flip the feature of the mirrored image
is averaged in, with config.test.feat_norm the result is L2-normalised (as
`train_step.eval_step` and `scoring.score`). The classifier is left out. The batch
size b is symbolic (`jax.export.symbolic_shape`), so one artifact serves any batch.

Formats:
  * 'jaxexport' (default): `jax.export` serialized StableHLO with the weights
    embedded as constants, lowered for several platforms (cpu, cuda, rocm, tpu by
    default). `reid_jax.inference.load` runs it with JAX alone.
  * 'saved_model': a TensorFlow SavedModel through `jax2tf` (weights as
    tf.Variables, signature 'serving_default': images uint8 (None, H, W, 3) ->
    {'features': float32 (None, D)}), for serving where only TensorFlow exists.

A JSON file beside the artifact (`inference.metadata_path`) records the input size,
mean/std, feature dimension, flip/feat_norm, the checkpoint and step, the full config
and the format version.

Settings of the config can be changed at export time with absl-style overrides, e.g.
`--config.test.flip=True` (with --config) or `--set test.flip=True` (any source).
"""

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eval import distance as distance_lib
from reid_jax import checkpoint as checkpoint_lib
from reid_jax import inference
from reid_jax import models

FORMATS = ('jaxexport', 'saved_model')
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
CONFIG_JSON = 'config.json'
_CENTER_KEY = 'center'  # train_step.CENTER_KEY (not imported: no optax here).


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """Reads a config written with `config.to_json()` (e.g. WORKDIR/config.json).

  Args:
    path: the JSON file.

  Returns:
    The ConfigDict (lists where the original had tuples).
  """
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def find_config_json(path: str) -> Optional[str]:
  """The `config.json` of the workdir holding `path` (a workdir or checkpoint path).

  Args:
    path: a workdir, its checkpoints folder, or a step folder.

  Returns:
    The first `config.json` in `path` or up to two folders above it, else None.
  """
  folder = os.path.abspath(path)
  for _ in range(3):
    candidate = os.path.join(folder, CONFIG_JSON)
    if os.path.isfile(candidate):
      return candidate
    folder = os.path.dirname(folder)
  return None


def _resolve_checkpoint(path: str) -> tuple[str, Optional[int]]:
  """(checkpoints folder, step or None for the latest) of a path, as restore_from_path."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Checkpoint path {path} does not exist.')
  for folder in (path, checkpoint_lib.checkpoint_dir(path)):
    if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
      return folder, None
  parent, name = os.path.split(path.rstrip('/'))
  if name.isdigit() and os.path.isdir(path):
    return parent, int(name)
  raise FileNotFoundError(
      f'No checkpoint found at {path}: expected a workdir, its checkpoints folder or a '
      'step folder written by reid_jax (<workdir>/checkpoints/<step>).')


def load_checkpoint(path: str) -> tuple[dict, int, str]:
  """Reads the model variables of a reid_jax checkpoint, without building a TrainState.

  The checkpoint is restored read-only with `checkpoint.restore` (format marker and
  damaged-file checks) into a template of its own saved tree, so no optimizer or
  model code is needed to read it.

  Args:
    path: a workdir, a checkpoints folder (`<workdir>/checkpoints`, or
      `<workdir>/checkpoints/best`) or a step folder; the latest step is used
      unless a step folder is given.

  Returns:
    ({'params': ..., 'batch_stats': ...} as numpy arrays (center-loss centers
    dropped), step, the step folder's path).

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    checkpoint.NotAReidCheckpointError, CheckpointCorruptError: see `checkpoint.restore`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  folder, step = _resolve_checkpoint(path)
  manager = checkpoint_lib.CheckpointManager(
      folder, ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint step in {folder}.')
  source = os.path.join(folder, str(step))
  try:
    tree = manager.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint_lib.CheckpointCorruptError(
        f'Cannot read the contents of checkpoint {source}: {type(e).__name__}: {e}') from e
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, dict) or 'params' not in tree:
    raise checkpoint_lib.NotAReidCheckpointError(
        f'{source} holds no model params: not a reid_jax checkpoint.')
  template = jax.tree.map(
      lambda m: np.zeros(m.shape, m.dtype) if hasattr(m, 'shape') else m, tree)
  restored = checkpoint_lib.restore(manager, template, step=step)
  params = {k: v for k, v in restored['params'].items() if k != _CENTER_KEY}
  variables = jax.tree.map(np.asarray, {'params': params,
                                        'batch_stats': restored.get('batch_stats') or {}})
  return variables, step, source


def num_classes_of(variables: dict) -> int:
  """The number of training identities: the classifier kernel's output size."""
  try:
    return int(np.shape(variables['params']['classifier']['kernel'])[-1])
  except KeyError:
    raise checkpoint_lib.CheckpointMismatchError(
        'The checkpoint has no params/classifier/kernel: not a reid_jax ReIDModel '
        'checkpoint.') from None


def check_variables(model: models.ReIDModel, variables: dict, image_size: Sequence[int],
                    source: str) -> None:
  """Raises CheckpointMismatchError naming every array that differs from the model's.

  Args:
    model: the model built from the config.
    variables: {'params', 'batch_stats'} from the checkpoint.
    image_size: (H, W).
    source: the checkpoint's path, for the message.
  """
  dummy = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  want = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
  flat = lambda t: {'/'.join(str(getattr(k, 'key', k)) for k in p): np.shape(v)
                    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  want = flat({k: want[k] for k in ('params', 'batch_stats') if k in want})
  got = flat(variables)
  problems = [f'  missing in checkpoint: {k} {want[k]}' for k in sorted(set(want) - set(got))]
  problems += [f'  not in the model: {k} {got[k]}' for k in sorted(set(got) - set(want))]
  problems += [f'  {k}: checkpoint {got[k]}, model {want[k]}'
               for k in sorted(set(want) & set(got)) if want[k] != got[k]]
  if problems:
    raise checkpoint_lib.CheckpointMismatchError(
        f'Checkpoint {source} does not match the model of the config '
        f'({len(problems)} differences; another config.model?):\n' + '\n'.join(problems[:20]))


def make_feature_fn(model: models.ReIDModel, config: ml_collections.ConfigDict
                    ) -> Callable[[dict, jax.Array], jax.Array]:
  """The test-feature function of the evaluation path, on uint8 images.

  Same computation as the evaluation: `transforms.normalize` ((x / 255 - mean) / std,
  float32), cast to the model's dtype, `train_step.eval_step` (neck_feat of the
  model, flip test) and `scoring.score`'s L2 normalisation (`eval.distance.l2_normalize`,
  torch's F.normalize).

  Args:
    model: the model (without bn_axis_name).
    config: the config (input.pixel_mean/std, test.flip, test.feat_norm).

  Returns:
    fn(variables, images uint8 (b, H, W, 3)) -> float32 (b, D).
  """
  mean = np.asarray(config.input.pixel_mean, np.float32)
  std = np.asarray(config.input.pixel_std, np.float32)
  flip = bool(config.test.flip)
  feat_norm = bool(config.test.feat_norm)

  def fn(variables, images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    x = x.astype(model.dtype)
    feats = model.apply(variables, x, train=False).astype(jnp.float32)
    if flip:
      mirrored = model.apply(variables, x[:, :, ::-1, :], train=False)
      feats = 0.5 * (feats + mirrored.astype(jnp.float32))
    if feat_norm:
      feats = distance_lib.l2_normalize(feats, axis=1)
    return feats

  return fn


def _metadata(config, model, fmt, dtype, platforms, fingerprint, source, step):
  height, width = (int(s) for s in config.input.image_size)
  return {
      'format': fmt,
      'format_version': inference.FORMAT_VERSION,
      'image_size': [height, width],
      'input_dtype': 'uint8',
      'pixel_mean': [float(v) for v in config.input.pixel_mean],
      'pixel_std': [float(v) for v in config.input.pixel_std],
      'feature_dim': int(model.feature_dim),
      'compute_dtype': jnp.dtype(dtype).name,
      'neck_feat': config.model.neck_feat if config.model.neck == 'bnneck' else 'before',
      'flip': bool(config.test.flip),
      'feat_norm': bool(config.test.feat_norm),
      'num_classes': int(model.num_classes),
      'platforms': list(platforms),
      'fingerprint': fingerprint,
      'checkpoint': source,
      'step': step,
      'jax_version': jax.__version__,
      'config': json.loads(config.to_json_best_effort()),
  }


def export_model(config: ml_collections.ConfigDict, variables: dict, out: str, *,
                 fmt: str = 'jaxexport', dtype: Any = jnp.float32,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 source: str = '', step: Optional[int] = None) -> dict:
  """Writes the feature extractor of `variables` and its metadata JSON.

  Args:
    config: the run's config.
    variables: {'params', 'batch_stats'} (classifier included; it is not exported).
    out: the `.jaxexport` file, or the SavedModel folder.
    fmt: 'jaxexport' or 'saved_model'.
    dtype: compute dtype of the backbone (float32 default; bfloat16/float16 halve
      the work on accelerators at some precision cost).
    platforms: platforms the StableHLO is lowered for ('cpu', 'cuda', 'rocm', 'tpu').
    source: the checkpoint's path, recorded in the metadata.
    step: the checkpoint's step, recorded in the metadata.

  Returns:
    The metadata written beside the artifact.

  Raises:
    ValueError: unknown format.
    checkpoint.CheckpointMismatchError: `variables` do not fit config.model.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown export format {fmt!r}; expected one of {FORMATS}.')
  image_size = tuple(int(s) for s in config.input.image_size)
  model = models.create_model(config.model, num_classes_of(variables), dtype=dtype,
                              conv_input_barrier=False)
  check_variables(model, variables, image_size, source or '(given variables)')
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  fn = make_feature_fn(model, config)
  shape = jax.export.symbolic_shape(f'b, {image_size[0]}, {image_size[1]}, 3')
  exported = jax.export.export(jax.jit(lambda x: fn(variables, x)), platforms=platforms)(
      jax.ShapeDtypeStruct(shape, jnp.uint8))
  serialized = exported.serialize()
  fingerprint = hashlib.sha256(serialized).hexdigest()
  meta = _metadata(config, model, fmt, dtype, platforms, fingerprint, source, step)
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  if fmt == 'jaxexport':
    with open(out, 'wb') as f:
      f.write(serialized)
  else:
    _save_tf(fn, variables, image_size, platforms, out)
  with open(inference.metadata_path(out), 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return meta


def _save_tf(fn, variables, image_size, platforms, out):
  """Writes `fn` as a TF SavedModel with a polymorphic batch (jax2tf)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  height, width = image_size
  tf_fn = jax2tf.convert(fn, polymorphic_shapes=[None, f'(b, {height}, {width}, 3)'],
                         with_gradient=False,
                         native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.model_variables = tf.nest.map_structure(
      lambda a: tf.Variable(np.asarray(a), trainable=False), variables)

  @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8,
                                              name='images')], autograph=False)
  def serve(images):
    return {'features': tf_fn(module.model_variables, images)}

  module.serve = serve
  tf.saved_model.save(module, out, signatures={'serving_default': serve})


def _parse_value(text: str) -> Any:
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' overrides (values parsed as Python literals) to a copy.

  Args:
    config: the config.
    overrides: e.g. ['test.flip=True', 'model.neck_feat=before'].

  Returns:
    The changed copy.

  Raises:
    ValueError: an override is not 'key=value', names no existing field, or has a
      value of the wrong type.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'--set expects key=value (e.g. test.flip=True), got {item!r}.')
    try:
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf]  # pylint: disable=pointless-statement
    except (KeyError, AttributeError):
      raise ValueError(f'--set {item!r}: the config has no field {key!r}.') from None
    try:
      node[leaf] = _parse_value(text)
    except TypeError as e:
      raise ValueError(f'--set {item!r}: {e}') from None
  return config


def main(argv: Sequence[str]) -> dict:
  """Command line (argv[0] is the program name); returns the metadata written."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/ and config.json).',
                      flag_values=fv)
  flags.DEFINE_string('checkpoint', None, 'A checkpoint path (step folder, checkpoints '
                      'folder or workdir) instead of --workdir.', flag_values=fv)
  config_flags.DEFINE_config_file('config', None, 'Config file (needed when the workdir '
                                  'has no config.json).', flag_values=fv, lock_config=False,
                                  sys_argv=list(argv))
  flags.DEFINE_string('out', None, 'Output .jaxexport file or SavedModel folder.',
                      flag_values=fv)
  flags.DEFINE_enum('format', 'jaxexport', FORMATS, 'Artifact format.', flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16', 'float16'),
                    'Compute dtype of the exported model.', flag_values=fv)
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS), 'Platforms to lower for.',
                    flag_values=fv)
  flags.DEFINE_multi_string('set', [], 'Config override key=value, e.g. test.flip=True.',
                            flag_values=fv)
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    raise SystemExit(f'reid_jax.export: {e}') from None
  if len(rest) > 1:
    raise SystemExit(f'reid_jax.export: unexpected arguments {rest[1:]}')
  if not fv.out or bool(fv.workdir) == bool(fv.checkpoint):
    raise SystemExit('reid_jax.export: give --out and exactly one of --workdir or '
                     '--checkpoint.')
  ckpt = fv.workdir or fv.checkpoint
  config = fv.config
  if config is None:
    json_path = find_config_json(ckpt)
    if json_path is None:
      raise SystemExit(f'reid_jax.export: no {CONFIG_JSON} found for {ckpt}; pass '
                       '--config=configs/<the run>.py.')
    config = load_config_json(json_path)
  config = apply_overrides(config, fv.set)
  variables, step, source = load_checkpoint(ckpt)
  meta = export_model(config, variables, fv.out, fmt=fv.format, dtype=jnp.dtype(fv.dtype),
                      platforms=fv.platforms, source=source, step=step)
  print(f'Exported step {step} of {source} to {os.path.abspath(fv.out)} ({fv.format}; '
        f'input uint8 (b, {meta["image_size"][0]}, {meta["image_size"][1]}, 3), '
        f'features float32 (b, {meta["feature_dim"]}); flip={meta["flip"]}, '
        f'feat_norm={meta["feat_norm"]}).')
  return meta


if __name__ == '__main__':
  main(sys.argv)
