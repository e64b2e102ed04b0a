"""The end-to-end job of a config with a `pipeline` section (the Fashion-MNIST default).

    WORKDIR/tokenizer_run/   1. train the tokenizer (skipped when tokenizer.init_from is set
                                or WORKDIR/tokenizer_run/tokenizer exists)
    WORKDIR/tokens/          2. encode train + test splits into token shards (finished
                                shards are skipped)
    WORKDIR/checkpoints/     3. train the generator (resumes from its checkpoints)
    WORKDIR/samples/         4. draw samples; WORKDIR/samples.png is the labelled
                                class x sample grid
    WORKDIR/metrics.json     5. evaluate
    WORKDIR/summary.txt      6. a short text summary

Every stage is skipped when its output exists, so running the same command
again resumes rather than restarts. `stage_config` fills in the paths the
stages hand to each other, so --mode=sample/eval on the same config and
workdir find them too.
"""

import json
import os
import time

import jax
import numpy as np
from absl import logging

from heptapod_jax import data
from heptapod_jax import images as images_lib


def tokenizer_dir(config, workdir):
  return config.tokenizer.init_from or os.path.join(workdir, "tokenizer_run", "tokenizer")


def stage_config(config, workdir):
  """The generator config with the pipeline's paths filled in (a copy)."""
  resolved = config.copy_and_resolve_references()
  resolved.tokenizer.init_from = tokenizer_dir(config, workdir)
  tokens = os.path.join(workdir, "tokens")
  # The token shards are named after the image dataset's splits.
  resolved.data.eval_split = data.eval_split(config.data)
  resolved.data.dataset = "cached_tokens"
  resolved.data.cached_tokens = tokens
  metadata = os.path.join(tokens, "tokens.json")
  if (config.tokenizer.kind == "continuous" and config.pipeline.normalize_latents
      and os.path.exists(metadata)):
    with open(metadata) as f:
      latent_std = json.load(f).get("latent_std")
    if latent_std:
      resolved.tokenizer.latent_scale = 1.0 / latent_std
  return resolved


def image_config(config, workdir):
  """The config for stages that read images (extraction)."""
  resolved = config.copy_and_resolve_references()
  resolved.tokenizer.init_from = tokenizer_dir(config, workdir)
  return resolved


def _class_grid(config, workdir, images, labels, per_class):
  """samples.png: one labelled row per class, `per_class` samples each."""
  num_classes = config.model.num_classes
  rows = []
  for label in range(num_classes):
    chosen = images[labels == label][:per_class]
    if len(chosen) < per_class:
      chosen = np.concatenate([chosen, np.full((per_class - len(chosen),) + images.shape[1:],
                                                255, np.uint8)])
    rows.append(chosen)
  names = config.pipeline.class_names or [str(i) for i in range(num_classes)]
  picture = images_lib.grid(np.concatenate(rows), columns=per_class,
                            row_labels=list(names), label_width=72)
  path = os.path.join(workdir, "samples.png")
  images_lib.save_png(picture, path)
  return path


def run(config, workdir, stop_after=None):
  """Runs the stages in order; stop_after="tokens" ends after extraction."""
  from heptapod_jax import extract
  from heptapod_jax.eval import evaluate
  from heptapod_jax.sample import generate
  from heptapod_jax.train import generator
  from heptapod_jax.train import tokenizer as tokenizer_training

  start = time.time()
  times = {}
  os.makedirs(workdir, exist_ok=True)

  # 1. Tokenizer.
  stage = time.time()
  if not os.path.exists(os.path.join(tokenizer_dir(config, workdir), "tokenizer.json")):
    logging.info("[pipeline] 1/5 training the %s tokenizer", config.tokenizer.name)
    tokenizer_config = config.pipeline.tokenizer
    result = tokenizer_training.run(tokenizer_config, os.path.join(workdir, "tokenizer_run"))
    if result["reason"] != "finished":
      return result
  else:
    logging.info("[pipeline] 1/5 tokenizer: using %s", tokenizer_dir(config, workdir))
  times["tokenizer_s"] = time.time() - stage

  # 2. Tokens.
  stage = time.time()
  logging.info("[pipeline] 2/5 extracting tokens")
  extract.run(image_config(config, workdir), workdir)
  times["extract_s"] = time.time() - stage
  if stop_after == "tokens":
    return {"reason": "finished", "times": times}

  # 3. Generator.
  stage = time.time()
  generator_config = stage_config(config, workdir)
  logging.info("[pipeline] 3/5 training the generator (%d steps)",
               generator_config.train.num_steps)
  result = generator.run(generator_config, workdir)
  if result["reason"] != "finished":
    return result
  times["generator_s"] = time.time() - stage

  # 4. Samples (redrawn when the generator moved on since the last draw).
  stage = time.time()
  samples_info = os.path.join(workdir, "samples", "samples.json")
  fresh = (os.path.exists(samples_info)
           and json.load(open(samples_info)).get("checkpoint_step") == result["step"]
           and os.path.exists(os.path.join(workdir, "samples.png")))
  if not fresh:
    logging.info("[pipeline] 4/5 sampling %d images", generator_config.sample.num_samples)
    images, labels, _ = generate.run(generator_config, workdir)
    _class_grid(generator_config, workdir, images, labels,
                config.pipeline.grid_samples_per_class)
  times["sample_s"] = time.time() - stage

  # 5. Evaluation.
  stage = time.time()
  logging.info("[pipeline] 5/5 evaluating")
  metrics = evaluate.run(generator_config, workdir)
  times["eval_s"] = time.time() - stage
  times["total_s"] = time.time() - start
  if jax.process_index() == 0:
    _write_summary(config, workdir, metrics, times)
  return {"reason": "finished", "metrics": metrics, "times": times}


def _write_summary(config, workdir, metrics, times):
  lines = [f"heptapod_jax end-to-end run in {workdir}",
           f"  tokenizer {config.tokenizer.name}, generator {config.model.variant}, "
           f"head {config.model.head.kind}"]
  tokenizer_metrics = os.path.join(workdir, "tokenizer_run", "tokenizer_metrics.json")
  if os.path.exists(tokenizer_metrics):
    with open(tokenizer_metrics) as f:
      tok = json.load(f)
    usage = f", codebook usage {tok['codebook_usage']:.2f}" if "codebook_usage" in tok else ""
    lines.append(f"  tokenizer test PSNR {tok['psnr']:.2f} dB{usage}")
  fashion = metrics.get("fashion_mnist")
  if fashion:
    lines.append(f"  samples: class accuracy {fashion['class_accuracy']:.3f}, "
                 f"Fréchet distance {fashion['frechet_distance']:.3f} "
                 f"({fashion['frechet_distance_ratio']:.1f}x train-vs-test "
                 f"{fashion['train_vs_test_frechet_distance']:.3f}; real images at "
                 f"{fashion['num_samples']} samples: "
                 f"{fashion['real_frechet_distance_at_num_samples']:.3f}), "
                 f"precision {fashion['precision']:.3f}, recall {fashion['recall']:.3f}")
  nll = metrics.get("nll")
  if nll:
    lines.append(f"  test NLL {nll['bits_per_token']:.4f} bits/token ({nll['kind']})")
  lines.append("  wall time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items()))
  lines.append(f"  outputs: samples.png, metrics.json, tensorboard logs in {workdir}")
  text = "\n".join(lines)
  with open(os.path.join(workdir, "summary.txt"), "w") as f:
    f.write(text + "\n")
  print(text)
