"""Config parsing, validation errors, and preset parameter counts."""

import pytest
from flax import nnx

from conftest import load_config, micro_config
from heptapod_jax import config_lib
from heptapod_jax import presets
from heptapod_jax.models import heptapod
from heptapod_jax.models import layers


def test_parse_arg_types_bare_flags_and_first_value():
  arg = config_lib.parse_arg("L,runlocal,steps=7,lr=0.5", variant="B",
                             runlocal=False, steps=1, lr=1.0)
  assert (arg.variant, arg.runlocal, arg.steps, arg.lr) == ("L", True, 7, 0.5)
  assert config_lib.parse_arg("", variant="B").variant == "B"
  with pytest.raises(config_lib.ConfigError, match="'bogus'.*allowed"):
    config_lib.parse_arg("bogus=1", variant="B")
  with pytest.raises(config_lib.ConfigError, match="'steps': expected int"):
    config_lib.parse_arg("steps=x", steps=1)


def test_config_files_build_and_validate():
  for name, variant in [("b256", "B"), ("l256", "L"), ("xl256", "XL"), ("h256", "H")]:
    config = load_config(name)
    assert config.model.variant == variant
    assert config_lib.grid_shape(config) == (16, 16)
    config_lib.validate(config, num_devices=8)
  config = load_config("b256", "variant=L,runlocal,tokenizer=vq16")
  assert (config.model.variant, config.data.batch_size, config.tokenizer.kind) == (
      "L", 8, "discrete")
  assert config.model.backbone.width == presets.PRESETS["L"]["backbone"][1]
  fashion = load_config("fashion_mnist")
  config_lib.validate(fashion, num_devices=1)
  assert config_lib.grid_shape(fashion) == (8, 8)


@pytest.mark.parametrize("field, value, message", [
    ("model.head.kind", "bogus", "model.head.kind: invalid value 'bogus'; allowed: global, local, ntp"),
    ("model.head.queries", "all", "model.head.queries: invalid value 'all'; allowed: remaining, grid"),
    ("model.dtype", "float16", "model.dtype: invalid value 'float16'; allowed: float32, bfloat16"),
    ("model.head.density", 17, "model.head.density: 17 is larger than the grid (4x4 = 16 positions)"),
    ("model.head.window", 20, "model.head.window: 20 is larger than the grid"),
    ("model.head.timesteps_per_image", 17, "model.head.timesteps_per_image: 17 is larger"),
    ("model.head.num_heads", 3, "model.head.num_heads: 3 does not divide model.head.width=32"),
    ("model.backbone.width", 36, "model.backbone.num_heads: head dim 18 must be a multiple of 4"),
    ("data.image_size", 18, "data.image_size: 18 is not a multiple of the tokenizer stride"),
    ("data.batch_size", 12, "data.batch_size: 12 is not divisible by the data-parallel size"),
    ("model.head.depth", 0, "model.head.depth: must be a positive integer"),
    ("model.label_dropout", 1.5, "model.label_dropout: must be in [0, 1)"),
    ("mesh.data", 3, "mesh: data*fsdp*tensor = 3 but there are 8 devices"),
])
def test_validation_names_field_and_allowed_values(field, value, message):
  config = micro_config()
  section, _, key = field.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[key] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, num_devices=8)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_density_larger_than_window_and_grid_queries_for_ntp():
  config = micro_config(window=4, density=5)
  with pytest.raises(config_lib.ConfigError, match="model.head.density: 5 is larger than model.head.window=4"):
    config_lib.validate(config)
  config = micro_config(kind="ntp", queries="grid")
  with pytest.raises(config_lib.ConfigError, match="model.head.queries"):
    config_lib.validate(config)


def test_mesh_fill():
  config = micro_config()
  assert config_lib.mesh_shape(config, 8) == (8, 1, 1)
  config.mesh.fsdp, config.mesh.tensor = 2, 2
  assert config_lib.mesh_shape(config, 8) == (2, 2, 2)
  config.mesh.tensor = 3
  with pytest.raises(config_lib.ConfigError, match="mesh.data: cannot fill"):
    config_lib.mesh_shape(config, 8)


def _block_params(width, hidden, qk_head_dim=0, cross=False):
  attention = 4 * width * width + 2 * qk_head_dim
  block = 2 * width + attention + 3 * width * hidden
  if cross:
    block += width + attention
  return block


def expected_counts(config):
  """Closed-form parameter counts of the Heptapod modules (global head)."""
  model, tok = config.model, config.tokenizer
  rows, cols = config_lib.grid_shape(config)
  positions = rows * cols
  width = model.backbone.width
  hidden = model.backbone.mlp_hidden or layers.swiglu_hidden(width)
  if tok.kind == "discrete":
    token_embed = tok.codebook_size * width
  else:
    token_embed = tok.latent_channels * width + width
  backbone = (token_embed + (model.num_classes + 1) * width
              + model.backbone.depth * _block_params(width, hidden) + width)
  head_width = model.head.width
  head = (width * head_width + head_width + positions * head_width
          + model.head.depth * _block_params(head_width, layers.swiglu_hidden(head_width))
          + head_width)
  if tok.kind == "discrete":
    output = head_width * tok.codebook_size + tok.codebook_size
  else:
    d, c = model.diffusion.width, tok.latent_channels
    output = (256 * d + d + d * d + d + head_width * d + d + c * d + d
              + model.diffusion.depth * (2 * d + 2 * (d * d + d) + 3 * d * d + 3 * d)
              + 2 * d * d + 2 * d + d * c + c)
  return {"backbone": backbone, "head": head, "output": output,
          "total": backbone + head + output}


def _count(config):
  model = nnx.eval_shape(lambda: heptapod.Heptapod(config, rngs=nnx.Rngs(0)))
  return heptapod.component_parameter_counts(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("config_name, arg", [
    ("fashion_mnist", "variant=micro"),
    ("fashion_mnist", "variant=tiny,tokenizer=kl_small"),
    ("b256", "tokenizer=vq16"),
    ("b256", None),
])
def test_preset_parameter_counts_match_closed_form(config_name, arg):
  config = load_config(config_name, arg)
  assert _count(config) == expected_counts(config)


def test_heptapod_h_matches_paper_size():
  """Heptapod-H: 941M parameters in the paper; we require 0.94B +- 3%."""
  config = load_config("h256")
  counts = _count(config)
  assert counts == expected_counts(config)
  assert abs(counts["total"] - 0.94e9) <= 0.03 * 0.94e9, counts
  # Sizes grow with the preset.
  totals = [expected_counts(load_config("b256", f"variant={v}"))["total"]
            for v in ("B", "L", "XL", "H")]
  assert totals == sorted(totals)
