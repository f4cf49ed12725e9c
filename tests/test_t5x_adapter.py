"""The t5x adapter (`dsi_jax.t5x_models`) on tiny configs: it agrees with `DSIModel`.

t5x is not on PyPI; these tests skip where it is not installed (see the README's t5x section).
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from dsi_jax import docids as docids_lib
from dsi_jax import losses, partitioning
from dsi_jax.models import dsi
from dsi_jax.models import text as text_lib

pytest.importorskip("t5x", reason="t5x is not on PyPI: see the README's t5x section")

from t5x import optimizers  # noqa: E402
from t5x import train_state as t5x_train_state  # noqa: E402

from dsi_jax import t5x_models  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, dropout=0.0, decoder_depth=2)


def make_test_models(docids=None, *, extra_length=2, **overrides):
  """`(t5x model, DSIModel, params)` on the same tiny ViT-DSI network and parameters."""
  docids = docids or docids_lib.random_ids([f"k{i}" for i in range(30)], num_codes=4, seed=0)
  network = dsi.make_vit_dsi(docids, **{**TINY, **overrides})
  model = t5x_models.DSIT5XModel(network, docids, optimizers.OptaxWrapper(optax.adam(1e-3)))
  shapes = {
    "encoder_input_tokens": (2, 8, 8, 1),
    "decoder_input_tokens": (2, docids.max_length + extra_length),
  }
  variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes)
  # Random init gives near-uniform logits; sharpen them so rankings are not near-ties.
  params = jax.tree_util.tree_map(lambda x: x * 3.0, flax.core.unfreeze(variables["params"]))
  return model, dsi.DSIModel(network, docids), params


def t5x_batch(inputs, docids, keys, extra_length=2):
  """A t5x batch as `DSIFeatureConverter` emits it, with decoder features longer than the ids."""
  targets = np.pad(docids.targets(keys), ((0, 0), (0, extra_length)))
  return {
    "encoder_input_tokens": inputs,
    "decoder_target_tokens": jnp.asarray(targets),
    "decoder_input_tokens": losses.shift_right(jnp.asarray(targets)),
    "decoder_loss_weights": jnp.asarray(targets != 0, jnp.int32),
  }


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def predict(model, params, batch, num_beams, return_all_decodes=False):
  return model.predict_batch_with_aux(
    params, batch, num_decodes=num_beams, return_all_decodes=return_all_decodes
  )


def test_params_axes_mirror_the_params_and_make_a_t5x_train_state():
  model, _, _ = make_test_models()
  shapes = {"encoder_input_tokens": (4, 8, 8, 1), "decoder_input_tokens": (4, 8)}
  variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes)
  assert set(variables) == {"params", "params_axes"}
  params = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  axes = traverse_util.flatten_dict(flax.core.unfreeze(variables["params_axes"]))
  assert set(axes) == {(*k[:-1], f"{k[-1]}_axes") for k in params}
  names = traverse_util.flatten_dict(
    partitioning.logical_axes(flax.core.unfreeze(variables["params"])),
    is_leaf=lambda _, x: isinstance(x, tuple),
  )
  for key, value in params.items():
    meta = axes[(*key[:-1], f"{key[-1]}_axes")]
    assert isinstance(meta, flax.linen.partitioning.AxisMetadata)
    assert len(meta.names) == value.ndim
    assert meta.names == names[key]
  # t5x reads the collection when it builds a train state and its partitioning.
  state = t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)
  logical = traverse_util.flatten_dict(flax.core.unfreeze(state.as_logical_axes().params))
  assert logical[("decoder", "logits", "kernel")] == jax.sharding.PartitionSpec("embed", "vocab")


def test_loss_fn_matches_dsi_model():
  model, ref, params = make_test_models(dropout=0.1)
  dm = model.docids
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 1))
  keys = ["k1", "k5", "k7"]
  batch = t5x_batch(images, dm, keys)
  ref_batch = {"inputs": images, "targets": jnp.asarray(dm.targets(keys))}
  for rng in (None, jax.random.PRNGKey(3)):  # eval, then train with dropout
    loss, metrics = model.loss_fn(params, batch, rng)
    ref_loss, ref_aux = ref.loss_fn(params, ref_batch, rng)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(
      metrics["sequence_accuracy"].compute(), ref_aux["sequence_accuracy"], atol=1e-6
    )
    np.testing.assert_allclose(metrics["loss_per_nonpadding_target_token"].compute(), ref_loss)
  # The loss trains: a few steps on one batch drive it down.
  grad = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, None)[0]))
  before = float(model.loss_fn(params, batch, None)[0])
  for _ in range(5):
    params = jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grad(params))
  assert float(model.loss_fn(params, batch, None)[0]) < before


def test_score_batch_matches_dsi_model():
  model, ref, params = make_test_models()
  dm = model.docids
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 1))
  keys = ["k0", "k9", "k29"]
  scores = model.score_batch(params, t5x_batch(images, dm, keys))
  ref_scores = ref.score_batch(params, {"inputs": images, "targets": jnp.asarray(dm.targets(keys))})
  assert scores.shape == (3,)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def test_predict_ranks_every_id_as_the_dsi_model():
  model, ref, params = make_test_models()
  dm = model.docids
  n = len(dm)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 1))
  batch = t5x_batch(images, dm, ["k0"] * 3)
  tokens, aux = predict(model, params, batch, n, True)
  beam_items, beam_scores = ref.rank(params, images, n, method="beam", num_beams=n)
  exact_items, _ = ref.rank(params, images, n, method="exact")
  np.testing.assert_array_equal(aux["ranked_items"], beam_items)
  np.testing.assert_array_equal(aux["ranked_items"], exact_items)
  np.testing.assert_allclose(aux["ranked_scores"], beam_scores, atol=1e-4)
  # Tokens follow t5x's order (best last) and spell the ranked ids.
  assert tokens.shape == (3, n, dm.max_length + 2)
  best_first = np.asarray(tokens)[:, ::-1, : dm.max_length]
  for row, items in zip(best_first, beam_items):
    np.testing.assert_array_equal(row, dm.targets([dm.keys[i] for i in items]))
  np.testing.assert_allclose(aux["scores"], beam_scores[:, ::-1], atol=1e-4)
  # Without return_all_decodes: the best id and its score.
  top, top_aux = predict(model, params, batch, n)
  np.testing.assert_array_equal(top, np.asarray(tokens)[:, -1])
  np.testing.assert_allclose(top_aux["scores"], beam_scores[:, 0], atol=1e-4)


def test_fewer_beams_than_ids_return_valid_distinct_ids_with_exact_scores():
  model, ref, params = make_test_models()
  images = jax.random.uniform(jax.random.PRNGKey(2), (4, 8, 8, 1))
  _, aux = predict(model, params, t5x_batch(images, model.docids, ["k0"] * 4), 5)
  items, scores = np.asarray(aux["ranked_items"]), np.asarray(aux["ranked_scores"])
  assert items.shape == (4, 5)
  all_scores = np.asarray(ref.score_all(params, images))
  for row, row_scores, exact in zip(items, scores, all_scores):
    assert row.min() >= 0 and len(set(row.tolist())) == 5
    np.testing.assert_allclose(row_scores, exact[row], atol=1e-4)
    assert np.all(np.diff(row_scores) <= 0)


def test_more_beams_than_ids_pad_with_minus_one():
  dm = docids_lib.random_ids([f"k{i}" for i in range(6)], num_codes=3, seed=1)
  model, _, params = make_test_models(dm)
  images = jnp.zeros((2, 8, 8, 1))
  tokens, aux = predict(model, params, t5x_batch(images, dm, ["k0", "k1"]), 8, True)
  items = np.asarray(aux["ranked_items"])
  assert sorted(items[0, :6].tolist()) == list(range(6))
  assert np.all(items[:, 6:] == -1) and np.all(np.isneginf(aux["ranked_scores"][:, 6:]))
  assert np.all(np.asarray(tokens)[:, :2] == 0)  # t5x's order: the empty places come first


def test_ids_of_different_lengths_rank_as_the_dsi_model():
  dm = docids_lib.naive_ids([f"k{i}" for i in range(14)], num_codes=3)  # "0" ... "111"
  assert len({len(c) for c in dm.codes}) > 1
  model, ref, params = make_test_models(dm)
  images = jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, 1))
  _, aux = predict(model, params, t5x_batch(images, dm, ["k0", "k1"]), len(dm))
  items, scores = ref.rank(params, images, len(dm), method="exact")
  np.testing.assert_array_equal(aux["ranked_items"], items)
  np.testing.assert_allclose(aux["ranked_scores"], scores, atol=1e-4)


def test_text_inputs_mask_padding_and_rank_as_the_dsi_model():
  dm = docids_lib.random_ids([f"k{i}" for i in range(10)], num_codes=3, seed=2)
  config = text_lib.BertConfig(
    vocab_size=50, hidden=32, layers=1, heads=2, intermediate=64, max_positions=16, dropout=0.0
  )
  decoder = dsi.DocidDecoder(
    vocab_size=dm.vocab_size,
    max_length=dm.max_length,
    width=32,
    depth=1,
    mlp_dim=64,
    num_heads=2,
    dropout=0.0,
  )
  network = dsi.DSINetwork(text_lib.BertEncoder(config), decoder, pad_id=0)
  model = t5x_models.DSIT5XModel(network, dm, optimizers.OptaxWrapper(optax.adam(1e-3)))
  assert model.modality == "text"
  shapes = {"encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, dm.max_length)}
  types = {"encoder_input_tokens": jnp.int32}
  variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes, types)
  params = jax.tree_util.tree_map(lambda x: x * 3.0, flax.core.unfreeze(variables["params"]))
  tokens = jnp.asarray([[5, 9, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0], [7, 7, 2, 8, 4, 1, 0, 0, 0, 0, 0, 0]])
  ref = dsi.DSIModel(network, dm)
  _, aux = predict(model, params, t5x_batch(tokens, dm, ["k0", "k1"], extra_length=0), len(dm))
  items, scores = ref.rank(params, tokens, len(dm), method="exact")
  np.testing.assert_array_equal(aux["ranked_items"], items)
  np.testing.assert_allclose(aux["ranked_scores"], scores, atol=1e-4)
  # More padding does not change a query's ranking.
  longer = jnp.pad(tokens, ((0, 0), (0, 4)))
  _, longer_aux = predict(model, params, t5x_batch(longer, dm, ["k0", "k1"], extra_length=0), 10)
  np.testing.assert_allclose(longer_aux["ranked_scores"], aux["ranked_scores"], atol=1e-4)


def test_short_decoder_features_are_a_clear_error():
  model, _, _ = make_test_models()
  shapes = {"encoder_input_tokens": (2, 8, 8, 1), "decoder_input_tokens": (2, 2)}
  with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
    model.get_initial_variables(jax.random.PRNGKey(0), shapes)


def test_ranking_metrics_read_ranked_items():
  metrics = t5x_models.ranking_metrics(
    targets=[["3", "4"], ["1"]],
    predictions=["", ""],
    aux_values={"ranked_items": [np.array([4, 0, -1]), np.array([2, 1, -1])]},
  )
  assert metrics["hits@1"] == 0.5 and metrics["mrr@10"] == 0.75 and metrics["recall@10"] == 0.75


def test_dsi_jax_never_imports_t5x_and_the_adapter_says_how_to_install_it():
  script = textwrap.dedent(
    """
    import sys
    import dsi_jax, dsi_jax.tasks, dsi_jax.models.dsi
    assert not any(m == "t5x" or m.startswith("t5x.") for m in sys.modules), "t5x imported"
    sys.modules["t5x"] = None  # as if t5x were not installed
    try:
      import dsi_jax.t5x_models
    except ImportError as e:
      print("ImportError:", e)
    """
  )
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ImportError" in out.stdout and "git clone https://github.com/google-research/t5x" in (
    out.stdout
  )


TINY_TASKS = """
import numpy as np
from dsi_jax import tasks
from dsi_jax.data import corpus as corpus_lib

