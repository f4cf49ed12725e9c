"""Tests for the local-file tfds builders (`dsi_jax.data.builders`) and `preprocess_image`.

Real data (Flickr8k-1k, SQuAD dev) is read from `<repo>/../shared/data` or `$DSI_JAX_SHARED_DATA`,
Fashion-MNIST from its Debian folder; tests needing a missing set skip. COCO, Flickr30k-Karpathy
and image-folder sources are tiny fixtures written here in the official layouts.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dsi_jax.data import builders, fashion_mnist
from dsi_jax.data.builders import DsiCoco2017, DsiFlickr, DsiImageFolder, DsiSquad, image_config
from dsi_jax.data.images import preprocess_image

tfds.disable_progress_bar()

SHARED_DATA = os.environ.get("DSI_JAX_SHARED_DATA") or os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data"
)
FLICKR8K_DIR = os.path.join(SHARED_DATA, "flickr8k_1k")
SQUAD_DEV = os.path.join(SHARED_DATA, "squad_v1.1_dev.json")
FASHION_DIR = os.environ.get(fashion_mnist.ENV_VAR) or fashion_mnist.DEFAULT_DIR

SMALL = image_config(32)  # Recipe aspect filter [0.9, 1.1].
SMALL_ALL = image_config(32, aspect_range=None)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _require(path: str) -> None:
  if not os.path.exists(path):
    pytest.skip(f"{path} not found (set DSI_JAX_SHARED_DATA to the shared data folder)")


def _write_image(path, rgb: np.ndarray) -> None:
  """Writes an RGB(A) or gray uint8 array with OpenCV (which expects BGR(A) order)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if rgb.ndim == 3 and rgb.shape[-1] == 3:
    rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
  elif rgb.ndim == 3 and rgb.shape[-1] == 4:
    rgb = cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA)
  assert cv2.imwrite(os.fspath(path), rgb)


def _solid(height: int, width: int, color) -> np.ndarray:
  return np.broadcast_to(np.array(color, np.uint8), (height, width, len(color))).copy()


def _write_json(path, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def _contents(data_dir) -> list[str]:
  """Every path under `data_dir`, relative to it."""
  found = []
  for dirpath, dirnames, filenames in os.walk(data_dir):
    for name in dirnames + filenames:
      found.append(os.path.relpath(os.path.join(dirpath, name), data_dir))
  return sorted(found)


def _examples(builder, split: str) -> list[dict]:
  return list(builder.as_dataset(split=split).as_numpy_iterator())


def _build(cls, source, data_dir, config=None, **download_config):
  kwargs = {} if config is None else {"config": config}
  builder = cls(data_dir=os.fspath(data_dir), source=source, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**download_config))
  return builder


# --------------------------------------------------------------------------------------------
# preprocess_image.


