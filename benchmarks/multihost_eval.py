"""Peak memory per process and time of evaluation across 1, 2 and 4 processes.

MSMT17-size random features clustered by identity (11,659 query x 82,161 gallery,
2048-d float32: 0.72 GiB; `benchmarks/eval_bench.make_problem`) are written once to
a file. Then for each process count P, P processes of one jax.distributed run on
127.0.0.1 (JAX's CPU collectives, one CPU device each; P = 1: a plain single process,
what one host runs) each read their own share of the rows, as after feature
extraction (`reid_jax.features.extract_features`: each global batch of
`config.test.batch_size` images split in contiguous columns between the processes),
into an (N, D) array, then run what evaluation runs after extraction:
`multihost_eval.gather_rows` (each row sent once, in fixed-size rounds) and
`scoring.score_on_processes` (CMC/mAP/mINP with the queries shared out by blocks,
the rest on process 0, results broadcast).

Each process reports the time of the gather and of the scoring, its CPU seconds, and
its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the high-water mark of the
whole process: runtime, its features, the evaluation). The goal: the peak per process
does not grow with P (each holds the N x D features once, as one host does). The
metrics must be the same for every P.

`--baseline 2,4` also runs, at those process counts, what evaluation did before, for
comparison: every process gathers the dense (P, N, D) array
(`multihost_utils.process_allgather(feats).sum(0)`) and scores everything itself
(`scoring.score`); at MSMT17 size that needs about (P + 2) x 0.72 GiB per process.

Usage:
  .venv/bin/python benchmarks/multihost_eval.py [--quick] [--processes 1,2,4]
      [--baseline 2,4] [--workdir DIR] [--json OUT]
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

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZES = {
    'msmt17': dict(num_query=11659, num_gallery=82161, num_ids=3060, num_distractors=0,
                   num_cams=15, dim=2048),
    'quick': dict(num_query=1200, num_gallery=6000, num_ids=300, num_distractors=200,
                  num_cams=6, dim=256, noise=1.5),
}
TEST_BATCH = 128  # config.test.batch_size of configs/default.py


def _paths():
  for path in (REPO, REPO / 'benchmarks', REPO / 'tests'):
    if str(path) not in sys.path:
      sys.path.insert(0, str(path))


def write_problem(directory: str, size: str, seed: int = 0) -> dict:
  """Writes features.npy (queries then gallery, float32) and labels.npz; returns sizes."""
  _paths()
  import eval_bench  # pylint: disable=g-import-not-at-top
  params = dict(SIZES[size])
  p = eval_bench.make_problem(seed, **params)
  num_q, num_g = len(p['q_feats']), len(p['g_feats'])
  out = np.lib.format.open_memmap(os.path.join(directory, 'features.npy'), mode='w+',
                                  dtype=np.float32, shape=(num_q + num_g, params['dim']))
  out[:num_q], out[num_q:] = p['q_feats'], p['g_feats']
  out.flush()
  del out
  np.savez(os.path.join(directory, 'labels.npz'), q_pids=p['q_pids'], g_pids=p['g_pids'],
           q_camids=p['q_camids'], g_camids=p['g_camids'])
  return dict(num_query=num_q, num_gallery=num_g, dim=params['dim'])


def _share(num: int, process: int, count: int) -> list[slice]:
  """The rows a process embeds: its columns of every global batch (`extract_features`)."""
  per = TEST_BATCH // count
  return [slice(start + process * per, min(start + (process + 1) * per, num))
          for start in range(0, num, TEST_BATCH) if start + process * per < num]


def _read_share(path: str, process: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) zeros with this process's rows read in (no memory map: RSS = what is held)."""
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                   np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
    offset = f.tell()
    feats = np.zeros(shape, dtype)
    row_bytes = shape[1] * np.dtype(dtype).itemsize
    slices = _share(shape[0], process, count)
    for s in slices:
      f.seek(offset + s.start * row_bytes)
      f.readinto(memoryview(feats[s]).cast('B'))
  index = np.concatenate([np.arange(s.start, s.stop) for s in slices])
  return feats, index


