"""Index samplers: the baseline's P x K identity sampler and plain shuffling.

Both samplers produce a whole epoch at once as an int array of record indices,
shape (steps, batch_size), a pure function of (seed, epoch): the input pipeline
(and any process of a multi-host job) can rebuild any epoch without state.

`RandomIdentitySampler` follows the Bag-of-Tricks `RandomIdentitySampler`
(data/samplers/triplet_sampler.py of the strong baseline):

  1. For every identity, its image indices (drawn with replacement up to K when
     it has fewer than K images) are shuffled and cut into chunks of K; an
     incomplete last chunk is dropped.
  2. While at least P = batch_size // K identities still have chunks left, P of
     them are drawn at random (without replacement) and each gives its next
     chunk. The batch is the concatenation of these P chunks.

The baseline's DataLoader length is its estimate `sum_pid max(n, K) rounded
down to a multiple of K`; we use `estimate // batch_size` steps per epoch, every
epoch, so that the step count (and the learning-rate schedule built on it) is
fixed. One pass of the algorithm never yields more than that many batches (it
consumes P chunks per batch out of `estimate / K` chunks); when it yields fewer
(identities with many images keep chunks after the others ran dry) the epoch
continues with a fresh pass, seeded from the same generator.

Coverage: the baseline can leave an identity out of an epoch (it still had all
its chunks when fewer than P identities were left). We repair that: every
identity missing from the epoch takes the place of a *repeated* occurrence of
another identity (the latest such chunk in the epoch first), using the first
chunk of its own shuffled list. A batch never holds the same identity twice
before or after the repair. When `steps * P >= number of identities` there are
always enough repeated occurrences (steps * P chunk slots, at most one first
occurrence per identity), so every identity appears at least once per epoch.
With fewer steps (e.g. a `config.steps_per_epoch` cap) there is no such
guarantee and the repair fills as many missing identities as it can.
"""

from collections.abc import Sequence

import numpy as np


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  """Returns the numpy Generator for one (seed, epoch)."""
  return np.random.default_rng([int(seed), int(epoch)])


