"""How an index's generations are trained: the data a collection gives (items, augmented views,
text spans), a new model, and an old model grown by new atomic ids (`dsi_jax.index`)."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dsi_jax import batches, errors, runs
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.collection import Collection, text_spans
from dsi_jax.data import images as images_lib
from dsi_jax.data import inputs as inputs_lib

METRICS = ("map@10", "hits@1", "hits@10", "mrr@10")
EVAL_ITEMS = 100  # items whose held-out views validate (and test) a training run


MIN_STEPS = 200
MAX_STEPS = {"cpu": 3000}  # a CPU build stays within about half an hour on 2 cores
ACCELERATOR_MAX_STEPS = 50_000  # GPU / TPU: about 30 views of each of 50,000 items


def default_steps(num_items: int, backend: str | None = None) -> int:
  """Steps of a training phase for a collection of this size on this machine: enough for
  every item to be seen about 30 times in batches of 32 (one step per item), at least 200, at
  most 3,000 on a CPU (`backend`, default `jax.default_backend()`) and 50,000 on an
  accelerator."""
  backend = backend or jax.default_backend()
  return int(np.clip(num_items, MIN_STEPS, MAX_STEPS.get(backend, ACCELERATOR_MAX_STEPS)))


# ----------------------------------------------------------------------------- items


def load_pixels(items: Collection, size: int, show_progress: bool = True) -> np.ndarray:
  """uint8 `[n, size, size, 3]`: each image centre-cropped square and resized, as the model
  (and `runs.Run.prepare_images`) sees it."""
  out = np.zeros((len(items), size, size, 3), np.uint8)
  for i, key in enumerate(tqdm(items.keys, desc="reading images", disable=not show_progress)):
    with open(items.path(key), "rb") as f:
      out[i] = images_lib.preprocess_image(f.read(), size=size, aspect_range=None, source=key)
  return out


def image_views(pixels: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
  """An augmented view (crop, flip, colour jitter) of each image `pixels[rows]`, seeded."""
  rng = np.random.default_rng(seed)
  if not len(rows):
    return np.zeros((0, *pixels.shape[1:]), np.uint8)
  return np.stack([images_lib.augmented_view(pixels[r], rng) for r in rows])


def token_ids(tokenizer, texts) -> list[list[int]]:
  return [inputs_lib.text_token_ids(tokenizer, t) for t in texts]


def spans(ids: list[int], count: int, rng: np.random.Generator) -> list[list[int]]:
  """Random spans of a document's word pieces, inside its [CLS] ... [SEP]."""
  inner = ids[1:-1] or ids
  return [[ids[0], *s, ids[-1]] for s in text_spans(inner, count, rng)]


def items_record(items: Collection, pixels: np.ndarray | None) -> dict:
  """`items.json`: keys in id order, texts, known queries and source files."""
  return {
    "kind": items.kind,
    "keys": list(items.keys),
    "texts": list(items.texts),
    "queries": [list(q) for q in items.queries],
    "paths": {k: items.path(k) for k in items.keys} if items.kind == "images" else {},
  }


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Views:
  """Training and held-out queries of a set of items, before the tower."""

  train: np.ndarray
  train_rel: list[int]
  val: np.ndarray
  val_rel: list[int]
  test: np.ndarray
  test_rel: list[int]


def eval_rows(rows: np.ndarray, count: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(rows, size=min(count, len(rows)), replace=False))


def image_query_views(
  pixels: np.ndarray, train_rows: np.ndarray, eval_rows_: np.ndarray, views: int, seed: int
) -> Views:
  """Each of `train_rows` as itself plus `views` augmented views; one further view of each of
  `eval_rows_` to validate and another to test (seeds disjoint from training's)."""
  train = [pixels[train_rows]] + [
    image_views(pixels, train_rows, seed + 1000 + v) for v in range(views)
  ]
  return Views(
    np.concatenate(train),
    list(train_rows) * (views + 1),
    image_views(pixels, eval_rows_, seed + 2000),
    list(eval_rows_),
    image_views(pixels, eval_rows_, seed + 3000),
    list(eval_rows_),
  )


