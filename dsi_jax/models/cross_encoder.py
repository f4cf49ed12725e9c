"""Cross-encoders: one BERT over a (query ; item) pair with a relevance head, the re-rankers of
"Retrieve Fast, Rerank Smart" (Geigle et al., TACL 2022).

`CrossEncoder` reads `[CLS] query [SEP] item [SEP]` word pieces (token types 0 / 1, as BERT
pairs are built) and, for caption-image pairs, the item's image tokens after them: features of
a frozen image tower (e.g. DINOv2 patch tokens, pooled to a small grid), projected to the
text width, with learned positions, appended to the word pieces and read by the same
transformer. A relevance head (one linear unit on the first token's output) gives the logit of
"this item is relevant to this query", trained with binary cross-entropy.

The same network is the joint model: `embed` mean-pools its output over one input alone (the
bi-encoder side, trained with InfoNCE), `__call__` scores a pair (the cross-encoder side).

Parameter tree (the top two entries are exactly `BertEncoder`'s, so all-MiniLM-L6-v2 loads
into them unchanged; `with_pretrained` does it):
  embeddings/...            word, position and token-type embeddings, LayerNorm
  Transformer/...           the BERT blocks
  head/kernel, head/bias    [hidden, 1], [1]
  image_projection/...      [image_dim, hidden] (+ bias), only with image_dim
  image_positions           [max_image_tokens, hidden], only with image_dim
  image_norm/...            LayerNorm of the projected image tokens, only with image_dim
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsi_jax.losses import l2_normalize, mean_pool
from dsi_jax.models.text import BertConfig, BertEmbeddings, BertTransformer

PRETRAINED_SUBTREES = ("embeddings", "Transformer")


class CrossEncoder(nn.Module):
  """BERT over a pair (and optionally image tokens), a relevance logit per pair.

  Attributes:
    config: the BERT config (all-MiniLM-L6-v2's for the borrowed weights).
    image_dim: width of the image features appended after the word pieces; None for text.
    max_image_tokens: the most image tokens a pair may carry (learned positions).
    dtype: computation dtype.
  """

  config: BertConfig = BertConfig()
  image_dim: int | None = None
  max_image_tokens: int = 64
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.embeddings = BertEmbeddings(cfg, self.dtype)
    self.Transformer = BertTransformer(cfg, self.dtype)
    self.head = nn.Dense(1, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02))
    if self.image_dim is not None:
      self.image_projection = nn.Dense(cfg.hidden, dtype=self.dtype)
      self.image_positions = self.param(
        "image_positions", nn.initializers.normal(0.02), (self.max_image_tokens, cfg.hidden)
      )
      self.image_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)

  def encode(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    image_features: jax.Array | None = None,
    *,
    train: bool = False,
  ) -> tuple[jax.Array, jax.Array]:
    """`(hidden [B, L (+ P), hidden], mask [B, L (+ P)])` of word pieces `[B, L]` and, for an
    image model, image features `[B, P, image_dim]` placed after them."""
    cfg = self.config
    if attention_mask is None:
      attention_mask = input_ids != cfg.pad_token_id
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, deterministic=not train)
    mask = attention_mask.astype(bool)
    if image_features is not None:
      if self.image_dim is None:
        raise ValueError("this cross-encoder has no image input (image_dim=None)")
      p = image_features.shape[1]
      if p > self.max_image_tokens:
        raise ValueError(f"{p} image tokens, more than max_image_tokens={self.max_image_tokens}")
      y = self.image_projection(image_features.astype(self.dtype)) + self.image_positions[:p]
      x = jnp.concatenate([x, self.image_norm(y)], axis=1)
      mask = jnp.concatenate([mask, jnp.ones(image_features.shape[:2], bool)], axis=1)
    elif self.image_dim is not None:
      raise ValueError("this cross-encoder reads image features (image_features=None)")
    hidden, _ = self.Transformer(x, mask, deterministic=not train)
    return hidden, mask

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    image_features: jax.Array | None = None,
    *,
    train: bool = False,
  ) -> jax.Array:
    """Relevance logits `[B]` float32 of the pairs (the first token's output, one unit)."""
    hidden, _ = self.encode(input_ids, attention_mask, token_type_ids, image_features, train=train)
    return self.head(hidden[:, 0])[:, 0].astype(jnp.float32)

  def embed(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False
  ) -> jax.Array:
    """Unit-norm embeddings `[B, hidden]` of single texts: the masked mean of the outputs, as
    the sentence-transformers MiniLM embeds (the joint model's bi-encoder side)."""
    if attention_mask is None:
      attention_mask = input_ids != self.config.pad_token_id
    hidden, mask = self.encode(input_ids, attention_mask, train=train)
    return l2_normalize(mean_pool(hidden, mask).astype(jnp.float32))


def with_pretrained(params: Mapping[str, Any], bert_params: Mapping[str, Any]) -> dict:
  """`params` with their `embeddings` and `Transformer` replaced by a `BertEncoder`'s (e.g.
  all-MiniLM-L6-v2's from `load_minilm`); the head and image layers keep their values.

  Raises:
    ValueError: a pretrained array's shape differs from the model's (another BERT size).
  """
  out = dict(params)
  for name in PRETRAINED_SUBTREES:
    mine = jax.tree_util.tree_flatten_with_path(params[name])[0]
    theirs = jax.tree_util.tree_flatten_with_path(bert_params[name])[0]
    if [(p, x.shape) for p, x in mine] != [(p, x.shape) for p, x in theirs]:
      raise ValueError(f"the pretrained {name!r} does not match the cross-encoder's config")
    out[name] = bert_params[name]
  return out