rng = np.random.default_rng(0)
keys = [f"img{i}" for i in range(40)]
images = {k: rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for k in keys}
corpus = corpus_lib.class_corpus(keys, np.arange(40) % 4, num_items=40)
ids = corpus.make_docids("random", num_codes=4)
tasks.register_dsi_tasks("t5x_test_tiny", tasks.CorpusData(corpus, ids, images=images))
"""

TINY_CORPUS_GIN = """
from __gin__ import dynamic_registration
import t5x_test_tasks
from dsi_jax import t5x_models as dsi_t5x

include 'gin_configs/t5x/models/vit_dsi_seed.gin'

CORPUS = 't5x_test_tiny'
RETRIEVAL_TASK = 't5x_test_tiny_retrieval'
TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 6}
NUM_BEAMS = 4
dsi_t5x.vit_network:
  width = 16
  depth = 1
  mlp_dim = 32
  num_heads = 2
  decoder_depth = 1
"""

TINY_TRAIN_GIN = """
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import utils

include 'gin_configs/t5x/runs/train.gin'
include 'tiny_corpus.gin'

TRAIN_STEPS = 4
BATCH_SIZE = 8
train_script.train:
  eval_period = 4
  eval_steps = 1
utils.SaveCheckpointConfig.period = 4
"""


@pytest.mark.slow
def test_t5x_train_eval_and_infer_run_on_a_tiny_corpus(tmp_path):
  """`python -m t5x.{train,eval,infer}` with the layered gin files, on a 40-image corpus."""
  (tmp_path / "t5x_test_tasks.py").write_text(TINY_TASKS)
  (tmp_path / "tiny_corpus.gin").write_text(TINY_CORPUS_GIN)
  (tmp_path / "tiny_train.gin").write_text(TINY_TRAIN_GIN)
  env = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
  }

  def run(module, *args):
    cmd = [sys.executable, "-m", module, f"--gin_search_paths={REPO},{tmp_path}", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    return out.stderr

  model_dir = tmp_path / "model"
  log = run("t5x.train", "--gin_file=tiny_train.gin", f"--gin.MODEL_DIR='{model_dir}'")
  assert "t5x_test_tiny_ranking/hits@1 at step 4" in log
  checkpoint = model_dir / "checkpoint_4"
  assert checkpoint.is_dir()

  log = run(
    "t5x.eval",
    "--gin_file=gin_configs/t5x/runs/eval.gin",
    "--gin_file=tiny_corpus.gin",
    f"--gin.CHECKPOINT_PATH='{checkpoint}'",
    f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
  )
  for name in t5x_models.RANKING_METRICS:
    assert f"t5x_test_tiny_ranking/{name} at step 4" in log

  run(
    "t5x.infer",
    "--gin_file=gin_configs/t5x/runs/infer.gin",
    "--gin_file=tiny_corpus.gin",
    f"--gin.CHECKPOINT_PATH='{checkpoint}'",
    f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'",
  )
  (path,) = (tmp_path / "infer").glob("t5x_test_tiny_retrieval-predict_with_aux.jsonl-*-of-*[0-9]")
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows
  for row in rows:
    ranked = row["aux"]["ranked_items"]
    assert len(ranked) == 4 and len(set(ranked)) == 4 and min(ranked) >= 0
    assert row["aux"]["ranked_scores"] == sorted(row["aux"]["ranked_scores"], reverse=True)
