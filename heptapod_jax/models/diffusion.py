"""MAR-style diffusion output for continuous tokens.

A small MLP of adaLN residual blocks predicts the noise ε added to a token
latent, conditioned on the head's z_{t,p} and the diffusion step. Training uses
the improved-DDPM cosine schedule over `num_train_steps` (1000); sampling runs
DDPM over an evenly respaced subset of steps, with a temperature that scales
the injected noise (as MAR does).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heptapod_jax.models import layers


def cosine_alpha_bar(u, offset=0.008):
  """ᾱ(u) = f(u)/f(0), f(u) = cos((u + s)/(1 + s) · π/2)², u in [0, 1]."""
  f = lambda v: np.cos((v + offset) / (1 + offset) * math.pi / 2) ** 2
  return f(u) / f(0.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A DDPM noise schedule in float64 numpy.

  betas, alphas_cumprod: [steps]; timestep_map: [steps] the training step each
  entry stands for (identity for the full schedule, a subset when respaced).
  """
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  timestep_map: np.ndarray

  @classmethod
  def cosine(cls, num_steps, max_beta=0.999):
    steps = np.arange(num_steps, dtype=np.float64)
    ratio = cosine_alpha_bar((steps + 1) / num_steps) / cosine_alpha_bar(steps / num_steps)
    betas = np.minimum(1.0 - ratio, max_beta)
    return cls(betas, np.cumprod(1.0 - betas), np.arange(num_steps))

  def respaced(self, num_steps):
    """`num_steps` evenly spaced steps of this schedule (MAR's space_timesteps)."""
    total = len(self.betas)
    if num_steps == total:
      return self
    stride = (total - 1) / (num_steps - 1) if num_steps > 1 else 0
    kept = sorted({round(i * stride) for i in range(num_steps)})
    previous = np.concatenate([[1.0], self.alphas_cumprod[kept][:-1]])
    alphas_cumprod = self.alphas_cumprod[kept]
    return Schedule(1.0 - alphas_cumprod / previous, alphas_cumprod, np.array(kept))


