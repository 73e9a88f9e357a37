"""HumanEval (Chen et al., 2021): greedy completion, pass@1 by running the unit tests in a sandbox.

The model continues each problem's ``prompt`` (signature + docstring) greedily, for at most 256
new tokens, stopping at the usual top-level markers ("\\ndef ", "\\nclass ", "\\nif __name__",
"\\nprint(", "\\n#"). The program ``prompt + completion`` then runs in :mod:`melora.lab.eval.sandbox`,
and the problem's ``test`` runs beside it in a separate harness process that calls
``check(entry_point)`` on it; a problem passes only when that harness reports that ``check``
returned (an early exit of the program is a failure). With one greedy sample per problem pass@1
is the passing fraction. Timeouts and crashes count as failures. Nothing runs without explicit
permission, nor in a sandbox that lacks a required containment unless that is accepted.
Data: ``<dir>/HumanEval.jsonl.gz`` (or ``.jsonl``) or hub ``openai/openai_humaneval``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from melora.lab.args import UserError
from melora.lab.eval.args import EvalArgs
from melora.lab.eval.datafiles import need, read_jsonl
from melora.lab.eval.sandbox import (
    Harness,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    WeakSandboxError,
    containment,
    require_containment,
    run_program,
)
from melora.lab.eval.scoring import TaskResult, greedy_generate, progress

logger = logging.getLogger(__name__)

HUB_DATASET = "openai/openai_humaneval"
MAX_NEW_TOKENS = 256
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
LIMITS = SandboxLimits()  # per program: what `melora eval` gives each completion in the sandbox
NO_PERMISSION = (
    "HumanEval executes model-written code: pass --allow-code-execution (allow_code_execution=True) "
    "to run it in a sandboxed subprocess, or drop humaneval from --tasks."
)


class CodeExecutionNotAllowed(UserError, PermissionError):
    """HumanEval asked for without ``--allow-code-execution``: one line (exit 2) in the CLI."""


class SandboxRefused(UserError, WeakSandboxError):
    """The sandbox here lacks a required containment and that was not accepted: one line in the CLI."""


def require_permission(allow_code_execution: bool) -> None:
    """Refuse (:class:`CodeExecutionNotAllowed`) unless code execution was allowed."""
    if not allow_code_execution:
        raise CodeExecutionNotAllowed(NO_PERMISSION)


def require_sandbox(accept_weak_sandbox: bool = False):
    """:func:`~melora.lab.eval.sandbox.require_containment`, its refusal as a :class:`SandboxRefused`."""
    try:
        return require_containment(accept_weak_sandbox)
    except WeakSandboxError as exc:
        if isinstance(exc, UserError):
            raise
        raise SandboxRefused(str(exc)) from None


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
    return [_checked_problem(record, where) for where, record in read_jsonl(files[0])][:limit]


def _checked_problem(record: dict, where: str) -> Problem:
    """A problem from one JSONL record, or a UserError naming the file, the line and the field."""
    problem = Problem(*(need(record, key, where) for key in ("task_id", "prompt", "entry_point", "test")))
    if not problem.entry_point.isidentifier():
        raise UserError(
            f"{where}: entry_point {problem.entry_point!r} is not a Python function name; "
            "it must name the function the prompt defines."
        )
    return problem


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
    """Run each problem's tests against its completion; pass@1 is the passing fraction.

    Whatever one completion does, it costs at most its own problem: an error while scoring it
    (other than :class:`~melora.lab.eval.sandbox.SandboxError`, the sandbox itself unable to run)
    is that problem's failure, with the reason, and the others are scored as usual.
    """
    if not problems:
        raise ValueError("No HumanEval problems were evaluated; check --limit and the data folder.")
    workers = workers or min(4, os.cpu_count() or 1)
    outcomes: list[SandboxResult | None] = [None] * len(problems)
    bar = progress(len(problems), "HumanEval: running tests")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {
            pool.submit(_score_one, p, c, limits): i for i, (p, c) in enumerate(zip(problems, completions))
        }
        try:
            for future in as_completed(pending):
                outcomes[pending[future]] = future.result()  # a SandboxError ends the evaluation here
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no new sandbox runs after that
            raise
        finally:
            bar.close()
    predictions = [
        {"task_id": p.task_id, "completion": c, "status": o.status, "reason": o.reason,
         "stderr": o.stderr[-500:]}
        for p, c, o in zip(problems, completions, outcomes)
    ]  # fmt: skip
    passed = sum(o.passed for o in outcomes)
    summary = {"pass@1": passed / len(problems)}
    details = {"status_counts": dict(Counter(o.status for o in outcomes)), "sandbox": containment().as_dict()}
    return TaskResult(summary, details, predictions)


def _score_one(problem: Problem, completion: str, limits: SandboxLimits | None) -> SandboxResult:
    """One problem's outcome; an unexpected error scoring it is its failure, not the evaluation's."""
    start = time.monotonic()
    try:
        return run_program(build_program(problem, completion), limits, build_harness(problem))
    except SandboxError:
        raise
    except Exception as exc:
        reason = f"the sandbox could not score it: {type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        logger.warning("HumanEval %s: %s", problem.task_id, reason)
        return SandboxResult("failed", None, round(time.monotonic() - start, 3), reason=reason)


def evaluate(model: torch.nn.Module, tokenizer, problems: Sequence[Problem], args: EvalArgs) -> TaskResult:
    """Generate a greedy completion per problem, then score them in the sandbox (under ``LIMITS``).

    Reads ``args.batch_size`` and ``args.max_new_tokens`` (default ``MAX_NEW_TOKENS``). Refuses
    (:class:`CodeExecutionNotAllowed`) without ``args.allow_code_execution``, and
    (:class:`SandboxRefused`, a :class:`~melora.lab.eval.sandbox.WeakSandboxError`) when the sandbox
    here lacks a required containment, unless ``args.accept_weak_sandbox``; both are UserErrors.
    """
    require_permission(args.allow_code_execution)
    require_sandbox(args.accept_weak_sandbox)
    logger.info("HumanEval: generating %d completions", len(problems))
    prompts = [p.prompt for p in problems]
    max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens, STOP, args.batch_size)
    return score_completions(problems, completions, LIMITS)
