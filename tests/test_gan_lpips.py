"""PatchGAN discriminator, adversarial-loss rules and LPIPS (shapes, math, weights)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from heptapod_jax.models import lpips
from heptapod_jax.models.tokenizers import discriminator as disc


def _images(size, seed, batch=2):
  """[batch, size, size, 3] float32 in [-1, 1] (numpy: jax.random would
  compile a threefry kernel per shape, seconds each on 2 cores)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1.0, 1.0, (batch, size, size, 3)), jnp.float32)


# --- discriminator -------------------------------------------------------------


def _built(name, seed=0, **overrides):
  """A discriminator with random weights drawn in numpy (N(0, 0.02) kernels,
  unit norm scales, zero biases): random init would compile one threefry
  kernel per shape."""
  model = nnx.eval_shape(lambda: disc.build_discriminator(
      name, rngs=nnx.Rngs(0), **overrides))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "kernel":
      return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), jnp.float32)
    if path[-1].key == "scale":
      return jnp.ones(leaf.shape, jnp.float32)
    return jnp.zeros(leaf.shape, jnp.float32)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def _forward(model, images):
  return nnx.jit(lambda m, x: m(x))(model, images)


def test_small_discriminator_on_32x32_gives_8x8_patch_logits():
  model = _built("patchgan_small", ndf=8)
  logits = _forward(model, _images(32, 0))
  assert logits.shape == (2, 8, 8, 1)
  assert logits.dtype == jnp.float32
  assert model.patch_grid(32, 32) == (8, 8)
  assert bool(jnp.all(jnp.isfinite(logits)))
  # Conv + GroupNorm layers have no conv bias; the first conv and head do.
  assert model.layers[0].conv.bias is not None and model.layers[0].norm is None
  assert model.layers[1].conv.bias is None and model.layers[1].norm is not None


def test_discriminator_channels_and_logical_axes():
  model = nnx.eval_shape(lambda: disc.build_discriminator(
      "patchgan", rngs=nnx.Rngs(0), ndf=64, n_layers=4))
  widths = [layer.conv.kernel.shape[-1] for layer in model.layers]
  assert widths == [64, 128, 256, 512, 512]  # doubling capped at 8 * ndf
  assert model.head.kernel.shape == (4, 4, 512, 1)
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = leaf.get_metadata()["out_sharding"]
    assert len(names) == leaf.ndim, path
    assert set(names) <= {"conv_height", "conv_width", "conv_in", "conv_out",
                          "norm"}, path


def test_taming_discriminator_on_256x256_gives_30x30_patch_logits():
  model = nnx.eval_shape(lambda: disc.build_discriminator(
      "patchgan", rngs=nnx.Rngs(0)))
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  logits = nnx.eval_shape(lambda m, x: m(x), model, images)
  assert logits.shape == (2, 30, 30, 1)
  assert model.patch_grid(256, 256) == (30, 30)
  same = nnx.eval_shape(lambda: disc.build_discriminator(
      "patchgan", rngs=nnx.Rngs(0), padding="same"))
  assert nnx.eval_shape(lambda m, x: m(x), same, images).shape == (2, 32, 32, 1)


def test_discriminator_without_norm_has_biases():
  model = nnx.eval_shape(lambda: disc.build_discriminator(
      "patchgan_small", rngs=nnx.Rngs(0), ndf=8, norm="none"))
  assert all(layer.norm is None and layer.conv.bias is not None
             for layer in model.layers)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  assert nnx.eval_shape(lambda m, x: m(x), model, images).shape == (2, 8, 8, 1)
  with pytest.raises(ValueError, match="norm"):
    disc.build_discriminator("patchgan_small", rngs=nnx.Rngs(0), norm="batch")


def test_hinge_losses_on_hand_made_logits():
  real = jnp.array([2.0, 0.5, -1.0, 0.0])  # relu(1 - real) = 0, .5, 2, 1
  fake = jnp.array([-2.0, -0.5, 1.0, 0.0])  # relu(1 + fake) = 0, .5, 2, 1
  np.testing.assert_allclose(disc.hinge_discriminator_loss(real, fake),
                             0.5 * (3.5 / 4 + 3.5 / 4), rtol=1e-6)
  # Confident, correct logits give zero loss.
  assert float(disc.hinge_discriminator_loss(jnp.full((2, 3, 3, 1), 3.0),
                                             jnp.full((2, 3, 3, 1), -3.0))) == 0.0
  np.testing.assert_allclose(disc.hinge_generator_loss(fake), -(-1.5) / 4,
                             rtol=1e-6)


