"""The HumanEval sandbox: timeouts, crashes, passes, its own temp dir, no inherited environment."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from melora.eval.sandbox import SandboxLimits, run_program

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
