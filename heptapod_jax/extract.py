"""--mode=extract: encode a dataset once into ArrayRecord token shards.

Each split of `config.data` is cut into `extract.num_shards` contiguous shards;
process i writes shards i, i+P, i+2P, ... A shard appears under its final name
only when complete, so a re-run skips finished shards and redoes the rest
(resumable). With `extract.flip`, each record also stores the tokens of the
horizontally flipped image (as LlamaGen and MAR do), which the generator's
pipeline picks at random when data.random_flip is on.

The output directory gets `tokens.json`: the tokenizer, grid, splits, counts
and, for continuous latents, their standard deviation (the generator scales
latents by tokenizer.latent_scale; see pipeline.py).
"""

import json
import os
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from heptapod_jax import data
from heptapod_jax import errors
from heptapod_jax.data import cached_tokens
from heptapod_jax.data import preprocess
from heptapod_jax.tools import convert_tokenizer


def output_directory(config, workdir):
  return config.extract.output_dir or os.path.join(workdir, "tokens")


def _splits(config):
  if config.extract.splits:
    return [s.strip() for s in config.extract.splits.split(",") if s.strip()]
  splits = [config.data.train_split]
  eval_split = data.eval_split(config.data)
  if eval_split not in splits:
    splits.append(eval_split)
  return splits


def run(config, workdir):
  """Encodes every split; returns the tokens.json dict."""
  if not config.tokenizer.init_from:
    raise errors.ConfigError("tokenizer.init_from: --mode=extract needs a tokenizer "
                     "directory (a trained WORKDIR/tokenizer or the output of "
                     "heptapod_jax.tools.convert_tokenizer)")
  if config.data.dataset == "cached_tokens":
    raise errors.ConfigError("data.dataset: --mode=extract reads images; got cached_tokens")
  tokenizer = convert_tokenizer.load_tokenizer(config.tokenizer.init_from)
  if tokenizer.spec.name != config.tokenizer.name:
    raise errors.ConfigError(
        f"tokenizer.init_from: {config.tokenizer.init_from} holds "
        f"{tokenizer.spec.name!r} but tokenizer.name is {config.tokenizer.name!r}")
  output_dir = output_directory(config, workdir)
  os.makedirs(output_dir, exist_ok=True)
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  graphdef, tokenizer_state = nnx.split(tokenizer)
  tokenizer_state = jax.device_put(tokenizer_state, replicated)
  # Parameters are an argument, not constants baked into the program.
  encode_with = jax.jit(lambda state, images: nnx.merge(graphdef, state).encode(images),
                        in_shardings=(replicated, batch_sharding),
                        out_shardings=batch_sharding)
  encode = lambda images: encode_with(tokenizer_state, images)
  batch_size = config.extract.batch_size
  batch_size -= batch_size % len(devices)
  batch_size = max(batch_size, len(devices))

  summary = {"tokenizer": config.tokenizer.name, "kind": tokenizer.spec.kind,
             "init_from": os.path.abspath(config.tokenizer.init_from),
             "image_size": config.data.image_size, "flip": bool(config.extract.flip),
             "splits": {}}
  latent_moments = np.zeros(3)  # count, sum, sum of squares (continuous only)
  for split in _splits(config):
    source = data.make_source(config.data, split)
    num_shards = min(config.extract.num_shards, len(source))
    bounds = np.linspace(0, len(source), num_shards + 1).astype(int)
    mine = range(jax.process_index(), num_shards, jax.process_count())
    start_time, done, total = time.time(), 0, sum(bounds[i + 1] - bounds[i] for i in mine)
    last_report = 0.0
    for shard in mine:
      path = cached_tokens.token_shard_path(output_dir, split, shard, num_shards)
      begin, end = bounds[shard], bounds[shard + 1]
      if os.path.exists(path):
        logging.info("[extract] %s exists; skipping", path)
        done += end - begin
        continue
      with data.TokenShardWriter(path) as writer:
        for first in range(begin, end, batch_size):
          indices = range(first, min(first + batch_size, end))
          examples = [source[i] for i in indices]
          images = np.stack([preprocess.to_unit_range(e["image"]) for e in examples])
          tokens = _encode(encode, images, batch_size)
          flipped = (_encode(encode, images[:, :, ::-1], batch_size)
                     if config.extract.flip else [None] * len(examples))
          for example, token, flip in zip(examples, tokens, flipped):
            writer.write(token, int(example["label"]), flip)
          if tokenizer.spec.kind == "continuous":
            latent_moments += [tokens.size, tokens.sum(), np.square(tokens).sum()]
          done += len(examples)
          elapsed = time.time() - start_time
          if elapsed - last_report >= 10 or done == total:
            last_report = elapsed
            rate = done / max(elapsed, 1e-9)
            logging.info("[extract] %s: %d/%d images, %.1f images/s, ETA %.0f s",
                         split, done, total, rate, (total - done) / max(rate, 1e-9))
    summary["splits"][split] = {"num_examples": int(len(source)),
                                "num_shards": int(num_shards)}
  if latent_moments[0] > 0:
    mean = latent_moments[1] / latent_moments[0]
    summary["latent_std"] = float(np.sqrt(latent_moments[2] / latent_moments[0] - mean ** 2))
  if jax.process_index() == 0:
    metadata_path = os.path.join(output_dir, "tokens.json")
    if os.path.exists(metadata_path) and "latent_std" not in summary:
      summary["latent_std"] = json.load(open(metadata_path)).get("latent_std")
    with open(metadata_path, "w") as f:
      json.dump(summary, f, indent=2)
  logging.info("[extract] wrote %s", output_dir)
  return summary


def _encode(encode, images, batch_size):
  """Pads the last batch to a full one (one compiled shape) and encodes."""
  count = len(images)
  if count < batch_size:
    images = np.concatenate(
        [images, np.zeros((batch_size - count,) + images.shape[1:], images.dtype)])
  tokens = np.asarray(jax.device_get(encode(images)))
  return tokens[:count]
