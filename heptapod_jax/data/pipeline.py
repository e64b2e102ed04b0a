"""Input pipelines: config section, sources by name, and the sharded Grain dataset.

`make_dataset` builds one global, deterministic example stream and gives each
process its slice of every global batch:

  source --shuffle(seed, reshuffled per epoch)--> repeat(num_epochs)
         --finalize(flip by (seed, global index), [-1, 1], mask)-->
         truncate (drop_remainder) or pad (mask=False) to whole global batches
         --batch(local = global / process_count)--> take local batches p, p+P, ...

Local batch k of process p holds global examples [k*B + p*b, k*B + (p+1)*b), so
the concatenation over processes of their k-th batches is the k-th global
batch, whatever the process count ("2 processes x 4 devices" sees the same
global batches as "1 process x 8 devices"). Sources are random access and
lazy, so each process decodes only its own examples. Everything random is a
function of (seed, global index): results do not depend on read threads or
worker processes. The returned `grain.IterDataset`'s iterator has
`get_state()/set_state()` and works with `grain.checkpoint.CheckpointSave /
CheckpointRestore` inside an orbax Composite.
"""

import os

import ml_collections
from ml_collections import config_dict
import numpy as np

import grain

from heptapod_jax.data import cached_tokens
from heptapod_jax.data import fashion_mnist
from heptapod_jax.data import image_folder
from heptapod_jax.data import imagenet
from heptapod_jax.data import preprocess

DATASETS = ("fashion_mnist", "imagenet2012", "image_folder", "cached_tokens")

# Split used for evaluation when data.eval_split is None.
_DEFAULT_EVAL_SPLITS = {"fashion_mnist": "test", "imagenet2012": "validation"}


def default_data_config():
  """The `config.data` section with every field the data code reads."""
  c = ml_collections.ConfigDict()
  # fashion_mnist | imagenet2012 | image_folder | cached_tokens
  c.dataset = "fashion_mnist"
  # Square side of the images after padding / ADM center crop.
  c.image_size = 32
  # GLOBAL batch size; each process yields batch_size / process_count examples.
  c.batch_size = 64
  c.train_split = "train"
  # None: the dataset's usual one (fashion_mnist: test, imagenet2012:
  # validation, image folders / token shards: validation, val, else train).
  c.eval_split = config_dict.placeholder(str)
  # Directory of the Fashion-MNIST IDX files (Debian dataset-fashion-mnist).
  c.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"
  # Root of a class-per-subdirectory image tree (optionally <split>/<class>).
  c.image_folder = config_dict.placeholder(str)
  # TFDS data_dir holding the prepared ArrayRecord dataset; None: TFDS default
  # ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.tfds_data_dir = config_dict.placeholder(str)
  # TFDS name read when dataset=imagenet2012 (e.g. "imagenet2012:5.0.0").
  c.tfds_name = "imagenet2012"
  # Token shards for dataset=cached_tokens: a directory (<split>-*.array_record)
  # or a glob that may contain {split}.
  c.cached_tokens = config_dict.placeholder(str)
  # Random horizontal flip for training (per (seed, example index)); for token
  # shards only when the records carry "tokens_flipped".
  c.random_flip = True
  # True: a corrupt image is skipped (the next one takes its place), counted
  # and logged with its path. False: it stops the run with its path.
  c.skip_corrupt_images = True
  # Grain worker processes (0: decode in this process). The output does not
  # depend on it.
  c.num_workers = 0
  # Threads computing batches ahead in each process (0: synchronous), and how
  # many finished batches they may hold.
  c.read_threads = 4
  c.prefetch_batches = 4
  # Read only the first N examples of every split (None: all). For quick runs
  # and ablations; the FID-style reference sets of the evaluator are not cut.
  c.max_examples = config_dict.placeholder(int)
  return c


def _positive(data_config, field):
  value = data_config[field]
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"data.{field}: must be a positive integer, got {value!r}")


