"""Pseudo-queries: extra training queries made from the indexed items alone, as SeqIO
preprocessors (no external generator; the tasks, the trainers and the t5x route all see them).

Every indexed item gives `per_item` pseudo-queries, each one view of the item:

  "sentence"  one of the text's sentences (split after . ! ? and before whitespace);
  "span"      a window of 8-32 tokens of the tokenized text (NCI's "document as query"),
              cut after tokenization, so it counts the vocabulary's own word pieces;
  "augment"   for images: a random crop (a side of `crop` to 1 of the image, resized back),
              a horizontal flip half the time, brightness and contrast jitter.

Which view, which sentence and which window are drawn from a stateless generator seeded by
`(seed, the pseudo-query's key)` (the sentences of one item cycle from an offset drawn by its
key, so its views hold different sentences): the examples are the same however the data set
is ordered, sharded or re-read, and another seed gives others. Nothing is read but the item
itself, so a pseudo-query never holds a validation or test query. A pseudo-query's key is
`<item key>#pq<j>`; it is relevant to its own item only.

    from dsi_jax import tasks
    tasks.add_pseudo_queries("dsi_jax_squad_atomic", tasks.PseudoQueries(per_item=4))
    # the mixture dsi_jax_squad_atomic now also draws from dsi_jax_squad_atomic_pseudo_queries,
    # and tasks.retrieval_data adds them to the training queries
"""

from __future__ import annotations

import dataclasses
import functools

import seqio
import tensorflow as tf

from dsi_jax.tasks import core

TEXT_VIEWS = ("sentence", "span")
IMAGE_VIEWS = ("augment",)
_SPAN_FLAG = "pseudo_query_span"  # a feature that lives between the two preprocessors


@dataclasses.dataclass(frozen=True)
class PseudoQueries:
  """How many pseudo-queries each item gives, and of which views.

  views: `(view, weight)` pairs; each pseudo-query's view is drawn with these weights. Text
    corpora take "sentence" and "span", image corpora "augment".
  span_length: the shortest and longest window of a "span" view, in tokens (a shorter text
    is taken whole).
  crop: the smallest side of an "augment" crop, as a fraction of the image's side.
  """

  per_item: int = 4
  views: tuple[tuple[str, float], ...] = (("sentence", 1.0), ("span", 1.0))
  span_length: tuple[int, int] = (8, 32)
  crop: float = 0.7
  seed: int = 0

  def __post_init__(self):
    if self.per_item < 1:
      raise ValueError(f"PseudoQueries.per_item must be at least 1, got {self.per_item}")
    known = TEXT_VIEWS + IMAGE_VIEWS
    for view, weight in self.views:
      if view not in known:
        raise ValueError(f"unknown pseudo-query view {view!r}; known: {', '.join(known)}")
      if weight < 0:
        raise ValueError(f"pseudo-query view {view!r} has a negative weight {weight}")
    if not self.views or sum(w for _, w in self.views) <= 0:
      raise ValueError("PseudoQueries.views needs at least one view of positive weight")
    lo, hi = self.span_length
    if not 1 <= lo <= hi:
      raise ValueError(f"PseudoQueries.span_length must be 1 <= shortest <= longest, got {lo, hi}")
    if not 0 < self.crop <= 1:
      raise ValueError(f"PseudoQueries.crop must be in (0, 1], got {self.crop}")

  def check_modality(self, modality: str) -> None:
    """A one-line error where the views do not fit the corpus's items."""
    fits = {"text": TEXT_VIEWS, "image": IMAGE_VIEWS}.get(modality)
    if fits is None:
      raise ValueError(
        f"pseudo-queries need a corpus whose queries are of its items' kind (text or image), "
        f"not {modality!r}"
      )
    wrong = [v for v, _ in self.views if v not in fits]
    if wrong:
      raise ValueError(
        f"pseudo-query view {wrong[0]!r} does not apply to a {modality} corpus; use "
        f"{', '.join(fits)}"
      )


def _seed(seed: int, key: tf.Tensor, stream: int) -> tf.Tensor:
  """A stateless seed from the pseudo-query's key (FarmHash: the same on every machine)."""
  h = tf.strings.to_hash_bucket_fast(key, 2**62)
  return tf.stack([tf.constant(seed * 1009 + stream, tf.int64), h])


def _draw_view(config: PseudoQueries, key: tf.Tensor) -> tf.Tensor:
  weights = tf.constant([[w for _, w in config.views]], tf.float32)
  choice = tf.random.stateless_categorical(tf.math.log(weights), 1, _seed(config.seed, key, 0))
  return tf.gather(tf.constant([v for v, _ in config.views]), choice[0, 0])


