"""Losses of the Bag-of-Tricks re-ID baseline, as pure jit-friendly functions.

Each function reproduces the corresponding PyTorch module of
michuanhaohao/reid-strong-baseline (`layers/triplet_loss.py`,
`layers/center_loss.py`) to the letter, including its numerical guards
(`clamp(min=1e-12)` before the square root, the `[1e-12, 1e12]` clamp of the
masked center-loss distance matrix). Inputs may be half precision; all the
arithmetic is done in float32 and matrix products use full float32 precision
(`Precision.HIGHEST`) so that the `xx + yy - 2xy` expansions do not lose the
small distances to TF32/bf16 matmul passes on accelerators.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def cross_entropy_label_smooth(
    logits: jax.Array, labels: jax.Array, epsilon: float = 0.1) -> jax.Array:
  """Cross entropy with label smoothing (BoT `CrossEntropyLabelSmooth`).

  Targets are `(1 - epsilon) * onehot(labels) + epsilon / C` and the loss is the
  batch mean of `sum_c -target_c * log_softmax(logits)_c`. `epsilon=0` gives the
  plain cross entropy.

  Args:
    logits: (B, C) class scores, any float dtype.
    labels: (B,) integer class indices in [0, C).
    epsilon: label-smoothing strength.

  Returns:
    Scalar float32 loss.
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = (1.0 - epsilon) * onehot + epsilon / num_classes
  return jnp.mean(jnp.sum(-targets * log_probs, axis=-1))


def euclidean_dist(x: jax.Array, y: jax.Array) -> jax.Array:
  """Pairwise Euclidean distances as the baseline computes them.

  `sqrt(clamp(||x_i||^2 + ||y_j||^2 - 2 x_i . y_j, min=1e-12))`, so the
  distance of a vector to itself is about 1e-6 and its gradient there is zero.

  Args:
    x: (M, D) features.
    y: (N, D) features.

  Returns:
    (M, N) float32 distance matrix.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  xx = jnp.sum(x * x, axis=1, keepdims=True)
  yy = jnp.sum(y * y, axis=1, keepdims=True).T
  dist = xx + yy - 2.0 * jnp.matmul(x, y.T, precision=_HIGHEST)
  return jnp.sqrt(jnp.maximum(dist, 1e-12))


def _normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """BoT `normalize`: `x / (||x||_2 + 1e-12)`."""
  return x / (jnp.linalg.norm(x, ord=2, axis=axis, keepdims=True) + 1e-12)


def batch_hard_triplet_loss(
    feats: jax.Array,
    labels: jax.Array,
    margin: Optional[float] = 0.3,
    normalize_feature: bool = False,
    valid: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Batch-hard triplet loss (BoT `TripletLoss` with `hard_example_mining`).

  For each anchor, `dist_ap` is the largest distance to a sample with the same
  label (the anchor itself included, at distance ~1e-6) and `dist_an` the
  smallest distance to a sample with another label. With a margin the loss is
  `MarginRankingLoss(dist_an, dist_ap, y=1)` = `mean(max(0, dist_ap - dist_an +
  margin))`; with `margin=None` it is `SoftMarginLoss(dist_an - dist_ap, y=1)` =
  `mean(log(1 + exp(dist_ap - dist_an)))`.

  Args:
    feats: (B, D) features (any float dtype; computed in float32).
    labels: (B,) integer identity labels.
    margin: ranking margin, or None for the soft margin.
    normalize_feature: L2-normalise the features first (BoT's option).
    valid: optional (B,) bool mask; invalid samples are neither anchors nor
      mined as positives/negatives, and the mean runs over valid anchors only.
      An anchor without any valid negative gets `dist_an = inf` (zero loss);
      the baseline has no such case (it would fail on the empty selection).

  Returns:
    `(loss, dist_ap, dist_an)`: scalar float32 loss and the (B,) mined
    distances (entries of invalid anchors are unspecified).
  """
  feats = jnp.asarray(feats, jnp.float32)
  if normalize_feature:
    feats = _normalize(feats, axis=-1)
  dist = euclidean_dist(feats, feats)
  same = labels[:, None] == labels[None, :]
  if valid is None:
    is_pos = same
    is_neg = ~same
  else:
    valid = jnp.asarray(valid, bool)
    is_pos = same & valid[None, :]
    is_neg = (~same) & valid[None, :]
  dist_ap = jnp.max(jnp.where(is_pos, dist, -jnp.inf), axis=1)
  dist_an = jnp.min(jnp.where(is_neg, dist, jnp.inf), axis=1)
  if margin is None:
    per_anchor = jax.nn.softplus(dist_ap - dist_an)
  else:
    per_anchor = jnp.maximum(0.0, dist_ap - dist_an + margin)
  if valid is None:
    loss = jnp.mean(per_anchor)
  else:
    num_valid = jnp.sum(valid.astype(jnp.float32))
    loss = jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(num_valid, 1.0)
  return loss, dist_ap, dist_an


def init_centers(rng: jax.Array, num_classes: int, feat_dim: int) -> jax.Array:
  """Initial center-loss centers, standard normal as `torch.randn`.

  Args:
    rng: a PRNG key.
    num_classes: number of identities C.
    feat_dim: feature dimension D.

  Returns:
    (C, D) float32 array.
  """
  return jax.random.normal(rng, (num_classes, feat_dim), jnp.float32)


def center_loss(
    feats: jax.Array, labels: jax.Array, centers: jax.Array) -> jax.Array:
  """Center loss exactly as BoT's `CenterLoss.forward`.

  `distmat = ||x_i||^2 + ||c_j||^2 - 2 x_i . c_j` (B x C), masked by the one-hot
  labels, then `clamp(distmat * mask, 1e-12, 1e12).sum() / B`. The clamp acts
  on the whole masked matrix, so each of the B*(C-1) zero entries contributes
  1e-12 too, as in the baseline.

  Args:
    feats: (B, D) features.
    labels: (B,) integer labels in [0, C).
    centers: (C, D) class centers.

  Returns:
    Scalar float32 loss.
  """
  feats = jnp.asarray(feats, jnp.float32)
  centers = jnp.asarray(centers, jnp.float32)
  batch_size = feats.shape[0]
  num_classes = centers.shape[0]
  distmat = (jnp.sum(feats * feats, axis=1, keepdims=True)
             + jnp.sum(centers * centers, axis=1, keepdims=True).T
             - 2.0 * jnp.matmul(feats, centers.T, precision=_HIGHEST))
  mask = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  dist = distmat * mask
  return jnp.sum(jnp.clip(dist, 1e-12, 1e12)) / batch_size


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy.

  Args:
    logits: (B, C) class scores.
    labels: (B,) integer labels.

  Returns:
    Scalar float32 fraction of samples whose arg-max is the label.
  """
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
