"""Image folders: one subdirectory per class (sorted class names -> labels 0..K-1).

Layouts accepted for `data.image_folder = ROOT`:
  ROOT/<split>/<class>/**/<image>   when ROOT/<split> is a directory; the class
                                    list then comes from ROOT/train if present,
                                    so every split shares the same labels;
  ROOT/<class>/**/<image>           the single split "train".
Images: JPEG, PNG, BMP, GIF, WebP, TIFF (by extension, case-insensitive), any
PIL mode (grayscale, CMYK, RGBA, palette, 16-bit) converted to RGB, then the
ADM center crop to `image_size`. Corrupt files: see `corrupt_images`.
"""

import os
import pathlib

import numpy as np

from heptapod_jax.data import corrupt_images
from heptapod_jax.data import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff")


def split_directory(root, split):
  """(directory holding the class folders of `split`, directory naming the classes)."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(
        f"data.image_folder: {root} is not a directory (expected one "
        "subdirectory per class, or <split>/<class> subdirectories)")
  if (root / split).is_dir():
    classes_from = root / "train" if (root / "train").is_dir() else root / split
    return root / split, classes_from
  if split == "train":
    return root, root
  raise FileNotFoundError(
      f"data.image_folder: split {split!r} needs the directory {root / split} "
      f"(only {root}/<class> folders were found, which form the 'train' split)")


def class_names(directory):
  """Sorted names of the subdirectories of `directory` (hidden ones excluded)."""
  return sorted(entry.name for entry in os.scandir(directory)
                if entry.is_dir() and not entry.name.startswith("."))


def list_images(directory, classes):
  """Sorted [(path, label)] of the image files under directory/<class>/."""
  files = []
  for label, name in enumerate(classes):
    class_dir = pathlib.Path(directory) / name
    if not class_dir.is_dir():
      continue
    for parent, dirs, names in os.walk(class_dir):
      dirs.sort()
      for file_name in sorted(names):
        if file_name.lower().endswith(IMAGE_EXTENSIONS):
          files.append((os.path.join(parent, file_name), label))
  return files


class ImageFolderSource:
  """Random-access image folder split: [i] -> {"image": uint8 [S, S, 3], "label": int32}.

  Attributes:
    classes: the sorted class names; label k is classes[k].
    files: [(path, label)] in the order of the indices.
    skipped: `corrupt_images.SkippedImages` of this source (count, paths).
  """

  def __init__(self, root, split, image_size, *, skip_corrupt=True):
    self.root = str(root)
    self.split = split
    self.image_size = int(image_size)
    self.skip_corrupt = bool(skip_corrupt)
    directory, classes_from = split_directory(root, split)
    self.classes = class_names(classes_from)
    if not self.classes:
      raise FileNotFoundError(
          f"data.image_folder: no class subdirectories in {classes_from}")
    unknown = sorted(set(class_names(directory)) - set(self.classes))
    if unknown:
      raise ValueError(
          f"data.image_folder: {directory} has classes {unknown} that are not "
          f"in {classes_from}")
    self.files = list_images(directory, self.classes)
    if not self.files:
      raise FileNotFoundError(
          f"data.image_folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
          f"under {directory}/<class>/")
    self.skipped = corrupt_images.SkippedImages()

  @property
  def num_classes(self):
    return len(self.classes)

  def __len__(self):
    return len(self.files)

  def _load(self, index):
    path, label = self.files[index]
    with open(path, "rb") as f:
      image = preprocess.decode_image(f.read())
    return {"image": preprocess.center_crop_arr(image, self.image_size),
            "label": np.int32(label)}

  def __getitem__(self, index):
    return corrupt_images.load_skipping_corrupt(
        index, len(self), self._load, lambda i: self.files[i][0],
        skip=self.skip_corrupt, counter=self.skipped)

  def __repr__(self):
    return (f"ImageFolderSource({self.root!r}, split={self.split!r}, "
            f"n={len(self)}, classes={len(self.classes)})")

