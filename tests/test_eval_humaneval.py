"""HumanEval: loading, program assembly, pass@1 arithmetic through the sandbox, the permission gate."""

from __future__ import annotations

import pytest

from melora.eval import humaneval
from melora.eval.sandbox import SandboxLimits
from tests.test_eval_fixtures import HUMANEVAL_PROBLEMS, tiny_lm, write_eval_data

FAST = SandboxLimits(timeout_s=2.0)


def test_load_reads_gzipped_jsonl_and_limits(tmp_path):
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval", limit=1)
    assert problems == [humaneval.Problem("HumanEval/0", HUMANEVAL_PROBLEMS[0]["prompt"], "add",
                                          HUMANEVAL_PROBLEMS[0]["test"])]  # fmt: skip


def test_hub_rows_give_the_same_problems(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", lambda name, split: HUMANEVAL_PROBLEMS)
    assert humaneval.load(None) == humaneval.load(write_eval_data(tmp_path) / "humaneval")


def test_program_appends_tests_and_check_call():
    problem = humaneval.Problem("T/0", "def f():\n", "f", "def check(c):\n    assert c() == 1\n")
    program = humaneval.build_program(problem, "    return 1\n")
    assert program == "def f():\n    return 1\n\n\ndef check(c):\n    assert c() == 1\n\n\ncheck(f)\n"


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
        humaneval.evaluate(model, tokenizer, problems, batch_size=2)


def test_evaluate_generates_and_scores_on_a_tiny_model(tmp_path):
    model, tokenizer = tiny_lm()
    problems = humaneval.load(write_eval_data(tmp_path) / "humaneval")
    result = humaneval.evaluate(
        model, tokenizer, problems, batch_size=2, max_new_tokens=4, allow_code_execution=True, limits=FAST
    )
    assert len(result.predictions) == 2 and result.summary["pass@1"] == 0.0  # random bytes do not pass
    assert all(not any(s in p["completion"] for s in humaneval.STOP) for p in result.predictions)
