"""PyTorch checkpoint import: parity with PyTorch references, refusals, key reports.

The two reference models below are written for this test with the module and
tensor-name structure of the upstream files (LlamaGen
tokenizer/tokenizer_image/vq_model.py, MAR models/vae.py) at a reduced size,
so the real converter handles their state_dicts exactly as it handles the
public checkpoints.
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from heptapod_jax.models import tokenizers
from heptapod_jax.tools import convert_tokenizer as ct

# Reduced sizes: two levels (stride 2), one residual block, attention at the
# lowest level as upstream (LlamaGen: encoder and decoder; MAR: encoder only).
VQ_OVERRIDES = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
                    codebook_size=64)
KL_OVERRIDES = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                    latent_channels=4)
IMAGE_SIZE = 16
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------
# PyTorch references (NCHW), upstream tensor names.

def _group_norm(channels):
  return nn.GroupNorm(32, channels, eps=1e-6)


class TorchResnetBlock(nn.Module):

  def __init__(self, in_channels, out_channels):
    super().__init__()
    self.norm1 = _group_norm(in_channels)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    self.norm2 = _group_norm(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
    if in_channels != out_channels:
      self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    if hasattr(self, "nin_shortcut"):
      x = self.nin_shortcut(x)
    return x + h


class TorchAttnBlock(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.norm = _group_norm(channels)
    self.q, self.k, self.v, self.proj_out = (
        nn.Conv2d(channels, channels, 1) for _ in range(4))

  def forward(self, x):
    batch, channels, height, width = x.shape
    h = self.norm(x)
    q = self.q(h).flatten(2).transpose(1, 2)  # [B, HW, C]
    k = self.k(h).flatten(2)  # [B, C, HW]
    v = self.v(h).flatten(2)  # [B, C, HW]
    weights = torch.softmax(torch.bmm(q, k) * channels ** -0.5, dim=2)
    out = torch.bmm(v, weights.transpose(1, 2))  # [B, C, HW]
    return x + self.proj_out(out.reshape(batch, channels, height, width))


class TorchDownsample(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class TorchUpsample(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks_name, in_channels, out_channels, num_blocks, attention,
           resample):
  level = nn.Module()
  blocks = []
  for index in range(num_blocks):
    blocks.append(TorchResnetBlock(in_channels if index == 0 else out_channels,
                                   out_channels))
  setattr(level, blocks_name, nn.ModuleList(blocks))
  level.attn = nn.ModuleList(
      [TorchAttnBlock(out_channels) for _ in range(num_blocks if attention else 0)])
  if resample == "down":
    level.downsample = TorchDownsample(out_channels)
  elif resample == "up":
    level.upsample = TorchUpsample(out_channels)
  return level


def _run_level(level, blocks_name, x):
  for index, block in enumerate(getattr(level, blocks_name)):
    x = block(x)
    if len(level.attn):
      x = level.attn[index](x)
  if hasattr(level, "downsample"):
    x = level.downsample(x)
  if hasattr(level, "upsample"):
    x = level.upsample(x)
  return x


class TorchCoder(nn.Module):
  """Encoder or decoder in LlamaGen ("llamagen") or MAR/LDM ("mar") naming.

  LlamaGen: encoder.conv_blocks[i].res / .attn, mid = ModuleList(res, attn,
  res); decoder.conv_blocks[0] is the LOWEST resolution. MAR: encoder.down[i]
  .block / .attn, mid.block_1 / attn_1 / block_2; decoder.up[i] is level i.
  """

  def __init__(self, style, role, *, ch, ch_mult, num_res_blocks, in_channels,
               out_channels, attention):
    super().__init__()
    self.style, self.role = style, role
    self.blocks_name = "res" if style == "llamagen" else "block"
    num_levels = len(ch_mult)
    if role == "encoder":
      self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
      levels, channels = [], ch
      for index, mult in enumerate(ch_mult):
        lowest = index == num_levels - 1
        levels.append(_level(self.blocks_name, channels, ch * mult,
                             num_res_blocks, attention and lowest,
                             None if lowest else "down"))
        channels = ch * mult
    else:
      channels = ch * ch_mult[-1]
      self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
      levels = []
      for index in reversed(range(num_levels)):
        lowest = index == num_levels - 1
        levels.append(_level(self.blocks_name, channels, ch * ch_mult[index],
                             num_res_blocks + 1, attention and lowest,
                             None if index == 0 else "up"))
        channels = ch * ch_mult[index]
      if style == "mar":
        levels = levels[::-1]  # MAR inserts at 0: up[i] is level i
    container = nn.ModuleList(levels)
    lowest = ch * ch_mult[-1]
    if style == "llamagen":
      self.conv_blocks = container
      self.mid = nn.ModuleList([TorchResnetBlock(lowest, lowest),
                                TorchAttnBlock(lowest),
                                TorchResnetBlock(lowest, lowest)])
    else:
      setattr(self, "down" if role == "encoder" else "up", container)
      self.mid = nn.Module()
      self.mid.block_1 = TorchResnetBlock(lowest, lowest)
      self.mid.attn_1 = TorchAttnBlock(lowest)
      self.mid.block_2 = TorchResnetBlock(lowest, lowest)
    self.norm_out = _group_norm(channels)
    self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

  def _levels_in_order(self):
    if self.style == "llamagen":
      return list(self.conv_blocks)  # encoder: high->low; decoder: low->high
    if self.role == "encoder":
      return list(self.down)
    return list(self.up)[::-1]

  def _middle(self, h):
    if self.style == "llamagen":
      for block in self.mid:
        h = block(h)
      return h
    return self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

  def forward(self, x):
    h = self.conv_in(x)
    if self.role == "decoder":
      h = self._middle(h)
    for level in self._levels_in_order():
      h = _run_level(level, self.blocks_name, h)
    if self.role == "encoder":
      h = self._middle(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TorchVQ(nn.Module):
  """LlamaGen VQModel structure: encoder, quant_conv, quantize, post_quant_conv, decoder."""

  def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels, codebook_size,
               code_dim=8):
    super().__init__()
    shared = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                  attention=True)
    self.encoder = TorchCoder("llamagen", "encoder", in_channels=3,
                              out_channels=z_channels, **shared)
    self.decoder = TorchCoder("llamagen", "decoder", in_channels=z_channels,
                              out_channels=3, **shared)
    self.quantize = nn.Module()
    self.quantize.embedding = nn.Embedding(codebook_size, code_dim)
    self.quantize.register_buffer("codebook_used", torch.zeros(65536))
    self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
    self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)

  def codebook(self):
    return F.normalize(self.quantize.embedding.weight, dim=-1)

  def encode(self, images):
    """[B, 3, H, W] -> codes [B, h, w]."""
    z = self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)
    z = F.normalize(z, dim=-1).reshape(-1, z.shape[-1])
    codebook = self.codebook()
    distances = ((z ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1)
                 - 2 * z @ codebook.T)
    batch, _, height, width = images.shape
    stride = 2 ** (len(self.encoder.conv_blocks) - 1)
    return distances.argmin(1).reshape(batch, height // stride, width // stride)

  def decode(self, codes):
    """codes [B, h, w] -> [B, 3, H, W]."""
    quantized = self.codebook()[codes].permute(0, 3, 1, 2)
    return self.decoder(self.post_quant_conv(quantized))


class TorchKL(nn.Module):
  """MAR AutoencoderKL structure: encoder (double_z), quant_conv, post_quant_conv, decoder."""

  def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels, **unused):
    super().__init__()
    del unused
    shared = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks)
    self.encoder = TorchCoder("mar", "encoder", in_channels=3,
                              out_channels=2 * z_channels, attention=True,
                              **shared)
    self.decoder = TorchCoder("mar", "decoder", in_channels=z_channels,
                              out_channels=3, attention=False, **shared)
    self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
    self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

  def posterior(self, images):
    moments = self.quant_conv(self.encoder(images))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)

  def decode(self, latents):
    return self.decoder(self.post_quant_conv(latents))


def _randomise(model, seed):
  """Random weights everywhere, GroupNorm affine included (default init is 1/0,
  which would hide a swapped scale/bias)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith("codebook_used"):
        continue
      noise = torch.randn(tensor.shape, generator=generator)
      if tensor.ndim == 1 and "norm" in name and name.endswith("weight"):
        tensor.copy_(1.0 + 0.2 * noise)
      elif tensor.ndim == 1:
        tensor.copy_(0.2 * noise)
      elif tensor.ndim == 2:  # codebook
        tensor.copy_(noise)
      else:
        fan_in = tensor[0].numel()
        tensor.copy_(noise / fan_in ** 0.5)
  return model.eval()


