"""The KV-cached sampler and the sampling strategies.

Greedy sampling follows the uncached model's argmax path; a seed gives the same
samples on any mesh and batch size; sampling parameters never recompile;
top-k/top-p/temperature draw from the right distributions; CFG at scale 1 is
no CFG.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import micro_config
from heptapod_jax.models import heptapod
from heptapod_jax.sample import sampler as sampler_lib
from heptapod_jax.sample import strategies

NUM_POSITIONS = 16  # micro_config: 4x4 grid


def _model(tokenizer):
  config = micro_config(tokenizer)  # global head, density 6 < remaining: random queries
  config.model.diffusion.num_sampling_steps = 8
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(0))
  if tokenizer == "kl_small":
    # ε output and adaLN modulations start at zero (MAR); give them values so
    # that samples depend on the condition.
    for index, layer in enumerate((model.output.output, model.output.final_modulation)):
      layer.kernel[...] = 0.05 * jax.random.normal(jax.random.key(index), layer.kernel.shape)
  model.eval()
  return model


def _mesh(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return jax.make_mesh(shape, sampler_lib.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


# One sampler per token kind on a 1-device mesh; its batch-4 program is shared
# by the tests below (each program compiles once).
BATCH = 4


@pytest.fixture(scope="module")
def discrete_sampler():
  return sampler_lib.Sampler(_model("vq_small"), mesh=_mesh((1, 1, 1)))


@pytest.fixture(scope="module")
def continuous_sampler():
  return sampler_lib.Sampler(_model("kl_small"), mesh=_mesh((1, 1, 1)))


def _sample(sampler, labels, seed=0, guidance=None, **params):
  return np.asarray(sampler.sample(labels, strategies.SamplingParams.create(**params),
                                   seed=seed, guidance=guidance))


# ------------------------------------------------------------------ sampler

def test_greedy_sampling_follows_the_uncached_argmax_path(discrete_sampler):
  labels = np.array([0, 3, 9, 3], np.int32)
  seed = 4
  sampled = _sample(discrete_sampler, labels, seed=seed, temperature=0.0)
  assert sampled.shape == (BATCH, 4, 4) and sampled.dtype == np.int32
  sampled = sampled.reshape(BATCH, NUM_POSITIONS)

  graphdef, state = discrete_sampler.graphdef, discrete_sampler.state

  @jax.jit
  def full_forward_logits(state, label, tokens, t, query_key):
    """Uncached: the whole backbone on [cls, x_1..x_{N-1}], head at t."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model.next_position_distribution(label, tokens, t, query_key).logits[0]

  for b, label in enumerate(labels):
    # The same per-example, per-step query key as the sampler.
    example_key = sampler_lib.example_keys(jax.random.key(seed), jnp.array([b]))[0]
    tokens = np.zeros((1, NUM_POSITIONS), np.int32)
    for t in range(NUM_POSITIONS):
      query_key, _ = sampler_lib.step_keys(example_key, t)
      logits = full_forward_logits(state, jnp.array([label]), jnp.asarray(tokens),
                                   jnp.int32(t), query_key)
      tokens[0, t] = int(jnp.argmax(logits))
    np.testing.assert_array_equal(sampled[b], tokens[0], err_msg=f"example {b}")
  assert len(np.unique(sampled)) > 8  # not a degenerate constant path
  # Examples 1 and 3 share the label but not the query keys (density 6 < 16).
  assert (sampled[1] != sampled[3]).any()


