"""BIG-Bench Hard (Suzgun et al., 2022) the InstructEval way: 3-shot, answer-only, greedy, exact match.

Each task file's first 3 examples are the shots and the remaining ones the questions::

    {input}\\nAnswer: {target}\\n\\n      (x 3)
    {input}\\nAnswer:

The completion is generated greedily until a newline (at most 32 new tokens by default).
The answer is the completion's first line with whitespace collapsed; for multiple-choice
targets such as "(B)", an answer that starts with "(B)", "B)" or "B." or is just "B" counts as "(B)".
``em`` compares the answer with the target exactly; ``instructeval_acc`` is InstructEval's own
rule, ``completion.strip().startswith(target)``. Task scores are averaged with equal weight.
Data: ``<dir>/<task>.json`` (``{"examples": [{"input", "target"}]}``) or hub ``lukaemon/bbh``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from melora.lab.eval.args import EvalArgs
from melora.lab.eval.datafiles import need, read_json
from melora.lab.eval.scoring import TaskResult, fit_shots, greedy_generate, model_max_length

logger = logging.getLogger(__name__)

HUB_DATASET = "lukaemon/bbh"
N_SHOTS = 3
MAX_NEW_TOKENS = 32
STOP = ("\n",)
TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two", "navigate",
    "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
    "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects", "web_of_lies", "word_sorting",
)  # fmt: skip

_OPTION = re.compile(r"^\([A-Z]\)$")
_LEADING_OPTION = re.compile(r"^\(?([A-Z])(?:\)|\.|$)")  # "(B)...", "B)", "B.", "B"


@dataclass(frozen=True)
class Example:
    input: str
    target: str


@dataclass(frozen=True)
class Task:
    """The shots and the (possibly limited) questions of one BBH task."""

    name: str
    shots: list[Example]
    questions: list[Example]


def _split(name: str, examples: list[Example], limit: int | None) -> Task:
    return Task(name, examples[:N_SHOTS], examples[N_SHOTS:][:limit])


def load(data_dir: Path | None, limit: int | None = None) -> list[Task]:
    """Tasks in alphabetical order with the first ``limit`` questions (after the shots) each."""
    if data_dir is None:
        from datasets import load_dataset

        return [
            _split(
                t,
                [Example(r["input"], r["target"]) for r in load_dataset(HUB_DATASET, t, split="test")],
                limit,
            )
            for t in TASKS
        ]
    files = sorted(data_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"No BBH task files (<task>.json) under {data_dir}.")
    return [_split(path.stem, read_task_file(path), limit) for path in files]


def read_task_file(path: Path) -> list[Example]:
    """The examples of one ``<task>.json`` (``{"examples": [{"input": ..., "target": ...}, ...]}``);
    a defect is a UserError naming the file and the example."""
    raw = need(read_json(path), "examples", f"{path} (a BBH task file)", list)
    return [
        Example(need(e, "input", f"{path}: examples[{i}]"), need(e, "target", f"{path}: examples[{i}]"))
        for i, e in enumerate(raw)
    ]


def format_example(example: Example, include_answer: bool) -> str:
    """``input\\nAnswer:`` plus `` target\\n\\n`` when ``include_answer``."""
    text = example.input + "\nAnswer:"
    return text + f" {example.target}\n\n" if include_answer else text


def build_prompt(shots: Sequence[Example], question: Example) -> str:
    return "".join(format_example(s, True) for s in shots) + format_example(question, False)


def extract_answer(completion: str, target: str) -> str:
    """The answer in ``completion``: its first line, whitespace collapsed; "(X)" form for option targets."""
    lines = completion.strip().splitlines()
    answer = " ".join(lines[0].split()) if lines else ""
    if _OPTION.match(target):
        match = _LEADING_OPTION.match(answer)
        if match:
            return f"({match.group(1)})"
    return answer


def score(completion: str, target: str) -> tuple[bool, bool]:
    """``(exact match, InstructEval's startswith rule)`` for one completion."""
    return extract_answer(completion, target) == target, completion.strip().startswith(target)


def evaluate(model: torch.nn.Module, tokenizer, tasks: Sequence[Task], args: EvalArgs) -> TaskResult:
    """Generate for every question of every task in one batched pass, then score per task.

    Reads ``args.batch_size`` and ``args.max_new_tokens`` (default ``MAX_NEW_TOKENS``).
    """
    max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS
    budget = model_max_length(model) - max_new_tokens
    prompts, owners = [], []
    for task in tasks:
        for q in task.questions:
            prompt, _ = fit_shots(
                lambda k, t=task, q=q: build_prompt(t.shots[:k], q), len(task.shots), tokenizer, budget
            )
            prompts.append(prompt)
            owners.append((task.name, q))
    logger.info("BBH: generating for %d questions from %d tasks", len(prompts), len(tasks))
    groups = [name for name, _ in owners]  # a task's questions share its shots (KV cache)
    completions = greedy_generate(
        model, tokenizer, prompts, max_new_tokens, STOP, args.batch_size, groups=groups
    )
    em: dict[str, list[bool]] = {t.name: [] for t in tasks}
    loose: dict[str, list[bool]] = {t.name: [] for t in tasks}
    predictions = []
    for (name, q), completion in zip(owners, completions):
        exact, prefix = score(completion, q.target)
        em[name].append(exact)
        loose[name].append(prefix)
        predictions.append(
            {"task": name, "input": q.input, "target": q.target, "completion": completion, "correct": exact}
        )
    per_task = {name: sum(v) / len(v) for name, v in em.items() if v}
    if not per_task:
        raise ValueError("No BBH questions were evaluated; check --limit and the data folder.")
    per_task_loose = {name: sum(v) / len(v) for name, v in loose.items() if v}
    summary = {
        "em": sum(per_task.values()) / len(per_task),
        "instructeval_acc": sum(per_task_loose.values()) / len(per_task_loose),
    }
    return TaskResult(
        summary, {"per_task": per_task, "per_task_instructeval_acc": per_task_loose}, predictions
    )
