"""Input pipelines: sources, preprocessing, determinism, resume, process split, token shards."""

import io
import logging
import pathlib

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from heptapod_jax import data
from heptapod_jax.data import cached_tokens
from heptapod_jax.data import fashion_mnist
from heptapod_jax.data import preprocess

import fake_imagenet

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_config(batch_size=8, image_size=32):
  config = data.default_data_config()
  config.batch_size = batch_size
  config.image_size = image_size
  config.fashion_mnist_dir = FASHION_DIR
  return config


def take(dataset_or_iterator, count):
  iterator = iter(dataset_or_iterator)
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------- config


def test_default_config_fields_and_validation():
  config = data.default_data_config()
  for field in ("dataset", "image_size", "batch_size", "fashion_mnist_dir",
                "image_folder", "tfds_data_dir", "cached_tokens",
                "random_flip", "skip_corrupt_images", "num_workers"):
    assert field in config, field
  assert config.dataset == "fashion_mnist"
  assert config.fashion_mnist_dir == FASHION_DIR
  assert config.image_folder is None and config.num_workers == 0
  data.validate_data_config(config)
  config.dataset = "cifar"
  with pytest.raises(ValueError, match="data.dataset"):
    data.validate_data_config(config)
  config = data.default_data_config()
  config.dataset = "image_folder"
  with pytest.raises(ValueError, match="data.image_folder"):
    data.validate_data_config(config)
  with pytest.raises(ValueError, match="data.batch_size"):
    data.make_dataset(fashion_config(batch_size=6), split="train", seed=0,
                      process_index=0, process_count=4)


# ---------------------------------------------------------- preprocessing


def test_adm_center_crop_of_a_non_square_image():
  # 300 wide x 200 high: red | green | blue thirds, rows brighten downwards.
  width, height = 300, 200
  image = np.zeros((height, width, 3), np.uint8)
  rows = np.linspace(60, 250, height).astype(np.uint8)[:, None]
  image[:, :100, 0] = rows
  image[:, 100:200, 1] = rows
  image[:, 200:, 2] = rows
  crop = data.center_crop_arr(Image.fromarray(image), 64)
  assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
  # BOX 300x200 -> 150x100, BICUBIC to 96x64, center 64 columns cover the
  # original x in [50, 250): red on the left, green centre, blue right.
  assert crop[32, 2].argmax() == 0
  assert crop[32, 32].argmax() == 1
  assert crop[32, 61].argmax() == 2
  # The vertical extent is kept whole: the gradient runs top to bottom.
  column = crop[:, 32, 1].astype(int)
  assert column[0] < 75 and column[-1] > 235
  assert np.all(np.diff(column) >= -1)
  # A large square image goes through the BOX halving loop.
  big = data.center_crop_arr(Image.fromarray(np.full((1000, 700, 3), 7, np.uint8)), 256)
  assert big.shape == (256, 256, 3) and np.all(big == 7)


