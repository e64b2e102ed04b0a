"""The on-device autoregressive sampler (KV-cached, one jitted program per shape).

    prefill cls(y) -> h_0, cache
    for t in 0..N-1 (lax.fori_loop):
        head(h_t, queries(t)) -> p(x_{t+1})      (Heptapod.distribution_from_hidden)
        x_{t+1} ~ strategy(p)                    (strategies.sample_codes / DDPM)
        tokens[:, t] = x_{t+1}
        h_{t+1}, cache = backbone.decode(embed(x_{t+1}), cache, index t+1)
                                                 (skipped after the last step)

Randomness is per example: example i of a run draws from
`fold_in(key(seed), i)` (i = the global example index, never the device
layout), and step t from `fold_in(that key, t)` split into a query key (the
head's target selection) and a draw key (the code or the diffusion noise).
The head and the draw run under `jax.vmap` over examples with batch-1 views,
because `distribution_from_hidden` and `sample_latents` take one key for their
whole batch. So a fixed seed gives the same images on any mesh and any batch
size.

Classifier-free guidance (for comparisons with label-dropout models only;
Heptapod needs none) runs the conditional and the null-class sequence of each
example side by side in one doubled batch, [c_0, u_0, c_1, u_1, ...], so that
both stay on the example's device. Codes: logits l_u + s (l_c - l_u).
Latents: the MAR way, one DDPM chain per example whose ε is
ε_u + s (ε_c - ε_u). Whether guidance is compiled in is static (a second
program); the scale itself is traced.

Decoding tokens to pixels is the caller's `decode_fn` (a jitted tokenizer
decoder), so the sampler knows nothing of tokenizers.
"""

import dataclasses
import logging
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_dict

from heptapod_jax.models import diffusion as diffusion_lib
from heptapod_jax.sample import strategies

MESH_AXES = ("data", "fsdp", "tensor")


# ------------------------------------------------------------------- config

def default_sample_config():
  """The `sample` section: every field the sampler and its batch loop read."""
  config = ml_collections.ConfigDict()
  config.num_samples = 1000  # images in a run (e.g. 50_000 for ImageNet FID)
  config.batch_size = 64  # global batch, split over the mesh's data axis
  config.seed = 0  # example i draws from fold_in(key(seed), i)
  # Class ids to draw from, comma-separated ("0,3,7"); None: all classes,
  # class-balanced (example i has class i mod num_classes).
  config.classes = config_dict.placeholder(str)
  config.temperature = 1.0  # codes: <= 0 is greedy
  config.top_k = 0  # 0 = off
  config.top_p = 1.0  # >= 1 = off
  config.greedy = False
  # Continuous tokens: noise scale of the DDPM sampler; None: model.diffusion.temperature.
  config.diffusion_temperature = config_dict.placeholder(float)
  # Classifier-free guidance scale; 0 or 1 = off. Only for comparison runs with
  # label-dropout-trained models (needs model.null_class).
  config.cfg_scale = 1.0
  return config


def sampling_params_from_config(sample_config, default_diffusion_temperature=1.0):
  """SamplingParams from the `sample` section; diffusion temperature None -> default."""
  diffusion_temperature = sample_config.diffusion_temperature
  if diffusion_temperature is None:
    diffusion_temperature = default_diffusion_temperature
  return strategies.SamplingParams.create(
      temperature=sample_config.temperature, top_k=sample_config.top_k,
      top_p=sample_config.top_p, greedy=sample_config.greedy,
      diffusion_temperature=diffusion_temperature,
      cfg_scale=sample_config.cfg_scale)


def guidance_enabled(cfg_scale):
  """Whether a (concrete) CFG scale asks for the doubled-batch program."""
  return float(cfg_scale) not in (0.0, 1.0)


