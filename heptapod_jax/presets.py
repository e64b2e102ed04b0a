"""Model size presets shared by configs and tests.

Each preset fixes the width/depth of the causal backbone, of the 2D distribution
head, and of the MAR-style diffusion MLP used for continuous tokens. B/L/H follow
MAR's B/L/H layout (encoder half -> causal backbone, decoder half -> 2D head,
DiffLoss MLP -> diffusion head); XL sits between L and H. H's diffusion MLP
is 1408 wide (MAR-H: 1536) so that H totals the paper's 941M with our SwiGLU
backbone (967M with 1536). `micro` and `tiny` are
for tests and CPU runs.
"""

PRESETS = {
    # name: backbone (depth, width, heads), head (depth, width, heads), diffusion (depth, width)
    "micro": dict(backbone=(2, 32, 2), head=(1, 32, 2), diffusion=(2, 32)),
    "tiny": dict(backbone=(4, 128, 4), head=(2, 128, 4), diffusion=(3, 128)),
    "B": dict(backbone=(12, 768, 12), head=(12, 768, 12), diffusion=(6, 1024)),
    "L": dict(backbone=(16, 1024, 16), head=(16, 1024, 16), diffusion=(8, 1280)),
    "XL": dict(backbone=(18, 1152, 16), head=(18, 1152, 16), diffusion=(10, 1408)),
    "H": dict(backbone=(20, 1280, 16), head=(20, 1280, 16), diffusion=(12, 1408)),
}


def apply_preset(model_config, name):
  """Writes the sizes of preset `name` into a `config.model` ConfigDict."""
  if name not in PRESETS:
    raise ValueError(
        f"model.variant: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
  preset = PRESETS[name]
  model_config.variant = name
  (model_config.backbone.depth, model_config.backbone.width,
   model_config.backbone.num_heads) = preset["backbone"]
  (model_config.head.depth, model_config.head.width,
   model_config.head.num_heads) = preset["head"]
  model_config.diffusion.depth, model_config.diffusion.width = preset["diffusion"]
  return model_config