def test_pad_flip_and_unit_range():
  image = np.arange(28 * 28, dtype=np.int64).reshape(28, 28).astype(np.uint8)
  padded = preprocess.pad_to_size(image, 32)
  assert padded.shape == (32, 32)
  np.testing.assert_array_equal(padded[2:30, 2:30], image)
  assert padded[:2].sum() == 0 and padded[:, 30:].sum() == 0
  np.testing.assert_array_equal(
      preprocess.to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  assert preprocess.to_unit_range(padded).dtype == np.float32
  np.testing.assert_array_equal(preprocess.flip_left_right(image)[:, 0], image[:, -1])


# ----------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_the_debian_files():
  train = fashion_mnist.FashionMnistSource(FASHION_DIR, "train", 32)
  test = fashion_mnist.FashionMnistSource(FASHION_DIR, "test", 32)
  assert (len(train), len(test)) == (60000, 10000)
  raw_images, raw_labels = fashion_mnist.load_split(FASHION_DIR, "train")
  example = train[5]
  assert example["image"].shape == (32, 32, 3)
  np.testing.assert_array_equal(example["image"][2:30, 2:30, 1], raw_images[5])
  assert example["label"] == raw_labels[5]

  config = fashion_config(batch_size=16)
  batch = take(data.make_dataset(config, split="train", seed=0, process_index=0,
                                 process_count=1), 1)[0]
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["image"].max() > 0.5  # not all padding
  assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
  # Padding is black (-1) on every side; the channels are equal (gray).
  border = np.concatenate([batch["image"][:, :2].ravel(), batch["image"][:, 30:].ravel(),
                           batch["image"][:, :, :2].ravel(), batch["image"][:, :, 30:].ravel()])
  assert np.all(border == -1.0)
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
  # Smaller than 28: resized with the ADM crop.
  assert fashion_mnist.FashionMnistSource(FASHION_DIR, "test", 16)[0]["image"].shape == (16, 16, 3)


def test_max_examples_keeps_a_prefix_of_every_split():
  config = fashion_config(batch_size=8)
  full = data.make_source(config, "test")
  config.max_examples = 20
  prefix = data.make_source(config, "test")
  assert len(prefix) == 20
  np.testing.assert_array_equal(prefix[19]["image"], full[19]["image"])
  with pytest.raises(IndexError):
    prefix[20]
  batches = list(data.make_dataset(config, split="test", seed=0, process_index=0,
                                   process_count=1, num_epochs=1, shuffle=False,
                                   drop_remainder=True))
  assert sum(len(b["label"]) for b in batches) == 16  # 2 whole batches of 8 from 20
  config.max_examples = 0
  with pytest.raises(ValueError, match="data.max_examples"):
    data.make_source(config, "test")


def test_fashion_mnist_missing_directory_names_the_fix(tmp_path):
  config = fashion_config()
  config.fashion_mnist_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as error:
    data.make_source(config, "train")
  assert "data.fashion_mnist_dir" in str(error.value)
  assert "apt-get install dataset-fashion-mnist" in str(error.value)


# ------------------------------------------------------------ image folder


def _save(path, image, fmt):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format=fmt)


