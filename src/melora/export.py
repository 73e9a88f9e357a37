"""Export a MELoRA adapter as a standard PEFT LoRA adapter of rank n*r (servable by vLLM, SGLang, llama.cpp).

The LoRA factors are the block-diagonal stacks of the mini LoRAs:
``lora_A = blockdiag(A_1..A_n)`` (n*r, d_in), ``lora_B = blockdiag(B_1..B_n)`` (d_out, n*r), and
``lora_alpha = n * alpha`` so that ``lora_alpha / (n*r) == alpha / r``: the exported LoRA computes exactly
the MELoRA update. Modules whose n, r or alpha differ (``n_pattern`` / ``r_pattern`` / ``alpha_pattern``) get
LoRA ``rank_pattern`` / ``alpha_pattern`` entries; the most common module sets ``r`` and ``lora_alpha``.

Consumers that ignore LoRA's patterns need ``fold_scaling=True``: llama.cpp's ``convert_lora_to_gguf.py``
keeps one ``lora_alpha`` and scales each tensor by ``lora_alpha / rank`` with the rank read off its shape;
vLLM scales every module by the config's ``lora_alpha / r``. With ``fold_scaling=True`` every module's
scaling is multiplied into lora_B, modules of smaller rank are zero-padded to the largest, and the config
has one ``r == lora_alpha`` and no patterns, so both rules (and PEFT's) give each module's exact update.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from melora.functional import to_lora_factors
from melora.io import ADAPTER_WEIGHTS, atomic_directory, read_adapter_config, read_adapter_weights
from melora.tuner.config import PEFT_TYPE, MELoRAConfig
from melora.tuner.layer import MELoRALayer


def _factors_from_model(model: torch.nn.Module, adapter_name: str) -> tuple[MELoRAConfig, dict[str, Any]]:
    """(config, {saved-key prefix: (A, B)}) read off a live PeftModel."""
    config = model.peft_config[adapter_name]
    factors = {}
    alphas = {}
    for name, module in model.named_modules():
        if isinstance(module, MELoRALayer) and adapter_name in module.melora_A:
            factors[name] = (module.melora_A[adapter_name].detach(), module.melora_B[adapter_name].detach())
            alphas[name] = module.alpha[adapter_name]
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    extra = {k: v for k, v in state.items() if ".melora_" not in k}
    return config, {"factors": factors, "extra": extra, "alphas": alphas}


def _factors_from_dir(adapter_dir: str | os.PathLike) -> tuple[MELoRAConfig, dict[str, Any]]:
    """(config, {saved-key prefix: (A, B)}) read off a saved adapter folder (safetensors only)."""
    config_dict = read_adapter_config(adapter_dir)
    if config_dict.get("peft_type") != PEFT_TYPE:
        raise ValueError(
            f"{Path(adapter_dir) / 'adapter_config.json'} has peft_type {config_dict.get('peft_type')!r}; "
            f"export_lora needs a MELoRA adapter (peft_type {PEFT_TYPE!r})."
        )
    known = MELoRAConfig.__dataclass_fields__
    config = MELoRAConfig(**{k: v for k, v in config_dict.items() if k in known and k != "peft_type"})
    state = read_adapter_weights(adapter_dir)
    factors = {}
    for key in state:
        if key.endswith(".melora_A"):
            prefix = key.removesuffix(".melora_A")
            b_key = prefix + ".melora_B"
            if b_key not in state:
                raise ValueError(
                    f"{adapter_dir}: {key} has no matching {b_key}; the adapter file is incomplete."
                )
            factors[prefix] = (state[key], state[b_key])
    extra = {k: v for k, v in state.items() if ".melora_" not in k}
    return config, {"factors": factors, "extra": extra}


def _module_name(prefix: str) -> str:
    """The module's name in the base model, from its key prefix in a PeftModel state dict."""
    return prefix.removeprefix("base_model.model.")


def _pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """A LoRA rank_pattern / alpha_pattern giving ``values[module]`` to every module, ``default`` elsewhere.

    Keys are read by PEFT's ``get_pattern_key`` (the end of the module name after a dot). A module's short name
    (``"v_proj"``) is used when every exported module of that name has the same value; otherwise its full
    name, regex-escaped. The keys never overlap, so their order does not matter.
    """
    pattern = {}
    for module, value in values.items():
        if value == default:
            continue
        short = module.rsplit(".", 1)[-1]
        peers = [v for m, v in values.items() if m == short or m.endswith("." + short)]
        key = re.escape(short) if all(v == value for v in peers) else re.escape(module)
        pattern[key] = value
    return pattern


