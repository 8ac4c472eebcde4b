"""Where the decoded training images are kept: nowhere, in host memory, or on the devices.

`config.input.cache` (`CACHE_MODES`):
  * 'none': every step reads, decodes and resizes its images (`pipeline`).
  * 'host': the decoded, resized uint8 images are kept in one host array after their
    first read; every later batch is a gather from it, shipped to the devices.
  * 'device': every training image is decoded once, before the first step, into a
    uint8 array kept on each local device (`device_cache.fill_device_cache`), zero
    padded by `config.input.padding` on each side (`cached_image_shape`), so the
    device augmentation crops straight out of it (`device_cache.augment_cached`);
    the host ships only record indices, labels and augmentation positions. Each
    process decodes all N images for its own devices (any device's batch may hold any
    image), where the other modes decode only the process's share of each batch.
  * 'auto': 'device' when one device's copy fits `config.input.cache_device_max_gb`
    (and a quarter of the device's memory, where the device reports it), and, on CPU
    devices, whose memory is the host's, all local copies together fit
    `config.input.cache_max_gb`; otherwise 'host' when the host array fits
    `config.input.cache_max_gb`; otherwise 'none'.

Market-1501 (12,936 images at 256x128): 1.27 GB on the host, 1.59 GB per device
(padded to 276x148).
"""

from collections.abc import Sequence
import dataclasses
from typing import Any, Optional

from input_pipeline.choices import check_choice

CACHE_MODES = ('none', 'host', 'device', 'auto')
# 'auto' keeps a device copy only when it takes at most this share of the device's
# memory (the model, its activations and the optimizer need the rest).
DEVICE_MEMORY_SHARE = 0.25


def cached_image_shape(image_size: Sequence[int], padding: int) -> tuple[int, int, int]:
  """The shape of one image in the device cache: (H + 2 * padding, W + 2 * padding, 3).

  Args:
    image_size: (H, W), the training size.
    padding: config.input.padding (zero pixels on each side, as the augmentation's
      Pad before its RandomCrop).

  Returns:
    (H + 2 * padding, W + 2 * padding, 3).

  Raises:
    ValueError: for a negative padding.
  """
  height, width = (int(s) for s in image_size)
  pad = int(padding)
  if pad < 0:
    raise ValueError(f'config.input.padding must be >= 0, got {padding}.')
  return (height + 2 * pad, width + 2 * pad, 3)


@dataclasses.dataclass(frozen=True)
class CacheChoice:
  """The cache a training stream uses.

  Attributes:
    mode: 'host', 'device' or 'none'.
    nbytes: size of the host array, N * H * W * 3 bytes (whether used or not); for
      'device', of one device's (padded) copy.
    reason: one line saying why, for the log.
  """
  mode: str
  nbytes: int
  reason: str


