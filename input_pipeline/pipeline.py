"""tf.data input pipelines for training and evaluation, laid out per device.

Training: the sampler (`config.sampler`: 'pk' = RandomIdentitySampler, 'shuffle'
= ShuffleSampler) gives an epoch as an array (steps, global_batch) of record
indices. Each global batch is split in order over the
`process_count * num_local_devices` devices: device d (counted over all
processes, process p owning devices p*D .. p*D+D-1) gets columns
[d*b, (d+1)*b), b = global_batch / num_devices. A process only reads, decodes
and augments its own columns. With the PK sampler every device slice holds
whole identities (the sampler checks that P is a multiple of the device
count), so triplet mining per device or over the gathered batch sees K images
per identity.

Every image gets its own stateless seed from (config.seed, epoch, position in
the epoch's global batch order), so an epoch's augmentation is fully
deterministic and independent of process layout and map parallelism.

Image sources: by default a record's `path` is a file read with
`tf.io.read_file` and decoded by `decode_image` (JPEG bit-exact with PIL; PNG,
BMP, GIF's first frame). Other sources (e.g. TFDS / TFRecord examples already in memory)
plug in through `load_image(path, index) -> uint8 (h, w, 3)`, called inside the
tf.data graph with the record's path (tf.string) and its index in `records`
(tf.int64); `in_memory_loader(encoded)` builds one from a list of encoded
images.

The datasets yield tf tensors; `ds.as_numpy_iterator()` gives numpy dicts and
`prefetch_to_device` puts them on the local devices for `jax.pmap`.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import math
from typing import Any

import numpy as np
import tensorflow as tf

from input_pipeline import sampler as sampler_lib
from input_pipeline import transforms
from input_pipeline.records import Record

LoadImageFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG / PNG / BMP / GIF bytes to uint8 (h, w, 3), as PIL does.

  JPEGs use the accurate integer DCT (libjpeg's JDCT_ISLOW, what PIL uses) with
  fancy upsampling: bit-exact with PIL's decoding, whereas TF's default DCT
  differs by up to ~9 grey levels.

  Args:
    encoded: scalar tf.string of the file's bytes.

  Returns:
    uint8 tensor (h, w, 3).
  """
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(encoded, channels=3,
                                 expand_animations=False))


