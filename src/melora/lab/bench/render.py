"""Render benchmark results (the JSON of :func:`melora.lab.bench.run_experiment`) as markdown and a plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from melora.lab.bench.analysis import TARGET_E2E_TOKENS, TARGET_LAYER_D, TARGET_LAYER_TOKENS, toy_cases

TOY_MISS = "no (toy size: not meaningful)"


def _ms(stat: dict[str, float]) -> str:
    return f"{1e3 * stat['median']:.1f} [{1e3 * stat['min']:.1f}, {1e3 * stat['max']:.1f}]"


def _tokens(case: dict[str, Any]) -> int:
    """Tokens per step: the layer's rows, or batch x sequence length."""
    params = case["params"]
    return params["tokens"] if "tokens" in params else params["batch"] * params["seq_len"]


def _case_table(case: dict[str, Any]) -> list[str]:
    bases = {  # eager rows against the eager base, compiled rows against the compiled base
        row["method"].get("compiled", False): row for row in case["rows"] if row["method"]["name"] == "base"
    }
    tokens = _tokens(case)
    lines = [
        f"#### {case['case']}",
        "",
        "| configuration | trainable params | eq. rank | train step ms | forward ms | merged forward ms "
        "| train tokens/s | train / base | peak MB | step MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in case["rows"]:
        s = row["stats_s"]
        base = bases.get(row["method"].get("compiled", False))
        throughput = f"{tokens / s['train']['median']:,.0f}"
        ratio = (
            f"{statistics.median(a / b for a, b in zip(row['times_s']['train'], base['times_s']['train'])):.3f}"
            if base
            else "-"
        )
        memory = row.get("memory")
        peak = f"{memory['peak_mb']:.0f}" if memory else "-"
        step = f"{memory['step_mb']:.0f}" if memory else "-"
        lines.append(
            f"| {row['label']} | {row['trainable_params']:,} | {row['equivalent_rank'] or '-'} | {_ms(s['train'])} "
            f"| {_ms(s['forward'])} | {_ms(s['forward_merged'])} | {throughput} | {ratio} | {peak} | {step} |"
        )
    lines += [f"- skipped {item['label']}: {item['reason']}" for item in case.get("skipped", [])]
    return lines + [""]


def _kernel_ratio_table(case: dict[str, Any]) -> list[str]:
    """Kernel level: each variant's training path (forward + backward) over LoRA(r)'s, paired per repeat."""
    rows = {row["label"]: row for row in case["rows"]}
    pairs = list(
        dict.fromkeys(
            (row["method"]["r"], row["method"]["n"]) for row in case["rows"] if row["method"]["impl"]
        )
    )
    variants = list(dict.fromkeys(row["method"]["impl"] for row in case["rows"] if row["method"]["impl"]))
    lines = [
        f"{case['case']}: adapter forward + backward time over LoRA(r)'s (LoRA(r) in ms)",
        "",
        "| r, n | " + " | ".join(variants) + " | LoRA(n*r) | LoRA(r) ms |",
        "|---|" + "---:|" * (len(variants) + 2),
    ]
    for r, n in pairs:
        reference = rows[f"lora r={r}"]["times_s"]["train"]
        labels = [f"melora[{v}] r={r} n={n}" for v in variants] + [f"lora r={n * r}"]
        ratios = [
            statistics.median(a / b for a, b in zip(rows[x]["times_s"]["train"], reference)) for x in labels
        ]
        lines.append(
            f"| {r}, {n} | "
            + " | ".join(f"{v:.2f}" for v in ratios)
            + f" | {1e3 * statistics.median(reference):.1f} |"
        )
    return lines + [""]


def targets_table(targets: list[dict[str, Any]], toy: dict[str, str] | None = None) -> list[str]:
    """The targets as a markdown table; a miss on a case in ``toy`` (case label -> reason, see
    :func:`melora.lab.bench.analysis.toy_cases`) reads "no (toy size: not meaningful)", not a bold "no"."""
    toy = toy or {}
    lines = ["| case | MELoRA | check | value | target | met |", "|---|---|---|---:|---|---|"]
    for t in targets:
        met = "yes" if t["met"] else TOY_MISS if t["case"] in toy else "**no**"
        if t["target"] == "report":
            met = "-"
        lines.append(
            f"| {t['case']} | {t['melora']} | {t['check']} | {t['value']:.3f} | {t['target']} | {met} |"
        )
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """Header (versions, hardware, settings), one table per case, then the targets table."""
    hw, cfg, ver = results["hardware"], results["config"], results["versions"]
    lines = [
        f"### Experiment `{results['label']}` ({cfg['level']} level)",
        "",
        f"{hw['cpu']}, {hw['cpu_count']} cores, torch threads {hw['torch_threads']}, device {hw['device']}"
        + (f" ({hw['gpu']})" if hw.get("gpu") else "")
        + f"; torch {ver['torch']}, transformers {ver['transformers']}, peft {ver['peft']}; dtype {cfg['dtype']}; "
        f"{cfg['repeats']} repeats after {cfg['warmup']} warm-up, interleaved; wall time "
        f"{results['wall_time_s'] / 60:.1f} min. Times: median [min, max] ms; ratios: median of per-repeat ratios.",
        "",
    ]
    for case in results["cases"]:
        lines += _case_table(case)
    if cfg["level"] == "kernel":
        for case in results["cases"]:
            lines += _kernel_ratio_table(case)
        return "\n".join(lines)
    toy = toy_cases(results["cases"])
    lines += ["Targets:", ""]
    if toy:
        lines += [
            f"**Toy size, the targets are not meaningful here**: they were set for layers of d >= {TARGET_LAYER_D} "
            f"at T >= {TARGET_LAYER_TOKENS} tokens and for the real models at >= {TARGET_E2E_TOKENS} tokens a "
            "step, where the adapter's fixed costs no longer dominate. Below that a miss says nothing about "
            "MELoRA (" + "; ".join(f"{case}: {reason}" for case, reason in toy.items()) + ").",
            "",
        ]
    lines += [*targets_table(results["targets"], toy), ""]
    return "\n".join(lines)


def _layer_axes(results: dict[str, Any], axes) -> None:
    """Train step relative to the base (left) and step memory (right) against n, per layer shape."""
    colors = {"melora": "tab:blue", "loop": "tab:red", "lora": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for index, case in enumerate(results["cases"]):
        rows = {row["label"]: row for row in case["rows"]}
        base = rows.get("base")
        pairs = sorted(
            (row["method"]["n"], row["method"]["r"])
            for row in case["rows"]
            if row["method"]["name"] == "melora"
        )
        r = statistics.mode(r for _, r in pairs) if pairs else 1
        ns = [n for n, rr in pairs if rr == r]
        for method, label_of in (
            ("melora", lambda n, r=r: f"melora r={r} n={n}"),
            ("loop", lambda n, r=r: f"loop r={r} n={n}"),
            ("lora", lambda n, r=r: f"lora r={n * r}"),
        ):
            points = [(n, rows[label_of(n)]) for n in ns if label_of(n) in rows]
            if not points:
                continue
            style = dict(color=colors[method], linestyle=styles[index % len(styles)], marker="o")
            name = f"{method if method != 'lora' else 'LoRA(n*r)'} {case['case'].removeprefix('layer ')}"
            if base:
                times = [
                    statistics.median(
                        a / b for a, b in zip(row["times_s"]["train"], base["times_s"]["train"])
                    )
                    for _, row in points
                ]
                axes[0].plot([n for n, _ in points], times, label=name, **style)
            memory = [(n, row["memory"]["step_mb"]) for n, row in points if "memory" in row]
            if memory:
                axes[1].plot(*zip(*memory), label=name, **style)
    axes[0].set(xscale="log", xlabel="n (r fixed)", ylabel="train step / frozen base", title="Step time")
    axes[1].set(xscale="log", xlabel="n (r fixed)", ylabel="MB added by the training step", title="Memory")


def _e2e_axes(results: dict[str, Any], axes) -> None:
    """Bars per configuration: train step relative to the base (left), peak memory above the base's (right)."""
    cases = results["cases"]
    width = 0.8 / max(len(cases), 1)
    labels = list(dict.fromkeys(row["label"] for case in cases for row in case["rows"]))
    for index, case in enumerate(cases):
        rows = {row["label"]: row for row in case["rows"]}
        base = rows.get("base")
        xs = [i + index * width for i, label in enumerate(labels) if label in rows]
        present = [label for label in labels if label in rows]
        if base:
            ratios = [
                statistics.median(
                    a / b for a, b in zip(rows[x]["times_s"]["train"], base["times_s"]["train"])
                )
                for x in present
            ]
            axes[0].bar(xs, ratios, width, label=case["case"])
        if base and all("memory" in rows[x] for x in present):
            extra = [rows[x]["memory"]["peak_mb"] - base["memory"]["peak_mb"] for x in present]
            axes[1].bar(xs, extra, width, label=case["case"])
    for ax, ylabel, title in (
        (axes[0], "train step / frozen base", "Step time"),
        (axes[1], "peak MB above the frozen base's", "Memory"),
    ):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=45, ha="right")
        ax.set(ylabel=ylabel, title=title)


def _kernel_axes(results: dict[str, Any], axes) -> None:
    """Per case (first and last), training-path time of each variant relative to LoRA(r), per (r, n)."""
    for ax, case in zip(axes, [results["cases"][0], results["cases"][-1]]):
        rows = {row["label"]: row for row in case["rows"]}
        pairs = list(
            dict.fromkeys(
                (row["method"]["r"], row["method"]["n"]) for row in case["rows"] if row["method"]["impl"]
            )
        )
        variants = list(dict.fromkeys(row["method"]["impl"] for row in case["rows"] if row["method"]["impl"]))
        width = 0.8 / (len(variants) + 1)
        for index, name in enumerate([*variants, "LoRA(n*r)"]):
            ratios = []
            for r, n in pairs:
                label = f"lora r={n * r}" if name == "LoRA(n*r)" else f"melora[{name}] r={r} n={n}"
                ratios.append(
                    statistics.median(
                        a / b
                        for a, b in zip(
                            rows[label]["times_s"]["train"], rows[f"lora r={r}"]["times_s"]["train"]
                        )
                    )
                )
            ax.bar([i + index * width for i in range(len(pairs))], ratios, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pairs))], [f"r={r} n={n}" for r, n in pairs])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set(ylabel="adapter fwd+bwd / LoRA(r)", title=case["case"])


def render_plot(results: dict[str, Any], path: str | Path) -> Path:
    """Two panels (time, memory) saved as PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    if results["config"]["level"] == "layer":
        _layer_axes(results, axes)
    elif results["config"]["level"] == "kernel":
        _kernel_axes(results, axes)
    else:
        _e2e_axes(results, axes)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"melora bench: {results['label']} ({results['hardware']['device']})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
