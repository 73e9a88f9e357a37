"""Reliability of the evaluations: whatever a HumanEval completion does to its files costs at most
its own problem; refusals and defective data files are one clear line, before any model loads."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from melora.lab.args import UserError
from melora.lab.eval import bbh, drop, humaneval, mmlu, runner, sandbox, sandbox_child
from melora.lab.eval.args import EvalArgs
from melora.lab.eval.sandbox import Containment, SandboxLimits

LIMITS = SandboxLimits(timeout_s=5.0)
ROOT = Path(__file__).resolve().parents[1]

ADD = humaneval.Problem(
    "T/add",
    'def add(a, b):\n    """a + b"""\n',
    "add",
    "def check(candidate):\n    assert candidate(2, 3) == 5\n",
)
NEG = humaneval.Problem(
    "T/neg", 'def neg(x):\n    """-x"""\n', "neg", "def check(candidate):\n    assert candidate(4) == -4\n"
)

# Completions that return the right value but first do something hostile to their own files.
DEEP = "    import os\n    for _ in range(1500):\n        os.mkdir('d')\n        os.chdir('d')\n    return a + b\n"
MANY = "    for i in range(20000):\n        open(f'f{i}', 'w').close()\n    return a + b\n"
LONG_PATH = (
    "    import os\n    for _ in range(20):\n        os.mkdir('x' * 255)\n        os.chdir('x' * 255)\n"
    "    open('leaf', 'w').close()\n    return a + b\n"
)
ODD_NAMES = (
    "    import os, posix\n"
    "    open(b'bad\\xff\\xfe', 'w').close()\n"
    "    open('new\\nline', 'w').close()\n"
    "    os.symlink('loop', 'loop')\n"
    "    os.symlink('.', 'self')\n"
    "    os.mkdir('locked')\n"
    "    open('locked/inside', 'w').close()\n"
    "    posix.chmod('locked', 0)\n"
    "    os.mkdir('read-only')\n"
    "    open('read-only/inside', 'w').close()\n"
    "    posix.chmod('read-only', 0o500)\n"
    "    return -x\n"
)
LONE_SURROGATE = "    return a + b  # \udcff\n"  # no UTF-8 file can hold it


def test_one_hostile_completion_costs_only_its_own_problem():
    cases = [
        (ADD, "    return a + b\n", "passed", ""),
        (ADD, DEEP, "failed", "could not list: folders nested more than 64 deep"),
        (NEG, "    return -x\n", "passed", ""),
        (ADD, MANY, "failed", "could not list: more than 10,000 files and folders"),
        (ADD, LONG_PATH, "failed", "File name too long"),
        (NEG, ODD_NAMES, "passed", ""),
        (ADD, LONE_SURROGATE, "failed", "the program did not load"),
        (NEG, "    return x\n", "failed", "AssertionError"),
    ]
    result = humaneval.score_completions([c[0] for c in cases], [c[1] for c in cases], LIMITS, workers=2)
    for (_, _, status, reason), prediction in zip(cases, result.predictions):
        if status == "passed" and prediction["completion"] == ODD_NAMES and prediction["status"] != "passed":
            # where the sandbox cannot read a folder the program locked, that is its failure
            status, reason = "failed", "the program left files the sandbox could not list: locked"
        assert prediction["status"] == status, prediction
        assert reason in prediction["reason"], prediction
    passed = sum(p["status"] == "passed" for p in result.predictions)
    assert result.summary["pass@1"] == passed / len(cases) and result.details["status_counts"]["failed"] >= 5
    "".join(p["reason"] + p["stderr"] for p in result.predictions).encode("utf-8")  # writable as they are


def test_odd_names_are_listed_escaped_and_never_followed():
    result = sandbox.run_program(f"def neg(x):\n{ODD_NAMES}\nneg(1)\n", LIMITS)
    assert result.passed or "could not list" in result.reason, result
    if result.passed:
        assert result.files == [
            "bad\\xff\\xfe",
            "locked/inside",
            "loop",
            "new\nline",
            "read-only/inside",
            "self",
        ]


def _nest(top: Path, depth: int) -> int:
    """``depth`` folders ``d/d/...`` under ``top`` (made by descriptor); the deepest one's descriptor."""
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        deeper = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    return fd


