"""SeqIO tasks and mixtures for a DSI corpus (the feature converter is in `features`).

For a corpus named NAME, `register_dsi_tasks` adds

  NAME_indexing   every indexed item -> its id             (split "train")
  NAME_retrieval  query -> a relevant id                   (splits "train", "validation", "test")
  NAME            a mixture of the two at a given indexing : retrieval rate

Examples hold `targets` (id tokens, eos-terminated), the encoder input, and a few
pass-through features that evaluation reads: `key` (item or query key) and, on retrieval
examples, `relevant` (int32 rows of every relevant item in the DocidMap). A training query
with several relevant items gives one example per relevant item (the DSI multitask recipe);
validation and test queries give one example each.

Encoder inputs by modality:
  "image": `inputs` is float32 `[size, size, 3]` in [-1, 1] (uint8 pixels scaled);
  "text":  `inputs` is int32 tokens of the text vocabulary (eos-terminated).
A corpus whose items are images and whose queries are texts (captions) has both: images in
`inputs`, texts in `text_inputs`; each example fills the one it lacks with zeros / no tokens, so
that the indexing and retrieval tasks mix.

Another project registers its own corpus in a few lines:

    from dsi_jax import tasks
    from dsi_jax.data import corpus as corpus_lib

    corpus = corpus_lib.class_corpus(keys, labels, num_items=200)
    tasks.register_dsi_tasks(
      "my_corpus", tasks.CorpusData(corpus, corpus.make_docids("random"), images=images_by_key)
    )
    ds = seqio.get_dataset("my_corpus", task_feature_lengths=...,
                           feature_converter=tasks.DSIFeatureConverter(modality="image"))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from dsi_jax import docids as docids_lib
from dsi_jax.data import corpus as corpus_lib
from dsi_jax.data import inputs as inputs_lib
from dsi_jax.tasks.features import (  # noqa: F401  (DSIFeatureConverter: part of this API)
  MODALITIES,
  DSIFeatureConverter,
)

_REGISTERED: dict[str, Callable[[], CorpusData]] = {}
_SETTINGS: dict[str, dict[str, Any]] = {}  # name -> modality, image size, features, rates
TEXT_VOCABULARY = seqio.ByteVocabulary()


class DocidVocabulary(seqio.Vocabulary):
  """The id vocabulary of a DocidMap: 0 pad, 1 eos, then one token per code.

  Strings are ids written as codes joined by "-" ("3-0-7"), as `DocidMap.id_string` writes them.
  """

  def __init__(self, num_codes: int | Callable[[], int]):
    """`num_codes` may be a function, called on first use (for corpora built lazily)."""
    self._get_num_codes = num_codes if callable(num_codes) else (lambda: int(num_codes))
    super().__init__(extra_ids=0)

  @functools.cached_property
  def _num_codes(self) -> int:
    return int(self._get_num_codes())

  @property
  def eos_id(self) -> int:
    return docids_lib.EOS

  @property
  def pad_id(self) -> int:
    return docids_lib.PAD

  @property
  def unk_id(self) -> None:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self._num_codes + docids_lib.NUM_SPECIAL

  def _encode(self, s: str) -> list[int]:
    return [int(c) + docids_lib.NUM_SPECIAL for c in s.split("-") if c]

  def _decode(self, ids) -> str:
    return "-".join(
      str(int(i) - docids_lib.NUM_SPECIAL) for i in ids if i >= docids_lib.NUM_SPECIAL
    )

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    codes = tf.strings.to_number(tf.strings.split(s, "-"), tf.int32)
    return codes + docids_lib.NUM_SPECIAL

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    codes = tf.boolean_mask(ids, ids >= docids_lib.NUM_SPECIAL) - docids_lib.NUM_SPECIAL
    return tf.strings.reduce_join(tf.strings.as_string(codes), separator="-", axis=-1)

  def __eq__(self, other) -> bool:
    return isinstance(other, DocidVocabulary) and other._num_codes == self._num_codes

  def __hash__(self) -> int:
    return hash("DocidVocabulary")


class TokenizerVocabulary(seqio.Vocabulary):
  """A HuggingFace `tokenizers` tokenizer (e.g. MiniLM's WordPiece) as a SeqIO vocabulary.

  Encoding adds the tokenizer's own special tokens ([CLS] ... [SEP] for BERT), so features
  using it set `add_eos=False`; padding is the tokenizer's pad id (0 for BERT).
  """

  def __init__(self, load_tokenizer: Callable[[], Any], name: str):
    """`load_tokenizer` is called on first use (registering a task loads nothing)."""
    self._load = load_tokenizer
    self._name = name
    super().__init__(extra_ids=0)

  @functools.cached_property
  def _tokenizer(self):
    tokenizer = self._load()
    tokenizer.no_truncation()  # seqio trims to the requested length
    tokenizer.no_padding()
    return tokenizer

  @property
  def eos_id(self) -> int | None:
    return None

  @property
  def unk_id(self) -> int | None:
    return self._tokenizer.token_to_id("[UNK]")

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  def _encode(self, s: str) -> list[int]:
    return inputs_lib.text_token_ids(self._tokenizer, s)

  def _decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids])

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(x):
      return np.asarray(self._encode(x.numpy().decode("utf-8")), np.int32)

    ids = tf.py_function(encode, [s], tf.int32)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return tf.py_function(lambda x: self._decode(x.numpy().tolist()), [ids], tf.string)

  def __eq__(self, other) -> bool:
    return isinstance(other, TokenizerVocabulary) and other._name == self._name

  def __hash__(self) -> int:
    return hash(("TokenizerVocabulary", self._name))


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary over a model file that may not exist yet.

  `model_file` may be a function that returns the path, called on first use; it can train the
  model then (`dsi_jax.data.spm.corpus_sentencepiece`), so registering a task trains nothing.
  The model must keep T5's ids (0 pad, 1 eos, 2 unk), as `dsi_jax.data.spm` trains them: the
  eos id is known without loading the model, which SeqIO asks for when a task is registered.
  """

  def __init__(self, model_file: str | Callable[[], str], name: str):
    self._resolve = model_file if callable(model_file) else None
    self._name = name
    super().__init__(model_file if isinstance(model_file, str) else "")

  def _model_context(self):
    if self._model is None and self._resolve is not None:
      self._sentencepiece_model_file = self._resolve()
    context = super()._model_context()
    if context.tokenizer.eos_id() != self.eos_id:
      raise ValueError(
        f"{self._sentencepiece_model_file}: eos id {context.tokenizer.eos_id()}, expected "
        f"{self.eos_id} (train it with dsi_jax.data.spm)"
      )
    return context

  @property
  def eos_id(self) -> int:
    return 1

  def __eq__(self, other) -> bool:
    return isinstance(other, SentencePieceVocabulary) and other._name == self._name

  def __hash__(self) -> int:
    return hash(("SentencePieceVocabulary", self._name))


@dataclasses.dataclass(frozen=True)
class CorpusData:
  """A corpus with its ids and the contents of its items, looked up by key.

  Attributes:
    corpus: which items are indexed, the queries and their relevance.
    docids: the ids of `corpus.indexed`, in that order.
    images: item key -> uint8 `[size, size, 3]` pixels (every indexed and query item).
    texts: item key -> text, for corpora of documents.
  """

  corpus: corpus_lib.Corpus
  docids: docids_lib.DocidMap
  images: Mapping[str, np.ndarray] | None = None
  texts: Mapping[str, str] | None = None

  def __post_init__(self):
    if tuple(self.docids.keys) != tuple(self.corpus.indexed):
      raise ValueError("docids must hold the corpus's indexed keys, in order")
    table = self.images if self.images is not None else self.texts
    if table is None:
      raise ValueError("CorpusData needs the items' images or texts")
    missing = [k for k in self.corpus.item_keys if k not in table]
    if missing:
      raise ValueError(f"no image or text for item {missing[0]!r}")


def output_features(
  modality: str,
  num_codes: int | Callable[[], int],
  image_size: int | None = None,
  text_vocabulary=None,
) -> dict[str, seqio.Feature]:
  """The output features of a DSI task of `modality` ("image", "text" or "image+text")."""
  if modality not in MODALITIES:
    raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
  text_vocabulary = text_vocabulary or TEXT_VOCABULARY
  text_eos = text_vocabulary.eos_id is not None  # a tokenizer adds its own end token
  features = {"targets": seqio.Feature(DocidVocabulary(num_codes), add_eos=True)}
  if modality in ("image", "image+text"):
    features["inputs"] = seqio.ContinuousFeature(dtype=tf.float32, rank=3)
  if modality == "text":
    features["inputs"] = seqio.Feature(text_vocabulary, add_eos=text_eos)
  if modality == "image+text":
    features["text_inputs"] = seqio.Feature(text_vocabulary, add_eos=text_eos)
  return features


def _examples(data: CorpusData, task: str, split: str) -> dict:
  """The examples of one task split as numpy columns (strings still untokenised)."""
  corpus, docids = data.corpus, data.docids
  rows: dict[str, list] = {"key": [], "targets": [], "relevant": [], "image": [], "text": []}

  def add(key, item, text, relevant_rows, target_row):
    rows["key"].append(key)
    rows["targets"].append(docids.id_string(docids.keys[target_row]))
    rows["relevant"].append(np.asarray(relevant_rows, np.int32))
    rows["image"].append(data.images[item] if item is not None and data.images else None)
    if text is None and item is not None and data.texts is not None:
      text = data.texts[item]
    rows["text"].append(text or "")

  if task == "indexing":
    for i, key in enumerate(corpus.indexed):
      add(key, key, None, [i], i)
  else:
    for q in corpus.split(split):
      rel = [docids.index(k) for k in q.relevant]
      for r in rel if split == "train" else rel[:1]:
        add(q.key, q.item, q.text, rel, r)
  return rows


def _dataset(
  get_data: Callable[[], CorpusData],
  task: str,
  modality: str,
  image_size: int | None,
  split: str,
  shuffle_files: bool = False,
  seed: int | None = None,
) -> tf.data.Dataset:
  del shuffle_files, seed  # One in-memory source; seqio shuffles examples.
  data = get_data()
  rows = _examples(data, task, split)
  n = len(rows["key"])
  if n == 0:
    raise ValueError(f"the {task} task has no examples in split {split!r}")
  columns: dict[str, Any] = {
    "key": np.asarray(rows["key"], dtype=object),
    "targets": np.asarray(rows["targets"], dtype=object),
  }
  ragged = {"relevant": tf.ragged.constant(rows["relevant"], dtype=tf.int32)}
  if modality in ("image", "image+text"):
    size = image_size or next(im.shape[0] for im in rows["image"] if im is not None)
    blank = np.zeros((size, size, 3), np.uint8)
    columns["image"] = np.stack([blank if im is None else im for im in rows["image"]])
  if modality in ("text", "image+text"):
    columns["text"] = np.asarray(rows["text"], dtype=object)
  ds = tf.data.Dataset.from_tensor_slices({**columns, **ragged})

  def to_features(ex):
    out = {"key": ex["key"], "targets": ex["targets"], "relevant": ex["relevant"]}
    if modality in ("image", "image+text"):
      out["inputs"] = inputs_lib.scale_pixels(tf.cast(ex["image"], tf.float32))
    if modality == "text":
      out["inputs"] = ex["text"]
    if modality == "image+text":
      out["text_inputs"] = ex["text"]
    return out

  return ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)


