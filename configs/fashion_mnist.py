"""The embedded default: Heptapod on Fashion-MNIST, end to end on 2 CPU cores.

  python -m heptapod_jax.main --config=configs/fashion_mnist.py --workdir=DIR

trains the small tokenizer (28x28 images padded to 32x32, stride 4 -> 8x8
tokens), extracts tokens, trains the generator (global 2D head, no guidance),
samples a labelled class grid and evaluates; see heptapod_jax/pipeline.py.
Running it again resumes. Arguments (after ':'):
  tokenizer=vq_small|kl_small   discrete codes + cross-entropy, or latents + diffusion
  variant=tiny                  generator preset
  quick                         a run of about 2 minutes that makes every artifact
                                (micro generator, 3000 images per split)
"""

import ml_collections

from heptapod_jax import config_lib
from heptapod_jax import presets

CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Boot")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="tiny", tokenizer="vq_small", quick=False)
  config = config_lib.generator_config(
      variant=arg.variant, tokenizer=arg.tokenizer, image_size=32,
      num_classes=10, batch_size=64, dataset="fashion_mnist")
  # 20 minutes on 2 cores: the generator gets about 10 of them. 32 timesteps
  # x 4 targets supervise half of all next-token positions per image at 1.1x
  # the cost of 8 x 16 (which supervises one in eight); bfloat16 compute is
  # 1.5x faster on CPUs with AVX512-BF16 (parameters stay float32).
  config.model.head.timesteps_per_image = 32
  config.model.head.density = 4
  config.model.dtype = "bfloat16"
  config.train.num_steps = 850
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.train.sample_every = 0
  config.train.eval_every = 0
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 50
  config.optim.ema_decay = 0.999
  config.optim.weight_decay = 0.05
  # 5000 samples: a Fréchet distance from fewer is dominated by estimation
  # bias (real images: 3.2 at 500, 1.35 at 1000, 0.2 at 10k).
  config.sample.num_samples = 5000
  config.sample.batch_size = 1000  # divisible by 8 devices as well as 1
  config.sample.temperature = 0.7
  config.sample.grid_rows = 10
  config.sample.grid_columns = 10
  config.eval.classifier_train_steps = 1000
  # Test NLL on the first 10 test batches (640 images x 64 tokens).
  config.eval.nll_max_batches = 10
  # Less than one epoch of training: flipped copies would not be seen.
  config.extract.flip = False
  config.extract.batch_size = 500

  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.tokenizer = config_lib.small_tokenizer_training_config(arg.tokenizer)
  # 600 of the standalone small tokenizer's 1000 steps (4.5 of 8.5 minutes).
  config.pipeline.tokenizer.train.num_steps = 600
  config.pipeline.tokenizer.train.checkpoint_every = 300
  config.pipeline.grid_samples_per_class = 10
  config.pipeline.class_names = CLASS_NAMES
  # Continuous latents are scaled to unit std (from the extracted tokens).
  config.pipeline.normalize_latents = True

  if arg.quick:
    # Every stage and artifact in about 2 minutes: the first 3000 images of
    # each split (no flipped copies, as in the default), a few hundred steps in all.
    config.data.max_examples = 3000
    tokenizer = config.pipeline.tokenizer
    tokenizer.data.max_examples = 3000
    tokenizer.train.num_steps = 80
    tokenizer.train.checkpoint_every = 80
    tokenizer.train.log_every = 20
    tokenizer.optim.warmup_steps = 20
    presets.apply_preset(config.model, "micro")
    config.train.num_steps = 60
    config.train.checkpoint_every = 60
    config.train.log_every = 20
    config.optim.warmup_steps = 10
    config.sample.num_samples = 100
    config.sample.batch_size = 104  # a multiple of 8 (devices) covering 100
    config.eval.classifier_train_steps = 100
    config.eval.nll_max_batches = 2
  return config
