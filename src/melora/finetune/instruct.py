"""``melora instruct``: instruction tuning of a causal LM with MELoRA, LoRA or full fine-tuning.

setup (data, model, adapter) -> train (HF Trainer: accelerate / FSDP / DeepSpeed ready) -> evaluate
(held-out loss before and after) -> write the adapter and ``results.json`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from melora.args import AdapterArgs, RunOptions, TrainArgs, UserError, opt
from melora.data.instruct import (
    TEMPLATES,
    InstructCollator,
    load_examples,
    pack_features,
    split_examples,
    tokenize_example,
)
from melora.finetune.qlora import QUANTIZE

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
    eval_base: bool = opt(True, "also measure the held-out loss before training")

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
    from melora.models import load_causal_lm

    if not args.quantize:
        model, tokenizer = load_causal_lm(args.model, dtype=dtype)
        model.config.use_cache = False
        return model, tokenizer, None
    from peft import prepare_model_for_kbit_training

    from melora.finetune.qlora import bnb_config, check_bitsandbytes, optimizer_name, training_device

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


def run_instruct(run: InstructRun) -> dict[str, Any]:
    """Train one model on instruction data and write the adapter + ``results.json``; return the results.

    Checkpoints (``--save-strategy steps|epoch``) go to ``<output-dir>/checkpoints``; ``--resume``
    continues from the last complete one. Returns ``{"stopped_at_step": k, ...}`` when
    ``--stop-after-steps`` cut the run short.
    """
    from transformers import Trainer, set_seed

    from melora.accounting import parameter_counts
    from melora.finetune.sharding import check_sharding_active, gathered_state_dict
    from melora.finetune.training import (
        StopAfterSteps,
        check_output_dir,
        last_complete_checkpoint,
        save_final,
        trainable_checksum,
        training_arguments,
    )
    from melora.provenance import provenance
    from melora.records import RunRecord

    args, adapter, train = run.instruct, run.adapter, run.train
    start = time.time()
    if train.threads:
        torch.set_num_threads(train.threads)
    output_dir = check_output_dir(train.output_dir)  # a bad path fails now, not after training
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
    params = parameter_counts(model)
    logger.info(
        "%s: %d train / %d held-out examples, %s trainable parameters",
        adapter.label,
        len(train_features),
        len(val_features),
        f"{params['trainable_params']:,}",
    )
    checkpoints = output_dir / "checkpoints"
    trainer = Trainer(
        model=model,
        args=training_arguments(
            train,
            checkpoints,
            logging_steps=args.logging_steps,
            eval_strategy="no",
            bf16=args.bf16,
            activation_checkpointing=args.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
            train_sampling_strategy="group_by_length" if args.group_by_length else "random",
            remove_unused_columns=False,
            **({"optim": optim} if optim else {}),
        ),
        data_collator=InstructCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_features,
        eval_dataset=val_features or None,
        processing_class=tokenizer,
        callbacks=[StopAfterSteps(train.stop_after_steps)] if train.stop_after_steps else None,
    )
    check_sharding_active(trainer)
    checkpoint = last_complete_checkpoint(checkpoints) if train.resume else None
    if train.resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch", checkpoints)
    # FSDP2 cannot evaluate before training (accelerate prepares model and optimizer together:
    # transformers#39961): the base loss is then measured after training with the adapter disabled.
    base_first = bool(val_features and args.eval_base) and not trainer.is_fsdp_enabled
    heldout_base = trainer.evaluate()["eval_loss"] if base_first else None
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    if train.stop_after_steps and state.global_step < state.max_steps:
        return {"stopped_at_step": state.global_step, "checkpoint": last_complete_checkpoint(checkpoints)}
    heldout = trainer.evaluate()["eval_loss"] if val_features else None
    if val_features and args.eval_base and not base_first:
        heldout_base = _base_loss_after_training(trainer, model, adapter.method)
    save_dir = output_dir / ("model" if adapter.method == "full" else "adapter")

    curve = _loss_curve(state.log_history)
    summary = {"instruct/train_loss": float(train_output.training_loss)}
    if curve:
        summary["instruct/train_loss_last"] = float(curve[-1]["loss"])
    if heldout is not None:
        summary["instruct/heldout_loss"] = float(heldout)
    record = RunRecord(
        kind="instruct",
        label=adapter.label,
        slug=adapter.slug,
        method=adapter.method,
        summary=summary,
        seed=train.seed,
        task="instruct",
        adapter=asdict(adapter),
        config=run.to_dict(),
        trainable_params=params["trainable_params"],
        adapter_params=params["adapter_params"],
        equivalent_rank=params["equivalent_rank"],
        wall_time_s=round(time.time() - start, 2),
        versions=provenance(),
        details={
            "heldout_loss_base": None if heldout_base is None else float(heldout_base),
            "loss_curve": curve,
            "num_train_examples": len(train_examples),
            "num_train_sequences": len(train_features),
            "num_heldout_examples": len(val_examples),
            "global_steps": state.global_step,
            "saved_to": save_dir.name,
            "resumed_from": checkpoint,
            "trainable_checksum": trainable_checksum(model),
            "optimizer": getattr(trainer.args.optim, "value", trainer.args.optim),
            "quantized_base": _quantized_base(model),
            "total_params": params["total_params"],
        },
    )
    state_dict = gathered_state_dict(trainer)  # every rank: under FSDP / ZeRO-3 the full tensors
    if trainer.is_world_process_zero():
        save_final(model, tokenizer, save_dir, state_dict)
        record.write(output_dir)
    return record.to_dict()


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


def _run(args: argparse.Namespace) -> int:
    from melora.args import load_preset
    from melora.finetune.training import is_main_process

    run = InstructRun.from_options(vars(args), load_preset(args.config), args.config)
    results = run_instruct(run)
    if not is_main_process():  # under accelerate launch / torchrun: the summary once
        return 0
    if "stopped_at_step" in results:
        print(f"stopped at step {results['stopped_at_step']}; rerun with --resume to continue")
        return 0
    print(format_result(results))
    print(f"results: {Path(run.train.output_dir) / 'results.json'}; adapter: {results['saved_to']}/")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``melora instruct`` (flags generated from InstructArgs, AdapterArgs, TrainArgs)."""
    parser = subparsers.add_parser(
        "instruct",
        help="instruction tuning (Alpaca / Dolly) of a causal LM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    InstructRun.add_arguments(parser, "configs/instruct/")
    parser.set_defaults(func=_run)
    return parser


if __name__ == "__main__":  # python -m melora.finetune.instruct ... (for accelerate launch)
    from melora.cli import main as cli_main

    sys.exit(cli_main(["instruct", *sys.argv[1:]]))
