"""Run an exported re-ID model (`reid_jax.export`) without the training code.

  import reid_jax.inference as inference
  model = inference.load('model.jaxexport')       # or a SavedModel folder
  feats = model(images_uint8)                      # (N, H, W, 3) -> float32 (N, D)
  feats = inference.extract(model, 'some/folder')  # any image size, decoded and resized

Only JAX and numpy are imported for a `.jaxexport` model (no flax, optax, orbax or
TensorFlow); TensorFlow is imported when images must be decoded or resized, or for a
SavedModel.

Fidelity: `extract` decodes and resizes with the evaluation input path's own
functions, `input_pipeline.pipeline.decode_image` (JPEG bit-exact with PIL) and
`input_pipeline.transforms.resize` (PIL's bilinear resize: bit-exact for integer
upscaling, otherwise within 1 grey level), then rounds to uint8 (exact: the resize
returns integral values). The exported model normalises inside, so its features on
these images equal the evaluation's features of the same checkpoint.
"""

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Union

import jax
import numpy as np

FORMAT_VERSION = 1
SAVED_MODEL_METADATA = 'reid_jax_export.json'
# input_pipeline.reader_utils.IMAGE_EXTENSIONS (not imported: it pulls absl and PIL).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')

PathLike = Union[str, os.PathLike]
Images = Union[np.ndarray, PathLike, Sequence[Union[PathLike, np.ndarray]]]


def metadata_path(path: PathLike) -> str:
  """The metadata JSON of an artifact: `<file>.json`, or inside a SavedModel folder."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return os.path.join(path, SAVED_MODEL_METADATA)
  return path + '.json'


class FeatureExtractor:
  """A loaded feature extractor: uint8 images (N, H, W, 3) -> float32 features (N, D).

  Attributes:
    image_size: (H, W) the model takes.
    feature_dim: D.
    metadata: the export's JSON (empty if the file was missing).
    path: where it was loaded from.
  """

  def __init__(self, fn: Callable[[np.ndarray], Any], image_size: tuple[int, int],
               feature_dim: int, metadata: dict, path: str):
    self._fn = fn
    self.image_size = image_size
    self.feature_dim = feature_dim
    self.metadata = metadata
    self.path = path

  def __repr__(self) -> str:
    return (f'FeatureExtractor({self.path!r}, image_size={self.image_size}, '
            f'feature_dim={self.feature_dim})')

  def check_images(self, images: Any) -> np.ndarray:
    """Returns `images` as a numpy array after checking dtype and shape.

    Raises:
      ValueError: not uint8 (N, H, W, 3) at the model's size.
    """
    images = np.asarray(images)
    height, width = self.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
      raise ValueError(
          f'The model takes uint8 images of shape (N, {height}, {width}, 3), got '
          f'{images.dtype} {images.shape}. Use inference.extract for other sizes or for '
          'files.')
    return images

  def run(self, images: np.ndarray) -> Any:
    """Like `__call__` but may return a device array without waiting for it."""
    return self._fn(self.check_images(images))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Features of a batch.

    Args:
      images: uint8 (N, H, W, 3) RGB at the model's image_size.

    Returns:
      float32 (N, D).
    """
    return np.asarray(self.run(images), np.float32)


def _read_metadata(path: str) -> dict:
  meta_file = metadata_path(path)
  if not os.path.isfile(meta_file):
    return {}
  with open(meta_file) as f:
    meta = json.load(f)
  version = meta.get('format_version', 0)
  if version > FORMAT_VERSION:
    raise ValueError(f'{path} was exported with format version {version}; this '
                     f'reid_jax reads versions up to {FORMAT_VERSION}. Update reid_jax.')
  return meta


