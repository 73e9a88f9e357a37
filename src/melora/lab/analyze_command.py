"""``melora analyze``: spectra, effective ranks and (MELoRA) block diversity of trained adapters.

Prints one markdown table per adapter; with ``--out DIR`` writes ``analysis.json`` (one
``melora.analysis.analyze_adapter`` result per adapter, in the order given), ``analysis.md`` (the tables) and,
where matplotlib is installed (the lab extra), ``figures/spectra.png`` and ``figures/effective_rank.png``.
Needs only the core: without matplotlib it says so in one line and writes everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from melora.analysis import DEFAULT_FRACTION, analysis_table, analyze_adapter
from melora.atomic import atomic_write_text, write_json_atomic

JSON_FILE = "analysis.json"
TABLE_FILE = "analysis.md"
FIGURES_FOLDER = "figures"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="singular values, effective rank and block diversity of MELoRA / LoRA adapters",
        description="For every adapted module of each adapter: the singular values of the scaled update dW, its "
        "entropy effective rank and the count above a fraction of the largest, its norms, and for MELoRA the "
        "energy shares and subspace overlaps of the mini LoRAs (beside what random subspaces give).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER_OR_RUN",
        help="saved MELoRA or LoRA adapter folder, or a melora run folder holding adapter/",
    )
    parser.add_argument("--out", default=None, help="folder for analysis.json, analysis.md and figures/")
    parser.add_argument(
        "--fraction",
        type=float,
        default=DEFAULT_FRACTION,
        help="count the singular values above this fraction of the largest",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="for LoRA adapters: the share of each update's energy in N diagonal blocks (what MELoRA with n=N "
        "could represent)",
    )
    parser.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --out: draw the spectra and effective-rank figures (needs matplotlib)",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """CLI entry of ``melora analyze``."""
    results = [
        analyze_adapter(path, fraction=args.fraction, blocks_for_lora=args.blocks) for path in args.adapters
    ]
    tables = "\n".join(analysis_table(result) for result in results)
    print(tables, end="")
    if args.out is None:
        return 0
    out = Path(args.out)
    write_json_atomic(out / JSON_FILE, {"adapters": results})
    atomic_write_text(out / TABLE_FILE, tables)
    print(f"wrote {out / JSON_FILE} and {out / TABLE_FILE}")
    if args.plots:
        try:
            from melora.lab.analysis_figures import write_figures

            paths = write_figures(results, out / FIGURES_FOLDER)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] != "matplotlib":
                raise
            print(
                "melora analyze: no figures: plots need matplotlib (pip install 'melora[lab]')",
                file=sys.stderr,
            )
        else:
            print("wrote " + " and ".join(str(path) for path in paths))
    return 0
