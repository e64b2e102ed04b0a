"""Image preprocessing: decode to RGB, ADM center crop, padding, flip, [-1, 1] scaling.

All functions work on one example on the host (PIL / numpy); the pipeline
calls them per element. Images travel as uint8 [H, W, 3] until the last step
(`to_unit_range`) turns them into float32 in [-1, 1].
"""

import io

import numpy as np
from PIL import Image


def decode_image(data):
  """Decodes encoded image bytes (JPEG, PNG, ...) into an RGB PIL image.

  Forces the full decode, so a truncated or corrupt file raises here (an
  `OSError`, `ValueError` or `PIL.UnidentifiedImageError`), not later.
  """
  image = Image.open(io.BytesIO(data))
  image.load()
  return to_rgb(image)


def to_rgb(image):
  """Converts a PIL image of any common mode to RGB.

  Grayscale (L, 1), CMYK, YCbCr and palette images go through PIL's
  conversion; 16/32-bit integer and float grayscale are rescaled to 8 bits
  first; images with alpha (RGBA, LA, PA, palette with transparency) are
  composited onto a white background.
  """
  if image.mode == "RGB":
    return image
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
    gray = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def center_crop_arr(image, image_size):
  """ADM's (guided-diffusion) center crop: PIL image -> uint8 [S, S, C], S = image_size.

  Halves the image with a BOX filter while its short side is >= 2*S, resizes
  with BICUBIC so the short side is S, then crops the center S x S.
  """
  while min(*image.size) >= 2 * image_size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = image_size / min(*image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size),
                       resample=Image.BICUBIC)
  array = np.array(image)
  crop_y = (array.shape[0] - image_size) // 2
  crop_x = (array.shape[1] - image_size) // 2
  return array[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def pad_to_size(image, image_size):
  """Zero-pads uint8 [h, w, ...] equally on all sides to [S, S, ...], S = image_size.

  An odd margin puts the extra row/column at the bottom/right. Zero is black,
  i.e. -1 after `to_unit_range`.
  """
  height, width = image.shape[:2]
  if height > image_size or width > image_size:
    raise ValueError(
        f"cannot pad a {height}x{width} image to {image_size}x{image_size}")
  top, left = (image_size - height) // 2, (image_size - width) // 2
  pads = [(top, image_size - height - top), (left, image_size - width - left)]
  pads += [(0, 0)] * (image.ndim - 2)
  return np.pad(image, pads, mode="constant", constant_values=0)


def gray_to_rgb(image):
  """uint8 [H, W] -> uint8 [H, W, 3] (the gray value in every channel)."""
  return np.repeat(image[..., None], 3, axis=-1)


def flip_left_right(array):
  """Mirrors [H, W, ...] along the width axis."""
  return np.ascontiguousarray(array[:, ::-1])


def to_unit_range(image):
  """uint8 [H, W, 3] in [0, 255] -> float32 [H, W, 3] in [-1, 1]."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_unit_range(image):
  """float [H, W, 3] in [-1, 1] -> uint8 [H, W, 3] (rounded, clipped)."""
  values = (np.asarray(image, np.float32) + 1.0) * 127.5
  return np.clip(np.round(values), 0, 255).astype(np.uint8)
