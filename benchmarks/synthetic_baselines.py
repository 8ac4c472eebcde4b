"""Untrained baselines on the synthetic data set: how hard is it without learning?

Computes query-vs-gallery mAP / rank-1 (Market-1501 protocol: gallery images of the
query's pid taken by the query's camera are ignored, junk pid -1 is dropped,
distractors pid 0 stay) for

  raw      flattened pixels, L2-normalised, Euclidean distance
  rgb_hist joint 8x8x8 RGB histogram (Hellinger, i.e. sqrt then L2)
  hs_hist  hue-saturation 16x4 histogram of the image (brightness-invariant)
  rand_cnn (--rand_cnn) a randomly initialised 4-stage conv net, global average pool
  lda      (--lda) a *trained* linear proxy: PCA + LDA fitted on the train split over
           centre-weighted colour features; a lower bound of what learning can reach.

Usage:
  python -m input_pipeline.synthetic --out data/synthetic
  python benchmarks/synthetic_baselines.py --data_dir data/synthetic [--rand_cnn] [--lda]

Everything here is plain numpy (jax only for --rand_cnn) and independent of `eval`;
the metric is the numpy reference of the tests (tests/eval_reference.py).
"""

import argparse
import os
import pathlib
import re
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

_PATTERN = re.compile(r'([-\d]+)_c(\d)')


