"""Heptapod-H on ImageNet 256x256 (16x16 tokens).

  python -m heptapod_jax.main --config=configs/h256.py --workdir=DIR
  python -m heptapod_jax.main --config=configs/h256.py:tokenizer=vq16,runlocal ...
"""

from heptapod_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet256_config(arg, variant="H")
