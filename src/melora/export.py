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
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from melora.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    atomic_directory,
    find_adapter_folder,
    read_adapter,
)
from melora.errors import ConfigError, UserError
from melora.functional import to_lora_factors
from melora.tuner.config import PEFT_TYPE, MELoRAConfig
from melora.tuner.layer import MELoRALayer

logger = logging.getLogger(__name__)


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
    layers = {
        f"{name}.": (module.n[adapter_name], module.r[adapter_name])
        for name, module in model.named_modules()
        if isinstance(module, MELoRALayer) and adapter_name in module.melora_A
    }
    if config.peft_type == PEFT_TYPE:  # export_lora refuses other methods with its own message
        check_adapter_tensors(
            config,
            state,
            f"adapter {adapter_name!r} of the model",
            lambda key: layers.get(key.rsplit(".", 1)[0] + ".", (config.n, config.r)),
        )
    extra = {k: v for k, v in state.items() if ".melora_" not in k}
    return config, {"factors": factors, "extra": extra, "alphas": alphas}


def _factors_from_dir(adapter_dir: str | os.PathLike) -> tuple[MELoRAConfig, dict[str, Any]]:
    """(config, {saved-key prefix: (A, B)}) read off a saved adapter folder (safetensors only)."""
    config_dict, state = read_adapter(adapter_dir)  # both from the same save, even during a re-save
    config_file, weights_file = Path(adapter_dir) / ADAPTER_CONFIG, Path(adapter_dir) / ADAPTER_WEIGHTS
    if not isinstance(config_dict, dict) or config_dict.get("peft_type") != PEFT_TYPE:
        found = config_dict.get("peft_type") if isinstance(config_dict, dict) else config_dict
        raise ValueError(
            f"{config_file} has peft_type {found!r}; export_lora needs a MELoRA adapter (peft_type {PEFT_TYPE!r})."
        )
    config = config_from_dict(config_dict, config_file)
    check_adapter_tensors(  # each module's n and r, with n_pattern / r_pattern applied
        config,
        state,
        weights_file,
        lambda key: config.resolve(_module_name(key.rsplit(".", 1)[0]))[:2],
        config_source=config_file,
    )
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


def _write_lora_config(lora: Any, folder: Path) -> None:
    """``lora.save_pretrained(folder)`` with name sets written sorted (LoraConfig keeps them as sets)."""
    lora.save_pretrained(folder)
    path = folder / ADAPTER_CONFIG
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules"):
        if isinstance(getattr(lora, key, None), set):
            data[key] = sorted(getattr(lora, key))
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


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
        trainable_token_indices=config.trainable_token_indices,
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
        _write_lora_config(lora_config, tmp)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(lora_dir)


# ---- validation of a saved adapter, before anything is written ---------------------------------------------

_SAVED_PREFIX = "base_model.model."
_MAX_LISTED = 25
# Fields every saved MELoRA adapter has: a file without them was not written by save_pretrained.
REQUIRED_CONFIG_FIELDS = ("r", "n", "alpha")


def config_from_dict(config_dict: dict[str, Any], source: str | os.PathLike) -> MELoRAConfig:
    """The MELoRAConfig of a saved adapter_config.json; one error, naming ``source``, lists every problem.

    The fields are validated by MELoRAConfig itself; only what a file can get wrong beyond that (a required
    field missing, a field this version does not know) is checked here.
    """
    problems = [f"{name} is missing" for name in REQUIRED_CONFIG_FIELDS if name not in config_dict]
    known = MELoRAConfig.__dataclass_fields__
    unknown = sorted(set(config_dict) - set(known))
    if unknown:  # as PEFT does for a config saved by a newer version
        logger.warning("%s: ignoring unknown fields %s", source, unknown)
    config = None
    try:
        config = MELoRAConfig(**{k: v for k, v in config_dict.items() if k in known and k != "peft_type"})
    except ConfigError as err:
        problems += err.problems
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    if problems or config is None:
        raise ValueError(_problem_list(f"{source} is not a valid MELoRA adapter config", problems))
    return config


def _problem_list(headline: str, problems: list[str]) -> str:
    listed = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return (
        f"{headline} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  - "
        + "\n  - ".join(listed)
        + more
    )


def _in_modules_to_save(key: str, names: list[str]) -> bool:
    """True if ``key`` is a tensor of a module named in modules_to_save (PEFT's name matching)."""
    parts = key.removeprefix(_SAVED_PREFIX).split(".")
    modules = (".".join(parts[:i]) for i in range(1, len(parts)))
    return any(module == name or module.endswith(f".{name}") for module in modules for name in names)


def _tensor_problem(key: str, tensor: torch.Tensor) -> str | None:
    if not tensor.is_floating_point():
        return f"{key}: dtype {tensor.dtype}, expected a floating point dtype (float32, bfloat16 or float16)"
    if tensor.numel() == 0:
        return f"{key}: empty tensor of shape {tuple(tensor.shape)}"
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        return f"{key}: {bad} of {tensor.numel()} values are NaN or infinite (diverged training?)"
    return None


