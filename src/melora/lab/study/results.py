"""The study's one results reader: queries over the :class:`~melora.lab.records.RunRecord` of each job.

Every read of a study's results.json goes through :func:`read_run`, so a damaged file is one
:class:`~melora.lab.args.UserError` naming it (see :func:`melora.lab.records.read_results`), whichever
query met it first: the study stops there instead of guessing whether that run finished.

Run-level reads live with the schema (:mod:`melora.lab.records`: ``read_run``, ``finished``, ``metric``,
``read_metric``, ``wall_time``), which the plan uses to learn what has finished; the plan-level queries
here (the jobs of a :class:`~melora.lab.study.plan.Plan`): :func:`job_runs`, :func:`per_seed`,
:func:`chosen_runs`, :func:`base_runs`, :func:`wall_times`, :func:`base_heldout_loss`.
"""

from __future__ import annotations

from typing import Any

from melora.lab.records import RunRecord, finished, metric, read_run, wall_time
from melora.lab.study.plan import Job, Plan


def job_runs(
    plan: Plan, kind: str = "train", task: str | None = None, slug: str | None = None, chosen: bool = True
) -> list[tuple[Job, RunRecord]]:
    """``(job, record)`` of each finished job of ``kind`` (of ``task`` and method ``slug`` when given),
    in plan order; with ``chosen``, only those at their method's chosen learning rate."""
    found = []
    for job in plan.jobs:
        if job.kind != kind or task not in (None, job.task) or slug not in (None, job.slug):
            continue
        if chosen and plan.chosen.get((job.task, job.slug)) != job.lr:
            continue
        record = read_run(job.results)
        if record is not None and finished(record):
            found.append((job, record))
    return found


def per_seed(plan: Plan, task: str, slug: str, name: str, kind: str = "train") -> dict[int, float]:
    """Seed -> ``summary[name]`` of method ``slug``'s finished runs on ``task`` at its chosen lr."""
    values = {}
    for job, record in job_runs(plan, kind, task, slug):
        value = metric(record, name)
        if value is not None:
            values[job.seed] = value
    return values


def chosen_runs(plan: Plan, kind: str = "train") -> list[RunRecord]:
    """The records of every finished run (or evaluation, ``kind="eval"``) at its method's chosen lr."""
    return [record for _, record in job_runs(plan, kind)]


def base_runs(plan: Plan) -> list[RunRecord]:
    """The finished evaluations of the untuned model (``eval.base``), one per task."""
    return [record for _, record in job_runs(plan, "base", chosen=False)]


def wall_times(plan: Plan) -> dict[Job, float]:
    """Each job with a results.json and its wall time in seconds (0 where it was not recorded).

    A partly written evaluation counts too: its time was spent."""
    times = {}
    for job in plan.jobs:
        record = read_run(job.results)
        if record is not None:
            times[job] = wall_time(record)
    return times


def base_heldout_loss(plan: Plan) -> dict[str, Any] | None:
    """The untuned model's held-out loss per seed, as the instruct runs that measured it (``eval_base``) found it.

    Every run holds out the same examples (``data_seed``), but the Trainer's evaluation loss is a mean
    of per-batch means, and with ``group_by_length`` the held-out batches are grouped by a sampler
    seeded with the run's seed: the level is per seed, and runs of one seed see the same batches.
    Returns ``{"by_seed": {seed: loss}, "mean": mean over seeds}``, None when no run measured it.
    """
    by_seed: dict[int, float] = {}
    for job, record in job_runs(plan, "train", chosen=False):
        value = record.details.get("heldout_loss_base")
        if value is not None:
            by_seed.setdefault(job.seed, float(value))
    if not by_seed:
        return None
    return {"by_seed": dict(sorted(by_seed.items())), "mean": sum(by_seed.values()) / len(by_seed)}
