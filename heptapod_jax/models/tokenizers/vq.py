"""Vector-quantised tokenizer (LlamaGen VQ-16 architecture and its small variant).

images [B, H, W, 3] in [-1, 1] -> encoder -> quant_conv (1x1, z_channels ->
code_dim) -> nearest code (cosine similarity when `codebook_l2_norm`) ->
codes [B, H/s, W/s] int32; codes -> unit-norm code vectors -> post_quant_conv
(1x1, code_dim -> z_channels) -> decoder -> images [B, H, W, 3].
"""

import jax
import jax.numpy as jnp
from flax import nnx

from heptapod_jax.models.layers import param
from heptapod_jax.models.tokenizers import common

# Tokens quantised per lax.map step: bounds the [tokens, codebook] distance
# matrix (4096 x 16384 float32 = 256 MiB) however large the batch is.
_QUANTIZE_CHUNK = 4096


def _l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def nearest_codes(vectors, codebook):
  """Index of the nearest codebook row (squared L2) of each vector.

  vectors: [N, D] float32; codebook: [K, D] float32. Returns [N] int32.
  Distances are ||v||^2 + ||e||^2 - 2 v.e, the expansion upstream uses, so
  ties break the same way; large N runs in chunks to bound memory.
  """
  codebook_sq = jnp.sum(jnp.square(codebook), axis=-1)

  def chunk_codes(chunk):
    distances = (jnp.sum(jnp.square(chunk), axis=-1, keepdims=True)
                 + codebook_sq
                 - 2.0 * jnp.einsum("nd,kd->nk", chunk, codebook,
                                    precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)

  num = vectors.shape[0]
  if num <= _QUANTIZE_CHUNK:
    return chunk_codes(vectors)
  num_chunks = -(-num // _QUANTIZE_CHUNK)
  padded = jnp.pad(vectors, ((0, num_chunks * _QUANTIZE_CHUNK - num), (0, 0)))
  codes = jax.lax.map(chunk_codes,
                      padded.reshape(num_chunks, _QUANTIZE_CHUNK, -1))
  return codes.reshape(-1)[:num]


def vq_losses(z, quantized, beta):
  """LlamaGen's VQ losses; z and quantized: [..., D] float32.

  codebook_loss = mean((quantized - sg(z))^2) trains the codebook;
  commitment_loss = beta * mean((sg(quantized) - z)^2) trains the encoder.
  """
  codebook_loss = jnp.mean(jnp.square(quantized - jax.lax.stop_gradient(z)))
  commitment_loss = beta * jnp.mean(
      jnp.square(jax.lax.stop_gradient(quantized) - z))
  return codebook_loss, commitment_loss


class VQTokenizer(nnx.Module):
  """Encoder, codebook and decoder of a VQ tokenizer described by a TokenizerSpec."""

  kind = "discrete"

  def __init__(self, spec, *, rngs, dtype="float32"):
    if spec.family != "vq":
      raise ValueError(f"VQTokenizer needs a 'vq' spec, got {spec.name!r} "
                       f"({spec.family})")
    self.spec = spec
    self.dtype = jnp.dtype(dtype)
    self.encoder = common.Encoder(spec, spec.z_channels, rngs=rngs,
                                  dtype=self.dtype)
    self.quant_conv = common.conv(spec.z_channels, spec.code_dim, 1, rngs=rngs,
                                  dtype=self.dtype)
    # LlamaGen's init: uniform(-1/K, 1/K) rows (normalised at lookup).
    bound = 1.0 / spec.codebook_size
    uniform = lambda key, shape, dtype: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    self.codebook = param(rngs, uniform, (spec.codebook_size, spec.code_dim),
                          "codebook", "code_dim")
    self.post_quant_conv = common.conv(spec.code_dim, spec.z_channels, 1,
                                       rngs=rngs, dtype=self.dtype)
    self.decoder = common.Decoder(spec, spec.z_channels, rngs=rngs,
                                  dtype=self.dtype)

  def code_vectors(self):
    """The codebook as used for lookup: [K, D] float32 (unit rows when l2-normalised)."""
    codebook = self.codebook[...].astype(jnp.float32)
    return _l2_normalize(codebook) if self.spec.codebook_l2_norm else codebook

  def project(self, images):
    """images [B, H, W, 3] -> pre-quantisation vectors z [B, h, w, D] float32."""
    z = self.quant_conv(self.encoder(images.astype(self.dtype)))
    z = z.astype(jnp.float32)
    return _l2_normalize(z) if self.spec.codebook_l2_norm else z

  def quantize(self, z):
    """z [B, h, w, D] float32 -> (codes [B, h, w] int32, quantized [B, h, w, D])."""
    codebook = self.code_vectors()
    codes = nearest_codes(z.reshape(-1, z.shape[-1]), codebook)
    codes = codes.reshape(z.shape[:-1])
    return codes, codebook[codes]

  def encode(self, images):
    """images [B, H, W, 3] in [-1, 1] -> codes [B, H/stride, W/stride] int32."""
    codes, _ = self.quantize(self.project(images))
    return codes

  def lookup(self, codes):
    """codes [B, h, w] int -> code vectors [B, h, w, D] float32."""
    return self.code_vectors()[codes]

  def decode_quantized(self, quantized):
    """Code vectors [B, h, w, D] -> images [B, h*stride, w*stride, 3] (compute dtype)."""
    return self.decoder(self.post_quant_conv(quantized.astype(self.dtype)))

  def decode(self, codes):
    """codes [B, h, w] int -> images [B, h*stride, w*stride, 3] (compute dtype)."""
    return self.decode_quantized(self.lookup(codes))

  def __call__(self, images, rng=None):
    """Training forward: images [B, H, W, 3] -> (reconstruction [B, H, W, 3], aux).

    aux: codebook_loss and commitment_loss (scalars, see `vq_losses`; the
    commitment loss already includes spec.commitment_beta), codes
    [B, h, w] int32. The decoder sees the quantized vectors with a
    straight-through gradient to the encoder. `rng` is unused (the forward is
    deterministic; dropout draws from the module's own rngs).
    """
    del rng
    z = self.project(images)
    codes, quantized = self.quantize(z)
    codebook_loss, commitment_loss = vq_losses(z, quantized,
                                               self.spec.commitment_beta)
    straight_through = z + jax.lax.stop_gradient(quantized - z)
    reconstruction = self.decode_quantized(straight_through)
    aux = {"codebook_loss": codebook_loss, "commitment_loss": commitment_loss,
           "codes": codes}
    return reconstruction, aux