@pytest.fixture
def image_tree(tmp_path):
  """root/cat: RGB PNG, RGB JPEG, gray PNG; root/dog: RGBA PNG, CMYK JPEG, palette PNG, broken JPEG."""
  root = tmp_path / "folder"
  rng = np.random.default_rng(0)
  pixels = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
  _save(root / "cat" / "a_rgb.png", Image.fromarray(pixels(20, 30)), "PNG")
  _save(root / "cat" / "b_rgb.jpg", Image.fromarray(pixels(40, 24)), "JPEG")
  _save(root / "cat" / "c_gray.png", Image.fromarray(pixels(18, 18)[..., 0]), "PNG")
  transparent = np.zeros((16, 16, 4), np.uint8)  # fully transparent -> white
  _save(root / "dog" / "a_rgba.png", Image.fromarray(transparent, "RGBA"), "PNG")
  _save(root / "dog" / "b_cmyk.jpg", Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG")
  _save(root / "dog" / "c_palette.png",
        Image.fromarray(pixels(16, 16)).convert("P", palette=Image.ADAPTIVE), "PNG")
  buffer = io.BytesIO()
  Image.fromarray(pixels(64, 64)).save(buffer, format="JPEG")
  (root / "dog" / "d_broken.jpg").write_bytes(buffer.getvalue()[:300])
  (root / "dog" / "notes.txt").write_text("not an image")
  return root


def test_image_folder_converts_modes_and_skips_corrupt_file(image_tree, caplog):
  source = data.ImageFolderSource(image_tree, "train", 16)
  assert source.classes == ["cat", "dog"] and len(source) == 7
  before = data.skipped_image_count()
  with caplog.at_level(logging.WARNING):
    examples = [source[i] for i in range(len(source))]
  for example in examples:
    assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.uint8
  # The broken file (index 6) is replaced by the next example (wraps to index 0).
  assert [int(e["label"]) for e in examples] == [0, 0, 0, 1, 1, 1, 0]
  gray = examples[2]["image"]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  assert np.all(examples[3]["image"] == 255)  # transparent RGBA on white
  assert tuple(examples[4]["image"][8, 8]) == pytest.approx((255, 0, 0), abs=8)  # CMYK red
  broken = str(image_tree / "dog" / "d_broken.jpg")
  np.testing.assert_array_equal(examples[6]["image"], examples[0]["image"])
  assert source.skipped.count == 1 and source.skipped.paths == [broken]
  assert data.skipped_image_count() == before + 1
  assert broken in caplog.text
  # Through the pipeline: one epoch, padded, every slot filled.
  config = data.default_data_config()
  config.update(dataset="image_folder", image_folder=str(image_tree), image_size=16,
                batch_size=4, random_flip=False)
  batches = list(data.make_dataset(config, split="train", seed=0, process_index=0,
                                   process_count=1, shuffle=False, num_epochs=1,
                                   drop_remainder=False))
  assert len(batches) == 2
  assert [int(m) for b in batches for m in b["mask"]] == [1] * 7 + [0]
  assert batches[-1]["image"][-1].max() == 0.0  # padding is zeros


def test_image_folder_strict_mode_names_the_corrupt_file(image_tree):
  config = data.default_data_config()
  config.update(dataset="image_folder", image_folder=str(image_tree), image_size=16,
                batch_size=7, skip_corrupt_images=False)
  dataset = data.make_dataset(config, split="train", seed=0, process_index=0,
                              process_count=1, shuffle=False, num_epochs=1)
  with pytest.raises(data.CorruptImageError, match="d_broken.jpg"):
    list(dataset)


def test_image_folder_split_directories(tmp_path):
  for split, classes in (("train", ("a", "b", "c")), ("val", ("a", "c"))):
    for name in classes:
      _save(tmp_path / split / name / "x.png",
            Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
  config = data.default_data_config()
  config.update(dataset="image_folder", image_folder=str(tmp_path), image_size=8)
  assert data.eval_split(config) == "val"
  val = data.make_source(config, "val")
  assert val.classes == ["a", "b", "c"]  # labels shared with train
  assert [int(val[i]["label"]) for i in range(len(val))] == [0, 2]
  with pytest.raises(FileNotFoundError, match="data.image_folder"):
    data.make_source(config, "test")


# ---------------------------------------------------------------- ImageNet


@pytest.fixture(scope="module")
def prepared_imagenet(tmp_path_factory):
  base = tmp_path_factory.mktemp("imagenet")
  manual_dir = fake_imagenet.write_fake_imagenet_tars(base / "manual")
  data_dir = base / "tfds"
  data.prepare_imagenet(manual_dir, data_dir)
  return str(data_dir)


def test_imagenet_prepared_from_fake_tars_reads_through_pipeline(prepared_imagenet):
  config = data.default_data_config()
  config.update(dataset="imagenet2012", tfds_data_dir=prepared_imagenet,
                image_size=16, batch_size=4)
  source = data.make_source(config, "train")
  assert len(source) == 6 and source.num_classes == 1000
  batch = take(data.make_dataset(config, split="train", seed=0, process_index=0,
                                 process_count=1), 1)[0]
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  assert set(batch["label"].tolist()) <= {0, 1}  # the two fake synsets
  assert data.eval_split(config) == "validation"
  batches = list(data.make_dataset(config, split="validation", seed=0, process_index=0,
                                   process_count=1, shuffle=False, num_epochs=1,
                                   drop_remainder=False))
  assert len(batches) == 1 and batches[0]["mask"].all()


def test_imagenet_not_prepared_explains_how(tmp_path):
  config = data.default_data_config()
  config.update(dataset="imagenet2012", tfds_data_dir=str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="prepare_imagenet"):
    data.make_source(config, "train")
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
    data.prepare_imagenet(tmp_path / "no_tars", tmp_path / "tfds")


# ------------------------------------------------- determinism and resume


def test_determinism_resume_and_seeds():
  config = fashion_config(batch_size=8)
  make = lambda seed, **kw: data.make_dataset(  # noqa: E731
      config, split="test", seed=seed, process_index=0, process_count=1, **kw)
  iterator = iter(make(0))
  first = take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 3)
  resumed = iter(make(0))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)
  assert_batches_equal(take(make(0), 3), first)  # same seed, same stream
  other = take(make(1), 1)[0]
  assert not np.array_equal(other["label"], first[0]["label"])
  # Read threads do not change the output.
  config.read_threads = 0
  assert_batches_equal(take(make(0), 3), first)


