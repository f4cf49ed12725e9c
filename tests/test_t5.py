"""The T5 path: t5x-layout encoder and decoder, T5-DSI end to end, SentencePiece vocabularies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsi_jax import batches, losses, partitioning
from dsi_jax import docids as docids_lib
from dsi_jax import train as train_lib
from dsi_jax.data import spm
from dsi_jax.models import dsi, t5

VOCAB = 40  # input tokens: 0 pad, 1 eos, then words
TINY = dict(width=32, depth=1, num_heads=2, head_dim=16, mlp_dim=64, dropout=0.0)


def make_test_model(num_docs: int = 16, **overrides) -> dsi.DSIModel:
  ids = docids_lib.random_ids([f"doc{i}" for i in range(num_docs)], num_codes=4, seed=0)
  return dsi.DSIModel(dsi.make_t5_dsi(ids, vocab_size=VOCAB, **{**TINY, **overrides}), ids)


def token_docs(n: int = 16, length: int = 12, seed: int = 0) -> np.ndarray:
  """`[n, length]` short random "documents": 4-9 words, eos, then padding."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int32)
  for i in range(n):
    k = int(rng.integers(4, 10))
    out[i, :k] = rng.integers(2, VOCAB, size=k)
    out[i, k] = 1
  return out


def paths(tree) -> dict[str, tuple[int, ...]]:
  return {
    partitioning.path_string(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope="module")
def tiny():
  """A tiny T5-DSI and fresh parameters, shared by the tests that only run it."""
  model = make_test_model()
  return model, model.init(jax.random.PRNGKey(1), (1, 12))


def test_parameter_tree_follows_the_t5x_layout():
  model = make_test_model(depth=2, decoder_depth=1)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), (1, 12)))
  got = paths(params)
  d, hk, v = 32, 32, model.docids.vocab_size
  expected = {
    "encoder/token_embedder/embedding": (VOCAB, d),
    "encoder/relpos_bias/rel_embedding": (2, 32),
    "encoder/layers_1/pre_attention_layer_norm/scale": (d,),
    "encoder/layers_1/attention/query/kernel": (d, hk),
    "encoder/layers_1/attention/value/kernel": (d, hk),
    "encoder/layers_1/attention/out/kernel": (hk, d),
    "encoder/layers_1/pre_mlp_layer_norm/scale": (d,),
    "encoder/layers_1/mlp/wi_0/kernel": (d, 64),
    "encoder/layers_1/mlp/wi_1/kernel": (d, 64),
    "encoder/layers_1/mlp/wo/kernel": (64, d),
    "encoder/encoder_norm/scale": (d,),
    "decoder/token_embedder/embedding": (v, d),
    "decoder/relpos_bias/rel_embedding": (2, 32),
    "decoder/layers_0/pre_self_attention_layer_norm/scale": (d,),
    "decoder/layers_0/self_attention/key/kernel": (d, hk),
    "decoder/layers_0/pre_cross_attention_layer_norm/scale": (d,),
    "decoder/layers_0/encoder_decoder_attention/query/kernel": (d, hk),
    "decoder/layers_0/encoder_decoder_attention/out/kernel": (hk, d),
    "decoder/layers_0/mlp/wo/kernel": (64, d),
    "decoder/decoder_norm/scale": (d,),
    "decoder/logits_dense/kernel": (d, v),
  }
  assert {k: got.get(k) for k in expected} == expected
  assert "decoder/layers_1/mlp/wo/kernel" not in got  # decoder_depth=1
  assert not [p for p in got if p.endswith("bias")]  # T5 has no biases
  assert len(got) == (2 + 2 * 9 + 1) + (2 + 14 + 2)  # encoder + decoder: nothing else
  axes = partitioning.logical_axes(params)  # every parameter is named (raises otherwise)
  assert axes["encoder"]["layers_0"]["attention"]["query"]["kernel"] == ("embed", "joined_kv")
  assert axes["decoder"]["relpos_bias"]["rel_embedding"] == ("heads", "relpos_buckets")