def timestep_embedding(timesteps, dim, max_period=10000):
  """Sinusoidal embedding of float timesteps [M] -> [M, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _layer_norm(width, *, affine, rngs):
  return nnx.LayerNorm(
      width, epsilon=1e-6, use_bias=affine, use_scale=affine,
      param_dtype=jnp.float32,
      scale_init=layers.logical(nnx.initializers.ones_init(), "norm"),
      bias_init=layers.logical(nnx.initializers.zeros_init(), "norm"), rngs=rngs)


def _zero_dense(in_features, out_features, in_axis, out_axis, *, rngs, dtype):
  return nnx.Linear(
      in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=layers.logical(nnx.initializers.zeros_init(), in_axis, out_axis),
      bias_init=layers.logical(nnx.initializers.zeros_init(), out_axis), rngs=rngs)


class ResBlock(nnx.Module):

  def __init__(self, width, *, rngs, dtype):
    self.norm = _layer_norm(width, affine=True, rngs=rngs)
    self.fc1 = layers.dense(width, width, "embed", "mlp", use_bias=True, rngs=rngs, dtype=dtype)
    self.fc2 = layers.dense(width, width, "mlp", "embed", use_bias=True, rngs=rngs, dtype=dtype)
    self.modulation = _zero_dense(width, 3 * width, "embed", "mlp", rngs=rngs, dtype=dtype)

  def __call__(self, x, condition):
    shift, scale, gate = jnp.split(self.modulation(nnx.silu(condition)), 3, axis=-1)
    h = self.norm(x) * (1 + scale) + shift
    return x + gate * self.fc2(nnx.silu(self.fc1(h)))


class DiffusionHead(nnx.Module):
  """ε-prediction MLP: (x_t [M, C], step [M], z [M, cond_width]) -> ε [M, C]."""

  def __init__(self, config, *, channels, cond_width, rngs):
    cfg = config.diffusion
    dtype = jnp.dtype(config.dtype)
    width = cfg.width
    self.frequency_dim = 256
    self.time_fc1 = layers.dense(self.frequency_dim, width, "frequency", "embed",
                                 use_bias=True, rngs=rngs, dtype=dtype)
    self.time_fc2 = layers.dense(width, width, "mlp", "embed", use_bias=True,
                                 rngs=rngs, dtype=dtype)
    self.cond_proj = layers.dense(cond_width, width, "head_embed", "embed",
                                  use_bias=True, rngs=rngs, dtype=dtype)
    self.input_proj = layers.dense(channels, width, "latent", "embed",
                                   use_bias=True, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([ResBlock(width, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.depth)])
    self.final_norm = _layer_norm(width, affine=False, rngs=rngs)
    self.final_modulation = _zero_dense(width, 2 * width, "embed", "mlp",
                                        rngs=rngs, dtype=dtype)
    self.output = _zero_dense(width, channels, "embed", "latent", rngs=rngs,
                              dtype=dtype)

  def __call__(self, noisy, steps, condition):
    time = self.time_fc2(nnx.silu(self.time_fc1(
        timestep_embedding(steps, self.frequency_dim))))
    condition = time + self.cond_proj(condition)
    x = self.input_proj(noisy)
    for block in self.blocks:
      x = block(x, condition)
    shift, scale = jnp.split(self.final_modulation(nnx.silu(condition)), 2, axis=-1)
    x = self.final_norm(x) * (1 + scale) + shift
    return self.output(x).astype(jnp.float32)


def diffusion_loss(net, schedule, targets, condition, rng):
  """Per-row ε-MSE. targets: [M, C]; condition: [M, W] -> losses [M]."""
  step_rng, noise_rng = jax.random.split(rng)
  num_steps = len(schedule.betas)
  steps = jax.random.randint(step_rng, targets.shape[:1], 0, num_steps)
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[steps][:, None]
  noise = jax.random.normal(noise_rng, targets.shape, jnp.float32)
  noisy = jnp.sqrt(alphas_cumprod) * targets + jnp.sqrt(1 - alphas_cumprod) * noise
  predicted = net(noisy, steps, condition)
  return jnp.mean((predicted - noise) ** 2, axis=-1)


def ddpm_sample(net, schedule, condition, channels, rng, temperature):
  """Draws x_0 [M, C] given condition [M, W] by ancestral DDPM over `schedule`.

  `schedule` is usually `Schedule.cosine(1000).respaced(n)`; `temperature`
  (a traced scalar) scales the injected noise.
  """
  num_steps = len(schedule.betas)
  alphas_cumprod = schedule.alphas_cumprod
  previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
  variance = schedule.betas * (1 - previous) / (1 - alphas_cumprod)
  log_variance = np.log(np.append(variance[1], variance[1:]) if num_steps > 1
                        else np.maximum(variance, 1e-20))
  coef_x0 = schedule.betas * np.sqrt(previous) / (1 - alphas_cumprod)
  coef_xt = (1 - previous) * np.sqrt(1 - schedule.betas) / (1 - alphas_cumprod)
  table = {name: jnp.asarray(value, jnp.float32) for name, value in dict(
      recip=np.sqrt(1 / alphas_cumprod), recipm1=np.sqrt(1 / alphas_cumprod - 1),
      coef_x0=coef_x0, coef_xt=coef_xt, log_variance=log_variance,
      step=schedule.timestep_map).items()}
  init_rng, loop_rng = jax.random.split(rng)
  x = jax.random.normal(init_rng, (condition.shape[0], channels), jnp.float32)

  def body(i, x):
    index = num_steps - 1 - i
    steps = jnp.full((x.shape[0],), table["step"][index])
    eps = net(x, steps, condition)
    x0 = table["recip"][index] * x - table["recipm1"][index] * eps
    mean = table["coef_x0"][index] * x0 + table["coef_xt"][index] * x
    noise = jax.random.normal(jax.random.fold_in(loop_rng, i), x.shape, jnp.float32)
    scale = jnp.where(index > 0, jnp.exp(0.5 * table["log_variance"][index]), 0.0)
    return mean + scale * temperature * noise

  return jax.lax.fori_loop(0, num_steps, body, x)


def variational_bound(net, schedule, targets, condition, rng):
  """A one-sample Monte Carlo estimate of the DDPM variational bound, in nats.

  -log p(x_0) <= L_prior + sum_t L_t, with L_t the KL between the true and the
  model posterior (the model uses the fixed posterior variance, clipped at
  t=0 as in improved DDPM) and L_0 a Gaussian decoder term. One t is drawn per
  row, so `num_steps * L_t` is unbiased for the sum. Densities are of the
  continuous token values, so the bound can be negative.
  targets: [M, C]; condition: [M, W] -> [M] nats per token.
  """
  step_rng, noise_rng = jax.random.split(rng)
  num_steps = len(schedule.betas)
  alphas_cumprod = np.asarray(schedule.alphas_cumprod)
  previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
  betas = np.asarray(schedule.betas)
  variance = betas * (1 - previous) / (1 - alphas_cumprod)
  variance = np.append(variance[1], variance[1:]) if num_steps > 1 else np.maximum(variance, 1e-20)
  table = {name: jnp.asarray(value, jnp.float32) for name, value in dict(
      alphas_cumprod=alphas_cumprod, betas=betas, variance=variance,
      step=schedule.timestep_map).items()}
  steps = jax.random.randint(step_rng, targets.shape[:1], 0, num_steps)
  noise = jax.random.normal(noise_rng, targets.shape, jnp.float32)
  alpha_bar = table["alphas_cumprod"][steps][:, None]
  beta = table["betas"][steps][:, None]
  var = table["variance"][steps][:, None]
  noisy = jnp.sqrt(alpha_bar) * targets + jnp.sqrt(1 - alpha_bar) * noise
  predicted = net(noisy, table["step"][steps], condition)
  # μ = (x_t - β/√(1-ᾱ) ε) / √α: the means differ only through ε.
  mean_gap = beta / jnp.sqrt(1 - alpha_bar) / jnp.sqrt(1 - beta) * (predicted - noise)
  kl = 0.5 * jnp.sum(jnp.square(mean_gap) / var, axis=-1)
  model_mean = (noisy - beta / jnp.sqrt(1 - alpha_bar) * predicted) / jnp.sqrt(1 - beta)
  decoder_nll = 0.5 * jnp.sum(jnp.square(targets - model_mean) / var
                              + jnp.log(2 * np.pi * var), axis=-1)
  term = jnp.where(steps == 0, decoder_nll, kl)
  last = float(alphas_cumprod[-1])
  prior = 0.5 * jnp.sum(last * jnp.square(targets) + (1 - last) - 1
                        - np.log(1 - last), axis=-1)
  return num_steps * term + prior
