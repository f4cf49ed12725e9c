"""Benchmark of the trie and the trie-constrained beam search against the number of ids.

For every id layout and number of ids N it records the trie's memory (bytes of its device
arrays) and build time, and times `dsi_jax.decoding.beam_search` (per decode step and per
query) at each batch size and beam count, next to the previous dense layout (one
`transitions[nodes, vocab]` table; `tools/decode_references.py`) wherever that fits in memory
(`--dense-max-gib`). Both run on the same ids with the same logits and must return the same
items (`dense_matches`).

A fixed synthetic `tokens_to_logits` isolates the decoder's own cost: the logits of a step are
`bias[query] + table[position] + mix(last token)`, a per-query random bias, a per-position
random row and a cheap hash of the last token, all `[rows, vocab]` (so with atomic ids, whose
vocabulary is N + 2, the "model" itself costs O(N) per step, as a real output layer does).

Id layouts (targets built with numpy; the trie with `dsi_jax.trie.from_targets`):

* `r256x3`, `r256x4`: N distinct ids of 3 (or 4) codes drawn uniformly over 256 codes
  (vocabulary 258): wide first levels, sparse last ones.
* `base10`: `dsi_jax.docids.random_ids`' ids: a random permutation of 0 .. N-1 written in
  base 10 (fixed length ceil(log10 N), vocabulary 12); a complete trie.
* `semantic`: `dsi_jax.docids.semantic_ids` (DSI's hierarchical k-means, k = 10, leaves of at
  most `--semantic-c` items, ids of different lengths, vocabulary c + 2) over SYNTHETIC
  clustered embeddings (a 16-d Gaussian mixture with sqrt(N) Zipf-sized components).
* `atomic`: one token per item (vocabulary N + 2).

Optional references (`--refs`): `plain` (the same search without any trie) and `host` (a dict
trie walked on the host per beam per step).

Run `python tools/bench_decode.py --quick --out DIR` (about a minute on 2 CPU cores), or the
full table with `--ns 1k,100k,1M,10M`. Writes `DIR/bench_decode.json` and `.png` and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import json
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
  human,
  int_list,
  markdown_table,
  pyplot,
  start_report,
  str_list,
  time_call,
  write_report,
)
from decode_references import (  # noqa: E402
  HostTrieSearch,
  build_dense,
  dense_bytes,
  dict_trie,
  legacy_dense_search,
  plain_beam_search,
)

from dsi_jax import decoding  # noqa: E402
from dsi_jax import docids as docids_lib  # noqa: E402
from dsi_jax import trie as trie_lib  # noqa: E402

LAYOUTS = ("r256x3", "r256x4", "base10", "semantic", "atomic")
GIB = 2**30

# --------------------------------------------------------------------------------------------
# Id layouts, as decoder targets [N, length] (codes + 2, eos, pad).
# --------------------------------------------------------------------------------------------


def synthetic_embeddings(n: int, *, dim: int = 16, seed: int = 0) -> np.ndarray:
  """`[n, dim]` float32 points of a Gaussian mixture with Zipf-sized components (synthetic)."""
  rng = np.random.default_rng(seed)
  num_components = max(2, int(np.sqrt(n)))
  weights = 1.0 / np.arange(1, num_components + 1) ** 1.1
  component = rng.choice(num_components, size=n, p=weights / weights.sum())
  means = rng.normal(size=(num_components, dim)).astype(np.float32) * 4.0
  return means[component] + rng.normal(size=(n, dim)).astype(np.float32)


def _digits_targets(numbers: np.ndarray, base: int, length: int) -> np.ndarray:
  out = np.empty((len(numbers), length + 1), np.int32)
  n = numbers.astype(np.int64).copy()
  for pos in range(length - 1, -1, -1):
    out[:, pos] = n % base + docids_lib.NUM_SPECIAL
    n //= base
  out[:, length] = docids_lib.EOS
  return out


def distinct_numbers(n: int, space: int, rng: np.random.Generator) -> np.ndarray:
  """`n` distinct integers drawn uniformly from [0, space), in random order."""
  if n > space:
    raise ValueError(f"{n} distinct ids do not fit in {space}")
  if space <= 64 * n:
    return rng.choice(space, n, replace=False)
  numbers = np.unique(rng.integers(0, space, int(n * 1.05) + 64))
  while len(numbers) < n:
    numbers = np.unique(np.concatenate([numbers, rng.integers(0, space, n)]))
  return rng.permutation(numbers)[:n]


def make_targets(layout: str, n: int, *, seed: int, semantic_c: int) -> tuple[np.ndarray, int]:
  """`(targets, vocab)` of N ids of `layout`."""
  rng = np.random.default_rng(seed)
  if layout in ("r256x3", "r256x4"):
    length = int(layout[-1])
    return _digits_targets(distinct_numbers(n, 256**length, rng), 256, length), 258
  if layout == "base10":
    length = max(1, int(np.ceil(np.log10(n) - 1e-9))) if n > 1 else 1
    return _digits_targets(rng.permutation(n), 10, length), 12
  if layout == "semantic":
    keys = [f"item{i}" for i in range(n)]
    dm = docids_lib.semantic_ids(
      keys, synthetic_embeddings(n, seed=seed), k=10, c=semantic_c, seed=seed
    )
    return dm.targets(), dm.vocab_size
  if layout == "atomic":
    items = np.arange(n, dtype=np.int32) + docids_lib.NUM_SPECIAL
    return np.stack([items, np.full(n, docids_lib.EOS, np.int32)], 1), n + docids_lib.NUM_SPECIAL
  raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")


# --------------------------------------------------------------------------------------------
# The synthetic model.
# --------------------------------------------------------------------------------------------


def synthetic_model(max_length: int, vocab: int, batch: int, seed: int = 0):
  """`(make_cache, tokens_to_logits)` of a fixed random model (see the module docstring)."""
  key_table, key_bias = jax.random.split(jax.random.PRNGKey(seed))
  table = jax.random.normal(key_table, (max_length, vocab)) * 2.0
  bias = jax.random.normal(jax.random.fold_in(key_bias, batch), (batch, vocab))
  codes = jnp.arange(vocab, dtype=jnp.uint32)

  def make_cache(beams: int):
    return {"position": jnp.array(0, jnp.int32), "query": jnp.repeat(jnp.arange(batch), beams)}

  def tokens_to_logits(tokens, cache):
    position = jnp.minimum(cache["position"], max_length - 1)
    last = tokens[:, :1].astype(jnp.uint32)
    mix = ((last * 7919 + codes[None] * 104729) % 1009).astype(jnp.float32) / 252.0 - 2.0
    logits = bias[cache["query"]] + table[position][None] + mix
    return logits, {"position": cache["position"] + 1, "query": cache["query"]}

  return make_cache, tokens_to_logits


# --------------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------------


def bench_layout(layout: str, n: int, args, report: dict) -> list[dict[str, Any]]:
  t0 = time.perf_counter()
  targets, vocab = make_targets(layout, n, seed=args.seed, semantic_c=args.semantic_c)
  ids_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  trie = trie_lib.from_targets(targets, vocab)
  jax.block_until_ready(trie)
  build_s = time.perf_counter() - t0
  before_bytes = dense_bytes(trie.num_nodes, n, vocab)
  mem = {
    "layout": layout,
    "n": n,
    "vocab": vocab,
    "max_length": trie.max_length,
    "num_nodes": trie.num_nodes,
    "levels": "/".join({"dense": "D", "csr": "C", "leaf": "L"}[k] for k in trie.layout),
    "branching": [lvl.branching for lvl in trie.levels],
    "trie_bytes": trie.nbytes,
    "trie_mib": trie.nbytes / 2**20,
    "bytes_per_id": trie.nbytes / n,
    "build_s": build_s,
    "ids_s": ids_s,
    "dense_bytes": before_bytes,
    "dense_mib": before_bytes / 2**20,
  }
  dense = None
  if "dense" in args.refs and before_bytes <= args.dense_max_gib * GIB:
    t0 = time.perf_counter()
    dense = build_dense(targets, vocab)
    jax.block_until_ready(dense)
    mem["dense_build_s"] = time.perf_counter() - t0
    assert dense.nbytes == before_bytes
  report["memory"].append(mem)
  dense_note = f"built in {mem['dense_build_s']:.1f}s" if dense else "not built"
  print(
    f"{layout} N={human(n)}: levels {mem['levels']} branching {mem['branching']}, "
    f"{trie.nbytes / 2**20:.2f} MiB built in {build_s:.2f}s (dense layout "
    f"{before_bytes / 2**20:.1f} MiB, {dense_note})",
    flush=True,
  )
  host = None
  if "host" in args.refs and n <= args.host_max_n:
    host = dict_trie(targets)
  rows = []
  for batch in args.batches:
    make_cache, tokens_to_logits = synthetic_model(trie.max_length, vocab, batch, args.seed)
    if host is not None:
      search_host = HostTrieSearch(tokens_to_logits, host, vocab, trie.max_length)
    for beams in args.beams:
      row = {"layout": layout, "n": n, "batch": batch, "beams": beams, "vocab": vocab}
      step_bytes = 4 * batch * beams * vocab * 4  # logits, log-probs, candidates, mix
      if step_bytes > args.max_step_gib * GIB:
        row["skipped"] = (
          f"one step's [batch x beams x vocab] float arrays alone take "
          f"{step_bytes / GIB:.1f} GiB > --max-step-gib {args.max_step_gib}"
        )
        rows.append(row)
        print(f"  batch {batch:3d} beams {beams:3d}: skipped ({row['skipped']})", flush=True)
        continue
      cache = make_cache(beams)
      search = jax.jit(
        functools.partial(decoding.beam_search, tokens_to_logits, batch_size=batch, num_beams=beams)
      )
      t0 = time.perf_counter()
      result = jax.device_get(search(cache, trie))
      row["compile_s"] = time.perf_counter() - t0
      steps = int(result.steps)
      t = time_call(search, cache, trie, repeats=args.repeats, min_time=args.min_time)
      row.update(
        steps=steps,
        found=int((result.items >= 0).sum(-1).min()),
        step_ms=1e3 * t["median_s"] / steps,
        query_ms=1e3 * t["median_s"] / batch,
        times_s=t["times_s"],
      )
      line = f"  batch {batch:3d} beams {beams:3d}: {steps} steps, {row['step_ms']:.3f} ms/step"
      if dense is not None:
        legacy = jax.jit(
          functools.partial(
            legacy_dense_search, tokens_to_logits, batch_size=batch, num_beams=beams
          )
        )
        items, _, dsteps = jax.device_get(legacy(cache, dense))
        row["dense_matches"] = bool(np.array_equal(items, result.items))
        td = time_call(legacy, cache, dense, repeats=args.repeats, min_time=args.min_time)
        row["dense_step_ms"] = 1e3 * td["median_s"] / int(dsteps)
        row["dense_query_ms"] = 1e3 * td["median_s"] / batch
        row["dense_over_sparse"] = row["dense_step_ms"] / row["step_ms"]
        same = "same ids" if row["dense_matches"] else "IDS DIFFER"
        line += f", dense {row['dense_step_ms']:.3f} ({same})"
      if "plain" in args.refs:
        plain = jax.jit(
          functools.partial(
            plain_beam_search, tokens_to_logits, batch_size=batch, num_beams=beams, steps=steps
          )
        )
        tp = time_call(plain, cache, repeats=args.repeats, min_time=args.min_time)
        row["plain_step_ms"] = 1e3 * tp["median_s"] / steps
        line += f", no trie {row['plain_step_ms']:.3f}"
      if host is not None:
        h_items, _ = search_host(cache, batch, beams)
        row["host_matches"] = bool(np.array_equal(h_items, result.items))
        th = time_call(search_host, cache, batch, beams, repeats=2, min_time=args.min_time)
        row["host_step_ms"] = 1e3 * th["median_s"] / steps
        row["host_over_sparse"] = row["host_step_ms"] / row["step_ms"]
        line += f", host dict {row['host_step_ms']:.3f}"
      rows.append(row)
      print(line, flush=True)
  return rows


def step_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per layout and (batch, beams): step time at the layout's largest N / at its smallest."""
  timed = {
    (r["layout"], r["n"], r["batch"], r["beams"]): r["step_ms"] for r in rows if "step_ms" in r
  }
  out = []
  for layout in dict.fromkeys(key[0] for key in timed):
    ns = sorted({key[1] for key in timed if key[0] == layout})
    for (lay, n, batch, beams), step in timed.items():
      base = timed.get((layout, ns[0], batch, beams))
      if lay == layout and n == ns[-1] and len(ns) > 1 and base:
        out.append(
          {
            "layout": layout,
            "batch": batch,
            "beams": beams,
            "n_small": ns[0],
            "n_large": ns[-1],
            "ratio": step / base,
          }
        )
  return out


