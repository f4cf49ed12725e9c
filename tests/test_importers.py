"""Checkpoint importers on tiny random models, with no real weights needed.

big_vision ViT `.npz` files load into `vit.ViT` name for name. Hugging Face CLIP folders load
into `clip.CLIP` and give what transformers' `CLIPModel` (torch, CPU) gives on the same
random weights; those tests skip when torch/transformers are absent.
"""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsi_jax.models import clip, vit
from dsi_jax.models.text import load_hf_weights

# ----------------------------------------------------------------------------- big_vision ViT


def make_vit(**overrides):
  kwargs = dict(
    patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, dropout=0.0, posemb="learn"
  )
  kwargs.update(overrides)
  return vit.ViT(**kwargs)


def init_vit(model, seed, size=16):
  return nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))["params"])


def flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def save_npz(path, arrays):
  """Writes flat '/'-joined keys, one array each, as big_vision's checkpoints do."""
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("prefix", ["", "params/"])
def test_vit_npz_round_trip(tmp_path, caplog, prefix):
  model = make_vit()
  saved = init_vit(model, seed=0)
  head = {"head/kernel": np.ones((32, 10), np.float32), "head/bias": np.zeros(10, np.float32)}
  arrays = {prefix + k: v for k, v in {**flat(saved), **head}.items()}
  path = save_npz(tmp_path / "vit.npz", arrays)
  template = init_vit(model, seed=1)
  assert not np.array_equal(template["pos_embedding"], saved["pos_embedding"])

  with caplog.at_level(logging.INFO, logger="dsi_jax.models.vit"):
    loaded = vit.load_vit_npz(path, template)
  assert "head/kernel" in caplog.text and "head/bias" in caplog.text
  assert jax.tree.structure(loaded) == jax.tree.structure(template)
  jax.tree.map(np.testing.assert_array_equal, loaded, saved)

  images = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
  out, _ = model.apply({"params": loaded}, images)
  ref, _ = model.apply({"params": saved}, images)
  np.testing.assert_array_equal(out, ref)


def test_vit_npz_takes_an_abstract_template(tmp_path):
  model = make_vit(posemb="sincos2d")
  saved = init_vit(model, seed=0)
  template = jax.eval_shape(lambda: init_vit(model, seed=1))
  loaded = vit.load_vit_npz(save_npz(tmp_path / "vit.npz", flat(saved)), template)
  jax.tree.map(np.testing.assert_array_equal, loaded, saved)


def test_vit_npz_errors_name_the_file_and_the_key(tmp_path):
  model = make_vit()
  template = init_vit(model, seed=1)
  good = flat(init_vit(model, seed=0))
  key = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"

  def fails(path, *needles):
    with pytest.raises(ValueError) as e:
      vit.load_vit_npz(path, template)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for needle in needles:
      assert needle in msg, msg

  wrong = {**good, key: np.zeros((32, 65), np.float32)}
  fails(save_npz(tmp_path / "shape.npz", wrong), repr(key), "(32, 65)", "(32, 64)")
  missing = {k: v for k, v in good.items() if k != key}
  fails(save_npz(tmp_path / "missing.npz", missing), "missing", repr(key))
  deeper = {**good, "Transformer/encoderblock_2/LayerNorm_0/scale": np.ones(32, np.float32)}
  fails(save_npz(tmp_path / "deeper.npz", deeper), "encoderblock_2")
  other_size = flat(init_vit(model, seed=0, size=32))  # 8x8 patches, the model has 4x4.
  fails(save_npz(tmp_path / "posemb.npz", other_size), "pos_embedding", "64 positions", "16 in")
  ints = {**good, key: np.zeros((32, 64), np.int32)}
  fails(save_npz(tmp_path / "ints.npz", ints), repr(key), "int32")

  (tmp_path / "notes.npz").write_text("not a checkpoint")
  fails(tmp_path / "notes.npz", "not a readable .npz")
  np.save(tmp_path / "array.npy", np.zeros(3))
  fails(tmp_path / "array.npy", "not a readable .npz", "single .npy array")
  np.savez(tmp_path / "pickled.npz", obj=np.array([{"a": 1}], dtype=object))
  fails(tmp_path / "pickled.npz", "not a readable .npz", "allow_pickle")
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    vit.load_vit_npz(tmp_path / "absent.npz", template)


