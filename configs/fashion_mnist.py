"""The embedded default: Heptapod on Fashion-MNIST, end to end on 2 CPU cores.

  python -m heptapod_jax.main --config=configs/fashion_mnist.py --workdir=DIR

trains the small tokenizer (28x28 images padded to 32x32, stride 4 -> 8x8
tokens), extracts tokens, trains the generator (global 2D head, no guidance),
samples a labelled class grid and evaluates; see heptapod_jax/pipeline.py.
Running it again resumes. Arguments (after ':'):
  tokenizer=vq_small|kl_small   discrete codes + cross-entropy, or latents + diffusion
  variant=tiny                  generator preset
  quick                         a run of a few minutes that makes every artifact
"""

import ml_collections

from heptapod_jax import config_lib

CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Boot")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="tiny", tokenizer="vq_small", quick=False)
  config = config_lib.generator_config(
      variant=arg.variant, tokenizer=arg.tokenizer, image_size=32,
      num_classes=10, batch_size=64, dataset="fashion_mnist")
  config.model.head.timesteps_per_image = 16
  config.model.head.density = 16
  config.train.num_steps = 4000
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.sample_every = 1000
  config.train.eval_every = 1000
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.999
  config.optim.weight_decay = 0.05
  config.sample.num_samples = 1000
  config.sample.batch_size = 200
  config.sample.grid_rows = 10
  config.sample.grid_columns = 10
  config.eval.classifier_train_steps = 1000
  # Test NLL on the first 10 test batches (640 images x 64 tokens): each needs
  # the head for every timestep, the costliest part of the evaluation on CPU.
  config.eval.nll_max_batches = 10
  config.extract.batch_size = 500

  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.tokenizer = config_lib.small_tokenizer_training_config(arg.tokenizer)
  config.pipeline.grid_samples_per_class = 10
  config.pipeline.class_names = CLASS_NAMES
  # Continuous latents are scaled to unit std (from the extracted tokens).
  config.pipeline.normalize_latents = True

  if arg.quick:
    config.pipeline.tokenizer.train.num_steps = 200
    config.pipeline.tokenizer.train.checkpoint_every = 200
    config.train.num_steps = 150
    config.train.checkpoint_every = 150
    config.train.log_every = 50
    config.optim.warmup_steps = 20
    config.optim.ema_decay = 0.9
    config.sample.num_samples = 200
    config.eval.classifier_train_steps = 150
  return config
