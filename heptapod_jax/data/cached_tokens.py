"""Cached tokenizer outputs: ArrayRecord shards of {"tokens", "label"} records.

The token-extraction step encodes every image once with the visual tokenizer
and writes the result with `TokenShardWriter`; the generator then trains on
these records instead of images.

Record format "heptapod_tokens/1": one msgpack map per ArrayRecord record,
  "format":         "heptapod_tokens/1"
  "tokens":         .npy bytes (numpy.save, allow_pickle=False) of either
                    int32 [h, w] codes (discrete tokenizer) or
                    float32/float16 [h, w, C] latents (continuous tokenizer)
  "label":          int, the class
  "tokens_flipped": optional, same array for the horizontally flipped image
                    (used by the reader when data.random_flip is on)
No pickle anywhere. Shards are named by `token_shard_path`:
  <dir>/<split>-<shard:05d>-of-<num_shards:05d>.array_record
and are written under a temporary name that is renamed on close, so a crashed
extractor never leaves a half shard that the reader would pick up.
"""

import glob
import io
import os
import pathlib

from array_record.python import array_record_module
import msgpack
import numpy as np

FORMAT = "heptapod_tokens/1"
SHARD_SUFFIX = ".array_record"


def _array_to_npy(array):
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def _npy_to_array(data):
  return np.load(io.BytesIO(data), allow_pickle=False)


def _stored_tokens(tokens):
  """Validates token arrays and picks their stored dtype (int32, float32 or float16)."""
  tokens = np.asarray(tokens)
  if np.issubdtype(tokens.dtype, np.integer):
    if tokens.ndim != 2:
      raise ValueError(f"discrete tokens must be [h, w], got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
      raise ValueError("discrete tokens must be non-negative int32 codes")
    return tokens.astype(np.int32)
  if np.issubdtype(tokens.dtype, np.floating):
    if tokens.ndim != 3:
      raise ValueError(
          f"continuous tokens must be [h, w, C], got shape {tokens.shape}")
    dtype = np.float16 if tokens.dtype == np.float16 else np.float32
    return tokens.astype(dtype)
  raise ValueError(f"tokens must be integer codes or float latents, got "
                   f"dtype {tokens.dtype}")


def encode_record(tokens, label, tokens_flipped=None):
  """One record: tokens int [h, w] or float [h, w, C], label int -> bytes."""
  record = {"format": FORMAT, "tokens": _array_to_npy(_stored_tokens(tokens)),
            "label": int(label)}
  if tokens_flipped is not None:
    flipped = _stored_tokens(tokens_flipped)
    if flipped.shape != np.shape(tokens):
      raise ValueError(f"tokens_flipped shape {flipped.shape} != tokens shape "
                       f"{np.shape(tokens)}")
    record["tokens_flipped"] = _array_to_npy(flipped)
  return msgpack.packb(record, use_bin_type=True)


def _reader_dtype(array):
  return array.astype(np.int32 if np.issubdtype(array.dtype, np.integer)
                      else np.float32)


def decode_record(data):
  """bytes -> {"tokens": int32 [h, w] | float32 [h, w, C], "label": int32, ["tokens_flipped"]}."""
  record = msgpack.unpackb(data, raw=False)
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    found = record.get("format") if isinstance(record, dict) else type(record)
    raise ValueError(f"not a {FORMAT} token record (format: {found!r})")
  example = {"tokens": _reader_dtype(_npy_to_array(record["tokens"])),
             "label": np.int32(record["label"])}
  if "tokens_flipped" in record:
    example["tokens_flipped"] = _reader_dtype(
        _npy_to_array(record["tokens_flipped"]))
  return example


def token_shard_path(directory, split, shard_index, num_shards):
  """<directory>/<split>-<shard_index:05d>-of-<num_shards:05d>.array_record."""
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
  return os.path.join(
      str(directory),
      f"{split}-{shard_index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}")


class TokenShardWriter:
  """Writes token records into one ArrayRecord shard.

    with TokenShardWriter(token_shard_path(d, "train", i, n)) as writer:
      writer.write(tokens, label)                  # tokens: int [h,w] or float [h,w,C]
      writer.write(tokens, label, tokens_flipped)  # optional flipped copy

  All records of a shard must share shape and kind (discrete/continuous).
  The file appears under its final name only after `close()`.
  """

  def __init__(self, path):
    self.path = str(path)
    if not self.path.endswith(SHARD_SUFFIX):
      raise ValueError(f"token shard path must end with {SHARD_SUFFIX}: "
                       f"{self.path}")
    pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
    self._temporary_path = self.path + ".incomplete"
    self._writer = array_record_module.ArrayRecordWriter(
        self._temporary_path, "group_size:1")
    self._signature = None
    self.num_written = 0

  def write(self, tokens, label, tokens_flipped=None):
    """Appends one example; see the module docstring for shapes."""
    if self._writer is None:
      raise ValueError(f"TokenShardWriter for {self.path} is closed")
    stored = _stored_tokens(tokens)
    signature = (stored.shape, stored.dtype.kind, tokens_flipped is not None)
    if self._signature is None:
      self._signature = signature
    elif signature != self._signature:
      raise ValueError(
          f"{self.path}: record {self.num_written} has (shape, kind, flipped) "
          f"{signature}, earlier records {self._signature}")
    self._writer.write(encode_record(stored, label, tokens_flipped))
    self.num_written += 1

  def close(self):
    """Finishes the shard and moves it to its final name."""
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    os.replace(self._temporary_path, self.path)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback):
    if exc_type is None:
      self.close()
    elif self._writer is not None:  # leave no half shard behind
      self._writer.close()
      self._writer = None
      os.remove(self._temporary_path)


def resolve_shards(pattern, split):
  """Sorted shard paths of `split` for data.cached_tokens = `pattern`.

  `pattern` is a directory (its `<split>-*.array_record` files), or a glob
  that may contain "{split}" (e.g. "/tokens/{split}-*.array_record").
  """
  if not pattern:
    raise ValueError("data.cached_tokens: not set (a directory of token shards "
                     "or a glob such as /tokens/{split}-*.array_record)")
  if os.path.isdir(pattern):
    expanded = os.path.join(pattern, f"{split}-*{SHARD_SUFFIX}")
  else:
    expanded = pattern.replace("{split}", split)
  paths = sorted(glob.glob(expanded))
  if not paths:
    raise FileNotFoundError(
        f"data.cached_tokens: no token shards match {expanded!r} "
        f"(split {split!r})")
  return paths


class CachedTokenSource:
  """Random-access token records: [i] -> {"tokens", "label": int32[, "tokens_flipped"]}."""

  def __init__(self, pattern, split):
    import grain  # pylint: disable=g-import-not-at-top
    self.pattern = pattern
    self.split = split
    self.paths = resolve_shards(pattern, split)
    self._records = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return decode_record(self._records[index])

  def __repr__(self):
    return (f"CachedTokenSource({self.pattern!r}, split={self.split!r}, "
            f"shards={len(self.paths)}, n={len(self)})")