class RandomIdentitySampler:
  """Samples batches of P identities x K images each (the baseline's sampler).

  Attributes:
    batch_size: global batch size, P * K.
    num_instances: K, images per identity in a batch.
    num_pids_per_batch: P.
    num_shards: number of devices the global batch is split over; every
      device gets batch_size / num_shards consecutive indices of each batch (P /
      num_shards whole identities when num_shards divides P; otherwise an
      identity's K images span devices, which is fine because triplets are mined
      over the gathered global batch: `config_lib.validate` decides which layouts
      a run may use).
    steps_per_epoch: batches in every epoch.
  """

  def __init__(self,
               pids: Sequence[int],
               batch_size: int,
               num_instances: int,
               seed: int,
               num_shards: int = 1):
    """Builds the per-identity index lists and validates the batch layout.

    Args:
      pids: identity of each record, in record order (record i has pids[i]).
      batch_size: global batch size (config.batch_size), P * K.
      num_instances: K (config.num_instances).
      seed: base seed (config.seed); epochs use the generator seeded with
        (seed, epoch).
      num_shards: total number of devices (over all processes) the global batch
        is split over.

    Raises:
      ValueError: if the batch size is not a multiple of K or of num_shards (every
        device gets an equal share), or there are fewer identities than P.
    """
    if num_instances <= 0 or batch_size <= 0:
      raise ValueError(
          f'config.batch_size ({batch_size}) and config.num_instances '
          f'({num_instances}) must be positive.')
    if batch_size % num_instances:
      raise ValueError(
          f'config.batch_size ({batch_size}) must be a multiple of '
          f'config.num_instances ({num_instances}): a batch is P identities '
          'x K images.')
    num_pids_per_batch = batch_size // num_instances
    if num_shards <= 0 or batch_size % num_shards:
      raise ValueError(
          f'config.batch_size ({batch_size}) must be a multiple of the number of '
          f'devices ({num_shards}) so that every device gets an equal share of the '
          'batch.')
    self.batch_size = batch_size
    self.num_instances = num_instances
    self.num_pids_per_batch = num_pids_per_batch
    self.num_shards = num_shards
    self.seed = seed

    pids = np.asarray(pids)
    # Identities in order of first appearance, as the baseline's dict keys;
    # each with its record indices in increasing order.
    uniq, first, inverse, counts = np.unique(
        pids, return_index=True, return_inverse=True, return_counts=True)
    groups = np.split(np.argsort(inverse.reshape(-1), kind='stable'),
                      np.cumsum(counts)[:-1])
    appearance = np.argsort(first, kind='stable')
    self._pids = uniq[appearance]
    self._index_lists = [groups[i] for i in appearance]
    if len(self._pids) < num_pids_per_batch:
      raise ValueError(
          f'Only {len(self._pids)} identities but P = config.batch_size // '
          f'config.num_instances = {batch_size} // {num_instances} = '
          f'{num_pids_per_batch} are needed per batch.')
    length = 0
    for idxs in self._index_lists:
      num = max(len(idxs), num_instances)
      length += num - num % num_instances
    self.length = length
    self.steps_per_epoch = length // batch_size

  @property
  def num_pids(self) -> int:
    """Number of distinct identities."""
    return len(self._pids)

  def _chunks(self, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Shuffled K-chunks of every identity (step 1 of the algorithm)."""
    k = self.num_instances
    chunks = []
    for idxs in self._index_lists:
      if len(idxs) < k:
        idxs = rng.choice(idxs, size=k, replace=True)
      else:
        idxs = idxs.copy()
      rng.shuffle(idxs)
      n = len(idxs) // k
      chunks.append([idxs[i * k:(i + 1) * k] for i in range(n)])
    return chunks

  def _one_pass(self, rng: np.random.Generator, max_batches: int
                ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
    """One pass of the baseline's algorithm, at most `max_batches` batches.

    Returns:
      (batches, batch identity slots, the shuffled chunks of the pass): each
      batch is an int array (P, K) of record indices, each slot array the (P,)
      identity positions (indices into self._pids) of its chunks.
    """
    chunks = self._chunks(rng)
    next_chunk = [0] * len(chunks)
    avai = list(range(len(chunks)))
    p = self.num_pids_per_batch
    batches, slots = [], []
    while len(avai) >= p and len(batches) < max_batches:
      sel = rng.choice(len(avai), size=p, replace=False)
      selected = [avai[i] for i in sel]
      batch = []
      for ident in selected:
        batch.append(chunks[ident][next_chunk[ident]])
        next_chunk[ident] += 1
      for ident in selected:
        if next_chunk[ident] == len(chunks[ident]):
          avai.remove(ident)
      batches.append(np.stack(batch))
      slots.append(np.asarray(selected))
    return batches, slots, chunks

  def epoch_batches(self, epoch: int, num_steps: int | None = None) -> np.ndarray:
    """Returns the batches of one epoch.

    Args:
      epoch: epoch number; with the seed it fully determines the result.
      num_steps: number of batches; defaults to `steps_per_epoch`.

    Returns:
      int64 array (num_steps, batch_size) of record indices; every consecutive
      block of K indices belongs to one identity, a batch holds P distinct
      identities.
    """
    num_steps = self.steps_per_epoch if num_steps is None else num_steps
    rng = _epoch_rng(self.seed, epoch)
    batches, slots = [], []
    first_chunks = None
    while len(batches) < num_steps:
      b, s, chunks = self._one_pass(rng, num_steps - len(batches))
      if first_chunks is None:
        first_chunks = chunks
      batches += b
      slots += s
    if not batches:
      return np.zeros((0, self.batch_size), np.int64)
    batches = np.stack(batches)  # (steps, P, K)
    slots = np.stack(slots)  # (steps, P)
    self._repair_coverage(batches, slots, first_chunks)
    return batches.reshape(num_steps, self.batch_size).astype(np.int64)

  def _repair_coverage(self, batches: np.ndarray, slots: np.ndarray,
                       chunks: list[list[np.ndarray]]) -> None:
    """Puts missing identities in place of repeated ones, latest first (in place)."""
    counts = np.bincount(slots.ravel(), minlength=self.num_pids)
    missing = list(np.flatnonzero(counts == 0))
    if not missing:
      return
    flat_slots = slots.reshape(-1)
    flat_batches = batches.reshape(-1, self.num_instances)
    for pos in range(flat_slots.size - 1, -1, -1):
      if not missing:
        break
      ident = flat_slots[pos]
      if counts[ident] > 1:
        new = missing.pop(0)
        counts[ident] -= 1
        counts[new] += 1
        flat_slots[pos] = new
        flat_batches[pos] = chunks[new][0]


class ShuffleSampler:
  """Plain shuffling (softmax-only training): one permutation per epoch.

  Attributes:
    batch_size: global batch size.
    steps_per_epoch: num_records // batch_size (the last partial batch dropped).
  """

  def __init__(self, num_records: int, batch_size: int, seed: int,
               num_shards: int = 1):
    """Validates the batch layout.

    Args:
      num_records: number of training records.
      batch_size: global batch size (config.batch_size).
      seed: base seed (config.seed).
      num_shards: total number of devices the global batch is split over.

    Raises:
      ValueError: if the batch size is not a multiple of num_shards or larger
        than the number of records.
    """
    if batch_size <= 0 or num_shards <= 0 or batch_size % num_shards:
      raise ValueError(
          f'config.batch_size ({batch_size}) must be a positive multiple of the '
          f'number of devices ({num_shards}).')
    if num_records < batch_size:
      raise ValueError(
          f'config.batch_size ({batch_size}) is larger than the number of '
          f'training records ({num_records}).')
    self.num_records = num_records
    self.batch_size = batch_size
    self.num_shards = num_shards
    self.seed = seed
    self.steps_per_epoch = num_records // batch_size

  def epoch_batches(self, epoch: int, num_steps: int | None = None) -> np.ndarray:
    """Returns the batches of one epoch.

    Args:
      epoch: epoch number; with the seed it fully determines the result.
      num_steps: number of batches; defaults to `steps_per_epoch`. More than
        that continues with further permutations.

    Returns:
      int64 array (num_steps, batch_size) of record indices.
    """
    num_steps = self.steps_per_epoch if num_steps is None else num_steps
    rng = _epoch_rng(self.seed, epoch)
    per_perm = self.steps_per_epoch * self.batch_size
    parts, total = [], 0
    while total < num_steps * self.batch_size:
      parts.append(rng.permutation(self.num_records)[:per_perm])
      total += per_perm
    flat = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    flat = flat[:num_steps * self.batch_size]
    return flat.reshape(num_steps, self.batch_size).astype(np.int64)
