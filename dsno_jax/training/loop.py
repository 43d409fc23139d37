"""The training loop: resume, steps, metrics and progress, sample grids, checkpoints, SIGTERM."""
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dsno_jax import parallel, preemption
from dsno_jax.errors import UserError
from dsno_jax.training import checkpoints, reporting
from dsno_jax.training import state as state_lib
from dsno_jax.training.objectives import Objective
from dsno_jax.training.step import jit_run
from dsno_jax.workdir import Workdir


class RunResult(NamedTuple):
  state: state_lib.TrainState
  history: List[Dict[str, float]]  # the metrics written, each with its "step"
  preempted: bool


def _stop_profile(state) -> bool:
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  return False


# Every kind of update occurs within this many steps (refine's cycle is refine.fake_steps long).
_KIND_LOOKAHEAD = 64

# Settings that count steps or examples: each must be a positive integer.
_POSITIVE_SETTINGS = ("batch_size", "num_steps", "log_every", "checkpoint_every",
                      "keep_checkpoints", "grad_accum")


def check_settings(settings, section: str):
  """UserError naming the first field of `section` (e.g. "teacher.train") that is meaningless."""
  for name in _POSITIVE_SETTINGS:
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"{section}.{name}={value!r}; expected a positive integer "
                      f"(set --config.{section}.{name}=...)")
  if settings.sample_every < 0:
    raise UserError(f"{section}.sample_every={settings.sample_every!r}; expected 0 (no sample "
                    "grids) or a positive number of steps")


def _resume_advice(manager, section: str) -> str:
  """Where a stopped run can resume: every saved state passed _check_savable."""
  manager.wait_until_finished()
  last = manager.latest_step()
  lower = f"a lower learning rate (--config.{section}.learning_rate=...), or check the data"
  if last is None:
    return f"No checkpoint was saved in {manager.directory}: start again with {lower}"
  return (f"The last good checkpoint (step {last}, in {manager.directory}) is kept: resume "
          f"from it with {lower}")


def _check_finite(pending: List[Tuple[int, Dict]], manager,
                  section: str) -> List[Tuple[int, Dict]]:
  """Host copies of (step, metrics) pairs, state_finite taken out; FloatingPointError at the
  first non-finite loss or state.

  Step n is the n-th update (as in checkpoint numbers); its loss was computed from the
  parameters of checkpoint n - 1.
  """
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, metrics in fetched:
    loss, finite = metrics["loss"], bool(metrics.pop("state_finite"))
    if not np.isfinite(loss):
      what = f"the loss is {float(loss)} at step {step}"
    elif not finite:
      what = f"the parameters or optimiser state are not finite after step {step}"
    else:
      continue
    raise FloatingPointError(f"{what}: stopping. {_resume_advice(manager, section)}")
  return fetched


def _check_savable(next_step_check, state, upcoming, frozen, step: int, manager, section: str):
  """FloatingPointError unless the state after `step` gives a finite loss and gradients on the
  next batch (the state's own finiteness comes with the step's metrics)."""
  loss, grads_finite = jax.device_get(next_step_check(state, upcoming, frozen))
  if not np.isfinite(loss) or not grads_finite:
    what = f"a loss of {float(loss)}" if not np.isfinite(loss) else "non-finite gradients"
    raise FloatingPointError(
        f"the state after step {step} is finite but gives {what} on the next batch: stopping "
        f"without saving it. {_resume_advice(manager, section)}")


def train(config, workdir: str, objective: Objective,
          make_batches: Callable[[int], Iterator[Dict[str, np.ndarray]]],
          mesh: Optional[Mesh] = None) -> RunResult:
  """Runs objective.settings.num_steps steps, resuming from the newest good checkpoint.

  make_batches(start_step) yields this host's rows of each step's global batch as numpy
  arrays (a pure function of (seed, step), so a resumed run sees the same data). A state is
  saved only when it is finite and so are its next loss and gradients, so the checkpoint a NaN
  stop names can be resumed.
  """
  settings, role = objective.settings, objective.role
  section = checkpoints.SETTINGS_SECTIONS[role]
  check_settings(settings, section)
  mesh = mesh or parallel.make_mesh()
  run = jit_run(config, objective, mesh)
  manager = checkpoints.make_manager(workdir, role, settings)
  writer = reporting.make_writer(workdir, role, config.tensorboard_upload_every_s)
  try:
    return _train(config, workdir, objective, make_batches, mesh, run, manager, section, writer)
  finally:
    writer.close()  # a run that fails still uploads its curves
    checkpoints.close(manager)