def _default_load_image(path: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Reads and decodes the image file at `path` (index unused)."""
  del index
  return decode_image(tf.io.read_file(path))


def in_memory_loader(encoded: Sequence[bytes]) -> LoadImageFn:
  """Returns a `load_image` hook decoding `encoded[index]` (e.g. TFDS bytes).

  Args:
    encoded: encoded images (JPEG/PNG bytes), aligned with the records.

  Returns:
    load_image(path, index) -> uint8 (h, w, 3).
  """
  table = tf.constant(list(encoded), dtype=tf.string)

  def load(path: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    del path
    return decode_image(tf.gather(table, index))

  return load


def make_sampler(records: Sequence[Record], config: Any, num_devices: int
                 ) -> sampler_lib.RandomIdentitySampler | sampler_lib.ShuffleSampler:
  """Builds the training sampler chosen by config.sampler.

  Args:
    records: training records.
    config: the experiment config (sampler, batch_size, num_instances, seed).
    num_devices: total number of devices over all processes.

  Returns:
    a RandomIdentitySampler ('pk') or ShuffleSampler ('shuffle').

  Raises:
    ValueError: for an unknown config.sampler or an invalid batch layout.
  """
  if config.sampler == 'pk':
    return sampler_lib.RandomIdentitySampler(
        [r.pid for r in records], config.batch_size, config.num_instances,
        config.seed, num_shards=num_devices)
  if config.sampler == 'shuffle':
    return sampler_lib.ShuffleSampler(
        len(records), config.batch_size, config.seed, num_shards=num_devices)
  raise ValueError(
      f"config.sampler must be 'pk' or 'shuffle', got {config.sampler!r}.")


def steps_per_epoch(records: Sequence[Record], config: Any,
                    num_devices: int) -> int:
  """Training steps per epoch: the sampler's length, capped by config.

  Args:
    records: training records.
    config: the experiment config; config.steps_per_epoch > 0 caps the result.
    num_devices: total number of devices over all processes.

  Returns:
    number of steps (global batches) per epoch.
  """
  steps = make_sampler(records, config, num_devices).steps_per_epoch
  if config.steps_per_epoch and config.steps_per_epoch > 0:
    steps = min(steps, int(config.steps_per_epoch))
  return steps


def _process_columns(global_batch: int, num_local_devices: int,
                     process_index: int, process_count: int) -> slice:
  """The columns of a global batch that belong to one process's devices."""
  num_devices = num_local_devices * process_count
  if global_batch % num_devices:
    raise ValueError(
        f'Global batch {global_batch} is not divisible by the number of '
        f'devices ({num_devices}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, '
                     f'{process_count}).')
  per_process = global_batch // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def _to_devices(batch: dict[str, tf.Tensor], num_local_devices: int
                ) -> dict[str, tf.Tensor]:
  """Reshapes every (n, ...) entry to (num_local_devices, n / D, ...)."""
  out = {}
  for key, value in batch.items():
    shape = value.shape.as_list()
    out[key] = tf.reshape(
        value, [num_local_devices, shape[0] // num_local_devices] + shape[1:])
  return out


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def create_train_dataset(records: Sequence[Record],
                         config: Any,
                         *,
                         epoch: int,
                         num_local_devices: int,
                         process_index: int = 0,
                         process_count: int = 1,
                         dtype: Any = tf.float32,
                         steps: int | None = None,
                         load_image: LoadImageFn | None = None
                         ) -> tf.data.Dataset:
  """One epoch of augmented training batches for this process's devices.

  Args:
    records: training records (pids relabelled 0..C-1).
    config: the experiment config (input.*, sampler, batch_size,
      num_instances, seed, steps_per_epoch).
    epoch: epoch number (sampling and augmentation depend on it).
    num_local_devices: devices of this process (D).
    process_index: this process.
    process_count: number of processes.
    dtype: image dtype (tf or numpy dtype, e.g. tf.bfloat16).
    steps: number of batches; default `steps_per_epoch(records, config,
      num_devices)`.
    load_image: optional hook (path, index) -> uint8 (h, w, 3); default reads
      the file at the record's path.

  Returns:
    tf.data.Dataset of `steps` elements {'image': (D, b, H, W, 3) dtype,
    'label': int32 (D, b)}, b = config.batch_size / (process_count * D).
  """
  num_devices = num_local_devices * process_count
  sampler = make_sampler(records, config, num_devices)
  if steps is None:
    steps = steps_per_epoch(records, config, num_devices)
  global_batch = config.batch_size
  cols = _process_columns(global_batch, num_local_devices, process_index,
                          process_count)
  batches = sampler.epoch_batches(epoch, num_steps=steps)  # (steps, B)
  index = batches[:, cols].reshape(-1)
  position = (np.arange(steps)[:, None] * global_batch +
              np.arange(global_batch)[None, cols]).reshape(-1)
  paths = np.asarray([r.path for r in records], dtype=object)
  labels = np.asarray([r.pid for r in records], dtype=np.int32)

  image_size = tuple(int(s) for s in config.input.image_size)
  cfg_input = config.input
  load = load_image or _default_load_image
  base_seed = tf.constant([int(config.seed), int(epoch)], tf.int64)
  tf_dtype = tf.as_dtype(dtype)

  def process(example):
    image = load(example['path'], example['index'])
    seed = tf.random.experimental.stateless_fold_in(
        base_seed, example['position'])
    image = transforms.train_transform(image, seed, cfg_input, image_size,
                                       tf_dtype)
    return {'image': image, 'label': example['label']}

  ds = tf.data.Dataset.from_tensor_slices({
      'path': tf.constant(paths[index].astype(str).tolist()
                          if index.size else [], tf.string),
      'index': tf.constant(index, tf.int64),
      'position': tf.constant(position, tf.int64),
      'label': tf.constant(labels[index], tf.int32),
  })
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(cols.stop - cols.start, drop_remainder=True)
  ds = ds.map(lambda b: _to_devices(b, num_local_devices))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


def create_eval_dataset(records: Sequence[Record],
                        config: Any,
                        *,
                        num_local_devices: int,
                        process_index: int = 0,
                        process_count: int = 1,
                        dtype: Any = tf.float32,
                        load_image: LoadImageFn | None = None
                        ) -> tf.data.Dataset:
  """Evaluation batches of `records` in order, the last one padded.

  The records are cut into global batches of config.test.batch_size in file
  order (the caller concatenates query and gallery); the last one is padded
  with zero images, mask False and index -1. Over all processes every record
  appears exactly once. Flip-averaging, if any, is the model side's business.

  Args:
    records: records to embed, in order.
    config: the experiment config (input.*, test.batch_size).
    num_local_devices: devices of this process (D).
    process_index: this process.
    process_count: number of processes.
    dtype: image dtype.
    load_image: optional hook (path, index) -> uint8 (h, w, 3).

  Returns:
    tf.data.Dataset of {'image': (D, b, H, W, 3) dtype, 'mask': bool (D, b),
    'index': int32 (D, b)} with b = config.test.batch_size /
    (process_count * D); index is the position in `records`.

  Raises:
    ValueError: if there are no records or the batch size does not split over
      the devices.
  """
  if not records:
    raise ValueError('create_eval_dataset needs at least one record.')
  global_batch = int(config.test.batch_size)
  try:
    cols = _process_columns(global_batch, num_local_devices, process_index,
                            process_count)
  except ValueError as e:
    raise ValueError(f'config.test.batch_size: {e}') from None
  n = len(records)
  num_batches = math.ceil(n / global_batch)
  index = np.full(num_batches * global_batch, -1, np.int64)
  index[:n] = np.arange(n)
  index = index.reshape(num_batches, global_batch)[:, cols].reshape(-1)
  all_paths = [r.path for r in records]
  paths = [all_paths[i] if i >= 0 else '' for i in index]

  image_size = tuple(int(s) for s in config.input.image_size)
  cfg_input = config.input
  load = load_image or _default_load_image
  tf_dtype = tf.as_dtype(dtype)

  def process(example):
    idx = example['index']

    def real():
      image = load(example['path'], idx)
      return transforms.eval_transform(image, image_size, cfg_input, tf_dtype)

    def pad():
      return tf.zeros(image_size + (3,), tf_dtype)

    image = tf.cond(idx >= 0, real, pad)
    return {'image': tf.ensure_shape(image, image_size + (3,)),
            'mask': idx >= 0,
            'index': tf.cast(idx, tf.int32)}

  ds = tf.data.Dataset.from_tensor_slices({
      'path': tf.constant(paths, tf.string),
      'index': tf.constant(index, tf.int64),
  })
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(cols.stop - cols.start, drop_remainder=True)
  ds = ds.map(lambda b: _to_devices(b, num_local_devices))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


def prefetch_to_device(iterator: Iterable[Any] | tf.data.Dataset, size: int = 2,
                       devices: Sequence[Any] | None = None) -> Iterator[Any]:
  """Puts batches on the local devices ahead of use (for jax.pmap).

  Uses flax.jax_utils.prefetch_to_device (each leaf's leading axis, of length
  len(devices), is sharded over the devices).

  Args:
    iterator: iterable of pytrees of arrays shaped (D, ...) (numpy arrays or
      tf tensors, e.g. `iter(dataset)`), or a tf.data.Dataset.
    size: number of batches kept on the devices.
    devices: target devices; default jax.local_devices() in pmap order.

  Returns:
    iterator of pytrees of device-sharded jax.Arrays.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  if isinstance(iterator, tf.data.Dataset):
    iterator = iterator.as_numpy_iterator()

  def as_numpy(x):
    return x.numpy() if isinstance(x, tf.Tensor) else x

  numpy_batches = (jax.tree_util.tree_map(as_numpy, b) for b in iterator)
  return jax_utils.prefetch_to_device(numpy_batches, size, devices=devices)
