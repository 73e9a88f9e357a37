"""Instruction-tuning study at CPU scale: SmolLM2-135M-Instruct on an Alpaca subset.

Compares the untuned base, LoRA r=64 / r=8 and MELoRA r=1 n=8 / r=2 n=4 (LoRA r=64 and MELoRA r=1 n=8
with two seeds), all with the same data, steps and learning rate, on held-out Alpaca loss, MMLU, BBH and
HumanEval (the same subsample for every model). Resumable: a step whose results.json exists is skipped,
so re-running the same command continues where it stopped.

    python scripts/instruct_study.py --data-dir ../shared/data --out results/instruct [--commit]

Phases: 1) train every run (``melora instruct`` in a subprocess, one thread), 2) evaluate the base and
every adapter (``melora.eval.runner.run_eval``, waiting for it to exist), 3) write ``summary.md``,
``study.json`` and ``instruct_study.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    """One training run: a directory name, the method flags and the training seed."""

    name: str
    flags: tuple[str, ...]
    seed: int


RUNS = (
    Run("lora-r64-s42", ("--method", "lora", "--r", "64"), 42),
    Run("melora-r1-n8-s42", ("--method", "melora", "--r", "1", "--n", "8"), 42),
    Run("lora-r8-s42", ("--method", "lora", "--r", "8"), 42),
    Run("melora-r2-n4-s42", ("--method", "melora", "--r", "2", "--n", "4"), 42),
    Run("lora-r64-s43", ("--method", "lora", "--r", "64"), 43),
    Run("melora-r1-n8-s43", ("--method", "melora", "--r", "1", "--n", "8"), 43),
    Run("lora-r64-s44", ("--method", "lora", "--r", "64"), 44),
    Run("melora-r1-n8-s44", ("--method", "melora", "--r", "1", "--n", "8"), 44),
    Run("melora-r1-n32-s42", ("--method", "melora", "--r", "1", "--n", "32"), 42),
)
BASE = "base"
# task -> (limit, max_new_tokens); the same subsample for every model
EVAL_TASKS = {"mmlu": (1, None), "bbh": (1, None), "humaneval": (10, 160)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def commit(paths: list[Path], message: str) -> None:
    """Commit the given result files (explicit paths only); retry while another commit holds the lock."""
    rel = [str(p) for p in paths if (REPO / p).exists()]
    if not rel:
        return
    for _ in range(20):
        if (REPO / ".git" / "index.lock").exists():
            time.sleep(3)
            continue
        added = subprocess.run(["git", "add", "-f", *rel], cwd=REPO, capture_output=True, text=True)
        done = subprocess.run(
            ["git", "commit", "-m", message, "--", *rel], cwd=REPO, capture_output=True, text=True
        )
        if added.returncode == 0 and (done.returncode == 0 or "nothing" in done.stdout):
            log(f"committed {len(rel)} file(s): {message}")
            return
        time.sleep(3)
    log(f"could not commit {rel}")


def train(run: Run, args: argparse.Namespace, first: bool) -> None:
    out = args.out / "runs" / run.name
    if (out / "results.json").is_file():
        log(f"train {run.name}: done already")
        return
    command = [
        sys.executable, "-m", "melora.finetune.instruct", "--config", str(args.preset),
        "--data", str(args.data_dir / "instruct" / "alpaca"), "--output-dir", str(out),
        "--max-samples", str(args.max_samples), "--val-size", str(args.val_size), "--lr", str(args.lr),
        "--seed", str(run.seed), "--threads", "1", "--no-progress", *run.flags,
    ]  # fmt: skip
    if not first:
        command.append("--no-eval-base")  # the base held-out loss is the same for every run
    log(f"train {run.name}: {' '.join(command[1:])}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as handle:
        subprocess.run(
            command, cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, check=True
        )
    log(f"train {run.name}: {json.loads((out / 'results.json').read_text())['summary']}")
    if args.commit:
        commit([out / "results.json"], f"instruct study: train {run.name}")


def wait_for_eval(args: argparse.Namespace) -> None:
    """Poll until ``melora.eval.runner.run_eval`` exists and supports every task of the study."""
    deadline = time.time() + args.wait_eval_s
    while True:
        importlib.invalidate_caches()
        code = "import melora.eval.runner as r; import sys; sys.exit(0 if set(%r) <= set(r.TASKS) else 3)"
        probe = subprocess.run(
            [sys.executable, "-c", code % sorted(EVAL_TASKS)], cwd=REPO, capture_output=True
        )
        if probe.returncode == 0:
            return
        if time.time() > deadline:
            raise SystemExit("melora.eval.runner.run_eval with all study tasks never appeared; rerun later.")
        log("waiting for melora.eval.runner to support " + ", ".join(EVAL_TASKS))
        time.sleep(60)


def evaluate(name: str, adapter: Path | None, task: str, args: argparse.Namespace) -> None:
    out = args.out / "evals" / name / task
    if (out / "results.json").is_file():
        return
    limit, max_new_tokens = EVAL_TASKS[task]
    spec = {
        "model": args.model, "adapter": str(adapter) if adapter else None, "tasks": [task],
        "data_dir": str(args.data_dir / "eval"), "limit": limit, "batch_size": args.eval_batch_size,
        "output_dir": str(out), "allow_code_execution": task == "humaneval", "max_new_tokens": max_new_tokens,
        "label": name,
    }  # fmt: skip
    log(f"eval {name} {task} (limit {limit})")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.log", "w") as handle:
        subprocess.run(
            [sys.executable, __file__, "--eval-one", json.dumps(spec)],
            cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    log(f"eval {name} {task}: {json.loads((out / 'results.json').read_text())['summary']}")
    if args.commit:
        commit([out / "results.json", out / "results.md"], f"instruct study: eval {name} {task}")


def eval_one(spec_json: str) -> None:
    """Child process: one run_eval call on one thread."""
    import torch

    torch.set_num_threads(1)
    from melora.eval.runner import run_eval

    spec = json.loads(spec_json)
    label = spec.pop("label")
    run_eval(**spec, label=label)


# --- aggregation ----------------------------------------------------------------------------------


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(args: argparse.Namespace) -> list[dict]:
    """One row per model: label, seed, params, held-out loss, train time and every eval metric."""
    rows = []
    train_results = {run.name: _read(args.out / "runs" / run.name / "results.json") for run in RUNS}
    base_loss = next(
        (r["summary"]["instruct/heldout_loss_base"] for r in train_results.values()
         if r and "instruct/heldout_loss_base" in r["summary"]), None,
    )  # fmt: skip
    names = [BASE, *(run.name for run in RUNS)]
    for name in names:
        trained = train_results.get(name)
        row = {"name": name, "label": "base (untuned)", "seed": None, "trainable_params": 0,
               "equivalent_rank": None, "heldout_loss": base_loss, "train_time_s": None}  # fmt: skip
        if trained:
            row.update(label=trained["label"], seed=trained["seed"], trainable_params=trained["trainable_params"],
                       equivalent_rank=trained["equivalent_rank"], train_time_s=trained["wall_time_s"],
                       heldout_loss=trained["summary"].get("instruct/heldout_loss"))  # fmt: skip
        elif name != BASE:
            continue
        for task in EVAL_TASKS:
            evaluated = _read(args.out / "evals" / name / task / "results.json")
            if evaluated:
                row.update(evaluated["summary"])
        rows.append(row)
    return rows


HEADLINE = ("mmlu/acc", "bbh/em", "humaneval/pass@1")


def metric_columns(rows: list[dict]) -> list[str]:
    """The headline eval metrics present in any row, in a fixed order."""
    return [key for key in HEADLINE if any(key in row for row in rows)]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mean_sd(entry: dict, key: str, digits: int) -> str:
    """``mean`` for one value, ``mean ± sample sd`` for several."""
    values = entry[key + "_values"]
    if len(values) < 2:
        return _fmt(entry[key], digits)
    return f"{entry[key]:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grouped(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean over seeds per label (with the per-seed values listed)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    out = []
    for label, members in groups.items():
        entry = {"label": label, "seeds": [m["seed"] for m in members], "n": len(members),
                 "trainable_params": members[0]["trainable_params"],
                 "equivalent_rank": members[0]["equivalent_rank"]}  # fmt: skip
        for key in ["heldout_loss", *metrics]:
            values = [m[key] for m in members if m.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[key + "_values"] = values
        out.append(entry)
    return out


def render_tables(rows: list[dict], args: argparse.Namespace) -> str:
    metrics = metric_columns(rows)
    head = ["run", "seed", "trainable params", "eq. rank", "held-out loss", *metrics, "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in rows:
        cells = [row["label"], _fmt(row["seed"]), _fmt(row["trainable_params"]), _fmt(row["equivalent_rank"]),
                 _fmt(row["heldout_loss"], 4), *(_fmt(row.get(m)) for m in metrics), _fmt(row["train_time_s"], 0)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds:", ""]
    head = ["run", "seeds", "trainable params", "held-out loss", *metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for entry in grouped(rows, metrics):
        cells = [entry["label"], ",".join(_fmt(s) for s in entry["seeds"]), _fmt(entry["trainable_params"]),
                 _mean_sd(entry, "heldout_loss", 4), *(_mean_sd(entry, m, 3) for m in metrics)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Each metric against trainable parameters (log x): mean over seeds, bars = sample sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["heldout_loss", *metric_columns(rows)]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), squeeze=False)
    colours = {"lora": "tab:blue", "melora": "tab:red"}
    for ax, metric in zip(axes.flat, metrics):
        for entry in grouped(rows, metrics):
            values = entry[metric + "_values"]
            if not values:
                continue
            if entry["label"].startswith("base"):
                ax.axhline(entry[metric], color="grey", linestyle="--")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            method, config = entry["label"].split(" ", 1)
            ax.errorbar(entry["trainable_params"], entry[metric], yerr=sd, fmt="o", ms=5, capsize=3,
                        color=colours.get(method, "k"))  # fmt: skip
            note = f"{config} ({len(values)} seeds)" if len(values) > 1 else config
            ax.annotate(note, (entry["trainable_params"], entry[metric]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(metric.replace("heldout_loss", "held-out Alpaca loss (lower is better)"), fontsize=9)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colours.items()]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="base (untuned)"))
    axes[0][0].legend(handles=handles, fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, 128 Alpaca examples x 1 epoch: LoRA vs MELoRA", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_table(rows: list[dict], a: str = "melora r=1 n=8", b: str = "lora r=64") -> str:
    """Per-seed differences ``a - b`` for the paper's pairing (same seed = same data order)."""
    by_seed = {(row["label"], row["seed"]): row for row in rows}
    seeds = sorted(seed for label, seed in by_seed if label == a and (b, seed) in by_seed)
    if not seeds:
        return ""
    metrics = ["heldout_loss", *metric_columns(rows)]
    lines = [f"Paired by seed, {a} minus {b}:", "", "| seed | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]  # fmt: skip
    for seed in seeds:
        cells = []
        for metric in metrics:
            left, right = by_seed[(a, seed)].get(metric), by_seed[(b, seed)].get(metric)
            cells.append(_fmt(None if left is None or right is None else left - right, 4))
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(args: argparse.Namespace) -> list[Path]:
    rows = collect(args)
    args.out.mkdir(parents=True, exist_ok=True)
    table = render_tables(rows, args) + "\n" + paired_table(rows)
    (args.out / "summary.md").write_text(table)
    json_rows = {"rows": rows, "groups": grouped(rows, metric_columns(rows)), "settings": settings(args)}
    (args.out / "study.json").write_text(json.dumps(json_rows, indent=2) + "\n")
    plot(rows, args.out / "instruct_study.png")
    print(table)
    return [args.out / "summary.md", args.out / "study.json", args.out / "instruct_study.png"]


def settings(args: argparse.Namespace) -> dict:
    return {"preset": str(args.preset), "max_samples": args.max_samples,
            "val_size": args.val_size, "lr": args.lr, "eval_tasks": EVAL_TASKS,
            "eval_batch_size": args.eval_batch_size}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "instruct")
    parser.add_argument("--preset", type=Path, default=REPO / "configs" / "instruct" / "smollm2_cpu.yaml")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-samples", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--wait-eval-s", type=float, default=3600)
    parser.add_argument("--phase", choices=["all", "train", "eval", "summary"], default="all")
    parser.add_argument("--commit", action="store_true", help="git-commit each result file as it arrives")
    parser.add_argument("--eval-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.eval_one:
        eval_one(args.eval_one)
        return 0
    # paths relative to the repository (children run there), so no machine path lands in results.json
    args.out, args.data_dir, args.preset = (
        Path(os.path.relpath(p.resolve(), REPO)) for p in (args.out, args.data_dir, args.preset)
    )
    os.chdir(REPO)
    log(f"study settings: {settings(args)}")
    if args.phase in ("all", "train"):
        for index, run in enumerate(RUNS):
            train(run, args, first=index == 0)
    if args.phase in ("all", "eval"):
        wait_for_eval(args)
        for task in EVAL_TASKS:
            evaluate(BASE, None, task, args)
            for run in RUNS:
                adapter = args.out / "runs" / run.name / "adapter"
                if adapter.is_dir():
                    evaluate(run.name, adapter, task, args)
    paths = summarise(args)
    if args.commit:
        commit(paths, "instruct study: summary table and plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