def _lora_config(
    config: MELoRAConfig,
    n_r: int,
    lora_alpha: float | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> dict[str, Any]:
    from peft import LoraConfig

    target = config.target_modules
    lora = LoraConfig(
        r=n_r,
        lora_alpha=config.alpha * config.n if lora_alpha is None else lora_alpha,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=config.dropout,
        target_modules=sorted(target) if isinstance(target, set) else target,
        exclude_modules=sorted(config.exclude_modules)
        if isinstance(config.exclude_modules, set)
        else config.exclude_modules,
        fan_in_fan_out=config.fan_in_fan_out,
        bias="none",
        use_rslora=False,
        use_dora=False,
        modules_to_save=config.modules_to_save,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return lora


def export_lora(
    model_or_adapter_dir: torch.nn.Module | str | os.PathLike,
    lora_dir: str | os.PathLike,
    adapter_name: str = "default",
    fold_scaling: bool = False,
) -> Path:
    """Write a standard PEFT LoRA adapter (rank n*r) equal to a MELoRA adapter.

    Args:
        model_or_adapter_dir: a PeftModel holding a MELoRA adapter, or a saved MELoRA adapter folder.
        lora_dir: output folder; gets adapter_config.json (peft_type "LORA", r = n*r, lora_alpha = n*alpha)
            and adapter_model.safetensors with keys ``<module>.lora_A.weight`` (n*r, d_in) and
            ``<module>.lora_B.weight`` (d_out, n*r). Written atomically. Modules with their own n, r or alpha
            get ``rank_pattern`` (n_m*r_m) / ``alpha_pattern`` (n_m*alpha_m) entries; ``r`` and
            ``lora_alpha`` are those of the most common module.
        adapter_name: which adapter of a PeftModel to export.
        fold_scaling: multiply each module's lora_B by its scaling, zero-pad every module to the largest
            rank R, and write ``r = lora_alpha = R`` with no rank_pattern / alpha_pattern (scaling 1
            everywhere): exact also for tools that ignore LoRA's patterns (llama.cpp, vLLM).
    Returns:
        ``Path(lora_dir)``.
    """
    if isinstance(model_or_adapter_dir, torch.nn.Module):
        if adapter_name not in getattr(model_or_adapter_dir, "peft_config", {}):
            raise ValueError(f"The model has no adapter named {adapter_name!r}.")
        config, parts = _factors_from_model(model_or_adapter_dir, adapter_name)
    else:
        config, parts = _factors_from_dir(model_or_adapter_dir)
    if config.peft_type != PEFT_TYPE:
        raise ValueError(f"Adapter {adapter_name!r} is {config.peft_type}, not MELoRA: nothing to export.")
    if config.bias != "none":
        raise ValueError(
            f"bias={config.bias!r}: a standard LoRA adapter (and vLLM) carries no bias terms. Merge the adapter "
            "instead (merge_and_unload) or train with bias='none'."
        )
    if not parts["factors"]:
        raise ValueError("The adapter holds no MELoRA factors: nothing to export.")
    # per module: MELoRA's n, r (from A's shape) and alpha -> the exported rank n*r and lora_alpha n*alpha
    alphas = parts.get("alphas") or {p: config.resolve(_module_name(p))[2] for p in parts["factors"]}
    ranks, lora_alphas, scalings = {}, {}, {}
    for prefix, (A, _) in parts["factors"].items():
        n, r = A.shape[0], A.shape[1]  # A: (n, r, k)
        ranks[_module_name(prefix)] = n * r
        lora_alphas[_module_name(prefix)] = n * alphas[prefix]
        scalings[prefix] = alphas[prefix] / r
    if fold_scaling:  # one rank R and scaling R / R = 1 for every module
        default_rank = default_alpha = max(ranks.values())
        rank_pattern, alpha_pattern = {}, {}
    else:  # the most common (rank, alpha) pair is the default; ties go to the first module
        default_rank, default_alpha = Counter(zip(ranks.values(), lora_alphas.values())).most_common(1)[0][0]
        rank_pattern, alpha_pattern = _pattern(ranks, default_rank), _pattern(lora_alphas, default_alpha)
    tensors = {}
    for prefix, (A, B) in parts["factors"].items():
        # Same (n*r, d_in) / (d_out, n*r) layout for Conv1D too: PEFT's LoRA transposes dW when fan_in_fan_out.
        lora_A, lora_B = to_lora_factors(A.float(), B.float())  # (n*r, d_in), (d_out, n*r)
        if fold_scaling:
            pad = default_rank - lora_A.shape[0]
            lora_A = torch.nn.functional.pad(lora_A, (0, 0, 0, pad))  # (R, d_in): zero rows below
            lora_B = torch.nn.functional.pad(lora_B * scalings[prefix], (0, pad))  # (d_out, R): zero columns
        tensors[f"{prefix}.lora_A.weight"] = lora_A.to(A.dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora_B.to(B.dtype).contiguous()
    tensors.update({k: v.contiguous() for k, v in parts["extra"].items()})
    lora_config = _lora_config(
        config,
        n_r=default_rank,
        lora_alpha=default_alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    with atomic_directory(lora_dir) as tmp:
        lora_config.save_pretrained(tmp)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(lora_dir)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-lora", help="convert a saved MELoRA adapter into a standard LoRA adapter (rank n*r)"
    )
    parser.add_argument("adapter_dir", help="saved MELoRA adapter folder")
    parser.add_argument("lora_dir", help="output folder for the LoRA adapter")
    parser.add_argument(
        "--fold-scaling",
        action="store_true",
        help="fold each module's scaling into lora_B, pad to one rank, write no rank/alpha patterns "
        "(for llama.cpp and vLLM, which ignore them)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = export_lora(args.adapter_dir, args.lora_dir, fold_scaling=args.fold_scaling)
    print(f"wrote a standard LoRA adapter to {out}")
    return 0
