"""What a model reads, made the same way for training (the SeqIO tasks) and for search.

Images: uint8 RGB pixels (prepared by `images.preprocess_image`) scaled to [-1, 1].
Texts: the tokenizer's ids of the whole text (no truncation by the tokenizer), cut or padded
with 0 to the run's length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def scale_pixels(pixels):
  """float pixels in [0, 255] -> [-1, 1]; numpy arrays and TF tensors alike."""
  return pixels / 127.5 - 1.0


def image_inputs(pixels: np.ndarray) -> np.ndarray:
  """uint8 `[..., h, w, 3]` -> float32 model inputs in [-1, 1]."""
  return scale_pixels(np.asarray(pixels, np.float32)).astype(np.float32)


def text_token_ids(tokenizer, text: str) -> list[int]:
  """The ids of `text` under a `tokenizers.Tokenizer` set to no truncation and no padding."""
  return tokenizer.encode(text).ids


def token_rows(rows: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
  """int32 `[len(rows), length]`: each row cut or padded with 0 to `length` (default: the
  longest row)."""
  length = length or max((len(r) for r in rows), default=0)
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    r = np.asarray(r)[:length]
    out[i, : len(r)] = r
  return out