def summarize(rows: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
  timed = [r for r in rows if "step_ms" in r]
  scaling = step_ratios(rows)
  versus = [
    {
      k: r[k]
      for k in ("layout", "n", "batch", "beams", "step_ms", "dense_step_ms", "dense_over_sparse")
    }
    for r in timed
    if "dense_step_ms" in r
  ]
  ratios = [s["ratio"] for s in scaling]
  return {
    "step_time_ratio": {
      "what": "step time at the largest N / at the smallest N, per layout and config "
      "(target <= 1.5)",
      "max": max(ratios) if ratios else None,
      "median": statistics.median(ratios) if ratios else None,
      "within_target": sum(x <= 1.5 for x in ratios),
      "configs": len(ratios),
      "per_config": scaling,
    },
    "dense_versus_sparse": versus,
    "all_dense_match": all(r["dense_matches"] for r in timed if "dense_matches" in r),
    "memory": [
      {k: m[k] for k in ("layout", "n", "trie_mib", "build_s", "dense_mib", "levels")}
      for m in memory
    ],
  }


def plot(report: dict, path: str) -> None:
  plt = pyplot()
  rows = [r for r in report["results"] if "step_ms" in r]
  mem = report["memory"]
  layouts = list(dict.fromkeys(m["layout"] for m in mem))
  fig, axes = plt.subplots(2, len(layouts), figsize=(4.5 * len(layouts), 8), squeeze=False)
  for li, layout in enumerate(layouts):
    ax = axes[0, li]
    configs = list(dict.fromkeys((r["batch"], r["beams"]) for r in rows if r["layout"] == layout))
    for ci, (batch, beams) in enumerate(configs):
      sel = sorted(
        (r for r in rows if (r["layout"], r["batch"], r["beams"]) == (layout, batch, beams)),
        key=lambda r: r["n"],
      )
      c = f"C{ci}"
      ax.plot(
        [r["n"] for r in sel],
        [r["step_ms"] for r in sel],
        "o-",
        color=c,
        label=f"{batch}x{beams} sparse",
      )
      dsel = [r for r in sel if "dense_step_ms" in r]
      if dsel:
        ax.plot(
          [r["n"] for r in dsel],
          [r["dense_step_ms"] for r in dsel],
          "s--",
          color=c,
          alpha=0.6,
          label=f"{batch}x{beams} dense",
        )
    ax.set(
      xscale="log",
      yscale="log",
      xlabel="number of ids N",
      ylabel="ms per decode step",
      title=f"{layout}: step time",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    ax = axes[1, li]
    sel = sorted((m for m in mem if m["layout"] == layout), key=lambda m: m["n"])
    ax.plot([m["n"] for m in sel], [m["trie_mib"] for m in sel], "o-", label="sparse trie")
    ax.plot([m["n"] for m in sel], [m["dense_mib"] for m in sel], "s--", label="dense table")
    ax.set(
      xscale="log",
      yscale="log",
      xlabel="number of ids N",
      ylabel="MiB",
      title=f"{layout}: trie memory",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  m = report["machine"]
  fig.suptitle(f"trie-constrained beam search, {m['backend']} ({m['device_kind']})")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _fmt(x: float | None) -> str:
  if x is None:
    return "–"
  return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def targets_text(memory: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
  """The issue's targets, checked on these reports (one line each)."""
  lines = []
  for m in memory:
    if (m["layout"], m["n"]) == ("r256x3", 1_000_000):
      lines.append(
        f"- 1M ids of 3 codes over 256: {m['trie_mib']:.2f} MiB (target ≤ 20), built in "
        f"{m['build_s']:.2f} s (target ≤ 2); the dense layout: {m['dense_mib']:.0f} MiB"
      )
    if m["layout"] == "atomic" and m["n"] >= 1_000_000:
      lines.append(
        f"- atomic ids at {human(m['n'])}: {m['trie_mib']:.2f} MiB, {m['bytes_per_id']:.1f} bytes "
        f"per id (the dense layout: {m['dense_mib'] / 2**10:.0f} GiB)"
      )
    if (m["layout"], m["n"]) == ("r256x4", 10_000_000):
      done = [r for r in rows if (r["layout"], r["n"]) == ("r256x4", 10_000_000) and "step_ms" in r]
      lines.append(
        f"- 10M ids of 4 codes over 256: {m['trie_mib']:.1f} MiB built in {m['build_s']:.1f} s, "
        f"decoded in {len(done)} configurations"
      )
  timed = [r for r in rows if "step_ms" in r]
  ratios = step_ratios(rows)
  for layout in dict.fromkeys(r["layout"] for r in ratios):
    mine = [r for r in ratios if r["layout"] == layout]
    text = ", ".join(f"{r['batch']}×{r['beams']}: {r['ratio']:.2f}" for r in mine)
    lines.append(
      f"- {layout}: step time at {human(mine[0]['n_large'])} / at {human(mine[0]['n_small'])} "
      f"(target ≤ 1.5): {text}"
    )
  versus = [r for r in timed if "dense_step_ms" in r and (r["batch"], r["beams"]) == (64, 10)]
  if versus:
    text = ", ".join(
      f"{r['layout']} {human(r['n'])}: {r['dense_step_ms'] / r['step_ms']:.2f}" for r in versus
    )
    lines.append(f"- batch 64 × 10 beams, dense step / sparse step (> 1: sparse faster): {text}")
  return "\n".join(lines)


def render(reports: list[dict[str, Any]]) -> str:
  """Markdown tables of one or more reports (memory and build; step and query time; targets)."""
  memory = [m for r in reports for m in r["memory"]]
  rows = [row for r in reports for row in r["results"]]
  out = [
    markdown_table(
      [
        {
          **m,
          "n": human(m["n"]),
          "dense_mib": m["dense_mib"],
          "dense_build_s": m.get("dense_build_s"),
        }
        for m in memory
      ],
      [
        ("ids", "layout"),
        ("N", "n"),
        ("vocab", "vocab"),
        ("levels (D dense, C CSR, L items)", "levels"),
        ("trie MiB", "trie_mib"),
        ("build s", "build_s"),
        ("dense layout MiB", "dense_mib"),
        ("dense build s", "dense_build_s"),
      ],
    ),
    "",
  ]
  configs = list(dict.fromkeys((r["batch"], r["beams"]) for r in rows))
  table = []
  for layout, n in dict.fromkeys((r["layout"], r["n"]) for r in rows):
    entry = {"layout": layout, "n": human(n)}
    for batch, beams in configs:
      match = [
        r
        for r in rows
        if (r["layout"], r["n"], r["batch"], r["beams"]) == (layout, n, batch, beams)
      ]
      if not match:
        continue
      r = match[0]
      if "step_ms" not in r:
        entry[(batch, beams)] = "skipped¹"
        continue
      cell = f"{_fmt(r['step_ms'])} / {_fmt(r['query_ms'])}"
      if "dense_step_ms" in r:
        cell += f" ({_fmt(r['dense_step_ms'])})"
      if "plain_step_ms" in r:
        cell += f" [no trie {_fmt(r['plain_step_ms'])}]"
      entry[(batch, beams)] = cell
      entry["steps"] = r["steps"]
    table.append(entry)
  out.append(
    markdown_table(
      table,
      [("ids", "layout"), ("N", "n"), ("steps", "steps")]
      + [
        (f"batch {b} × {k} beams: ms/step / ms/query (dense ms/step)", (b, k)) for b, k in configs
      ],
    )
  )
  out.append("")
  out.append(targets_text(memory, rows))
  skipped = {r["skipped"] for r in rows if "skipped" in r}
  if skipped:
    out.append("")
    out.append("¹ " + "; ".join(sorted(skipped)))
  return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description="Trie memory, build time and constrained-decode time against the number of ids.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--out", default="bench_out", help="folder for bench_decode.json and .png")
  p.add_argument("--quick", action="store_true", help="N = 1k, 10k; fewer repeats")
  p.add_argument("--ns", type=int_list, default=None, help="numbers of ids (default 1k,100k,1M)")
  p.add_argument("--layouts", type=str_list, default=["r256x3", "base10", "semantic", "atomic"])
  p.add_argument("--semantic-c", type=int, default=100, help="largest leaf of the semantic ids")
  p.add_argument("--beams", type=int_list, default=[10, 100])
  p.add_argument("--batches", type=int_list, default=[1, 64])
  p.add_argument("--refs", type=str_list, default=["dense"], help="dense, plain, host")
  p.add_argument("--dense-max-gib", type=float, default=3.0, help="largest dense table built")
  p.add_argument(
    "--max-step-gib", type=float, default=6.0, help="skip configs whose step needs more"
  )
  p.add_argument("--host-max-n", type=int, default=100_000, help="largest N for the host dict trie")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
  p.add_argument("--min-time", type=float, default=None, help="seconds per timed repeat")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--render", nargs="+", default=None, help="print the tables of saved reports, run nothing"
  )
  args = p.parse_args(argv)
  unknown = set(args.layouts) - set(LAYOUTS)
  if unknown:
    p.error(f"unknown layouts {sorted(unknown)}: use {', '.join(LAYOUTS)}")
  if args.ns is None:
    args.ns = [1_000, 10_000] if args.quick else [1_000, 100_000, 1_000_000]
  if args.repeats is None:
    args.repeats = 3 if args.quick else 5
  if args.min_time is None:
    args.min_time = 0.01 if args.quick else 0.05
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.render:
    reports = []
    for path in args.render:
      with open(path) as f:
        reports.append(json.load(f))
    print(render(reports))
    return 0
  report = start_report("bench_decode", args)
  report["method"] = {
    "model": "synthetic tokens_to_logits: bias[query] + table[position] + hash(last token), "
    "[rows, vocab] (isolates the decoder's cost)",
    "sparse": "dsi_jax.decoding.beam_search on dsi_jax.trie.from_targets (layout auto), jitted",
    "dense": "the previous layout and search (tools/decode_references.py): "
    "transitions[nodes, vocab], lax.while_loop, full-vocabulary row and top-k over beams x "
    "vocab per step",
    "step_time": "median call time / decode steps run; compile excluded; each repeat averages "
    "back-to-back calls lasting >= min_time",
  }
  report["memory"] = []
  rows = []
  for layout in args.layouts:
    for n in args.ns:
      rows.extend(bench_layout(layout, n, args, report))
  report["results"] = rows
  report["summary"] = summarize(rows, report["memory"])
  json_path = write_report(args.out, "bench_decode", report)
  png = os.path.join(args.out, "bench_decode.png")
  plot(report, png)
  print()
  print(render([report]))
  s = report["summary"]["step_time_ratio"]
  print()
  print(
    f"{s['what']}: max {s['max']}, median {s['median']}, {s['within_target']}/{s['configs']} within"
  )
  print(f"wrote {json_path} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
