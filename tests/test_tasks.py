"""SeqIO tasks: registration at import, the public helper, the feature converter, real corpora."""

import os
import subprocess
import sys
import textwrap
import zlib

import gin
import numpy as np
import pytest
import seqio

from dsi_jax import tasks
from dsi_jax.data import corpus as corpus_lib
from dsi_jax.data import fashion_mnist
from dsi_jax.tasks import datasets as task_datasets

HAS_FMNIST = os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR))


def toy_corpus_data(n=40, classes=4, size=8, seed=0):
  rng = np.random.default_rng(seed)
  keys = [f"img{i}" for i in range(n)]
  images = {k: rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for k in keys}
  corpus = corpus_lib.class_corpus(keys, np.arange(n) % classes, num_items=n, seed=seed)
  return tasks.CorpusData(corpus, corpus.make_docids("clustered"), images=images)


def test_docid_vocabulary_round_trips_ids():
  vocab = tasks.DocidVocabulary(10)
  assert vocab.vocab_size == 12 and vocab.eos_id == 1 and vocab.pad_id == 0
  assert vocab.encode("3-0-7") == [5, 2, 9]
  assert vocab.decode([5, 2, 9, 1, 0]) == "3-0-7"
  assert vocab.encode_tf("3-0-7").numpy().tolist() == [5, 2, 9]
  assert vocab.decode_tf(np.array([5, 2, 9, 1, 0])).numpy() == b"3-0-7"


def test_retrieval_data_read_through_tasks_matches_the_corpus():
  data = toy_corpus_data()
  tasks.register_dsi_tasks("test_toy", data)
  arrays, ids = tasks.retrieval_data("test_toy")
  corpus = data.corpus
  assert ids == data.docids
  # Row i of the index is the item with id row i, pixels scaled to [-1, 1].
  for i, key in enumerate(corpus.indexed):
    np.testing.assert_allclose(arrays.index_inputs[i], data.images[key] / 127.5 - 1.0, atol=1e-6)
  for split, inputs, relevant in (
    ("train", arrays.train_inputs, arrays.train_relevant),
    ("validation", arrays.val_inputs, arrays.val_relevant),
    ("test", arrays.test_inputs, arrays.test_relevant),
  ):
    queries = corpus.split(split)
    assert len(inputs) == len(queries) == len(relevant)
    for q, x, rel in zip(queries, inputs, relevant):
      np.testing.assert_allclose(x, data.images[q.item] / 127.5 - 1.0, atol=1e-6)
      assert sorted(rel.tolist()) == sorted(ids.index(k) for k in q.relevant)
  # Training queries give one example per relevant item; evaluation queries one each.
  train = list(
    seqio.get_mixture_or_task("test_toy_retrieval")
    .get_dataset(None, split="train", shuffle=False)
    .as_numpy_iterator()
  )
  assert len(train) == sum(len(q.relevant) for q in corpus.split("train"))
  vocab = tasks.DocidVocabulary(ids.num_codes)
  for ex in train[:20]:
    target_row = ids.keys.index(
      next(k for k in ids.keys if ids.id_string(k) == vocab.decode(ex["targets"].tolist()))
    )
    assert target_row in ex["relevant"].tolist() and ex["targets"][-1] == 1  # eos


def test_feature_converter_shapes_and_shift():
  tasks.register_dsi_tasks("test_toy_conv", toy_corpus_data(), indexing_rate=1, retrieval_rate=2)
  ds = seqio.get_dataset(
    "test_toy_conv",
    task_feature_lengths={"inputs": 8, "targets": 4},
    dataset_split="train",
    shuffle=True,
    feature_converter=tasks.DSIFeatureConverter("image"),
  )
  for ex in ds.take(10).as_numpy_iterator():
    assert ex["encoder_input_tokens"].shape == (8, 8, 3)
    assert ex["encoder_input_tokens"].dtype == np.float32
    tgt, inp = ex["decoder_target_tokens"], ex["decoder_input_tokens"]
    assert tgt.shape == inp.shape == (4,)
    assert inp[0] == 0 and inp[1:].tolist() == tgt[:-1].tolist()
    assert ex["decoder_loss_weights"].tolist() == (tgt != 0).astype(int).tolist()