# ----------------------------------------------------------------------------- CLIP

EOS = 49  # Mid-vocabulary, so that the legacy rule (highest id) would pick another token.
VOCAB = 99


def hf_clip_config(transformers, eos_token_id, hidden_act):
  return transformers.CLIPConfig(
    text_config=dict(
      vocab_size=VOCAB,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=37,
      max_position_embeddings=16,
      hidden_act=hidden_act,
      bos_token_id=0,
      pad_token_id=1,
      eos_token_id=eos_token_id,
    ),
    vision_config=dict(
      image_size=32,
      patch_size=8,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=37,
      hidden_act=hidden_act,
    ),
    projection_dim=16,
  )


@pytest.fixture(
  scope="module",
  params=[(EOS, "quick_gelu"), (2, "gelu")],
  ids=["eos_token-quick_gelu", "legacy_eos_2-gelu"],
)
def clip_pair(request, tmp_path_factory):
  """A random transformers CLIPModel, saved with save_pretrained and loaded by `load_clip`."""
  torch = pytest.importorskip("torch", reason="parity reference needs torch (test extra)")
  transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
  torch.manual_seed(0)
  ref = transformers.CLIPModel(hf_clip_config(transformers, *request.param)).eval()
  with torch.no_grad():  # HF's init zeroes biases and sets LayerNorms to identity: perturb all.
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("clip")
  ref.save_pretrained(folder)
  model, params = clip.load_clip(folder)
  return torch, ref, model, params, folder


def text_batch(eos_token_id):
  """ids `[4, 12]` ending in an end-of-text token at different places, and the padding mask."""
  eot = VOCAB - 1 if eos_token_id == 2 else eos_token_id  # legacy: the highest id.
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB - 1, size=(4, 12))
  ids[ids == eot] = eot + 1
  ends = np.array([11, 4, 7, 2])
  mask = (np.arange(12)[None] <= ends[:, None]).astype(np.int64)
  ids[np.arange(4), ends] = eot
  ids[1, 5:] = eot  # padding with the end-of-text token, as OpenAI's tokenizer pads,
  ids[2, 8:] = 1  # or with the pad id.
  assert (ids.argmax(1) != ends).any() or eos_token_id == 2
  return ids, mask


def pooled(out):
  # transformers 5 returns a model output whose pooler_output is projected; 4.x a tensor.
  return getattr(out, "pooler_output", out).numpy()


def max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_clip_params_match_the_module_tree(clip_pair):
  _, _, model, params, _ = clip_pair
  init = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32), jnp.zeros((1, 32, 32, 3))
    )
  )
  spec = jax.tree.map(lambda x: (x.shape, x.dtype), init["params"])
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == spec


def test_clip_text_features_match_transformers(clip_pair):
  torch, ref, model, params, _ = clip_pair
  ids, mask = text_batch(model.config.text.eos_token_id)
  variables = {"params": params}
  for m in (None, mask):
    t_ids, t_mask = torch.from_numpy(ids), None if m is None else torch.from_numpy(m)
    with torch.no_grad():
      feats_ref = pooled(ref.get_text_features(input_ids=t_ids, attention_mask=t_mask))
      hidden_ref = ref.text_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
    feats = model.apply(variables, ids, m, method=clip.CLIP.text_features)
    hidden, aux = model.apply(variables, ids, m, method=lambda c, i, a: c.text(i, a))
    emb = model.apply(variables, ids, m, method=clip.CLIP.embed_text)
    assert feats.shape == (4, 16) and hidden.shape == (4, 12, 32) and "block01" in aux
    assert max_diff(feats, feats_ref) <= 1e-4
    assert max_diff(hidden, hidden_ref.numpy()) <= 1e-4
    norm_ref = feats_ref / np.linalg.norm(feats_ref, axis=-1, keepdims=True)
    assert max_diff(emb, norm_ref) <= 1e-4