def test_adaptive_weight_formula_clip_and_no_gradient():
  np.testing.assert_allclose(disc.adaptive_weight(2.0, 0.5),
                             2.0 / (0.5 + 1e-4), rtol=1e-6)
  assert float(disc.adaptive_weight(1.0, 0.0)) == pytest.approx(1e4)  # clipped
  assert float(disc.adaptive_weight(1.0, 0.0, max_weight=7.0)) == 7.0
  np.testing.assert_allclose(disc.adaptive_weight(3.0, 1.0, eps=1.0), 1.5)
  grads = jax.grad(lambda r, g: disc.adaptive_weight(r, g), argnums=(0, 1))(
      2.0, 0.5)
  assert grads == (0.0, 0.0)


def test_adoption_weight_before_and_after_start():
  assert float(disc.adoption_weight(0, 10)) == 0.0
  assert float(disc.adoption_weight(9, 10)) == 0.0
  assert float(disc.adoption_weight(10, 10)) == 1.0
  assert float(disc.adoption_weight(11, 10)) == 1.0
  traced = jax.jit(disc.adoption_weight)(jnp.array([5, 15]), 10)
  np.testing.assert_array_equal(traced, [0.0, 1.0])


# --- LPIPS ---------------------------------------------------------------------


def _random_state_dicts(seed=0):
  """Random torch-layout VGG16 (+ a torchvision classifier key) and lin weights."""
  rng = np.random.default_rng(seed)
  vgg = {}
  for key, shape in lpips.expected_state_dict_shapes("vgg").items():
    if key.endswith(".weight"):
      vgg[key] = (rng.standard_normal(shape, np.float32)
                  * np.sqrt(2.0 / math.prod(shape[1:]))).astype(np.float32)
    else:
      vgg[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  vgg["classifier.0.bias"] = np.zeros((16,), np.float32)  # ignored
  lin = {key: rng.uniform(0.0, 1.0, shape).astype(np.float32)
         for key, shape in lpips.expected_state_dict_shapes("lin").items()}
  return vgg, lin


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("lpips")
  vgg, lin = _random_state_dicts()
  vgg_path, lin_path = directory / "vgg16.npz", directory / "lin.npz"
  assert lpips.state_dict_to_npz(vgg, vgg_path) == "vgg"
  assert lpips.state_dict_to_npz(lin, lin_path) == "lin"
  return {"vgg": vgg, "lin": lin, "vgg_path": vgg_path, "lin_path": lin_path,
          "dir": directory}


@pytest.fixture(scope="module")
def distance_fn(weight_files):
  model = lpips.load_lpips(weight_files["vgg_path"], weight_files["lin_path"],
                           precision="highest")
  return nnx.jit(lambda m, a, b: m(a, b)), model


def test_expected_key_names():
  vgg = lpips.expected_state_dict_shapes("vgg")
  assert vgg["features.0.weight"] == (64, 3, 3, 3)
  assert vgg["features.28.bias"] == (512,)
  assert len(vgg) == 26
  assert lpips.expected_state_dict_shapes("lin") == {
      f"lin{k}.model.1.weight": (1, c, 1, 1)
      for k, c in enumerate((64, 128, 256, 512, 512))}


def test_npz_round_trip_loads_the_exact_weights(weight_files, distance_fn):
  _, model = distance_fn
  vgg, lin = lpips.model_state_dicts(model)
  with np.load(weight_files["vgg_path"]) as data:
    assert set(data.files) == set(vgg)  # classifier.* dropped
  for key, value in vgg.items():
    np.testing.assert_array_equal(value, weight_files["vgg"][key], err_msg=key)
  for key, value in lin.items():
    np.testing.assert_array_equal(value, weight_files["lin"][key], err_msg=key)


def _pairs(seed_a, seed_b):
  """Rows (a, a), (a, b), (b, a) for 2 image pairs: two [6, 32, 32, 3] batches
  (one shape for every LPIPS forward here: one compilation)."""
  a, b = _images(32, seed_a), _images(32, seed_b)
  return jnp.concatenate([a, a, b]), jnp.concatenate([a, b, a])


def test_lpips_zero_for_identical_positive_and_symmetric(distance_fn):
  fn, model = distance_fn
  distances = np.asarray(fn(model, *_pairs(1, 2)))
  assert distances.shape == (6,)
  np.testing.assert_allclose(distances[:2], 0.0, atol=1e-6)
  assert np.all(distances[2:] > 1e-3)
  np.testing.assert_allclose(distances[2:4], distances[4:6], rtol=1e-5)


def test_lpips_gradient_reaches_images_only(distance_fn):
  _, model = distance_fn
  a, b = _images(16, 3, batch=1), _images(16, 4, batch=1)
  grads_model, grads_image = nnx.jit(nnx.grad(
      lambda m, x: jnp.sum(m(x, b)), argnums=(0, 1)))(model, a)
  assert float(jnp.max(jnp.abs(grads_image))) > 0.0
  assert bool(jnp.all(jnp.isfinite(grads_image)))
  leaves = jax.tree.leaves(grads_model)
  assert leaves and all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in leaves)


