"""The issue's targets, computed from measured times as paired ratios (per repeat, then the median).

Because configurations are measured round-robin, repeat i of every configuration ran at about the same
time; ``median_i(a_i / b_i)`` cancels the machine's slow and fast periods better than ``median(a) /
median(b)``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Any

from melora.lab.bench.config import COMPILE_SUFFIX, MethodSpec, gralora_for

FLAT_IN_N_LIMIT = 1.10


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def paired_overhead(a: list[float], base: list[float]) -> float:
    """median_i((a_i - base_i) / base_i): the adapter's cost relative to the frozen base."""
    return statistics.median((x - y) / y for x, y in zip(a, base))


def _check(case: str, melora: str, name: str, value: float, target: str, met: bool, **extra: Any) -> dict:
    return {
        "case": case,
        "melora": melora,
        "check": name,
        "value": value,
        "target": target,
        "met": met,
        **extra,
    }


def _pair_checks(case: str, rows: dict[str, dict], spec: MethodSpec) -> list[dict[str, Any]]:
    """MELoRA ``spec`` against its baselines measured in the same mode (eager, or compiled)."""
    train = {label: row["times_s"]["train"] for label, row in rows.items()}
    label = spec.label
    out = []
    mode = {"compiled": spec.compiled}
    same_params = MethodSpec("lora", r=spec.r, **mode).label
    same_rank = MethodSpec("lora", r=spec.n * spec.r, **mode).label
    loop = MethodSpec("loop", r=spec.r, n=spec.n, **mode).label
    gralora = replace(gralora_for(spec.r, spec.n), **mode).label
    base_label = MethodSpec("base", **mode).label
    for other, name, limit in (
        (same_params, "train_vs_lora_same_params", 1.05),
        (same_rank, "train_vs_lora_same_rank", 1.0),
    ):
        if other in train:
            value = paired_ratio(train[label], train[other])
            out.append(_check(case, label, name, value, f"<= {limit}", value <= limit, against=other))
    if gralora in train:
        value = paired_ratio(train[label], train[gralora])
        out.append(_check(case, label, "train_vs_gralora", value, "report", True, against=gralora))
    if base_label in train:
        base = train[base_label]
        overhead = paired_overhead(train[label], base)
        if same_params in train:
            lora_overhead = paired_overhead(train[same_params], base)
            out.append(
                _check(
                    case, label, "overhead_vs_base", overhead, f"<= LoRA(r) {lora_overhead:.3f}",
                    overhead <= lora_overhead, lora_overhead=lora_overhead,
                )
            )  # fmt: skip
        if loop in train:
            loop_cost = statistics.median(x - y for x, y in zip(train[loop], base))
            melora_cost = statistics.median(x - y for x, y in zip(train[label], base))
            value = loop_cost / melora_cost if melora_cost > 0 else float("inf")
            target = ">= 1.5" if spec.n == 8 else "report"
            out.append(
                _check(
                    case, label, "loop_adapter_vs_melora_adapter", value, target, spec.n != 8 or value >= 1.5
                )
            )
        merged = paired_ratio(
            rows[label]["times_s"]["forward_merged"], rows[base_label]["times_s"]["forward"]
        )
        out.append(_check(case, label, "merged_forward_vs_base", merged, "<= 1.02", merged <= 1.02))
    memory = {lab: row["memory"]["peak_mb"] for lab, row in rows.items() if "memory" in row}
    if label in memory and same_rank in memory:
        out.append(
            _check(
                case, label, "peak_memory_vs_lora_same_rank", memory[label] - memory[same_rank], "<= 0 MB",
                memory[label] <= memory[same_rank], against=same_rank,
            )
        )  # fmt: skip
    return out


