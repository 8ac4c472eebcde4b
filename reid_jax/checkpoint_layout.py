"""What a reid_jax checkpoint holds, and how it is laid out over processes.

A checkpoint is the TrainState's flax state dict (params, batch_stats, opt_state, step,
dynamic_scale), so that it can be read without the model code; every step carries
`MARKER` in orbax's step metadata, which tells it apart from another program's orbax
checkpoint (checkpoints of earlier reid_jax versions have no marker and the same
top-level keys, `STATE_KEYS`).

Several processes (`jax.distributed`): the state is saved as jax.Arrays replicated
over all the devices of all processes, which orbax writes with every process taking
part and every process reads back (`to_saved_tree`, `restore_target`); the processes
agree on a decision through `reid_jax.multihost.all_true`. Also the errors and message helpers that
saving (`checkpoint_save`) and restoring (`checkpoint_restore`) share.
"""

from typing import Any

import flax
import jax
import numpy as np

FORMAT_NAME = 'reid_jax'
FORMAT_VERSION = 1
MARKER = {'format': FORMAT_NAME, 'format_version': FORMAT_VERSION}
# The top-level keys of a TrainState's state dict (checkpoints without a marker).
STATE_KEYS = ('params', 'batch_stats', 'opt_state', 'step')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the state it is restored into."""


class NotAReidCheckpointError(ValueError):
  """A folder holds no reid_jax checkpoint (another program's, or other files)."""


class CheckpointCorruptError(ValueError):
  """A checkpoint's files are missing or damaged."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, ...)."""


def to_numpy_state_dict(state: Any) -> dict:
  """The state's flax state dict, every leaf a numpy array on the host."""
  return jax.tree.map(np.asarray, jax.device_get(flax.serialization.to_state_dict(state)))


def global_replicated() -> jax.sharding.NamedSharding:
  """A sharding replicating an array over every device of every process."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('replica',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def to_saved_tree(state: Any) -> dict:
  """What is saved: the numpy state dict; with several processes, global arrays.

  One process: numpy arrays. Several (`jax.distributed`): every leaf becomes a
  jax.Array replicated over all the devices of all processes (the state is the same
  on every process), so orbax's multi-host array handler writes it with every
  process taking part (replica-parallel: each writes a slice) and every process
  restores it (`restore_target`). Both kinds restore into either kind of run.
  """
  tree = to_numpy_state_dict(state)
  if jax.process_count() == 1:
    return tree
  sharding = global_replicated()
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def restore_target(target: dict) -> dict:
  """The restore target for `target` (numpy; abstract global arrays on several processes)."""
  if jax.process_count() == 1:
    return target
  sharding = global_replicated()
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      target)


def short_error(error: BaseException, limit: int = 400) -> str:
  """`Type: message`, without tensorstore's long spec, at most `limit` characters."""
  text = str(error).split(' [tensorstore_spec')[0]
  text = f'{type(error).__name__}: {text}'
  return text if len(text) <= limit else text[:limit] + '...'


def size_text(num_bytes: int) -> str:
  """A byte count in GiB (from 1 GiB) or MiB, for messages."""
  return (f'{num_bytes / 2**30:.2f} GiB' if num_bytes >= 2**30
          else f'{num_bytes / 2**20:.1f} MiB')

