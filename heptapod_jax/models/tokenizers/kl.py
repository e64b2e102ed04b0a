"""KL-regularised autoencoder (LDM AutoencoderKL as MAR's KL-16, and its small variant).

images [B, H, W, 3] in [-1, 1] -> encoder (2 * z_channels: mean and log-variance)
-> quant_conv (1x1, 2z -> 2z) -> diagonal Gaussian posterior over latents
[B, H/s, W/s, z]; latents -> post_quant_conv (1x1, z -> z) -> decoder ->
images [B, H, W, 3].
"""

import jax
import jax.numpy as jnp
from flax import nnx

from heptapod_jax.models.tokenizers import common

# Upstream clamps the log-variance to this range before exponentiating.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis.

  mean, logvar: [B, h, w, C] float32 -> [B] (LDM's per-image sum).
  """
  terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


def sample_posterior(mean, logvar, rng):
  """mean + exp(logvar / 2) * eps, eps ~ N(0, 1); all [B, h, w, C] float32."""
  noise = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * noise


class KLTokenizer(nnx.Module):
  """Encoder and decoder of a KL autoencoder described by a TokenizerSpec."""

  kind = "continuous"

  def __init__(self, spec, *, rngs, dtype="float32"):
    if spec.family != "kl":
      raise ValueError(f"KLTokenizer needs a 'kl' spec, got {spec.name!r} "
                       f"({spec.family})")
    self.spec = spec
    self.dtype = jnp.dtype(dtype)
    moments = 2 * spec.z_channels  # double_z: mean and log-variance
    self.encoder = common.Encoder(spec, moments, rngs=rngs, dtype=self.dtype)
    self.quant_conv = common.conv(moments, moments, 1, rngs=rngs,
                                  dtype=self.dtype)
    self.post_quant_conv = common.conv(spec.z_channels, spec.z_channels, 1,
                                       rngs=rngs, dtype=self.dtype)
    self.decoder = common.Decoder(spec, spec.z_channels, rngs=rngs,
                                  dtype=self.dtype)

  def posterior(self, images):
    """images [B, H, W, 3] -> (mean, logvar), each [B, h, w, z] float32.

    The first z output channels are the mean, the last z the log-variance
    (clamped to [-30, 20]), the channel order of upstream's torch.chunk.
    """
    moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def encode(self, images, rng=None):
    """images [B, H, W, 3] in [-1, 1] -> latents [B, H/stride, W/stride, z] float32.

    The posterior mean, or a posterior sample when `rng` (a jax key) is given.
    """
    mean, logvar = self.posterior(images)
    return mean if rng is None else sample_posterior(mean, logvar, rng)

  def decode(self, latents):
    """latents [B, h, w, z] -> images [B, h*stride, w*stride, 3] (compute dtype)."""
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype)))

  decode_latents = decode

  def __call__(self, images, rng=None):
    """Training forward: images [B, H, W, 3] -> (reconstruction [B, H, W, 3], aux).

    Decodes a posterior sample when `rng` is given, else the mean.
    aux: mean and logvar [B, h, w, z], latents (what was decoded), kl [B]
    (per-image sum, see `kl_divergence`).
    """
    mean, logvar = self.posterior(images)
    latents = mean if rng is None else sample_posterior(mean, logvar, rng)
    aux = {"mean": mean, "logvar": logvar, "latents": latents,
           "kl": kl_divergence(mean, logvar)}
    return self.decode(latents), aux
