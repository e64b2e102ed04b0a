"""Config helpers: big_vision-style argument parsing, the generator config, validation.

Config files under `configs/` call `parse_arg` on the string after `:` in
`--config=configs/b256.py:variant=L,runlocal` and build their ConfigDict with
`generator_config`. `validate` is the one place that rejects bad values at
start-up; its errors name the field and the allowed values.
"""

import ml_collections
from ml_collections import config_dict

from heptapod_jax import data
from heptapod_jax import errors
from heptapod_jax import eval as eval_lib
from heptapod_jax import presets
from heptapod_jax.sample import sampler
from heptapod_jax.train import optim

HEAD_KINDS = ("global", "local", "ntp")
HEAD_QUERIES = ("remaining", "grid")
DTYPES = ("float32", "bfloat16")
DIFFUSION_SCHEDULES = ("cosine",)
MODES = ("train", "sample", "eval", "extract", "export", "summary")

# Visual tokenizers the generator can sit on. `kind` decides the output layer:
# discrete codes -> logits + cross-entropy, continuous latents -> diffusion loss.
TOKENIZERS = {
    "vq16": dict(kind="discrete", stride=16, codebook_size=16384, code_dim=8),
    "kl16": dict(kind="continuous", stride=16, latent_channels=16),
    "vq_small": dict(kind="discrete", stride=4, codebook_size=512, code_dim=8),
    "kl_small": dict(kind="continuous", stride=4, latent_channels=4),
}


ConfigError = errors.ConfigError


def parse_arg(arg, **defaults):
  """Parses 'a=1,b,c=x' into a ConfigDict typed by `defaults` (big_vision style).

  A bare name sets a bool default to True (`runlocal`); a bare value with no
  name goes to the first default (`configs/b256.py:L` == `variant=L`).
  """
  parsed = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return parsed
  names = list(defaults)
  for index, item in enumerate(part for part in arg.split(",") if part):
    if "=" in item:
      key, value = item.split("=", 1)
    elif item in defaults and isinstance(defaults[item], bool):
      key, value = item, "true"
    elif index == 0 and names:
      key, value = names[0], item
    else:
      raise ConfigError(
          f"config argument {item!r}: unknown name; allowed: {names}")
    if key not in defaults:
      raise ConfigError(
          f"config argument {key!r}: unknown name; allowed: {names}")
    parsed[key] = _cast(key, value, defaults[key])
  return parsed


def _cast(key, value, default):
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config argument {key!r}: expected a bool, got {value!r}")
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ConfigError(
          f"config argument {key!r}: expected {type(default).__name__}, "
          f"got {value!r}") from None
  return value


def _tokenizer_section(name):
  """config.tokenizer with every TOKENIZERS field (0 where it does not apply)."""
  if name not in TOKENIZERS:
    raise ConfigError(f"tokenizer.name: unknown tokenizer {name!r}; "
                      f"allowed: {sorted(TOKENIZERS)}")
  section = ml_collections.ConfigDict(dict(TOKENIZERS[name]))
  section.name = name
  for field in ("codebook_size", "latent_channels", "code_dim"):
    section[field] = section.get(field, 0)
  return section


