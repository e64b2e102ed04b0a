"""The FID Inception-v3 network in Flax NNX, its weights, and the Inception metrics.

Architecture: the TF-FID graph `inception-2015-12-05` as ported by pytorch-fid
(`FIDInceptionA/C/E_1/E_2`): torchvision's Inception-v3 without the auxiliary
head, 1008 classes, BatchNorm eps 1e-3, and the graph's quirks:
  - the branch average pools of blocks A, C and E_1 (Mixed_5b-d, 6b-e, 7b)
    exclude the zero padding from the average (count_include_pad=False);
  - the pool branch of the last block E_2 (Mixed_7c) is a 3x3 *max* pool.
Outputs: pool3 features [B, 2048] (global average of Mixed_7c) and the 1008-way
logits [B, 1008] for the Inception Score.

Input: images [B, H, W, 3] of any size, uint8 or float in [0, 255]. They are
resized to 299x299 and scaled to about [-1, 1] by one of two preprocessings
(`preprocess`):
  - "tf_graph" (default): what the TF graph does when fed at `ExpandDims:0`, as
    the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py) and
    TTUR do: TF1 `ResizeBilinear(align_corners=False)` without half-pixel
    centres (source coordinate = dst * in/out), then (x - 128) / 128.
  - "pytorch_fid": pytorch-fid's `F.interpolate(mode="bilinear",
    align_corners=False)` (half-pixel centres, source = (dst + 0.5) * in/out -
    0.5 clamped at 0), then x / 127.5 - 1.
Neither antialiases when downsampling, like their references. Use "tf_graph" to
compare with ADM reference batches (their mu/sigma came from the TF graph).

Logits for the Inception Score: the ADM evaluator multiplies pool3 by the
`softmax/logits/MatMul` weight only (no bias); pytorch-fid's state dict also has
`fc.bias`. `logits_bias=False` (default) follows ADM.

Weights: a pytorch-fid state dict (`pt_inception-2015-12-05-6726825d.pth`, read
with torch if installed) or an `.npz` with the same key names
(`state_dict_to_npz` converts; `python -m heptapod_jax.eval.inception IN.pth
OUT.npz` on a machine with torch). There is no random-weight fallback: without a
weights file the Inception metrics are skipped (`inception_metrics`).
"""

import functools
import os
import sys

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from heptapod_jax.eval import metrics
from heptapod_jax.eval import reference as reference_lib
from heptapod_jax.models import layers

INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008
BATCH_NORM_EPS = 1e-3
PREPROCESSINGS = ("tf_graph", "pytorch_fid")

SKIPPED_NO_WEIGHTS = (
    "FID, Inception Score and precision/recall skipped: eval.inception_weights "
    "is not set. Set it to the pytorch-fid FID Inception weights "
    "(pt_inception-2015-12-05-6726825d.pth, or an .npz made by "
    "heptapod_jax.eval.inception.state_dict_to_npz); these metrics are never "
    "computed with random weights.")

# Leaf names of ConvBN -> the pytorch-fid BasicConv2d state-dict suffix.
_CONV_BN_KEYS = {
    "kernel": "conv.weight",
    "scale": "bn.weight",
    "bias": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}
_FC_KEYS = {"kernel": "weight", "bias": "bias"}
# Present in torch BatchNorm state dicts, not needed for inference.
_IGNORED_SUFFIX = ".num_batches_tracked"


class InceptionWeightsError(ValueError):
  """The weights file is unreadable or does not match the FID Inception network."""


def _stat(value, *names):
  return nnx.BatchStat(value, out_sharding=names, eager_sharding=False)


class ConvBN(nnx.Module):
  """Conv (no bias) + BatchNorm (inference statistics) + ReLU: BasicConv2d.

  kernel: [kh, kw, in, out]; torch padding (ph, pw) on both sides.
  """

  def __init__(self, in_channels, out_channels, kernel_size, *, stride=1,
               padding=0, precision, rngs):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.stride = stride
    self.padding = ((ph, ph), (pw, pw))
    self.precision = precision
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
    self.kernel = layers.param(rngs, init, (kh, kw, in_channels, out_channels),
                               None, None, "conv_in", "conv_out")
    self.scale = layers.param(rngs, nnx.initializers.ones_init(), (out_channels,), "conv_out")
    self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (out_channels,), "conv_out")
    self.mean = _stat(jnp.zeros((out_channels,), jnp.float32), "conv_out")
    self.var = _stat(jnp.ones((out_channels,), jnp.float32), "conv_out")

  def __call__(self, x):
    """x: [B, H, W, in] -> [B, H', W', out]."""
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    multiplier = self.scale[...] * jax.lax.rsqrt(self.var[...] + BATCH_NORM_EPS)
    return jax.nn.relu((y - self.mean[...]) * multiplier + self.bias[...])


