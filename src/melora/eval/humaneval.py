"""HumanEval (Chen et al., 2021): greedy completion, pass@1 by running the unit tests in a sandbox.

The model continues each problem's ``prompt`` (signature + docstring) greedily, for at most 256
new tokens, stopping at the usual top-level markers ("\\ndef ", "\\nclass ", "\\nif __name__",
"\\nprint(", "\\n#"). The program ``prompt + completion`` then runs in :mod:`melora.eval.sandbox`,
and the problem's ``test`` runs beside it in a separate harness process that calls
``check(entry_point)`` on it; a problem passes only when that harness reports that ``check``
returned (an early exit of the program is a failure). With one greedy sample per problem pass@1
is the passing fraction. Timeouts and crashes count as failures. Nothing runs without explicit
permission, nor in a sandbox that lacks a required containment unless that is accepted.
Data: ``<dir>/HumanEval.jsonl.gz`` (or ``.jsonl``) or hub ``openai/openai_humaneval``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from melora.eval.sandbox import Harness, SandboxLimits, containment, require_containment, run_program
from melora.eval.scoring import TaskResult, greedy_generate

logger = logging.getLogger(__name__)

HUB_DATASET = "openai/openai_humaneval"
MAX_NEW_TOKENS = 256
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
NO_PERMISSION = (
    "HumanEval executes model-written code: pass --allow-code-execution (allow_code_execution=True) "
    "to run it in a sandboxed subprocess, or drop humaneval from --tasks."
)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str


def _problem(raw: dict) -> Problem:
    return Problem(raw["task_id"], raw["prompt"], raw["entry_point"], raw["test"])


def load(data_dir: Path | None, limit: int | None = None) -> list[Problem]:
    """The first ``limit`` problems in file order."""
    if data_dir is None:
        from datasets import load_dataset

        return [_problem(r) for r in load_dataset(HUB_DATASET, split="test")][:limit]
    files = sorted(data_dir.glob("*.jsonl.gz")) or sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"No HumanEval file (HumanEval.jsonl.gz or .jsonl) under {data_dir}.")
    opener = gzip.open if files[0].suffix == ".gz" else open
    with opener(files[0], "rt", encoding="utf-8") as handle:
        return [_problem(json.loads(line)) for line in handle if line.strip()][:limit]


def build_program(problem: Problem, completion: str) -> str:
    """The untrusted file the sandbox runs: the prompt and its completion (the function)."""
    return f"{problem.prompt}{completion}\n"


def build_harness(problem: Problem) -> Harness:
    """The trusted side: the prompt's helpers and the tests, then ``check(entry_point)``."""
    return Harness(entry_point=problem.entry_point, test=problem.test, setup=problem.prompt)


def score_completions(
    problems: Sequence[Problem],
    completions: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> TaskResult:
    """Run each problem's tests against its completion; pass@1 is the passing fraction."""
    if not problems:
        raise ValueError("No HumanEval problems were evaluated; check --limit and the data folder.")
    workers = workers or min(4, os.cpu_count() or 1)
    jobs = [(build_program(p, c), build_harness(p)) for p, c in zip(problems, completions)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda job: run_program(job[0], limits, job[1]), jobs))
    predictions = [
        {"task_id": p.task_id, "completion": c, "status": o.status, "reason": o.reason,
         "stderr": o.stderr[-500:]}
        for p, c, o in zip(problems, completions, outcomes)
    ]  # fmt: skip
    passed = sum(o.passed for o in outcomes)
    summary = {"pass@1": passed / len(problems)}
    details = {"status_counts": dict(Counter(o.status for o in outcomes)), "sandbox": containment().as_dict()}
    return TaskResult(summary, details, predictions)


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    batch_size: int,
    max_new_tokens: int | None = None,
    allow_code_execution: bool = False,
    limits: SandboxLimits | None = None,
    accept_weak_sandbox: bool = False,
) -> TaskResult:
    """Generate a greedy completion per problem, then score them in the sandbox.

    Refuses (:class:`~melora.eval.sandbox.WeakSandboxError`) when the sandbox here lacks a
    required containment, unless ``accept_weak_sandbox``.
    """
    if not allow_code_execution:
        raise PermissionError(NO_PERMISSION)
    require_containment(accept_weak_sandbox)
    logger.info("HumanEval: generating %d completions", len(problems))
    completions = greedy_generate(
        model, tokenizer, [p.prompt for p in problems], max_new_tokens or MAX_NEW_TOKENS, STOP, batch_size
    )
    return score_completions(problems, completions, limits)
