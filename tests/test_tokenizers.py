"""Visual tokenizers: shapes, VQ lookup and losses, straight-through gradient, KL posterior."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from heptapod_jax import config_lib
from heptapod_jax.models import tokenizers
from heptapod_jax.models.tokenizers import kl
from heptapod_jax.models.tokenizers import vq

BATCH = 2


def _images(size, seed=0, batch=BATCH):
  """[batch, size, size, 3] float32 in [-1, 1]."""
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3),
                            minval=-1.0, maxval=1.0)


def _abstract(name, **kwargs):
  return nnx.eval_shape(lambda: tokenizers.build_tokenizer(
      name, rngs=nnx.Rngs(0), **kwargs))


def _with_numpy_weights(abstract_model, seed=0):
  """A concrete copy of `abstract_model` with random weights drawn in numpy.

  Eager random init compiles one XLA op per kernel shape (about 10 s for the
  ~70M-parameter models on 2 cores); numpy fills the same tree in about a
  second. The real initializers run in test_small_model_initialisation.
  """
  graph, state = nnx.split(abstract_model)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    key = path[-1].key
    if key == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      value = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
    elif key == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape, np.float32)
    elif key == "bias":
      value = 0.1 * rng.standard_normal(leaf.shape, np.float32)
    elif key == "codebook":
      value = rng.standard_normal(leaf.shape, np.float32)
    else:
      raise AssertionError(f"unexpected parameter {path}")
    return jnp.asarray(value)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graph, state)


@pytest.fixture(scope="module")
def full_size():
  """Abstract vq16 and kl16 (nnx.eval_shape: ~4 s each on 2 cores)."""
  return {name: _abstract(name) for name in ("vq16", "kl16")}


@pytest.fixture(scope="module")
def small():
  return {name: _with_numpy_weights(_abstract(name), seed=1)
          for name in ("vq_small", "kl_small")}


# Two levels instead of three: the same code paths at half the compile time,
# for the tests that look at values rather than at the architecture.
TINY = dict(ch_mult=(1, 2))


@pytest.fixture(scope="module")
def tiny():
  return {name: _with_numpy_weights(_abstract(name, **TINY), seed=2)
          for name in ("vq_small", "kl_small")}


@nnx.jit
def _roundtrip(model, images):
  """images -> (codes or latents, decoded images), jitted once per shape."""
  tokens = model.encode(images)
  return tokens, model.decode(tokens)


def test_specs_agree_with_config_lib():
  assert set(tokenizers.SPECS) == set(config_lib.TOKENIZERS)
  for name, expected in config_lib.TOKENIZERS.items():
    spec = tokenizers.get_spec(name)
    assert spec.kind == expected["kind"], name
    assert spec.stride == expected["stride"], name
    if spec.kind == "discrete":
      assert (spec.codebook_size, spec.code_dim) == (
          expected["codebook_size"], expected["code_dim"]), name
    else:
      assert spec.latent_channels == expected["latent_channels"], name


def test_spec_errors_name_the_field():
  with pytest.raises(ValueError, match="unknown tokenizer 'vq32'"):
    tokenizers.get_spec("vq32")
  with pytest.raises(ValueError, match="'chanels'"):
    tokenizers.get_spec("vq16", chanels=3)
  with pytest.raises(ValueError, match="norm_groups"):
    tokenizers.get_spec("vq_small", ch=20)


@pytest.mark.parametrize("name,params", [("vq16", 71_883_403),
                                         ("kl16", 66_456_019)])
def test_full_size_shapes_and_logical_axes(full_size, name, params):
  """256x256 abstractly: stride 16 -> 16x16 tokens; every param has axis names."""
  model = full_size[name]
  variables = jax.tree.leaves(nnx.state(model, nnx.Param),
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert sum(v.get_value().size for v in variables) == params  # LlamaGen: "72M"
  for variable in variables:
    names = variable.get_metadata().get("out_sharding")
    assert names is not None and len(names) == variable.get_value().ndim, variable
  images = jax.ShapeDtypeStruct((4, 256, 256, 3), jnp.float32)
  tokens = nnx.eval_shape(lambda m, x: m.encode(x), model, images)
  decoded = nnx.eval_shape(lambda m, t: m.decode(t), model, tokens)
  if name == "vq16":
    assert (tokens.shape, tokens.dtype) == ((4, 16, 16), jnp.int32)
    assert model.codebook.get_value().shape == (16384, 8)
  else:
    assert (tokens.shape, tokens.dtype) == ((4, 16, 16, 16), jnp.float32)
  assert (decoded.shape, decoded.dtype) == ((4, 256, 256, 3), jnp.float32)


@pytest.mark.parametrize("name", ["vq16", "kl16"])
def test_full_size_runs_on_small_images(full_size, name):
  """32x32 through the 5-level models: 2x2 tokens."""
  model = _with_numpy_weights(full_size[name])
  tokens, decoded = _roundtrip(model, _images(32))
  if name == "vq16":
    assert (tokens.shape, tokens.dtype) == ((BATCH, 2, 2), jnp.int32)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 16384
  else:
    assert (tokens.shape, tokens.dtype) == ((BATCH, 2, 2, 16), jnp.float32)
  assert (decoded.shape, decoded.dtype) == ((BATCH, 32, 32, 3), jnp.float32)
  assert np.isfinite(np.asarray(decoded)).all()


def test_bfloat16_compute_keeps_float32_params():
  model = _abstract("kl_small", dtype="bfloat16")
  assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
      jnp.dtype(jnp.float32)}
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  latents = nnx.eval_shape(lambda m, x: m.encode(x), model, images)
  assert latents.dtype == jnp.float32  # the posterior is kept in float32
  decoded = nnx.eval_shape(lambda m, t: m.decode(t), model, latents)
  assert decoded.dtype == jnp.bfloat16


def test_small_model_initialisation():
  """The real initializers: PyTorch-default conv kernels, LlamaGen's codebook.

  Built under one jit (eager init compiles one XLA op per kernel shape), with
  one level to keep that program small.
  """
  model = nnx.jit(lambda: tokenizers.build_tokenizer(
      "vq_small", rngs=nnx.Rngs(0), ch_mult=(1,), z_channels=32))()
  kernel = np.asarray(model.encoder.conv_in.kernel[...])  # [3, 3, 3, 32]
  bound = 1.0 / np.sqrt(3 * 3 * 3)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound
  codebook = np.asarray(model.codebook[...])
  assert codebook.shape == (512, 8) and np.abs(codebook).max() <= 1.0 / 512
  assert not np.any(model.encoder.conv_in.bias[...])
  np.testing.assert_array_equal(model.encoder.norm_out.scale[...], 1.0)


@pytest.mark.parametrize("name", ["vq_small", "kl_small"])
def test_small_shapes_and_batch_independence(small, name):
  """32x32 (Fashion-MNIST padded): stride 4 -> 8x8 tokens."""
  model = small[name]
  size, grid = 32, 8
  images = _images(size)
  tokens, decoded = _roundtrip(model, images)
  if model.kind == "discrete":
    assert (tokens.shape, tokens.dtype) == ((BATCH, grid, grid), jnp.int32)
    assert int(tokens.max()) < 512
  else:
    assert (tokens.shape, tokens.dtype) == ((BATCH, grid, grid, 4), jnp.float32)
  assert (decoded.shape, decoded.dtype) == ((BATCH, size, size, 3), jnp.float32)
  # Each image is processed on its own (GroupNorm is per image): changing
  # image 0 leaves the tokens and reconstruction of image 1 as they were.
  changed, changed_decoded = _roundtrip(model, images.at[0].set(-images[0]))
  np.testing.assert_allclose(changed[1], tokens[1], atol=1e-5)
  np.testing.assert_allclose(changed_decoded[1], decoded[1], atol=1e-5)
  assert np.abs(np.asarray(changed_decoded[0] - decoded[0])).max() > 1e-3


def _brute_force_codes(vectors, codebook):
  vectors = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
  codebook = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
  distances = ((vectors[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
  return distances.argmin(-1)


@pytest.mark.parametrize("chunk", [4096, 7])
def test_nearest_codes_match_brute_force(monkeypatch, chunk):
  monkeypatch.setattr(vq, "_QUANTIZE_CHUNK", chunk)  # 7: the chunked lax.map path
  rng = np.random.default_rng(0)
  vectors = rng.standard_normal((50, 8)).astype(np.float32)
  codebook = rng.standard_normal((300, 8)).astype(np.float32)
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  codes = jax.jit(vq.nearest_codes)(jnp.asarray(normalize(vectors)),
                                    jnp.asarray(normalize(codebook)))
  assert codes.dtype == jnp.int32
  np.testing.assert_array_equal(codes, _brute_force_codes(vectors, codebook))


@nnx.jit
def _vq_lookup(model, images):
  z = model.project(images)
  codes = model.encode(images)
  return z, codes, model.lookup(codes)


def test_model_lookup_is_l2_normalised_nearest_code(tiny):
  model = tiny["vq_small"]
  z, codes, looked_up = _vq_lookup(model, _images(16, seed=3))
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
  raw_codebook = np.asarray(model.codebook[...])
  expected = _brute_force_codes(np.asarray(z).reshape(-1, 8), raw_codebook)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), expected)
  unit = raw_codebook / np.linalg.norm(raw_codebook, axis=-1, keepdims=True)
  np.testing.assert_allclose(looked_up, unit[np.asarray(codes)], atol=1e-6)


def test_vq_losses_on_a_hand_built_case():
  z = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  quantized = jnp.array([[0.6, 0.8], [0.0, 1.0]])
  codebook_loss, commitment_loss = vq.vq_losses(z, quantized, beta=0.25)
  # squared errors: 0.4^2 + 0.8^2 = 0.8 for the first vector, 0 for the second.
  np.testing.assert_allclose(codebook_loss, 0.8 / 4, rtol=1e-6)
  np.testing.assert_allclose(commitment_loss, 0.25 * 0.8 / 4, rtol=1e-6)
  # The codebook loss moves only the codes, the commitment loss only z.
  grad_z = jax.grad(lambda z: vq.vq_losses(z, quantized, 0.25)[0])(z)
  grad_q = jax.grad(lambda q: vq.vq_losses(z, q, 0.25)[1])(quantized)
  assert not np.any(grad_z) and not np.any(grad_q)


@nnx.jit
def _vq_gradients(model, images):
  def reconstruction_loss(model):
    reconstruction, aux = model(images)
    return (jnp.mean(jnp.square(reconstruction - images)),
            dict(aux, reconstruction=reconstruction))

  grads, aux = nnx.grad(reconstruction_loss, has_aux=True)(model)
  codebook_grads = nnx.grad(lambda m: m(images)[1]["codebook_loss"])(model)
  return (grads, codebook_grads, aux, model.project(images),
          model.decode(aux["codes"]))


def test_straight_through_gradient_reaches_the_encoder(tiny):
  model = tiny["vq_small"]
  grads, codebook_grads, aux, z, decoded = _vq_gradients(model,
                                                         _images(16, seed=4))
  # Forward value: the decoder saw the code vectors, not the encoder output.
  np.testing.assert_allclose(aux["reconstruction"], decoded, atol=1e-5)
  assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"][...]).max()) > 0
  assert float(jnp.abs(grads["quant_conv"]["kernel"][...]).max()) > 0
  # Codes reach the decoder only through the stop-gradient of the estimator;
  # the codebook loss is what trains the codebook.
  assert not np.any(grads["codebook"][...])
  assert float(jnp.abs(codebook_grads["codebook"][...]).max()) > 0
  assert aux["codes"].shape == (BATCH, 8, 8)  # 16x16 images, stride 2
  quantized = model.code_vectors()[aux["codes"]]
  mse = float(jnp.mean(jnp.square(quantized - z)))
  np.testing.assert_allclose(aux["codebook_loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(aux["commitment_loss"], 0.25 * mse, rtol=1e-5)


def test_kl_of_standard_normal_is_zero():
  zeros = jnp.zeros((3, 4, 4, 2))
  np.testing.assert_allclose(kl.kl_divergence(zeros, zeros), 0.0, atol=0)
  # mean 1, unit variance: 0.5 per element, summed over 4*4*2 elements.
  np.testing.assert_allclose(kl.kl_divergence(zeros + 1, zeros), 16.0, rtol=1e-6)
  logvar = jnp.full((1, 1, 1, 1), math.log(4.0))
  expected = 0.5 * (4.0 - 1.0 - math.log(4.0))
  np.testing.assert_allclose(kl.kl_divergence(jnp.zeros_like(logvar), logvar),
                             [expected], rtol=1e-6)


@nnx.jit
def _kl_forward(model, images, rng):
  reconstruction, aux = model(images, rng=rng)
  return model.encode(images, rng=rng), reconstruction, aux


def test_kl_sampling_uses_the_logvar(tiny):
  logvar = jnp.full((4000, 1, 1, 2), math.log(4.0))
  samples = kl.sample_posterior(jnp.ones_like(logvar), logvar, jax.random.key(0))
  np.testing.assert_allclose(np.std(samples), 2.0, rtol=0.05)
  np.testing.assert_allclose(np.mean(samples), 1.0, atol=0.1)

  images = _images(16, seed=5)
  rng = jax.random.key(7)
  sample, reconstruction, aux = _kl_forward(tiny["kl_small"], images, rng)
  mean, logvar = aux["mean"], aux["logvar"]
  assert float(jnp.std(logvar)) > 0  # a real per-element variance
  noise = jax.random.normal(rng, mean.shape)
  np.testing.assert_allclose(sample, mean + jnp.exp(0.5 * logvar) * noise,
                             atol=1e-5)
  np.testing.assert_allclose(aux["latents"], sample, atol=1e-5)
  np.testing.assert_allclose(aux["kl"], kl.kl_divergence(mean, logvar), rtol=1e-5)
  assert aux["kl"].shape == (BATCH,) and reconstruction.shape == images.shape
