"""Run untrusted Python (model-written HumanEval code) in a throw-away, resource-limited subprocess.

Each program runs as ``python -I prog.py`` in a fresh temporary directory (removed afterwards),
in a new session (so the whole process group can be killed), with an environment holding only
``PATH``, stdin closed and stdout/stderr going to files in that directory. A prologue written
before the program lowers its own hard limits (address space, CPU seconds, file size, number of
processes), which the program cannot raise again; limits are set in the child, not through
``preexec_fn``, which may deadlock when the parent has threads (PyTorch always has).
A wall-clock timeout kills the process group. Timeouts and crashes are failures; nothing hangs.

This narrows what a buggy completion can do; it is not a security boundary against hostile
code (no network or filesystem isolation beyond the working directory). Run it in a container
for that.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_PROLOGUE = """\
import resource as _r
for _name, _value in {limits!r}:
    _limit = getattr(_r, _name, None)
    if _limit is not None:
        try:
            _r.setrlimit(_limit, (_value, _value))
        except (ValueError, OSError):
            pass
del _r, _name, _value, _limit
"""
_TAIL_BYTES = 2000


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall-clock timeout, memory (address space), output file size, processes."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 0  # RLIMIT_NPROC: 0 forbids fork (not enforced for root)

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r} must be > 0"
            for name in ("timeout_s", "memory_mb", "file_size_mb")
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
class SandboxResult:
    """Outcome of one program: ``status`` is "passed", "failed" or "timeout"."""

    status: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    files: list[str] = field(default_factory=list)  # what the program left in its working directory
    workdir: str = ""  # the (already removed) temporary directory it ran in

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        return handle.read().decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone
    proc.wait()


def run_program(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Execute ``source`` in the sandbox and report how it ended (exit status 0 means "passed")."""
    limits = limits or SandboxLimits()
    reserved = {"prog.py", "stdout.txt", "stderr.txt"}
    with tempfile.TemporaryDirectory(prefix="melora-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        (work / "prog.py").write_text(_PROLOGUE.format(limits=limits.rlimits()) + source, encoding="utf-8")
        start = time.monotonic()
        with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "prog.py"],
                cwd=work,
                env={"PATH": os.defpath},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                returncode, status = None, "timeout"
            finally:
                _kill_group(proc)  # also reaps anything the program left running in its group
        duration = time.monotonic() - start
        files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
        return SandboxResult(
            status=status,
            returncode=returncode,
            duration_s=round(duration, 3),
            stdout=_tail(work / "stdout.txt"),
            stderr=_tail(work / "stderr.txt"),
            files=[f for f in files if f not in reserved],
            workdir=tmp,
        )
