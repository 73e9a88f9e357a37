"""``melora instruct``: instruction tuning of a causal LM with MELoRA, LoRA or full fine-tuning.

setup (data, model, adapter) -> train (HF Trainer: accelerate / FSDP / DeepSpeed ready) -> evaluate
(held-out loss before and after) -> write the adapter and ``results.json`` into ``--output-dir``. The run
itself is :mod:`melora.lab.finetune.skeleton` (the same for ``melora glue``), which also fixes the run folder:
``checkpoints/``, ``adapter/`` (``model/`` for full fine-tuning), ``results.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from melora.lab.args import AdapterArgs, RunOptions, TrainArgs, UserError, opt
from melora.lab.data.instruct import (
    TEMPLATES,
    InstructCollator,
    load_examples,
    pack_features,
    split_examples,
    tokenize_example,
)
from melora.lab.finetune.qlora import QUANTIZE

if TYPE_CHECKING:
    from melora.lab.finetune.skeleton import TrainerPieces

logger = logging.getLogger(__name__)


# Per-method learning rates measured on SmolLM2-135M (docs/results_instruct.md).
DEFAULT_LR = {"melora": 5e-3, "lora": 2e-3, "full": 2e-5}
DEFAULTS: dict[str, Any] = {
    "epochs": 1.0,
    "batch_size": 4,
    "eval_batch_size": 8,
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
}


@dataclass
class InstructArgs:
    """The model and data of one instruction-tuning run."""

    data: list[str] | None = opt(None, "Alpaca/Dolly .json/.jsonl files, folders or hub names (required)")
    model: str = opt("smollm2", "hub name, local HF folder, .gguf file or alias (smollm2)")
    template: str = opt("alpaca", "prompt template: alpaca or the model's chat template", choices=TEMPLATES)
    train_on_inputs: bool = opt(False, "put the prompt in the loss too (the authors' setting)")
    max_length: int = opt(256, "max tokens per example (longer ones are cut)")
    max_train_samples: int | None = opt(None, "training examples to keep after the held-out split")
    val_size: int = opt(64, "held-out examples")
    data_seed: int = opt(0, "seed of the train/held-out split")
    packing: bool = opt(False, "concatenate whole examples into max-length sequences")
    group_by_length: bool = opt(False, "batch examples of similar length together")
    bf16: bool = opt(False, "load in bfloat16 and train with bf16 autocast (GPUs)")
    quantize: str | None = opt(
        None,
        "load the base quantized with bitsandbytes and train the adapter on it: 4bit is QLoRA's recipe (NF4, "
        "double quantisation, bf16 compute), 8bit is LLM.int8; the optimizer becomes 8-bit AdamW (paged on GPU)",
        choices=QUANTIZE,
    )
    gradient_checkpointing: bool = opt(False, "trade compute for activation memory")
    logging_steps: int = opt(1, "log the training loss every K steps")
    eval_base: bool = opt(
        True,
        "also measure the held-out loss before training (it draws from the random stream: the same run "
        "without it sees its batches in another order)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        problems = []
        if not self.data:
            problems.append("data is required: pass --data FILE_OR_FOLDER (or set data in the preset)")
        if self.template not in TEMPLATES:
            problems.append(f"template={self.template!r}: choose one of {', '.join(TEMPLATES)}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            problems.append(f"max_length={self.max_length!r}: expected an integer > 1")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            problems.append(f"max_train_samples={self.max_train_samples!r}: expected a positive integer")
        if self.val_size < 0:
            problems.append(f"val_size={self.val_size!r}: expected an integer >= 0")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            problems.append(
                f"quantize={self.quantize!r}: choose one of {', '.join(QUANTIZE)} (or leave it unset)"
            )
        if problems:
            raise UserError("Invalid instruct options: " + "; ".join(problems) + ".")


@dataclass
class InstructRun(RunOptions):
    """Everything one instruction-tuning run needs: data/model, adapter and training loop."""

    instruct: InstructArgs
    adapter: AdapterArgs
    train: TrainArgs

    PARTS = {"instruct": InstructArgs, "adapter": AdapterArgs, "train": TrainArgs}
    TITLES = {**RunOptions.TITLES, "instruct": "model and data"}
    DEFAULTS = DEFAULTS
    DEFAULT_LR = DEFAULT_LR

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.instruct.quantize and self.adapter.method == "full":
            raise UserError(
                f"--quantize {self.instruct.quantize} trains adapters on frozen quantized weights; full "
                "fine-tuning cannot update them. Use --method melora or lora, or drop --quantize."
            )


def _features(examples, tokenizer, args: InstructArgs) -> list[dict[str, list[int]]]:
    return [
        tokenize_example(ex, tokenizer, args.max_length, args.template, args.train_on_inputs)
        for ex in examples
    ]


def _loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [
        {
            "step": entry["step"],
            "epoch": entry.get("epoch"),
            "loss": entry["loss"],
            "lr": entry.get("learning_rate"),
        }
        for entry in log_history
        if "loss" in entry and "step" in entry
    ]


def _load_model(args: InstructArgs, dtype: torch.dtype) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, HF optimizer name or None): plain, or bitsandbytes-quantized for ``--quantize``."""
    from melora.lab.models import load_causal_lm

    if not args.quantize:
        model, tokenizer = load_causal_lm(args.model, dtype=dtype)
        model.config.use_cache = False
        return model, tokenizer, None
    from peft import prepare_model_for_kbit_training

    from melora.lab.finetune.qlora import bnb_config, check_bitsandbytes, optimizer_name, training_device

    device = training_device()
    check_bitsandbytes(args.quantize, device)
    model, tokenizer = load_causal_lm(
        args.model, dtype=dtype, quantization_config=bnb_config(args.quantize), device_map={"": device}
    )
    model.config.use_cache = False
    # QLoRA: norms, embeddings and head in fp32 for stable training; input grads for checkpointing
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    optim = optimizer_name(device)
    logger.info("base quantized to %s with bitsandbytes on %s; optimizer %s", args.quantize, device, optim)
    return model, tokenizer, optim


