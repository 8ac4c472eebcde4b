"""Device prefetch: host batches put on the local devices by a background thread.

`prefetch_to_device(iterator, size)` starts a thread that pulls host batches
(pytrees of arrays shaped (D, ...)), puts them on the D local devices with one
`jax.device_put` and a sharding over the leading axis (what `jax.pmap` and
a `jit` over a ('batch',) mesh take), and keeps up to `size` of them in a
bounded queue. The consumer's `next()` is a queue get and nothing else, so the
transfer of batch i + 1 overlaps step i. Errors in the source or the transfer
reach the consumer; the thread stops when the consumer is closed or dropped.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import queue
import threading
from typing import Any

import numpy as np
import tensorflow as tf


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


class _DevicePrefetcher:
  """Iterator side of `prefetch_to_device`: its `next()` is a queue get."""

  def __init__(self, source: Iterator[Any], size: int,
               transfer: Callable[[Any], Any]):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce, args=(source, self._queue, self._stop, transfer),
        name='prefetch_to_device', daemon=True)
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
    self._stop.set()


def prefetch_to_device(iterator: Iterable[Any] | tf.data.Dataset, size: int = 2,
                       devices: Sequence[Any] | None = None) -> _DevicePrefetcher:
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

  Returns:
    iterator of pytrees of jax.Arrays sharded over the devices along axis 0.

  Raises:
    ValueError: if size < 1.
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
    return jax.device_put(jax.tree_util.tree_map(as_numpy, batch), sharding)

  return _DevicePrefetcher(iter(iterator), size, transfer)