def _sentence(text: tf.Tensor, seed: tf.Tensor, j: tf.Tensor) -> tf.Tensor:
  """Sentence `(offset + j) mod n` of the text, the offset drawn per item: an item's views
  take different sentences while it has more sentences than views."""
  one_line = tf.strings.strip(tf.strings.regex_replace(text, r"\s+", " "))
  marked = tf.strings.regex_replace(one_line, r"([.!?]) ", "\\1\n")
  sentences = tf.strings.split(marked, sep="\n")
  sentences = tf.boolean_mask(sentences, tf.strings.length(tf.strings.strip(sentences)) > 0)
  n = tf.maximum(tf.size(sentences), 1)
  offset = tf.random.stateless_uniform([], seed, 0, n, dtype=tf.int32)
  i = (offset + tf.cast(j, tf.int32)) % n
  return tf.cond(tf.size(sentences) > 0, lambda: sentences[i], lambda: one_line)


def _augment(pixels: tf.Tensor, config: PseudoQueries, seed: tf.Tensor) -> tf.Tensor:
  """A crop of side crop..1 (resized back), a flip half the time, brightness and contrast
  jitter, on pixels in [-1, 1]."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  size = tf.shape(pixels)[:2]
  side = tf.random.stateless_uniform([], seeds[0], config.crop, 1.0)
  crop = tf.maximum(tf.cast(tf.cast(size, tf.float32) * side, tf.int32), 1)
  crop_shape = tf.concat([crop, tf.shape(pixels)[2:]], 0)
  out = tf.image.stateless_random_crop(pixels, crop_shape, seeds[1])
  out = tf.image.resize(out[None], size, method="bilinear")[0]
  out = tf.image.stateless_random_flip_left_right(out, seeds[2])
  jitter = tf.random.stateless_uniform([2], seeds[3], -0.2, 0.2)
  mean = tf.reduce_mean(out)
  out = (out - mean) * (1.0 + jitter[0]) + mean + jitter[1]
  return tf.ensure_shape(tf.clip_by_value(out, -1.0, 1.0), pixels.shape)


def make_views(dataset: tf.data.Dataset, *, config: PseudoQueries, modality: str):
  """Indexing examples -> `per_item` pseudo-queries each (before tokenization).

  Text: a "sentence" view holds the sentence; a "span" view holds the whole text, flagged for
  `cut_spans` after tokenization. Image: the augmented pixels.
  """
  config.check_modality(modality)

  def view(j, ex):
    key = tf.strings.join([ex["key"], "#pq", tf.strings.as_string(j)])
    out = {**ex, "key": key}
    if modality == "image":
      out["inputs"] = _augment(ex["inputs"], config, _seed(config.seed, key, 1))
      return out
    kind = _draw_view(config, key)
    sentence = _sentence(ex["inputs"], _seed(config.seed, ex["key"], 1), j)
    out["inputs"] = tf.where(kind == "sentence", sentence, ex["inputs"])
    out[_SPAN_FLAG] = kind == "span"
    return out

  def expand(ex):
    return tf.data.Dataset.from_tensors(ex).repeat(config.per_item).enumerate().map(view)

  return dataset.flat_map(expand)


def cut_spans(dataset: tf.data.Dataset, *, config: PseudoQueries):
  """Flagged "span" views -> a window of span_length tokens of the tokenized text."""
  lo, hi = config.span_length

  def cut(ex):
    ex = dict(ex)
    flagged = ex.pop(_SPAN_FLAG, None)
    if flagged is None:  # an image corpus
      return ex
    tokens = ex["inputs"]
    n = tf.size(tokens)
    seeds = tf.random.experimental.stateless_split(_seed(config.seed, ex["key"], 2), 2)
    length = tf.minimum(tf.random.stateless_uniform([], seeds[0], lo, hi + 1, tf.int32), n)
    start = tf.random.stateless_uniform([], seeds[1], 0, n - length + 1, tf.int32)
    ex["inputs"] = tf.cond(flagged, lambda: tokens[start : start + length], lambda: tokens)
    return ex

  return dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE)


def add_pseudo_queries(name: str, config: PseudoQueries, *, rate: float = 1.0) -> str:
  """Adds NAME_pseudo_queries to the registered corpus NAME: `config.per_item` pseudo-queries
  of every indexed item, in the mixture NAME at `rate`; `tasks.retrieval_data` reads them as
  further training queries. Returns the task's name."""
  modality = core.corpus_modality(name)
  config.check_modality(modality)
  preprocessors = [
    functools.partial(make_views, config=config, modality=modality),
    seqio.preprocessors.tokenize,
    functools.partial(cut_spans, config=config),
    seqio.preprocessors.append_eos,
    seqio.CacheDatasetPlaceholder(),
  ]
  return core.add_corpus_task(name, "pseudo_queries", preprocessors, rate=rate)
