"""``melora glue``: fine-tune an encoder on one GLUE task with MELoRA, LoRA or full fine-tuning.

Setup (data, model, adapter) -> transformers ``Trainer`` (so ``torchrun`` / ``accelerate launch``
distribute it) -> per-epoch dev metrics -> ``results.json`` and the adapter in ``--output-dir``. The run
itself is :mod:`melora.lab.finetune.skeleton` (the same for ``melora instruct``), which also fixes the run
folder: ``checkpoints/``, ``adapter/`` (``model/`` for full fine-tuning), ``results.json``.

Without ``--config`` the defaults are measured to learn on a small encoder in minutes on a CPU
(per-method learning rates, batch 32, 3 epochs; see docs/results_glue.md). ``--config
configs/glue/<task>.yaml`` is the MELoRA paper's recipe for RoBERTa-base (e.g. RTE: 80 epochs,
batch 128, lr 4e-4), meant for a GPU. Flags override both.

    melora glue --task stsb --data-dir ../shared/data/glue --output-dir runs/stsb-melora
    melora glue --config configs/glue/rte.yaml --model roberta-base --output-dir runs/rte-paper
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from melora.lab.args import AdapterArgs, RunOptions, TrainArgs, UserError, opt
from melora.lab.data.glue import TASKS

if TYPE_CHECKING:
    from melora.lab.finetune.skeleton import TrainerPieces

logger = logging.getLogger(__name__)

SUBSET_SEED = 0  # --max-*-samples subsets are the same for every run, whatever its --seed
# Defaults measured to learn with MiniLM on a CPU budget (docs/results_glue.md); the paper's recipes
# (lr 4e-4 x batch 128 x 30-80 epochs) are configs/glue/<task>.yaml.
DEFAULT_LR = {"melora": 5e-3, "lora": 3e-3, "full": 1e-4}
DEFAULTS: dict[str, Any] = {"epochs": 3.0, "batch_size": 32, "warmup_ratio": 0.06, "weight_decay": 0.0}


@dataclass
class GlueArgs:
    """The task, model and data of one GLUE run."""

    task: str | None = opt(None, "GLUE task (required)", choices=sorted(TASKS))
    model: str = opt("minilm", "alias (minilm, mpnet), local folder or hub id")
    data_dir: str | None = opt(None, "folder with GLUE TSVs (<dir>/RTE/train.tsv); default: the hub")
    max_length: int = opt(128, "max tokens per example")
    max_train_samples: int | None = opt(None, "seeded random subset of the training set")
    max_eval_samples: int | None = opt(None, "seeded random subset of each dev set")
    group_by_length: bool = opt(
        True, "batch examples of similar length together (less padding; --resume is exact only without it)"
    )
    save_model: bool = opt(
        True, "save the adapter into <output-dir>/adapter (full fine-tuning: <output-dir>/model)"
    )

    def __post_init__(self) -> None:
        problems = []
        if self.task is None:
            problems.append("task is required: pass --task (or set task in the preset)")
        else:
            self.task = self.task.lower().replace("-", "")
            if self.task not in TASKS:
                problems.append(f"task={self.task!r}: choose one of {', '.join(sorted(TASKS))}")
        for name in ("max_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r}: expected a positive integer")
        if problems:
            raise UserError("Invalid GLUE options: " + "; ".join(problems) + ".")


@dataclass
class GlueRun(RunOptions):
    """Everything one GLUE run needs: its task/data, its adapter and its training loop."""

    glue: GlueArgs
    adapter: AdapterArgs
    train: TrainArgs

    PARTS = {"glue": GlueArgs, "adapter": AdapterArgs, "train": TrainArgs}
    TITLES = {**RunOptions.TITLES, "glue": "task and data"}
    DEFAULTS = DEFAULTS
    DEFAULT_LR = DEFAULT_LR


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
    """Group the Trainer's eval logs by epoch: ``[{"epoch": 1.0, "step": 9, "accuracy": 0.6, ...}]``.

    ``train_loss`` is the mean of the training losses logged since the previous evaluation.
    """
    by_epoch: dict[float, dict[str, Any]] = {}
    losses: list[float] = []
    for entry in log_history:
        if "loss" in entry and not any(k.startswith("eval_") for k in entry):
            losses.append(float(entry["loss"]))
            continue
        if not any(k.startswith("eval_") for k in entry):
            continue
        epoch = round(entry["epoch"], 4)
        row = by_epoch.setdefault(epoch, {"epoch": epoch, "step": entry["step"]})
        for key, value in entry.items():
            name = _metric_name(key, eval_splits) if key.startswith("eval_") else None
            if name is not None:
                row[name] = float(value)
        if losses:
            row["train_loss"] = sum(losses) / len(losses)
            losses = []
    return [by_epoch[e] for e in sorted(by_epoch)]


def primary_key(task: str) -> str:
    """The metric that picks the best epoch (MNLI: matched accuracy)."""
    from melora.lab.finetune.glue_metrics import PRIMARY_METRIC

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


def _default_head(adapter: AdapterArgs, model) -> AdapterArgs:
    """BERT-style models: train the pooler with the classifier (RoBERTa's head has its dense layer too)."""
    if (
        adapter.method != "full"
        and adapter.modules_to_save is None
        and getattr(model, "bert", None) is not None
    ):
        if getattr(model.bert, "pooler", None) is not None:
            logger.info("training BERT's pooler with the classifier (pass --modules-to-save to change)")
            adapter.modules_to_save = ["pooler"]
    return adapter


def trainer_pieces(run: GlueRun) -> TrainerPieces:
    """GLUE's part of the run: data, model with its adapter, metrics and evaluation every epoch."""
    from transformers import DataCollatorWithPadding, set_seed

    from melora.lab.data.glue import get_task, load_glue, subsample
    from melora.lab.finetune.glue_metrics import glue_metrics, logits_to_predictions
    from melora.lab.finetune.skeleton import TrainerPieces
    from melora.lab.models import load_sequence_classifier

    glue, train = run.glue, run.train
    task = get_task(glue.task)
    set_seed(train.seed)
    data = load_glue(task.name, glue.data_dir)
    data["train"] = subsample(data["train"], glue.max_train_samples, SUBSET_SEED)
    for split in task.eval_files:
        data[split] = subsample(data[split], glue.max_eval_samples, SUBSET_SEED)
    model, tokenizer = load_sequence_classifier(glue.model, task.num_labels)
    adapter = _default_head(run.adapter, model)
    # SEQ_CLS: PEFT then trains and saves the classifier head, whatever modules_to_save says.
    model = adapter.apply(model, task_type="SEQ_CLS")
    data = _tokenize(data, tokenizer, glue.max_length)
    for split in task.eval_files:  # shortest first: less padding, same metrics
        data[split] = data[split].sort("length").remove_columns("length")

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions = logits_to_predictions(task.name, eval_pred.predictions)
        return glue_metrics(task.name, predictions, eval_pred.label_ids)

    steps_per_epoch = max(1, len(data["train"]) // (train.batch_size * train.grad_accum))
    eval_sets = {split: data[split] for split in task.eval_files}
    return TrainerPieces(
        model=model,
        tokenizer=tokenizer,
        train_dataset=data["train"],
        eval_dataset=eval_sets if len(eval_sets) > 1 else next(iter(eval_sets.values())),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        arguments={
            "eval_strategy": "epoch",
            "logging_strategy": "steps",
            "logging_steps": max(1, steps_per_epoch // 10),
            "label_names": ["labels"],
            "train_sampling_strategy": "group_by_length" if glue.group_by_length else "random",
            "length_column_name": "length",
        },
        # Sequence classifiers take **kwargs, so Trainer passes num_items_in_batch and, with
        # average_tokens_across_devices (on by default, transformers#39395), multiplies the loss by the
        # world size; their loss is a batch mean that ignores it, so each rank's loss and gradient came out
        # world_size x too large (gradient clipping then differs from one process). Treat it as the plain mean.
        model_accepts_loss_kwargs=False,
    )


def run_glue(run: GlueRun) -> dict[str, Any]:
    """Train and evaluate one run (:func:`melora.lab.finetune.skeleton.run_training` with GLUE's pieces).

    Writes ``results.json`` (and the adapter, or a full fine-tune's model) on the main process; returns the
    results dict, or ``{"stopped_at_step": k, ...}`` when ``stop_after_steps`` cut it short.
    """
    from melora.lab.data.glue import get_task
    from melora.lab.finetune.glue_metrics import trivial_baseline
    from melora.lab.finetune.skeleton import Outcome, run_training

    task = get_task(run.glue.task)

    def outcome(trainer, pieces: TrainerPieces, train_output) -> Outcome:
        epochs = epoch_metrics(trainer.state.log_history, list(task.eval_files))
        best, last, summary = summarize(task.name, epochs)
        evaluated = pieces.eval_dataset  # one dev set, or {split: dev set} in task.eval_files' order
        first = next(iter(evaluated.values())) if isinstance(evaluated, dict) else evaluated
        return Outcome(
            task=task.name,
            summary=summary,
            details={
                "primary_metric": primary_key(task.name),
                "trivial_baseline": trivial_baseline(
                    task.name, pieces.train_dataset["label"], first["label"]
                ),
                "best_epoch": best["epoch"],
                "best": best,
                "last": last,
                "epochs": epochs,
                "num_train_examples": len(pieces.train_dataset),
                "num_eval_examples": len(first),
            },
        )

    return run_training(run, "glue", lambda: trainer_pieces(run), outcome, save=run.glue.save_model)


def format_result(results: dict[str, Any]) -> str:
    """The readable end-of-run summary: score beside the trivial baseline, parameters, time."""
    task, key = results["task"], results["primary_metric"]
    best, last = results["best"], results["last"]
    baseline = results["trivial_baseline"].get(key.removeprefix("matched_"), float("nan"))
    adapter, head = results.get("adapter_params"), results.get("head_params")
    params = f"{results['trainable_params']:,} trainable"
    if adapter is not None and results["method"] != "full":
        params = f"{adapter:,} adapter + {head:,} head = {params}"
    lines = [
        f"{results['label']} on {task}: dev {key} {best[key]:.4f} (best of {len(results['epochs'])} epochs, "
        f"epoch {best['epoch']:g}; last {last[key]:.4f})",
        f"  trivial baseline (majority class / constant): {baseline:.4f}",
        f"  parameters: {params}; wall time {results['wall_time_s'] / 60:.1f} min",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """CLI entry: merge the YAML preset and flags, run, print the summary (rank 0)."""
    from melora.lab.args import load_preset
    from melora.lab.finetune.skeleton import finish

    run = GlueRun.from_options(vars(args), load_preset(args.config), args.config)
    return finish(run_glue(run), run.train.output_dir, format_result)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``melora glue`` (flags generated from GlueArgs, AdapterArgs, TrainArgs)."""
    parser = subparsers.add_parser(
        "glue",
        help="fine-tune an encoder on a GLUE task",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    GlueRun.add_arguments(parser, "configs/glue/")
    parser.set_defaults(func=main)
    return parser


if (
    __name__ == "__main__"
):  # python -m melora.lab.finetune.glue ... (what torchrun / accelerate launch can run)
    import sys

    from melora.cli import main as cli_main

    sys.exit(cli_main(["glue", *sys.argv[1:]]))
