"""``melora eval``: InstructEval-style MMLU / BBH / HumanEval / DROP for a base model or an adapter.

Python API: :func:`run_eval` (also used by the instruction-tuning study). It loads every task's
data first (so a missing file fails before the slow model load), loads the model (hub name,
folder, ``.gguf`` or alias) and optionally a MELoRA / LoRA adapter (merged on request), runs
the tasks, and writes ``results.json`` (kind "eval"), ``results.md`` and ``predictions/<task>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from melora.eval import bbh, drop, humaneval, mmlu
from melora.eval.sandbox import ACCEPT_FLAG
from melora.eval.scoring import TaskResult
from melora.io import atomic_write_text
from melora.provenance import provenance
from melora.records import RunRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """How to load one task's data (from ``<data-dir>/<task>/``, or the hub when None) and evaluate it."""

    load: Callable[[Path | None, int | None], Any]
    evaluate: Callable[..., TaskResult]


TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec(mmlu.load, lambda m, t, d, o: mmlu.evaluate(m, t, d, o.batch_size)),
    "bbh": TaskSpec(bbh.load, lambda m, t, d, o: bbh.evaluate(m, t, d, o.batch_size, o.max_new_tokens)),
    "humaneval": TaskSpec(
        humaneval.load,
        lambda m, t, d, o: humaneval.evaluate(
            m,
            t,
            d,
            o.batch_size,
            o.max_new_tokens,
            o.allow_code_execution,
            accept_weak_sandbox=o.accept_weak_sandbox,
        ),
    ),
    "drop": TaskSpec(drop.load, lambda m, t, d, o: drop.evaluate(m, t, d, o.batch_size, o.max_new_tokens)),
}


@dataclass(frozen=True)
class EvalOptions:
    """Options every task evaluator may read."""

    batch_size: int
    max_new_tokens: int | None
    allow_code_execution: bool
    accept_weak_sandbox: bool = False


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """``"mmlu,bbh"`` or ``["mmlu", "bbh"]`` -> checked, de-duplicated list in the given order."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"Unknown or empty --tasks {unknown or names}; choose from {', '.join(TASKS)}.")
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
    per_task = dict(limit) if isinstance(limit, dict) else dict.fromkeys(names, limit)
    problems = []
    unknown = sorted(set(per_task) - set(names))
    if unknown:
        problems.append(f"{unknown} are not among the evaluated tasks {names}")
    bad = {k: v for k, v in per_task.items() if v is not None and v < 1}
    if bad:
        problems.append(f"limits must be positive numbers of questions, got {bad}")
    if problems:
        raise ValueError(f"limit {limit!r}: " + "; ".join(problems) + ".")
    return {name: per_task.get(name) for name in names}


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
    from melora.models import load_causal_lm

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
    from melora.records import RESULTS_FILE, RunRecord

    if path is None:
        return None, None
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--adapter {folder} does not exist.")
    for candidate in (folder, folder / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            run_dir = candidate.parent if candidate.name == "adapter" else candidate
            record = RunRecord.read(run_dir) if (run_dir / RESULTS_FILE).is_file() else None
            if record is not None and record.kind == "eval":
                record = None
            return str(candidate), record
    raise FileNotFoundError(
        f"--adapter {folder}: no adapter_config.json there or in {folder / 'adapter'} "
        "(pass a PEFT adapter folder or a melora run folder)."
    )


def base_label(model: str) -> str:
    """A local model folder's name, else "base"."""
    return Path(model).name if Path(model).is_dir() else "base"


def describe(model: str, adapter: str | None, record: Any):
    """The AdapterArgs of what is evaluated: from the run's record, the adapter's config, or the base."""
    from melora.args import AdapterArgs
    from melora.io import read_adapter_config

    if record is not None and record.adapter:
        return AdapterArgs(**record.adapter)
    if adapter is not None:
        return AdapterArgs.from_adapter_config(read_adapter_config(adapter))
    return None


def evaluate_tasks(
    model: torch.nn.Module, tokenizer, data: dict[str, Any], options: EvalOptions
) -> dict[str, TaskResult]:
    """Run each task on already-loaded data; returns results by task name."""
    results = {}
    for name, task_data in data.items():
        start = time.perf_counter()
        results[name] = TASKS[name].evaluate(model, tokenizer, task_data, options)
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


