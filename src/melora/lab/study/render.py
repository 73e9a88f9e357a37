"""A finished (or partly finished) study as tables, paired comparisons and plots.

The report is a sequence of sections (:data:`SECTIONS`), each one function of the study and its plan
that returns its markdown lines and its part of the JSON summary (and writes its figures under
``<root>/figures``); :func:`render_study` joins them. In order:

- :func:`header_section`: what ran, the compute spent and the time to go;
- :func:`scores_section`: the scores at each method's chosen learning rate, with the tables and the
  score-vs-parameters plot of :mod:`melora.lab.report` (the same code as ``melora report``);
- :func:`untuned_section`: the untuned model's held-out loss (instruct studies);
- :func:`learning_section`: each method against its task's trivial baseline and the learning curves
  (GLUE studies, :mod:`melora.lab.study.learning`);
- :func:`sweeps_section`: the learning-rate sweep per task and method, the chosen point marked;
- :func:`ablation_section`: the n ablation's table and plot when the study has one
  (:mod:`melora.lab.study.ablation`);
- :func:`comparisons_section`: the paired per-seed comparisons with 95% intervals and a verdict each;
- :func:`evaluations_section`: the evaluations of the chosen runs and of the untuned model;
- :func:`mechanism_section`: with ``analyze: true``, the trained updates' spectra, effective rank and block
  diversity (:mod:`melora.lab.study.mechanism`).

Every results.json is read through :mod:`melora.lab.study.results`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from melora.lab.report import aggregate, cell_text, markdown_tables, plot_score_vs_params
from melora.lab.study.ablation import ablation_rows, ablation_table, plot_n_ablation
from melora.lab.study.cost import compute_spent, duration_text, time_to_go
from melora.lab.study.plan import Plan, is_done, lr_text
from melora.lab.study.results import base_heldout_loss, base_runs, chosen_runs, per_seed, wall_times
from melora.lab.study.spec import StudySpec
from melora.lab.study.stats import paired_difference

FIGURES = "figures"  # the figures' folder under the study's root, where the report links them

# A section's markdown lines and its part of the JSON summary.
Section = tuple[list[str], dict[str, Any]]


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
                metrics = sorted({m for r in chosen_runs(plan, "eval") for m in r.summary})
            for metric in metrics:
                paired = paired_difference(
                    per_seed(plan, task, a, metric, kind), per_seed(plan, task, b, metric, kind)
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


def header_section(spec: StudySpec, plan: Plan) -> Section:
    """The title; the study file, the runs finished and their run-hours, and the time the known runs to go will take."""
    times = wall_times(plan)
    spent = compute_spent(times)
    togo = time_to_go(times, plan.pending(is_done))
    ahead = (
        f" {togo['runs']} known runs to go, {duration_text(togo['run_hours'])} of run time at the measured "
        "run times."
        if togo and togo["runs"]
        else ""
    )
    lines = [
        f"# Study {spec.name}",
        "",
        f"Study file: `{spec.source}`; runs under `{spec.root}`. {spent['runs']} runs finished, "
        f"{spent['run_hours']:.1f} run-hours ({spec.workers} workers x {spec.threads_per_worker} threads).{ahead}",
        "",
    ]
    chosen = {f"{t}/{s}": lr for (t, s), lr in plan.chosen.items()}
    return lines, {"study": spec.name, "chosen_lr": chosen, "compute": spent, "to_go": togo}


def scores_section(spec: StudySpec, plan: Plan) -> Section:
    """Mean ± std of each task's metric at each method's chosen lr, and the score-vs-parameters plot
    (an instruct study's untuned held-out loss dashed in it)."""
    runs = chosen_runs(plan)
    if not runs:
        return [], {}
    metric_keys = "|".join(sorted({re.escape(spec.metric_for(t)) for t in spec.tasks}))
    groups = aggregate(runs, keys=f"^({metric_keys})$")
    base_loss = base_heldout_loss(plan) if spec.runner == "instruct" else None
    reference = {"instruct/heldout_loss": base_loss["mean"]} if base_loss else None
    plot_score_vs_params(groups, spec.root / FIGURES / "score_vs_params.png", reference)
    lines = ["## Scores at each method's chosen learning rate", "", markdown_tables(groups)]
    lines += [f"![score vs trainable parameters]({FIGURES}/score_vs_params.png)", ""]
    rows = [{"label": g.label, "metric": g.metric, "mean": g.mean, "std": g.std, "n": len(g.values),
             "cell": cell_text(g)} for g in groups]  # fmt: skip
    return lines, {"groups": rows}


def untuned_section(spec: StudySpec, plan: Plan) -> Section:
    """The untuned model's held-out loss per seed (instruct runs with ``eval_base``): the reference to beat."""
    base_loss = base_heldout_loss(plan) if spec.runner == "instruct" else None
    if base_loss is None:
        return [], {}
    seeds = ", ".join(f"{v:.4f} (seed {k})" for k, v in base_loss["by_seed"].items())
    lines = [
        f"Untuned model (the reference every run should beat): held-out loss {seeds}, measured before "
        "training on the same held-out batches as that seed's runs.",
        "",
    ]
    return lines, {"base_heldout_loss": base_loss}


def learning_section(spec: StudySpec, plan: Plan) -> Section:
    """GLUE studies: whether each method's every seed clears its task's trivial baseline; the learning curves."""
    from melora.lab.study.learning import learning_rows, learning_table, plot_learning_curves

    runs = chosen_runs(plan) if spec.runner == "glue" else []
    if not runs:
        return [], {}
    learned = learning_rows(spec, runs)
    lines = ["## Does every method learn? (each seed against the trivial baseline)", ""]
    lines += [learning_table(learned), ""]
    if plot_learning_curves(spec, runs, spec.root / FIGURES / "learning_curves.png"):
        lines += [f"![dev metric per epoch]({FIGURES}/learning_curves.png)", ""]
    return lines, {"learning": learned}


def sweeps_section(spec: StudySpec, plan: Plan) -> Section:
    """The tuning seed's score at each learning rate, the chosen one in bold, and their plot."""
    if not plan.sweeps:
        return [], {}
    plot_sweeps(spec, plan, spec.root / FIGURES / "lr_sweeps.png")
    lines = ["## Learning-rate sweeps (chosen point in bold)", "", sweep_table(spec, plan), ""]
    return lines + [f"![learning-rate sweeps]({FIGURES}/lr_sweeps.png)", ""], {}


def ablation_section(spec: StudySpec, plan: Plan) -> Section:
    """The n ablation (MELoRA methods sharing r with >= 3 values of n): its table and plot."""
    rows = ablation_rows(spec, plan)
    if not rows:
        return [], {}
    lines = ["## The n ablation (same r, n varied)", "", ablation_table(spec, rows), ""]
    if plot_n_ablation(spec, plan, rows, spec.root / FIGURES / "n_ablation.png"):
        lines += [f"![score vs n]({FIGURES}/n_ablation.png)", ""]
    return lines, {"n_ablation": rows}


def comparisons_section(spec: StudySpec, plan: Plan) -> Section:
    """Each ``compare`` pair on each task over the seeds both ran: the table and one verdict sentence each."""
    rows = comparisons(spec, plan)
    if not rows:
        return [], {}
    lines = ["## Paired comparisons (same seeds)", "", comparison_table(spec, rows), ""]
    lines += ["Verdicts:", "", *verdict_lines(spec, rows), ""]
    summary = [
        {**{k: v for k, v in row.items() if k != "paired"}, "mean": row["paired"].mean,
         "low": row["paired"].low, "high": row["paired"].high, "seeds": list(row["paired"].seeds),
         "differences": list(row["paired"].differences)} for row in rows
    ]  # fmt: skip
    return lines, {"comparisons": summary}


def evaluations_section(spec: StudySpec, plan: Plan) -> Section:
    """Instruct studies with ``eval``: the chosen runs' evaluations (and the untuned model's) as a table,
    a plot against trainable parameters with the untuned model dashed, and the paired comparisons."""
    evals = chosen_runs(plan, "eval") if spec.eval is not None else []
    if not evals:
        return [], {}
    base = base_runs(plan)
    title = "## Evaluations of the chosen runs" + (" and of the untuned model" if base else "")
    lines = [title, "", markdown_tables(aggregate(evals + base)), ""]
    reference = {k: float(v) for k, v in base[0].summary.items()} if base else None
    plot_score_vs_params(aggregate(evals), spec.root / FIGURES / "evals_vs_params.png", reference)
    lines += [f"![evaluations vs trainable parameters]({FIGURES}/evals_vs_params.png)", ""]
    rows = comparisons(spec, plan, "eval")
    if rows:
        lines += ["Paired, on the evaluations:", "", comparison_table(spec, rows), ""]
    return lines, {}


def mechanism_section(spec: StudySpec, plan: Plan) -> Section:
    """``analyze: true``: each chosen run's kept adapter analysed once into ``analysis.json``, then a table of
    effective rank and block diversity per task and method and, per task, the spectra and the effective rank
    per layer (all from the analysis.json files, so ``--report-only`` needs no adapter)."""
    from melora.lab.study.mechanism import analyse_runs, mechanism_figures, mechanism_rows, mechanism_table

    if not spec.analyze:
        return [], {}
    analyse_runs(spec, plan)
    rows = mechanism_rows(spec, plan)
    if not rows:
        return [], {}
    lines = [
        "## The trained updates (`melora analyze`)",
        "",
        "Means over the adapted modules of each run's scaled update dW: erank = entropy effective rank "
        "(exp of the entropy of s / sum(s)), rank>1% = singular values above 1% of the largest; MELoRA: the "
        "effective number of blocks carrying dW's energy (n = even, 1 = one block), and the mean cos^2 of the "
        "principal angles between blocks' row / column spaces beside what random subspaces give; LoRA: the "
        "share of ||dW||_F^2 inside the n diagonal blocks MELoRA could hold (random: 1/n).",
        "",
        mechanism_table(rows),
        "",
    ]
    for path in mechanism_figures(spec, plan, spec.root / FIGURES):
        lines += [f"![{path.stem.replace('_', ' ')}]({FIGURES}/{path.name})", ""]
    return lines, {"mechanism": rows}


SECTIONS: tuple[Callable[[StudySpec, Plan], Section], ...] = (
    header_section,
    scores_section,
    untuned_section,
    learning_section,
    sweeps_section,
    ablation_section,
    comparisons_section,
    evaluations_section,
    mechanism_section,
)


def render_study(spec: StudySpec, plan: Plan) -> tuple[str, dict[str, Any]]:
    """The study report (markdown) and its JSON summary: :data:`SECTIONS` in order; figures are
    written under ``<root>/figures``."""
    lines: list[str] = []
    summary: dict[str, Any] = {}
    for section in SECTIONS:
        text, part = section(spec, plan)
        lines += text
        summary.update(part)
    return "\n".join(lines), summary
