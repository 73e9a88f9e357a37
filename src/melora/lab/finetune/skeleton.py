"""One training run, the same for every runner; a runner brings its data, model, metrics and trainer settings.

:func:`run_training` does, in order: torch threads -> output folder checked (before any loading) -> the runner's
:class:`TrainerPieces` (data, model with its adapter, collator, metrics, ``TrainingArguments`` overrides) ->
``Trainer`` with checkpoints in ``<run>/checkpoints/`` -> resume from the last complete checkpoint (``--resume``)
-> train (``--stop-after-steps`` returns early) -> the runner's :class:`Outcome` (summary, details) -> the
``RunRecord`` header (label, method, parameter counts, time, versions) -> the gathered save and
``results.json`` on the main process. :func:`finish` prints the end of a run the same way for every runner.

The run folder (``--output-dir``), for every runner::

    results.json
    checkpoints/checkpoint-N/   Trainer checkpoints (--save-strategy epoch|steps), what --resume continues
    adapter/                    the trained adapter (MELoRA / LoRA; a MELoRA one with its model card README.md), or
    model/                      the fully fine-tuned model (--method full)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class TrainerPieces:
    """What a runner contributes to the ``Trainer``: everything else is the skeleton's.

    ``arguments`` override :func:`~melora.lab.finetune.training.training_arguments` (evaluation strategy,
    logging, sampling, optimizer, ...); ``before_train`` runs once the Trainer exists (e.g. the base model's
    held-out loss); ``model_accepts_loss_kwargs`` overrides Trainer's guess when not None; ``details`` go
    into ``results.json`` (the runner's :class:`Outcome` may overwrite them).
    """

    model: torch.nn.Module
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any = None
    data_collator: Any = None
    compute_metrics: Callable[[Any], dict[str, float]] | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    before_train: Callable[[Any], None] | None = None
    model_accepts_loss_kwargs: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)  # what setup learned for results.json (e.g. sizes)


@dataclass
class Outcome:
    """What a finished run measured, in the runner's terms: ``results.json``'s task, summary and details."""

    task: str
    summary: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def run_training(
    run: Any,
    kind: str,
    pieces: Callable[[], TrainerPieces],
    outcome: Callable[[Any, TrainerPieces, Any], Outcome],
    save: bool = True,
) -> dict[str, Any]:
    """Train one run of ``run`` (a :class:`~melora.lab.args.RunOptions` with ``adapter`` and ``train`` parts).

    ``pieces()`` builds the data, model and adapter (after the output folder is checked);
    ``outcome(trainer, pieces, train_output)`` measures the finished run. With ``save`` the adapter (or the full
    model) goes to ``<run>/adapter/`` (``<run>/model/``). Writes ``results.json`` on the main process and
    returns its contents, or ``{"stopped_at_step": k, "checkpoint": ...}`` when ``--stop-after-steps`` cut
    the run short.
    """
    import torch
    from transformers import Trainer

    from melora.accounting import parameter_counts
    from melora.lab.finetune.sharding import check_sharding_active, gathered_state_dict
    from melora.lab.finetune.training import (
        StopAfterSteps,
        check_output_dir,
        check_report_to,
        checkpoints_folder,
        melora_card,
        run_checkpoint,
        save_final,
        saved_model_folder,
        trainable_checksum,
        training_arguments,
    )
    from melora.lab.provenance import provenance
    from melora.lab.records import RunRecord

    adapter, train = run.adapter, run.train
    start = time.time()
    if train.threads:
        torch.set_num_threads(train.threads)
    out = check_output_dir(train.output_dir)  # a bad path fails now, not after training
    check_report_to(train.report_to)  # a tracker that is not installed fails now, not after loading
    parts = pieces()
    model = parts.model
    counts = parameter_counts(model)
    logger.info("%s: %s trainable parameters", adapter.label, f"{counts['trainable_params']:,}")
    trainer = Trainer(
        model=model,
        args=training_arguments(train, checkpoints_folder(out), **parts.arguments),
        train_dataset=parts.train_dataset,
        eval_dataset=parts.eval_dataset,
        data_collator=parts.data_collator,
        processing_class=parts.tokenizer,
        compute_metrics=parts.compute_metrics,
        callbacks=[StopAfterSteps(train.stop_after_steps)] if train.stop_after_steps else None,
    )
    if parts.model_accepts_loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = parts.model_accepts_loss_kwargs
    check_sharding_active(trainer)
    checkpoint = run_checkpoint(out) if train.resume else None
    if train.resume and checkpoint is None:
        logger.warning(
            "--resume: no complete checkpoint in %s; starting from scratch", checkpoints_folder(out)
        )
    if parts.before_train is not None:
        parts.before_train(trainer)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    if train.stop_after_steps and state.global_step < state.max_steps:
        return {"stopped_at_step": state.global_step, "checkpoint": run_checkpoint(out)}
    measured = outcome(trainer, parts, train_output)
    save_dir = saved_model_folder(out, adapter.method) if save else None
    record = RunRecord(
        kind=kind,
        label=adapter.label,
        slug=adapter.slug,
        method=adapter.method,
        summary=measured.summary,
        seed=train.seed,
        task=measured.task,
        adapter=asdict(adapter),
        config=run.to_dict(),
        trainable_params=counts["trainable_params"],
        adapter_params=counts["adapter_params"],
        # what trains beside the adapter: a classifier head, modules_to_save
        head_params=None
        if adapter.method == "full"
        else counts["trainable_params"] - counts["adapter_params"],
        equivalent_rank=counts["equivalent_rank"],
        wall_time_s=round(time.time() - start, 2),
        versions=provenance(),
        details={
            **parts.details,
            **measured.details,
            "train_runtime_s": train_output.metrics.get("train_runtime"),
            "global_steps": state.global_step,
            "world_size": trainer.args.world_size,
            "saved_to": None if save_dir is None else save_dir.name,
            "resumed_from": checkpoint,
            "trainable_checksum": trainable_checksum(model),  # every rank (FSDP2 gathers)
            "total_params": counts["total_params"],
        },
    )
    state_dict = gathered_state_dict(trainer) if save else None  # every rank: FSDP / ZeRO-3 full tensors
    if trainer.is_world_process_zero():
        if save_dir is not None:
            card = melora_card(model, measured.summary, counts["trainable_params"])
            save_final(model, parts.tokenizer, save_dir, state_dict, card=card)
        record.write(out)
    return record.to_dict()


def finish(results: dict[str, Any], output_dir: str | os.PathLike, summary: Callable[[dict], str]) -> int:
    """The end of a runner's command: a stopped run's hint, each rank's numbers under torchrun, the summary.

    Under ``torchrun`` / ``accelerate launch`` every rank prints ``[rank i/N] <metrics> checksum=<sum>`` so that
    disagreement between processes shows; the summary (``summary(results)``) and the paths print once.
    """
    from melora.lab.finetune.training import is_main_process

    if "stopped_at_step" in results:
        if is_main_process():
            print(f"stopped at step {results['stopped_at_step']}; rerun with --resume to continue")
        return 0
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        metrics = " ".join(f"{k}={v:.6f}" for k, v in sorted(results["summary"].items()))
        print(f"[rank {rank}/{world}] {metrics} checksum={results['trainable_checksum']:.6f}")
    if is_main_process():
        print(summary(results))
        saved = (
            f"; {results['saved_to']}: {Path(output_dir) / results['saved_to']}"
            if results["saved_to"]
            else ""
        )
        print(f"results: {Path(output_dir) / 'results.json'}{saved}")
    return 0
