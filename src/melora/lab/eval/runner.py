"""``melora eval``: InstructEval-style MMLU / BBH / HumanEval / DROP for a base model or an adapter.

Its options are :class:`~melora.lab.eval.args.EvalArgs`: the flags and the ``--config`` preset keys are
generated from its fields. Python API: :func:`run_eval`. It loads every task's data first (so a
missing file fails before the slow model load), loads the model (hub name, folder, ``.gguf`` or
alias) and optionally a MELoRA / LoRA adapter (merged on request), runs the tasks, and writes
``results.json`` (kind "eval", the EvalArgs as its ``config``), ``results.md`` and
``predictions/<task>.jsonl``.

    melora eval --model smollm2 --adapter runs/alpaca-melora --tasks mmlu,bbh --output-dir runs/ev
    melora eval --config runs/ev/eval.yaml          # a preset written by EvalArgs.to_preset
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from melora.atomic import atomic_write_text
from melora.lab.eval import bbh, drop, humaneval, mmlu
from melora.lab.eval.args import EvalArgs, parse_limit, parse_tasks, task_limits
from melora.lab.eval.scoring import TaskResult
from melora.lab.provenance import provenance
from melora.lab.records import RunRecord

__all__ = ["TASKS", "EvalArgs", "parse_limit", "parse_tasks", "run_eval", "task_limits"]

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What every task module provides: its data loader and its evaluator (one signature for all)."""

    def load(self, data_dir: Path | None, limit: int | None = None) -> Any:
        """The task's data from ``data_dir/<task>/`` (the hub when None), its first ``limit`` questions."""

    def evaluate(self, model: torch.nn.Module, tokenizer, data: Any, args: EvalArgs) -> TaskResult:
        """Score ``model`` on ``data`` (what ``load`` returned) with the options ``args``."""


# name -> task module; the names are melora.lab.eval.args.TASK_NAMES (what EvalArgs accepts), in this order
TASKS: dict[str, Task] = {"mmlu": mmlu, "bbh": bbh, "humaneval": humaneval, "drop": drop}


def task_data_dir(data_dir: str | Path | None, folder: str) -> Path | None:
    """Local folder of one task, or None (read the hub) when ``data_dir`` is None or lacks it.

    ``data_dir`` may be the eval folder itself (holding ``mmlu/``, ``bbh/`` ...) or its parent.
    """
    if data_dir is None:
        return None
    root = Path(data_dir)
    for candidate in (root / folder, root / "eval" / folder):
        if candidate.is_dir():
            return candidate
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} does not exist.")
    logger.info("No %s/ under %s; reading %s from the HuggingFace hub", folder, root, folder)
    return None


def _adapter_stats(model: torch.nn.Module) -> dict[str, Any]:
    """Method name, adapter parameter count and equivalent rank (max n*r) of a loaded PeftModel."""
    from melora import adapter_summary

    name = model.active_adapter
    config = model.peft_config[name]
    params = sum(p.numel() for n, p in model.named_parameters() if name in n.split("."))
    method = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    return {
        "method": method,
        "trainable_params": params,
        "equivalent_rank": adapter_summary(model)["equivalent_rank"],
    }


def load_model(model: str, adapter: str | None = None, merge: bool = False):
    """Return ``(model, tokenizer, stats)``; ``stats`` holds method, trainable_params, equivalent_rank."""
    from melora.lab.models import load_causal_lm

    if merge and adapter is None:
        raise ValueError("--merge needs --adapter: there is nothing to merge into the base model.")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"--adapter {adapter}: no adapter_config.json there (a PEFT adapter folder?)."
        )
    base, tokenizer = load_causal_lm(model)
    stats: dict[str, Any] = {"method": "base", "trainable_params": 0, "equivalent_rank": None}
    if adapter is not None:
        from peft import PeftModel

        import melora.tuner  # noqa: F401  (registers the MELORA PEFT method)

        base = PeftModel.from_pretrained(base, adapter)
        stats = _adapter_stats(base)
        if merge:
            base = base.merge_and_unload()
    return base.eval(), tokenizer, stats