def register_dsi_tasks(
  name: str,
  data: CorpusData | Callable[[], CorpusData],
  *,
  modality: str = "image",
  num_codes: int | None = None,
  image_size: int | None = None,
  indexing_rate: float = 1.0,
  retrieval_rate: float = 1.0,
  text_vocabulary: seqio.Vocabulary | None = None,
) -> dict[str, str]:
  """Registers NAME_indexing, NAME_retrieval and the mixture NAME; returns their names.

  Args:
    name: prefix of the task names (e.g. "dsi_jax_fmnist512_clustered").
    data: the corpus and its items, or a function that builds them on first use (so that
      registering many corpora at import costs nothing).
    modality: "image" (items and queries are images), "text" (documents and questions) or
      "image+text" (images indexed, captions as queries).
    num_codes: codes per id position; by default taken from the data's DocidMap (when the
      data is built lazily, on first use).
    image_size: side of the images; taken from the data when omitted.
    indexing_rate, retrieval_rate: mixing rates of the two tasks in the mixture.
    text_vocabulary: the tokenizer of text inputs (default: UTF-8 bytes).
  """
  if isinstance(data, CorpusData):
    fixed = data

    def get_data():
      return fixed
  else:
    get_data = functools.cache(data)
  if num_codes is None:
    num_codes = lambda: get_data().docids.num_codes  # noqa: E731
  if indexing_rate < 0 or retrieval_rate < 0 or indexing_rate + retrieval_rate == 0:
    raise ValueError(
      f"mixture rates must be non-negative and not both zero, got "
      f"indexing_rate={indexing_rate}, retrieval_rate={retrieval_rate}"
    )
  text_vocabulary = text_vocabulary or TEXT_VOCABULARY
  features = output_features(modality, num_codes, image_size, text_vocabulary)
  preprocessors = [
    seqio.preprocessors.tokenize,
    seqio.preprocessors.append_eos,
    seqio.CacheDatasetPlaceholder(),
  ]
  for task in _SETTINGS.get(name, {}).get("rates", {}):  # further tasks of an earlier register
    seqio.TaskRegistry.remove(task)
  _REGISTERED[name] = get_data
  names = {"indexing": f"{name}_indexing", "retrieval": f"{name}_retrieval", "mixture": name}
  _SETTINGS[name] = dict(
    modality=modality,
    image_size=image_size,
    features=features,
    rates={names["indexing"]: indexing_rate, names["retrieval"]: retrieval_rate},
  )
  for task, splits in (("indexing", ("train",)), ("retrieval", corpus_lib.QUERY_SPLITS)):
    seqio.TaskRegistry.remove(names[task])
    seqio.TaskRegistry.add(
      names[task],
      source=seqio.FunctionDataSource(
        functools.partial(_dataset, get_data, task, modality, image_size),
        splits=splits,
      ),
      preprocessors=preprocessors,
      output_features=features,
    )
  _register_mixture(name)
  return names