def text_query_views(
  doc_ids: list[list[int]],
  known: list[list[list[int]]],
  train_rows: np.ndarray,
  eval_rows_: np.ndarray,
  views: int,
  seed: int,
  length: int,
) -> Views:
  """Each of `train_rows` by its known queries and `views` spans of its text; a further span
  of each of `eval_rows_` to validate and another to test."""
  rng = np.random.default_rng(seed)
  train, rel = [], []
  for r in train_rows:
    for q in [*known[r], *spans(doc_ids[r], views, rng)]:
      train.append(q)
      rel.append(int(r))
  held = [np.random.default_rng(seed + s) for s in (2000, 3000)]
  val = [spans(doc_ids[r], 1, held[0])[0] for r in eval_rows_]
  test = [spans(doc_ids[r], 1, held[1])[0] for r in eval_rows_]
  rows = lambda x: inputs_lib.token_rows(x, length)  # noqa: E731
  return Views(rows(train), rel, rows(val), list(eval_rows_), rows(test), list(eval_rows_))


def retrieval_data(index_inputs: np.ndarray, views: Views, as_inputs) -> batches.RetrievalData:
  one = lambda rel: [np.array([r]) for r in rel]  # noqa: E731
  return batches.RetrievalData(
    index_inputs=as_inputs(index_inputs),
    train_inputs=as_inputs(views.train),
    train_relevant=one(views.train_rel),
    val_inputs=as_inputs(views.val),
    val_relevant=one(views.val_rel),
    test_inputs=as_inputs(views.test),
    test_relevant=one(views.test_rel),
  )


