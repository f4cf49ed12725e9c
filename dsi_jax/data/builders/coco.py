"""`dsi_coco2017`: COCO 2017 images with their object categories and captions, from local files.

Source folder, in the official layout:
```
annotations/instances_{train,val}2017.json   # object instances (categories per image)
annotations/captions_{train,val}2017.json    # 5 captions or so per image
{train,val}2017/<file_name>                  # the images
```
A split (`train` from train2017, `validation` from val2017) is built when at least one of its
two annotation files exists; its images are the union of the files' `images` lists, in
increasing image id. An image with no instance annotation has no categories; with no caption
file, images have no captions.

Features: `key` (the image's `file_name`), `image_id` (int64), `image` (RGB uint8
`[size, size, 3]`), `label` (-1: COCO has no single class), `categories` (sorted unique
category ids of the image's instances), `captions` (in file order). Category names are in
`info.metadata["categories"]` (`[{"id", "name", "supercategory"}]`).
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsi_jax.data.builders import base

_SPLITS = {"train": "train2017", "validation": "val2017"}


def _require(data: Any, keys: tuple[str, ...], path: str, what: str) -> None:
  """Raises a ValueError naming `path` unless `data` is a dict with every one of `keys`."""
  missing = list(keys) if not isinstance(data, dict) else [k for k in keys if k not in data]
  if missing:
    raise ValueError(f"{path}: not a COCO {what} file, missing keys {missing}")


def _read_annotations(
  path: str, kind: str
) -> tuple[dict[int, str], list[dict[str, Any]], list[dict[str, Any]]]:
  """Reads an instances or captions file: `({image id: file name}, annotations, categories)`."""
  data = base.read_json(path)
  _require(data, ("images", "annotations"), path, kind)
  images = {}
  for i, image in enumerate(data["images"]):
    if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
      raise ValueError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
    images[int(image["id"])] = str(image["file_name"])
  field = "category_id" if kind == "instances" else "caption"
  for i, annotation in enumerate(data["annotations"]):
    if not isinstance(annotation, dict) or "image_id" not in annotation or field not in annotation:
      raise ValueError(f"{path}: annotations[{i}] lacks 'image_id' or '{field}'")
    if int(annotation["image_id"]) not in images:
      raise ValueError(
        f"{path}: annotations[{i}] names image id {annotation['image_id']}, not in its images"
      )
  return images, data["annotations"], data.get("categories", [])


class DsiCoco2017(base.LocalBuilder):
  """COCO 2017 (instances and captions) as square RGB images with categories and captions."""

  name = "dsi_coco2017"
  BUILDER_CONFIGS = base.standard_configs((64, 160, 256))
  DEFAULT_BUILDER_CONFIG_NAME = "64px_all"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point `source=` / `manual_dir` at a folder holding COCO 2017's `annotations/` folder
  (instances_*2017.json and/or captions_*2017.json) and the image folders train2017/, val2017/.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="COCO 2017 images with object categories and captions, from local files.",
      features=tfds.features.FeaturesDict(
        {
          "key": tfds.features.Tensor(shape=(), dtype=tf.string, doc="image file name"),
          "image_id": tfds.features.Scalar(dtype=np.int64, doc="COCO image id"),
          "image": self._image_feature(),
          "label": tfds.features.Scalar(dtype=np.int64, doc="-1: no single class"),
          "categories": tfds.features.Sequence(
            tfds.features.Scalar(dtype=np.int64), doc="sorted unique category ids"
          ),
          "captions": tfds.features.Sequence(tfds.features.Text()),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
      homepage="https://cocodataset.org",
      license="CC BY 4.0 (annotations); images under their Flickr licenses",
    )

  def _source_splits(self, source: str) -> dict[str, dict[str, Any]]:
    splits = {}
    for split, folder in _SPLITS.items():
      files = {
        kind: os.path.join(source, "annotations", f"{kind}_{folder}.json")
        for kind in ("instances", "captions")
      }
      files = {kind: path for kind, path in files.items() if os.path.isfile(path)}
      if files:
        splits[split] = {"files": files, "image_dir": os.path.join(source, folder), "split": split}
    if not splits:
      raise FileNotFoundError(
        f"{os.path.join(source, 'annotations')}: no instances_*2017.json or captions_*2017.json"
      )
    return splits

  def _generate_examples(self, files: dict[str, str], image_dir: str, split: str):
    file_names: dict[int, str] = {}
    listed_in: dict[int, str] = {}  # The annotation file that lists each image first.
    categories: dict[int, set[int]] = collections.defaultdict(set)
    captions: dict[int, list[str]] = collections.defaultdict(list)
    for kind, path in files.items():
      images, annotations, category_list = _read_annotations(path, kind)
      for image_id, file_name in images.items():
        file_names.setdefault(image_id, file_name)
        listed_in.setdefault(image_id, path)
      for annotation in annotations:
        image_id = int(annotation["image_id"])
        if kind == "instances":
          categories[image_id].add(int(annotation["category_id"]))
        else:
          captions[image_id].append(str(annotation["caption"]).strip())
      if category_list and "categories" not in self.info.metadata:
        self.info.metadata["categories"] = [
          {k: c.get(k) for k in ("id", "name", "supercategory")} for c in category_list
        ]
    if not os.path.isdir(image_dir):
      raise FileNotFoundError(
        f"{image_dir}: image folder of {' and '.join(files.values())} not found"
      )
    for image_id in sorted(file_names):  # Check all before the slow decoding.
      if not os.path.isfile(os.path.join(image_dir, file_names[image_id])):
        raise FileNotFoundError(
          f"{listed_in[image_id]}: names image {file_names[image_id]}, not found in {image_dir}"
        )
    for image_id in sorted(file_names):
      key = file_names[image_id]
      image = self._load_image(os.path.join(image_dir, key), split)
      if image is not None:
        yield (
          key,
          {
            "key": key,
            "image_id": image_id,
            "image": image,
            "label": -1,
            "categories": sorted(categories.get(image_id, ())),
            "captions": captions.get(image_id, []),
          },
        )