def _register_mixture(name: str) -> None:
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(_SETTINGS[name]["rates"].items()))


def add_corpus_task(
  name: str, suffix: str, preprocessors: list, *, rate: float, task: str = "indexing"
) -> str:
  """Registers NAME_<suffix>, the "train" examples of NAME's `task` ("indexing" or
  "retrieval") through `preprocessors` (the last a `seqio.CacheDatasetPlaceholder`), and adds
  it to the mixture NAME at `rate`. Returns the task's name. (`pseudo_queries` adds its task
  this way.)"""
  if name not in _SETTINGS:
    raise ValueError(
      f"no DSI corpus registered as {name!r}; known: {', '.join(sorted(_REGISTERED))}"
    )
  if rate <= 0:
    raise ValueError(f"the rate of {name}_{suffix} in its mixture must be positive, got {rate}")
  settings = _SETTINGS[name]
  new = f"{name}_{suffix}"
  seqio.TaskRegistry.remove(new)
  seqio.TaskRegistry.add(
    new,
    source=seqio.FunctionDataSource(
      functools.partial(
        _dataset, _REGISTERED[name], task, settings["modality"], settings["image_size"]
      ),
      splits=("train",),
    ),
    preprocessors=preprocessors,
    output_features=settings["features"],
  )
  settings["rates"][new] = rate
  _register_mixture(name)
  return new


