"""Losses against loop references written from the definitions, and torch autograd."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from reid_jax import losses


def _pk_batch(rng: np.random.Generator, num_ids: int, k: int, dim: int,
              num_classes: int | None = None):
  """P identities x K instances, features clustered by identity, shuffled."""
  num_classes = num_classes or num_ids
  pids = rng.choice(num_classes, size=num_ids, replace=False)
  labels = np.repeat(pids, k)
  feats = rng.normal(size=(num_ids, 1, dim)) + 0.7 * rng.normal(
      size=(num_ids, k, dim))
  feats = feats.reshape(num_ids * k, dim)
  perm = rng.permutation(num_ids * k)
  return feats[perm].astype(np.float32), labels[perm].astype(np.int32)


def _ref_ce(logits: np.ndarray, labels: np.ndarray, eps: float) -> float:
  b, c = logits.shape
  total = 0.0
  for i in range(b):
    mx = max(logits[i])
    lse = mx + math.log(sum(math.exp(v - mx) for v in logits[i]))
    for j in range(c):
      target = (1 - eps) * (1.0 if j == labels[i] else 0.0) + eps / c
      total += -target * (logits[i, j] - lse)
  return total / b


def _ref_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      d2 = (sum(float(v) ** 2 for v in x[i]) + sum(float(v) ** 2 for v in y[j])
            - 2 * sum(float(a) * float(b) for a, b in zip(x[i], y[j])))
      out[i, j] = math.sqrt(max(d2, 1e-12))
  return out


def _ref_triplet(feats, labels, margin):
  n = len(feats)
  dist = _ref_dist(feats.astype(np.float64), feats.astype(np.float64))
  aps, ans, total = [], [], 0.0
  for i in range(n):
    ap = max(dist[i, j] for j in range(n) if labels[j] == labels[i])
    an = min(dist[i, j] for j in range(n) if labels[j] != labels[i])
    aps.append(ap)
    ans.append(an)
    if margin is None:
      total += math.log(1 + math.exp(-(an - ap)))
    else:
      total += max(0.0, -(an - ap) + margin)
  return total / n, np.array(aps), np.array(ans)


def _ref_center(feats, labels, centers):
  b, c = len(feats), len(centers)
  total = 0.0
  for i in range(b):
    for j in range(c):
      d = (sum(float(v) ** 2 for v in feats[i])
           + sum(float(v) ** 2 for v in centers[j])
           - 2 * sum(float(a) * float(q) for a, q in zip(feats[i], centers[j])))
      d = d * (1.0 if labels[i] == j else 0.0)
      total += min(max(d, 1e-12), 1e12)
  return total / b


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.3])
def test_cross_entropy_label_smooth(eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=6).astype(np.int32)
  got = losses.cross_entropy_label_smooth(logits, labels, eps)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _ref_ce(logits, labels, eps), rtol=1e-5)


def test_cross_entropy_half_inputs_computed_in_float32():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(4, 7)) * 4, jnp.bfloat16)
  labels = np.array([0, 3, 6, 2], np.int32)
  got = losses.cross_entropy_label_smooth(logits, labels, 0.1)
  assert got.dtype == jnp.float32
  ref = _ref_ce(np.asarray(logits, np.float64), labels, 0.1)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_euclidean_dist():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  y = rng.normal(size=(3, 4)).astype(np.float32)
  np.testing.assert_allclose(losses.euclidean_dist(x, y), _ref_dist(x, y),
                             rtol=1e-5, atol=1e-5)
  self_d = np.asarray(losses.euclidean_dist(x, x))
  assert np.all(np.diag(self_d) < 1e-3)


@pytest.mark.parametrize('margin', [0.3, None])
@pytest.mark.parametrize('num_ids,k', [(4, 4), (3, 2)])
def test_batch_hard_triplet(margin, num_ids, k):
  rng = np.random.default_rng(num_ids * 10 + k)
  feats, labels = _pk_batch(rng, num_ids, k, dim=6, num_classes=10)
  loss, ap, an = jax.jit(
      losses.batch_hard_triplet_loss, static_argnames='margin')(
          feats, labels, margin=margin)
  ref_loss, ref_ap, ref_an = _ref_triplet(feats, labels, margin)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ap, ref_ap, rtol=1e-5)
  np.testing.assert_allclose(an, ref_an, rtol=1e-5)


def test_triplet_normalize_feature():
  rng = np.random.default_rng(5)
  feats, labels = _pk_batch(rng, 3, 3, dim=5)
  normed = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
  loss, _, _ = losses.batch_hard_triplet_loss(
      feats, labels, 0.3, normalize_feature=True)
  np.testing.assert_allclose(loss, _ref_triplet(normed, labels, 0.3)[0],
                             rtol=1e-5, atol=1e-6)


def test_triplet_valid_mask_equals_subset():
  rng = np.random.default_rng(6)
  feats, labels = _pk_batch(rng, 4, 3, dim=5)
  valid = np.ones(len(labels), bool)
  valid[[1, 7]] = False
  loss, _, _ = losses.batch_hard_triplet_loss(feats, labels, 0.3, valid=valid)
  ref = _ref_triplet(feats[valid], labels[valid], 0.3)[0]
  np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)


def _torch_triplet(feats: torch.Tensor, labels: torch.Tensor, margin):
  """Transcription of BoT layers/triplet_loss.py (euclidean_dist, mining, loss)."""
  n = feats.size(0)
  xx = torch.pow(feats, 2).sum(1, keepdim=True).expand(n, n)
  dist = xx + xx.t()
  dist = torch.addmm(dist, feats, feats.t(), beta=1, alpha=-2)
  dist = dist.clamp(min=1e-12).sqrt()
  is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
  is_neg = labels.expand(n, n).ne(labels.expand(n, n).t())
  dist_ap, _ = torch.max(dist[is_pos].contiguous().view(n, -1), 1, keepdim=True)
  dist_an, _ = torch.min(dist[is_neg].contiguous().view(n, -1), 1, keepdim=True)
  dist_ap, dist_an = dist_ap.squeeze(1), dist_an.squeeze(1)
  y = torch.ones_like(dist_an)
  if margin is not None:
    return torch.nn.MarginRankingLoss(margin=margin)(dist_an, dist_ap, y)
  return torch.nn.SoftMarginLoss()(dist_an - dist_ap, y)


@pytest.mark.parametrize('margin', [0.3, None])
def test_triplet_gradient_matches_torch(margin):
  rng = np.random.default_rng(7)
  # Margin large enough that most anchors are active for the ranking loss.
  feats, labels = _pk_batch(rng, 4, 4, dim=8)
  m = None if margin is None else 3.0
  grad = jax.grad(lambda f: losses.batch_hard_triplet_loss(f, labels, m)[0])(
      jnp.asarray(feats))
  tf = torch.tensor(feats, dtype=torch.float64, requires_grad=True)
  loss = _torch_triplet(tf, torch.tensor(labels, dtype=torch.int64), m)
  loss.backward()
  assert np.abs(tf.grad.numpy()).sum() > 0
  np.testing.assert_allclose(grad, tf.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_center_loss():
  rng = np.random.default_rng(8)
  feats, labels = _pk_batch(rng, 3, 2, dim=4, num_classes=5)
  centers = rng.normal(size=(5, 4)).astype(np.float32)
  got = jax.jit(losses.center_loss)(feats, labels, centers)
  np.testing.assert_allclose(got, _ref_center(feats, labels, centers),
                             rtol=1e-5)


def test_center_loss_includes_clamped_zero_entries():
  # Features on their centers: every masked distance is ~0 and clamps to 1e-12,
  # so the loss is B*C*1e-12/B = C*1e-12 exactly as the baseline's clamp gives.
  centers = np.zeros((7, 3), np.float32)
  feats = np.zeros((4, 3), np.float32)
  labels = np.array([0, 1, 2, 3], np.int32)
  got = losses.center_loss(feats, labels, centers)
  np.testing.assert_allclose(got, _ref_center(feats, labels, centers),
                             rtol=1e-6)
  np.testing.assert_allclose(got, 7e-12, rtol=1e-6)


def test_init_centers_and_accuracy():
  c = losses.init_centers(jax.random.PRNGKey(0), 50, 40)
  assert c.shape == (50, 40) and c.dtype == jnp.float32
  assert abs(float(c.mean())) < 0.1 and abs(float(c.std()) - 1) < 0.1
  logits = np.array([[1., 2., 0.], [3., 0., 1.], [0., 0., 5.], [2., 1., 0.]])
  labels = np.array([1, 0, 1, 2])
  np.testing.assert_allclose(losses.accuracy(logits, labels), 0.5)
