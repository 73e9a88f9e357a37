"""What a trained MELoRA or LoRA adapter learned: per module, the spectrum of the scaled update dW, its
effective rank and norm, and for MELoRA how diverse the mini LoRAs are; per layer and over all modules.

``analyze_adapter`` reads a saved adapter folder (or a melora run folder holding ``adapter/``; safetensors
only) and returns a JSON-able dict; ``analysis_table`` renders it as a markdown table. The math is in
``melora.spectra``; this module reads the factors and the scaling PEFT would apply:

- MELoRA: A (n, r, k), B (n, o, r) per module; scaling ``alpha / r`` with the module's ``alpha_pattern``.
- LoRA: ``lora_A.weight`` (r, d_in), ``lora_B.weight`` (d_out, r) (a Conv's kernels flattened); scaling
  ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``, with the module's ``rank_pattern`` /
  ``alpha_pattern`` (PEFT's own key lookup).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key

from melora import spectra
from melora.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, find_adapter_folder, read_adapter
from melora.errors import UserError
from melora.export import config_from_dict
from melora.tuner.config import PEFT_TYPE

LORA_PEFT_TYPE = "LORA"
DEFAULT_FRACTION = 0.01
_SAVED_PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")  # the first ".<number>." in a module name: its layer


@dataclass(frozen=True)
class ModuleFactors:
    """One adapted module: its name in the base model, its factors and the scaling of its update.

    MELoRA: ``dW = scaling * blockdiag(B_i A_i)`` with A (n, r, k), B (n, o, r).
    LoRA: ``dW = scaling * B A`` with A (r, d_in), B (d_out, r).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class AdapterFactors:
    """The modules of one saved adapter, with its method ("melora" or "lora") and config-level options."""

    folder: Path
    method: str
    r: int
    alpha: float
    n: int | None
    use_rslora: bool
    modules: list[ModuleFactors]


def adapter_folder_of(path: str | os.PathLike) -> Path:
    """The adapter folder ``path`` names: itself when it holds adapter_config.json, else its ``adapter/``
    (a run folder of ``melora glue`` / ``melora instruct``)."""
    folder = Path(path)
    found = find_adapter_folder(folder)
    if found is not None:
        return found
    if (folder / "model").is_dir():
        raise UserError(
            f"melora.analysis: {folder} is the run folder of a full fine-tune (model/ holds a whole model, no "
            "adapter); pass a MELoRA or LoRA adapter folder or run folder."
        )
    raise UserError(
        f"melora.analysis: {folder} holds no {ADAPTER_CONFIG}, nor does {folder / 'adapter'}; pass a saved "
        "PEFT adapter folder or a melora run folder holding adapter/."
    )


def read_adapter_factors(path: str | os.PathLike) -> AdapterFactors:
    """The factors and scalings of every adapted module of a saved MELoRA or LoRA adapter (safetensors only)."""
    folder = adapter_folder_of(path)
    try:
        config, state = read_adapter(folder)
    except FileNotFoundError as err:  # no adapter_model.safetensors (a pickle .bin is never loaded)
        raise UserError(f"melora.analysis: {err}") from None
    peft_type = config.get("peft_type")
    if peft_type == PEFT_TYPE:
        return _melora_factors(folder, config, state)
    if peft_type == LORA_PEFT_TYPE:
        return _lora_factors(folder, config, state)
    raise UserError(
        f"melora.analysis: {folder / ADAPTER_CONFIG} has peft_type {peft_type!r}; analyze reads MELoRA "
        f"({PEFT_TYPE!r}) and LoRA ({LORA_PEFT_TYPE!r}) adapters: pass one of those."
    )


