"""Benchmark of training throughput (examples/s) and model FLOPs utilisation (MFU).

Configurations (both built by `dsi_jax.models.dsi.make_vit_dsi`, trained by the library's own
`dsi_jax.train.make_train_step` with AdamW from `create_state`, dropout on):

* `seed`: the seed ViT-DSI, `VIT_DSI_DEFAULTS` (width 128, depth 6, 4 heads, MLP 256,
  3-layer decoder), 32 px RGB images, patch 4 (64 patches), batch 32.
* `b16`: a ViT-B/16-size DSI: width 768, depth 12, 12 heads, MLP 3072, 224 px images, patch
  16 (196 patches) and a 6-layer decoder of the same width (`make_vit_dsi` gives the decoder
  the encoder's width, heads and MLP). Batch 64 on an accelerator, 4 on CPU (`--batch-b16`).

Ids: 1000 random ids (3 codes + eos = 4 decoder tokens); inputs are random images.

Dtypes: `float32`, and `bfloat16` through `make_vit_dsi(dtype=jnp.bfloat16)`, flax's
computation dtype: activations and matmuls in bfloat16, parameters, gradients, optimizer
state and the logits/loss in float32 (mixed precision).

Per configuration and dtype: the step is lowered and compiled once (`jax.jit(...).lower(...)
.compile()`, compile time reported, not timed), run once more as warm-up, then timed over
`--repeats` runs of `--steps` consecutive steps (waited for with `jax.block_until_ready`);
the median time per step gives examples/s. FLOPs per step are XLA's count on the step
before optimisation (`jax.jit(step).lower(...).cost_analysis()["flops"]`: every dot and
convolution as the model wrote it, the same on every backend; the compiled module's count
is reported as `xla_compiled_flops` but on GPU it leaves out the matmuls that became
cuBLAS/cuDNN library calls), cross-checked against the analytic 6 x params x tokens
(encoder params x patches + decoder params x id tokens), also with attention scores added.

MFU = XLA flops per step / step time / peak. The peak:
* NVIDIA GPUs: dense spec peaks by device kind (H100 SXM and H200: 989.4e12 bf16, 494.7e12
  tf32, 66.9e12 fp32; H100 PCIe: 756e12 / 378e12 / 51.2e12; A100: 312e12 / 156e12 /
  19.5e12). bfloat16 runs use the bf16 peak; float32 runs use the TF32 peak, since JAX's
  default matmul precision runs float32 dots as TF32 on Ampere and later (the fp32 peak is
  reported too).
* CPU and unknown devices: the attainable peak measured here with a large jitted matmul of
  the same dtype (so CPU MFU is against what XLA's matmul reaches on this machine, not a
  spec sheet). The measured matmul rates are reported on GPUs too.

Run `python tools/bench_train.py --quick --out DIR` (seed config only, under a minute on 2
CPU cores) or without `--quick` for both configs. Writes `DIR/bench_train.json` and
`DIR/bench_train.png` and prints a Markdown table. Shares its helpers with `bench_decode.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
  int_list,
  markdown_table,
  pyplot,
  start_report,
  str_list,
  time_call,
  write_report,
)

from dsi_jax import docids as docids_lib  # noqa: E402
from dsi_jax import partitioning  # noqa: E402
from dsi_jax import train as train_lib  # noqa: E402
from dsi_jax.models import dsi  # noqa: E402

B16 = dict(
  patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12, dropout=0.1, decoder_depth=6
)
CONFIGS = {
  "seed": {"overrides": dict(dsi.VIT_DSI_DEFAULTS), "image_size": 32},
  "b16": {"overrides": B16, "image_size": 224},
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Dense peak FLOP/s from the vendors' spec sheets. The first matching substring of the
# device kind wins, so more specific names come first.
GPU_PEAKS = [
  ("H100 PCIe", "H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
  ("H100", "H100 SXM", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
  ("H200", "H200 (as H100 SXM)", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
  ("A100", "A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


def spec_peak(device_kind: str) -> tuple[str, dict[str, float]] | None:
  for needle, name, peaks in GPU_PEAKS:
    if needle.lower() in device_kind.lower():
      return name, peaks
  return None


def measure_matmul(size: int, dtype, args) -> float:
  """FLOP/s of a jitted `[size, size] @ [size, size]` matmul of `dtype` (median of repeats)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (size, size), jnp.float32).astype(dtype)
  mm = jax.jit(jnp.matmul)
  t = time_call(mm, a, b, repeats=args.repeats, min_time=args.min_time)
  return 2.0 * size**3 / t["median_s"]


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def analytic_flops(params, overrides: dict, image_size: int, dec_len: int, batch: int):
  """6 x params x tokens per step, and the same plus attention scores (fwd + bwd)."""
  enc, dec = count_params(params["encoder"]), count_params(params["decoder"])
  patches = (image_size // overrides["patch_size"]) ** 2
  width = overrides["width"]
  dense = 6.0 * (enc * patches + dec * dec_len) * batch
  # QK^T and AV: 2 matmuls x 2 flops x queries x keys x width, x3 for forward + backward.
  attention = 12.0 * width * batch
  attention *= overrides["depth"] * patches**2 + overrides["decoder_depth"] * (
    dec_len**2 + dec_len * patches
  )
  return {
    "encoder_params": enc,
    "decoder_params": dec,
    "patches": patches,
    "decoder_tokens": dec_len,
    "flops_6nd": dense,
    "flops_6nd_attention": dense + attention,
  }


def xla_flops(stage) -> tuple[float | None, str | None]:
  """(`flops` of a `jax.stages.Lowered` / `Compiled` cost analysis, or None and why)."""
  try:
    cost = stage.cost_analysis()
  except Exception as e:  # noqa: BLE001 - some backends have no cost model
    return None, f"{type(e).__name__}: {e}"[:300]
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None, "no 'flops' in the cost analysis"
  return float(cost["flops"]), None


def model_flops(lowered, jitted, *args) -> tuple[float | None, str]:
  """XLA's flops of the step before optimisation, and where they were counted.

  The lowered module of the run's backend is asked first; where that backend has no cost
  model for it (seen with jax 0.11 on CUDA), the same step is lowered for the CPU (shapes
  only, nothing runs) and counted there: the pre-optimisation HLO is the same program.
  """
  flops, why = xla_flops(lowered)
  if flops:
    return flops, f"lowered for {jax.default_backend()}"
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = jax.tree_util.tree_map(  # leaves may be Python scalars (TrainState.step)
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=cpu), args
    )
    flops, why_cpu = xla_flops(jitted.lower(*shapes))
  except Exception as e:  # noqa: BLE001 - no CPU backend (JAX_PLATFORMS), ...
    flops, why_cpu = None, f"{type(e).__name__}: {e}"[:300]
  if flops:
    return flops, f"lowered for cpu ({jax.default_backend()} lowering: {why})"
  return None, f"unavailable ({why}; cpu: {why_cpu})"


