"""A finished (or partly finished) study as tables, paired comparisons and plots.

The tables and the score-vs-parameters plot come from :mod:`melora.lab.report` (the same code as
``melora report``), over the runs at each method's chosen learning rate. Added here: the
learning-rate sweep per task and method with the chosen point marked, the paired per-seed
comparisons with 95% intervals and a verdict sentence each, and the n ablation's table and plot when
the study has one (:mod:`melora.lab.study.ablation`); for GLUE studies, each method against its task's
trivial baseline and the learning curves (:mod:`melora.lab.study.learning`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from melora.lab.report import aggregate, cell_text, load_run, plot_score_vs_params
from melora.lab.study.ablation import ablation_rows, ablation_table, plot_n_ablation
from melora.lab.study.plan import Plan, is_done, lr_text, read_metric
from melora.lab.study.spec import StudySpec
from melora.lab.study.stats import paired_difference


def chosen_runs(spec: StudySpec, plan: Plan, kind: str = "train") -> list[dict[str, Any]]:
    """The results of every finished run at its method's chosen learning rate."""
    runs = []
    for job in plan.jobs:
        if job.kind == kind and plan.chosen.get((job.task, job.slug)) == job.lr and job.results.is_file():
            runs.append(load_run(job.results))
    return runs


def base_runs(plan: Plan) -> list[dict[str, Any]]:
    """The finished evaluations of the untuned model (``eval.base``), one per task."""
    return [load_run(job.results) for job in plan.jobs if job.kind == "base" and is_done(job)]


def base_heldout_loss(plan: Plan) -> dict[str, Any] | None:
    """The untuned model's held-out loss per seed, as the instruct runs that measured it (``eval_base``) found it.

    Every run holds out the same examples (``data_seed``), but the Trainer's evaluation loss is a mean
    of per-batch means, and with ``group_by_length`` the held-out batches are grouped by a sampler
    seeded with the run's seed: the level is per seed, and runs of one seed see the same batches.
    Returns ``{"by_seed": {seed: loss}, "mean": mean over seeds}``.
    """
    by_seed: dict[int, float] = {}
    for job in plan.jobs:
        if job.kind == "train" and job.results.is_file():
            value = load_run(job.results).get("heldout_loss_base")
            if value is not None:
                by_seed.setdefault(job.seed, float(value))
    if not by_seed:
        return None
    return {"by_seed": dict(sorted(by_seed.items())), "mean": sum(by_seed.values()) / len(by_seed)}


def per_seed(
    spec: StudySpec, plan: Plan, task: str, slug: str, metric: str, kind: str = "train"
) -> dict[int, float]:
    out = {}
    for job in plan.jobs:
        if (job.kind, job.task, job.slug) == (kind, task, slug) and plan.chosen.get((task, slug)) == job.lr:
            value = read_metric(job.results, metric)
            if value is not None:
                out[job.seed] = value
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def sweep_table(spec: StudySpec, plan: Plan) -> str:
    """Per task and method: the score at each learning rate of the tuning seed, the chosen one in bold."""
    lines = ["| task | method | " + "learning rate: score (tuning seed) | chosen |", "|---|---|---|---:|"]
    waiting = []
    for (task, slug), scores in sorted(plan.sweeps.items()):
        if all(value is None for value in scores.values()):
            waiting.append(f"{task}/{spec.method(slug).label}")
            continue
        chosen = plan.chosen.get((task, slug))
        cells = []
        for lr in sorted(scores):
            text = f"{lr_text(lr)}: {_fmt(scores[lr])}"
            cells.append(f"**{text}**" if lr == chosen else text)
        edge = ""
        if chosen is not None and chosen in (min(scores), max(scores)):
            edge = " (edge: extension limit reached)"
        lines.append(
            f"| {task} | {spec.method(slug).label} | {', '.join(cells)} | "
            f"{lr_text(chosen) + edge if chosen else 'pending'} |"
        )
    if waiting:
        lines += ["", f"Not started yet: {', '.join(waiting)}."]
    return "\n".join(lines)