def _tf(hide_gpus: bool):
  """Imports TensorFlow; with `hide_gpus`, keeps it off the GPUs JAX uses."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if hide_gpus:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # TF already initialised its devices.
      pass
  return tf


def load(path: PathLike) -> FeatureExtractor:
  """Loads an exported model.

  Args:
    path: a `.jaxexport` file (run with JAX) or a SavedModel folder written by
      `reid_jax.export --format saved_model` (run with TensorFlow).

  Returns:
    The FeatureExtractor.

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: not an exported reid_jax model, or from a newer format version.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'No exported model at {path} (write one with '
                            'python -m reid_jax.export).')
  meta = _read_metadata(path)
  if os.path.isdir(path):
    return _load_saved_model(path, meta)
  with open(path, 'rb') as f:
    data = f.read()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path} is not a jax.export artifact ({type(e).__name__}: {e}).') from e
  in_shape, out_shape = exported.in_avals[0].shape, exported.out_avals[0].shape
  if (len(exported.in_avals) != 1 or len(in_shape) != 4 or
      not all(isinstance(d, int) for d in in_shape[1:])):
    raise ValueError(f'{path} does not take one (b, H, W, 3) image batch: inputs '
                     f'{exported.in_avals}.')
  image_size = (int(in_shape[1]), int(in_shape[2]))
  _check_metadata(meta, image_size, path)
  return FeatureExtractor(jax.jit(exported.call), image_size, int(out_shape[-1]), meta, path)


def _check_metadata(meta: dict, image_size: tuple[int, int], path: str) -> None:
  if meta and tuple(meta.get('image_size', image_size)) != image_size:
    raise ValueError(f'{metadata_path(path)} says image_size {meta["image_size"]} but the '
                     f'model takes {image_size}: the JSON belongs to another export.')


def _load_saved_model(path: str, meta: dict) -> FeatureExtractor:
  if not os.path.isfile(os.path.join(path, 'saved_model.pb')):
    raise ValueError(f'{path} is a folder but not a SavedModel (no saved_model.pb).')
  tf = _tf(hide_gpus=False)
  loaded = tf.saved_model.load(path)
  signature = loaded.signatures['serving_default']
  spec = signature.structured_input_signature[1]['images']
  image_size = (int(spec.shape[1]), int(spec.shape[2]))
  feature_dim = int(signature.structured_outputs['features'].shape[-1])
  _check_metadata(meta, image_size, path)

  def fn(images):
    return signature(images=tf.constant(images))['features'].numpy()

  fn.loaded = loaded  # keeps the SavedModel's variables alive
  return FeatureExtractor(fn, image_size, feature_dim, meta, path)


