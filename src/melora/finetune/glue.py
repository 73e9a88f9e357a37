"""``melora glue``: fine-tune an encoder on one GLUE task with MELoRA, LoRA or full fine-tuning.

Setup (data, model, adapter) -> transformers ``Trainer`` (so ``torchrun`` / ``accelerate launch``
distribute it) -> per-epoch dev metrics -> ``results.json`` and the adapter in ``--output-dir``.
The paper's per-task recipe lives in ``configs/glue/<task>.yaml``; command-line flags override it.

    melora glue --config configs/glue/rte.yaml --method melora --r 1 --n 8 --output-dir runs/rte
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from melora.data.glue import TASKS, get_task, load_glue, subsample
from melora.eval.glue_metrics import PRIMARY_METRIC, glue_metrics, logits_to_predictions
from melora.finetune.common import (
    METHODS,
    add_adapter_args,
    apply_method,
    build_peft_config,
    environment_info,
    load_yaml,
    resolve_options,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

DEFAULT_RANK = {"melora": 1, "lora": 8, "full": None}
SAVE_STRATEGIES = ("epoch", "no")
SUBSET_SEED = 0  # --max-*-samples subsets are the same for every run, whatever its --seed


@dataclass
class GlueRunConfig:
    """Every option of one GLUE run; ``r`` / ``n`` default per method (MELoRA r=1 n=8, LoRA r=8)."""

    task: str
    output_dir: str
    method: str = "melora"
    model: str = "minilm"
    r: int | None = None
    n: int | None = None
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] | None = None
    epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 4e-4
    max_length: int = 256
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    data_dir: str | None = None
    label: str | None = None
    group_by_length: bool = False
    save_strategy: str = "epoch"
    save_model: bool = True
    resume: bool = False
    stop_after_steps: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        self.task = self.task.lower().replace("-", "")
        if self.task not in TASKS:
            problems.append(f"task={self.task!r}: choose one of {', '.join(TASKS)}")
        if self.method not in METHODS:
            problems.append(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        else:
            self.r = self.r if self.r is not None else DEFAULT_RANK[self.method]
            self.n = (self.n if self.n is not None else 8) if self.method == "melora" else None
        for name in ("r", "n", "batch_size", "eval_batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r}: expected a positive integer")
        for name in ("epochs", "lr", "alpha"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r}: expected a positive number")
        for name in ("dropout", "warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: expected a number in [0, 1)")
        if self.save_strategy not in SAVE_STRATEGIES:
            problems.append(
                f"save_strategy={self.save_strategy!r}: choose one of {', '.join(SAVE_STRATEGIES)}"
            )
        if problems:
            raise ValueError("Invalid GLUE run options:\n  - " + "\n  - ".join(problems))

    @property
    def run_label(self) -> str:
        """Short label for tables: ``melora r=1 n=8``, ``lora r=8`` or ``full``."""
        if self.label:
            return self.label
        if self.method == "melora":
            return f"melora r={self.r} n={self.n}"
        return f"lora r={self.r}" if self.method == "lora" else "full"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GlueRunConfig:
        """Build from a merged option dict; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known - {"config", "command"})
        if unknown:
            raise ValueError(f"Unknown GLUE option(s) {unknown}; known options: {sorted(known)}.")
        missing = [name for name in ("task", "output_dir") if options.get(name) is None]
        if missing:
            raise ValueError(
                f"Missing required option(s) {missing}: pass --task and --output-dir (or set them in the YAML)."
            )
        return cls(**{k: v for k, v in options.items() if k in known})


