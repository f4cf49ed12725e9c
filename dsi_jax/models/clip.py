"""CLIP's text and image towers in Flax Linen, loading OpenAI / Hugging Face CLIP checkpoints.

The towers compute what transformers' `CLIPModel` computes (Radford et al. 2021): pre-LN
transformers with quick_gelu (or the config's `hidden_act`), a causal text encoder pooled at the
end-of-text token, an image encoder pooled at its class token, bias-free projections to a shared
space, L2 normalisation and a learned temperature `logit_scale`.

Why the image tower is not `dsi_jax.models.vit.ViT`: CLIP differs from the big_vision ViT in
six places (a patch projection without bias, a class token that takes a position embedding of
its own, a LayerNorm before the blocks, LayerNorm epsilon 1e-5 with torch's two-pass variance,
quick_gelu, and for text a causal mask). Six fields that only CLIP would set would make the
seed ViT harder to read and to keep equal to big_vision's, so CLIP has its own blocks here,
with the ViT's parameter names wherever the two agree.

Parameter tree (`params_from_hf_clip` maps the Hugging Face names onto it):
  text/token_embedding/embedding [vocab, hidden], text/position_embedding/embedding
                                                  [max_positions, hidden]
  text/Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,
                                    out}, LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
  text/Transformer/encoder_norm                   HF final_layer_norm
  vision/embedding/kernel [patch, patch, channels, hidden]  (no bias)
  vision/class_embedding [hidden], vision/pos_embedding [1, 1 + patches, hidden]
  vision/pre_norm                                 HF pre_layrnorm
  vision/Transformer/encoderblock_{i}/...         as for text
  vision/Transformer/encoder_norm                 HF post_layernorm (applied to every token;
                                                  HF applies it to the class token only)
  text_projection/kernel [hidden, dim], visual_projection/kernel [hidden, dim], logit_scale []
Attention kernels are `[hidden, heads, head_dim]` (`out`: `[heads, head_dim, hidden]`).

Each tower maps its inputs to `(tokens [B, L, hidden], aux)`, the contract of the project's other
encoders; `aux["pooled"]` is transformers' `pooler_output`.
`load_clip(folder)` reads a folder with `model.safetensors` and `config.json`, e.g. a download
of openai/clip-vit-base-patch32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsi_jax.losses import l2_normalize

# `_layer_norm` reads only `cfg.layer_norm_eps`, which both tower configs have.
from dsi_jax.models.text import (
  CONFIG_FILE,
  WEIGHTS_FILE,
  _layer_norm,
  _need,
  _one_line,
  load_hf_weights,
)

# CLIPImageProcessor's normalisation of RGB pixels in [0, 1].
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


# Hugging Face `hidden_act` names (transformers' ACT2FN) -> functions.
ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": functools.partial(nn.gelu, approximate=False),
  "gelu_new": functools.partial(nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
}


def _check_tower(cfg: ClipTextConfig | ClipVisionConfig) -> None:
  if cfg.hidden % cfg.heads:
    raise ValueError(f"hidden size {cfg.hidden} is not a multiple of heads {cfg.heads}")
  if cfg.hidden_act not in ACTIVATIONS:
    raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported: one of {list(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """Sizes of CLIP's text transformer; the defaults are transformers' (ViT-B/32's text tower)."""

  vocab_size: int = 49408
  hidden: int = 512
  layers: int = 12
  heads: int = 8
  intermediate: int = 2048
  max_positions: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407  # 2 in configs from before transformers PR #24773; see eos_positions

  def __post_init__(self):
    _check_tower(self)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """Sizes of CLIP's image transformer; the defaults are transformers' (ViT-B/32)."""

  hidden: int = 768
  layers: int = 12
  heads: int = 12
  intermediate: int = 3072
  image_size: int = 224
  patch_size: int = 32
  channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _check_tower(self)
    if self.image_size % self.patch_size:
      raise ValueError(f"image size {self.image_size} is not a multiple of {self.patch_size}")


# Hugging Face config names -> our field names.
_HF_TEXT_FIELDS = {
  "vocab_size": "vocab_size",
  "hidden_size": "hidden",
  "num_hidden_layers": "layers",
  "num_attention_heads": "heads",
  "intermediate_size": "intermediate",
  "max_position_embeddings": "max_positions",
  "hidden_act": "hidden_act",
  "layer_norm_eps": "layer_norm_eps",
  "eos_token_id": "eos_token_id",
}
_HF_VISION_FIELDS = {
  "hidden_size": "hidden",
  "num_hidden_layers": "layers",
  "num_attention_heads": "heads",
  "intermediate_size": "intermediate",
  "image_size": "image_size",
  "patch_size": "patch_size",
  "num_channels": "channels",
  "hidden_act": "hidden_act",
  "layer_norm_eps": "layer_norm_eps",
}


def _from_hf(cls: type, hf: Mapping[str, Any], names: Mapping[str, str]):
  """`cls` from a Hugging Face sub-config; absent or null entries keep the field's default."""
  defaults = cls()
  kwargs = {}
  for hf_name, name in names.items():
    if hf.get(hf_name) is not None:
      kind = type(getattr(defaults, name))
      if kind is not str and isinstance(hf[hf_name], (list, dict, str)):
        raise ValueError(f"{hf_name} is {hf[hf_name]!r}, expected a number")
      kwargs[name] = kind(hf[hf_name])
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Both towers' sizes, the shared embedding size and the initial temperature."""

  text: ClipTextConfig = ClipTextConfig()
  vision: ClipVisionConfig = ClipVisionConfig()
  projection_dim: int = 512
  logit_scale_init: float = 2.6592  # log(1 / 0.07)

  @classmethod
  def from_hf_dict(cls, cfg: Mapping[str, Any]) -> ClipConfig:
    """From a Hugging Face `CLIPConfig` dict; the legacy `*_config_dict` entries override
    `text_config` / `vision_config`, as transformers does. Raises ValueError on a bad entry."""

    def sub(name: str) -> dict:
      return {**(cfg.get(f"{name}_config") or {}), **(cfg.get(f"{name}_config_dict") or {})}

    return cls(
      text=_from_hf(ClipTextConfig, sub("text"), _HF_TEXT_FIELDS),
      vision=_from_hf(ClipVisionConfig, sub("vision"), _HF_VISION_FIELDS),
      projection_dim=int(cfg.get("projection_dim") or cls.projection_dim),
      logit_scale_init=float(cfg.get("logit_scale_init_value") or cls.logit_scale_init),
    )

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> ClipConfig:
    """Reads a Hugging Face CLIP `config.json`.

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: it is not a JSON object, or an entry is malformed or unsupported (the message
        names the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: CLIP config file not found")
    try:
      with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a readable JSON config ({_one_line(e)})") from None
    if not isinstance(cfg, dict):
      raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    try:
      return cls.from_hf_dict(cfg)
    except (TypeError, ValueError, AttributeError) as e:
      raise ValueError(f"{path}: {_one_line(e)}") from None


# ----------------------------------------------------------------------------- modules


class ClipMlpBlock(nn.Module):
  """Dense (intermediate) -> the config's activation -> Dense (hidden)."""

  config: ClipTextConfig | ClipVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, L, hidden]
    cfg = self.config
    x = nn.Dense(cfg.intermediate, dtype=self.dtype)(x)
    x = ACTIVATIONS[cfg.hidden_act](x)
    return nn.Dense(cfg.hidden, dtype=self.dtype)(x)


