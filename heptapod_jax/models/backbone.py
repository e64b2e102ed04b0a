"""The causal Transformer backbone.

Input sequence `[cls(y), x_1 .. x_L]`; output `h_0 .. h_L`, where h_t has seen
y and x_1..x_t. Token x_p sits at grid position p-1 (raster order) and is
rotated by 2D RoPE with its (row, col); the class prefix is not rotated.
The same blocks run the full causal pass (training) and the KV-cached decode
(sampling), so the two agree by construction (and by test).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from heptapod_jax.models import layers


class Backbone(nnx.Module):

  def __init__(self, config, *, grid, token_kind, token_dim, rngs):
    """config: `config.model` section; grid: (rows, cols) of the token grid.

    token_kind: "discrete" (token_dim = codebook size) or "continuous"
    (token_dim = latent channels).
    """
    cfg = config.backbone
    dtype = jnp.dtype(config.dtype)
    self.grid = tuple(grid)
    self.num_positions = grid[0] * grid[1]
    self.width = cfg.width
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.width // cfg.num_heads
    self.rope_base = cfg.rope_base
    self.dtype = dtype
    self.token_kind = token_kind
    self.num_classes = config.num_classes
    self.null_class = config.num_classes if config.null_class else None
    embed_init = layers.logical(nnx.initializers.normal(0.02), "vocab", "embed")
    if token_kind == "discrete":
      self.token_embed = nnx.Embed(token_dim, cfg.width, dtype=dtype,
                                   param_dtype=jnp.float32,
                                   embedding_init=embed_init, rngs=rngs)
    else:
      self.token_embed = layers.dense(token_dim, cfg.width, "latent", "embed",
                                      use_bias=True, rngs=rngs, dtype=dtype)
    self.class_embed = nnx.Embed(config.num_classes + int(config.null_class),
                                 cfg.width, dtype=dtype, param_dtype=jnp.float32,
                                 embedding_init=embed_init, rngs=rngs)
    self.embed_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    mlp_hidden = cfg.mlp_hidden or layers.swiglu_hidden(cfg.width)
    self.blocks = nnx.List([
        layers.Block(cfg.width, cfg.num_heads, mlp_hidden, qk_norm=cfg.qk_norm,
                     dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
                     norm_eps=cfg.norm_eps, rngs=rngs, dtype=dtype)
        for _ in range(cfg.depth)
    ])
    self.final_norm = layers.rms_norm(cfg.width, eps=cfg.norm_eps, rngs=rngs,
                                      dtype=dtype)

  def embed(self, labels, tokens):
    """labels: [batch] int32; tokens: [batch, L] codes or [batch, L, C] latents.

    Returns the input sequence [batch, 1 + L, width] = [cls(y), x_1..x_L].
    """
    return jnp.concatenate(
        [self.class_embed(labels)[:, None], self.embed_tokens(tokens)], axis=1)

  def embed_tokens(self, tokens):
    """[batch, L] or [batch, L, C] -> [batch, L, width]."""
    return self.token_embed(tokens).astype(self.dtype)

  def _angles(self, start, length):
    """RoPE angles of sequence indices start..start+length-1: [1, length, hd/2]."""
    index = start + jnp.arange(length)
    grid_position = jnp.maximum(index - 1, 0)
    rows, cols = grid_position // self.grid[1], grid_position % self.grid[1]
    return layers.rope_angles(rows, cols, index > 0, self.head_dim,
                              self.rope_base)[None]

  def __call__(self, labels, tokens):
    """Full causal pass. tokens: the first L <= N-1 tokens of each image.

    Returns h: [batch, 1 + L, width]; h[:, t] has seen y and x_1..x_t.
    """
    x = self.embed_dropout(self.embed(labels, tokens))
    length = x.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    angles = self._angles(0, length)
    for block in self.blocks:
      x, _ = block(x, mask, angles=angles)
    return self.final_norm(x)

  def init_cache(self, batch_size, dtype=None):
    """An empty KV cache for sequences of N (= class token + N-1 tokens)."""
    shape = (batch_size, self.num_positions, self.num_heads, self.head_dim)
    dtype = dtype or self.dtype
    return [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
            for _ in self.blocks]

  def decode(self, inputs, cache, cache_index):
    """Runs `inputs` [batch, L, width] at sequence indices cache_index..+L-1.

    Keys/values are written into `cache`; queries attend to every cached index
    up to their own. Returns (h [batch, L, width], new cache).
    """
    x = self.embed_dropout(inputs)
    length = x.shape[1]
    query_index = cache_index + jnp.arange(length)
    key_index = jnp.arange(self.num_positions)
    mask = (key_index[None, :] <= query_index[:, None])[None, None]
    angles = self._angles(cache_index, length)
    new_cache = []
    for block, block_cache in zip(self.blocks, cache):
      x, block_cache = block(x, mask, angles=angles, cache=block_cache,
                             cache_index=cache_index)
      new_cache.append(block_cache)
    return self.final_norm(x), new_cache
