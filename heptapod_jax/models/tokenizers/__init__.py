"""Visual tokenizers: conv VQ (discrete codes) and KL (continuous latents) autoencoders.

`build_tokenizer("vq16" | "kl16" | "vq_small" | "kl_small", rngs=...)` builds
one from the table in `specs.py`; `heptapod_jax.tools.convert_tokenizer`
imports the public LlamaGen VQ-16 and MAR KL-16 PyTorch checkpoints.
"""

from heptapod_jax.models.tokenizers.kl import KLTokenizer
from heptapod_jax.models.tokenizers.specs import SPECS, TokenizerSpec, get_spec
from heptapod_jax.models.tokenizers.vq import VQTokenizer


def build_tokenizer(name, *, rngs, dtype="float32", **overrides):
  """The tokenizer `name` of specs.SPECS with fields replaced by `overrides`.

  dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
  Returns a VQTokenizer (kind "discrete") or a KLTokenizer ("continuous").
  """
  spec = get_spec(name, **overrides)
  model_class = VQTokenizer if spec.family == "vq" else KLTokenizer
  return model_class(spec, rngs=rngs, dtype=dtype)


__all__ = ["KLTokenizer", "SPECS", "TokenizerSpec", "VQTokenizer",
           "build_tokenizer", "get_spec"]
