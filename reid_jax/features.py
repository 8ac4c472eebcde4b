"""Feature extraction of test images under pmap, on one process or several.

`extract_features` embeds every record once, in order: uint8 batches from
`input_pipeline.pipeline.create_eval_dataset` (padded; a mask marks the padding)
go to the local devices asynchronously and `train_step.eval_step` normalises and
embeds them there. With several processes each embeds its share of the batches
and the rows are gathered once (`multihost_eval.gather_rows`), so every process
returns all features. Scoring them is `reid_jax.scoring`'s; the evaluation of a
state on the test sets is `reid_jax.evaluation`'s.
"""

import collections
import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from input_pipeline import image_check
from input_pipeline import pipeline
from input_pipeline.records import Record
from reid_jax import multihost_eval

# Evaluation batches dispatched before the oldest one is fetched.
_EVAL_BATCHES_IN_FLIGHT = 4


def extract_features(p_eval_step: Callable, state: Any, records: Sequence[Record],
                     config: ml_collections.ConfigDict,
                     load_image: Optional[Callable] = None,
                     log_every_secs: float = 10.0) -> np.ndarray:
  """Embeds every record once, in order.

  uint8 batches (prefetched on the host by tf.data) are sent to the devices
  asynchronously and normalised there; outputs are fetched a few batches behind the
  dispatch, so the device always has work queued and the host never waits for a batch
  it just sent. Progress (images
  done, images/s) is logged every `log_every_secs`.

  Args:
    p_eval_step: pmapped `train_step.eval_step`.
    state: the train state, already on the devices (see `train_step.on_devices`).
    records: images to embed.
    config: the run's config (config.test.batch_size, config.input).
    load_image: image reader hook of `pipeline.create_eval_dataset` (TFDS data).
    log_every_secs: seconds between progress lines.

  Returns:
    float32 features (len(records), D) in the order of `records`. With several
    processes each embeds its share and the rows are gathered once
    (`multihost_eval.gather_rows`): every process returns all of them.

  Raises:
    image_check.UndecodableImageError: naming the images that do not decode.
    RuntimeError: an image embedded by no process, or by several.
  """
  num_local = jax.local_device_count()
  ds = pipeline.create_eval_dataset(records, config, num_local_devices=num_local,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    load_image=load_image)
  feats = None
  mine = []  # the rows this process embedded
  pending: collections.deque = collections.deque()
  start = last_log = time.time()
  done = 0

  def collect(out: jax.Array, mask: np.ndarray, index: np.ndarray) -> None:
    nonlocal feats, done
    out = np.asarray(jax.device_get(out))
    out = out.reshape(-1, out.shape[-1])[mask]
    if feats is None:  # every process sees a first batch (padding included)
      feats = np.zeros((len(records), out.shape[-1]), np.float32)
    feats[index[mask]] = out
    mine.append(index[mask])
    done += int(mask.sum())

  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  # tf.data prefetches on the host; an image that does not decode is named.
  for batch in image_check.eval_batches(ds.as_numpy_iterator(), records, config,
                                        load_image):
    # Asynchronous transfer and dispatch: only the image goes to the devices.
    image = jax.device_put(batch['image'], sharding)
    out = p_eval_step(state, {'image': image})
    pending.append((out, batch['mask'].reshape(-1), batch['index'].reshape(-1)))
    if len(pending) > _EVAL_BATCHES_IN_FLIGHT:
      collect(*pending.popleft())
    if time.time() - last_log >= log_every_secs:
      last_log = time.time()
      logging.info('Features: %d / %d images (%.0f images/s).', done, len(records),
                   done / (last_log - start))
  while pending:
    collect(*pending.popleft())
  if feats is None:
    raise RuntimeError(f'Feature extraction produced no batch for {len(records)} images.')
  # Several processes: the others' rows, each sent once by the process that embedded it.
  sent = multihost_eval.gather_rows(feats, np.concatenate(mine))
  if np.any(sent != 1):
    raise RuntimeError(f'Feature extraction missed {int((sent == 0).sum())} and repeated '
                       f'{int((sent > 1).sum())} of {len(records)} images; every image '
                       'must be embedded exactly once.')
  return feats