def test_missing_misshaped_and_unexpected_keys_are_named(weight_files):
  directory = weight_files["dir"]
  vgg = dict(weight_files["vgg"])
  del vgg["features.26.weight"]
  vgg["features.0.bias"] = np.zeros((65,), np.float32)
  vgg["features.30.weight"] = np.zeros((1,), np.float32)
  bad_path = directory / "bad_vgg.npz"
  np.savez(bad_path, **vgg)
  with pytest.raises(lpips.LPIPSWeightsError) as error:
    lpips.load_lpips(bad_path, weight_files["lin_path"])
  message = str(error.value)
  assert "bad_vgg.npz" in message
  assert "missing keys: features.26.weight" in message
  assert "features.0.bias (65,) (expected (64,))" in message
  assert "unexpected keys: features.30.weight" in message
  assert "classifier" not in message

  lin = dict(weight_files["lin"])
  lin["lin3.model.1.weight"] = np.ones((1, 256, 1, 1), np.float32)
  bad_lin = directory / "bad_lin.npz"
  np.savez(bad_lin, **lin)
  with pytest.raises(lpips.LPIPSWeightsError,
                     match=r"bad_lin\.npz.*lin3\.model\.1\.weight \(1, 256, 1, 1\)"):
    lpips.load_lpips(weight_files["vgg_path"], bad_lin)

  lin = dict(weight_files["lin"])
  lin["lin1.model.1.weight"] = -lin["lin1.model.1.weight"]
  negative = directory / "negative_lin.npz"
  np.savez(negative, **lin)
  with pytest.raises(lpips.LPIPSWeightsError, match=r"negative.*lin1\.model"):
    lpips.load_lpips(weight_files["vgg_path"], negative)

  with pytest.raises(lpips.LPIPSWeightsError, match="no such file.*nowhere.npz"):
    lpips.load_lpips(directory / "nowhere.npz", weight_files["lin_path"])
  with pytest.raises(lpips.LPIPSWeightsError, match="unknown extension"):
    lpips.read_state_dict(__file__)


def _torch_lpips(vgg, lin, images_a, images_b):
  """The lpips v0.1 "vgg" forward written with torch.nn.functional (NCHW)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
  scale = torch.tensor([.458, .448, .450])[None, :, None, None]
  blocks = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]

  def features(x):
    h = (torch.from_numpy(np.array(x)).permute(0, 3, 1, 2) - shift) / scale
    taps = []
    for number, block in enumerate(blocks):
      if number:
        h = F.max_pool2d(h, kernel_size=2, stride=2)
      for index in block:
        h = F.relu(F.conv2d(h, torch.from_numpy(vgg[f"features.{index}.weight"]),
                            torch.from_numpy(vgg[f"features.{index}.bias"]),
                            padding=1))
      taps.append(h)
    return taps

  def normalize(x, eps=1e-10):
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)

  total = 0
  for k, (f0, f1) in enumerate(zip(features(images_a), features(images_b))):
    diff = (normalize(f0) - normalize(f1)) ** 2
    out = F.conv2d(diff, torch.from_numpy(lin[f"lin{k}.model.1.weight"]))
    total = total + out.mean(dim=(2, 3), keepdim=True)
  return total.reshape(-1).numpy()


def test_lpips_matches_a_pytorch_implementation(weight_files, distance_fn):
  import torch  # pylint: disable=import-outside-toplevel

  fn, model = distance_fn
  a, b = _pairs(5, 6)
  ours = np.asarray(fn(model, a, b))
  with torch.no_grad():
    reference = _torch_lpips(weight_files["vgg"], weight_files["lin"], a, b)
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)

  # A .pth state dict (read with torch.load(weights_only=True)) loads the same.
  pth = weight_files["dir"] / "lin.pth"
  torch.save({key: torch.from_numpy(value)
              for key, value in weight_files["lin"].items()}, pth)
  from_pth = lpips.load_lpips(weight_files["vgg_path"], pth, precision="highest")
  np.testing.assert_array_equal(
      np.asarray(fn(from_pth, a, b)), ours)
