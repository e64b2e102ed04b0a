"""Optimizer, learning-rate schedule and EMA (pure optax; no model knowledge).

Weight decay applies to matrix weights named `kernel` only: never to norms,
biases, embedding tables or learned query/position vectors.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from heptapod_jax import errors

SCHEDULES = ("cosine", "constant")


def default_optim_config():
  config = ml_collections.ConfigDict()
  config.learning_rate = 4e-4  # peak learning rate
  config.schedule = "cosine"  # after warmup: cosine decay to end_lr_fraction, or constant
  config.warmup_steps = 100
  config.end_lr_fraction = 0.0
  config.b1 = 0.9
  config.b2 = 0.95
  config.eps = 1e-8
  config.weight_decay = 0.02
  config.grad_clip_norm = 3.0  # 0 disables clipping
  config.ema_decay = 0.9999  # 0 disables the EMA (the EMA then equals the params)
  return config


def learning_rate_schedule(optim_config, total_steps):
  peak = optim_config.learning_rate
  warmup = optim_config.warmup_steps
  if optim_config.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif optim_config.schedule == "cosine":
    after = optax.cosine_decay_schedule(
        peak, max(total_steps - warmup, 1), alpha=optim_config.end_lr_fraction)
  else:
    raise ValueError(f"optim.schedule: unknown schedule {optim_config.schedule!r}; "
                     f"allowed: {', '.join(SCHEDULES)}")
  if warmup <= 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
  """True for leaves that get weight decay: parameters named `kernel`."""
  def is_kernel(path, _):
    return getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(optim_config, total_steps):
  """AdamW with warmup + schedule and global-norm clipping."""
  schedule = learning_rate_schedule(optim_config, total_steps)
  chain = []
  if optim_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                           eps=optim_config.eps,
                           weight_decay=optim_config.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


def ema_decay_at(decay, step):
  """min(decay, (1 + step) / (10 + step)): short runs get a usable EMA too."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params (float32)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype),
                      ema, params)


def validate(optim_config, field="optim"):
  """Raises errors.ConfigError naming the bad optimizer field."""
  if optim_config.schedule not in SCHEDULES:
    raise errors.ConfigError(f"{field}.schedule: invalid value {optim_config.schedule!r}; "
                      f"allowed: {', '.join(SCHEDULES)}")
  if optim_config.learning_rate <= 0:
    raise errors.ConfigError(f"{field}.learning_rate: must be > 0, got {optim_config.learning_rate}")
  if not 0.0 <= optim_config.ema_decay < 1.0:
    raise errors.ConfigError(f"{field}.ema_decay: must be in [0, 1), got {optim_config.ema_decay}")
  if optim_config.warmup_steps < 0:
    raise errors.ConfigError(f"{field}.warmup_steps: must be >= 0, got {optim_config.warmup_steps}")
  if optim_config.grad_clip_norm < 0:
    raise errors.ConfigError(f"{field}.grad_clip_norm: must be >= 0, got {optim_config.grad_clip_norm}")
