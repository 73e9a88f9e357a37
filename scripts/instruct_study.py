"""Instruction-tuning study at CPU scale: SmolLM2-135M-Instruct on an Alpaca subset.

Compares the untuned base, LoRA r=64 / r=8 and MELoRA r=1 n=8 / r=2 n=4 / r=1 n=32 with the same data
and steps on held-out Alpaca loss, MMLU, BBH and HumanEval (the same subsample for every model), twice:
at one shared learning rate (``--lr``, 1e-3; the paper's pair with seeds 42-44) and after a per-method
learning-rate search (seed 42 over SEARCH_LRS, plus EDGE_LR when the best lr is the top of the grid,
selected by held-out loss; the paper's pair then runs seeds 42-44 at its selected lr). The held-out
split serves both for selecting the lr and for reporting, identically for every method. Resumable: a
step whose results.json exists is skipped, so re-running the same command continues where it stopped.

    python scripts/instruct_study.py --data-dir ../shared/data --out results/instruct [--commit]

Phases: 1) ``train``: the shared-lr runs; 2) ``search``: the lr search of the paper's pair, its tuned
seeds, then the lr search of the other methods (``tuned`` runs only the tuned seeds); each run is
``melora instruct`` in a subprocess on one thread; 3) ``eval``: the base and every adapter
(``melora.eval.runner.run_eval``); 4) ``summary``: ``summary.md``, ``study.json`` and the plots
``instruct_study.png``, ``instruct_tuned.png`` and ``instruct_lr_search.png`` under ``--out``.
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
    """One training run: a directory name, the method flags, the seed and the lr (None: the study's --lr)."""

    name: str
    flags: tuple[str, ...]
    seed: int
    lr: float | None = None


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
# learning-rate search: each method at seed 42 over SEARCH_LRS (the shared-lr runs above are its 1e-3
# points); a method whose best lr is the grid's top edge gets EDGE_LR too. MAIN is the paper's pair,
# searched first and then trained at its selected lr for TUNED_SEEDS.
METHODS = {
    "lora-r64": ("--method", "lora", "--r", "64"),
    "melora-r1-n8": ("--method", "melora", "--r", "1", "--n", "8"),
    "lora-r8": ("--method", "lora", "--r", "8"),
    "melora-r2-n4": ("--method", "melora", "--r", "2", "--n", "4"),
}
MAIN = ("lora-r64", "melora-r1-n8")
SEARCH_LRS = (3e-4, 1e-3, 3e-3)
EDGE_LR = 1e-2
SEARCH_SEED = 42
TUNED_SEEDS = (42, 43, 44)
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
        "--max-samples", str(args.max_samples), "--val-size", str(args.val_size), "--lr", str(run.lr or args.lr),
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


def method_run(method: str, seed: int, lr: float, args: argparse.Namespace) -> Run:
    """The run of ``method`` at ``seed`` and ``lr``; at the study's shared lr it is the existing run."""
    if lr == args.lr:
        return Run(f"{method}-s{seed}", METHODS[method], seed)
    return Run(f"{method}-s{seed}-lr{lr:g}", METHODS[method], seed, lr)


def heldout_loss(run: Run, args: argparse.Namespace) -> float | None:
    result = _read(args.out / "runs" / run.name / "results.json")
    return result["summary"].get("instruct/heldout_loss") if result else None


def search_grid(method: str, args: argparse.Namespace) -> dict[float, float | None]:
    """lr -> seed-42 held-out loss (None: not run yet), with EDGE_LR once it exists or is due.

    EDGE_LR is due when the best lr is the grid's top one and ``args.extend_edge`` is set.
    """
    grid = {lr: heldout_loss(method_run(method, SEARCH_SEED, lr, args), args) for lr in SEARCH_LRS}
    edge = heldout_loss(method_run(method, SEARCH_SEED, EDGE_LR, args), args)
    at_edge = None not in grid.values() and min(grid, key=grid.get) == max(SEARCH_LRS)
    if edge is not None or (at_edge and args.extend_edge):
        grid[EDGE_LR] = edge
    return grid


def selected_lr(method: str, args: argparse.Namespace) -> float | None:
    """The lr with the lowest seed-42 held-out loss, once the whole (extended) grid has run."""
    grid = search_grid(method, args)
    return None if None in grid.values() else min(grid, key=grid.get)


def search(methods: tuple[str, ...], args: argparse.Namespace) -> None:
    """Train each method over the lr grid at seed 42, then the edge point if the best lr is the top one."""
    for method in methods:
        for lr in SEARCH_LRS:
            train(method_run(method, SEARCH_SEED, lr, args), args, first=False)
        if EDGE_LR in search_grid(method, args):
            train(method_run(method, SEARCH_SEED, EDGE_LR, args), args, first=False)
        log(f"lr search {method}: {search_grid(method, args)} -> {selected_lr(method, args)}")


def tuned_runs(args: argparse.Namespace) -> list[Run]:
    """The paper's pair at its selected lrs, seed by seed (empty until both lrs are selected)."""
    selected = {method: selected_lr(method, args) for method in MAIN}
    if None in selected.values():
        return []
    return [method_run(method, seed, selected[method], args) for seed in TUNED_SEEDS for method in MAIN]


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


def collect(args: argparse.Namespace, runs: tuple[Run, ...] = RUNS, lr_in_label: bool = False) -> list[dict]:
    """One row per model (the base, then ``runs``): label, seed, params, held-out loss, train time, evals.

    ``lr_in_label`` (the tuned comparison) puts the run's lr in its label, e.g. ``lora r=64 lr=0.003``.
    """
    rows = []
    train_results = {run.name: _read(args.out / "runs" / run.name / "results.json") for run in RUNS}
    train_results.update({run.name: _read(args.out / "runs" / run.name / "results.json") for run in runs})
    base_loss = next(
        (r["summary"]["instruct/heldout_loss_base"] for r in train_results.values()
         if r and "instruct/heldout_loss_base" in r["summary"]), None,
    )  # fmt: skip
    names = [BASE, *(run.name for run in runs)]
    for name in names:
        trained = train_results.get(name)
        row = {"name": name, "label": "base (untuned)", "seed": None, "trainable_params": 0,
               "equivalent_rank": None, "heldout_loss": base_loss, "train_time_s": None}  # fmt: skip
        if trained:
            label = trained["label"]
            if lr_in_label:
                label += f" lr={trained['config']['lr']:g}"
            row.update(label=label, seed=trained["seed"], trainable_params=trained["trainable_params"],
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


def plot(rows: list[dict], path: Path, title: str) -> None:
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
    fig.suptitle(
        f"SmolLM2-135M-Instruct, 128 Alpaca examples x 1 epoch: LoRA vs MELoRA, {title}", fontsize=10
    )
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
    if len(seeds) > 1:
        cells = []
        for metric in metrics:
            pairs = [(by_seed[(a, seed)].get(metric), by_seed[(b, seed)].get(metric)) for seed in seeds]
            diffs = [left - right for left, right in pairs if left is not None and right is not None]
            cells.append(
                f"{statistics.fmean(diffs):.4f} ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "-"
            )
        lines.append("| mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def search_table(args: argparse.Namespace) -> str:
    """Method x lr -> seed-42 held-out loss, with each method's selected lr."""
    lrs = [*SEARCH_LRS, EDGE_LR]
    head = ["method", "trainable params", *(f"lr {lr:g}" for lr in lrs), "selected lr"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method in METHODS:
        grid = search_grid(method, args)
        result = _read(
            args.out / "runs" / method_run(method, SEARCH_SEED, args.lr, args).name / "results.json"
        )
        params = result["trainable_params"] if result else None
        best = selected_lr(method, args)
        cells = [method, _fmt(params), *(_fmt(grid.get(lr), 4) if lr in grid else "" for lr in lrs)]
        lines.append("| " + " | ".join([*cells, "-" if best is None else f"{best:g}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_search(args: argparse.Namespace, path: Path) -> None:
    """Seed-42 held-out loss against lr (log x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in METHODS:
        points = sorted((lr, loss) for lr, loss in search_grid(method, args).items() if loss is not None)
        if points:
            style = "-" if method.startswith("lora") else "--"
            ax.plot(*zip(*points), style, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out Alpaca loss (seed 42)")
    ax.legend(fontsize=8)
    ax.set_title("lr search: SmolLM2-135M, 128 examples, 16 steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(args: argparse.Namespace) -> list[Path]:
    rows = collect(args)
    tuned = collect(args, tuple(tuned_runs(args)), lr_in_label=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pair = [f"{row['label']}" for row in tuned if row["seed"] == SEARCH_SEED]
    sections = ["## Learning-rate search (seed 42, held-out loss)\n", search_table(args)]
    if len(pair) == 2:
        sections += ["## Tuned comparison (each method at its selected lr)\n", render_tables(tuned, args)]
        sections += ["", paired_table(tuned, a=pair[1], b=pair[0])]
    sections += ["## Shared lr 1e-3 (untuned)\n", render_tables(rows, args), "", paired_table(rows)]
    table = "\n".join(sections)
    (args.out / "summary.md").write_text(table)
    json_rows = {"rows": rows, "groups": grouped(rows, metric_columns(rows)),
                 "lr_search": {m: {f"{lr:g}": loss for lr, loss in search_grid(m, args).items()} for m in METHODS},
                 "selected_lr": {m: selected_lr(m, args) for m in METHODS},
                 "tuned_rows": tuned, "tuned_groups": grouped(tuned, metric_columns(tuned)),
                 "settings": settings(args)}  # fmt: skip
    (args.out / "study.json").write_text(json.dumps(json_rows, indent=2) + "\n")
    plot(rows, args.out / "instruct_study.png", "shared lr 1e-3")
    paths = [args.out / "summary.md", args.out / "study.json", args.out / "instruct_study.png"]
    if len(pair) == 2:
        plot(tuned, args.out / "instruct_tuned.png", "each at its selected lr")
        paths.append(args.out / "instruct_tuned.png")
    plot_search(args, args.out / "instruct_lr_search.png")
    print(table)
    return [*paths, args.out / "instruct_lr_search.png"]


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
    parser.add_argument(
        "--phase", choices=["all", "search", "tuned", "train", "eval", "summary"], default="all"
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=list(EVAL_TASKS), default=list(EVAL_TASKS), help="eval tasks, in order"
    )
    parser.add_argument(
        "--extend-edge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"train {EDGE_LR:g} for a method whose best lr is the grid's top edge",
    )
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
    if args.phase in ("all", "search"):
        search(MAIN, args)
    if args.phase in ("all", "search", "tuned"):
        for run in tuned_runs(args):
            train(run, args, first=False)
    if args.phase in ("all", "search"):
        search(tuple(m for m in METHODS if m not in MAIN), args)
    if args.phase in ("all", "eval"):
        wait_for_eval(args)
        for task in args.tasks:
            evaluate(BASE, None, task, args)
            for run in dict.fromkeys([*RUNS, *tuned_runs(args)]):
                adapter = args.out / "runs" / run.name / "adapter"
                if adapter.is_dir():
                    evaluate(run.name, adapter, task, args)
    paths = summarise(args)
    if args.commit:
        commit(paths, "instruct study: summary table and plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
