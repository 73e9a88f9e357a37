"""The mechanism section of a study report (``analyze: true``): what the trained updates look like.

For every finished run at its method's chosen learning rate, :func:`analyse_runs` writes ``<run>/analysis.json``
(:func:`melora.analysis.analyze_adapter` of the kept ``<run>/adapter``) once, and again when the run is newer.
The section then reads only those files, so ``melora study FILE --report-only`` on a fresh clone (results.json
and analysis.json in git, adapters not) rebuilds the same tables and figures. Per task and method: the score,
the nominal rank, and the means over the adapted modules of the entropy effective rank, the count of singular
values above 1% of the largest, ``||dW||_F``, and for MELoRA the effective number of blocks and the blocks'
row/column-space overlap against the value random subspaces give; for LoRA the share of its update that lies
in MELoRA's n diagonal blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from melora.lab.study.plan import Job, Plan
from melora.lab.study.results import job_runs
from melora.lab.study.spec import StudySpec

ANALYSIS_FILE = "analysis.json"
# summary means shown per task and method: (column header, key in the analysis summary, digits)
COLUMNS = (
    ("erank", "mean_entropy_effective_rank", 2),
    ("rank>1%", "mean_rank_above_fraction", 1),
    ("‖dW‖_F", "mean_frobenius_norm", 2),
    ("eff. blocks", "mean_effective_block_count", 2),
    ("row overlap", "mean_row_space_overlap", 3),
    ("(random)", "mean_random_overlap_row", 3),
    ("col overlap", "mean_column_space_overlap", 3),
    ("(random)", "mean_random_overlap_col", 3),
    ("LoRA energy in n diag. blocks", "mean_diagonal_energy_fraction", 3),
)


def blocks_for_lora(spec: StudySpec) -> int | None:
    """The n of the study's first MELoRA method: LoRA updates are measured against that block grid."""
    return next((m.adapter.n for m in spec.methods if m.adapter.method == "melora" and m.adapter.n), None)


def analyse_runs(spec: StudySpec, plan: Plan) -> list[Job]:
    """Write ``analysis.json`` for each finished chosen run whose adapter is on disk and whose analysis is
    missing or older than its results.json; returns the runs analysed now."""
    from melora.analysis import analyze_adapter
    from melora.atomic import write_json_atomic

    done = []
    for job, _ in job_runs(plan, "train"):
        target = job.folder / ANALYSIS_FILE
        adapter = job.folder / "adapter"
        if not adapter.is_dir():
            continue
        if target.is_file() and target.stat().st_mtime >= job.results.stat().st_mtime:
            continue
        result = analyze_adapter(adapter, blocks_for_lora=blocks_for_lora(spec))
        result["adapter"] = "adapter"  # relative to the run folder: the file names no machine's path
        result["adapter_folder"] = "adapter"
        write_json_atomic(target, result)
        done.append(job)
    return done


def read_analyses(plan: Plan) -> list[tuple[Job, dict[str, Any]]]:
    """``(job, analysis)`` of each finished chosen run that has an analysis.json, in plan order."""
    found = []
    for job, _ in job_runs(plan, "train"):
        path = job.folder / ANALYSIS_FILE
        if path.is_file():
            found.append((job, json.loads(path.read_text(encoding="utf-8"))))
    return found


def mechanism_rows(spec: StudySpec, plan: Plan) -> list[dict[str, Any]]:
    """One row per analysed run: task, method, seed, score, nominal rank and the summary means."""
    from melora.lab.study.results import per_seed

    rows = []
    for job, analysis in read_analyses(plan):
        metric = spec.metric_for(job.task)
        score = per_seed(plan, job.task, job.slug, metric).get(job.seed)
        summary = analysis["summary"]
        nominal = max((m["nominal_rank"] for m in analysis["modules"]), default=None)
        rows.append(
            {"task": job.task, "method": spec.method(job.slug).label, "slug": job.slug, "seed": job.seed,
             "metric": metric, "score": score, "nominal_rank": nominal,
             **{key: summary.get(key) for _, key, _ in COLUMNS}}
        )  # fmt: skip
    return rows


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"


def mechanism_table(rows: list[dict[str, Any]]) -> str:
    """The rows as markdown; a column nobody has (no LoRA, no MELoRA) is left out."""
    columns = [c for c in COLUMNS if any(row.get(c[1]) is not None for row in rows)]
    head = "| task | method | seed | score | nominal rank | " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|" + "---|" * (5 + len(columns))]
    for row in rows:
        cells = [_cell(row.get(key), digits) for _, key, digits in columns]
        lines.append(
            f"| {row['task']} | {row['method']} | {row['seed']} | {_cell(row['score'], 4)} | "
            f"{row['nominal_rank']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def mechanism_figures(spec: StudySpec, plan: Plan, folder: Path) -> list[Path]:
    """Per task: the spectra of its methods side by side, and the effective rank per layer."""
    from melora.lab.analysis_figures import effective_rank_figure, spectra_figure

    by_task: dict[str, list[dict[str, Any]]] = {}
    for job, analysis in read_analyses(plan):
        labelled = {**analysis, "adapter": f"{job.task}/{spec.method(job.slug).label}/adapter"}
        by_task.setdefault(job.task, []).append(labelled)
    paths = []
    for task, results in by_task.items():
        paths.append(spectra_figure(results, folder / f"spectra_{task}.png"))
        paths.append(effective_rank_figure(results, folder / f"effective_rank_{task}.png"))
    return paths
