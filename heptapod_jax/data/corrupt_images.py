"""Corrupt-image handling shared by the image sources: skip, count, log; or fail.

A corrupt or truncated file is *skipped* by reading the next index of the
source in its place (modulo its length). This keeps every epoch the same
length on every process, which multi-host training needs (all processes must
produce the same number of batches), at the cost of one duplicated example per
corrupt file. Each skipped file is logged once (absl warning, with its path)
and counted, per source (`source.skipped`) and per Python process
(`skipped_image_count()`). With `data.num_workers > 0` the decoding happens in
Grain worker processes, so their counts stay there (the warnings still reach
the log).
"""

import struct
import threading

from absl import logging
from PIL import Image


class CorruptImageError(RuntimeError):
  """An image file could not be decoded and skipping is off."""


class SkippedImages:
  """Thread-safe record of the image files that failed to decode."""

  def __init__(self):
    self._lock = threading.Lock()
    self._paths = {}

  def record(self, path, error):
    """Records a failure of `path`; returns True the first time it is seen."""
    with self._lock:
      first = path not in self._paths
      self._paths[path] = f"{type(error).__name__}: {error}"
      return first

  @property
  def count(self):
    """Number of distinct files skipped so far."""
    with self._lock:
      return len(self._paths)

  @property
  def paths(self):
    """Sorted list of the skipped files."""
    with self._lock:
      return sorted(self._paths)

  def errors(self):
    """{path: error message} of the skipped files."""
    with self._lock:
      return dict(self._paths)

  def __getstate__(self):
    return {"paths": self.errors()}

  def __setstate__(self, state):
    self._lock = threading.Lock()
    self._paths = dict(state["paths"])


_PROCESS_SKIPPED = SkippedImages()


def skipped_images():
  """The `SkippedImages` of every image source in this Python process."""
  return _PROCESS_SKIPPED


def skipped_image_count():
  """Number of distinct image files skipped in this Python process."""
  return _PROCESS_SKIPPED.count


# What PIL raises on broken files: OSError (truncated data, unidentified
# format), SyntaxError / struct.error / EOFError (broken headers), ValueError,
# and DecompressionBombError for absurd sizes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                 Image.DecompressionBombError)


def load_skipping_corrupt(index, num_examples, load, name_of, *, skip, counter):
  """Returns `load(index)`; on a decode error, the next loadable index's result.

  Args:
    index: the index asked for, in [0, num_examples).
    num_examples: length of the source (substitutes wrap around).
    load: index -> example; raises a decode error for a corrupt file.
    name_of: index -> the file name or path to report.
    skip: False raises `CorruptImageError` naming the file instead.
    counter: the source's `SkippedImages`.
  """
  for offset in range(num_examples):
    current = (index + offset) % num_examples
    try:
      return load(current)
    except DECODE_ERRORS as error:
      path = name_of(current)
      if not skip:
        raise CorruptImageError(
            f"cannot decode image {path}: {type(error).__name__}: {error} "
            "(set data.skip_corrupt_images=True to skip such files)") from error
      if counter.record(path, error):
        _PROCESS_SKIPPED.record(path, error)
        logging.warning("Skipping corrupt image %s (%s: %s); total skipped: %d",
                        path, type(error).__name__, error, counter.count)
  raise CorruptImageError(f"no decodable image among all {num_examples} files")
