"""MMLU (Hendrycks et al., 2021) the InstructEval way: 5-shot from dev, answer by log-likelihood.

Prompt (``hendrycks/test`` / InstructEval ``mmlu.py``)::

    The following are multiple choice questions (with answers) about {subject words}.\\n\\n
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n      (x 5 dev shots)
    {question}\\nA. ...\\nD. {d}\\nAnswer:

The prediction is the letter among " A"/" B"/" C"/" D" with the highest log-probability after
"Answer:". Shots are dropped from the end while the prompt exceeds the model's context (max 2048).
Data: ``<dir>/{dev,test}/<subject>_{dev,test}.csv`` (no header: question, A, B, C, D, answer) or
the hub dataset ``cais/mmlu`` (same rows, same order).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from melora.lab.args import UserError
from melora.lab.eval.args import EvalArgs
from melora.lab.eval.datafiles import read_text
from melora.lab.eval.scoring import TaskResult, choice_logprobs, fit_shots, model_max_length

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
HUB_DATASET = "cais/mmlu"
N_SHOTS = 5
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)  # fmt: skip


@dataclass(frozen=True)
class Question:
    """One MMLU item; ``answer`` is a letter A-D."""

    question: str
    choices: tuple[str, str, str, str]
    answer: str


@dataclass(frozen=True)
class Subject:
    """The dev shots and the (possibly limited) test questions of one subject."""

    name: str
    dev: list[Question]
    test: list[Question]


def _from_row(row: Sequence[str], where: str) -> Question:
    if len(row) != 6 or row[5] not in LETTERS:
        raise UserError(
            f"{where}: expected 6 columns (question, A, B, C, D, answer A-D) with no header; "
            f"got {len(row)} column(s) {row!r:.200}."
        )
    return Question(row[0], (row[1], row[2], row[3], row[4]), row[5])


def _read_csv(path: Path) -> list[Question]:
    """The questions of one MMLU CSV; a defect is a UserError naming the file and the line."""
    csv.field_size_limit(
        min(sys.maxsize, 2**31 - 1)
    )  # some MMLU fields exceed csv's 131,072-character default
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    questions = []
    try:
        for row in reader:
            questions.append(_from_row(row, f"{path}, line {reader.line_num}"))
    except csv.Error as exc:
        raise UserError(f"{path}, line {reader.line_num}: not valid CSV ({exc}).") from None
    return questions


def _read_hub(subject: str, split: str) -> list[Question]:
    from datasets import load_dataset

    rows = load_dataset(HUB_DATASET, subject, split=split)
    return [Question(r["question"], tuple(r["choices"]), LETTERS[int(r["answer"])]) for r in rows]


def load(data_dir: Path | None, limit: int | None = None) -> list[Subject]:
    """Subjects in alphabetical order with the first ``limit`` test questions each.

    ``data_dir`` holds ``dev/`` and ``test/`` CSVs (the subjects are those with a test file);
    ``None`` reads ``cais/mmlu`` from the hub.
    """
    if data_dir is None:
        names = list(SUBJECTS)
        read = _read_hub
    else:
        names = sorted(p.name[: -len("_test.csv")] for p in (data_dir / "test").glob("*_test.csv"))
        if not names:
            raise FileNotFoundError(f"No MMLU test CSVs (<subject>_test.csv) under {data_dir / 'test'}.")

        def read(subject: str, split: str) -> list[Question]:
            return _read_csv(data_dir / split / f"{subject}_{split}.csv")

    return [Subject(s, read(s, "dev")[:N_SHOTS], read(s, "test")[:limit]) for s in names]


def format_question(q: Question, include_answer: bool) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` plus `` X\\n\\n`` when ``include_answer``."""
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += "\nAnswer:"
    return text + f" {q.answer}\n\n" if include_answer else text


def build_prompt(subject: str, shots: Sequence[Question], question: Question) -> str:
    """The header, the shots with answers, then the question without its answer."""
    header = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )
    return header + "".join(format_question(s, True) for s in shots) + format_question(question, False)


def accuracy_summary(correct: dict[str, list[bool]]) -> dict[str, float]:
    """``acc`` (micro: over all questions) and ``acc_macro`` (mean of subject accuracies)."""
    per_subject = [sum(c) / len(c) for c in correct.values() if c]
    everything = [x for c in correct.values() for x in c]
    if not everything:
        raise ValueError("No MMLU questions were evaluated; check --limit and the data folder.")
    return {
        "acc": sum(everything) / len(everything),
        "acc_macro": sum(per_subject) / len(per_subject),
    }


def evaluate(model: torch.nn.Module, tokenizer, subjects: Sequence[Subject], args: EvalArgs) -> TaskResult:
    """Score every test question of every subject in one batched pass (``args.batch_size`` at a time)."""
    max_tokens = model_max_length(model)
    prompts, owners = [], []
    for subject in subjects:
        for q in subject.test:
            prompt, _ = fit_shots(
                lambda k, s=subject, q=q: build_prompt(s.name, s.dev[:k], q),
                len(subject.dev),
                tokenizer,
                max_tokens,
            )
            prompts.append(prompt)
            owners.append((subject.name, q))
    logger.info("MMLU: scoring %d questions from %d subjects", len(prompts), len(subjects))
    letters = [f" {x}" for x in LETTERS]
    groups = [name for name, _ in owners]  # a subject's questions share its header and shots (KV cache)
    scores = choice_logprobs(model, tokenizer, prompts, letters, args.batch_size, max_tokens, groups)
    correct: dict[str, list[bool]] = {s.name: [] for s in subjects}
    predictions = []
    for (name, q), row in zip(owners, scores):
        pred = LETTERS[int(row.argmax())]
        correct[name].append(pred == q.answer)
        predictions.append(
            {
                "subject": name,
                "question": q.question,
                "answer": q.answer,
                "pred": pred,
                "logprobs": row.tolist(),
            }
        )
    per_subject = {name: sum(c) / len(c) for name, c in correct.items() if c}
    return TaskResult(accuracy_summary(correct), {"per_subject": per_subject}, predictions)
