"""The default demo trains to the issue's thresholds (slow: ~7 minutes on 2 CPU cores)."""

import os

import pytest

from dsi_jax.data import fashion_mnist
from dsi_jax.experiments import fashion_mnist as demo

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    not os.path.isdir(os.environ.get(fashion_mnist.ENV_VAR, fashion_mnist.DEFAULT_DIR)),
    reason="Fashion-MNIST not installed",
  ),
]


def test_default_demo_memorises_the_index_and_fine_tuning_helps(tmp_path):
  report = demo.run_demo(str(tmp_path), show_progress=False)
  rows = {(r["model"], r.get("setting"), r.get("ids")): r for r in report["rows"]}
  zero_shot = rows[("vit_dsi", "zero_shot", "clustered")]
  fine_tuned = rows[("vit_dsi", "fine_tuned", "clustered")]
  assert zero_shot["ia@1"] >= 0.95
  assert fine_tuned["ia@1"] >= 0.95  # fine-tuning keeps the index
  assert fine_tuned["map@10"] > zero_shot["map@10"]
  assert fine_tuned["map@10"] > rows[("bovw", "-", None)]["map@10"]