def test_clip_image_features_and_logits_match_transformers(clip_pair):
  torch, ref, model, params, _ = clip_pair
  pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
  images = pixels.transpose(0, 2, 3, 1)  # NCHW -> NHWC
  ids, mask = text_batch(model.config.text.eos_token_id)
  t_pixels = torch.from_numpy(pixels)
  with torch.no_grad():
    feats_ref = pooled(ref.get_image_features(pixel_values=t_pixels))
    vision = ref.vision_model
    tokens_ref = vision.post_layernorm(vision(pixel_values=t_pixels).last_hidden_state).numpy()
    out = ref(input_ids=torch.from_numpy(ids), pixel_values=t_pixels, attention_mask=None)
  variables = {"params": params}
  feats = model.apply(variables, images, method=clip.CLIP.image_features)
  tokens, aux = model.apply(variables, images, method=lambda c, x: c.vision(x))
  assert feats.shape == (3, 16) and tokens.shape == (3, 1 + 16, 32)
  assert max_diff(feats, feats_ref) <= 1e-4
  assert max_diff(tokens, tokens_ref) <= 1e-4
  np.testing.assert_array_equal(aux["pooled"], tokens[:, 0])

  logits, embeds = model.apply(variables, ids, images)
  assert logits.shape == (4, 3)
  assert max_diff(embeds["image_embeds"], out.image_embeds.numpy()) <= 1e-4
  assert max_diff(embeds["text_embeds"], out.text_embeds.numpy()) <= 1e-4
  assert max_diff(logits, out.logits_per_text.numpy()) <= 1e-4 * float(
    np.exp(params["logit_scale"])
  )


def test_clip_import_errors_name_the_tensor_and_file(clip_pair, tmp_path):
  _, _, model, _, folder = clip_pair
  state = load_hf_weights(str(folder / "model.safetensors"))
  name = "text_model.encoder.layers.1.self_attn.k_proj.weight"
  with pytest.raises(KeyError, match=name):
    clip.params_from_hf_clip({k: v for k, v in state.items() if k != name}, model.config)
  with pytest.raises(ValueError, match=rf"{name}.*\(32, 31\).*\(32, 32\)"):
    clip.params_from_hf_clip({**state, name: state[name][:, :31]}, model.config)
  extra = "vision_model.encoder.layers.2.mlp.fc1.bias"
  with pytest.raises(ValueError, match="more than the config's 2 layers"):
    clip.params_from_hf_clip({**state, extra: state[extra.replace(".2.", ".1.")]}, model.config)

  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
    clip.load_clip(tmp_path)
  from safetensors.numpy import save_file

  save_file({k: v for k, v in state.items() if k != name}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=rf"model\.safetensors: missing tensor '{name}'"):
    clip.load_clip(tmp_path)


def test_clip_config_from_hf_dict(tmp_path):
  cfg = clip.ClipConfig.from_hf_dict(
    {
      "projection_dim": 16,
      "text_config": {"hidden_size": 32, "num_attention_heads": 2, "eos_token_id": 2},
      "text_config_dict": {"hidden_size": 64},  # legacy entries win, as in transformers
      "vision_config": {"image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
      "vision_config_dict": None,
    }
  )
  assert cfg.text == clip.ClipTextConfig(hidden=64, heads=2, eos_token_id=2)
  assert cfg.vision == clip.ClipVisionConfig(image_size=32, patch_size=8, hidden_act="gelu")
  assert cfg.projection_dim == 16 and cfg.logit_scale_init == clip.ClipConfig.logit_scale_init

  bad = tmp_path / "config.json"
  bad.write_text(json.dumps({"vision_config": {"hidden_act": "relu"}}))
  with pytest.raises(ValueError, match=r"config\.json: hidden_act 'relu' is not supported"):
    clip.ClipConfig.from_json(bad)
  bad.write_text(json.dumps({"text_config": {"eos_token_id": [2, 3]}}))
  with pytest.raises(ValueError, match=r"config\.json: eos_token_id is \[2, 3\]"):
    clip.ClipConfig.from_json(bad)


def test_normalize_images():
  mean = np.round(np.asarray(clip.IMAGE_MEAN) * 255).astype(np.uint8)
  out = clip.normalize_images(np.broadcast_to(mean, (2, 4, 4, 3)))
  assert out.dtype == jnp.float32 and out.shape == (2, 4, 4, 3)
  assert float(jnp.abs(out).max()) < 0.01