def choose_cache(mode: str, num_images: int, image_size: Sequence[int], max_gb: float,
                 *, padding: int = 0, device_max_gb: float = 0.0,
                 platform: str = 'cpu', num_local_devices: int = 1,
                 device_bytes_limit: Optional[int] = None) -> CacheChoice:
  """Decides where the decoded training images are kept (see the module docstring).

  Args:
    mode: one of `CACHE_MODES`.
    num_images: number of training records N.
    image_size: (H, W) training size.
    max_gb: the host budget (config.input.cache_max_gb), in GB (1e9 bytes).
    padding: config.input.padding (the device copy is padded by it).
    device_max_gb: the budget of one device's copy (config.input.cache_device_max_gb).
    platform: the devices' platform ('cpu', 'gpu', 'tpu').
    num_local_devices: devices of this process (each keeps its own copy).
    device_bytes_limit: one device's memory, when it reports it, else None.

  Returns:
    the CacheChoice.

  Raises:
    ValueError: for an unknown mode, or 'device' when one copy exceeds the device's
      memory.
  """
  check_choice('config.input.cache', mode, CACHE_MODES)
  height, width = (int(s) for s in image_size)
  nbytes = int(num_images) * height * width * 3
  size = f'{nbytes / 1e9:.2f} GB for {num_images} images of {height}x{width}x3 uint8'
  shape = cached_image_shape(image_size, padding)
  device_nbytes = int(num_images) * shape[0] * shape[1] * 3
  device_size = (f'{device_nbytes / 1e9:.2f} GB on each of {num_local_devices} '
                 f'{platform} device(s) ({num_images} images of {shape[0]}x{shape[1]}x3 '
                 'uint8, padded)')
  if mode == 'none':
    return CacheChoice('none', nbytes, f'cache off (config.input.cache=none; a host '
                       f'cache would be {size})')
  if mode == 'host':
    return CacheChoice('host', nbytes, f'host cache of {size} (config.input.cache=host)')
  if mode == 'device':
    if device_bytes_limit is not None and device_nbytes > device_bytes_limit:
      raise ValueError(
          f'config.input.cache=device needs {device_size}, more than the '
          f'{device_bytes_limit / 1e9:.2f} GB a device has; use '
          "config.input.cache='host' or 'auto'.")
    return CacheChoice('device', device_nbytes,
                       f'device cache of {device_size} (config.input.cache=device)')
  too_big = []  # the budgets a device cache exceeds, each with its figures
  if device_nbytes > float(device_max_gb) * 1e9:
    too_big.append(f'{device_nbytes / 1e9:.2f} GB per device > '
                   f'config.input.cache_device_max_gb={device_max_gb:g}')
  if device_bytes_limit is not None and (
      device_nbytes > DEVICE_MEMORY_SHARE * device_bytes_limit):
    too_big.append(f'{device_nbytes / 1e9:.2f} GB > {DEVICE_MEMORY_SHARE:g} of the '
                   f'{device_bytes_limit / 1e9:.2f} GB of device memory')
  if platform == 'cpu' and num_local_devices * device_nbytes > float(max_gb) * 1e9:
    too_big.append(f'{num_local_devices} copies = '
                   f'{num_local_devices * device_nbytes / 1e9:.2f} GB > '
                   f'config.input.cache_max_gb={max_gb:g} (CPU devices use host memory)')
  if not too_big:
    return CacheChoice('device', device_nbytes, f'device cache of {device_size} (auto: '
                       f'within config.input.cache_device_max_gb={device_max_gb:g})')
  not_device = f'no device cache: {"; ".join(too_big)}'
  if nbytes <= float(max_gb) * 1e9:
    return CacheChoice('host', nbytes, f'host cache of {size} (auto: {not_device}; the '
                       f'host cache is within config.input.cache_max_gb={max_gb:g})')
  return CacheChoice('none', nbytes, f'no cache (auto: {not_device}; a host cache of '
                     f'{size} exceeds config.input.cache_max_gb={max_gb:g})')


def choose_cache_for(config: Any, num_records: int, num_local_devices: int,
                     mode: str | None = None) -> CacheChoice:
  """`choose_cache` for this config and the local devices (their platform and
  memory, from JAX).

  Args:
    config: the experiment config (input.cache, input.cache_max_gb,
      input.cache_device_max_gb, input.image_size, input.padding).
    num_records: training records.
    num_local_devices: devices of this process.
    mode: overrides config.input.cache.

  Returns:
    the CacheChoice.

  Raises:
    ValueError: see `choose_cache`.
  """
  mode = config.input.cache if mode is None else mode
  platform, bytes_limit = 'cpu', None
  if mode in ('device', 'auto'):  # only then are the devices asked (JAX starts)
    import jax  # pylint: disable=g-import-not-at-top
    device = jax.local_devices()[0]
    platform = device.platform
    stats = device.memory_stats() if platform != 'cpu' else None
    bytes_limit = (stats or {}).get('bytes_limit')
  return choose_cache(
      mode, num_records, config.input.image_size, config.input.cache_max_gb,
      padding=config.input.padding, device_max_gb=config.input.cache_device_max_gb,
      platform=platform, num_local_devices=num_local_devices,
      device_bytes_limit=bytes_limit)
