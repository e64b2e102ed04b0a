"""The Heptapod generator as a training task: model + loss on token batches."""

from heptapod_jax import config_lib
from heptapod_jax.models import heptapod


class GeneratorTask:
  """Batches are {"tokens": [b, h, w] codes or [b, h, w, C] latents, "label": [b]}."""

  def __init__(self, config):
    self.config = config
    rows, cols = config_lib.grid_shape(config)
    self.tokens_per_example = rows * cols

  def build_model(self, rngs):
    return heptapod.Heptapod(self.config, rngs=rngs)

  def loss(self, model, batch, rng):
    tokens = batch["tokens"]
    # Raster order: [b, h, w(, C)] -> [b, N(, C)].
    tokens = tokens.reshape((tokens.shape[0], self.tokens_per_example) + tokens.shape[3:])
    return model.loss(batch["label"], tokens, rng)
