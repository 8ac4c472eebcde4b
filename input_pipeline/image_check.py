"""Naming the image files that the input pipeline cannot decode.

tf.data reports an image it cannot decode with a bare TensorFlow error ('Input is
empty.', 'jpeg::Uncompress failed.', 'Unknown image file format.') that names no
file. The wrappers here sit around a stream of batches (`train_stream`,
`eval_batches`, and `image_chunks`, which fill the device cache): when batch i fails
with such an error, the images of batch i (known from the stream's plan: the
sampler's epoch for training, consecutive records for evaluation and for the device
cache) are decoded again one by one with the pipeline's own loader, and an
`UndecodableImageError` names each file that fails, its size, TensorFlow's reason
and the fix: `config.verify_images=True` drops undecodable images when the dataset
is read (`reader_utils.verify_images`). Files that PIL can read but TensorFlow cannot (so
that verify_images keeps them) are told apart. Batches that decode cost nothing.

The training loop catches the error of a training or evaluation batch, saves its
last good state and adds where (`UndecodableImageError.with_saved_state`); the device
cache is filled before the first step of a run, so its error leaves nothing unsaved.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import concurrent.futures
import dataclasses
import os
import re
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from input_pipeline import decode
from input_pipeline import pipeline
from input_pipeline import reader_utils
from input_pipeline.records import Record

# The TensorFlow errors a file that cannot be read or decoded raises in tf.data.
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
                 tf.errors.DataLossError)
_FIX = ('Set --config.verify_images=True to drop undecodable images when the dataset is '
        'read, or replace or delete the file(s).')
_FIX_LOADED = ('These images come from the dataset\'s records (e.g. TFDS shards), not from '
               'files: prepare the records again from the image folder (undecodable '
               'images are left out then).')


@dataclasses.dataclass(frozen=True)
class BadImage:
  """An image the pipeline's loader cannot decode.

  Attributes:
    path: the record's path.
    reason: TensorFlow's error, without its op and device decoration.
    size: the file's size in bytes; None when there is no such file.
    pil_reads_it: PIL opens and decodes the file (`config.verify_images` keeps it).
    from_file: the pipeline read the file at `path` (False: a `load_image` hook gave
      the bytes, as for TFDS data; `size` and `pil_reads_it` are then not looked at).
  """
  path: str
  reason: str
  size: Optional[int]
  pil_reads_it: bool = False
  from_file: bool = True

  def describe(self) -> str:
    """`path: what the file is: TensorFlow's reason`, one line."""
    if not self.from_file:
      what = "the dataset's encoded image"
    elif self.size is None:
      what = 'no such file'
    elif self.size == 0:
      what = 'empty file (0 bytes)'
    else:
      what = f'{self.size} bytes'
    line = f'{self.path}: {what}: {self.reason}'
    if self.pil_reads_it:
      line += (' (PIL reads this file but TensorFlow cannot decode it, so '
               'config.verify_images keeps it: re-encode it as JPEG or PNG)')
    return line


class UndecodableImageError(ValueError):
  """Images of a batch cannot be decoded; the message names the files and the fix.

  Attributes:
    bad: the files, in batch order.
    batch: which batch, in words ('training step 3 (epoch 1)').
    saved: where the last good training state was saved, if it was.
  """

  def __init__(self, bad: Sequence[BadImage], batch: str, saved: Optional[str] = None):
    self.bad, self.batch, self.saved = tuple(bad), batch, saved
    count = f'{len(self.bad)} image{"s" if len(self.bad) > 1 else ""}'
    lines = [f'Cannot decode {count} of {batch}:']
    lines += [f'  {b.describe()}' for b in self.bad]
    lines.append(_FIX if all(b.from_file for b in self.bad) else _FIX_LOADED)
    if saved:
      lines.append(f'The last good state is saved in {saved}; rerun the same command to '
                   'resume from there.')
    super().__init__('\n'.join(lines))

  def with_saved_state(self, saved: str) -> 'UndecodableImageError':
    """The same error, saying that the last good state is saved in `saved`."""
    return UndecodableImageError(self.bad, self.batch, saved)


def _reason(error: BaseException) -> str:
  """TensorFlow's message without '{{function_node ...}}' and ' [Op:...]'."""
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text, flags=re.S)
  return f'{type(error).__name__}: {text.strip()}'


def _file_size(path: str) -> Optional[int]:
  try:
    return os.path.getsize(path)
  except OSError:
    return None


def find_undecodable(records: Sequence[Record], indices: Iterable[int],
                     load_image: Optional[decode.LoadImageFn] = None,
                     num_threads: int = 8) -> list[BadImage]:
  """Decodes `records[i]` for each i with the pipeline's loader; returns the failures.

  Args:
    records: the records the stream reads.
    indices: which of them to decode (negative: padding, skipped); each once.
    load_image: the stream's `load_image(path, index)` hook; None: the file at
      the record's path, as the pipeline reads it.
    num_threads: decoding threads (TensorFlow's kernels release the GIL).

  Returns:
    The images that fail, in the order of `indices`.
  """
  load = load_image or decode.load_image_file
  indices = list(dict.fromkeys(int(i) for i in indices if int(i) >= 0))

  def problem(i: int) -> Optional[BadImage]:
    path = records[i].path
    try:
      load(tf.constant(path), tf.constant(i, tf.int64))
    except DECODE_ERRORS as e:
      if load_image is not None:
        return BadImage(path, _reason(e), None, from_file=False)
      size = _file_size(path)
      pil_ok = bool(size) and reader_utils.image_problem(path) is None
      return BadImage(path, _reason(e), size, pil_ok)
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    found = list(pool.map(problem, indices))
  return [b for b in found if b is not None]


