"""Host input pipelines: uint8 training and evaluation batches, laid out per device.

The host reads, decodes (`decode_image`, bit-exact with PIL) and resizes to the
training size (`transforms.resize`, PIL's bilinear values) and ships uint8;
flip, pad, crop, normalisation and erasing run on the devices
(`input_pipeline.device_augment`). Nothing else runs per image on the host.

Training (`create_train_stream`): ONE stream for the whole run. Global step s
belongs to epoch s // steps_per_epoch, at step s % steps_per_epoch of that
epoch; the sampler (`config.sampler`: 'pk' = RandomIdentitySampler, 'shuffle' =
ShuffleSampler) gives an epoch as an array (steps, global_batch) of record
indices, a pure function of (config.seed, epoch). Each global batch is split
in order over the `process_count * num_local_devices` devices: device d
(counted over all processes, process p owning devices p*D .. p*D+D-1) gets
columns [d*b, (d+1)*b), b = global_batch / num_devices. A process only reads
and decodes its own columns (with the device cache it decodes every image once, for
its own devices, and then reads nothing). With the PK sampler every device slice
holds whole identities. Every image carries (epoch, position): position =
step_in_epoch * global_batch + column, from which the device derives its augmentation key
(`device_augment.image_keys`), so augmentation does not depend on the layout.

How the stream is built:
  * Index plan (`_Planner`): one epoch's (steps, n) index, label, epoch and
    position arrays at a time, n = this process's columns; tf.data prefetches
    it, so the sampler of the next epoch runs (in a tf.data thread) while the
    current one is consumed and epoch boundaries cost nothing. A resumed
    stream starts the plan at its first unseen batch: skipped batches are
    never read.
  * Decoding: a parallel, deterministic tf.data map reads, decodes and resizes
    the images of a step (`tf.map_fn` over the step's indices), uint8.
  * Cache (`config.input.cache`, chosen by `input_pipeline.cache`): 'host': the plan
    marks the first occurrence of every image in the stream; only those are
    decoded, written into one uint8 (N, H, W, 3) array, and every batch is a
    gather from that array (`np.take`), so from the second epoch the host's
    work per image is a memory copy, into reused 64-byte aligned buffers
    (`prefetch.HostBuffers`: no page faults, and CPU devices use them in place).
    'device': the images are decoded once into a cache on the devices
    (`input_pipeline.device_cache`), and the stream carries no images at all, only
    the plan ('index', 'label', 'epoch', 'position').

Image sources (`input_pipeline.decode`): by default a record's `path` is a file read
and decoded by `decode_image` (JPEG bit-exact with PIL); other sources (e.g. TFDS
shards' bytes, `in_memory_loader`) plug in as `load_image(path, index)`.

`prefetch_to_device` (from `input_pipeline.prefetch`) moves host batches onto
the local devices in a background thread, ahead of the step; the training loop
sends only the stream's `device_keys` (`TRAIN_DEVICE_KEYS`: 'index' stays on the host;
with a device cache `DEVICE_CACHE_KEYS`: the indices go, no images).
"""

from collections.abc import Callable, Sequence
import logging
import math
from typing import Any

import numpy as np
import tensorflow as tf

from input_pipeline import cache as cache_lib
from input_pipeline import decode
from input_pipeline import sampler as sampler_lib
from input_pipeline import transforms
from input_pipeline.choices import check_choice
# Re-exported: the image readers (`input_pipeline.decode`) and the device prefetch
# (`input_pipeline.prefetch`) are used through this module by the loop and the tools.
from input_pipeline.decode import decode_image  # pylint: disable=unused-import
from input_pipeline.decode import in_memory_loader  # pylint: disable=unused-import
from input_pipeline.decode import LoadImageFn
from input_pipeline.prefetch import HostBuffers
from input_pipeline.prefetch import prefetch_to_device  # pylint: disable=unused-import
from input_pipeline.records import Record

# config.sampler: 'pk' = RandomIdentitySampler (P x K), 'shuffle' = ShuffleSampler.
SAMPLERS = ('pk', 'shuffle')


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
  check_choice('config.sampler', config.sampler, SAMPLERS)
  if config.sampler == 'pk':
    return sampler_lib.RandomIdentitySampler(
        [r.pid for r in records], config.batch_size, config.num_instances,
        config.seed, num_shards=num_devices)
  return sampler_lib.ShuffleSampler(
      len(records), config.batch_size, config.seed, num_shards=num_devices)


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
  if num_local_devices < 1 or process_count < 1:
    raise ValueError(f'num_local_devices ({num_local_devices}) and process_count '
                     f'({process_count}) must be >= 1.')
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


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  return options


