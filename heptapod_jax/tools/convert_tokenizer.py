r"""Imports a public PyTorch tokenizer checkpoint into our Flax NNX parameters.

  python -m heptapod_jax.tools.convert_tokenizer --source=llamagen_vq16 \
      --input=vq_ds16_c2i.pt --output=tokenizers/vq16
  python -m heptapod_jax.tools.convert_tokenizer --source=mar_kl16 \
      --input=kl16.ckpt --output=tokenizers/kl16

Reads `.pt`/`.ckpt`/`.pth` with `torch.load(weights_only=True)` (a pickle that
needs code execution is refused) or `.safetensors`; unwraps the training
wrapper ({"model": state_dict, "optimizer": ..., ...}); maps every PyTorch
tensor to one NNX parameter (conv OIHW -> HWIO, GroupNorm weight -> scale,
embedding rows as they are). Missing, unexpected and mis-shaped tensors are
reported by name and fail the conversion; the few tensors that are not part of
the model (LlamaGen's codebook-usage buffer, an LDM loss module) are dropped
by an explicit list and logged. Writes:

  DIR/params          orbax StandardCheckpointer of nnx.to_pure_dict(params)
  DIR/tokenizer.json  {"name", "overrides", "spec", "source", "input", ...}

`load_tokenizer_params(DIR)` and `restore_into(model, DIR)` read them back
(for `tokenizer.init_from=DIR`). See docs/tokenizers.md.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import pickle
import re

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from flax import nnx
import orbax.checkpoint as ocp

from heptapod_jax.models import tokenizers
from heptapod_jax.models.tokenizers import specs as tokenizer_specs

FORMAT_VERSION = 1
INFO_FILE = "tokenizer.json"
PARAMS_DIR = "params"
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


class ConversionError(ValueError):
  """The checkpoint cannot be converted; the message names the file and tensors."""


@dataclasses.dataclass(frozen=True)
class Source:
  """How one upstream code base names the tensors of our architecture."""
  name: str
  tokenizer: str  # our architecture (specs.SPECS) the file must match
  encoder_levels: str  # container of the encoder's resolution levels
  decoder_levels: str
  decoder_levels_reversed: bool  # True: index 0 is the lowest resolution
  blocks: str  # residual blocks inside a level
  middle: dict  # our middle-block child -> upstream name
  # Tensors in the file that are not model weights: name -> why dropped.
  ignored: dict
  ignored_prefixes: dict
  signature: str  # a tensor name only this source's files have


SOURCES = {
    # FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py (VQ_16).
    "llamagen_vq16": Source(
        name="llamagen_vq16", tokenizer="vq16",
        encoder_levels="encoder.conv_blocks",
        decoder_levels="decoder.conv_blocks", decoder_levels_reversed=True,
        blocks="res",
        middle={"block_1": "mid.0", "attention": "mid.1", "block_2": "mid.2"},
        ignored={"quantize.codebook_used":
                 "codebook-usage statistics buffer (training only)"},
        ignored_prefixes={},
        signature="quantize.embedding.weight"),
    # LTH14/mar models/vae.py (AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4))).
    "mar_kl16": Source(
        name="mar_kl16", tokenizer="kl16",
        encoder_levels="encoder.down", decoder_levels="decoder.up",
        decoder_levels_reversed=False, blocks="block",
        middle={"block_1": "mid.block_1", "attention": "mid.attn_1",
                "block_2": "mid.block_2"},
        ignored={},
        ignored_prefixes={"loss.": "LDM training loss (LPIPS / discriminator)"},
        signature="encoder.down.0.block.0.conv1.weight"),
}

# Our module names that differ from the upstream ones (same everywhere).
_RENAMES = {"attentions": "attn", "shortcut": "nin_shortcut", "query": "q",
            "key": "k", "value": "v", "out": "proj_out"}
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Keys of a training checkpoint under which the model's state_dict may sit.
_STATE_KEYS = ("model", "state_dict")


def torch_name(source, path, num_levels):
  """The upstream tensor name of our parameter at `path` (a tuple of keys).

  e.g. ("decoder", "levels", 4, "blocks", 0, "norm1", "scale") ->
  "decoder.conv_blocks.0.res.0.norm1.weight" (LlamaGen, 5 levels).
  """
  path = list(path)
  if path == ["codebook"]:
    return "quantize.embedding.weight"
  parts = []
  index = 0
  while index < len(path) - 1:
    key = path[index]
    if key == "levels":
      coder = path[index - 1]
      level = int(path[index + 1])
      if coder == "decoder" and source.decoder_levels_reversed:
        level = num_levels - 1 - level
      parts[-1:] = [getattr(source, f"{coder}_levels"), str(level)]
      index += 2
      continue
    if key == "middle":
      parts.append(source.middle[path[index + 1]])
      index += 2
      continue
    if key == "blocks":
      parts.append(source.blocks)
    else:
      parts.append(_RENAMES.get(str(key), str(key)))
    index += 1
  parts.append(_LEAF_RENAMES[path[-1]])
  return ".".join(parts)


def to_torch_layout(array_shape, leaf):
  """Shape in PyTorch layout of our parameter of `array_shape` named `leaf`."""
  if leaf == "kernel" and len(array_shape) == 4:  # HWIO -> OIHW
    return (array_shape[3], array_shape[2], array_shape[0], array_shape[1])
  if leaf == "kernel" and len(array_shape) == 2:  # [in, out] -> Linear [out, in]
    return (array_shape[1], array_shape[0])
  return tuple(array_shape)


def from_torch_layout(tensor, leaf):
  """A PyTorch tensor (numpy) in our layout: OIHW -> HWIO, Linear transposed."""
  if leaf == "kernel" and tensor.ndim == 4:
    return np.transpose(tensor, (2, 3, 1, 0))
  if leaf == "kernel" and tensor.ndim == 2:
    return tensor.T
  return tensor


# ----------------------------------------------------------------------------
# Reading checkpoint files.

def read_checkpoint(path):
  """Loads `path` without executing code: returns what the file holds.

  .safetensors -> {name: tensor or np.ndarray}; torch formats -> the
  unpickled object (tensors, dicts, lists, numbers, strings and
  argparse.Namespace only).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file")
  suffix = path.suffix.lower()
  if suffix == SAFETENSORS_SUFFIX:
    try:
      # With torch, bfloat16 files load too (numpy has no bfloat16).
      try:
        from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
      except ImportError:
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      raise ConversionError(
          f"{path}: reading .safetensors needs the 'safetensors' package "
          f"(pip install safetensors)") from error
    try:
      return load_file(str(path))
    except Exception as error:  # pylint: disable=broad-except
      raise ConversionError(f"{path}: not a readable safetensors file: {error}") from error
  if suffix not in TORCH_SUFFIXES:
    raise ConversionError(
        f"{path}: unknown checkpoint type {suffix!r}; expected one of "
        f"{TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ConversionError(
        f"{path}: reading a PyTorch checkpoint needs torch (pip install torch), "
        f"or convert the file to .safetensors") from error
  try:
    # LlamaGen's training checkpoints carry their argparse.Namespace ("args"):
    # a plain attribute bag, rebuilt without running any code of the file.
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    # torch's message is long advice on loading unsafely; keep its reason.
    match = re.search(r"Unsupported global: GLOBAL (\S+) was not", str(error))
    reason = (f"it references {match.group(1)}, which only code can rebuild"
              if match else str(error).strip().split("\n")[0])
    raise ConversionError(
        f"{path}: refused: this pickle needs code execution to load, which we "
        f"never do ({reason}). Re-save only the "
        f"state_dict (torch.save(model.state_dict(), ...)) or convert it to "
        f".safetensors") from error
  except (RuntimeError, EOFError, OSError) as error:
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint: {error}") from error