def list_images(folder: PathLike, recursive: bool = False) -> list[str]:
  """Sorted image files (IMAGE_EXTENSIONS) of a folder.

  Raises:
    FileNotFoundError: no such folder, or no image in it.
  """
  folder = os.path.abspath(os.fspath(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Image folder {folder} does not exist.')
  if recursive:
    paths = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
  else:
    paths = [e.path for e in os.scandir(folder) if e.is_file()]
  paths = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {folder}.')
  return paths


def _as_items(images: Images, recursive: bool) -> Union[np.ndarray, list]:
  """A uint8 batch array, or a list of paths (str) and single images (arrays)."""
  if isinstance(images, np.ndarray) and images.ndim == 4:
    return images
  if isinstance(images, (str, os.PathLike)):
    path = os.fspath(images)
    return list_images(path, recursive) if os.path.isdir(path) else [os.path.abspath(path)]
  if isinstance(images, np.ndarray):
    raise ValueError(f'Expected a batch of images (N, h, w, 3), got shape {images.shape}; '
                     'pass one image as image[None].')
  items = [os.path.abspath(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else x
           for x in images]
  missing = [x for x in items if isinstance(x, str) and not os.path.isfile(x)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} image files do not exist, e.g. {missing[:3]}.')
  return items


def prepare_image(image: Union[PathLike, np.ndarray], image_size: Sequence[int]
                  ) -> np.ndarray:
  """Decodes (if a path) and resizes one image as the evaluation input path does.

  Args:
    image: a file path, or a uint8 RGB array (h, w, 3).
    image_size: (H, W).

  Returns:
    uint8 (H, W, 3).
  """
  height, width = int(image_size[0]), int(image_size[1])
  if not isinstance(image, (str, os.PathLike)):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'Expected a uint8 RGB image (h, w, 3), got {image.dtype} '
                       f'{image.shape}.')
    if image.shape[:2] == (height, width):
      return image
  tf = _tf(hide_gpus=True)
  from input_pipeline import pipeline, transforms  # pylint: disable=g-import-not-at-top
  if isinstance(image, (str, os.PathLike)):
    image = pipeline.decode_image(tf.io.read_file(os.fspath(image)))
  return tf.cast(transforms.resize(image, (height, width)), tf.uint8).numpy()


def iter_batches(images: Images, image_size: Sequence[int], batch_size: int = 64, *,
                 recursive: bool = False) -> Iterator[np.ndarray]:
  """uint8 batches (n <= batch_size, H, W, 3) of images, files decoded and resized.

  A list of files goes through a parallel tf.data map (decode_image, resize); arrays of
  another size are resized one by one.

  Args:
    images: uint8 (N, h, w, 3), a folder, a file, or a sequence of files/arrays.
    image_size: (H, W).
    batch_size: images per batch.
    recursive: list sub-folders of a folder too.

  Yields:
    uint8 arrays, in the order of `images`.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  size = (int(image_size[0]), int(image_size[1]))
  items = _as_items(images, recursive)
  if isinstance(items, np.ndarray):
    if items.dtype != np.uint8 or items.shape[-1] != 3:
      raise ValueError(f'Expected uint8 RGB images (N, h, w, 3), got {items.dtype} '
                       f'{items.shape}.')
    for start in range(0, len(items), batch_size):
      chunk = items[start:start + batch_size]
      if chunk.shape[1:3] != size:
        chunk = np.stack([prepare_image(x, size) for x in chunk])
      yield chunk
  elif all(isinstance(x, str) for x in items):
    yield from _file_batches(items, size, batch_size)
  else:
    for start in range(0, len(items), batch_size):
      yield np.stack([prepare_image(x, size) for x in items[start:start + batch_size]])


def _file_batches(paths: list[str], size: tuple[int, int],
                  batch_size: int) -> Iterator[np.ndarray]:
  tf = _tf(hide_gpus=True)
  from input_pipeline import pipeline, transforms  # pylint: disable=g-import-not-at-top

  def load(path):
    image = pipeline.decode_image(tf.io.read_file(path))
    return tf.cast(transforms.resize(image, size), tf.uint8)

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  iterator = ds.as_numpy_iterator()
  for start in range(0, len(paths), batch_size):
    try:
      batch = next(iterator)
    except tf.errors.OpError as e:
      names = paths[start:start + batch_size]
      raise ValueError(f'Cannot read or decode one of {len(names)} images starting at '
                       f'{names[0]} ({e.message.splitlines()[0]}).') from None
    yield batch


def load_images(images: Images, image_size: Sequence[int], *,
                recursive: bool = False) -> np.ndarray:
  """All images decoded and resized at once: uint8 (N, H, W, 3) (small sets only)."""
  return np.concatenate(list(iter_batches(images, image_size, 256, recursive=recursive)))


def extract(model_or_path: Union[FeatureExtractor, PathLike], images_or_paths: Images,
            batch_size: int = 64, *, progress: bool = False,
            recursive: bool = False) -> np.ndarray:
  """Features of images of any size, decoded and resized as in evaluation.

  Args:
    model_or_path: a FeatureExtractor or the path of an exported model.
    images_or_paths: uint8 (N, h, w, 3), a folder, an image file, or a sequence of
      files / uint8 (h, w, 3) arrays.
    batch_size: images per model call; the last batch is padded to it, so the model
      compiles once.
    progress: show a tqdm progress bar.
    recursive: list sub-folders of a folder too.

  Returns:
    float32 (N, D), in the order of the images (a folder: sorted file names).
  """
  model = (model_or_path if isinstance(model_or_path, FeatureExtractor)
           else load(model_or_path))
  items = _as_items(images_or_paths, recursive)
  total = len(items)
  if total == 0:
    return np.zeros((0, model.feature_dim), np.float32)
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  full = min(batch_size, total)
  outputs, pending = [], None
  with tqdm.tqdm(total=total, unit='img', desc='features', disable=not progress) as bar:

    def fetch(out, n):  # host copy of the previous batch while the next one runs
      outputs.append(np.asarray(out, np.float32)[:n])
      bar.update(n)

    for batch in iter_batches(items, model.image_size, batch_size):
      n = len(batch)
      if n < full:  # pad the last batch: one compiled shape
        batch = np.concatenate([batch, np.zeros((full - n, *batch.shape[1:]), np.uint8)])
      out = model.run(batch)
      if pending is not None:
        fetch(*pending)
      pending = (out, n)
    fetch(*pending)
  return np.concatenate(outputs)
