"""Reference statistics for Fréchet distances and precision/recall.

A reference is the mean and covariance of the reference set's features, plus
(for precision/recall) the features themselves. It is either computed by the
same code from a set of images, or read from an ADM reference batch `.npz`
(openai/guided-diffusion evaluations, e.g. VIRTUAL_imagenet256_labeled.npz):

  mu     [2048]        float64, mean of Inception pool3 features
  sigma  [2048, 2048]  float64, their covariance (np.cov, ddof=1)
  mu_s, sigma_s        optional, the spatial (sFID) statistics; read, unused
  arr_0  [N, H, W, 3]  optional uint8 reference images, [0, 255]

The images are streamed from the zip member in batches (an ImageNet reference
batch holds about 2 GB of pixels), like the ADM evaluator does.
"""

import dataclasses
import os
import zipfile

import numpy as np

from heptapod_jax.eval import metrics


class ReferenceError(ValueError):
  """A reference file is missing, unreadable or has inconsistent arrays."""


@dataclasses.dataclass
class ReferenceStatistics:
  mu: np.ndarray  # [D] float64
  sigma: np.ndarray  # [D, D] float64
  features: np.ndarray | None = None  # [N, D] float32, for precision/recall
  num_images: int | None = None


def reference_from_features(features, keep_features=True):
  """ReferenceStatistics of features [N, D] (mean, np.cov-style covariance)."""
  features = np.asarray(features)
  stats = metrics.FeatureStatistics.from_features(features)
  return ReferenceStatistics(
      mu=stats.mean, sigma=stats.covariance,
      features=features.astype(np.float32) if keep_features else None,
      num_images=int(features.shape[0]))


def compute_reference(feature_fn, image_batches, keep_features=True):
  """Streams `image_batches` through `feature_fn` (images -> [n, D] features).

  The mean/covariance accumulate batch by batch in float64; the features are
  kept only when `keep_features` (precision/recall needs them).
  """
  stats, kept = None, []
  for images in image_batches:
    features = np.asarray(feature_fn(images))
    if stats is None:
      stats = metrics.FeatureStatistics(features.shape[1])
    stats.update(features)
    if keep_features:
      kept.append(features.astype(np.float32))
  if stats is None:
    raise ReferenceError("compute_reference: no images")
  return ReferenceStatistics(
      mu=stats.mean, sigma=stats.covariance,
      features=np.concatenate(kept) if keep_features else None,
      num_images=stats.count)


def _npz_member(key):
  return f"{key}.npy"


def npz_keys(path):
  """Array names stored in an .npz, without opening the arrays."""
  try:
    with zipfile.ZipFile(path) as archive:
      return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
  except (OSError, zipfile.BadZipFile) as error:
    raise ReferenceError(f"{path}: not a readable .npz ({error})") from None


def npz_array_shape(path, key):
  """(shape, dtype) of array `key` in an .npz, read from its header only."""
  with zipfile.ZipFile(path) as archive, archive.open(_npz_member(key)) as member:
    shape, _, dtype = _read_header(member)
  return shape, dtype


def _read_header(member):
  version = np.lib.format.read_magic(member)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(member)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(member)
  raise ReferenceError(f"unsupported .npy format version {version}")


def iter_npz_images(path, batch_size, key="arr_0"):
  """Yields [<=batch_size, H, W, C] batches of array `key`, streamed from disk."""
  if key not in npz_keys(path):
    raise ReferenceError(f"{path}: no array {key!r} (has {npz_keys(path)})")
  with zipfile.ZipFile(path) as archive, archive.open(_npz_member(key)) as member:
    shape, fortran_order, dtype = _read_header(member)
    if fortran_order or dtype.hasobject:
      array = np.load(path)[key]
      for start in range(0, array.shape[0], batch_size):
        yield array[start:start + batch_size]
      return
    per_item = int(np.prod(shape[1:])) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      count = min(batch_size, shape[0] - start)
      data = member.read(count * per_item)
      if len(data) != count * per_item:
        raise ReferenceError(f"{path}: {key} is truncated at item {start}")
      yield np.frombuffer(data, dtype).reshape((count,) + tuple(shape[1:]))


def read_adm_statistics(path):
  """ReferenceStatistics (mu, sigma; no features) from an ADM reference .npz."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ReferenceError(f"eval.reference: no such file: {path}")
  keys = npz_keys(path)
  for key in ("mu", "sigma"):
    if key not in keys:
      raise ReferenceError(f"{path}: missing array {key!r} (has {keys})")
  with np.load(path, allow_pickle=False) as data:
    mu = np.asarray(data["mu"], np.float64)
    sigma = np.asarray(data["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ReferenceError(
        f"{path}: mu must be [D] and sigma [D, D]; got mu {mu.shape}, sigma {sigma.shape}")
  num_images = npz_array_shape(path, "arr_0")[0][0] if "arr_0" in keys else None
  return ReferenceStatistics(mu=mu, sigma=sigma, num_images=num_images)


def load_reference(path, feature_fn=None, batch_size=500):
  """An ADM reference .npz as ReferenceStatistics.

  mu/sigma come from the file (as the ADM evaluator does). When the file has
  images (arr_0) and `feature_fn` (images -> [n, D]) is given, their features
  are computed for precision/recall and checked against mu's dimension.
  """
  reference = read_adm_statistics(path)
  if feature_fn is not None and "arr_0" in npz_keys(path):
    computed = compute_reference(feature_fn, iter_npz_images(path, batch_size))
    if computed.features.shape[1] != reference.mu.shape[0]:
      raise ReferenceError(
          f"{path}: features of arr_0 have {computed.features.shape[1]} dims, "
          f"mu has {reference.mu.shape[0]}")
    reference.features = computed.features
    reference.num_images = computed.num_images
  return reference


def write_adm_reference(path, mu, sigma, images=None, mu_spatial=None, sigma_spatial=None):
  """Writes an ADM-format reference .npz (keys mu, sigma, [arr_0, mu_s, sigma_s])."""
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ReferenceError(
        f"write_adm_reference: mu must be [D] and sigma [D, D]; got {mu.shape}, {sigma.shape}")
  arrays = {"mu": mu, "sigma": sigma}
  if images is not None:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ReferenceError(
          f"write_adm_reference: images must be uint8 [N, H, W, C], got "
          f"{images.dtype} {images.shape}")
    arrays["arr_0"] = images
  if mu_spatial is not None:
    arrays["mu_s"] = np.asarray(mu_spatial, np.float64)
    arrays["sigma_s"] = np.asarray(sigma_spatial, np.float64)
  np.savez(path, **arrays)
