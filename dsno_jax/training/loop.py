"""One sharded training loop with two objectives: the teacher's diffusion loss and DSNO's."""
import contextlib
import os
import queue
import signal
import threading
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsno_jax import diffusion, model_io, models, ode
from dsno_jax.data import images, trajectories
from dsno_jax.training import checkpoints, losses, reporting, sharding
from dsno_jax.training import state as state_lib

NUM_SAMPLES = 64  # images in a sample grid


class Objective(NamedTuple):
  """What one run trains: its settings section, loss and parameter initialisation.

  loss_fn(params, batch, rng) -> (loss, {name: scalar}); pure, on the global batch.
  fresh_params(rng) -> params; traceable (its shapes define checkpoint compatibility).
  start_params(rng) -> params of a new run (may read a teacher from disk).
  sample_fn(params, rng) -> images (N, H, W, C) in [-1, 1], or None for no grids.
  """
  role: str  # "teacher" | "student"
  settings: object  # config.teacher.train or config.train
  loss_fn: Callable
  fresh_params: Callable
  start_params: Callable
  batch_keys: Tuple[str, ...]
  sample_fn: Optional[Callable] = None


class RunResult(NamedTuple):
  state: state_lib.TrainState
  history: List[Dict[str, float]]  # the metrics written, each with its "step"
  preempted: bool


# --- objectives ------------------------------------------------------------------------------


def _labels(batch, config):
  return batch["label"] if config.data.num_classes > 1 else None


def _sample_labels(config, n: int):
  return jnp.arange(n) % config.data.num_classes if config.data.num_classes > 1 else None


def teacher_objective(config) -> Objective:
  """Diffusion training of the teacher UNet on images (batch {"image", "label"})."""
  model = models.teacher_from_config(config)
  settings = config.teacher.train
  losses.teacher_weight(0.0, settings.loss_weighting)  # a bad name fails before compiling
  f = config.diffusion

  def loss_fn(params, batch, rng):
    rng_noise, rng_dropout = jax.random.split(rng)

    def output_fn(z, logsnr, y):
      return model.apply({"params": params}, z, logsnr, y, train=True,
                         rngs={"dropout": rng_dropout})

    return losses.teacher_loss(output_fn, batch["image"], _labels(batch, config), rng_noise,
                               mean_type=config.teacher.mean_type,
                               weighting=settings.loss_weighting,
                               logsnr_min=f.logsnr_min, logsnr_max=f.logsnr_max)

  def sample_fn(params, rng):
    s, c = config.data.image_size, config.data.channels
    z1 = jax.random.normal(rng, (NUM_SAMPLES, s, s, c))
    denoise = diffusion.unet_denoiser(model, params, config.teacher.mean_type,
                                      config.teacher.clip_x)
    g = config.trajectory
    x = ode.trajectory(denoise, z1, (0.0,), solver=g.solver, num_steps=g.num_steps, grid=g.grid,
                       y=_sample_labels(config, NUM_SAMPLES), rtol=g.rtol, atol=g.atol,
                       logsnr_min=f.logsnr_min, logsnr_max=f.logsnr_max)
    return x[:, -1]

  fresh = lambda rng: models.init_teacher(config, rng)
  return Objective("teacher", settings, loss_fn, fresh, fresh, ("image", "label"), sample_fn)


