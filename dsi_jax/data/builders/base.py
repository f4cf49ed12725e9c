"""What every local-file builder shares: image configs, source lookup, checks, clean failure.

A `LocalBuilder` never downloads. Its source (a folder, or for some builders a file) comes from,
in this order: the constructor's `source=` argument, `DownloadConfig(manual_dir=...)`, then a
builder default (Fashion-MNIST's Debian folder). Generation checks that keys are unique and that
each split has examples, and raises one-line errors naming the offending file. If preparation
fails, every folder or file the attempt created in the data dir (the dataset folder, the config
folder, tfds' `.config/metadata.json`, an empty `downloads/extracted`) is removed again, so
neither `is_prepared()` nor a later `download_and_prepare` is fooled by a half-written dataset.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dsi_jax import errors
from dsi_jax.data.images import DEFAULT_ASPECT_RANGE, preprocess_image

logger = logging.getLogger(__name__)

ENCODINGS = ("png", "jpeg")
_JPEG_QUALITY = 95

KeyExample = tuple[str, dict[str, Any]]


@dataclasses.dataclass(eq=False)
class ImageConfig(tfds.core.BuilderConfig):
  """A builder config for image datasets.

  Attributes:
    size: Side of the square images, in pixels.
    aspect_range: Inclusive bounds on width / height; images outside are skipped (counted in
      `info.metadata["skipped_aspect"]` and logged). None keeps every image.
    encoding: How images are stored in the prepared dataset: "png" (lossless) or "jpeg"
      (quality 95, smaller).
  """

  size: int = 64
  aspect_range: tuple[float, float] | None = DEFAULT_ASPECT_RANGE
  encoding: str = "png"

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"ImageConfig {self.name}: size must be positive, got {self.size}")
    if self.encoding not in ENCODINGS:
      raise ValueError(
        f"ImageConfig {self.name}: encoding must be one of {ENCODINGS}, got {self.encoding!r}"
      )
    if self.aspect_range is not None:
      low, high = self.aspect_range
      if not 0 < low <= high:
        raise ValueError(
          f"ImageConfig {self.name}: aspect_range must satisfy 0 < low <= high, "
          f"got {self.aspect_range}"
        )
      self.aspect_range = (float(low), float(high))

  def values(self) -> tuple[int, tuple[float, float] | None, str]:
    """Returns the fields that decide the prepared data: `(size, aspect_range, encoding)`."""
    return self.size, self.aspect_range, self.encoding


def config_name(
  size: int,
  aspect_range: tuple[float, float] | None = DEFAULT_ASPECT_RANGE,
  encoding: str = "png",
) -> str:
  """Returns the canonical config name: "64px", "64px_all", "64px_aspect0.8-1.25_jpeg", ...

  "<size>px" keeps only images with aspect ratio in the recipe's [0.9, 1.1]; "_all" keeps every
  image (centre crop); "_jpeg" stores JPEG instead of PNG.
  """
  name = f"{size}px"
  if aspect_range is None:
    name += "_all"
  elif tuple(float(a) for a in aspect_range) != DEFAULT_ASPECT_RANGE:
    name += f"_aspect{aspect_range[0]:g}-{aspect_range[1]:g}"
  if encoding != "png":
    name += f"_{encoding}"
  return name


def image_config(
  size: int,
  *,
  aspect_range: tuple[float, float] | None = DEFAULT_ASPECT_RANGE,
  encoding: str = "png",
  name: str | None = None,
  description: str | None = None,
) -> ImageConfig:
  """Makes an `ImageConfig`, named canonically (see `config_name`) unless `name` is given.

  A config equal to one of a builder's predefined configs (same name and values) may be passed
  to the builder in its place.
  """
  if description is None:
    kept = "every image" if aspect_range is None else f"aspect ratio in {list(aspect_range)}"
    description = f"{size}x{size} RGB, centre-cropped, {kept}, stored as {encoding}."
  return ImageConfig(
    name=name or config_name(size, aspect_range, encoding),
    description=description,
    size=size,
    aspect_range=aspect_range,
    encoding=encoding,
  )


def standard_configs(sizes: Sequence[int], *, keep_all: bool = True) -> list[ImageConfig]:
  """Returns the configs "<size>px" (aspect-filtered) and, if `keep_all`, "<size>px_all"."""
  configs = [image_config(size) for size in sizes]
  if keep_all:
    configs += [image_config(size, aspect_range=None) for size in sizes]
  return configs


def encode_image(image: np.ndarray, encoding: str) -> bytes:
  """Encodes an RGB uint8 image `[h, w, 3]` as PNG or JPEG bytes (what tfds' Image stores)."""
  bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  if encoding == "png":
    ok, buffer = cv2.imencode(".png", bgr)
  else:
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
  if not ok:
    raise ValueError(f"could not encode an image of shape {image.shape} as {encoding}")
  return buffer.tobytes()


def read_json(path: str) -> Any:
  """Parses a JSON file; a one-line ValueError naming it if it is malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _paths_under(root: str) -> set[str]:
  """Returns every file and folder path under `root` (itself included), or {} if absent."""
  if not os.path.lexists(root):
    return set()
  found = {root}
  for dirpath, dirnames, filenames in os.walk(root):
    found.update(os.path.join(dirpath, name) for name in dirnames + filenames)
  return found


def _remove_new(before: set[str], root: str) -> None:
  """Removes every path under `root` that is not in `before`, outermost first."""
  for path in sorted(_paths_under(root) - before, key=len):
    if not os.path.lexists(path):
      continue  # Inside a folder removed already.
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)


def _remove_if_only_empty_folders(path: str) -> None:
  """Removes the folder `path` if it holds no files, only (nested) empty folders."""
  if not os.path.isdir(path):
    return
  for _, _, filenames in os.walk(path):
    if filenames:
      return
  shutil.rmtree(path, ignore_errors=True)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class of the builders that prepare a dataset from local files only.

  Subclasses implement `_source_splits(source)` (split name -> keyword arguments of
  `_generate_examples`) and `_generate_examples(**kwargs)` (yields `(key, example)` with
  `example["key"] == key`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: built from local files, no download."}
  # Subclasses that read a file rather than a folder may accept a file as their source.
  SOURCE_MAY_BE_FILE = False

  def __init__(self, *, source: str | os.PathLike | None = None, **kwargs):
    """Makes the builder.

    Args:
      source: The folder (or file, where the builder allows it) to build from. Overrides
        `DownloadConfig.manual_dir`. Not needed to load a dataset prepared already.
      **kwargs: `data_dir`, `config` (a name or a config) and `version`, as for any tfds builder.
    """
    config = kwargs.get("config")
    if isinstance(config, ImageConfig):
      predefined = type(self).builder_configs.get(config.name)
      if isinstance(predefined, ImageConfig) and predefined.values() == config.values():
        kwargs["config"] = predefined  # tfds refuses a custom config named like a predefined one.
    super().__init__(**kwargs)
    self._source = None if source is None else os.fspath(source)
    self._original_state["source"] = self._source  # Pickling rebuilds from `_original_state`.
    self._resolved_source: str | None = None
    self._seen_keys: set[str] = set()

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    """The file defining the builder (tfds looks for `checksums.tsv` etc. beside it).

    tfds 4.9.10's own version imports `importlib_resources`, which it declares as a dependency
    only for Python < 3.9, so it fails for any builder defined inside a package; this is its
    fallback, which gives the same answer outside zip apps.
    """
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  # ------------------------------------------------------------------------------------------
  # Source lookup.

  def _default_source(self) -> str | None:
    """The source used when none is given; None means one must be given."""
    return None

  def _resolve_source(self, download_config: tfds.download.DownloadConfig) -> str:
    """Returns the source path, checking that it exists."""
    if self._source is not None:
      source, how = self._source, "source="
    elif download_config.manual_dir is not None:
      source, how = os.fspath(download_config.manual_dir), "manual_dir"
    else:
      source, how = self._default_source(), "default source"
      if source is None:
        raise FileNotFoundError(
          f"{self.name}: no source given; pass source=<folder> to the builder or "
          f"download_config=tfds.download.DownloadConfig(manual_dir=<folder>)"
        )
    source = os.path.expanduser(source)
    if not os.path.exists(source):
      raise FileNotFoundError(f"{self.name}: {how} {source} does not exist")
    if not self.SOURCE_MAY_BE_FILE and not os.path.isdir(source):
      raise FileNotFoundError(f"{self.name}: {how} {source} is not a directory")
    return source

  # ------------------------------------------------------------------------------------------
  # Preparation, cleaned up on failure.

  def download_and_prepare(
    self,
    *,
    download_dir: str | os.PathLike | None = None,
    download_config: tfds.download.DownloadConfig | None = None,
    **kwargs,
  ) -> None:
    """Prepares the dataset from local files; never downloads (GCS lookup is switched off).

    Args:
      download_dir: As for tfds; nothing is downloaded, tfds only creates empty folders there
        (removed again if this call created them).
      download_config: As for tfds; `manual_dir` names the source unless the builder was given
        `source=`. `max_examples_per_split` caps each split (the result is stored under the
        same name, config and version as a full build: use another `data_dir` for it).
      **kwargs: Passed on (`file_format`, `permissions`).

    Raises:
      FileNotFoundError: If the source, or a file it names, does not exist.
      ValueError: If a file is malformed or a split is empty; nothing is left in the data dir.
    """
    download_config = dataclasses.replace(
      download_config or tfds.download.DownloadConfig(), try_download_gcs=False
    )
    overwrite = download_config.download_mode.overwrite_dataset
    if os.path.exists(self.data_path) and not overwrite:
      super().download_and_prepare(
        download_dir=download_dir, download_config=download_config, **kwargs
      )  # Reuses the prepared data (tfds logs it); needs no source.
      return
    self._resolved_source = self._resolve_source(download_config)

    root = os.fspath(self.data_dir_root)
    dataset_dir = os.path.join(root, self.name)
    downloads = os.fspath(download_dir or os.path.join(root, "downloads"))
    root_existed = os.path.exists(root)
    downloads_existed = os.path.exists(downloads)
    before = _paths_under(dataset_dir)
    try:
      super().download_and_prepare(
        download_dir=download_dir, download_config=download_config, **kwargs
      )
    except BaseException as e:
      _remove_new(before, dataset_dir)
      reason = errors.write_failure(e)
      if reason:
        raise errors.UserError(
          f"could not write the {self.name} dataset ({reason}) ({root})"
        ) from e
      raise
    finally:
      if not downloads_existed:
        _remove_if_only_empty_folders(downloads)
      if not root_existed and os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Returns one checked example generator per split found in the source."""
    del dl_manager  # Nothing to download; the source was resolved in `download_and_prepare`.
    source = self._resolved_source
    if source is None:  # Called without our `download_and_prepare` (e.g. tfds internals).
      source = self._resolve_source(tfds.download.DownloadConfig())
    splits = self._source_splits(source)
    if not splits:
      raise ValueError(f"{source}: no data found for {self.name} (see its docstring)")
    self.info.metadata["source"] = source
    self._seen_keys = set()  # Keys are unique across all splits.
    if isinstance(self.builder_config, ImageConfig):
      self.info.metadata["skipped_aspect"] = {split: 0 for split in splits}
    return {
      split: self._checked(
        split,
        kwargs.get("annotation_file", source),
        self._generate_examples(**kwargs),
      )
      for split, kwargs in splits.items()
    }

  def _source_splits(self, source: str) -> dict[str, dict[str, Any]]:
    """Returns, per split found in `source`, the keyword arguments of `_generate_examples`.

    An `annotation_file` argument, if there is one, is the file that errors (duplicate keys,
    no examples) name; otherwise they name `source`.
    """
    raise NotImplementedError

  def _checked(self, split: str, where: str, examples: Iterable[KeyExample]) -> Iterator:
    """Yields `examples`, raising (naming `where`) if a key repeats or the split is empty."""
    seen = self._seen_keys
    count = 0
    for key, example in examples:
      if key in seen:
        raise ValueError(f"{where}: duplicate key {key!r} (split {split}) in {self.name}")
      seen.add(key)
      count += 1
      yield key, example
    skipped = self.info.metadata.get("skipped_aspect", {}).get(split, 0)
    logger.info(
      "%s split %s: %d examples, %d images skipped by the aspect filter",
      self.info.full_name,
      split,
      count,
      skipped,
    )
    if not count:
      why = f" ({skipped} images skipped by the aspect filter)" if skipped else ""
      raise ValueError(f"{where}: no examples for split {split} of {self.name}{why}")

  # ------------------------------------------------------------------------------------------
  # Helpers for image builders.

  def _image_feature(self) -> tfds.features.Image:
    """The `image` feature: RGB uint8 `[size, size, 3]`."""
    config = self.builder_config
    return tfds.features.Image(
      shape=(config.size, config.size, 3), encoding_format=config.encoding, doc="RGB image"
    )

  def _count_skipped(self, split: str, name: str) -> None:
    """Counts one image of `split` dropped by the aspect filter (kept in the metadata)."""
    logger.debug("%s: skipped %s (aspect ratio outside the filter)", self.name, name)
    skipped = self.info.metadata["skipped_aspect"]
    skipped[split] = skipped.get(split, 0) + 1

  def _load_image(self, path: str, split: str) -> bytes | None:
    """Reads, preprocesses and encodes an image file; None if the aspect filter drops it.

    Raises:
      FileNotFoundError: If `path` does not exist.
      ValueError: If it cannot be decoded ("<path>: not a decodable image").
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: image file not found")
    with open(path, "rb") as f:
      data = f.read()
    return self._prepare_image(data, split, path)

  def _prepare_image(
    self, image_or_bytes: np.ndarray | bytes, split: str, name: str
  ) -> bytes | None:
    """Preprocesses (see `preprocess_image`) and encodes one image; None if filtered out."""
    config = self.builder_config
    image = preprocess_image(
      image_or_bytes, size=config.size, aspect_range=config.aspect_range, source=name
    )
    if image is None:
      self._count_skipped(split, name)
      return None
    return self._encode(image)

  def _encode(self, image: np.ndarray) -> bytes:
    """Encodes a preprocessed image in the config's format."""
    return encode_image(image, self.builder_config.encoding)
