"""Which runs a study needs, derived again each time from what is already on disk.

The plan is a pure function of the study file and the finished results: re-planning after a kill
gives the same runs, and finished ones are skipped. Runs start in plan order: the pair of the
study's first ``compare`` entry on every task, then the second pair's new method, and so on, then
the methods no comparison names; task by task within each group. A study stopped early so has its
main answer on all tasks first. Per (task, method):

1. the learning-rate grid at the tuning seed;
2. when every grid point has finished and the best one sits at an edge, one more point beyond that
   edge (``lr * factor`` or ``lr / factor``), up to ``tune.extend`` per side;
3. once the optimum is interior (or the limit is reached), every seed at the chosen lr;
4. for instruct studies with ``eval``, an evaluation of each of those runs, and with ``eval.base``
   one evaluation of the untuned model (``kind="base"``, after every other job).

Layout: ``<root>/<task>/<slug>/lr<lr>/seed<seed>/results.json`` (+ ``eval/results.json``);
the untuned model's evaluation in ``<root>/<task>/base/eval/results.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from melora.lab.records import RESULTS_FILE, finished, read_metric, read_run
from melora.lab.study.spec import MethodEntry, StudySpec


def lr_text(lr: float) -> str:
    """Folder-name form of a learning rate: ``0.0045``, ``1.7e-05``."""
    return f"{lr:g}"


def round_lr(lr: float) -> float:
    """Three significant digits, so grid extensions give stable folder names."""
    return float(f"{lr:.3g}")


@dataclass(frozen=True)
class Job:
    """One run (``kind="train"``), one evaluation of a run (``"eval"``) or of the untuned model (``"base"``)."""

    kind: str
    task: str
    slug: str
    lr: float
    seed: int
    folder: Path

    @property
    def results(self) -> Path:
        return self.folder / RESULTS_FILE

    @property
    def name(self) -> str:
        if self.kind == "base":
            return f"{self.task}/{BASE}/eval"
        return f"{self.task}/{self.slug}/lr{lr_text(self.lr)}/seed{self.seed}" + (
            "/eval" if self.kind == "eval" else ""
        )


@dataclass
class Plan:
    """Every job known so far, the tuning sweeps, the chosen learning rates, what is blocked."""

    jobs: list[Job] = field(default_factory=list)
    sweeps: dict[tuple[str, str], dict[float, float | None]] = field(default_factory=dict)
    chosen: dict[tuple[str, str], float] = field(default_factory=dict)
    extended: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def pending(self, is_done: Callable[[Job], bool]) -> list[Job]:
        return [job for job in self.jobs if not is_done(job)]


BASE = "base"  # the slug of the untuned model's evaluation


def base_job(spec: StudySpec, task: str) -> Job:
    """The evaluation of the untuned model on ``task``'s eval suite (lr and seed play no part)."""
    return Job("base", task, BASE, 0.0, 0, spec.root / task / BASE / "eval")


def run_folder(spec: StudySpec, task: str, entry: MethodEntry, lr: float, seed: int) -> Path:
    return spec.root / task / entry.slug / f"lr{lr_text(lr)}" / f"seed{seed}"


def is_done(job: Job) -> bool:
    """Whether ``job`` has a finished results.json (an evaluation's also says ``complete``).

    The file is read, so a damaged one stops the study with a UserError naming it (see
    :func:`~melora.lab.records.read_run`)."""
    record = read_run(job.results)
    return record is not None and finished(record)


def _best(scores: dict[float, float], lower: bool) -> float:
    def key(lr: float) -> float:
        value = scores[lr]
        if value is None or math.isnan(value):
            return math.inf if lower else -math.inf
        return value

    return min(scores, key=key) if lower else max(scores, key=key)


def plan_study(spec: StudySpec, failed: frozenset[str] = frozenset()) -> Plan:
    """The study's jobs given what has finished; ``failed`` job names are treated as unfinished."""
    plan = Plan()
    for task in spec.tasks:
        metric = spec.metric_for(task)
        lower = spec.lower_is_better(metric)
        for entry in spec.methods:
            if task not in spec.tasks_for(entry):
                continue
            seeds = spec.seeds_for(entry)
            grid = [round_lr(lr) for lr in spec.grid_for(entry, task)]
            tune_seed = spec.tune.seed if spec.tune.seed in seeds else seeds[0]
            key = (task, entry.slug)
            chosen: float | None = grid[0] if len(grid) == 1 else None
            extensions = {"low": 0, "high": 0}
            while chosen is None:
                scores: dict[float, float | None] = {}
                for lr in grid:
                    job = Job(
                        "train", task, entry.slug, lr, tune_seed, run_folder(spec, task, entry, lr, tune_seed)
                    )
                    if job not in plan.jobs:
                        plan.jobs.append(job)
                    scores[lr] = None if job.name in failed else read_metric(job.results, metric)
                plan.sweeps[key] = scores
                if any(v is None for v in scores.values()):
                    break
                best = _best(scores, lower)
                if best == grid[0] and extensions["low"] < spec.tune.extend:
                    grid.insert(0, round_lr(grid[0] / spec.tune.factor))
                    extensions["low"] += 1
                elif best == grid[-1] and extensions["high"] < spec.tune.extend:
                    grid.append(round_lr(grid[-1] * spec.tune.factor))
                    extensions["high"] += 1
                else:
                    chosen = best
            plan.extended[key] = [
                lr for lr in grid if lr not in {round_lr(x) for x in spec.grid_for(entry, task)}
            ]
            if chosen is None:
                continue
            plan.chosen[key] = chosen
            for seed in seeds:
                job = Job(
                    "train", task, entry.slug, chosen, seed, run_folder(spec, task, entry, chosen, seed)
                )
                if job not in plan.jobs:
                    plan.jobs.append(job)
                if spec.eval is not None:
                    plan.jobs.append(Job("eval", task, entry.slug, chosen, seed, job.folder / "eval"))
    tasks = list(spec.tasks)
    plan.jobs.sort(key=lambda job: (priority(spec, job.slug), tasks.index(job.task)))  # stable
    if spec.eval is not None and spec.eval.base:
        plan.jobs += [base_job(spec, task) for task in tasks]
    return plan


def priority(spec: StudySpec, slug: str) -> int:
    """The index of the first ``compare`` pair that names ``slug``; methods no pair names come last."""
    for index, pair in enumerate(spec.compare):
        if slug in pair:
            return index
    return len(spec.compare)
