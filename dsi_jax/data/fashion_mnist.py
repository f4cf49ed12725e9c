"""Loads Fashion-MNIST from its gzip idx files, with numpy only."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "DSI_JAX_FASHION_MNIST_DIR"

CLASS_NAMES: tuple[str, ...] = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.


def _read_gzip(path: str) -> bytes:
  """Returns the decompressed bytes of `path`, a ValueError naming it if it is corrupt."""
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: not a valid gzip file ({e})") from e


def _parse_idx(data: bytes, path: str, magic: int) -> tuple[list[int], np.ndarray]:
  """Parses an idx byte string of unsigned bytes.

  Args:
    data: The decompressed file contents.
    path: The file name, for error messages.
    magic: The expected magic number (2049 for labels, 2051 for images).

  Returns:
    The dimensions and the flat uint8 payload `[prod(dims)]`.
  """
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated idx header ({len(data)} bytes)")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise ValueError(f"{path}: bad idx magic number {found}, expected {magic}")
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  expected = int(np.prod(dims)) + header
  if len(data) != expected:
    raise ValueError(
      f"{path}: size {len(data)} bytes does not match header dims {dims} ({expected} bytes)"
    )
  return dims, np.frombuffer(data, dtype=np.uint8, offset=header)


def load_fashion_mnist(
  split: str = "train", data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of Fashion-MNIST.

  Args:
    split: "train" (60000 images) or "test" (10000 images).
    data_dir: Directory holding the four `*-idx?-ubyte.gz` files. Defaults to the
      `DSI_JAX_FASHION_MNIST_DIR` environment variable, else `/usr/share/datasets/fashion-mnist`.

  Returns:
    `(images, labels)`: images uint8 `[n, 28, 28]`, labels int64 `[n]` in 0..9 (see
    `CLASS_NAMES`).

  Raises:
    FileNotFoundError: If a file is missing.
    ValueError: If `split` is unknown or a file is corrupt, truncated or inconsistent.
  """
  if split not in _PREFIX:
    raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
  if data_dir is None:
    data_dir = os.environ.get(ENV_VAR) or DEFAULT_DIR
  prefix = _PREFIX[split]
  images_path = os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")
  labels_path = os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")
  for path in (images_path, labels_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"Fashion-MNIST file {path} not found: run `apt-get install dataset-fashion-mnist` "
        f"or set {ENV_VAR} to the directory holding the idx .gz files"
      )

  dims, pixels = _parse_idx(_read_gzip(images_path), images_path, _IMAGES_MAGIC)
  images = pixels.reshape(dims).copy()  # frombuffer views are read-only.
  (num_labels,), raw_labels = _parse_idx(_read_gzip(labels_path), labels_path, _LABELS_MAGIC)
  labels = raw_labels.astype(np.int64)
  if num_labels != images.shape[0]:
    raise ValueError(
      f"{labels_path}: {num_labels} labels but {images_path} holds {images.shape[0]} images"
    )
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..{len(CLASS_NAMES) - 1}")
  return images, labels