def bench_config(name: str, dtype_name: str, batch: int, args) -> dict[str, Any]:
  spec = CONFIGS[name]
  overrides, image_size = dict(spec["overrides"]), spec["image_size"]
  if args.dropout is not None:
    overrides["dropout"] = args.dropout
  docids = docids_lib.random_ids([f"item{i}" for i in range(args.num_ids)], seed=args.seed)
  network = dsi.make_vit_dsi(docids, **overrides, dtype=DTYPES[dtype_name])
  model = dsi.DSIModel(network, docids)
  rng = jax.random.PRNGKey(args.seed)
  shape = (batch, image_size, image_size, 3)
  config = train_lib.TrainConfig(batch_size=batch)
  mesh = config.make_mesh()  # data parallelism over every local device
  state = train_lib.create_state(model, shape, config, rng, mesh)
  rows = np.random.default_rng(args.seed).integers(0, len(docids), size=batch)
  data = {
    "inputs": jax.random.normal(jax.random.fold_in(rng, 1), shape, jnp.float32),
    "targets": jnp.asarray(docids.targets()[rows]),
  }
  data = jax.device_put(data, partitioning.batch_sharding(mesh))
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step = train_lib.make_train_step(model.loss_fn, shardings, mesh)
  t0 = time.perf_counter()
  lowered = step.lower(state, data, rng)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # Model FLOPs: XLA's count on the step's HLO before optimisation (every dot and conv as
  # the model wrote it). The compiled module's count is kept too, but on GPU it misses the
  # matmuls and convolutions that became cuBLAS / cuDNN library calls.
  flops, flops_source = model_flops(lowered, step, state, data, rng)
  compiled_flops, _ = xla_flops(compiled)
  state, aux = compiled(state, data, rng)  # warm-up
  jax.block_until_ready((state, aux))
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, aux = compiled(state, data, rng)
    jax.block_until_ready((state, aux))
    times.append((time.perf_counter() - t0) / args.steps)
  step_s = statistics.median(times)
  analytic = analytic_flops(state.params, overrides, image_size, docids.max_length, batch)
  row = {
    "config": name,
    "dtype": dtype_name,
    "batch": batch,
    "image_size": image_size,
    "params": count_params(state.params),
    "step_s": step_s,
    "step_times_s": times,
    "examples_per_s": batch / step_s,
    "compile_s": compile_s,
    "loss": float(aux["loss"]),
    "xla_flops": flops,
    "xla_flops_source": flops_source,
    "xla_compiled_flops": compiled_flops,
    **analytic,
  }
  if flops:
    row["xla_over_6nd"] = flops / analytic["flops_6nd"]
    row["xla_over_6nd_attention"] = flops / analytic["flops_6nd_attention"]
    row["achieved_flops_per_s"] = flops / step_s
  return row


