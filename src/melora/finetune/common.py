"""Pieces every runner shares: adapter arguments, building the adapter, config files, results files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import yaml

METHODS = ("melora", "lora", "full")


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    """Adapter flags shared by the runners. Every default is None so a YAML preset can fill it."""
    group = parser.add_argument_group("adapter")
    group.add_argument(
        "--method", choices=METHODS, default=None, help="melora (default), lora or full fine-tuning"
    )
    group.add_argument("--r", type=int, default=None, help="rank of each mini LoRA (MELoRA) or of the LoRA")
    group.add_argument("--n", type=int, default=None, help="number of mini LoRAs (MELoRA only)")
    group.add_argument("--alpha", type=float, default=None, help="scaling numerator: scaling = alpha / r")
    group.add_argument("--dropout", type=float, default=None, help="dropout on the adapter input")
    group.add_argument("--target-modules", nargs="+", default=None, help="module names to adapt")
    group.add_argument(
        "--config", type=Path, default=None, help="YAML preset; command-line flags override it"
    )


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; keys may use dashes or underscores."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}.")
    return {key.replace("-", "_"): value for key, value in data.items()}


def resolve_options(args: argparse.Namespace, *presets: dict[str, Any]) -> dict[str, Any]:
    """Merge option layers: later presets override earlier ones; non-None CLI flags override all."""
    merged: dict[str, Any] = {}
    for preset in presets:
        merged.update({k: v for k, v in preset.items() if v is not None})
    merged.update({k: v for k, v in vars(args).items() if v is not None and k != "func"})
    return merged


def build_peft_config(
    method: str,
    *,
    r: int,
    n: int = 1,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    modules_to_save: list[str] | None = None,
    task_type: str | None = None,
):
    """Return a MELoRAConfig / LoraConfig for ``method``, or None for full fine-tuning."""
    if method == "full":
        return None
    if method == "melora":
        from melora import MELoRAConfig

        return MELoRAConfig(
            r=r,
            n=n,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            task_type=task_type,
        )
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            task_type=task_type,
        )
    raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")


def apply_method(model: torch.nn.Module, peft_config) -> torch.nn.Module:
    """Wrap ``model`` with the adapter, or leave every parameter trainable when ``peft_config`` is None."""
    if peft_config is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


from melora.io import write_json_atomic  # noqa: E402,F401  (re-exported until the runners move)
from melora.provenance import provenance as environment_info  # noqa: E402,F401