def _peak_gb() -> float:
  """ru_maxrss in GB. A child's starts at its parent's high-water mark (Linux carries
  it over exec): `main` keeps the launching process small for that reason."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _vm_hwm_gb() -> float:
  """VmHWM of /proc/self/status (this process image's own high-water mark), in GB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024 / 1e9
  return float('nan')


def worker(args: argparse.Namespace) -> None:
  """One process: read its share, gather, score; writes process-<i>.json to args.out."""
  _paths()
  from reid_jax import multihost  # pylint: disable=g-import-not-at-top
  if args.coordinator_address:
    multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from input_pipeline.records import Record  # pylint: disable=g-import-not-at-top
  from reid_jax import multihost_eval  # pylint: disable=g-import-not-at-top
  from reid_jax import scoring  # pylint: disable=g-import-not-at-top
  me, count = jax.process_index(), jax.process_count()
  labels = np.load(os.path.join(args.data, 'labels.npz'))
  query = [Record('', int(p), int(c)) for p, c in zip(labels['q_pids'], labels['q_camids'])]
  gallery = [Record('', int(p), int(c)) for p, c in zip(labels['g_pids'], labels['g_camids'])]
  test_config = default.get_config().test
  feats, index = _read_share(os.path.join(args.data, 'features.npy'), me, count)
  held = _peak_gb()
  cpu0, t0 = time.process_time(), time.time()
  if args.mode == 'baseline':  # the evaluation before: a dense (P, N, D) gather
    if count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      feats = np.asarray(multihost_utils.process_allgather(feats)).sum(0)
  else:
    sent = multihost_eval.gather_rows(feats, index)
    assert np.all(sent == 1), 'a row was not sent exactly once'
  t1 = time.time()
  if args.mode == 'baseline':
    results = scoring.score(feats[:len(query)], feats[len(query):], query, gallery,
                            test_config)[0]
  else:
    results = scoring.score_on_processes(feats, len(query), query, gallery, test_config)
  t2 = time.time()
  record = dict(process=me, processes=count, mode=args.mode, gather_s=t1 - t0,
                score_s=t2 - t1, total_s=t2 - t0, cpu_s=time.process_time() - cpu0,
                rss_before_gb=held, peak_rss_gb=_peak_gb(), vm_hwm_gb=_vm_hwm_gb(),
                rows_held=len(index),
                **{k: results[k] for k in ('mAP', 'mINP', 'rank1', 'rank5')})
  with open(os.path.join(args.out, f'process-{me}.json'), 'w') as f:
    json.dump(record, f)


def run(count: int, data: str, out: str, mode: str, timeout: float) -> list[dict]:
  """`count` processes of `worker`; their records."""
  _paths()
  import multihost_harness  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  results = multihost_harness.run_processes(
      lambda i: [str(pathlib.Path(__file__).resolve()), '--worker', f'--data={data}', f'--out={out}', f'--mode={mode}'],
      count, log_dir=out, devices_per_process=1, timeout=timeout,
      coordinator_flags=count > 1)
  if any(r.returncode != 0 for r in results):
    raise RuntimeError(multihost_harness.format_logs(results))
  records = []
  for i in range(count):
    with open(os.path.join(out, f'process-{i}.json')) as f:
      records.append(json.load(f))
  return records


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='1,200 x 6,000, 256-d')
  parser.add_argument('--processes', default='1,2,4')
  parser.add_argument('--baseline', default='',
                      help='process counts (e.g. 2,4) at which to also run the dense '
                      '(P, N, D) gather with scoring on every process')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--json', default=None, help='write all records here')
  parser.add_argument('--timeout', type=float, default=3600)
  # Worker flags (`run` passes them; the harness appends the jax.distributed ones).
  parser.add_argument('--generate', default='', help=argparse.SUPPRESS)
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--data', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  parser.add_argument('--mode', default='sharded', help=argparse.SUPPRESS)
  parser.add_argument('--coordinator_address', help=argparse.SUPPRESS)
  parser.add_argument('--num_processes', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--process_id', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  if args.generate:
    print(json.dumps(write_problem(args.workdir, args.generate)))
    return
  size = 'quick' if args.quick else 'msmt17'
  workdir = args.workdir or tempfile.mkdtemp(prefix='multihost_eval_')
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  # In a subprocess: the processes started below inherit this one's peak RSS.
  shape = json.loads(subprocess.run(
      [sys.executable, str(pathlib.Path(__file__).resolve()), f'--generate={size}',
       f'--workdir={workdir}'], check=True, capture_output=True, text=True
  ).stdout.strip().splitlines()[-1])
  print(f'{size}: {shape["num_query"]} query x {shape["num_gallery"]} gallery, '
        f'{shape["dim"]}-d float32 '
        f'({(shape["num_query"] + shape["num_gallery"]) * shape["dim"] * 4 / 2**30:.2f} GiB)'
        f', written in {time.time() - start:.0f} s to {workdir}', flush=True)
  runs = [('sharded', int(c)) for c in args.processes.split(',')]
  runs += [('baseline', int(c)) for c in args.baseline.split(',') if c and int(c) > 1]
  records = []
  for mode, count in runs:
    out = os.path.join(workdir, f'{mode}-{count}')
    records += run(count, workdir, out, mode, args.timeout)
    last = records[-count:]
    print(f'  {mode} P={count}: max peak RSS {max(r["peak_rss_gb"] for r in last):.2f} GB, '
          f'{max(r["total_s"] for r in last):.1f} s', flush=True)
  print()
  print('| mode | P | process | rows held | gather s | scoring s | total s | CPU-s | '
        'RSS before gather GB | peak RSS GB | VmHWM GB | mAP | rank-1 |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in records:
    print(f'| {r["mode"]} | {r["processes"]} | {r["process"]} | {r["rows_held"]} | '
          f'{r["gather_s"]:.2f} | {r["score_s"]:.2f} | {r["total_s"]:.2f} | '
          f'{r["cpu_s"]:.1f} | {r["rss_before_gb"]:.3f} | {r["peak_rss_gb"]:.3f} | '
          f'{r["vm_hwm_gb"]:.3f} | {r["mAP"]:.6f} | {r["rank1"]:.6f} |')
  sharded = [r for r in records if r['mode'] == 'sharded']
  single = [r['peak_rss_gb'] for r in sharded if r['processes'] == 1]
  if single:
    worst = max(r['peak_rss_gb'] for r in sharded)
    print(f'\nPeak RSS per process: one process {single[0]:.3f} GB, worst of all runs '
          f'{worst:.3f} GB ({worst / single[0]:.2f}x): goal (not growing with the process '
          f'count) {"met" if worst <= single[0] * 1.10 else "NOT met"} (10% margin).')
  same = {(r['mAP'], r['mINP'], r['rank1'], r['rank5']) for r in sharded}
  print(f'Metrics identical across process counts: {len(same) == 1}.')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=2)


if __name__ == '__main__':
  main()
