"""PatchGAN discriminator and the adversarial-loss rules of VQGAN / LlamaGen.

Architecture: taming-transformers' `NLayerDiscriminator` (pix2pix PatchGAN),
which LlamaGen's VQ training also uses, in NHWC:

  conv4x4/2 (in -> ndf) + LeakyReLU(0.2)
  n_layers - 1 times: conv4x4/2 (-> ndf * min(2**n, 8)) + norm + LeakyReLU(0.2)
  conv4x4/1 (-> ndf * min(2**n_layers, 8)) + norm + LeakyReLU(0.2)
  conv4x4/1 (-> 1): one real/fake logit per patch

Normalisation: upstream uses BatchNorm, whose running statistics would have to
be threaded through our functional train step as mutable state (and whose
batch statistics couple the real and the fake half of a batch). We use
GroupNorm instead (per-sample statistics, no extra state; `norm="group"`), or
no normalisation (`norm="none"`). As upstream, the convs followed by a norm
have no bias; kernels start from N(0, 0.02) (taming's `weights_init`).

Padding: `padding="torch"` is upstream's 1 pixel on every side: a 256x256
image gives a 30x30 patch grid with n_layers=3 (70x70 receptive field), but a
32x32 one only 2x2. `padding="same"` pads each stride-2 conv by (1, 1) and each
stride-1 conv by (1, 2), so every stride-2 conv halves the size exactly and the
stride-1 convs keep it: the grid is H / 2**n_layers. The small preset
("patchgan_small": ndf=64, n_layers=2, same padding) gives 32x32 images an 8x8
grid of 34x34-pixel patches.

Losses (pure functions, float32 scalars): hinge losses as in taming's
`hinge_d_loss` (with its factor 1/2) and `-mean(logits_fake)` for the
generator; the VQGAN adaptive weight; the adoption (warm-up) switch.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from heptapod_jax.models.layers import logical

NORM_EPS = 1e-5  # GroupNorm's default epsilon (BatchNorm's in taming)
LEAKY_SLOPE = 0.2
KERNEL_SIZE = 4
NORMS = ("group", "none")
PADDINGS = ("torch", "same")
# taming's weights_init: conv weights N(0, 0.02).
_CONV_INIT = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class DiscriminatorSpec:
  in_channels: int = 3
  ndf: int = 64  # channels of the first conv; doubled per layer, capped at 8x
  n_layers: int = 3  # stride-2 convs (the first without norm) before the head
  norm: str = "group"  # "group" or "none" (see the module docstring)
  norm_groups: int = 32  # GroupNorm groups (fewer when a layer is narrower)
  padding: str = "torch"  # "torch" (1 each side) or "same"


SPECS = {
    # taming / LlamaGen's default: 256x256 -> 30x30 patch logits.
    "patchgan": DiscriminatorSpec(),
    # 28x28 / 32x32 data: 32x32 -> 8x8 patch logits.
    "patchgan_small": DiscriminatorSpec(ndf=64, n_layers=2, padding="same"),
}


def get_spec(name, **overrides):
  if name not in SPECS:
    raise ValueError(f"unknown discriminator {name!r}; known: {', '.join(SPECS)}")
  return dataclasses.replace(SPECS[name], **overrides)


def _conv(in_channels, out_channels, stride, padding, *, use_bias, rngs, dtype):
  """A 4x4 NHWC conv; kernel [4, 4, in, out] (HWIO)."""
  if padding == "torch":
    pad = ((1, 1), (1, 1))
  elif stride == 2:
    pad = ((1, 1), (1, 1))  # (H + 2 - 4) // 2 + 1 = H / 2 for even H
  else:
    pad = ((1, 2), (1, 2))  # H + 3 - 4 + 1 = H
  return nnx.Conv(
      in_channels, out_channels, (KERNEL_SIZE, KERNEL_SIZE),
      strides=(stride, stride), padding=pad, use_bias=use_bias, dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=logical(_CONV_INIT,
                          "conv_height", "conv_width", "conv_in", "conv_out"),
      bias_init=logical(nnx.initializers.zeros_init(), "conv_out"), rngs=rngs)


def _group_norm(channels, groups, *, rngs, dtype):
  groups = min(groups, channels)
  if channels % groups:
    raise ValueError(f"discriminator: {channels} channels are not divisible "
                     f"into norm_groups={groups} groups")
  return nnx.GroupNorm(
      channels, num_groups=groups, epsilon=NORM_EPS, dtype=dtype,
      param_dtype=jnp.float32, use_fast_variance=False,
      scale_init=logical(nnx.initializers.ones_init(), "norm"),
      bias_init=logical(nnx.initializers.zeros_init(), "norm"), rngs=rngs)


class ConvNormAct(nnx.Module):
  """conv4x4 (no bias when normalised) + optional GroupNorm + LeakyReLU(0.2)."""

  def __init__(self, in_channels, out_channels, stride, *, spec, norm, rngs, dtype):
    use_norm = norm and spec.norm == "group"
    self.conv = _conv(in_channels, out_channels, stride, spec.padding,
                      use_bias=not use_norm, rngs=rngs, dtype=dtype)
    self.norm = (_group_norm(out_channels, spec.norm_groups, rngs=rngs, dtype=dtype)
                 if use_norm else None)

  def __call__(self, x):
    """x: [B, H, W, in] -> [B, H', W', out]."""
    x = self.conv(x)
    if self.norm is not None:
      x = self.norm(x)
    return jax.nn.leaky_relu(x, LEAKY_SLOPE)


class PatchDiscriminator(nnx.Module):
  """images [B, H, W, in_channels] in [-1, 1] -> patch logits [B, h', w', 1] float32.

  h' = floor(H / 2**n_layers) with padding="same", two less with "torch"
  (`patch_grid`).
  """

  def __init__(self, spec=DiscriminatorSpec(), *, rngs, dtype="float32"):
    if spec.norm not in NORMS:
      raise ValueError(f"discriminator norm: {spec.norm!r} not in {NORMS}")
    if spec.padding not in PADDINGS:
      raise ValueError(f"discriminator padding: {spec.padding!r} not in {PADDINGS}")
    if spec.n_layers < 1:
      raise ValueError(f"discriminator n_layers must be >= 1, got {spec.n_layers}")
    self.spec = spec
    dtype = jnp.dtype(dtype)
    block = lambda cin, cout, stride, norm: ConvNormAct(  # noqa: E731
        cin, cout, stride, spec=spec, norm=norm, rngs=rngs, dtype=dtype)
    layers = [block(spec.in_channels, spec.ndf, 2, False)]
    mult = 1
    for n in range(1, spec.n_layers):
      previous, mult = mult, min(2 ** n, 8)
      layers.append(block(spec.ndf * previous, spec.ndf * mult, 2, True))
    previous, mult = mult, min(2 ** spec.n_layers, 8)
    layers.append(block(spec.ndf * previous, spec.ndf * mult, 1, True))
    self.layers = nnx.List(layers)
    self.head = _conv(spec.ndf * mult, 1, 1, spec.padding, use_bias=True,
                      rngs=rngs, dtype=dtype)

  def patch_grid(self, height, width):
    """(h', w') of the logits for images of height x width."""
    def size(s):
      s >>= self.spec.n_layers  # each stride-2 conv: floor(s / 2)
      return s if self.spec.padding == "same" else s - 2  # stride-1 convs
    return size(height), size(width)

  def __call__(self, images):
    x = images
    for layer in self.layers:
      x = layer(x)
    return self.head(x).astype(jnp.float32)


def build_discriminator(name="patchgan", *, rngs, dtype="float32", **overrides):
  """The discriminator `name` of SPECS with fields replaced by `overrides`."""
  return PatchDiscriminator(get_spec(name, **overrides), rngs=rngs, dtype=dtype)


# --- losses ------------------------------------------------------------------


def hinge_discriminator_loss(logits_real, logits_fake):
  """taming's hinge_d_loss: (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2.

  logits_*: any shape (e.g. [B, h', w', 1]); returns a float32 scalar.
  """
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def hinge_generator_loss(logits_fake):
  """-mean(logits_fake): the generator's adversarial loss; float32 scalar."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(rec_grad_norm, gan_grad_norm, max_weight=1e4, eps=1e-4):
  """VQGAN's adaptive GAN weight: ||grad rec|| / (||grad gan|| + eps), clipped to
  [0, max_weight], with no gradient.

  The norms are of the gradients of the reconstruction (+ perceptual) loss and
  of the generator loss w.r.t. the decoder's last layer. The caller multiplies
  by its own discriminator weight (taming's `discriminator_weight`).
  Returns a float32 scalar.
  """
  weight = (jnp.asarray(rec_grad_norm, jnp.float32)
            / (jnp.asarray(gan_grad_norm, jnp.float32) + eps))
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def adoption_weight(step, start_step):
  """taming's adopt_weight switch: 0.0 while step < start_step, else 1.0.

  step, start_step: ints or traced integer scalars. Returns a float32 scalar.
  """
  return jnp.where(jnp.asarray(step) < start_step, 0.0, 1.0).astype(jnp.float32)
