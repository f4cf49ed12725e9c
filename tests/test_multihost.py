"""Several processes as on a multi-host pod, on this machine: each process is started by
`dsi_jax.launch` with its own simulated CPU devices, and they join through localhost (gloo
collectives). The same 12 steps on the same mesh shape (8, 1, 1) as 1 process of 8 devices,
2 of 4 and 4 of 2 give the same losses and the same ranked test ids (each process ranks its
share of the queries), for CLIP-DSI's mixed caption/image batches too; checkpoints cross
process counts; a process killed with SIGKILL takes
the job down, and the same command resumes it to the uninterrupted job's parameters.
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
from test_scaling import (
  CHILD,
  ROOT,
  _finalized_steps,
  check_restores_in_one_process,
  child,
  load,
  params,
)

from dsi_jax.data import fashion_mnist


def hosts(processes, devices, tmp, **kw):
  """12 steps on mesh (8, 1, 1) as `processes` x `devices`; its outputs and workdir."""
  name = f"{processes}x{devices}"
  out, workdir = tmp / f"{name}.npz", tmp / f"work{name}"
  child(
    *("--processes", processes, "--devices", devices, "--mesh", "8,1,1"),
    *("--workdir", workdir, "--out", out),
    **kw,
  )
  run = load(out)
  run["workdir"] = workdir
  return run


@pytest.fixture(scope="module")
def host_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("hosts")
  return {"1x8": hosts(1, 8, tmp), "2x4": hosts(2, 4, tmp)}


def check_same_run(run, ref, name):
  assert len(ref["losses"]) == 12 and ref["losses"][-1] < ref["losses"][0]
  np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-4, err_msg=name)
  np.testing.assert_array_equal(run["items"], ref["items"], err_msg=name)
  np.testing.assert_allclose(run["scores"], ref["scores"], rtol=1e-4, atol=1e-4, err_msg=name)


def test_two_processes_train_and_rank_as_one(host_runs):
  check_same_run(host_runs["2x4"], host_runs["1x8"], "2 processes x 4 devices")
  # Process 0 alone wrote the run's small files, once.
  workdir = host_runs["2x4"]["workdir"]
  assert sorted(p for p in os.listdir(workdir) if p.endswith(".json")) == [
    "docids.json",
    "history.json",
    "run.json",
  ]


@pytest.mark.slow
def test_four_processes_train_and_rank_as_one(host_runs, tmp_path):
  check_same_run(hosts(4, 2, tmp_path), host_runs["1x8"], "4 processes x 2 devices")


def test_checkpoint_from_two_processes_restores_in_one(host_runs, tmp_path):
  check_restores_in_one_process(host_runs["2x4"], tmp_path)


def test_clip_dsi_mixed_batches_as_two_processes_as_one(tmp_path):
  # Caption and image rows are split over the processes each on its own, and the contrastive
  # loss pairs query i with item i of the global batch: 2 x 1 must be 1 x 2, step for step.
  runs = {}
  for processes, devices in ((1, 2), (2, 1)):
    name = f"{processes}x{devices}"
    child(
      *("--kind", "clip", "--processes", processes, "--devices", devices, "--mesh", "2,1,1"),
      *("--steps", 6, "--finetune_steps", 6, "--checkpoint_every", 6),
      *("--workdir", tmp_path / name, "--out", tmp_path / f"{name}.npz"),
    )
    runs[name] = load(tmp_path / f"{name}.npz")
  ref, run = runs["1x2"], runs["2x1"]
  assert len(ref["losses"]) == 12 and np.isfinite(ref["losses"]).all()
  np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-4)
  assert ref["items"].shape == (16, 8)  # every test caption ranked
  np.testing.assert_array_equal(run["items"], ref["items"])
  np.testing.assert_allclose(run["scores"], ref["scores"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sigkill_of_one_process_then_rerun_gives_the_uninterrupted_parameters(tmp_path):
  common = ["--processes", 2, "--devices", 1, "--mesh", "2,1,1"]
  common += ["--steps", 40, "--finetune_steps", 30, "--checkpoint_every", 5]
  child(*common, "--workdir", tmp_path / "ref", "--out", tmp_path / "ref.npz")
  ref = load(tmp_path / "ref.npz")

  work, pids = tmp_path / "killed", tmp_path / "pids"
  pids.mkdir()
  phase = random.Random(time.time()).choice(["zero_shot", "fine_tuned"])
  cmd = [sys.executable, CHILD, *map(str, common), "--workdir", str(work)]
  cmd += ["--out", str(tmp_path / "x.npz"), "--pid_dir", str(pids)]
  env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  launcher = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while not _finalized_steps(work / "checkpoints" / phase):
      assert launcher.poll() is None, f"finished before it could be killed: {launcher.stderr}"
      assert time.time() < deadline
      time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    victim = random.choice(["0", "1"])
    os.kill(int((pids / victim).read_text()), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)  # the other process is stopped, not left waiting
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
  assert launcher.returncode != 0
  assert f"process {victim} of 2 exited with status {-signal.SIGKILL}" in err
  assert not os.path.exists(tmp_path / "x.npz")

  child(*common, "--workdir", work, "--out", tmp_path / "resumed.npz")
  resumed = load(tmp_path / "resumed.npz")
  assert params(resumed).keys() == params(ref).keys()
  for k, v in params(ref).items():
    np.testing.assert_allclose(resumed[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(resumed["items"], ref["items"])


TINY_RUN = [
  "--gin_file=gin_configs/experiments/fmnist512_clustered.gin",
  "--gin_bindings=dsi_jax.FashionMnistConfig.num_images=40",
  (
    "--gin_bindings=dsi_jax.FashionMnistConfig.model={'patch_size': 8, 'width': 32, "
    "'depth': 1, 'mlp_dim': 32, 'num_heads': 2, 'decoder_depth': 1}"
  ),
  "--gin_bindings=dsi_jax.TrainConfig.index_max_steps=4",
  "--gin_bindings=dsi_jax.TrainConfig.index_eval_every=2",
  "--gin_bindings=dsi_jax.TrainConfig.finetune_max_steps=4",
  "--gin_bindings=dsi_jax.TrainConfig.finetune_eval_every=2",
]


def dsi_jax_train(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "dsi_jax.cli", "train", *map(str, args)]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)


def test_train_command_stops_every_process_when_one_fails(tmp_path):
  proc = dsi_jax_train(
    "--num_processes", 2, "--local_devices", 1, "--gin_file", tmp_path / "missing.gin"
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "missing.gin: no such gin file" in proc.stderr
  assert "of 2 exited with status 2; stopped the others" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(
  not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)),
  reason="Fashion-MNIST not installed",
)
def test_train_command_as_two_processes_matches_two_devices(tmp_path):
  reports = {}
  for name, flags in (("1x2", ["--local_devices", 2]), ("2x1", ["--num_processes", 2])):
    workdir = tmp_path / name
    binding = f"--gin_bindings=dsi_jax.run_experiment.workdir='{workdir}'"
    proc = dsi_jax_train(*TINY_RUN, binding, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports[name] = json.loads((workdir / "results.json").read_text())
  drop = ("seconds",)
  rows = {
    n: [{k: v for k, v in r.items() if k not in drop} for r in rep["rows"]]
    for n, rep in reports.items()
  }
  assert rows["2x1"] == rows["1x2"]
  assert [r["setting"] for r in rows["2x1"]] == ["zero_shot", "fine_tuned"]