def student_objective(config, logsnr: Sequence[float],
                      teacher_params: Optional[Callable] = None) -> Objective:
  """DSNO training on trajectories (batch {"noise", "targets", "label"}), SPEC section 5.

  logsnr (K,): the log-SNRs of the dataset's save times (the student's output times).
  teacher_params() -> teacher parameters to copy in when config.train.init_from_teacher.
  """
  model = models.student_from_config(config)
  settings = config.train
  distance = losses.get_distance(settings.loss, settings.perceptual_weights)
  diffusion.time_weights(jnp.zeros(()), settings.time_weighting)  # fails early on a bad name
  logsnr = np.asarray(logsnr, np.float32)
  if logsnr.shape != (len(config.trajectory.save_times),):
    raise ValueError(f"{logsnr.shape[0] if logsnr.ndim == 1 else logsnr.shape} log-SNRs for a "
                     f"student with K={len(config.trajectory.save_times)} output times")

  def loss_fn(params, batch, rng):
    prediction = model.apply({"params": params}, batch["noise"], logsnr, _labels(batch, config),
                             train=True, rngs={"dropout": rng})
    loss, per_time = losses.student_loss(prediction, batch["targets"], logsnr, distance,
                                         settings.time_weighting)
    return loss, {f"d_{k}": per_time[k] for k in range(per_time.shape[0])}

  def sample_fn(params, rng):
    s, c = config.data.image_size, config.data.channels
    noise = jax.random.normal(rng, (NUM_SAMPLES, s, s, c))
    out = model.apply({"params": params}, noise, logsnr, _sample_labels(config, NUM_SAMPLES),
                      train=False)
    return out[:, -1]  # the last output time (t = 0): the one-step sample

  fresh = lambda rng: models.init_student(config, rng)

  def start(rng):
    params = fresh(rng)
    if not settings.init_from_teacher:
      return params
    if teacher_params is None:
      raise ValueError("train.init_from_teacher=True but no teacher parameters were given")
    return models.student_params_from_teacher(teacher_params(), params, config.teacher.mean_type,
                                              config.data.channels)

  return Objective("student", settings, loss_fn, fresh, start, ("noise", "targets", "label"),
                   sample_fn)


# --- the train step ----------------------------------------------------------------------------


def _micro_batches(x, grad_accum: int, mesh: Mesh):
  """(B, ...) -> (A, B/A, ...) where micro-batch a holds rows a, A+a, 2A+a, ...

  Interleaving keeps every micro-batch spread over all devices (no data moves).
  """
  b = x.shape[0]
  x = x.reshape((b // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))


def make_train_step(objective: Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh) -> Callable:
  """train_step(state, batch) -> (state, metrics): one optimiser step on the global batch."""
  grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)
  grad_accum = objective.settings.grad_accum
  ema_decay = objective.settings.ema_decay

  def train_step(state, batch):
    rng = state_lib.step_rng(state)
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree_util.tree_map(lambda x: _micro_batches(x, grad_accum, mesh), batch)

      def accumulate(total, inputs):
        index, micro_batch = inputs
        (loss, aux), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree_util.tree_map(jnp.add, total, (grads, loss)), aux

      zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
      (grads, loss), aux = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
      grads, loss = jax.tree_util.tree_map(lambda x: x / grad_accum, (grads, loss))
      aux = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), aux)
    new_state = state_lib.apply_gradients(state, grads, tx, ema_decay)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    return new_state, metrics

  return train_step


class JittedRun(NamedTuple):
  """The jitted functions of a run on one mesh, with the state's shapes and shardings."""
  abstract_state: state_lib.TrainState
  state_shardings: state_lib.TrainState
  init_state: Callable  # params -> sharded TrainState
  train_step: Callable  # (state, batch) -> (state, metrics); donates state
  sample: Optional[Callable]  # ema params -> replicated images


def jit_run(config, objective: Objective, mesh: Mesh) -> JittedRun:
  """Shardings and jitted (not yet compiled) functions; checks the batch divides the mesh."""
  settings = objective.settings
  sharding.check_batch_size(settings.batch_size, mesh, settings.grad_accum)
  tx, schedule = state_lib.make_optimizer(settings)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  abstract = jax.eval_shape(
      lambda: state_lib.create(objective.fresh_params(init_rng), tx, train_rng))
  shardings = sharding.state_shardings(abstract, mesh, settings.fsdp)
  replicated = sharding.replicated(mesh)
  init_state = jax.jit(lambda p: state_lib.create(p, tx, train_rng), out_shardings=shardings)
  train_step = jax.jit(make_train_step(objective, tx, schedule, mesh),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, replicated), donate_argnums=0)
  sample = None
  if objective.sample_fn is not None:
    sample_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 7)
    sample = jax.jit(lambda p: objective.sample_fn(p, sample_rng),
                     in_shardings=(shardings.ema_params,), out_shardings=replicated)
  return JittedRun(abstract, shardings, init_state, train_step, sample)