class ClipBlock(nn.Module):
  """A pre-LN layer: x + attention(LN(x)), then x + mlp(LN(x))."""

  config: ClipTextConfig | ClipVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):  # x [B, L, hidden], mask [B, 1, L, L] (True: attend)
    cfg = self.config
    y = _layer_norm(cfg, self.dtype, "LayerNorm_0")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=cfg.heads, dtype=self.dtype)(y, y, mask=mask)
    y = _layer_norm(cfg, self.dtype, "LayerNorm_1")(x)
    return x + ClipMlpBlock(cfg, self.dtype, name="MlpBlock_0")(y)


class ClipTransformer(nn.Module):
  """`config.layers` blocks, then a LayerNorm: returns `(x [B, L, hidden], per-block outputs)`."""

  config: ClipTextConfig | ClipVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    aux = {}
    for i in range(self.config.layers):
      x = ClipBlock(self.config, self.dtype, name=f"encoderblock_{i}")(x, mask)
      aux[f"block{i:02d}"] = x
    return _layer_norm(self.config, self.dtype, "encoder_norm")(x), aux


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """The position `[B]` whose features pool each text, as transformers' `CLIPTextModel` picks it.

  Configs from before transformers PR #24773 have `eos_token_id == 2`; for them the
  end-of-text token is the highest id of each row (true of OpenAI's tokenizer). Otherwise it is
  the first `eos_token_id` of the row (padding may repeat it); a row without one pools
  position 0.
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class ClipTextTower(nn.Module):
  """CLIP's causal text encoder: token ids `[B, L]` -> `(tokens [B, L, hidden], aux)`.

  `attention_mask` (1 for tokens, 0 for padding) additionally hides padded keys, as in
  transformers; without it (as OpenAI's CLIP runs) padding after the end-of-text token cannot
  reach the pooled features anyway. aux holds "stem", "block{i:02d}", "encoded" and "pooled"
  `[B, hidden]`, the features at `eos_positions`.
  """

  config: ClipTextConfig = ClipTextConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, *, train: bool = False):
    del train  # CLIP has no dropout.
    cfg = self.config
    length = input_ids.shape[1]
    if length > cfg.max_positions:
      raise ValueError(f"sequence length {length} exceeds max_positions {cfg.max_positions}")

    def embed(name, num, ids):
      init = nn.initializers.normal(stddev=0.02)
      return nn.Embed(num, cfg.hidden, embedding_init=init, dtype=self.dtype, name=name)(ids)

    x = embed("token_embedding", cfg.vocab_size, input_ids)
    x = x + embed("position_embedding", cfg.max_positions, jnp.arange(length)[None])
    mask = nn.make_causal_mask(input_ids)  # [B, 1, L, L]
    if attention_mask is not None:
      mask = nn.combine_masks(mask, attention_mask.astype(bool)[:, None, None, :])
    aux = {"stem": x}
    x, blocks = ClipTransformer(cfg, self.dtype, name="Transformer")(x, mask)
    aux.update(blocks)
    aux["encoded"] = x
    aux["pooled"] = x[jnp.arange(x.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
    return x, aux


class ClipVisionTower(nn.Module):
  """CLIP's image encoder: images `[B, size, size, channels]` -> `(tokens [B, 1 + patches,
  hidden], aux)`; token 0 is the class token, `aux["pooled"]` its features `[B, hidden]`.

  Images are normalised as CLIPImageProcessor makes them (see `normalize_images`).
  """

  config: ClipVisionConfig = ClipVisionConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # CLIP has no dropout.
    cfg = self.config
    if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(
        f"images of shape {images.shape[1:]}: expected [batch, {cfg.image_size}, "
        f"{cfg.image_size}, {cfg.channels}]"
      )
    p = cfg.patch_size
    x = nn.Conv(
      cfg.hidden,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      name="embedding",
    )(images)
    n, h, w, c = x.shape
    init = nn.initializers.normal(stddev=0.02)
    cls = self.param("class_embedding", init, (c,)).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c)), x.reshape(n, h * w, c)], axis=1)
    x = x + self.param("pos_embedding", init, (1, 1 + h * w, c)).astype(x.dtype)
    x = _layer_norm(cfg, self.dtype, "pre_norm")(x)
    aux = {"stem": x}
    x, blocks = ClipTransformer(cfg, self.dtype, name="Transformer")(x)
    aux.update(blocks)
    aux["encoded"] = x
    aux["pooled"] = x[:, 0]
    return x, aux


class CLIP(nn.Module):
  """Both towers, their projections and the temperature.

  `text_features` / `image_features` are transformers' `get_text_features` /
  `get_image_features` (projected pooled features, `[B, projection_dim]`); `embed_text` /
  `embed_images` L2-normalise them; `__call__` gives `logits_per_text [texts, images]`
  (`exp(logit_scale)` times the cosine similarities) and the two embeddings in aux.
  """

  config: ClipConfig = ClipConfig()
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.text = ClipTextTower(cfg.text, self.dtype)
    self.vision = ClipVisionTower(cfg.vision, self.dtype)
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init), ())

  def text_features(self, input_ids, attention_mask=None):
    _, aux = self.text(input_ids, attention_mask)
    return self.text_projection(aux["pooled"])

  def image_features(self, images):
    _, aux = self.vision(images)
    return self.visual_projection(aux["pooled"])

  def embed_text(self, input_ids, attention_mask=None):
    return l2_normalize(self.text_features(input_ids, attention_mask))

  def embed_images(self, images):
    return l2_normalize(self.image_features(images))

  def __call__(self, input_ids, images, attention_mask=None):
    text_embeds = self.embed_text(input_ids, attention_mask)
    image_embeds = self.embed_images(images)
    logits = jnp.exp(self.logit_scale) * text_embeds @ image_embeds.T
    return logits, {"text_embeds": text_embeds, "image_embeds": image_embeds}


def normalize_images(images: np.ndarray | jax.Array) -> jax.Array:
  """uint8 RGB `[..., 3]` -> float32 normalised as CLIPImageProcessor does (after its resize and
  centre crop, which `dsi_jax.data.images.preprocess_image` stands in for)."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)


# ----------------------------------------------------------------------------- HF weights


def params_from_hf_clip(state_dict: Mapping[str, np.ndarray], config: ClipConfig) -> dict:
  """Maps a Hugging Face `CLIPModel` state dict onto `CLIP`'s parameter tree.

  Args:
    state_dict: HF names -> arrays (torch layout: Linear weights `[out, in]`, the patch
      convolution `[hidden, channels, patch, patch]`). Buffers such as `position_ids` and
      tensors beyond `CLIPModel` are ignored.
    config: the model's sizes; every tensor's shape is checked against it.

  Returns:
    The `params` tree (numpy float32), for `CLIP(config).apply({"params": params}, ...)`.

  Raises:
    KeyError: a tensor the model needs is missing (named in the message).
    ValueError: a tensor has the wrong shape, or a tower has more layers than the config.
  """

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in state_dict:
      raise KeyError(f"missing tensor {name!r}")
    a = np.asarray(state_dict[name], dtype=np.float32)
    if a.shape != shape:
      raise ValueError(f"tensor {name!r} has shape {a.shape}, expected {shape}")
    return a

  def ln(name: str, h: int) -> dict:
    return {"scale": get(f"{name}.weight", (h,)), "bias": get(f"{name}.bias", (h,))}

  def dense(name: str, d_in: int, d_out: int) -> dict:
    return {"kernel": get(f"{name}.weight", (d_out, d_in)).T, "bias": get(f"{name}.bias", (d_out,))}

  def transformer(tower: str, cfg: ClipTextConfig | ClipVisionConfig, final_norm: str) -> dict:
    h, nh = cfg.hidden, cfg.heads
    dh = h // nh
    out: dict[str, Any] = {}
    for i in range(cfg.layers):
      p = f"{tower}.encoder.layers.{i}"
      attn = {}
      for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        d = dense(f"{p}.self_attn.{theirs}", h, h)
        attn[ours] = {"kernel": d["kernel"].reshape(h, nh, dh), "bias": d["bias"].reshape(nh, dh)}
      d = dense(f"{p}.self_attn.out_proj", h, h)
      attn["out"] = {"kernel": d["kernel"].reshape(nh, dh, h), "bias": d["bias"]}
      out[f"encoderblock_{i}"] = {
        "LayerNorm_0": ln(f"{p}.layer_norm1", h),
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": ln(f"{p}.layer_norm2", h),
        "MlpBlock_0": {
          "Dense_0": dense(f"{p}.mlp.fc1", h, cfg.intermediate),
          "Dense_1": dense(f"{p}.mlp.fc2", cfg.intermediate, h),
        },
      }
    if any(k.startswith(f"{tower}.encoder.layers.{cfg.layers}.") for k in state_dict):
      raise ValueError(f"{tower} has more than the config's {cfg.layers} layers")
    out["encoder_norm"] = ln(f"{tower}.{final_norm}", h)
    return out

  t, v = config.text, config.vision
  te, ve = "text_model.embeddings", "vision_model.embeddings"
  p = v.patch_size
  patches = (v.image_size // p) ** 2
  return {
    "text": {
      "token_embedding": {
        "embedding": get(f"{te}.token_embedding.weight", (t.vocab_size, t.hidden))
      },
      "position_embedding": {
        "embedding": get(f"{te}.position_embedding.weight", (t.max_positions, t.hidden))
      },
      "Transformer": transformer("text_model", t, "final_layer_norm"),
    },
    "vision": {
      "embedding": {
        "kernel": get(f"{ve}.patch_embedding.weight", (v.hidden, v.channels, p, p)).transpose(
          2, 3, 1, 0
        )
      },
      "class_embedding": get(f"{ve}.class_embedding", (v.hidden,)),
      "pos_embedding": get(f"{ve}.position_embedding.weight", (1 + patches, v.hidden))[None],
      "pre_norm": ln("vision_model.pre_layrnorm", v.hidden),
      "Transformer": transformer("vision_model", v, "post_layernorm"),
    },
    "text_projection": {
      "kernel": get("text_projection.weight", (config.projection_dim, t.hidden)).T
    },
    "visual_projection": {
      "kernel": get("visual_projection.weight", (config.projection_dim, v.hidden)).T
    },
    "logit_scale": get("logit_scale", ()),
  }


def load_clip(path: str | os.PathLike) -> tuple[CLIP, dict]:
  """Loads a Hugging Face CLIP folder (`model.safetensors` and `config.json`).

  Args:
    path: the folder, e.g. a download of openai/clip-vit-base-patch32.

  Returns:
    `(model, params)`: `model.apply({"params": params}, ids, images)` gives the logits,
    `method=CLIP.text_features` (`image_features`, `embed_text`, `embed_images`) the features.

  Raises:
    FileNotFoundError: the folder or a file is missing (the message names it).
    ValueError: a file is corrupt or does not match the config (the message names it).
  """
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: model folder not found")
  config = ClipConfig.from_json(_need(folder, CONFIG_FILE))
  weights_path = _need(folder, WEIGHTS_FILE)
  state_dict = load_hf_weights(weights_path)
  try:
    params = params_from_hf_clip(state_dict, config)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{weights_path}: {e.args[0]}") from None
  return CLIP(config), jax.tree.map(jnp.asarray, params)
