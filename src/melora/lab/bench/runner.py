"""``melora bench``: run benchmark experiments (YAML) to JSON, then render markdown tables and plots.

melora bench benchmarks/layer.yaml benchmarks/e2e.yaml      # measure + render
melora bench --quick benchmarks/quick.yaml                   # CI smoke test (< 2 minutes)
melora bench --render benchmarks/results/layer.json          # render only
melora bench --compile benchmarks/e2e.yaml                   # eager and torch.compile, side by side
melora bench benchmarks/layer.yaml --output-dir my-run       # JSON, markdown and plot into my-run/

Where a run writes: --output-dir when given (the plot too, unless --figures-dir says otherwise); else,
with --quick, bench-<name>/ in the current folder (toy sizes: keep them out of the committed results);
else the repository's layout, benchmarks/results/ and docs/figures/ (run from the repository root).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from melora.atomic import atomic_write_text, write_json_atomic
from melora.lab.bench.benchmark import run_experiment
from melora.lab.bench.config import experiment_from_dict
from melora.lab.bench.render import render_markdown, render_plot
from melora.lab.yaml_files import read_yaml

RESULTS_DIR = Path("benchmarks/results")  # the committed results (relative to the repository root)
FIGURES_DIR = Path("docs/figures")


def output_dirs(args: argparse.Namespace, label: str) -> tuple[Path, Path]:
    """(results folder, figures folder) of the experiment ``label``: see the module docstring."""
    if args.out_dir is not None:
        out = args.out_dir
    elif args.quick:
        out = Path(f"bench-{label}")
    else:
        return RESULTS_DIR, args.figures_dir or FIGURES_DIR
    return out, args.figures_dir or out


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed / memory / parameter benchmarks of MELoRA against LoRA, GraLoRA, a loop and the base",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="experiment YAML files (or results JSON with --render)"
    )
    parser.add_argument("--render", action="store_true", help="the paths are results JSON: only render them")
    parser.add_argument("--quick", action="store_true", help="smoke test: first case, small sizes, 2 repeats")
    parser.add_argument(
        "--output-dir",
        "--out-dir",
        dest="out_dir",
        type=Path,
        default=None,
        help="JSON + markdown + plot folder (default: bench-<name>/ with --quick, else "
        f"{RESULTS_DIR}/ and the plot in {FIGURES_DIR}/)",
    )
    parser.add_argument(
        "--figures-dir", type=Path, default=None, help="plot folder (default: see --output-dir)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (overrides the YAML)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (overrides the YAML)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="overrides the YAML")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="base dtype (overrides the YAML)",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-configuration memory processes"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure every configuration under torch.compile, interleaved with the eager ones "
        "(results are written as <name>-compile)",
    )
    parser.set_defaults(func=main)


def render_files(results: dict[str, Any], out_dir: Path, figures_dir: Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<label>.md`` and ``<figures_dir>/bench_<label>.png``; return both paths."""
    markdown = out_dir / f"{results['label']}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(results)
    if results.get("command"):
        text = f"Command: `{results['command']}`\n\n" + text
    atomic_write_text(markdown, text)
    plot = render_plot(results, figures_dir / f"bench_{results['label']}.png")
    return markdown, plot


def main(args: argparse.Namespace) -> int:
    """``melora bench``: measure each experiment (or read its results JSON), then render it."""
    folders: list[Path] = []
    for path in args.paths:
        if args.render:
            results = json.loads(path.read_text(encoding="utf-8"))
        else:
            experiment = experiment_from_dict(read_yaml(path))
            overrides = {
                key: value
                for key, value in (
                    ("threads", args.threads),
                    ("repeats", args.repeats),
                    ("device", args.device),
                    ("dtype", args.dtype),
                )
                if value is not None
            }
            if args.no_memory:
                overrides["memory"] = False
            if args.compile and not experiment.compile:
                overrides.update(compile=True, name=f"{experiment.name}-compile")
            experiment = dataclasses.replace(experiment, **overrides)
            if args.quick:
                experiment = experiment.quick()
            print(f"melora bench: {experiment.name} ({len(experiment.methods())} configurations)", flush=True)
            results = run_experiment(experiment)
            results["command"] = shlex.join(["melora", *sys.argv[1:]])
        out_dir, figures_dir = output_dirs(args, results["label"])
        if not args.render:
            write_json_atomic(out_dir / f"{results['label']}.json", results)
        markdown, plot = render_files(results, out_dir, figures_dir)
        print(markdown.read_text(encoding="utf-8"))
        print(f"wrote {markdown} and {plot}")
        folders.append(out_dir)
    print("melora bench: results in " + ", ".join(f"{folder}/" for folder in dict.fromkeys(folders)))
    return 0
