"""Instruction-tuning data: load Alpaca / Dolly records, build prompts, tokenise, pad.

Formats accepted (one JSON array per ``.json`` file or one object per line of a ``.jsonl`` file):

* Alpaca: ``{"instruction", "input", "output"}`` (``input`` optional)
* Dolly:  ``{"instruction", "context", "response", "category"}`` (``context``/``category`` optional)

A source is a file, a folder of such files (read in file-name order) or a hub dataset name.
Prompts use the Stanford Alpaca template (with / without input) or the tokenizer's chat template.
Labels cover the response (plus the appended EOS) only, unless ``train_on_inputs`` is set.
Padding is masked by position (attention mask and ``-100`` labels), never by token id, because
some tokenizers (SmolLM2) use their EOS token as pad token.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from melora.lab.args import UserError
from melora.lab.data.text import read_utf8

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "chat")

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# format name -> (required fields, optional fields, field holding the input, field holding the output)
_FORMATS: dict[str, tuple[frozenset[str], frozenset[str], str, str]] = {
    "alpaca": (frozenset({"instruction", "output"}), frozenset({"input"}), "input", "output"),
    "dolly": (
        frozenset({"instruction", "response"}),
        frozenset({"context", "category"}),
        "context",
        "response",
    ),
}
_DATA_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class InstructExample:
    """One instruction-following example; ``input`` is empty when the task has no context."""

    instruction: str
    input: str
    output: str


def _expected_formats() -> str:
    return "; ".join(
        f"{name} {{{', '.join(sorted(req | opt))}}}" for name, (req, opt, _, _) in _FORMATS.items()
    )


_FIELD_ROLES = {
    "instruction": "the instruction text",
    "input": "the input text, or leave it out",
    "context": "the context text, or leave it out",
    "output": "the response text",
    "response": "the response text",
    "category": "the category name, or leave it out",
}


def _type_problem(key: str, value: Any, optional: bool) -> str | None:
    """Why ``value`` cannot be field ``key`` (None when it is a string, or null for an optional field)."""
    if isinstance(value, str) or (value is None and optional):
        return None
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # a hub row may hold values JSON cannot show
        text = repr(value)
    shown = "null" if value is None else f"{type(value).__name__} ({text[:40]})"
    return f"field {key!r} is {shown}; expected a string ({_FIELD_ROLES.get(key, 'text')})"


def parse_record(record: Any, where: str) -> InstructExample:
    """Turn one JSON object into an :class:`InstructExample`; ``where`` names it in errors.

    Every field must be a string; an optional field (Alpaca ``input``, Dolly ``context`` / ``category``)
    may also be absent or null. ``0``, ``false`` or ``[]`` is an error, never an empty text.
    """
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    keys = set(record)
    for required, optional, input_key, output_key in _FORMATS.values():
        if required <= keys and keys <= required | optional:
            bad = [
                problem
                for key in sorted(keys)
                if (problem := _type_problem(key, record[key], key in optional)) is not None
            ]
            if bad:
                raise UserError(f"{where}: " + "; ".join(bad) + ".")
            values = {key: record.get(key) or "" for key in required | optional}
            if not values["instruction"].strip():
                raise UserError(f"{where}: empty 'instruction'; every record needs an instruction text.")
            return InstructExample(values["instruction"], values[input_key], values[output_key])
    known = frozenset().union(*(req | opt for req, opt, _, _ in _FORMATS.values()))
    unknown = sorted(str(key) for key in keys - known)
    problem = (
        f"unknown field(s) {', '.join(unknown)}" if unknown else f"fields {sorted(keys)} match no format"
    )
    raise UserError(f"{where}: {problem}; expected {_expected_formats()}.")


def _array_record_lines(text: str) -> list[int]:
    """The line on which each record of a JSON array starts (the array already parsed without error)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    index = ws.match(text, 0).end() + 1  # past "["
    lines = []
    while True:
        index = ws.match(text, index).end()
        if text[index] == "]":
            return lines
        lines.append(text.count("\n", 0, index) + 1)
        _, index = decoder.raw_decode(text, index)
        index = ws.match(text, index).end()
        if text[index] == ",":
            index += 1


def _read_records(path: Path) -> list[tuple[Any, str]]:
    """The records of one file, each with the words that name it in errors (file and line)."""
    text = read_utf8(path, "JSON data must be UTF-8")
    if not text.strip():
        raise UserError(f"{path}: file is empty; expected a JSON array or JSON lines of records.")
    if path.suffix == ".jsonl":
        records = []
        # split on newlines only, not splitlines(): a JSON string may hold U+2028 or a form feed raw
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path}, line {line_no}"))
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}: line {line_no} is not valid JSON ({err.msg} at column {err.colno}); "
                    "a .jsonl file holds one JSON object per line."
                ) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, got {type(data).__name__}.")
    return [(record, f"{path} record {index}") for index, record in enumerate(data)]