def _average_pool_3x3_excluding_padding(x):
  """3x3, stride 1, zero padding 1, the padding left out of the average."""
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
  return total / count


def _max_pool_3x3(x, stride, padding):
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, stride, stride, 1), pads)


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d (FIDInceptionA). Out: 224 + pool_features channels."""

  def __init__(self, in_channels, pool_features, *, conv):
    self.branch1x1 = conv(in_channels, 64, 1)
    self.branch5x5_1 = conv(in_channels, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(in_channels, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(in_channels, pool_features, 1)

  def __call__(self, x):
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(_average_pool_3x3_excluding_padding(x))
    return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], -1)


class InceptionB(nnx.Module):
  """Mixed_6a: 35x35 -> 17x17. Out: 480 + in channels."""

  def __init__(self, in_channels, *, conv):
    self.branch3x3 = conv(in_channels, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(in_channels, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x):
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate(
        [self.branch3x3(x), branch3x3dbl, _max_pool_3x3(x, 2, 0)], -1)


class InceptionC(nnx.Module):
  """Mixed_6b-6e (FIDInceptionC), factorised 7x7. Out: 768 channels."""

  def __init__(self, in_channels, channels_7x7, *, conv):
    c7 = channels_7x7
    self.branch1x1 = conv(in_channels, 192, 1)
    self.branch7x7_1 = conv(in_channels, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_channels, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_channels, 192, 1)

  def __call__(self, x):
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl)
    branch_pool = self.branch_pool(_average_pool_3x3_excluding_padding(x))
    return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], -1)


class InceptionD(nnx.Module):
  """Mixed_7a: 17x17 -> 8x8. Out: 512 + in channels."""

  def __init__(self, in_channels, *, conv):
    self.branch3x3_1 = conv(in_channels, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(in_channels, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x):
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2, 0)], -1)


class InceptionE(nnx.Module):
  """Mixed_7b (FIDInceptionE_1, pool="average") and Mixed_7c (FIDInceptionE_2,
  pool="max"). Out: 2048 channels."""

  def __init__(self, in_channels, *, pool, conv):
    self.pool = pool
    self.branch1x1 = conv(in_channels, 320, 1)
    self.branch3x3_1 = conv(in_channels, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_channels, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_channels, 192, 1)

  def __call__(self, x):
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = jnp.concatenate(
        [self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], -1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = jnp.concatenate(
        [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], -1)
    if self.pool == "max":
      pooled = _max_pool_3x3(x, 1, 1)
    else:
      pooled = _average_pool_3x3_excluding_padding(x)
    return jnp.concatenate(
        [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], -1)


class FullyConnected(nnx.Module):
  """The 2048 -> 1008 `fc` layer. kernel: [2048, 1008]; bias: [1008]."""

  def __init__(self, *, rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    self.kernel = layers.param(rngs, init, (POOL_FEATURES, NUM_LOGITS), "features", "classes")
    self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (NUM_LOGITS,), "classes")


def interpolation_matrix(in_size, out_size, mode):
  """[out_size, in_size] float32 matrix of 1-D bilinear resizing.

  mode "tf_graph": TF1 ResizeBilinear, align_corners=False, no half-pixel
  centres: source = dst * in/out. mode "pytorch_fid": F.interpolate bilinear,
  align_corners=False: source = max((dst + 0.5) * in/out - 0.5, 0). Both take
  the pixels floor(source) and floor(source) + 1 (clamped to the last pixel)
  with weights 1 - frac and frac.
  """
  if mode not in PREPROCESSINGS:
    raise ValueError(f"interpolation_matrix: mode {mode!r}; allowed: {', '.join(PREPROCESSINGS)}")
  # Rounded as the references round: float32 scale; TF multiplies in float32;
  # torch's fused multiply-add rounds scale * (dst + 0.5) - 0.5 once to float32
  # (exact in float64, then cast). Weights match torch to float32 rounding.
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size)
  if mode == "tf_graph":
    src = dst.astype(np.float32) * scale
  else:
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = np.clip(src - lower.astype(np.float32), 0.0, 1.0).astype(np.float32)
  weight_lower = (np.float32(1.0) - frac).astype(np.float64)
  frac = frac.astype(np.float64)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), lower), weight_lower)
  np.add.at(matrix, (np.arange(out_size), upper), frac)
  return matrix.astype(np.float32)


def preprocess_images(images, mode, precision=jax.lax.Precision.HIGHEST):
  """[B, H, W, 3] uint8 / [0, 255] floats -> [B, 299, 299, 3] float32 in ~[-1, 1]."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"Inception input must be [batch, height, width, 3] in [0, 255], "
        f"got shape {images.shape}")
  x = images.astype(jnp.float32)
  height, width = images.shape[1:3]
  if height != INPUT_SIZE:
    rows = jnp.asarray(interpolation_matrix(height, INPUT_SIZE, mode))
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=precision)
  if width != INPUT_SIZE:
    cols = jnp.asarray(interpolation_matrix(width, INPUT_SIZE, mode))
    x = jnp.einsum("pw,bhwc->bhpc", cols, x, precision=precision)
  if mode == "tf_graph":
    return (x - 128.0) / 128.0
  return x / 127.5 - 1.0