class StopAfterSteps(TrainerCallback):
    """Save a checkpoint and stop at ``global_step == steps`` (an interrupted run, to test resuming)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:  # no evaluation of a half-finished epoch
            control.should_evaluate = False
            control.should_save = False
        return control


def _tokenize(data, tokenizer, max_length: int):
    text_columns = [c for c in data["train"].column_names if c.startswith("sentence")]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[c] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    return data.map(encode, batched=True, remove_columns=text_columns, desc="tokenize")


def _metric_name(key: str, eval_splits: list[str]) -> str | None:
    """``eval_validation_matched_accuracy`` -> ``matched_accuracy``, ``eval_loss`` stays; None for timings."""
    name = key.removeprefix("eval_")
    for split in eval_splits:
        if name.startswith(split + "_"):
            name = name[len(split) + 1 :]
            prefix = split.removeprefix("validation").strip("_")
            name = f"{prefix}_{name}" if prefix else name
            break
    if name.split("_")[-1] in ("runtime", "second") or name == "epoch":
        return None
    return name.replace("loss", "eval_loss")


def epoch_metrics(log_history: list[dict[str, Any]], eval_splits: list[str]) -> list[dict[str, Any]]:
    """Group the Trainer's eval logs by epoch: ``[{"epoch": 1.0, "step": 9, "accuracy": 0.6, ...}]``."""
    by_epoch: dict[float, dict[str, Any]] = {}
    for entry in log_history:
        if not any(k.startswith("eval_") for k in entry):
            continue
        row = by_epoch.setdefault(
            round(entry["epoch"], 4), {"epoch": round(entry["epoch"], 4), "step": entry["step"]}
        )
        for key, value in entry.items():
            name = _metric_name(key, eval_splits) if key.startswith("eval_") else None
            if name is not None:
                row[name] = float(value)
    return [by_epoch[e] for e in sorted(by_epoch)]


def primary_key(task: str) -> str:
    """The metric that picks the best epoch (MNLI: matched accuracy)."""
    return ("matched_" if task == "mnli" else "") + PRIMARY_METRIC[task]


