"""The embedded default: Heptapod on Fashion-MNIST (28x28 padded to 32x32).

A stride-4 small tokenizer gives an 8x8 token grid; the `tiny` preset trains on
2 CPU cores.

  python -m heptapod_jax.main --config=configs/fashion_mnist.py --workdir=DIR
  python -m heptapod_jax.main --config=configs/fashion_mnist.py:tokenizer=kl_small ...
"""

from heptapod_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="tiny", tokenizer="vq_small")
  config = config_lib.generator_config(
      variant=arg.variant, tokenizer=arg.tokenizer, image_size=32,
      num_classes=10, batch_size=64, dataset="fashion_mnist")
  config.model.head.timesteps_per_image = 16
  config.model.head.density = 16
  return config
