"""The train state (step, params, EMA, optimiser state, rng), the paper's optimiser, pure updates."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly; the data position follows from `step`.

  rng is a raw uint32 key (2,) that stays fixed: step s uses fold_in(rng, s), so a resumed
  run draws the same noise as an uninterrupted one.
  """
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def learning_rate_schedule(settings) -> optax.Schedule:
  """Linear warm-up from warmup_init * lr to lr, then x decay at each milestone (absolute steps)."""
  lr, warmup = settings.learning_rate, settings.warmup_steps
  milestones = sorted(int(m) for m in settings.milestones)
  if milestones and milestones[0] < warmup:
    raise ValueError(f"milestones={tuple(milestones)} start inside the warm-up of {warmup} steps")
  decayed = optax.piecewise_constant_schedule(
      lr, {m - warmup: settings.decay for m in milestones})
  if warmup <= 0:
    return decayed
  warm = optax.linear_schedule(settings.warmup_init * lr, lr, warmup)
  return optax.join_schedules([warm, decayed], [warmup])


def make_optimizer(settings):
  """(Adam(b1, b2, eps) on the schedule, after an optional global-norm clip; the schedule)."""
  schedule = learning_rate_schedule(settings)
  adam = optax.adam(schedule, b1=settings.b1, b2=settings.b2, eps=settings.eps)
  if settings.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(settings.grad_clip), adam), schedule
  return adam, schedule


def create(params, tx: optax.GradientTransformation, rng, averaged=None) -> TrainState:
  """A fresh state at step 0; the EMA starts at the parameters (at averaged(params) when given:
  the part it follows)."""
  params = jax.tree_util.tree_map(jnp.asarray, params)
  ema = params if averaged is None else averaged(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, ema),
                    opt_state=tx.init(params), rng=jnp.asarray(rng, jnp.uint32))


def ema_decay_at(step, decay: float):
  """min(decay, (1 + n) / (10 + n)): early on the average forgets the random init quickly."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params, params, decay):
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    ema_decay: float, averaged=None, **extra_args) -> TrainState:
  """One optimiser step (extra_args go to tx.update), then the EMA of the new parameters (of
  averaged(params) when given)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra_args)
  params = optax.apply_updates(state.params, updates)
  ema = ema_update(state.ema_params, params if averaged is None else averaged(params),
                   ema_decay_at(state.step, ema_decay))
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def all_finite(*trees) -> jax.Array:
  """A bool scalar: every element of every array in `trees` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(trees)]))


def step_rng(state: TrainState):
  """The key of the current step."""
  return jax.random.fold_in(state.rng, state.step)
