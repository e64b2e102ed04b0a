"""Fashion-MNIST from the IDX files of the Debian package `dataset-fashion-mnist`.

Files (gzip, or the same names without `.gz`) in `data.fashion_mnist_dir`,
default `/usr/share/datasets/fashion-mnist/`:
  train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz   60,000 examples
  t10k-images-idx3-ubyte.gz,  t10k-labels-idx1-ubyte.gz    10,000 examples
28x28 grayscale uint8, 10 classes.
"""

import functools
import gzip
import pathlib

import numpy as np
from PIL import Image

from heptapod_jax.data import preprocess

NUM_CLASSES = 10
SIDE = 28
# Our split name -> the IDX file prefix.
SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path):
  """Reads one IDX file (gzip or raw) into a uint8 array of its stored shape."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)):
    raise ValueError(f"{path}: IDX payload does not match its shape {shape}")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def _find(directory, name):
  for candidate in (directory / f"{name}.gz", directory / name):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
      f"Fashion-MNIST file {directory / (name + '.gz')} not found. Install the "
      "Debian package (`sudo apt-get install dataset-fashion-mnist`, files in "
      "/usr/share/datasets/fashion-mnist) or set data.fashion_mnist_dir to the "
      "directory holding the IDX files.")


@functools.lru_cache(maxsize=4)
def load_split(directory, split):
  """(images uint8 [N, 28, 28], labels int32 [N]) of `split` ('train' | 'test')."""
  if split not in SPLITS:
    raise ValueError(f"Fashion-MNIST split {split!r} unknown; allowed: "
                     f"{', '.join(SPLITS)}")
  directory = pathlib.Path(directory)
  prefix = SPLITS[split]
  images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
  labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(
        f"Fashion-MNIST {split} in {directory}: images {images.shape} and "
        f"labels {labels.shape} do not match")
  return images, labels.astype(np.int32)


def fit_to_size(image, image_size):
  """uint8 [28, 28] -> uint8 [S, S, 3]: zero-padded when S >= 28, else ADM-resized."""
  if image_size >= image.shape[0] and image_size >= image.shape[1]:
    fitted = preprocess.pad_to_size(image, image_size)
  else:
    fitted = preprocess.center_crop_arr(Image.fromarray(image, mode="L"),
                                        image_size)
  return preprocess.gray_to_rgb(fitted)


class FashionMnistSource:
  """Random-access Fashion-MNIST split: [i] -> {"image": uint8 [S, S, 3], "label": int32}.

  The 28x28 grayscale image is padded with black (0) to `image_size` (or
  resized down with the ADM crop when image_size < 28) and repeated to RGB.
  """

  num_classes = NUM_CLASSES

  def __init__(self, directory, split, image_size):
    self.directory = str(directory)
    self.split = split
    self.image_size = int(image_size)
    self._images, self._labels = load_split(self.directory, split)

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    return {"image": fit_to_size(self._images[index], self.image_size),
            "label": np.int32(self._labels[index])}

  def __repr__(self):
    return (f"FashionMnistSource({self.directory!r}, split={self.split!r}, "
            f"n={len(self)}, image_size={self.image_size})")
