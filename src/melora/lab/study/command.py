"""``melora study STUDY.yaml``: plan a study's runs, run what is missing in parallel, then report.

Each run is a ``melora glue|instruct --config <run>/run.yaml`` subprocess (its log in
``<run>/run.log``), with ``threads_per_worker`` torch threads; ``workers`` of them run at once. An
evaluation is a ``melora eval --config <run>/eval/eval.yaml`` subprocess (the study's ``eval.extra``
flags after it), the untuned model's ``melora eval --config <root>/<task>/base/eval/eval.yaml``.
A run's results.json is written atomically at its end, so a study killed at any point resumes by
running the same command again: finished runs are skipped, and an unfinished one continues from its
last complete epoch checkpoint in ``<run>/checkpoints/`` (``save_strategy: epoch`` unless the study
sets another; resumed only when its ``run.yaml`` still matches the study, otherwise it starts over;
a GLUE run from before both runners shared that layout keeps them in the run folder itself, found
too). A run's checkpoints are deleted once it has finished. A finished run whose evaluation is still due but whose adapter is gone
(a fresh clone: git keeps results.json, not adapters) is trained again first.
After the last run (and with ``--report-only`` at any time) the report, its JSON and figures are
written to ``<root>/report.md``, ``<root>/summary.json`` and ``<root>/figures/``.

Several study processes may run the same study at once (on one machine or sharing the folder): each
run is taken by one of them. A run's lock is an flock on ``<run>/.running`` (which names the holder's
pid and host, shown by ``--plan``), taken before anything in the run folder is touched and held for
the run's whole life, by the study process and by the run's own process; the kernel releases it when
they die, so a ``.running`` file nobody holds (a killed study, or an older melora's plain pid file)
is stale and ignored. A run that another process holds is left to it; a finished run's folder is
never deleted (checked again under the lock).

Each run starts in its own process group and dies with the study. SIGINT (Ctrl-C) or SIGTERM to the
study stops its runs (SIGTERM to each run's process group, SIGKILL after 10 s), releases their
locks and exits with one line; running the same command again resumes them.

Exit status: 0 every selected run is done; 1 a run failed (its ``run.log`` says why); 2 a mistake in
the study file or the flags (one line naming the file and key); 3 no run failed, but runs are left
to another live process that holds them (or wait for runs it holds): rerun when it has finished;
130 / 143 interrupted by SIGINT / SIGTERM.

    melora study configs/studies/glue_minilm.yaml            # run / resume, then report
    melora study configs/studies/glue_minilm.yaml --plan     # list the runs and their state
    melora study configs/studies/glue_minilm.yaml --report-only
    melora study configs/studies/glue_minilm.yaml --only 'rte/full/*'   # just these runs first
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from melora.lab.args import UserError
from melora.lab.records import NON_DEFINING, RESULTS_FILE
from melora.lab.study.plan import Job, Plan, is_done, plan_study
from melora.lab.study.spec import StudySpec, load_study

logger = logging.getLogger(__name__)

RUN_PRESET = "run.yaml"
EVAL_PRESET = "eval.yaml"  # an evaluation's options, in its own folder (``<run>/eval``, ``<task>/base/eval``)
BASE_LABEL = "base (untuned)"
RUN_LOG = "run.log"
LOCK = ".running"
GRACE_S = 10.0  # seconds a stopped run has to exit after SIGTERM before its process group gets SIGKILL
EXIT_FAILED = 1
EXIT_LEFT = 3  # runs left to another process
CHILD_OF = (
    "--child-of"  # ``python -m melora.lab.study.command --child-of PID ARGV``: a run that dies with the study
)


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


def resumable(spec: StudySpec, job: Job) -> str | None:
    """The checkpoint an unfinished attempt of ``job`` can continue from, or None to start over.

    Only when the attempt's ``run.yaml`` defines the same run as the options the study gives it now
    (:data:`~melora.lab.records.NON_DEFINING` options such as threads may differ): a study file edited
    since (another budget, batch size, ...) must not continue a run trained under the old one.
    """
    import yaml

    from melora.lab.finetune.training import run_checkpoint

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
    return run_checkpoint(job.folder)


def drop_checkpoints(job: Job) -> None:
    """A finished run's checkpoints are no result: delete them (full fine-tuning's are ~300 MB each),
    and ``<run>/checkpoints/`` once empty."""
    from melora.lab.finetune.training import checkpoint_folders, checkpoints_folder

    for folder in checkpoint_folders(job.folder):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_dir() and path.name.startswith("checkpoint-"):
                    shutil.rmtree(path)
    nested = checkpoints_folder(job.folder)
    if nested.is_dir() and not any(nested.iterdir()):
        nested.rmdir()


def command_for(spec: StudySpec, job: Job) -> list[str]:
    """The argv (after ``python -m melora.cli``) of ``job``; writes its preset into the job's folder.

    A training run's options go to ``<run>/run.yaml`` (:func:`run_options`). An evaluation (``eval``
    of a run's adapter, ``base`` of the untuned model) gets an :class:`~melora.lab.eval.args.EvalArgs`
    preset ``<run>/eval/eval.yaml`` from the study's ``eval`` section; its ``extra`` flags follow
    ``--config`` and so override the preset."""
    from melora.lab.eval.args import EvalArgs
    from melora.lab.yaml_files import write_yaml_atomic

    if job.kind == "train":
        preset = job.folder / RUN_PRESET
        write_yaml_atomic(preset, run_options(spec, job))
        return [spec.runner, "--config", str(preset)]
    ev = spec.eval
    options = EvalArgs(
        model=str({**spec.base, **spec.tasks[job.task]}.get("model", "smollm2")),
        adapter=str(job.folder.parent) if job.kind == "eval" else None,  # "base": the untuned model
        tasks=list(ev.tasks),
        data_dir=ev.data_dir,
        limit=ev.limit,
        batch_size=ev.batch_size,
        allow_code_execution=ev.allow_code_execution,
        output_dir=str(job.folder),
        label=BASE_LABEL if job.kind == "base" else None,  # a run's evaluation takes the run's label
    )
    preset = options.to_preset(job.folder / EVAL_PRESET)
    return ["eval", "--config", str(preset), *ev.extra]


# ---- run locks -----------------------------------------------------------------------------------------

_held: dict[Path, int] = {}  # run folder -> descriptor of the lock this process holds on it
_held_guard = threading.Lock()


def take_lock(folder: Path, where: str = "", wait_s: float = 0.0) -> int | None:
    """Take ``folder``'s run lock (an exclusive flock on ``folder/.running``); None when another process holds it.

    The lock file is created if needed and is never replaced while held, so the flock is the only
    truth: whoever holds it owns the run. A holder releases by removing the file, then closing it;
    an opener that locked a file removed meanwhile tries again on the new one. The file then names the
    holder (``pid host`` and ``where``: the node and GPUs, when known) for ``--plan``. With ``wait_s``, a
    lock another process holds is tried again for that long (a run retried on another node after its
    first node died waits there for the dead node's lock to be released).
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    deadline = time.monotonic() + wait_s
    for attempt in itertools.count():
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if attempt < 5 or time.monotonic() < deadline:  # a probe (``--plan``) holds it for a moment
                time.sleep(0.02 if attempt < 5 else 0.5)
                continue
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # its holder released (removed) it between our open and flock: take the new one
        if attempt >= 100:  # released and re-created 100 times in a row: leave it to the others
            return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {where}".strip().encode() + b"\n", 0)
    with _held_guard:
        _held[folder] = fd
    return fd


def release_lock(folder: Path, fd: int) -> None:
    """Give back a lock from :func:`take_lock`: remove ``.running`` (if still ours), then close it."""
    with _held_guard:
        _held.pop(folder, None)
    path = folder / LOCK
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def lock_holder(folder: Path) -> str | None:
    """``"pid host"`` of the other live process holding ``folder``'s run lock, else None.

    A ``.running`` file that no process holds (its study was killed; or an older melora wrote a plain
    pid file, whatever that pid is now) is stale: None."""
    import fcntl

    with _held_guard:
        if folder in _held:
            return None
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for attempt in range(3):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                if attempt < 2:  # a study taking it to find it busy holds it for a moment
                    time.sleep(0.01)
        text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").split()
        if not text:
            return "another process"
        return " on ".join(text[:2]) + (f" ({' '.join(text[2:])})" if len(text) > 2 else "")
    finally:
        os.close(fd)


def clear_folder(folder: Path) -> None:
    """Start a run over: delete what an earlier attempt left, except the lock (held by the caller).

    A subfolder that holds a results.json (a finished evaluation of the run) or whose own lock another
    process holds is kept."""
    for path in folder.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            if (path / RESULTS_FILE).exists() or lock_holder(path) is not None:
                continue
            shutil.rmtree(path)
        else:
            path.unlink()


# ---- the runs' processes ------------------------------------------------------------------------------

_children: dict[int, subprocess.Popen] = {}  # pid -> a run's process, while it runs
_children_guard = threading.Lock()
_stopping = threading.Event()  # set on SIGINT/SIGTERM (or an error): start no more runs
_hurry = threading.Event()  # a second signal: do not wait the grace period


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the study; ``stopped`` names the runs it stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.stopped: list[str] = []


def _on_signal(signum: int, frame: Any) -> None:
    if _stopping.is_set():  # already stopping: a second Ctrl-C kills the runs now
        _hurry.set()
        return
    _stopping.set()
    raise Interrupted(signum)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group(proc: subprocess.Popen) -> int:
    """Wait for a run's process; then kill what is left of its process group (workers it started)."""
    try:  # exited but not reaped yet, so its group id cannot be reused before the kill below
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    except (AttributeError, ChildProcessError):
        pass
    _killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def _stop_children(futures: list[Future]) -> None:
    """SIGTERM every run's process group, wait up to GRACE_S for them, SIGKILL the rest; wait for the threads."""
    with _children_guard:
        _stopping.set()
        procs = list(_children.values())
    for proc in procs:
        _killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while (
        futures and not all(f.done() for f in futures) and time.monotonic() < deadline and not _hurry.is_set()
    ):
        wait(futures, timeout=0.1)
    with _children_guard:
        procs = list(_children.values())
    for proc in procs:
        _killpg(proc.pid, signal.SIGKILL)
    wait(futures)


def execute(
    spec: StudySpec, job: Job, env: dict[str, str] | None = None, where: str = "", lock_wait_s: float = 0.0
) -> int | None:
    """Run one job to completion in a subprocess; returns its exit status.

    ``env`` is added to the run's environment (its ``CUDA_VISIBLE_DEVICES``); ``where`` says where it
    runs (``gpu 3``, ``node 1a2b3c4d gpu 0``), written into its lock for ``--plan`` and into its log.
    None when the job is not this process's to run: another process holds its lock (tried for
    ``lock_wait_s``), or the study is stopping. The lock is taken before the run folder is touched and
    held until the run's process (and its process group) is gone; a run that finished meanwhile
    (another process ran it) is left as it is (0)."""
    fd = take_lock(job.folder, where, lock_wait_s)
    if fd is None:
        return None
    try:
        if is_done(job):  # finished since it was planned: never start it over
            return 0
        checkpoint = resumable(spec, job)
        if checkpoint is None:
            clear_folder(job.folder)  # an unfinished earlier attempt that cannot continue: start over
        argv = command_for(spec, job)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(spec.threads_per_worker),
            "MKL_NUM_THREADS": str(spec.threads_per_worker),
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        with open(job.folder / RUN_LOG, "a" if checkpoint else "w", encoding="utf-8") as log:
            if checkpoint:
                log.write(f"# resuming from {checkpoint}\n")
            if where:
                log.write(f"# on {socket.gethostname()} {where}\n")
            log.write("+ melora " + " ".join(argv) + "\n")
            log.flush()
            command = [sys.executable, "-m", "melora.lab.study.command", CHILD_OF, str(os.getpid()), *argv]
            with _children_guard:
                if _stopping.is_set():
                    return None
                # its own process group (Ctrl-C reaches the study, which stops it); it inherits the
                # lock, so the run stays locked while its process lives, whatever happens to the study
                proc = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    pass_fds=(fd,),
                )
                _children[proc.pid] = proc
            try:
                code = _wait_group(proc)
            finally:
                with _children_guard:
                    _children.pop(proc.pid, None)
        if code == 0 and is_done(job):
            drop_checkpoints(job)
        return code
    finally:
        release_lock(job.folder, fd)