def test_relative_position_buckets_are_t5s():
  """32 buckets, max distance 128: exact buckets for near keys, log-spaced ones further away."""
  rel = jnp.asarray([0, -1, 1, -7, -8, -16, -20, -128, -1000, 5, 1000])  # key - query
  both = t5.relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
  causal = t5.relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(both, [0, 1, 17, 7, 8, 10, 10, 15, 15, 21, 31])
  np.testing.assert_array_equal(causal, [0, 1, 0, 7, 8, 16, 17, 31, 31, 0, 0])


def test_padding_does_not_change_the_encoding(tiny):
  model, params = tiny
  docs = token_docs(4, length=10)
  longer = np.pad(docs, ((0, 0), (0, 6)))
  encode = jax.jit(lambda x: model.network.apply({"params": params}, x, method="encode")[0])
  short, long = encode(docs), encode(longer)
  mask = np.asarray(short["mask"])
  np.testing.assert_allclose(
    np.asarray(long["encoded"])[:, :10][mask], short["encoded"][mask], atol=1e-5
  )
  # ... so neither do the ids' scores: the decoder never attends to the padding either.
  targets = model.docids.targets()[:4]
  np.testing.assert_allclose(
    model.score_batch(params, {"inputs": longer, "targets": targets}),
    model.score_batch(params, {"inputs": docs, "targets": targets}),
    atol=1e-4,
  )


def test_candidates_share_the_query_encoding(tiny):
  """`[batch, candidates, length]` ids give the logits of each id decoded on its own."""
  model, params = tiny
  apply = jax.jit(lambda x, t: model.network.apply({"params": params}, x, losses.shift_right(t)))
  docs = token_docs(3)
  targets = model.docids.targets()[:5]  # [5, length]
  together = apply(docs, np.broadcast_to(targets, (3, *targets.shape)))  # [3, 5, length, vocab]
  alone = apply(np.repeat(docs, 5, axis=0), np.tile(targets, (3, 1)))  # [15, length, vocab]
  np.testing.assert_allclose(together.reshape(alone.shape), alone, atol=1e-5)


def test_tiny_t5_dsi_memorises_16_documents():
  model = make_test_model()
  docs = token_docs(16)
  queries = token_docs(12, seed=1)
  rel = [np.array([i]) for i in range(4)]
  data = batches.RetrievalData(
    index_inputs=docs,
    train_inputs=queries[:4],
    train_relevant=rel,
    val_inputs=queries[4:8],
    val_relevant=rel,
    test_inputs=queries[8:],
    test_relevant=rel,
  )
  config = train_lib.TrainConfig(
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=10,
    index_target_accuracy=1.0,
    index_max_steps=400,
    index_eval_every=20,
    eval_batch_size=16,
    ia_beams=16,  # IA@k measured with a beam per id: the search below is compiled once
  )
  res = train_lib.train_dsi(model, data, config=config, finetune=False, show_progress=False)
  zs = res["zero_shot"]
  assert zs["test"]["ia@1"] == 1.0, zs["history"][-1]
  assert zs["steps"] < 400  # stopped by the accuracy target, not the cap
  params = res["zero_shot_params"]
  exact_items, exact_scores = model.rank(params, jnp.asarray(docs), 16, method="exact")
  np.testing.assert_array_equal(exact_items[:, 0], np.arange(16))
  # Constrained beam search with a beam per id prunes nothing: the exact ranking, one token
  # at a time through the decoder's cache.
  beam_items, beam_scores = model.rank(params, jnp.asarray(docs), 16, method="beam")
  np.testing.assert_array_equal(beam_items, exact_items)
  np.testing.assert_allclose(beam_scores, exact_scores, atol=1e-3)


