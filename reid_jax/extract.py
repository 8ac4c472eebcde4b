"""Features of a folder of images with an exported model, saved as .npz.

  python -m reid_jax.extract --model model.jaxexport --images DIR --out features.npz

The .npz holds `paths` (str, sorted file names), `features` (float32 (N, D), the
exported model's: flip/feat_norm as exported), `model` (the export's metadata JSON as a
string) and, when every file name follows the Market pattern `([-\\d]+)_c(\\d)`
(e.g. 0002_c1s1_000451_03.jpg), `pids` and `camids` (int64; camids count from 0, c1
-> 0, as `input_pipeline.records`). Load it with `load_features`.
Uses only `reid_jax.inference` (no training code).
"""

import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

from input_pipeline import market
from reid_jax import inference


def parse_identities(paths: Sequence[str], pattern: str = market.MARKET_PATTERN
                     ) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(pids, camids) from file names, or None unless every name matches `pattern`.

  Args:
    paths: image paths.
    pattern: regular expression searched in the base name; group 1 the pid, group 2
      the camera number (from 1).

  Returns:
    int64 arrays (pids, camids - 1), or None.
  """
  regex = re.compile(pattern)
  pids, camids = [], []
  for path in paths:
    found = regex.search(os.path.basename(path))
    if found is None:
      return None
    pids.append(int(found.group(1)))
    camids.append(int(found.group(2)) - 1)
  return np.asarray(pids, np.int64), np.asarray(camids, np.int64)


def save_features(out: str, paths: Sequence[str], features: np.ndarray,
                  metadata: Optional[dict] = None) -> dict:
  """Writes the .npz described in the module docstring.

  Args:
    out: the .npz file.
    paths: (N,) image paths.
    features: (N, D) float32.
    metadata: the model's export metadata.

  Returns:
    The arrays written.
  """
  if len(paths) != len(features):
    raise ValueError(f'{len(paths)} paths but {len(features)} feature rows.')
  arrays = {'paths': np.asarray(list(paths), dtype=str),
            'features': np.asarray(features, np.float32),
            'model': np.asarray(json.dumps(metadata or {}, sort_keys=True))}
  identities = parse_identities(paths)
  if identities is not None:
    arrays['pids'], arrays['camids'] = identities
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **arrays)
  return arrays


def load_features(path: str) -> dict:
  """Reads a features .npz: {'paths', 'features', 'model' (dict), 'pids'?, 'camids'?}.

  Raises:
    ValueError: not a features file written by `save_features`.
  """
  with np.load(path, allow_pickle=False) as data:
    missing = {'paths', 'features'} - set(data.files)
    if missing:
      raise ValueError(f'{path} is not a features file of reid_jax.extract (missing '
                       f'{sorted(missing)}; has {data.files}).')
    out = {k: data[k] for k in data.files}
  out['model'] = json.loads(str(out['model'])) if 'model' in out else {}
  out['paths'] = [str(p) for p in out['paths']]
  return out


def extract_folder(model: Union[inference.FeatureExtractor, str], images: str, out: str,
                   batch_size: int = 64, recursive: bool = False,
                   progress: bool = True) -> dict:
  """Embeds every image of a folder (or one file) and writes the .npz.

  Args:
    model: a FeatureExtractor or an exported model's path.
    images: a folder or an image file.
    out: the .npz file.
    batch_size: images per model call.
    recursive: include sub-folders.
    progress: show a progress bar.

  Returns:
    The arrays written.
  """
  if not isinstance(model, inference.FeatureExtractor):
    model = inference.load(model)
  paths = (inference.list_images(images, recursive) if os.path.isdir(images)
           else [os.path.abspath(images)])
  feats = inference.extract(model, paths, batch_size, progress=progress)
  return save_features(out, paths, feats, model.metadata)


def main(argv: Sequence[str]) -> dict:
  """Command line (argv[0] is the program name); returns the arrays written."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string('model', None, 'Exported model (.jaxexport file or SavedModel '
                      'folder).', flag_values=fv)
  flags.DEFINE_string('images', None, 'Folder of images (or one image).', flag_values=fv)
  flags.DEFINE_string('out', None, 'Output .npz.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 64, 'Images per model call.', flag_values=fv)
  flags.DEFINE_bool('recursive', False, 'Include sub-folders.', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show a progress bar.', flag_values=fv)
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    raise SystemExit(f'reid_jax.extract: {e}') from None
  if len(rest) > 1 or not (fv.model and fv.images and fv.out):
    raise SystemExit('reid_jax.extract: usage: --model FILE --images DIR --out '
                     'features.npz [--batch_size 64] [--recursive]')
  arrays = extract_folder(fv.model, fv.images, fv.out, fv.batch_size, fv.recursive,
                          fv.progress)
  print(f'Wrote {len(arrays["paths"])} features of dimension '
        f'{arrays["features"].shape[1]} to {os.path.abspath(fv.out)}'
        f'{" (with pids/camids)" if "pids" in arrays else ""}.')
  return arrays


if __name__ == '__main__':
  main(sys.argv)
