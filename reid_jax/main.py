"""Command line: `python -m reid_jax.main --config=configs/market.py --workdir=DIR`.

Only parses flags; the work is done by `reid_jax.train`, importable from notebooks.
Override any config field with `--config.<field>=<value>`; a misspelt field fails.
"""

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from reid_jax import train

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_bool('eval_only', False,
                  'Evaluate the latest checkpoint in --workdir (or --config.checkpoint).')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.INFO)
  py_logging.getLogger('absl').setLevel(py_logging.INFO)
  if FLAGS.eval_only:
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