def test_sampling_parameters_never_recompile(discrete_sampler):
  labels = np.arange(BATCH, dtype=np.int32)
  greedy = _sample(discrete_sampler, labels, temperature=0.0)
  program = discrete_sampler.program(False)
  compiled = program._cache_size()
  settings = [
      dict(temperature=1.0),
      dict(temperature=0.7, top_k=5),
      dict(temperature=1.3, top_p=0.9),
      dict(temperature=1.0, top_k=1),
      dict(temperature=1.0, top_p=1e-6),
      dict(temperature=1.0, greedy=True),
  ]
  results = [_sample(discrete_sampler, labels, **setting) for setting in settings]
  assert program._cache_size() == compiled
  # The values reached the program: sampling differs from greedy...
  assert (results[0] != greedy).mean() > 0.5
  assert (results[1] != results[0]).any() and (results[2] != results[0]).any()
  # ...and top-k = 1, a tiny top-p and the greedy flag are greedy.
  for result in results[3:]:
    np.testing.assert_array_equal(result, greedy)


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_fixed_seed_gives_same_samples_on_any_mesh_and_batch_size(
    kind, discrete_sampler, continuous_sampler):
  one_device = discrete_sampler if kind == "discrete" else continuous_sampler
  labels = sampler_lib.class_balanced_labels(8, 10)
  params = strategies.SamplingParams.create(temperature=1.0, top_k=50)
  # Two batches of 4 on one device vs one batch of 8 over 8 devices.
  in_halves = np.concatenate([batch.tokens for batch in one_device.batches(
      labels, params, seed=7, batch_size=BATCH)])
  model = nnx.merge(one_device.graphdef, one_device.state)
  decode_fn = jax.jit(lambda tokens: tokens * 2 + 1)  # stands in for a tokenizer
  eight_devices = sampler_lib.Sampler(model, mesh=_mesh((8, 1, 1)), decode_fn=decode_fn)
  assert len(eight_devices.sample(labels, params, seed=7).sharding.device_set) == 8
  (batch,) = eight_devices.batches(labels, params, seed=7, batch_size=8)
  assert batch.first_index == 0 and batch.images_per_second > 0
  np.testing.assert_array_equal(batch.labels, labels)
  np.testing.assert_array_equal(batch.images, batch.tokens * 2 + 1)
  sharded = batch.tokens
  channels = () if kind == "discrete" else (model.token_dim,)
  assert sharded.shape == (8, 4, 4) + channels
  if kind == "discrete":
    np.testing.assert_array_equal(in_halves, sharded)
  else:
    assert np.isfinite(sharded).all()
    np.testing.assert_allclose(in_halves, sharded, rtol=1e-4, atol=1e-3)
  # Another seed gives other samples.
  other = np.asarray(eight_devices.sample(labels, params, seed=8))
  assert np.abs(other - sharded).max() > 0


def test_continuous_samples_and_cfg_scale_one_is_no_cfg(continuous_sampler):
  labels = np.array([1, 2, 5, 5], np.int32)
  plain = _sample(continuous_sampler, labels)
  assert plain.shape == (BATCH, 4, 4, 4) and plain.dtype == np.float32  # 4 latent channels
  assert np.isfinite(plain).all() and plain.std() > 0
  scale_one = _sample(continuous_sampler, labels, guidance=True, cfg_scale=1.0)
  np.testing.assert_allclose(scale_one, plain, rtol=1e-4, atol=1e-3)
  scale_three = _sample(continuous_sampler, labels, guidance=True, cfg_scale=3.0)
  assert np.isfinite(scale_three).all()
  assert np.abs(scale_three - plain).max() > 1e-2 * np.abs(plain).max()
  # Another diffusion temperature: other samples from the same program.
  colder = _sample(continuous_sampler, labels, guidance=True, cfg_scale=1.0,
                   diffusion_temperature=0.5)
  assert continuous_sampler.program(True)._cache_size() == 1
  assert np.abs(colder - scale_one).max() > 0


def test_discrete_cfg_scale_one_is_no_cfg(discrete_sampler):
  labels = np.array([2, 7, 7, 0], np.int32)
  plain = _sample(discrete_sampler, labels, temperature=1.0)
  guided = _sample(discrete_sampler, labels, guidance=True, temperature=1.0, cfg_scale=1.0)
  np.testing.assert_array_equal(guided, plain)
  strong = _sample(discrete_sampler, labels, temperature=0.0, cfg_scale=4.0)
  greedy = _sample(discrete_sampler, labels, temperature=0.0)
  assert (strong != greedy).any()


def test_cfg_needs_a_null_class():
  config = micro_config()
  config.model.null_class = False
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(0))
  sampler = sampler_lib.Sampler(model)
  with pytest.raises(ValueError, match="null_class"):
    sampler.sample([0, 1], strategies.SamplingParams.create(cfg_scale=2.0))


