"""LPIPS perceptual distance (Zhang et al. 2018), "vgg" variant, v0.1 weights.

Follows the `lpips` package (v0.1, `lpips.LPIPS(net="vgg")`), NHWC:

  ScalingLayer: x' = (x - shift) / scale, shift [-.030, -.088, -.188],
      scale [.458, .448, .450], on images in [-1, 1];
  VGG16 trunk: torchvision `vgg16().features` (3x3 convs, padding 1, ReLU,
      2x2 max pools) up to relu5_3, features taken at relu1_2, relu2_2,
      relu3_3, relu4_3, relu5_3 (64, 128, 256, 512, 512 channels);
  per layer: unit-normalise each feature vector over channels
      (x / (||x|| + 1e-10)), squared difference of the two images, a learned
      1x1 conv to one channel ("lin", no bias, non-negative weights), mean
      over the spatial positions;
  distance: the sum over the 5 layers -> [B].

The inputs need at least 16x16 pixels (relu5_3 is at 1/16 resolution).

Weights come only from files, never downloads:
  - the VGG16 trunk: a torchvision state dict (`vgg16-397923af.pth`; keys
    `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`;
    `classifier.*` is accepted and ignored), user-supplied;
  - the lin layers: the lpips package's `weights/v0.1/vgg.pth` (keys
    `lin{0..4}.model.1.weight`, shapes [1, C, 1, 1]), which ships inside the
    `lpips` wheel on PyPI.
Either as `.pth` (read with `torch.load(weights_only=True)`, needs torch) or as
`.npz` with the same key names (`state_dict_to_npz`, or on a machine with
torch: `python -m heptapod_jax.models.lpips IN.pth OUT.npz`).

The module is a frozen metric: its weights enter the computation through
`stop_gradient`, so gradients flow to the images only. Keep it out of any
optimiser's parameters.
"""

import os
import sys

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from heptapod_jax.models import layers

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10
MIN_SIZE = 16
# torchvision vgg16().features up to relu5_3: "M" is a 2x2 max pool; numbers
# are 3x3 convs (each followed by ReLU) with their index in `features`.
_VGG_LAYOUT = (
    (0, 64), (2, 64), "tap", "M",
    (5, 128), (7, 128), "tap", "M",
    (10, 256), (12, 256), (14, 256), "tap", "M",
    (17, 512), (19, 512), (21, 512), "tap", "M",
    (24, 512), (26, 512), (28, 512), "tap",
)
VGG_CONV_INDICES = tuple(item[0] for item in _VGG_LAYOUT if isinstance(item, tuple))
TAP_CHANNELS = (64, 128, 256, 512, 512)
_IGNORED_VGG_PREFIX = "classifier."  # torchvision's fc layers, not used
KINDS = ("vgg", "lin")


class LPIPSWeightsError(ValueError):
  """A weights file is missing, unreadable or does not match LPIPS-vgg."""


class _Conv3x3(nnx.Module):
  """3x3 conv, padding 1, + bias + ReLU; kernel [3, 3, in, out] (HWIO)."""

  def __init__(self, in_channels, out_channels, *, dtype, precision, rngs):
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
    self.kernel = layers.param(rngs, init, (3, 3, in_channels, out_channels),
                               "conv_height", "conv_width", "conv_in", "conv_out")
    self.bias = layers.param(rngs, nnx.initializers.zeros_init(),
                             (out_channels,), "conv_out")
    self.dtype = dtype
    self.precision = precision

  def __call__(self, x):
    """x: [B, H, W, in] -> [B, H, W, out]."""
    kernel = jax.lax.stop_gradient(self.kernel[...]).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    return jax.nn.relu(y + jax.lax.stop_gradient(self.bias[...]).astype(self.dtype))


class _Lin(nnx.Module):
  """lpips' NetLinLayer: 1x1 conv C -> 1 without bias; kernel [1, 1, C, 1]."""

  def __init__(self, channels, *, rngs):
    # Random non-negative weights (the trained ones are non-negative too).
    self.kernel = layers.param(rngs, nnx.initializers.uniform(1.0),
                               (1, 1, channels, 1),
                               "conv_height", "conv_width", "conv_in", "conv_out")

  def __call__(self, x):
    """x: [B, h, w, C] float32 -> [B, h, w] float32."""
    weight = jax.lax.stop_gradient(self.kernel[...])[0, 0, :, 0]
    return jnp.einsum("bhwc,c->bhw", x, weight,
                      precision=jax.lax.Precision.HIGHEST)


def _unit_normalize(x):
  """x / (||x||_channels + 1e-10), in float32; finite gradient at x = 0."""
  x = x.astype(jnp.float32)
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x / (jnp.sqrt(jnp.maximum(squared, 1e-30)) + NORMALIZE_EPS)


