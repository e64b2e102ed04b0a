"""Sampling throughput: the KV-cached sampler vs a naive full-forward loop.

    python benchmarks/sampling.py --output=/tmp/sampling.json
    python benchmarks/sampling.py --config=configs/b256.py:tokenizer=vq16,runlocal \
        --batch_size=1 --steps=8 --output=/tmp/sampling_b.json

For each --config (default: Fashion-MNIST micro, 8x8 grid) it builds a
random-init model and times two jitted programs that draw the first `--steps`
grid positions (default: all N) of `--batch_size` images:
- cached: `heptapod_jax.sample.make_sample_fn` (class-token prefill, one
  `backbone.decode` of one token per step);
- naive: a `lax.fori_loop` that re-runs the full backbone over
  [cls, x_1..x_{N-1}] every step (`Heptapod.next_position_distribution`).
Both programs cost the same at every step (static shapes), so images/s over
all N steps is extrapolated from the timed steps: batch / (step_time * N).
Compilation is timed separately. Results are written as JSON to --output.
"""

import importlib.util
import json
import os
import pathlib
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from heptapod_jax.models import heptapod
from heptapod_jax.sample import sampler as sampler_lib
from heptapod_jax.sample import strategies

REPO = pathlib.Path(__file__).resolve().parent.parent

_CONFIGS = flags.DEFINE_multi_string(
    "config", ["configs/fashion_mnist.py:variant=micro"],
    "Config file[:args], as for --config of heptapod_jax.main; repeatable.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per program call.")
_STEPS = flags.DEFINE_integer("steps", 0, "Grid steps timed per call; 0 = all N.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per program (best is kept).")
_SKIP_NAIVE = flags.DEFINE_bool("skip_naive", False, "Time only the cached sampler.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON results.",
                              required=True)


def load_config(spec):
  """'configs/x.py:args' -> get_config(args), as --config loads it."""
  path, _, arg = spec.partition(":")
  path = pathlib.Path(path)
  if not path.is_absolute():
    path = REPO / path
  module_spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def make_naive_sample_fn(graphdef, num_steps):
  """Jitted (state, labels [B], rng, params) -> tokens [B, N(, C)], no KV cache."""

  def sample_fn(state, labels, rng, params):
    model = nnx.merge(graphdef, state)
    model.eval()
    batch = labels.shape[0]
    discrete = model.token_kind == "discrete"
    token_shape = () if discrete else (model.token_dim,)
    tokens = jnp.zeros((batch, model.num_positions) + token_shape,
                       jnp.int32 if discrete else jnp.float32)

    def step(t, tokens):
      query_key, draw_key = jax.random.split(jax.random.fold_in(rng, t))
      dist = model.next_position_distribution(labels, tokens, t, query_key)
      if discrete:
        keys = jax.random.split(draw_key, batch)
        token = jax.vmap(strategies.sample_codes, in_axes=(0, 0, None))(
            keys, dist.logits, params)
      else:
        token = model.sample_latents(dist.condition, draw_key,
                                     params.diffusion_temperature)
      return jax.lax.dynamic_update_slice_in_dim(
          tokens, token[:, None].astype(tokens.dtype), t, axis=1)

    return jax.lax.fori_loop(0, num_steps, step, tokens)

  return jax.jit(sample_fn)


def time_program(call, repeats):
  """(compile-and-first-call seconds, best call seconds)."""
  start = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    best = min(best, time.perf_counter() - start)
  return first, best


def benchmark(spec, batch_size, steps, repeats, skip_naive):
  config = load_config(spec)
  start = time.perf_counter()
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(0))
  model.eval()
  init_seconds = time.perf_counter() - start
  graphdef, state = nnx.split(model)
  positions = model.num_positions
  steps = steps or positions
  labels = jnp.asarray(sampler_lib.class_balanced_labels(batch_size, config.model.num_classes))
  index = jnp.arange(batch_size, dtype=jnp.int32)
  rng = jax.random.key(0)
  params = strategies.SamplingParams.create(temperature=1.0)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  result = dict(
      config=spec, variant=config.model.variant, tokenizer=config.tokenizer.name,
      token_kind=model.token_kind, grid=list(model.grid), num_positions=positions,
      head=config.model.head.kind, head_density=config.model.head.density,
      parameters=int(num_params), batch_size=batch_size, steps_timed=steps,
      model_init_seconds=round(init_seconds, 2))

  def record(name, first, best):
    step_seconds = best / steps
    result[name] = dict(
        compile_and_first_call_seconds=round(first, 3),
        best_call_seconds=round(best, 4),
        step_milliseconds=round(1e3 * step_seconds, 3),
        images_per_second=batch_size / (step_seconds * positions))
    print(f"{spec} {name}: {result[name]}", flush=True)

  cached = sampler_lib.make_sample_fn(graphdef, num_steps=steps)
  record("cached", *time_program(lambda: cached(state, labels, index, rng, params),
                                 repeats))
  if not skip_naive:
    naive = make_naive_sample_fn(graphdef, steps)
    record("naive", *time_program(lambda: naive(state, labels, rng, params), repeats))
    result["speedup"] = (result["cached"]["images_per_second"]
                         / result["naive"]["images_per_second"])
  return result


def main(argv):
  del argv
  results = [benchmark(spec, _BATCH_SIZE.value, _STEPS.value, _REPEATS.value,
                       _SKIP_NAIVE.value) for spec in _CONFIGS.value]
  report = dict(
      benchmark="sampling", jax=jax.__version__, backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()], machine=platform.machine(),
      cpu_count=os.cpu_count(), load_average=list(os.getloadavg()),
      results=results)
  directory = os.path.dirname(_OUTPUT.value)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
