"""Tests of the streamed feature path (eval.feature_metrics) against numpy
references of the definitions and against evaluate() on the dense matrix."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from eval import distance
from eval import feature_metrics
from eval import metrics
from eval import verification
from eval_reference import fastreid_tpr_at_fpr, reference_market

FPRS = verification.FAST_REID_FPRS + (0.05, 0.2, 0.5)


def exact_problem(seed, dist, num_q=37, num_g=131, dim=32, num_pids=9, num_cams=3):
  """Features whose distances are exact in float32 whatever the summation order.

  Euclidean: small integers. Cosine: entries in {0, +-1} with exactly 16
  non-zeros (norm 4), so normalised entries are +-1/4 and cosines multiples
  of 1/16. Duplicated features (ties across and within identities), junk
  (same pid and camera), pid 0 distractors and queries without a match.
  """
  rng = np.random.default_rng(seed)

  def feats(n):
    if dist == 'euclidean':
      return rng.integers(-2, 3, (n, dim)).astype(np.float32)
    out = np.zeros((n, dim), np.float32)
    for row in out:
      row[rng.choice(dim, 16, replace=False)] = rng.choice([-1.0, 1.0], 16)
    return out

  q, g = feats(num_q), feats(num_g)
  g[5:12] = g[4]  # duplicates in the gallery
  q[3] = g[-1]  # a query equal to a gallery entry
  q_pids = rng.integers(1, num_pids + 3, num_q)  # pids > num_pids: no match
  g_pids = rng.integers(0, num_pids + 1, num_g)
  q_camids = rng.integers(0, num_cams, num_q)
  g_camids = rng.integers(0, num_cams, num_g)
  return q, g, q_pids, g_pids, q_camids, g_camids


def dense64(q, g, dist):
  """Float64 numpy distance matrix (exact for exact_problem)."""
  q, g = q.astype(np.float64), g.astype(np.float64)
  if dist == 'euclidean':
    return ((q[:, None] - g[None]) ** 2).sum(-1)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  return 1.0 - qn @ gn.T


@pytest.mark.parametrize('dist', distance.DISTANCES)
@pytest.mark.parametrize('block_size, gallery_block', [(5, 16), (8, 131), (37, 40), (64, 1000)])
def test_matches_reference_and_dense(dist, block_size, gallery_block):
  q, g, *labels = exact_problem(0, dist)
  ref_cmc, ref_map, ref_minp, per_query = reference_market(dense64(q, g, dist), *labels, 50)
  res = feature_metrics.rank_features(q, g, *labels, dist, 50, fprs=FPRS,
                                      block_size=block_size, gallery_block=gallery_block)
  np.testing.assert_allclose(res.cmc, ref_cmc, rtol=0, atol=1e-6)
  assert res.mAP == pytest.approx(ref_map, abs=1e-12)
  assert res.mINP == pytest.approx(ref_minp, abs=1e-12)
  np.testing.assert_array_equal(res.query, sorted(per_query))
  for i, qi in enumerate(res.query):
    assert (res.ap[i], res.inp[i], res.first_rank[i]) == pytest.approx(per_query[qi],
                                                                       abs=1e-12)
  # The same figures as evaluate() on the float32 dense matrix.
  dense = distance.distance_matrix(q, g, dist)
  cmc, m_ap, m_inp = metrics.evaluate(dense, *labels, 50)
  np.testing.assert_array_equal(res.cmc, cmc)
  assert (res.mAP, res.mINP) == pytest.approx((m_ap, m_inp), abs=1e-12)
  got = metrics.evaluate_features(q, g, *labels, dist, 50, block_size=block_size,
                                  gallery_block=gallery_block)
  np.testing.assert_array_equal(got[0], cmc)
  assert got[1:] == (res.mAP, res.mINP)
  # TPR@FPR from the same pass equals fast-reid's on the matrix.
  assert res.tpr_at_fpr == fastreid_tpr_at_fpr(dense64(q, g, dist), *labels, FPRS)


def test_ties_are_exercised():
  q, g, *labels = exact_problem(0, 'euclidean')
  d = dense64(q, g, 'euclidean')
  # Many exact ties between a positive and other kept entries.
  pos = labels[1][None] == labels[0][:, None]
  tied = [np.isin(d[i, pos[i]], d[i, ~pos[i]]).any() for i in range(len(q))]
  assert np.mean(tied) > 0.5


def test_continuous_features_match_dense():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(20, 64))
  q_pids, g_pids = rng.integers(0, 20, 90), rng.integers(0, 20, 700)
  q = (centres[q_pids] + 1.6 * rng.normal(size=(90, 64))).astype(np.float32)
  g = (centres[g_pids] + 1.6 * rng.normal(size=(700, 64))).astype(np.float32)
  q_camids, g_camids = rng.integers(0, 4, 90), rng.integers(0, 4, 700)
  labels = (q_pids, g_pids, q_camids, g_camids)
  for dist in distance.DISTANCES:
    cmc, m_ap, m_inp = metrics.evaluate(distance.distance_matrix(q, g, dist), *labels)
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # a positive's distance differing between tiles warns
      got = metrics.evaluate_features(q, g, *labels, dist, block_size=32, gallery_block=128)
    np.testing.assert_array_equal(got[0], cmc)
    assert got[1:] == pytest.approx((m_ap, m_inp), abs=1e-6)
    assert 0.1 < m_ap < 0.95  # not trivial


def test_jax_and_float64_inputs():
  q, g, *labels = exact_problem(2, 'euclidean', num_q=20, num_g=60)
  expected = metrics.evaluate_features(q, g, *labels, block_size=7, gallery_block=16)
  got = metrics.evaluate_features(jnp.asarray(q), jnp.asarray(g), *labels, block_size=7,
                                  gallery_block=16)
  np.testing.assert_array_equal(got[0], expected[0])
  assert got[1:] == expected[1:]
  got = metrics.evaluate_features(q.astype(np.float64), g.astype(np.float64), *labels,
                                  block_size=7, gallery_block=16)
  np.testing.assert_array_equal(got[0], expected[0])
  assert got[1:] == expected[1:]


@pytest.mark.parametrize('dist', distance.DISTANCES)
def test_nearest_kept(dist):
  q, g, q_pids, g_pids, q_camids, g_camids = exact_problem(3, dist)
  d = dense64(q, g, dist)
  top = feature_metrics.nearest_kept(q, g, q_pids, g_pids, q_camids, g_camids, k=12,
                                     distance=dist, block_size=6, gallery_block=17)
  assert top.shape == (len(q), 12)
  for i in range(len(q)):
    order = np.argsort(d[i], kind='stable')
    junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
    np.testing.assert_array_equal(top[i], order[~junk][:12])
  # Fewer kept entries than k: padded with -1.
  # Entry 0 is junk (same pid and camera): fewer kept entries than k.
  top = feature_metrics.nearest_kept(np.zeros((1, 2)), np.array([[1.0, 0], [0, 0], [3, 0]]),
                                     [1], [1, 1, 2], [0], [0, 1, 0], k=3, distance='euclidean')
  np.testing.assert_array_equal(top, [[1, 2, -1]])


def test_max_rank_clipped_with_warning():
  q, g, *labels = exact_problem(4, 'euclidean', num_q=10, num_g=12, num_pids=3)
  with pytest.warns(UserWarning, match='max_rank=50 exceeds the gallery size 12'):
    cmc, _, _ = metrics.evaluate_features(q, g, *labels)
  assert cmc.shape == (12,)


def test_errors():
  q, g, *labels = exact_problem(5, 'euclidean', num_q=6, num_g=20)
  with pytest.raises(ValueError, match='distance must be one of'):
    metrics.evaluate_features(q, g, *labels, 'manhattan', 10)
  with pytest.raises(ValueError, match='Feature dimensions differ'):
    metrics.evaluate_features(q, g[:, :5], *labels, max_rank=10)
  with pytest.raises(ValueError, match='Length mismatch: g_feats has 20 rows but g_pids'):
    metrics.evaluate_features(q, g, labels[0], labels[1][:4], *labels[2:], max_rank=10)
  with pytest.raises(ValueError, match='Empty gallery'):
    metrics.evaluate_features(q, g[:0], labels[0], labels[1][:0], labels[2], labels[3][:0],
                              max_rank=10)
  with pytest.raises(ValueError, match='block_size must be >= 1'):
    metrics.evaluate_features(q, g, *labels, max_rank=10, block_size=0)
  bad = g.copy()
  bad[7, 3] = np.nan
  with pytest.raises(ValueError, match='Non-finite distances'):
    metrics.evaluate_features(q, bad, *labels, max_rank=10)
  with pytest.raises(ValueError, match='q_feats contain NaN'):
    metrics.evaluate_features(np.full_like(q, np.inf), g, *labels, max_rank=10)
  with pytest.raises(ValueError, match='No query has a valid match'):
    metrics.evaluate_features(q, g, labels[0] + 100, *labels[1:], max_rank=10)