def comparisons(spec: StudySpec, plan: Plan, kind: str = "train") -> list[dict[str, Any]]:
    """One row per (compare pair, task) and, for instruct studies with evals, per eval metric."""
    rows = []
    for a, b in spec.compare:
        for task in spec.tasks:
            metrics = [spec.metric_for(task)]
            if kind == "eval":
                metrics = sorted({m for r in chosen_runs(spec, plan, "eval") for m in r["summary"]})
            for metric in metrics:
                paired = paired_difference(
                    per_seed(spec, plan, task, a, metric, kind), per_seed(spec, plan, task, b, metric, kind)
                )
                if paired is None:
                    continue
                rows.append({"a": a, "b": b, "task": task, "metric": metric, "paired": paired,
                             "verdict": paired.verdict(spec.lower_is_better(metric))})  # fmt: skip
    return rows


def comparison_table(spec: StudySpec, rows: list[dict[str, Any]]) -> str:
    lines = [
        "| comparison | task | metric | per-seed differences (a - b) | mean [95% interval] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["paired"]
        diffs = ", ".join(f"s{s}: {d:+.4f}" for s, d in zip(p.seeds, p.differences))
        interval = f"{p.mean:+.4f} [{p.low:+.4f}, {p.high:+.4f}]" if p.low is not None else f"{p.mean:+.4f}"
        name = f"{spec.method(row['a']).label} vs {spec.method(row['b']).label}"
        lines.append(
            f"| {name} | {row['task']} | {row['metric']} | {diffs} | {interval} | {row['verdict']} |"
        )
    return "\n".join(lines)


def verdict_lines(spec: StudySpec, rows: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per comparison: "A beats / ties / loses to B on task by d ± e (95%, k seeds)"."""
    lines = []
    for row in rows:
        p = row["paired"]
        a, b = spec.method(row["a"]).label, spec.method(row["b"]).label
        if p.low is None:
            lines.append(
                f"- {a} vs {b} on {row['task']} ({row['metric']}): {p.mean:+.4f} on 1 seed, too few to call."
            )
            continue
        half = (p.high - p.low) / 2
        lines.append(
            f"- {a} **{row['verdict']}** {b} on {row['task']} ({row['metric']}) by {p.mean:+.4f} ± {half:.4f} "
            f"(95% interval over {len(p.seeds)} paired seeds)."
        )
    return lines


def plot_sweeps(spec: StudySpec, plan: Plan, path: Path) -> None:
    """Score vs learning rate (log x) per task, one line per method, the chosen point circled."""
    from melora.lab.study.figures import label_panel, save, task_panels

    tasks = [t for t in spec.tasks if any(k[0] == t for k in plan.sweeps)]
    if not tasks:
        return
    fig, axes = task_panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for (t, slug), scores in sorted(plan.sweeps.items()):
            if t != task:
                continue
            points = sorted((lr, v) for lr, v in scores.items() if v is not None and not math.isnan(v))
            if not points:
                continue
            (line,) = ax.plot(*zip(*points), marker="o", label=spec.method(slug).label)
            chosen = plan.chosen.get((t, slug))
            if chosen is not None and scores.get(chosen) is not None:
                ax.plot([chosen], [scores[chosen]], "o", ms=12, mfc="none", color=line.get_color())
        ax.set_xscale("log")
        label_panel(ax, f"{task}: {spec.metric_for(task).split('/')[-1]}", "learning rate")
    save(fig, path)


def render_study(spec: StudySpec, plan: Plan) -> tuple[str, dict[str, Any]]:
    """The study report (markdown) and its JSON summary; figures are written under ``<root>/figures``."""
    from melora.lab.report import markdown_tables

    figures = spec.root / "figures"
    from melora.lab.study.learning import compute_spent, time_to_go, wall_times

    times = wall_times(plan)
    spent = compute_spent(times)
    togo = time_to_go(times, plan.pending(is_done))
    ahead = (
        f" {togo['runs']} known runs to go, about {togo['run_hours']:.1f} run-hours at the measured run times."
        if togo and togo["runs"]
        else ""
    )
    sections = [
        f"# Study {spec.name}",
        "",
        f"Study file: `{spec.source}`; runs under `{spec.root}`. {spent['runs']} runs finished, "
        f"{spent['run_hours']:.1f} run-hours ({spec.workers} workers x {spec.threads_per_worker} threads).{ahead}",
        "",
    ]
    runs = chosen_runs(spec, plan)
    base_loss = base_heldout_loss(plan) if spec.runner == "instruct" else None
    summary: dict[str, Any] = {
        "study": spec.name,
        "chosen_lr": {f"{t}/{s}": lr for (t, s), lr in plan.chosen.items()},
        "compute": spent,
        "to_go": togo,
    }
    if runs:
        metric_keys = "|".join(sorted({re.escape(spec.metric_for(t)) for t in spec.tasks}))
        groups = aggregate(runs, keys=f"^({metric_keys})$")
        sections += ["## Scores at each method's chosen learning rate", "", markdown_tables(groups)]
        reference = {"instruct/heldout_loss": base_loss["mean"]} if base_loss else None
        plot_score_vs_params(groups, figures / "score_vs_params.png", reference)
        sections += ["![score vs trainable parameters](figures/score_vs_params.png)", ""]
        summary["groups"] = [
            {"label": g.label, "metric": g.metric, "mean": g.mean, "std": g.std, "n": len(g.values),
             "cell": cell_text(g)} for g in groups
        ]  # fmt: skip
    if base_loss is not None:
        seeds = ", ".join(f"{v:.4f} (seed {k})" for k, v in base_loss["by_seed"].items())
        sections += [
            f"Untuned model (the reference every run should beat): held-out loss {seeds}, measured before "
            "training on the same held-out batches as that seed's runs.",
            "",
        ]
        summary["base_heldout_loss"] = base_loss
    if runs and spec.runner == "glue":
        from melora.lab.study.learning import learning_rows, learning_table, plot_learning_curves

        learned = learning_rows(spec, plan, runs)
        sections += ["## Does every method learn? (each seed against the trivial baseline)", ""]
        sections += [learning_table(learned), ""]
        if plot_learning_curves(spec, plan, runs, figures / "learning_curves.png"):
            sections += ["![dev metric per epoch](figures/learning_curves.png)", ""]
        summary["learning"] = learned
    if plan.sweeps:
        sections += ["## Learning-rate sweeps (chosen point in bold)", "", sweep_table(spec, plan), ""]
        plot_sweeps(spec, plan, figures / "lr_sweeps.png")
        sections += ["![learning-rate sweeps](figures/lr_sweeps.png)", ""]
    ablation = ablation_rows(spec, plan)
    if ablation:
        sections += ["## The n ablation (same r, n varied)", "", ablation_table(spec, ablation), ""]
        if plot_n_ablation(spec, plan, ablation, figures / "n_ablation.png"):
            sections += ["![score vs n](figures/n_ablation.png)", ""]
        summary["n_ablation"] = ablation
    rows = comparisons(spec, plan)
    if rows:
        sections += ["## Paired comparisons (same seeds)", "", comparison_table(spec, rows), ""]
        sections += ["Verdicts:", "", *verdict_lines(spec, rows), ""]
        summary["comparisons"] = [
            {**{k: v for k, v in row.items() if k != "paired"}, "mean": row["paired"].mean,
             "low": row["paired"].low, "high": row["paired"].high, "seeds": list(row["paired"].seeds),
             "differences": list(row["paired"].differences)} for row in rows
        ]  # fmt: skip
    if spec.eval is not None:
        evals, base = chosen_runs(spec, plan, "eval"), base_runs(plan)
        if evals:
            title = "## Evaluations of the chosen runs" + (" and of the untuned model" if base else "")
            sections += [title, "", markdown_tables(aggregate(evals + base)), ""]
            reference = {k: float(v) for k, v in base[0]["summary"].items()} if base else None
            plot_score_vs_params(aggregate(evals), figures / "evals_vs_params.png", reference)
            sections += ["![evaluations vs trainable parameters](figures/evals_vs_params.png)", ""]
            eval_rows = comparisons(spec, plan, "eval")
            if eval_rows:
                sections += ["Paired, on the evaluations:", "", comparison_table(spec, eval_rows), ""]
    return "\n".join(sections), summary
