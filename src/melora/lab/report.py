"""``melora report``: aggregate results.json files (methods x tasks x seeds) into a table and a plot.

Any runner's results.json works (kind ``glue``, ``instruct`` or ``eval``): runs are grouped by
(kind, label, summary key), so over seeds; a GLUE key such as ``rte/accuracy_best`` already names
its task. Each group gives mean, sample standard deviation and count. Runs that share a label but
differ in a defining option (lr, r, n, data, ...) are refused rather than averaged. Output: one markdown table
per kind (rows: labels, columns: summary keys), a plot of score vs trainable parameters (log x),
and the groups as JSON.

    melora report results/glue --keys '_best$' --output table.md --plot score_vs_params.png
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from melora.atomic import atomic_write_text, write_json_atomic
from melora.lab.records import RunRecord

logger = logging.getLogger(__name__)


@dataclass
class Group:
    """One (kind, label, metric) cell aggregated over runs (normally seeds)."""

    kind: str
    label: str
    metric: str
    values: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); 0 for a single run."""
        if len(self.values) < 2:
            return 0.0
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1))


def find_results(paths: list[str | os.PathLike]) -> list[Path]:
    """``results.json`` files: given directly, inside a run folder, or anywhere below a folder."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / "results.json").is_file():
            found.append(path / "results.json")
        elif path.is_dir():
            found.extend(sorted(path.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{path} does not exist; pass run folders or results.json files.")
    if not found:
        raise FileNotFoundError(f"No results.json found under {', '.join(map(str, paths))}.")
    return list(dict.fromkeys(found))


def load_run(path: Path) -> RunRecord:
    """One results.json as a :class:`~melora.lab.records.RunRecord` (its ``source`` names the file)."""
    return RunRecord.read(path)


def check_comparable(runs: list[RunRecord]) -> None:
    """Refuse to average runs that share a (kind, label) but were configured differently.

    Seeds, output folders, thread counts and the like may differ; anything that changes what a run
    computes (method, r, n, lr, data, epochs, ...) may not. The error names both runs and the options.
    """
    first: dict[tuple[str, str, str | None], RunRecord] = {}
    for run in runs:
        key = (run.kind, run.label, run.task)
        other = first.setdefault(key, run)
        mine, theirs = run.defining_config(), other.defining_config()
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} vs {mine.get(k)!r}" for k in differ[:4])
            raise ValueError(
                f"{other.source} and {run.source} share the label {run.label!r} but "
                f"differ in {shown}; give them distinct --label values or report them separately."
            )


def aggregate(runs: list[RunRecord], keys: str | None = None) -> list[Group]:
    """Group runs by (kind, label, summary key); ``keys`` is a regex that selects summary keys."""
    check_comparable(runs)
    pattern = re.compile(keys) if keys else None
    groups: dict[tuple[str, str, str], Group] = {}
    for run in runs:
        for metric, value in run.summary.items():
            if value is None or (pattern is not None and not pattern.search(metric)):
                continue
            key = (run.kind, run.label, metric)
            group = groups.setdefault(key, Group(*key))
            group.values.append(float(value))
            group.seeds.append(run.seed)
            if run.trainable_params is not None:
                group.trainable_params.append(int(run.trainable_params))
    return list(groups.values())


def _natural_key(text: str) -> list:
    """Sort key that puts ``n=4`` before ``n=16``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _params_text(params: list[int]) -> str:
    if not params:
        return "-"
    low, high = min(params), max(params)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def cell_text(group: Group) -> str:
    """``0.812 ± 0.011 (3)``; a single run has no spread: ``0.812 (1)``."""
    if len(group.values) < 2:
        return f"{group.mean:.3f} (1)"
    return f"{group.mean:.3f} ± {group.std:.3f} ({len(group.values)})"


