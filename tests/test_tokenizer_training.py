"""Tokenizer training through the shared trainer: VQ with the PatchGAN term, KL."""

import jax
import numpy as np
import pytest

from heptapod_jax import config_lib
from heptapod_jax import data
from heptapod_jax.train import tokenizer as tokenizer_training
from heptapod_jax.train import trainer


@pytest.mark.parametrize("name", ["vq_small", "kl_small"])
def test_tokenizer_trains_and_evaluates(name, tmp_path, caplog):
  config = config_lib.small_tokenizer_training_config(name)
  config.data.batch_size = 8
  config.data.read_threads = 0
  config.train.num_steps = 3
  config.train.log_every = 1
  config.train.checkpoint_every = 3
  config.optim.warmup_steps = 0
  config.mesh.data = 8
  config.tokenizer.loss.adversarial_weight = 0.5 if name == "vq_small" else 0.0
  config.tokenizer.loss.perceptual_weight = 1.0  # no weight files: the term is off
  config_lib.validate_tokenizer_training(config, num_devices=8)
  perceptual = tokenizer_training._perceptual_module(config.tokenizer.loss)
  assert perceptual is None and "perceptual loss is OFF" in caplog.text
  task = tokenizer_training.TokenizerTask(config, perceptual)
  iterator = iter(data.make_dataset(config.data, split="train", seed=0,
                                    process_index=0, process_count=1))
  result = trainer.train(task, config, str(tmp_path), iterator)
  assert result["reason"] == "finished" and result["step"] == 3
  metrics = result["metrics"]
  assert np.isfinite(metrics["train/loss"]) and metrics["train/psnr"] > 0
  if name == "vq_small":
    assert "train/discriminator_loss" in metrics and "train/codebook_loss" in metrics
    assert metrics["train/adversarial_adoption"] == 1.0
    assert "discriminator" in result["state"]["params"]
  else:
    assert "train/kl" in metrics
  params = jax.device_get(result["state"]["ema"]["tokenizer"])
  evaluation = tokenizer_training.evaluate(config, params, str(tmp_path), max_images=16,
                                           batch_size=16)
  assert evaluation["num_images"] == 16 and evaluation["psnr"] > 0
  assert (name == "vq_small") == ("codebook_usage" in evaluation)
  assert (tmp_path / "reconstructions.png").exists()
