"""What a study's runs have cost so far and what the known runs still to go will cost, in run time.

Wall times come from each job's results.json (:func:`melora.lab.study.results.wall_times`); a run
used ``threads_per_worker`` cores for its wall time, and ``workers`` runs go at once.
"""

from __future__ import annotations

from typing import Any

from melora.lab.study.plan import Job


def compute_spent(times: dict[Job, float]) -> dict[str, float]:
    """Runs finished and their summed wall time (each run used ``threads_per_worker`` cores)."""
    return {"runs": len(times), "run_hours": sum(times.values()) / 3600}


# How alike two jobs are, most alike first: a pending job is priced at the mean of the finished jobs
# that share its key at the first level that has any (full fine-tuning costs more than an adapter; an
# evaluation is not a training run).
_LIKENESS = (
    lambda job: (job.kind, job.task, job.slug.split("-")[0]),
    lambda job: (job.kind, job.task),
    lambda job: job.kind == "train",  # an evaluation of the untuned model costs what one of a run does
    lambda job: None,
)


def time_to_go(times: dict[Job, float], pending: list[Job]) -> dict[str, float] | None:
    """Run-hours the ``pending`` jobs will take, at the mean wall time of finished jobs like them.

    ``times`` is :func:`~melora.lab.study.results.wall_times`; None before any finished job has a
    recorded wall time. Only known jobs count: a sweep still being tuned may add runs.
    """
    measured = {job: t for job, t in times.items() if t > 0}
    if not measured:
        return None
    means = []
    for key in _LIKENESS:
        groups: dict[Any, list[float]] = {}
        for job, t in measured.items():
            groups.setdefault(key(job), []).append(t)
        means.append({k: sum(v) / len(v) for k, v in groups.items()})
    seconds = sum(next(m[key(job)] for key, m in zip(_LIKENESS, means) if key(job) in m) for job in pending)
    return {"runs": len(pending), "run_hours": seconds / 3600}


def duration_text(hours: float) -> str:
    """A duration a reader takes in at a glance: ``about 12 min`` below an hour, ``about 3.4 h`` above."""
    minutes = hours * 60
    if minutes < 1:
        return "under 1 min"
    if minutes < 59.5:
        return f"about {minutes:.0f} min"
    return f"about {hours:.1f} h"
