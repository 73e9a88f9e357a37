"""Shared builders for the eval tests: a byte-level tokenizer and a tiny random Llama, both made in code.

No tests live here; the other ``test_eval_*`` modules import these helpers.
"""

from __future__ import annotations

import csv
import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from melora.lab.eval.args import EvalArgs
from tests.tiny_models import tiny_llama


def eval_args(**options) -> EvalArgs:
    """EvalArgs for calling a task's ``evaluate`` directly (it reads neither the model nor the output folder)."""
    return EvalArgs(**{"model": "tiny", "output_dir": "unused", **options})


SPECIALS = ["<pad>", "<eos>"]
MERGES = [("Ġ", "A"), ("Ġ", "B"), ("Ġ", "C"), ("Ġ", "D")]  # " A".." D" become single tokens


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is a token, plus the four answer letters with a leading space."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet) + [a + b for a, b in MERGES])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


@lru_cache(maxsize=1)
def tiny_lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer, hidden-64 Llama over the tiny tokenizer, seeded, in eval mode."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, max_position_embeddings=4096).eval()
    return model, tokenizer


def save_tiny_lm(path: Path) -> Path:
    """Write the tiny model and tokenizer as a loadable folder."""
    model, tokenizer = tiny_lm()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


MMLU_ROWS = {
    "astronomy": {
        "dev": [["What is the Sun?", "A star", "A planet", "A moon", "A comet", "A"]] * 5,
        "test": [
            ["Which planet is red?", "Venus", "Mars", "Earth", "Jupiter", "B"],
            ["How many moons has Mars?", "0", "1", "2", "3", "C"],
        ],
    },
    "virology": {
        "dev": [["A virus is?", "alive", "a cell", "a pathogen", "a plant", "C"]] * 5,
        "test": [
            ["Flu is caused by?", "bacteria", "fungi", "prions", "a virus", "D"],
            ["HIV attacks?", "T cells", "bones", "skin", "hair", "A"],
        ],
    },
}

BBH_TASKS = {
    "boolean_expressions": [
        {"input": "not True and True is", "target": "False"},
        {"input": "True or False is", "target": "True"},
        {"input": "not not True is", "target": "True"},
        {"input": "False and True is", "target": "False"},
    ],
    "date_understanding": [
        {"input": "Pick one.\nOptions:\n(A) x\n(B) y", "target": "(A)"},
        {"input": "Pick two.\nOptions:\n(A) x\n(B) y", "target": "(B)"},
        {"input": "Pick three.\nOptions:\n(A) x\n(B) y", "target": "(A)"},
        {"input": "Pick four.\nOptions:\n(A) x\n(B) y", "target": "(B)"},
    ],
}

HUMANEVAL_PROBLEMS = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "entry_point": "add",
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def neg(x):\n    """Return -x."""\n',
        "entry_point": "neg",
        "canonical_solution": "    return -x\n",
        "test": "def check(candidate):\n    assert candidate(4) == -4\n",
    },
]


def write_eval_data(root: Path) -> Path:
    """Hand-made mini copies of the eval data layouts under ``root`` (mmlu CSVs, bbh JSON, HumanEval)."""
    for subject, splits in MMLU_ROWS.items():
        for split, rows in splits.items():
            folder = root / "mmlu" / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(rows)
    (root / "bbh").mkdir(parents=True, exist_ok=True)
    for task, examples in BBH_TASKS.items():
        (root / "bbh" / f"{task}.json").write_text(json.dumps({"canary": "x", "examples": examples}))
    (root / "humaneval").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as handle:
        for problem in HUMANEVAL_PROBLEMS:
            handle.write(json.dumps(problem) + "\n")
    return root
