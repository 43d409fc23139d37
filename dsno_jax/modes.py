"""One small function per mode, each `mode(config, workdir)`; `pipeline` runs them in order.

Imports are inside the functions so that a mode loads only what it needs.
"""


def train_teacher(config, workdir: str):
  """Trains the teacher UNet on the config's image data; exports it to WORKDIR/teacher."""
  from dsno_jax.training import loop
  return loop.train_teacher(config, workdir)


def generate(config, workdir: str):
  """Solves the teacher's PF-ODE from seeded noise; writes the trajectory dataset."""
  from dsno_jax.data import generate as generate_lib
  return generate_lib.generate(config, workdir)


def train(config, workdir: str):
  """Trains the DSNO student on the trajectory dataset."""
  from dsno_jax.training import loop
  return loop.train_student(config, workdir)


def export(config, workdir: str):
  """Writes the EMA student and its config to WORKDIR/export."""
  from dsno_jax.training import checkpoints
  return checkpoints.export_student(config, workdir)


def sample(config, workdir: str):
  """Draws one-step samples from WORKDIR/export; writes .npz and PNGs."""
  from dsno_jax.evaluation import sampling
  return sampling.sample(config, workdir)


def evaluate(config, workdir: str):
  """Student at 1 NFE and teacher at several NFEs: FID (or FD-digits), table, plot."""
  from dsno_jax.evaluation import evaluate as evaluate_lib
  return evaluate_lib.evaluate(config, workdir)


def pipeline(config, workdir: str):
  """Every stage in order, skipping the finished ones and resuming a partial one."""
  from dsno_jax import pipeline as pipeline_lib
  return pipeline_lib.pipeline(config, workdir)


MODES = {f.__name__: f for f in (train_teacher, generate, train, export, sample, evaluate,
                                 pipeline)}


def run(mode: str, config, workdir: str):
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {sorted(MODES)}")
  return MODES[mode](config, workdir)
