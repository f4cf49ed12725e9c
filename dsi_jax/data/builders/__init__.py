"""tfds builders that prepare datasets from local files, never downloading.

Importing this package registers the builders with tfds under collision-free names:
`dsi_fashion_mnist`, `dsi_image_folder`, `dsi_coco2017`, `dsi_flickr` and `dsi_squad` (tfds'
own `fashion_mnist`, `coco`, ... would download). Each module's docstring gives the source
layout it reads and its features. Image builders have configs named after the image side:
"64px" keeps only images whose aspect ratio is in [0.9, 1.1] (the ViT-DSI recipe), "64px_all"
keeps every image (centre crop); sizes 64, 160 and 256 (Fashion-MNIST: 28, 32, 64, 160, 256);
`image_config(...)` makes others.

Example:
  ```
  import tensorflow_datasets as tfds
  from dsi_jax.data import builders  # Registers the builders.

  ds = tfds.load(
    "dsi_flickr/64px_all", split="train", data_dir=data_dir,
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(manual_dir=flickr_dir)},
  )
  # Or: builders.build_and_load("dsi_flickr", source=flickr_dir, data_dir=data_dir,
  #                             split="train", config="64px_all")
  ```
"""

from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from dsi_jax.data.builders.base import ImageConfig, LocalBuilder, config_name, image_config
from dsi_jax.data.builders.coco import DsiCoco2017
from dsi_jax.data.builders.fashion_mnist import DsiFashionMnist
from dsi_jax.data.builders.flickr import DsiFlickr
from dsi_jax.data.builders.image_folder import DsiImageFolder
from dsi_jax.data.builders.squad import DsiSquad

BUILDERS: dict[str, type[LocalBuilder]] = {
  cls.name: cls for cls in (DsiFashionMnist, DsiImageFolder, DsiCoco2017, DsiFlickr, DsiSquad)
}

__all__ = [
  "BUILDERS",
  "DsiCoco2017",
  "DsiFashionMnist",
  "DsiFlickr",
  "DsiImageFolder",
  "DsiSquad",
  "ImageConfig",
  "LocalBuilder",
  "build",
  "build_and_load",
  "config_name",
  "image_config",
]


def build(
  name_or_cls: str | type[LocalBuilder],
  *,
  source: str | os.PathLike | None,
  data_dir: str | os.PathLike,
  config: str | ImageConfig | None = None,
  max_examples_per_split: int | None = None,
) -> LocalBuilder:
  """Prepares a dataset from local files (if not prepared in `data_dir` already).

  Args:
    name_or_cls: A builder class, or its registered name ("dsi_flickr", "dsi_flickr/64px").
    source: The folder (SQuAD: or file) to build from; None for the builder's default
      (Fashion-MNIST's Debian folder).
    data_dir: Where tfds keeps prepared datasets.
    config: A config name ("64px_all") or `ImageConfig`; None for the default config.
    max_examples_per_split: Cap on each split (for quick trials; stored like a full build).

  Returns:
    The prepared builder (`.as_dataset(split=...)`, `.info`).
  """
  kwargs = {} if config is None else {"config": config}
  data_dir = os.fspath(data_dir)
  if isinstance(name_or_cls, str):
    builder = tfds.builder(name_or_cls, data_dir=data_dir, source=source, **kwargs)
  else:
    builder = name_or_cls(data_dir=data_dir, source=source, **kwargs)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(max_examples_per_split=max_examples_per_split)
  )
  return builder


def build_and_load(
  name_or_cls: str | type[LocalBuilder],
  *,
  source: str | os.PathLike | None,
  data_dir: str | os.PathLike,
  split: str,
  config: str | ImageConfig | None = None,
) -> tf.data.Dataset:
  """Prepares a dataset (see `build`) and returns one split, examples as feature dicts."""
  builder = build(name_or_cls, source=source, data_dir=data_dir, config=config)
  return builder.as_dataset(split=split)