def generator_config(*, variant, tokenizer, image_size, num_classes,
                     batch_size, dataset):
  """The Heptapod generator config: model, tokenizer, data and mesh sections."""
  config = ml_collections.ConfigDict()
  config.task = "generator"
  config.seed = 0

  config.tokenizer = _tokenizer_section(tokenizer)
  # A tokenizer directory (tools.convert_tokenizer output or a trained
  # tokenizer's WORKDIR/tokenizer); needed to encode images or decode samples.
  config.tokenizer.init_from = config_dict.placeholder(str)
  # Continuous latents are multiplied by this before the generator sees them
  # (MAR uses 0.2325 for KL-16) and divided by it before decoding.
  config.tokenizer.latent_scale = 0.2325 if tokenizer == "kl16" else 1.0

  config.extract = ml_collections.ConfigDict()
  config.extract.output_dir = config_dict.placeholder(str)  # None: WORKDIR/tokens
  config.extract.num_shards = 8  # per split
  config.extract.batch_size = 256  # images encoded at once, over all local devices
  config.extract.flip = True  # also store the tokens of the flipped image
  config.extract.splits = config_dict.placeholder(str)  # comma list; None: train + eval

  config.data = data.default_data_config()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.batch_size = batch_size  # global batch, split over data x fsdp

  model = config.model = ml_collections.ConfigDict()
  model.variant = variant
  model.num_classes = num_classes
  model.null_class = True  # one extra class-embedding row for "no label"
  model.label_dropout = 0.0  # only for CFG comparisons; Heptapod uses none
  model.dtype = "float32"  # compute dtype; parameters stay float32

  model.backbone = ml_collections.ConfigDict()
  model.backbone.depth = 0
  model.backbone.width = 0
  model.backbone.num_heads = 0
  # SwiGLU hidden size; None -> LlamaGen rule (8/3 * width, multiple of 256).
  model.backbone.mlp_hidden = config_dict.placeholder(int)
  model.backbone.qk_norm = False
  model.backbone.dropout = 0.0  # residual and MLP dropout
  model.backbone.attn_dropout = 0.0
  model.backbone.rope_base = 10000.0
  model.backbone.norm_eps = 1e-5

  head = model.head = ml_collections.ConfigDict()
  head.kind = "global"
  head.queries = "remaining"
  head.window = config_dict.placeholder(int)  # None: the whole remaining grid
  # Supervised positions per timestep (t+1 always among them); None: all in window.
  head.density = config_dict.placeholder(int)
  # Timesteps t sampled per image per step; None: all of them.
  head.timesteps_per_image = config_dict.placeholder(int)
  head.local_attention_window = 0  # local head: raster distance seen; 0 -> grid width
  head.depth = 0
  head.width = 0
  head.num_heads = 0
  head.dropout = 0.0
  head.loss_chunk_size = 4096  # rows of logits per cross-entropy chunk

  diffusion = model.diffusion = ml_collections.ConfigDict()
  diffusion.depth = 0
  diffusion.width = 0
  diffusion.schedule = "cosine"
  diffusion.num_train_steps = 1000
  diffusion.batch_mul = 4  # MAR's diffusion_batch_mul
  diffusion.num_sampling_steps = 100
  diffusion.temperature = 1.0

  presets.apply_preset(model, variant)

  _train_sections(config, num_steps=100_000, log_every=50, checkpoint_every=1000)

  config.train.sample_every = 0  # class grid of the EMA model to TensorBoard; 0 = off
  config.train.sample_grid_per_class = 8
  config.train.eval_every = 0  # test NLL (eval.nll_max_batches) to TensorBoard; 0 = off

  config.sample = sampler.default_sample_config()
  config.sample.checkpoint = config_dict.placeholder(str)  # None: WORKDIR/checkpoints
  config.sample.output_dir = config_dict.placeholder(str)  # None: WORKDIR/samples
  config.sample.grid_rows = 8
  config.sample.grid_columns = 8
  config.sample.save_pngs = False  # also one PNG per image

  config.eval = eval_lib.default_eval_config()
  # In-project Fashion-MNIST classifier metrics (needs the Fashion-MNIST files).
  config.eval.fashion_metrics = dataset == "fashion_mnist"
  config.eval.nll_max_batches = config_dict.placeholder(int)  # None: the whole eval split
  return config


def _train_sections(config, *, num_steps, log_every, checkpoint_every):
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1 fills with the remaining devices
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = num_steps
  config.train.log_every = log_every
  config.train.checkpoint_every = checkpoint_every
  config.train.keep_checkpoints = 3
  config.train.async_checkpoints = True
  config.train.grad_accum_steps = 1  # micro-batches per step

  config.optim = optim.default_optim_config()


