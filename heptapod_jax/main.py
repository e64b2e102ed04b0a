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
    "train": "the training issue (Grain pipelines, sharded train step, Orbax checkpoints)",
    "sample": "the sampling and evaluation issue (KV-cached on-device sampler)",
    "eval": "the sampling and evaluation issue (FID/IS and Fashion-MNIST metrics)",
    "extract": "the tokenizer issue (token extraction to ArrayRecord)",
    "export": "the export work (safetensors export)",
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


def main(argv):
  # jax logs a failed TPU probe at INFO on every CPU/GPU host; keep stderr for errors.
  python_logging.getLogger("jax._src.xla_bridge").setLevel(python_logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/fashion_mnist.py")
  import jax
  try:
    config_lib.validate(config, num_devices=jax.device_count())
  except config_lib.ConfigError as error:
    _fail(f"invalid config: {error}")
  mode = _MODE.value
  if mode in _NOT_YET_AVAILABLE:
    _fail(f"--mode={mode} is not available yet; it comes with "
          f"{_NOT_YET_AVAILABLE[mode]}. Available now: --mode=summary")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  if mode == "summary":
    run_summary(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
