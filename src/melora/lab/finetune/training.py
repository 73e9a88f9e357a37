"""What both runners do around the HF ``Trainer``: its arguments, checkpoints, the final atomic save.

- :func:`check_output_dir`: the output folder exists and is writable, checked before any training;
- :func:`check_report_to`: every tracker of ``--report-to`` is installed, checked before any loading;
- :func:`training_arguments`: ``TrainArgs`` -> ``TrainingArguments`` (CPU gives gloo DDP under torchrun);
- the run folder's layout (:func:`checkpoints_folder`, :func:`saved_model_folder`, :func:`checkpoint_folders`):
  ``<run>/checkpoints/checkpoint-N``, ``<run>/adapter/`` or (full fine-tuning) ``<run>/model/``;
- :func:`last_complete_checkpoint`: the newest ``checkpoint-*`` folder that a kill did not cut short;
- :class:`StopAfterSteps`: checkpoint and stop at a step (an interruption, to test ``--resume``);
- :func:`save_final`: the adapter (or full model) and tokenizer, written atomically into one folder
  (under FSDP / ZeRO-3 from the state dict that :mod:`melora.lab.finetune.sharding` gathered).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from melora.lab.args import TrainArgs

logger = logging.getLogger(__name__)

# Files Trainer writes last into a checkpoint: with them present (and the state readable) the checkpoint is whole.
_CHECKPOINT_STATE = "trainer_state.json"
_CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# FSDP with SHARDED_STATE_DICT writes each rank's shards into this folder (transformers' FSDP_MODEL_NAME).
_FSDP_SHARDS = "pytorch_model_fsdp_0"


def training_arguments(train: TrainArgs, output_dir: str | os.PathLike, **overrides: Any):
    """``TrainingArguments`` from the shared fields; runner-specific settings come as ``overrides``."""
    from transformers import TrainingArguments

    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.eval_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.lr,
        "weight_decay": train.weight_decay,
        # an int counts steps; a float in [0, 1) is a ratio of the total steps
        "warmup_steps": train.warmup_steps if train.warmup_steps > 0 else train.warmup_ratio,
        "lr_scheduler_type": train.lr_scheduler,
        "save_strategy": train.save_strategy,
        "save_steps": train.save_steps,
        "save_total_limit": 2 if train.save_strategy != "no" else None,
        "seed": train.seed,
        "data_seed": train.seed,
        "report_to": list(train.report_to),  # ["none"] or trackers (check_report_to ran first)
        "disable_tqdm": not train.progress,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),  # on CPU, torchrun then gives gloo DDP
    }
    options.update(overrides)
    return TrainingArguments(**options)


# --report-to tracker -> the package it needs (what transformers' integrations import)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(report_to: list[str]) -> None:
    """A :class:`UserError` naming the package to install when a tracker of ``--report-to`` is missing.

    Checked before data and model load, with transformers' own availability tests, so a run does not fail
    (or, for some trackers, silently log nowhere) after minutes of loading. TensorBoard is also served by
    ``tensorboardX``, as in transformers.
    """
    from transformers.integrations import integration_utils as trackers

    from melora.errors import UserError

    available = {
        "tensorboard": trackers.is_tensorboard_available,
        "trackio": trackers.is_trackio_available,
        "wandb": trackers.is_wandb_available,
        "mlflow": trackers.is_mlflow_available,
    }
    missing = [name for name in report_to if name in available and not available[name]()]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[name] for name in missing)
        raise UserError(
            f"--report-to {' '.join(missing)}: not installed; install it with `pip install {packages}` "
            "or drop it from --report-to (--report-to none logs to no tracker)."
        )


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` if needed and make sure this process can write into it, before any training.

    A path that is a file, lies under a file, or sits in a folder without write permission is a
    :class:`UserError` naming the path and the fix, raised at the start of the run rather than by the first
    checkpoint or the final save after hours of training.
    """
    import tempfile

    from melora.errors import UserError

    path = Path(output_dir)
    fix = "pass --output-dir a folder you can write to (a new path or an existing folder)"
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} is an existing file, not a folder; {fix}.")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"output folder {path} cannot be created: {blocker} is a file, not a folder; {fix}.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".melora-write-check-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        failed = Path(err.filename) if err.filename else path
        where = "" if path in (failed, failed.parent) else f" ({failed})"  # mkdir failed higher up: name it
        raise UserError(f"output folder {path} is not writable: {reason}{where}; {fix}.") from None
    return path


