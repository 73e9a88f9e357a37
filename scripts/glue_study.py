"""The GLUE study of docs/results_glue.md: MiniLM, MELoRA vs LoRA vs full fine-tuning, resumable.

    python scripts/glue_study.py --data-dir ../shared/data/glue --out results/glue   # run / resume
    python scripts/glue_study.py --plan                                              # list the runs
    python scripts/glue_study.py --report-only   # tables + plot from the runs finished so far

Stages, in order: (1) a learning-rate search on STS-B (a regression task, so every run gives a
graded score), the same 3-point grid (x3 apart) around each method's centre, seed 0; (2) LoRA r=8
and MELoRA r=1 n=8 on every task, seeds 0-2, each at its method's best STS-B learning rate, plus
full fine-tuning (seed 0); (3) the ablation over n at r=1 on STS-B and MELoRA at other (r, n);
(4) LoRA and MELoRA on STS-B with 3x the training data, seeds 0-2. A run whose results.json
exists is skipped, so rerunning resumes the study.
Every method gets the same budget per task (train subset, epochs, max length, batch size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from melora.finetune.glue import GlueRunConfig, run_glue
from melora.report import report

# Per-task budget, the same for every method (cut from the paper's recipe to fit one CPU thread).
BUDGET = {
    "cola": {"max_train_samples": 2000, "epochs": 2, "max_length": 64},
    "stsb": {"max_train_samples": 1000, "epochs": 2, "max_length": 128, "max_eval_samples": 600},
    "mrpc": {"max_train_samples": 600, "epochs": 2, "max_length": 128},
    "rte": {"max_train_samples": 500, "epochs": 2, "max_length": 128},
}
# The pooler (dense + tanh on [CLS]) trains with the classifier: together they are BERT's counterpart of
# RoBERTa's classification head (dense + tanh + out_proj), which the paper trains in full.
# Stage 4: does the LoRA / MELoRA gap on STS-B change with 3x the training data (same 2 epochs)?
LONG_FOLDER, LONG_TASK = "stsb-3x", "stsb"
LONG_BUDGET = {**BUDGET["stsb"], "max_train_samples": 3000}
COMMON = {
    "batch_size": 16,
    "eval_batch_size": 64,
    "group_by_length": True,
    "save_strategy": "no",
    "modules_to_save": ["pooler"],
}
TASKS = list(BUDGET)
SEEDS = (0, 1, 2)
METHODS = {
    "lora r=8": {"method": "lora", "r": 8},
    "melora r=1 n=8": {"method": "melora", "r": 1, "n": 8},
    "full": {"method": "full"},
    "melora r=8 n=8": {"method": "melora", "r": 8, "n": 8},
    "melora r=2 n=4": {"method": "melora", "r": 2, "n": 4},
}
# Centres: 1.5e-3 for the adapters (3x the paper's 5e-4: our runs take ~1% of its steps), 5e-5 for full FT.
LR_GRID = {"lora": (5e-4, 1.5e-3, 4.5e-3), "melora": (5e-4, 1.5e-3, 4.5e-3), "full": (1.7e-5, 5e-5, 1.5e-4)}
LR_TASK = "stsb"
ABLATION_N = (1, 2, 4, 8, 16)  # MELoRA r=1 on LR_TASK


def slug(label: str) -> str:
    """``melora r=1 n=8`` -> ``melora-r1-n8``."""
    return label.replace("=", "").replace(" ", "-")


def run_dir(out: Path, task: str, label: str, lr: float, seed: int) -> Path:
    """Where one run's results.json goes."""
    return out / task / slug(label) / f"lr{lr:g}" / f"seed{seed}"


def method_of(label: str) -> dict:
    """Adapter options for a label of :data:`METHODS` or the ablation (``melora r=1 n=N``)."""
    if label in METHODS:
        return METHODS[label]
    r, n = (int(part.split("=")[1]) for part in label.split()[1:])
    return {"method": "melora", "r": r, "n": n}


def run_one(
    out: Path, data_dir: str, task: str, label: str, lr: float, seed: int, long: bool = False
) -> dict:
    """Run (or load, when finished before) one run; ``long`` uses the stage-4 budget. Returns its results."""
    target = run_dir(out, LONG_FOLDER if long else task, label, lr, seed)
    results_file = target / "results.json"
    if results_file.is_file():
        return json.loads(results_file.read_text())
    options = {**COMMON, **(LONG_BUDGET if long else BUDGET[task]), **method_of(label)}
    cfg = GlueRunConfig(
        task=task,
        output_dir=str(target),
        data_dir=data_dir,
        lr=lr,
        seed=seed,
        label=label,
        progress=False,
        **options,
    )
    start = time.time()
    print(f"=== {task} | {label} | lr={lr:g} | seed={seed} ...", flush=True)
    results = run_glue(cfg)
    print(f"=== done in {time.time() - start:.0f}s: {json.dumps(results['summary'])}", flush=True)
    return results


