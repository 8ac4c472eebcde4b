"""Evaluation across the processes of a multi-host run: gather, sharded ranking, results.

Each process embeds its own share of the test images (`reid_jax.features.extract_features`).
Then:

- `gather_rows`: every process sends the rows it embedded, once, in chunks of a fixed
  size (`multihost_utils.process_allgather` of (rows, D) features and their indices);
  each process ends with the (N, D) features, as one host holds them, plus temporaries
  of a fixed size (not growing with N or the process count).
- `rank_sharded`: CMC, mAP and mINP sharded by query blocks: each process ranks its
  block of queries (the queries in pid order, cut at multiples of the block size, as
  `eval.feature_metrics.rank_features` blocks them on one host) against the whole
  gallery, then the small per-query results (AP, INP, first rank) are gathered and
  combined on every process: the same numbers as `rank_features` on one process.
- `from_process_0`: what must run once (re-ranking, the CUHK03 protocol, TPR@FPR, AQE,
  reports, files) runs on process 0; its JSON result is broadcast to all processes
  (the loop and `checkpoint.save_best` run on every process and must agree); a failure
  there stops every process.

Single-process runs skip every collective here.
"""

import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from eval import feature_metrics
from eval import protocol
from reid_jax import multihost

# Bytes of one gather round (all processes' rows together); the temporaries of a round
# are a few times this, whatever the number of images or processes.
GATHER_CHUNK_BYTES = 64 * 2**20


