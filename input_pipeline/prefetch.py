"""Device prefetch: host batches put on the local devices by a background thread.

`prefetch_to_device(iterator, size)` starts a thread that pulls host batches
(pytrees of arrays shaped (D, ...)), puts them on the D local devices with one
`jax.device_put` and a sharding over the leading axis (what `jax.pmap` and
a `jit` over a ('batch',) mesh take), and keeps up to `size` of them in a
bounded queue. The consumer's `next()` is a queue get and nothing else, so the
transfer of batch i + 1 overlaps step i. Errors in the source or the transfer
reach the consumer; the thread stops when the consumer is closed or dropped.

`HostBuffers` gives the host side reusable 64-byte aligned batch buffers: jax's
CPU devices use such memory in place (no copy in `device_put`), and reusing it
avoids faulting in fresh pages for every batch.
"""

import atexit
from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import functools
import queue
import sys
import threading
import weakref
from typing import Any

import numpy as np
import tensorflow as tf


# jax's CPU client uses host memory in place, without a copy, when it is 64-byte
# aligned (and C-contiguous); numpy aligns large arrays to 16 bytes only.
ALIGNMENT = 64


def _aligned_view(raw: np.ndarray, shape: Sequence[int], dtype: Any) -> np.ndarray:
  """The `ALIGNMENT`-aligned array of `shape` inside the uint8 buffer `raw`."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(tuple(shape))


class HostBuffers:
  """Aligned host batches that are reused once nothing refers to them any more.

  A fresh multi-megabyte array per batch faults in its pages at every step
  (glibc hands large freed blocks back to the kernel), which costs several times
  the copy into it. This keeps up to `max_buffers` buffers, `ALIGNMENT`-byte
  aligned (jax's CPU devices then use them in place, without a copy), and hands
  one out again only when no array refers to it: not the consumer, not a device
  array that uses it in place (jax's CPU client holds the host array until its
  device buffer is freed), not a transfer in progress. When all are in use, a
  fresh buffer is returned.
  """

  def __init__(self, max_buffers: int = 16):
    self._buffers: list[np.ndarray] = []
    self._max = max_buffers
    self._free_refs = 0  # getrefcount of a buffer only the list refers to

  def empty(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised aligned C-contiguous array, in a free buffer if there is one.

    Args:
      shape: the array's shape.
      dtype: its dtype.

    Returns:
      the array (a view of a slightly larger uint8 buffer).
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize + ALIGNMENT
    for i in range(len(self._buffers)):
      # Free: referred to by the list only (every view handed out refers to its
      # buffer: numpy keeps the owner as the base of views of views).
      if (self._buffers[i].nbytes >= nbytes and
          sys.getrefcount(self._buffers[i]) == self._free_refs):
        return _aligned_view(self._buffers[i], shape, dtype)
    if len(self._buffers) >= self._max:
      return _aligned_view(np.empty(nbytes, np.uint8), shape, dtype)
    self._buffers.append(np.empty(nbytes, np.uint8))
    # The count of a buffer nobody else holds, written as the test above (the
    # interpreter's own references to a call's argument vary between versions).
    self._free_refs = sys.getrefcount(self._buffers[-1])
    return _aligned_view(self._buffers[-1], shape, dtype)


class _End:
  """Queue marker: the source is exhausted."""


@dataclasses.dataclass
class _Raised:
  """Queue marker: the source (or the transfer) raised `error`."""
  error: BaseException


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
  """Puts `item`, waiting for room unless `stop` is set; False when stopped."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def _produce(source: Iterator[Any], q: queue.Queue, stop: threading.Event,
             transfer: Callable[[Any], Any]) -> None:
  """The prefetch thread: pulls, transfers and queues until the end or `stop`.

  Holds no reference to the consumer, so dropping the consumer stops it.
  """
  try:
    for batch in source:
      if stop.is_set() or not _put(q, transfer(batch), stop):
        return
    _put(q, _End(), stop)
  except BaseException as e:  # pylint: disable=broad-except
    _put(q, _Raised(e), stop)
  finally:
    close = getattr(source, 'close', None)
    if callable(close):
      close()


