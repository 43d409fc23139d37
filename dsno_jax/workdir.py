"""Every directory and file of a run, named once for its writers, readers and done-checks."""
import dataclasses

from dsno_jax import storage

# the trained networks and the student's refinement, each with its own checkpoints
ROLES = ("teacher", "student", "refine")


def resolve(path: str) -> str:
  """An absolute local path, or a URL (`gs://...`) unchanged."""
  return storage.resolve(path)


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The layout of WORKDIR: `Workdir(workdir).teacher_export` etc."""
  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", resolve(self.root))

  def _join(self, *names: str) -> str:
    return storage.join(self.root, *names)

  @property
  def lock(self) -> str:
    """The lock file of the run using this workdir (dsno_jax/lock.py): one run at a time."""
    return self._join("lock.json")

  # --- training
  def checkpoints(self, role: str) -> str:
    """Orbax checkpoints of the train state of `role` ("teacher" | "student")."""
    if role not in ROLES:
      raise ValueError(f"role={role!r}; expected one of {ROLES}")
    return self._join("checkpoints", role)

  def logs(self, role: str) -> str:
    """TensorBoard events of a training run."""
    return self._join("logs", role)

  def parameter_table(self, role: str) -> str:
    """The names, shapes and sizes of a training run's parameters (markdown)."""
    return self._join("logs", f"params_{role}.md")

  def profile(self, role: str) -> str:
    return self._join("profile", role)

  def training_samples(self, role: str, step: int) -> str:
    """The sample grid written during training at `step`."""
    return self._join("samples", f"{role}_{step:08d}.png")

  # --- models
  @property
  def teacher_export(self) -> str:
    """The EMA teacher written at the end of teacher training (a models.io export)."""
    return self._join("teacher")

  @property
  def student_export(self) -> str:
    """The EMA student written by --mode=export (a models.io export)."""
    return self._join("export")

  @property
  def refined_export(self) -> str:
    """The refined student written by --mode=refine (a models.io export of the whole student)."""
    return self._join("export_refined")

  @property
  def classifier(self) -> str:
    """The digits classifier whose features define FD-digits."""
    return self._join("classifier")

  # --- data
  @property
  def tfds(self) -> str:
    """TFDS data built by the project itself (the digits)."""
    return self._join("tfds")

  def trajectories(self, config) -> str:
    """The trajectory dataset: config.trajectory.dir, else WORKDIR/trajectories."""
    return resolve(config.trajectory.dir) if config.trajectory.dir else self._join("trajectories")

  # --- samples and evaluation
  @property
  def samples(self) -> str:
    return self._join("samples")

  @property
  def samples_npz(self) -> str:
    return self._join("samples", "samples.npz")

  @property
  def eval(self) -> str:
    return self._join("eval")

  @property
  def results(self) -> str:
    """The evaluation table as JSON (its presence marks evaluation done)."""
    return self._join("eval", "results.json")

  def reference_statistics(self, name: str) -> str:
    """Cached (mu, sigma) of the reference images' features."""
    return self._join("eval", f"reference_{name}.npz")
