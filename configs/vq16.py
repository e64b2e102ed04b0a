"""Train the VQ tokenizer (reconstruction only).

  python -m heptapod_jax.main --config=configs/vq16.py --workdir=DIR              # vq16, ImageNet 256
  python -m heptapod_jax.main --config=configs/vq16.py:small --workdir=DIR        # vq_small, Fashion-MNIST

The trained tokenizer is exported to DIR/tokenizer (usable as
--config.tokenizer.init_from=DIR/tokenizer); DIR/tokenizer_metrics.json holds
its test-set PSNR and codebook usage.
"""

from heptapod_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, small=False)
  if arg.small:
    return config_lib.small_tokenizer_training_config("vq_small")
  config = config_lib.tokenizer_training_config(
      name="vq16", dataset="imagenet2012", image_size=256, batch_size=128)
  config.tokenizer.loss.perceptual_weight = 1.0
  config.tokenizer.loss.adversarial_weight = 0.5
  config.tokenizer.loss.adversarial_start_step = 20000
  config.tokenizer.loss.reconstruction = "l2"
  config.train.num_steps = 400_000
  return config
