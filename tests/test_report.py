"""Tests of eval.report: PNG sizes, layout and border colours."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eval import report


@pytest.fixture()
def images(tmp_path):
  """Five query and twelve gallery images of distinct flat colours and sizes."""
  def make(prefix, n):
    paths = []
    for i in range(n):
      p = tmp_path / f'{prefix}{i}.png'
      Image.new('RGB', (30 + i, 70), (10 * i, 100, 200 - 10 * i)).save(p)
      paths.append(str(p))
    return paths
  return make('q', 5), make('g', 12)


def _problem():
  rng = np.random.default_rng(0)
  q_pids = np.array([1, 2, 3, 4, 9])  # pid 9 has no gallery match
  g_pids = np.array([1, 1, 2, 2, 3, 3, 4, 4, 0, 0, 5, 6])
  q_camids = np.zeros(5, int)
  g_camids = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # g1: same pid+cam as q0
  return rng.random((5, 12)), q_pids, g_pids, q_camids, g_camids


def test_worst_queries_png(images, tmp_path):
  q_paths, g_paths = images
  distmat, q_pids, g_pids, q_camids, g_camids = _problem()
  out = tmp_path / 'worst.png'
  size = (40, 20)
  drawn = report.save_worst_queries_png(str(out), q_paths, g_paths, distmat, q_pids, g_pids,
                                        q_camids, g_camids, num_queries=3, top_k=5,
                                        image_size=size)
  img = Image.open(out).convert('RGB')
  assert img.size == report.grid_size(3, 5, size)
  assert img.size == (6 + 6 * (28 + 6) + 12, 6 + 3 * (48 + 14 + 6))
  # Rows: the three lowest APs among the four queries with a match.
  assert len(drawn.query) == 3 and 4 not in drawn.query
  assert np.all(np.diff(drawn.ap) >= 0)
  for r, q in enumerate(drawn.query):
    ranking = np.argsort(distmat[q], kind='stable')
    kept = [g for g in ranking if not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
    np.testing.assert_array_equal(drawn.gallery[r], kept[:5])
    np.testing.assert_array_equal(drawn.match[r], g_pids[kept[:5]] == q_pids[q])
    if q == 0:
      assert 1 not in drawn.gallery[r]  # same pid and camera: removed
    x, y = report.grid_cell_origin(r, 0, size)
    assert img.getpixel((x + 1, y + 1)) == report.QUERY_COLOUR
    assert img.getpixel((x + report.BORDER + 5, y + report.BORDER + 5)) == (10 * q, 100,
                                                                            200 - 10 * q)
    for c in range(5):
      x, y = report.grid_cell_origin(r, c + 1, size)
      colour = report.MATCH_COLOUR if drawn.match[r, c] else report.WRONG_COLOUR
      # All four sides of the frame.
      for px in [(x + 1, y + 20), (x + 25, y + 20), (x + 10, y + 1), (x + 10, y + 46)]:
        assert img.getpixel(px) == colour
      g = drawn.gallery[r, c]
      assert img.getpixel((x + 14, y + 24)) == (10 * g, 100, 200 - 10 * g)  # the image
  assert drawn.match.any() and not drawn.match.all()


@pytest.mark.parametrize('dist', ['euclidean', 'cosine'])
def test_worst_queries_from_features(images, tmp_path, dist):
  from eval import distance, metrics  # pylint: disable=g-import-not-at-top
  q_paths, g_paths = images
  _, *labels = _problem()
  rng = np.random.default_rng(1)
  q_feats = rng.integers(-3, 4, (5, 6)).astype(np.float32)
  g_feats = rng.integers(-3, 4, (12, 6)).astype(np.float32)
  distmat = distance.distance_matrix(q_feats, g_feats, dist)
  a = report.save_worst_queries_png(str(tmp_path / 'a.png'), q_paths, g_paths, distmat, *labels,
                                    num_queries=3, top_k=4)
  ranking = metrics.rank_features(q_feats, g_feats, *labels, dist, 10, block_size=2,
                                  gallery_block=5)
  b = report.save_worst_queries_from_features(str(tmp_path / 'b.png'), q_paths, g_paths,
                                              q_feats, g_feats, *labels, ranking, dist,
                                              num_queries=3, top_k=4)
  np.testing.assert_array_equal(a.query, b.query)
  np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(a.gallery, b.gallery)
  assert (np.asarray(Image.open(tmp_path / 'a.png')) == np.asarray(
      Image.open(tmp_path / 'b.png'))).all()


def test_missing_image_is_grey(images, tmp_path):
  q_paths, g_paths = images
  distmat, *labels = _problem()
  q_paths = ['/nonexistent.jpg'] + q_paths[1:]
  with pytest.warns(UserWarning, match='Cannot read'):
    drawn = report.save_worst_queries_png(str(tmp_path / 'm.png'), q_paths, g_paths, distmat,
                                          *labels, num_queries=4, top_k=2, image_size=(20, 10))
  r = list(drawn.query).index(0)
  x, y = report.grid_cell_origin(r, 0, (20, 10))
  assert Image.open(tmp_path / 'm.png').convert('RGB').getpixel((x + 8, y + 8)) == report.MISSING


def test_worst_queries_errors(images, tmp_path):
  q_paths, g_paths = images
  distmat, *labels = _problem()
  with pytest.raises(ValueError, match='length mismatch'):
    report.save_worst_queries_png(str(tmp_path / 'x.png'), q_paths[:2], g_paths, distmat, *labels)
  with pytest.raises(ValueError, match='must be >= 1'):
    report.save_worst_queries_png(str(tmp_path / 'x.png'), q_paths, g_paths, distmat, *labels,
                                  top_k=0)
  with pytest.raises(ValueError, match='No query has a valid match'):
    report.save_worst_queries_png(str(tmp_path / 'x.png'), q_paths, g_paths, distmat,
                                  np.full(5, 7), *labels[1:])


def test_cmc_plot(tmp_path):
  out = tmp_path / 'cmc.png'
  report.save_cmc_plot(str(out), np.linspace(0.8, 1.0, 50), label='baseline')
  assert Image.open(out).size == (600, 400)
  out2 = tmp_path / 'cmc2.png'
  report.save_cmc_plot(str(out2), {'a': [0.5, 0.7, 0.9], 'b': np.ones(3)}, figsize=(3, 2),
                       dpi=50)
  pixels = np.asarray(Image.open(out2).convert('RGB'))
  assert pixels.shape == (100, 150, 3)
  assert (pixels.min(-1) < 128).mean() > 0.01  # axes, text and curves were drawn


def test_import_selects_no_backend():
  code = ('import sys, eval.report; '
          'print("matplotlib.pyplot" in sys.modules, "matplotlib.backends" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=str(pathlib.Path(__file__).resolve().parents[1]))
  assert out.stdout.split() == ['False', 'False']
