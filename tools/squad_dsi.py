"""Text DSI on SQuAD v1.1 dev with every docid scheme, against BM25 and the MiniLM dual encoder.

# 1. read the SeqIO tasks and save each scheme's arrays (needs the data stack):
DSI_JAX_SQUAD_FILE=path/to/dev-v1.1.json python tools/squad_dsi.py export --out squad_data
# (--pseudo-queries 4: each paragraph's sentences and word-piece spans as more training queries)
# 2. train (only JAX, Flax, optax, tokenizers and safetensors needed; a GPU helps):
python tools/squad_dsi.py train --data squad_data --out squad_runs [--schemes semantic rq]
# (--model t5 on both: SentencePiece pieces and T5-DSI trained from scratch;
#  --frozen-encoder: MiniLM frozen, its outputs computed once, the decoder trained: CPU-sized;
#  --embedding-ids: atomic ids that start from MiniLM's paragraph embeddings;
#  --teacher dual_encoder: a ranking loss distilling the dual encoder's scores)
# 3. baselines on the same test questions, then one table:
python tools/squad_dsi.py baselines --data squad_data --out squad_runs
python tools/squad_dsi.py table --out squad_runs
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  models = ("minilm", "t5")
  model_help = "minilm: MiniLM word pieces, MiniLM-DSI; t5: SentencePiece, T5-DSI from scratch"
  p = sub.add_parser("export", help="save each scheme's arrays, read through the SeqIO tasks")
  p.add_argument("--out", required=True)
  p.add_argument("--schemes", nargs="+", default=None)
  p.add_argument("--model", choices=models, default="minilm", help=model_help)
  p.add_argument(
    "--pseudo-queries",
    type=int,
    default=0,
    metavar="N",
    help="N pseudo-queries per paragraph (its sentences and word-piece spans) after the "
    "training questions",
  )
  p.add_argument(
    "--views",
    nargs="+",
    choices=("sentence", "span"),
    default=("sentence", "span"),
    help="the pseudo-queries' views, drawn with equal weight",
  )
  p = sub.add_parser("train", help="train MiniLM-DSI (or T5-DSI) for each scheme")
  p.add_argument("--data", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--schemes", nargs="+", default=None)
  p.add_argument("--model", choices=models, default="minilm", help=model_help)
  p.add_argument("--minilm", default=None, help="MiniLM folder (default: the installed package)")
  p.add_argument("--quick", action="store_true", help="a few steps only (a smoke run)")
  p.add_argument(
    "--frozen-encoder",
    action="store_true",
    help="MiniLM frozen: train the docid decoder on its outputs, computed once (CPU-sized)",
  )
  p.add_argument(
    "--embedding-ids",
    action="store_true",
    help="atomic ids that start from MiniLM's paragraph embeddings (step 0 ranks as the "
    "zero-shot dual encoder)",
  )
  p.add_argument(
    "--embedding-rows",
    choices=("index", "paragraph"),
    default="index",
    help="with --embedding-ids: rows from the indexing input (64 word pieces) or from the "
    "whole paragraph (--frozen-encoder)",
  )
  p.add_argument(
    "--teacher",
    choices=("dual_encoder",),
    default=None,
    help="ranking loss (--frozen-encoder): distil the zero-shot MiniLM dual encoder's scores",
  )
  p.add_argument("--rank-weight", type=float, default=1.0, help="with --teacher: its weight")
  p.add_argument(
    "--rank-hard-negatives", type=int, default=15, help="with --teacher: the teacher's best"
  )
  p.add_argument(
    "--rank-temperature", type=float, default=0.05, help="with --teacher: its softmax's"
  )
  p.add_argument("--index-steps", type=int, default=None, help="cap of the indexing phase")
  p.add_argument("--finetune-steps", type=int, default=None, help="cap of the fine-tuning phase")
  p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
  p = sub.add_parser("baselines", help="BM25 and the zero-shot MiniLM dual encoder")
  p.add_argument("--data", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--minilm", default=None)
  p = sub.add_parser("table", help="merge the result files of --out into one table")
  p.add_argument("--out", required=True)
  args = parser.parse_args(argv)

  from dsi_jax import results
  from dsi_jax.experiments import squad

  schemes = getattr(args, "schemes", None) or list(squad.SCHEMES)
  if args.command == "export":
    from dsi_jax.tasks.pseudo_queries import PseudoQueries

    pseudo = None
    if args.pseudo_queries:
      pseudo = PseudoQueries(args.pseudo_queries, views=tuple((v, 1.0) for v in args.views))
    for scheme in schemes:
      folder = os.path.join(args.out, _folder(scheme, args.model))
      squad.export(scheme, folder, model=args.model, pseudo_queries=pseudo)
      print(f"exported {scheme} ({args.model})")
    return 0
  os.makedirs(args.out, exist_ok=True)
  if args.command == "train":
    import dataclasses

    if args.frozen_encoder and args.model != "minilm":
      parser.error("--frozen-encoder needs --model minilm (T5-DSI trains from scratch)")
    config = squad.default_config(args.quick, args.model)
    for field, value in (
      ("index_max_steps", args.index_steps),
      ("finetune_max_steps", args.finetune_steps),
      ("index_eval_every", args.eval_every),
      ("finetune_eval_every", args.eval_every),
    ):
      if value is not None:
        config = dataclasses.replace(config, **{field: value})
    if args.teacher:
      config = dataclasses.replace(
        config,
        rank_weight=args.rank_weight,
        rank_hard_negatives=args.rank_hard_negatives,
        rank_temperature=args.rank_temperature,
      )
    suffix = ("_frozen" if args.frozen_encoder else "") + ("_embids" if args.embedding_ids else "")
    if args.embedding_ids and args.embedding_rows != "index":
      suffix += f"_{args.embedding_rows}"
    suffix += f"_distilled_w{args.rank_weight:g}" if args.teacher else ""
    run_config = squad.SquadConfig(
      train=config,
      frozen_encoder=args.frozen_encoder,
      embedding_ids=args.embedding_ids,
      embedding_rows=args.embedding_rows,
      teacher=args.teacher,
      minilm_path=args.minilm,
      max_eval_queries=64 if args.quick else None,
      # A smoke run: a tiny T5 (T5.1.1 small is 48M parameters, slow on a CPU).
      t5_sizes=dict(width=64, depth=2, num_heads=2, head_dim=32, mlp_dim=128)
      if args.quick
      else None,
    )
    for scheme in schemes:
      workdir = os.path.join(args.out, f"dsi_{_folder(scheme, args.model)}{suffix}")
      rows = squad.run(
        os.path.join(args.data, _folder(scheme, args.model)),
        workdir,
        config=run_config,
        show_progress=True,
      )
      results.write_report(
        workdir,
        rows,
        {"scheme": scheme, "model": args.model, **dataclasses.asdict(run_config)},
        command=results.invocation("python tools/squad_dsi.py", argv),
      )
    return 0
  if args.command == "baselines":
    rows = squad.baseline_rows(os.path.join(args.data, squad.SCHEMES[0]), minilm_path=args.minilm)
    results.write_report(
      os.path.join(args.out, "baselines"),
      rows,
      {"data": os.path.basename(os.path.abspath(args.data))},
      command=results.invocation("python tools/squad_dsi.py", argv),
    )
    return 0
  rows = []
  for path in sorted(glob.glob(os.path.join(args.out, "*", "results.json"))):
    rows.extend(results.load(path)["rows"])
  print(results.markdown_table(rows))
  return 0


def _folder(scheme: str, model: str) -> str:
  return scheme if model == "minilm" else f"{scheme}_{model}"


if __name__ == "__main__":
  raise SystemExit(main())