class LPIPS(nnx.Module):
  """LPIPS-vgg. __call__(images_a, images_b: [B, H, W, 3] in [-1, 1]) -> [B] float32.

  dtype: compute dtype of the VGG convs ("float32" or "bfloat16");
  normalisation, differences and the lin layers run in float32.
  precision: of the VGG convs (None: the backend default).
  Random weights from `rngs` are only for shapes and tests; use `load_lpips`.
  """

  def __init__(self, *, rngs, dtype="float32", precision=None):
    dtype = jnp.dtype(dtype)
    if isinstance(precision, str):
      precision = jax.lax.Precision(precision.lower())
    convs, in_channels = [], 3
    for item in _VGG_LAYOUT:
      if isinstance(item, tuple):
        convs.append(_Conv3x3(in_channels, item[1], dtype=dtype,
                              precision=precision, rngs=rngs))
        in_channels = item[1]
    self.convs = nnx.List(convs)
    self.lins = nnx.List([_Lin(c, rngs=rngs) for c in TAP_CHANNELS])

  def features(self, images):
    """images [B, H, W, 3] in [-1, 1] -> the 5 taps [B, H / 2**k, W / 2**k, C_k]."""
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    x = (images.astype(jnp.float32) - shift) / scale
    taps, index = [], 0
    for item in _VGG_LAYOUT:
      if item == "tap":
        taps.append(x)
      elif item == "M":
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                  (1, 2, 2, 1), "VALID")
      else:
        x = self.convs[index](x)
        index += 1
    return taps

  def __call__(self, images_a, images_b):
    if images_a.shape != images_b.shape:
      raise ValueError(f"LPIPS: image shapes differ: {images_a.shape} vs {images_b.shape}")
    if images_a.ndim != 4 or images_a.shape[-1] != 3:
      raise ValueError(f"LPIPS: expected [B, H, W, 3] images, got {images_a.shape}")
    if min(images_a.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"LPIPS: images must be at least {MIN_SIZE}x{MIN_SIZE}, "
                       f"got {images_a.shape[1]}x{images_a.shape[2]}")
    batch = images_a.shape[0]
    # One trunk pass over both batches.
    taps = self.features(jnp.concatenate([images_a, images_b], axis=0))
    distance = jnp.zeros((batch,), jnp.float32)
    for lin, tap in zip(self.lins, taps):
      tap = _unit_normalize(tap)
      difference = jnp.square(tap[:batch] - tap[batch:])
      distance = distance + jnp.mean(lin(difference), axis=(1, 2))
    return distance


# --- weights -----------------------------------------------------------------


def _abstract_model(**options):
  return nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), **options))


def _torch_key(path):
  """NNX state path -> (kind, state-dict key)."""
  container, index, leaf = path
  if container == "convs":
    suffix = {"kernel": "weight", "bias": "bias"}[leaf]
    return "vgg", f"features.{VGG_CONV_INDICES[index]}.{suffix}"
  return "lin", f"lin{index}.model.1.weight"


def _to_torch_layout(array):
  """HWIO -> OIHW for 4-d kernels."""
  return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array


def _from_torch_layout(array):
  return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array


