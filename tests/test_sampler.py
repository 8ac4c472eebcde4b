"""Tests of the PK identity sampler and the shuffle sampler."""

import collections
import copy
import random

import numpy as np
import pytest

from input_pipeline import sampler as sampler_lib


class BoTReferenceSampler:
  """Transcription of the baseline's RandomIdentitySampler (python `random`)."""

  def __init__(self, pids, batch_size, num_instances, seed):
    self.batch_size = batch_size
    self.num_instances = num_instances
    self.num_pids_per_batch = batch_size // num_instances
    self.index_dic = collections.defaultdict(list)
    for index, pid in enumerate(pids):
      self.index_dic[pid].append(index)
    self.pids = list(self.index_dic.keys())
    self.length = 0
    for pid in self.pids:
      num = max(len(self.index_dic[pid]), num_instances)
      self.length += num - num % num_instances
    self.py_rng = random.Random(seed)
    self.np_rng = np.random.RandomState(seed)

  def __iter__(self):
    batch_idxs_dict = collections.defaultdict(list)
    for pid in self.pids:
      idxs = copy.deepcopy(self.index_dic[pid])
      if len(idxs) < self.num_instances:
        idxs = list(self.np_rng.choice(idxs, size=self.num_instances,
                                       replace=True))
      self.py_rng.shuffle(idxs)
      batch_idxs = []
      for idx in idxs:
        batch_idxs.append(idx)
        if len(batch_idxs) == self.num_instances:
          batch_idxs_dict[pid].append(batch_idxs)
          batch_idxs = []
    avai_pids = copy.deepcopy(self.pids)
    final_idxs = []
    while len(avai_pids) >= self.num_pids_per_batch:
      selected_pids = self.py_rng.sample(avai_pids, self.num_pids_per_batch)
      for pid in selected_pids:
        batch_idxs = batch_idxs_dict[pid].pop(0)
        final_idxs.extend(batch_idxs)
        if not batch_idxs_dict[pid]:
          avai_pids.remove(pid)
    return iter(final_idxs)

  def __len__(self):
    return self.length


