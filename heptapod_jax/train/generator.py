"""The Heptapod generator as a training task: model + loss on token batches."""

import jax
from absl import logging

from heptapod_jax import config_lib
from heptapod_jax import data
from heptapod_jax.models import heptapod
from heptapod_jax.parallel import sharding


class GeneratorTask:
  """Batches are {"tokens": [b, h, w] codes or [b, h, w, C] latents, "label": [b]}."""

  def __init__(self, config):
    self.config = config
    rows, cols = config_lib.grid_shape(config)
    self.tokens_per_example = rows * cols
    self.sharding_rules = sharding.rules_for(config.model.variant)
    self.latent_scale = (config.tokenizer.latent_scale
                         if config.tokenizer.kind == "continuous" else None)
    self._decode_fn = None
    if config.train.sample_every and config.tokenizer.init_from:
      # Built here, outside the trainer's mesh context (nnx.eval_shape under a
      # mesh would read logical axis names as mesh axes).
      from heptapod_jax.sample import generate
      self._decode_fn = generate.make_decode_fn(config)

  def periodic(self, *, step, params, graphdef, rest, mesh, writer):
    """Every train.sample_every steps a class grid, every train.eval_every the
    test NLL, both from the EMA parameters, to TensorBoard."""
    train_config = self.config.train
    sample_now = train_config.sample_every and step % train_config.sample_every == 0
    eval_now = train_config.eval_every and step % train_config.eval_every == 0
    if not (sample_now or eval_now):
      return
    from flax import nnx
    from heptapod_jax import nnx_utils
    model = nnx.merge(graphdef, params, nnx_utils.fresh_rng_state(rest, jax.random.key(0)))
    model.eval()
    if sample_now:
      if not self.config.tokenizer.init_from:
        logging.warning("[train] no sample grid: tokenizer.init_from is not set")
      else:
        writer.write_images(step, {"samples": self._sample_grid(model, mesh)[None]})
    if eval_now:
      from heptapod_jax.eval import evaluate
      nll = evaluate.model_nll(self.config, model, mesh,
                               self.config.eval.nll_max_batches or 5)
      writer.write_scalars(step, {"eval/bits_per_token": nll["bits_per_token"]})

  def _sample_grid(self, model, mesh):
    """uint8 [H, W, 3]: train.sample_grid_per_class samples of up to 10 classes."""
    import numpy as np
    from heptapod_jax import images as images_lib
    from heptapod_jax.sample import sampler as sampler_lib
    per_class = self.config.train.sample_grid_per_class
    classes = min(self.config.model.num_classes, 10)
    labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
    sampler = sampler_lib.Sampler(model, mesh=mesh, batch_axes=sharding.BATCH_AXES,
                                  decode_fn=self._decode_fn)
    params = sampler_lib.sampling_params_from_config(
        self.config.sample, default_diffusion_temperature=self.config.model.diffusion.temperature)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-len(labels) // replicas) * replicas
    images = [images_lib.to_uint8(batch.images) for batch in
              sampler.batches(labels, params, seed=0, batch_size=batch_size)]
    return images_lib.grid(np.concatenate(images)[:len(labels)], columns=per_class)

  def build_model(self, rngs):
    return heptapod.Heptapod(self.config, rngs=rngs)

  def loss(self, model, batch, rng, step=None):
    del step
    tokens = batch["tokens"]
    # Raster order: [b, h, w(, C)] -> [b, N(, C)].
    tokens = tokens.reshape((tokens.shape[0], self.tokens_per_example) + tokens.shape[3:])
    if self.latent_scale is not None:
      tokens = tokens.astype("float32") * self.latent_scale
    return model.loss(batch["label"], tokens, rng)


def run(config, workdir):
  """--mode=train for a generator config: trains on cached token shards."""
  from heptapod_jax.train import trainer
  if config.data.dataset != "cached_tokens":
    raise config_lib.ConfigError(
        f"data.dataset: the generator trains on token shards, got "
        f"{config.data.dataset!r}; run --mode=extract (with tokenizer.init_from) "
        "first, then set data.dataset=cached_tokens and data.cached_tokens=DIR")
  iterator = iter(data.make_dataset(
      config.data, split=config.data.train_split, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count()))
  return trainer.train(GeneratorTask(config), config, workdir, iterator)
