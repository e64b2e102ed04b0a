"""A miniature fake ImageNet manual-download set (the official tar layout), built offline.

`write_fake_imagenet_tars(manual_dir)` writes
  ILSVRC2012_img_train.tar : one `<wnid>.tar` per class, each with a few JPEGs
  ILSVRC2012_img_val.tar   : flat `ILSVRC2012_val_%08d.JPEG` files
which `tfds.builder('imagenet2012').download_and_prepare(...)` accepts as its
manual_dir. Validation labels come from the label file bundled with TFDS.
"""

import io
import pathlib
import tarfile

import numpy as np
from PIL import Image

# The first two synsets of the ILSVRC2012 label list (labels 0 and 1).
WNIDS = ("n01440764", "n01443537")


def _jpeg_bytes(rng, height, width):
  pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _add_bytes(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet_tars(manual_dir, *, images_per_class=3, num_val=4,
                             seed=0):
  """Writes the train and val tars into `manual_dir`; returns the directory.

  Train images are 40x56 random JPEGs, validation images 48x36.
  """
  manual_dir = pathlib.Path(manual_dir)
  manual_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
    for wnid in WNIDS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for i in range(images_per_class):
          _add_bytes(class_tar, f"{wnid}_{i + 1}.JPEG", _jpeg_bytes(rng, 40, 56))
      _add_bytes(train, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(num_val):
      _add_bytes(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg_bytes(rng, 48, 36))
  return manual_dir
