"""Train the KL tokenizer (reconstruction only).

  python -m heptapod_jax.main --config=configs/kl16.py --workdir=DIR              # kl16, ImageNet 256
  python -m heptapod_jax.main --config=configs/kl16.py:small --workdir=DIR        # kl_small, Fashion-MNIST

The trained tokenizer is exported to DIR/tokenizer (usable as
--config.tokenizer.init_from=DIR/tokenizer); DIR/tokenizer_metrics.json holds
its test-set PSNR.
"""

from heptapod_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, small=False)
  if arg.small:
    return config_lib.small_tokenizer_training_config("kl_small")
  config = config_lib.tokenizer_training_config(
      name="kl16", dataset="imagenet2012", image_size=256, batch_size=128)
  config.tokenizer.loss.perceptual_weight = 1.0
  config.tokenizer.loss.adversarial_weight = 0.5
  config.tokenizer.loss.adversarial_start_step = 20000
  config.tokenizer.loss.reconstruction = "l1"
  config.train.num_steps = 400_000
  return config