def _flat_state(model):
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def expected_state_dict_shapes(kind):
  """{key: torch shape} of the file `kind` ("vgg" or "lin")."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  shapes = {}
  for path, leaf in _flat_state(_abstract_model()).items():
    leaf_kind, key = _torch_key(path)
    if leaf_kind == kind:
      shapes[key] = tuple(_to_torch_layout(np.empty(leaf.shape, np.int8)).shape)
  return shapes


def model_state_dicts(model):
  """(vgg, lin) state dicts {key: np.ndarray, torch layouts} of an LPIPS module."""
  out = {"vgg": {}, "lin": {}}
  for path, value in _flat_state(model).items():
    kind, key = _torch_key(path)
    out[kind][key] = _to_torch_layout(np.asarray(value))
  return out["vgg"], out["lin"]


def _format_names(names, limit=8):
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(state_dict, kind, source="state dict"):
  """Raises LPIPSWeightsError naming missing, unexpected, mis-shaped and (for
  lin) negative-valued keys of a `kind` ("vgg" or "lin") state dict."""
  expected = expected_state_dict_shapes(kind)
  given = {key: tuple(np.shape(value)) for key, value in state_dict.items()
           if not (kind == "vgg" and key.startswith(_IGNORED_VGG_PREFIX))}
  missing = set(expected) - set(given)
  unexpected = set(given) - set(expected)
  misshaped = [f"{key} {given[key]} (expected {expected[key]})"
               for key in sorted(set(expected) & set(given))
               if given[key] != expected[key]]
  problems = []
  if missing:
    problems.append(f"missing keys: {_format_names(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_format_names(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped keys: {', '.join(misshaped[:8])}"
                    + (f", ... ({len(misshaped)} in all)" if len(misshaped) > 8 else ""))
  if kind == "lin" and not problems:
    negative = [key for key in expected if np.min(state_dict[key]) < 0]
    if negative:
      problems.append(f"negative lin weights (LPIPS lin weights are "
                      f"non-negative): {_format_names(negative)}")
  if problems:
    what = ("a torchvision VGG16 state dict (vgg16-397923af.pth)" if kind == "vgg"
            else "the lpips v0.1 vgg lin weights (lpips/weights/v0.1/vgg.pth)")
    raise LPIPSWeightsError(f"{source} does not match {what}: " + "; ".join(problems))


def lpips_from_state_dicts(vgg_state_dict, lin_state_dict, *,
                           vgg_source="vgg state dict",
                           lin_source="lin state dict", **options):
  """An LPIPS module from a torchvision VGG16 and an lpips lin state dict.

  options: dtype, precision (see LPIPS).
  """
  check_state_dict(vgg_state_dict, "vgg", vgg_source)
  check_state_dict(lin_state_dict, "lin", lin_source)
  sources = {"vgg": vgg_state_dict, "lin": lin_state_dict}
  graphdef, params, rest = nnx.split(_abstract_model(**options), nnx.Param, ...)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(nnx.to_pure_dict(params)).items():
    kind, key = _torch_key(path)
    value = _from_torch_layout(np.asarray(sources[kind][key], np.float32))
    assert value.shape == leaf.shape, (key, value.shape, leaf.shape)
    flat[path] = jnp.asarray(value)
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, params, rest)


def read_state_dict(path):
  """{key: np.ndarray} from a PyTorch `.pth`/`.pt` state dict or an `.npz`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise LPIPSWeightsError(f"LPIPS weights: no such file: {path}")
  extension = os.path.splitext(path)[1].lower()
  if extension == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
      raise LPIPSWeightsError(f"{path}: not a readable .npz ({error})") from None
  if extension in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise LPIPSWeightsError(
          f"{path}: reading a PyTorch state dict needs torch, which is not "
          f"installed. Convert it to .npz on a machine with torch: `python -m "
          f"heptapod_jax.models.lpips {os.path.basename(path)} OUT.npz` (or "
          f"heptapod_jax.models.lpips.state_dict_to_npz), and pass the .npz.") from None
    try:
      loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pylint: disable=broad-except
      raise LPIPSWeightsError(
          f"{path}: cannot be read as a state dict with torch.load("
          f"weights_only=True): {error}") from None
    if not isinstance(loaded, dict):
      raise LPIPSWeightsError(
          f"{path}: expected a state dict (dict of tensors), got {type(loaded).__name__}")
    return {key: value.detach().cpu().numpy() for key, value in loaded.items()}
  raise LPIPSWeightsError(
      f"{path}: unknown extension {extension!r}; expected .pth/.pt (PyTorch "
      f"state dict) or .npz")


def _detect_kind(state_dict):
  if any(key.startswith("features.") for key in state_dict):
    return "vgg"
  if any(key.startswith("lin") for key in state_dict):
    return "lin"
  return None


def state_dict_to_npz(state_dict_or_path, npz_path, kind="auto"):
  """Writes a state dict (dict of tensors/arrays, or a .pth/.npz path) to an
  .npz with the same key names.

  kind: "vgg" or "lin": checks it and writes only the keys LPIPS uses (drops
  torchvision's classifier, ~500 MB); "auto": that, by the key names; None:
  writes every key unchecked. Returns the kind used.
  """
  if isinstance(state_dict_or_path, (str, os.PathLike)):
    source = os.fspath(state_dict_or_path)
    state_dict = read_state_dict(source)
  else:
    source = "state dict"
    state_dict = {key: (value.detach().cpu().numpy() if hasattr(value, "detach")
                        else np.asarray(value))
                  for key, value in state_dict_or_path.items()}
  if kind == "auto":
    kind = _detect_kind(state_dict)
    if kind is None:
      raise LPIPSWeightsError(
          f"{source}: neither a torchvision VGG16 (features.*) nor an lpips "
          f"lin (lin0.model.1.weight, ...) state dict; keys: "
          f"{_format_names(state_dict)}")
  if kind is not None:
    check_state_dict(state_dict, kind, source)
    state_dict = {key: state_dict[key] for key in expected_state_dict_shapes(kind)}
  np.savez(npz_path, **state_dict)
  return kind


def load_lpips(vgg_path, lin_path, *, dtype="float32", precision=None):
  """LPIPS-vgg with the VGG16 trunk from `vgg_path` and the lin layers from
  `lin_path` (.pth or .npz each); raises LPIPSWeightsError naming the file and
  the keys when one is missing, unreadable or mismatched."""
  for name, path in (("vgg_path", vgg_path), ("lin_path", lin_path)):
    if not path:
      raise LPIPSWeightsError(f"LPIPS: {name} is not set")
  return lpips_from_state_dicts(
      read_state_dict(vgg_path), read_state_dict(lin_path),
      vgg_source=os.fspath(vgg_path), lin_source=os.fspath(lin_path),
      dtype=dtype, precision=precision)


def _main(argv):
  if len(argv) != 3:
    print("usage: python -m heptapod_jax.models.lpips IN.pth OUT.npz\n"
          "  IN: torchvision vgg16-397923af.pth or lpips weights/v0.1/vgg.pth",
          file=sys.stderr)
    return 2
  try:
    kind = state_dict_to_npz(argv[1], argv[2])
  except LPIPSWeightsError as error:
    print(error, file=sys.stderr)
    return 1
  print(f"wrote {argv[2]} ({kind} weights)")
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv))
