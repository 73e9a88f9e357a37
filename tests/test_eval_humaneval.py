"""HumanEval: loading, program assembly, pass@1 arithmetic through the sandbox, the permission gate."""

from __future__ import annotations

import pytest

from melora.lab.eval import humaneval, runner, sandbox
from melora.lab.eval.args import EvalArgs
from melora.lab.eval.sandbox import Containment, Harness, SandboxLimits, WeakSandboxError
from tests.test_eval_fixtures import HUMANEVAL_PROBLEMS, eval_args, save_tiny_lm, tiny_lm, write_eval_data

FAST = SandboxLimits(timeout_s=2.0)


def test_load_reads_gzipped_jsonl_and_limits(tmp_path):
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval", limit=1)
    assert problems == [humaneval.Problem("HumanEval/0", HUMANEVAL_PROBLEMS[0]["prompt"], "add",
                                          HUMANEVAL_PROBLEMS[0]["test"])]  # fmt: skip


def test_hub_rows_give_the_same_problems(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", lambda name, split: HUMANEVAL_PROBLEMS)
    assert humaneval.load(None) == humaneval.load(write_eval_data(tmp_path) / "humaneval")


def test_program_is_the_completed_function_and_the_tests_go_to_the_harness():
    problem = humaneval.Problem("T/0", "def f():\n", "f", "def check(c):\n    assert c() == 1\n")
    assert humaneval.build_program(problem, "    return 1\n") == "def f():\n    return 1\n\n"
    assert humaneval.build_harness(problem) == Harness("f", problem.test, setup="def f():\n")


def test_pass_at_1_by_hand(tmp_path):
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval")
    right = [p["canonical_solution"] for p in HUMANEVAL_PROBLEMS]
    assert humaneval.score_completions(problems, right, FAST).summary == {"pass@1": 1.0}
    wrong = [right[0], "    return x\n"]  # second one returns +x: its assert fails
    result = humaneval.score_completions(problems, wrong, FAST)
    assert result.summary["pass@1"] == 0.5
    assert result.details["status_counts"] == {"passed": 1, "failed": 1}
    assert "AssertionError" in result.predictions[1]["stderr"]


def test_hanging_completion_counts_as_a_timeout(tmp_path):
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval", limit=1)
    result = humaneval.score_completions(
        problems, ["    while True:\n        pass\n"], SandboxLimits(timeout_s=1.0)
    )
    assert result.summary["pass@1"] == 0.0 and result.details["status_counts"] == {"timeout": 1}


def test_nothing_runs_without_permission(tmp_path):
    model, tokenizer = tiny_lm()
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval")
    with pytest.raises(PermissionError, match="pass --allow-code-execution"):
        humaneval.evaluate(model, tokenizer, problems, eval_args(batch_size=2))


def test_evaluate_generates_and_scores_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setattr(humaneval, "LIMITS", FAST)
    model, tokenizer = tiny_lm()
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval")
    args = eval_args(batch_size=2, max_new_tokens=4, allow_code_execution=True)
    result = humaneval.evaluate(model, tokenizer, problems, args)
    assert len(result.predictions) == 2 and result.summary["pass@1"] == 0.0  # random bytes do not pass
    assert all(not any(s in p["completion"] for s in humaneval.STOP) for p in result.predictions)


@pytest.mark.parametrize(
    "completion",
    [
        "    return a + b\n\nimport sys\nsys.exit(0)\n",  # a correct body, then a top-level exit
        "    return a + b\n\nimport os\nos._exit(0)\n",
        "    import os\n    os._exit(0)\n",
        "    raise SystemExit(0)\n",
        "    import atexit, os\n    atexit.register(os._exit, 0)\n    return a - b\n",  # then a failing assert
        "    import posix\n    posix.kill(posix.getppid(), 9)\n    return a + b\n",
    ],
    ids=[
        "sys.exit-after",
        "os._exit-after",
        "os._exit-in-body",
        "SystemExit",
        "atexit-os._exit",
        "kill-parent",
    ],
)
def test_early_exits_and_tricks_score_zero(tmp_path, completion):
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval", limit=1)
    result = humaneval.score_completions(problems, [completion], FAST)
    assert result.summary["pass@1"] == 0.0, result.predictions
    assert result.predictions[0]["reason"]


def test_the_sandbox_report_travels_with_the_scores(tmp_path):
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval", limit=1)
    details = humaneval.score_completions(problems, ["    return a + b\n"], FAST).details
    assert details["sandbox"] == sandbox.containment().as_dict()


WEAK = Containment(("rlimits", "guard"), ("pid-namespace", "network-namespace"),
                   {"pid-namespace": "unshare: Operation not permitted"})  # fmt: skip


def test_a_weak_sandbox_is_refused_unless_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_probed", WEAK)
    monkeypatch.setattr(humaneval, "LIMITS", FAST)
    model, tokenizer = tiny_lm()
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval", limit=1)
    with pytest.raises(WeakSandboxError) as refusal:
        humaneval.evaluate(model, tokenizer, problems, eval_args(batch_size=1, allow_code_execution=True))
    message = str(refusal.value)
    assert "\n" not in message and "--accept-weak-sandbox" in message
    assert "pid-namespace (unshare: Operation not permitted)" in message and "network-namespace" in message
    args = eval_args(batch_size=1, max_new_tokens=2, allow_code_execution=True, accept_weak_sandbox=True)
    result = humaneval.evaluate(model, tokenizer, problems, args)
    assert result.details["sandbox"]["missing"] == ["pid-namespace", "network-namespace"]


def test_melora_eval_refuses_a_weak_sandbox_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_probed", WEAK)
    monkeypatch.setattr(runner, "load_model", lambda *a: pytest.fail("the model was loaded"))
    data = write_eval_data(tmp_path / "data")
    with pytest.raises(WeakSandboxError, match="lacks pid-namespace .* pass --accept-weak-sandbox"):
        runner.run_eval(EvalArgs("m", tasks=["humaneval"], data_dir=str(data), limit=1, batch_size=1,
                                 output_dir=str(tmp_path / "out"), allow_code_execution=True))  # fmt: skip


def test_melora_eval_reports_the_sandbox_and_takes_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_probed", WEAK)
    model_dir, data = save_tiny_lm(tmp_path / "tiny"), write_eval_data(tmp_path / "data")
    results = runner.run_eval(EvalArgs(str(model_dir), tasks=["humaneval"], data_dir=str(data), limit=1,
                                       batch_size=1, output_dir=str(tmp_path / "out"), allow_code_execution=True,
                                       max_new_tokens=2, accept_weak_sandbox=True))  # fmt: skip
    assert results["sandbox"] == WEAK.as_dict() and results["config"]["accept_weak_sandbox"] is True
    from melora.cli import build_parser

    args = build_parser().parse_args(["eval", "--model", "m", "--output-dir", "o", "--accept-weak-sandbox"])
    assert args.accept_weak_sandbox is True
