"""Command line: `python -m reid_jax.main --config=configs/market.py --workdir=DIR`.

Only parses flags; the work is done by `reid_jax.train` (training) and
`reid_jax.eval_only` (--eval_only), importable from notebooks. The final results
table goes to stdout (process 0), the log to stderr.
Override any config field with `--config.<field>=<value>`; a misspelt field fails.
On several hosts, start one process per host with the same --coordinator_address,
--num_processes and each its own --process_id, or let JAX detect them (SLURM, Cloud
TPU pod slices, Open MPI, Kubernetes): see `reid_jax.multihost` and README's "Many
machines".
"""

import logging as py_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_bool('eval_only', False,
                  'Evaluate the latest checkpoint in --workdir (or --config.checkpoint).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, to run on several hosts (jax.distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (jax.distributed).')
flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')
flags.DEFINE_list('local_device_ids', None,
                  'Local device ids this process uses, e.g. 0,1,2,3 (jax.distributed; '
                  'under SLURM JAX otherwise gives each process the GPU SLURM_LOCALID).')
flags.DEFINE_bool('cpu_xla_flags', True,
                  'On CPU-only installs, add reid_jax.cpu_tuning.CPU_XLA_FLAGS to '
                  'XLA_FLAGS (about 2x faster training steps).')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietCheckpointLogs(py_logging.Filter):
  """Drops orbax's per-save INFO lines; its warnings and errors still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  if FLAGS.cpu_xla_flags:
    # Before anything starts JAX's backends.
    from reid_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
    added = cpu_tuning.set_cpu_xla_flags()
    if added:
      logging.info('CPU run: added %s to XLA_FLAGS.', ' '.join(added))
  # tf.data only: keep TensorFlow off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from reid_jax import multihost  # pylint: disable=g-import-not-at-top
  multihost.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                  FLAGS.local_device_ids)
  from reid_jax import eval_only  # pylint: disable=g-import-not-at-top
  from reid_jax import train  # pylint: disable=g-import-not-at-top
  from reid_jax import preemption  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.eval_only:
      eval_only.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.PreemptedError as e:
    logging.warning('%s', e)
    sys.exit(130 if 'SIGINT' in str(e) else 143)


if __name__ == '__main__':
  app.run(main)
