"""Training the re-rankers: hard negatives mined from first-stage retrievers, binary
cross-entropy for a cross-encoder, and the joint model's two losses in one loop.

Hard negatives (`mine_negatives`) come from the rankings of one or more retrievers (BM25, the
dual encoder, DSI) of the *training* queries: a source's top-ranked items that are not
relevant to the query, a configurable count from each. A batch (`train_cross_encoder`) holds
`queries_per_batch` training queries, each paired with its relevant item (label 1) and
`negatives_per_query` of its hard negatives (label 0; random non-relevant items when a query
has too few), scored by the cross-encoder and trained with binary cross-entropy.

The joint model (Geigle et al.'s "joint" setting) adds, in the same step, the bi-encoder
loss on the same network's single-input embeddings (`CrossEncoder.embed`): InfoNCE of each
query against the relevant items of the batch and its first hard negative, at a fixed scale
(`joint_scale`, 20 as sentence-transformers' MultipleNegativesRankingLoss). The loss is
`bce + joint_weight * infonce`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dsi_jax import optim, partitioning
from dsi_jax import train as train_lib
from dsi_jax.models.cross_encoder import PRETRAINED_SUBTREES

JOINT_SCALE = 20.0


def mine_negatives(
  rankings: Mapping[str, Sequence[Sequence[str]]],
  relevant: Sequence[Collection[str]],
  counts: Mapping[str, int],
) -> list[list[str]]:
  """Per query, its hard negatives from several retrievers' rankings, without repeats.

  Args:
    rankings: source name -> per query, that retriever's ranked keys (of training queries).
    relevant: per query, the relevant keys (never returned as negatives).
    counts: source name -> how many negatives to take from it (its top-ranked non-relevant
      items not already taken from an earlier source), in the order of `counts`.

  Raises:
    ValueError: a source without a ranking, or rankings of another number of queries.
  """
  for name in counts:
    if name not in rankings:
      raise ValueError(f"no ranking for negative source {name!r}; have {sorted(rankings)}")
    if len(rankings[name]) != len(relevant):
      raise ValueError(
        f"{name!r} ranked {len(rankings[name])} queries but there are {len(relevant)}"
      )
  out = []
  for q, rel in enumerate(relevant):
    taken: list[str] = []
    for name, count in counts.items():
      fresh = [key for key in rankings[name][q] if key not in rel and key not in taken]
      taken.extend(fresh[:count])
    out.append(taken)
  return out


def batch_groups(
  positives: Sequence[str],
  negatives: Sequence[Sequence[str]],
  keys: Sequence[str],
  relevant: Sequence[Collection[str]],
  *,
  queries_per_batch: int,
  negatives_per_query: int,
  step: int,
  seed: int,
) -> tuple[np.ndarray, list[list[str]]]:
  """Batch `step`: the query rows (a seeded permutation, epoch by epoch) and, per row, its
  positive followed by `negatives_per_query` negatives (its hard negatives first, then random
  non-relevant keys drawn with the batch's own seed)."""
  from dsi_jax.batches import epoch_indices

  rows = epoch_indices(len(positives), queries_per_batch, step, seed)
  rng = np.random.default_rng([seed, step])
  groups = []
  for row in rows:
    group = [positives[row], *list(negatives[row])[:negatives_per_query]]
    while len(group) < 1 + negatives_per_query:
      key = keys[int(rng.integers(len(keys)))]
      if key not in relevant[row] and key not in group:
        group.append(key)
    groups.append(group)
  return rows, groups


def train_cross_encoder(
  model,
  params,
  make_inputs: Callable[[list[tuple[str, str]]], dict[str, np.ndarray]],
  queries: Sequence[str],
  relevant: Sequence[Collection[str]],
  negatives: Sequence[Sequence[str]],
  keys: Sequence[str],
  *,
  steps: int,
  queries_per_batch: int = 8,
  negatives_per_query: int = 3,
  learning_rate: float = 2e-4,
  pretrained_lr_multiplier: float = 0.25,
  warmup_steps: int | None = None,
  weight_decay: float = 0.01,
  seed: int = 0,
  joint_weight: float = 0.0,
  embed_inputs: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None,
  item_texts: Mapping[str, str] | None = None,
  show_progress: bool = True,
) -> tuple[Any, list[dict[str, float]]]:
  """Trains a `CrossEncoder` with BCE on (query, item) pairs, and for the joint model also
  with InfoNCE on its embeddings.

  Args:
    model, params: the network (`models.cross_encoder.CrossEncoder`) and its starting
      parameters (e.g. MiniLM's under a fresh head); they are not modified.
    make_inputs: (query text, item key) pairs -> the network's inputs
      (`rerank.CrossEncoderScorer.pair_inputs`).
    queries: the training queries (texts); never validation or test queries.
    relevant: per query, its relevant keys (the first is its positive).
    negatives: per query, its hard negatives (`mine_negatives`).
    keys: every indexed key (random negatives are drawn from them).
    steps: number of updates.
    queries_per_batch, negatives_per_query: a batch has `queries_per_batch * (1 +
      negatives_per_query)` pairs.
    learning_rate: AdamW's rate for the fresh layers (head, image projection); the pretrained
      `embeddings` and `Transformer` train at `pretrained_lr_multiplier` times it.
    joint_weight: > 0 trains the joint model: `bce + joint_weight * infonce`; needs
      `embed_inputs` (texts -> `(ids, mask)`) and `item_texts`.
    show_progress: a tqdm bar with the running losses.

  Returns:
    `(params, history)`: the trained parameters and each step's losses.
  """
  n = len(queries)
  if not (n == len(relevant) == len(negatives)):
    raise ValueError(f"{n} queries, {len(relevant)} relevance sets, {len(negatives)} negatives")
  if not 1 <= queries_per_batch <= n:
    raise ValueError(f"queries_per_batch must be in [1, {n}], got {queries_per_batch}")
  if joint_weight > 0 and (embed_inputs is None or item_texts is None):
    raise ValueError("the joint model (joint_weight > 0) needs embed_inputs and item_texts")
  positives = [sorted(r)[0] for r in relevant]
  group = 1 + negatives_per_query
  labels = np.tile(np.eye(1, group, dtype=np.float32)[0], queries_per_batch)
  tx = optim.make_optimizer(
    learning_rate,
    warmup_steps=min(100, steps // 10) if warmup_steps is None else warmup_steps,
    weight_decay=weight_decay,
    decay_matrices_only=True,
    lr_multipliers=tuple((name, pretrained_lr_multiplier) for name in PRETRAINED_SUBTREES),
  )

  def loss_fn(params, batch, rng):
    variables = {"params": params}
    logits = model.apply(variables, **batch["pairs"], train=True, rngs={"dropout": rng})
    bce = optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()
    aux = {"bce": bce}
    loss = bce
    if joint_weight > 0:
      embed = dict(train=True, method="embed", rngs={"dropout": rng})
      q = model.apply(variables, *batch["query"], **embed)
      d = model.apply(variables, *batch["items"], **embed)
      sim = JOINT_SCALE * q @ d.T  # items: the batch's positives, then first hard negatives
      target = jnp.arange(q.shape[0])
      nce = optax.softmax_cross_entropy_with_integer_labels(sim, target).mean()
      aux["infonce"] = nce
      loss = bce + joint_weight * nce
    return loss, aux

  mesh = partitioning.make_mesh(devices=jax.local_devices()[:1])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = train_lib.TrainState.create(apply_fn=None, params=dict(params), tx=tx)
  shardings = jax.tree.map(lambda _: replicated, state)
  state = jax.device_put(state, shardings)
  train_step = train_lib.make_train_step(loss_fn, shardings, mesh)
  rng = jax.random.PRNGKey(seed)
  history: list[dict] = []
  bar = tqdm(range(steps), desc="cross-encoder", leave=False, disable=not show_progress)
  for step in bar:
    rows, groups = batch_groups(
      positives,
      negatives,
      keys,
      relevant,
      queries_per_batch=queries_per_batch,
      negatives_per_query=negatives_per_query,
      step=step,
      seed=seed,
    )
    pairs = [(queries[r], key) for r, g in zip(rows, groups) for key in g]
    batch = {"pairs": make_inputs(pairs), "labels": labels}
    if joint_weight > 0:
      batch["query"] = embed_inputs([queries[r] for r in rows])
      items = [g[0] for g in groups] + [g[1] for g in groups]  # positives, first negatives
      batch["items"] = embed_inputs([item_texts[key] for key in items])
    with partitioning.axis_rules(mesh):
      state, aux = train_step(state, batch, rng)
    history.append(aux)
    if show_progress and (step + 1) % 10 == 0:
      bar.set_postfix({k: f"{float(v):.3f}" for k, v in aux.items()})
  bar.close()
  return state.params, [{k: float(v) for k, v in h.items()} for h in jax.device_get(history)]


def embed_inputs_fn(
  tokenizer, max_length: int
) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]]:
  """Texts -> `(ids, mask)` for `CrossEncoder.embed`, padded to a multiple of 32."""
  from dsi_jax.models import text

  def fn(texts: list[str]):
    return text.tokenize(tokenizer, texts, max_length, 32)

  return fn
