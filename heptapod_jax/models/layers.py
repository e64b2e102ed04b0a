"""Transformer building blocks shared by the backbone and the 2D heads.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `vocab`,
`norm`, ...) that `heptapod_jax.parallel` maps to mesh axes. Eager sharding is
off: parameters are placed by `jax.jit` out_shardings when the trainer builds
them, so a model can also be built without a mesh (tests, summaries).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

_NEG_INF = -1e30


def logical(initializer, *names):
  """Attaches logical axis names to an initializer (no eager sharding)."""
  return nnx.with_partitioning(initializer, names, eager_sharding=False)


def param(rngs, initializer, shape, *names):
  """A float32 nnx.Param of `shape` with logical axis `names`."""
  return nnx.Param(initializer(rngs.params(), shape, jnp.float32),
                   out_sharding=names, eager_sharding=False)


def dense(in_features, out_features, in_axis, out_axis, *, rngs, dtype,
          use_bias=False, scale=1.0):
  init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=logical(init, in_axis, out_axis),
      bias_init=logical(nnx.initializers.zeros_init(), out_axis), rngs=rngs)


def rms_norm(features, *, eps, rngs, dtype):
  return nnx.RMSNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
      scale_init=logical(nnx.initializers.ones_init(), "norm"), rngs=rngs)


def swiglu_hidden(width):
  """LlamaGen's SwiGLU size: 2/3 of 4*width, rounded up to a multiple of 256."""
  hidden = int(2 * 4 * width / 3)
  return 256 * math.ceil(hidden / 256)


