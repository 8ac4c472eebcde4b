"""Tests of eval.query_expansion against fast-reid's aqe loop in numpy."""

import numpy as np
import pytest

from eval import query_expansion
from eval_reference import fastreid_aqe


def features(seed, num_q=23, num_g=70, dim=8):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(6, dim))
  q = centres[rng.integers(0, 6, num_q)] + 0.8 * rng.normal(size=(num_q, dim))
  g = centres[rng.integers(0, 6, num_g)] + 0.8 * rng.normal(size=(num_g, dim))
  return q.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize('qe_times, qe_k, alpha', [(1, 10, 3.0), (2, 5, 1.0), (1, 40, 3.0),
                                                   (3, 2, 2.0), (1, 1, 3.0)])
@pytest.mark.parametrize('block_size, column_block', [(7, 16), (256, 8192)])
def test_matches_fastreid(qe_times, qe_k, alpha, block_size, column_block):
  q, g = features(0)
  ref_q, ref_g = fastreid_aqe(q, g, qe_times, qe_k, alpha)
  got_q, got_g = query_expansion.aqe(q, g, qe_times, qe_k, alpha, block_size=block_size,
                                     column_block=column_block)
  assert got_q.shape == q.shape and got_g.shape == g.shape and got_q.dtype == np.float32
  scale = np.abs(ref_g).max()
  np.testing.assert_allclose(got_q, ref_q, rtol=0, atol=2e-5 * scale)
  np.testing.assert_allclose(got_g, ref_g, rtol=0, atol=2e-5 * scale)
  if qe_k > 1:  # the expansion changes the features
    assert np.abs(got_g - g).max() > 0.1 * scale


def test_negative_similarities_with_odd_alpha():
  # With qe_k = 40 of 93 points in 8-d, some neighbours have negative cosine.
  q, g = features(1)
  all_feat = np.concatenate([q, g])
  n = all_feat / np.linalg.norm(all_feat, axis=1, keepdims=True)
  assert (np.sort(n @ n.T, axis=1)[:, -40] < 0).any()
  ref_q, _ = fastreid_aqe(q, g, 1, 40, 3.0)
  got_q, _ = query_expansion.aqe(q, g, 1, 40, 3.0, block_size=5, column_block=11)
  np.testing.assert_allclose(got_q, ref_q, atol=2e-5 * np.abs(ref_q).max())


def test_zero_rounds_is_identity():
  q, g = features(2)
  got_q, got_g = query_expansion.aqe(q, g, qe_times=0)
  np.testing.assert_array_equal(got_q, q)
  np.testing.assert_array_equal(got_g, g)


def test_errors():
  q, g = features(3)
  with pytest.raises(ValueError, match='Feature dimensions differ'):
    query_expansion.aqe(q, g[:, :3])
  with pytest.raises(ValueError, match=r'qe_k must be in \[1, 93\]'):
    query_expansion.aqe(q, g, qe_k=94)
  with pytest.raises(ValueError, match='qe_times must be >= 0'):
    query_expansion.aqe(q, g, qe_times=-1)
  bad = g.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN or infinite'):
    query_expansion.aqe(q, bad)
