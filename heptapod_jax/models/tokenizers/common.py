"""Conv encoder/decoder shared by the VQ and KL tokenizers (NHWC throughout).

The block structure follows taming-transformers / LDM as used by LlamaGen's
VQ-16 and MAR's KL-16 (residual blocks with GroupNorm + swish, single-head
spatial attention, stride-2 conv downsampling with bottom/right padding,
nearest-neighbour upsampling + conv), so PyTorch checkpoints map one tensor to
one parameter. Every parameter carries logical axis names: conv kernels
("conv_height", "conv_width", "conv_in", "conv_out"), conv biases
("conv_out",), norms ("norm",).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from heptapod_jax.models.layers import logical

NORM_EPS = 1e-6  # GroupNorm epsilon of both upstream models
# PyTorch's default Conv2d init, U(+-1/sqrt(fan_in)), which both upstream
# models train from (and which is cheap to compile for many kernel shapes).
_TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                     "uniform")


def conv(in_channels, out_channels, kernel_size, *, rngs, dtype, stride=1,
         padding="SAME"):
  """A square NHWC conv; the kernel is [k, k, in, out] (HWIO)."""
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size),
      strides=(stride, stride), padding=padding, dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=logical(_TORCH_CONV_INIT,
                          "conv_height", "conv_width", "conv_in", "conv_out"),
      bias_init=logical(nnx.initializers.zeros_init(), "conv_out"), rngs=rngs)


def group_norm(channels, groups, *, rngs, dtype):
  # Two-pass variance: matches PyTorch's GroupNorm to float32 rounding.
  return nnx.GroupNorm(
      channels, num_groups=groups, epsilon=NORM_EPS, dtype=dtype,
      param_dtype=jnp.float32, use_fast_variance=False,
      scale_init=logical(nnx.initializers.ones_init(), "norm"),
      bias_init=logical(nnx.initializers.zeros_init(), "norm"), rngs=rngs)


class ResnetBlock(nnx.Module):
  """norm-swish-conv3x3 twice, plus a 1x1 shortcut when the width changes."""

  def __init__(self, in_channels, out_channels, *, groups, dropout, rngs, dtype):
    self.norm1 = group_norm(in_channels, groups, rngs=rngs, dtype=dtype)
    self.conv1 = conv(in_channels, out_channels, 3, rngs=rngs, dtype=dtype)
    self.norm2 = group_norm(out_channels, groups, rngs=rngs, dtype=dtype)
    # Both upstream models train without dropout; no rng stream is kept then.
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.conv2 = conv(out_channels, out_channels, 3, rngs=rngs, dtype=dtype)
    self.shortcut = (conv(in_channels, out_channels, 1, rngs=rngs, dtype=dtype)
                     if in_channels != out_channels else None)

  def __call__(self, x):
    """x: [B, H, W, in_channels] -> [B, H, W, out_channels]."""
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = nnx.swish(self.norm2(h))
    if self.dropout is not None:
      h = self.dropout(h)
    h = self.conv2(h)
    if self.shortcut is not None:
      x = self.shortcut(x)
    return x + h


class AttentionBlock(nnx.Module):
  """Single-head self-attention over all H*W positions, with 1x1-conv projections."""

  def __init__(self, channels, *, groups, rngs, dtype):
    self.norm = group_norm(channels, groups, rngs=rngs, dtype=dtype)
    self.query = conv(channels, channels, 1, rngs=rngs, dtype=dtype)
    self.key = conv(channels, channels, 1, rngs=rngs, dtype=dtype)
    self.value = conv(channels, channels, 1, rngs=rngs, dtype=dtype)
    self.out = conv(channels, channels, 1, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    """x: [B, H, W, C] -> [B, H, W, C]."""
    batch, height, width, channels = x.shape
    h = self.norm(x)

    def tokens(projection):  # [B, H*W, 1 head, C]
      return projection(h).reshape(batch, height * width, 1, channels)

    # Softmax scale 1/sqrt(C), as upstream; fused attention where available.
    attended = jax.nn.dot_product_attention(
        tokens(self.query), tokens(self.key), tokens(self.value))
    return x + self.out(attended.reshape(batch, height, width, channels))


class Downsample(nnx.Module):
  """Halves H and W: zero-pad one row/column at the bottom/right, 3x3 stride-2 conv."""

  def __init__(self, channels, *, rngs, dtype):
    self.conv = conv(channels, channels, 3, stride=2,
                     padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    """x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C] (H, W even in practice)."""
    return self.conv(x)


class Upsample(nnx.Module):
  """Doubles H and W: nearest-neighbour repeat, then a 3x3 conv."""

  def __init__(self, channels, *, rngs, dtype):
    self.conv = conv(channels, channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    """x: [B, H, W, C] -> [B, 2H, 2W, C]."""
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :],
                         (batch, height, 2, width, 2, channels))
    return self.conv(x.reshape(batch, 2 * height, 2 * width, channels))


class Level(nnx.Module):
  """One resolution level: residual blocks, optional attention after each, resampler."""

  def __init__(self, in_channels, out_channels, num_blocks, *, attention,
               resample, groups, dropout, rngs, dtype):
    self.blocks = nnx.List([
        ResnetBlock(in_channels if index == 0 else out_channels, out_channels,
                    groups=groups, dropout=dropout, rngs=rngs, dtype=dtype)
        for index in range(num_blocks)])
    self.attentions = nnx.List([
        AttentionBlock(out_channels, groups=groups, rngs=rngs, dtype=dtype)
        for _ in range(num_blocks if attention else 0)])
    # Assigned once each: NNX fixes an attribute's data/static status on first set.
    self.downsample = (Downsample(out_channels, rngs=rngs, dtype=dtype)
                       if resample == "down" else None)
    self.upsample = (Upsample(out_channels, rngs=rngs, dtype=dtype)
                     if resample == "up" else None)

  def __call__(self, x):
    for index, block in enumerate(self.blocks):
      x = block(x)
      if self.attentions:
        x = self.attentions[index](x)
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


class MiddleBlock(nnx.Module):
  """Residual, attention, residual at the lowest resolution."""

  def __init__(self, channels, *, groups, dropout, rngs, dtype):
    block = lambda: ResnetBlock(channels, channels, groups=groups,
                                dropout=dropout, rngs=rngs, dtype=dtype)
    self.block_1 = block()
    self.attention = AttentionBlock(channels, groups=groups, rngs=rngs,
                                    dtype=dtype)
    self.block_2 = block()

  def __call__(self, x):
    return self.block_2(self.attention(self.block_1(x)))


class Encoder(nnx.Module):
  """[B, H, W, in_channels] images -> [B, H/stride, W/stride, out_channels]."""

  def __init__(self, spec, out_channels, *, rngs, dtype):
    groups, dropout = spec.norm_groups, spec.dropout
    num_levels = len(spec.ch_mult)
    self.conv_in = conv(spec.in_channels, spec.ch, 3, rngs=rngs, dtype=dtype)
    levels = []
    channels = spec.ch
    for index, mult in enumerate(spec.ch_mult):
      lowest = index == num_levels - 1
      levels.append(Level(
          channels, spec.ch * mult, spec.num_res_blocks,
          attention=lowest and spec.encoder_attention,
          resample=None if lowest else "down", groups=groups, dropout=dropout,
          rngs=rngs, dtype=dtype))
      channels = spec.ch * mult
    self.levels = nnx.List(levels)
    self.middle = MiddleBlock(channels, groups=groups, dropout=dropout,
                              rngs=rngs, dtype=dtype)
    self.norm_out = group_norm(channels, groups, rngs=rngs, dtype=dtype)
    self.conv_out = conv(channels, out_channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, images):
    h = self.conv_in(images)
    for level in self.levels:
      h = level(h)
    h = self.middle(h)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """[B, h, w, in_channels] -> [B, h*stride, w*stride, out_channels] images.

  `levels[i]` works at the resolution of encoder level i (levels[0] is the
  full resolution); they run from the lowest resolution up.
  """

  def __init__(self, spec, in_channels, *, rngs, dtype):
    groups, dropout = spec.norm_groups, spec.dropout
    num_levels = len(spec.ch_mult)
    channels = spec.ch * spec.ch_mult[-1]
    self.conv_in = conv(in_channels, channels, 3, rngs=rngs, dtype=dtype)
    self.middle = MiddleBlock(channels, groups=groups, dropout=dropout,
                              rngs=rngs, dtype=dtype)
    levels = [None] * num_levels
    for index in reversed(range(num_levels)):
      lowest = index == num_levels - 1
      out_channels = spec.ch * spec.ch_mult[index]
      levels[index] = Level(
          channels, out_channels, spec.num_res_blocks + 1,
          attention=lowest and spec.decoder_attention,
          resample=None if index == 0 else "up", groups=groups,
          dropout=dropout, rngs=rngs, dtype=dtype)
      channels = out_channels
    self.levels = nnx.List(levels)
    self.norm_out = group_norm(channels, groups, rngs=rngs, dtype=dtype)
    self.conv_out = conv(channels, spec.out_channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, z):
    h = self.middle(self.conv_in(z))
    for level in reversed(self.levels):
      h = level(h)
    return self.conv_out(nnx.swish(self.norm_out(h)))
