"""Parameter accounting: per adapted module, the equivalent rank and what a LoRA of that rank would cost."""

from __future__ import annotations

from typing import Any

import torch

from melora.tuner.layer import MELoRALayer


def _adapter_factors(module: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """adapter -> (n, r, factor params) for a MELoRA or PEFT LoRA layer; {} for anything else."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, MELoRALayer):
        return {
            a: (module.n[a], module.r[a], module.melora_A[a].numel() + module.melora_B[a].numel())
            for a in module.melora_A
        }
    if isinstance(module, LoraLayer):
        return {
            a: (1, module.r[a], module.lora_A[a].weight.numel() + module.lora_B[a].weight.numel())
            for a in module.lora_A
        }
    return {}


def adapter_rows(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One row per (adapted module, adapter): features, n, r, equivalent rank n*r, params, LoRA@n*r params."""
    rows = []
    for name, module in model.named_modules():
        for adapter, (n, r, params) in _adapter_factors(module).items():
            rows.append(
                {
                    "module": name,
                    "adapter": adapter,
                    "method": "melora" if isinstance(module, MELoRALayer) else "lora",
                    "in_features": module.in_features,
                    "out_features": module.out_features,
                    "n": n,
                    "r": r,
                    "equivalent_rank": n * r,
                    "params": params,
                    "lora_params_same_rank": n * r * (module.in_features + module.out_features),
                }
            )
    return rows


def adapter_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable/total parameters and, per adapted module, equivalent rank vs. a LoRA of that rank.

    Returns a dict with ``trainable_params``, ``total_params``, ``adapter_params`` (MELoRA/LoRA factors only),
    ``lora_params_same_rank`` (what LoRA of rank n*r on the same modules would train), ``equivalent_rank``
    (max n*r; None when nothing is adapted, e.g. full fine-tuning) and ``modules`` (one row per module).
    """
    rows = adapter_rows(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "trainable_params": trainable,
        "total_params": total,
        "adapter_params": sum(row["params"] for row in rows),
        "lora_params_same_rank": sum(row["lora_params_same_rank"] for row in rows),
        "equivalent_rank": max((row["equivalent_rank"] for row in rows), default=None),
        "modules": rows,
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """The headline numbers of :func:`adapter_summary` (no per-module rows), as stored in results.json."""
    summary = adapter_summary(model)
    return {
        key: summary[key] for key in ("trainable_params", "total_params", "adapter_params", "equivalent_rank")
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A readable multi-line table of :func:`adapter_summary`."""
    lines = [
        f"{'module':60s} {'in':>6s} {'out':>6s} {'n':>4s} {'r':>4s} {'rank':>5s} {'params':>9s} {'LoRA@rank':>10s}"
    ]
    for row in summary["modules"]:
        lines.append(
            f"{row['module'][-60:]:60s} {row['in_features']:6d} {row['out_features']:6d} {row['n']:4d} "
            f"{row['r']:4d} {row['equivalent_rank']:5d} {row['params']:9d} {row['lora_params_same_rank']:10d}"
        )
    lines.append(
        f"trainable params: {summary['trainable_params']:,} of {summary['total_params']:,} "
        f"({100 * summary['trainable_params'] / max(summary['total_params'], 1):.4f}%); adapter factors "
        f"{summary['adapter_params']:,}; a LoRA of the same rank would train {summary['lora_params_same_rank']:,}"
    )
    return "\n".join(lines)