def resolve_adapter(path: str | None) -> tuple[str | None, Any]:
    """``(adapter folder, RunRecord or None)`` for an adapter folder or a run folder holding ``adapter/``.

    A run folder's results.json (written by ``melora glue`` / ``melora instruct``) names the run's
    method, r, n and seed, which label the evaluation; a bare adapter folder is labelled from its
    adapter_config.json.
    """
    from melora.adapter_folder import find_adapter_folder
    from melora.lab.records import RESULTS_FILE, RunRecord

    if path is None:
        return None, None
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--adapter {folder} does not exist.")
    candidate = find_adapter_folder(folder)
    if candidate is not None:
        run_dir = candidate.parent if candidate.name == "adapter" else candidate
        record = RunRecord.read(run_dir) if (run_dir / RESULTS_FILE).is_file() else None
        if record is not None and record.kind == "eval":
            record = None
        return str(candidate), record
    raise FileNotFoundError(
        f"--adapter {folder}: no adapter_config.json there or in {folder / 'adapter'} "
        "(pass a PEFT adapter folder or a melora run folder)."
    )


def base_model_of(adapter: str | None, record: Any) -> str:
    """The model an adapter was trained on: its run's ``model`` option (an alias such as smollm2 loads
    offline), else the ``base_model_name_or_path`` its adapter_config.json names."""
    from melora.adapter_folder import read_adapter_config
    from melora.lab.args import UserError

    if record is not None and record.config.get("model"):
        return str(record.config["model"])
    base = read_adapter_config(adapter).get("base_model_name_or_path") if adapter else None
    if not base:
        raise UserError(
            f"--adapter {adapter} names no base model (no run results.json with a model, and no "
            "base_model_name_or_path in its adapter_config.json): pass --model."
        )
    return str(base)


def base_label(model: str) -> str:
    """A local model folder's name, else "base"."""
    return Path(model).name if Path(model).is_dir() else "base"


def describe(model: str, adapter: str | None, record: Any):
    """The AdapterArgs of what is evaluated: from the run's record, the adapter's config, or the base."""
    from melora.adapter_folder import read_adapter_config
    from melora.lab.args import AdapterArgs

    if record is not None and record.adapter:
        return AdapterArgs(**record.adapter)
    if adapter is not None:
        return AdapterArgs.from_adapter_config(read_adapter_config(adapter))
    return None


def evaluate_tasks(
    model: torch.nn.Module, tokenizer, data: dict[str, Any], args: EvalArgs
) -> dict[str, TaskResult]:
    """Run each task on already-loaded data; returns results by task name."""
    results = {}
    for name, task_data in data.items():
        start = time.perf_counter()
        results[name] = TASKS[name].evaluate(model, tokenizer, task_data, args)
        results[name].details["n"] = len(results[name].predictions)  # one prediction per question
        results[name].details["wall_time_s"] = round(time.perf_counter() - start, 2)
        logger.info("%s: %s (%.1f s)", name, results[name].summary, results[name].details["wall_time_s"])
    return results


def render_markdown(results: dict[str, Any]) -> str:
    """A headline table plus one per-subject / per-task table for each task that has them."""
    config = results["config"]
    counts = ", ".join(f"{task} {detail['n']}" for task, detail in results["tasks"].items())
    lines = [f"# Evaluation: {results['label']}", "",
             f"model `{config['model']}`, adapter `{config['adapter']}`, limit {config['limit']}; questions: {counts}",
             "", "| metric | value |", "|---|---:|"]  # fmt: skip
    lines += [f"| {k} | {v:.4f} |" for k, v in results["summary"].items()]
    for task, detail in results["tasks"].items():
        for key, table in detail.items():
            if isinstance(table, dict) and table and key.startswith("per_"):
                lines += ["", f"## {task}: {key.replace('_', ' ')}", "", "| name | score |", "|---|---:|"]
                lines += [f"| {k} | {v:.4f} |" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _write_predictions(folder: Path, name: str, predictions: list[dict[str, Any]]) -> None:
    lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in predictions)
    atomic_write_text(folder / f"{name}.jsonl", "".join(lines))