def load_file(path: str | Path) -> list[InstructExample]:
    """Read one ``.json`` (array) or ``.jsonl`` file of Alpaca / Dolly records."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise UserError(f"{path}: no records found.")
    examples = []
    for index, (record, where) in enumerate(records):
        try:
            examples.append(parse_record(record, where))
        except UserError as err:
            if path.suffix == ".jsonl":
                raise
            # a JSON array: find the record's line only now (a second parse of the file)
            line = _array_record_lines(read_utf8(path, "JSON data must be UTF-8"))[index]
            raise UserError(str(err).replace(where, f"{where} (line {line})", 1)) from None
    return examples


def _load_hub(name: str) -> list[InstructExample]:
    from datasets import load_dataset

    dataset = load_dataset(name, split="train")
    return [parse_record(dict(row), f"{name} record {index}") for index, row in enumerate(dataset)]


def load_examples(sources: Sequence[str | Path]) -> list[InstructExample]:
    """Load every source in order: files, folders (their data files in name order) or hub names."""
    examples: list[InstructExample] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in _DATA_SUFFIXES)
            if not files:
                raise UserError(
                    f"{path}: folder holds no .json / .jsonl files; put the data files in it or pass a file."
                )
            for file in files:
                examples.extend(load_file(file))
        elif path.is_file():
            examples.extend(load_file(path))
        elif path.suffix in _DATA_SUFFIXES or path.is_absolute() or str(source).startswith("."):
            raise FileNotFoundError(f"{source}: no such file or folder.")
        else:
            logger.info("%s is not a local path; loading it as a hub dataset", source)
            examples.extend(_load_hub(str(source)))
    logger.info("Loaded %d examples from %d source(s)", len(examples), len(sources))
    return examples


def split_examples(
    examples: Sequence[InstructExample], val_size: int, max_samples: int | None, seed: int = 0
) -> tuple[list[InstructExample], list[InstructExample]]:
    """Shuffle with ``seed``, hold out ``val_size`` examples, keep up to ``max_samples`` for training.

    The split depends only on ``seed`` (the data seed), not on the training seed, so every run of a
    study sees the same training and held-out examples.
    """
    if val_size < 0 or val_size >= len(examples):
        raise ValueError(f"val_size={val_size} must be in [0, {len(examples)}) for {len(examples)} examples.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:val_size]]
    train = [examples[i] for i in order[val_size:]]
    if max_samples is not None:
        train = train[:max_samples]
    return train, val


def build_prompt(example: InstructExample, template: str = "alpaca", tokenizer=None) -> str:
    """Return the prompt text that precedes the response."""
    if template == "alpaca":
        if example.input.strip():
            return ALPACA_PROMPT_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=example.instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat template; use template='alpaca'.")
        content = example.instruction
        if example.input.strip():
            content = f"{content}\n\n{example.input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"Unknown template {template!r}; choose one of {', '.join(TEMPLATES)}.")


def tokenize_example(
    example: InstructExample,
    tokenizer,
    cutoff_len: int = 256,
    template: str = "alpaca",
    train_on_inputs: bool = False,
) -> dict[str, list[int]]:
    """Tokenise prompt and response separately, append EOS, truncate to ``cutoff_len``.

    Returns ``input_ids`` and ``labels`` (same length L <= cutoff_len); prompt positions are
    ``-100`` in ``labels`` unless ``train_on_inputs``. The EOS is lost only if truncation cuts it.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; set tokenizer.eos_token before tokenising.")
    prompt = build_prompt(example, template, tokenizer)
    # chat templates already contain the BOS / special tokens they need
    add_special = template == "alpaca"
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids + [tokenizer.eos_token_id])[:cutoff_len]
    labels = list(input_ids)
    if not train_on_inputs:
        masked = min(len(prompt_ids), len(labels))
        labels[:masked] = [IGNORE_INDEX] * masked
    return {"input_ids": input_ids, "labels": labels}


def pack_features(features: Sequence[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate whole examples (in order) into sequences of at most ``block_size`` tokens."""
    packed: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": []}
    for feature in features:
        if current["input_ids"] and len(current["input_ids"]) + len(feature["input_ids"]) > block_size:
            packed.append(current)
            current = {"input_ids": [], "labels": []}
        current["input_ids"] = current["input_ids"] + feature["input_ids"]
        current["labels"] = current["labels"] + feature["labels"]
    if current["input_ids"]:
        packed.append(current)
    return packed


@dataclass
class InstructCollator:
    """Right-pad ``input_ids`` / ``labels`` to the longest sequence of the batch.

    Padding is identified by position, not by id: ``attention_mask`` is 0 and ``labels`` is -100
    exactly on the padded positions, so a real EOS equal to the pad id keeps its label.
    Output tensors have shape (B, T), T = longest length (rounded up to ``pad_to_multiple_of``).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
