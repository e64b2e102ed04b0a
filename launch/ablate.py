"""The paper's ablations at small scale on Fashion-MNIST, at equal training compute.

    python launch/ablate.py --workdir=/tmp/ablate                  # every run, 3 seeds
    python launch/ablate.py --workdir=/tmp/ablate --runs=ntp,local,global --seeds=0
    python launch/ablate.py --list                                 # the runs and their overrides

Each run is the embedded default (configs/fashion_mnist.py) with the overrides
in RUNS, at the ablation scale of SCALE (fewer samples, fewer NLL batches).
Every run trains for the same number of FLOPs: `--reference_steps` steps of
the `global` run. A run's steps are that budget divided by the FLOPs of one of
its own train steps, read from XLA's cost analysis of the compiled step, so a
cheaper head trains for more steps.

Shared between runs (made on first use, reused after):
  WORKDIR/base_<tokenizer>/     the tokenizer and its token shards (pipeline stages 1-2)
  WORKDIR/classifier.npz        the in-project Fashion-MNIST classifier
Per run and seed:
  WORKDIR/runs/<run>/seed<k>/   the pipeline's outputs and result.json
Finished runs (result.json present) are skipped, so the command resumes.
At the end: WORKDIR/results.json (every run) and WORKDIR/results.md (mean +-
std over seeds of Frechet distance, class accuracy, NLL and training wall time).
"""

import json
import math
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # configs/ is not part of the installed package

# name -> (what it tests, tokenizer, config overrides). `global` is the
# embedded default's generator (the reference of the compute budget).
RUNS = {
    "ntp": ("head: plain next-token (MLP on h_t, every t)", "vq_small",
            {"model.head.kind": "ntp"}),
    "local": ("head: local (queries cross-attend to h_t, windowed self-attention)",
              "vq_small", {"model.head.kind": "local"}),
    "global": ("head: global (the default: 32 timesteps x 4 targets)", "vq_small", {}),
    "global_kl": ("tokenizer: KL latents + diffusion loss, global head", "kl_small", {}),
    "global_density1": ("density 1: only the next position per timestep", "vq_small",
                        {"model.head.density": 1}),
    "global_density16": ("density 16 targets per timestep", "vq_small",
                         {"model.head.density": 16}),
    "global_timesteps8": ("8 timesteps per image", "vq_small",
                          {"model.head.timesteps_per_image": 8}),
}

# Ablation scale: everything but the generator's step count is fixed here.
SCALE = {
    "sample.num_samples": 1000,
    "sample.batch_size": 1000,
    "eval.nll_max_batches": 5,
    "train.sample_every": 0,
    "train.eval_every": 0,
    "train.log_every": 50,
}

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "Output directory (shared, resumable).")
  flags.DEFINE_list("runs", list(RUNS), "Runs to do (names from --list).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per run.")
  flags.DEFINE_integer("reference_steps", 120,
                       "Compute budget: this many train steps of the `global` run.")
  flags.DEFINE_integer("tokenizer_steps", None,
                       "Tokenizer train steps (None: the default config's).")
  flags.DEFINE_bool("list", False, "Print the runs and exit.")


def run_config(name, seed, num_steps=None, tokenizer_steps=None):
  """The generator pipeline config of run `name` at ablation scale."""
  from configs import fashion_mnist
  _, tokenizer, overrides = RUNS[name]
  config = fashion_mnist.get_config(f"tokenizer={tokenizer}")
  config.update_from_flattened_dict({**SCALE, **overrides})
  config.seed = seed
  config.sample.seed = seed
  if tokenizer_steps:
    config.pipeline.tokenizer.train.num_steps = tokenizer_steps
  if num_steps is not None:
    config.train.num_steps = num_steps
    config.train.checkpoint_every = num_steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, num_steps // 5)
  return config


def step_flops(config):
  """FLOPs of one train step of `config` (all devices), from XLA's cost analysis."""
  import jax
  import numpy as np
  from heptapod_jax.parallel import sharding
  from heptapod_jax.train import generator
  from heptapod_jax.train import metrics as metrics_lib
  from heptapod_jax.train import step as step_lib
  from heptapod_jax.train import trainer

  mesh = sharding.make_mesh(config)
  task = generator.GeneratorTask(config)
  functions = step_lib.build(task, config, mesh, config.train.num_steps)
  side = config.data.image_size // config.tokenizer.stride
  batch_size = config.data.batch_size
  token_shape = (batch_size, side, side)
  if config.tokenizer.kind == "continuous":
    token_shape += (config.tokenizer.latent_channels,)
  batch = {"tokens": np.zeros(token_shape, np.int32 if len(token_shape) == 3 else np.float32),
           "label": np.zeros((batch_size,), np.int32)}
  with jax.set_mesh(mesh):
    compiled = functions.step.lower(functions.abstract_state,
                                    trainer._abstract_batch(batch, mesh)).compile()
  return metrics_lib.compiled_flops(compiled) * jax.device_count()