def class_balanced_labels(num_samples, num_classes=None, classes=None):
  """int32 [num_samples]: example i gets classes[i mod len(classes)].

  `classes` defaults to range(num_classes); every class gets the same number
  of examples (up to one) and any prefix of the run is balanced too.
  """
  if classes is None:
    if not num_classes:
      raise ValueError("class_balanced_labels: give num_classes or classes")
    classes = np.arange(num_classes)
  classes = np.asarray(classes, np.int32)
  return classes[np.arange(num_samples) % len(classes)]


def labels_from_config(sample_config, num_classes):
  """Labels [num_samples] for a run: `sample.classes` or all classes, balanced."""
  classes = sample_config.classes
  if isinstance(classes, str):
    classes = [int(part) for part in classes.split(",") if part.strip()]
  if classes is not None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
      raise ValueError(
          f"sample.classes: {sample_config.classes!r} must list class ids in "
          f"[0, {num_classes})")
  return class_balanced_labels(sample_config.num_samples, num_classes, classes)


# ------------------------------------------------------------------ the RNG

def example_keys(rng, example_index):
  """Per-example keys [B] = fold_in(rng, global example index [B])."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_index)


def step_keys(example_key, t):
  """(query_key, draw_key) of one example at grid step t."""
  query_key, draw_key = jax.random.split(jax.random.fold_in(example_key, t))
  return query_key, draw_key


# -------------------------------------------------------------- the program

def _guided_latents(model, conditions, keys, temperature, scale):
  """MAR-style guided DDPM, one chain per example.

  conditions: [B, 2, W] (conditional, null class); keys: [B] -> latents [B, C].
  """
  schedule = diffusion_lib.Schedule.cosine(
      model.num_diffusion_steps).respaced(model.num_sampling_steps)

  def guided_eps(noisy, steps, paired_condition):
    # noisy [1, C]; paired_condition [1, 2W]: both halves see the same x_t.
    conditional, null = jnp.split(paired_condition, 2, axis=-1)
    eps = model.output(jnp.concatenate([noisy, noisy]),
                       jnp.concatenate([steps, steps]),
                       jnp.concatenate([conditional, null]))
    eps_c, eps_u = jnp.split(eps, 2)
    return eps_u + scale * (eps_c - eps_u)

  def one(condition_pair, key):
    paired = condition_pair.reshape(1, -1)
    return diffusion_lib.ddpm_sample(guided_eps, schedule, paired,
                                     model.token_dim, key, temperature)[0]

  return jax.vmap(one)(conditions, keys)


def make_sample_fn(graphdef, *, guidance=False, num_steps=None,
                   batch_sharding=None):
  """Builds the jitted sampler `sample_fn(state, labels, example_index, rng, params)`.

  graphdef: from `nnx.split(model)`; state: the matching nnx.State (any
    placement; nothing is donated).
  labels: int32 [B]; example_index: int32 [B] global example indices (the RNG
    of example i is fold_in(rng, i)); rng: a typed key (jax.random.key(seed));
    params: strategies.SamplingParams (traced: new values never recompile).
  guidance: compile classifier-free guidance in (doubled batch; reads
    params.cfg_scale; the model needs a null class).
  num_steps: sample only the first `num_steps` grid positions (benchmarks);
    the rest stay zero. None: all N.
  batch_sharding: a NamedSharding for the batch axis (e.g. P('data')); the
    cache, token buffer and output are constrained to it.
  Returns tokens [B, rows, cols] int32 (codes) or [B, rows, cols, C] float32
  (latents).
  """

  def constrain(tree):
    if batch_sharding is None:
      return tree
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)

  def sample_fn(state, labels, example_index, rng, params):
    model = nnx.merge(graphdef, state)
    model.eval()
    backbone = model.backbone
    discrete = model.token_kind == "discrete"
    if guidance and model.null_class is None:
      raise ValueError("classifier-free guidance needs model.null_class=True")
    batch = labels.shape[0]
    positions = model.num_positions
    steps = positions if num_steps is None else num_steps
    if not 1 <= steps <= positions:
      raise ValueError(f"num_steps: {num_steps} not in [1, {positions}]")
    token_shape = () if discrete else (model.token_dim,)
    token_dtype = jnp.int32 if discrete else jnp.float32
    keys = example_keys(rng, example_index)  # [B]

    # Sequences: one per example, or (conditional, null) pairs side by side.
    copies = 2 if guidance else 1
    if guidance:
      sequence_labels = jnp.stack(
          [labels, jnp.full_like(labels, model.null_class)], axis=1).reshape(-1)
    else:
      sequence_labels = labels
    sequences = batch * copies

    def head_output(h, t, query_keys):
      """h [S, W] -> logits [S, V] or condition [S, Wh], one example at a time."""
      def one(h_one, key):
        timesteps = jnp.full((1,), t, jnp.int32)
        dist = model.distribution_from_hidden(h_one[None], timesteps, key)
        return (dist.logits if discrete else dist.condition)[0]
      return jax.vmap(one)(h, query_keys)

    def draw(t, h, tokens):
      """Draws x_{t+1} for every example; writes it at grid position t."""
      query_keys, draw_keys = jax.vmap(step_keys, in_axes=(0, None))(keys, t)
      out = head_output(h, t, jnp.repeat(query_keys, copies))
      out = out.reshape((batch, copies) + out.shape[1:])
      if discrete:
        logits = out[:, 0]
        if guidance:
          logits = out[:, 1] + params.cfg_scale * (out[:, 0] - out[:, 1])
        token = jax.vmap(strategies.sample_codes, in_axes=(0, 0, None))(
            draw_keys, logits, params)
      elif guidance:
        token = _guided_latents(model, out, draw_keys,
                                params.diffusion_temperature, params.cfg_scale)
      else:
        token = jax.vmap(
            lambda c, k: model.sample_latents(c[None], k, params.diffusion_temperature)[0]
        )(out[:, 0], draw_keys)
      token = token.astype(token_dtype)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)
      return token, constrain(tokens)

    def feed(t, token, h, cache):
      """Runs x_{t+1} through the backbone at sequence index t+1 -> h_{t+1}."""
      inputs = backbone.embed_tokens(jnp.repeat(token, copies, axis=0)[:, None])
      h, cache = backbone.decode(inputs, cache, t + 1)
      return constrain(h[:, 0]), constrain(cache)

    def step(t, carry):
      h, cache, tokens = carry
      token, tokens = draw(t, h, tokens)
      # The last token needs no decode (a cond, so the step is compiled once).
      h, cache = jax.lax.cond(t + 1 < steps, feed,
                              lambda t, token, h, cache: (h, cache),
                              t, token, h, cache)
      return h, cache, tokens

    cache = constrain(backbone.init_cache(sequences))
    empty = jnp.zeros((sequences, 0) + token_shape, token_dtype)
    h, cache = backbone.decode(backbone.embed(sequence_labels, empty), cache, 0)
    tokens = constrain(jnp.zeros((batch, positions) + token_shape, token_dtype))
    _, _, tokens = jax.lax.fori_loop(
        0, steps, step, (constrain(h[:, 0]), constrain(cache), tokens))
    return tokens.reshape((batch,) + tuple(model.grid) + token_shape)

  return jax.jit(sample_fn, out_shardings=batch_sharding)


# ---------------------------------------------------------- the convenience

@dataclasses.dataclass
class SampleBatch:
  """One batch of a run, on the host.

  tokens: [b, rows, cols(, C)]; images: decode_fn(tokens) or None;
  labels: [b]; first_index: global index of tokens[0];
  images_per_second: this batch; total_images_per_second: the run so far
  (both wall-clock, first-batch compilation included in the total).
  """
  tokens: np.ndarray
  images: Optional[np.ndarray]
  labels: np.ndarray
  first_index: int
  images_per_second: float
  total_images_per_second: float


def _to_host(x):
  if jax.process_count() > 1:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


class Sampler:
  """A model's sampler on an optional mesh: places inputs, caches programs.

  model: a Heptapod (read once with nnx.split; later changes to it are not
  seen). mesh: a ('data', 'fsdp', 'tensor') mesh; parameters already sharded
  on it are used as they are, the others are replicated; the batch is split
  over `batch_axes`. decode_fn: optional jitted tokens [B, rows, cols(, C)] ->
  images, applied on device to each batch.
  """

  def __init__(self, model, *, mesh=None, batch_axes=("data",),
               decode_fn: Optional[Callable] = None, num_steps=None):
    self.graphdef, state = nnx.split(model)
    self.mesh = mesh
    self.decode_fn = decode_fn
    self.null_class = model.null_class
    self.num_positions = model.num_positions
    self.num_steps = num_steps
    if mesh is not None:
      self.batch_sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(tuple(batch_axes)))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      state = jax.tree.map(
          lambda x: x if getattr(x.sharding, "mesh", None) == mesh
          else jax.device_put(x, replicated), state)
    else:
      self.batch_sharding = None
    self.state = state
    self._programs = {}

  def program(self, guidance):
    """The jitted sample_fn with or without CFG (built once each)."""
    if guidance not in self._programs:
      if guidance and self.null_class is None:
        raise ValueError(
            "sample.cfg_scale: guidance needs a model with model.null_class=True")
      self._programs[guidance] = make_sample_fn(
          self.graphdef, guidance=guidance, num_steps=self.num_steps,
          batch_sharding=self.batch_sharding)
    return self._programs[guidance]

  def _put(self, values):
    values = np.asarray(values, np.int32)
    if self.batch_sharding is None:
      return jnp.asarray(values)
    return jax.make_array_from_callback(values.shape, self.batch_sharding,
                                        lambda index: values[index])

  def sample(self, labels, params=None, *, seed=0, first_index=0, guidance=None):
    """Tokens [B, rows, cols(, C)] (a device array) for labels [B].

    Example j of the call is global example first_index + j. B must divide
    over the mesh's batch axes. guidance: compile CFG in; None: when
    `guidance_enabled(params.cfg_scale)`.
    """
    params = params or strategies.SamplingParams.create()
    if guidance is None:
      guidance = guidance_enabled(params.cfg_scale)
    labels = np.asarray(labels, np.int32)
    index = first_index + np.arange(len(labels), dtype=np.int32)
    program = self.program(guidance)
    rng = jax.random.key(seed)
    if self.mesh is None:
      return program(self.state, self._put(labels), self._put(index), rng, params)
    with jax.set_mesh(self.mesh):
      return program(self.state, self._put(labels), self._put(index), rng, params)

  def batches(self, labels, params=None, *, seed=0, batch_size,
              log_every_seconds=30.0) -> Iterator[SampleBatch]:
    """Samples labels [num_samples] in batches of `batch_size` (one program).

    The last batch is padded to batch_size and cut. Yields SampleBatch on the
    host; logs progress (images/s) at most every `log_every_seconds`.
    """
    labels = np.asarray(labels, np.int32)
    total = len(labels)
    start_time = last_log = time.perf_counter()
    for first in range(0, total, batch_size):
      batch_start = time.perf_counter()
      chunk = labels[first:first + batch_size]
      count = len(chunk)
      padded = np.concatenate([chunk, np.zeros(batch_size - count, np.int32)])
      tokens = self.sample(padded, params, seed=seed, first_index=first)
      images = None
      if self.decode_fn is not None:
        images = _to_host(self.decode_fn(tokens))[:count]
      tokens = _to_host(tokens)[:count]
      now = time.perf_counter()
      done = first + count
      result = SampleBatch(
          tokens=tokens, images=images, labels=chunk, first_index=first,
          images_per_second=count / max(now - batch_start, 1e-9),
          total_images_per_second=done / max(now - start_time, 1e-9))
      if now - last_log >= log_every_seconds or done == total:
        last_log = now
        logging.info("sampled %d/%d images, %.2f images/s (this batch %.2f)",
                     done, total, result.total_images_per_second,
                     result.images_per_second)
      yield result
