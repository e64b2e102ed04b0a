"""Sampling strategies: how one token is drawn from the model's distribution.

Discrete codes: temperature, top-k, top-p (nucleus) and greedy, combined in
the usual order (temperature -> top-k -> top-p -> draw). Continuous latents:
the diffusion sampler's temperature. Every parameter is a traced array field
of `SamplingParams`, so changing a value never recompiles the sampler; the
masks are built from a full sort of the logits, so shapes stay static.

Conventions: `top_k = 0` is off; `top_p >= 1` is off; `temperature <= 0` or
`greedy = True` is the argmax.
"""

import dataclasses

import jax
import jax.numpy as jnp

_MIN_TEMPERATURE = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Traced sampling parameters, each a float32/int32/bool scalar array.

  temperature: divides the logits (<= 0 means greedy).
  top_k: keep the k most likely codes (0 = off).
  top_p: keep the smallest set of codes whose probability reaches p (>= 1 = off).
  greedy: argmax regardless of the other fields.
  diffusion_temperature: scales the noise of the continuous-token DDPM sampler.
  cfg_scale: classifier-free guidance scale; read only by a sampler built with
    guidance on (0 or 1 = off, see `sampler.guidance_enabled`).
  """
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  greedy: jax.Array
  diffusion_temperature: jax.Array
  cfg_scale: jax.Array

  @classmethod
  def create(cls, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False,
             diffusion_temperature=1.0, cfg_scale=1.0):
    """Builds the params from Python numbers (or arrays)."""
    return cls(
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(top_k, jnp.int32),
        top_p=jnp.asarray(top_p, jnp.float32),
        greedy=jnp.asarray(greedy, bool),
        diffusion_temperature=jnp.asarray(diffusion_temperature, jnp.float32),
        cfg_scale=jnp.asarray(cfg_scale, jnp.float32))


def filter_logits(logits, temperature, top_k, top_p):
  """Temperature-scaled logits with codes outside top-k / top-p set to -inf.

  logits: [..., V] float; temperature, top_k, top_p: scalar arrays (or arrays
  broadcastable to the leading axes). The most likely code is always kept.
  Codes tied with the k-th (or the nucleus boundary) logit are kept too.
  Returns [..., V] float32.
  """
  vocab = logits.shape[-1]
  scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, _MIN_TEMPERATURE)
  descending = -jnp.sort(-scaled, axis=-1)  # [..., V]
  # Top-k: only the first k sorted codes are candidates.
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  k = jnp.broadcast_to(k, scaled.shape[:-1])[..., None]
  # Top-p on the top-k-filtered distribution: keep a sorted code while the
  # probability mass before it is < p; the threshold is the last kept logit.
  ranks = jnp.arange(vocab)
  sorted_kept = jnp.where(ranks < k, descending, -jnp.inf)
  probs = jax.nn.softmax(sorted_kept, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  top_p = jnp.asarray(top_p)[..., None]
  in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
  in_nucleus = in_nucleus.at[..., 0].set(True) & (ranks < k)
  threshold = jnp.min(jnp.where(in_nucleus, descending, jnp.inf), axis=-1,
                      keepdims=True)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_codes(rng, logits, params):
  """Draws codes from `logits` [..., V] with `params` -> int32 [...].

  One key draws the whole array; the sampler calls this per example (under
  vmap) with that example's key, so draws never depend on the batch layout.
  """
  filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
  drawn = jax.random.categorical(rng, filtered, axis=-1)
  greedy = params.greedy | (params.temperature <= 0)
  return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