def test_resume_through_orbax_composite(tmp_path):
  config = fashion_config(batch_size=4)
  make = lambda: iter(data.make_dataset(  # noqa: E731
      config, split="test", seed=3, process_index=0, process_count=1))
  iterator = make()
  take(iterator, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 2)
    restored = make()
    manager.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 2), expected)


def _write_token_shards(directory, split, tokens, labels, num_shards, flipped=None):
  per_shard = -(-len(tokens) // num_shards)
  for shard in range(num_shards):
    path = data.token_shard_path(directory, split, shard, num_shards)
    with data.TokenShardWriter(path) as writer:
      for i in range(shard * per_shard, min(len(tokens), (shard + 1) * per_shard)):
        writer.write(tokens[i], labels[i],
                     None if flipped is None else flipped[i])


def test_epochs_reshuffle_and_flips_vary(tmp_path):
  tokens = np.arange(16 * 4, dtype=np.int32).reshape(16, 2, 2)
  _write_token_shards(tmp_path, "train", tokens, np.arange(16), 2,
                      flipped=tokens + 1000)
  config = data.default_data_config()
  config.update(dataset="cached_tokens", cached_tokens=str(tmp_path), batch_size=4)
  batches = take(data.make_dataset(config, split="train", seed=0, process_index=0,
                                   process_count=1), 8)
  labels = [np.concatenate([b["label"] for b in batches[e * 4:(e + 1) * 4]])
            for e in range(2)]
  for epoch in labels:
    assert sorted(epoch.tolist()) == list(range(16))  # each epoch is a permutation
  assert labels[0].tolist() != labels[1].tolist()  # reshuffled
  flipped = [bool(t[0, 0] >= 1000) for b in batches for t in b["tokens"]]
  assert 0 < sum(flipped) < len(flipped)
  for batch in batches:  # the right record's (possibly flipped) tokens
    expected = tokens[batch["label"]]
    base = np.where(batch["tokens"] >= 1000, batch["tokens"] - 1000, batch["tokens"])
    np.testing.assert_array_equal(base, expected)


# ------------------------------------------------------------ process split


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
  config = fashion_config(batch_size=8)
  kwargs = dict(split="test", seed=7)
  global_batches = take(data.make_dataset(config, process_index=0, process_count=1,
                                          **kwargs), 3)
  local = [take(data.make_dataset(config, process_index=p,
                                  process_count=process_count, **kwargs), 3)
           for p in range(process_count)]
  for step, expected in enumerate(global_batches):
    for key in expected:
      joined = np.concatenate([local[p][step][key] for p in range(process_count)])
      np.testing.assert_array_equal(joined, expected[key], err_msg=key)
    assert local[0][step]["image"].shape[0] == 8 // process_count


def test_padded_eval_split_is_equal_across_processes(tmp_path):
  tokens = np.arange(10 * 3 * 3 * 2, dtype=np.float32).reshape(10, 3, 3, 2)
  _write_token_shards(tmp_path, "validation", tokens, np.arange(10) % 3, 1)
  config = data.default_data_config()
  config.update(dataset="cached_tokens", cached_tokens=str(tmp_path), batch_size=4)
  assert data.eval_split(config) == "validation"
  eval_kwargs = dict(split="validation", seed=0, shuffle=False, num_epochs=1,
                     drop_remainder=False)
  whole = list(data.make_dataset(config, process_index=0, process_count=1, **eval_kwargs))
  halves = [list(data.make_dataset(config, process_index=p, process_count=2, **eval_kwargs))
            for p in range(2)]
  assert len(whole) == len(halves[0]) == len(halves[1]) == 3
  assert data.num_batches(config, "validation", drop_remainder=False) == 3
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
  mask = np.concatenate([b["mask"] for b in whole])
  assert mask.tolist() == [True] * 10 + [False] * 2


# ------------------------------------------------------------ token shards


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_token_shards_round_trip_through_the_pipeline(tmp_path, kind):
  rng = np.random.default_rng(0)
  if kind == "discrete":
    tokens = rng.integers(0, 16384, (11, 4, 4)).astype(np.int32)
  else:
    tokens = rng.normal(size=(11, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, 11)
  _write_token_shards(tmp_path, "train", tokens, labels, 3)
  assert sorted(p.name for p in pathlib.Path(tmp_path).iterdir()) == [
      f"train-0000{i}-of-00003.array_record" for i in range(3)]
  config = data.default_data_config()
  config.update(dataset="cached_tokens", cached_tokens=str(tmp_path / "{split}-*.array_record"),
                batch_size=4)
  batches = list(data.make_dataset(config, split="train", seed=0, process_index=0,
                                   process_count=1, shuffle=False, num_epochs=1,
                                   drop_remainder=False))
  read = np.concatenate([b["tokens"] for b in batches])[:11]
  assert read.dtype == tokens.dtype
  np.testing.assert_array_equal(read, tokens)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:11], labels)


