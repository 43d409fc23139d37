"""The jitted train step of an objective: gradients (optionally accumulated), Adam, EMA."""
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsno_jax import parallel
from dsno_jax.training import state as state_lib
from dsno_jax.training.objectives import Objective



def _micro_batches(x, grad_accum: int, mesh: Mesh):
  """(B, ...) -> (A, B/A, ...) where micro-batch a holds rows a, A+a, 2A+a, ...

  Interleaving keeps every micro-batch spread over all devices (no data moves).
  """
  b = x.shape[0]
  x = x.reshape((b // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, parallel.DATA_AXIS)))


def _loss(objective: Objective) -> Callable:
  """(params, batch, rng, frozen, kind) -> (loss, aux): objective.loss_fn, frozen passed only to
  the objectives that have frozen parameters (and with no gradient into them), kind only to
  those with step kinds."""
  def loss(params, batch, rng, frozen, kind):
    args = (params, batch, rng)
    if objective.frozen_params is not None:
      args += (jax.lax.stop_gradient(frozen),)
    return objective.loss_fn(*args, **_kind_argument(objective, kind))

  return loss


def _kind_argument(objective: Objective, kind) -> dict:
  """The static `kind=` keyword of the loss and the optimiser, for objectives with step kinds."""
  return {} if objective.step_kind is None else {"kind": kind}


def _loss_and_grads(objective: Objective, mesh: Mesh) -> Callable:
  """(params, batch, rng, frozen, kind) -> (loss, aux, grads) on the global batch, over its
  micro-batches; gradients in params only."""
  grad_fn = jax.value_and_grad(_loss(objective), has_aux=True)
  grad_accum = objective.settings.grad_accum

  def loss_and_grads(params, batch, rng, frozen, kind):
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(params, batch, rng, frozen, kind)
      return loss, aux, grads
    micro = jax.tree_util.tree_map(lambda x: _micro_batches(x, grad_accum, mesh), batch)

    def accumulate(total, inputs):
      index, micro_batch = inputs
      (loss, aux), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index), frozen,
                                   kind)
      return jax.tree_util.tree_map(jnp.add, total, (grads, loss)), aux

    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, loss), aux = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
    grads, loss = jax.tree_util.tree_map(lambda x: x / grad_accum, (grads, loss))
    aux = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), aux)
    return loss, aux, grads

  return loss_and_grads


def make_train_step(objective: Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh) -> Callable:
  """train_step(state, batch, frozen, kind) -> (state, metrics): one optimiser step on the global
  batch; frozen: objective.frozen_params() on the mesh, or None; kind: objective.step_kind of
  this update (None without step kinds).

  metrics["state_finite"] says whether the new parameters, their EMA and the optimiser state
  are all finite.
  """
  loss_and_grads = _loss_and_grads(objective, mesh)
  ema_decay = objective.settings.ema_decay

  def train_step(state, batch, frozen, kind=None):
    loss, aux, grads = loss_and_grads(state.params, batch, state_lib.step_rng(state), frozen,
                                      kind)
    new_state = state_lib.apply_gradients(state, grads, tx, ema_decay, objective.averaged,
                                          **_kind_argument(objective, kind))
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step),
                   state_finite=state_lib.all_finite(new_state.params, new_state.ema_params,
                                                     new_state.opt_state))
    return new_state, metrics

  return train_step


def make_next_step_check(objective: Objective, mesh: Mesh) -> Callable:
  """check(state, batch, frozen, kind) -> (loss, gradients all finite) of train_step(state,
  batch, frozen, kind).

  Whether a state can go on training: its parameters may be finite yet so large that the
  next loss or gradients are not, and no learning rate recovers from that.
  """
  loss_and_grads = _loss_and_grads(objective, mesh)

  def check(state, batch, frozen, kind=None):
    loss, _, grads = loss_and_grads(state.params, batch, state_lib.step_rng(state), frozen,
                                    kind)
    return loss, state_lib.all_finite(grads)

  return check


class JittedRun(NamedTuple):
  """The jitted functions of a run on one mesh, with the state's shapes and shardings."""
  abstract_state: state_lib.TrainState
  state_shardings: state_lib.TrainState
  init_state: Callable  # params -> sharded TrainState
  place_frozen: Callable  # objective.frozen_params() (or None) -> its arrays on the mesh
  train_step: Callable  # (state, batch, frozen, kind) -> (state, metrics); donates state
  next_step_check: Callable  # (state, batch, frozen, kind) -> (loss, gradients finite) of it
  sample: Optional[Callable]  # ema params -> replicated images


def jit_run(config, objective: Objective, mesh: Mesh) -> JittedRun:
  """Shardings and jitted (not yet compiled) functions; checks the batch divides the mesh."""
  settings = objective.settings
  parallel.check_batch_size(settings.batch_size, mesh, settings.grad_accum)
  tx, schedule = (objective.optimizer or state_lib.make_optimizer)(settings)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  abstract = jax.eval_shape(lambda: state_lib.create(objective.fresh_params(init_rng), tx,
                                                     train_rng, objective.averaged))
  shardings = parallel.state_shardings(abstract, mesh, settings.fsdp)
  replicated = parallel.replicated(mesh)
  init_state = jax.jit(lambda p: state_lib.create(p, tx, train_rng, objective.averaged),
                       out_shardings=shardings)
  frozen_shardings = None
  if objective.frozen_params is not None:
    # sharded by the parameters' rule (FSDP too), never donated: every step reads them again
    frozen_shardings = parallel.state_shardings(jax.eval_shape(objective.frozen_params), mesh,
                                                settings.fsdp)
  place_frozen = jax.jit(lambda f: jax.tree_util.tree_map(jnp.asarray, f),
                         out_shardings=frozen_shardings)
  step_in = (shardings, parallel.batch_sharding(mesh), frozen_shardings)
  # kind (static) selects the program: one compilation per kind of update
  train_step = jax.jit(make_train_step(objective, tx, schedule, mesh), in_shardings=step_in,
                       out_shardings=(shardings, replicated), donate_argnums=0,
                       static_argnums=3)
  next_step_check = jax.jit(make_next_step_check(objective, mesh), in_shardings=step_in,
                            out_shardings=replicated, static_argnums=3)
  sample = None
  if objective.sample_fn is not None:
    sample_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 7)
    sample = jax.jit(lambda p: objective.sample_fn(p, sample_rng),
                     in_shardings=(shardings.ema_params,), out_shardings=replicated)
  return JittedRun(abstract, shardings, init_state, place_frozen, train_step, next_step_check,
                   sample)
