"""ImageNet (ILSVRC2012) through `tfds.data_source`, prepared offline from the official tars.

Preparation (once, needs tensorflow-cpu; never downloads anything):

  from heptapod_jax.data import imagenet
  imagenet.prepare_imagenet(manual_dir="/data/imagenet_tars",  # the tars below
                            data_dir="/data/tfds")               # data.tfds_data_dir

manual_dir holds ILSVRC2012_img_train.tar (1,000 per-class <wnid>.tar inside)
and ILSVRC2012_img_val.tar (ILSVRC2012_val_%08d.JPEG); ILSVRC2012_img_test.tar
is optional. The result is ArrayRecord shards under
data_dir/imagenet2012/<version>/, read here with random access. Reading needs
no TensorFlow; JPEG bytes are decoded with PIL by this module.
"""

import pathlib

import numpy as np

from heptapod_jax.data import corrupt_images
from heptapod_jax.data import preprocess

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TEST_TAR = "ILSVRC2012_img_test.tar"


def _how_to_prepare(name, data_dir):
  where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
  return (
      f"Prepare it offline from the official tars ({TRAIN_TAR}, {VAL_TAR}) with "
      f"heptapod_jax.data.imagenet.prepare_imagenet(manual_dir=DIR_WITH_TARS, "
      f"data_dir={str(where)!r}), which runs tfds.builder({name!r}, "
      "file_format='array_record').download_and_prepare(download_config="
      "tfds.download.DownloadConfig(manual_dir=DIR_WITH_TARS)); then set "
      "data.tfds_data_dir to that data_dir.")


def prepare_imagenet(manual_dir, data_dir, *, name="imagenet2012"):
  """Builds the TFDS ArrayRecord dataset from the tars in `manual_dir`; returns its path.

  Offline: only `manual_dir` is read, GCS and download URLs are never tried.
  Needs tensorflow (the TFDS imagenet2012 builder uses it) and
  importlib_resources. Re-running on a prepared data_dir is a no-op.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manual_dir = pathlib.Path(manual_dir)
  present = [tar for tar in (TRAIN_TAR, VAL_TAR, TEST_TAR)
             if (manual_dir / tar).is_file()]
  if not present:
    raise FileNotFoundError(
        f"prepare_imagenet: none of {TRAIN_TAR}, {VAL_TAR}, {TEST_TAR} found in "
        f"manual_dir={manual_dir}")
  builder = tfds.builder(name, data_dir=str(data_dir),
                         file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(manual_dir), try_download_gcs=False))
  return str(builder.data_dir)


def _open_builder(name, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as error:  # tfds raises several types for unknown names
    raise ValueError(f"data.tfds_name: cannot open TFDS dataset {name!r}: "
                     f"{error}") from error
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data.tfds_data_dir="
        f"{data_dir!r} (looked in {builder.data_dir}). "
        + _how_to_prepare(name, data_dir))
  return builder


class ImageNetSource:
  """Random-access TFDS image split: [i] -> {"image": uint8 [S, S, 3], "label": int32}.

  Works for imagenet2012 and any prepared TFDS dataset with `image` (JPEG/PNG)
  and `label` features. `split` is a TFDS split string ("train",
  "validation", "train[:1%]", ...). Images get the ADM center crop.
  """

  def __init__(self, name, data_dir, split, image_size, *, skip_corrupt=True):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = name
    self.data_dir = data_dir
    self.split = split
    self.image_size = int(image_size)
    self.skip_corrupt = bool(skip_corrupt)
    builder = _open_builder(name, data_dir)
    available = sorted(builder.info.splits)
    base_split = split.split("[")[0]
    if base_split not in available:
      raise ValueError(f"split {split!r} not in TFDS dataset {name!r}; "
                       f"prepared splits: {', '.join(available)}")
    self.num_classes = builder.info.features["label"].num_classes
    self._records = builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})
    self.skipped = corrupt_images.SkippedImages()

  def __len__(self):
    return len(self._records)

  def _load(self, index):
    record = self._records[index]
    image = preprocess.decode_image(record["image"])
    return {"image": preprocess.center_crop_arr(image, self.image_size),
            "label": np.int32(record["label"])}

  def _name_of(self, index):
    file_name = self._records[index].get("file_name", b"")
    if isinstance(file_name, bytes):
      file_name = file_name.decode("utf-8", "replace")
    return f"{self.name}/{self.split}[{index}] {file_name}".strip()

  def __getitem__(self, index):
    return corrupt_images.load_skipping_corrupt(
        index, len(self), self._load, self._name_of,
        skip=self.skip_corrupt, counter=self.skipped)

  def __repr__(self):
    return (f"ImageNetSource({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"data_dir={self.data_dir!r})")