def check_adapter_tensors(
    config: MELoRAConfig,
    state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    expected_n_r: Callable[[str], tuple[int, int]],
    config_source: str | os.PathLike | None = None,
) -> None:
    """Refuse an adapter whose tensors a LoRA export would get wrong; one error lists every problem.

    First an adapter with biases (``bias != "none"``: a LoRA has none), named by ``config_source`` (the
    adapter_config.json; default ``source``).

    Checks: every ``<module>.melora_A`` has its ``.melora_B`` and back; A is (n, r, k) and B is (n, o, r) with
    the n and r that ``expected_n_r(key)`` gives (the config's, or the live layer's); all tensors floating
    point, non-empty and finite; no key other than MELoRA factors, modules_to_save tensors and (with
    trainable_token_indices) token deltas.
    """
    if config.bias != "none":
        raise ValueError(f"{config_source or source}: {_bias_message(config)}")
    to_save = list(config.modules_to_save or [])
    problems = []
    a_keys = {k.removesuffix(".melora_A") for k in state if k.endswith(".melora_A")}
    b_keys = {k.removesuffix(".melora_B") for k in state if k.endswith(".melora_B")}
    for module in sorted(a_keys - b_keys):
        problems.append(f"{module}.melora_A has no {module}.melora_B: the layer's B factor is missing")
    for module in sorted(b_keys - a_keys):
        problems.append(f"{module}.melora_B has no {module}.melora_A: the layer's A factor is missing")
    for key in sorted(state):
        tensor = state[key]
        is_factor = key.endswith((".melora_A", ".melora_B"))
        is_token_delta = config.trainable_token_indices is not None and key.endswith(
            ".trainable_tokens_delta"
        )
        if not (is_factor or is_token_delta or _in_modules_to_save(key, to_save)):
            problems.append(
                f"{key}: not a MELoRA factor (.melora_A / .melora_B) nor a tensor of modules_to_save "
                f"{to_save}; base-model weights or another method's tensors do not belong in the adapter"
            )
            continue
        problem = _tensor_problem(key, tensor)
        if problem:
            problems.append(problem)
            continue
        if is_factor:
            problems.extend(_factor_shape_problems(key, tensor, state, expected_n_r))
    if not problems and not a_keys:
        problems.append("no MELoRA factors (<module>.melora_A / .melora_B): nothing to export")
    if problems:
        raise ValueError(_problem_list(f"{source} cannot be exported as a LoRA adapter", problems))


def _factor_shape_problems(
    key: str,
    tensor: torch.Tensor,
    state: dict[str, torch.Tensor],
    expected_n_r: Callable[[str], tuple[int, int]],
) -> list[str]:
    n, r = expected_n_r(key)
    shape = tuple(tensor.shape)
    if key.endswith(".melora_A"):
        layout, ok = f"(n, r, d_in/n) = ({n}, {r}, k)", len(shape) == 3 and shape[:2] == (n, r)
    else:
        layout, ok = f"(n, d_out/n, r) = ({n}, o, {r})", len(shape) == 3 and (shape[0], shape[2]) == (n, r)
    if not ok:
        return [f"{key}: shape {shape}, expected {layout} for n={n}, r={r}"]
    return []


def _bias_message(config: MELoRAConfig) -> str:
    return (
        f"bias={config.bias!r}: a standard LoRA adapter (and vLLM) carries no bias terms. Merge the adapter "
        "instead (merge_and_unload) or train with bias='none'."
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-lora",
        help="convert a saved MELoRA adapter into a standard LoRA adapter (rank n*r)",
        description="Write a standard PEFT LoRA adapter (rank n*r, lora_alpha n*alpha) that reproduces the MELoRA "
        "adapter exactly, for tools that never import melora (vLLM, SGLang, llama.cpp, lm-eval's peft=).",
    )
    parser.add_argument(
        "adapter_dir", help="saved MELoRA adapter folder, or a melora run folder holding adapter/"
    )
    parser.add_argument("lora_dir", help="output folder for the LoRA adapter")
    parser.add_argument(
        "--fold-scaling",
        action="store_true",
        help="fold each module's scaling into lora_B, pad to one rank, write no rank/alpha patterns "
        "(for llama.cpp and vLLM, which ignore them)",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """CLI entry of ``melora export-lora``."""
    source = find_adapter_folder(args.adapter_dir) or Path(args.adapter_dir)  # a run folder: its adapter/
    if not (source / ADAPTER_CONFIG).is_file():
        if (source / "model").is_dir():
            raise UserError(
                f"{source} is the run folder of a full fine-tune: its model/ holds a whole model, not an "
                "adapter, so there is no LoRA to export. Pass a MELoRA adapter folder or a MELoRA run folder."
            )
    out = export_lora(source, args.lora_dir, fold_scaling=args.fold_scaling)
    print(f"wrote a standard LoRA adapter to {out}")
    return 0
