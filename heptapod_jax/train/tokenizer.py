"""The visual tokenizer as a training task, its evaluation and its export.

Loss (all terms per image, averaged over the batch):
  reconstruction  L1 or L2 over pixels
  + VQ codebook + commitment losses (straight-through) | KL weight x KL term
  + perceptual weight x LPIPS (only when VGG and LPIPS weight files are given)
  + adoption(step) x [adaptive weight x adversarial weight x hinge generator loss
                      + hinge discriminator loss]        (PatchGAN, optional)
The discriminator shares the optimizer: its parameters get gradients only from
the discriminator loss (it sees the reconstruction through stop_gradient), and
the tokenizer only from the other terms (the generator term reads the
discriminator through stop_gradient of its parameters).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from heptapod_jax import data
from heptapod_jax import images as images_lib
from heptapod_jax.models import tokenizers
from heptapod_jax.parallel import sharding


class Trainee(nnx.Module):
  """The tokenizer and, when adversarial training is on, its discriminator."""

  def __init__(self, tokenizer, discriminator=None):
    self.tokenizer = tokenizer
    self.discriminator = discriminator


def build_tokenizer(tokenizer_config, rngs, dtype="float32"):
  return tokenizers.build_tokenizer(tokenizer_config.name, rngs=rngs, dtype=dtype)


class TokenizerTask:
  """Batches are {"image": float32 [b, H, W, 3] in [-1, 1], "label": [b]}."""

  def __init__(self, config, perceptual=None):
    """perceptual: an LPIPS module (frozen; weights from files) or None."""
    self.config = config
    self.loss_config = config.tokenizer.loss
    self.perceptual = perceptual
    self.sharding_rules = sharding.rules_for("tokenizer")
    self.tokens_per_example = (config.data.image_size // config.tokenizer.stride) ** 2

  def build_model(self, rngs):
    tokenizer = build_tokenizer(self.config.tokenizer, rngs)
    discriminator = None
    if self.loss_config.adversarial_weight > 0:
      from heptapod_jax.models.tokenizers import discriminator as discriminator_lib
      discriminator = discriminator_lib.build_discriminator(
          self.loss_config.discriminator, rngs=rngs)
    return Trainee(tokenizer, discriminator)

  def loss(self, model, batch, rng, step=None):
    images = batch["image"]
    loss_config = self.loss_config
    reconstruction, aux = model.tokenizer(images, rng)
    reconstruction = reconstruction.astype(jnp.float32)
    difference = reconstruction - images
    if loss_config.reconstruction == "l1":
      reconstruction_loss = jnp.mean(jnp.abs(difference))
    else:
      reconstruction_loss = jnp.mean(jnp.square(difference))
    metrics = {"reconstruction_loss": reconstruction_loss,
               "psnr": _psnr(reconstruction, images).mean()}
    total = reconstruction_loss
    if "codebook_loss" in aux:
      quantizer_loss = aux["codebook_loss"] + aux["commitment_loss"]
      total = total + loss_config.codebook_weight * quantizer_loss
      metrics["codebook_loss"] = aux["codebook_loss"]
      metrics["commitment_loss"] = aux["commitment_loss"]
      codes = aux["codes"].reshape(-1)
      used = jnp.zeros((self.config.tokenizer.codebook_size,), bool).at[codes].set(True)
      metrics["batch_codebook_usage"] = used.mean()
    else:
      # KL per image, normalised like the per-pixel reconstruction mean (LDM
      # scaling: the same weight means the same trade-off as LDM's sums).
      kl = jnp.mean(aux["kl"]) / np.prod(images.shape[1:])
      total = total + loss_config.kl_weight * kl
      metrics["kl"] = jnp.mean(aux["kl"])
    if self.perceptual is not None and loss_config.perceptual_weight > 0:
      perceptual = jnp.mean(self.perceptual(reconstruction, images))
      total = total + loss_config.perceptual_weight * perceptual
      metrics["perceptual_loss"] = perceptual
    if model.discriminator is not None:
      total = total + self._adversarial(model, images, reconstruction,
                                        reconstruction_loss, step, metrics)
    metrics["loss"] = total
    return total, metrics

  def _adversarial(self, model, images, reconstruction, reconstruction_loss,
                   step, metrics):
    from heptapod_jax.models.tokenizers import discriminator as discriminator_lib
    loss_config = self.loss_config
    graphdef, state = nnx.split(model.discriminator)
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))

    def generator_loss(fake):
      return discriminator_lib.hinge_generator_loss(frozen(fake))

    def rec_loss(fake):
      if loss_config.reconstruction == "l1":
        return jnp.mean(jnp.abs(fake - images))
      return jnp.mean(jnp.square(fake - images))

    # Adaptive weight from gradient norms w.r.t. the decoder output (VQGAN uses
    # the last layer's weights; the output is the same signal one layer later).
    g_loss, g_grad = jax.value_and_grad(generator_loss)(reconstruction)
    rec_grad = jax.grad(rec_loss)(reconstruction)
    weight = discriminator_lib.adaptive_weight(jnp.linalg.norm(rec_grad),
                                               jnp.linalg.norm(g_grad))
    adoption = discriminator_lib.adoption_weight(
        step if step is not None else 0, loss_config.adversarial_start_step)
    logits_real = model.discriminator(images)
    logits_fake = model.discriminator(jax.lax.stop_gradient(reconstruction))
    d_loss = discriminator_lib.hinge_discriminator_loss(logits_real, logits_fake)
    metrics.update(generator_adversarial_loss=g_loss, discriminator_loss=d_loss,
                   adaptive_weight=weight, adversarial_adoption=adoption)
    del reconstruction_loss
    return adoption * (weight * loss_config.adversarial_weight * g_loss + d_loss)


def _psnr(reconstruction, images):
  """Per-image PSNR in dB of [-1, 1] images, measured on the [0, 1] scale."""
  mse = jnp.mean(jnp.square((jnp.clip(reconstruction, -1, 1) - images) / 2.0),
                 axis=tuple(range(1, images.ndim)))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def evaluate(config, tokenizer_params, workdir=None, max_images=None,
             batch_size=250):
  """Reconstruction quality on the eval split: PSNR, codebook usage, a grid.

  tokenizer_params: pure dict of the tokenizer's parameters.
  Returns {"psnr": dB, "codebook_usage": fraction (VQ), "num_images": n}.
  """
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size = batch_size - batch_size % jax.process_count()
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: build_tokenizer(config.tokenizer, nnx.Rngs(0))), nnx.Param)
  model = nnx.merge(graphdef, tokenizer_params)

  @jax.jit
  def reconstruct(images):
    if model.spec.kind == "discrete":
      tokens = model.encode(images)
      return model.decode(tokens).astype(jnp.float32), tokens
    latents = model.encode(images)
    return model.decode(latents).astype(jnp.float32), jnp.zeros(images.shape[:1], jnp.int32)

  split = data.eval_split(config.data)
  dataset = data.make_dataset(data_config, split=split, seed=config.seed,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), shuffle=False,
                              num_epochs=1, drop_remainder=False)
  psnrs, used, examples = [], set(), None
  for batch in dataset:
    reconstruction, tokens = reconstruct(batch["image"])
    mask = np.asarray(batch["mask"])
    psnrs.append(np.asarray(_psnr(reconstruction, batch["image"]))[mask])
    if model.spec.kind == "discrete":
      used.update(np.unique(np.asarray(tokens)[mask]).tolist())
    if examples is None:
      examples = (np.asarray(batch["image"][:16]), np.asarray(reconstruction[:16]))
    if max_images and sum(len(p) for p in psnrs) >= max_images:
      break
  psnr = np.concatenate(psnrs)
  result = {"psnr": float(psnr.mean()), "num_images": int(psnr.size), "split": split}
  if model.spec.kind == "discrete":
    result["codebook_usage"] = len(used) / model.spec.codebook_size
  if workdir is not None and examples is not None:
    originals, reconstructions = examples
    picture = images_lib.grid(images_lib.to_uint8(
        np.concatenate([originals, reconstructions])), columns=len(originals))
    images_lib.save_png(picture, os.path.join(workdir, "reconstructions.png"))
  return result


def run(config, workdir):
  """--mode=train for a tokenizer config: train, evaluate, export to WORKDIR/tokenizer."""
  from heptapod_jax.train import trainer
  from heptapod_jax.tools import convert_tokenizer

  export_dir = os.path.join(workdir, "tokenizer")
  perceptual = _perceptual_module(config.tokenizer.loss)
  task = TokenizerTask(config, perceptual=perceptual)
  iterator = iter(data.make_dataset(
      config.data, split=config.data.train_split, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count()))
  start = time.time()
  result = trainer.train(task, config, workdir, iterator)
  if result["reason"] != "finished":
    return result
  params = jax.device_get(result["state"]["ema"]["tokenizer"])
  metrics = evaluate(config, params, workdir)
  metrics["train_seconds"] = time.time() - start
  logging.info("[tokenizer] eval on %s: %s", metrics["split"], metrics)
  # Every process takes part in the (collective) Orbax save.
  convert_tokenizer.write_tokenizer_dir(
      export_dir, config.tokenizer.name, params,
      {"source": "heptapod_jax tokenizer training", "workdir": os.path.abspath(workdir),
       "step": int(result["step"]), "weights": "ema"}, overwrite=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "tokenizer_metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
    _write_tensorboard(workdir, int(result["step"]), metrics)
  result["eval"] = metrics
  return result


def _write_tensorboard(workdir, step, metrics):
  """Eval scalars and the originals-over-reconstructions grid to TensorBoard."""
  from clu import metric_writers
  from PIL import Image
  writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"))
  writer.write_scalars(step, {f"eval/{key}": value for key, value in metrics.items()
                              if isinstance(value, (int, float))})
  grid_path = os.path.join(workdir, "reconstructions.png")
  if os.path.exists(grid_path):
    writer.write_images(step, {"reconstructions": np.asarray(Image.open(grid_path))[None]})
  writer.close()


def _perceptual_module(loss_config):
  """The frozen LPIPS module, or None (and a log line saying why)."""
  if loss_config.perceptual_weight <= 0:
    return None
  if not (loss_config.lpips_vgg_weights and loss_config.lpips_lin_weights):
    logging.warning(
        "[tokenizer] perceptual loss is OFF: tokenizer.loss.perceptual_weight=%s "
        "but tokenizer.loss.lpips_vgg_weights / lpips_lin_weights are not set "
        "(no weights are downloaded; give the VGG16 and LPIPS files).",
        loss_config.perceptual_weight)
    return None
  from heptapod_jax.models import lpips
  return lpips.load_lpips(loss_config.lpips_vgg_weights, loss_config.lpips_lin_weights)