def name_bad_images(batches: Iterable[Any], records: Sequence[Record],
                    batch_indices: Callable[[int], Iterable[int]],
                    describe: Callable[[int], str],
                    load_image: Optional[decode.LoadImageFn] = None
                    ) -> Iterator[Any]:
  """Yields `batches`; a decode error in batch i becomes an `UndecodableImageError`.

  Args:
    batches: the stream (its i-th item holds the images `batch_indices(i)`).
    records: the records the stream reads.
    batch_indices: i -> the record indices batch i reads (a superset is fine).
    describe: i -> the batch in words, for the message.
    load_image: the stream's image loader hook (None: the record's file).

  Yields:
    The items of `batches`.

  Raises:
    UndecodableImageError: naming the files of the failing batch that do not decode.
      Other errors, and decode errors for which no file of the batch fails again, are
      raised unchanged.
  """
  iterator = iter(batches)
  i = 0
  try:
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except DECODE_ERRORS as e:
        bad = find_undecodable(records, batch_indices(i), load_image)
        if not bad:
          raise
        raise UndecodableImageError(bad, describe(i)) from e
      yield batch
      i += 1
  finally:
    close = getattr(iterator, 'close', None)
    if callable(close):
      close()


def train_stream(stream: Iterable[Any], records: Sequence[Record], config: Any, *,
                 steps_per_epoch: int, start_step: int, num_devices: int,
                 load_image: Optional[decode.LoadImageFn] = None) -> Iterator[Any]:
  """`pipeline.create_train_stream`'s batches, naming the files of a failing step.

  Item i is global step s = start_step + i: the sampler's batch s % steps_per_epoch of
  epoch s // steps_per_epoch (the stream's plan; this process reads some of its
  columns, the whole global batch is checked).

  Args:
    stream: the stream of `pipeline.create_train_stream(records, config, ...)`.
    records: its records.
    config: its config (sampler, batch_size, num_instances, seed).
    steps_per_epoch: its steps per epoch.
    start_step: its first global step.
    num_devices: devices over all processes.
    load_image: its image loader hook.

  Returns:
    An iterator of the stream's batches (see `name_bad_images`).
  """
  def indices(i: int) -> np.ndarray:  # only after a failure: the sampler is built then
    epoch, row = divmod(start_step + i, steps_per_epoch)
    sampler = pipeline.make_sampler(records, config, num_devices)
    return sampler.epoch_batches(epoch, num_steps=steps_per_epoch)[row]

  def describe(i: int) -> str:
    step = start_step + i
    return f'training step {step + 1} (epoch {step // steps_per_epoch + 1})'

  return name_bad_images(stream, records, indices, describe, load_image)


def eval_batches(batches: Iterable[Any], records: Sequence[Record], config: Any,
                 load_image: Optional[decode.LoadImageFn] = None) -> Iterator[Any]:
  """`pipeline.create_eval_dataset`'s batches, naming the files of a failing batch.

  Batch i holds records [i * B, (i + 1) * B), B = config.test.batch_size (global).

  Args:
    batches: an iterator of `pipeline.create_eval_dataset(records, config, ...)`.
    records: its records.
    config: its config.
    load_image: its image loader hook.

  Returns:
    An iterator of the batches (see `name_bad_images`).
  """
  return _in_record_order(
      batches, records, int(config.test.batch_size),
      lambda i, first, last: f'evaluation batch {i + 1} (images {first}-{last} of '
                             f'{len(records)})', load_image)


def _in_record_order(batches: Iterable[Any], records: Sequence[Record], size: int,
                     describe: Callable[[int, int, int], str],
                     load_image: Optional[decode.LoadImageFn]) -> Iterator[Any]:
  """`name_bad_images` for batches of `size` consecutive records (the last may be
  shorter); describe(i, first, last) puts batch i, records first..last (counted from
  1), in words."""
  span = lambda i: range(i * size, min((i + 1) * size, len(records)))  # pylint: disable=unnecessary-lambda-assignment
  return name_bad_images(batches, records, span,
                         lambda i: describe(i, span(i).start + 1, span(i).stop),
                         load_image)


def image_chunks(records: Sequence[Record], image_size: Sequence[int],
                 load_image: Optional[decode.LoadImageFn] = None,
                 chunk_size: int = 256) -> Iterator[Any]:
  """`pipeline.create_image_chunks`, naming the files of a chunk that fails to decode.

  Args:
    records: the records (all of them are read, in order).
    image_size: (H, W).
    load_image: the image loader hook (None: the record's file).
    chunk_size: images per chunk.

  Returns:
    An iterator of uint8 (c, H, W, 3) numpy chunks (see `name_bad_images`).
  """
  chunks = pipeline.create_image_chunks(records, image_size, chunk_size=chunk_size,
                                        load_image=load_image)
  return _in_record_order(
      chunks.as_numpy_iterator(), records, chunk_size,
      lambda i, first, last: (f'filling the device cache (training images {first}-'
                              f'{last} of {len(records)})'), load_image)