def train_config(steps: int, config, *, index: bool) -> train_lib.TrainConfig:
  """The trainer's config for a build (`index`: indexing, then retrieval) or an add
  (retrieval only, from the grown model); `config` an `index.BuildConfig` or `AddConfig`."""
  every = max(25, steps // 8)
  return train_lib.TrainConfig(
    batch_size=config.batch_size,
    learning_rate=config.learning_rate,
    warmup_steps=min(100, max(1, steps // 10)),
    index_max_steps=steps if index else 0,
    index_eval_every=every,
    finetune_max_steps=steps,
    finetune_eval_every=every,
    patience=3,
    eval_batch_size=64,
    ranking="auto",
    eval_metrics=METRICS,
    seed=config.seed,
  )


def _summary(result: dict) -> dict[str, Any]:
  out = {}
  for phase in ("zero_shot", "fine_tuned"):
    if phase in result:
      test = result[phase]["test"]
      out[phase] = {
        "steps": result[phase]["steps"],
        "seconds": round(result[phase]["seconds"], 1),
        **{k: round(float(v), 4) for k, v in test.items() if v is not None},
      }
  return out


# ----------------------------------------------------------------------------- training


def image_spec(size: int, output_block: int) -> runs.ModelSpec:
  return runs.ModelSpec(
    factory="dinov2_dsi",
    kwargs=dict(image_size=size, output_block=output_block, decoder_mlp_dim=768),
    queries=("image",),
    image_size=size,
    pretrained=("dinov2_vits14",),
    ranking={"method": "auto", "num_beams": 10},
  )


def text_spec(length: int) -> runs.ModelSpec:
  return runs.ModelSpec(
    factory="minilm_dsi",
    kwargs={"frozen": True},
    queries=("text",),
    text_length=length,
    tokenizer="minilm",
    pretrained=("all-MiniLM-L6-v2",),
    ranking={"method": "auto", "num_beams": 10},
  )


def item_embeddings(encoded: np.ndarray, raw: np.ndarray) -> np.ndarray:
  """`[n, d]` float32: the frozen tower's outputs `[n, tokens, d]` mean-pooled (over the
  unpadded word pieces of token rows `raw`, over every token of an image)."""
  encoded = np.asarray(encoded, np.float32)
  if np.issubdtype(np.asarray(raw).dtype, np.integer):
    mask = (np.asarray(raw) != 0).astype(np.float32)[..., None]
    return (encoded * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
  return encoded.mean(axis=1)


def make_ids(scheme: str, keys, embeddings: np.ndarray, seed: int) -> docids_lib.DocidMap:
  if scheme == "atomic":
    return docids_lib.atomic_ids(keys)
  if scheme == "random":
    return docids_lib.random_ids(keys, num_codes=10, seed=seed)
  if scheme == "semantic":
    return docids_lib.semantic_ids(keys, embeddings, k=10, c=100, seed=seed)
  raise errors.UserError(f"unknown id scheme {scheme!r}; use atomic, random or semantic")


def train_new(items: Collection, workdir: str, config, *, show_progress: bool = True):
  """Trains the first generation of `items` in `workdir`.
  Returns `(summary, pixels or None, item embeddings)`."""
  n = len(items)
  steps = config.steps or default_steps(n)
  docids = docids_lib.atomic_ids(items.keys)  # the towers do not depend on the ids
  rows = np.arange(n)
  held = eval_rows(rows, EVAL_ITEMS, config.seed)
  pixels = None
  if items.kind == "images":
    spec = image_spec(config.image_size, config.output_block)
    model, tokenizer = runs.build_model(spec, docids)
    pixels = load_pixels(items, config.image_size, show_progress)
    views = image_query_views(pixels, rows, held, config.views, config.seed)
    data = retrieval_data(pixels, views, inputs_lib.image_inputs)
  else:
    spec = text_spec(config.text_length)
    model, tokenizer = runs.build_model(spec, docids)
    doc_ids = token_ids(tokenizer, items.texts)
    known = [token_ids(tokenizer, q) for q in items.queries]
    views = text_query_views(
      doc_ids, known, rows, held, config.views, config.seed, spec.text_length
    )
    data = retrieval_data(inputs_lib.token_rows(doc_ids, spec.text_length), views, lambda x: x)
  _say(
    f"indexing {n} {items.kind}: up to {steps} steps of indexing, then of retrieval", show_progress
  )
  raw_index = data.index_inputs
  data = _encode(model, spec, data, show_progress)
  embeddings = item_embeddings(data.index_inputs, raw_index)
  if config.ids != "atomic":
    docids = make_ids(config.ids, items.keys, embeddings, config.seed)
    model, _ = runs.build_model(spec, docids)
  tconf = train_config(steps, config, index=True)
  result = train_lib.train_dsi(
    model, data, config=tconf, workdir=workdir, spec=spec, show_progress=show_progress
  )
  return _summary(result), pixels, embeddings


def train_added(
  old, embeddings, new: Collection, workdir: str, config, *, show_progress: bool = True
):
  """Trains the next generation: `old` (a loaded `Index`, with `embeddings` of its items)
  with `new`'s items added. Returns `(summary, items record, pixels or None, embeddings)`."""
  spec = old.run.spec
  tokenizer = old.run.tokenizer
  n_old, n_new = len(old.items["keys"]), len(new)
  new_rows = np.arange(n_old, n_old + n_new)
  removed = set(old.state["removed"])
  live_old = np.array([i for i, k in enumerate(old.items["keys"]) if k not in removed], int)
  rng = np.random.default_rng(config.seed)
  count = int(round(config.replay * n_new * (config.views + 1))) if len(live_old) else 0
  replay = rng.choice(live_old, size=count, replace=True) if count else np.zeros(0, int)
  held = np.concatenate(
    [
      eval_rows(new_rows, EVAL_ITEMS // 2, config.seed),
      eval_rows(live_old, EVAL_ITEMS // 2, config.seed),
    ]
  )
  record = items_record(new, None)
  record = {
    "kind": old.items["kind"],
    "keys": [*old.items["keys"], *record["keys"]],
    "texts": [*old.items["texts"], *record["texts"]],
    "queries": [*old.items["queries"], *record["queries"]],
    "paths": {**old.items.get("paths", {}), **record["paths"]},
  }
  pixels = None
  if spec.factory == "dinov2_dsi":
    pixels = np.concatenate([old.pixels, load_pixels(new, spec.image_size, show_progress)])
    views = image_query_views(pixels, new_rows, held, config.views, config.seed)
    old_views = image_views(pixels, replay, config.seed + 4000)
    views.train = np.concatenate([views.train, old_views])
    views.train_rel += list(replay)
    data = retrieval_data(pixels, views, inputs_lib.image_inputs)
  else:
    doc_ids = token_ids(tokenizer, record["texts"])
    known = [token_ids(tokenizer, q) for q in record["queries"]]
    views = text_query_views(
      doc_ids, known, new_rows, held, config.views, config.seed, spec.text_length
    )
    rng = np.random.default_rng(config.seed + 4000)
    old_views = [spans(doc_ids[r], 1, rng)[0] for r in replay]
    if old_views:
      views.train = np.concatenate(
        [views.train, inputs_lib.token_rows(old_views, spec.text_length)]
      )
    views.train_rel += list(replay)
    data = retrieval_data(inputs_lib.token_rows(doc_ids, spec.text_length), views, lambda x: x)
  steps = config.steps or default_steps(n_new)
  _say(
    f"adding {n_new} {new.kind} to {n_old}: up to {steps} steps of continual training",
    show_progress,
  )
  raw_index = data.index_inputs
  data = _encode(old.run.model, spec, data, show_progress)  # the same frozen tower
  embeddings = np.concatenate(
    [embeddings, item_embeddings(data.index_inputs[n_old:], raw_index[n_old:])]
  )
  try:
    docids = docids_lib.extend_ids(
      old.run.model.docids,
      new.keys,
      embeddings=embeddings[n_old:],
      old_embeddings=embeddings[:n_old],
      seed=config.seed,
    )
  except ValueError as e:
    raise errors.UserError(f"{old.path}: {e}; build the index again") from None
  model, _ = runs.build_model(spec, docids)
  params = old.run.params  # the ids' vocabulary is the same, except for atomic ids
  if docids.scheme == "atomic":
    params = grown_params(
      old.run.model, model, old.run.params, data.train_inputs, views.train_rel, n_old
    )
  tconf = train_config(steps, config, index=False)
  result = train_lib.train_dsi(
    model,
    data,
    config=tconf,
    workdir=workdir,
    spec=spec,
    show_progress=show_progress,
    init_params=params,
  )
  return _summary(result), record, pixels, embeddings


def _say(message: str, show_progress: bool) -> None:
  if show_progress:
    print(message, file=sys.stderr)


def _encode(model, spec: runs.ModelSpec, data: batches.RetrievalData, show_progress: bool):
  if model.input_encoder is None:
    return data
  name = json.dumps({"factory": spec.factory, **spec.kwargs}, sort_keys=True)
  return batches.encode_data(data, model.input_encoder, encoder=name, show_progress=show_progress)


# ----------------------------------------------------------------------------- new atomic ids


def decoder_states(model, params, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """`[n, width]`: the decoder's last hidden state (before the output layer) at the first id
  position, for each row of network inputs: what an atomic id's output row is scored against."""

  @jax.jit
  def states(x):
    tokens = jnp.zeros((x.shape[0], 1), jnp.int32)
    _, inter = model.network.apply(
      {"params": params},
      x,
      tokens,
      capture_intermediates=lambda module, _: module.name == "decoder_norm",
      mutable=["intermediates"],
    )
    (out,) = inter["intermediates"]["decoder"]["decoder_norm"]["__call__"]
    return out.reshape(x.shape[0], -1)

  return np.concatenate(
    [
      np.asarray(states(jnp.asarray(inputs[i : i + batch_size])))
      for i in range(0, len(inputs), batch_size)
    ]
  )


def grown_params(old_model, model, old_params, views, rel: list[int], n_old: int):
  """The old parameters with the output layer and the id embeddings grown to the new ids.

  `views` are training inputs (network inputs) and `rel` the item row of each; every new item
  (rows from `n_old` on) needs at least one. A new item's output row starts
  along the mean (unit) decoder state of its views, at the old rows' median norm, with the
  old biases' median: the old model already ranks it among its nearest items."""
  params = jax.tree_util.tree_map(np.asarray, old_params)
  dec = dict(params["decoder"])
  kernel, bias = dec["logits"]["kernel"], dec["logits"]["bias"]
  embed = dec["token_embedder"]["embedding"]
  vocab = model.docids.vocab_size
  n_new = vocab - kernel.shape[1]
  rel = np.asarray(rel)
  mine = rel >= n_old
  if set(rel[mine] - n_old) != set(range(n_new)):
    raise ValueError("every new item needs a training view")
  h = decoder_states(old_model, old_params, views[mine])
  h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-6)
  direction = np.zeros((n_new, h.shape[1]), np.float64)
  np.add.at(direction, rel[mine] - n_old, h)
  direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-6)
  old_cols = kernel[:, docids_lib.NUM_SPECIAL : docids_lib.NUM_SPECIAL + n_old]
  scale = float(np.median(np.linalg.norm(old_cols, axis=0)))
  b = float(np.median(bias[docids_lib.NUM_SPECIAL : docids_lib.NUM_SPECIAL + n_old]))
  dec["logits"] = {
    "kernel": np.concatenate([kernel, (scale * direction).T.astype(kernel.dtype)], axis=1),
    "bias": np.concatenate([bias, np.full(n_new, b, bias.dtype)]),
  }
  mean_row = embed[docids_lib.NUM_SPECIAL :].mean(axis=0, keepdims=True)
  dec["token_embedder"] = {
    "embedding": np.concatenate([embed, np.repeat(mean_row, n_new, axis=0)]).astype(embed.dtype)
  }
  return {**params, "decoder": dec}