def test_external_script_registers_its_corpus_and_iterates_a_mixture(tmp_path):
  script = tmp_path / "my_project.py"
  script.write_text(
    textwrap.dedent(
      """
      import numpy as np
      import seqio
      from dsi_jax import tasks
      from dsi_jax.data import corpus as corpus_lib

      rng = np.random.default_rng(1)
      keys = [f"photo{i}" for i in range(60)]
      images = {k: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for k in keys}
      corpus = corpus_lib.class_corpus(keys, np.arange(60) % 3, num_items=60)
      ids = corpus.make_docids("random")
      names = tasks.register_dsi_tasks(
        "my_project_photos", tasks.CorpusData(corpus, ids, images=images), indexing_rate=1.0
      )
      ds = seqio.get_dataset(
        names["mixture"],
        task_feature_lengths={"inputs": 16, "targets": ids.max_length},
        dataset_split="train",
        shuffle=True,
        seed=0,
        num_epochs=None,  # repeat, as for training
        feature_converter=tasks.DSIFeatureConverter("image"),
      )
      vocab = tasks.DocidVocabulary(ids.num_codes)
      valid = {ids.id_string(k) for k in ids.keys}
      n = 0
      for ex in ds.take(50).as_numpy_iterator():
        assert ex["encoder_input_tokens"].shape == (16, 16, 3)
        assert vocab.decode(ex["decoder_target_tokens"].tolist()) in valid
        n += 1
      print("OK", n, sorted(names.values()))
      """
    )
  )
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  out = subprocess.run(
    [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert (
    "OK 50 ['my_project_photos', 'my_project_photos_indexing', 'my_project_photos_retrieval']"
    in (out.stdout)
  )


def test_every_seed_setting_is_registered_and_a_gin_import_works():
  gin.parse_config("import dsi_jax.tasks")
  names = set(seqio.MixtureRegistry.names())
  for size in (512, 1024, 2048):
    for ids in ("random", "clustered"):
      assert f"dsi_jax_fmnist{size}_{ids}" in names
      assert f"dsi_jax_imagefolder{size}_{ids}" in names
    assert f"dsi_jax_coco{size}_random" in names
  flickr = [f"dsi_jax_flickr{c}1k_{ids}" for c in ("8k", "30k") for ids in ("random", "semantic")]
  assert {"dsi_jax_fmnist512_clustered_pq4", "dsi_jax_squad_atomic_pq4"} <= names
  assert "dsi_jax_squad_atomic_pq4_pseudo_queries" in seqio.TaskRegistry.names()
  for name in (*flickr, "dsi_jax_squad_random"):
    assert name in names
    assert f"{name}_indexing" in seqio.TaskRegistry.names()
    assert f"{name}_retrieval" in seqio.TaskRegistry.names()


def test_unset_source_is_a_one_line_error(monkeypatch):
  monkeypatch.delenv("DSI_JAX_COCO_DIR", raising=False)
  with pytest.raises(ValueError, match="set DSI_JAX_COCO_DIR") as info:
    tasks.retrieval_data("dsi_jax_coco512_random")
  assert "\n" not in str(info.value)


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST not installed")
def test_fashion_mnist_tasks_sample_once_and_persist_the_corpus(tmp_path):
  names = task_datasets.register(
    "fmnist", num_items=60, scheme="clustered", name="test_fmnist60", corpus_dir=tmp_path / "c"
  )
  arrays, ids = tasks.retrieval_data(names["mixture"])
  assert arrays.index_inputs.shape == (len(ids), 32, 32, 3) and len(ids) == 20
  saved, saved_ids = corpus_lib.load_corpus(tmp_path / "c")
  assert saved == tasks.corpus_data("test_fmnist60").corpus and saved_ids == ids
  # Registered again (a later session): the saved corpus is read, not re-sampled.
  task_datasets.register(
    "fmnist",
    num_items=60,
    scheme="clustered",
    seed=5,
    name="test_fmnist60b",
    corpus_dir=tmp_path / "c",
  )
  assert tasks.corpus_data("test_fmnist60b").corpus == saved
  # Asked for other ids than the saved ones: a one-line error, not the saved ids in silence.
  task_datasets.register(
    "fmnist", num_items=60, scheme="random", name="test_fmnist60c", corpus_dir=tmp_path / "c"
  )
  with pytest.raises(ValueError, match="holds 'clustered' ids, not 'random'"):
    tasks.corpus_data("test_fmnist60c")


def _topic_captions(n):
  """Images 0, 2, 4, ... are about dogs, 1, 3, 5, ... about surfing; 5 captions each."""
  dogs = [
    "a brown dog runs across the grass",
    "a puppy plays fetch with a ball in the park",
    "two dogs chase each other on a lawn",
    "a dog jumps to catch a frisbee",
    "a black dog carries a stick in its mouth",
  ]
  surf = [
    "a surfer rides a large wave",
    "a man on a surfboard in the ocean",
    "a person surfing a breaking wave at sea",
    "a surfer paddles out past the waves",
    "a woman falls off her surfboard into the water",
  ]
  return [[f"{c} ({i})" for c in (dogs if i % 2 == 0 else surf)] for i in range(n)]


def test_caption_embeddings_average_only_the_training_captions():
  keys = [f"img{i}.jpg" for i in range(6)]
  captions = _topic_captions(6)
  corpus = corpus_lib.caption_corpus(keys, captions, num_items=6, seed=0)
  seen = []

  def encoder(texts):  # a stand-in text encoder: one random vector per distinct text
    seen.extend(texts)
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=8) for t in texts])

  emb = task_datasets.caption_embeddings(corpus, text_encoder=encoder)
  assert emb.shape == (6, 8)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  assert set(seen) == {q.text for q in corpus.split("train")}  # never a val / test caption
  for row, key in enumerate(corpus.indexed):
    own = [q.text for q in corpus.split("train") if q.relevant == (key,)]
    mean = encoder(own).mean(axis=0)
    np.testing.assert_allclose(emb[row], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  # An image without a training caption cannot be embedded by its captions.
  bare = corpus_lib.caption_corpus(keys, [*captions[:5], []], num_items=6, seed=0)
  with pytest.raises(ValueError, match="'img5.jpg' has no training caption"):
    task_datasets.caption_embeddings(bare, text_encoder=encoder)


def test_caption_semantic_ids_share_prefixes_within_a_topic():
  from dsi_jax import docids as docids_lib

  keys = [f"img{i}.jpg" for i in range(12)]
  corpus = corpus_lib.caption_corpus(keys, _topic_captions(12), num_items=12, seed=0)
  # Real MiniLM embeddings of the training captions; pixels are not read.
  emb = task_datasets.item_embeddings(corpus, images=None)
  ids = docids_lib.semantic_ids(corpus.indexed, emb, k=2, c=6)
  first = {key: ids.codes[i][0] for i, key in enumerate(ids.keys)}
  dogs = {first[k] for k in keys[0::2]}
  surf = {first[k] for k in keys[1::2]}
  assert len(dogs) == 1 and len(surf) == 1 and dogs != surf


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST not installed")
def test_more_items_than_the_data_set_is_a_one_line_error(tmp_path):
  task_datasets.register(
    "fmnist", num_items=10**6, scheme="random", name="test_fmnist_huge", corpus_dir=tmp_path / "c"
  )
  with pytest.raises(ValueError, match="num_items=1000000 exceeds") as info:
    tasks.corpus_data("test_fmnist_huge")
  assert "\n" not in str(info.value) and not (tmp_path / "c").exists()


@pytest.mark.skipif("DSI_JAX_SQUAD_FILE" not in os.environ, reason="SQuAD dev not found")
def test_squad_tasks_feed_question_tokens():
  ds = seqio.get_dataset(
    "dsi_jax_squad_random",
    task_feature_lengths={"inputs": 64, "targets": 6},
    dataset_split="test",
    shuffle=False,
    feature_converter=tasks.DSIFeatureConverter("text"),
  )
  ex = next(ds.as_numpy_iterator())
  assert ex["encoder_input_tokens"].shape == (64,) and ex["encoder_input_tokens"].dtype == np.int32
  corpus = tasks.corpus_data("dsi_jax_squad_random").corpus
  assert len(corpus.indexed) == 2067
  assert sum(len(corpus.split(s)) for s in corpus_lib.QUERY_SPLITS) == 10570


@pytest.mark.skipif("DSI_JAX_FLICKR8K_DIR" not in os.environ, reason="Flickr8k-1k not found")
def test_flickr8k_tasks_mix_images_and_captions():
  ds = seqio.get_dataset(
    "dsi_jax_flickr8k1k_random",
    task_feature_lengths={"inputs": 64, "text_inputs": 48, "targets": 5},
    dataset_split="train",
    shuffle=True,
    seed=0,
    feature_converter=tasks.DSIFeatureConverter("image+text"),
  )
  kinds = set()
  for ex in ds.take(40).as_numpy_iterator():
    assert ex["encoder_input_tokens"].shape == (64, 64, 3)
    has_text = np.count_nonzero(ex["encoder_text_tokens"]) > 2  # more than [CLS] [SEP]
    has_image = np.abs(ex["encoder_input_tokens"] + 1.0).max() > 0  # not the blank image
    assert has_text != has_image
    kinds.add("caption" if has_text else "image")
  assert kinds == {"caption", "image"}
  corpus = tasks.corpus_data("dsi_jax_flickr8k1k_random").corpus
  assert [len(corpus.split(s)) for s in corpus_lib.QUERY_SPLITS] == [3000, 1000, 1000]
  # The trainer's arrays: images indexed, caption tokens as queries, one relevant image each.
  data, docids = tasks.retrieval_data("dsi_jax_flickr8k1k_random", text_length=32)
  assert data.index_inputs.shape == (1000, 64, 64, 3) and len(docids) == 1000
  assert data.train_inputs.shape == (3000, 32) and data.train_inputs.dtype == np.int32
  assert data.test_inputs.shape == (1000, 32)
  assert all(len(r) == 1 for r in data.test_relevant)


def _coco_folder(root, *, train_square: int, val_square: int, val_wide: int):
  """A COCO-layout folder of tiny JPEGs, every image with one object category."""
  import json

  import cv2

  rng = np.random.default_rng(0)
  image_id = 0
  for split, square, wide in (("train2017", train_square, 0), ("val2017", val_square, val_wide)):
    os.makedirs(root / split, exist_ok=True)
    images, annotations = [], []
    for i in range(square + wide):
      image_id += 1
      name = f"{image_id:012d}.jpg"
      shape = (12, 12, 3) if i < square else (12, 30, 3)
      cv2.imwrite(str(root / split / name), rng.integers(0, 255, shape, dtype=np.uint8))
      images.append({"id": image_id, "file_name": name})
      annotations.append({"id": image_id, "image_id": image_id, "category_id": 1 + i % 5})
    os.makedirs(root / "annotations", exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
      json.dumps({"images": images, "annotations": annotations, "categories": []})
    )


def test_coco_corpora_draw_from_train_and_val_or_say_how_many_images_passed(tmp_path, monkeypatch):
  """Square photos are rare in COCO: the 512-item corpus needs train2017 as well as val2017,
  and a folder that cannot give it says how many images passed the aspect filter."""
  both = tmp_path / "coco"
  _coco_folder(both, train_square=300, val_square=300, val_wide=200)
  names = task_datasets.register(
    "coco",
    num_items=512,
    scheme="random",
    name="test_coco512",
    location=str(both),
    corpus_dir=tmp_path / "corpus",
  )
  arrays, ids = tasks.retrieval_data(names["mixture"])
  corpus = tasks.corpus_data("test_coco512").corpus
  assert corpus.source["split"] == "train+validation"
  items = set(corpus.item_keys)
  assert len(items) == 512 and len(ids) == len(corpus.indexed)
  assert any(int(k[:12]) <= 300 for k in items) and any(int(k[:12]) > 300 for k in items)
  val_only = tmp_path / "coco_val"
  _coco_folder(val_only, train_square=0, val_square=300, val_wide=200)
  (val_only / "annotations" / "instances_train2017.json").unlink()
  # tfds knows a prepared dataset by name only: prepare this folder in a data dir of its own.
  monkeypatch.setenv(task_datasets.DATA_DIR_ENV, str(tmp_path / "data_val"))
  names = task_datasets.register(
    "coco",
    num_items=512,
    scheme="random",
    name="test_coco512_val",
    location=str(val_only),
    corpus_dir=tmp_path / "corpus_val",
  )
  with pytest.raises(ValueError) as info:
    tasks.retrieval_data(names["mixture"])
  message = str(info.value)
  assert "\n" not in message
  assert "512 items asked, but only 300 images" in message and "(validation)" in message
  assert "200 images were skipped for their aspect ratio" in message