def validate_data_config(data_config):
  """Raises ValueError naming the bad `data.<field>`."""
  if data_config.dataset not in DATASETS:
    raise ValueError(f"data.dataset: invalid value {data_config.dataset!r}; "
                     f"allowed: {', '.join(DATASETS)}")
  for field in ("image_size", "batch_size"):
    _positive(data_config, field)
  for field in ("num_workers", "read_threads", "prefetch_batches"):
    value = data_config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"data.{field}: must be an integer >= 0, got {value!r}")
  if data_config.get("max_examples") is not None and data_config.max_examples < 1:
    raise ValueError(f"data.max_examples: must be >= 1 or None, got {data_config.max_examples}")
  required = {"image_folder": "image_folder", "cached_tokens": "cached_tokens"}
  field = required.get(data_config.dataset)
  if field and not data_config[field]:
    raise ValueError(f"data.{field}: must be set when data.dataset="
                     f"{data_config.dataset}")


def make_source(data_config, split):
  """The random-access source of `split`: len() and [i] -> example dict.

  Image datasets give {"image": uint8 [S, S, 3], "label": int32};
  cached_tokens gives {"tokens": int32 [h, w] | float32 [h, w, C], "label":
  int32, optional "tokens_flipped"}.
  """
  source = _full_source(data_config, split)
  limit = data_config.get("max_examples")
  if limit is not None and limit < len(source):
    return _Prefix(source, limit)
  return source


class _Prefix:
  """The first `count` examples of a random-access source."""

  def __init__(self, source, count):
    self.source, self.count = source, count

  def __len__(self):
    return self.count

  def __getitem__(self, index):
    if not 0 <= index < self.count:
      raise IndexError(f"index {index} out of range for {self.count} examples")
    return self.source[index]

  def __getattr__(self, name):  # paths, class names, corrupt-image counters...
    return getattr(self.source, name)


def _full_source(data_config, split):
  validate_data_config(data_config)
  dataset = data_config.dataset
  if dataset == "fashion_mnist":
    return fashion_mnist.FashionMnistSource(
        data_config.fashion_mnist_dir, split, data_config.image_size)
  if dataset == "image_folder":
    return image_folder.ImageFolderSource(
        data_config.image_folder, split, data_config.image_size,
        skip_corrupt=data_config.skip_corrupt_images)
  if dataset == "imagenet2012":
    return imagenet.ImageNetSource(
        data_config.tfds_name, data_config.tfds_data_dir, split,
        data_config.image_size, skip_corrupt=data_config.skip_corrupt_images)
  return cached_tokens.CachedTokenSource(data_config.cached_tokens, split)


def eval_split(data_config):
  """The split name used for evaluation (data.eval_split or the dataset's usual one)."""
  if data_config.eval_split:
    return data_config.eval_split
  dataset = data_config.dataset
  if dataset in _DEFAULT_EVAL_SPLITS:
    return _DEFAULT_EVAL_SPLITS[dataset]
  for candidate in ("validation", "val"):
    if dataset == "image_folder":
      if os.path.isdir(os.path.join(data_config.image_folder, candidate)):
        return candidate
    else:
      try:
        cached_tokens.resolve_shards(data_config.cached_tokens, candidate)
        return candidate
      except FileNotFoundError:
        pass
  return data_config.train_split


def _derived_seed(seed, stream):
  """A 32-bit seed for one random stream (0: shuffle, 1: finalize) of `seed`."""
  state = np.random.SeedSequence([int(seed) % 2**63, stream]).generate_state(1)
  return int(state[0])


class FinalizeExample(grain.transforms.RandomMap):
  """uint8 images -> float32 [-1, 1] with a random flip; tokens -> a random flipped copy.

  Output: {"image": float32 [S, S, 3] | "tokens": ..., "label": int32} plus
  "mask": True when `with_mask` (padded evaluation batches).
  """

  def __init__(self, random_flip, with_mask):
    self.random_flip = bool(random_flip)
    self.with_mask = bool(with_mask)

  def random_map(self, example, rng):
    flip = bool(rng.random() < 0.5) and self.random_flip
    if "image" in example:
      image = example["image"]
      if flip:
        image = preprocess.flip_left_right(image)
      output = {"image": preprocess.to_unit_range(image)}
    else:
      use_flipped = flip and "tokens_flipped" in example
      output = {"tokens": example["tokens_flipped" if use_flipped else "tokens"]}
    output["label"] = np.int32(example["label"])
    if self.with_mask:
      output["mask"] = np.bool_(True)
    return output


