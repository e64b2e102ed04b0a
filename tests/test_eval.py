"""Evaluation metrics: closed forms, the FID Inception's weight layout, references,
and the in-project Fashion-MNIST classifier (trained briefly on a subset)."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from scipy import linalg

from heptapod_jax import eval as eval_lib
from heptapod_jax.data import fashion_mnist
from heptapod_jax.eval import classifier
from heptapod_jax.eval import inception
from heptapod_jax.eval import metrics
from heptapod_jax.eval import reference

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


# --- Fréchet distance ------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  var1, var2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
  got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
  sigma1, sigma2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  root = linalg.sqrtm(sigma1 @ sigma2)  # the non-symmetric product, independent route
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
              - 2 * np.trace(root).real)
  assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_features_is_zero():
  features = np.random.default_rng(2).normal(size=(500, 32)) * 3 + 1
  stats = metrics.FeatureStatistics.from_features(features)
  assert abs(metrics.frechet_distance_of_statistics(stats, stats)) < 1e-6


def test_frechet_distance_is_robust_to_singular_covariances():
  # Fewer samples than dimensions plus dead units: rank-deficient covariances.
  rng = np.random.default_rng(3)
  features = np.zeros((10, 64))
  features[:, :20] = rng.normal(size=(10, 20))
  other = np.zeros((10, 64))
  other[:, 10:30] = rng.normal(size=(10, 20))
  stats, other_stats = (metrics.FeatureStatistics.from_features(x) for x in (features, other))
  assert abs(metrics.frechet_distance_of_statistics(stats, stats)) < 1e-6
  distance = metrics.frechet_distance_of_statistics(stats, other_stats)
  assert np.isfinite(distance) and distance > 0
  # Singular diagonal case in closed form: N(0, diag(1, 0)) vs N(0, diag(0, 4)).
  assert metrics.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2),
                                  np.diag([0.0, 4.0])) == pytest.approx(5.0, abs=1e-9)


def test_streaming_statistics_equal_all_at_once():
  features = np.random.default_rng(4).normal(size=(257, 12)) * 0.5 + 1000.0
  stats = metrics.FeatureStatistics(12)
  for start, stop in ((0, 1), (1, 100), (100, 100), (100, 257)):
    stats.update(features[start:stop].astype(np.float32))
  np.testing.assert_allclose(stats.mean, features.astype(np.float32).astype(np.float64).mean(0),
                             rtol=0, atol=1e-9)
  np.testing.assert_allclose(stats.covariance,
                             np.cov(features.astype(np.float32).astype(np.float64), rowvar=False),
                             rtol=1e-9, atol=1e-12)
  assert stats.count == 257


# --- Inception Score and precision/recall ----------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = metrics.inception_score(np.full((100, 7), 1 / 7), num_splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_one_hot_predictions_over_k_classes_is_k():
  num_classes = 5
  labels = np.tile(np.arange(num_classes), 20)  # each split of 10 holds every class twice
  mean, std = metrics.inception_score(np.eye(num_classes)[labels], num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
  # From logits through the float64 softmax: nearly one-hot, nearly K.
  near = metrics.inception_score(metrics.softmax(30.0 * np.eye(num_classes)[labels]), 10)[0]
  assert near == pytest.approx(num_classes, rel=1e-6)


def test_precision_recall_of_identical_sets_is_one_and_of_far_clusters_zero():
  rng = np.random.default_rng(5)
  points = rng.normal(size=(60, 16))
  same = metrics.precision_recall(points, points.copy(), neighbourhood=3)
  assert (same.precision, same.recall) == (1.0, 1.0)
  far = metrics.precision_recall(points, rng.normal(size=(40, 16)) + 100.0)
  assert (far.precision, far.recall) == (0.0, 0.0)


def test_precision_counts_the_samples_on_the_reference_manifold_in_any_block_size():
  rng = np.random.default_rng(6)
  points = rng.normal(size=(50, 8))
  samples = np.concatenate([points[:25], rng.normal(size=(25, 8)) + 100.0])
  whole = metrics.precision_recall(points, samples)
  tiled = metrics.precision_recall(points, samples, block_size=16)
  assert whole.precision == 0.5 and tiled == whole


# --- FID Inception: weights layout and running ------------------------------------


def _conv(name, cin, cout, kh, kw=None):
  return {f"{name}.conv.weight": (cout, cin, kh, kw or kh), f"{name}.bn.weight": (cout,),
          f"{name}.bn.bias": (cout,), f"{name}.bn.running_mean": (cout,),
          f"{name}.bn.running_var": (cout,)}


def _pytorch_fid_shapes():
  """pytorch-fid's fid_inception_v3 state dict, written from torchvision's
  Inception3 definition (aux_logits=False, 1008 classes) independently of ours."""
  shapes = {}
  for spec in [("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3),
               ("Conv2d_2b_3x3", 32, 64, 3), ("Conv2d_3b_1x1", 64, 80, 1),
               ("Conv2d_4a_3x3", 80, 192, 3)]:
    shapes.update(_conv(*spec))
  for name, cin, pool in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
    for spec in [("branch1x1", cin, 64, 1), ("branch5x5_1", cin, 48, 1),
                 ("branch5x5_2", 48, 64, 5), ("branch3x3dbl_1", cin, 64, 1),
                 ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3),
                 ("branch_pool", cin, pool, 1)]:
      shapes.update(_conv(f"{name}.{spec[0]}", *spec[1:]))
  for spec in [("branch3x3", 288, 384, 3), ("branch3x3dbl_1", 288, 64, 1),
               ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3)]:
    shapes.update(_conv(f"Mixed_6a.{spec[0]}", *spec[1:]))
  for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
    for spec in [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c7, 1, 1),
                 ("branch7x7_2", c7, c7, 1, 7), ("branch7x7_3", c7, 192, 7, 1),
                 ("branch7x7dbl_1", 768, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
                 ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1),
                 ("branch7x7dbl_5", c7, 192, 1, 7), ("branch_pool", 768, 192, 1, 1)]:
      shapes.update(_conv(f"{name}.{spec[0]}", *spec[1:]))
  for spec in [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
               ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
               ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]:
    shapes.update(_conv(f"Mixed_7a.{spec[0]}", *spec[1:]))
  for name, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:
    for spec in [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1),
                 ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
                 ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
                 ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
                 ("branch_pool", cin, 192, 1, 1)]:
      shapes.update(_conv(f"{name}.{spec[0]}", *spec[1:]))
  shapes["fc.weight"] = (1008, 2048)
  shapes["fc.bias"] = (1008,)
  return shapes


def test_inception_expects_exactly_the_pytorch_fid_state_dict():
  expected = inception.expected_state_dict_shapes()
  assert expected == _pytorch_fid_shapes()
  # torchvision's inception_v3 has 23,834,568 trainable parameters without the
  # aux head; the FID variant swaps the 1000-way fc for a 1008-way one.
  trainable = sum(int(np.prod(shape)) for key, shape in expected.items()
                  if not key.endswith(("running_mean", "running_var")))
  assert trainable == 23_834_568 - (2048 * 1000 + 1000) + (2048 * 1008 + 1008)


def test_inception_weights_mismatch_is_reported_by_name():
  state_dict = {key: np.zeros(shape, np.float32)
                for key, shape in inception.expected_state_dict_shapes().items()}
  state_dict["Mixed_6a.branch3x3dbl_2.bn.num_batches_tracked"] = np.zeros((), np.int64)
  inception.check_state_dict(state_dict)  # complete; num_batches_tracked is accepted
  del state_dict["Mixed_5c.branch5x5_2.bn.running_var"]
  state_dict["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
  state_dict["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  with pytest.raises(inception.InceptionWeightsError) as error:
    inception.check_state_dict(state_dict, "weights.npz")
  message = str(error.value)
  assert "weights.npz" in message
  assert "missing keys: Mixed_5c.branch5x5_2.bn.running_var" in message
  assert "unexpected keys: AuxLogits.fc.weight" in message
  assert ("mis-shaped keys: Mixed_7c.branch_pool.conv.weight (192, 2048, 3, 3) "
          "(expected (192, 2048, 1, 1))") in message


@pytest.fixture(scope="module")
def random_weights_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "random_fid_inception.npz"
  inception.state_dict_to_npz(inception.random_state_dict(0), path)
  return path


def test_inception_runs_on_random_weights_from_npz(random_weights_npz):
  model = inception.load_inception(random_weights_npz)
  state_dict = inception.model_state_dict(model)
  original = inception.random_state_dict(0)
  for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_7b.branch3x3_2a.conv.weight", "fc.weight"):
    np.testing.assert_array_equal(state_dict[key], original[key])  # layouts round-trip
  images = np.random.default_rng(7).integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
  pool, logits = inception.inception_outputs(model, images[:3], batch_size=4)  # padded batch
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert np.all(np.isfinite(pool)) and np.all(pool >= 0) and np.all(np.isfinite(logits))
  assert not np.allclose(pool[0], pool[1])
  # Default logits are the ADM evaluator's: pool3 @ fc.weight.T, without fc.bias.
  np.testing.assert_allclose(logits, pool @ original["fc.weight"].T, rtol=1e-4, atol=1e-4)
  # Golden values from pytorch-fid's own FIDInception modules (torchvision
  # 0.28) loaded with these random weights and fed TF1 resize_bilinear
  # (align_corners=False, half_pixel_centers=False) output scaled (x - 128) / 128.
  np.testing.assert_allclose(pool[:, :5], _GOLDEN_POOL_HEAD, atol=2e-5)
  np.testing.assert_allclose(pool.sum(axis=1), _GOLDEN_POOL_SUM, rtol=1e-5)
  np.testing.assert_allclose(logits[:, :5], _GOLDEN_LOGITS_HEAD, atol=2e-5)


_GOLDEN_POOL_HEAD = np.array([[2.0174, 1.343741, 0.117493, 0.679127, 0.006413],
                              [1.986028, 1.357708, 0.125987, 0.66391, 0.011497],
                              [2.003659, 1.341349, 0.117105, 0.653632, 0.006642]])
_GOLDEN_POOL_SUM = np.array([918.98737, 912.20886, 911.8111])
_GOLDEN_LOGITS_HEAD = np.array([[-0.476922, 0.221188, -1.001456, 0.098502, -0.297801],
                                [-0.483434, 0.231204, -0.991698, 0.105329, -0.287704],
                                [-0.498944, 0.239773, -0.993382, 0.096693, -0.301883]])


def test_pytorch_fid_resize_matches_half_pixel_bilinear():
  for in_size in (64, 400):
    matrix = inception.interpolation_matrix(in_size, 299, "pytorch_fid")
    signal = np.random.default_rng(in_size).normal(size=in_size).astype(np.float32)
    expected = jax.image.resize(signal, (299,), method="linear", antialias=False)
    np.testing.assert_allclose(matrix @ signal, expected, atol=1e-5)


def test_tf_graph_resize_has_no_half_pixel_centres():
  x = np.array([1.0, 3.0, 5.0, 7.0], np.float32)
  np.testing.assert_allclose(inception.interpolation_matrix(2, 4, "tf_graph") @ x[:2],
                             [1.0, 2.0, 3.0, 3.0])  # source = dst * in / out
  np.testing.assert_allclose(inception.interpolation_matrix(4, 2, "tf_graph") @ x, [1.0, 5.0])
  np.testing.assert_allclose(inception.interpolation_matrix(4, 2, "pytorch_fid") @ x, [2.0, 6.0])


def test_inception_input_scaling():
  images = np.stack([np.zeros((299, 299, 3)), np.full((299, 299, 3), 255.0)]).astype(np.uint8)
  tf_scaled = np.asarray(inception.preprocess_images(images, "tf_graph"))
  torch_scaled = np.asarray(inception.preprocess_images(images, "pytorch_fid"))
  np.testing.assert_allclose(tf_scaled[:, 0, 0, 0], [-1.0, 127 / 128])
  np.testing.assert_allclose(torch_scaled[:, 0, 0, 0], [-1.0, 1.0])


def test_inception_metrics_are_skipped_without_weights(tmp_path):
  config = eval_lib.default_eval_config()
  images = np.zeros((4, 32, 32, 3), np.uint8)
  assert inception.inception_metrics(config, images) == {
      "skipped": inception.SKIPPED_NO_WEIGHTS}
  assert "eval.inception_weights is not set" in inception.SKIPPED_NO_WEIGHTS
  assert "never computed with random weights" in inception.SKIPPED_NO_WEIGHTS
  with pytest.raises(inception.InceptionWeightsError, match="inception_weights is not set"):
    inception.load_inception("")
  missing = tmp_path / "nothing.npz"
  with pytest.raises(inception.InceptionWeightsError, match=f"no such file: {missing}"):
    inception.load_inception(missing)


def test_pth_weights_without_torch_explain_the_conversion(tmp_path, monkeypatch):
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` -> ImportError
  with pytest.raises(inception.InceptionWeightsError) as error:
    inception.load_inception(path)
  assert "needs torch" in str(error.value)
  assert "python -m heptapod_jax.eval.inception" in str(error.value)


def test_inception_metrics_end_to_end_on_random_weights(random_weights_npz, tmp_path):
  rng = np.random.default_rng(8)
  samples = rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
  config = eval_lib.default_eval_config()
  config.inception_weights = str(random_weights_npz)
  config.inception_batch_size = 4
  model = inception.load_inception(random_weights_npz)
  pool, _ = inception.inception_outputs(model, samples, batch_size=4)
  stats = reference.reference_from_features(pool)
  ref_path = tmp_path / "ref.npz"
  reference.write_adm_reference(ref_path, stats.mu, stats.sigma, images=samples)
  config.reference = str(ref_path)
  results = inception.inception_metrics(config, [samples[:1], samples[1:]])
  assert results["num_samples"] == 4
  assert abs(results["fid"]) < 1e-3
  assert (results["precision"], results["recall"]) == (1.0, 1.0)
  assert results["inception_score"] == pytest.approx(1.0)  # 4 splits of 1 sample
  assert "skipped" not in results


def test_inception_metrics_name_what_the_reference_lacks():
  rng = np.random.default_rng(12)
  pool, logits = rng.normal(size=(20, 8)), rng.normal(size=(20, 30))
  whole = reference.reference_from_features(pool)
  results = inception.metrics_from_outputs(pool, logits, whole)
  assert abs(results["fid"]) < 1e-9 and results["precision"] == 1.0
  assert "skipped" not in results and results["num_samples"] == 20
  no_images = reference.ReferenceStatistics(mu=whole.mu, sigma=whole.sigma)
  results = inception.metrics_from_outputs(pool, logits, no_images)
  assert "fid" in results and "precision" not in results
  assert results["skipped"] == "precision/recall skipped: the reference has no images (arr_0)"
  results = inception.metrics_from_outputs(pool, logits, None)
  assert set(results) == {"num_samples", "inception_score", "inception_score_std", "skipped"}
  assert "eval.reference is not set" in results["skipped"]


# --- references -------------------------------------------------------------------


def test_adm_reference_npz_round_trips(tmp_path):
  rng = np.random.default_rng(9)
  mu, a = rng.normal(size=6), rng.normal(size=(6, 6))
  images = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
  path = tmp_path / "VIRTUAL_ref.npz"
  reference.write_adm_reference(path, mu, a @ a.T, images=images)
  stats = reference.read_adm_statistics(path)
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma, a @ a.T)
  assert stats.num_images == 5 and stats.features is None
  batches = list(reference.iter_npz_images(path, batch_size=2))
  assert [len(batch) for batch in batches] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate(batches), images)
  # Compressed files stream too; features come from the images via feature_fn.
  compressed = tmp_path / "compressed.npz"
  np.savez_compressed(compressed, mu=mu, sigma=a @ a.T, arr_0=images)
  loaded = reference.load_reference(
      compressed, feature_fn=lambda x: x.reshape(len(x), -1)[:, :6].astype(np.float32),
      batch_size=2)
  np.testing.assert_array_equal(loaded.features, images.reshape(5, -1)[:, :6])
  np.testing.assert_array_equal(loaded.mu, mu)  # mu/sigma are the file's, as in ADM


def test_reference_file_errors_name_the_file_and_key(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, mu=np.zeros(3))
  with pytest.raises(reference.ReferenceError, match="bad.npz: missing array 'sigma'"):
    reference.read_adm_statistics(path)
  np.savez(path, mu=np.zeros(3), sigma=np.zeros((4, 4)))
  with pytest.raises(reference.ReferenceError, match="sigma \\(4, 4\\)"):
    reference.read_adm_statistics(path)


def test_compute_reference_streams_batches_like_all_at_once():
  features = np.random.default_rng(10).normal(size=(30, 5))
  streamed = reference.compute_reference(lambda x: x, [features[:7], features[7:]])
  whole = reference.reference_from_features(features)
  np.testing.assert_allclose(streamed.mu, whole.mu, atol=1e-12)
  np.testing.assert_allclose(streamed.sigma, whole.sigma, atol=1e-12)
  assert streamed.num_images == 30 and streamed.features.shape == (30, 5)


# --- Fashion-MNIST classifier ----------------------------------------------------


def _as_classifier_input(images):
  """uint8 [N, 28, 28] -> float32 [N, 32, 32, 3] in [-1, 1] (pipeline convention)."""
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 127.5 - 1.0
  return np.repeat(padded[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def fashion():
  train = _as_classifier_input(fashion_mnist.read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")[:3000])
  train_labels = fashion_mnist.read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")[:3000]
  test = _as_classifier_input(fashion_mnist.read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:1000])
  test_labels = fashion_mnist.read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")[:1000]
  return train, train_labels, test, test_labels


@pytest.fixture(scope="module")
def briefly_trained(fashion):
  train, train_labels, _, _ = fashion
  return classifier.train_classifier(train, train_labels, steps=80, seed=0, batch_size=64)


def test_classifier_training_lowers_the_loss_and_beats_chance(fashion, briefly_trained):
  train, train_labels, test, test_labels = fashion
  initial = classifier.init_classifier(seed=0)  # where train_classifier(seed=0) starts
  assert (classifier.classifier_loss(briefly_trained, train, train_labels)
          < 0.6 * classifier.classifier_loss(initial, train, train_labels))
  assert classifier.classifier_accuracy(briefly_trained, test, test_labels) > 0.5  # chance 0.1
  features = classifier.classifier_features(briefly_trained, test[:10])
  assert features.shape == (10, classifier.FEATURE_DIM) and features.dtype == np.float32


def test_classifier_save_load_round_trip_and_mismatch(briefly_trained, tmp_path):
  path = tmp_path / "classifier.npz"
  classifier.save_classifier(briefly_trained, path)
  loaded = classifier.load_classifier(path)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(briefly_trained)):
    np.testing.assert_array_equal(got, want)
  with np.load(path) as data:
    arrays = dict(data)
  arrays["conv2/kernel"] = arrays["conv2/kernel"][..., :3]
  del arrays["out/bias"]
  np.savez(path, **arrays)
  with pytest.raises(classifier.ClassifierError) as error:
    classifier.load_classifier(path)
  assert "missing keys: out/bias" in str(error.value)
  assert "mis-shaped keys: conv2/kernel (3, 3, 32, 3) (expected (3, 3, 32, 64))" in str(error.value)


def test_fashion_metrics(fashion, briefly_trained):
  train, _, test, test_labels = fashion
  same = classifier.fashion_metrics(briefly_trained, test, test_labels, test)
  assert abs(same["frechet_distance"]) < 1e-6
  assert (same["precision"], same["recall"]) == (1.0, 1.0)
  assert same["class_accuracy"] == classifier.classifier_accuracy(
      briefly_trained, test, test_labels)
  assert 1.0 < same["classifier_score"] <= 10.0
  real = classifier.fashion_metrics(briefly_trained, train[:1000], None, test)
  noise = np.random.default_rng(11).uniform(-1, 1, size=(1000, 32, 32, 3)).astype(np.float32)
  fake = classifier.fashion_metrics(briefly_trained, noise, None, test)
  assert "class_accuracy" not in real
  assert 10 * real["frechet_distance"] < fake["frechet_distance"]
  assert fake["precision"] < real["precision"]
