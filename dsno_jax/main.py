"""Entry point: `python -m dsno_jax.main --config=configs/X.py --workdir=DIR --mode=MODE`."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# importing dsno_jax adds the XLA:CPU flag (dsno_jax/backend.py)
from dsno_jax import lock, modes, parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, data, logs and pictures.")
flags.DEFINE_enum("mode", "pipeline", list(modes.MODES), "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except modes.Preempted as e:  # resume later: the launchers requeue on this status
    logging.warning("%s; exiting with status %d (resume later)", e, modes.PREEMPTED_EXIT_STATUS)
    sys.exit(modes.PREEMPTED_EXIT_STATUS)
  except Exception as e:  # pylint: disable=broad-except
    # with several processes: every process logs this one's error and exits now (status 1)
    parallel.fail_every_process(e)
    if isinstance(e, lock.WorkdirInUseError):  # an expected situation: the message, no traceback
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  app.run(main)
