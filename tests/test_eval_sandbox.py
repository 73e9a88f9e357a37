"""The HumanEval sandbox: timeouts, crashes, passes, the pass channel, and hostile programs contained."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from melora.lab.eval.sandbox import (
    REQUIRED,
    Harness,
    SandboxLimits,
    containment,
    require_containment,
    run_program,
)

FAST = SandboxLimits(timeout_s=2.0)


def test_passing_program_passes():
    result = run_program("assert sum([1, 2]) == 3\nprint('ok')\n", FAST)
    assert (result.status, result.returncode, result.passed) == ("passed", 0, True)
    assert result.stdout.strip() == "ok"


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", FAST)
    assert (result.status, result.returncode, result.passed) == ("timeout", None, False)
    assert time.monotonic() - start < 6


def test_sleeping_child_processes_are_killed_with_the_group():
    result = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout" and result.duration_s < 5


@pytest.mark.parametrize(
    "source", ["raise ValueError('boom')\n", "import os\nos.abort()\n", "assert 1 == 2\n", "def broken(:\n"]
)
def test_crashes_and_failed_asserts_are_failures(source):
    result = run_program(source, FAST)
    assert result.status == "failed" and not result.passed
    assert result.returncode != 0


def test_memory_limit_turns_a_huge_allocation_into_a_failure():
    result = run_program("x = bytearray(4 * 1024 ** 3)\n", SandboxLimits(timeout_s=5.0, memory_mb=512))
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_files_stay_in_a_temp_dir_that_is_removed():
    source = "import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd())\n"
    result = run_program(source, FAST)
    assert result.passed and result.files == ["out.txt"]
    assert Path(result.stdout.strip()).resolve() == Path(result.workdir).resolve()
    assert not Path(result.workdir).exists()
    assert not Path("out.txt").exists()


def test_parent_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("MELORA_TEST_SECRET", "hunter2")
    source = "import os\nassert 'MELORA_TEST_SECRET' not in os.environ, 'leaked'\nprint(sorted(os.environ))\n"
    result = run_program(source, FAST)
    assert result.passed, result.stderr
    assert os.environ["MELORA_TEST_SECRET"] == "hunter2"


def test_bad_limits_are_rejected_all_at_once():
    with pytest.raises(ValueError, match=r"timeout_s=0 must be > 0; memory_mb=-1 must be > 0"):
        SandboxLimits(timeout_s=0, memory_mb=-1)


# --------------------------------------------------------------------------- the pass channel

ADD = Harness(
    "add", "def check(candidate):\n    assert candidate(2, 3) == 5\n", setup="def add(a, b):\n    pass\n"
)


def needs(*names: str) -> None:
    """Skip unless this machine gives the sandbox each of ``names``."""
    report = containment()
    missing = [f"{n} ({report.reasons.get(n, 'unavailable')})" for n in names if n not in report.active]
    if missing:
        pytest.skip("this machine's sandbox lacks " + ", ".join(missing))


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nsys.exit(0)\nassert False\n",
        "import os\nos._exit(0)\nassert False\n",
        "import posix\nposix._exit(0)\nassert False\n",
        "raise SystemExit(0)\nassert False\n",
        "def f():\n    return 1\n\nimport sys\nsys.exit(0)\n\nassert f() == 2\n",  # exit after the function
        "import atexit, os\natexit.register(os._exit, 0)\nassert 1 == 2\n",
    ],
    ids=["sys.exit", "os._exit", "posix._exit", "SystemExit", "exit-after-function", "atexit-os._exit"],
)
def test_early_exits_with_status_0_are_failures(source):
    result = run_program(source, FAST)
    assert result.status == "failed" and not result.passed, result
    assert "before its end" in result.reason


@pytest.mark.parametrize(
    "source",
    [
        "def add(a, b):\n    return a + b\n\nimport sys\nsys.exit(0)\n",  # top-level exit after the function
        "def add(a, b):\n    import os\n    os._exit(0)\n",
        "def add(a, b):\n    raise SystemExit(0)\n",
        "import atexit, os\natexit.register(os._exit, 0)\n\ndef add(a, b):\n    return a - b\n",
        "def add(a, b):\n    import posix, signal\n    posix.kill(posix.getpid(), signal.SIGKILL)\n",
    ],
    ids=["exit-after-function", "os._exit-in-call", "SystemExit-in-call", "atexit-then-wrong", "kill-self"],
)
def test_with_a_harness_only_a_returned_check_passes(source):
    result = run_program(source, FAST, ADD)
    assert result.status == "failed" and not result.passed, result


def test_with_a_harness_a_right_function_passes_and_a_wrong_one_fails():
    right = run_program("def add(a, b):\n    return a + b\n", FAST, ADD)
    assert right.passed and right.returncode == 0, right
    wrong = run_program("def add(a, b):\n    return a * b\n", FAST, ADD)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_values_cross_the_process_boundary_with_their_types():
    harness = Harness("f", "def check(candidate):\n    assert candidate([1], k=2) == VALUE\n", setup=(
        "VALUE = ((1, 2.5), [None, True], {'a': {1, 2}}, frozenset({3}), b'x', 1j, float('inf'))\n"))  # fmt: skip
    source = "def f(xs, k):\n    return ((1, 2.5), [None, True], {'a': {1, 2}}, frozenset({3}), b'x', 1j, float('inf'))\n"
    assert run_program(source, FAST, harness).passed
    as_list = source.replace("return ((1, 2.5),", "return ([1, 2.5],")  # a list is not a tuple
    assert not run_program(as_list, FAST, harness).passed
    opaque = "def f(xs, k):\n    return object()\n"  # only plain values cross
    result = run_program(opaque, FAST, harness)
    assert not result.passed and "cannot be sent" in result.stderr


def test_forging_the_verdict_from_the_program_fails():
    forger = (
        "import os, posix\n"
        "for fd in range(1024):\n"
        "    for text in (b'PASS', b'PASS 0', b'R', b'END\\n'):\n"
        "        try:\n"
        "            posix.write(fd, text)\n"
        "        except OSError:\n"
        "            pass\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        for fd in os.listdir(f'/proc/{pid}/fd'):\n"
        "            posix.write(posix.open(f'/proc/{pid}/fd/{fd}', posix.O_WRONLY), b'PASS 0')\n"
        "    except OSError:\n"
        "        pass\n"
        "def add(a, b):\n"
        "    return 0\n"
    )
    result = run_program(forger, FAST, ADD)
    assert result.status == "failed" and not result.passed, result


def test_generic_programs_can_impersonate_the_epilogue_so_scores_use_a_harness():
    """The documented limit of a harness-less run: the epilogue runs in the program's process."""
    impersonator = "import os\nos.write(3, b'END\\n')\nos._exit(0)\n"
    assert run_program(impersonator, FAST).passed
    assert not run_program("import os\nos.write(3, b'END\\n')\nos._exit(0)\ndef add(a, b):\n    return 0\n",
                           FAST, ADD).passed  # fmt: skip


