"""The options of ``melora eval``, declared once: :class:`EvalArgs`.

Its fields (with their ``help``) generate the command's flags and its ``--config`` preset keys the
way :mod:`melora.lab.args` does for the training runners: defaults < preset < flags. Every task module
(:mod:`~melora.lab.eval.mmlu`, :mod:`~melora.lab.eval.bbh`, :mod:`~melora.lab.eval.humaneval`,
:mod:`~melora.lab.eval.drop`) reads what it needs from the same instance, and ``results.json`` stores it
as its ``config``. A study writes one as a preset (:meth:`EvalArgs.to_preset`) and runs
``melora eval --config <preset>``.

This module imports neither torch nor the task modules, so writing or checking a preset is cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melora.lab.args import UserError, add_dataclass_args, flag_name, load_preset, opt, resolve

TASK_NAMES = ("mmlu", "bbh", "humaneval", "drop")  # the keys of melora.lab.eval.runner.TASKS, in order
DEFAULT_TASKS = ["mmlu", "bbh"]
LIMIT_HELP = "first N per MMLU subject / BBH task / other task, or per task: mmlu=2,bbh=3,humaneval=20"


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """``"mmlu,bbh"``, ``["mmlu", "bbh"]`` or ``["mmlu,bbh"]`` -> checked, de-duplicated list in order."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip().lower() for item in items for n in str(item).split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise ValueError(f"Unknown or empty --tasks {unknown or names}; choose from {', '.join(TASK_NAMES)}.")
    return names


def parse_limit(text: str) -> int | dict[str, int]:
    """The ``--limit`` value: ``"2"`` -> 2, ``"mmlu=2,bbh=3"`` -> ``{"mmlu": 2, "bbh": 3}``."""
    try:
        if "=" not in text:
            return int(text)
        return {
            k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())
        }
    except ValueError:
        raise ValueError(f"--limit {text!r}: give a number or task=N pairs such as mmlu=2,bbh=3.") from None


def task_limits(limit: int | dict[str, int] | None, names: list[str]) -> dict[str, int | None]:
    """Per-task question limits (None: all) from one number for every task or a ``{task: N}`` dict."""
    problems = _limit_problems(limit, names)
    if problems:
        raise ValueError(f"limit {limit!r}: " + "; ".join(problems) + ".")
    per_task = dict(limit) if isinstance(limit, dict) else dict.fromkeys(names, limit)
    return {name: per_task.get(name) for name in names}


