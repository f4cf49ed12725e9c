"""`dsi_fashion_mnist`: Fashion-MNIST from its gzip idx files (the Debian package's layout).

Source: the folder holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`; by default the
`DSI_JAX_FASHION_MNIST_DIR` environment variable, else `/usr/share/datasets/fashion-mnist`.
Splits `train` (60,000) and `test` (10,000), each built if its images file is present. Examples
keep the order of the idx files: example `i` of a split has key `<split>-<i:05d>`.

Features: `key` (string), `image` (RGB uint8 `[size, size, 3]`, the grayscale replicated),
`label` (int64 class 0..9; names in `info.metadata["class_names"]`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsi_jax.data import fashion_mnist
from dsi_jax.data.builders import base

_SPLIT_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}


class DsiFashionMnist(base.LocalBuilder):
  """Fashion-MNIST, class-labelled 28x28 grayscale images, as RGB at the config's size."""

  name = "dsi_fashion_mnist"
  BUILDER_CONFIGS = base.standard_configs((28, 32, 64, 160, 256), keep_all=False)
  DEFAULT_BUILDER_CONFIG_NAME = "28px"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Install the Debian package `dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist)
  or point `source=` / `manual_dir` at a folder holding the four `*-idx?-ubyte.gz` files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Fashion-MNIST (Zalando), 10 clothing classes, from local idx files.",
      features=tfds.features.FeaturesDict(
        {
          "key": tfds.features.Tensor(shape=(), dtype=tf.string, doc="<split>-<index:05d>"),
          "image": self._image_feature(),
          "label": tfds.features.Scalar(dtype=np.int64, doc="class index 0..9"),
        }
      ),
      metadata=tfds.core.MetadataDict(class_names=list(fashion_mnist.CLASS_NAMES)),
      disable_shuffling=True,
      homepage="https://github.com/zalandoresearch/fashion-mnist",
      license="MIT",
    )

  def _default_source(self) -> str:
    return os.environ.get(fashion_mnist.ENV_VAR) or fashion_mnist.DEFAULT_DIR

  def _source_splits(self, source: str) -> dict[str, dict[str, Any]]:
    return {
      split: {"split": split, "data_dir": source}
      for split, filename in _SPLIT_FILES.items()
      if os.path.isfile(os.path.join(source, filename))
    }

  def _generate_examples(self, split: str, data_dir: str):
    images, labels = fashion_mnist.load_fashion_mnist(split, data_dir)
    for i, (image, label) in enumerate(zip(images, labels)):
      key = f"{split}-{i:05d}"
      encoded = self._prepare_image(image, split, key)
      if encoded is not None:  # Always, for square images.
        yield key, {"key": key, "image": encoded, "label": int(label)}
