"""Did every method learn? Each chosen run against its task's trivial baseline, and the learning curves.

A score *clears* the baseline when it exceeds it by more than what a constant predictor reaches by
chance on a dev set of that size: two standard errors, ``2 * sqrt(b (1 - b) / N)`` for an accuracy
``b`` of the majority class and ``2 / sqrt(N)`` for a correlation (MCC, Pearson, Spearman), whose
standard error under no association is about ``1 / sqrt(N)``. With RTE's 277 dev examples that is
0.060 accuracy; with CoLA's 1,043 it is 0.062 MCC. A (task, method) *learns* when every one of its
seeds clears it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from melora.lab.records import RunRecord
from melora.lab.study.spec import StudySpec

CORRELATIONS = ("mcc", "pearson", "spearman")


def clear_margin(metric: str, baseline: float, num_eval: int) -> float:
    """Two standard errors of ``metric`` for a predictor that ignores its input, on ``num_eval`` examples."""
    if num_eval < 1:
        raise ValueError(f"num_eval={num_eval}: expected at least one dev example")
    if metric in CORRELATIONS:
        return 2.0 / math.sqrt(num_eval)
    if not 0.0 <= baseline <= 1.0:
        raise ValueError(f"{metric} baseline {baseline}: expected a rate in [0, 1]")
    return 2.0 * math.sqrt(baseline * (1.0 - baseline) / num_eval)


def _metric_name(spec: StudySpec, task: str) -> str:
    """``cola/mcc_best`` -> ``mcc``: the key of ``trivial_baseline`` and of each epoch's metrics."""
    key = spec.metric_for(task).split("/", 1)[-1]
    return key.removesuffix("_best").removesuffix("_last")


def learning_rows(spec: StudySpec, runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Per (task, method) over ``runs`` (those at the chosen lr): mean, worst seed, baseline, margin and
    whether it learns."""
    rows = []
    for task in spec.tasks:
        name = _metric_name(spec, task)
        for entry in spec.methods:
            mine = [r for r in runs if r.task == task and r.slug == entry.slug]
            if not mine:
                continue
            scores = [float(r.summary[spec.metric_for(task)]) for r in mine]
            # the same for every run of a task; runs written before a field existed may lack it
            baseline = next(
                (float(r.details["trivial_baseline"][name]) for r in mine
                 if name in r.details.get("trivial_baseline", {})),
                math.nan,
            )  # fmt: skip
            num_eval = next((r.details["num_eval_examples"] for r in mine if r.details.get("num_eval_examples")),
                            None)  # fmt: skip
            margin = (
                clear_margin(name, baseline, int(num_eval)) if num_eval and not math.isnan(baseline) else None
            )
            worst = min(scores)
            rows.append(
                {
                    "task": task,
                    "slug": entry.slug,
                    "label": entry.label,
                    "metric": name,
                    "n": len(scores),
                    "mean": sum(scores) / len(scores),
                    "worst": worst,
                    "baseline": baseline,
                    "margin": margin,
                    "learns": None if margin is None else worst > baseline + margin,
                }
            )
    return rows


def learning_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | method | metric | mean (n) | worst seed | trivial baseline | clear by | learns |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        margin = "-" if row["margin"] is None else f"> {row['baseline'] + row['margin']:.3f}"
        verdict = {True: "yes", False: "**no**", None: "unknown (no dev size)"}[row["learns"]]
        lines.append(
            f"| {row['task']} | {row['label']} | {row['metric']} | {row['mean']:.3f} ({row['n']}) | "
            f"{row['worst']:.3f} | {row['baseline']:.3f} | {margin} | {verdict} |"
        )
    return "\n".join(lines)


def plot_learning_curves(spec: StudySpec, runs: list[RunRecord], path: Path) -> bool:
    """Dev metric per epoch of each method's chosen run at the tuning seed, the baseline dashed;
    False (nothing written) when no run recorded its epochs."""
    from melora.lab.study.figures import label_panel, save, task_panels

    tasks = [t for t in spec.tasks if any(r.task == t and r.details.get("epochs") for r in runs)]
    if not tasks:
        return False
    fig, axes = task_panels(len(tasks))
    for ax, task in zip(axes, tasks):
        name = _metric_name(spec, task)
        baseline = None
        for entry in spec.methods:
            mine = sorted(
                (r for r in runs if r.task == task and r.slug == entry.slug and r.details.get("epochs")),
                key=lambda r: (r.seed != spec.tune.seed, r.seed),
            )
            if not mine:
                continue
            curve = [(e["epoch"], e[name]) for e in mine[0].details["epochs"] if name in e]
            ax.plot(*zip(*curve), marker=".", label=entry.label)
            baseline = mine[0].details.get("trivial_baseline", {}).get(name, baseline)
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="trivial baseline")
        label_panel(ax, f"{task}: dev {name}", "epoch")
    save(fig, path)
    return True