class InceptionV3(nnx.Module):
  """The FID Inception-v3. __call__(images [B, H, W, 3] in [0, 255]) ->
  (pool3 [B, 2048], logits [B, 1008]), float32.

  Build it with `load_inception` / `inception_from_state_dict` (abstract
  construction + the file's arrays). Constructing it directly draws random
  weights eagerly, op by op, which takes about a minute on CPU and is only
  meaningful for shape checks. Conv kernels, BatchNorm scale/bias and fc are
  nnx.Param; BatchNorm running mean/var are nnx.BatchStat. `precision` applies
  to the convs, the resize and fc ("highest" keeps float32 on TPU/GPU too).
  """

  def __init__(self, *, preprocess="tf_graph", logits_bias=False,
               precision="highest", rngs):
    if preprocess not in PREPROCESSINGS:
      raise ValueError(
          f"eval.inception_preprocess: invalid value {preprocess!r}; "
          f"allowed: {', '.join(PREPROCESSINGS)}")
    self.preprocess = preprocess
    self.logits_bias = logits_bias
    self.precision = jax.lax.Precision[precision.upper()] if isinstance(precision, str) else precision
    conv = functools.partial(_conv_bn, precision=self.precision, rngs=rngs)
    self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = conv(32, 32, 3)
    self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = conv(64, 80, 1)
    self.Conv2d_4a_3x3 = conv(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, conv=conv)
    self.Mixed_5c = InceptionA(256, 64, conv=conv)
    self.Mixed_5d = InceptionA(288, 64, conv=conv)
    self.Mixed_6a = InceptionB(288, conv=conv)
    self.Mixed_6b = InceptionC(768, 128, conv=conv)
    self.Mixed_6c = InceptionC(768, 160, conv=conv)
    self.Mixed_6d = InceptionC(768, 160, conv=conv)
    self.Mixed_6e = InceptionC(768, 192, conv=conv)
    self.Mixed_7a = InceptionD(768, conv=conv)
    self.Mixed_7b = InceptionE(1280, pool="average", conv=conv)
    self.Mixed_7c = InceptionE(2048, pool="max", conv=conv)
    self.fc = FullyConnected(rngs=rngs)

  def __call__(self, images):
    x = preprocess_images(images, self.preprocess, self.precision)  # [B, 299, 299, 3]
    x = self.Conv2d_1a_3x3(x)  # 149x149x32
    x = self.Conv2d_2a_3x3(x)  # 147x147x32
    x = self.Conv2d_2b_3x3(x)  # 147x147x64
    x = _max_pool_3x3(x, 2, 0)  # 73x73x64
    x = self.Conv2d_3b_1x1(x)  # 73x73x80
    x = self.Conv2d_4a_3x3(x)  # 71x71x192
    x = _max_pool_3x3(x, 2, 0)  # 35x35x192
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,  # 35x35x288
                  self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,  # 17x17x768
                  self.Mixed_6d, self.Mixed_6e,
                  self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):  # 8x8x2048
      x = block(x)
    pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    logits = jnp.matmul(pool, self.fc.kernel[...], precision=self.precision)
    if self.logits_bias:
      logits = logits + self.fc.bias[...]
    return pool, logits


