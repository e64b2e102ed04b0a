"""Small helpers around flax.nnx state."""

import jax
import jax.numpy as jnp
from flax import nnx


def fresh_rng_state(rest, rng):
  """The model's non-parameter state (dropout RNG streams) keyed by `rng`.

  Each stream gets its own key, derived from the step's rng and its index, so
  no two dropout layers share masks and a resumed run repeats them exactly.
  """
  is_variable = lambda x: isinstance(x, nnx.Variable)
  variables, treedef = jax.tree.flatten(rest, is_leaf=is_variable)
  fresh = []
  for index, variable in enumerate(variables):
    if isinstance(variable, nnx.RngKey):
      fresh.append(variable.replace(jax.random.fold_in(rng, 1000 + index)))
    elif isinstance(variable, nnx.RngCount):
      fresh.append(variable.replace(jnp.zeros((), jnp.uint32)))
    else:
      raise ValueError(
          f"unexpected non-parameter model state {type(variable).__name__}; "
          "the train step only knows parameters and RNG streams")
  return jax.tree.unflatten(treedef, fresh)