# The run folder of every runner (melora glue, melora instruct).
CHECKPOINTS = "checkpoints"  # <run>/checkpoints/checkpoint-N: Trainer's checkpoints
ADAPTER = "adapter"  # <run>/adapter/: the trained adapter
MODEL = "model"  # <run>/model/: the fully fine-tuned model (--method full)
SAVED_FOLDERS = (
    ADAPTER,
    MODEL,
)  # what a finished run saved; runs before the one layout kept full models in adapter/


def checkpoints_folder(run_dir: str | os.PathLike) -> Path:
    """Where a run's Trainer writes its ``checkpoint-N`` folders: ``<run>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """Every folder that may hold a run's checkpoints, newest layout first.

    ``<run>/checkpoints``; then ``<run>`` itself, where ``melora glue`` wrote them before both runners shared
    one layout (so such a run still resumes, and a study still cleans it up).
    """
    return [checkpoints_folder(run_dir), Path(run_dir)]


def run_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The checkpoint ``--resume`` continues from: the newest complete one of :func:`checkpoint_folders`."""
    for folder in checkpoint_folders(run_dir):
        checkpoint = last_complete_checkpoint(folder)
        if checkpoint is not None:
            return checkpoint
    return None


def saved_model_folder(run_dir: str | os.PathLike, method: str) -> Path:
    """Where a run saves what it trained: ``<run>/model`` for full fine-tuning, ``<run>/adapter`` otherwise."""
    return Path(run_dir) / (MODEL if method == "full" else ADAPTER)


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` under ``folder`` holding trainer state and weights, or None.

    A kill while Trainer writes a checkpoint leaves a folder without ``trainer_state.json`` (it is
    written last), or with one cut short (Trainer writes it in place: the file exists, empty, before its
    text is in it); such a folder is skipped with a warning and the previous checkpoint is used.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.iterdir() if p.is_dir() and _step(p) >= 0), key=_step, reverse=True
    )
    for path in candidates:
        whole = _readable_state(path / _CHECKPOINT_STATE) and (
            any((path / w).is_file() for w in _CHECKPOINT_WEIGHTS) or (path / _FSDP_SHARDS).is_dir()
        )
        if whole:
            return str(path)
        logger.warning("%s is incomplete (interrupted while saving); skipping it", path)
    return None


def _readable_state(path: Path) -> bool:
    """``trainer_state.json`` is there and whole: a JSON object with its ``global_step``."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)


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


def save_final(
    model: torch.nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    card: Callable[[Path], Any] | None = None,
) -> Path:
    """The adapter (PeftModel) or the whole model, with the tokenizer, written atomically to ``folder``.

    ``state_dict``: the gathered full state dict of a sharded model (``sharding.gathered_state_dict``);
    without it the model's own (unsharded) tensors are saved. ``card(folder)`` writes the model card into
    the folder before it is moved into place (replacing PEFT's template README.md).
    """
    from peft import PeftModel

    from melora.adapter_folder import atomic_directory

    # The runners never resize the vocabulary nor adapt embeddings, so PEFT's "auto" check, which asks the
    # hub whether the base's vocabulary changed (a network call, and two warnings offline), is not needed.
    extra = {"save_embedding_layers": False} if isinstance(model, PeftModel) else {}
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, **extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            card(Path(tmp))
    return Path(folder)


def melora_card(model: torch.nn.Module, summary: dict[str, float], trainable_params: int):
    """``card`` for :func:`save_final`: a MELoRA adapter's model card with the run's summary scores.

    None when ``model`` carries no MELoRA adapter (LoRA runs keep PEFT's card; full fine-tuning has none).
    """
    from melora.model_card import write_model_card

    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(getattr(model, "active_adapter", "default"))
    if config is None or str(getattr(config, "peft_type", "")).upper().rsplit(".", 1)[-1] != "MELORA":
        return None
    base = config.base_model_name_or_path or "the base model"
    return lambda folder: write_model_card(folder, config, base, trainable_params, summary)


def trainable_checksum(model: torch.nn.Module) -> float:
    """Sum of |w| over trainable weights (distributed ranks and resumed runs must agree).

    Under FSDP2 each weight is gathered first, so every rank must call this.
    """
    from melora.lab.finetune.sharding import full_tensor

    return sum(
        float(full_tensor(p.detach()).double().abs().sum()) for p in model.parameters() if p.requires_grad
    )


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
