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
import io
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict

from melora.lab.args import UserError
from melora.lab.data.text import read_utf8

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
STSB_RANGE = (0.0, 5.0)  # STS-B similarity scores


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
        raise UserError(
            f"{path}: expected a column {column!r} in the header (line 1), found {header}; "
            "use the original GLUE TSV file (its header names the columns) for this task."
        )
    return header.index(column)


def _label_range(task: GlueTask) -> str:
    if task.is_regression:
        return f"a similarity score in [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]"
    if task.label_names is not None:
        return f"one of {', '.join(task.label_names)}"
    return "one of " + ", ".join(str(i) for i in range(task.num_labels))


def _parse_label(task: GlueTask, raw: str, path: Path, line: int) -> int | float:
    """The label of one row, checked against the task's range (a class id the model has, or 0..5)."""
    value: int | float | None = None
    text = raw.strip()
    if task.is_regression:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and not STSB_RANGE[0] <= value <= STSB_RANGE[1]:  # also NaN and inf
            value = None
    elif task.label_names is not None:
        value = task.label_names.index(text) if text in task.label_names else None
    elif re.fullmatch(r"[+-]?\d+", text) and 0 <= int(text) < task.num_labels:
        value = int(text)
    if value is None:
        raise UserError(
            f"{path}, line {line}: label {raw!r} is not {_label_range(task)} (GLUE {task.name}); "
            "fix or remove that row."
        )
    return value


def read_tsv(task: GlueTask, path: str | os.PathLike) -> dict[str, list]:
    """Read one labelled GLUE TSV into columns ``sentence1`` [``sentence2``] ``label``.

    Every problem of the file (not UTF-8, empty, a missing column, a short row, a label outside the task's
    range) is a :class:`UserError` naming the file and, where there is one, the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE {task.name}: missing file {path}; expected the original GLUE TSV layout "
            f"(<data-dir>/{task.folder}/train.tsv and {', '.join(task.eval_files.values())})."
        )
    text = read_utf8(path, "GLUE TSVs are UTF-8", encoding="utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    layout = "a header line and" if task.has_header else "no header,"
    if not any(rows):
        raise UserError(
            f"{path}: the file is empty; expected the GLUE {task.name} TSV ({layout} one example per line)."
        )
    header = [name.strip() for name in rows.pop(0)] if task.has_header else None
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
            raise UserError(
                f"{path}, line {line}: expected at least {needed} tab-separated fields, got {len(row)}; "
                "fix or remove that row."
            )
        for i, idx in enumerate(text_idx):
            columns[f"sentence{i + 1}"].append(row[idx])
        columns["label"].append(_parse_label(task, row[label_idx], path, line))
    if not columns["label"]:
        raise UserError(
            f"{path}: no data rows found (only a header); expected the GLUE {task.name} examples below it."
        )
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
