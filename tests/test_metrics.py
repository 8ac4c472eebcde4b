"""Tests of eval.metrics against per-query numpy loops written from the definitions."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from eval import metrics
import eval_reference
from eval_reference import reference_cuhk03_cmc


def reference_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
  """(cmc, mAP, mINP) of the shared numpy reference (tests/eval_reference.py)."""
  return eval_reference.reference_market(distmat, q_pids, g_pids, q_camids, g_camids,
                                         max_rank)[:3]


def random_problem(seed, num_q=40, num_g=200, num_pids=12, num_cams=3, integer=True):
  """Random distances (integer-valued: many ties) and labels.

  Labels include pids absent from the gallery (queries without matches), pid 0
  distractors and plenty of same-pid-same-camera (removed) entries.
  """
  rng = np.random.default_rng(seed)
  if integer:
    distmat = rng.integers(0, 15, (num_q, num_g)).astype(np.float32)
  else:
    distmat = rng.random((num_q, num_g), dtype=np.float32)
  q_pids = rng.integers(1, num_pids + 3, num_q)  # pids > num_pids: not in gallery
  g_pids = rng.integers(0, num_pids + 1, num_g)  # 0: distractors
  q_camids = rng.integers(0, num_cams, num_q)
  g_camids = rng.integers(0, num_cams, num_g)
  return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('integer', [True, False])
def test_market_matches_reference(seed, integer):
  args = random_problem(seed, integer=integer)
  ref_cmc, ref_map, ref_minp = reference_market(*args, max_rank=50)
  cmc, mean_ap, minp = metrics.evaluate(*args, max_rank=50)
  assert cmc.shape == (50,) and cmc.dtype == np.float32
  np.testing.assert_allclose(cmc, ref_cmc, rtol=0, atol=1e-6)
  assert mean_ap == pytest.approx(ref_map, abs=1e-12)
  assert minp == pytest.approx(ref_minp, abs=1e-12)
  # Sanity: the problem has queries without matches and removed entries.
  _, q_pids, g_pids, q_camids, g_camids = args
  assert not np.isin(q_pids, g_pids).all()


def test_hand_computed_example():
  # Gallery order by distance: neg, pos, junk (same pid, same cam), neg, pos.
  distmat = np.array([[0.1, 0.2, 0.25, 0.3, 0.4]])
  g_pids = np.array([2, 1, 1, 3, 1])
  g_camids = np.array([1, 1, 0, 1, 2])
  cmc, mean_ap, minp = metrics.evaluate(distmat, np.array([1]), g_pids, np.array([0]),
                                        g_camids, max_rank=4)
  np.testing.assert_array_equal(cmc, [0, 1, 1, 1])
  assert mean_ap == pytest.approx((1 / 2 + 2 / 4) / 2)
  assert minp == pytest.approx(2 / 4)


def test_ties_broken_by_gallery_index():
  distmat = np.zeros((1, 4), np.float32)  # all tied
  args = (np.array([5]), np.array([7, 5, 8, 5]), np.array([0]), np.array([1, 1, 1, 1]))
  cmc, mean_ap, minp = metrics.evaluate(distmat, *args, max_rank=4)
  np.testing.assert_array_equal(cmc, [0, 1, 1, 1])
  assert mean_ap == pytest.approx((1 / 2 + 2 / 4) / 2)
  assert minp == pytest.approx(0.5)


@pytest.mark.parametrize('block_size', [1, 3, 7, 64, 1000])
def test_block_size_independent(block_size):
  args = random_problem(11, num_q=30, num_g=120)
  expected = metrics.evaluate(*args, block_size=128)
  got = metrics.evaluate(*args, block_size=block_size)
  np.testing.assert_array_equal(got[0], expected[0])
  assert got[1:] == expected[1:]


def test_jax_array_and_string_labels():
  distmat, q_pids, g_pids, q_camids, g_camids = random_problem(3)
  expected = metrics.evaluate(distmat, q_pids, g_pids, q_camids, g_camids)
  got = metrics.evaluate(jnp.asarray(distmat), q_pids.astype(str), g_pids.astype(str),
                         q_camids, g_camids)
  np.testing.assert_array_equal(got[0], expected[0])
  assert got[1:] == expected[1:]


def test_max_rank_clipped_with_warning():
  args = random_problem(5, num_q=20, num_g=12, num_pids=4)
  with pytest.warns(UserWarning, match='max_rank=50 exceeds the gallery size 12'):
    cmc, mean_ap, minp = metrics.evaluate(*args, max_rank=50)
  ref_cmc, ref_map, ref_minp = reference_market(*args, max_rank=12)
  assert cmc.shape == (12,)
  np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
  assert (mean_ap, minp) == pytest.approx((ref_map, ref_minp), abs=1e-12)


def test_per_query_results_of_rank_distances():
  args = random_problem(8)
  out = metrics.rank_distances(*args, block_size=5)
  distmat, q_pids, g_pids, q_camids, g_camids = args
  for i, q in enumerate(out.query):
    one = (distmat[q:q + 1], q_pids[q:q + 1], g_pids, q_camids[q:q + 1], g_camids)
    cmc, ap, inp = reference_market(*one, max_rank=distmat.shape[1])
    assert out.ap[i] == pytest.approx(ap, abs=1e-12)
    assert out.inp[i] == pytest.approx(inp, abs=1e-12)
    assert out.first_rank[i] == np.argmax(cmc > 0)
  _, mean_ap, _ = metrics.evaluate(*args)
  assert np.mean(out.ap) == pytest.approx(mean_ap, abs=1e-12)


def test_cuhk03_matches_reference_with_same_draws():
  args = random_problem(2, num_q=30, num_g=150, num_pids=40, num_cams=2)
  cmc, mean_ap, minp = metrics.evaluate(*args, max_rank=20, protocol='cuhk03', seed=3,
                                        block_size=7)
  queries, sel = metrics.cuhk03_samples(*args[1:], seed=3, block_size=5)
  assert sel.shape[0] == 10
  ref_cmc = reference_cuhk03_cmc(*args, max_rank=20, queries=queries, sel=sel)
  np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
  # AP and mINP are computed over the whole kept gallery, as torchreid's AP.
  _, ref_map, ref_minp = reference_market(*args, max_rank=20)
  assert (mean_ap, minp) == pytest.approx((ref_map, ref_minp), abs=1e-12)


def test_cuhk03_draws_are_valid_and_seeded():
  _, q_pids, g_pids, q_camids, g_camids = random_problem(4, num_q=25, num_g=120)
  queries, sel = metrics.cuhk03_samples(q_pids, g_pids, q_camids, g_camids, seed=1)
  identities = np.unique(g_pids)
  assert sel.shape == (10, len(queries), len(identities))
  for r in range(sel.shape[0]):
    for b, q in enumerate(queries):
      drawn = sel[r, b]
      np.testing.assert_array_equal(np.sort(g_pids[drawn]), identities)
      own = drawn[g_pids[drawn] == q_pids[q]]
      assert len(own) == 1 and g_camids[own[0]] != q_camids[q]
  _, again = metrics.cuhk03_samples(q_pids, g_pids, q_camids, g_camids, seed=1,
                                    block_size=4)
  np.testing.assert_array_equal(again, sel)
  _, other = metrics.cuhk03_samples(q_pids, g_pids, q_camids, g_camids, seed=2)
  assert not np.array_equal(other, sel)


def test_cuhk03_draws_are_uniform():
  # Query pid 1 (camera 0) has three positives on camera 1 and one removed
  # entry; identities 2, 3 and 4 have 1, 2 and 4 gallery entries.
  g_pids = np.array([1, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4])
  g_camids = np.array([0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  repeats = 3000
  _, sel = metrics.cuhk03_samples([1], g_pids, [0], g_camids, num_repeats=repeats, seed=7)
  counts = np.bincount(sel.reshape(-1), minlength=len(g_pids)) / repeats
  expected = [0, 1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 4, 1 / 4]
  np.testing.assert_allclose(counts, expected, atol=0.04)


def test_cuhk03_single_shot_gallery_equals_market():
  # With one gallery image per identity, every draw is the whole gallery.
  rng = np.random.default_rng(0)
  g_pids = np.arange(30)
  q_pids = rng.integers(0, 30, 12)
  distmat = rng.random((12, 30))
  q_camids, g_camids = np.zeros(12, int), np.ones(30, int)
  market = metrics.evaluate(distmat, q_pids, g_pids, q_camids, g_camids, 10)
  cuhk03 = metrics.evaluate(distmat, q_pids, g_pids, q_camids, g_camids, 10,
                            protocol='cuhk03', num_repeats=3)
  np.testing.assert_allclose(cuhk03[0], market[0], atol=1e-7)
  assert cuhk03[1:] == pytest.approx(market[1:])


def test_cuhk03_block_size_independent():
  args = random_problem(6, num_q=30, num_g=100)
  expected = metrics.evaluate(*args, protocol='cuhk03', block_size=128)
  got = metrics.evaluate(*args, protocol='cuhk03', block_size=4)
  np.testing.assert_array_equal(got[0], expected[0])
  assert got[1:] == expected[1:]


def _labels(num_q, num_g):
  return (np.zeros(num_q, int), np.zeros(num_g, int), np.zeros(num_q, int),
          np.ones(num_g, int))


@pytest.mark.parametrize('position, match', [
    (0, 'distmat has 3 rows but q_pids has 2'),
    (1, 'distmat has 4 columns but g_pids has 5'),
    (2, 'distmat has 3 rows but q_camids has 1'),
    (3, 'distmat has 4 columns but g_camids has 0'),
])
def test_length_mismatch(position, match):
  labels = list(_labels(3, 4))
  labels[position] = np.zeros([2, 5, 1, 0][position], int)
  with pytest.raises(ValueError, match=f'Length mismatch: {match}'):
    metrics.evaluate(np.zeros((3, 4)), *labels)


@pytest.mark.filterwarnings('ignore:max_rank')
def test_errors():
  with pytest.raises(ValueError, match='Empty query set'):
    metrics.evaluate(np.zeros((0, 4)), *_labels(0, 4))
  with pytest.raises(ValueError, match='Empty gallery'):
    metrics.evaluate(np.zeros((3, 0)), *_labels(3, 0))
  distmat = np.zeros((3, 4))
  distmat[1, 2] = np.nan
  with pytest.raises(ValueError, match='distmat contains NaN'):
    metrics.evaluate(distmat, *_labels(3, 4))
  with pytest.raises(ValueError, match='distmat contains NaN'):
    metrics.evaluate(jnp.asarray(distmat), *_labels(3, 4))
  # Every gallery entry of the query pid is from the query's camera.
  with pytest.raises(ValueError, match='No query has a valid match'):
    metrics.evaluate(np.zeros((3, 4)), np.zeros(3), np.zeros(4), np.ones(3), np.ones(4))
  with pytest.raises(ValueError, match='No query has a valid match'):
    metrics.evaluate(np.zeros((3, 4)), np.ones(3), np.zeros(4), np.zeros(3), np.ones(4))
  with pytest.raises(ValueError, match='distmat must be 2-D'):
    metrics.evaluate(np.zeros(4), *_labels(1, 4))
  with pytest.raises(ValueError, match='q_pids must be 1-D'):
    metrics.evaluate(np.zeros((3, 4)), np.zeros((3, 1)), *_labels(3, 4)[1:])
  with pytest.raises(ValueError, match="protocol must be one of 'market', 'cuhk03'"):
    metrics.evaluate(np.zeros((3, 4)), *_labels(3, 4), protocol='duke')
  with pytest.raises(ValueError, match='max_rank must be >= 1'):
    metrics.evaluate(np.zeros((3, 4)), *_labels(3, 4), max_rank=0)
  with pytest.raises(ValueError, match='block_size must be >= 1'):
    metrics.evaluate(np.zeros((3, 4)), *_labels(3, 4), block_size=0)
  with pytest.raises(ValueError, match='num_repeats must be >= 1'):
    metrics.evaluate(np.zeros((3, 4)), *_labels(3, 4), protocol='cuhk03', num_repeats=0)


def test_infinite_distances_are_allowed():
  distmat = np.array([[np.inf, 1.0, np.inf]])
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    cmc, mean_ap, _ = metrics.evaluate(distmat, [1], [1, 2, 1], [0], [1, 1, 1], max_rank=3)
  np.testing.assert_array_equal(cmc, [0, 1, 1])
  assert mean_ap == pytest.approx((1 / 2 + 2 / 3) / 2)
