"""DROP (Dua et al., 2019) the InstructEval way, scored with DROP's own EM and F1.

Following InstructEval's ``drop.py``: keep the validation questions whose answer spans all agree
(one unique answer), draw 3 shots with ``random.Random(0).sample``, drop every question about a
shot's passage, and prompt with::

    {passage} {question}\\nAnswer: {answer}\\n\\n      (x 3)
    {passage} {question}\\nAnswer:

The completion is generated greedily until a newline (16 new tokens by default). ``em`` and
``f1`` use the official DROP evaluation (``drop_eval.py``): answers are lower-cased, split on
spaces and hyphens, stripped of punctuation (except in numbers) and articles, numbers are
normalised ("2.0" == "2"), F1 is a bag-of-words F1 that is zero when the gold answer has numbers
the prediction lacks, and multi-span answers are aligned one to one. ``instructeval_acc`` is
InstructEval's rule, ``completion.strip().startswith(answer)``.
Data: hub ``ucinlp/drop`` (validation) or, under ``<dir>``, the official ``drop_dataset_dev.json``
(converted the way the hub dataset is: each validated answer's number, date or spans).
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from melora.lab.args import UserError
from melora.lab.eval.args import EvalArgs
from melora.lab.eval.datafiles import json_type, need, read_json
from melora.lab.eval.scoring import TaskResult, fit_shots, greedy_generate, model_max_length

logger = logging.getLogger(__name__)

HUB_DATASET = "ucinlp/drop"
N_SHOTS = 3
SHOT_SEED = 0
MAX_NEW_TOKENS = 16
STOP = ("\n",)


@dataclass(frozen=True)
class Question:
    """One DROP question; ``spans`` are all gold spans as the hub dataset flattens them."""

    section_id: str
    passage: str
    question: str
    spans: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.spans[0].strip()


@dataclass(frozen=True)
class Split:
    shots: list[Question]
    questions: list[Question]


# ---------------------------------------------------------------- loading


def _official_spans(answers: list, where: str = "answer") -> tuple[str, ...]:
    """Flatten official answer dicts (number / date / spans) the way the hub dataset does; an
    answer of the wrong shape is a UserError naming ``where``."""
    spans: list[str] = []
    for k, answer in enumerate(answers):
        at = where if where.endswith(" answer") else f"{where}[{k}]"
        if not isinstance(answer, dict):
            raise UserError(
                f"{at}: expected an answer object (number, date, spans), got {json_type(answer)}."
            )
        date = answer.get("date") or {}
        if not isinstance(date, dict):
            need(answer, "date", at, dict)  # raises, naming the field
        date_text = " ".join(str(date.get(k, "")).strip() for k in ("day", "month", "year")).strip()
        if str(answer.get("number", "")).strip():
            spans.append(str(answer["number"]))
        elif date_text:
            spans.append(date_text)
        elif answer.get("spans"):
            found = need(answer, "spans", at, list)
            bad = next((x for x in found if not isinstance(x, str)), None)
            if bad is not None:
                raise UserError(f"{at}: 'spans' must hold strings, got {json_type(bad)} {bad!r:.60}.")
            spans.extend(found)
    return tuple(spans)


def _read_official(path: Path) -> list[Question]:
    """Questions of the official ``drop_dataset_dev.json``; a defect is a UserError naming the file
    and the place (section id, question number, field)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: expected the official DROP layout, an object of sections by id, got {json_type(data)}."
        )
    questions = []
    for section_id, section in data.items():
        where = f"{path}: section {section_id!r}"
        passage = need(section, "passage", where)
        for i, qa in enumerate(need(section, "qa_pairs", where, list)):
            at = f"{where} qa_pairs[{i}]"
            question = need(qa, "question", at)
            if qa.get("validated_answers"):
                answers = need(qa, "validated_answers", at, list)
                spans = _official_spans(answers, f"{at} validated_answers")
            else:
                spans = _official_spans([need(qa, "answer", at, dict)], f"{at} answer")
            if spans:
                questions.append(Question(section_id, passage, question, spans))
    return questions


def _read_hub() -> list[Question]:
    from datasets import load_dataset

    rows = load_dataset(HUB_DATASET, split="validation")
    return [
        Question(r["section_id"], r["passage"], r["question"], tuple(r["answers_spans"]["spans"]))
        for r in rows
    ]


