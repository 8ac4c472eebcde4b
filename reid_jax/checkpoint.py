"""Checkpoints of the TrainState with orbax, kept in `<workdir>/checkpoints`: the API.

The training loop, evaluation, export and the tests use checkpoints through this
module; the work is done in three modules, one per responsibility:

- `checkpoint_layout`: what a checkpoint holds (the flax state dict, with a marker
  that tells it apart from another program's orbax checkpoint) and how it is laid out
  over several processes; the error classes.
- `checkpoint_save`: the workdir's managers (`<workdir>/checkpoints/<step>`, the
  latest `max_to_keep` steps; `<workdir>/checkpoints/best/<step>`, the best
  evaluation), `save` / `save_best`, saves that fail (disk full...) reported with the
  folder, its free space and the last complete checkpoint (`check_errors`), and
  `SavePolicy` (when to save).
- `checkpoint_restore`: `restore` (falling back past an unreadable latest step, which
  is moved aside) and `restore_from_path` (an explicit step folder, checkpoints folder
  or workdir, never changed).

Several processes (`jax.distributed`): every process calls `save` and `restore` at
the same steps, and the workdir must be on a filesystem shared by all hosts
(`reid_jax.multihost.check_shared_workdir` checks it at start-up). Workdirs are local
or shared (NFS-like) filesystems; cloud buckets are not supported here.
`reid_jax.workdir` keeps the lock and config files beside.
"""

from reid_jax.checkpoint_layout import CheckpointCorruptError
from reid_jax.checkpoint_layout import CheckpointMismatchError
from reid_jax.checkpoint_layout import CheckpointSaveError
from reid_jax.checkpoint_layout import FORMAT_NAME
from reid_jax.checkpoint_layout import FORMAT_VERSION
from reid_jax.checkpoint_layout import NotAReidCheckpointError
from reid_jax.checkpoint_layout import STATE_KEYS
from reid_jax.checkpoint_restore import restore
from reid_jax.checkpoint_restore import restore_from_path
from reid_jax.checkpoint_save import best_dir
from reid_jax.checkpoint_save import check_errors
from reid_jax.checkpoint_save import checkpoint_dir
from reid_jax.checkpoint_save import CheckpointManager
from reid_jax.checkpoint_save import create_best_manager
from reid_jax.checkpoint_save import create_manager
from reid_jax.checkpoint_save import read_only_manager
from reid_jax.checkpoint_save import save
from reid_jax.checkpoint_save import save_best
from reid_jax.checkpoint_save import SavePolicy

__all__ = [
    'CheckpointCorruptError',
    'CheckpointMismatchError',
    'CheckpointSaveError',
    'FORMAT_NAME',
    'FORMAT_VERSION',
    'NotAReidCheckpointError',
    'STATE_KEYS',
    'restore',
    'restore_from_path',
    'best_dir',
    'check_errors',
    'checkpoint_dir',
    'CheckpointManager',
    'create_best_manager',
    'create_manager',
    'read_only_manager',
    'save',
    'save_best',
    'SavePolicy',
]
