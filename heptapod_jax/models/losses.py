"""Cross-entropy over a large code vocabulary, computed chunk by chunk.

With B·T·K supervised (timestep, position) pairs and 16,384 codes, the full
logits tensor would not fit; the rows are processed `chunk_size` at a time
inside a rematerialised scan, so only one chunk of logits lives at once, in
the forward and in the backward pass.
"""

import jax
import jax.numpy as jnp


def cross_entropy_rows(features, kernel, bias, targets):
  """Naive per-row cross-entropy. features [M, W], kernel [W, V], targets [M] -> [M]."""
  logits = jnp.dot(features, kernel.astype(features.dtype),
                   preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logits


def chunked_cross_entropy(features, kernel, bias, targets, chunk_size):
  """Same as `cross_entropy_rows`, never holding more than chunk_size x V logits."""
  rows = features.shape[0]
  if rows <= chunk_size:
    return cross_entropy_rows(features, kernel, bias, targets)
  num_chunks = -(-rows // chunk_size)
  padding = num_chunks * chunk_size - rows
  features = jnp.pad(features, ((0, padding), (0, 0)))
  targets = jnp.pad(targets, (0, padding))
  features = features.reshape(num_chunks, chunk_size, -1)
  targets = targets.reshape(num_chunks, chunk_size)

  @jax.checkpoint
  def chunk(carry, inputs):
    return carry, cross_entropy_rows(inputs[0], kernel, bias, inputs[1])

  _, losses = jax.lax.scan(chunk, None, (features, targets))
  return losses.reshape(-1)[:rows]
