"""`dsi_flickr`: Flickr8k / Flickr30k images with their captions, from local files.

The layout of the source folder decides:
- Karpathy split JSON (chosen when present): `dataset_flickr30k.json` (or
  `dataset_flickr8k.json`) holding `{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`,
  images in `flickr30k-images/` (or `flickr8k-images/`, `images/`, `Images/`). Splits `train`
  ("train" and "restval"), `validation` ("val") and `test` ("test"), in file order.
- Flickr8k captions CSV: `captions.txt` with the header `image,caption` and one line per
  caption, images in `images/` (or `Images/`, `Flicker8k_Dataset/`). One split, `train`,
  holding every image in order of first appearance (the corpus layer makes its own splits).

Features: `key` (the image file name), `image` (RGB uint8 `[size, size, 3]`), `label` (-1:
no classes), `captions` (the image's captions, in file order).
"""

from __future__ import annotations

import csv
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsi_jax.data.builders import base

KARPATHY_FILES = ("dataset_flickr30k.json", "dataset_flickr8k.json")
KARPATHY_IMAGE_DIRS = ("flickr30k-images", "flickr8k-images", "images", "Images")
CAPTIONS_FILE = "captions.txt"
CAPTIONS_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset")
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def _find_dir(source: str, names: tuple[str, ...], annotation_file: str) -> str:
  """Returns the first of `source/<name>` that is a folder."""
  for name in names:
    path = os.path.join(source, name)
    if os.path.isdir(path):
      return path
  raise FileNotFoundError(
    f"{annotation_file}: no image folder beside it (looked for {', '.join(names)})"
  )


def read_captions_csv(path: str) -> dict[str, list[str]]:
  """Reads a Flickr8k `captions.txt`: `{image file name: [captions]}` in file order.

  Raises:
    ValueError: If the header is not `image,caption` or a line has no caption.
  """
  captions: dict[str, list[str]] = {}
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = csv.reader(f)
    header = next(rows, None)
    if header is None or [h.strip() for h in header] != ["image", "caption"]:
      shown = "nothing" if header is None else repr(",".join(header))
      raise ValueError(f"{path}: expected the header 'image,caption', found {shown}")
    for row in rows:
      if not row or not "".join(row).strip():
        continue  # Blank line.
      if len(row) < 2:
        raise ValueError(f"{path}: line {rows.line_num} has no caption: {','.join(row)!r}")
      # An unquoted caption may hold commas: everything after the first comma is the caption.
      image, caption = row[0].strip(), ",".join(row[1:]).strip()
      captions.setdefault(image, []).append(caption)
  return captions


def read_karpathy_json(path: str) -> dict[str, list[tuple[str, list[str]]]]:
  """Reads a Karpathy split file: `{split: [(file name, [captions])]}` in file order.

  Raises:
    ValueError: If the file is not JSON, lacks `images`, or an entry lacks `filename`,
      `split` or `sentences[].raw`, or names an unknown split.
  """
  data = base.read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"{path}: not a Karpathy split file, missing the list 'images'")
  splits: dict[str, list[tuple[str, list[str]]]] = {}
  for i, entry in enumerate(data["images"]):
    try:
      filename, split = str(entry["filename"]), str(entry["split"])
      captions = [str(sentence["raw"]).strip() for sentence in entry["sentences"]]
    except (KeyError, TypeError) as e:
      raise ValueError(
        f"{path}: images[{i}] lacks 'filename', 'split' or 'sentences[].raw' ({e!r})"
      ) from e
    if split not in _KARPATHY_SPLITS:
      raise ValueError(f"{path}: images[{i}] has unknown split {split!r}")
    splits.setdefault(_KARPATHY_SPLITS[split], []).append((filename, captions))
  return splits


class DsiFlickr(base.LocalBuilder):
  """Flickr8k (captions.txt) or Flickr30k / Flickr8k (Karpathy JSON) images and captions."""

  name = "dsi_flickr"
  BUILDER_CONFIGS = base.standard_configs((64, 160, 256))
  DEFAULT_BUILDER_CONFIG_NAME = "64px_all"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point `source=` / `manual_dir` at a folder holding either `captions.txt` + `images/`
  (Flickr8k) or `dataset_flickr30k.json` + `flickr30k-images/` (Karpathy splits).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Flickr8k / Flickr30k photos with their captions, from local files.",
      features=tfds.features.FeaturesDict(
        {
          "key": tfds.features.Tensor(shape=(), dtype=tf.string, doc="image file name"),
          "image": self._image_feature(),
          "label": tfds.features.Scalar(dtype=np.int64, doc="-1: no classes"),
          "captions": tfds.features.Sequence(tfds.features.Text()),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
      homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
    )

  def _source_splits(self, source: str) -> dict[str, dict[str, Any]]:
    for name in KARPATHY_FILES:
      path = os.path.join(source, name)
      if os.path.isfile(path):
        image_dir = _find_dir(source, KARPATHY_IMAGE_DIRS, path)
        self.info.metadata["layout"] = "karpathy"
        return {
          split: {"items": items, "image_dir": image_dir, "annotation_file": path, "split": split}
          for split, items in read_karpathy_json(path).items()
        }
    path = os.path.join(source, CAPTIONS_FILE)
    if os.path.isfile(path):
      image_dir = _find_dir(source, CAPTIONS_IMAGE_DIRS, path)
      items = list(read_captions_csv(path).items())
      self.info.metadata["layout"] = "flickr8k_captions"
      return {
        "train": {"items": items, "image_dir": image_dir, "annotation_file": path, "split": "train"}
      }
    raise FileNotFoundError(f"{source}: holds neither {CAPTIONS_FILE} nor {KARPATHY_FILES[0]}")

  def _generate_examples(
    self,
    items: list[tuple[str, list[str]]],
    image_dir: str,
    annotation_file: str,
    split: str,
  ):
    for filename, _ in items:  # Check all before the slow decoding.
      if not os.path.isfile(os.path.join(image_dir, filename)):
        raise FileNotFoundError(f"{annotation_file}: names image {filename}, not in {image_dir}")
    for filename, captions in items:
      image = self._load_image(os.path.join(image_dir, filename), split)
      if image is not None:
        yield filename, {"key": filename, "image": image, "label": -1, "captions": captions}