def corpus_modality(name: str) -> str:
  """The modality NAME was registered with ("image", "text" or "image+text")."""
  if name not in _SETTINGS:
    raise ValueError(
      f"no DSI corpus registered as {name!r}; known: {', '.join(sorted(_REGISTERED))}"
    )
  return _SETTINGS[name]["modality"]


def corpus_data(name: str) -> CorpusData:
  """The corpus, ids and items behind the tasks registered as `name` (built on first use)."""
  if name not in _REGISTERED:
    raise ValueError(
      f"no DSI corpus registered as {name!r}; known: {', '.join(sorted(_REGISTERED))}"
    )
  return _REGISTERED[name]()


def registered_corpora() -> list[str]:
  """Names of the DSI corpora registered so far (each a mixture of its two tasks)."""
  return sorted(_REGISTERED)


def _read(task: str, split: str) -> list[dict[str, Any]]:
  ds = seqio.get_mixture_or_task(task).get_dataset(
    sequence_length=None, split=split, shuffle=False, use_cached=False, num_epochs=1
  )
  return list(ds.as_numpy_iterator())


def _stack_inputs(rows: list[np.ndarray], length: int | None) -> np.ndarray:
  """Stacks images as they are; token rows are cut / padded (with 0) to `length`."""
  if not rows or rows[0].ndim != 1:
    return np.stack(rows)
  return inputs_lib.token_rows(rows, length)