def _padding_source(template, count):
  """`count` copies of `template` with zero arrays and mask=False."""
  padding = {key: np.zeros_like(value) for key, value in template.items()}
  padding["mask"] = np.bool_(False)
  return grain.MapDataset.source([padding] * count)


def make_dataset(data_config, *, split, seed, process_index, process_count,
                 shuffle=True, num_epochs=None, drop_remainder=True):
  """The grain.IterDataset of this process's batches of `split`.

  Args:
    data_config: the `config.data` section (`default_data_config()` fields).
    split: the source's split name ("train", "test", "validation", ...).
    seed: the run's `config.seed`; shuffling and flips derive from it.
    process_index, process_count: this process among all (jax.process_index(),
      jax.process_count()).
    shuffle: shuffle (differently each epoch); off for evaluation.
    num_epochs: passes over the split; None repeats forever.
    drop_remainder: True drops the last incomplete global batch. False pads it
      with zero examples and adds "mask" (bool [b], False on padding); needs a
      finite num_epochs. Use shuffle=False, num_epochs=1, drop_remainder=False
      for evaluation.

  Returns:
    grain.IterDataset; its elements are LOCAL batches (b = batch_size /
    process_count): {"image": float32 [b, S, S, 3] in [-1, 1], "label": int32
    [b]} or {"tokens": int32 [b, h, w] | float32 [b, h, w, C], "label": int32
    [b]}, plus "mask": bool [b] when drop_remainder is False. Every process
    gets the same number of batches (`num_batches` for one epoch).
  """
  validate_data_config(data_config)
  global_batch = data_config.batch_size
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in [0, process_count={process_count})")
  if global_batch % process_count:
    raise ValueError(
        f"data.batch_size: the global batch {global_batch} is not divisible by "
        f"the process count {process_count}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
  if not drop_remainder and num_epochs is None:
    raise ValueError("drop_remainder=False pads the end of the data and needs "
                     "a finite num_epochs")
  local_batch = global_batch // process_count

  source = make_source(data_config, split)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"data.dataset={data_config.dataset}: split {split!r} "
                     "is empty")
  stream = grain.MapDataset.source(source)
  if shuffle:
    stream = stream.shuffle(seed=_derived_seed(seed, 0))
  if num_epochs != 1:
    stream = stream.repeat(num_epochs)
  stream = stream.random_map(
      FinalizeExample(data_config.random_flip, with_mask=not drop_remainder),
      seed=_derived_seed(seed, 1))

  if drop_remainder:
    whole = len(stream) // global_batch * global_batch
    if whole == 0:
      raise ValueError(
          f"data.batch_size: the global batch {global_batch} is larger than "
          f"split {split!r} ({len(source)} examples x {num_epochs} epochs)")
    stream = stream[:whole]
  else:
    missing = -len(stream) % global_batch
    if missing:
      stream = grain.MapDataset.concatenate(
          [stream, _padding_source(stream[0], missing)])

  batches = stream.batch(local_batch, drop_remainder=True)
  batches = batches[process_index::process_count]
  dataset = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.read_threads,
      prefetch_buffer_size=data_config.prefetch_batches))
  if data_config.num_workers > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.num_workers))
  return dataset


def num_batches(data_config, split, *, drop_remainder=True):
  """Batches per process (= global batches) in one epoch of `split`."""
  examples = len(make_source(data_config, split))
  global_batch = data_config.batch_size
  if drop_remainder:
    return examples // global_batch
  return -(-examples // global_batch)