def _train(config, workdir, objective, make_batches, mesh, run, manager, section,
           writer) -> RunResult:
  settings, role = objective.settings, objective.role
  state = checkpoints.restore_latest(manager, run.abstract_state, run.state_shardings, config,
                                     role)
  if state is None:
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # as in jit_run
    state = run.init_state(objective.start_params(init_rng))
  start = int(jax.device_get(state.step))
  # read on every start, a resume too: frozen parameters are not in the checkpoints
  frozen = None if objective.frozen_params is None else run.place_frozen(objective.frozen_params())
  runtime = parallel.describe_runtime(mesh, settings.batch_size // mesh.devices.size)
  logging.info("%s: %s", role, runtime)
  writer.write_texts(start, {"runtime": runtime})
  if start == 0:
    reporting.log_parameters(state.params, workdir, role)
  else:
    logging.info("%s: resuming at step %d", role, start)
  batches = make_batches(start) if start < settings.num_steps else iter(())  # reads ahead

  def next_batch():
    local = next(batches)
    return parallel.global_batch({k: local[k] for k in objective.batch_keys}, mesh)

  ahead, upcoming = parallel.AheadOfTime(), None
  try:
    if start < settings.num_steps:
      upcoming = next_batch()
      _compile_ahead(ahead, run, settings, _kind_of(objective), start, state, upcoming, frozen)
    return _steps(config, workdir, objective, next_batch, mesh, run, manager, section, writer,
                  state, start, upcoming, frozen, ahead)
  finally:
    ahead.close()


def _compile_ahead(ahead, run, settings, kind_of, start: int, state, batch, frozen):
  """Begins compiling, in this order, what the run from `start` will use: the first step's
  program, the other kinds of update, the check at the first save, the sample program."""
  # shapes and shardings only: the workers must not read arrays the steps donate
  state, batch, frozen = (jax.tree_util.tree_map(_abstract, t) for t in (state, batch, frozen))
  last = settings.num_steps
  for step in range(start, min(last, start + _KIND_LOOKAHEAD)):
    ahead.start(("train_step", kind_of(step)), parallel.lower_and_compile, run.train_step, state,
                batch, frozen, kind_of(step))
  first_save = min(last, (start // settings.checkpoint_every + 1) * settings.checkpoint_every)
  ahead.start(("next_step_check", kind_of(first_save)), parallel.lower_and_compile,
              run.next_step_check, state, batch, frozen, kind_of(first_save))
  if settings.sample_every and run.sample and start + settings.sample_every <= last:
    ahead.start("sample", parallel.lower_and_compile, run.sample, state.ema_params)


def _kind_of(objective: Objective) -> Callable:
  """step -> the kind of that update (None for objectives with one kind)."""
  return objective.step_kind or (lambda step: None)


def _abstract(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.aval.weak_type)


def _steps(config, workdir, objective, next_batch, mesh, run, manager, section, writer, state,
           start, upcoming, frozen, ahead) -> RunResult:
  settings, role, kind_of = objective.settings, objective.role, _kind_of(objective)

  def program(what, kind, *args):
    """The compiled run.train_step or run.next_step_check of `kind`, each compiled once."""
    suffix = "" if kind is None else f"_{kind}"
    return ahead.get((what, kind), parallel.lower_and_compile, getattr(run, what), *args, kind,
                     name=f"{role}_{what}{suffix}")

  report = reporting.progress(settings.num_steps, writer)
  history, pending, preempted, profiling = [], [], False, False
  with preemption.listening():
    for step in range(start, settings.num_steps):
      batch, upcoming = next_batch() if upcoming is None else upcoming, None
      train_step = program("train_step", kind_of(step), state, batch, frozen)
      if config.profile and step == start + 1:  # after compilation; 3 steps
        jax.profiler.start_trace(Workdir(workdir).profile(role))
        profiling = True
      state, metrics = train_step(state, batch, frozen)
      if profiling and step == start + 3:
        profiling = _stop_profile(state)
      done = step + 1
      pending.append((done, metrics))
      report(done)
      preempted = preemption.reached(done)  # every process alike, after every step
      save_now = done % settings.checkpoint_every == 0 or done == settings.num_steps or preempted
      if save_now or done % settings.log_every == 0:
        fetched = _check_finite(pending, manager, section)
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        writer.write_scalars(done, means)
        history.append(dict(means, step=done))
        pending = []
      if save_now:
        upcoming = next_batch()  # the batch of step done + 1, which the saved state must survive
        check = program("next_step_check", kind_of(done), state, upcoming, frozen)
        _check_savable(check, state, upcoming, frozen, done, manager, section)
        checkpoints.save(manager, state, force=preempted)
      if settings.sample_every and done % settings.sample_every == 0 and run.sample:
        sample = ahead.get("sample", parallel.lower_and_compile, run.sample, state.ema_params,
                           name=f"{role}_sample")
        images = parallel.to_host(sample(state.ema_params), mesh)
        reporting.write_samples(writer, workdir, role, done, images, objective.sample_labels)
      if preempted:
        logging.warning("%s: preempted at step %d; the checkpoint is saved", role, done)
        break
  if profiling:
    _stop_profile(state)
  manager.wait_until_finished()
  writer.flush()
  return RunResult(state, history, preempted)