def prepare_base(workdir, tokenizer, tokenizer_steps=None):
  """Trains the tokenizer and extracts its tokens once per tokenizer kind."""
  from heptapod_jax import pipeline
  base = os.path.join(workdir, f"base_{tokenizer}")
  name = next(name for name, run in RUNS.items() if run[1] == tokenizer)
  config = run_config(name, 0, tokenizer_steps=tokenizer_steps)
  pipeline.run(config, base, stop_after="tokens")
  return base


def run_one(workdir, name, seed, num_steps, flops, tokenizer_steps=None):
  from heptapod_jax import pipeline
  run_dir = os.path.join(workdir, "runs", name, f"seed{seed}")
  result_path = os.path.join(run_dir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  config = run_config(name, seed, num_steps, tokenizer_steps)
  base = os.path.join(workdir, f"base_{config.pipeline.tokenizer.tokenizer.name}")
  os.makedirs(run_dir, exist_ok=True)
  tokens = os.path.join(run_dir, "tokens")
  if not os.path.lexists(tokens):
    os.symlink(os.path.join(base, "tokens"), tokens)
  config.tokenizer.init_from = os.path.join(base, "tokenizer_run", "tokenizer")
  config.eval.classifier_path = os.path.join(workdir, "classifier.npz")
  outcome = pipeline.run(config, run_dir)
  if outcome["reason"] != "finished":
    raise RuntimeError(f"run {name} seed {seed} stopped: {outcome['reason']}")
  metrics = outcome["metrics"]
  fashion = metrics["fashion_mnist"]
  result = {
      "run": name, "seed": seed, "train_steps": num_steps, "step_flops": flops,
      "train_flops": flops * num_steps,
      "frechet_distance": fashion["frechet_distance"],
      "class_accuracy": fashion["class_accuracy"],
      "precision": fashion["precision"], "recall": fashion["recall"],
      "nll_bits_per_token": metrics["nll"]["bits_per_token"],
      "nll_kind": metrics["nll"]["kind"],
      "train_wall_s": outcome["times"]["generator_s"],
      "num_samples": fashion["num_samples"],
  }
  with open(result_path, "w") as f:
    json.dump(result, f, indent=2)
  return result


def _mean_std(values):
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
  return mean, std


def table(results):
  """Markdown table of mean +- std over seeds, one row per run."""
  lines = ["| run | what it tests | seeds | train steps | GFLOP/step | Fréchet distance ↓ "
           "| class accuracy ↑ | NLL (bits/token) ↓ | train wall time (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name in RUNS:
    rows = [r for r in results if r["run"] == name]
    if not rows:
      continue
    cells = []
    for key, fmt in (("frechet_distance", "{:.2f} ± {:.2f}"),
                     ("class_accuracy", "{:.3f} ± {:.3f}"),
                     ("nll_bits_per_token", "{:.3f} ± {:.3f}"),
                     ("train_wall_s", "{:.0f} ± {:.0f}")):
      cells.append(fmt.format(*_mean_std([r[key] for r in rows])))
    nll_note = "" if rows[0]["nll_kind"] == "exact cross-entropy" else " (bound)"
    cells[2] += nll_note
    lines.append(f"| {name} | {RUNS[name][0]} | {','.join(str(r['seed']) for r in rows)} "
                 f"| {rows[0]['train_steps']} | {rows[0]['step_flops'] / 1e9:.1f} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.list:
    for name, (what, tokenizer, overrides) in RUNS.items():
      print(f"{name:<20} {tokenizer:<9} {what}; overrides {overrides or '{}'}")
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  unknown = [name for name in FLAGS.runs if name not in RUNS]
  if unknown:
    raise app.UsageError(f"--runs: unknown {unknown}; allowed: {', '.join(RUNS)}")
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  seeds = [int(seed) for seed in FLAGS.seeds]
  flops_of = {"global": step_flops(run_config("global", 0))}  # seed-independent
  budget = FLAGS.reference_steps * flops_of["global"]
  logging.info("[ablate] budget %.3g FLOPs = %d steps of `global`", budget,
               FLAGS.reference_steps)
  for tokenizer in sorted({RUNS[name][1] for name in FLAGS.runs}):
    prepare_base(workdir, tokenizer, FLAGS.tokenizer_steps)

  results_path = os.path.join(workdir, "results.json")
  results = []
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = [r for r in json.load(f)
                 if not (r["run"] in FLAGS.runs and r["seed"] in seeds)]
  todo = [(name, seed) for name in FLAGS.runs for seed in seeds]
  start = time.time()
  for index, (name, seed) in enumerate(todo):
    if name not in flops_of:
      flops_of[name] = step_flops(run_config(name, seed))
    flops = flops_of[name]
    num_steps = max(1, round(budget / flops))
    logging.info("[ablate] run %d/%d: %s seed %d, %d steps (%.1f GFLOP/step)%s",
                 index + 1, len(todo), name, seed, num_steps, flops / 1e9,
                 "" if index == 0 else
                 f", ETA {(time.time() - start) / index * (len(todo) - index) / 60:.0f} min")
    results.append(run_one(workdir, name, seed, num_steps, flops, FLAGS.tokenizer_steps))
    with open(results_path, "w") as f:
      json.dump(results, f, indent=2)
  markdown = table(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown + "\n")
  print(markdown)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
