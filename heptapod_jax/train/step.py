"""Train state and the sharded train step (a pure function under jax.jit).

The train state is a plain pytree
    {"step": int32 [], "params": pure dict, "opt_state": optax state, "ema": pure dict}
so Orbax saves and restores it directly and `jax.jit` places it with the
shardings derived from the parameters' logical axis names. The model enters
the step as an nnx graphdef merged with the params; dropout is reseeded from
(seed, step), so a resumed run draws exactly the same randomness.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from heptapod_jax import nnx_utils
from heptapod_jax.parallel import sharding
from heptapod_jax.train import optim


@dataclasses.dataclass
class StepFunctions:
  """Jitted init/step functions and the shardings they use."""
  init: Callable[[], Any]
  step: Callable[[Any, Any], Any]
  state_shardings: Any
  abstract_state: Any
  graphdef: Any
  rest: Any
  schedule: Callable[[Any], Any]


def _micro_batches(batch, count):
  """[B, ...] -> [count, B/count, ...], each micro-batch spread over all devices.

  Rows are taken with stride `count`, so a device's contiguous block of rows
  contributes to every micro-batch and no data moves between devices.
  """
  def split(x):
    x = x.reshape((x.shape[0] // count, count) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def build(task, config, mesh, total_steps):
  """Builds the born-sharded init function and the jitted train step.

  task: has `build_model(rngs)`, `loss(model, batch, rng, step) -> (loss,
  metrics)` and `sharding_rules` (logical axis name -> mesh axis).
  """
  seed = config.seed
  model_rngs = lambda: nnx.Rngs(params=seed, dropout=seed + 1)
  abstract_model = nnx.eval_shape(lambda: task.build_model(model_rngs()))
  graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
  rules = task.sharding_rules
  param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  ema_decay = config.optim.ema_decay
  replicated = sharding.replicated(mesh)

  def init():
    model = task.build_model(model_rngs())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params),
            "ema": jax.tree.map(lambda p: p.astype(jnp.float32), params)}

  abstract_state = jax.eval_shape(init)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state["opt_state"], param_shardings,
      transform_non_params=lambda _: replicated)
  state_shardings = {"step": replicated, "params": param_shardings,
                     "opt_state": opt_shardings, "ema": param_shardings}
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)
  base_key = jax.random.key(seed)
  accumulation = config.train.grad_accum_steps

  def loss_and_grads(params, batch, rng, step):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, nnx_utils.fresh_rng_state(rest, rng))
      return task.loss(model, batch, rng, step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)
    params = state["params"]
    if accumulation == 1:
      grads, metrics = loss_and_grads(params, batch, rng, step)
    else:
      def accumulate(carry, inputs):
        index, micro_batch = inputs
        grads, metrics = loss_and_grads(params, micro_batch,
                                        jax.random.fold_in(rng, index), step)
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None
      zeros = jax.eval_shape(loss_and_grads, params,
                             jax.tree.map(lambda x: x[0], _micro_batches(batch, accumulation)),
                             rng, step)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, metrics), _ = jax.lax.scan(
          accumulate, zeros,
          (jnp.arange(accumulation), _micro_batches(batch, accumulation)))
      grads, metrics = jax.tree.map(lambda x: x / accumulation, (grads, metrics))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"step": step + 1, "params": new_params, "opt_state": opt_state,
                 "ema": optim.update_ema(state["ema"], new_params,
                                         optim.ema_decay_at(ema_decay, step))}
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    # A non-finite step leaves the state untouched; the host loop stops the run.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, state)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(step),
                   finite=finite)
    return new_state, metrics

  jitted_init = jax.jit(init, out_shardings=state_shardings)
  jitted_step = jax.jit(train_step, out_shardings=(state_shardings, replicated),
                        donate_argnums=(0,))
  return StepFunctions(init=jitted_init, step=jitted_step,
                       state_shardings=state_shardings,
                       abstract_state=abstract_state, graphdef=graphdef,
                       rest=rest, schedule=schedule)