def _pairs(
    folder: Path, state: dict[str, torch.Tensor], a_suffix: str, b_suffix: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name in the base model: (A, B)} for the keys ``<prefix><a_suffix>`` / ``<prefix><b_suffix>``."""
    pairs = {}
    for key in sorted(state):
        if not key.endswith(a_suffix):
            continue
        prefix = key.removesuffix(a_suffix)
        A, B = state[key], state.get(prefix + b_suffix)
        if B is None:
            raise UserError(
                f"melora.analysis: {folder / ADAPTER_WEIGHTS} has {key} but no {prefix + b_suffix}; "
                "the adapter file is incomplete: re-save it."
            )
        for name, tensor in ((key, A), (prefix + b_suffix, B)):
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise UserError(
                    f"melora.analysis: {folder / ADAPTER_WEIGHTS}: {name} is not a finite floating point "
                    "tensor (diverged training?); analyze an adapter saved before the divergence."
                )
        pairs[prefix.removeprefix(_SAVED_PREFIX)] = (A, B)
    if not pairs:
        raise UserError(
            f"melora.analysis: {folder / ADAPTER_WEIGHTS} holds no factors (*{a_suffix} / *{b_suffix}); "
            "pass an adapter saved by PEFT's save_pretrained."
        )
    return pairs


def _melora_factors(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> AdapterFactors:
    melora_config = config_from_dict(config, folder / ADAPTER_CONFIG)
    modules = []
    for name, (A, B) in _pairs(folder, state, ".melora_A", ".melora_B").items():
        if A.dim() != 3 or B.dim() != 3 or A.shape[:2] != (B.shape[0], B.shape[2]):
            raise UserError(
                f"melora.analysis: {folder / ADAPTER_WEIGHTS}: {name} has melora_A {tuple(A.shape)} and "
                f"melora_B {tuple(B.shape)}, expected (n, r, k) and (n, o, r); re-save the adapter."
            )
        alpha = melora_config.resolve(name)[2]
        modules.append(ModuleFactors(name, A, B, alpha / A.shape[1]))  # scaling alpha / r, r from A's shape
    return AdapterFactors(
        folder, "melora", melora_config.r, melora_config.alpha, melora_config.n, False, modules
    )


def _lora_factors(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> AdapterFactors:
    if config.get("use_dora"):
        raise UserError(
            f"melora.analysis: {folder / ADAPTER_CONFIG} is a DoRA adapter (use_dora), whose update is not "
            "scaling * B A; analyze a plain LoRA adapter."
        )
    r, alpha, rslora = (
        int(config.get("r", 8)),
        float(config.get("lora_alpha", 8)),
        bool(config.get("use_rslora")),
    )
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = []
    for name, (A, B) in _pairs(folder, state, ".lora_A.weight", ".lora_B.weight").items():
        A, B = A.flatten(1), B.flatten(1)  # (r, d_in), (d_out, r); a Conv's kernels as one input vector
        if A.shape[0] != B.shape[1]:
            raise UserError(
                f"melora.analysis: {folder / ADAPTER_WEIGHTS}: {name} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}, whose ranks differ; re-save the adapter."
            )
        rank = A.shape[0]  # what rank_pattern gives this module
        module_alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha))
        scaling = module_alpha / math.sqrt(rank) if rslora else module_alpha / rank
        modules.append(ModuleFactors(name, A, B, scaling))
    return AdapterFactors(folder, "lora", r, alpha, None, rslora, modules)


def _finite(value: float) -> float | None:
    """A float for JSON: NaN (undefined, e.g. no pair of blocks) becomes None."""
    return None if math.isnan(value) else value


def _module_report(module: ModuleFactors, method: str, fraction: float, blocks: int | None) -> dict[str, Any]:
    A, B, s = module.A, module.B, module.scaling
    if method == "melora":
        n, r, k = A.shape
        o = B.shape[1]
        values = spectra.melora_singular_values(A, B, s)
        shape, nominal = [n * o, n * k], n * r
    else:
        values = spectra.lora_singular_values(A, B, s)
        shape, nominal = [B.shape[0], A.shape[1]], A.shape[0]
    report: dict[str, Any] = {
        "name": module.name,
        "layer": layer_index(module.name),
        "shape": shape,
        "scaling": s,
        "nominal_rank": nominal,
        "singular_values": values.tolist(),
        "frobenius_norm": float(values.square().sum().sqrt()),
        "spectral_norm": float(values[0]) if values.numel() else 0.0,
        "entropy_effective_rank": spectra.entropy_effective_rank(values),
        "rank_above_fraction": spectra.rank_above(values, fraction),
    }
    if method == "melora":
        norms = spectra.block_frobenius_norms(A, B, s)
        shares = spectra.energy_shares(norms)
        row_spans, column_spans = spectra.block_row_spans(A, B), spectra.block_column_spans(A, B)
        row_dims = [spectra.orthonormal_basis(span).shape[1] for span in row_spans]
        column_dims = [spectra.orthonormal_basis(span).shape[1] for span in column_spans]
        report |= {
            "n": n,
            "r": r,
            "block_norms": norms.tolist(),
            "block_energy_shares": shares.tolist(),
            "effective_block_count": spectra.effective_block_count(shares),
            "block_norm_cv": spectra.coefficient_of_variation(norms),
            "row_space_overlap": _finite(spectra.mean_subspace_overlap(list(row_spans))),
            "column_space_overlap": _finite(spectra.mean_subspace_overlap(list(column_spans))),
            "random_overlap_row": _finite(spectra.random_subspace_overlap(row_dims, k)),
            "random_overlap_col": _finite(spectra.random_subspace_overlap(column_dims, o)),
        }
    elif blocks is not None:
        if shape[0] % blocks or shape[1] % blocks:
            raise UserError(
                f"melora.analysis: --blocks {blocks} does not divide {module.name} ({shape[0]} x {shape[1]}); "
                "choose a number of blocks dividing every adapted layer's dimensions."
            )
        report["diagonal_energy_fraction"] = _finite(spectra.diagonal_energy_fraction(A, B, blocks))
    return report


def layer_index(module_name: str) -> int | None:
    """The layer number in a module name (``model.layers.3.self_attn.q_proj`` -> 3), or None."""
    found = _LAYER_INDEX.search(module_name)
    return int(found.group(1)) if found else None


# per-module numbers averaged in the summary, where every module (or some) has them
_MEANS = (
    "entropy_effective_rank",
    "rank_above_fraction",
    "nominal_rank",
    "frobenius_norm",
    "spectral_norm",
    "effective_block_count",
    "block_norm_cv",
    "row_space_overlap",
    "column_space_overlap",
    "random_overlap_row",
    "random_overlap_col",
    "diagonal_energy_fraction",
)


def _summary(modules: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the per-module numbers (None values left out) and the total squared Frobenius norm."""
    summary: dict[str, Any] = {"modules": len(modules)}
    for key in _MEANS:
        values = [m[key] for m in modules if m.get(key) is not None]
        if any(key in m for m in modules):
            summary[f"mean_{key}"] = sum(values) / len(values) if values else None
    summary["total_squared_frobenius_norm"] = sum(m["frobenius_norm"] ** 2 for m in modules)
    return summary