def make_split(questions: Sequence[Question], limit: int | None = None) -> Split:
    """InstructEval's split: single-answer questions, 3 seeded random shots, their passages held out."""
    single = [q for q in questions if len({s.strip() for s in q.spans}) == 1]
    if len(single) <= N_SHOTS:
        raise ValueError(f"DROP needs more than {N_SHOTS} single-answer questions, found {len(single)}.")
    shots = random.Random(SHOT_SEED).sample(single, k=N_SHOTS)
    held_out = {s.passage for s in shots}
    return Split(shots, [q for q in single if q.passage not in held_out][:limit])


def load(data_dir: Path | None, limit: int | None = None) -> Split:
    """Shots and the first ``limit`` questions (after the split) from the hub or ``<dir>/*.json``."""
    if data_dir is None:
        return make_split(_read_hub(), limit)
    files = sorted(data_dir.glob("*dev*.json")) or sorted(data_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"No DROP file (drop_dataset_dev.json) under {data_dir}.")
    return make_split(_read_official(files[0]), limit)


# ---------------------------------------------------------------- official DROP metric

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def normalize_answer(text: str) -> str:
    """DROP's normalisation: per space/hyphen token lower, de-punctuate, number-normalise, drop articles."""
    parts = [_normalize_token(token) for token in re.split(" |-", text)]
    return " ".join(p for p in parts if p.strip()).strip()


def _bags(answer: str | Sequence[str]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [normalize_answer(s) for s in spans]
    return normalized, [set(n.split()) for n in normalized]


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(gold & predicted)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], predicted: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def drop_metrics(predicted: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
    """``(exact match, F1)`` of one prediction against one gold answer (each a span or list of spans)."""
    pred_spans, pred_bags = _bags(predicted)
    gold_spans, gold_bags = _bags(gold)
    exact = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    scores = np.zeros((len(gold_bags), len(pred_bags)))  # (G, P)
    for g, gold_bag in enumerate(gold_bags):
        for p, pred_bag in enumerate(pred_bags):
            if _numbers_agree(gold_bag, pred_bag):
                scores[g, p] = _bag_f1(pred_bag, gold_bag)
    rows, cols = linear_sum_assignment(-scores)
    best = np.zeros(max(len(gold_bags), len(pred_bags)))
    for r, c in zip(rows, cols):
        best[r] = max(best[r], scores[r, c])
    return exact, round(float(np.mean(best)), 2)


def best_metrics(predicted: str, golds: Sequence[str]) -> tuple[float, float]:
    """Max EM and max F1 over the gold answers, as the official evaluation takes them."""
    results = [drop_metrics(predicted, g) for g in golds]
    return max(r[0] for r in results), max(r[1] for r in results)


# ---------------------------------------------------------------- prompting and evaluation


def format_question(q: Question, include_answer: bool) -> str:
    text = f"{q.passage.strip()} {q.question.strip()}\nAnswer:"
    return text + f" {q.answer}\n\n" if include_answer else text


def build_prompt(shots: Sequence[Question], question: Question) -> str:
    return "".join(format_question(s, True) for s in shots) + format_question(question, False)


def evaluate(model: torch.nn.Module, tokenizer, split: Split, args: EvalArgs) -> TaskResult:
    """Generate an answer per question; EM / F1 (DROP metric) and InstructEval's prefix accuracy.

    Reads ``args.batch_size`` and ``args.max_new_tokens`` (default ``MAX_NEW_TOKENS``).
    """
    if not split.questions:
        raise ValueError("No DROP questions were evaluated; check --limit and the data.")
    max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS
    budget = model_max_length(model) - max_new_tokens
    prompts = [
        fit_shots(lambda k, q=q: build_prompt(split.shots[:k], q), len(split.shots), tokenizer, budget)[0]
        for q in split.questions
    ]
    logger.info("DROP: generating for %d questions", len(prompts))
    groups = ["shots"] * len(prompts)  # every question follows the same 3 shots (KV cache)
    completions = greedy_generate(
        model, tokenizer, prompts, max_new_tokens, STOP, args.batch_size, groups=groups
    )
    em, f1, prefix, predictions = [], [], [], []
    for q, completion in zip(split.questions, completions):
        exact, f1_score = best_metrics(completion.strip(), [q.answer])
        em.append(exact)
        f1.append(f1_score)
        prefix.append(completion.strip().startswith(q.answer))
        predictions.append(
            {"question": q.question, "answer": q.answer, "completion": completion, "f1": f1_score}
        )
    n = len(predictions)
    summary = {"em": sum(em) / n, "f1": sum(f1) / n, "instructeval_acc": sum(prefix) / n}
    return TaskResult(summary, {"shots": [s.question for s in split.shots]}, predictions)