def gather_rows(feats: np.ndarray, local_index: np.ndarray,
                chunk_bytes: int = GATHER_CHUNK_BYTES) -> np.ndarray:
  """Fills `feats` with every process's rows; returns how often each row was sent.

  A collective: every process calls it with its own rows. Each row travels once from
  the process that embedded it; a round gathers at most `chunk_bytes` from all
  processes together.

  Args:
    feats: (N, D) float32, the same shape on every process, holding this process's
      rows at `local_index`; the others' rows are written into it.
    local_index: the rows this process holds.
    chunk_bytes: bytes of all processes' rows in one round.

  Returns:
    (N,) int64: the number of processes that sent each row (1 everywhere when the
    processes' shares partition the rows).
  """
  num, dim = feats.shape
  local_index = np.asarray(local_index, np.int64)
  sent = np.zeros(num, np.int64)
  if jax.process_count() == 1:
    np.add.at(sent, local_index, 1)
    return sent
  shape = multihost.allgather(np.asarray([num, dim], np.int64))
  if np.any(shape != shape[:1]):
    raise ValueError(f'The processes gather features of different shapes: '
                     f'{[tuple(s) for s in shape.tolist()]}.')
  counts = multihost.allgather(np.asarray([len(local_index)], np.int64)).reshape(-1)
  me, count = jax.process_index(), jax.process_count()
  rows = max(1, int(chunk_bytes) // (count * max(dim, 1) * feats.itemsize))
  send = np.zeros((rows, dim), feats.dtype)
  for start in range(0, int(counts.max()), rows):
    index = local_index[start:start + rows]
    send[:len(index)] = feats[index]
    send[len(index):] = 0
    got = multihost.allgather(send)
    got_index = multihost.allgather(np.pad(index, (0, rows - len(index)), constant_values=-1))
    for p in range(count):
      valid = got_index[p] >= 0
      np.add.at(sent, got_index[p][valid], 1)
      if p != me:
        feats[got_index[p][valid]] = got[p][valid]
  return sent


def query_shards(q_pids: np.ndarray, num_shards: int, block_size: int) -> list[np.ndarray]:
  """The queries each process ranks: contiguous blocks of the queries in pid order.

  `rank_features` ranks queries in pid order (stable) in blocks of `block_size`; the
  shards cut that order at multiples of `block_size` (when there are at least as
  many blocks as shards), so each shard's blocks hold the queries of the blocks one
  host would rank (same tiles, so bitwise the same distances on XLA:CPU, unless the
  last shard is shorter than one block: then its tiles are narrower). Fewer blocks
  than shards: the queries are split evenly.

  Args:
    q_pids: (Q,) query identities.
    num_shards: the number of processes.
    block_size: `rank_features`'s queries per block.

  Returns:
    num_shards arrays of query indices (ascending pid, stable), covering each query
    once; some may be empty.
  """
  order = np.argsort(np.asarray(q_pids), kind='stable')
  num_q = len(order)
  num_blocks = -(-num_q // block_size)
  if num_blocks >= num_shards:
    bounds = [min(num_q, (p * num_blocks // num_shards) * block_size)
              for p in range(num_shards + 1)]
  else:
    bounds = [p * num_q // num_shards for p in range(num_shards + 1)]
  return [order[bounds[p]:bounds[p + 1]] for p in range(num_shards)]


def rank_sharded(q_feats: np.ndarray, g_feats: np.ndarray, q_pids: np.ndarray,
                 g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray,
                 distance: str, max_rank: int, *,
                 block_size: int = 256) -> protocol.RankingMetrics:
  """`rank_features` with the queries shared out between the processes (a collective).

  Every process holds all features; each ranks its shard of queries (`query_shards`)
  against the whole gallery; the per-query results are gathered and combined on every
  process, in query order, as `rank_features` returns them on one process.

  Args:
    q_feats: (Q, D) query features (all of them, prepared as for `rank_features`).
    g_feats: (G, D) gallery features.
    q_pids, g_pids, q_camids, g_camids: the labels.
    distance: one of `eval.distance.DISTANCES`.
    max_rank: length of the CMC curve (at most G).
    block_size: queries per tile (`rank_features`).

  Returns:
    The `eval.protocol.RankingMetrics` of all queries, without TPR@FPR; the same
    on every process.

  Raises:
    ValueError: as `rank_features` (on every process), e.g. no query has a positive.
    multihost.ProcessFailedError: another process failed ranking its shard.
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  mine = query_shards(q_pids, jax.process_count(), block_size)[jax.process_index()]
  query = np.zeros(0, np.int64)
  ap = inp = np.zeros(0, np.float64)
  first = np.zeros(0, np.int64)
  with multihost.together('ranking its share of the queries'):
    pos_q, _ = protocol.positive_pairs(q_pids[mine], g_pids, q_camids[mine], g_camids)
    if len(pos_q):  # rank_features refuses a shard without any positive
      res = feature_metrics.rank_features(
          q_feats[mine], g_feats, q_pids[mine], g_pids, q_camids[mine], g_camids,
          distance, max_rank, block_size=block_size)
      query = mine[res.query].astype(np.int64)
      ap, inp = res.ap.astype(np.float64), res.inp.astype(np.float64)
      first = res.first_rank.astype(np.int64)
  query, ap, inp, first = (np.concatenate(multihost.allgather_varlen(a))
                           for a in (query, ap, inp, first))
  if not len(query):
    raise ValueError('No query has a valid match in the gallery (same identity '
                     'seen by a different camera); metrics are undefined.')
  order = np.argsort(query, kind='stable')
  return protocol.ranking_metrics(query[order], ap[order], inp[order], first[order],
                                  min(int(max_rank), len(g_pids)))


def from_process_0(fn: Callable[[], Any], what: str) -> Any:
  """`fn()` run on process 0 only; its JSON-able result returned on every process.

  A collective (call on every process). On a single process, just `fn()`.

  Args:
    fn: the work; its result must survive `json.dumps` / `json.loads` (floats exactly).
    what: names the work in the other processes' error.

  Returns:
    Process 0's result, decoded from JSON on every process (process 0 included, so
    that all hold equal values).

  Raises:
    Whatever `fn` raises, on process 0; `multihost.ProcessFailedError` naming it on
    the others.
  """
  if jax.process_count() == 1:
    return fn()
  data, error = b'', None
  if jax.process_index() == 0:
    try:
      data = json.dumps({'ok': True, 'value': fn()}).encode()
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
      data = json.dumps({'ok': False, 'error': f'{type(e).__name__}: {e}'}).encode()
  data = multihost.broadcast_bytes(data)
  if error is not None:
    raise error
  payload = json.loads(data.decode())
  if not payload['ok']:
    raise multihost.ProcessFailedError(
        f'Process 0 failed while {what} ({payload["error"]}); process '
        f'{jax.process_index()} stops too.')
  return payload['value']