def primary(results: dict) -> float:
    """The best-epoch value of the task's primary metric."""
    return results["best"][results["primary_metric"]]


def lr_search(out: Path, data_dir: str, dry: bool) -> dict[str, float]:
    """Stage 1: per method, the grid learning rate with the best dev score on LR_TASK (seed 0)."""
    chosen, rows = {}, []
    for label in ("lora r=8", "melora r=1 n=8", "full"):
        method = METHODS[label]["method"]
        scores = {}
        for lr in LR_GRID[method]:
            if dry:
                print(f"{LR_TASK} | {label} | lr={lr:g} | seed=0")
                continue
            scores[lr] = primary(run_one(out, data_dir, LR_TASK, label, lr, 0))
            rows.append(f"| {label} | {lr:g} | {scores[lr]:.4f} |")
        chosen[method] = max(scores, key=scores.get) if scores else LR_GRID[method][1]
    if not dry:
        table = [f"| method | lr | {LR_TASK} primary metric (best epoch, seed 0) |", "|---|---:|---:|", *rows]
        (out / "lr_search.md").write_text("\n".join(table) + "\n")
        (out / "lr_choice.json").write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


def planned_runs(chosen: dict[str, float]) -> list[tuple[str, str, float, int]]:
    """Stages 2 and 3 as (task, label, lr, seed), most important first."""
    runs = []
    for seed in SEEDS:
        for task in TASKS:
            for label in ("lora r=8", "melora r=1 n=8"):
                runs.append((task, label, chosen[METHODS[label]["method"]], seed))
            if seed == 0:
                runs.append((task, "full", chosen["full"], seed))
    for n in ABLATION_N:
        runs.append((LR_TASK, f"melora r=1 n={n}", chosen["melora"], 0))
    for task in TASKS:
        for label in ("melora r=8 n=8", "melora r=2 n=4"):
            runs.append((task, label, chosen["melora"], 0))
    for seed in SEEDS[1:]:
        for n in ABLATION_N:
            runs.append((LR_TASK, f"melora r=1 n={n}", chosen["melora"], seed))
    return list(dict.fromkeys(runs))


def write_report(out: Path, chosen: dict[str, float], figure: Path) -> None:
    """Tables (best and last epoch) and the plot over the runs at each method's chosen learning rate."""
    selected, long = [], []
    for path in sorted(out.rglob("results.json")):
        config = json.loads(path.read_text())["config"]
        if config["lr"] == chosen[config["method"]]:
            (long if LONG_FOLDER in path.parts else selected).append(path)
    if not selected:
        print("no finished runs at the chosen learning rates yet")
        return
    ablation = [p for p in selected if p.parts[-5] == LR_TASK and p.parts[-4].startswith("melora-r1-n")]
    main_runs = [p for p in selected if p not in ablation or p.parts[-4] == "melora-r1-n8"]
    for which in ("best", "last"):
        print(
            report(
                main_runs,
                keys=f"_{which}$",
                output=out / f"table_{which}.md",
                json_path=out / f"groups_{which}.json",
            )
        )
    print(report(ablation, keys="_best$", output=out / "table_ablation_n.md"))
    if long:
        print(report(long, keys="_best$", output=out / f"table_{LONG_FOLDER}.md"))
    report(main_runs, keys=r"(accuracy|mcc|pearson)_best$", plot=figure)
    print(f"{len(selected) + len(long)} runs; tables in {out}, plot {figure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--out", type=Path, default=Path("results/glue"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the budget assumes 1)")
    parser.add_argument("--plan", action="store_true", help="print the runs and exit")
    parser.add_argument("--report-only", action="store_true", help="only write the tables and the plot")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/glue_score_vs_params.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_only:
        write_report(args.out, json.loads((args.out / "lr_choice.json").read_text()), args.figure)
        return 0
    chosen = lr_search(args.out, args.data_dir, dry=args.plan)
    print(f"learning rates: {chosen}", flush=True)
    for task, label, lr, seed in planned_runs(chosen):
        if args.plan:
            print(f"{task} | {label} | lr={lr:g} | seed={seed}")
        else:
            run_one(args.out, args.data_dir, task, label, lr, seed)
    for seed in SEEDS:
        for label in ("lora r=8", "melora r=1 n=8"):
            lr = chosen[METHODS[label]["method"]]
            if args.plan:
                print(f"{LONG_FOLDER} | {label} | lr={lr:g} | seed={seed}")
            else:
                run_one(args.out, args.data_dir, LONG_TASK, label, lr, seed, long=True)
    if not args.plan:
        write_report(args.out, chosen, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
