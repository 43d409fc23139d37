"""Entry point: `python -m dsno_jax.main --config=configs/X.py --workdir=DIR --mode=MODE`.

Every config field is in configs/base.py, with its unit; override any of them on the command
line, e.g. --config.train.batch_size=64. --verbosity=1 shows the libraries' INFO lines and the
traceback of an error that is otherwise reported as its message alone.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# importing dsno_jax adds the XLA:CPU flag (dsno_jax/backend.py)
from dsno_jax import console, errors, lock, modes, parallel


def _summary(function) -> str:
  """The first clause of a docstring, as one line."""
  text = " ".join(function.__doc__.split())
  return text.split("; ")[0].split(". ")[0].rstrip(".")


__doc__ += "\nModes (--mode=MODE, each a function of dsno_jax/modes.py):\n" + "\n".join(
    f"  {name:<14} {_summary(function)}" for name, function in modes.MODES.items()) + "\n"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/ (every "
                                "field with its unit: configs/base.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, data, logs and pictures.")
flags.DEFINE_enum("mode", "pipeline", list(modes.MODES), "What to run (see the list above).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries(FLAGS.verbosity)
  try:
    modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except modes.Preempted as e:  # resume later: the launchers requeue on this status
    logging.warning("%s; exiting with status %d (resume later)", e, modes.PREEMPTED_EXIT_STATUS)
    sys.exit(modes.PREEMPTED_EXIT_STATUS)
  except Exception as e:  # pylint: disable=broad-except
    # with several processes: every process logs this one's error and exits now (status 1)
    parallel.fail_every_process(e)
    if isinstance(e, (errors.UserError, lock.WorkdirInUseError)):  # the message says what to fix
      logging.debug("traceback of the error below", exc_info=True)  # shown at --verbosity=1
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  app.run(main)