# --- the loop ----------------------------------------------------------------------------------


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


def _prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Produces the next items in a background thread while the current step runs."""
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for item in iterator:
        items.put(item)
    except Exception as e:  # surfaced in the consumer
      items.put(e)
    items.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = items.get()
    if item is done:
      return
    if isinstance(item, Exception):
      raise item
    yield item


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
  mesh = mesh or sharding.make_mesh()
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
  batches = _prefetch(make_batches(start)) if start < settings.num_steps else iter(())
  train_step, profiling = None, False
  with _sigterm_flag() as sigterm:
    for step in range(start, settings.num_steps):
      local = next(batches)
      batch = sharding.global_batch({k: local[k] for k in objective.batch_keys}, mesh)
      if train_step is None:
        train_step = sharding.compile_in_lockstep(run.train_step, state, batch,
                                                  name=f"{role}_train_step")
      if config.profile and step == start + 1:  # after compilation; 3 steps
        jax.profiler.start_trace(os.path.join(workdir, "profile", role))
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
        sample = sharding.compile_in_lockstep(run.sample, state.ema_params, name="sample")
        images = checkpoints.to_host(sample(state.ema_params), mesh)
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


# --- modes -----------------------------------------------------------------------------------


def train_teacher(config, workdir: str) -> Optional[str]:
  """Mode `train_teacher`: diffusion training on config.data; exports the EMA teacher.

  Returns the export path (WORKDIR/teacher), or None when preempted before the end.
  """
  sharding.initialize_distributed(config)
  objective = teacher_objective(config)
  source = images.load_source(config, workdir, config.data.train_split)

  def make_batches(start_step):
    return images.batch_iterator(source, global_batch_size=objective.settings.batch_size,
                                 seed=config.seed, start_step=start_step,
                                 random_flip=config.data.random_flip)

  result = train(config, workdir, objective, make_batches)
  if result.preempted:
    return None
  ema = checkpoints.to_host(result.state.ema_params, sharding.make_mesh())
  path = model_io.save_model(os.path.join(workdir, "teacher"), ema, config, role="teacher")
  sharding.barrier("dsno_jax:export_teacher")  # process 0 finishes the export's files last
  logging.info("exported the EMA teacher to %s", path)
  return path


def trajectory_logsnrs(config, directory: str) -> np.ndarray:
  """The dataset's log-SNRs (K,), checked against the config's save times."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no trajectory dataset at {directory}; run --mode=generate first "
                            "(or set config.trajectory.dir)")
  metadata = trajectories.read_metadata(directory)
  logsnr = np.asarray(metadata["logsnrs"], np.float32)
  wanted = diffusion.save_logsnrs(config)
  if logsnr.shape != wanted.shape or not np.allclose(logsnr, wanted, rtol=1e-5, atol=1e-4):
    raise ValueError(f"the trajectories in {directory} were saved at log-SNRs {logsnr.tolist()} "
                     f"(times {metadata.get('save_times')}); config.trajectory.save_times="
                     f"{tuple(config.trajectory.save_times)} gives {wanted.tolist()}")
  return logsnr


def teacher_params_loader(config, workdir: str) -> Callable:
  """() -> the configured teacher's parameters (read only when a new run starts)."""
  def load():
    params, identity = model_io.load_teacher_params(config, workdir)
    logging.info("initialising the student from %s", identity)
    return params
  return load


def train_student(config, workdir: str) -> RunResult:
  """Mode `train`: DSNO on the trajectories (config.trajectory.dir or WORKDIR/trajectories)."""
  sharding.initialize_distributed(config)
  directory = os.path.abspath(config.trajectory.dir or os.path.join(workdir, "trajectories"))
  logsnr = trajectory_logsnrs(config, directory)
  objective = student_objective(config, logsnr, teacher_params_loader(config, workdir))

  def make_batches(start_step):
    return trajectories.batch_iterator(directory, global_batch_size=objective.settings.batch_size,
                                       seed=config.seed, start_step=start_step)

  return train(config, workdir, objective, make_batches)
