"""Tests of eval.rerank against the dense numpy transcription of the reference
(tests/eval_reference.py)."""

import numpy as np
import pytest

from eval import distance
from eval import rerank
from eval import rerank_neighbours
from eval_reference import reference_re_ranking


def clustered_features(seed, num, dim=32, num_ids=25, noise=0.7):
  """Continuous features around identity centres (no distance ties)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_ids, dim))
  labels = rng.integers(0, num_ids, num)
  return (centres[labels] + noise * rng.normal(size=(num, dim))).astype(np.float32)


@pytest.mark.parametrize('k1, k2, lambda_value', [
    (20, 6, 0.3),  # the paper's setting
    (5, 1, 0.5),  # odd k1 (round half to even), no query expansion
    (7, 3, 0.0),
    (4, 4, 1.0),
])
def test_matches_reference(k1, k2, lambda_value):
  feats = clustered_features(0, 240)
  q, g = feats[:50], feats[50:]
  expected = reference_re_ranking(q, g, k1, k2, lambda_value)
  got = rerank.re_ranking(q, g, k1, k2, lambda_value, block_size=64)
  assert got.shape == (50, 190) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  if lambda_value < 1:
    # Non-trivial: many pairs share k-reciprocal neighbours (Jaccard < 1).
    scaled = reference_re_ranking(q, g, k1, k2, 1.0)
    assert np.mean(expected < lambda_value * scaled + (1 - lambda_value) - 1e-3) > 0.02


def test_matches_reference_more_points_than_neighbourhoods():
  feats = clustered_features(1, 300, dim=16, num_ids=40)
  q, g = feats[:70], feats[70:]
  expected = reference_re_ranking(q, g, 20, 6, 0.3)
  np.testing.assert_allclose(rerank.re_ranking(q, g), expected, atol=1e-5)


def test_tiny_problem_smaller_than_k1():
  feats = clustered_features(2, 9, dim=8)
  q, g = feats[:3], feats[3:]
  expected = reference_re_ranking(q, g, 20, 6, 0.3)
  np.testing.assert_allclose(rerank.re_ranking(q, g, 20, 6, 0.3), expected, atol=1e-5)


@pytest.mark.parametrize('block_size, max_pairs', [(3, 10), (17, 1000), (40, 10**9)])
def test_block_size_independent(block_size, max_pairs):
  feats = clustered_features(3, 130, dim=16)
  q, g = feats[:40], feats[40:]
  expected = rerank.re_ranking(q, g, 6, 3, 0.3, block_size=1000)
  got = rerank.re_ranking(q, g, 6, 3, 0.3, block_size=block_size, max_pairs=max_pairs)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_errors():
  q = np.zeros((3, 4), np.float32)
  g = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match='Features must be 2-D'):
    rerank.re_ranking(q[0], g)
  with pytest.raises(ValueError, match='Feature dimensions differ: 4 vs 3'):
    rerank.re_ranking(q, g[:, :3])
  with pytest.raises(ValueError, match='Empty query set'):
    rerank.re_ranking(q[:0], g)
  with pytest.raises(ValueError, match='Empty gallery'):
    rerank.re_ranking(q, g[:0])
  bad = g.copy()
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match='NaN or infinite'):
    rerank.re_ranking(q, bad)
  with pytest.raises(ValueError, match='k1 and k2 must be >= 1'):
    rerank.re_ranking(q, g, k1=0)
  with pytest.raises(ValueError, match='k1 and k2 must be >= 1'):
    rerank.re_ranking(q, g, k2=0)
  with pytest.raises(ValueError, match=r'lambda_value must be in \[0, 1\]'):
    rerank.re_ranking(q, g, lambda_value=1.5)
  with pytest.raises(ValueError, match='block_size must be >= 1'):
    rerank.re_ranking(q, g, block_size=0)
  with pytest.raises(ValueError, match='max_pairs must be >= 1'):
    rerank.re_ranking(q, g, max_pairs=0)
  with pytest.raises(ValueError, match="distance must be one of 'euclidean', 'cosine'"):
    rerank.re_ranking(q, g, distance='hamming')


@pytest.mark.parametrize('k1, k2, lambda_value', [(20, 6, 0.3), (7, 1, 0.5)])
def test_cosine_matches_reference(k1, k2, lambda_value):
  feats = clustered_features(4, 200, dim=24)
  feats *= np.random.default_rng(5).uniform(0.2, 5.0, (200, 1)).astype(np.float32)
  q, g = feats[:45], feats[45:]
  expected = reference_re_ranking(q, g, k1, k2, lambda_value, metric='cosine')
  got = rerank.re_ranking(q, g, k1, k2, lambda_value, distance='cosine', block_size=64)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  # Not the Euclidean re-ranking: the features have very different norms.
  euclid = reference_re_ranking(q, g, k1, k2, lambda_value)
  assert np.abs(euclid - expected).max() > 0.05


def test_memory_limit():
  q = np.zeros((3, 4), np.float32)
  g = np.ones((5, 4), np.float32)
  needed = rerank.memory_bytes(3, 5, 4)
  with pytest.raises(distance.MemoryLimitError,
                     match=r'Re-ranking 3 queries against 5 gallery images would need about '
                           r'[0-9.]+ GiB, more than the limit of 0.00 GiB'):
    rerank.re_ranking(q, g, max_bytes=needed - 1)
  assert rerank.re_ranking(q, g, max_bytes=needed).shape == (3, 5)
  # A million-image gallery is refused with the default limit, before any work
  # (the arrays below take no memory).
  big_q = np.broadcast_to(np.float32(0), (11659, 2048))
  big_g = np.broadcast_to(np.float32(0), (1_000_000, 2048))
  with pytest.raises(distance.MemoryLimitError, match='would need about 6[0-9.]+ GiB'):
    rerank.re_ranking(big_q, big_g)
  # MSMT17 size fits the default limit.
  assert rerank.memory_bytes(11659, 82161, 2048) < distance.DEFAULT_MAX_DENSE_BYTES


@pytest.mark.parametrize('num_query, num_gallery, dim, block_size, on_host', [
    (30, 90, 2, 16, True),  # 8 blocks, straddling the query-gallery boundary
    (7, 50, 3, 3, True),  # tiles narrower than k
    (60, 61, 3, 1000, True),  # one tile: partial selections only
    (30, 90, 2, 16, False),  # jax.lax.top_k on the device
])
def test_neighbour_lists_with_ties(num_query, num_gallery, dim, block_size, on_host):
  # Small integer features: every distance is an exact integer in float32,
  # whatever the summation order, and most distances are tied. The lists must
  # be numpy's stable argsort of the exact matrix (ties to the lower index).
  num = num_query + num_gallery
  feats = np.random.default_rng(6).integers(-2, 3, (num, dim)).astype(np.float32)
  dist = ((feats[:, None, :] - feats[None, :, :])**2).sum(-1)
  padded = np.zeros((rerank_neighbours.padded_rows(num, block_size), dim), np.float32)
  padded[:num] = feats
  for k in (1, 21, num):
    order = np.argsort(dist, axis=1, kind='stable')[:, :k]
    out = np.empty((num_query, num_gallery), np.float32)
    row_max, nn, nn_dist = rerank_neighbours.neighbour_pass(padded, num, num_query, k,
                                                            block_size, out, on_host)
    np.testing.assert_array_equal(nn, order)
    np.testing.assert_array_equal(nn_dist, np.take_along_axis(dist, order, axis=1))
    np.testing.assert_array_equal(row_max, dist.max(axis=0))
    np.testing.assert_array_equal(out, dist[:num_query, num_query:])


def test_device_selection_matches_reference():
  feats = clustered_features(0, 240)
  q, g = feats[:50], feats[50:]
  expected = reference_re_ranking(q, g, 20, 6, 0.3)
  got = rerank.re_ranking(q, g, 20, 6, 0.3, block_size=64, neighbours_on_host=False)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(
      got, rerank.re_ranking(q, g, 20, 6, 0.3, block_size=64, neighbours_on_host=True))
