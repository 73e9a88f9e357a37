"""GLUE tasks as ``datasets.DatasetDict``: from the original GLUE TSV files or from the HF hub.

Both sources give the same columns: ``sentence1`` (and ``sentence2`` for pair tasks) and
``label`` (int class id, or float score for STS-B). Splits are ``train`` plus the task's dev
splits: ``validation``, or ``validation_matched`` / ``validation_mismatched`` for MNLI.
String labels map to ids in the hub's order (e.g. RTE ``entailment`` -> 0).

The TSVs are read with ``csv.QUOTE_NONE``: GLUE files hold unbalanced ``"`` characters that
default quoting would use to merge rows silently.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """Where one GLUE task's text and labels are, in the TSV layout and on the hub.

    ``text_columns`` / ``label_column`` are header names, or column indices for a headerless
    file; ``hub_columns`` are the hub's names for (sentence1[, sentence2]); ``label_names``
    is None for numeric labels.
    """

    name: str
    folder: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    hub_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None = None
    eval_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    has_header: bool = True
    is_regression: bool = False

    @property
    def num_labels(self) -> int:
        """1 for regression, else the number of classes."""
        if self.is_regression:
            return 1
        return len(self.label_names) if self.label_names else 2

    @property
    def splits(self) -> tuple[str, ...]:
        """``train`` followed by the dev split names."""
        return ("train", *self.eval_files)


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", (3,), 1, ("sentence",), has_header=False),
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("sentence",)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2")),
        GlueTask(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            ("sentence1", "sentence2"),
            is_regression=True,
        ),
        GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2")),
        GlueTask(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("premise", "hypothesis"),
            label_names=_NLI3,
            eval_files={
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
            },
        ),
        GlueTask(
            "qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"), label_names=_NLI2
        ),
        GlueTask(
            "rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), label_names=_NLI2
        ),
        GlueTask(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
        ),
    )
}


def get_task(name: str) -> GlueTask:
    """Look up a task by its lower-case GLUE name (``sst-2`` and ``sts-b`` are accepted too)."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[key]


def _column_index(header: list[str] | None, column: str | int, path: Path) -> int:
    if isinstance(column, int):
        return column
    assert header is not None
    if column not in header:
        raise ValueError(f"{path}: expected a column {column!r} in the header, found {header}.")
    return header.index(column)


def _parse_label(task: GlueTask, raw: str, path: Path, line: int) -> int | float:
    try:
        if task.is_regression:
            return float(raw)
        if task.label_names is not None:
            return task.label_names.index(raw)
        return int(raw)
    except ValueError:
        expected = "a number" if task.label_names is None else f"one of {task.label_names}"
        raise ValueError(f"{path}, line {line}: label {raw!r} is not {expected}.") from None


def read_tsv(task: GlueTask, path: str | os.PathLike) -> dict[str, list]:
    """Read one labelled GLUE TSV into columns ``sentence1`` [``sentence2``] ``label``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE {task.name}: missing file {path}; expected the original GLUE TSV layout "
            f"(<data-dir>/{task.folder}/train.tsv and {', '.join(task.eval_files.values())})."
        )
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [name.strip() for name in rows.pop(0)] if task.has_header and rows else None
    text_idx = [_column_index(header, col, path) for col in task.text_columns]
    label_idx = _column_index(header, task.label_column, path)
    needed = max(*text_idx, label_idx) + 1
    columns: dict[str, list] = {f"sentence{i + 1}": [] for i in range(len(text_idx))}
    columns["label"] = []
    first_line = 2 if header is not None else 1
    for line, row in enumerate(rows, start=first_line):
        if not row:
            continue
        if len(row) < needed:
            raise ValueError(
                f"{path}, line {line}: expected at least {needed} tab-separated fields, got {len(row)}."
            )
        for i, idx in enumerate(text_idx):
            columns[f"sentence{i + 1}"].append(row[idx])
        columns["label"].append(_parse_label(task, row[label_idx], path, line))
    if not columns["label"]:
        raise ValueError(f"{path}: no data rows found.")
    return columns


def load_glue_local(task: GlueTask, data_dir: str | os.PathLike) -> DatasetDict:
    """Load ``train`` and the dev splits of ``task`` from ``data_dir/<Folder>/*.tsv``."""
    folder = Path(data_dir) / task.folder
    files = {"train": "train.tsv", **task.eval_files}
    return DatasetDict(
        {split: Dataset.from_dict(read_tsv(task, folder / name)) for split, name in files.items()}
    )


def load_glue_hub(task: GlueTask) -> DatasetDict:
    """Load ``task`` from the hub's ``nyu-mll/glue``, renamed to the local loader's columns."""
    from datasets import load_dataset

    raw = load_dataset(HUB_DATASET, task.name)
    renames = {hub: f"sentence{i + 1}" for i, hub in enumerate(task.hub_columns)}
    keep = [*renames, "label"]
    return DatasetDict(
        {
            split: raw[split].select_columns(keep).rename_columns(renames)
            for split in task.splits  # the hub's split names match ours
        }
    )


def load_glue(task_name: str, data_dir: str | os.PathLike | None = None) -> DatasetDict:
    """Load a GLUE task from TSVs under ``data_dir``, or from the hub when ``data_dir`` is None."""
    task = get_task(task_name)
    if data_dir is None:
        logger.info("Loading GLUE %s from the hub (%s)", task.name, HUB_DATASET)
        return load_glue_hub(task)
    logger.info("Loading GLUE %s from %s", task.name, data_dir)
    return load_glue_local(task, data_dir)


def subsample(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """Keep a seeded random subset of ``max_samples`` rows (all rows when None or larger)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    indices = sorted(random.Random(seed).sample(range(len(dataset)), max_samples))
    return dataset.select(indices)