# A few SQuAD-like paragraphs and questions (written for this test).
PARAGRAPHS = [
  "The Normans were the people who in the 10th and 11th centuries gave their name to "
  "Normandy, a region in France. They were descended from Norse raiders and pirates.",
  "Super Bowl 50 was an American football game to determine the champion of the National "
  "Football League for the 2015 season. The game was played on February 7, 2016.",
  "The Amazon rainforest covers most of the Amazon basin of South America. The basin covers "
  "seven million square kilometres, of which five and a half million are covered by forest.",
  "Oxygen is a chemical element with symbol O and atomic number 8. It is a member of the "
  "chalcogen group on the periodic table and is a highly reactive nonmetal.",
  "Computational complexity theory classifies computational problems according to their "
  "inherent difficulty, and relates those classes to each other.",
  "The Victoria and Albert Museum in London is the world's largest museum of decorative arts "
  "and design, housing a permanent collection of over 4.5 million objects.",
  "Steam engines are external combustion engines, where the working fluid is separate from "
  "the combustion products. Watt's engine used a separate condenser.",
  "Genghis Khan founded the Mongol Empire in 1206 and started the Mongol invasions that "
  "conquered most of Eurasia, reaching Europe and the Middle East.",
]
QUESTIONS = [
  "In what country is Normandy located?",
  "Which NFL team won Super Bowl 50?",
  "How many square kilometres does the Amazon basin cover?",
  "What is the atomic number of oxygen?",
]


def test_sentencepiece_trains_round_trips_and_is_deterministic(tmp_path):
  a = spm.train_sentencepiece(PARAGRAPHS, tmp_path / "a" / spm.SPM_FILE, vocab_size=400)
  b = spm.corpus_sentencepiece(tmp_path / "b", PARAGRAPHS, vocab_size=400)
  assert open(a, "rb").read() == open(b, "rb").read()
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [spm.SPM_FILE]  # no temp left
  sp = spm.load(a)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert 259 < sp.get_piece_size() <= 400
  for text in PARAGRAPHS + QUESTIONS + ["Qu'est-ce que c'est ? Ünïcode: 東京"]:
    ids = sp.encode(text)
    assert 2 not in ids and sp.decode(ids) == text  # byte fallback: nothing is unknown
  words = sp.encode("The Normans were the people", out_type=str)
  assert len(words) < len("The Normans were the people")  # pieces, not characters
  # An existing model is reused, not retrained.
  before = (tmp_path / "b" / spm.SPM_FILE).stat().st_mtime_ns
  spm.corpus_sentencepiece(tmp_path / "b", ["other text"], vocab_size=300)
  assert (tmp_path / "b" / spm.SPM_FILE).stat().st_mtime_ns == before
  with pytest.raises(ValueError, match="no text"):
    spm.train_sentencepiece(["", "  "], tmp_path / "c.model", vocab_size=400)


def test_sentencepiece_vocabulary_is_trained_on_first_use_by_the_tasks(tmp_path):
  import seqio

  from dsi_jax import tasks
  from dsi_jax.data import corpus as corpus_lib
  from dsi_jax.tasks import datasets

  keys = [f"p{i}" for i in range(len(PARAGRAPHS))]
  questions = [
    [(f"q{i}_{j}", f"{q} ({i}, {j})") for j, q in enumerate(QUESTIONS)] for i in range(8)
  ]
  corpus = corpus_lib.qa_corpus(keys, questions)
  data = tasks.CorpusData(corpus, corpus.make_docids("random"), texts=dict(zip(keys, PARAGRAPHS)))
  folder = tmp_path / "corpus"
  vocab = datasets.sentencepiece_vocabulary(
    lambda: data, lambda: str(folder), "test_t5_spm", vocab_size=400
  )
  tasks.register_dsi_tasks("test_t5_spm", data, modality="text", text_vocabulary=vocab)
  assert not folder.exists()  # registering trains nothing
  arrays, _ = tasks.retrieval_data("test_t5_spm", text_length=48)
  assert (folder / spm.SPM_FILE).is_file()
  features = seqio.get_mixture_or_task("test_t5_spm_indexing").output_features
  assert features["inputs"].vocabulary.eos_id == 1
  row = arrays.test_inputs[0]
  n = int(np.argmax(row == 1))  # eos, then padding
  assert n > 0 and not row[n + 1 :].any()
  assert vocab.decode(row[:n].tolist()) == corpus.split("test")[0].text
  with pytest.raises(ValueError, match="needs a corpus of texts"):
    datasets.register("fmnist", num_items=8, scheme="random", tokenizer="sentencepiece")
