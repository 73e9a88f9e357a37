"""Where MELoRA's layer-level training step grows with n at fixed r: torch.profiler, one table per run.

    python benchmarks/profile_n.py                       # d=768, T=2048, r=1, n = 2, 8, 32, one thread
    python benchmarks/profile_n.py --d 2048 --tokens 512 --n 2 32 --out benchmarks/results/profile_n.md

For each n the layer benchmark's training step (zero_grad + forward + backward + AdamW on one adapted
Linear d -> d, input requiring grad; `melora.lab.bench.configurations.layer_workload`) runs `--steps` times
under the profiler after a warm-up, round-robin over the configurations `--repeats` times; the table
gives each aten op's self CPU time per step in ms, per n, with LoRA(1) and LoRA(n*r) for reference, then
the step totals. Ops are the sum over all their calls.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def profile_step(workload, steps: int) -> dict[str, float]:
    """aten op -> self CPU ms per training step."""
    for _ in range(3):
        workload.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            workload.train_step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            totals[event.key] += event.self_cpu_time_total / 1e3 / steps
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--r", type=int, default=1)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per repeat")
    parser.add_argument("--repeats", type=int, default=4, help="round-robin repeats over the configurations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12, help="ops shown (largest at the largest n)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()

    import melora  # noqa: F401  (registers MELORA with PEFT)
    from melora.lab.bench.config import Experiment, LayerShape, MethodSpec
    from melora.lab.bench.configurations import layer_workload

    torch.set_num_threads(args.threads)
    shape = LayerShape(args.d, args.tokens)
    experiment = Experiment(
        name="profile", level="layer", shapes=[shape], melora=[(args.r, n) for n in args.n]
    )
    specs = [MethodSpec("melora", r=args.r, n=n) for n in args.n]
    specs += [MethodSpec("lora", r=args.r), MethodSpec("lora", r=args.r * max(args.n))]
    workloads = {spec.label: layer_workload(experiment, shape, spec, torch.device("cpu")) for spec in specs}
    columns: dict[str, dict[str, float]] = {label: defaultdict(float) for label in workloads}
    labels = list(workloads)
    for repeat in range(args.repeats):  # round-robin, rotated: a slow period hits every configuration
        for label in labels[repeat % len(labels) :] + labels[: repeat % len(labels)]:
            for op, ms in profile_step(workloads[label], args.steps).items():
                columns[label][op] += ms / args.repeats
    largest = columns[specs[len(args.n) - 1].label]
    ops = sorted(largest, key=largest.get, reverse=True)[: args.top]
    lines = [
        f"Self CPU ms per training step, {shape.label}, r={args.r}, {args.threads} thread(s), mean of "
        f"{args.repeats} interleaved repeats x {args.steps} steps",
        "",
        "| op | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{col.get(op, 0.0):.2f}" for col in columns.values()) + " |")
    lines.append(
        "| **all aten ops** | " + " | ".join(f"**{sum(c.values()):.2f}**" for c in columns.values()) + " |"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        from melora.atomic import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