def test_preprocess_gray_and_channel_order():
  gray = np.arange(40 * 40, dtype=np.uint8).reshape(40, 40)
  out = preprocess_image(gray, size=32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
  _, png = cv2.imencode(".png", cv2.cvtColor(_solid(20, 20, RED), cv2.COLOR_RGB2BGR))
  out = preprocess_image(png.tobytes(), size=8)
  assert out.shape == (8, 8, 3) and tuple(out[4, 4]) == RED  # OpenCV's BGR turned into RGB.
  _, gray_jpeg = cv2.imencode(".jpg", np.full((20, 20), 128, np.uint8))
  out = preprocess_image(gray_jpeg.tobytes(), size=64)  # Enlarged (cubic).
  assert out.shape == (64, 64, 3) and np.all(np.abs(out.astype(int) - 128) <= 2)


def test_preprocess_alpha_composited_on_white():
  rgba = np.zeros((10, 10, 4), np.uint8)
  rgba[..., 0] = 255  # Red ...
  rgba[:5, :, 3] = 255  # ... opaque in the top half, transparent below.
  out = preprocess_image(rgba, size=10)
  assert tuple(out[0, 0]) == RED and tuple(out[9, 9]) == (255, 255, 255)
  _, png = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
  assert np.array_equal(preprocess_image(png.tobytes(), size=10), out)
  half = rgba.copy()
  half[..., 3] = 128
  assert tuple(preprocess_image(half, size=10)[0, 0]) == (255, 127, 127)


def test_preprocess_aspect_filter_and_centre_crop():
  wide = np.concatenate([_solid(20, 10, RED), _solid(20, 20, GREEN), _solid(20, 10, BLUE)], 1)
  assert preprocess_image(wide, size=8) is None  # 2:1 is outside [0.9, 1.1].
  assert preprocess_image(wide, size=8, aspect_range=(0.5, 2.0)) is not None
  out = preprocess_image(wide, size=8, aspect_range=None)
  assert out.shape == (8, 8, 3) and np.all(out == np.array(GREEN, np.uint8))  # Centre square.
  assert preprocess_image(_solid(100, 110, RED), size=8) is not None  # 1.1 is inside.


def test_preprocess_corrupt_bytes_raise_one_line():
  _, jpeg = cv2.imencode(".jpg", _solid(30, 30, RED))
  for data in (jpeg.tobytes()[:200], b"not an image", b""):
    with pytest.raises(ValueError, match=r"^photos/x\.jpg: not a decodable image$"):
      preprocess_image(data, size=8, source="photos/x.jpg")


# --------------------------------------------------------------------------------------------
# Builders on real data.


def test_registration_and_names():
  for name, cls in builders.BUILDERS.items():
    assert tfds.builder_cls(name) is cls
  assert tfds.builder_cls("fashion_mnist").__module__.startswith("tensorflow_datasets.")
  assert set(DsiFlickr.builder_configs) >= {"64px", "64px_all", "160px", "256px_all"}
  assert builders.config_name(64, (0.8, 1.25), "jpeg") == "64px_aspect0.8-1.25_jpeg"


def test_fashion_mnist_from_debian_files(tmp_path):
  if not os.path.isfile(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")):
    pytest.skip(f"Fashion-MNIST not installed in {FASHION_DIR}")
  builder = tfds.builder("dsi_fashion_mnist", data_dir=os.fspath(tmp_path))  # 28px default.
  builder.download_and_prepare()  # Source: $DSI_JAX_FASHION_MNIST_DIR or the Debian folder.
  assert builder.info.splits["train"].num_examples == 60000
  assert builder.info.splits["test"].num_examples == 10000
  assert builder.info.metadata["class_names"] == list(fashion_mnist.CLASS_NAMES)
  images, labels = fashion_mnist.load_fashion_mnist("test", FASHION_DIR)
  examples = _examples(builder, "test")
  assert [e["key"].decode() for e in examples[:2]] == ["test-00000", "test-00001"]
  assert np.array_equal([e["label"] for e in examples], labels)  # idx order is kept.
  for i in (0, 1234, 9999):
    assert examples[i]["image"].shape == (28, 28, 3)
    assert np.array_equal(examples[i]["image"], np.repeat(images[i][..., None], 3, -1))


def test_fashion_mnist_custom_config_and_present_splits_only(tmp_path):
  source = tmp_path / "idx"
  source.mkdir()
  header = lambda magic, dims: b"".join(d.to_bytes(4, "big") for d in [magic, *dims])  # noqa: E731
  pixels = np.zeros((2, 28, 28), np.uint8)
  pixels[1] = 255
  with gzip.open(source / "t10k-images-idx3-ubyte.gz", "wb") as f:
    f.write(header(2051, [2, 28, 28]) + pixels.tobytes())
  with gzip.open(source / "t10k-labels-idx1-ubyte.gz", "wb") as f:
    f.write(header(2049, [2]) + bytes([7, 3]))
  builder = _build(builders.DsiFashionMnist, source, tmp_path / "data", image_config(64))
  assert builder.builder_config is builders.DsiFashionMnist.builder_configs["64px"]
  assert list(builder.info.splits) == ["test"]  # No train files: no train split.
  examples = _examples(builder, "test")
  assert [int(e["label"]) for e in examples] == [7, 3]
  assert examples[1]["image"].shape == (64, 64, 3) and examples[1]["image"].min() == 255
  custom = _build(builders.DsiFashionMnist, source, tmp_path / "data", SMALL_ALL)
  assert custom.builder_config.name == "32px_all"
  assert _examples(custom, "test")[0]["image"].shape == (32, 32, 3)


def test_flickr8k_shared_via_tfds_load_and_manual_dir(tmp_path):
  _require(FLICKR8K_DIR)
  data_dir = os.fspath(tmp_path / "data")
  ds, info = tfds.load(
    "dsi_flickr/64px_all",
    split="train",
    data_dir=data_dir,
    with_info=True,
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(manual_dir=FLICKR8K_DIR)
    },
  )
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == 1000 == info.splits["train"].num_examples
  assert all(len(e["captions"]) == 5 for e in examples)
  keys = [e["key"].decode() for e in examples]
  assert sorted(keys) == sorted(os.listdir(os.path.join(FLICKR8K_DIR, "images")))
  first = examples[0]
  assert first["image"].shape == (64, 64, 3) and first["image"].dtype == np.uint8
  assert first["label"] == -1 and first["captions"][0].decode().startswith("A ")
  assert info.metadata["layout"] == "flickr8k_captions"
  assert sorted(_contents(data_dir))[0] == "dsi_flickr"  # No stray downloads/ folder.
  # The recipe's aspect filter keeps only near-square photos, and counts the others.
  square = builders.build(
    "dsi_flickr", source=FLICKR8K_DIR, data_dir=data_dir, config=image_config(32)
  )
  kept = square.info.splits["train"].num_examples
  assert 0 < kept < 1000 and kept + square.info.metadata["skipped_aspect"]["train"] == 1000


def test_squad_dev_shared(tmp_path):
  _require(SQUAD_DEV)
  ds = builders.build_and_load(
    "dsi_squad", source=SQUAD_DEV, data_dir=tmp_path / "data", split="validation"
  )
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == 2067
  ids = [q for e in examples for q in e["questions"]["id"]]
  assert len(ids) == 10570 == len(set(ids))
  assert sum(len(e["questions"]["question"]) for e in examples) == 10570
  keys = [e["key"].decode() for e in examples]
  assert len(set(keys)) == 2067 and keys[0] == examples[0]["title"].decode() + "/0"
  assert len(examples[0]["text"]) > 100
  # A folder with the official file name works as the manual dir too.
  folder = tmp_path / "squad"
  folder.mkdir()
  os.symlink(os.path.abspath(SQUAD_DEV), folder / "dev-v1.1.json")
  builder = tfds.builder("dsi_squad", data_dir=os.fspath(tmp_path / "data2"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
  assert builder.info.splits["validation"].num_examples == 2067


# --------------------------------------------------------------------------------------------
# Builders on small fixtures in the official layouts.


def _write_coco(root, *, instances=True, captions=True) -> None:
  """val2017: 3 square images (one gray) and one 2:1; train2017: one image, captions only."""
  images = [
    {"id": 5, "file_name": "000000000005.jpg"},
    {"id": 2, "file_name": "000000000002.jpg"},
    {"id": 9, "file_name": "000000000009.jpg"},
    {"id": 7, "file_name": "000000000007.jpg"},
  ]
  _write_image(root / "val2017/000000000005.jpg", _solid(40, 40, RED))
  _write_image(root / "val2017/000000000002.jpg", np.full((36, 38), 90, np.uint8))  # Gray.
  _write_image(root / "val2017/000000000009.jpg", _solid(40, 40, BLUE))
  _write_image(root / "val2017/000000000007.jpg", _solid(20, 40, GREEN))  # 2:1.
  categories = [{"id": 1, "name": "person", "supercategory": "person"}]
  categories += [{"id": 3, "name": "car", "supercategory": "vehicle"}]
  if instances:
    annotations = [
      {"id": 100, "image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 1]},
      {"id": 101, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]},
      {"id": 102, "image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 1]},
      {"id": 103, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]},
      {"id": 104, "image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]},
    ]  # Image 9 has no instances.
    _write_json(
      root / "annotations/instances_val2017.json",
      {"images": images, "annotations": annotations, "categories": categories},
    )
  if captions:
    annotations = [{"id": i, "image_id": 5, "caption": f"A red square {i}."} for i in range(3)]
    annotations += [{"id": 10, "image_id": 9, "caption": "Blue."}]
    _write_json(
      root / "annotations/captions_val2017.json", {"images": images, "annotations": annotations}
    )
    _write_image(root / "train2017/000000000011.jpg", _solid(30, 30, GREEN))
    _write_json(
      root / "annotations/captions_train2017.json",
      {
        "images": [{"id": 11, "file_name": "000000000011.jpg"}],
        "annotations": [{"id": 1, "image_id": 11, "caption": " Green. "}],
      },
    )


def test_coco_instances_and_captions(tmp_path):
  _write_coco(tmp_path / "coco")
  builder = _build(DsiCoco2017, tmp_path / "coco", tmp_path / "data", SMALL)
  assert set(builder.info.splits) == {"train", "validation"}
  val = _examples(builder, "validation")
  assert [e["key"].decode() for e in val] == [
    "000000000002.jpg",
    "000000000005.jpg",
    "000000000009.jpg",
  ]  # Increasing image id; the 2:1 image 7 is dropped by the aspect filter.
  assert builder.info.metadata["skipped_aspect"] == {"train": 0, "validation": 1}
  gray, red, blue = val
  assert [list(e["categories"]) for e in val] == [[1], [1, 3], []]
  assert [len(e["captions"]) for e in val] == [0, 3, 1]
  assert red["captions"][0] == b"A red square 0." and red["image_id"] == 5 and red["label"] == -1
  assert red["image"].shape == (32, 32, 3) and np.all(np.abs(red["image"] - [255, 0, 0]) < 8)
  assert np.all(gray["image"] == gray["image"][..., :1])  # Gray replicated to RGB.
  assert np.all(np.abs(blue["image"].astype(int) - [0, 0, 255]) < 8)
  (train,) = _examples(builder, "train")
  assert train["captions"].tolist() == [b"Green."] and len(train["categories"]) == 0
  assert builder.info.metadata["categories"][1] == {
    "id": 3,
    "name": "car",
    "supercategory": "vehicle",
  }
  kept_all = _build(DsiCoco2017, tmp_path / "coco", tmp_path / "data", SMALL_ALL)
  assert kept_all.info.splits["validation"].num_examples == 4


def test_coco_instances_only(tmp_path):
  _write_coco(tmp_path / "coco", captions=False)
  builder = _build(DsiCoco2017, tmp_path / "coco", tmp_path / "data", SMALL_ALL)
  assert list(builder.info.splits) == ["validation"]
  assert all(len(e["captions"]) == 0 for e in _examples(builder, "validation"))


def _write_karpathy(root, image_dir="flickr30k-images", entries=None) -> None:
  if entries is None:
    entries = [("1.jpg", "train"), ("2.jpg", "restval"), ("3.jpg", "val"), ("4.jpg", "test")]
  for filename, _ in entries:
    _write_image(root / image_dir / filename, _solid(24, 24, BLUE))
  images = [
    {
      "filename": filename,
      "split": split,
      "imgid": i,
      "sentences": [{"raw": f"Photo {filename} caption {j}.", "tokens": []} for j in range(5)],
    }
    for i, (filename, split) in enumerate(entries)
  ]
  _write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


def test_flickr30k_karpathy_splits(tmp_path):
  _write_karpathy(tmp_path / "f30k")
  builder = _build(DsiFlickr, tmp_path / "f30k", tmp_path / "data", SMALL)
  counts = {name: split.num_examples for name, split in builder.info.splits.items()}
  assert counts == {"train": 2, "validation": 1, "test": 1}  # restval goes to train.
  assert [e["key"] for e in _examples(builder, "train")] == [b"1.jpg", b"2.jpg"]
  (test,) = _examples(builder, "test")
  assert test["captions"].tolist() == [f"Photo 4.jpg caption {j}.".encode() for j in range(5)]
  assert test["image"].shape == (32, 32, 3) and builder.info.metadata["layout"] == "karpathy"
  jpeg = _build(DsiFlickr, tmp_path / "f30k", tmp_path / "data", image_config(16, encoding="jpeg"))
  assert jpeg.builder_config.name == "16px_jpeg"
  assert jpeg.info.features["image"].encoding_format == "jpeg"
  (test,) = _examples(jpeg, "test")
  assert test["image"].shape == (16, 16, 3) and np.all(np.abs(test["image"] - [0, 0, 255]) < 8)


def test_image_folder_single_split(tmp_path):
  root = tmp_path / "classes"
  _write_image(root / "dog/b.jpg", _solid(30, 30, GREEN))
  _write_image(root / "dog/a.png", np.dstack([_solid(30, 30, RED), np.zeros((30, 30), np.uint8)]))
  _write_image(root / "cat/gray.jpg", np.full((33, 31), 200, np.uint8))
  _write_image(root / "cat/wide.jpg", _solid(20, 40, RED))  # Dropped: 2:1.
  (root / "cat/notes.txt").write_text("not an image")
  (root / "bird").mkdir()  # A class with no image: a label nobody has.
  builder = _build(DsiImageFolder, root, tmp_path / "data", SMALL)
  assert builder.info.metadata["class_names"] == ["bird", "cat", "dog"]
  examples = _examples(builder, "train")
  assert [(e["key"].decode(), int(e["label"])) for e in examples] == [
    ("cat/gray.jpg", 1),
    ("dog/a.png", 2),
    ("dog/b.jpg", 2),
  ]
  assert np.all(examples[1]["image"] == 255)  # Fully transparent: white.
  assert np.all(np.abs(examples[0]["image"].astype(int) - 200) <= 2)
  assert builder.info.metadata["skipped_aspect"] == {"train": 1}
  restored = tfds.builder("dsi_image_folder/32px", data_dir=os.fspath(tmp_path / "data"))
  assert restored.is_prepared() and restored.info.metadata["class_names"][2] == "dog"
  assert pickle.loads(pickle.dumps(builder))._source == os.fspath(root)


def test_image_folder_train_val_layout(tmp_path):
  root = tmp_path / "imagenet"
  for split, names in (("train", ("n01", "n02")), ("val", ("n02",))):
    for name in names:
      _write_image(root / split / name / f"{split}_{name}.JPEG", _solid(20, 20, RED))
  builder = _build(DsiImageFolder, root, tmp_path / "data", SMALL)
  assert builder.info.splits["train"].num_examples == 2
  (val,) = _examples(builder, "validation")
  assert val["key"] == b"val/n02/val_n02.JPEG" and val["label"] == 1


# --------------------------------------------------------------------------------------------
# Bad inputs: one-line errors naming the file, and nothing left in the data dir.


def _write_flickr8k(root, sizes=((30, 30), (30, 30)), header="image,caption") -> list[str]:
  names = [f"{i}.jpg" for i in range(len(sizes))]
  lines = [header] + [f"{name},A photo, number {name} ." for name in names for _ in range(2)]
  os.makedirs(root / "images", exist_ok=True)
  (root / "captions.txt").write_text("\n".join(lines) + "\n")
  for name, (height, width) in zip(names, sizes):
    _write_image(root / "images" / name, _solid(height, width, RED))
  return names


def _corrupt_jpeg(root):
  _write_flickr8k(root)
  data = (root / "images/1.jpg").read_bytes()
  (root / "images/1.jpg").write_bytes(data[: len(data) // 2])
  return DsiFlickr, ValueError, str(root / "images/1.jpg"), "not a decodable image"


def _missing_image(root):
  _write_flickr8k(root)
  os.remove(root / "images/1.jpg")
  return DsiFlickr, FileNotFoundError, str(root / "captions.txt"), "1.jpg"


def _bad_header(root):
  _write_flickr8k(root, header="filename|caption")
  return DsiFlickr, ValueError, str(root / "captions.txt"), "header"


def _all_filtered(root):
  _write_flickr8k(root, sizes=((20, 40), (40, 20)))
  return DsiFlickr, ValueError, str(root / "captions.txt"), "no examples"


def _karpathy_duplicate(root):
  _write_karpathy(root, entries=[("1.jpg", "train"), ("1.jpg", "train")])
  return DsiFlickr, ValueError, str(root / "dataset_flickr30k.json"), "duplicate key '1.jpg'"


def _karpathy_bad_entry(root):
  _write_karpathy(root)
  _write_json(root / "dataset_flickr30k.json", {"images": [{"file": "1.jpg"}]})
  return DsiFlickr, ValueError, str(root / "dataset_flickr30k.json"), "images[0]"


def _coco_without_images(root):
  _write_coco(root)
  _write_json(root / "annotations/instances_val2017.json", {"annotations": [], "info": {}})
  return DsiCoco2017, ValueError, str(root / "annotations/instances_val2017.json"), "images"


def _coco_missing_image(root):
  _write_coco(root)
  os.remove(root / "val2017/000000000009.jpg")
  return DsiCoco2017, FileNotFoundError, "instances_val2017.json", "000000000009.jpg"


def _coco_not_json(root):
  _write_coco(root)
  (root / "annotations/captions_train2017.json").write_text("{'images': ")
  return DsiCoco2017, ValueError, str(root / "annotations/captions_train2017.json"), "JSON"


def _squad_without_data(root):
  _write_json(root / "dev-v1.1.json", {"version": "1.1", "articles": []})
  return DsiSquad, ValueError, str(root / "dev-v1.1.json"), "'data'"


def _squad_empty(root):
  _write_json(root / "dev-v1.1.json", {"version": "1.1", "data": []})
  return DsiSquad, ValueError, str(root / "dev-v1.1.json"), "no examples"


def _empty_image_folder(root):
  (root / "cat").mkdir()
  (root / "dog").mkdir()
  (root / "dog/readme.txt").write_text("no images here")
  return DsiImageFolder, ValueError, str(root), "no examples"


def _missing_source(root):
  os.rmdir(root)
  return DsiFlickr, FileNotFoundError, str(root), "does not exist"


@pytest.mark.parametrize(
  "make",
  [
    _corrupt_jpeg,
    _missing_image,
    _bad_header,
    _all_filtered,
    _karpathy_duplicate,
    _karpathy_bad_entry,
    _coco_without_images,
    _coco_missing_image,
    _coco_not_json,
    _squad_without_data,
    _squad_empty,
    _empty_image_folder,
    _missing_source,
  ],
  ids=lambda make: make.__name__.strip("_"),
)
@pytest.mark.parametrize("via", ["source", "manual_dir"])
def test_bad_input_fails_cleanly(tmp_path, make, via):
  root = tmp_path / "source"
  root.mkdir()
  cls, error, names, says = make(root)
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  config = {} if cls is DsiSquad else {"config": SMALL}
  source, download_config = (root, {}) if via == "source" else (None, {"manual_dir": root})
  builder = cls(data_dir=os.fspath(data_dir), source=source, **config)
  with pytest.raises(error) as raised:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**download_config))
  message = str(raised.value)
  assert "\n" not in message and names in message and says in message, message
  assert _contents(data_dir) == []  # No dataset, config, .config or incomplete folder.
  assert not builder.is_prepared()
  assert not cls(data_dir=os.fspath(data_dir), **config).is_prepared()


def test_no_source_given(tmp_path):
  builder = DsiFlickr(data_dir=os.fspath(tmp_path), config=SMALL)
  with pytest.raises(FileNotFoundError, match="dsi_flickr: no source given"):
    builder.download_and_prepare()
  assert _contents(tmp_path) == []


def test_failure_keeps_other_configs_and_retry_succeeds(tmp_path):
  root = tmp_path / "flickr"
  _write_flickr8k(root, sizes=((30, 30), (20, 40)))
  data_dir = tmp_path / "data"
  _build(DsiFlickr, root, data_dir, SMALL_ALL)
  before = _contents(data_dir)
  assert "dsi_flickr/.config/metadata.json" in before
  good = (root / "images/0.jpg").read_bytes()
  (root / "images/0.jpg").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="0.jpg: not a decodable image"):
    _build(DsiFlickr, root, data_dir, SMALL)
  assert _contents(data_dir) == before  # The 32px_all build is untouched.
  assert len(_examples(DsiFlickr(data_dir=os.fspath(data_dir), config=SMALL_ALL), "train")) == 2
  (root / "images/0.jpg").write_bytes(good)
  builder = _build(DsiFlickr, root, data_dir, SMALL)  # Not fooled by the failed attempt.
  assert [e["key"] for e in _examples(builder, "train")] == [b"0.jpg"]