def add_mfu(rows: list[dict[str, Any]], peaks: dict[str, Any]) -> None:
  for row in rows:
    achieved = row.get("achieved_flops_per_s")
    if achieved is None:
      continue
    if peaks["spec"] is not None:
      key = "bf16" if row["dtype"] == "bfloat16" else "tf32"
      row["peak_used"] = f"{peaks['spec_name']} {key} spec"
      row["peak_flops_per_s"] = peaks["spec"][key]
      if row["dtype"] == "float32":
        row["mfu_vs_fp32_peak"] = achieved / peaks["spec"]["fp32"]
    else:
      measured = peaks["measured"].get(row["dtype"])
      row["peak_used"] = f"measured {row['dtype']} matmul on this {peaks['backend']}"
      row["peak_flops_per_s"] = measured
    if row.get("peak_flops_per_s"):
      row["mfu"] = achieved / row["peak_flops_per_s"]


def plot(report: dict, path: str) -> None:
  plt = pyplot()
  rows = report["results"]
  configs = list(dict.fromkeys(r["config"] for r in rows))
  dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  width = 0.8 / max(1, len(dtypes))
  for di, dtype in enumerate(dtypes):
    xs, eps, mfu = [], [], []
    for ci, config in enumerate(configs):
      sel = [r for r in rows if (r["config"], r["dtype"]) == (config, dtype)]
      if sel:
        xs.append(ci + (di - (len(dtypes) - 1) / 2) * width)
        eps.append(sel[0]["examples_per_s"])
        mfu.append(100 * (sel[0].get("mfu") or 0.0))
    axes[0].bar(xs, eps, width, label=dtype, color=f"C{di}")
    axes[1].bar(xs, mfu, width, label=dtype, color=f"C{di}")
    for x, e, m in zip(xs, eps, mfu):
      axes[0].annotate(f"{e:.3g}", (x, e), ha="center", va="bottom", fontsize=8)
      axes[1].annotate(f"{m:.2g}%", (x, m), ha="center", va="bottom", fontsize=8)
  labels = [f"{c} (batch {next(r['batch'] for r in rows if r['config'] == c)})" for c in configs]
  for ax in axes:
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(labels)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
  axes[0].set_ylabel("training examples / s")
  values = [r["examples_per_s"] for r in rows]
  if values and max(values) > 20 * min(values):
    axes[0].set_yscale("log")
  axes[1].set_ylabel("MFU (%)")
  peaks = report["peaks"]
  axes[1].set_title(
    f"vs {peaks['spec_name']} spec peak (bf16 runs: bf16, float32 runs: TF32)"
    if peaks["spec"]
    else "vs measured matmul peak of the same dtype",
    fontsize=10,
  )
  m = report["machine"]
  fig.suptitle(f"ViT-DSI training throughput, {m['backend']} ({m['device_kind']})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description="Training throughput and MFU of ViT-DSI (seed and ViT-B/16 size).",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--out", default="bench_out", help="folder for bench_train.json and .png")
  p.add_argument(
    "--quick", action="store_true", help="fewer steps, seed config only (unless --configs)"
  )
  p.add_argument("--configs", type=str_list, default=None, help="seed,b16")
  p.add_argument("--dtypes", type=str_list, default=["float32", "bfloat16"])
  p.add_argument("--batch-seed", type=int, default=32)
  p.add_argument("--batch-b16", type=int, default=None, help="default 64, or 4 on CPU")
  p.add_argument("--steps", type=int, default=None, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--min-time", type=float, default=None, help="seconds per matmul repeat")
  p.add_argument("--matmul-size", type=int_list, default=None, help="peak matmul size")
  p.add_argument("--num-ids", type=int, default=1000)
  p.add_argument("--dropout", type=float, default=None, help="override the configs' dropout (0.1)")
  p.add_argument(
    "--prng",
    default=None,
    help="jax_default_prng_impl for dropout masks (threefry2x32, rbg, unsafe_rbg); "
    "default: JAX's (threefry2x32)",
  )
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  if args.configs is None:
    args.configs = ["seed"] if args.quick else ["seed", "b16"]
  unknown = [c for c in args.configs if c not in CONFIGS]
  if unknown:
    p.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
  if args.batch_b16 is None:
    args.batch_b16 = (2 if args.quick else 4) if on_cpu else (8 if args.quick else 64)
  if args.steps is None:
    args.steps = 2 if args.quick else 10
  if args.repeats is None:
    args.repeats = 3 if args.quick else 5
  if args.min_time is None:
    args.min_time = 0.05 if args.quick else 0.5
  if args.matmul_size is None:
    args.matmul_size = [1024 if args.quick else 2048] if on_cpu else [8192]
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.prng:
    jax.config.update("jax_default_prng_impl", args.prng)
  report = start_report("bench_train", args)
  backend = jax.default_backend()
  kind = jax.devices()[0].device_kind
  found = spec_peak(kind) if backend == "gpu" else None
  size = args.matmul_size[0]
  measured = {}
  for dtype_name in args.dtypes:
    measured[dtype_name] = measure_matmul(size, DTYPES[dtype_name], args)
    print(f"{size}^3 {dtype_name} matmul: {measured[dtype_name] / 1e9:.1f} GFLOP/s", flush=True)
  peaks = {
    "backend": backend,
    "device_kind": kind,
    "spec_name": found[0] if found else None,
    "spec": found[1] if found else None,
    "measured": measured,
    "matmul_size": size,
    "which": (
      f"spec sheet of {found[0]} (bf16 runs vs bf16 peak, float32 runs vs TF32 peak: JAX's "
      "default precision runs float32 dots as TF32)"
      if found
      else f"measured {size}^3 jitted matmul of the run's dtype on this {backend}"
    ),
  }
  report["peaks"] = peaks
  report["method"] = {
    "step": "dsi_jax.train.make_train_step (AdamW, dropout) lowered + compiled once; one "
    "warm-up step; median over repeats of (time of `steps` consecutive steps) / steps",
    "flops": "XLA cost_analysis()['flops'] of the lowered (pre-optimisation) step HLO, "
    "backend-independent; the compiled module's count is in xla_compiled_flops (on GPU it "
    "misses dots and convs that became cuBLAS/cuDNN calls); analytic cross-check "
    "6 x (encoder params x patches + decoder params x id tokens) x batch, and the same plus "
    "attention scores",
    "bfloat16": "make_vit_dsi(dtype=bfloat16): bf16 activations and matmuls, f32 params, "
    "optimizer state and logits",
    "mfu": "xla flops / step time / peak (see peaks.which)",
  }
  rows = []
  for name in args.configs:
    batch = args.batch_seed if name == "seed" else args.batch_b16
    for dtype_name in args.dtypes:
      row = bench_config(name, dtype_name, batch, args)
      rows.append(row)
      print(
        f"{name} {dtype_name} batch {batch}: {row['step_s'] * 1e3:.1f} ms/step, "
        f"{row['examples_per_s']:.1f} examples/s, compile {row['compile_s']:.1f}s",
        flush=True,
      )
  add_mfu(rows, peaks)
  report["results"] = rows
  report["summary"] = {
    f"{r['config']}_{r['dtype']}": {
      "examples_per_s": r["examples_per_s"],
      "mfu": r.get("mfu"),
      "peak_used": r.get("peak_used"),
      "xla_over_6nd": r.get("xla_over_6nd"),
    }
    for r in rows
  }
  json_path = write_report(args.out, "bench_train", report)
  png = os.path.join(args.out, "bench_train.png")
  plot(report, png)
  for r in rows:
    r["ms_step"] = 1e3 * r["step_s"]
    r["mfu_pct"] = 100 * r["mfu"] if r.get("mfu") is not None else None
    r["gflop_step"] = r["xla_flops"] / 1e9 if r.get("xla_flops") else None
    r["tflops_s"] = r["achieved_flops_per_s"] / 1e12 if r.get("achieved_flops_per_s") else None
  print()
  print(
    markdown_table(
      rows,
      [
        ("config", "config"),
        ("dtype", "dtype"),
        ("batch", "batch"),
        ("params", "params"),
        ("ms/step", "ms_step"),
        ("examples/s", "examples_per_s"),
        ("GFLOP/step (XLA)", "gflop_step"),
        ("XLA / 6ND", "xla_over_6nd"),
        ("TFLOP/s", "tflops_s"),
        ("MFU %", "mfu_pct"),
      ],
    )
  )
  print(f"\npeak: {peaks['which']}")
  print(f"wrote {json_path} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