def _flatten(top: Path, step: int = 400) -> None:
    """Cut the chain ``top/d/d/...`` into pieces ``step`` deep beside it, so that pytest's recursive
    removal of tmp_path copes with what a failing test left (and later test runs do not crash)."""
    fd = os.open(top, os.O_RDONLY)
    try:
        root, piece = "d", 0
        while True:
            piece += 1
            try:
                os.rename("/".join([root] + ["d"] * step), f"piece{piece}", src_dir_fd=fd, dst_dir_fd=fd)
            except FileNotFoundError:
                return
            root = f"piece{piece}"
    finally:
        os.close(fd)


def test_listing_what_a_program_left_is_bounded_and_never_raises(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    open(os.fsencode(tmp_path) + b"/bad\xff", "w").close()
    (tmp_path / "new\nline").write_text("")
    os.symlink("loop", tmp_path / "loop")
    os.symlink(".", tmp_path / "self")
    (tmp_path / "prog.py").write_text("")  # the sandbox's own files are not listed
    expected = ["bad\\xff", "loop", "new\nline", "self", "sub/f"]
    assert sandbox_child.list_files(str(tmp_path)) == (expected, "")
    os.close(_nest(tmp_path / "sub", 1500))
    try:
        files, problem = sandbox_child.list_files(str(tmp_path))
    finally:
        _flatten(tmp_path / "sub")
    assert files == expected and problem == "folders nested more than 64 deep"


def test_cleanup_removes_any_tree_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = tmp_path / "work"
    top.mkdir()
    fd = _nest(top, 1500)  # deeper than the standard library's recursive rmtree can go (Python 3.11)
    try:
        os.symlink(str(outside), "out", dir_fd=fd)
        os.symlink("loop", "loop", dir_fd=fd)
        os.close(os.open(b"bad\xff", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        for name, mode in (("locked", 0), ("read-only", 0o500)):
            os.mkdir(name, dir_fd=fd)
            os.close(os.open(f"{name}/inside", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            os.chmod(name, mode, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        sandbox._remove_tree(str(top))
        assert not top.exists()
        assert (outside / "keep").read_text() == "keep"
        sandbox._remove_tree(str(top))  # gone already: nothing to do, nothing raised
    finally:
        if top.exists():
            _flatten(top)


def test_an_unexpected_error_scoring_one_problem_is_its_failure_alone():
    unusable = humaneval.Problem("T/bad", ADD.prompt, "add-on", ADD.test)  # not a function name
    result = humaneval.score_completions(
        [ADD, unusable, NEG], ["    return a + b\n", "    return a + b\n", "    return -x\n"], LIMITS
    )
    assert [p["status"] for p in result.predictions] == ["passed", "failed", "passed"]
    assert "could not score it: ValueError" in result.predictions[1]["reason"]
    assert "not a Python identifier" in result.predictions[1]["reason"]


# --------------------------------------------------------------------------- refusals, one line


def _melora(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MELORA_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "melora.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_humaneval_without_permission_is_one_line_and_exit_2(tmp_path):
    done = _melora("eval", "--model", "no-such-model", "--tasks", "mmlu,humaneval",
                   "--output-dir", str(tmp_path / "out"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"melora eval: error: {humaneval.NO_PERMISSION}",
        "(rerun with --debug for the traceback)",
    ]
    assert not (tmp_path / "out").exists()


def test_refusals_are_user_errors_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="pass --allow-code-execution"):
        runner.run_eval(
            EvalArgs("m", tasks=["humaneval"], limit=1, batch_size=1, output_dir=str(tmp_path / "out"))
        )
    weak = Containment(
        ("rlimits",), ("pid-namespace",), {"pid-namespace": "unshare: Operation not permitted"}
    )
    monkeypatch.setattr(sandbox, "_probed", weak)
    with pytest.raises(UserError, match="lacks pid-namespace .* pass --accept-weak-sandbox") as refusal:
        runner.run_eval(EvalArgs("m", tasks=["humaneval"], limit=1, batch_size=1,
                                 output_dir=str(tmp_path / "out"), allow_code_execution=True))  # fmt: skip
    assert isinstance(refusal.value, sandbox.WeakSandboxError)  # still what it was


# --------------------------------------------------------------------------- defective data files

GOOD_PROBLEM = {
    "task_id": "T/0",
    "prompt": "def f():\n",
    "entry_point": "f",
    "test": "def check(c):\n    pass\n",
}


def _jsonl(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


GOOD_LINE = json.dumps(GOOD_PROBLEM).encode()
HUMANEVAL_CASES = {
    "not-utf8": (_jsonl(GOOD_LINE, GOOD_LINE.replace(b"def f", b"def \xff")),
                 r"HumanEval.jsonl, line 2: byte b'\\xff' at column \d+ is not UTF-8"),
    "not-json": (_jsonl(GOOD_LINE, b"", b'{"task_id": "T/2",'), r"HumanEval.jsonl, line 3: not valid JSON"),
    "not-an-object": (_jsonl(b"[1, 2]"), r"line 1: expected a JSON object on each line, got an array"),
    "wrong-type": (_jsonl(json.dumps({**GOOD_PROBLEM, "test": 1}).encode()),
                      r"line 1: the field 'test' must be a string, got a number 1"),
    "absent-field": (_jsonl(json.dumps({k: v for k, v in GOOD_PROBLEM.items() if k != "prompt"}).encode()),
                     r"line 1: the field 'prompt' is missing \(fields there: 'entry_point', 'task_id', 'test'\)"),
    "bad-entry-point": (_jsonl(json.dumps({**GOOD_PROBLEM, "entry_point": "f()"}).encode()),
                        r"line 1: entry_point 'f\(\)' is not a Python function name"),
    "lone-surrogate": (_jsonl(GOOD_LINE.replace(b"def f", b"def \\udcff")), r"line 1: .*lone surrogate"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HUMANEVAL_CASES))
def test_defective_humaneval_lines_are_one_user_error_naming_file_and_line(tmp_path, case):
    content, message = HUMANEVAL_CASES[case]
    (tmp_path / "HumanEval.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        humaneval.load(tmp_path)
    assert "\n" not in str(error.value) and str(tmp_path / "HumanEval.jsonl") in str(error.value)


def test_a_broken_gzip_is_one_user_error(tmp_path):
    (tmp_path / "HumanEval.jsonl.gz").write_bytes(gzip.compress(_jsonl(GOOD_LINE))[:-12])
    with pytest.raises(UserError, match=r"HumanEval.jsonl.gz: not a readable gzip file"):
        humaneval.load(tmp_path)


BBH_CASES = {
    "not-json": (b'{"examples": [\n  {"input": "x", "target": "y"},\n  oops\n]}', r"t.json, line 3: not valid JSON"),
    "not-utf8": (b'{"examples": [\n{"input": "\xe9", "target": "y"}]}', r"t.json, line 2: byte b'\\xe9'"),
    "no-examples": (b'{"canary": "x"}', r"t.json \(a BBH task file\): the field 'examples' is missing"),
    "examples-not-a-list": (b'{"examples": {}}', r"the field 'examples' must be an array, got an object"),
    "target-number": (b'{"examples": [{"input": "a", "target": "b"}, {"input": "a", "target": 3}]}',
                      r"t.json: examples\[1\]: the field 'target' must be a string, got a number 3"),
    "example-not-object": (b'{"examples": ["a"]}', r"examples\[0\]: expected a JSON object, got a string 'a'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BBH_CASES))
def test_defective_bbh_files_are_one_user_error_naming_the_place(tmp_path, case):
    content, message = BBH_CASES[case]
    (tmp_path / "t.json").write_bytes(content)
    with pytest.raises(UserError, match=message):
        bbh.load(tmp_path)


def _drop_file(qa: dict, passage="P") -> bytes:
    return json.dumps({"nfl_1": {"passage": passage, "qa_pairs": [qa]}}).encode()


DROP_CASES = {
    "not-an-object": (b"[]", r"drop_dataset_dev.json: expected the official DROP layout"),
    "no-qa-pairs": (b'{"nfl_1": {"passage": "P"}}', r"section 'nfl_1': the field 'qa_pairs' is missing"),
    "passage-number": (_drop_file({"question": "q", "answer": {"number": "1"}}, passage=1),
                       r"section 'nfl_1': the field 'passage' must be a string, got a number 1"),
    "no-question": (_drop_file({"answer": {"number": "1"}}),
                    r"section 'nfl_1' qa_pairs\[0\]: the field 'question' is missing"),
    "answer-string": (_drop_file({"question": "q", "answer": "1"}),
                      r"qa_pairs\[0\]: the field 'answer' must be an object, got a string '1'"),
    "spans-numbers": (_drop_file({"question": "q", "validated_answers": [{"spans": ["a"]}, {"spans": [2]}]}),
                      r"qa_pairs\[0\] validated_answers\[1\]: 'spans' must hold strings, got a number 2"),
    "not-utf8": (b'{"nfl_1": {"passage": "\xff"}}', r"drop_dataset_dev.json, line 1: byte b'\\xff'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DROP_CASES))
def test_defective_drop_files_are_one_user_error_naming_the_place(tmp_path, case):
    content, message = DROP_CASES[case]
    (tmp_path / "drop_dataset_dev.json").write_bytes(content)
    with pytest.raises(UserError, match=message):
        drop.load(tmp_path)


def test_a_non_utf8_mmlu_csv_is_one_user_error_naming_the_line(tmp_path):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"x_{split}.csv").write_bytes(b"q,a,b,c,d,A\n\xe9t\xe9,a,b,c,d,B\n")
    with pytest.raises(UserError, match=r"x_dev.csv, line 2: byte b'\\xe9' at column 1 is not UTF-8"):
        mmlu.load(tmp_path)


def test_a_defective_data_file_through_the_cli_is_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "data" / "bbh").mkdir(parents=True)
    (tmp_path / "data" / "bbh" / "t.json").write_bytes(BBH_CASES["not-json"][0])
    done = _melora("eval", "--model", "no-such-model", "--tasks", "bbh", "--data-dir", str(tmp_path / "data"),
                   "--output-dir", str(tmp_path / "out"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("INFO ")]
    assert lines == [
        f"melora eval: error: {tmp_path / 'data' / 'bbh' / 't.json'}, line 3: not valid JSON (Expecting value "
        "at column 3); fix the file or download it again.",
        "(rerun with --debug for the traceback)",
    ]


# --------------------------------------------------------------------------- progress


def test_long_phases_log_their_progress_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    from melora.lab.eval import scoring
    from tests.test_eval_fixtures import tiny_lm

    monkeypatch.setattr(scoring, "LOG_EVERY_S", 0.0)  # every step, instead of every 30 s
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal (also under pytest -s)
    model, tokenizer = tiny_lm()
    with caplog.at_level("INFO", logger="melora.lab.eval.scoring"):
        scoring.choice_logprobs(model, tokenizer, [f"question {i}" for i in range(8)], [" A", " B"], 2)
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == scoring.logger.name] == [
        "scoring: 2/8",
        "scoring: 4/8",
        "scoring: 6/8",
    ]
