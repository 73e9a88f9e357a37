"""``melora instruct``: instruction tuning of a causal LM with MELoRA, LoRA or full fine-tuning.

setup (data, model, adapter) -> train (HF Trainer: accelerate / FSDP / DeepSpeed ready) -> evaluate
(held-out loss before and after) -> write the adapter and ``results.json`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from melora.accounting import parameter_counts
from melora.data.instruct import (
    TEMPLATES,
    InstructCollator,
    load_examples,
    pack_features,
    split_examples,
    tokenize_example,
)
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


@dataclass
class InstructOptions:
    """All options of one instruction-tuning run (CLI flags, YAML presets and defaults resolve into it)."""

    data: list[str] = field(default_factory=list)
    output_dir: str = ""
    model: str = "smollm2"
    method: str = "melora"
    r: int = 1
    n: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    template: str = "alpaca"
    train_on_inputs: bool = False
    cutoff_len: int = 256
    max_samples: int | None = None
    val_size: int = 64
    data_seed: int = 0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    seed: int = 42
    group_by_length: bool = False
    packing: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    eval_base: bool = True
    threads: int | None = None
    progress: bool = True
    label: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        problems = []
        checks = [
            (bool(self.data), "data", self.data, "at least one file, folder or hub dataset name"),
            (
                bool(self.output_dir),
                "output_dir",
                self.output_dir,
                "a folder for the adapter and results.json",
            ),
            (self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}"),
            (self.template in TEMPLATES, "template", self.template, f"one of {', '.join(TEMPLATES)}"),
            (self.r > 0, "r", self.r, "a positive integer"),
            (self.n > 0, "n", self.n, "a positive integer"),
            (self.cutoff_len > 1, "cutoff_len", self.cutoff_len, "an integer > 1"),
            (self.val_size >= 0, "val_size", self.val_size, "an integer >= 0"),
            (
                self.max_samples is None or self.max_samples > 0,
                "max_samples",
                self.max_samples,
                "None or > 0",
            ),
            (self.epochs > 0 or self.max_steps > 0, "epochs", self.epochs, "> 0 unless max_steps > 0"),
            (self.batch_size > 0, "batch_size", self.batch_size, "a positive integer"),
            (self.eval_batch_size > 0, "eval_batch_size", self.eval_batch_size, "a positive integer"),
            (self.grad_accum > 0, "grad_accum", self.grad_accum, "a positive integer"),
            (self.lr > 0, "lr", self.lr, "a positive learning rate"),
            (0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)"),
            (self.threads is None or self.threads > 0, "threads", self.threads, "None or a positive integer"),
        ]
        for ok, name, value, expected in checks:
            if not ok:
                problems.append(f"{name}={value!r}: expected {expected}")
        if problems:
            raise ValueError("Invalid instruct options:\n  " + "\n  ".join(problems))

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> InstructOptions:
        """Build from a merged option mapping; unknown keys (e.g. YAML typos) are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known - {"config", "command"})
        if unknown:
            raise ValueError(
                f"Unknown instruct option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        return cls(**{key: value for key, value in options.items() if key in known})

    @property
    def effective_batch_size(self) -> int:
        """Per-device batch x gradient accumulation (x number of processes when distributed)."""
        return self.batch_size * self.grad_accum

    def run_label(self) -> str:
        """Short label such as ``melora r=1 n=8``, ``lora r=64`` or ``full``."""
        if self.label:
            return self.label
        if self.method == "melora":
            return f"melora r={self.r} n={self.n}"
        if self.method == "lora":
            return f"lora r={self.r}"
        return "full"


def _features(examples, tokenizer, options: InstructOptions) -> list[dict[str, list[int]]]:
    return [
        tokenize_example(ex, tokenizer, options.cutoff_len, options.template, options.train_on_inputs)
        for ex in examples
    ]


def _training_arguments(options: InstructOptions, output_dir: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.eval_batch_size,
        gradient_accumulation_steps=options.grad_accum,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        learning_rate=options.lr,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        lr_scheduler_type=options.lr_scheduler,
        logging_steps=options.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=options.seed,
        bf16=options.bf16,
        activation_checkpointing=options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        remove_unused_columns=False,
        disable_tqdm=not options.progress,
        use_cpu=not torch.cuda.is_available(),
    )


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


def run_instruct(options: InstructOptions) -> dict[str, Any]:
    """Train one model on instruction data and write the adapter + ``results.json``; return the results."""
    from transformers import Trainer, set_seed

    from melora.models import load_causal_lm

    start = time.time()
    if options.threads:
        torch.set_num_threads(options.threads)
    output_dir = Path(options.output_dir)
    examples = load_examples(options.data)
    train_examples, val_examples = split_examples(
        examples, options.val_size, options.max_samples, seed=options.data_seed
    )
    set_seed(options.seed)
    dtype = torch.bfloat16 if options.bf16 else torch.float32
    model, tokenizer = load_causal_lm(options.model, dtype=dtype)
    model.config.use_cache = False
    train_features = _features(train_examples, tokenizer, options)
    if options.packing:
        train_features = pack_features(train_features, options.cutoff_len)
    val_features = _features(val_examples, tokenizer, options)
    peft_config = build_peft_config(
        options.method,
        r=options.r,
        n=options.n,
        alpha=options.alpha,
        dropout=options.dropout,
        target_modules=options.target_modules,
        task_type="CAUSAL_LM",
    )
    model = apply_method(model, peft_config)
    params = parameter_counts(model)
    logger.info(
        "%s: %d train / %d held-out examples, %s trainable parameters",
        options.run_label(),
        len(train_features),
        len(val_features),
        f"{params['trainable_params']:,}",
    )

    trainer = Trainer(
        model=model,
        args=_training_arguments(options, output_dir),
        data_collator=InstructCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_features,
        eval_dataset=val_features or None,
        processing_class=tokenizer,
    )
    heldout_base = trainer.evaluate()["eval_loss"] if val_features and options.eval_base else None
    train_output = trainer.train()
    heldout = trainer.evaluate()["eval_loss"] if val_features else None
    save_dir = output_dir / ("model" if options.method == "full" else "adapter")
    trainer.save_model(str(save_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(save_dir))

    curve = _loss_curve(trainer.state.log_history)
    summary = {"instruct/train_loss": float(train_output.training_loss)}
    if curve:
        summary["instruct/train_loss_last"] = float(curve[-1]["loss"])
    if heldout is not None:
        summary["instruct/heldout_loss"] = float(heldout)
    if heldout_base is not None:
        summary["instruct/heldout_loss_base"] = float(heldout_base)
    results = {
        "kind": "instruct",
        "label": options.run_label(),
        "method": options.method,
        "seed": options.seed,
        "config": asdict(options),
        "versions": environment_info(),
        **params,
        "wall_time_s": round(time.time() - start, 2),
        "summary": summary,
        "loss_curve": curve,
        "num_train_examples": len(train_examples),
        "num_train_sequences": len(train_features),
        "num_heldout_examples": len(val_examples),
        "global_steps": trainer.state.global_step,
        "saved_to": save_dir.name,
    }
    if trainer.is_world_process_zero():
        write_json_atomic(output_dir / "results.json", results)
    return results


def options_from_args(args: argparse.Namespace) -> InstructOptions:
    """Defaults < YAML preset (``--config``) < command-line flags."""
    preset = load_yaml(args.config) if getattr(args, "config", None) else {}
    return InstructOptions.from_dict(resolve_options(args, preset))


def _run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    results = run_instruct(options)
    print(
        f"{results['label']}: {results['trainable_params']:,} trainable params, {results['wall_time_s']:.0f} s"
    )
    for name, value in results["summary"].items():
        print(f"  {name:32s} {value:.4f}")
    print(f"results: {Path(options.output_dir) / 'results.json'}")
    return 0


def _bool_flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``melora instruct`` flags; every default is None so YAML presets can fill them."""
    parser.add_argument(
        "--data", nargs="+", default=None, help="Alpaca/Dolly .json/.jsonl files, folders or hub names"
    )
    parser.add_argument(
        "--model", default=None, help="hub name, local HF folder, .gguf file or alias (smollm2)"
    )
    parser.add_argument("--output-dir", default=None, help="where the adapter and results.json go")
    add_adapter_args(parser)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--template", choices=TEMPLATES, default=None, help="alpaca (default) or the model's chat template"
    )
    _bool_flag(data, "--train-on-inputs", "put the prompt in the loss too (the authors' setting)")
    data.add_argument("--cutoff-len", type=int, default=None, help="max tokens per example (256)")
    data.add_argument(
        "--max-samples", type=int, default=None, help="training examples to keep after the split"
    )
    data.add_argument("--val-size", type=int, default=None, help="held-out examples (64)")
    data.add_argument("--data-seed", type=int, default=None, help="seed of the train/held-out split (0)")
    _bool_flag(data, "--group-by-length", "batch examples of similar length together")
    _bool_flag(data, "--packing", "concatenate whole examples into cutoff-len sequences")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=None)
    train.add_argument("--max-steps", type=int, default=None, help="overrides --epochs when > 0")
    train.add_argument("--batch-size", type=int, default=None, help="per-device batch size")
    train.add_argument("--eval-batch-size", type=int, default=None)
    train.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--warmup-steps", type=int, default=None)
    train.add_argument("--weight-decay", type=float, default=None)
    train.add_argument("--lr-scheduler", default=None, help="HF scheduler name (linear)")
    train.add_argument("--seed", type=int, default=None)
    _bool_flag(train, "--bf16", "load in bfloat16 and train with bf16 autocast (GPUs)")
    _bool_flag(train, "--gradient-checkpointing", "trade compute for activation memory")
    train.add_argument("--logging-steps", type=int, default=None)
    _bool_flag(train, "--eval-base", "also measure the held-out loss before training (default on)")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _bool_flag(train, "--progress", "show progress bars (default on)")
    train.add_argument("--label", default=None, help="run label in results.json")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``melora instruct``."""
    parser = subparsers.add_parser("instruct", help="instruction tuning (Alpaca / Dolly) of a causal LM")
    configure_parser(parser)
    parser.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m melora.finetune.instruct`` (same flags as ``melora instruct``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="melora instruct", description=__doc__.splitlines()[0])
    configure_parser(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
