"""Device mesh and logical-to-mesh sharding rules.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...);
one rules table per preset maps them onto the ('data', 'fsdp', 'tensor') mesh.
A dimension that the mapped mesh axis does not divide is replicated instead
(small embeddings, class tables), so every preset runs on every mesh shape.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from heptapod_jax import config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes

# FSDP over the model dimension, tensor parallelism over MLP/heads/vocab.
_FSDP_TENSOR = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("codebook", "tensor"),
    ("head_embed", None),
    ("position", None),
    ("latent", None),
    ("frequency", None),
    ("norm", None),
)
# Large presets also shard the query-position table over fsdp.
_FSDP_TENSOR_LARGE = tuple(
    (name, "fsdp" if name == "position" else axis) for name, axis in _FSDP_TENSOR)

# Conv tokenizers: FSDP over output channels; codebooks over tensor.
_TOKENIZER = (
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_height", None),
    ("conv_width", None),
    ("codebook", "tensor"),
    ("code_dim", None),
    ("norm", None),
)

LOGICAL_AXIS_RULES = {
    "tokenizer": _TOKENIZER,
    "micro": _FSDP_TENSOR,
    "tiny": _FSDP_TENSOR,
    "B": _FSDP_TENSOR,
    "L": _FSDP_TENSOR,
    "XL": _FSDP_TENSOR_LARGE,
    "H": _FSDP_TENSOR_LARGE,
}


def make_mesh(config, devices=None):
  """The ('data', 'fsdp', 'tensor') mesh with Auto axes, sizes from config.mesh."""
  devices = list(devices if devices is not None else jax.devices())
  shape = config_lib.mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_for(name):
  """The rules table of a preset (or "tokenizer") as a dict: logical -> mesh axis."""
  if name not in LOGICAL_AXIS_RULES:
    raise ValueError(f"no sharding rules for {name!r}; known: {sorted(LOGICAL_AXIS_RULES)}")
  return dict(LOGICAL_AXIS_RULES[name])


def logical_to_spec(names, shape, mesh, rules):
  """PartitionSpec for one array: each logical name -> its mesh axis, if it divides.

  names: tuple of logical names (or None) per dimension; an unknown name or a
  mesh axis that is already used or does not divide the dimension replicates.
  """
  used, spec = set(), []
  for name, size in zip(names, shape):
    axis = rules.get(name)
    if axis is None or axis in used or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def state_shardings(state, mesh, rules):
  """Pure dict of NamedShardings for an nnx.State (or abstract state).

  The result mirrors `nnx.to_pure_dict(state)`, the layout of train states.
  """
  def one(variable):
    names = variable.get_metadata().get("out_sharding") or ()
    shape = variable.get_value().shape
    names = tuple(names) + (None,) * (len(shape) - len(names))
    return variable.replace(
        NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)))
  shardings = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh, ndim):
  """Batch arrays [batch, ...] are split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh):
  return NamedSharding(mesh, P())


def put_local_batch(batch, mesh):
  """Host-local numpy batch (this process's rows) -> global jax arrays."""
  return {key: jax.make_array_from_process_local_data(
      batch_sharding(mesh, np.ndim(value)), np.asarray(value))
          for key, value in batch.items()}
