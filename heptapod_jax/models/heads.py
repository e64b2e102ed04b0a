"""The 2D distribution heads: from h_t to a representation z_{t,p} per position.

At timestep t the backbone state h_t has seen the class and x_1..x_t; the head
predicts the remaining grid positions. Grid positions are 0-indexed here, so
"position t" is token x_{t+1}, the next one, and the remaining positions are
t..N-1.

- `global`: a bidirectional Transformer over `[proj(h_t)] ++ queries`.
- `local`: queries cross-attend to h_t; self-attention among queries only within
  `local_attention_window` raster steps of each other.
- `ntp`: the next-token baseline, an MLP on h_t for position t only.

`select_queries` decides which positions a timestep queries and supervises; the
trainer and the sampler both call it, so the distribution read for position t
at sampling time is built exactly as in training.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from heptapod_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Queries:
  """What the head is asked at each sampled timestep.

  positions: [batch, T, Q] grid positions of the head's queries.
  valid: [batch, T, Q] bool; invalid queries are padding (masked as keys).
  target_slots: [batch, T, K] indices into the Q axis of the supervised queries;
    slot 0 is always position t (the next token).
  target_valid: [batch, T, K] bool loss weights.
  """
  positions: jax.Array
  valid: jax.Array
  target_slots: jax.Array
  target_valid: jax.Array

  def target_positions(self):
    """[batch, T, K] grid positions of the supervised targets."""
    return jnp.take_along_axis(self.positions, self.target_slots, axis=-1)


def window_size(head_config, num_positions):
  return head_config.window or num_positions


def num_targets(head_config, num_positions):
  """K: supervised positions per timestep (static)."""
  if head_config.kind == "ntp":
    return 1
  return head_config.density or window_size(head_config, num_positions)


def select_targets(rng, timesteps, *, num_positions, window, count):
  """Picks `count` target positions per timestep, position t always first.

  The other count-1 are drawn uniformly without replacement from positions
  t+1 .. min(t+window, N)-1; slots that the window cannot fill are invalid and
  point at t (so nothing before t is ever read).
  timesteps: [batch, T] int32. Returns positions, valid: [batch, T, count].
  """
  first = timesteps[..., None]
  if count == 1:
    return first, jnp.ones(first.shape, bool)
  grid = jnp.arange(num_positions)
  eligible = (grid > first) & (grid < first + window)
  keys = jnp.where(eligible, jax.random.uniform(rng, eligible.shape), -1.0)
  top_keys, others = jax.lax.top_k(keys, count - 1)
  others_valid = top_keys >= 0
  others = jnp.where(others_valid, others, first)
  positions = jnp.concatenate([first, others], axis=-1).astype(jnp.int32)
  valid = jnp.concatenate([jnp.ones(first.shape, bool), others_valid], axis=-1)
  return positions, valid


def select_queries(rng, timesteps, head_config, num_positions):
  """Query and target construction shared by training and sampling."""
  count = num_targets(head_config, num_positions)
  positions, valid = select_targets(
      rng, timesteps, num_positions=num_positions,
      window=window_size(head_config, num_positions), count=count)
  if head_config.kind != "ntp" and head_config.queries == "grid":
    # The head sees every grid position; targets index into them directly.
    grid = jnp.broadcast_to(jnp.arange(num_positions, dtype=jnp.int32),
                            timesteps.shape + (num_positions,))
    return Queries(positions=grid, valid=jnp.ones(grid.shape, bool),
                   target_slots=positions, target_valid=valid)
  slots = jnp.broadcast_to(jnp.arange(count, dtype=jnp.int32), positions.shape)
  return Queries(positions=positions, valid=valid, target_slots=slots,
                 target_valid=valid)


class _QueryEmbedding(nnx.Module):
  """A shared query vector plus a learned embedding per grid position."""

  def __init__(self, num_positions, width, *, mark_visible, rngs):
    normal = nnx.initializers.normal(0.02)
    self.query = layers.param(rngs, normal, (width,), "embed")
    self.position = layers.param(rngs, normal, (num_positions, width),
                                 "position", "embed")
    # Grid queries also cover already-visible positions (< t); mark them.
    self.visible = (layers.param(rngs, normal, (width,), "embed")
                    if mark_visible else None)

  def __call__(self, positions, timesteps, dtype):
    """positions: [batch, T, Q]; timesteps: [batch, T] -> [batch, T, Q, width]."""
    x = self.query[...] + self.position[...][positions]
    if self.visible is not None:
      is_visible = (positions < timesteps[..., None])[..., None]
      x = x + is_visible * self.visible[...]
    return x.astype(dtype)


class GlobalHead(nnx.Module):

  def __init__(self, config, *, backbone_width, num_positions, rngs):
    cfg = config.head
    self.dtype = jnp.dtype(config.dtype)
    self.in_proj = layers.dense(backbone_width, cfg.width, "embed", "head_embed",
                                rngs=rngs, dtype=self.dtype)
    self.queries = _QueryEmbedding(num_positions, cfg.width,
                                   mark_visible=cfg.queries == "grid", rngs=rngs)
    mlp_hidden = layers.swiglu_hidden(cfg.width)
    self.blocks = nnx.List([
        layers.Block(cfg.width, cfg.num_heads, mlp_hidden, dropout=cfg.dropout,
                     attn_dropout=cfg.dropout, norm_eps=config.backbone.norm_eps,
                     rngs=rngs, dtype=self.dtype)
        for _ in range(cfg.depth)
    ])
    self.final_norm = layers.rms_norm(cfg.width, eps=config.backbone.norm_eps,
                                      rngs=rngs, dtype=self.dtype)

  def __call__(self, h_t, timesteps, queries):
    """h_t: [batch, T, backbone_width] -> z: [batch, T, Q, head_width]."""
    batch, steps, num_queries = queries.positions.shape
    context = self.in_proj(h_t)[:, :, None]
    x = jnp.concatenate(
        [context, self.queries(queries.positions, timesteps, self.dtype)], axis=2)
    x = x.reshape(batch * steps, 1 + num_queries, -1)
    key_valid = jnp.concatenate(
        [jnp.ones((batch, steps, 1), bool), queries.valid], axis=-1)
    mask = key_valid.reshape(batch * steps, 1, 1, 1 + num_queries)
    for block in self.blocks:
      x, _ = block(x, mask)
    z = self.final_norm(x[:, 1:])
    return z.reshape(batch, steps, num_queries, -1)


class LocalHead(nnx.Module):

  def __init__(self, config, *, backbone_width, num_positions, grid_cols, rngs):
    cfg = config.head
    self.dtype = jnp.dtype(config.dtype)
    self.attention_window = cfg.local_attention_window or grid_cols
    self.in_proj = layers.dense(backbone_width, cfg.width, "embed", "head_embed",
                                rngs=rngs, dtype=self.dtype)
    self.queries = _QueryEmbedding(num_positions, cfg.width,
                                   mark_visible=cfg.queries == "grid", rngs=rngs)
    mlp_hidden = layers.swiglu_hidden(cfg.width)
    self.blocks = nnx.List([
        layers.Block(cfg.width, cfg.num_heads, mlp_hidden, cross_attention=True,
                     dropout=cfg.dropout, attn_dropout=cfg.dropout,
                     norm_eps=config.backbone.norm_eps, rngs=rngs, dtype=self.dtype)
        for _ in range(cfg.depth)
    ])
    self.final_norm = layers.rms_norm(cfg.width, eps=config.backbone.norm_eps,
                                      rngs=rngs, dtype=self.dtype)

  def __call__(self, h_t, timesteps, queries):
    """h_t: [batch, T, backbone_width] -> z: [batch, T, Q, head_width]."""
    batch, steps, num_queries = queries.positions.shape
    context = self.in_proj(h_t).reshape(batch * steps, 1, -1)
    x = self.queries(queries.positions, timesteps, self.dtype)
    x = x.reshape(batch * steps, num_queries, -1)
    positions = queries.positions.reshape(batch * steps, num_queries)
    valid = queries.valid.reshape(batch * steps, num_queries)
    distance = jnp.abs(positions[:, :, None] - positions[:, None, :])
    mask = ((distance < self.attention_window) & valid[:, None, :])[:, None]
    context_mask = jnp.ones((1, 1, 1, 1), bool)
    for block in self.blocks:
      x, _ = block(x, mask, context=context, context_mask=context_mask)
    z = self.final_norm(x)
    return z.reshape(batch, steps, num_queries, -1)


class NextTokenHead(nnx.Module):
  """The `ntp` control: residual SwiGLU MLP on h_t, one query (position t)."""

  def __init__(self, config, *, backbone_width, rngs):
    cfg = config.head
    self.dtype = jnp.dtype(config.dtype)
    eps = config.backbone.norm_eps
    self.in_proj = layers.dense(backbone_width, cfg.width, "embed", "head_embed",
                                rngs=rngs, dtype=self.dtype)
    hidden = layers.swiglu_hidden(cfg.width)
    self.norms = nnx.List([layers.rms_norm(cfg.width, eps=eps, rngs=rngs, dtype=self.dtype)
                           for _ in range(cfg.depth)])
    self.mlps = nnx.List([layers.SwiGLU(cfg.width, hidden, dropout=cfg.dropout,
                                        rngs=rngs, dtype=self.dtype)
                          for _ in range(cfg.depth)])
    self.final_norm = layers.rms_norm(cfg.width, eps=eps, rngs=rngs, dtype=self.dtype)

  def __call__(self, h_t, timesteps, queries):
    """h_t: [batch, T, backbone_width] -> z: [batch, T, 1, head_width]."""
    del timesteps, queries  # always position t
    x = self.in_proj(h_t)
    for norm, mlp in zip(self.norms, self.mlps):
      x = x + mlp(norm(x))
    return self.final_norm(x)[:, :, None]


def build_head(config, *, backbone_width, grid, rngs):
  kind = config.head.kind
  num_positions = grid[0] * grid[1]
  if kind == "global":
    return GlobalHead(config, backbone_width=backbone_width,
                      num_positions=num_positions, rngs=rngs)
  if kind == "local":
    return LocalHead(config, backbone_width=backbone_width,
                     num_positions=num_positions, grid_cols=grid[1], rngs=rngs)
  if kind == "ntp":
    return NextTokenHead(config, backbone_width=backbone_width, rngs=rngs)
  raise ValueError(f"model.head.kind: unknown head {kind!r}")
