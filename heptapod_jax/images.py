"""Image grids and conversions for reports (PNG files, TensorBoard)."""

import numpy as np
from PIL import Image
from PIL import ImageDraw


def to_uint8(images):
  """float images in [-1, 1] [..., H, W, C] -> uint8 [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images, columns, padding=2, row_labels=None, label_width=0):
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+p)+p, label_width+cols*(W+p)+p, 3] image.

  row_labels: optional text per row, drawn in a left margin of `label_width`.
  """
  images = np.asarray(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  count, height, width, _ = images.shape
  rows = -(-count // columns)
  canvas = np.full((rows * (height + padding) + padding,
                    label_width + columns * (width + padding) + padding, 3),
                   255, np.uint8)
  for index, image in enumerate(images):
    row, column = divmod(index, columns)
    top = padding + row * (height + padding)
    left = label_width + padding + column * (width + padding)
    canvas[top:top + height, left:left + width] = image
  if row_labels:
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for row, label in enumerate(row_labels[:rows]):
      draw.text((2, padding + row * (height + padding) + height // 2 - 5),
                str(label), fill=(0, 0, 0))
    canvas = np.asarray(picture)
  return canvas


def save_png(image, path):
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
