"""Image preprocessing shared by the dataset builders: decode, filter by aspect, crop, resize.

The reference ViT-DSI recipe keeps an image only if its aspect ratio (width / height) lies in
[0.9, 1.1], crops the centre square and resizes it (64, 160 or 256 px). `preprocess_image` does
exactly that and always returns RGB uint8 `[size, size, 3]`, whatever came in: grayscale is
replicated to three channels, an alpha channel is composited on white, and OpenCV's BGR order
is turned into RGB. EXIF orientation is ignored, as TensorFlow's and PIL's decoders do.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_ASPECT_RANGE: tuple[float, float] = (0.9, 1.1)


def decode_image(data: bytes, *, source: str = "<image>") -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ...) to an RGB or RGBA array.

  Args:
    data: The encoded file contents.
    source: A name for the image (usually its file name), used in error messages.

  Returns:
    uint8 `[height, width, 3]` (RGB) or `[height, width, 4]` (RGBA); 16-bit images are scaled
    down to 8 bits, grayscale is replicated to three channels.

  Raises:
    ValueError: If OpenCV cannot decode `data` (corrupt, truncated or not an image).
  """
  try:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
  except cv2.error:  # Raised for an empty buffer; None is returned for other bad data.
    image = None
  if image is None or image.size == 0:
    raise ValueError(f"{source}: not a decodable image")
  if image.ndim == 3 and image.shape[-1] == 4:
    image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
  elif image.ndim == 3 and image.shape[-1] == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  return _to_uint8_rgb_or_rgba(image, source)


def _to_uint8_rgb_or_rgba(image: np.ndarray, source: str) -> np.ndarray:
  """Returns `image` (RGB order already) as uint8 `[h, w, 3]` or `[h, w, 4]`."""
  if image.dtype == np.uint16:
    image = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
  elif image.dtype == np.bool_:
    image = image.astype(np.uint8) * 255
  elif image.dtype != np.uint8:
    raise ValueError(f"{source}: unsupported image dtype {image.dtype}, expected uint8")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  elif image.ndim == 3 and image.shape[-1] == 2:  # Gray + alpha.
    image = np.concatenate([np.repeat(image[..., :1], 3, axis=-1), image[..., 1:]], axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f"{source}: unsupported image shape {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"{source}: empty image of shape {image.shape}")
  return image


def composite_on_white(image: np.ndarray) -> np.ndarray:
  """Blends an RGBA uint8 image `[h, w, 4]` onto a white background, giving RGB `[h, w, 3]`."""
  rgb = image[..., :3].astype(np.float32)
  alpha = image[..., 3:].astype(np.float32) / 255.0
  return np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def preprocess_image(
  image_or_bytes: np.ndarray | bytes,
  *,
  size: int,
  aspect_range: tuple[float, float] | None = DEFAULT_ASPECT_RANGE,
  source: str = "<image>",
) -> np.ndarray | None:
  """Decodes, filters, centre-crops and resizes one image.

  Args:
    image_or_bytes: Encoded image bytes (decoded with OpenCV), or an array in RGB(A) order:
      uint8 (or uint16) `[h, w]`, `[h, w, 1]`, `[h, w, 2]` (gray + alpha), `[h, w, 3]` or
      `[h, w, 4]`.
    size: Side of the square output, in pixels.
    aspect_range: Inclusive `(low, high)` bounds on width / height; an image outside them is
      rejected (None is returned). None keeps every image.
    source: A name for the image (usually its file name), used in error messages.

  Returns:
    RGB uint8 `[size, size, 3]`, or None if the aspect ratio is outside `aspect_range`.

  Raises:
    ValueError: If the bytes cannot be decoded ("<source>: not a decodable image"), or the
      array has an unsupported shape or dtype.
  """
  if size < 1:
    raise ValueError(f"size must be positive, got {size}")
  if isinstance(image_or_bytes, bytes | bytearray | memoryview):
    image = decode_image(bytes(image_or_bytes), source=source)
  else:
    image = _to_uint8_rgb_or_rgba(np.asarray(image_or_bytes), source)
  height, width = image.shape[:2]
  if aspect_range is not None:
    low, high = aspect_range
    if not low <= width / height <= high:
      return None
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image = image[top : top + side, left : left + side]
  if image.shape[-1] == 4:
    image = composite_on_white(image)  # Before resizing, so edges blend against white.
  if side != size:
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    image = cv2.resize(image, (size, size), interpolation=interpolation)
  return np.ascontiguousarray(image)


def augmented_view(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  crop: float = 0.8,
  flip: bool = True,
  jitter: float = 0.2,
) -> np.ndarray:
  """Another view of an RGB uint8 `[h, w, 3]` image, the same size: a random square-ish crop
  keeping `crop` of each side, a horizontal flip (half the time), and brightness and contrast
  each scaled by a factor in [1 - jitter, 1 + jitter]. Deterministic given `rng`."""
  if not 0 < crop <= 1:
    raise ValueError(f"crop must be in (0, 1], got {crop}")
  height, width = image.shape[:2]
  ch, cw = max(1, round(height * crop)), max(1, round(width * crop))
  top = int(rng.integers(0, height - ch + 1))
  left = int(rng.integers(0, width - cw + 1))
  view = image[top : top + ch, left : left + cw]
  if (ch, cw) != (height, width):
    view = cv2.resize(view, (width, height), interpolation=cv2.INTER_CUBIC)
  if flip and rng.random() < 0.5:
    view = view[:, ::-1]
  if jitter:
    brightness, contrast = rng.uniform(1 - jitter, 1 + jitter, size=2)
    pixels = view.astype(np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean * brightness
    view = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(view)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
  """`[n, h, w]` or `[n, h, w, c]` images (uint8 or float32) -> `[n, size, size, c]`: area
  averaging when shrinking, bicubic when enlarging, unchanged at that size already."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:3] == (size, size):
    return images
  how = cv2.INTER_AREA if images.shape[1] > size else cv2.INTER_CUBIC
  out = [cv2.resize(x, (size, size), interpolation=how) for x in images]
  return np.stack(out).reshape(len(images), size, size, images.shape[-1])