def markdown_tables(groups: list[Group]) -> str:
    """One markdown table per kind: a row per label, a column per metric, cells ``mean ± std (n)``."""
    by_kind: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_kind[group.kind].append(group)
    blocks = []
    for kind, kind_groups in by_kind.items():
        metrics = sorted({g.metric for g in kind_groups})
        cells = {(g.label, g.metric): g for g in kind_groups}
        labels = sorted(
            {g.label for g in kind_groups},
            key=lambda label: (
                min((p for g in kind_groups if g.label == label for p in g.trainable_params), default=0),
                _natural_key(label),
            ),
        )
        lines = [
            f"**{kind}** (mean ± std over runs, (n) = runs)",
            "",
            "| label | trainable params | " + " | ".join(metrics) + " |",
            "|---|---:|" + "---:|" * len(metrics),
        ]
        for label in labels:
            row = [cells.get((label, m)) for m in metrics]
            params = [p for g in row if g is not None for p in g.trainable_params]
            texts = [cell_text(g) if g else "-" for g in row]
            lines.append(f"| {label} | {_params_text(params)} | " + " | ".join(texts) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def label_params_axis(ax, params: list[int]) -> None:
    """A log x axis of trainable parameters with readable tick labels however narrow the data.

    Powers of ten label the axis when at least two of them lie in view; otherwise (every point within
    one decade, where a log axis would show no label or one) the data's own parameter counts do,
    written in full with thousands separators, those too close to a labelled one left out.
    """
    import matplotlib.ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, numticks=6))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    low, high = ax.get_xlim()
    if not params or math.floor(math.log10(high)) - math.ceil(math.log10(low)) >= 1:
        return
    span = math.log10(high) - math.log10(low)
    ticks: list[int] = []
    for value in sorted(set(params)):  # at least a sixth of the axis apart, so labels do not overlap
        if not ticks or math.log10(value) - math.log10(ticks[-1]) >= span / 6:
            ticks.append(value)
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))


def plot_score_vs_params(
    groups: list[Group], path: str | os.PathLike, references: dict[str, float] | None = None
) -> None:
    """One panel per metric: mean ± std against trainable parameters (log x), one point per label.

    ``references`` (metric -> value), the untuned model's scores, are drawn as dashed lines labelled so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [g for g in groups if g.trainable_params]
    if not plotted:
        raise ValueError("No run has trainable_params; nothing to plot.")
    metrics = sorted({g.metric for g in plotted})
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    labels = sorted({g.label for g in plotted}, key=_natural_key)
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    for ax, metric in zip(axes.flat, metrics):
        for g in (g for g in plotted if g.metric == metric):
            x = sorted(g.trainable_params)[len(g.trainable_params) // 2]
            ax.errorbar(x, g.mean, yerr=g.std, fmt="o", capsize=3, color=colors[g.label], label=g.label)
        if references and metric in references:
            ax.axhline(references[metric], ls="--", color="gray")
        label_params_axis(ax, [p for g in plotted if g.metric == metric for p in g.trainable_params])
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("trainable parameters")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[label]) for label in labels]
    if references and any(metric in references for metric in metrics):
        handles.append(plt.Line2D([], [], ls="--", color="gray"))
        labels = [*labels, "untuned model"]
    ncol = min(2 * cols, 4, len(labels))  # a one-panel figure is narrow: two labels a row
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    legend_inches = 0.15 + 0.17 * math.ceil(len(labels) / ncol)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(
    paths: list[str | os.PathLike],
    keys: str | None = None,
    output: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
) -> str:
    """Aggregate the runs under ``paths``; write the table/plot/JSON where asked; return the table."""
    files = find_results(paths)
    groups = aggregate([load_run(f) for f in files], keys)
    if not groups:
        raise ValueError(f"No summary key matches {keys!r} in {len(files)} results.json file(s).")
    table = markdown_tables(groups)
    if output:
        atomic_write_text(output, table)
    if plot:
        plot_score_vs_params(groups, plot)
    if json_path:
        rows = [{**asdict(g), "mean": g.mean, "std": g.std, "n": len(g.values)} for g in groups]
        write_json_atomic(json_path, {"runs": [str(f) for f in files], "groups": rows})
    logger.info("Aggregated %d results.json into %d groups", len(files), len(groups))
    return table


def main(args: argparse.Namespace) -> int:
    """CLI entry: print the table."""
    output, plot, json_path = args.output, args.plot, args.json
    if args.output_dir:
        folder = Path(args.output_dir)
        output = output or folder / "table.md"
        plot = plot or folder / "score_vs_params.png"
        json_path = json_path or folder / "groups.json"
    print(report(args.runs, keys=args.keys, output=output, plot=plot, json_path=json_path), end="")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``melora report``."""
    parser = subparsers.add_parser(
        "report",
        help="aggregate results.json files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", help="run folders, results.json files or folders to search")
    parser.add_argument("--keys", default=None, help="regex selecting summary keys, e.g. '_best$'")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="write table.md, score_vs_params.png and groups.json into this folder",
    )
    parser.add_argument("--output", default=None, help="write the markdown table here")
    parser.add_argument("--plot", default=None, help="write the score-vs-params plot here (.png)")
    parser.add_argument("--json", default=None, help="write the aggregated groups here")
    parser.set_defaults(func=main)
    return parser