def summarize(
    task: str, epochs: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """``(best, last, summary)``; best is the epoch with the highest primary metric (earliest on ties)."""
    key = primary_key(task)
    best = max(epochs, key=lambda row: (row[key], -row["epoch"]))
    last = epochs[-1]
    metrics = [k for k in last if k not in ("epoch", "step") and not k.endswith("loss")]
    summary = {f"{task}/{m}_best": best[m] for m in metrics}
    summary.update({f"{task}/{m}_last": last[m] for m in metrics})
    return best, last, summary


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def _parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """parameter_counts plus a checksum of the trainable weights (distributed ranks and resumes must agree)."""
    from melora.accounting import parameter_counts

    checksum = sum(float(p.detach().double().abs().sum()) for p in model.parameters() if p.requires_grad)
    return {**parameter_counts(model), "trainable_checksum": checksum}


def build_trainer(cfg: GlueRunConfig):
    """Data, model, adapter and a configured ``Trainer`` for ``cfg``; returns ``(trainer, model)``."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from melora.models import load_sequence_classifier

    task = get_task(cfg.task)
    set_seed(cfg.seed)
    data = load_glue(task.name, cfg.data_dir)
    data["train"] = subsample(data["train"], cfg.max_train_samples, SUBSET_SEED)
    for split in task.eval_files:
        data[split] = subsample(data[split], cfg.max_eval_samples, SUBSET_SEED)
    model, tokenizer = load_sequence_classifier(cfg.model, task.num_labels)
    peft_config = build_peft_config(
        cfg.method,
        r=cfg.r,
        n=cfg.n or 1,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save,
        task_type="SEQ_CLS",  # PEFT then trains and saves the classifier head, whatever modules_to_save says
    )
    model = apply_method(model, peft_config)
    data = _tokenize(data, tokenizer, cfg.max_length)
    for split in task.eval_files:  # shortest first: less padding, same metrics
        data[split] = data[split].sort("length").remove_columns("length")

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions = logits_to_predictions(task.name, eval_pred.predictions)
        return glue_metrics(task.name, predictions, eval_pred.label_ids)

    args = TrainingArguments(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy=cfg.save_strategy,
        save_total_limit=1 if cfg.save_strategy != "no" else None,
        logging_strategy="epoch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        label_names=["labels"],
        report_to="none",
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        use_cpu=not torch.accelerator.is_available(),  # on CPU, torchrun then gives gloo DDP
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
    )
    eval_sets = {split: data[split] for split in task.eval_files}
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=eval_sets if len(eval_sets) > 1 else next(iter(eval_sets.values())),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[StopAfterSteps(cfg.stop_after_steps)] if cfg.stop_after_steps else None,
    )
    return trainer, model


def run_glue(cfg: GlueRunConfig) -> dict[str, Any]:
    """Train and evaluate one run; writes ``results.json`` (and the adapter) on the main process.

    Returns the results dict, or ``{"stopped_at_step": k, ...}`` when ``stop_after_steps`` cut it short.
    """
    start = time.time()
    task = get_task(cfg.task)
    trainer, model = build_trainer(cfg)
    checkpoint = _last_checkpoint(cfg.output_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint-* folder in %s; starting from scratch", cfg.output_dir)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    if cfg.stop_after_steps and state.global_step < state.max_steps:
        return {"stopped_at_step": state.global_step, "checkpoint": _last_checkpoint(cfg.output_dir)}
    epochs = epoch_metrics(state.log_history, list(task.eval_files))
    best, last, summary = summarize(task.name, epochs)
    train_losses = {round(e["epoch"], 4): e["loss"] for e in state.log_history if "loss" in e}
    for row in epochs:  # the mean training loss since the previous log (the epoch, unless resumed mid-way)
        row["train_loss"] = train_losses.get(row["epoch"])
    results = {
        "kind": "glue",
        "label": cfg.run_label,
        "method": cfg.method,
        "seed": cfg.seed,
        "task": task.name,
        "config": asdict(cfg),
        "versions": environment_info(),
        **_parameter_counts(model),
        "wall_time_s": time.time() - start,
        "summary": summary,
        "primary_metric": primary_key(task.name),
        "best_epoch": best["epoch"],
        "best": best,
        "last": last,
        "epochs": epochs,
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "world_size": trainer.args.world_size,
        "resumed_from": checkpoint,
    }
    if trainer.is_world_process_zero():
        if cfg.save_model:
            trainer.save_model(cfg.output_dir)  # the adapter (+ head) for PEFT, the whole model for full
        write_json_atomic(Path(cfg.output_dir) / "results.json", results)
    return results


def main(args: argparse.Namespace) -> int:
    """CLI entry: merge the YAML preset and flags, run, print the summary (one line per process)."""
    preset = load_yaml(args.config) if args.config else {}
    cfg = GlueRunConfig.from_options(resolve_options(args, preset))
    results = run_glue(cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if "stopped_at_step" in results:
        print(
            f"[rank {rank}/{world}] stopped at step {results['stopped_at_step']}; rerun with --resume to continue"
        )
        return 0
    line = {
        k: results[k]
        for k in ("label", "summary", "trainable_params", "equivalent_rank", "trainable_checksum")
    }
    print(f"[rank {rank}/{world}] {json.dumps(line, sort_keys=True)}")
    if rank == 0:
        print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``melora glue``."""
    parser = subparsers.add_parser(
        "glue",
        help="fine-tune on a GLUE task",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--task", choices=sorted(TASKS), default=None, help="GLUE task (or set it in --config)"
    )
    parser.add_argument(
        "--model", default=None, help="alias (minilm), local folder or hub id; default minilm"
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder with GLUE TSVs (<dir>/RTE/train.tsv); default: hub"
    )
    parser.add_argument(
        "--output-dir", default=None, help="where results.json, checkpoints and the adapter go"
    )
    add_adapter_args(parser)
    parser.add_argument(
        "--modules-to-save",
        nargs="+",
        default=None,
        help="extra modules trained in full with an adapter (the classifier always is); e.g. pooler for BERT",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--eval-batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--max-length", type=int, default=None)
    train.add_argument("--warmup-ratio", type=float, default=None)
    train.add_argument("--weight-decay", type=float, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--max-train-samples", type=int, default=None, help="seeded random subset of train")
    train.add_argument(
        "--max-eval-samples", type=int, default=None, help="seeded random subset of each dev set"
    )
    train.add_argument(
        "--group-by-length", action=argparse.BooleanOptionalAction, default=None, help="batch similar lengths"
    )
    train.add_argument("--label", default=None, help="run label in tables (default e.g. 'melora r=1 n=8')")
    train.add_argument(
        "--save-strategy", choices=SAVE_STRATEGIES, default=None, help="checkpoints for --resume"
    )
    train.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=None)
    train.add_argument(
        "--resume", action="store_true", default=None, help="continue from the last checkpoint"
    )
    train.add_argument("--stop-after-steps", type=int, default=None, help="checkpoint and stop after K steps")
    train.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars"
    )
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m melora.finetune.glue ... (what torchrun / accelerate launch can run)
    import sys

    _parser = argparse.ArgumentParser(prog="python -m melora.finetune.glue")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    sys.exit(main(_parser.parse_args(["glue", *sys.argv[1:]])))
