"""Architecture table of the visual tokenizers: name -> hyper-parameters.

The names, strides, codebook sizes and latent widths agree with
`heptapod_jax.config_lib.TOKENIZERS` (checked by tests/test_tokenizers.py).
`vq16` and `kl16` reproduce the public LlamaGen VQ-16 and MAR KL-16
architectures so that their PyTorch checkpoints can be imported
(`heptapod_jax.tools.convert_tokenizer`); `vq_small` and `kl_small` are ours,
sized for 28x28/32x32 images on a CPU.
"""

import dataclasses

FAMILIES = ("vq", "kl")
# Fields that change training only, not the function the weights compute: a
# converted or trained tokenizer loads into a spec that differs in these.
TRAINING_FIELDS = ("dropout", "commitment_beta")


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """Hyper-parameters of one conv encoder/decoder tokenizer.

  The encoder has one level per entry of `ch_mult` (level i has ch*ch_mult[i]
  channels) and halves the resolution between levels, so
  stride = 2 ** (len(ch_mult) - 1). Both the encoder and the decoder have a
  middle block (residual, attention, residual) at the lowest resolution;
  `encoder_attention` / `decoder_attention` add an attention block after every
  residual block of the lowest-resolution level as well (LlamaGen: both;
  MAR/LDM KL-16: encoder only).
  """
  name: str
  family: str  # "vq" (discrete codes) or "kl" (continuous latents)
  ch: int
  ch_mult: tuple
  num_res_blocks: int  # encoder; the decoder has num_res_blocks + 1 per level
  z_channels: int  # encoder output (VQ) / latent channels (KL, doubled by double_z)
  encoder_attention: bool
  decoder_attention: bool
  norm_groups: int = 32
  dropout: float = 0.0
  # VQ only.
  codebook_size: int = 0
  code_dim: int = 0
  codebook_l2_norm: bool = True  # LlamaGen: nearest code by cosine similarity
  commitment_beta: float = 0.25  # LlamaGen's commit_loss_beta
  # KL only: latent channels seen by the generator (= z_channels for KL).
  latent_channels: int = 0
  in_channels: int = 3
  out_channels: int = 3

  @property
  def stride(self):
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def kind(self):
    """The config_lib kind: "discrete" (VQ codes) or "continuous" (KL latents)."""
    return "discrete" if self.family == "vq" else "continuous"

  def to_json(self):
    """A JSON-able dict of every field (tuples become lists)."""
    return {field.name: (list(value) if isinstance(value, tuple) else value)
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]}


SPECS = {
    # LlamaGen VQ-16 (`VQ_16` in tokenizer/tokenizer_image/vq_model.py).
    "vq16": TokenizerSpec(
        name="vq16", family="vq", ch=128, ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2, z_channels=256, encoder_attention=True,
        decoder_attention=True, codebook_size=16384, code_dim=8),
    # MAR's KL-16 (`AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` in
    # models/vae.py): the encoder's attn_resolutions=(16,) at resolution 256 is
    # its lowest level; the decoder keeps the default attn_resolutions=().
    "kl16": TokenizerSpec(
        name="kl16", family="kl", ch=128, ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2, z_channels=16, latent_channels=16,
        encoder_attention=True, decoder_attention=False),
    # Small variants for 28x28 (padded) / 32x32 images: stride 4 -> 8x8 tokens.
    "vq_small": TokenizerSpec(
        name="vq_small", family="vq", ch=16, ch_mult=(1, 2, 2),
        num_res_blocks=1, z_channels=64, encoder_attention=False,
        decoder_attention=False, norm_groups=8, codebook_size=512, code_dim=8),
    "kl_small": TokenizerSpec(
        name="kl_small", family="kl", ch=16, ch_mult=(1, 2, 2),
        num_res_blocks=1, z_channels=4, latent_channels=4,
        encoder_attention=False, decoder_attention=False, norm_groups=8),
}


def get_spec(name, **overrides):
  """The spec of tokenizer `name`, with fields replaced by `overrides`.

  Raises ValueError naming the unknown tokenizer, unknown field or bad value.
  """
  if name not in SPECS:
    raise ValueError(f"unknown tokenizer {name!r}; allowed: {sorted(SPECS)}")
  fields = {field.name for field in dataclasses.fields(TokenizerSpec)}
  for key in overrides:
    if key not in fields or key in ("name", "family"):
      raise ValueError(
          f"tokenizer {name!r}: unknown or fixed field {key!r} in overrides; "
          f"allowed: {sorted(fields - {'name', 'family'})}")
  if "ch_mult" in overrides:
    overrides["ch_mult"] = tuple(overrides["ch_mult"])
  spec = dataclasses.replace(SPECS[name], **overrides)
  _validate(spec)
  return spec


def _validate(spec):
  def fail(field, message):
    raise ValueError(f"tokenizer {spec.name!r}: {field}: {message}")

  if spec.family not in FAMILIES:
    fail("family", f"{spec.family!r} not in {FAMILIES}")
  if not spec.ch_mult or min(spec.ch_mult) < 1:
    fail("ch_mult", f"needs positive multipliers, got {spec.ch_mult}")
  for field in ("ch", "num_res_blocks", "z_channels", "norm_groups"):
    if getattr(spec, field) < 1:
      fail(field, f"must be positive, got {getattr(spec, field)}")
  for mult in spec.ch_mult:
    if (spec.ch * mult) % spec.norm_groups:
      fail("norm_groups", f"{spec.norm_groups} groups do not divide "
           f"{spec.ch * mult} channels (ch={spec.ch}, ch_mult={spec.ch_mult})")
  if spec.family == "vq":
    if spec.codebook_size < 1 or spec.code_dim < 1:
      fail("codebook_size/code_dim", "must be positive for a VQ tokenizer")
  elif spec.latent_channels != spec.z_channels:
    fail("latent_channels", f"must equal z_channels={spec.z_channels} for a "
         f"KL tokenizer, got {spec.latent_channels}")