def _is_tensor(value):
  return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap_state_dict(checkpoint, path, *, use_ema=False):
  """Picks the model's state_dict out of a training checkpoint.

  Returns (state_dict, ignored_top_level_keys). A bare state_dict (all values
  tensors) is returned as it is; otherwise the "model" (or "state_dict")
  entry, or "ema" when `use_ema`; every other top-level entry is ignored and
  returned by name so the caller can log it.
  """
  if not isinstance(checkpoint, dict):
    raise ConversionError(
        f"{path}: expected a dict (a state_dict or a training checkpoint), "
        f"got {type(checkpoint).__name__}")
  if checkpoint and all(_is_tensor(value) for value in checkpoint.values()):
    if use_ema:
      raise ConversionError(f"{path}: --use_ema: the file is a bare state_dict "
                            f"with no 'ema' entry")
    return checkpoint, []
  candidates = ("ema",) if use_ema else _STATE_KEYS
  for key in candidates:
    if key in checkpoint and isinstance(checkpoint[key], dict):
      ignored = sorted(str(other) for other in checkpoint if other != key)
      return checkpoint[key], ignored
  raise ConversionError(
      f"{path}: found no model state_dict; top-level keys are "
      f"{sorted(map(str, checkpoint))}, expected one of {list(candidates)}")


