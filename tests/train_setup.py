"""Shared by test_train.py and the multi-process worker: a tiny token dataset
written as real token shards, and a few train steps through the real pipeline."""

import jax
import numpy as np

from conftest import micro_config
from heptapod_jax import data
from heptapod_jax.parallel import sharding
from heptapod_jax.train import generator
from heptapod_jax.train import step as step_lib

NUM_EXAMPLES = 64


def write_token_shards(directory, num_shards=2):
  rng = np.random.default_rng(7)
  config = micro_config()
  per_shard = NUM_EXAMPLES // num_shards
  for shard in range(num_shards):
    with data.TokenShardWriter(data.token_shard_path(directory, "train", shard, num_shards)) as w:
      for _ in range(per_shard):
        w.write(rng.integers(0, config.tokenizer.codebook_size, (4, 4)), int(rng.integers(10)))


def pipeline_config(shard_dir):
  config = micro_config()
  config.data.dataset = "cached_tokens"
  config.data.cached_tokens = str(shard_dir)
  config.data.batch_size = 8
  config.data.random_flip = False
  config.data.read_threads = 0
  config.optim.learning_rate = 1e-2
  config.optim.warmup_steps = 1
  return config


def losses_from_pipeline(shard_dir, steps):
  """Losses of `steps` train steps on all devices of all processes."""
  config = pipeline_config(shard_dir)
  mesh = sharding.make_mesh(config)
  functions = step_lib.build(generator.GeneratorTask(config), config, mesh, steps)
  iterator = iter(data.make_dataset(
      config.data, split="train", seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count()))
  losses = []
  with jax.set_mesh(mesh):
    state = functions.init()
    for _ in range(steps):
      state, metrics = functions.step(state, sharding.put_local_batch(next(iterator), mesh))
      losses.append(float(metrics["loss"]))
  return losses