def run_eval(
    model: str,
    adapter: str | None,
    tasks: list[str],
    data_dir: str | None,
    limit: int | dict[str, int] | None,
    batch_size: int,
    output_dir: str,
    allow_code_execution: bool = False,
    max_new_tokens: int | None = None,
    *,
    merge: bool = False,
    label: str | None = None,
    accept_weak_sandbox: bool = False,
) -> dict:
    """Evaluate ``model`` (+ ``adapter``) on ``tasks``; write and return the results.json dict.

    ``limit`` keeps the first N questions per MMLU subject, per BBH task, and of HumanEval / DROP;
    a dict such as ``{"mmlu": 2, "bbh": 3, "humaneval": 20}`` sets it per task (a missing task: all).
    ``max_new_tokens`` overrides every generation task's default (BBH 32, HumanEval 256, DROP 16).
    HumanEval also refuses a sandbox that lacks a required containment unless ``accept_weak_sandbox``.
    """
    start = time.perf_counter()
    names = parse_tasks(tasks)
    limits = task_limits(limit, names)
    sandbox = None
    if "humaneval" in names:  # both refusals come before any data or model is loaded
        humaneval.require_permission(allow_code_execution)
        sandbox = humaneval.require_sandbox(accept_weak_sandbox).as_dict()
    adapter, record = resolve_adapter(adapter)
    described = describe(model, adapter, record)
    data = {name: TASKS[name].load(task_data_dir(data_dir, name), limits[name]) for name in names}
    lm, tokenizer, stats = load_model(model, adapter, merge)
    options = EvalOptions(batch_size, max_new_tokens, allow_code_execution, accept_weak_sandbox)
    out = Path(output_dir)
    config = {
            "model": model,
            "adapter": adapter,
            "merge": merge,
            "tasks": names,
            "data_dir": data_dir,
            "limit": limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "allow_code_execution": allow_code_execution,
            "accept_weak_sandbox": accept_weak_sandbox,
            "output_dir": output_dir,
    }  # fmt: skip
    task_results: dict[str, TaskResult] = {}

    def write(complete: bool) -> dict[str, Any]:
        record_out = RunRecord(
            kind="eval",
            label=label or (described.label if described else base_label(model)),
            slug=described.slug if described else "base",
            method=described.method if described else "base",
            summary={f"{t}/{k}": float(v) for t, r in task_results.items() for k, v in r.summary.items()},
            seed=record.seed if record is not None else None,
            task="eval",
            adapter=asdict(described) if described else {},
            config={**(record.config if record is not None else {}), **config},
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
        task_results.update(evaluate_tasks(lm, tokenizer, {name: task_data}, options))
        _write_predictions(out / "predictions", name, task_results[name].predictions)
        results = write(complete=len(task_results) == len(data))
    return results


def add_parser(subparsers) -> None:
    """Register ``melora eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="InstructEval-style MMLU / BBH / HumanEval / DROP evaluation",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--model", required=True, help="hub name, folder, .gguf file or alias (smollm2)")
    parser.add_argument(
        "--adapter",
        default=None,
        help="PEFT adapter folder (MELoRA or LoRA, e.g. exported) or a melora run folder",
    )
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the weights first")
    parser.add_argument("--tasks", default="mmlu,bbh", help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--data-dir", default=None, help="folder with mmlu/ bbh/ humaneval/ (default: hub)")
    parser.add_argument(
        "--limit",
        type=parse_limit,
        default=None,
        help="first N per MMLU subject / BBH task / other task, or per task: mmlu=2,bbh=3,humaneval=20",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override generation lengths")
    parser.add_argument(
        "--allow-code-execution", action="store_true", help="needed for humaneval: runs generated code"
    )
    parser.add_argument(
        ACCEPT_FLAG, action="store_true", help="run humaneval even where the sandbox lacks a containment"
    )
    parser.add_argument(
        "--label", default=None, help="run label (default: the run's, e.g. 'melora r=1 n=8', or 'base')"
    )
    parser.add_argument("--output-dir", required=True)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    results = run_eval(
        args.model, args.adapter, parse_tasks(args.tasks), args.data_dir, args.limit, args.batch_size,
        args.output_dir, args.allow_code_execution, args.max_new_tokens, merge=args.merge, label=args.label,
        accept_weak_sandbox=args.accept_weak_sandbox,
    )  # fmt: skip
    print(render_markdown(results).split("\n## ")[0])
    print(f"wrote {Path(args.output_dir) / 'results.json'}")
    return 0