def test_token_record_format_errors(tmp_path):
  with pytest.raises(ValueError, match="heptapod_tokens/1"):
    cached_tokens.decode_record(b"\x81\xa1a\x01")
  with pytest.raises(ValueError, match=r"\[h, w\]"):
    cached_tokens.encode_record(np.zeros((2, 2, 2), np.int32), 0)
  path = data.token_shard_path(tmp_path, "train", 0, 1)
  with pytest.raises(ValueError, match="earlier records"):
    with data.TokenShardWriter(path) as writer:
      writer.write(np.zeros((2, 2), np.int32), 0)
      writer.write(np.zeros((3, 3), np.int32), 0)
  assert list(tmp_path.iterdir()) == []  # no half-written shard left behind
  config = data.default_data_config()
  config.update(dataset="cached_tokens", cached_tokens=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="data.cached_tokens"):
    data.make_source(config, "train")


def test_worker_processes_give_the_same_batches(tmp_path):
  # Sources and transforms must pickle into Grain's worker processes, and the
  # batches must not depend on the worker count (about 10 s: worker start-up).
  tokens = np.arange(24 * 4, dtype=np.int32).reshape(24, 2, 2)
  _write_token_shards(tmp_path, "train", tokens, np.arange(24), 2,
                      flipped=tokens + 1000)
  config = data.default_data_config()
  config.update(dataset="cached_tokens", cached_tokens=str(tmp_path), batch_size=4)
  make = lambda: iter(data.make_dataset(  # noqa: E731
      config, split="train", seed=5, process_index=1, process_count=2))
  in_process = take(make(), 6)
  config.num_workers = 2
  iterator = make()
  try:
    with_workers = take(iterator, 6)
    assert "iterators_in_use_states" in iterator.get_state()  # really in workers
  finally:
    iterator.close()
  assert_batches_equal(with_workers, in_process)
