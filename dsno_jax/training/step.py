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
  parallel.check_batch_size(settings.batch_size, mesh, settings.grad_accum)
  tx, schedule = state_lib.make_optimizer(settings)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  abstract = jax.eval_shape(
      lambda: state_lib.create(objective.fresh_params(init_rng), tx, train_rng))
  shardings = parallel.state_shardings(abstract, mesh, settings.fsdp)
  replicated = parallel.replicated(mesh)
  init_state = jax.jit(lambda p: state_lib.create(p, tx, train_rng), out_shardings=shardings)
  train_step = jax.jit(make_train_step(objective, tx, schedule, mesh),
                       in_shardings=(shardings, parallel.batch_sharding(mesh)),
                       out_shardings=(shardings, replicated), donate_argnums=0)
  sample = None
  if objective.sample_fn is not None:
    sample_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 7)
    sample = jax.jit(lambda p: objective.sample_fn(p, sample_rng),
                     in_shardings=(shardings.ema_params,), out_shardings=replicated)
  return JittedRun(abstract, shardings, init_state, train_step, sample)
