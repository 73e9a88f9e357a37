"""The n ablation of a study: MELoRA methods sharing r with >= 3 values of n, as a table and a plot.

Each point is the tuning seed's score at that method's chosen learning rate, the one number every
ablation method has (ablation methods usually run one seed); methods with more seeds show them as
extra dots. The study's LoRA methods are drawn as dashed lines at their own tuning-seed score, the
reference a reader compares the ablation against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melora.lab.study.plan import Plan, lr_text
from melora.lab.study.results import per_seed
from melora.lab.study.spec import StudySpec


def ablation_series(spec: StudySpec) -> dict[int, list]:
    """r -> the MELoRA methods with that r, by n, where the study has >= 3 values of n for it."""
    by_r: dict[int, list] = {}
    for entry in spec.methods:
        if entry.adapter.method == "melora":
            by_r.setdefault(entry.adapter.r, []).append(entry)
    return {
        r: sorted(entries, key=lambda e: e.adapter.n)
        for r, entries in by_r.items()
        if len({e.adapter.n for e in entries}) >= 3
    }


def _tuning_score(plan: Plan, task: str, slug: str) -> tuple[float | None, float | None]:
    """(chosen lr, the tuning seed's score there); (None, None) while the sweep is open or missing."""
    chosen = plan.chosen.get((task, slug))
    if chosen is None:
        return None, None
    return chosen, plan.sweeps.get((task, slug), {}).get(chosen)


def ablation_rows(spec: StudySpec, plan: Plan) -> list[dict[str, Any]]:
    """One row per (task, r, n) with a finished chosen run: its lr, tuning-seed score and other seeds.

    Only tasks where >= 2 values of n have finished: a task the ablation does not cover is left out.
    """
    rows = []
    for task in spec.tasks:
        metric = spec.metric_for(task)
        for r, entries in ablation_series(spec).items():
            for entry in entries:
                lr, score = _tuning_score(plan, task, entry.slug)
                if score is None:
                    continue
                seeds = per_seed(plan, task, entry.slug, metric)
                rows.append({"task": task, "metric": metric, "r": r, "n": entry.adapter.n,
                             "slug": entry.slug, "lr": lr, "score": score,
                             "seeds": {str(s): v for s, v in sorted(seeds.items())}})  # fmt: skip
    ns = {task: {(row["r"], row["n"]) for row in rows if row["task"] == task} for task in spec.tasks}
    return [row for row in rows if len(ns[row["task"]]) >= 2]  # one n on a task is no ablation


def ablation_table(spec: StudySpec, rows: list[dict[str, Any]]) -> str:
    """Markdown: per task, the score at each n (tuning seed, chosen lr), the best n in bold."""
    lines = ["| task | metric | r | n | chosen lr | score (tuning seed) | all seeds at that lr |",
             "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for task in spec.tasks:
        mine = [row for row in rows if row["task"] == task]
        if not mine:
            continue
        lower = spec.lower_is_better(mine[0]["metric"])
        best = (min if lower else max)(row["score"] for row in mine)
        for row in mine:
            score = f"{row['score']:.4f}"
            others = ", ".join(f"s{s}: {v:.4f}" for s, v in row["seeds"].items())
            lines.append(
                f"| {task} | {row['metric']} | {row['r']} | {row['n']} | {lr_text(row['lr'])} | "
                f"{'**' + score + '**' if row['score'] == best else score} | {others} |"
            )
    return "\n".join(lines)


def plot_n_ablation(spec: StudySpec, plan: Plan, rows: list[dict[str, Any]], path: Path) -> bool:
    """Score vs n (log2 x), one panel per task of ``rows``; False (nothing written) if there are none."""
    from melora.lab.study.figures import label_panel, save, task_panels

    tasks = [t for t in spec.tasks if any(row["task"] == t for row in rows)]
    if not tasks:
        return False
    fig, axes = task_panels(len(tasks))
    for ax, task in zip(axes, tasks):
        mine = [row for row in rows if row["task"] == task]
        for r in sorted({row["r"] for row in mine}):
            points = [row for row in mine if row["r"] == r]
            (line,) = ax.plot([p["n"] for p in points], [p["score"] for p in points], marker="o",
                              label=f"MELoRA r={r} (tuning seed)")  # fmt: skip
            extra = [(p["n"], v) for p in points for s, v in p["seeds"].items() if int(s) != spec.tune.seed]
            if extra:
                ax.plot(
                    *zip(*extra), ".", color=line.get_color(), alpha=0.6, label=f"MELoRA r={r}, other seeds"
                )
        for entry in spec.methods:
            if entry.adapter.method == "lora":
                lr, score = _tuning_score(plan, task, entry.slug)
                if score is not None:
                    ax.axhline(score, ls="--", lw=1, color="grey", label=f"{entry.label} (tuning seed)")
        ax.set_xscale("log", base=2)
        label_panel(ax, f"{task}: {spec.metric_for(task).split('/')[-1]}", "n (mini LoRAs)")
    save(fig, path)
    return True