def _child_main(argv: list[str]) -> int:
    """A run started by :func:`execute`: die with the study process (Linux), then ``melora ARGV``."""
    parent = int(argv[1])
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the study died before the line above
        return 1
    from melora.cli import main as melora

    sys.argv = ["melora", *argv[2:]]
    return melora(argv[2:])


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
        if any((train / name).exists() for name in ("adapter", "model")):
            continue
        fd = take_lock(train)
        if fd is None:  # another process is training it again already
            continue
        try:
            if (train / "results.json").is_file() and not any(
                (train / n).exists() for n in ("adapter", "model")
            ):
                logger.warning(
                    "%s: its run has results.json but no adapter/ or model/ to evaluate (not kept in git): "
                    "retraining the run first",
                    job.name,
                )
                (train / "results.json").unlink()
                sent_back.append(job.name.removesuffix("/eval"))
        finally:
            release_lock(train, fd)
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
    for pattern in only or []:
        if not any(selected(job, [pattern]) for job in plan.jobs):
            raise UserError(
                f"--only {pattern!r} matches no run of study {spec.name!r}; run names look like "
                f"{plan.jobs[0].name if plan.jobs else 'task/method/lr/seed'} (`--plan` lists them all)."
            )


def parallel_runs(spec: StudySpec, pool: Any = None) -> int:
    """How many runs the local executor runs at once: ``workers``, capped by what the GPUs hold (``pool``);
    with GPUs and no ``workers``, as many as they hold; else 1."""
    fit = pool.capacity if pool is not None and pool.capacity else None
    limits = [x for x in (spec.workers, fit) if x]
    return min(limits) if limits else 1


