"""The training loop: resume, steps, metrics and progress, sample grids, checkpoints, SIGTERM."""
import contextlib
import signal
import threading
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dsno_jax import parallel
from dsno_jax.data import batching
from dsno_jax.training import checkpoints, reporting
from dsno_jax.training import state as state_lib
from dsno_jax.training.objectives import Objective
from dsno_jax.training.step import jit_run
from dsno_jax.workdir import Workdir


class RunResult(NamedTuple):
  state: state_lib.TrainState
  history: List[Dict[str, float]]  # the metrics written, each with its "step"
  preempted: bool



@contextlib.contextmanager
def _sigterm_flag():
  """Yields a dict whose 'set' turns True on SIGTERM (single process, main thread only).

  With several processes, orbax's reached_preemption (the coordination service) decides,
  so every host saves at the same step.
  """
  flag = {"set": False}
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    flag["set"] = True

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _stop_profile(state) -> bool:
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  return False


def _check_finite(pending: List[Tuple[int, Dict]], manager) -> List[Tuple[int, Dict]]:
  """Host copies of (step, metrics) pairs; FloatingPointError at the first non-finite loss.

  Step n is the n-th update (as in checkpoint numbers); its loss was computed from the
  parameters of checkpoint n - 1.
  """
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, metrics in fetched:
    if not np.isfinite(metrics["loss"]):
      manager.wait_until_finished()
      last = manager.latest_step()
      raise FloatingPointError(
          f"the loss is {float(metrics['loss'])} at step {step}: stopping. Nothing after the "
          f"last good checkpoint (step {last}, in {manager.directory}) was saved; lower the "
          "learning rate, set a grad_clip, or check the data")
  return fetched


def train(config, workdir: str, objective: Objective,
          make_batches: Callable[[int], Iterator[Dict[str, np.ndarray]]],
          mesh: Optional[Mesh] = None) -> RunResult:
  """Runs objective.settings.num_steps steps, resuming from the newest checkpoint.

  make_batches(start_step) yields this host's rows of each step's global batch as numpy
  arrays (a pure function of (seed, step), so a resumed run sees the same data).
  """
  settings, role = objective.settings, objective.role
  mesh = mesh or parallel.make_mesh()
  run = jit_run(config, objective, mesh)
  manager = checkpoints.make_manager(workdir, role, settings, config)
  state = checkpoints.restore_latest(manager, run.abstract_state, run.state_shardings, config)
  if state is None:
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # as in jit_run
    state = run.init_state(objective.start_params(init_rng))
  start = int(jax.device_get(state.step))
  writer = reporting.make_writer(workdir, role)
  if start == 0:
    reporting.log_parameters(state.params)
  else:
    logging.info("%s: resuming at step %d", role, start)
  report = reporting.progress(settings.num_steps, writer)
  history, pending, preempted = [], [], False
  batches = batching.prefetch(make_batches(start)) if start < settings.num_steps else iter(())
  train_step, profiling = None, False
  with _sigterm_flag() as sigterm:
    for step in range(start, settings.num_steps):
      local = next(batches)
      batch = parallel.global_batch({k: local[k] for k in objective.batch_keys}, mesh)
      if train_step is None:
        train_step = parallel.compile_in_lockstep(run.train_step, state, batch,
                                                  name=f"{role}_train_step")
      if config.profile and step == start + 1:  # after compilation; 3 steps
        jax.profiler.start_trace(Workdir(workdir).profile(role))
        profiling = True
      state, metrics = train_step(state, batch)
      if profiling and step == start + 3:
        profiling = _stop_profile(state)
      done = step + 1
      pending.append((done, metrics))
      report(done)
      preempted = sigterm["set"] or (jax.process_count() > 1 and manager.reached_preemption(done))
      save_now = done % settings.checkpoint_every == 0 or done == settings.num_steps or preempted
      if save_now or done % settings.log_every == 0:
        fetched = _check_finite(pending, manager)
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        writer.write_scalars(done, means)
        history.append(dict(means, step=done))
        pending = []
      if save_now:
        checkpoints.save(manager, state, force=preempted)
      if settings.sample_every and done % settings.sample_every == 0 and run.sample:
        sample = parallel.compile_in_lockstep(run.sample, state.ema_params, name="sample")
        images = parallel.to_host(sample(state.ema_params), mesh)
        reporting.write_samples(writer, workdir, role, done, images)
      if preempted:
        logging.warning("%s: preempted at step %d; the checkpoint is saved", role, done)
        break
  if profiling:
    _stop_profile(state)
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  return RunResult(state, history, preempted)
