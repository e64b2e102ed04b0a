"""Sample-quality metrics on feature vectors: Fréchet distance, Inception Score,
precision/recall.

Everything here works on features already extracted (Inception pool3, or the
in-project Fashion-MNIST classifier) and knows nothing of the network that made
them. Statistics are accumulated in float64 on the host.

- `FeatureStatistics`: streaming mean and covariance over batches.
- `frechet_distance(mu1, sigma1, mu2, sigma2)`: ||mu1 - mu2||^2 +
  tr(S1 + S2 - 2 (S1 S2)^{1/2}); the trace of the matrix square root is the sum
  of singular values of S1^{1/2} S2^{1/2} (symmetric square roots by
  eigendecomposition), so singular covariances need no eps and FD(x, x) is
  zero to rounding.
- `inception_score(probabilities, num_splits)`: exp(E_x KL(p(y|x) || p(y)))
  per split (improved-GAN: 10 equal splits), mean and std over splits.
- `precision_recall(reference, samples, neighbourhood=3)`: k-NN manifolds of
  Kynkäänniemi et al. 2019 as in the ADM evaluator (squared Euclidean
  distances, radius = distance to the k-th nearest other point, a point is on a
  manifold when within the radius of any of its points).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


class FeatureStatistics:
  """Streaming mean and (unbiased, like np.cov) covariance of [N, D] features.

  Sums are kept in float64 around a shift (the first batch's mean) so that
  large feature offsets do not cancel catastrophically.
  """

  def __init__(self, dim):
    self.dim = int(dim)
    self.count = 0
    self._shift = None
    self._sum = np.zeros((self.dim,), np.float64)
    self._outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features):
    """Adds a batch of features [n, D] (any float dtype)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(
          f"FeatureStatistics.update: expected features [n, {self.dim}], "
          f"got shape {features.shape}")
    if not features.shape[0]:
      return self
    if self._shift is None:
      self._shift = features.mean(axis=0)
    centred = features - self._shift
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred
    self.count += features.shape[0]
    return self

  @property
  def mean(self):
    """[D] float64."""
    if self.count < 1:
      raise ValueError("FeatureStatistics.mean: no features were added")
    return self._shift + self._sum / self.count

  @property
  def covariance(self):
    """[D, D] float64, normalised by count - 1 (np.cov's default)."""
    if self.count < 2:
      raise ValueError(
          f"FeatureStatistics.covariance: needs at least 2 features, "
          f"got {self.count}")
    centred_mean = self._sum / self.count
    scatter = self._outer - self.count * np.outer(centred_mean, centred_mean)
    return scatter / (self.count - 1)

  @classmethod
  def from_features(cls, features):
    features = np.asarray(features)
    return cls(features.shape[-1]).update(features)


def _symmetric_sqrt(matrix):
  """Square root of a symmetric PSD matrix (negative eigenvalues clipped)."""
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1, sigma2):
  """tr((sigma1 sigma2)^{1/2}) for symmetric PSD sigma1, sigma2 (float64).

  (sigma1 sigma2)^{1/2} has the eigenvalues of (sigma1^{1/2} sigma2
  sigma1^{1/2})^{1/2}, which are the singular values of sigma1^{1/2}
  sigma2^{1/2}; summing those (a nuclear norm) avoids square-rooting
  eigenvalues near zero, whose rounding error sqrt would blow up.
  """
  product = _symmetric_sqrt(sigma1) @ _symmetric_sqrt(sigma2)
  return float(np.linalg.svd(product, compute_uv=False).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  mu: [D]; sigma: [D, D] symmetric PSD (may be singular). Returns a float >= 0
  up to rounding.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"frechet_distance: means differ in shape: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        f"frechet_distance: covariances must be [{mu1.shape[0]}, {mu1.shape[0]}], "
        f"got {sigma1.shape} and {sigma2.shape}")
  for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"frechet_distance: {name} has non-finite entries")
  sigma1 = (sigma1 + sigma1.T) / 2.0
  sigma2 = (sigma2 + sigma2.T) / 2.0
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_of_statistics(stats1, stats2):
  """Fréchet distance between two objects with `.mean` and `.covariance`."""
  return frechet_distance(stats1.mean, stats1.covariance, stats2.mean, stats2.covariance)


