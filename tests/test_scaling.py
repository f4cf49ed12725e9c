"""Training on a device mesh, preemption and cross-mesh restore, each in its own process.

The processes simulate 8 CPU devices (`--xla_force_host_platform_device_count=8`, set before
JAX is imported), so these run anywhere; the same code runs on GPUs and TPU slices.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsi_jax import partitioning

CHILD = os.path.join(os.path.dirname(__file__), "mesh_child.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(*args, wait=True, **kw):
  env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, CHILD, *map(str, args)]
  if not wait:
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def load(path):
  with np.load(path) as f:
    out = {k: f[k] for k in f.files}
  out["specs"] = json.loads(str(out["specs"])) if "specs" in out else None
  return out


def params(run):
  return {k: v for k, v in run.items() if k.startswith("param:")}


def test_param_axes_name_every_parameter_and_its_optimizer_state():
  import jax

  from dsi_jax import docids as docids_lib
  from dsi_jax import train as train_lib
  from dsi_jax.models import dsi

  ids = docids_lib.random_ids([f"k{i}" for i in range(10)], num_codes=4)
  model = dsi.DSIModel(dsi.make_vit_dsi(ids, width=32, depth=1, mlp_dim=64, num_heads=2), ids)
  config = train_lib.TrainConfig()
  state = train_lib.create_state(
    model, (1, 8, 8, 3), config, jax.random.PRNGKey(0), partitioning.make_mesh()
  )
  axes = partitioning.logical_axes(state)
  paths = [partitioning.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  flat = dict(zip(paths, jax.tree_util.tree_structure(state).flatten_up_to(axes)))
  q = "encoder/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
  assert flat[f"params/{q}"] == ("embed", "heads", "kv")
  # Adam's moments carry their parameter's path, hence its axes.
  moments = [a for p, a in flat.items() if p.endswith(q) and "opt_state" in p]
  assert moments == [("embed", "heads", "kv")] * 2
  with pytest.raises(ValueError, match="mystery/kernel.*no entry in PARAM_AXES"):
    partitioning.logical_axes({"mystery": {"kernel": np.zeros((2, 3))}})


def test_param_axes_cover_the_text_and_clip_towers():
  import jax
  import jax.numpy as jnp

  from dsi_jax.models import clip, text

  bert = text.BertEncoder(text.BertConfig(vocab_size=50, hidden=32, layers=1, heads=2))
  tokens = jnp.zeros((1, 4), jnp.int32)
  cfg = clip.ClipConfig(
    text=clip.ClipTextConfig(vocab_size=50, hidden=32, layers=1, heads=2, intermediate=64),
    vision=clip.ClipVisionConfig(
      hidden=32, layers=1, heads=2, intermediate=64, image_size=16, patch_size=8
    ),
    projection_dim=16,
  )
  images = jnp.zeros((1, 16, 16, 3))
  for module, args in ((bert, (tokens,)), (clip.CLIP(cfg), (tokens, images))):
    shapes = jax.eval_shape(lambda m=module, a=args: m.init(jax.random.PRNGKey(0), *a))
    axes = jax.tree_util.tree_leaves(
      partitioning.logical_axes(shapes["params"]), is_leaf=lambda x: isinstance(x, tuple)
    )
    assert axes and all(isinstance(a, tuple) for a in axes)


def test_mesh_shape_errors_are_one_line():
  with pytest.raises(ValueError, match="needs 8 devices, 1 are available"):
    partitioning.make_mesh(2, 2, 2)
  with pytest.raises(ValueError, match="at most one -1"):
    partitioning.make_mesh(-1, -1, 1)


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """The same 12 training steps on meshes (8,1,1), (2,2,2) and one device, 8 devices seen."""
  tmp = tmp_path_factory.mktemp("meshes")
  runs = {}
  for mesh in ("8,1,1", "2,2,2", "1,1,1"):
    out = tmp / f"{mesh.replace(',', '')}.npz"
    workdir = tmp / f"work{mesh.replace(',', '')}"
    child("--devices", 8, "--mesh", mesh, "--workdir", workdir, "--out", out)
    runs[mesh] = load(out)
    runs[mesh]["workdir"] = workdir
  return runs


def test_loss_agrees_across_meshes(mesh_runs):
  ref = mesh_runs["1,1,1"]["losses"]
  assert len(ref) == 12 and np.all(np.isfinite(ref))
  assert ref[-1] < ref[0]  # it trains
  for mesh in ("8,1,1", "2,2,2"):
    np.testing.assert_allclose(mesh_runs[mesh]["losses"], ref, rtol=1e-4, err_msg=mesh)
    for k, v in params(mesh_runs[mesh]).items():
      if k.endswith("key/bias"):  # softmax ignores it: a zero gradient that Adam turns to noise
        continue
      np.testing.assert_allclose(v, mesh_runs["1,1,1"][k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_parameters_are_sharded_as_the_rules_say(mesh_runs):
  specs = mesh_runs["2,2,2"]["specs"]
  mlp_in = "encoder/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"  # [32, 64]
  assert specs[mlp_in] == [str(P("fsdp", "model")), [16, 32]]
  query = "decoder/block_0/CrossAttention/query/kernel"  # [32, heads 2, 16]
  assert specs[query] == [str(P("fsdp", "model", None)), [16, 1, 16]]
  logits = "decoder/logits/kernel"  # [32, vocab 6]
  assert specs[logits] == [str(P("fsdp", "model")), [16, 3]]
  assert specs["encoder/embedding/kernel"][1] == [4, 4, 3, 16]  # embed split over fsdp
  # Data parallelism keeps every parameter whole on every device.
  for path, (spec, shard) in mesh_runs["8,1,1"]["specs"].items():
    assert shard == list(mesh_runs["8,1,1"][f"param:{path}"].shape), (path, spec)


def check_restores_in_one_process(run, tmp_path):
  """The run's indexing checkpoint, restored in a 1-device process, ranks as the run did."""
  out = tmp_path / "restored.npz"
  child("--restore", run["workdir"] / "checkpoints" / "zero_shot", "--out", out)
  restored = load(out)
  np.testing.assert_array_equal(restored["items"], run["items"])
  np.testing.assert_allclose(restored["scores"], run["scores"], rtol=1e-5, atol=1e-5)


