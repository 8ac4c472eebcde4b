"""Time and peak memory of evaluation and re-ranking at Market-1501 / MSMT17 size.

Every stage runs in its own subprocess so that its peak RSS is its own: the
stage loads its inputs, resets the kernel's high-water mark
(/proc/self/clear_refs), runs, and reports wall time, the peak RSS *during*
the stage (VmHWM after the reset) and the process's overall peak (ru_maxrss).
Synthetic features are clustered by identity (plus a camera offset) so the
metrics are far from trivial.

Stages (Market size, 3,368 queries x 15,913 gallery, 2048-d):
  distance       eval.distance.euclidean_distance (squared, as BoT)
  evaluate       eval.metrics.evaluate, first call (with compilation) and warm
  evaluate_numpy torchreid/BoT per-query numpy loop (tests/eval_reference.py's
                 `reference_market`, with the baselines' default sort), same matrix
  rerank         eval.rerank.re_ranking
  rerank_baseline  the same with eval/rerank.py taken from --rerank_baseline
                 (e.g. `git show HEAD~1:eval/rerank.py > /tmp/rerank_before.py`),
                 --rerank_repeats times, alternating with `rerank`, each in a
                 fresh process: a side-by-side comparison on the same features
  rerank_numpy   the standard dense numpy re-ranking (float32 V; tests/eval_reference.py's
                 `reference_re_ranking`), same features
  features       eval.metrics.rank_features (streamed, no distance matrix) and,
                 in the same process, distance + evaluate on the dense matrix
                 (the same figures are checked), then with TPR@FPR
and at MSMT17 size (11,659 x 82,161, 2048-d):
  rerank_msmt    eval.rerank.re_ranking, then eval.metrics.evaluate on its
                 (11,659 x 82,161) output; rerank_msmt_baseline: the same with
                 --rerank_baseline's eval/rerank.py, when given
and MSMT17's queries against a gallery of --gallery images (MSMT17's 82,161
plus pid-0 distractors; default 1,000,000: 8.2 GB of float32 features):
  features_large eval.metrics.rank_features; the goal is a peak RSS of at
                 most the features' size + 2 GB.

Usage:
  .venv/bin/python benchmarks/eval_bench.py [--skip_numpy] [--skip_msmt]
      [--skip_market] [--skip_large] [--gallery N] [--workdir DIR] [--json OUT]
      [--rerank_baseline FILE --rerank_repeats N]
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MARKET = dict(num_query=3368, num_gallery=15913, num_ids=750, num_distractors=2793,
              num_cams=6)
MSMT = dict(num_query=11659, num_gallery=82161, num_ids=3060, num_distractors=0,
            num_cams=15)


# ----------------------------------------------------------------------------
# Synthetic data.


def make_problem(seed: int, num_query: int, num_gallery: int, num_ids: int,
                 num_distractors: int, num_cams: int, dim: int = 2048,
                 noise: float = 3.2, cam_offset: float = 0.5) -> dict[str, np.ndarray]:
  """Clustered unit-norm features with identities and cameras.

  Each feature is normalise(centre[pid] + cam_offset * camera[cam] + noise * z)
  with unit centres and camera directions and z ~ N(0, I / dim); distractors
  (pid 0, gallery only) are random directions.

  Args:
    seed: random seed.
    num_query: number of queries.
    num_gallery: number of gallery images (including distractors).
    num_ids: number of identities (1..num_ids).
    num_distractors: gallery images with pid 0.
    num_cams: number of cameras.
    dim: feature size.
    noise: noise norm relative to the identity centre.
    cam_offset: norm of the per-camera offset.

  Returns:
    Dict with q_feats, g_feats (float32), q_pids, g_pids, q_camids, g_camids.
  """
  rng = np.random.default_rng(seed)

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  centres = unit(rng.standard_normal((num_ids + 1, dim), dtype=np.float32))
  cams = unit(rng.standard_normal((num_cams, dim), dtype=np.float32))
  q_pids = rng.integers(1, num_ids + 1, num_query)
  g_pids = np.concatenate([rng.integers(1, num_ids + 1, num_gallery - num_distractors),
                           np.zeros(num_distractors, np.int64)])
  q_camids = rng.integers(0, num_cams, num_query)
  g_camids = rng.integers(0, num_cams, num_gallery)

  def feats(pids, camids):
    out = np.empty((len(pids), dim), np.float32)
    for start in range(0, len(pids), 8192):  # bounded temporaries
      p, c = pids[start:start + 8192], camids[start:start + 8192]
      x = rng.standard_normal((len(p), dim), dtype=np.float32) * (noise / np.sqrt(dim))
      base = np.where((p == 0)[:, None], unit(rng.standard_normal((len(p), dim),
                                                                  dtype=np.float32)),
                      centres[p])
      out[start:start + 8192] = unit(base + cam_offset * cams[c] + x)
    return out

  return dict(q_feats=feats(q_pids, q_camids), g_feats=feats(g_pids, g_camids),
              q_pids=q_pids, g_pids=g_pids, q_camids=q_camids, g_camids=g_camids)


# ----------------------------------------------------------------------------
# Reference numpy implementations (what the PyTorch baselines run).


def _eval_reference():
  """tests/eval_reference.py, the numpy references the tests use too."""
  tests = str(pathlib.Path(__file__).resolve().parents[1] / 'tests')
  if tests not in sys.path:
    sys.path.insert(0, tests)
  import eval_reference  # pylint: disable=g-import-not-at-top
  return eval_reference


# ----------------------------------------------------------------------------
# Stages (each in its own process).


def _rss_kb(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return -1


def _reset_peak() -> bool:
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


class _Meter:
  """Wall time, CPU time (user + system, all threads) and peak RSS of a stage.

  The peak is measured after the stage's inputs are loaded: the high-water mark
  is reset on entry, so `peak_rss_gb` includes the inputs already resident
  (`rss_before_gb`) plus what the stage adds.
  """

  def __enter__(self):
    self.rss_before_gb = _rss_kb('VmRSS') / 2**20
    self.reset = _reset_peak()
    self.cpu0 = os.times()
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.t0
    cpu1 = os.times()
    self.cpu_seconds = (cpu1.user - self.cpu0.user) + (cpu1.system - self.cpu0.system)
    self.peak_gb = _rss_kb('VmHWM') / 2**20 if self.reset else float('nan')
    self.process_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return False

  def record(self) -> dict[str, float]:
    return dict(seconds=round(self.seconds, 3), cpu_seconds=round(self.cpu_seconds, 3),
                load_avg_1min=round(os.getloadavg()[0], 2),
                rss_before_gb=round(self.rss_before_gb, 3),
                peak_rss_gb=round(self.peak_gb, 3),
                process_peak_rss_gb=round(self.process_peak_gb, 3))


def _load(workdir: pathlib.Path, name: str) -> np.ndarray:
  return np.load(workdir / f'{name}.npy')


def _labels(workdir):
  return [_load(workdir, n) for n in ('q_pids', 'g_pids', 'q_camids', 'g_camids')]


def large_problem(num_gallery: int) -> dict:
  """MSMT17-sized queries against `num_gallery` images (extra ones: pid 0)."""
  return make_problem(2, num_query=MSMT['num_query'], num_gallery=num_gallery,
                      num_ids=MSMT['num_ids'],
                      num_distractors=max(0, num_gallery - MSMT['num_gallery']),
                      num_cams=MSMT['num_cams'])


def _evaluate_twice(distmat: np.ndarray, labels, block_size: int) -> tuple[dict, dict, tuple]:
  """`eval.metrics.evaluate` measured on its first call (compiling) and warm.

  Returns:
    (first call's record, warm call's record, (cmc, mAP, mINP)).
  """
  from eval import metrics  # pylint: disable=g-import-not-at-top
  with _Meter() as first:
    metrics.evaluate(distmat, *labels, block_size=block_size)
  with _Meter() as warm:
    out = metrics.evaluate(distmat, *labels, block_size=block_size)
  return first.record(), warm.record(), out


def _module_from_file(name: str, path: str):
  """Imports a module from a file (another version of one of eval's modules)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_stage(stage: str, workdir: pathlib.Path, block_size: int,
              num_gallery: int = 1_000_000, rerank_baseline: str = '') -> dict:
  """Runs one stage in this process; returns its measurements."""
  # pylint: disable=g-import-not-at-top
  from eval import distance, metrics, rerank, verification
  rec: dict = {'stage': stage}
  if stage in ('rerank_baseline', 'rerank_msmt_baseline'):
    rerank = _module_from_file('rerank_baseline', rerank_baseline)
    rec.update(module=rerank_baseline)
  if stage == 'features':
    q, g = _load(workdir, 'q_feats'), _load(workdir, 'g_feats')
    labels = _labels(workdir)
    metrics.rank_features(q[:300], g, labels[0][:300], labels[1], labels[2][:300],
                          labels[3])  # compile outside the measurement
    with _Meter() as m:
      res = metrics.rank_features(q, g, *labels)
    rec.update(feature_path=m.record())
    with _Meter() as m:
      d = distance.euclidean_distance(q, g)
      cmc, mean_ap, minp = metrics.evaluate(d, *labels, block_size=block_size)
    rec.update(dense_distance_and_evaluate=m.record())
    del d
    with _Meter() as m:
      res_tpr = metrics.rank_features(q, g, *labels, fprs=verification.FAST_REID_FPRS)
    rec.update(feature_path_with_tpr=m.record())
    rec.update(rank1=float(res.cmc[0]), mAP=res.mAP, mINP=res.mINP,
               tpr_at_fpr={str(k): v for k, v in res_tpr.tpr_at_fpr.items()},
               max_abs_diff_cmc=float(np.abs(res.cmc - cmc).max()),
               abs_diff_mAP=abs(res.mAP - mean_ap), abs_diff_mINP=abs(res.mINP - minp))
  elif stage == 'features_large':
    with _Meter() as m_gen:
      prob = large_problem(num_gallery)
    rec.update(generate=m_gen.record())
    q, g = prob.pop('q_feats'), prob.pop('g_feats')
    labels = (prob['q_pids'], prob['g_pids'], prob['q_camids'], prob['g_camids'])
    rec.update(num_query=len(q), num_gallery=len(g),
               features_gb=round((q.nbytes + g.nbytes) / 2**30, 3))
    with _Meter() as m:
      res = metrics.rank_features(q, g, *labels)
    rec.update(feature_path=m.record())
    rec.update(peak_minus_features_gb=round(m.peak_gb - (q.nbytes + g.nbytes) / 2**30, 3),
               rank1=float(res.cmc[0]), mAP=res.mAP, mINP=res.mINP)
  elif stage == 'distance':
    q, g = _load(workdir, 'q_feats'), _load(workdir, 'g_feats')
    distance.euclidean_distance(q[:1024], g)  # compile outside the measurement
    with _Meter() as m:
      d = distance.euclidean_distance(q, g)
    rec.update(m.record())
    np.save(workdir / 'distmat.npy', d)
  elif stage == 'evaluate':
    first, warm, (cmc, mean_ap, minp) = _evaluate_twice(_load(workdir, 'distmat'),
                                                        _labels(workdir), block_size)
    rec.update(first_call=first, warm_call=warm)
    rec.update(rank1=float(cmc[0]), rank5=float(cmc[4]), mAP=mean_ap, mINP=minp)
    np.save(workdir / 'cmc_jax.npy', cmc)
    with open(workdir / 'metrics_jax.json', 'w') as f:
      json.dump(dict(mAP=mean_ap, mINP=minp), f)
  elif stage == 'evaluate_numpy':
    d = _load(workdir, 'distmat')
    labels = _labels(workdir)
    reference_market = _eval_reference().reference_market
    with _Meter() as m:
      cmc, mean_ap, minp = reference_market(d, *labels, 50, kind='quicksort')[:3]
    rec.update(m.record())
    rec.update(rank1=float(cmc[0]), mAP=float(mean_ap), mINP=float(minp))
    if (workdir / 'cmc_jax.npy').exists():
      ref = json.loads((workdir / 'metrics_jax.json').read_text())
      rec.update(max_abs_diff_cmc=float(np.abs(cmc - _load(workdir, 'cmc_jax')).max()),
                 abs_diff_mAP=abs(float(mean_ap) - ref['mAP']),
                 abs_diff_mINP=abs(float(minp) - ref['mINP']))
  elif stage in ('rerank', 'rerank_baseline'):
    q, g = _load(workdir, 'q_feats'), _load(workdir, 'g_feats')
    with _Meter() as m:
      out = rerank.re_ranking(q, g, 20, 6, 0.3)
    rec.update(m.record())
    if stage == 'rerank':
      np.save(workdir / 'rerank_jax.npy', out)
    else:
      rec.update(max_abs_diff=float(np.abs(out - _load(workdir, 'rerank_jax')).max()))
    cmc, mean_ap, minp = metrics.evaluate(out, *_labels(workdir))
    rec.update(rank1=float(cmc[0]), mAP=mean_ap, mINP=minp)
  elif stage == 'rerank_numpy':
    q, g = _load(workdir, 'q_feats'), _load(workdir, 'g_feats')
    reference_re_ranking = _eval_reference().reference_re_ranking
    with _Meter() as m:
      out = reference_re_ranking(q, g, 20, 6, 0.3)
    rec.update(m.record())
    if (workdir / 'rerank_jax.npy').exists():
      rec.update(max_abs_diff=float(np.abs(out - _load(workdir, 'rerank_jax')).max()))
  elif stage in ('rerank_msmt', 'rerank_msmt_baseline'):
    with _Meter() as m_gen:
      prob = make_problem(1, **MSMT)
    rec.update(generate=m_gen.record())
    q, g = prob.pop('q_feats'), prob.pop('g_feats')
    with _Meter() as m:
      out = rerank.re_ranking(q, g, 20, 6, 0.3)
    rec.update(m.record())
    del q, g
    labels = (prob['q_pids'], prob['g_pids'], prob['q_camids'], prob['g_camids'])
    first, warm, (cmc, mean_ap, minp) = _evaluate_twice(out, labels, block_size)
    rec.update(evaluate_first_call=first, evaluate_warm_call=warm)
    rec.update(rank1=float(cmc[0]), mAP=mean_ap, mINP=minp)
  else:
    raise ValueError(f'Unknown stage {stage!r}')
  return rec


