"""Model invariants: causality, KV cache, loss targets, ntp, chunked CE, diffusion."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import micro_config
from heptapod_jax.models import diffusion
from heptapod_jax.models import heads
from heptapod_jax.models import heptapod
from heptapod_jax.models import losses

BATCH = 3
NUM_POSITIONS = 16  # micro_config: 16x16 images, stride 4 -> 4x4 grid


def _tokens(config, seed=0):
  key = jax.random.key(seed)
  if config.tokenizer.kind == "discrete":
    return jax.random.randint(key, (BATCH, NUM_POSITIONS), 0,
                              config.tokenizer.codebook_size)
  return jax.random.normal(key, (BATCH, NUM_POSITIONS, config.tokenizer.latent_channels))


LABELS = jnp.array([0, 3, 9])


@pytest.fixture(scope="module", params=["vq_small", "kl_small"])
def model_and_config(request):
  config = micro_config(request.param)
  config.model.backbone.qk_norm = True
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(0))
  model.eval()
  return model, config


def test_every_parameter_has_logical_axis_names(model_and_config):
  model, _ = model_and_config
  variables = jax.tree.leaves(nnx.state(model, nnx.Param),
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(variables) > 20
  for variable in variables:
    names = variable.get_metadata().get("out_sharding")
    assert names is not None and len(names) == variable[...].ndim, variable


def test_backbone_is_causal(model_and_config):
  model, config = model_and_config
  tokens = _tokens(config)
  other = _tokens(config, seed=1)
  t = 6
  # Tokens at grid positions >= t are x_{t+1}..x_N: h_0..h_t must not see them.
  changed = tokens.at[:, t:].set(other[:, t:])
  h = model.backbone(LABELS, tokens[:, :-1])
  h_changed = model.backbone(LABELS, changed[:, :-1])
  np.testing.assert_allclose(h[:, :t + 1], h_changed[:, :t + 1], atol=1e-6)
  assert np.abs(np.asarray(h[:, t + 1:] - h_changed[:, t + 1:])).max() > 1e-3
  # The class label reaches every position.
  h_label = model.backbone(LABELS + 1, tokens[:, :-1])
  assert np.abs(np.asarray(h_label - h)).min(axis=-1).max() > 0


def test_kv_cache_decode_equals_full_forward(model_and_config):
  model, config = model_and_config
  tokens = _tokens(config)
  full = model.backbone(LABELS, tokens[:, :-1])  # [batch, N, width]
  backbone = model.backbone
  cache = backbone.init_cache(BATCH)
  # Prefill the class token and the first 4 tokens at once, then one at a time.
  prefill = backbone.embed(LABELS, tokens[:, :4])
  h, cache = backbone.decode(prefill, cache, 0)
  outputs = [h]
  for index in range(5, NUM_POSITIONS):
    h, cache = backbone.decode(backbone.embed_tokens(tokens[:, index - 1:index]),
                               cache, jnp.int32(index))
    outputs.append(h)
  cached = jnp.concatenate(outputs, axis=1)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


def test_next_position_distribution_uses_cached_state(model_and_config):
  model, config = model_and_config
  tokens = _tokens(config)
  t, rng = 7, jax.random.key(5)
  full = model.next_position_distribution(LABELS, tokens, t, rng)
  backbone = model.backbone
  h, _ = backbone.decode(backbone.embed(LABELS, tokens[:, :t]), backbone.init_cache(BATCH), 0)
  cached = model.distribution_from_hidden(h[:, t], jnp.full((BATCH,), t), rng)
  if config.tokenizer.kind == "discrete":
    assert full.logits.shape == (BATCH, config.tokenizer.codebook_size)
    np.testing.assert_allclose(full.logits, cached.logits, atol=2e-5)
  else:
    assert full.condition.shape == (BATCH, config.model.head.width)
    np.testing.assert_allclose(full.condition, cached.condition, atol=2e-5)
    latents = model.sample_latents(full.condition, rng, 1.0)
    assert latents.shape == (BATCH, config.tokenizer.latent_channels)


@pytest.mark.parametrize("kind, queries, window, density", [
    ("global", "remaining", None, 6),
    ("global", "remaining", None, None),
    ("global", "grid", 5, 3),
    ("local", "remaining", 4, 4),
    ("ntp", "remaining", None, None),
])
def test_target_selection_reads_only_remaining_positions(kind, queries, window, density):
  config = micro_config(kind=kind, queries=queries, window=window, density=density)
  head_config = config.model.head
  timesteps = jnp.tile(jnp.arange(NUM_POSITIONS)[None], (BATCH, 1))
  selected = heads.select_queries(jax.random.key(0), timesteps, head_config,
                                  NUM_POSITIONS)
  positions = np.asarray(selected.target_positions())
  valid = np.asarray(selected.target_valid)
  t = np.asarray(timesteps)[..., None]
  window_size = window or NUM_POSITIONS
  count = 1 if kind == "ntp" else (density or window_size)
  assert positions.shape == (BATCH, NUM_POSITIONS, count)
  # Slot 0 is always position t (token x_{t+1}), and valid.
  assert (positions[..., 0] == t[..., 0]).all() and valid[..., 0].all()
  # Every target lies in t .. t+window-1; padding slots point at t.
  assert (positions >= t).all() and (positions < t + window_size).all()
  assert (positions[~valid] == np.broadcast_to(t, positions.shape)[~valid]).all()
  # As many distinct targets as the window allows.
  available = np.minimum(window_size, NUM_POSITIONS - t[..., 0])
  np.testing.assert_array_equal(valid.sum(-1), np.minimum(count, available))
  for b in range(BATCH):
    for step in range(NUM_POSITIONS):
      chosen = positions[b, step][valid[b, step]]
      assert len(set(chosen.tolist())) == len(chosen)
  if queries == "grid":
    assert selected.positions.shape[-1] == NUM_POSITIONS


@pytest.mark.parametrize("kind", ["global", "local"])
def test_2d_loss_reads_exactly_the_selected_targets(kind):
  config = micro_config(kind=kind)
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(1))
  tokens = _tokens(config)
  rng = jax.random.key(3)
  loss, metrics = model.loss(LABELS, tokens, rng, train=False)
  # Recompute with the same random choices and a naive cross-entropy.
  _, time_rng, query_rng, _ = jax.random.split(rng, 4)
  timesteps = model.sample_timesteps(time_rng, BATCH)
  assert timesteps.shape == (BATCH, config.model.head.timesteps_per_image)
  hidden = model.backbone(LABELS, tokens[:, :-1])
  h_t = jnp.take_along_axis(hidden, timesteps[..., None], axis=1)
  selected = heads.select_queries(query_rng, timesteps, model.head_config, NUM_POSITIONS)
  z = model.head(h_t, timesteps, selected)
  positions = selected.target_positions()
  assert (positions >= timesteps[..., None]).all()
  assert (positions[..., 0] == timesteps).all()
  logits = model.output(z)  # [batch, T, K, vocab]
  targets = jnp.take_along_axis(tokens[:, None, :], positions, axis=-1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  weights = selected.target_valid
  expected = jnp.sum(ce * weights) / jnp.sum(weights)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["next_token_loss"], ce[..., 0].mean(), rtol=1e-5)
  assert metrics["num_targets"] == weights.sum()


def test_ntp_equals_standard_next_token_cross_entropy():
  config = micro_config(kind="ntp")
  config.model.head.loss_chunk_size = 7  # exercise chunking with padding
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(2))
  tokens = _tokens(config)
  loss, _ = model.loss(LABELS, tokens, jax.random.key(0), train=False)
  hidden = model.backbone(LABELS, tokens[:, :-1])  # h_0..h_{N-1}
  logits = model.output(model.head(hidden, None, None)[:, :, 0])
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_label_dropout_uses_null_class():
  config = micro_config()
  config.model.label_dropout = 0.5
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(0))
  labels = jnp.zeros((1000,), jnp.int32)
  dropped = model.drop_labels(jax.random.key(0), labels)
  null = config.model.num_classes
  assert set(np.unique(dropped).tolist()) == {0, null}
  assert 0.45 < float(jnp.mean(dropped == null)) < 0.55


def test_chunked_cross_entropy_equals_naive_values_and_gradients():
  keys = jax.random.split(jax.random.key(0), 4)
  features = jax.random.normal(keys[0], (1000, 24))
  kernel = jax.random.normal(keys[1], (24, 300)) * 0.3
  bias = jax.random.normal(keys[2], (300,))
  targets = jax.random.randint(keys[3], (1000,), 0, 300)

  def naive(f, k, b):
    logits = f @ k + b
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  def chunked(f, k, b):
    return losses.chunked_cross_entropy(f, k, b, targets, chunk_size=128)

  np.testing.assert_allclose(chunked(features, kernel, bias),
                             naive(features, kernel, bias), rtol=1e-5, atol=1e-5)
  grad_naive = jax.grad(lambda *a: naive(*a).sum(), argnums=(0, 1, 2))(features, kernel, bias)
  grad_chunked = jax.grad(lambda *a: chunked(*a).sum(), argnums=(0, 1, 2))(features, kernel, bias)
  for a, b in zip(grad_chunked, grad_naive):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Only one chunk of logits is ever materialised: no [1000, 300] buffer in the HLO.
  hlo = jax.jit(jax.grad(lambda f: chunked(f, kernel, bias).sum())).lower(features).as_text()
  assert "1000x300" not in hlo and "1024x300" not in hlo


def test_cosine_schedule_matches_closed_form():
  schedule = diffusion.Schedule.cosine(1000)
  s = 0.008
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  steps = np.arange(1000)
  closed_form = f((steps + 1) / 1000) / f(0.0)
  unclipped = schedule.betas < 0.999
  assert unclipped[:990].all()
  np.testing.assert_allclose(schedule.alphas_cumprod[unclipped],
                             closed_form[unclipped], rtol=1e-9)
  assert (np.diff(schedule.alphas_cumprod) < 0).all()
  respaced = schedule.respaced(100)
  assert len(respaced.betas) == 100
  assert respaced.timestep_map[0] == 0 and respaced.timestep_map[-1] == 999
  np.testing.assert_allclose(respaced.alphas_cumprod,
                             schedule.alphas_cumprod[respaced.timestep_map], rtol=1e-12)
  np.testing.assert_allclose(np.cumprod(1 - respaced.betas), respaced.alphas_cumprod,
                             rtol=1e-9)


def test_ddpm_sampling_with_oracle_recovers_the_data_point():
  """With the exact ε of a point mass at c, every step predicts x0 = c."""
  schedule = diffusion.Schedule.cosine(1000)
  respaced = schedule.respaced(50)
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  target = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.25]])

  def oracle(noisy, steps, condition):
    ab = alphas_cumprod[steps.astype(jnp.int32)][:, None]
    return (noisy - jnp.sqrt(ab) * condition) / jnp.sqrt(1 - ab)

  sample = diffusion.ddpm_sample(oracle, respaced, target, 3, jax.random.key(0), 1.0)
  np.testing.assert_allclose(sample, target, atol=1e-3)


def test_diffusion_loss_is_zero_for_the_oracle_and_positive_otherwise():
  schedule = diffusion.Schedule.cosine(1000)
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  target = jax.random.normal(jax.random.key(1), (64, 4))

  def oracle(noisy, steps, condition):
    ab = alphas_cumprod[steps][:, None]
    return (noisy - jnp.sqrt(ab) * condition) / jnp.sqrt(1 - ab)

  rows = diffusion.diffusion_loss(oracle, schedule, target, target, jax.random.key(2))
  assert rows.shape == (64,)
  np.testing.assert_allclose(rows, 0.0, atol=1e-3)
  zero = lambda noisy, steps, condition: jnp.zeros_like(noisy)
  assert diffusion.diffusion_loss(zero, schedule, target, target,
                                  jax.random.key(2)).mean() > 0.5


def test_continuous_loss_trains_with_diffusion_batch_mul():
  config = micro_config("kl_small")
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(0))
  tokens = _tokens(config)
  # The ε output and adaLN modulations start at zero (as in MAR), which blocks
  # gradients to z at step 0; give them values as after a few updates.
  for layer in (model.output.output, model.output.final_modulation):
    layer.kernel[...] = 0.02 * jax.random.normal(jax.random.key(4), layer.kernel.shape)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_and_grads(params, rng):
    def loss_fn(params):
      return nnx.merge(graphdef, params, rest).loss(LABELS, tokens, rng)[0]
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = loss_and_grads(params, jax.random.key(0))
  assert np.isfinite(loss) and loss > 0
  norms = jax.tree.map(lambda g: jnp.abs(g).sum(), grads)
  # Gradients reach the backbone through the head and the diffusion MLP.
  assert float(sum(jax.tree.leaves(norms["backbone"]))) > 0
  assert float(sum(jax.tree.leaves(norms["output"]))) > 0


def test_variational_bound_is_tight_for_the_oracle_and_looser_otherwise():
  """Point-mass data with the exact ε: the bound is dominated by the t=0 term."""
  schedule = diffusion.Schedule.cosine(100)
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  target = jnp.tile(jnp.array([[0.3, -0.2]]), (4096, 1))

  def oracle(noisy, steps, condition):
    ab = alphas_cumprod[steps.astype(jnp.int32)][:, None]
    return (noisy - jnp.sqrt(ab) * condition) / jnp.sqrt(1 - ab)

  zero = lambda noisy, steps, condition: jnp.zeros_like(noisy)
  rng = jax.random.key(0)
  exact = diffusion.variational_bound(oracle, schedule, target, target, rng)
  poor = diffusion.variational_bound(zero, schedule, target, target, rng)
  assert exact.shape == (4096,)
  # With the oracle every KL term is 0; only steps == 0 rows (and the prior) count.
  assert float(jnp.mean(exact)) < float(jnp.mean(poor)) - 10
  assert np.isfinite(np.asarray(exact)).all()


def test_next_token_nll_matches_the_sampling_distribution():
  config = micro_config()
  model = heptapod.Heptapod(config, rngs=nnx.Rngs(3))
  model.eval()
  tokens = _tokens(config)
  nll = model.next_token_nll(LABELS, tokens, jax.random.key(1))
  assert nll.shape == (BATCH, NUM_POSITIONS)
  # With all remaining positions as queries the construction is deterministic,
  # so each entry equals -log softmax of next_position_distribution.
  config_all = micro_config(density=None)
  model_all = heptapod.Heptapod(config_all, rngs=nnx.Rngs(3))
  nll_all = model_all.next_token_nll(LABELS, tokens, jax.random.key(1))
  for t in (0, 5, NUM_POSITIONS - 1):
    logits = model_all.next_position_distribution(LABELS, tokens, t, jax.random.key(9)).logits
    expected = -jax.nn.log_softmax(logits)[jnp.arange(BATCH), tokens[:, t]]
    np.testing.assert_allclose(nll_all[:, t], expected, rtol=1e-4, atol=1e-5)
  assert np.isfinite(np.asarray(nll)).all()