def softmax(logits):
  """Float64 softmax over the last axis of a host array."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


def inception_score(probabilities, num_splits=10):
  """Inception Score of class probabilities [N, K] (rows sum to 1).

  The rows are cut into `num_splits` consecutive, near-equal parts (improved-GAN
  convention; the ADM evaluator uses parts of 5000, i.e. 10 parts for 50k).
  Returns (mean, std) over the parts.
  """
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.ndim != 2:
    raise ValueError(f"inception_score: expected [N, K] probabilities, got {probabilities.shape}")
  count = probabilities.shape[0]
  if not 1 <= num_splits <= count:
    raise ValueError(
        f"inception_score: num_splits must be in [1, N={count}], got {num_splits}")
  scores = []
  for index in range(num_splits):
    part = probabilities[index * count // num_splits:(index + 1) * count // num_splits]
    marginal = part.mean(axis=0, keepdims=True)
    # xlogy-style: 0 * log 0 = 0 for one-hot rows.
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
    scores.append(np.exp(terms.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


@functools.partial(jax.jit, static_argnames=("count",))
def _smallest_squared_distances(rows, columns, column_valid, count):
  """The `count` smallest squared distances from each row to the valid columns.

  rows: [R, D]; columns: [C, D]; column_valid: [C] bool. Returns [R, count].
  """
  distances = _squared_distances(rows, columns)
  distances = jnp.where(column_valid[None], distances, jnp.inf)
  return -jax.lax.top_k(-distances, count)[0]


@jax.jit
def _within_radii(rows, columns, column_radii):
  """Whether each row lies within the radius of any column: [R] bool.

  column_radii: [C] squared radii; -inf for padded columns.
  """
  distances = _squared_distances(rows, columns)
  return jnp.any(distances <= column_radii[None], axis=1)


def _squared_distances(rows, columns):
  """||u||^2 - 2 u.v + ||v||^2, clipped at 0, float32 with full precision: [R, C]."""
  dot = jnp.matmul(rows, columns.T, precision=jax.lax.Precision.HIGHEST)
  row_norms = jnp.sum(rows * rows, axis=1)[:, None]
  column_norms = jnp.sum(columns * columns, axis=1)[None, :]
  return jnp.maximum(row_norms - 2.0 * dot + column_norms, 0.0)


def _padded_blocks(features, block_size):
  """Yields (start, block [block_size, D], valid [block_size]) over the rows."""
  count = features.shape[0]
  for start in range(0, count, block_size):
    block = features[start:start + block_size]
    valid = np.ones((block_size,), bool)
    if block.shape[0] < block_size:
      valid[block.shape[0]:] = False
      block = np.concatenate(
          [block, np.zeros((block_size - block.shape[0],) + block.shape[1:], block.dtype)])
    yield start, block, valid


def manifold_radii(features, neighbourhood=3, block_size=10000):
  """Squared distance of each point to its `neighbourhood`-th nearest other point.

  features: [N, D]. Returns [N] float32 (ADM: index k of the sorted row, whose
  index 0 is the point itself).
  """
  features = np.asarray(features, np.float32)
  count = features.shape[0]
  if count <= neighbourhood:
    raise ValueError(
        f"manifold_radii: needs more than neighbourhood={neighbourhood} points, got {count}")
  block_size = min(block_size, count)
  keep = neighbourhood + 1
  radii = np.zeros((count,), np.float32)
  for row_start, rows, _ in _padded_blocks(features, block_size):
    nearest = []
    for _, columns, column_valid in _padded_blocks(features, block_size):
      nearest.append(np.asarray(
          _smallest_squared_distances(rows, columns, column_valid, keep)))
    nearest = np.sort(np.concatenate(nearest, axis=1), axis=1)[:, neighbourhood]
    stop = min(row_start + block_size, count)
    radii[row_start:stop] = nearest[:stop - row_start]
  return radii


def manifold_coverage(points, manifold_features, manifold_radii_, block_size=10000):
  """Fraction of `points` [N, D] inside the manifold of `manifold_features` [M, D]."""
  points = np.asarray(points, np.float32)
  manifold_features = np.asarray(manifold_features, np.float32)
  block_size = min(block_size, max(points.shape[0], manifold_features.shape[0]))
  inside = np.zeros((points.shape[0],), bool)
  for row_start, rows, _ in _padded_blocks(points, block_size):
    hit = np.zeros((block_size,), bool)
    for column_start, columns, column_valid in _padded_blocks(manifold_features, block_size):
      radii = np.full((block_size,), -np.inf, np.float32)
      radii[column_valid] = manifold_radii_[column_start:column_start + block_size]
      hit |= np.asarray(_within_radii(rows, columns, radii))
    stop = min(row_start + block_size, points.shape[0])
    inside[row_start:stop] = hit[:stop - row_start]
  return float(inside.mean())


@dataclasses.dataclass(frozen=True)
class PrecisionRecall:
  precision: float  # fraction of samples on the reference manifold
  recall: float  # fraction of reference points on the sample manifold


def precision_recall(reference_features, sample_features, neighbourhood=3, block_size=10000):
  """Improved precision and recall (Kynkäänniemi et al. 2019), ADM evaluator style.

  reference_features: [N, D]; sample_features: [M, D]. Distances run in
  jitted [block_size, block_size] tiles on the default device.
  """
  reference_features = np.asarray(reference_features, np.float32)
  sample_features = np.asarray(sample_features, np.float32)
  if reference_features.ndim != 2 or sample_features.ndim != 2 or (
      reference_features.shape[1] != sample_features.shape[1]):
    raise ValueError(
        f"precision_recall: expected [N, D] and [M, D] features, got "
        f"{reference_features.shape} and {sample_features.shape}")
  reference_radii = manifold_radii(reference_features, neighbourhood, block_size)
  sample_radii = manifold_radii(sample_features, neighbourhood, block_size)
  return PrecisionRecall(
      precision=manifold_coverage(sample_features, reference_features, reference_radii, block_size),
      recall=manifold_coverage(reference_features, sample_features, sample_radii, block_size))
