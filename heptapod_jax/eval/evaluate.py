"""--mode=eval: score samples and the generator, write WORKDIR/metrics.json.

Inputs: the samples written by --mode=sample (ADM .npz), the generator's EMA
parameters (for the test NLL), and reference data. Metrics:
- `fashion_mnist` (when eval.fashion_metrics): Fréchet distance, precision /
  recall and class accuracy in the feature space of the in-project classifier
  (trained once and cached at eval.classifier_path or WORKDIR/classifier.npz),
  against the Fashion-MNIST test set; plus the same distance between 10k
  training images and the test set, the yardstick for the first one, and
  between as many training images as samples and the test set (the floor at
  this sample count), and the distance and class accuracy of as many test
  images passed through the tokenizer (its floor) when tokenizer.init_from is set.
- `nll`: test NLL of the next token in bits per token over the token shards'
  eval split: exact for codes; for latents, a variational upper bound on the
  density of the scaled latents (see Heptapod.next_token_nll).
- `inception`: FID / IS / precision / recall when eval.inception_weights is
  given, else a note that they were skipped.
"""

import json
import math
import os

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from flax import nnx

from heptapod_jax import data
from heptapod_jax import errors
from heptapod_jax import images as images_lib
from heptapod_jax.data import fashion_mnist
from heptapod_jax.data import preprocess
from heptapod_jax.eval import classifier as classifier_lib
from heptapod_jax.eval import inception as inception_lib
from heptapod_jax.eval import metrics as metrics_lib
from heptapod_jax.eval import reference as reference_lib


def _fashion_images(config, split, limit=None):
  source = fashion_mnist.FashionMnistSource(config.data.fashion_mnist_dir, split,
                                            config.data.image_size)
  count = len(source) if limit is None else min(limit, len(source))
  images = np.stack([preprocess.to_unit_range(source[i]["image"]) for i in range(count)])
  labels = np.array([source[i]["label"] for i in range(count)], np.int32)
  return images, labels


def classifier_params(config, workdir):
  """The cached Fashion-MNIST classifier, trained and saved on first use."""
  path = config.eval.classifier_path or os.path.join(workdir, "classifier.npz")
  if os.path.exists(path):
    return classifier_lib.load_classifier(path), path
  logging.info("[eval] training the Fashion-MNIST classifier (%d steps) -> %s",
               config.eval.classifier_train_steps, path)
  images, labels = _fashion_images(config, "train")
  params = classifier_lib.train_classifier(
      images, labels, steps=config.eval.classifier_train_steps,
      seed=config.eval.classifier_seed, batch_size=config.eval.classifier_batch_size,
      learning_rate=config.eval.classifier_learning_rate)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    classifier_lib.save_classifier(params, path)
  return params, path


def fashion_quality(config, workdir, samples, labels):
  params, path = classifier_params(config, workdir)
  test_images, test_labels = _fashion_images(config, "test")
  # The test set's features serve every distance below.
  test_features = classifier_lib.classifier_features(params, test_images)
  test_statistics = metrics_lib.FeatureStatistics.from_features(test_features)

  def distance_to_test(features):
    return metrics_lib.frechet_distance_of_statistics(
        metrics_lib.FeatureStatistics.from_features(features), test_statistics)

  samples = samples.astype(np.float32) / 127.5 - 1.0
  results = classifier_lib.fashion_metrics(params, samples, labels, test_images,
                                           reference_features=test_features)
  train_images, _ = _fashion_images(config, "train", limit=len(test_images))
  train_features = classifier_lib.classifier_features(params, train_images)
  yardstick = distance_to_test(train_features)
  results["train_vs_test_frechet_distance"] = yardstick
  # Fréchet distances shrink with the sample count (estimation bias): the same
  # distance for as many training images as there are samples is the floor a
  # perfect generator would reach with this many samples.
  same_size = min(len(samples), len(train_features))
  results["real_frechet_distance_at_num_samples"] = distance_to_test(
      train_features[:same_size])
  results["frechet_distance_ratio"] = results["frechet_distance"] / max(yardstick, 1e-12)
  results["classifier_test_accuracy"] = classifier_lib.classifier_accuracy(
      params, test_images, test_labels)
  if config.tokenizer.init_from:
    # The tokenizer's floor: test images through encode -> decode, as many as
    # there are samples. A generator cannot beat its tokenizer's reconstructions.
    count = min(len(samples), len(test_images))
    reconstructions = _reconstruct(config.tokenizer.init_from, test_images[:count])
    features, logits = classifier_lib.classifier_features_and_logits(params, reconstructions)
    results["reconstruction_frechet_distance"] = distance_to_test(features)
    results["reconstruction_class_accuracy"] = float(
        np.mean(np.argmax(logits, axis=1) == test_labels[:count]))
  results["classifier_path"] = path
  return results