def test_checkpoint_from_8_devices_restores_on_one_device(mesh_runs, tmp_path):
  check_restores_in_one_process(mesh_runs["2,2,2"], tmp_path)


def _finalized_steps(folder):
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def test_sigkill_and_rerun_gives_the_uninterrupted_parameters(tmp_path):
  common = ["--devices", 2, "--mesh", "2,1,1", "--steps", 60, "--finetune_steps", 40]
  common += ["--checkpoint_every", 5]
  child(*common, "--workdir", tmp_path / "ref", "--out", tmp_path / "ref.npz")
  ref = load(tmp_path / "ref.npz")

  work = tmp_path / "killed"
  phase = random.Random(time.time()).choice(["zero_shot", "fine_tuned"])
  proc = child(*common, "--workdir", work, "--out", tmp_path / "x.npz", wait=False)
  try:
    deadline = time.time() + 300
    while not _finalized_steps(work / "checkpoints" / phase):
      assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
      assert time.time() < deadline
      time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(tmp_path / "x.npz")
  # A half-written step, as a kill during a save leaves it: never restored.
  folder = work / "checkpoints" / phase
  latest = _finalized_steps(folder)[-1]
  torn = folder / f"{latest + 1000}.orbax-checkpoint-tmp-1700000000"
  os.makedirs(torn / "state")
  (torn / "state" / "garbage").write_bytes(b"\0" * 10)

  child(*common, "--workdir", work, "--out", tmp_path / "resumed.npz")
  resumed = load(tmp_path / "resumed.npz")
  assert not torn.exists()  # cleaned up, not restored
  assert params(resumed).keys() == params(ref).keys()
  for k, v in params(ref).items():
    np.testing.assert_allclose(resumed[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(resumed["items"], ref["items"])