class _Planner:
  """This process's plan of one epoch, called in epoch order by tf.data.

  For epoch e it returns (steps_e, n) arrays index (int64), label, epoch,
  position (int32) of the global steps of [start_step, stop_step) in that
  epoch, n = this process's columns; when caching, also 'new' (int64
  (steps_e, n), -1 padded: the images first seen in the stream at that step,
  in order of first appearance) and 'num_new' (int64 (steps_e,)).
  """

  def __init__(self, sampler: Any, labels: np.ndarray, cols: slice,
               global_batch: int, num_steps_per_epoch: int, start_step: int,
               stop_step: int, cached: bool):
    self._sampler = sampler
    self._labels = labels
    self._cols = cols
    self._col_ids = np.arange(global_batch)[cols]
    self._global_batch = global_batch
    self._spe = num_steps_per_epoch
    self._start, self._stop = start_step, stop_step
    self._cached = cached
    self._seen = np.zeros(len(labels), bool)
    self.keys = ('index', 'label', 'epoch', 'position') + (
        ('new', 'num_new') if cached else ())
    self.dtypes = (tf.int64, tf.int32, tf.int32, tf.int32) + (
        (tf.int64, tf.int64) if cached else ())

  @property
  def epochs(self) -> range:
    """The epochs the steps [start_step, stop_step) touch."""
    if self._stop <= self._start:
      return range(0)
    return range(self._start // self._spe, (self._stop - 1) // self._spe + 1)

  def __call__(self, epoch: np.ndarray) -> tuple[np.ndarray, ...]:
    epoch = int(epoch)
    if epoch == self.epochs.start:  # a new pass over the stream
      self._seen[:] = False
    lo = max(self._start - epoch * self._spe, 0)
    hi = min(self._stop - epoch * self._spe, self._spe)
    batches = self._sampler.epoch_batches(epoch, num_steps=self._spe)
    index = np.ascontiguousarray(batches[lo:hi, self._cols])  # (steps_e, n)
    position = (np.arange(lo, hi)[:, None] * self._global_batch
                + self._col_ids[None, :])
    out = (index, self._labels[index], np.full(index.shape, epoch, np.int32),
           position.astype(np.int32))
    if not self._cached:
      return out
    n = index.shape[1]
    uniq, first = np.unique(index.reshape(-1), return_index=True)
    fresh = ~self._seen[uniq]
    uniq, first = uniq[fresh], first[fresh]
    self._seen[uniq] = True
    order = np.argsort(first, kind='stable')
    uniq, step_of = uniq[order], first[order] // n
    num_new = np.bincount(step_of, minlength=hi - lo)
    starts = np.cumsum(num_new) - num_new
    new = np.full(index.shape, -1, np.int64)
    new[step_of, np.arange(uniq.size) - starts[step_of]] = uniq
    return out + (new, num_new.astype(np.int64))

  def dataset(self) -> tf.data.Dataset:
    """Per-step plan elements; the next epoch is planned one epoch ahead.

    `tf.numpy_function` rather than `from_generator`: TF's generator dataset
    sets glibc's M_TRIM_THRESHOLD, which freezes the mmap threshold and makes
    every large numpy allocation of the process (a cached batch gather) fault
    in fresh pages, ~8x slower.
    """
    n = self._col_ids.size

    def plan(epoch: tf.Tensor) -> dict[str, tf.Tensor]:
      arrays = tf.numpy_function(self, [epoch], list(self.dtypes), stateful=True)
      out = {}
      for key, value in zip(self.keys, arrays):
        value.set_shape((None,) if key == 'num_new' else (None, n))
        out[key] = value
      return out

    epochs = tf.data.Dataset.range(self.epochs.start, self.epochs.stop)
    # Sequential (stateful) map; prefetch(1): one epoch planned ahead.
    return epochs.map(plan).prefetch(1).unbatch()


# The entries of a training batch that the train step reads (what goes to the devices);
# 'index' (each image's record index) stays on the host, for tests and error reports...
TRAIN_DEVICE_KEYS = ('image', 'label', 'epoch', 'position')
# ... except with a device cache, whose batches carry no images: the step reads them
# from the cache by 'index'.
DEVICE_CACHE_KEYS = ('index',) + TRAIN_DEVICE_KEYS[1:]


class TrainStream:
  """Iterator of training batches for this process (see `create_train_stream`).

  Attributes:
    cache: the `cache.CacheChoice` ('host', 'device' or 'none', its size in bytes).
    num_steps: number of batches the stream yields.
    device_keys: the entries of a batch the train step reads (`TRAIN_DEVICE_KEYS`, or
      `DEVICE_CACHE_KEYS` with a device cache, whose batches carry no 'image').
  """

  def __init__(self, dataset: tf.data.Dataset, cache: cache_lib.CacheChoice,
               num_records: int, image_size: tuple[int, int],
               num_local_devices: int, num_steps: int):
    self.cache = cache
    self.num_steps = num_steps
    self.device_keys = DEVICE_CACHE_KEYS if cache.mode == 'device' else TRAIN_DEVICE_KEYS
    self._iterator = dataset.as_numpy_iterator()
    self._devices = num_local_devices
    self._array = (np.empty((num_records,) + image_size + (3,), np.uint8)
                   if cache.mode == 'host' else None)
    self._buffers = HostBuffers()

  def __iter__(self) -> 'TrainStream':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step = next(self._iterator)
    layout = lambda x: x.reshape((self._devices, -1) + x.shape[1:])
    index = layout(step['index'])
    if 'image' not in step:  # device cache: the images are on the devices
      return {k: index.astype(np.int32) if k == 'index' else layout(step[k])
              for k in DEVICE_CACHE_KEYS}
    if self._array is None:
      image = layout(step['image'])
    else:
      num_new = int(step['num_new'])
      if num_new:
        self._array[step['new'][:num_new]] = step['image']
      # Into a buffer nothing else refers to (the devices may still read earlier
      # batches), 64-byte aligned so that CPU devices use it in place; mode='clip'
      # (the indices are valid) keeps np.take from buffering its output.
      image = self._buffers.empty(index.shape + self._array.shape[1:], np.uint8)
      np.take(self._array, index, axis=0, out=image, mode='clip')
    return {'image': image, 'label': layout(step['label']),
            'epoch': layout(step['epoch']), 'position': layout(step['position']),
            'index': index.astype(np.int32)}


def resized_image_fn(records: Sequence[Record], image_size: Sequence[int],
                     load_image: LoadImageFn | None = None
                     ) -> Callable[[tf.Tensor], tf.Tensor]:
  """index -> the record's image read, decoded and resized: uint8 (H, W, 3), in tf.

  Args:
    records: the records the index points into.
    image_size: (H, W).
    load_image: optional hook (path, index) -> uint8 (h, w, 3); default reads the
      file at the record's path (`decode.load_image_file`).

  Returns:
    a function of an int64 scalar tensor, for tf.data maps.
  """
  paths = tf.constant([r.path for r in records], tf.string)
  size = tuple(int(s) for s in image_size)
  load = load_image or decode.load_image_file

  def load_one(index: tf.Tensor) -> tf.Tensor:
    return tf.ensure_shape(
        transforms.resize(load(tf.gather(paths, index), index), size), size + (3,))

  return load_one


def create_train_stream(records: Sequence[Record],
                        config: Any,
                        *,
                        steps_per_epoch: int,  # pylint: disable=redefined-outer-name
                        start_step: int,
                        num_steps: int,
                        num_local_devices: int,
                        process_index: int = 0,
                        process_count: int = 1,
                        load_image: LoadImageFn | None = None,
                        cache: str | None = None) -> TrainStream:
  """The training batches of global steps start_step .. start_step+num_steps-1.

  Sampling per epoch is `make_sampler(...).epoch_batches(epoch,
  num_steps=steps_per_epoch)`; epoch = step // steps_per_epoch. See the module
  docstring for the layout, the index plan and the cache.

  Args:
    records: training records (pids relabelled 0..C-1).
    config: the experiment config (input.image_size, input.cache,
      input.cache_max_gb, sampler, batch_size, num_instances, seed).
    steps_per_epoch: steps per epoch (see the function `steps_per_epoch`).
    start_step: first global step (a resumed run: its first unseen batch).
    num_steps: number of batches to yield (crossing epochs).
    num_local_devices: devices of this process (D).
    process_index: this process.
    process_count: number of processes.
    load_image: optional hook (path, index) -> uint8 (h, w, 3); default reads
      the file at the record's path.
    cache: one of `cache.CACHE_MODES`; None: config.input.cache.

  Returns:
    a TrainStream (an iterator) of dicts {'image': uint8 (D, b, H, W, 3),
    'label', 'epoch', 'position', 'index': int32 (D, b)} ('index': the record
    index), b = config.batch_size / (process_count * D); with a device cache
    there is no 'image' (the caller fills the cache: `device_cache`). `.cache`
    says which cache is used and its size, `.device_keys` what goes to the devices.

  Raises:
    ValueError: for an invalid step range, cache mode, sampler or layout.
  """
  if steps_per_epoch < 1 or start_step < 0 or num_steps < 0:
    raise ValueError(f'Need steps_per_epoch >= 1, start_step >= 0 and num_steps >= 0, '
                     f'got {steps_per_epoch}, {start_step}, {num_steps}.')
  if not records:
    raise ValueError('create_train_stream needs at least one record.')
  global_batch = int(config.batch_size)
  cols = _process_columns(global_batch, num_local_devices, process_index,
                          process_count)
  sampler = make_sampler(records, config, num_local_devices * process_count)
  image_size = tuple(int(s) for s in config.input.image_size)
  choice = cache_lib.choose_cache_for(config, len(records), num_local_devices, cache)
  logging.info('Training input: %s.', choice.reason)
  cached = choice.mode == 'host'
  labels = np.asarray([r.pid for r in records], np.int32)
  planner = _Planner(sampler, labels, cols, global_batch, steps_per_epoch,
                     start_step, start_step + num_steps, cached)
  plans = planner.dataset()
  if choice.mode == 'device':  # nothing to read: the images are on the devices
    return TrainStream(plans.prefetch(tf.data.AUTOTUNE).with_options(_options()), choice,
                       len(records), image_size, num_local_devices, num_steps)
  load_one = resized_image_fn(records, image_size, load_image)

  def decode_step(step: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    to_read = step['new'][:step['num_new']] if cached else step['index']
    step = dict(step)
    step['image'] = tf.cond(  # cached steady state: nothing to read, no loop
        tf.size(to_read) > 0,
        lambda: tf.map_fn(load_one, to_read, fn_output_signature=tf.TensorSpec(
            image_size + (3,), tf.uint8)),
        lambda: tf.zeros((0,) + image_size + (3,), tf.uint8))
    return step

  ds = plans.map(decode_step, num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return TrainStream(ds, choice, len(records), image_size, num_local_devices,
                     num_steps)


def create_image_chunks(records: Sequence[Record], image_size: Sequence[int], *,
                        chunk_size: int,
                        load_image: LoadImageFn | None = None) -> tf.data.Dataset:
  """Every record's image, read, decoded and resized, in record order, in chunks.

  What fills the device cache (`device_cache.fill_device_cache`); a parallel,
  deterministic tf.data map.

  Args:
    records: the records.
    image_size: (H, W).
    chunk_size: images per chunk (the last one may hold fewer).
    load_image: optional hook (path, index) -> uint8 (h, w, 3).

  Returns:
    tf.data.Dataset of uint8 (c, H, W, 3): records [i * chunk_size, ...) in chunk i.

  Raises:
    ValueError: for no records or chunk_size < 1.
  """
  if not records or chunk_size < 1:
    raise ValueError(f'create_image_chunks needs records and chunk_size >= 1, got '
                     f'{len(records)} records and chunk_size {chunk_size}.')
  load_one = resized_image_fn(records, image_size, load_image)
  ds = tf.data.Dataset.range(len(records)).map(
      load_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(chunk_size).prefetch(2).with_options(_options())


def _to_devices(batch: dict[str, tf.Tensor], num_local_devices: int
                ) -> dict[str, tf.Tensor]:
  """Reshapes every (n, ...) entry to (num_local_devices, n / D, ...)."""
  out = {}
  for key, value in batch.items():
    shape = value.shape.as_list()
    out[key] = tf.reshape(
        value, [num_local_devices, shape[0] // num_local_devices] + shape[1:])
  return out


def create_eval_dataset(records: Sequence[Record],
                        config: Any,
                        *,
                        num_local_devices: int,
                        process_index: int = 0,
                        process_count: int = 1,
                        load_image: LoadImageFn | None = None
                        ) -> tf.data.Dataset:
  """Evaluation batches of `records` in order, uint8, the last one padded.

  The records are cut into global batches of config.test.batch_size in file
  order (the caller concatenates query and gallery); the last one is padded
  with zero images, mask False and index -1. Over all processes every record
  appears exactly once. Normalisation (`device_augment.normalize`) and
  flip-averaging, if any, are the device side's business.

  Args:
    records: records to embed, in order.
    config: the experiment config (input.image_size, test.batch_size).
    num_local_devices: devices of this process (D).
    process_index: this process.
    process_count: number of processes.
    load_image: optional hook (path, index) -> uint8 (h, w, 3).

  Returns:
    tf.data.Dataset of {'image': uint8 (D, b, H, W, 3), 'mask': bool (D, b),
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
  image_size = tuple(int(s) for s in config.input.image_size)
  load_one = resized_image_fn(records, image_size, load_image)

  def process(idx: tf.Tensor) -> dict[str, tf.Tensor]:
    image = tf.cond(idx >= 0, lambda: load_one(idx),
                    lambda: tf.zeros(image_size + (3,), tf.uint8))
    return {'image': image, 'mask': idx >= 0, 'index': tf.cast(idx, tf.int32)}

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(index, tf.int64))
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(cols.stop - cols.start, drop_remainder=True)
  ds = ds.map(lambda b: _to_devices(b, num_local_devices))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())
