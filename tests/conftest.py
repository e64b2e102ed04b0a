"""Test set-up: 8 fake CPU devices (set before jax is imported) and tiny configs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

from absl import flags  # noqa: E402
import pytest  # noqa: E402

# Grain workers and absl-flag users need parsed flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(name, arg=None):
  """Loads configs/<name>.py the way --config does and returns get_config(arg)."""
  path = REPO / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def micro_config(tokenizer="vq_small", image_size=16, **head):
  """micro preset on a 4x4 token grid (16 positions); `head` overrides model.head."""
  config = load_config("fashion_mnist", f"variant=micro,tokenizer={tokenizer}")
  config.data.image_size = image_size
  config.data.batch_size = 8
  # Equivalence tests compare at float32 tolerances (the default run uses bfloat16).
  config.model.dtype = "float32"
  config.model.head.timesteps_per_image = 4
  config.model.head.density = 6
  for key, value in head.items():
    config.model.head[key] = value
  return config


@pytest.fixture(scope="session")
def repo_root():
  return REPO