def _images(seed=0):
  """The same images as torch NCHW and jax NHWC."""
  rng = np.random.default_rng(seed)
  nhwc = rng.uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy()), jnp.asarray(nhwc)


def _nhwc(tensor):
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------
# Fixtures: one LlamaGen-style and one MAR-style checkpoint, converted once.

@pytest.fixture(scope="module")
def llamagen(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomise(TorchVQ(**VQ_OVERRIDES), seed=1)
  directory = tmp_path_factory.mktemp("llamagen")
  path = directory / "vq_ds16_c2i.pt"
  # LlamaGen's training checkpoint layout, argparse.Namespace included.
  torch.save({"model": model.state_dict(), "optimizer": {"state": {}},
              "steps": 10, "args": argparse.Namespace(vq_model="VQ-16",
                                                      codebook_size=64)}, path)
  info = ct.convert("llamagen_vq16", path, directory / "converted",
                    overrides=VQ_OVERRIDES)
  return model, path, directory / "converted", info


@pytest.fixture(scope="module")
def mar(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomise(TorchKL(**KL_OVERRIDES), seed=2)
  directory = tmp_path_factory.mktemp("mar")
  path = directory / "kl16.ckpt"
  state = dict(model.state_dict())
  state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 3, 3)
  torch.save({"model": state}, path)
  info = ct.convert("mar_kl16", path, directory / "converted",
                    overrides=KL_OVERRIDES)
  return model, path, directory / "converted", info


@nnx.jit
def _vq_forward(model, images, codes):
  return model.encode(images), model.decode(codes)


@nnx.jit
def _kl_forward(model, images, latents):
  mean, logvar = model.posterior(images)
  return mean, logvar, model.decode(latents)


def test_llamagen_vq_matches_pytorch(llamagen):
  torch_model, _, converted, info = llamagen
  assert info["name"] == "vq16" and info["source"] == "llamagen_vq16"
  assert info["ignored_tensors"] == ["quantize.codebook_used"]
  assert info["ignored_entries"] == ["args", "optimizer", "steps"]
  model = ct.load_tokenizer(converted)
  assert model.spec == tokenizers.get_spec("vq16", **VQ_OVERRIDES)
  torch_images, images = _images()
  with torch.no_grad():
    torch_codes = torch_model.encode(torch_images)
    torch_decoded = torch_model.decode(torch_codes)
  codes, decoded = _vq_forward(model, images, jnp.asarray(torch_codes.numpy()))
  assert codes.shape == (2, 8, 8)
  assert len(np.unique(np.asarray(codes))) > 5  # a real test of the lookup
  np.testing.assert_array_equal(np.asarray(codes), torch_codes.numpy())
  np.testing.assert_allclose(np.asarray(decoded), _nhwc(torch_decoded),
                             atol=TOLERANCE, rtol=0)


def test_mar_kl_matches_pytorch(mar):
  torch_model, _, converted, info = mar
  assert info["name"] == "kl16" and info["source"] == "mar_kl16"
  assert info["ignored_tensors"] == ["loss.discriminator.main.0.weight"]
  model = ct.load_tokenizer(converted)
  torch_images, images = _images(seed=1)
  latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    torch_mean, torch_logvar = torch_model.posterior(torch_images)
    torch_decoded = torch_model.decode(torch.from_numpy(latents))
  mean, logvar, decoded = _kl_forward(model, images,
                                      jnp.asarray(latents.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(mean), _nhwc(torch_mean),
                             atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.asarray(logvar), _nhwc(torch_logvar),
                             atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.asarray(decoded), _nhwc(torch_decoded),
                             atol=TOLERANCE, rtol=0)


def test_safetensors_input_gives_the_same_parameters(mar, tmp_path):
  torch_model, _, converted, _ = mar
  path = tmp_path / "kl16.safetensors"
  save_file(dict(torch_model.state_dict()), str(path))
  ct.convert("mar_kl16", path, tmp_path / "out", overrides=KL_OVERRIDES)
  name, from_safetensors = ct.load_tokenizer_params(tmp_path / "out")
  _, from_pickle = ct.load_tokenizer_params(converted)
  assert name == "kl16"
  jax.tree.map(np.testing.assert_array_equal, from_safetensors, from_pickle)


def test_restore_into_checks_the_architecture(llamagen):
  _, _, converted, _ = llamagen
  other_size = nnx.eval_shape(lambda: tokenizers.build_tokenizer(
      "vq16", rngs=nnx.Rngs(0), **dict(VQ_OVERRIDES, codebook_size=32)))
  with pytest.raises(ct.ConversionError,
                     match="codebook_size: file 64 vs model 32"):
    ct.restore_into(other_size, converted)
  other_kind = nnx.eval_shape(lambda: tokenizers.build_tokenizer(
      "kl16", rngs=nnx.Rngs(0), **KL_OVERRIDES))
  with pytest.raises(ct.ConversionError, match="holds tokenizer 'vq16'"):
    ct.restore_into(other_kind, converted)
  info = json.loads((converted / "tokenizer.json").read_text())
  assert info["overrides"]["ch_mult"] == [1, 2]


def test_write_tokenizer_dir_round_trip(tmp_path):
  """What tokenizer training exports: our own parameters, checked and reloadable."""
  model = nnx.eval_shape(lambda: tokenizers.build_tokenizer(
      "kl_small", rngs=nnx.Rngs(0), **KL_OVERRIDES))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  info = ct.write_tokenizer_dir(tmp_path / "tok", "kl_small", params,
                                {"source": "training", "step": 3},
                                overrides=KL_OVERRIDES)
  assert info["step"] == 3 and info["name"] == "kl_small"
  loaded = ct.restore_into(model, tmp_path / "tok")
  np.testing.assert_array_equal(loaded.decoder.conv_out.kernel[...],
                                params["decoder"]["conv_out"]["kernel"])
  with pytest.raises(ct.ConversionError, match="already exists"):
    ct.write_tokenizer_dir(tmp_path / "tok", "kl_small", params,
                           overrides=KL_OVERRIDES)
  params["quant_conv"]["bias"] = np.zeros(3, np.float32)
  with pytest.raises(ct.ConversionError,
                     match=r"quant_conv/bias: given \[3\], needs \[8\]"):
    ct.write_tokenizer_dir(tmp_path / "bad", "kl_small", params,
                           overrides=KL_OVERRIDES)
  with pytest.raises(ct.ConversionError, match="may not set \\['name'\\]"):
    ct.write_tokenizer_dir(tmp_path / "bad", "kl_small", params, {"name": "x"},
                           overrides=KL_OVERRIDES)


def test_pickle_needing_code_execution_is_refused(tmp_path):
  path = tmp_path / "evil.pt"
  torch.save({"model": {"w": torch.zeros(1)}, "extra": _NotAllowed()}, path)
  with pytest.raises(ct.ConversionError,
                     match=r"evil\.pt: refused: this pickle needs code execution"):
    ct.read_checkpoint(path)


class _NotAllowed:
  """A class torch.load(weights_only=True) must refuse to rebuild."""


def _state_dict(llamagen):
  return dict(llamagen[0].state_dict())


def test_missing_unexpected_and_misshaped_tensors_are_named(llamagen):
  state = _state_dict(llamagen)
  del state["decoder.conv_blocks.0.attn.1.q.weight"]
  state["encoder.mid.3.conv1.weight"] = torch.zeros(1)
  state["quant_conv.weight"] = torch.zeros(8, 16, 1, 1)
  with pytest.raises(ct.ConversionError) as error:
    ct.map_state_dict(state, ct.SOURCES["llamagen_vq16"],
                      overrides=VQ_OVERRIDES, path="file.pt")
  message = str(error.value)
  assert "file.pt: does not match architecture 'vq16'" in message
  assert "1 missing: decoder.conv_blocks.0.attn.1.q.weight" in message
  assert "1 unexpected: encoder.mid.3.conv1.weight" in message
  assert ("1 mis-shaped: quant_conv.weight: file has [8, 16, 1, 1], vq16 "
          "needs [8, 32, 1, 1]") in message


def test_wrong_source_is_detected(mar):
  _, path, _, _ = mar
  with pytest.raises(ct.ConversionError,
                     match="looks like a mar_kl16 checkpoint: try --source=mar_kl16"):
    ct.convert("llamagen_vq16", path, path.parent / "wrong",
               overrides=VQ_OVERRIDES)
  assert not (path.parent / "wrong" / "params").exists()


def test_wrappers_and_layouts():
  tensor = torch.zeros(2)
  assert ct.unwrap_state_dict({"a.weight": tensor}, "f") == ({"a.weight": tensor}, [])
  state, ignored = ct.unwrap_state_dict(
      {"model": {"a": tensor}, "ema": {"a": tensor + 1}, "steps": 3}, "f",
      use_ema=True)
  assert state["a"][0] == 1 and ignored == ["model", "steps"]
  with pytest.raises(ct.ConversionError, match="found no model state_dict"):
    ct.unwrap_state_dict({"weights": {"a": tensor}, "steps": 3}, "f")
  oihw = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
  hwio = ct.from_torch_layout(oihw, "kernel")
  assert hwio.shape == (4, 5, 3, 2) and hwio[1, 2, 0, 1] == oihw[1, 0, 1, 2]
  assert ct.to_torch_layout(hwio.shape, "kernel") == oihw.shape


def test_command_line_reports_errors_by_file(tmp_path, repo_root):
  path = tmp_path / "evil.ckpt"
  torch.save(_NotAllowed(), path)
  result = subprocess.run(
      [sys.executable, "-m", "heptapod_jax.tools.convert_tokenizer",
       "--source=mar_kl16", f"--input={path}", f"--output={tmp_path / 'out'}"],
      cwd=repo_root, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert f"convert_tokenizer: error: {path}: refused" in result.stderr
