"""--mode=extract: Fashion-MNIST test images -> token shards -> the generator pipeline."""

import jax
import numpy as np
from flax import nnx

from conftest import load_config
from heptapod_jax import data
from heptapod_jax import extract
from heptapod_jax.models import tokenizers
from heptapod_jax.tools import convert_tokenizer


def test_extracted_shards_read_back_identically(tmp_path):
  tokenizer = tokenizers.build_tokenizer("vq_small", rngs=nnx.Rngs(0))
  tokenizer_dir = tmp_path / "tokenizer"
  convert_tokenizer.write_tokenizer_dir(
      tokenizer_dir, "vq_small", nnx.to_pure_dict(nnx.state(tokenizer, nnx.Param)))
  config = load_config("fashion_mnist", "variant=micro")
  config.tokenizer.init_from = str(tokenizer_dir)
  config.extract.splits = "test"
  config.extract.num_shards = 3
  config.extract.batch_size = 1000
  config.extract.flip = True  # the default run skips flips; the shards must still carry them
  summary = extract.run(config, str(tmp_path))
  assert summary["splits"]["test"] == {"num_examples": 10000, "num_shards": 3}
  shards = sorted(p.name for p in (tmp_path / "tokens").iterdir())
  assert shards == ["test-00000-of-00003.array_record", "test-00001-of-00003.array_record",
                    "test-00002-of-00003.array_record", "tokens.json"]

  # The generator's pipeline yields exactly the tokens of a direct encode.
  token_config = config.data.copy_and_resolve_references()
  token_config.dataset = "cached_tokens"
  token_config.cached_tokens = str(tmp_path / "tokens")
  token_config.random_flip = False
  token_config.batch_size = 50
  batch = next(iter(data.make_dataset(token_config, split="test", seed=0, process_index=0,
                                      process_count=1, shuffle=False, num_epochs=1)))
  image_config = config.data.copy_and_resolve_references()
  image_config.random_flip = False
  image_config.batch_size = 50
  images = next(iter(data.make_dataset(image_config, split="test", seed=0, process_index=0,
                                       process_count=1, shuffle=False, num_epochs=1)))
  expected = np.asarray(jax.jit(tokenizer.encode)(images["image"]))
  np.testing.assert_array_equal(batch["tokens"], expected)
  np.testing.assert_array_equal(batch["label"], images["label"])
  assert batch["tokens"].shape == (50, 8, 8) and batch["tokens"].dtype == np.int32

  # Flipped copies are the tokens of the mirrored images.
  source = data.make_source(token_config, "test")
  flipped = np.asarray(jax.jit(tokenizer.encode)(images["image"][:4, :, ::-1]))
  np.testing.assert_array_equal(np.stack([source[i]["tokens_flipped"] for i in range(4)]),
                                flipped)

  # A second run skips finished shards and leaves them untouched.
  before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tokens").glob("*.array_record")}
  extract.run(config, str(tmp_path))
  after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tokens").glob("*.array_record")}
  assert before == after
