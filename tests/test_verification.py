"""Tests of eval.verification against fast-reid's loop and sklearn's roc_curve,
both transcribed in numpy (tests/eval_reference.py) from their sources."""

import jax.numpy as jnp
import numpy as np
import pytest

from eval import verification
from eval_reference import fastreid_tpr_at_fpr

FPRS = (1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.25, 0.5, 0.77, 0.95)


def random_problem(seed, num_q=30, num_g=90, num_pids=8, num_cams=3, levels=12):
  rng = np.random.default_rng(seed)
  if levels:
    distmat = rng.integers(0, levels, (num_q, num_g)).astype(np.float32)
  else:
    distmat = rng.random((num_q, num_g), dtype=np.float32)
  q_pids = rng.integers(1, num_pids + 3, num_q)  # some without gallery match
  g_pids = rng.integers(0, num_pids + 1, num_g)
  q_camids = rng.integers(0, num_cams, num_q)
  g_camids = rng.integers(0, num_cams, num_g)
  return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('levels', [3, 12, 0])
def test_matches_fastreid(seed, levels):
  args = random_problem(seed, levels=levels)
  expected = fastreid_tpr_at_fpr(*args, FPRS)
  got = verification.tpr_at_fpr(*args, FPRS, block_size=7)
  assert list(got) == list(FPRS)
  for f in FPRS:
    assert got[f] == expected[f], (f, got[f], expected[f])
  # Non-trivial: the TPRs differ across the FPR range.
  assert len(set(got.values())) > 2


def _pair_problem(gen_values, imp_values):
  """One query, gallery with the given genuine and impostor distances."""
  gen_values, imp_values = np.asarray(gen_values), np.asarray(imp_values)
  distmat = np.concatenate([gen_values, imp_values]).astype(np.float32)[None]
  g_pids = np.r_[np.ones(len(gen_values), int), np.full(len(imp_values), 2)]
  return distmat, np.array([1]), g_pids, np.array([0]), np.ones(distmat.shape[1], int)


@pytest.mark.parametrize('gen, imp', [
    # Equal steps everywhere: sklearn drops every intermediate point.
    (np.arange(20), np.repeat(np.arange(20), 2)),
    # Genuine values above all impostors and below all impostors.
    (np.r_[50, 51, 52, np.arange(10)], np.arange(20, 40)),
    # Two distinct values only (no dropping), ties between the classes.
    ([1, 1, 2], [1, 2, 2, 2]),
    # Impostor-only runs between genuine values, repeated multiplicities.
    ([1, 1, 3, 3, 5, 5, 9], [0, 2, 2, 4, 4, 6, 7, 8, 9, 9, 10]),
])
def test_degenerate_curves(gen, imp):
  args = _pair_problem(gen, imp)
  fprs = tuple(np.linspace(0.0, 1.0, 41))
  expected = fastreid_tpr_at_fpr(*args, fprs)
  got = verification.tpr_at_fpr(*args, fprs)
  for f in fprs:
    assert got[f] == expected[f], (f, got[f], expected[f])


def test_jax_input_and_default_fprs():
  args = random_problem(3, num_q=40, num_g=150, levels=0)
  expected = fastreid_tpr_at_fpr(*args, verification.FAST_REID_FPRS)
  got = verification.tpr_at_fpr(jnp.asarray(args[0]), *args[1:])
  assert got == expected


def test_errors():
  distmat, q_pids, g_pids, q_camids, g_camids = random_problem(0)
  with pytest.raises(ValueError, match='Length mismatch'):
    verification.tpr_at_fpr(distmat, q_pids[:3], g_pids, q_camids, g_camids)
  bad = distmat.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    verification.tpr_at_fpr(bad, q_pids, g_pids, q_camids, g_camids)
  with pytest.raises(ValueError, match='needs genuine pairs'):
    verification.tpr_at_fpr(distmat, q_pids + 100, g_pids, q_camids, g_camids)
  with pytest.raises(ValueError, match='0 impostor pairs'):
    verification.tpr_at_fpr(np.zeros((1, 3)), [1], [1, 1, 1], [0], [1, 1, 1])