def retrieval_data(name: str, *, text_length: int | None = None):
  """The trainer's arrays, read through the SeqIO tasks of corpus `name`.

  Returns `(RetrievalData, DocidMap)`: row i of `index_inputs` is the item with id row i; each
  query's relevant rows come from its `relevant` feature, and a training query's examples
  (one per relevant item) are folded back into one query. Token inputs are cut or padded to
  `text_length` (default: the longest). For images indexed by captions ("image+text"), the
  items are images and the queries are the captions' tokens. Pseudo-queries, where the corpus
  has them (`pseudo_queries.add_pseudo_queries`), follow the training queries.
  """
  from dsi_jax import batches

  docids = corpus_data(name).docids
  index = _read(f"{name}_indexing", "train")
  if [ex["key"].decode() for ex in index] != list(docids.keys):
    raise ValueError(f"{name}_indexing: items are not in id order")
  splits = {}
  pseudo = f"{name}_pseudo_queries"
  for split in corpus_lib.QUERY_SPLITS:
    by_query: dict[bytes, dict] = {}
    for ex in _read(f"{name}_retrieval", split):
      by_query.setdefault(ex["key"], ex)
    if split == "train" and pseudo in seqio.TaskRegistry.names():
      for ex in _read(pseudo, "train"):
        by_query.setdefault(ex["key"], ex)
    queries = list(by_query.values())
    # Captions of an image corpus are in `text_inputs` (`inputs` holds a blank image there).
    field = "text_inputs" if queries and "text_inputs" in queries[0] else "inputs"
    splits[split] = (
      _stack_inputs([q[field] for q in queries], text_length)
      if queries
      else np.zeros((0,) + index[0]["inputs"].shape, np.float32),
      [np.sort(q["relevant"]) for q in queries],
    )
  data = batches.RetrievalData(
    index_inputs=_stack_inputs([ex["inputs"] for ex in index], text_length),
    train_inputs=splits["train"][0],
    train_relevant=splits["train"][1],
    val_inputs=splits["validation"][0],
    val_relevant=splits["validation"][1],
    test_inputs=splits["test"][0],
    test_relevant=splits["test"][1],
  )
  return data, docids