def _quantized_base(model: torch.nn.Module) -> dict[str, int]:
    """Adapted layers per quantization backend, e.g. {"bnb 4bit": 60} ({} for a plain base)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        backend = getattr(module, "quantization_backend", None)
        if backend is not None:
            counts[backend.backend_name] = counts.get(backend.backend_name, 0) + 1
    return counts


def _base_loss_after_training(trainer, model, method: str) -> float | None:
    """Held-out loss of the base model, measured with the adapter switched off (None for full fine-tuning)."""
    if method == "full":
        logger.warning("the base model's held-out loss is not measured under FSDP with --method full")
        return None
    with model.disable_adapter():
        return trainer.evaluate()["eval_loss"]


def trainer_pieces(run: InstructRun) -> TrainerPieces:
    """Instruct's part of the run: the split data, the (maybe quantized) model with its adapter, the collator.

    Its ``details`` hold the example counts and, when measured before training, the base model's held-out
    loss (``heldout_loss_base``).
    """
    from transformers import set_seed

    from melora.lab.finetune.skeleton import TrainerPieces

    args, adapter, train = run.instruct, run.adapter, run.train
    examples = load_examples(args.data)
    train_examples, val_examples = split_examples(
        examples, args.val_size, args.max_train_samples, seed=args.data_seed
    )
    set_seed(train.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tokenizer, optim = _load_model(args, dtype)
    train_features = _features(train_examples, tokenizer, args)
    if args.packing:
        train_features = pack_features(train_features, args.max_length)
    val_features = _features(val_examples, tokenizer, args)
    model = adapter.apply(model, task_type="CAUSAL_LM")
    logger.info("%s: %d train / %d held-out examples", adapter.label, len(train_features), len(val_features))
    details: dict[str, Any] = {
        "heldout_loss_base": None,
        "num_train_examples": len(train_examples),
        "num_train_sequences": len(train_features),
        "num_heldout_examples": len(val_examples),
    }

    def before_train(trainer) -> None:
        # FSDP2 cannot evaluate before training (accelerate prepares model and optimizer together:
        # transformers#39961): the base loss is then measured after training with the adapter disabled.
        if val_features and args.eval_base and not trainer.is_fsdp_enabled:
            details["heldout_loss_base"] = float(trainer.evaluate()["eval_loss"])

    return TrainerPieces(
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_features,
        eval_dataset=val_features or None,
        data_collator=InstructCollator(pad_token_id=tokenizer.pad_token_id),
        arguments={
            "logging_steps": args.logging_steps,
            "eval_strategy": "no",
            "bf16": args.bf16,
            "activation_checkpointing": args.gradient_checkpointing,
            "activation_checkpointing_kwargs": {"use_reentrant": False}
            if args.gradient_checkpointing
            else None,
            "train_sampling_strategy": "group_by_length" if args.group_by_length else "random",
            "remove_unused_columns": False,
            **({"optim": optim} if optim else {}),
        },
        before_train=before_train,
        details=details,
    )


def run_instruct(run: InstructRun) -> dict[str, Any]:
    """Train one model on instruction data (:func:`melora.lab.finetune.skeleton.run_training` with instruct's pieces).

    Writes the adapter (or a full fine-tune's model) and ``results.json``; returns the results.
    Checkpoints (``--save-strategy steps|epoch``) go to ``<output-dir>/checkpoints``; ``--resume``
    continues from the last complete one. Returns ``{"stopped_at_step": k, ...}`` when
    ``--stop-after-steps`` cut the run short.
    """
    from melora.lab.finetune.skeleton import Outcome, run_training

    def outcome(trainer, pieces: TrainerPieces, train_output) -> Outcome:
        measured = pieces.eval_dataset is not None
        heldout = trainer.evaluate()["eval_loss"] if measured else None
        base = pieces.details["heldout_loss_base"]
        if measured and run.instruct.eval_base and base is None:
            base = _base_loss_after_training(trainer, pieces.model, run.adapter.method)
        curve = _loss_curve(trainer.state.log_history)
        summary = {"instruct/train_loss": float(train_output.training_loss)}
        if curve:
            summary["instruct/train_loss_last"] = float(curve[-1]["loss"])
        if heldout is not None:
            summary["instruct/heldout_loss"] = float(heldout)
        return Outcome(
            task="instruct",
            summary=summary,
            details={
                "heldout_loss_base": None if base is None else float(base),
                "loss_curve": curve,
                "optimizer": getattr(trainer.args.optim, "value", trainer.args.optim),
                "quantized_base": _quantized_base(pieces.model),
            },
        )

    return run_training(run, "instruct", lambda: trainer_pieces(run), outcome)


def format_result(results: dict[str, Any]) -> str:
    """The readable end-of-run summary: held-out loss before and after, parameters, time."""
    lines = [
        f"{results['label']}: {results['trainable_params']:,} trainable params, "
        f"{results['num_train_examples']:,} examples, {results['wall_time_s'] / 60:.1f} min"
    ]
    summary = results["summary"]
    if "instruct/heldout_loss" in summary:
        base = results.get("heldout_loss_base")
        before = f" (base model {base:.4f})" if base is not None else ""
        lines.append(f"  held-out loss {summary['instruct/heldout_loss']:.4f}{before}")
    lines.append(f"  training loss {summary['instruct/train_loss']:.4f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """CLI entry: merge the YAML preset and flags, run, print the summary (rank 0)."""
    from melora.lab.args import load_preset
    from melora.lab.finetune.skeleton import finish

    run = InstructRun.from_options(vars(args), load_preset(args.config), args.config)
    return finish(run_instruct(run), run.train.output_dir, format_result)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``melora instruct`` (flags generated from InstructArgs, AdapterArgs, TrainArgs)."""
    parser = subparsers.add_parser(
        "instruct",
        help="instruction tuning (Alpaca / Dolly) of a causal LM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    InstructRun.add_arguments(parser, "configs/instruct/")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":  # python -m melora.lab.finetune.instruct ... (for accelerate launch)
    from melora.cli import main as cli_main

    sys.exit(cli_main(["instruct", *sys.argv[1:]]))
