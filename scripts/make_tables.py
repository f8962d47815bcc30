r"""Paper tables from formulas and results files, one subcommand per table.

  python scripts/make_tables.py memory                      # Infini-attention Table 1, paper LM config
  python scripts/make_tables.py memory --context_length=1048576 --num_layers=24
  python scripts/make_tables.py passkey results/passkey.json [more.json ...] [--metric=token_accuracy]
                                        [--heatmap [out.png]]  # Table 3 layout (+ paper rows), heatmap

Each subcommand is a function cmd_<name>(args) registered in _build_parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from memlm_jax.evaluation import memory_footprint as mf  # noqa: E402
from memlm_jax.evaluation import passkey_report as pk  # noqa: E402


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Column-aligned markdown table."""
  return pk.markdown(header, rows)


def cmd_memory(args: argparse.Namespace) -> None:
  """Infini-attention Table 1: memory footprint, context, compression vs Memorizing Transformers."""
  cfg = mf.paper_lm_config(num_layers=args.num_layers, num_heads=args.num_heads, head_dim=args.head_dim,
                           segment_length=args.segment_length, context_length=args.context_length,
                           knn_memory_length=args.knn_memory_length)
  rows = mf.memory_footprints(cfg)
  exact = mf.compression_ratios(rows)
  rounded = mf.compression_ratios(rows, rounded=True)
  with_paper = cfg == mf.paper_lm_config()
  header = ["Model", "Memory footprint", "Floats", "~", "Context", "Tokens", "Update", "Retrieval",
            "vs MemTrf (exact)", "vs MemTrf (rounded)"] + (["Paper Table 2"] if with_paper else [])
  table = []
  for r in rows:
    row = [r.model, r.formula, f"{r.floats:,}", mf.format_count(r.floats), r.context_formula,
           f"{r.context_length:,}", r.update, r.retrieval, mf.format_ratio(exact[r.model]),
           mf.format_ratio(rounded[r.model])]
    if with_paper:
      row.append(" / ".join(mf.PAPER_TABLE2[r.model]) if r.model in mf.PAPER_TABLE2 else "-")
    table.append(row)
  print(f"l={cfg.num_layers} H={cfg.num_heads} d_key={cfg.d_key} d_value={cfg.d_value} d_model={cfg.d_model} "
        f"N={cfg.segment_length} S={cfg.num_segments} | c={cfg.c} r={cfg.compression_rate} M={cfg.knn_memory_length:,} "
        f"k={cfg.knn_layers} p_RMT={cfg.rmt_memory_tokens} p_AC={cfg.autocompressor_summary_tokens} m={cfg.m}")
  print(markdown_table(header, table))
  kv = cfg.d_key + cfg.d_value
  table1 = kv * cfg.num_heads * cfg.segment_length * cfg.num_segments
  print(f"\nMemorizing Transformers: Table 1 writes (d_key+d_value)*H*N*S = {table1:,} ({mf.format_count(table1)}); "
        f"we count a Transformer-XL cache at every layer plus a kNN memory of M={cfg.knn_memory_length:,} tokens at "
        f"k={cfg.knn_layers} layer(s), which gives the paper's 183M (M=65,000) for its config.")
  print("Footprints count floats. 'rounded' ratios divide the rounded sizes, as the paper's Table 2 does.")
  if not with_paper:
    print("Paper Table 2 column omitted: the config differs from the paper's.")


def cmd_passkey(args: argparse.Namespace) -> None:
  """Infini-attention Table 3: passkey retrieval start/middle/end per length, beside the paper's rows."""
  results = []
  for path in args.results:
    try:
      results.append(pk.load_results(path))
    except OSError as e:
      raise ValueError(f"cannot read {path}: {e.strerror or e}") from e
  metrics = pk.METRICS if args.metric == "both" else (args.metric,)
  for i, metric in enumerate(metrics):  # the paper's rows once, after the last (token accuracy: its metric)
    print(("\n" if i else "") + pk.passkey_table(results, metric=metric,
                                                 paper=not args.no_paper and i == len(metrics) - 1))
  if args.heatmap is not None:
    path = args.heatmap or os.path.splitext(pk.latest_results_path(args.results[0]))[0] + "_heatmap.png"
    if path.endswith(".json"):
      raise ValueError(f"--heatmap {path}: refusing to write a PNG over a .json (put --heatmap last).")
    pk.passkey_heatmap(results, path, metric=metrics[0], depth_bins=args.depth_bins)
    print(f"\nwrote heatmap {path}")


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  memory = sub.add_parser("memory", help=cmd_memory.__doc__)
  memory.add_argument("--num_layers", type=int, default=12)
  memory.add_argument("--num_heads", type=int, default=8)
  memory.add_argument("--head_dim", type=int, default=128, help="d_key = d_value; d_model = num_heads * head_dim")
  memory.add_argument("--segment_length", type=int, default=2048)
  memory.add_argument("--context_length", type=int, default=65_536, help="S = ceil(context / segment)")
  memory.add_argument("--knn_memory_length", type=int, default=65_000, help="Memorizing Transformers kNN memory M")
  memory.set_defaults(func=cmd_memory)

  passkey = sub.add_parser("passkey", help=cmd_passkey.__doc__)
  passkey.add_argument("results", nargs="+", help="passkey results JSON(s) or model directories (their newest eval/passkey_<hash>_step<N>.json), one row each")
  passkey.add_argument("--metric", choices=pk.METRICS + ("both",), default="exact_match",
                       help="'both': exact match, then token accuracy beside the paper (heatmap: exact match)")
  passkey.add_argument("--heatmap", nargs="?", const="", default=None, metavar="PNG",
                       help="write a length x depth heatmap (default path: <first JSON>_heatmap.png)")
  passkey.add_argument("--depth_bins", type=int, default=None,
                       help=f"heatmap depth bins (default: {pk.DEPTH_BINS} if every length has "
                            f"{pk.MIN_EXAMPLES_PER_BIN * pk.DEPTH_BINS}+ examples, else the 3 buckets)")
  passkey.add_argument("--no_paper", action="store_true", help="omit the paper's Table 3 rows")
  passkey.set_defaults(func=cmd_passkey)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _build_parser().parse_args(argv)
  try:
    args.func(args)
  except ValueError as e:
    print(f"make_tables: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
