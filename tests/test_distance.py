"""Tests of eval.distance against dense numpy float64 computations."""

import numpy as np
import pytest

from eval import distance


def _features(seed, num_q=37, num_g=53, dim=24):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_q, dim)).astype(np.float32),
          rng.normal(size=(num_g, dim)).astype(np.float32))


@pytest.mark.parametrize('block_size', [1, 8, 37, 1024])
def test_euclidean(block_size):
  q, g = _features(0)
  q64, g64 = q.astype(np.float64), g.astype(np.float64)
  expected = ((q64[:, None, :] - g64[None, :, :])**2).sum(-1)
  got = distance.euclidean_distance(q, g, block_size=block_size)
  assert got.shape == (37, 53) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  got = distance.euclidean_distance(q, g, squared=False, block_size=block_size)
  np.testing.assert_allclose(got, np.sqrt(expected), rtol=1e-5, atol=1e-4)


def test_euclidean_is_the_baselines_formula():
  # |q|^2 + |g|^2 - 2 q.g, not clipped: a point's distance to itself may be
  # slightly off zero either way, never NaN with squared=False.
  q, _ = _features(1)
  d = distance.euclidean_distance(q, q)
  assert np.abs(np.diag(d)).max() < 1e-4
  assert np.all(np.diag(distance.euclidean_distance(q, q, squared=False)) >= 0)


@pytest.mark.parametrize('block_size', [5, 64])
def test_cosine(block_size):
  q, g = _features(2)
  q64, g64 = q.astype(np.float64), g.astype(np.float64)
  expected = 1 - (q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ (
      g64 / np.linalg.norm(g64, axis=1, keepdims=True)).T
  got = distance.cosine_distance(q, g, block_size=block_size)
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_l2_normalize():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], np.float32)
  y = np.asarray(distance.l2_normalize(x))
  np.testing.assert_allclose(y[0], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_array_equal(y[1], [0.0, 0.0])  # zero stays zero (eps)
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(np.asarray(distance.l2_normalize(x.T, axis=0))[:, 0], [0.6, 0.8],
                             rtol=1e-6)


def test_aligned_empty():
  for shape in [(3, 5), (7,), (0, 4)]:
    a = distance.aligned_empty(shape, np.float32)
    assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.size == 0 or a.ctypes.data % 64 == 0


def test_errors():
  q, g = _features(3)
  with pytest.raises(ValueError, match='Feature dimensions differ'):
    distance.euclidean_distance(q, g[:, :5])
  with pytest.raises(ValueError, match='must be 2-D'):
    distance.cosine_distance(q[0], g)
  with pytest.raises(ValueError, match='block_size must be >= 1'):
    distance.euclidean_distance(q, g, block_size=0)


def test_empty_query():
  _, g = _features(4)
  assert distance.euclidean_distance(np.zeros((0, 24)), g).shape == (0, 53)


@pytest.mark.parametrize('name', distance.DISTANCES)
def test_distance_matrix(name):
  q, g = _features(5)
  expected = (distance.euclidean_distance(q, g) if name == 'euclidean' else
              distance.cosine_distance(q, g))
  np.testing.assert_array_equal(distance.distance_matrix(q, g, name), expected)
  with pytest.raises(ValueError, match="got distance='l1'"):
    distance.distance_matrix(q, g, 'l1')


def test_distance_matrix_memory_limit():
  q, g = _features(6)
  with pytest.raises(distance.MemoryLimitError,
                     match=r'A dense 37 x 53 euclidean distance matrix would need about '
                           r'0.00 GiB, more than the limit'):
    distance.distance_matrix(q, g, max_bytes=4 * 37 * 53 - 1)
  assert distance.distance_matrix(q, g, max_bytes=4 * 37 * 53).shape == (37, 53)
  # 11,659 x 1,000,000 float32: 43.4 GiB, refused with the default limit
  # (the arrays take no memory).
  big_q = np.broadcast_to(np.float32(0), (11659, 24))
  big_g = np.broadcast_to(np.float32(0), (1_000_000, 24))
  with pytest.raises(distance.MemoryLimitError, match=r'would need about 43\.43 GiB.*16\.00 GiB'):
    distance.distance_matrix(big_q, big_g)


@pytest.mark.parametrize('name', distance.DISTANCES)
def test_distance_tile(name):
  q, g = _features(7)
  q64, g64 = q.astype(np.float64), g.astype(np.float64)
  if name == 'euclidean':
    expected = ((q64[:, None, :] - g64[None, :, :])**2).sum(-1)
  else:
    expected = 1 - (q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ (
        g64 / np.linalg.norm(g64, axis=1, keepdims=True)).T
  got = distance.distance_tile(*distance.prepare_rows(q, name), *distance.prepare_rows(g, name),
                               name)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)