def _conv_bn(in_channels, out_channels, kernel_size, *, stride=1, padding=0,
             precision, rngs):
  return ConvBN(in_channels, out_channels, kernel_size, stride=stride,
                padding=padding, precision=precision, rngs=rngs)


# --- weights -----------------------------------------------------------------


@functools.cache
def _abstract_split(preprocess="tf_graph", logits_bias=False, precision="highest"):
  """(graphdef, {state path: shape}) of the network, traced once per options."""
  abstract = nnx.eval_shape(lambda: InceptionV3(
      preprocess=preprocess, logits_bias=logits_bias, precision=precision,
      rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shapes = {path: tuple(leaf.shape) for path, leaf in
            traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()}
  return graphdef, shapes


def _torch_key(path):
  """NNX state path (tuple of names) -> pytorch-fid state-dict key."""
  *modules, leaf = path
  if modules == ["fc"]:
    return "fc." + _FC_KEYS[leaf]
  return ".".join(modules) + "." + _CONV_BN_KEYS[leaf]


def _to_torch_layout(array):
  """Our layout -> pytorch's: conv kernels HWIO -> OIHW, fc kernel transposed."""
  if array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if array.ndim == 2:
    return np.transpose(array)
  return array


def _from_torch_layout(array):
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return np.transpose(array)
  return array


def _flat_state(model):
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


@functools.cache
def _expected_shapes():
  return {_torch_key(path): tuple(_to_torch_layout(np.empty(shape, np.int8)).shape)
          for path, shape in _abstract_split("tf_graph", False, "highest")[1].items()}


def expected_state_dict_shapes():
  """{pytorch-fid key: torch shape} of every tensor the network needs
  (`*.num_batches_tracked` are accepted but not needed)."""
  return dict(_expected_shapes())


def random_state_dict(seed=0):
  """A pytorch-fid-layout state dict of random weights (numpy), for tests only:
  He-normal conv kernels, 1/sqrt(fan_in) fc, and random BatchNorm statistics
  (scale U(0.5, 1.5), bias and mean N(0, 0.1), variance U(0.5, 2)) so that
  every tensor influences the outputs."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape in _expected_shapes().items():
    if key.endswith("conv.weight"):
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key == "fc.weight":
      value = rng.standard_normal(shape) / np.sqrt(shape[1])
    elif key.endswith("bn.weight"):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("bn.running_var"):
      value = rng.uniform(0.5, 2.0, shape)
    else:  # bn.bias, bn.running_mean, fc.bias
      value = rng.normal(0.0, 0.1, shape)
    state_dict[key] = value.astype(np.float32)
  return state_dict


def model_state_dict(model):
  """The pytorch-fid state dict (numpy, torch layouts) of an InceptionV3."""
  return {_torch_key(path): np.asarray(_to_torch_layout(np.asarray(value)))
          for path, value in _flat_state(model).items()}


def _format_names(names, limit=8):
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(state_dict, source="state dict"):
  """Raises InceptionWeightsError naming missing, unexpected and mis-shaped keys."""
  expected = _expected_shapes()
  given = {key: tuple(np.shape(value)) for key, value in state_dict.items()
           if not key.endswith(_IGNORED_SUFFIX)}
  problems = []
  missing = set(expected) - set(given)
  unexpected = set(given) - set(expected)
  misshaped = [f"{key} {given[key]} (expected {expected[key]})"
               for key in sorted(set(expected) & set(given)) if given[key] != expected[key]]
  if missing:
    problems.append(f"missing keys: {_format_names(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_format_names(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped keys: {', '.join(misshaped[:8])}"
                    + (f", ... ({len(misshaped)} in all)" if len(misshaped) > 8 else ""))
  if problems:
    raise InceptionWeightsError(
        f"{source} does not match the pytorch-fid FID Inception "
        f"(pt_inception-2015-12-05): " + "; ".join(problems))


def inception_from_state_dict(state_dict, *, source="state dict",
                              preprocess="tf_graph", logits_bias=False,
                              precision="highest"):
  """Builds an InceptionV3 from a pytorch-fid state dict {key: array}
  (see InceptionV3 for the options)."""
  check_state_dict(state_dict, source)
  graphdef, shapes = _abstract_split(preprocess, logits_bias, precision)
  values = {}
  for path, shape in shapes.items():
    value = _from_torch_layout(np.asarray(state_dict[_torch_key(path)], np.float32))
    assert value.shape == shape, (path, value.shape, shape)
    values[path] = jnp.asarray(value)
  return nnx.merge(graphdef, traverse_util.unflatten_dict(values))


def read_state_dict(path):
  """{key: np.ndarray} from a pytorch `.pth`/`.pt` state dict or an `.npz`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InceptionWeightsError(f"eval.inception_weights: no such file: {path}")
  extension = os.path.splitext(path)[1].lower()
  if extension == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  if extension in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise InceptionWeightsError(
          f"{path}: reading a PyTorch state dict needs torch, which is not "
          f"installed. Either `pip install torch` (the CPU wheel is enough), or "
          f"on a machine with torch run `python -m heptapod_jax.eval.inception "
          f"{os.path.basename(path)} fid_inception.npz` and set "
          f"eval.inception_weights to the .npz.") from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
      raise InceptionWeightsError(
          f"{path}: expected a state dict (dict of tensors), got {type(loaded).__name__}")
    return {key: value.detach().cpu().numpy() for key, value in loaded.items()}
  raise InceptionWeightsError(
      f"eval.inception_weights: {path}: unknown extension {extension!r}; "
      f"expected .pth/.pt (pytorch-fid state dict) or .npz")


def state_dict_to_npz(state_dict_or_path, npz_path):
  """Writes a pytorch-fid state dict (dict of tensors/arrays, or a .pth path)
  to an .npz with the same key names; checks it first."""
  if isinstance(state_dict_or_path, (str, os.PathLike)):
    state_dict = read_state_dict(state_dict_or_path)
  else:
    state_dict = {key: (value.detach().cpu().numpy() if hasattr(value, "detach")
                        else np.asarray(value))
                  for key, value in state_dict_or_path.items()}
  check_state_dict(state_dict, str(state_dict_or_path)
                   if isinstance(state_dict_or_path, (str, os.PathLike)) else "state dict")
  np.savez(npz_path, **state_dict)


def load_inception(path, *, preprocess="tf_graph", logits_bias=False, precision="highest"):
  """The FID Inception with weights from `path` (.pth or .npz); raises
  InceptionWeightsError when the file is missing, unreadable or mismatched."""
  if not path:
    raise InceptionWeightsError(SKIPPED_NO_WEIGHTS)
  return inception_from_state_dict(
      read_state_dict(path), source=os.fspath(path), preprocess=preprocess,
      logits_bias=logits_bias, precision=precision)


# --- running it over images ----------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images):
  return nnx.merge(graphdef, state)(images)


def make_apply_fn(model):
  """A jitted images [B, H, W, 3] -> (pool [B, 2048], logits [B, 1008]).

  Compiled once per (network options, batch shape): models built from weights
  with the same options share the graphdef and so the compiled program.
  """
  graphdef, state = nnx.split(model)
  return functools.partial(_apply, graphdef, state)


def fixed_size_batches(images, batch_size):
  """Yields (batch [batch_size, ...], valid_count) from an array or an iterable
  of arrays; the last batch is zero-padded so one compiled shape serves all."""
  source = [images] if isinstance(images, np.ndarray) or hasattr(images, "shape") else images
  pending, pending_count = [], 0
  for chunk in source:
    chunk = np.asarray(chunk)
    while chunk.shape[0]:
      take = min(batch_size - pending_count, chunk.shape[0])
      pending.append(chunk[:take])
      pending_count += take
      chunk = chunk[take:]
      if pending_count == batch_size:
        yield np.concatenate(pending), batch_size
        pending, pending_count = [], 0
  if pending_count:
    batch = np.concatenate(pending)
    padding = np.zeros((batch_size - pending_count,) + batch.shape[1:], batch.dtype)
    yield np.concatenate([batch, padding]), pending_count


def inception_outputs(model_or_fn, images, batch_size=100):
  """Runs the network over images ([N, H, W, 3] array or iterable of batches).

  Returns (pool [N, 2048] float32, logits [N, 1008] float32) on the host.
  """
  apply = model_or_fn if callable(model_or_fn) and not isinstance(model_or_fn, nnx.Module) \
      else make_apply_fn(model_or_fn)
  pools, logits = [], []
  for batch, valid in fixed_size_batches(images, batch_size):
    pool, logit = apply(jnp.asarray(batch))
    pools.append(np.asarray(pool)[:valid])
    logits.append(np.asarray(logit)[:valid])
  if not pools:
    raise ValueError("inception_outputs: no images")
  return np.concatenate(pools), np.concatenate(logits)


def inception_metrics(eval_config, sample_images, reference=None):
  """FID, Inception Score and precision/recall of `sample_images`.

  eval_config: the `eval` ConfigDict (see heptapod_jax.eval.default_eval_config);
  sample_images: [N, H, W, 3] uint8 / [0, 255] array or an iterable of batches;
  reference: a ReferenceStatistics, or None to read `eval_config.reference`
  (an ADM reference batch .npz; its arr_0 images, when present, are run
  through the network for precision/recall).
  Returns a dict of floats; without weights {"skipped": message}; metrics that
  lack their reference are named under "skipped" too.
  """
  if not eval_config.inception_weights:
    return {"skipped": SKIPPED_NO_WEIGHTS}
  model = load_inception(eval_config.inception_weights,
                         preprocess=eval_config.inception_preprocess,
                         logits_bias=eval_config.inception_logits_bias)
  apply = make_apply_fn(model)
  batch_size = eval_config.inception_batch_size
  pool, logits = inception_outputs(apply, sample_images, batch_size)
  if reference is None and eval_config.reference:
    reference = reference_lib.load_reference(
        eval_config.reference,
        feature_fn=lambda images: inception_outputs(apply, images, batch_size)[0])
  return metrics_from_outputs(
      pool, logits, reference, num_splits=eval_config.inception_score_splits,
      neighbourhood=eval_config.precision_recall_neighbourhood,
      block_size=eval_config.precision_recall_block_size)


def metrics_from_outputs(pool, logits, reference, *, num_splits=10, neighbourhood=3,
                         block_size=10000):
  """The Inception metrics from network outputs.

  pool: [N, D] sample features; logits: [N, K]; reference: ReferenceStatistics
  (mu [D], sigma [D, D], optional features [M, D]) or None.
  Returns {"num_samples", "inception_score", "inception_score_std"[, "fid"]
  [, "precision", "recall"][, "skipped"]}.
  """
  is_mean, is_std = metrics.inception_score(metrics.softmax(logits),
                                            min(num_splits, len(logits)))
  results = {"num_samples": int(pool.shape[0]), "inception_score": is_mean,
             "inception_score_std": is_std}
  skipped = []
  if reference is None:
    skipped.append("FID and precision/recall skipped: eval.reference is not set")
  else:
    samples = metrics.FeatureStatistics.from_features(pool)
    results["fid"] = metrics.frechet_distance(
        samples.mean, samples.covariance, reference.mu, reference.sigma)
    if reference.features is None:
      skipped.append("precision/recall skipped: the reference has no images (arr_0)")
    else:
      pr = metrics.precision_recall(reference.features, pool, neighbourhood, block_size)
      results["precision"], results["recall"] = pr.precision, pr.recall
  if skipped:
    results["skipped"] = "; ".join(skipped)
  return results


def _main(argv):
  if len(argv) != 3:
    print("usage: python -m heptapod_jax.eval.inception IN.pth OUT.npz", file=sys.stderr)
    return 2
  state_dict_to_npz(argv[1], argv[2])
  print(f"wrote {argv[2]}")
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv))
