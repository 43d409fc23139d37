"""Every input a mode will need that no earlier stage writes, checked on each host before any work.

A run that would stop days later for a missing file (Inception weights, reference statistics,
a data set never prepared) or start work nobody asked for (training a published teacher from
scratch) is refused at once, with one message listing everything to fix.
"""
import os
from typing import Callable, Dict, List, Optional

from dsno_jax import storage
from dsno_jax.errors import UserError
from dsno_jax.workdir import Workdir

Check = Callable[[object, str], Optional[str]]  # (config, workdir) -> what is missing, or None


def _data(split_field: str) -> Check:
  def check(config, workdir):
    from dsno_jax.data import images
    return images.missing(config, workdir, config.data[split_field])
  return check


def _teacher(config, workdir):
  from dsno_jax.teachers import loading
  return loading.missing_teacher(config, workdir)


def _trajectories(config, workdir):
  from dsno_jax.data import trajectories
  directory = Workdir(workdir).trajectories(config)
  if trajectories.is_complete(directory):
    return None
  return f"no complete trajectory dataset at {directory}: run --mode=generate first"


def _student_checkpoints(config, workdir):
  directory = Workdir(workdir).checkpoints("student")
  if storage.isdir(directory):
    return None
  return f"no student checkpoints at {directory}: run --mode=train first"


def _export(config, workdir):
  from dsno_jax.models.io import is_export
  path = Workdir(workdir).student_export
  return None if is_export(path) else f"no student export at {path}: run --mode=export first"


def _perceptual_weights(config, workdir):
  if config.train.loss not in ("vgg", "lpips"):
    return None
  from dsno_jax.training import perceptual
  path = os.path.expanduser(config.train.perceptual_weights)
  if path and storage.isfile(path):
    return None
  return perceptual.missing_weights_message(path, config.train.loss)


def _inception_weights(config, workdir):
  if config.data.name == "digits":  # FD-digits: the project's own classifier, trained here
    return None
  from dsno_jax.evaluation import inception
  path = os.path.expanduser(config.eval.inception_weights or inception.default_weights_path())
  return None if storage.isfile(path) else inception.missing_weights_message(path)


def _reference_statistics(config, workdir):
  path = config.eval.reference_stats
  if not path or storage.isfile(path):
    return None
  return (f"eval.reference_stats={path!r} is not a file; expected an .npz with 'mu' and "
          "'sigma' (as published with EDM/ADM), or '' to compute them from data.train_split")


def _evaluation_data(config, workdir):
  """The train split (reference statistics, memorisation) and the eval split (memorisation)."""
  needs_train = not config.eval.reference_stats or config.eval.memorization
  return ((needs_train and _data("train_split")(config, workdir))
          or (config.eval.memorization and _data("eval_split")(config, workdir)) or None)


def _refine_inputs(config, workdir):
  """The real images of DMD2's GAN term; the trajectory loss's weights for its regression term."""
  return ((config.refine.gan_discriminator_weight > 0 and _data("train_split")(config, workdir))
          or (config.refine.regression_weight > 0 and _perceptual_weights(config, workdir))
          or None)


def _teacher_rows(config, workdir):
  return _teacher(config, workdir) if tuple(config.eval.teacher_rows) else None


# What each mode reads; the inputs it writes for the stages after it.
NEEDS: Dict[str, List[Check]] = {
    "train_teacher": [_data("train_split")],
    "classifier": [],
    "generate": [_teacher],
    "train": [_trajectories, _teacher, _perceptual_weights],
    "export": [_student_checkpoints],
    "refine": [_export, _teacher, _trajectories, _refine_inputs],
    "sample": [_export],
    "evaluate": [_export, _teacher_rows, _inception_weights, _reference_statistics,
                 _evaluation_data],
}
WRITES: Dict[str, List[Check]] = {"train_teacher": [_teacher, _teacher_rows],
                                  "generate": [_trajectories], "train": [_student_checkpoints],
                                  "export": [_export]}


def _trains_published_teacher(config, workdir) -> Optional[str]:
  """A config whose teacher is a published one trains it only when asked to (a teacher training
  begun in this workdir was asked for)."""
  if (config.teacher.train_from_scratch or not _pipeline_trains_teacher(config, workdir)
      or storage.isdir(Workdir(workdir).checkpoints("teacher"))):
    return None
  return ("this config distils a published teacher, and config.teacher.checkpoint is not set: "
          "--mode=pipeline would first train one from scratch "
          f"({config.teacher.train.num_steps:,} steps). Set --config.teacher.checkpoint=PATH "
          "(the Progressive Distillation checkpoint), or --config.teacher.train_from_scratch=True "
          "if training it here is what you want")


def _pipeline_trains_teacher(config, workdir) -> bool:
  from dsno_jax.models.io import is_export
  return (not config.teacher.checkpoint and config.teacher.kind == "unet"
          and not is_export(Workdir(workdir).teacher_export))


def _pipeline_modes(config, workdir) -> List[str]:
  """The pipeline's stages (modes.stages' order) that read inputs."""
  modes = ["train_teacher"] if _pipeline_trains_teacher(config, workdir) else []
  modes += ["generate", "train", "export"]
  modes += ["refine"] if config.refine.in_pipeline else []
  return modes + ["sample", "evaluate"]


def missing(config, workdir: str, mode: str) -> List[str]:
  """What `mode` (for `pipeline`: its every stage) needs and cannot find, one message each."""
  if mode != "pipeline":
    checks = NEEDS.get(mode, [])
  else:
    checks, written = [_trains_published_teacher], []
    for stage in _pipeline_modes(config, workdir):
      checks += [c for c in NEEDS[stage] if c not in written and c not in checks]
      written += WRITES.get(stage, [])
  problems = []
  for check in checks:
    problem = check(config, workdir)
    if problem and problem not in problems:  # two stages may read the same input
      problems.append(problem)
  return problems


def check(config, workdir: str, mode: str) -> None:
  """UserError listing everything `mode` is missing, or nothing when it has all it needs."""
  problems = missing(config, workdir, mode)
  if len(problems) == 1:
    raise UserError(f"--mode={mode} cannot start: {problems[0]}")
  if problems:
    items = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
    raise UserError(f"--mode={mode} cannot start; {len(problems)} inputs are missing:\n{items}")