def run_eval(args: EvalArgs) -> dict:
    """Evaluate ``args.model`` (+ ``args.adapter``) on ``args.tasks``; write and return the results.json dict.

    ``args.limit`` keeps the first N questions per MMLU subject, per BBH task, and of HumanEval /
    DROP; a dict such as ``{"mmlu": 2, "bbh": 3, "humaneval": 20}`` sets it per task (a missing task:
    all). ``args.max_new_tokens`` overrides every generation task's default (BBH 32, HumanEval 256,
    DROP 16). HumanEval runs only with ``args.allow_code_execution``, and refuses a sandbox that
    lacks a required containment unless ``args.accept_weak_sandbox``. The record's ``config`` is
    the training run's (for a run folder) updated with ``args``, its adapter the folder found.
    """
    start = time.perf_counter()
    sandbox = None
    if "humaneval" in args.tasks:  # both refusals come before any data or model is loaded
        humaneval.require_permission(args.allow_code_execution)
        sandbox = humaneval.require_sandbox(args.accept_weak_sandbox).as_dict()
    adapter, record = resolve_adapter(args.adapter)
    if not args.model:
        args.model = base_model_of(adapter, record)
    described = describe(args.model, adapter, record)
    limits = args.task_limits()
    data = {name: TASKS[name].load(task_data_dir(args.data_dir, name), limits[name]) for name in args.tasks}
    lm, tokenizer, stats = load_model(args.model, adapter, args.merge)
    out = Path(args.output_dir)
    config = {**(record.config if record is not None else {}), **args.to_dict(), "adapter": adapter}
    task_results: dict[str, TaskResult] = {}

    def write(complete: bool) -> dict[str, Any]:
        record_out = RunRecord(
            kind="eval",
            label=args.label or (described.label if described else base_label(args.model)),
            slug=described.slug if described else "base",
            method=described.method if described else "base",
            summary={f"{t}/{k}": float(v) for t, r in task_results.items() for k, v in r.summary.items()},
            seed=record.seed if record is not None else None,
            task="eval",
            adapter=asdict(described) if described else {},
            config=config,
            trainable_params=record.trainable_params if record is not None else stats["trainable_params"],
            adapter_params=stats["trainable_params"],
            equivalent_rank=stats["equivalent_rank"],
            wall_time_s=round(time.perf_counter() - start, 2),
            versions=provenance(),
            details={
                "tasks": {t: r.details for t, r in task_results.items()},
                "complete": complete,
                "run": str(Path(adapter).parent) if record is not None else None,
                **({"sandbox": sandbox} if sandbox is not None else {}),
            },
        )
        results = record_out.to_dict()
        record_out.write(out)
        atomic_write_text(out / "results.md", render_markdown(results))
        return results

    for name, task_data in data.items():  # each task's results are on disk as soon as it finishes
        task_results.update(evaluate_tasks(lm, tokenizer, {name: task_data}, args))
        _write_predictions(out / "predictions", name, task_results[name].predictions)
        results = write(complete=len(task_results) == len(data))
    return results


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``melora eval`` (``--config`` and one flag per EvalArgs field)."""
    parser = subparsers.add_parser(
        "eval",
        help="InstructEval-style MMLU / BBH / HumanEval / DROP evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    EvalArgs.add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """CLI entry: merge the YAML preset and the flags into EvalArgs, run, print the headline table."""
    from melora.lab.args import load_preset

    options = EvalArgs.from_options(vars(args), load_preset(args.config), args.config)
    results = run_eval(options)
    print(render_markdown(results).split("\n## ")[0])
    print(f"wrote {Path(options.output_dir) / 'results.json'}")
    return 0
