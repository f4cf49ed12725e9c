"""`dsi_image_folder`: class-labelled images in the ImageNet folder layout.

Two layouts of the source folder:
- `<root>/<class>/<image>`: one split, `train`.
- `<root>/<split>/<class>/<image>` where `<split>` is `train` (required), `val` or
  `validation` (both become the split `validation`) and `test`: chosen when `<root>/train/`
  exists; the root may then hold no other folders.

Classes are the sorted folder names of the (train) split: label `i` is the `i`-th name, stored
in `info.metadata["class_names"]`; another split may not name a class that train lacks. Images
are the files under a class folder (searched recursively, sorted) whose extension is one of
`IMAGE_EXTENSIONS`; other and hidden files are ignored. Keys are paths relative to the root
(`n01440764/img1.JPEG`, or `train/n01440764/img1.JPEG`).

Features: `key` (string), `image` (RGB uint8 `[size, size, 3]`), `label` (int64 class index).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsi_jax.data.builders import base

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def _subfolders(path: str) -> list[str]:
  """Sorted names of the non-hidden folders in `path`."""
  return sorted(
    name
    for name in os.listdir(path)
    if not name.startswith(".") and os.path.isdir(os.path.join(path, name))
  )


def _image_files(folder: str) -> list[str]:
  """Sorted paths of the (non-hidden) image files under `folder`, recursively."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
    found.extend(
      os.path.join(dirpath, name)
      for name in filenames
      if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
    )
  return sorted(found)


class DsiImageFolder(base.LocalBuilder):
  """Images sorted into one folder per class (ImageNet layout), as square RGB."""

  name = "dsi_image_folder"
  BUILDER_CONFIGS = base.standard_configs((64, 160, 256))
  DEFAULT_BUILDER_CONFIG_NAME = "64px"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point `source=` / `manual_dir` at a folder holding one subfolder of images per class, or
  `train/` (and optionally `val/`, `test/`) subfolders holding one subfolder per class.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Class-labelled images from a local folder tree (ImageNet layout).",
      features=tfds.features.FeaturesDict(
        {
          "key": tfds.features.Tensor(shape=(), dtype=tf.string, doc="path relative to root"),
          "image": self._image_feature(),
          "label": tfds.features.Scalar(dtype=np.int64, doc="index into class_names"),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _source_splits(self, source: str) -> dict[str, dict[str, Any]]:
    folders = _subfolders(source)
    if "train" in folders:
      others = [name for name in folders if name not in _SPLIT_FOLDERS]
      if others:
        raise ValueError(
          f"{source}: holds train/ so its folders must be splits {sorted(_SPLIT_FOLDERS)}, "
          f"found {others}"
        )
      split_dirs = {_SPLIT_FOLDERS[name]: name for name in folders}
      if len(split_dirs) < len(folders):
        raise ValueError(f"{source}: has both val/ and validation/; keep one")
      class_names = _subfolders(os.path.join(source, "train"))
    else:
      split_dirs = {"train": ""}
      class_names = folders
    if not class_names:
      raise ValueError(f"{os.path.join(source, split_dirs['train'])}: no class folders")
    for folder in split_dirs.values():
      unknown = sorted(set(_subfolders(os.path.join(source, folder))) - set(class_names))
      if unknown:
        raise ValueError(
          f"{os.path.join(source, folder)}: class folders {unknown} are not in train/"
        )
    self.info.metadata["class_names"] = class_names
    return {
      split: {"root": source, "folder": folder, "split": split, "class_names": class_names}
      for split, folder in split_dirs.items()
    }

  def _generate_examples(self, root: str, folder: str, split: str, class_names: list[str]):
    for label, class_name in enumerate(class_names):
      class_dir = os.path.join(root, folder, class_name)
      if not os.path.isdir(class_dir):
        continue  # A class missing from a validation or test split.
      for path in _image_files(class_dir):
        image = self._load_image(path, split)
        if image is not None:
          key = os.path.relpath(path, root).replace(os.sep, "/")
          yield key, {"key": key, "image": image, "label": label}