class LocalExecutor:
    """Runs jobs as processes of this machine: ``workers`` at once, or with ``gpus_per_run`` as many as
    the GPUs hold, each with its own ``CUDA_VISIBLE_DEVICES`` (:mod:`melora.lab.study.devices`)."""

    def __init__(self, spec: StudySpec, gpus: int | None = None) -> None:
        from melora.lab.study.devices import local_pool

        self.spec = spec
        self.pool = local_pool(spec.gpus_per_run, gpus)
        self.slots = parallel_runs(spec, self.pool)
        self.threads = ThreadPoolExecutor(max_workers=self.slots)
        self._gpus: dict[Future, list[str] | None] = {}

    def describe(self) -> str:
        gpus = f", {self.spec.gpus_per_run:g} GPU each of {len(self.pool.devices)}" if self.pool else ""
        return f"{self.slots} run(s) at once on this machine{gpus}"

    def submit(self, job: Job, running: int) -> Future | None:
        """Start ``job``, or None when there is no room for it now."""
        if running >= self.slots:
            return None
        gpus = self.pool.take() if self.pool is not None else None
        if self.pool is not None and gpus is None:
            return None
        env = {} if gpus is None else {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        where = f"gpu {','.join(gpus)}" if gpus else ""
        future = self.threads.submit(execute, self.spec, job, env, where)
        self._gpus[future] = gpus
        return future

    def wait_any(self, handles: list[Future]) -> list[Future]:
        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        return list(finished)

    def result(self, handle: Future) -> int | None:
        gpus = self._gpus.pop(handle, None)
        if gpus and self.pool is not None:
            self.pool.give(gpus)
        return handle.result()

    def stop(self, handles: list[Future]) -> None:
        _stop_children(handles)

    def close(self) -> None:
        self.threads.shutdown(wait=True, cancel_futures=True)


def make_executor(spec: StudySpec, gpus: int | None = None, address: str | None = None):
    """The study's executor: :class:`LocalExecutor`, or a Ray cluster's (:mod:`melora.lab.study.ray_executor`)."""
    if spec.executor == "ray":
        from melora.lab.study.ray_executor import RayExecutor

        return RayExecutor(spec, address)
    return LocalExecutor(spec, gpus)


def run_study(
    spec: StudySpec,
    progress: bool = True,
    only: list[str] | None = None,
    executor: Any = None,
) -> tuple[Plan, list[str], dict[str, str]]:
    """Run every missing job of ``spec`` (re-planning as runs finish) on ``executor`` (default: local).

    Returns the final plan, the failed runs, and the selected runs left undone because another live
    process holds them (name -> ``"pid on host"``) or waits for such a run (name -> ``"waits for ..."``).
    With ``only`` (glob patterns on run names), just the matching runs, in plan order: a grid
    extension or a seed that becomes due while they run is run too when it matches. On SIGINT/SIGTERM
    (with :func:`main`'s handlers) or an error, the running runs are stopped before it raises.
    """
    from tqdm.auto import tqdm

    _stopping.clear()
    _hurry.clear()
    failed: set[str] = set()
    elsewhere: dict[str, str] = {}  # runs another process held -> its "pid on host"
    running: dict[Any, Job] = {}
    plan = plan_study(spec)
    check_only(spec, plan, only)
    if retrain_lost_adapters(plan, only):
        plan = plan_study(spec)
    done = sum(is_done(j) for j in plan.jobs)
    bar = tqdm(
        total=len(plan.jobs), initial=done, desc=f"study {spec.name}", unit="run", disable=not progress
    )
    executor = executor or LocalExecutor(spec)
    logger.info("study %s: %s", spec.name, executor.describe())
    completed = False
    try:
        while True:
            plan = plan_study(spec, frozenset(failed))
            bar.total = len(plan.jobs)
            active = {j.name for j in running.values()}
            for job in plan.pending(is_done):
                if job.name in active or job.name in failed or not selected(job, only) or not _ready(job):
                    continue
                holder = lock_holder(job.folder)  # asked again each time: its holder may have died
                if holder is not None:
                    elsewhere[job.name] = holder
                    continue
                handle = executor.submit(job, len(running))
                if handle is None:  # no room: the next job waits for a run to finish
                    break
                logger.info("start %s", job.name)
                running[handle] = job
            bar.set_postfix_str(f"running {len(running)}, failed {len(failed)}")
            bar.refresh()
            if not running:
                break
            for handle in executor.wait_any(list(running)):
                job = running.pop(handle)
                code = executor.result(handle)
                if code is None:  # another process took it first: leave it to that one
                    elsewhere[job.name] = lock_holder(job.folder) or "another process"
                    continue
                if code != 0 or not is_done(job):
                    failed.add(job.name)
                    logger.error("%s failed (exit %s); see %s", job.name, code, job.folder / RUN_LOG)
                bar.update(1)
        completed = True
    except Interrupted as stop:
        stop.stopped = sorted(job.name for job in running.values())
        raise
    finally:
        if not completed:  # interrupted, or an error: stop the runs before leaving
            executor.stop(list(running))
        executor.close()
        bar.close()
    plan = plan_study(spec, frozenset(failed))
    left = {}
    for job in plan.pending(is_done):
        if job.name in failed or not selected(job, only):
            continue
        holder = lock_holder(job.folder)
        if holder is not None:
            left[job.name] = holder
        elif job.kind == "eval" and job.name.removesuffix("/eval") in left:
            left[job.name] = f"waits for {job.name.removesuffix('/eval')}"
        elif job.name in elsewhere:  # finished by now, or the other process stopped: run it next time
            left[job.name] = f"was held by {elsewhere[job.name]}"
    return plan, sorted(failed), left


def write_report(spec: StudySpec, plan: Plan) -> Path:
    from melora.atomic import atomic_write_text, write_json_atomic
    from melora.lab.study.render import render_study

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


def describe_plan(spec: StudySpec, plan: Plan, slots: int | None = None) -> str:
    """One line per job: done / running (epoch reached of the budget, and where: pid, host, node, GPU) /
    to run; then the time to go with ``slots`` runs at once (default: the local executor's)."""
    slots = slots or parallel_runs(spec)
    lines = []
    for job in plan.jobs:
        holder = None
        if is_done(job):
            state = "done"
        elif (holder := lock_holder(job.folder)) is not None:
            epoch = logged_epoch(job)
            budget = run_options(spec, job).get("epochs") if job.kind == "train" else None
            state = "running" + (f" ({epoch:.1f}/{budget:g} ep)" if epoch is not None and budget else "")
        else:
            state = "to run"
        lines.append(f"{state:22s} {job.name}" + (f"  [{holder}]" if holder else ""))
    from melora.lab.study.cost import duration_text, time_to_go
    from melora.lab.study.results import wall_times

    togo = time_to_go(wall_times(plan), plan.pending(is_done))
    if togo and togo["runs"]:
        lines.append(
            f"{togo['runs']} runs to go: {duration_text(togo['run_hours'])} of run time, "
            f"{duration_text(togo['run_hours'] / slots)} with {slots} run(s) at once "
            "(at the mean wall time of finished runs of the same task and method kind)"
        )
    waiting = [f"{t}/{s}" for (t, s) in plan.sweeps if (t, s) not in plan.chosen]
    if waiting:
        lines.append(f"(learning rate still being tuned for {', '.join(waiting)}: more runs may follow)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``melora study``; the exit status is documented in the module docstring."""
    _stopping.clear()
    handlers = _install_signal_handlers()
    try:
        return _main(args)
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        runs = f": {', '.join(stop.stopped)}" if stop.stopped else ""
        print(
            f"melora study: interrupted by {name}; {len(stop.stopped)} run(s) stopped{runs}; "
            "rerun the same command to resume them",
            file=sys.stderr,
        )
        return 128 + stop.signum
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _main(args: argparse.Namespace) -> int:
    spec = load_study(args.study)
    if args.workers is not None:
        if args.workers < 1:
            raise UserError(f"--workers {args.workers}: expected an integer >= 1.")
        spec.workers = args.workers
    if args.threads_per_worker is not None:
        if args.threads_per_worker < 1:
            raise UserError(f"--threads-per-worker {args.threads_per_worker}: expected an integer >= 1.")
        spec.threads_per_worker = args.threads_per_worker
    if args.executor is not None:
        spec.executor = args.executor
    if args.address is not None:
        if spec.executor != "ray":
            raise UserError(
                "--address names a Ray cluster: add --executor ray (or executor: ray in the study file)."
            )
        spec.ray_address = args.address
    if args.plan:
        slots = None
        if spec.executor == "local" and spec.gpus_per_run is not None:
            from melora.lab.study.devices import local_pool

            slots = parallel_runs(spec, local_pool(spec.gpus_per_run, args.gpus))
        print(describe_plan(spec, plan_study(spec), slots))
        return 0
    failed: list[str] = []
    left: dict[str, str] = {}
    start = time.time()
    if args.report_only:
        plan = plan_study(spec)
    else:
        executor = make_executor(spec, gpus=args.gpus)
        plan, failed, left = run_study(spec, progress=not args.no_progress, only=args.only, executor=executor)
    report = write_report(spec, plan)
    print(f"report: {report} ({time.time() - start:.0f} s)")
    status = 0
    if left:
        print(
            f"{len(left)} run(s) left to another process: "
            + ", ".join(f"{name} ({holder})" for name, holder in left.items())
            + "; rerun this command when it has finished"
        )
        status = EXIT_LEFT
    if failed:
        print(
            f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are {RUN_LOG} in each run folder"
        )
        status = EXIT_FAILED
    return status


def _install_signal_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM stop the study's runs (see :func:`run_study`); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}


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
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="override the study's executor (docs/scale.md)",
    )
    parser.add_argument(
        "--address", default=None, help="executor ray: the cluster to join (HOST:PORT, ray://HOST:PORT, auto)"
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="local executor: GPUs to hand out (default: all this machine has)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only the runs whose name matches this glob, e.g. 'rte/full/*' (repeatable); then report",
    )
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == CHILD_OF:
    sys.exit(_child_main(sys.argv[1:]))