def tokenizer_training_config(*, name, dataset, image_size, batch_size):
  """Config to train a visual tokenizer (reconstruction only) on images."""
  config = ml_collections.ConfigDict()
  config.task = "tokenizer"
  config.seed = 0
  config.tokenizer = _tokenizer_section(name)
  loss = config.tokenizer.loss = ml_collections.ConfigDict()
  loss.reconstruction = "l2"  # l1 | l2
  loss.codebook_weight = 1.0  # VQ: codebook + commitment (beta in the spec)
  loss.kl_weight = 1e-6  # KL: LDM's weight (per-pixel normalisation, see train/tokenizer.py)
  loss.perceptual_weight = 0.0  # LPIPS; needs both weight files below
  loss.lpips_vgg_weights = config_dict.placeholder(str)  # torchvision vgg16 state dict (.pth/.npz)
  loss.lpips_lin_weights = config_dict.placeholder(str)  # lpips v0.1 vgg.pth (.pth/.npz)
  loss.adversarial_weight = 0.0  # PatchGAN hinge loss; 0 = no discriminator
  loss.adversarial_start_step = 0
  loss.discriminator = "patchgan"  # a name in models/tokenizers/discriminator.py SPECS

  config.data = data.default_data_config()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.batch_size = batch_size
  _train_sections(config, num_steps=100_000, log_every=100, checkpoint_every=2000)
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 1.0
  config.optim.ema_decay = 0.999
  config.optim.warmup_steps = 500
  return config


def small_tokenizer_training_config(name):
  """A small tokenizer (vq_small / kl_small) on Fashion-MNIST 32x32: minutes on 2 cores."""
  config = tokenizer_training_config(name=name, dataset="fashion_mnist",
                                     image_size=32, batch_size=64)
  config.train.num_steps = 1000
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.99
  config.tokenizer.loss.discriminator = "patchgan_small"
  return config


def validate_tokenizer_training(config, num_devices=None):
  tok = config.tokenizer
  _check_choice("tokenizer.name", tok.name, sorted(TOKENIZERS))
  loss = tok.loss
  _check_choice("tokenizer.loss.reconstruction", loss.reconstruction, ("l1", "l2"))
  for name in ("codebook_weight", "kl_weight", "perceptual_weight", "adversarial_weight"):
    if loss[name] < 0:
      raise ConfigError(f"tokenizer.loss.{name}: must be >= 0, got {loss[name]}")
  from heptapod_jax.models.tokenizers import discriminator as discriminator_lib
  _check_choice("tokenizer.loss.discriminator", loss.discriminator,
                sorted(discriminator_lib.SPECS))
  if loss.adversarial_start_step < 0:
    raise ConfigError("tokenizer.loss.adversarial_start_step: must be >= 0, "
                      f"got {loss.adversarial_start_step}")
  try:
    data.validate_data_config(config.data)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  if config.data.image_size % tok.stride:
    raise ConfigError(
        f"data.image_size: {config.data.image_size} is not a multiple of the "
        f"tokenizer stride tokenizer.stride={tok.stride}")
  _validate_train_sections(config, num_devices)
  return config


def _validate_train_sections(config, num_devices):
  train = config.train
  for name in ("num_steps", "log_every", "keep_checkpoints", "grad_accum_steps"):
    _check_positive(f"train.{name}", train[name])
  if train.checkpoint_every < 0:
    raise ConfigError(
        f"train.checkpoint_every: must be >= 0 (0 = only at the end), "
        f"got {train.checkpoint_every}")
  optim.validate(config.optim)
  if num_devices is not None:
    data_size, fsdp, _ = mesh_shape(config, num_devices)
    if config.data.batch_size % (data_size * fsdp):
      raise ConfigError(
          f"data.batch_size: {config.data.batch_size} is not divisible by the "
          f"data-parallel size mesh.data*mesh.fsdp = {data_size}*{fsdp} = "
          f"{data_size * fsdp}")
    per_replica = config.data.batch_size // (data_size * fsdp)
    if per_replica % train.grad_accum_steps:
      raise ConfigError(
          f"train.grad_accum_steps: {train.grad_accum_steps} does not divide the "
          f"per-replica batch data.batch_size/(mesh.data*mesh.fsdp) = {per_replica}")


def validate_any(config, num_devices=None):
  """Validates a generator or tokenizer-training config (by config.task)."""
  task = config.get("task", "generator")
  _check_choice("task", task, ("generator", "tokenizer"))
  if task == "tokenizer":
    return validate_tokenizer_training(config, num_devices)
  return validate(config, num_devices)


def grid_shape(config):
  """(rows, cols) of the token grid: image size / tokenizer stride."""
  side = config.data.image_size // config.tokenizer.stride
  return side, side