def _close_at_exit(prefetcher: 'weakref.ref[_DevicePrefetcher]') -> None:
  """atexit: stops a prefetcher still running when the interpreter exits."""
  alive = prefetcher()
  if alive is not None:
    alive.close()


class _DevicePrefetcher:
  """Iterator side of `prefetch_to_device`: its `next()` is a queue get.

  A prefetcher left running when the interpreter exits is closed by an atexit hook:
  otherwise its daemon thread, returning from a source's C++ code (tf.data) after
  Python has begun to finalise, is torn down inside that code and the process aborts
  ("terminate called ... exception not rethrown").
  """

  def __init__(self, source: Iterator[Any], size: int,
               transfer: Callable[[Any], Any]):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce, args=(source, self._queue, self._stop, transfer),
        name='prefetch_to_device', daemon=True)
    self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
    atexit.register(self._at_exit)
    self._thread.start()

  def __iter__(self) -> '_DevicePrefetcher':
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _End):
      self._done = True
      raise StopIteration
    if isinstance(item, _Raised):
      self._done = True
      raise item.error
    return item

  def close(self, timeout: float = 5.0) -> None:
    """Stops the background thread (it finishes the batch it is moving)."""
    atexit.unregister(self._at_exit)
    self._done = True
    self._stop.set()
    while True:  # free a producer blocked on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join(timeout)

  def __enter__(self) -> '_DevicePrefetcher':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __del__(self) -> None:
    atexit.unregister(self._at_exit)
    self._stop.set()


def prefetch_to_device(iterator: Iterable[Any] | tf.data.Dataset, size: int = 2,
                       devices: Sequence[Any] | None = None,
                       keys: Sequence[str] | None = None) -> _DevicePrefetcher:
  """Puts batches on the local devices ahead of use, from a background thread.

  A thread pulls host batches, puts each leaf (leading axis of length
  len(devices)) on the devices with one `jax.device_put` and a sharding over
  that axis, and keeps up to `size` batches in a bounded queue; the consumer's
  `next()` only takes from the queue. An exception in the source or the
  transfer is re-raised by the consumer's `next()`. The thread stops when the
  consumer is closed (`close()`, `with`) or dropped, and is a daemon thread, so
  an abandoned prefetcher never holds up the interpreter's exit.

  Args:
    iterator: iterable of pytrees of arrays shaped (D, ...) (numpy arrays or
      tf tensors), or a tf.data.Dataset.
    size: number of batches kept ready on the devices (>= 1).
    devices: target devices; default jax.local_devices() (pmap's order).
    keys: when given, the batches are dicts and only these entries go to the
      devices (e.g. `pipeline.TRAIN_DEVICE_KEYS`); None: the whole batch.

  Returns:
    iterator of pytrees of jax.Arrays sharded over the devices along axis 0.

  Raises:
    ValueError: if size < 1; KeyError (from the consumer's `next()`) if a batch
      lacks one of `keys`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if size < 1:
    raise ValueError(f'prefetch_to_device needs size >= 1, got {size}.')
  if isinstance(iterator, tf.data.Dataset):
    iterator = iterator.as_numpy_iterator()
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))

  def as_numpy(x: Any) -> Any:
    return x.numpy() if isinstance(x, tf.Tensor) else x

  def transfer(batch: Any) -> Any:
    if keys is not None:
      missing = [k for k in keys if k not in batch]
      if missing:
        raise KeyError(f'prefetch_to_device: the batch has no {missing} (it has '
                       f'{sorted(batch)}).')
      batch = {k: batch[k] for k in keys}
    return jax.device_put(jax.tree_util.tree_map(as_numpy, batch), sharding)

  return _DevicePrefetcher(iter(iterator), size, transfer)