def _limit_problems(limit: Any, names: list[str] | None) -> list[str]:
    """What is wrong with ``limit`` for the tasks ``names`` (None: unknown, so task names go unchecked)."""
    if limit is None:
        return []
    if not isinstance(limit, (int, dict)) or isinstance(limit, bool):
        return ["expected a number of questions or task=N pairs such as mmlu=2,bbh=3"]
    if isinstance(limit, dict):
        per_task = dict(limit)
        unknown = sorted(map(str, set(limit) - set(names))) if names is not None else []
    else:
        per_task, unknown = dict.fromkeys(names or ["every task"], limit), []
    problems = []
    if unknown:
        problems.append(
            f"{unknown} are not among the evaluated tasks {names}; add them to --tasks or drop them from --limit"
        )
    bad = {k: v for k, v in per_task.items() if v is not None and not _positive_int(v)}
    if bad:
        problems.append(f"limits must be positive numbers of questions, got {bad}")
    return problems


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class EvalArgs:
    """What ``melora eval`` evaluates (a model, optionally with an adapter), on which tasks, and how."""

    model: str | None = opt(
        None,
        "hub name, folder, .gguf file or alias such as smollm2 (default with --adapter: the run's model, "
        "else the base the adapter names)",
    )
    adapter: str | None = opt(
        None, "PEFT adapter folder (MELoRA or LoRA, e.g. exported) or a melora run folder holding adapter/"
    )
    merge: bool = opt(False, "merge the adapter into the weights first")
    tasks: list[str] = opt(
        list(DEFAULT_TASKS), f"tasks, comma- or space-separated, from {','.join(TASK_NAMES)}"
    )
    data_dir: str | None = opt(
        None, "folder with mmlu/ bbh/ humaneval/ drop/ (or its parent); default: the HuggingFace hub"
    )
    # from a flag or a preset it may also be text ("2", "mmlu=2,bbh=3"): __post_init__ parses it
    limit: int | dict[str, int] | None = opt(None, LIMIT_HELP + " (default: all)")
    batch_size: int = opt(4, "prompts per batch (scoring and generation)")
    max_new_tokens: int | None = opt(
        None, "override every generation task's length (default: BBH 32, HumanEval 256, DROP 16)"
    )
    allow_code_execution: bool = opt(False, "needed for humaneval: runs model-written code in the sandbox")
    accept_weak_sandbox: bool = opt(
        False, "run humaneval even where the sandbox lacks a required containment"
    )
    output_dir: str | None = opt(None, "where results.json, results.md and predictions/ go (required)")
    label: str | None = opt(
        None, "run label (default: the run's, e.g. 'melora r=1 n=8', else the model folder's name or 'base')"
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("model", "output_dir"):
            if not getattr(self, name) and not (name == "model" and self.adapter):
                problems.append(f"{name} is required: pass {flag_name(name)} (or set {name} in the preset)")
        names: list[str] | None = None
        try:
            self.tasks = names = parse_tasks(self.tasks)
        except ValueError as err:
            problems.append(f"tasks={self.tasks!r}: {str(err).rstrip('.')}")
        if isinstance(self.limit, str):
            try:
                self.limit = parse_limit(self.limit)
            except ValueError:
                problems.append(f"limit={self.limit!r}: give a number or task=N pairs such as mmlu=2,bbh=3")
        elif isinstance(self.limit, dict):
            self.limit = {str(k).strip().lower(): v for k, v in self.limit.items()}
        if not isinstance(self.limit, str):
            problems += [f"limit={self.limit!r}: {problem}" for problem in _limit_problems(self.limit, names)]
        if not _positive_int(self.batch_size):
            problems.append(f"batch_size={self.batch_size!r}: expected a positive integer")
        if self.max_new_tokens is not None and not _positive_int(self.max_new_tokens):
            problems.append(
                f"max_new_tokens={self.max_new_tokens!r}: expected a positive integer (or leave it unset)"
            )
        if self.merge and not self.adapter:
            problems.append(
                "merge=True: --merge needs --adapter: there is nothing to merge into the base model"
            )
        if problems:
            raise UserError("Invalid eval options: " + "; ".join(problems) + ".")

    def task_limits(self) -> dict[str, int | None]:
        """The question limit of each task (None: all of them)."""
        return task_limits(self.limit, self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """Every option as one flat mapping (a preset; results.json's ``config``)."""
        return dataclasses.asdict(self)

    def to_preset(self, path: str | os.PathLike) -> Path:
        """Write these options as a YAML preset for ``melora eval --config PATH`` (atomically)."""
        from melora.lab.yaml_files import write_yaml_atomic

        return write_yaml_atomic(path, self.to_dict())

    @classmethod
    def from_options(
        cls,
        flags: dict[str, Any] | None = None,
        preset: dict[str, Any] | None = None,
        preset_path: str | os.PathLike | None = None,
    ) -> EvalArgs:
        """Defaults < preset < flags; an unknown key is a UserError naming it (and the file)."""
        return resolve({"eval": cls}, preset=preset, preset_path=preset_path, flags=flags)["eval"]

    @classmethod
    def from_preset(cls, path: str | os.PathLike) -> EvalArgs:
        """The options a preset written by :meth:`to_preset` (or by hand) holds."""
        return cls.from_options(preset=load_preset(path), preset_path=path)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--config`` plus one flag per field (``--limit`` takes ``N`` or ``task=N,...`` text)."""
        parser.add_argument("--config", default=None, help="YAML preset of these options; flags override it")
        names = [f.name for f in dataclasses.fields(cls)]
        at = names.index("limit")  # the one field with a union type: its flag is text, parsed by the class
        add_dataclass_args(parser, cls, skip=tuple(names[at:]))
        help_text = dataclasses.fields(cls)[at].metadata["help"]
        parser.add_argument(flag_name("limit"), default=None, dest="limit", help=help_text)
        add_dataclass_args(parser, cls, skip=tuple(names[: at + 1]))