def analyze_adapter(
    path: str | os.PathLike, *, fraction: float = DEFAULT_FRACTION, blocks_for_lora: int | None = None
) -> dict[str, Any]:
    """Spectrum, effective rank, norms and (MELoRA) block diversity of every module of a saved adapter.

    Per module: the singular values of the scaled update dW (descending, zeros kept: n*r of them for MELoRA,
    r for LoRA); ``entropy_effective_rank`` = exp(entropy of s / sum(s)) (Roy & Vetterli, 2007);
    ``rank_above_fraction`` = #{s_k > fraction * s_max}; the Frobenius and spectral norms. For MELoRA also the
    blocks' Frobenius norms, their energy shares ``||dW_i||_F^2 / ||dW||_F^2``, ``effective_block_count`` =
    exp(entropy of the shares), ``block_norm_cv`` = std / mean of the block norms, and the mean squared
    cosine of the principal angles between the blocks' row spaces (each in its own input slice R^k) and column
    spaces (R^o), with ``random_overlap_row`` / ``random_overlap_col`` the value random subspaces of the same
    dimensions give in expectation (r/k and r/o for full-rank blocks). For LoRA with ``blocks_for_lora`` = n,
    ``diagonal_energy_fraction``: the share of ||dW||_F^2 in the n diagonal blocks (what MELoRA could hold).

    Args:
        path: a saved MELoRA or LoRA adapter folder, or a run folder holding ``adapter/``.
        fraction: the threshold of ``rank_above_fraction``, relative to the largest singular value.
        blocks_for_lora: n for the diagonal energy fraction of a LoRA adapter (ignored for MELoRA).
    Returns:
        ``{"adapter", "adapter_folder", "method", "r", "n", "alpha", "use_rslora", "fraction", "modules",
        "layers", "summary"}``; each of ``modules`` as described, ``layers`` the summary per layer index
        (modules whose names hold a layer number), ``summary`` the same over all modules.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"melora.analysis: fraction={fraction}; choose a value in [0, 1), e.g. 0.01.")
    if blocks_for_lora is not None and blocks_for_lora < 1:
        raise UserError(f"melora.analysis: blocks_for_lora={blocks_for_lora}; choose n >= 1 (or none).")
    factors = read_adapter_factors(path)
    blocks = blocks_for_lora if factors.method == "lora" else None
    modules = [_module_report(m, factors.method, fraction, blocks) for m in factors.modules]
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for module in modules:
        if module["layer"] is not None:
            by_layer.setdefault(module["layer"], []).append(module)
    return {
        "adapter": str(path),
        "adapter_folder": str(factors.folder),
        "method": factors.method,
        "r": factors.r,
        "n": factors.n if factors.method == "melora" else blocks,
        "alpha": factors.alpha,
        "use_rslora": factors.use_rslora,
        "fraction": fraction,
        "modules": modules,
        "layers": [{"layer": layer, **_summary(group)} for layer, group in sorted(by_layer.items())],
        "summary": _summary(modules),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def analysis_table(result: dict[str, Any]) -> str:
    """A markdown table of ``analyze_adapter``'s result: one row per module, then the mean row."""
    melora = result["method"] == "melora"
    fraction = result["fraction"]
    columns = [
        ("module", "name"),
        ("shape", "shape"),
        ("rank", "nominal_rank"),
        ("erank", "entropy_effective_rank"),
        (f"rank>{fraction:g}", "rank_above_fraction"),
        ("‖dW‖_F", "frobenius_norm"),
        ("σ_max", "spectral_norm"),
    ]
    if melora:
        columns += [
            ("eff. blocks", "effective_block_count"),
            ("norm CV", "block_norm_cv"),
            ("row overlap", "row_space_overlap"),
            ("(random)", "random_overlap_row"),
            ("col overlap", "column_space_overlap"),
            ("(random)", "random_overlap_col"),
        ]
    elif result["n"] is not None:
        columns.append((f"diag. energy (n={result['n']})", "diagonal_energy_fraction"))
    rows = [
        [_cell(m.get(key)) if key != "shape" else "x".join(map(str, m["shape"])) for _, key in columns]
        for m in result["modules"]
    ]
    summary = result["summary"]
    rows.append(["**mean**", ""] + [_cell(summary.get(f"mean_{key}")) for _, key in columns[2:]])
    what = f"n={result['n']}, r={result['r']}" if melora else f"r={result['r']}"
    lines = [
        f"{result['adapter']} ({result['method']}, {what}; erank = entropy effective rank, "
        f"rank>{fraction:g} = singular values above {fraction:g} x the largest)",
        "",
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