def _market_like_pids(num_ids=60, seed=0):
  """Skewed image counts: some ids with 1-3 images (< K), one with many."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 15, size=num_ids)
  counts[0] = 60
  pids = np.repeat(np.arange(num_ids) * 7 + 3, counts)  # not 0..C-1
  return rng.permutation(pids)


@pytest.mark.parametrize('batch_size,k', [(64, 4), (32, 8), (24, 2)])
def test_steps_match_bot_length(batch_size, k):
  pids = _market_like_pids()
  ours = sampler_lib.RandomIdentitySampler(pids, batch_size, k, seed=0)
  ref = BoTReferenceSampler(list(pids), batch_size, k, seed=0)
  assert ours.length == len(ref)
  assert ours.steps_per_epoch == len(ref) // batch_size
  # One pass of the baseline never yields more than the estimate.
  for _ in range(5):
    assert len(list(iter(ref))) // batch_size <= ours.steps_per_epoch
  for epoch in range(3):
    assert ours.epoch_batches(epoch).shape == (ours.steps_per_epoch, batch_size)


def test_batch_structure_and_replacement():
  pids = _market_like_pids()
  k, batch_size, shards = 4, 64, 4
  s = sampler_lib.RandomIdentitySampler(pids, batch_size, k, seed=3,
                                        num_shards=shards)
  counts = collections.Counter(pids.tolist())
  for epoch in range(4):
    batches = s.epoch_batches(epoch)
    assert batches.dtype == np.int64
    for batch in batches:
      blocks = pids[batch].reshape(-1, k)
      # Every consecutive K indices are one identity; P distinct identities.
      assert (blocks == blocks[:, :1]).all()
      assert len(set(blocks[:, 0].tolist())) == batch_size // k
      # Each device slice holds whole identities (K images of each).
      for dev in np.split(pids[batch], shards):
        assert all(c == k for c in collections.Counter(dev.tolist()).values())
      for block in batch.reshape(-1, k):
        pid = pids[block[0]]
        if counts[pid] >= k:
          assert len(set(block.tolist())) == k  # no repeats within a chunk
        else:
          # Fewer than K images: drawn with replacement from its own images.
          assert len(set(block.tolist())) <= counts[pid]


def test_every_identity_each_epoch():
  pids = _market_like_pids()
  s = sampler_lib.RandomIdentitySampler(pids, 64, 4, seed=1)
  assert s.steps_per_epoch * 16 >= s.num_pids
  for epoch in range(10):
    seen = set(pids[s.epoch_batches(epoch)].ravel().tolist())
    assert seen == set(pids.tolist())


def test_coverage_repair_needed_case():
  # P = K = 2; identities 0-2 have one chunk, identity 3 two: 5 chunks, 2
  # steps, 4 slots for 4 identities. The baseline's pass often ends after
  # picking identity 3 twice and leaves one identity out; we never do.
  k = 2
  pids = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
  s = sampler_lib.RandomIdentitySampler(pids, 4, k, seed=0)
  assert s.steps_per_epoch * s.num_pids_per_batch >= s.num_pids
  ref_missed = 0
  for seed in range(50):
    ref = BoTReferenceSampler(list(pids), 4, k, seed=seed)
    ref_missed += len(set(pids[list(iter(ref))].tolist())) < 4
  assert ref_missed >= 5
  for epoch in range(50):
    batches = s.epoch_batches(epoch)
    assert set(pids[batches].ravel().tolist()) == set(range(4))
    for batch in batches:
      blocks = pids[batch].reshape(-1, k)
      assert (blocks == blocks[:, :1]).all()
      assert len(set(blocks[:, 0].tolist())) == 2


def test_fresh_round_when_pass_runs_out():
  # One identity with many images: a pass ends early, the epoch continues.
  pids = np.concatenate([np.zeros(200, int), np.repeat(np.arange(1, 9), 4)])
  s = sampler_lib.RandomIdentitySampler(pids, 16, 4, seed=0)
  assert s.steps_per_epoch == (200 + 32) // 16
  batches = s.epoch_batches(0)
  assert batches.shape == (s.steps_per_epoch, 16)
  for batch in batches:
    assert len(set(pids[batch].tolist())) == 4
  more = s.epoch_batches(0, num_steps=40)
  assert more.shape == (40, 16)


def test_determinism_and_epochs_differ():
  pids = _market_like_pids()
  a = sampler_lib.RandomIdentitySampler(pids, 32, 4, seed=7)
  b = sampler_lib.RandomIdentitySampler(pids, 32, 4, seed=7)
  c = sampler_lib.RandomIdentitySampler(pids, 32, 4, seed=8)
  np.testing.assert_array_equal(a.epoch_batches(2), b.epoch_batches(2))
  np.testing.assert_array_equal(a.epoch_batches(2), a.epoch_batches(2))
  assert not np.array_equal(a.epoch_batches(2), a.epoch_batches(3))
  assert not np.array_equal(a.epoch_batches(2), c.epoch_batches(2))


@pytest.mark.parametrize('batch_size,k,shards,msg', [
    (30, 4, 1, 'config.num_instances'),
    (64, 4, 3, 'config.batch_size'),
    (4 * 70, 4, 1, 'config.batch_size'),  # P = 70 > 60 identities
])
def test_validation(batch_size, k, shards, msg):
  with pytest.raises(ValueError, match=msg):
    sampler_lib.RandomIdentitySampler(_market_like_pids(), batch_size, k,
                                      seed=0, num_shards=shards)


def test_shuffle_sampler():
  s = sampler_lib.ShuffleSampler(103, 10, seed=0, num_shards=2)
  assert s.steps_per_epoch == 10
  batches = s.epoch_batches(0)
  assert batches.shape == (10, 10)
  assert len(set(batches.ravel().tolist())) == 100
  np.testing.assert_array_equal(batches, s.epoch_batches(0))
  assert not np.array_equal(batches, s.epoch_batches(1))
  assert s.epoch_batches(0, num_steps=25).shape == (25, 10)
  with pytest.raises(ValueError, match='config.batch_size'):
    sampler_lib.ShuffleSampler(103, 10, seed=0, num_shards=4)


@pytest.mark.parametrize('batch_size,k,shards', [
    (128, 16, 16),  # the variant's 2-GPU batch on 16 devices: half an identity each
    (24, 4, 4),  # 6 images per device: identities straddle device boundaries
])
def test_identities_may_span_devices_with_equal_shares(batch_size, k, shards):
  pids = _market_like_pids()
  s = sampler_lib.RandomIdentitySampler(pids, batch_size, k, seed=5, num_shards=shards)
  one = sampler_lib.RandomIdentitySampler(pids, batch_size, k, seed=5, num_shards=1)
  batches = s.epoch_batches(0)
  # The device count only splits the batch: the same batches as on one device.
  np.testing.assert_array_equal(batches, one.epoch_batches(0))
  for batch in batches:
    blocks = pids[batch].reshape(-1, k)
    assert (blocks == blocks[:, :1]).all()
    assert len(set(blocks[:, 0].tolist())) == batch_size // k
    shares = np.split(batch, shards)  # raises unless every device gets an equal share
    assert {len(x) for x in shares} == {batch_size // shards}
  # Some identity's K images do sit on two devices: a block crosses a device boundary.
  share, first = batch_size // shards, pids[batches[0]]
  crossing = [b for b in range(share, batch_size, share)
              if b % k and first[b - 1] == first[b]]
  assert crossing