def _spawn(stage: str, workdir: pathlib.Path, block_size: int, num_gallery: int,
           rerank_baseline: str = '') -> dict:
  """Runs a stage in a fresh interpreter and returns its JSON record."""
  cmd = [sys.executable, os.path.abspath(__file__), '--stage', stage, '--workdir',
         str(workdir), '--block_size', str(block_size), '--gallery', str(num_gallery),
         '--rerank_baseline', rerank_baseline]
  print(f'[eval_bench] {stage} ...', file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    return {'stage': stage, 'error': proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  """Parses flags and runs the benchmark (or a single stage with --stage)."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--skip_numpy', action='store_true',
                      help='skip the numpy reference stages (slow)')
  parser.add_argument('--skip_msmt', action='store_true', help='skip the MSMT17-size stage')
  parser.add_argument('--skip_market', action='store_true', help='skip the Market-size stages')
  parser.add_argument('--skip_large', action='store_true',
                      help='skip the streamed evaluation against a large gallery')
  parser.add_argument('--gallery', type=int, default=1_000_000,
                      help='gallery size of the features_large stage')
  parser.add_argument('--workdir', default='', help='scratch folder (default: a temp dir)')
  parser.add_argument('--json', default='', help='also write the results here')
  parser.add_argument('--block_size', type=int, default=128, help='evaluate() block size')
  parser.add_argument('--rerank_baseline', default='',
                      help='another eval/rerank.py to time side by side with the current one')
  parser.add_argument('--rerank_repeats', type=int, default=1,
                      help='runs of each re-ranking version (alternating, fresh processes)')
  parser.add_argument('--stage', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.rerank_baseline and not os.path.isfile(args.rerank_baseline):
    parser.error(f'--rerank_baseline: no file {args.rerank_baseline!r}')
  if args.rerank_repeats < 1:
    parser.error(f'--rerank_repeats must be >= 1, got {args.rerank_repeats}')

  if args.stage:
    print(json.dumps(run_stage(args.stage, pathlib.Path(args.workdir), args.block_size,
                               args.gallery, args.rerank_baseline)))
    return

  import jax  # pylint: disable=g-import-not-at-top
  env = dict(jax=jax.__version__, backend=jax.default_backend(),
             devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
             numpy=np.__version__)
  results: dict = {'env': env, 'stages': []}
  with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
    workdir = pathlib.Path(tmp)
    stages = []
    if not args.skip_market:
      prob = make_problem(0, **MARKET)
      for k, v in prob.items():
        np.save(workdir / f'{k}.npy', v)
      del prob
      stages += ['distance', 'evaluate', 'features']
      stages += [] if args.skip_numpy else ['evaluate_numpy']
      stages += ['rerank']
      stages += [] if args.skip_numpy else ['rerank_numpy']
      for i in range(args.rerank_repeats):  # alternating: rerank, baseline, rerank, ...
        stages += ['rerank_baseline'] if args.rerank_baseline else []
        stages += ['rerank'] if i < args.rerank_repeats - 1 else []
    if not args.skip_msmt:
      stages.append('rerank_msmt')
      stages += ['rerank_msmt_baseline'] if args.rerank_baseline else []
    if not args.skip_large:
      stages.append('features_large')
    for stage in stages:
      rec = _spawn(stage, workdir, args.block_size, args.gallery, args.rerank_baseline)
      results['stages'].append(rec)
      print(json.dumps(rec), flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
