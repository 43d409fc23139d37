"""`dsno_jax.load(path)`: a trained model in Python, sampled over this machine's devices."""
from typing import Optional, Union

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dsno_jax import ode, parallel, pictures
from dsno_jax.evaluation import sampling
from dsno_jax.models import io as model_io
from dsno_jax.teachers import loading


def load(path: str) -> Union["Student", "Teacher"]:
  """The model exported at `path` (local or gs://): `Student` for --mode=export and
  --mode=refine (export/, export_refined/), `Teacher` for --mode=train_teacher (teacher/)."""
  params, config, role = model_io.load_model(path)
  if role == "student":
    return Student(path, params, config)
  if role == "teacher":
    return Teacher(path, loading.check_teacher_params(params, config), config)
  raise ValueError(f"{path} holds a {role} export; expected a student (export/, "
                   "export_refined/) or a teacher (teacher/) written by dsno_jax")


class _Model:
  """What every export samples with: its config, a mesh of the local devices, seeded inputs."""

  def __init__(self, path: str, params, config: ml_collections.ConfigDict):
    self.path, self.params, self.config = path, params, config
    size, channels = config.data.image_size, config.data.channels
    self.image_shape, self.num_classes = (size, size, channels), config.data.num_classes

  def __repr__(self):
    return (f"{type(self).__name__}({self.path!r}, images {self.image_shape}, "
            f"{self.num_classes if self.num_classes > 1 else 'no'} classes)")

  def _run_config(self, n: int, seed: int, batch_size: Optional[int]) -> ml_collections.ConfigDict:
    if int(n) != n or n < 1:
      raise ValueError(f"n={n!r}; expected a positive number of samples")
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.seed = int(seed)
    if batch_size is not None:
      config.eval.batch_size = int(batch_size)
    return config

  @staticmethod
  def _mesh() -> Mesh:
    """This process's devices only: a notebook's samples need no other host."""
    return Mesh(np.asarray(jax.local_devices()), (parallel.DATA_AXIS,))

  def labels(self, n: int, *, seed: int = 0) -> np.ndarray:
    """The labels (n,) that `sample(n, seed=seed)` draws when given none (0 if unconditional)."""
    config = self._run_config(n, seed, None)
    _, labels = sampling.sample_inputs(config, np.arange(int(n)))
    return np.asarray(labels)


class Student(_Model):
  """A DSNO student (or refined student) export: one network evaluation per sample."""

  def sample(self, n: int, *, labels=None, seed: int = 0, trajectory: bool = False,
             batch_size: Optional[int] = None) -> np.ndarray:
    """uint8 (n, H, W, C) one-step samples, or with `trajectory` all K outputs (n, K, H, W, C)
    (the last is the sample; a refined student's other outputs were not refined).

    Sample i depends only on (seed, i, its label), never on the device count or batch_size:
    `sample(n, seed=s)` are the first n samples of --mode=sample with --config.seed=s.
    labels: None (sample i has class i mod num_classes), one class, or (n,) classes.
    """
    config = self._run_config(n, seed, batch_size)
    _, _, outputs = sampling.draw_samples(config, self.params, int(n), config.eval.batch_size,
                                          self._mesh(), labels)
    return pictures.to_uint8(outputs if trajectory else outputs[:, -1])


class Teacher(_Model):
  """A teacher export: samples by solving its probability-flow ODE."""

  def __init__(self, path: str, params, config: ml_collections.ConfigDict):
    super().__init__(path, params, config)
    self._denoise = loading.unet_teacher_denoiser(config, params)

  def sample(self, n: int, *, labels=None, seed: int = 0, solver: Optional[str] = None,
             nfe: Optional[int] = None, tolerance: Optional[float] = None,
             batch_size: Optional[int] = None) -> np.ndarray:
    """uint8 (n, H, W, C) samples of the PF-ODE solve from the same noise as a student's.

    solver: one of ode.SOLVERS, by default the one that made the trajectories
    (config.trajectory.solver); a fixed-step solver makes exactly `nfe` network evaluations
    (default config.trajectory.num_steps) on a uniform-t grid, an adaptive one runs at
    rtol = atol = `tolerance` (default config.trajectory.rtol).
    """
    config = self._run_config(n, seed, batch_size)
    solver = solver or config.trajectory.solver
    if solver not in ode.SOLVERS:
      raise ValueError(f"solver={solver!r}; expected one of {ode.SOLVERS}")
    adaptive = solver in ode.ADAPTIVE_SOLVERS
    if (nfe if adaptive else tolerance) is not None:
      raise ValueError(f"solver={solver!r} takes " + ("tolerance=, not nfe=" if adaptive
                                                      else "nfe=, not tolerance="))
    images, _, _ = sampling.teacher_samples(
        config, self._denoise, solver, self._mesh(),
        nfe=1 if adaptive else int(nfe or config.trajectory.num_steps),
        tolerance=float(tolerance or config.trajectory.rtol), num_samples=int(n), labels=labels)
    return images
