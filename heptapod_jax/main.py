"""Entry point: python -m heptapod_jax.main --config=configs/b256.py --workdir=DIR --mode=MODE.

Modes: summary (abstract model build + parameter table), and train, sample,
eval, extract, export as their parts land. The config is validated once, here,
before any work starts.
"""

import json
import logging as python_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from heptapod_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':args'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.")
_MODE = flags.DEFINE_enum("mode", "train", config_lib.MODES, "What to run.")

# Modes whose implementation has not landed yet, and the work that brings them.
_NOT_YET_AVAILABLE = {
    "export": "the export work (safetensors export)",
}
_MODES_BY_TASK = {
    "generator": ("train", "extract", "sample", "eval", "summary"),
    "tokenizer": ("train", "summary"),
}


def _fail(message):
  """Exits non-zero with a one-line error on stderr."""
  print(f"heptapod_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def run_summary(config, workdir):
  """Builds the model abstractly and writes WORKDIR/summary.json."""
  # Imported here so that `--help` and config errors stay fast.
  import jax
  from flax import nnx
  from heptapod_jax.models import heptapod

  if config.task == "tokenizer":
    return _tokenizer_summary(config, workdir)
  abstract_model = nnx.eval_shape(lambda: heptapod.Heptapod(config, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract_model, nnx.Param)
  counts = heptapod.component_parameter_counts(params)
  rows = []
  for component in ("backbone", "head", "output"):
    for name, sub in sorted(params[component].items()):
      size = sum(leaf.size for leaf in jax.tree.leaves(sub))
      rows.append((f"{component}.{name}", size))
    rows.append((component, counts[component]))
  rows.append(("total", counts["total"]))
  grid = config_lib.grid_shape(config)
  width = max(len(name) for name, _ in rows)
  lines = [f"Heptapod-{config.model.variant}  tokenizer={config.tokenizer.name} "
           f"({config.tokenizer.kind})  grid={grid[0]}x{grid[1]}  "
           f"head={config.model.head.kind}",
           f"{'component':<{width}}  {'parameters':>15}"]
  for name, size in rows:
    if "." not in name:
      lines.append("-" * (width + 17))
    lines.append(f"{name:<{width}}  {size:>15,}")
  print("\n".join(lines))
  summary = {
      "params": counts,
      "variant": config.model.variant,
      "tokenizer": config.tokenizer.name,
      "grid": list(grid),
      "head_kind": config.model.head.kind,
      "components": {name: size for name, size in rows if "." in name},
  }
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "summary.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  logging.info("Wrote %s", path)
  return summary


def _tokenizer_summary(config, workdir):
  import jax
  from flax import nnx
  from heptapod_jax.train import tokenizer as tokenizer_lib

  abstract = nnx.eval_shape(
      lambda: tokenizer_lib.build_tokenizer(config.tokenizer, nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  rows = [(name, sum(leaf.size for leaf in jax.tree.leaves(sub)))
          for name, sub in sorted(params.items())]
  total = sum(size for _, size in rows)
  for name, size in rows + [("total", total)]:
    print(f"{name:<24} {size:>15,}")
  summary = {"params": {"tokenizer": total, "total": total},
             "tokenizer": config.tokenizer.name,
             "components": dict(rows)}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv):
  # jax logs a failed TPU probe at INFO on every CPU/GPU host; keep stderr for errors.
  python_logging.getLogger("jax._src.xla_bridge").setLevel(python_logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/fashion_mnist.py")
  from heptapod_jax.parallel import distributed
  distributed.maybe_initialize()  # before anything else touches jax devices
  import jax
  try:
    config_lib.validate_any(config, num_devices=jax.device_count())
  except config_lib.ConfigError as error:
    _fail(f"invalid config: {error}")
  mode = _MODE.value
  task = config.get("task", "generator")
  if mode in _NOT_YET_AVAILABLE:
    _fail(f"--mode={mode} is not available yet; it comes with "
          f"{_NOT_YET_AVAILABLE[mode]}. Available now: "
          f"{', '.join(_MODES_BY_TASK[task])}")
  if mode not in _MODES_BY_TASK[task]:
    _fail(f"--mode={mode} does not apply to a {task} config; use one of "
          f"{', '.join(_MODES_BY_TASK[task])}")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  workdir = _WORKDIR.value
  if config.get("pipeline") is not None and mode in ("sample", "eval", "extract"):
    # The stages of a pipeline config hand each other paths under WORKDIR.
    from heptapod_jax import pipeline
    config = (pipeline.stage_config(config, workdir) if mode != "extract"
              else pipeline.image_config(config, workdir))
  try:
    if mode == "summary":
      run_summary(config, workdir)
    elif mode == "sample":
      from heptapod_jax.sample import generate
      generate.run(config, workdir)
    elif mode == "eval":
      from heptapod_jax.eval import evaluate
      evaluate.run(config, workdir)
    elif mode == "extract":
      from heptapod_jax import extract
      extract.run(config, workdir)
    elif task == "tokenizer":
      from heptapod_jax.train import tokenizer as tokenizer_lib
      tokenizer_lib.run(config, workdir)
    elif config.get("pipeline") is not None:
      from heptapod_jax import pipeline
      pipeline.run(config, workdir)
    else:
      from heptapod_jax.train import generator
      generator.run(config, workdir)
  except (config_lib.ConfigError, FileNotFoundError) as error:
    _fail(str(error))


if __name__ == "__main__":
  app.run(main)
