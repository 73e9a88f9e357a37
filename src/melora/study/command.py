"""``melora study STUDY.yaml``: plan a study's runs, run what is missing in parallel, then report.

Each run is a ``melora glue|instruct --config <run>/run.yaml`` subprocess (its log in
``<run>/run.log``), with ``threads_per_worker`` torch threads; ``workers`` of them run at once.
A run's results.json is written atomically at its end, so a study killed at any point resumes by
running the same command again: finished runs are skipped, and an unfinished one continues from its
last complete epoch checkpoint (``save_strategy: epoch`` unless the study sets another; resumed only
when its ``run.yaml`` still matches the study, otherwise it starts over). A run's checkpoints are
deleted once it has finished. A run being executed by another live study process
(``<run>/.running`` holds its pid) is left alone. A finished run whose evaluation is still due but
whose adapter is gone (a fresh clone: git keeps results.json, not adapters) is trained again first.
After the last run (and with ``--report-only`` at any time) the report, its JSON and figures are
written to ``<root>/report.md``, ``<root>/summary.json`` and ``<root>/figures/``.

    melora study configs/studies/glue_minilm.yaml            # run / resume, then report
    melora study configs/studies/glue_minilm.yaml --plan     # list the runs and their state
    melora study configs/studies/glue_minilm.yaml --report-only
    melora study configs/studies/glue_minilm.yaml --only 'rte/full/*'   # just these runs first
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from melora.records import NON_DEFINING
from melora.study.plan import Job, Plan, is_done, plan_study
from melora.study.spec import StudySpec, load_study

logger = logging.getLogger(__name__)

RUN_PRESET = "run.yaml"
RUN_LOG = "run.log"
LOCK = ".running"


def run_options(spec: StudySpec, job: Job) -> dict[str, Any]:
    """The flat options of one training run: base < task budget < adapter < lr, seed, output."""
    from dataclasses import asdict

    entry = spec.method(job.slug)
    options: dict[str, Any] = {**spec.base, **spec.tasks[job.task]}
    options.update({k: v for k, v in asdict(entry.adapter).items() if v is not None})
    if spec.runner == "glue":
        options["task"] = job.task
    options.setdefault("save_strategy", "epoch")  # a killed run continues from its last epoch
    options.update(
        lr=job.lr,
        seed=job.seed,
        output_dir=str(job.folder),
        threads=spec.threads_per_worker,
        progress=False,
        resume=options["save_strategy"] != "no",
    )
    return options


def checkpoint_folders(folder: Path) -> list[Path]:
    """Where the runners write Trainer checkpoints: glue into the run folder, instruct into ``checkpoints/``."""
    return [folder, folder / "checkpoints"]


def resumable(spec: StudySpec, job: Job) -> str | None:
    """The checkpoint an unfinished attempt of ``job`` can continue from, or None to start over.

    Only when the attempt's ``run.yaml`` defines the same run as the options the study gives it now
    (:data:`~melora.records.NON_DEFINING` options such as threads may differ): a study file edited
    since (another budget, batch size, ...) must not continue a run trained under the old one.
    """
    import yaml

    from melora.finetune.training import last_complete_checkpoint

    preset = job.folder / RUN_PRESET
    if job.kind != "train" or not preset.is_file():
        return None
    try:
        previous = yaml.safe_load(preset.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(previous, dict) or not previous.get("resume"):
        return None

    def defining(options: dict[str, Any]) -> dict[str, Any]:  # threads, eval batch, ... may change
        return {k: v for k, v in options.items() if k not in NON_DEFINING}

    if defining(previous) != defining(run_options(spec, job)):
        return None
    for folder in checkpoint_folders(job.folder):
        checkpoint = last_complete_checkpoint(folder)
        if checkpoint is not None:
            return checkpoint
    return None


def drop_checkpoints(job: Job) -> None:
    """A finished run's checkpoints are no result: delete them (full fine-tuning's are ~300 MB each)."""
    for folder in checkpoint_folders(job.folder):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_dir() and path.name.startswith("checkpoint-"):
                    shutil.rmtree(path)
    nested = job.folder / "checkpoints"
    if nested.is_dir() and not any(nested.iterdir()):
        nested.rmdir()


def command_for(spec: StudySpec, job: Job) -> list[str]:
    """The argv (after ``python -m melora.cli``) of ``job``; writes the run's preset for training runs.

    Evaluations (``eval`` of a run's adapter, ``base`` of the untuned model) share the study's eval flags."""
    from melora.io import write_yaml_atomic

    if job.kind == "train":
        preset = job.folder / RUN_PRESET
        write_yaml_atomic(preset, run_options(spec, job))
        return [spec.runner, "--config", str(preset)]
    ev = spec.eval
    model = {**spec.base, **spec.tasks[job.task]}.get("model", "smollm2")
    argv = ["eval", "--model", str(model)]
    if job.kind == "eval":  # a run's adapter; "base" evaluates the untuned model
        argv += ["--adapter", str(job.folder.parent)]
    else:
        argv += ["--label", "base (untuned)"]
    argv += [
        "--tasks",
        ",".join(ev.tasks),
        "--batch-size",
        str(ev.batch_size),
        "--output-dir",
        str(job.folder),
    ]
    if ev.limit is not None:
        limit = (
            ev.limit if not isinstance(ev.limit, dict) else ",".join(f"{k}={v}" for k, v in ev.limit.items())
        )
        argv += ["--limit", str(limit)]
    if ev.data_dir:
        argv += ["--data-dir", ev.data_dir]
    if ev.allow_code_execution:
        argv += ["--allow-code-execution"]
    return argv + list(ev.extra)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_elsewhere(job: Job) -> bool:
    lock = job.folder / LOCK
    try:
        pid = int(lock.read_text().strip())
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and _alive(pid)


def execute(spec: StudySpec, job: Job) -> int:
    """Run one job to completion in a subprocess; returns its exit status."""
    checkpoint = resumable(spec, job) if job.folder.exists() else None
    if job.folder.exists() and checkpoint is None:
        shutil.rmtree(job.folder)  # an unfinished earlier attempt that cannot continue: start over
    job.folder.mkdir(parents=True, exist_ok=True)
    argv = command_for(spec, job)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec.threads_per_worker),
        "MKL_NUM_THREADS": str(spec.threads_per_worker),
        "TOKENIZERS_PARALLELISM": "false",
    }
    (job.folder / LOCK).write_text(str(os.getpid()))
    try:
        with open(job.folder / RUN_LOG, "a" if checkpoint else "w", encoding="utf-8") as log:
            if checkpoint:
                log.write(f"# resuming from {checkpoint}\n")
            log.write("+ melora " + " ".join(argv) + "\n")
            log.flush()
            proc = subprocess.run(
                [sys.executable, "-m", "melora.cli", *argv], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if proc.returncode == 0 and is_done(job):
            drop_checkpoints(job)
        return proc.returncode
    finally:
        (job.folder / LOCK).unlink(missing_ok=True)


def retrain_lost_adapters(plan: Plan, only: list[str] | None = None) -> list[str]:
    """Unfinished evaluations whose finished training run has no adapter on disk (git keeps a run's
    results.json but not its adapter, so a fresh clone has the one without the other): drop that
    run's results.json so the study retrains it, with the same options and seed, before evaluating.
    Returns the names of the runs sent back."""
    sent_back = []
    for job in plan.pending(is_done):
        train = job.folder.parent
        if job.kind != "eval" or not selected(job, only) or not (train / "results.json").is_file():
            continue
        if not any((train / name).exists() for name in ("adapter", "model")):
            logger.warning(
                "%s: its run has results.json but no adapter/ or model/ to evaluate (not kept in git): "
                "retraining the run first",
                job.name,
            )
            (train / "results.json").unlink()
            sent_back.append(job.name.removesuffix("/eval"))
    return sent_back


def _ready(job: Job) -> bool:
    """An evaluation waits for its training run."""
    return job.kind != "eval" or is_done(
        Job("train", job.task, job.slug, job.lr, job.seed, job.folder.parent)
    )


def selected(job: Job, only: list[str] | None) -> bool:
    """Whether ``job``'s name (``rte/full/lr3e-05/seed0``) matches one of the ``--only`` patterns."""
    from fnmatch import fnmatchcase

    return only is None or any(fnmatchcase(job.name, pattern) for pattern in only)


def check_only(spec: StudySpec, plan: Plan, only: list[str] | None) -> None:
    """Every ``--only`` pattern must name at least one run of the plan (a typo runs nothing)."""
    from melora.args import UserError

    for pattern in only or []:
        if not any(selected(job, [pattern]) for job in plan.jobs):
            raise UserError(
                f"--only {pattern!r} matches no run of study {spec.name!r}; run names look like "
                f"{plan.jobs[0].name if plan.jobs else 'task/method/lr/seed'} (`--plan` lists them all)."
            )


def run_study(
    spec: StudySpec, progress: bool = True, only: list[str] | None = None
) -> tuple[Plan, list[str]]:
    """Run every missing job of ``spec`` (re-planning as runs finish); returns the final plan and failures.

    With ``only`` (glob patterns on run names), just the matching runs, in plan order: a grid
    extension or a seed that becomes due while they run is run too when it matches.
    """
    from tqdm.auto import tqdm

    failed: set[str] = set()
    running: dict[Future, Job] = {}
    plan = plan_study(spec)
    check_only(spec, plan, only)
    if retrain_lost_adapters(plan, only):
        plan = plan_study(spec)
    done = sum(is_done(j) for j in plan.jobs)
    bar = tqdm(
        total=len(plan.jobs), initial=done, desc=f"study {spec.name}", unit="run", disable=not progress
    )
    with ThreadPoolExecutor(max_workers=spec.workers) as pool:
        while True:
            plan = plan_study(spec, frozenset(failed))
            bar.total = len(plan.jobs)
            active = {j.name for j in running.values()}
            todo = [
                j
                for j in plan.pending(is_done)
                if j.name not in active
                and j.name not in failed
                and selected(j, only)
                and _ready(j)
                and not running_elsewhere(j)
            ]
            for job in todo[: spec.workers - len(running)]:
                logger.info("start %s", job.name)
                running[pool.submit(execute, spec, job)] = job
            bar.set_postfix_str(f"running {len(running)}, failed {len(failed)}")
            bar.refresh()
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                code = future.result()
                if code != 0 or not is_done(job):
                    failed.add(job.name)
                    logger.error("%s failed (exit %s); see %s", job.name, code, job.folder / RUN_LOG)
                bar.update(1)
    bar.close()
    return plan_study(spec, frozenset(failed)), sorted(failed)


def write_report(spec: StudySpec, plan: Plan) -> Path:
    from melora.io import atomic_write_text, write_json_atomic
    from melora.study.render import render_study

    text, summary = render_study(spec, plan)
    atomic_write_text(spec.root / "report.md", text + "\n")
    write_json_atomic(spec.root / "summary.json", summary)
    return spec.root / "report.md"


def logged_epoch(job: Job) -> float | None:
    """The last training epoch a run's log reports (Trainer logs ``'epoch': '1.5'``), or None."""
    import re

    try:
        text = (job.folder / RUN_LOG).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.findall(r"'epoch': '?([0-9.]+)", text)
    return float(found[-1]) if found else None


def describe_plan(spec: StudySpec, plan: Plan) -> str:
    """One line per job: done / running (epoch reached of the budget) / to run."""
    lines = []
    for job in plan.jobs:
        if is_done(job):
            state = "done"
        elif running_elsewhere(job):
            epoch = logged_epoch(job)
            budget = run_options(spec, job).get("epochs") if job.kind == "train" else None
            state = "running" + (f" ({epoch:.1f}/{budget:g} ep)" if epoch is not None and budget else "")
        else:
            state = "to run"
        lines.append(f"{state:22s} {job.name}")
    from melora.study.learning import time_to_go, wall_times

    togo = time_to_go(wall_times(plan), plan.pending(is_done))
    if togo and togo["runs"]:
        lines.append(
            f"{togo['runs']} runs to go: about {togo['run_hours']:.1f} run-hours, "
            f"{togo['run_hours'] / spec.workers:.1f} h on {spec.workers} workers "
            "(at the mean wall time of finished runs of the same task and method kind)"
        )
    waiting = [f"{t}/{s}" for (t, s) in plan.sweeps if (t, s) not in plan.chosen]
    if waiting:
        lines.append(f"(learning rate still being tuned for {', '.join(waiting)}: more runs may follow)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    spec = load_study(args.study)
    if args.workers:
        spec.workers = args.workers
    if args.threads_per_worker:
        spec.threads_per_worker = args.threads_per_worker
    if args.plan:
        print(describe_plan(spec, plan_study(spec)))
        return 0
    failed: list[str] = []
    start = time.time()
    if args.report_only:
        plan = plan_study(spec)
    else:
        plan, failed = run_study(spec, progress=not args.no_progress, only=args.only)
    report = write_report(spec, plan)
    print(f"report: {report} ({time.time() - start:.0f} s)")
    if failed:
        print(
            f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are {RUN_LOG} in each run folder"
        )
        return 1
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``melora study``."""
    parser = subparsers.add_parser(
        "study",
        help="run a study file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="the study YAML (configs/studies/)")
    parser.add_argument("--plan", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from what has finished")
    parser.add_argument("--workers", type=int, default=None, help="override the study's parallel runs")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="override torch threads per run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only the runs whose name matches this glob, e.g. 'rte/full/*' (repeatable); then report",
    )
    parser.set_defaults(func=main)
    return parser
