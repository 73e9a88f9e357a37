"""The study's one results reader: queries over the :class:`~melora.lab.records.RunRecord` of each job.

Every read of a study's results.json goes through :func:`read_run`, so a damaged file is one
:class:`~melora.lab.args.UserError` naming it (see :func:`melora.lab.records.read_results`), whichever
query met it first: the study stops there instead of guessing whether that run finished.

Run-level: :func:`read_run`, :func:`finished`, :func:`metric`, :func:`read_metric`, :func:`wall_time`.
Plan-level (the jobs of a :class:`~melora.lab.study.plan.Plan`): :func:`job_runs`, :func:`per_seed`,
:func:`chosen_runs`, :func:`base_runs`, :func:`wall_times`, :func:`base_heldout_loss`.

The plan imports this module to learn what has finished, so it takes plans and jobs as values only
(their types are imported for checking alone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melora.lab.args import UserError
from melora.lab.records import RunRecord

if TYPE_CHECKING:
    from melora.lab.study.plan import Job, Plan

DAMAGED = "it is damaged: delete it and rerun"


def read_run(path: str | os.PathLike) -> RunRecord | None:
    """The record of a results.json (or of the run folder holding it); None when there is none yet.

    A file that is not a melora results.json (damaged JSON, or an object without ``kind``, ``label``
    and a ``summary`` mapping) is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        return None
    try:
        return RunRecord.read(path)
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a well-formed JSON object that is no RunRecord
        raise UserError(f"{str(err).rstrip('.')}; {DAMAGED}.") from None


def finished(record: RunRecord) -> bool:
    """Whether the run finished: a training run's results.json is written at its end; an evaluation
    writes its own as it goes, and says ``complete`` once every task is scored."""
    return record.kind != "eval" or bool(record.details.get("complete", True))


def metric(record: RunRecord, name: str) -> float | None:
    """``summary[name]`` as a number; None when the run has no such metric. Not a number: a UserError."""
    value = record.summary.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{record.source or 'results.json'}: summary[{name!r}] = {value!r} is not a number; {DAMAGED}."
        ) from None


def read_metric(path: str | os.PathLike, name: str) -> float | None:
    """``summary[name]`` of a finished run's results.json; None when absent, unfinished or not measured."""
    record = read_run(path)
    if record is None or not finished(record):
        return None
    return metric(record, name)


def wall_time(record: RunRecord) -> float:
    """The run's wall time in seconds; 0 where it was not recorded."""
    return float(record.wall_time_s or 0.0)


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