# --------------------------------------------------------------------------- containment


def test_containment_report_is_consistent():
    report = containment()
    assert not set(report.active) & set(report.missing)
    assert report.weak == any(name in report.missing for name in REQUIRED)
    assert set(report.reasons) <= set(report.missing)
    if os.geteuid() == 0:
        assert "unprivileged-user" in report.active
    assert require_containment(accept_weak=True) is report


def test_dangerous_functions_are_stubbed_by_the_guard():
    source = (
        "import os, shutil, subprocess\n"
        "for call in (lambda: os.kill(1, 0), lambda: os.system('true'), lambda: os.fork(),\n"
        "             lambda: subprocess.run(['true']), lambda: shutil.rmtree('x'), lambda: os.unlink('x')):\n"
        "    try:\n"
        "        call()\n"
        "    except PermissionError as exc:\n"
        "        assert 'disabled in the sandbox' in str(exc)\n"
        "    else:\n"
        "        raise AssertionError('not disabled')\n"
    )
    result = run_program(source, FAST)
    assert result.passed, result.stderr


def test_the_evaluator_and_other_processes_cannot_be_killed():
    needs("unprivileged-user", "pid-namespace")
    victim = subprocess.Popen(["sleep", "30"])
    try:
        source = (
            "import posix, signal\n"
            f"for pid in ({victim.pid}, {os.getpid()}, posix.getppid(), 1):\n"
            "    try:\n"
            "        posix.kill(pid, signal.SIGKILL)\n"
            "        print(pid, 'killed')\n"
            "    except OSError as exc:\n"
            "        print(pid, type(exc).__name__)\n"
        )
        result = run_program(source, FAST)
        assert "killed" not in result.stdout, result.stdout
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_killing_everything_it_can_only_ends_the_sandbox():
    needs("unprivileged-user", "pid-namespace")  # without both, kill(-1) would reach far more
    result = run_program("def add(a, b):\n    import posix\n    posix.kill(-1, 9)\n", FAST, ADD)
    assert not result.passed