def _flat_checks(case: str, rows: dict[str, dict]) -> list[dict[str, Any]]:
    """Per r (and mode), the slowest over the fastest MELoRA training step across n (needs >= 3 values of
    n), and the largest n over the smallest (n=32 / n=2 in the layer experiment), both paired per repeat."""
    by_r: dict[tuple[int, bool], list[str]] = {}
    for label, row in rows.items():
        if row["method"]["name"] == "melora" and not row["method"].get("impl"):
            by_r.setdefault((row["method"]["r"], row["method"].get("compiled", False)), []).append(label)
    out = []
    for (r, compiled), labels in sorted(by_r.items()):
        if len(labels) < 3:
            continue
        suffix = COMPILE_SUFFIX if compiled else ""
        ns = {label: rows[label]["method"]["n"] for label in labels}
        medians = {label: statistics.median(rows[label]["times_s"]["train"]) for label in labels}
        value = max(medians.values()) / min(medians.values())
        out.append(
            _check(
                case, f"melora r={r} n={{{','.join(str(ns[x]) for x in labels)}}}{suffix}",
                "flat_in_n_max_over_min", value, f"<= {FLAT_IN_N_LIMIT}", value <= FLAT_IN_N_LIMIT,
            )
        )  # fmt: skip
        largest, smallest = max(labels, key=ns.get), min(labels, key=ns.get)
        value = paired_ratio(rows[largest]["times_s"]["train"], rows[smallest]["times_s"]["train"])
        out.append(
            _check(
                case, f"melora r={r} n={ns[largest]} / n={ns[smallest]}{suffix}", "largest_n_over_smallest",
                value, f"<= {FLAT_IN_N_LIMIT}", value <= FLAT_IN_N_LIMIT,
            )
        )  # fmt: skip
    return out


def _compile_checks(case: str, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each compiled ratio against its eager counterpart: compiling must not make MELoRA relatively worse."""
    eager = {
        (t["melora"], t["check"]): t["value"]
        for t in targets
        if t["case"] == case and not t["melora"].endswith(COMPILE_SUFFIX)
    }
    out = []
    for t in targets:
        if t["case"] != case or not t["melora"].endswith(COMPILE_SUFFIX):
            continue
        if t["check"] not in ("train_vs_lora_same_params", "train_vs_lora_same_rank", "train_vs_gralora"):
            continue
        reference = eager.get((t["melora"].removesuffix(COMPILE_SUFFIX), t["check"]))
        if reference is None:
            continue
        out.append(
            _check(
                case, t["melora"], f"compiled_{t['check']}_vs_eager", t["value"],
                f"<= eager {reference:.3f}", t["value"] <= reference, eager=reference,
            )
        )  # fmt: skip
    return out


def evaluate_targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every check for every case and MELoRA configuration (see docs/benchmarks.md for the targets)."""
    checks = []
    for case in cases:
        rows = {row["label"]: row for row in case["rows"]}
        for row in case["rows"]:
            if row["method"]["name"] == "melora":
                checks += _pair_checks(case["case"], rows, MethodSpec(**row["method"]))
        checks += _flat_checks(case["case"], rows)
        checks += _compile_checks(case["case"], checks)
    return checks


def summary_metrics(targets: list[dict[str, Any]]) -> dict[str, float]:
    """Flat ``"case/melora/check" -> value`` for results.json's summary (finite values only)."""
    return {
        f"{t['case']}/{t['melora']}/{t['check']}": float(t["value"])
        for t in targets
        if math.isfinite(t["value"])
    }


# The sizes the targets were set for: the smallest layer of the issue's grid, and the real models'
# end-to-end batches (SmolLM2 4 x 256 = 1024 tokens, MiniLM 16 x 128 = 2048). Below them the fixed costs
# (kernel launches, Python, reshapes) dominate, so a ratio says nothing about the targets.
TARGET_LAYER_D = 768
TARGET_LAYER_TOKENS = 512
TARGET_E2E_TOKENS = 1024
TOY_MODELS = ("tiny-bert", "tiny-llama")


def toy_size(params: dict[str, Any]) -> str | None:
    """Why a case (its ``params``: a LayerShape's or ModelCase's fields) is below the sizes the targets
    were set for, or None when it is not."""
    if "d" in params:  # layer (and kernel) level
        d = min(params["d"], params.get("d_out") or params["d"])
        reasons = [f"d = {d} < {TARGET_LAYER_D}"] if d < TARGET_LAYER_D else []
        if params["tokens"] < TARGET_LAYER_TOKENS:
            reasons.append(f"T = {params['tokens']} < {TARGET_LAYER_TOKENS}")
    else:  # end to end
        tokens = params["batch"] * params["seq_len"]
        reasons = [f"{params['model']} is a tiny test model"] if params["model"].lower() in TOY_MODELS else []
        if params.get("layers"):
            reasons.append(f"cut to {params['layers']} layers")
        if tokens < TARGET_E2E_TOKENS:
            reasons.append(f"{params['batch']} x {params['seq_len']} = {tokens} tokens < {TARGET_E2E_TOKENS}")
    return ", ".join(reasons) or None


def toy_cases(cases: list[dict[str, Any]]) -> dict[str, str]:
    """``case label -> reason`` for every case of a results document below the targets' sizes."""
    reasons = {case["case"]: toy_size(case["params"]) for case in cases if "params" in case}
    return {label: reason for label, reason in reasons.items() if reason}