def mesh_shape(config, num_devices):
  """Resolves `config.mesh` (-1 fills) to concrete (data, fsdp, tensor) sizes."""
  sizes = {name: int(config.mesh[name]) for name in ("data", "fsdp", "tensor")}
  fill = [name for name, size in sizes.items() if size == -1]
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{name}: must be a positive size or -1, got {size}")
  if len(fill) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {fill}")
  known = 1
  for name, size in sizes.items():
    if size != -1:
      known *= size
  if fill:
    if num_devices % known:
      raise ConfigError(
          f"mesh.{fill[0]}: cannot fill, {num_devices} devices are not "
          f"divisible by the other axes' product {known}")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(
        f"mesh: data*fsdp*tensor = {known} but there are {num_devices} devices")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _check_choice(field, value, allowed):
  if value not in allowed:
    raise ConfigError(
        f"{field}: invalid value {value!r}; allowed: {', '.join(map(str, allowed))}")


def _check_positive(field, value, allow_none=False):
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{field}: must be a positive integer, got {value!r}")


def validate(config, num_devices=None):
  """Rejects invalid configs with a ConfigError naming the field.

  `num_devices` enables the checks that depend on the mesh (batch divisibility).
  """
  tok = config.tokenizer
  _check_choice("tokenizer.name", tok.name, sorted(TOKENIZERS))
  _check_choice("tokenizer.kind", tok.kind, ("discrete", "continuous"))
  _check_positive("tokenizer.stride", tok.stride)
  if tok.kind == "discrete":
    _check_positive("tokenizer.codebook_size", tok.codebook_size)
  else:
    _check_positive("tokenizer.latent_channels", tok.latent_channels)
  try:
    data.validate_data_config(config.data)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _check_positive("data.image_size", config.data.image_size)
  if config.data.image_size % tok.stride:
    raise ConfigError(
        f"data.image_size: {config.data.image_size} is not a multiple of the "
        f"tokenizer stride tokenizer.stride={tok.stride}")
  _check_positive("data.batch_size", config.data.batch_size)
  if tok.kind == "continuous" and not tok.latent_scale > 0:
    raise ConfigError(f"tokenizer.latent_scale: must be > 0, got {tok.latent_scale}")
  _check_positive("extract.num_shards", config.extract.num_shards)
  _check_positive("extract.batch_size", config.extract.batch_size)
  rows, cols = grid_shape(config)
  num_positions = rows * cols

  model = config.model
  _check_choice("model.variant", model.variant, sorted(presets.PRESETS))
  _check_positive("model.num_classes", model.num_classes)
  _check_choice("model.dtype", model.dtype, DTYPES)
  if not 0.0 <= model.label_dropout < 1.0:
    raise ConfigError(
        f"model.label_dropout: must be in [0, 1), got {model.label_dropout}")
  if model.label_dropout > 0 and not model.null_class:
    raise ConfigError(
        "model.label_dropout: needs model.null_class=True (the dropped label "
        "is replaced by the null class)")

  backbone = model.backbone
  for name in ("depth", "width", "num_heads"):
    _check_positive(f"model.backbone.{name}", backbone[name])
  _check_positive("model.backbone.mlp_hidden", backbone.mlp_hidden, allow_none=True)
  if backbone.width % backbone.num_heads:
    raise ConfigError(
        f"model.backbone.num_heads: {backbone.num_heads} does not divide "
        f"model.backbone.width={backbone.width}")
  if (backbone.width // backbone.num_heads) % 4:
    raise ConfigError(
        f"model.backbone.num_heads: head dim {backbone.width // backbone.num_heads}"
        " must be a multiple of 4 for 2D RoPE (rows and columns each rotate half)")
  for name in ("dropout", "attn_dropout"):
    if not 0.0 <= backbone[name] < 1.0:
      raise ConfigError(f"model.backbone.{name}: must be in [0, 1), got {backbone[name]}")

  head = model.head
  _check_choice("model.head.kind", head.kind, HEAD_KINDS)
  _check_choice("model.head.queries", head.queries, HEAD_QUERIES)
  for name in ("depth", "width", "num_heads", "loss_chunk_size"):
    _check_positive(f"model.head.{name}", head[name])
  if head.width % head.num_heads:
    raise ConfigError(
        f"model.head.num_heads: {head.num_heads} does not divide "
        f"model.head.width={head.width}")
  if not 0.0 <= head.dropout < 1.0:
    raise ConfigError(f"model.head.dropout: must be in [0, 1), got {head.dropout}")
  _check_positive("model.head.window", head.window, allow_none=True)
  _check_positive("model.head.density", head.density, allow_none=True)
  _check_positive("model.head.timesteps_per_image", head.timesteps_per_image,
                  allow_none=True)
  if head.window is not None and head.window > num_positions:
    raise ConfigError(
        f"model.head.window: {head.window} is larger than the grid "
        f"({rows}x{cols} = {num_positions} positions)")
  if head.density is not None:
    if head.density > num_positions:
      raise ConfigError(
          f"model.head.density: {head.density} is larger than the grid "
          f"({rows}x{cols} = {num_positions} positions)")
    if head.window is not None and head.density > head.window:
      raise ConfigError(
          f"model.head.density: {head.density} is larger than "
          f"model.head.window={head.window}")
  if (head.timesteps_per_image is not None
      and head.timesteps_per_image > num_positions):
    raise ConfigError(
        f"model.head.timesteps_per_image: {head.timesteps_per_image} is larger "
        f"than the number of timesteps ({num_positions})")
  if head.local_attention_window < 0:
    raise ConfigError(
        "model.head.local_attention_window: must be >= 0 (0 = grid width), "
        f"got {head.local_attention_window}")
  if head.kind == "ntp" and head.queries == "grid":
    raise ConfigError(
        "model.head.queries: 'grid' needs model.head.kind global or local; "
        "ntp predicts position t+1 only")

  if tok.kind == "continuous":
    diffusion = model.diffusion
    _check_choice("model.diffusion.schedule", diffusion.schedule, DIFFUSION_SCHEDULES)
    for name in ("depth", "width", "num_train_steps", "batch_mul",
                 "num_sampling_steps"):
      _check_positive(f"model.diffusion.{name}", diffusion[name])
    if diffusion.num_sampling_steps > diffusion.num_train_steps:
      raise ConfigError(
          f"model.diffusion.num_sampling_steps: {diffusion.num_sampling_steps} "
          f"exceeds model.diffusion.num_train_steps={diffusion.num_train_steps}")
    if diffusion.temperature <= 0:
      raise ConfigError(
          f"model.diffusion.temperature: must be > 0, got {diffusion.temperature}")

  sample = config.sample
  for name in ("num_samples", "batch_size", "grid_rows", "grid_columns"):
    _check_positive(f"sample.{name}", sample[name])
  if not 0.0 < sample.top_p <= 1.0:
    raise ConfigError(f"sample.top_p: must be in (0, 1], got {sample.top_p}")
  if sample.top_k < 0:
    raise ConfigError(f"sample.top_k: must be >= 0 (0 = off), got {sample.top_k}")
  if sample.cfg_scale not in (0.0, 1.0) and not model.null_class:
    raise ConfigError("sample.cfg_scale: guidance needs model.null_class=True "
                      "(and a model trained with model.label_dropout > 0)")
  if num_devices is not None:
    data_size, fsdp, _ = mesh_shape(config, num_devices)
    if sample.batch_size % (data_size * fsdp):
      raise ConfigError(
          f"sample.batch_size: {sample.batch_size} is not divisible by the "
          f"data-parallel size mesh.data*mesh.fsdp = {data_size * fsdp}")
  _validate_train_sections(config, num_devices)
  return config


def imagenet256_config(arg, *, variant):
  """ImageNet 256x256 class-conditional generator; 16x16 tokens (stride 16).

  Arguments (after `:` in --config): variant (preset name), tokenizer
  (kl16 | vq16), runlocal (a small batch for a smoke run on one host).
  """
  arg = parse_arg(arg, variant=variant, tokenizer="kl16", runlocal=False)
  config = generator_config(
      variant=arg.variant, tokenizer=arg.tokenizer, image_size=256,
      num_classes=1000, batch_size=8 if arg.runlocal else 2048,
      dataset="imagenet2012")
  # 16 timesteps x 32 supervised positions per image keeps the head's token
  # count (16 * 33 = 528) about twice the backbone's (256) per image.
  config.model.head.timesteps_per_image = 4 if arg.runlocal else 16
  config.model.head.density = 32
  config.model.dtype = "float32" if arg.runlocal else "bfloat16"
  return config