def load_split(folder: str, keep_junk: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Loads every JPEG of a Market-style folder.

  Args:
    folder: e.g. DIR/query.
    keep_junk: keep pid -1 images.

  Returns:
    (images uint8 (N, H, W, 3), pids int (N,), camids int (N,), 0-based).
  """
  images, pids, cams = [], [], []
  for name in sorted(os.listdir(folder)):
    if not name.endswith('.jpg'):
      continue
    pid, cam = map(int, _PATTERN.search(name).groups())
    if pid == -1 and not keep_junk:
      continue
    with Image.open(os.path.join(folder, name)) as im:
      images.append(np.asarray(im.convert('RGB')))
    pids.append(pid)
    cams.append(cam - 1)
  return np.stack(images), np.asarray(pids), np.asarray(cams)


def market_map(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
               q_cams: np.ndarray, g_cams: np.ndarray) -> tuple[float, float]:
  """Market-1501 mAP and rank-1 (tests/eval_reference.py's `reference_market`).

  Args:
    distmat: (num_query, num_gallery) distances.
    q_pids: query pids.
    g_pids: gallery pids.
    q_cams: query camera ids.
    g_cams: gallery camera ids.

  Returns:
    (mAP, rank-1 accuracy) over queries with at least one valid match.
  """
  tests = str(pathlib.Path(__file__).resolve().parents[1] / 'tests')
  if tests not in sys.path:
    sys.path.insert(0, tests)
  import eval_reference  # pylint: disable=g-import-not-at-top
  _, m_ap, _, per_query = eval_reference.reference_market(distmat, q_pids, g_pids, q_cams,
                                                          g_cams, 1)
  top1 = [first == 0 for _, _, first in per_query.values()]
  return float(m_ap), float(np.mean(top1))


def euclidean(q: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Squared Euclidean distance matrix between rows of q and g."""
  q = q.astype(np.float64)
  g = g.astype(np.float64)
  return (q * q).sum(1)[:, None] + (g * g).sum(1)[None] - 2.0 * q @ g.T


def l2n(x: np.ndarray) -> np.ndarray:
  """Row-wise L2 normalisation."""
  x = x.astype(np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def raw_features(images: np.ndarray) -> np.ndarray:
  """Flattened pixels, L2-normalised."""
  return l2n(images.reshape(len(images), -1))


def rgb_hist_features(images: np.ndarray, bins: int = 8) -> np.ndarray:
  """Joint RGB histogram (bins^3), Hellinger-mapped and L2-normalised."""
  q = (images.astype(np.int64) * bins) // 256
  idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
  idx = idx.reshape(len(images), -1)
  hist = np.stack([np.bincount(row, minlength=bins ** 3) for row in idx])
  return l2n(np.sqrt(hist / idx.shape[1]))


def _hsv(images: np.ndarray) -> np.ndarray:
  """RGB uint8 -> HSV float in [0, 1] via PIL."""
  return np.stack([np.asarray(Image.fromarray(im).convert('HSV')) for im in images]
                  ).astype(np.float64) / 255.0


def hs_hist_features(images: np.ndarray, h_bins: int = 16, s_bins: int = 4) -> np.ndarray:
  """Hue-saturation histogram (ignores brightness), Hellinger, L2-normalised."""
  hsv = _hsv(images)
  h = np.minimum((hsv[..., 0] * h_bins).astype(np.int64), h_bins - 1)
  s = np.minimum((hsv[..., 1] * s_bins).astype(np.int64), s_bins - 1)
  idx = (h * s_bins + s).reshape(len(images), -1)
  hist = np.stack([np.bincount(row, minlength=h_bins * s_bins) for row in idx])
  return l2n(np.sqrt(hist / idx.shape[1]))


def hs_centre_features(images: np.ndarray) -> np.ndarray:
  """Hue-saturation histogram of the central region only (mostly the person)."""
  _, h, w, _ = images.shape
  return hs_hist_features(np.ascontiguousarray(images[:, h // 16: h - h // 16, w // 4: w - w // 4]))


def rand_cnn_features(images: np.ndarray, seed: int = 0, widths: Sequence[int] = (32, 64, 128, 256),
                      batch: int = 256) -> np.ndarray:
  """Features of a randomly initialised conv net (He init, ReLU, stride 2, GAP).

  Args:
    images: uint8 (N, H, W, 3).
    seed: init seed.
    widths: channels of the four stride-2 3x3 conv stages.
    batch: images per forward pass.

  Returns:
    L2-normalised features (N, widths[-1]).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  kernels, cin = [], 3
  for cout in widths:
    kernels.append(jnp.asarray(rng.normal(0, np.sqrt(2.0 / (9 * cin)), (3, 3, cin, cout)),
                               jnp.float32))
    cin = cout
  mean = jnp.asarray([0.485, 0.456, 0.406], jnp.float32)
  std = jnp.asarray([0.229, 0.224, 0.225], jnp.float32)

  @jax.jit
  def forward(x):
    x = (x.astype(jnp.float32) / 255.0 - mean) / std
    for k in kernels:
      x = jax.lax.conv_general_dilated(x, k, (2, 2), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      # Per-channel standardisation over the batch, as BatchNorm at init would.
      x = (x - x.mean((0, 1, 2))) / (x.std((0, 1, 2)) + 1e-5)
      x = jax.nn.relu(x)
    return x.mean((1, 2))

  feats = [np.asarray(forward(jnp.asarray(images[i:i + batch])))
           for i in range(0, len(images), batch)]
  return l2n(np.concatenate(feats))


def colour_layout_features(images: np.ndarray) -> np.ndarray:
  """Centre-weighted colour statistics for the LDA proxy.

  Log-chromaticity and brightness of a 16x8 grid (camera casts and gains are
  multiplicative, so they become additive offsets a linear model can cancel), plus
  a hue-saturation histogram of the central region.

  Args:
    images: uint8 (N, H, W, 3).

  Returns:
    (N, D) float features.
  """
  n, h, w, _ = images.shape
  x = images.astype(np.float64) / 255.0 + 0.02
  grid = x.reshape(n, 16, h // 16, 8, w // 8, 3).mean((2, 4))
  logc = np.log(grid)
  bright = logc.mean(-1, keepdims=True)
  chroma = logc - bright
  return np.concatenate([chroma.reshape(n, -1), bright.reshape(n, -1),
                         4.0 * hs_centre_features(images)], 1)


def lda_projection(feats: np.ndarray, labels: np.ndarray, pca_dim: int = 200,
                   out_dim: int = 64, reg: float = 1e-3) -> Callable[[np.ndarray], np.ndarray]:
  """Fits PCA + LDA on labelled features.

  Args:
    feats: (N, D) train features.
    labels: (N,) identity labels.
    pca_dim: PCA dimension before LDA.
    out_dim: LDA output dimension.
    reg: ridge added to the within-class scatter (relative to its trace).

  Returns:
    A function mapping (M, D) features to L2-normalised (M, out_dim) embeddings.
  """
  mu = feats.mean(0)
  _, _, vt = np.linalg.svd(feats - mu, full_matrices=False)
  p = vt[:pca_dim].T
  z = (feats - mu) @ p
  classes = np.unique(labels)
  means = np.stack([z[labels == c].mean(0) for c in classes])
  within = sum(np.cov(z[labels == c].T, bias=True) * (labels == c).sum() for c in classes)
  within = within / len(z)
  within += reg * np.trace(within) / len(within) * np.eye(len(within))
  between = np.cov(means.T, bias=True)
  evals, evecs = np.linalg.eig(np.linalg.solve(within, between))
  order = np.argsort(-evals.real)[:out_dim]
  proj = p @ evecs[:, order].real
  return lambda f: l2n((f - mu) @ proj)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Prints the baselines' mAP and rank-1.

  Args:
    argv: command line arguments (default: sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='data/synthetic')
  parser.add_argument('--rand_cnn', action='store_true', help='random conv net baseline')
  parser.add_argument('--lda', action='store_true', help='trained linear proxy (PCA+LDA)')
  args = parser.parse_args(argv)

  q_img, q_pids, q_cams = load_split(os.path.join(args.data_dir, 'query'))
  g_img, g_pids, g_cams = load_split(os.path.join(args.data_dir, 'bounding_box_test'))
  print(f'query {len(q_img)} images / {len(set(q_pids))} ids, gallery {len(g_img)} images '
        f'(junk dropped, {int((g_pids == 0).sum())} distractors)')

  methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {
      'raw': raw_features, 'rgb_hist': rgb_hist_features, 'hs_hist': hs_hist_features,
      'hs_centre': hs_centre_features}
  if args.rand_cnn:
    methods['rand_cnn'] = rand_cnn_features
  if args.lda:
    t_img, t_pids, _ = load_split(os.path.join(args.data_dir, 'bounding_box_train'))
    project = lda_projection(colour_layout_features(t_img), t_pids)
    methods['lda'] = lambda im: project(colour_layout_features(im))

  for name, fn in methods.items():
    start = time.time()
    feats = fn(np.concatenate([q_img, g_img]))
    qf, gf = feats[:len(q_img)], feats[len(q_img):]
    m_ap, r1 = market_map(euclidean(qf, gf), q_pids, g_pids, q_cams, g_cams)
    print(f'{name:9s} mAP {m_ap:.3f}  rank-1 {r1:.3f}  ({time.time() - start:.1f}s)')


if __name__ == '__main__':
  main()
