"""--mode=sample: EMA weights from a checkpoint -> images, grid PNG and ADM .npz.

Reads the generator's EMA parameters (only them) from WORKDIR/checkpoints or
`sample.checkpoint`, decodes tokens to pixels with the tokenizer from
`tokenizer.init_from` on device, and writes under `sample.output_dir`
(default WORKDIR/samples):
  grid.png        the first `sample.grid_rows` x `sample.grid_columns` images
  images/NNNNN.png one file per image (when sample.save_pngs)
  samples.npz     arr_0: uint8 [N, H, W, 3], arr_1: int32 labels [N] (ADM format)
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from heptapod_jax import errors
from heptapod_jax import images as images_lib
from heptapod_jax import nnx_utils
from heptapod_jax.models import heptapod
from heptapod_jax.parallel import sharding
from heptapod_jax.sample import sampler as sampler_lib
from heptapod_jax.tools import convert_tokenizer
from heptapod_jax.train import checkpoint as checkpoint_lib


def load_generator(config, checkpoint_dir, mesh):
  """(Heptapod with EMA parameters placed on `mesh`, checkpoint step)."""
  abstract = nnx.eval_shape(lambda: heptapod.Heptapod(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  shardings = sharding.state_shardings(abstract_params, mesh,
                                       sharding.rules_for(config.model.variant))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_params), shardings)
  params, step = checkpoint_lib.restore_params(checkpoint_dir, target, item="ema")
  model = nnx.merge(graphdef, params, nnx_utils.fresh_rng_state(rest, jax.random.key(0)))
  model.eval()
  return model, step


def make_decode_fn(config):
  """Jitted tokens [B, h, w(, C)] -> float images [B, H, W, 3] in [-1, 1].

  The tokenizer comes from tokenizer.init_from; continuous latents are divided
  by tokenizer.latent_scale first (the generator works on scaled latents).
  """
  if not config.tokenizer.init_from:
    raise errors.ConfigError("tokenizer.init_from: sampling decodes tokens to pixels and "
                     "needs the tokenizer directory")
  tokenizer = convert_tokenizer.load_tokenizer(config.tokenizer.init_from)
  graphdef, state = nnx.split(tokenizer)
  scale = config.tokenizer.latent_scale if config.tokenizer.kind == "continuous" else None

  @jax.jit
  def decode(state, tokens):
    if scale is not None:
      tokens = tokens / scale
    images = nnx.merge(graphdef, state).decode(tokens)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
  return lambda tokens: decode(state, tokens)


def run(config, workdir, *, num_samples=None, output_dir=None, write_files=True):
  """Draws config.sample.num_samples images; returns (uint8 images, labels, info)."""
  sample_config = config.sample
  num_samples = num_samples or sample_config.num_samples
  output_dir = output_dir or sample_config.output_dir or os.path.join(workdir, "samples")
  checkpoint_dir = sample_config.checkpoint or os.path.join(workdir, "checkpoints")
  mesh = sharding.make_mesh(config)
  model, step = load_generator(config, checkpoint_dir, mesh)
  logging.info("[sample] generator step %d from %s", step, checkpoint_dir)
  sampler = sampler_lib.Sampler(model, mesh=mesh, batch_axes=sharding.BATCH_AXES,
                                decode_fn=make_decode_fn(config))
  all_labels = sampler_lib.labels_from_config(
      sample_config.copy_and_resolve_references(), config.model.num_classes)[:num_samples]
  if len(all_labels) < num_samples:
    all_labels = np.resize(all_labels, num_samples)
  params = sampler_lib.sampling_params_from_config(
      sample_config, default_diffusion_temperature=config.model.diffusion.temperature)
  start = time.time()
  images, labels, done = [], [], 0
  with jax.set_mesh(mesh):
    for batch in sampler.batches(all_labels, params, seed=sample_config.seed,
                                 batch_size=sample_config.batch_size):
      images.append(images_lib.to_uint8(batch.images))
      labels.append(np.asarray(batch.labels))
      done = min(done + len(images[-1]), num_samples)
      rate = done / max(time.time() - start, 1e-9)
      logging.info("[sample] %d/%d images, %.1f images/s, ETA %.0f s", done, num_samples,
                   rate, (num_samples - done) / rate)
  images = np.concatenate(images)[:num_samples]
  labels = np.concatenate(labels)[:num_samples].astype(np.int32)
  seconds = time.time() - start
  info = {"num_samples": int(len(images)), "seconds": seconds,
          "images_per_second": len(images) / max(seconds, 1e-9),
          "checkpoint_step": int(step), "output_dir": output_dir}
  logging.info("[sample] %d images in %.1f s (%.2f images/s)", len(images), seconds,
               info["images_per_second"])
  if write_files and jax.process_index() == 0:
    write_outputs(images, labels, output_dir, config, info)
  return images, labels, info


def write_outputs(images, labels, output_dir, config, info):
  os.makedirs(output_dir, exist_ok=True)
  sample_config = config.sample
  count = min(len(images), sample_config.grid_rows * sample_config.grid_columns)
  picture = images_lib.grid(images[:count], columns=sample_config.grid_columns)
  images_lib.save_png(picture, os.path.join(output_dir, "grid.png"))
  np.savez(os.path.join(output_dir, "samples.npz"), arr_0=images, arr_1=labels)
  if sample_config.save_pngs:
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    for index, image in enumerate(images):
      images_lib.save_png(image, os.path.join(image_dir, f"{index:05d}.png"))
  with open(os.path.join(output_dir, "samples.json"), "w") as f:
    json.dump(info, f, indent=2)