def _reconstruct(tokenizer_dir, images, batch_size=500):
  """images [N, S, S, 3] in [-1, 1] -> decode(encode(images)), rounded to uint8 levels."""
  from heptapod_jax.tools import convert_tokenizer
  tokenizer = convert_tokenizer.load_tokenizer(tokenizer_dir)
  graphdef, state = nnx.split(tokenizer)

  @jax.jit
  def round_trip(state, x):
    model = nnx.merge(graphdef, state)
    return model.decode(model.encode(x))

  outputs = []
  for first in range(0, len(images), batch_size):
    chunk = images[first:first + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                             chunk.dtype)]) if len(chunk) < batch_size else chunk
    outputs.append(np.asarray(round_trip(state, padded))[:len(chunk)])
  # Samples are stored as uint8; quantize the same way.
  return images_lib.to_uint8(np.concatenate(outputs)).astype(np.float32) / 127.5 - 1.0


def test_nll(config, workdir, max_batches=None):
  """Mean next-token NLL over the token shards' eval split, in bits per token."""
  from heptapod_jax.parallel import sharding
  from heptapod_jax.sample import generate

  mesh = sharding.make_mesh(config)
  checkpoint_dir = config.sample.checkpoint or os.path.join(workdir, "checkpoints")
  model, step = generate.load_generator(config, checkpoint_dir, mesh)
  result = model_nll(config, model, mesh, max_batches)
  result["checkpoint_step"] = int(step)
  return result


def model_nll(config, model, mesh, max_batches=None):
  """Mean next-token NLL of `model` over the eval split (bits and nats per token)."""
  import jax.numpy as jnp

  graphdef, state = nnx.split(model)
  num_positions = model.num_positions
  scale = config.tokenizer.latent_scale if config.tokenizer.kind == "continuous" else None

  @jax.jit
  def batch_nll(state, labels, tokens, rng):
    model = nnx.merge(graphdef, state)
    tokens = tokens.reshape((tokens.shape[0], num_positions) + tokens.shape[3:])
    if scale is not None:
      tokens = tokens.astype(jnp.float32) * scale
    return model.next_token_nll(labels, tokens, rng)

  split = data.eval_split(config.data)
  dataset = data.make_dataset(config.data, split=split, seed=config.seed,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), shuffle=False,
                              num_epochs=1, drop_remainder=False)
  total, count = 0.0, 0
  with jax.set_mesh(mesh):
    for index, batch in enumerate(dataset):
      if max_batches is not None and index >= max_batches:
        break
      nll = np.asarray(batch_nll(state, batch["label"], batch["tokens"],
                                 jax.random.key(index)))
      mask = np.asarray(batch["mask"])
      total += float(nll[mask].sum())
      count += int(mask.sum()) * num_positions
      logging.info("[eval] NLL batch %d%s: %.4f bits/token so far", index + 1,
                   f"/{max_batches}" if max_batches else "",
                   total / max(count, 1) / math.log(2))
  nats = total / max(count, 1)
  return {"bits_per_token": nats / math.log(2), "nats_per_token": nats,
          "num_tokens": count, "split": split,
          "kind": ("exact cross-entropy" if scale is None else
                   "diffusion variational bound on the scaled-latent density")}


def run(config, workdir, samples_path=None):
  """Computes every configured metric; writes WORKDIR/metrics.json."""
  samples_path = samples_path or os.path.join(
      config.sample.output_dir or os.path.join(workdir, "samples"), "samples.npz")
  if not os.path.exists(samples_path):
    raise errors.ConfigError(
        f"sample.output_dir: no samples at {samples_path}; run --mode=sample first")
  with np.load(samples_path) as archive:
    samples = archive["arr_0"]
    labels = archive["arr_1"] if "arr_1" in archive else None
  results = {"samples": samples_path, "num_samples": int(len(samples))}
  if config.eval.fashion_metrics:
    results["fashion_mnist"] = fashion_quality(config, workdir, samples, labels)
  if config.data.dataset == "cached_tokens":
    results["nll"] = test_nll(config, workdir, config.eval.nll_max_batches)
  reference = None
  if config.eval.reference:
    reference = reference_lib.load_reference(config.eval.reference)
  inception = inception_lib.inception_metrics(config.eval, samples, reference)
  results["inception"] = inception
  if "skipped" in inception:
    logging.warning("[eval] %s", inception["skipped"])
  if jax.process_index() == 0:
    path = os.path.join(workdir, "metrics.json")
    with open(path, "w") as f:
      json.dump(results, f, indent=2)
    writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"))
    writer.write_scalars(0, {f"{group}/{key}": value
                             for group, values in results.items() if isinstance(values, dict)
                             for key, value in values.items()
                             if isinstance(value, (int, float))})
    writer.close()
    logging.info("[eval] wrote %s", path)
  return results
