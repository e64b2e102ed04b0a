"""Heptapod: causal backbone + 2D distribution head + output layer.

    image tokens x_1..x_N (raster order; codes [B, N] or latents [B, N, C])
    [cls(y), x_1..x_{N-1}] --backbone--> h_0..h_{N-1}      (h_t has seen y, x_<=t)
    for sampled t: head(h_t, queries(S_t)) --> z_{t,p}, p in S_t ⊆ {t..N-1}
    loss = mean over (t, p) of CE(logits(z), x_p) or diffusion ε-MSE(x_p | z)

Grid positions are 0-indexed: position t holds token x_{t+1}, the one h_t
predicts next, and it is always a target.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from heptapod_jax import config_lib
from heptapod_jax.models import backbone as backbone_lib
from heptapod_jax.models import diffusion as diffusion_lib
from heptapod_jax.models import heads
from heptapod_jax.models import layers
from heptapod_jax.models import losses


@dataclasses.dataclass(frozen=True)
class NextPositionDistribution:
  """The model's distribution of the next token x_{t+1}.

  Discrete tokenizers give `logits` [batch, vocab]; continuous ones give the
  diffusion `condition` [batch, head_width], sampled with `Heptapod.sample_latents`.
  """
  logits: Optional[jax.Array] = None
  condition: Optional[jax.Array] = None


class Heptapod(nnx.Module):

  def __init__(self, config, *, rngs):
    """config: the full generator config (model, tokenizer and data sections)."""
    model_config = config.model
    tokenizer = config.tokenizer
    self.grid = config_lib.grid_shape(config)
    self.num_positions = self.grid[0] * self.grid[1]
    self.token_kind = tokenizer.kind
    self.head_config = ml_collections.FrozenConfigDict(model_config.head)
    self.null_class = model_config.num_classes if model_config.null_class else None
    self.label_dropout = model_config.label_dropout
    dtype = jnp.dtype(model_config.dtype)
    token_dim = (tokenizer.codebook_size if tokenizer.kind == "discrete"
                 else tokenizer.latent_channels)
    self.token_dim = token_dim
    self.backbone = backbone_lib.Backbone(
        model_config, grid=self.grid, token_kind=tokenizer.kind,
        token_dim=token_dim, rngs=rngs)
    self.head = heads.build_head(model_config, backbone_width=model_config.backbone.width,
                                 grid=self.grid, rngs=rngs)
    head_width = model_config.head.width
    if tokenizer.kind == "discrete":
      self.output = layers.dense(head_width, token_dim, "head_embed", "vocab",
                                 use_bias=True, rngs=rngs, dtype=dtype)
    else:
      self.output = diffusion_lib.DiffusionHead(
          model_config, channels=token_dim, cond_width=head_width, rngs=rngs)
      diffusion = model_config.diffusion
      self.diffusion_batch_mul = diffusion.batch_mul
      self.num_diffusion_steps = diffusion.num_train_steps
      self.num_sampling_steps = diffusion.num_sampling_steps

  # ---------------------------------------------------------------- training

  def drop_labels(self, rng, labels):
    """Replaces labels by the null class with probability `label_dropout`."""
    if not self.label_dropout:
      return labels
    drop = jax.random.bernoulli(rng, self.label_dropout, labels.shape)
    return jnp.where(drop, self.null_class, labels)

  def sample_timesteps(self, rng, batch_size):
    """[batch, T] timesteps per image, distinct within an image."""
    count = self.head_config.timesteps_per_image
    if self.head_config.kind == "ntp" or not count or count >= self.num_positions:
      return jnp.broadcast_to(jnp.arange(self.num_positions, dtype=jnp.int32),
                              (batch_size, self.num_positions))
    scores = jax.random.uniform(rng, (batch_size, self.num_positions))
    return jnp.argsort(scores, axis=-1)[:, :count].astype(jnp.int32)

  def loss(self, labels, tokens, rng, *, train=True):
    """Mean loss over the supervised (timestep, position) pairs.

    labels: [batch] int32; tokens: [batch, N] int32 codes or [batch, N, C]
    latents. `train` enables label dropout (dropout layers follow
    `model.train()` / `model.eval()`). Returns (loss, metrics dict).
    """
    label_rng, time_rng, query_rng, output_rng = jax.random.split(rng, 4)
    if train:
      labels = self.drop_labels(label_rng, labels)
    batch = labels.shape[0]
    hidden = self.backbone(labels, tokens[:, :-1])  # [batch, N, width]
    timesteps = self.sample_timesteps(time_rng, batch)  # [batch, T]
    h_t = jnp.take_along_axis(hidden, timesteps[..., None], axis=1)
    queries = heads.select_queries(query_rng, timesteps, self.head_config,
                                   self.num_positions)
    z = self.head(h_t, timesteps, queries)  # [batch, T, Q, width]
    z = jnp.take_along_axis(z, queries.target_slots[..., None], axis=2)
    positions = queries.target_positions()  # [batch, T, K]
    flat_positions = positions.reshape(batch, -1)
    targets = jnp.take_along_axis(
        tokens, flat_positions.reshape(flat_positions.shape + (1,) * (tokens.ndim - 2)),
        axis=1)
    weights = queries.target_valid.astype(jnp.float32).reshape(-1)
    features = z.reshape(-1, z.shape[-1])
    row_losses = self._output_loss(features, targets.reshape((-1,) + tokens.shape[2:]),
                                   output_rng)
    loss = jnp.sum(row_losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    # Slot 0 of every timestep is position t: the plain next-token term.
    first = row_losses.reshape(positions.shape)[..., 0]
    metrics = {"loss": loss, "next_token_loss": jnp.mean(first),
               "num_targets": jnp.sum(weights)}
    return loss, metrics

  def _output_loss(self, features, targets, rng):
    """features [M, W]; targets [M] codes or [M, C] latents -> losses [M]."""
    if self.token_kind == "discrete":
      bias = self.output.bias[...] if self.output.bias is not None else None
      return losses.chunked_cross_entropy(
          features, self.output.kernel[...], bias, targets,
          self.head_config.loss_chunk_size)
    mul = self.diffusion_batch_mul
    schedule = diffusion_lib.Schedule.cosine(self.num_diffusion_steps)
    row_losses = diffusion_lib.diffusion_loss(
        self.output, schedule, jnp.tile(targets.astype(jnp.float32), (mul, 1)),
        jnp.tile(features, (mul, 1)), rng)
    return row_losses.reshape(mul, -1).mean(axis=0)

  def next_token_nll(self, labels, tokens, rng):
    """Negative log-likelihood of every next token, [batch, N] in nats.

    For each t, the distribution of x_{t+1} is read exactly as the sampler
    reads it (slot 0 of the head's query construction). Discrete tokens give
    the exact cross-entropy; continuous tokens a one-sample estimate of the
    diffusion variational bound (an upper bound on -log density).
    """
    query_rng, output_rng = jax.random.split(rng)
    batch = labels.shape[0]
    hidden = self.backbone(labels, tokens[:, :-1])
    timesteps = jnp.broadcast_to(jnp.arange(self.num_positions, dtype=jnp.int32),
                                 (batch, self.num_positions))
    queries = heads.select_queries(query_rng, timesteps, self.head_config,
                                   self.num_positions)
    z = self.head(hidden, timesteps, queries)
    z = jnp.take_along_axis(z, queries.target_slots[..., :1, None], axis=2)[:, :, 0]
    features = z.reshape(-1, z.shape[-1])
    flat_tokens = tokens.reshape((-1,) + tokens.shape[2:])
    if self.token_kind == "discrete":
      bias = self.output.bias[...] if self.output.bias is not None else None
      rows = losses.chunked_cross_entropy(features, self.output.kernel[...], bias,
                                          flat_tokens, self.head_config.loss_chunk_size)
    else:
      schedule = diffusion_lib.Schedule.cosine(self.num_diffusion_steps)
      rows = diffusion_lib.variational_bound(
          self.output, schedule, flat_tokens.astype(jnp.float32), features, output_rng)
    return rows.reshape(batch, self.num_positions)

  # ---------------------------------------------------------------- sampling

  def head_condition(self, h_t, timesteps, rng):
    """z for position t from h_t, with the training query construction.

    h_t: [batch, backbone_width]; timesteps: [batch] -> [batch, head_width].
    """
    timesteps = timesteps[:, None]
    queries = heads.select_queries(rng, timesteps, self.head_config,
                                   self.num_positions)
    z = self.head(h_t[:, None], timesteps, queries)  # [batch, 1, Q, width]
    slot = queries.target_slots[:, :, :1]  # position t
    return jnp.take_along_axis(z, slot[..., None], axis=2)[:, 0, 0]

  def distribution_from_hidden(self, h_t, timesteps, rng):
    """NextPositionDistribution of x_{t+1} from backbone states h_t [batch, width]."""
    condition = self.head_condition(h_t, timesteps, rng)
    if self.token_kind == "discrete":
      logits = self.output(condition).astype(jnp.float32)
      return NextPositionDistribution(logits=logits)
    return NextPositionDistribution(condition=condition)

  def next_position_distribution(self, labels, tokens, timestep, rng):
    """p(x_{t+1} | y, x_1..x_t) by a full (uncached) backbone pass.

    labels: [batch]; tokens: [batch, N(, C)] (entries after t are ignored, by
    causality); timestep: scalar int t in [0, N).
    """
    hidden = self.backbone(labels, tokens[:, :-1])
    batch = labels.shape[0]
    timesteps = jnp.full((batch,), timestep, jnp.int32)
    return self.distribution_from_hidden(hidden[:, timestep], timesteps, rng)

  def sample_latents(self, condition, rng, temperature):
    """Draws continuous tokens [batch, C] given the diffusion condition."""
    schedule = diffusion_lib.Schedule.cosine(
        self.num_diffusion_steps).respaced(self.num_sampling_steps)
    return diffusion_lib.ddpm_sample(self.output, schedule, condition,
                                     self.token_dim, rng, temperature)


def component_parameter_counts(model_state):
  """{'backbone', 'head', 'output', 'total'} parameter counts of an nnx.State."""
  counts = {}
  for name in ("backbone", "head", "output"):
    leaves = jax.tree.leaves(model_state[name])
    counts[name] = int(sum(leaf.size for leaf in leaves))
  counts["total"] = sum(counts.values())
  return counts
