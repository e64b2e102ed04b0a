"""The Heptapod generator as a training task: model + loss on token batches."""

import jax

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