def _to_numpy(name, tensor, path):
  if isinstance(tensor, np.ndarray):
    return tensor.astype(np.float32)
  if not _is_tensor(tensor):
    raise ConversionError(f"{path}: entry {name!r} is a "
                          f"{type(tensor).__name__}, not a tensor")
  return tensor.detach().float().cpu().numpy()


# ----------------------------------------------------------------------------
# Mapping onto the NNX parameter tree.

def _flatten(tree, prefix=()):
  """Nested dict -> [(path tuple, leaf)]."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _unflatten(items):
  tree = {}
  for path, value in items:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def abstract_params(name, overrides=None):
  """The pure-dict parameter tree of tokenizer `name` as ShapeDtypeStructs."""
  overrides = dict(overrides or {})
  model = nnx.eval_shape(lambda: tokenizers.build_tokenizer(
      name, rngs=nnx.Rngs(0), **overrides))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.spec


def map_state_dict(state_dict, source, *, overrides=None, path="<state_dict>"):
  """Maps a PyTorch state_dict onto our parameter tree.

  Returns (pure_dict of float32 numpy arrays, spec, ignored tensor names).
  Raises ConversionError listing every missing, unexpected and mis-shaped
  tensor by name.
  """
  target, spec = abstract_params(source.tokenizer, overrides)
  num_levels = len(spec.ch_mult)
  expected = {}
  for param_path, leaf in _flatten(target):
    expected[torch_name(source, param_path, num_levels)] = (param_path, leaf)

  ignored, unexpected = [], []
  for name in state_dict:
    if name in expected:
      continue
    reason = source.ignored.get(name) or next(
        (why for prefix, why in source.ignored_prefixes.items()
         if name.startswith(prefix)), None)
    (ignored if reason else unexpected).append(name)
  missing = [name for name in expected if name not in state_dict]

  converted, misshaped = [], []
  for name, (param_path, leaf) in expected.items():
    if name not in state_dict:
      continue
    tensor = _to_numpy(name, state_dict[name], path)
    want = to_torch_layout(leaf.shape, param_path[-1])
    if tuple(tensor.shape) != want:
      misshaped.append(f"{name}: file has {list(tensor.shape)}, "
                       f"{spec.name} needs {list(want)}")
      continue
    converted.append((param_path, from_torch_layout(tensor, param_path[-1])))

  if missing or unexpected or misshaped:
    lines = [f"{path}: does not match architecture {spec.name!r} "
             f"(--source={source.name}):"]
    for title, names in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if names:
        lines.append(f"  {len(names)} {title}: " + "; ".join(names[:50])
                     + (f"; ... ({len(names) - 50} more)" if len(names) > 50 else ""))
    for other in SOURCES.values():
      if other.name != source.name and other.signature in state_dict:
        lines.append(f"  the file looks like a {other.name} checkpoint: "
                     f"try --source={other.name}")
    raise ConversionError("\n".join(lines))
  return _unflatten(converted), spec, sorted(ignored)


# ----------------------------------------------------------------------------
# Writing and reading converted tokenizers.

_RESERVED_INFO_KEYS = ("format_version", "name", "overrides", "spec",
                       "num_params")


def _json_overrides(overrides):
  return {key: (list(value) if isinstance(value, tuple) else value)
          for key, value in (overrides or {}).items()}


def write_tokenizer_dir(directory, name, params, info=None, *, overrides=None,
                        overwrite=False):
  """Writes a tokenizer directory: DIR/params (orbax) and DIR/tokenizer.json.

  name: the architecture (specs.SPECS) built with `overrides`; params: its
  parameters as nnx.to_pure_dict(nnx.state(model, nnx.Param)) (or that
  nnx.State), arrays of any kind. They are checked against the architecture:
  missing, unexpected and mis-shaped parameters are named. info: extra
  JSON-able provenance merged into tokenizer.json (e.g. source, step).
  A collective call under multi-process JAX (orbax synchronises the processes);
  tokenizer.json is written by process 0. Returns the tokenizer.json dict.
  """
  directory = pathlib.Path(directory).absolute()
  if (directory / PARAMS_DIR).exists() and not overwrite:
    raise ConversionError(f"{directory / PARAMS_DIR}: already exists; choose "
                          f"an empty output directory")
  clashing = sorted(set(info or {}) & set(_RESERVED_INFO_KEYS))
  if clashing:
    raise ConversionError(f"tokenizer.json: info may not set {clashing}")
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  params = nnx.restore_int_paths(params)  # orbax-restored trees have "0" keys
  target, spec = abstract_params(name, overrides)
  given = {path: np.asarray(value, dtype=np.float32)
           for path, value in _flatten(params)}
  wanted = dict(_flatten(target))
  _check_same_parameters(given, wanted, f"{directory}: parameters of {name!r}")
  pure = _unflatten(given.items())
  num_params = sum(value.size for value in given.values())
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, pure, force=overwrite)
  info = {"format_version": FORMAT_VERSION, "name": spec.name,
          "overrides": _json_overrides(overrides), "spec": spec.to_json(),
          "num_params": int(num_params), **(info or {})}
  if jax.process_index() == 0:
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
  logging.info("wrote %s (%s, %d parameters)", directory, spec.name, num_params)
  return info


def _check_same_parameters(given, wanted, where):
  """given, wanted: {path tuple: array-like with .shape}; raises naming differences."""
  def show(path):
    return "/".join(map(str, path))

  missing = sorted(show(p) for p in wanted if p not in given)
  unexpected = sorted(show(p) for p in given if p not in wanted)
  misshaped = sorted(
      f"{show(p)}: given {list(given[p].shape)}, needs {list(wanted[p].shape)}"
      for p in wanted if p in given
      and tuple(given[p].shape) != tuple(wanted[p].shape))
  if missing or unexpected or misshaped:
    raise ConversionError(f"{where} do not match the architecture: missing "
                          f"{missing}, unexpected {unexpected}, mis-shaped "
                          f"{misshaped}")


def convert(source_name, input_path, output_dir, *, overrides=None,
            use_ema=False):
  """Converts `input_path` (a `source_name` checkpoint) into `output_dir`.

  overrides: spec fields changed from the source's architecture (tests build
  reduced-size models this way); they are recorded in tokenizer.json.
  Returns the tokenizer.json dict.
  """
  if source_name not in SOURCES:
    raise ConversionError(f"--source: unknown source {source_name!r}; "
                          f"allowed: {sorted(SOURCES)}")
  source = SOURCES[source_name]
  output_dir = pathlib.Path(output_dir).absolute()
  if (output_dir / PARAMS_DIR).exists():
    raise ConversionError(f"{output_dir / PARAMS_DIR}: already exists; "
                          f"choose an empty --output directory")
  logging.info("reading %s (%s)", input_path, source.name)
  checkpoint = read_checkpoint(input_path)
  state_dict, ignored_entries = unwrap_state_dict(checkpoint, input_path,
                                                  use_ema=use_ema)
  if ignored_entries:
    logging.info("ignored top-level entries of %s: %s", input_path,
                 ", ".join(ignored_entries))
  logging.info("%d tensors in the state_dict", len(state_dict))
  pure, spec, ignored_tensors = map_state_dict(
      state_dict, source, overrides=overrides, path=input_path)
  for name in ignored_tensors:
    logging.info("ignored tensor %s (not a model weight)", name)
  logging.info("converted %d tensors into %s", len(list(_flatten(pure))),
               spec.name)
  return write_tokenizer_dir(
      output_dir, spec.name, pure,
      {"source": source.name, "input": os.fspath(input_path),
       "weights": "ema" if use_ema else "model",
       "ignored_entries": ignored_entries, "ignored_tensors": ignored_tensors},
      overrides=overrides)


def read_info(directory):
  """The tokenizer.json of a converted tokenizer directory, checked."""
  path = pathlib.Path(directory) / INFO_FILE
  if not path.is_file():
    raise ConversionError(f"{path}: missing; is {directory} the --output of "
                          f"heptapod_jax.tools.convert_tokenizer?")
  info = json.loads(path.read_text())
  if info.get("format_version") != FORMAT_VERSION:
    raise ConversionError(f"{path}: format_version "
                          f"{info.get('format_version')!r}, expected {FORMAT_VERSION}")
  if info.get("name") not in tokenizers.SPECS:
    raise ConversionError(f"{path}: name {info.get('name')!r} is not a known "
                          f"tokenizer; allowed: {sorted(tokenizers.SPECS)}")
  return info


def load_tokenizer_params(directory):
  """Reads a converted tokenizer: returns (name, pure_dict of numpy arrays).

  The pure dict has the structure of nnx.to_pure_dict(nnx.state(model,
  nnx.Param)) for `build_tokenizer(name, **info["overrides"])`.
  """
  info = read_info(directory)
  params_path = (pathlib.Path(directory) / PARAMS_DIR).absolute()
  with ocp.StandardCheckpointer() as checkpointer:
    pure = checkpointer.restore(params_path)
  return info["name"], nnx.restore_int_paths(pure)


def load_tokenizer(directory, *, dtype="float32"):
  """Builds the converted tokenizer in `directory` and loads its weights."""
  info = read_info(directory)
  model = nnx.eval_shape(lambda: tokenizers.build_tokenizer(
      info["name"], rngs=nnx.Rngs(0), dtype=dtype, **info["overrides"]))
  return restore_into(model, directory)


def restore_into(model, directory):
  """Loads the converted weights in `directory` into `model` (in place); returns it.

  `model` may be abstract (nnx.eval_shape) or concrete; loaded arrays take the
  sharding of the parameters they replace. The architecture recorded in
  tokenizer.json must equal model.spec (training-only fields such as dropout
  may differ), and every parameter must be present with its shape:
  mismatches are named.
  """
  info = read_info(directory)
  recorded = info["spec"]
  mine = model.spec.to_json()
  if info["name"] != mine["name"]:
    raise ConversionError(
        f"{directory}: holds tokenizer {info['name']!r}, the model is "
        f"{mine['name']!r}")
  differing = [f"{key}: file {recorded.get(key)!r} vs model {mine[key]!r}"
               for key in mine if recorded.get(key) != mine[key]
               and key not in tokenizer_specs.TRAINING_FIELDS]
  if differing:
    raise ConversionError(f"{directory}: architecture differs from the model's: "
                          + "; ".join(differing))
  _, pure = load_tokenizer_params(directory)
  state = nnx.state(model, nnx.Param)
  target = nnx.to_pure_dict(state)
  loaded = dict(_flatten(pure))
  wanted = dict(_flatten(target))
  _check_same_parameters(loaded, wanted, f"{directory}: parameters")

  def place(current, array):
    sharding = getattr(current, "sharding", None)
    if sharding is None:
      return jax.numpy.asarray(array, dtype=current.dtype)
    array = np.asarray(array, dtype=current.dtype)
    return jax.make_array_from_callback(array.shape, sharding,
                                        lambda index: array[index])

  placed = _unflatten((p, place(wanted[p], loaded[p])) for p in wanted)
  nnx.replace_by_pure_dict(state, placed)
  nnx.update(model, state)
  return model


# ----------------------------------------------------------------------------
# Command line.

def _define_flags():
  """Command-line flags; defined only when run as a program, so importing this
  module (for load_tokenizer_params) never clashes with another program's flags."""
  flags.DEFINE_enum("source", None, sorted(SOURCES),
                    "Which upstream checkpoint format --input is.")
  flags.DEFINE_string("input", None, "The .pt / .ckpt / .safetensors file.")
  flags.DEFINE_string("output", None, "Directory to write params/ and "
                      "tokenizer.json into (must not hold params/ yet).")
  flags.DEFINE_bool("use_ema", False, "Convert the checkpoint's 'ema' weights "
                    "instead of 'model'.")
  flags.mark_flags_as_required(["source", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  options = flags.FLAGS
  try:
    info = convert(options.source, options.input, options.output,
                   use_ema=options.use_ema)
  except ConversionError as error:
    logging.error("%s", error)
    raise SystemExit(f"convert_tokenizer: error: {error}") from None
  print(f"wrote {info['name']} ({info['num_params']:,} parameters) to "
        f"{options.output}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