class SwiGLU(nnx.Module):

  def __init__(self, width, hidden, *, dropout, rngs, dtype):
    self.gate = dense(width, hidden, "embed", "mlp", rngs=rngs, dtype=dtype)
    self.up = dense(width, hidden, "embed", "mlp", rngs=rngs, dtype=dtype)
    self.down = dense(hidden, width, "mlp", "embed", rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    return self.down(self.dropout(nnx.silu(self.gate(x)) * self.up(x)))


def rope_angles(rows, cols, rotate, head_dim, base):
  """Angles of 2D RoPE: the first half of each head rotates with the row.

  rows, cols: [..., seq] int32 grid coordinates; rotate: [..., seq] bool
  (False for the class prefix, which is left unrotated).
  Returns [..., seq, head_dim // 2] angles (rows then cols).
  """
  quarter = head_dim // 4
  freqs = 1.0 / (base ** (jnp.arange(quarter, dtype=jnp.float32) / quarter))
  mask = rotate.astype(jnp.float32)[..., None]
  row_angles = rows.astype(jnp.float32)[..., None] * freqs * mask
  col_angles = cols.astype(jnp.float32)[..., None] * freqs * mask
  return jnp.concatenate([row_angles, col_angles], axis=-1)


def apply_rope(x, angles):
  """Rotates pairs (x[..., i], x[..., i + head_dim/2]) by `angles`.

  x: [batch, seq, heads, head_dim]; angles: [batch or 1, seq, head_dim // 2].
  """
  half = x.shape[-1] // 2
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate(
      [first * cos - second * sin, second * cos + first * sin], axis=-1)


def attend(query, key, value, mask, dropout, dtype):
  """Softmax attention in float32.

  query: [batch, q_len, heads, head_dim]; key/value: [batch, k_len, heads, head_dim];
  mask: bool, broadcastable to [batch, heads, q_len, k_len].
  Returns [batch, q_len, heads, head_dim].
  """
  scale = 1.0 / math.sqrt(query.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, _NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1)
  weights = dropout(weights).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


class Attention(nnx.Module):
  """Multi-head attention with optional RoPE, QK-norm and a KV cache."""

  def __init__(self, width, num_heads, *, kv_width=None, qk_norm=False,
               attn_dropout=0.0, norm_eps=1e-5, rngs, dtype):
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    self.dtype = dtype
    kv_width = kv_width or width
    self.query = dense(width, width, "embed", "heads", rngs=rngs, dtype=dtype)
    self.key = dense(kv_width, width, "embed", "heads", rngs=rngs, dtype=dtype)
    self.value = dense(kv_width, width, "embed", "heads", rngs=rngs, dtype=dtype)
    self.out = dense(width, width, "heads", "embed", rngs=rngs, dtype=dtype)
    if qk_norm:
      self.query_norm = rms_norm(self.head_dim, eps=norm_eps, rngs=rngs, dtype=dtype)
      self.key_norm = rms_norm(self.head_dim, eps=norm_eps, rngs=rngs, dtype=dtype)
    else:
      self.query_norm = self.key_norm = None
    self.dropout = nnx.Dropout(attn_dropout, rngs=rngs)

  def _split(self, x):
    return x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

  def __call__(self, x, context, mask, *, angles=None, context_angles=None,
               cache=None, cache_index=None):
    """x: [batch, q_len, width]; context: [batch, k_len, kv_width].

    With `cache` (dict of key/value [batch, max_len, heads, head_dim]), the new
    keys/values are written at `cache_index` and attention runs over the whole
    cache; `mask` must then be over cache positions. Returns (out, cache).
    """
    query = self._split(self.query(x))
    key = self._split(self.key(context))
    value = self._split(self.value(context))
    if self.query_norm is not None:
      query, key = self.query_norm(query), self.key_norm(key)
    if angles is not None:
      query = apply_rope(query, angles)
      key = apply_rope(key, angles if context_angles is None else context_angles)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      key = jax.lax.dynamic_update_slice(cache["key"], key.astype(cache["key"].dtype), start)
      value = jax.lax.dynamic_update_slice(cache["value"], value.astype(cache["value"].dtype), start)
      cache = {"key": key, "value": value}
    out = attend(query, key, value, mask, self.dropout, self.dtype)
    return self.out(out.reshape(out.shape[:2] + (-1,))), cache


class Block(nnx.Module):
  """Pre-norm Transformer block: self-attention, optional cross-attention, SwiGLU."""

  def __init__(self, width, num_heads, mlp_hidden, *, cross_attention=False,
               qk_norm=False, dropout=0.0, attn_dropout=0.0, norm_eps=1e-5,
               rngs, dtype):
    self.attention_norm = rms_norm(width, eps=norm_eps, rngs=rngs, dtype=dtype)
    self.attention = Attention(width, num_heads, qk_norm=qk_norm,
                               attn_dropout=attn_dropout, norm_eps=norm_eps,
                               rngs=rngs, dtype=dtype)
    if cross_attention:
      self.cross_norm = rms_norm(width, eps=norm_eps, rngs=rngs, dtype=dtype)
      self.cross_attention = Attention(width, num_heads, qk_norm=qk_norm,
                                       attn_dropout=attn_dropout,
                                       norm_eps=norm_eps, rngs=rngs, dtype=dtype)
    else:
      self.cross_norm = self.cross_attention = None
    self.mlp_norm = rms_norm(width, eps=norm_eps, rngs=rngs, dtype=dtype)
    self.mlp = SwiGLU(width, mlp_hidden, dropout=dropout, rngs=rngs, dtype=dtype)
    self.residual_dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x, mask, *, angles=None, cache=None, cache_index=None,
               context=None, context_mask=None):
    """x: [batch, seq, width] -> ([batch, seq, width], cache)."""
    normed = self.attention_norm(x)
    attended, cache = self.attention(normed, normed, mask, angles=angles,
                                     cache=cache, cache_index=cache_index)
    x = x + self.residual_dropout(attended)
    if self.cross_attention is not None:
      attended, _ = self.cross_attention(self.cross_norm(x), context, context_mask)
      x = x + self.residual_dropout(attended)
    x = x + self.residual_dropout(self.mlp(self.mlp_norm(x)))
    return x, cache