def test_labels_and_config():
  np.testing.assert_array_equal(sampler_lib.class_balanced_labels(7, 3),
                                [0, 1, 2, 0, 1, 2, 0])
  config = sampler_lib.default_sample_config()
  config.num_samples = 5
  np.testing.assert_array_equal(sampler_lib.labels_from_config(config, 10),
                                [0, 1, 2, 3, 4])
  config.classes = "3,7"
  np.testing.assert_array_equal(sampler_lib.labels_from_config(config, 10),
                                [3, 7, 3, 7, 3])
  config.classes = "3,12"
  with pytest.raises(ValueError, match="sample.classes"):
    sampler_lib.labels_from_config(config, 10)
  params = sampler_lib.sampling_params_from_config(config, default_diffusion_temperature=0.9)
  assert float(params.diffusion_temperature) == pytest.approx(0.9)
  assert int(params.top_k) == 0 and float(params.top_p) == 1.0
  assert not sampler_lib.guidance_enabled(params.cfg_scale)
  assert not sampler_lib.guidance_enabled(0.0) and sampler_lib.guidance_enabled(1.5)


# --------------------------------------------------------------- strategies

# One program for every parameter setting (the parameters are traced).
_DRAW_MANY = jax.jit(jax.vmap(strategies.sample_codes, in_axes=(0, None, None)))


def _frequencies(logits, params, draws=40_000):
  keys = jax.random.split(jax.random.key(0), draws)
  codes = _DRAW_MANY(keys, logits, params)
  return np.bincount(np.asarray(codes), minlength=logits.shape[-1]) / draws


LOGITS = jnp.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])


@pytest.mark.parametrize("temperature, top_k, top_p, allowed", [
    (1.0, 0, 1.0, [0, 1, 2, 3, 4, 5]),
    (0.6, 0, 1.0, [0, 1, 2, 3, 4, 5]),
    (2.0, 0, 1.0, [0, 1, 2, 3, 4, 5]),
    (1.0, 3, 1.0, [3, 0, 1]),
    # softmax(LOGITS) sorted: 0.56 (3), 0.21 (0), 0.09 (1), 0.08 (4), ...:
    # the mass before code 1 is 0.77 < 0.8, before code 4 it is 0.86.
    (1.0, 0, 0.8, [3, 0, 1]),
    (1.0, 0, 0.75, [3, 0]),
    (0.8, 4, 0.7, [3, 0]),
])
def test_draws_match_the_filtered_softmax(temperature, top_k, top_p, allowed):
  params = strategies.SamplingParams.create(temperature=temperature, top_k=top_k,
                                            top_p=top_p)
  expected = np.zeros(LOGITS.shape[0])
  kept = np.asarray(LOGITS)[allowed] / temperature
  expected[allowed] = np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum()
  frequencies = _frequencies(LOGITS, params)
  # 40k draws: standard error <= 0.0025.
  np.testing.assert_allclose(frequencies, expected, atol=0.01)
  assert (frequencies[np.setdiff1d(np.arange(6), allowed)] == 0).all()


def test_top_k_one_tiny_top_p_and_zero_temperature_are_greedy():
  logits = jax.random.normal(jax.random.key(1), (256, 50)) * 3
  keys = jax.random.split(jax.random.key(2), 256)
  draw = jax.jit(jax.vmap(strategies.sample_codes, in_axes=(0, 0, None)))
  argmax = np.argmax(np.asarray(logits), axis=-1)
  for setting in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0),
                  dict(temperature=2.0, greedy=True)):
    codes = draw(keys, logits, strategies.SamplingParams.create(**setting))
    np.testing.assert_array_equal(codes, argmax, err_msg=str(setting))
  sampled = draw(keys, logits, strategies.SamplingParams.create(temperature=1.0))
  assert (np.asarray(sampled) != argmax).any()


def test_filter_logits_keeps_top_k_and_nucleus():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
  filter_logits = jax.jit(strategies.filter_logits)
  kept = lambda k, p: np.isfinite(np.asarray(
      filter_logits(logits, jnp.float32(1.0), jnp.int32(k), jnp.float32(p))))
  np.testing.assert_array_equal(kept(2, 1.0), [[0, 1, 0, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(kept(0, 1.0), np.ones((2, 4), bool))
  np.testing.assert_array_equal(kept(10, 1.0), np.ones((2, 4), bool))
  np.testing.assert_array_equal(kept(0, 1e-3), [[0, 1, 0, 0], [1, 0, 0, 0]])
  # softmax([3, 2, 1, 0]) = 0.64, 0.24, 0.09, 0.03: p = 0.8 keeps two codes.
  np.testing.assert_array_equal(kept(0, 0.8), [[0, 1, 0, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(kept(3, 0.95), [[0, 1, 1, 1], [1, 1, 1, 0]])