def test_the_evaluators_environment_cannot_be_read(monkeypatch):
    needs("unprivileged-user", "pid-namespace", "private-proc")
    monkeypatch.setenv("MELORA_TEST_SECRET", "hunter2-in-the-evaluator")  # seen by processes it starts
    holder = subprocess.Popen(["sleep", "30"])  # /proc/<pid>/environ shows the environment at start
    try:
        source = (
            "import os\n"
            f"for pid in ({holder.pid}, {os.getpid()}, os.getppid(), 1):\n"
            "    for what in ('environ', 'mem'):\n"
            "        try:\n"
            "            with open(f'/proc/{pid}/{what}', 'rb') as handle:\n"
            "                print(pid, what, handle.read(4096))\n"
            "        except OSError as exc:\n"
            "            print(pid, what, type(exc).__name__)\n"
        )
        result = run_program(source, FAST)
        assert "hunter2" not in result.stdout + result.stderr
        for pid in (holder.pid, os.getpid()):  # the evaluator and its other children are not even visible
            assert f"{pid} environ FileNotFoundError" in result.stdout, result.stdout
        assert "1 environ PermissionError" in result.stdout  # the sandbox's own init runs as root
    finally:
        holder.kill()
        holder.wait()


def _marker() -> str:
    return "melora" + secrets.token_hex(4)  # fits a process name (15 characters)


def _processes_named(name: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("max_processes", [0, 64])
def test_a_forked_setsid_child_does_not_outlive_the_run(tmp_path, max_processes):
    needs("pid-namespace")
    target = Path(tempfile.mkdtemp()) / "escaped.txt"  # a world-writable folder outside the sandbox
    target.parent.chmod(0o777)
    marker = _marker()
    source = (
        "import posix, time\n"
        "pid = posix.fork()\n"
        "if pid == 0:\n"
        "    posix.setsid()\n"
        f"    open('/proc/self/comm', 'w').write({marker!r})\n"
        "    time.sleep(1.0)\n"
        f"    open({str(target)!r}, 'w').write('escaped')\n"
        "    posix._exit(0)\n"
        "print('parent done')\n"
    )
    try:
        result = run_program(source, SandboxLimits(timeout_s=5.0, max_processes=max_processes))
        assert _processes_named(marker) == []
        time.sleep(1.5)
        assert not target.exists() and _processes_named(marker) == []
        if max_processes == 0:
            assert not result.passed and "BlockingIOError" in result.stderr  # nobody may not fork
        else:
            assert result.passed, result.stderr  # it forked; the pid namespace ended the child
    finally:
        shutil.rmtree(target.parent)


def test_nothing_outside_its_working_directory_can_be_written(tmp_path):
    needs("read-only-filesystem")
    world = Path(tempfile.mkdtemp())  # world-writable, outside the sandbox
    world.chmod(0o777)
    targets = [world / "a.txt", Path(tempfile.gettempdir()) / f"melora-{secrets.token_hex(4)}.txt",
               tmp_path / "b.txt", Path.cwd() / "c.txt"]  # fmt: skip
    source = (
        f"for path in {[str(t) for t in targets] + ['../d.txt']!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print('refused', path, type(exc).__name__)\n"
        "open('ok.txt', 'w').write('inside')\n"
    )
    try:
        result = run_program(source, FAST)
        assert result.passed and "wrote" not in result.stdout, result.stdout
        assert result.files == ["ok.txt"]
        assert not any(t.exists() for t in targets) and not (Path(result.workdir).parent / "d.txt").exists()
    finally:
        shutil.rmtree(world)


def test_no_connection_to_a_local_port():
    needs("network-namespace")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        result = run_program(source, FAST)
        assert not result.passed and "unreachable" in result.stderr, result.stderr
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_forking_past_the_memory_limit_fails():
    needs("unprivileged-user")  # RLIMIT_NPROC does not bind root
    source = (
        "import posix, time\n"
        "children = []\n"
        "for _ in range(3):\n"
        "    pid = posix.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(900 * 1024 * 1024)\n"
        "        time.sleep(3)\n"
        "        posix._exit(0)\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    posix.waitpid(pid, 0)\n"
    )
    start = time.monotonic()
    result = run_program(source, SandboxLimits(timeout_s=8.0, memory_mb=1024))
    assert not result.passed and "BlockingIOError" in result.stderr
    assert time.monotonic() - start < 8
