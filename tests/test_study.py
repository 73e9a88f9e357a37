"""melora study: parsing, planning with grid extension, resume, paired statistics, report output."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from melora.lab.args import UserError
from melora.lab.eval.args import EvalArgs
from melora.lab.records import RunRecord
from melora.lab.study.command import RUN_PRESET, describe_plan, drop_checkpoints, resumable, run_options
from melora.lab.study.learning import clear_margin
from melora.lab.study.plan import is_done, plan_study
from melora.lab.study.render import render_study
from melora.lab.study.spec import parse_study
from melora.lab.study.stats import paired_difference

REPO = Path(__file__).resolve().parents[1]


def study(tmp_path, **overrides) -> dict:
    data = {
        "name": "t",
        "runner": "glue",
        "output_dir": str(tmp_path / "study"),
        "tasks": {"rte": {"epochs": 2}},
        "methods": [{"method": "lora", "r": 8}, {"method": "melora", "r": 1, "n": 8}],
        "seeds": [0, 1, 2],
        "lr_grid": {"lora": [1e-3, 3e-3], "melora": [1e-3, 3e-3]},
        "tune": {"seed": 0, "extend": 2, "factor": 3},
        "compare": [["melora-r1-n8", "lora-r8"]],
    }
    data.update(overrides)
    return data


def instruct_study(tmp_path, **overrides) -> dict:
    """A one-method (MELoRA) instruct study, no comparisons."""
    base = {"runner": "instruct", "tasks": {"instruct": {}}, "methods": [{"method": "melora"}], "compare": []}
    return study(tmp_path, **{**base, **overrides})


def finish(job, value: float, metric: str = "rte/accuracy_best", params: int = 1000, details=None) -> None:
    """Write a results.json for ``job`` as the runner would (only the fields the study reads)."""
    slug = job.slug
    method = slug.split("-")[0]
    label = {"lora-r8": "lora r=8", "melora-r1-n8": "melora r=1 n=8"}.get(slug, slug)
    RunRecord("glue", label, slug, method, {metric: value}, seed=job.seed, task=job.task,
              config={"lr": job.lr, "seed": job.seed}, trainable_params=params,
              details=details or {}).write(job.folder)  # fmt: skip


def test_study_file_errors_name_the_key_and_the_file(tmp_path):
    with pytest.raises(UserError, match=r"s.yaml: unknown key 'lr_grids' \(did you mean 'lr_grid'\?\)"):
        parse_study({**study(tmp_path), "lr_grids": {}}, "s.yaml")
    with pytest.raises(UserError, match=r"methods\[0\]: unknown key 'rank'"):
        parse_study(study(tmp_path, methods=[{"method": "lora", "rank": 8}]), "s.yaml")
    with pytest.raises(UserError, match=r"compare entry \['melora-r1-n8', 'dora'\] must be two method slugs"):
        parse_study(study(tmp_path, compare=[["melora-r1-n8", "dora"]]), "s.yaml")
    with pytest.raises(UserError, match=r"no learning rates for full"):
        parse_study(study(tmp_path, methods=[{"method": "full"}], compare=[]), "s.yaml")
    with pytest.raises(UserError, match=r"methods \['lora-r8'\] appear twice"):
        parse_study(
            study(tmp_path, methods=[{"method": "lora"}, {"method": "lora", "r": 8}], compare=[]), "s.yaml"
        )


def test_every_study_file_in_configs_parses():
    files = sorted((REPO / "configs" / "studies").glob("*.yaml"))
    assert files, "configs/studies/ holds the project's studies"
    for path in files:
        spec = parse_study(yaml.safe_load(path.read_text()), str(path))
        assert path.read_text().startswith("# melora study "), (
            f"{path} must start with the command that runs it"
        )
        assert plan_study(spec).jobs


def test_plan_tunes_then_extends_an_edge_optimum_then_runs_the_seeds(tmp_path):
    spec = parse_study(study(tmp_path, methods=[{"method": "lora", "r": 8}], compare=[]))
    plan = plan_study(spec)
    assert [(j.lr, j.seed) for j in plan.jobs] == [(1e-3, 0), (3e-3, 0)]  # the grid at the tuning seed
    scores = {1e-3: 0.60, 3e-3: 0.65, 9e-3: 0.70, 2.7e-2: 0.66}  # rising to 9e-3, then falling
    for job in plan.jobs:
        finish(job, scores[job.lr])
    plan = plan_study(spec)
    assert [j.lr for j in plan.pending(is_done)] == [9e-3]  # best at the top edge: one more point up
    finish(plan.pending(is_done)[0], scores[9e-3])
    plan = plan_study(spec)
    assert [j.lr for j in plan.pending(is_done)] == [2.7e-2]  # 9e-3 is the new edge
    finish(plan.pending(is_done)[0], scores[2.7e-2])
    plan = plan_study(spec)
    assert plan.chosen[("rte", "lora-r8")] == 9e-3  # interior now
    assert [(j.lr, j.seed) for j in plan.pending(is_done)] == [(9e-3, 1), (9e-3, 2)]
    assert plan.extended[("rte", "lora-r8")] == [9e-3, 2.7e-2]
    assert (tmp_path / "study" / "rte" / "lora-r8" / "lr0.009" / "seed1") == plan.pending(is_done)[0].folder


def test_runs_start_with_the_main_comparison_on_every_task_then_the_other_methods(tmp_path):
    methods = [{"method": "lora", "r": 8}, {"method": "full"}, {"method": "melora", "r": 1, "n": 8},
               {"method": "melora", "r": 2, "n": 4}]  # fmt: skip
    spec = parse_study(study(tmp_path, methods=methods, tasks={"rte": {}, "stsb": {}}, seeds=[0],
                             lr_grid={"lora": [1e-3], "melora": [1e-3], "full": [1e-5]},
                             compare=[["melora-r1-n8", "lora-r8"], ["melora-r2-n4", "lora-r8"]]))  # fmt: skip
    order = [(j.task, j.slug) for j in plan_study(spec).jobs]
    assert order == [
        ("rte", "lora-r8"), ("rte", "melora-r1-n8"), ("stsb", "lora-r8"), ("stsb", "melora-r1-n8"),
        ("rte", "melora-r2-n4"), ("stsb", "melora-r2-n4"), ("rte", "full"), ("stsb", "full"),
    ]  # fmt: skip


def test_extension_stops_at_the_limit_and_lower_is_better_for_losses(tmp_path):
    spec = parse_study(
        instruct_study(tmp_path, lr_grid={"melora": [1e-3, 3e-3]}, tune={"extend": 1, "factor": 10})
    )
    assert spec.metric_for("instruct") == "instruct/heldout_loss"
    for _ in range(3):
        for job in plan_study(spec).pending(is_done):
            finish(
                job, 2.0 + math.log10(job.lr) * 0.01, metric="instruct/heldout_loss"
            )  # lower loss at lower lr
    plan = plan_study(spec)
    assert sorted(plan.sweeps[("instruct", "melora-r1-n8")]) == [1e-4, 1e-3, 3e-3]  # one extension down only
    assert plan.chosen[("instruct", "melora-r1-n8")] == 1e-4  # the edge, with the limit reached


def test_failed_or_unfinished_runs_do_not_count_as_done(tmp_path):
    spec = parse_study(study(tmp_path, methods=[{"method": "lora", "lr": [1e-3]}], seeds=[0], compare=[]))
    (job,) = plan_study(spec).jobs
    job.folder.mkdir(parents=True)
    (job.folder / "run.log").write_text("killed")
    assert not is_done(job)
    plan = plan_study(spec, failed=frozenset({job.name}))
    assert plan.chosen[("rte", "lora-r8")] == 1e-3 and plan.pending(is_done) == [job]


def test_paired_difference_matches_a_hand_computation():
    paired = paired_difference({0: 0.80, 1: 0.70, 2: 0.90, 3: 0.5}, {0: 0.75, 1: 0.72, 2: 0.80})
    assert paired.seeds == (0, 1, 2)
    diffs = [0.05, -0.02, 0.10]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2} from a table
    assert paired.differences == pytest.approx(tuple(diffs))
    assert (paired.mean, paired.std) == (pytest.approx(mean), pytest.approx(sd))
    assert (paired.low, paired.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert paired.verdict() == "ties"  # the interval holds 0
    clear = paired_difference({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.8, 2: 0.81})
    assert clear.verdict() == "beats" and clear.verdict(lower_is_better=True) == "loses to"
    assert paired_difference({0: 1.0}, {0: 0.5}).verdict() == "too few seeds to call"
    assert paired_difference({0: 1.0}, {1: 0.5}) is None


def test_clear_margin_is_two_standard_errors_of_a_constant_predictor():
    assert clear_margin("accuracy", 0.527, 277) == pytest.approx(2 * math.sqrt(0.527 * 0.473 / 277))
    assert clear_margin("accuracy", 0.527, 277) == pytest.approx(0.05999, abs=1e-4)  # RTE's dev set
    assert clear_margin("mcc", 0.0, 1043) == pytest.approx(0.06193, abs=1e-4)  # CoLA's
    with pytest.raises(ValueError, match="num_eval=0"):
        clear_margin("accuracy", 0.5, 0)


def test_report_says_which_methods_clear_the_baseline_and_states_each_verdict(tmp_path):
    spec = parse_study(
        study(tmp_path, tune={"extend": 0}, seeds=[0, 1, 2], lr_grid={"lora": [1e-3], "melora": [1e-3]})
    )
    curve = [{"epoch": 1.0, "accuracy": 0.55}, {"epoch": 2.0, "accuracy": 0.62}]
    details = {"trivial_baseline": {"accuracy": 0.527}, "num_eval_examples": 277, "epochs": curve}
    lora = {0: 0.62, 1: 0.60, 2: 0.61}  # worst seed 0.60 > 0.527 + 0.060: learns
    melora = {0: 0.66, 1: 0.58, 2: 0.64}  # worst seed 0.58 < 0.587: does not
    for job in plan_study(spec).jobs:
        older = job.seed == 0 and job.slug == "lora-r8"  # written before runs recorded their dev size
        mine = {k: v for k, v in details.items() if not (older and k == "num_eval_examples")}
        finish(job, (lora if job.slug == "lora-r8" else melora)[job.seed], details=mine)
    text, summary = render_study(spec, plan_study(spec))
    assert "| rte | lora r=8 | accuracy | 0.610 (3) | 0.600 | 0.527 | > 0.587 | yes |" in text
    assert "| rte | melora r=1 n=8 | accuracy | 0.627 (3) | 0.580 | 0.527 | > 0.587 | **no** |" in text
    assert [row["learns"] for row in summary["learning"]] == [True, False]
    diffs = [0.04, -0.02, 0.03]
    mean = sum(diffs) / 3
    half = 4.302652729911275 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert f"melora r=1 n=8 **ties** lora r=8 on rte (rte/accuracy_best) by {mean:+.4f} ± {half:.4f}" in text
    assert (spec.root / "figures" / "learning_curves.png").stat().st_size > 1000
    assert summary["compute"]["runs"] == 6


def test_report_tables_sweeps_comparisons_and_plots(tmp_path):
    spec = parse_study(study(tmp_path, tune={"extend": 0}, seeds=[0, 1]))
    values = {
        ("lora-r8", 1e-3): 0.6,
        ("lora-r8", 3e-3): 0.7,
        ("melora-r1-n8", 1e-3): 0.66,
        ("melora-r1-n8", 3e-3): 0.5,
    }
    for _ in range(2):
        for job in plan_study(spec).pending(is_done):
            params = 2000 if job.slug == "lora-r8" else 500
            finish(job, values[(job.slug, job.lr)] + 0.01 * job.seed, params=params)
    plan = plan_study(spec)
    text, summary = render_study(spec, plan)
    assert "| melora r=1 n=8 | 500 | 0.665 ± 0.007 (2) |" in text  # lr 1e-3 chosen: 0.66, 0.67
    assert "| lora r=8 | 2,000 | 0.705 ± 0.007 (2) |" in text
    assert "**0.001: 0.6600**" in text and "**0.003: 0.7000**" in text  # chosen points in bold
    assert "(edge: extension limit reached)" in text
    (row,) = summary["comparisons"]
    assert row["differences"] == pytest.approx([0.66 - 0.70, 0.67 - 0.71])
    assert row["verdict"] == "loses to"  # identical differences: a zero-width interval below 0
    for name in ("score_vs_params.png", "lr_sweeps.png"):
        assert (spec.root / "figures" / name).stat().st_size > 1000


def test_run_options_layer_base_task_method_and_run(tmp_path):
    spec = parse_study(study(tmp_path, base={"model": "m", "epochs": 1, "batch_size": 8}))
    job = plan_study(spec).jobs[0]
    options = run_options(spec, job)
    assert (options["model"], options["epochs"], options["batch_size"]) == ("m", 2, 8)  # task budget wins
    assert (options["method"], options["r"], options["lr"], options["seed"], options["task"]) == (
        "lora",
        8,
        1e-3,
        0,
        "rte",
    )
    assert options["output_dir"] == str(job.folder) and options["threads"] == 1


def start_study(tmp_path, data: dict):
    """Write ``data`` as a study file and start ``melora study`` on it in its own process group."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "melora.cli", "study", str(path), "--no-progress"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    return command, env, process


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} otherhost".encode())
print("held", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another live process holding ``folder``'s run lock as a study process does (an flock on .running)."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder / ".running")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def fake_checkpoint(folder: Path, step: int, whole: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    if whole:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def whole_checkpoints(run: Path) -> list[Path]:
    """The run's checkpoint folders whose ``trainer_state.json`` Trainer has finished writing."""
    whole = []
    for state in run.glob("**/checkpoint-*/trainer_state.json"):
        try:
            json.loads(state.read_text())
        except (OSError, ValueError):
            continue  # being written (or removed) right now
        whole.append(state.parent)
    return sorted(whole)


def test_an_unfinished_run_resumes_only_from_a_whole_checkpoint_under_the_same_options(tmp_path):
    from melora.lab.yaml_files import write_yaml_atomic

    spec = parse_study(study(tmp_path))
    job = plan_study(spec).jobs[0]
    options = run_options(spec, job)
    assert options["save_strategy"] == "epoch" and options["resume"] is True
    job.folder.mkdir(parents=True)
    assert resumable(spec, job) is None  # no run.yaml: nothing to continue
    write_yaml_atomic(job.folder / RUN_PRESET, options)
    assert resumable(spec, job) is None  # no checkpoint yet
    first = fake_checkpoint(job.folder, 10)
    fake_checkpoint(job.folder, 20, whole=False)  # killed while saving: skipped
    assert resumable(spec, job) == str(first)
    write_yaml_atomic(job.folder / RUN_PRESET, {**options, "threads": 2})  # rerun with more threads: same run
    assert resumable(spec, job) == str(first)
    write_yaml_atomic(job.folder / RUN_PRESET, {**options, "epochs": 5})  # the study's budget changed
    assert resumable(spec, job) is None
    # a study that turns checkpoints off never resumes
    no_saves = parse_study(study(tmp_path, base={"save_strategy": "no"}))
    assert run_options(no_saves, job)["resume"] is False
    write_yaml_atomic(job.folder / RUN_PRESET, run_options(no_saves, job))
    assert resumable(no_saves, job) is None
    nested = fake_checkpoint(job.folder / "checkpoints", 5)  # the instruct runner's layout
    drop_checkpoints(job)
    assert not first.exists() and not nested.exists() and not (job.folder / "checkpoints").exists()
    assert (job.folder / RUN_PRESET).is_file()


def test_plan_shows_how_far_a_run_of_another_study_process_has_got(tmp_path):
    spec = parse_study(study(tmp_path))
    first, second = plan_study(spec).jobs[:2]
    finish(first, 0.6)
    second.folder.mkdir(parents=True)
    (second.folder / "run.log").write_text(
        "{'loss': '0.7', 'epoch': '0.5'}\n{'loss': '0.6', 'epoch': '1.25'}\n"
    )
    other = hold_lock(second.folder)
    try:
        lines = describe_plan(spec, plan_study(spec)).splitlines()
    finally:
        other.kill()
        other.wait()
    assert lines[0].split() == ["done", first.name]
    assert lines[1].split()[:4] == ["running", "(1.2/2", "ep)", second.name]
    assert lines[1].endswith(f"[{other.pid} on otherhost]")  # who runs it, and where
    assert lines[2].startswith("to run")


@pytest.mark.slow
def test_a_run_killed_after_an_epoch_continues_from_its_checkpoint(tmp_path):
    """Kill the study once a run has saved an epoch; the rerun resumes it (not from scratch), then cleans up."""
    from tests.tiny_models import write_tiny_glue

    tiny = write_tiny_glue(tmp_path / "tiny", hidden=32, layers=1, counts=(("train", 1500), ("dev", 16)))
    base = {"model": tiny["model"], "data_dir": tiny["data_dir"], "batch_size": 4, "eval_batch_size": 8,
            "max_length": 32, "save_model": False}  # fmt: skip
    data = study(tmp_path, base=base, tasks={"rte": {"epochs": 3}}, seeds=[0], methods=[{"method": "lora", "r": 8}],
                 lr_grid={"lora": [1e-3]}, compare=[])  # fmt: skip
    command, env, first = start_study(tmp_path, data)
    run = Path(data["output_dir"]) / "rte" / "lora-r8" / "lr0.001" / "seed0"
    deadline = time.time() + 300
    while time.time() < deadline and not whole_checkpoints(run):
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run / "results.json").exists(), "the run finished before the kill: make its epochs longer"
    saved = whole_checkpoints(run)
    assert saved
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_from"] is not None
    assert Path(results["resumed_from"]).name in {p.name for p in saved}
    assert [e["epoch"] for e in results["epochs"]] == [1.0, 2.0, 3.0]  # epoch 1 from before the kill
    assert "# resuming from" in (run / "run.log").read_text()
    assert not list(run.glob("**/checkpoint-*")), "a finished run keeps no checkpoints"


@pytest.mark.slow
def test_tiny_study_runs_resumes_after_a_kill_and_reports(tmp_path):
    """A real study of tiny BERT runs (subprocesses): kill it mid-way, rerun, nothing finished reruns."""
    from tests.tiny_models import write_tiny_glue

    tiny = write_tiny_glue(tmp_path / "tiny", hidden=32, layers=1, counts=(("train", 32), ("dev", 16)))
    data = study(
        tmp_path,
        base={
            "model": tiny["model"],
            "data_dir": tiny["data_dir"],
            "batch_size": 8,
            "eval_batch_size": 8,
            "max_length": 32,
            "save_model": False,
        },  # fmt: skip
        tasks={"rte": {"epochs": 1}},
        seeds=[0, 1],
        lr_grid={"lora": [1e-3, 1e-2], "melora": [1e-3, 1e-2]},
        tune={"extend": 0},
        workers=2,
    )
    command, env, first = start_study(tmp_path, data)
    root = Path(data["output_dir"])
    deadline = time.time() + 300
    while time.time() < deadline and not list(root.rglob("results.json")):
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the study and its running workers die at once
    first.wait()
    finished = {p: p.stat().st_mtime_ns for p in root.rglob("results.json")}
    assert finished, "no run finished before the kill"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "a finished run was run again"
    results = sorted(root.rglob("seed*/results.json"))
    assert len(results) == 6  # 2 methods x (2 lrs at seed 0 + 1 more seed at the chosen lr)
    report = (root / "report.md").read_text()
    assert "Paired comparisons" in report and "melora r=1 n=8 vs lora r=8" in report
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["chosen_lr"]) == {"rte/lora-r8", "rte/melora-r1-n8"}


def test_time_to_go_prices_each_run_by_finished_runs_like_it(tmp_path):
    from melora.lab.study.cost import compute_spent, time_to_go
    from melora.lab.study.results import wall_times

    spec = parse_study(study(tmp_path, tasks={"rte": {"epochs": 2}, "mrpc": {"epochs": 2}},
                             methods=[{"method": "lora", "r": 8}, {"method": "full"}],
                             lr_grid={"lora": [1e-3, 3e-3], "full": [1e-5, 3e-5]}, compare=[]))  # fmt: skip
    jobs = {job.name: job for job in plan_study(spec).jobs}
    assert time_to_go(wall_times(plan_study(spec)), list(jobs.values())) is None  # nothing measured yet
    finish(jobs["rte/lora-r8/lr0.001/seed0"], 0.6, details={"wall_time_s": 600.0})
    finish(jobs["rte/lora-r8/lr0.003/seed0"], 0.6, details={"wall_time_s": 1200.0})
    finish(jobs["rte/full/lr1e-05/seed0"], 0.6, details={"wall_time_s": 3600.0})
    plan = plan_study(spec)
    assert compute_spent(wall_times(plan)) == {"runs": 3, "run_hours": 5400 / 3600}
    pending = [
        jobs["rte/full/lr3e-05/seed0"],
        next(j for j in plan.jobs if j.task == "mrpc" and j.slug == "lora-r8"),
    ]
    # rte/full: the one full run (3600 s); mrpc/lora: no mrpc run yet, so rte's mean (1800 s)
    assert time_to_go(wall_times(plan), pending) == {"runs": 2, "run_hours": (3600 + 1800) / 3600}
    line = next(x for x in describe_plan(spec, plan).splitlines() if "runs to go" in x)
    assert line.split(":")[0] == f"{len([j for j in plan.jobs if not j.results.is_file()])} runs to go"


def test_only_runs_the_matching_runs_and_the_extensions_they_make_due(tmp_path, monkeypatch):
    """``--only 'rte/lora-r8/*'``: LoRA's grid at seed 0, its edge extension, then its seeds; nothing else."""
    import melora.lab.study.command as command

    spec = parse_study(study(tmp_path, tasks={"rte": {"epochs": 2}, "mrpc": {"epochs": 2}}))
    executed = []

    def fake_execute(spec, job, *placement):  # the best lr is the lowest: the grid extends down once per pass
        executed.append(job.name)
        finish(job, 1.0 - job.lr)
        return 0

    monkeypatch.setattr(command, "execute", fake_execute)
    plan, failed, left = command.run_study(spec, progress=False, only=["rte/lora-r8/*"])
    assert failed == [] and left == {}
    assert all(name.startswith("rte/lora-r8/") for name in executed)
    lrs = sorted({float(name.split("/")[2][2:]) for name in executed})
    assert lrs == [1.11e-4, 3.33e-4, 1e-3, 3e-3]  # the grid plus two extensions (extend: 2, 3 digits)
    seeds = sorted(name.split("/")[3] for name in executed if not name.endswith("seed0"))
    assert seeds == ["seed1", "seed2"]  # the other seeds at the chosen lr (the edge after the limit)
    assert not any(j.results.is_file() for j in plan.jobs if not j.name.startswith("rte/lora-r8/"))
    with pytest.raises(UserError, match=r"--only 'rte/lora-r9/\*' matches no run of study 't'"):
        command.run_study(spec, progress=False, only=["rte/lora-r9/*"])


def test_n_ablation_table_and_plot_cover_only_the_tasks_it_ran_with_the_tuning_seed_score(tmp_path):
    ablation = [{"method": "melora", "r": 1, "n": n, "seeds": [0], "tasks": ["rte"]} for n in (1, 2, 4)]
    spec = parse_study(
        study(
            tmp_path,
            tasks={"rte": {"epochs": 2}, "mrpc": {"epochs": 2}},
            methods=[{"method": "lora", "r": 8}, {"method": "melora", "r": 1, "n": 8}, *ablation],
            seeds=[0, 1],
            lr_grid={"lora": [1e-3], "melora": [1e-3, 3e-3]},
            tune={"extend": 0},
        )
    )
    # score = base(n) + lr bonus (3e-3 wins for n=1, 1e-3 for the rest) + 0.01 per seed
    base = {
        "melora-r1-n1": 0.70,
        "melora-r1-n2": 0.66,
        "melora-r1-n4": 0.64,
        "melora-r1-n8": 0.62,
        "lora-r8": 0.75,
    }
    for _ in range(2):
        for job in plan_study(spec).pending(is_done):
            bonus = 0.02 if (job.lr == 3e-3) == (job.slug == "melora-r1-n1") else 0.0
            finish(job, base[job.slug] + bonus + 0.01 * job.seed, metric=f"{job.task}/accuracy_best")
    text, summary = render_study(spec, plan_study(spec))
    rows = summary["n_ablation"]
    assert [(row["task"], row["n"]) for row in rows] == [("rte", 1), ("rte", 2), ("rte", 4), ("rte", 8)]
    assert [row["lr"] for row in rows] == [3e-3, 1e-3, 1e-3, 1e-3]
    assert [row["score"] for row in rows] == pytest.approx([0.72, 0.68, 0.66, 0.64])
    assert rows[3]["seeds"] == pytest.approx({"0": 0.64, "1": 0.65})  # n=8 has the main pair's seeds
    assert "| rte | rte/accuracy_best | 1 | 1 | 0.003 | **0.7200** | s0: 0.7200 |" in text
    assert "| rte | rte/accuracy_best | 1 | 2 | 0.001 | 0.6800 | s0: 0.6800 |" in text
    assert "| mrpc | mrpc/accuracy_best | 1 | 8 |" not in text  # only n=8 ran on MRPC: no ablation there
    assert (spec.root / "figures" / "n_ablation.png").stat().st_size > 1000


def test_a_finished_run_without_its_adapter_is_retrained_before_its_evaluation(tmp_path):
    from melora.lab.study.command import retrain_lost_adapters

    spec = parse_study(
        instruct_study(tmp_path, seeds=[0, 1], lr_grid={"melora": [1e-3]}, eval={"tasks": ["mmlu"]})
    )
    for job in plan_study(spec).pending(is_done):
        if job.kind == "train":
            finish(job, 2.0, metric="instruct/heldout_loss")
    kept, lost = (job.folder for job in plan_study(spec).jobs if job.kind == "train")
    (kept / "adapter").mkdir()  # seed 0 still has its adapter (same machine); seed 1 is a fresh clone's
    assert retrain_lost_adapters(plan_study(spec), only=["*/seed0/eval"]) == []  # --only: seed 1 untouched
    assert (lost / "results.json").is_file()
    assert retrain_lost_adapters(plan_study(spec)) == ["instruct/melora-r1-n8/lr0.001/seed1"]
    assert (kept / "results.json").is_file() and not (lost / "results.json").exists()
    pending = [job.name for job in plan_study(spec).pending(is_done)]
    assert pending == [
        "instruct/melora-r1-n8/lr0.001/seed0/eval",
        "instruct/melora-r1-n8/lr0.001/seed1",
        "instruct/melora-r1-n8/lr0.001/seed1/eval",
    ]


def test_an_instruct_study_evaluates_the_untuned_model_once_and_reports_it_as_the_reference(tmp_path):
    from melora.lab.study.command import command_for

    spec = parse_study(
        instruct_study(
            tmp_path, seeds=[0, 1], lr_grid={"melora": [1e-3]}, base={"model": "tiny"},
            eval={"tasks": ["mmlu"], "base": True},
        )
    )  # fmt: skip
    jobs = plan_study(spec).jobs
    assert [job.name for job in jobs][-1] == "instruct/base/eval"  # after every run and its evaluation
    base, evaluation = jobs[-1], next(job for job in jobs if job.kind == "eval")
    assert command_for(spec, base) == ["eval", "--config", str(base.folder / "eval.yaml")]
    untuned = EvalArgs.from_preset(base.folder / "eval.yaml")
    assert (untuned.model, untuned.adapter, untuned.label) == ("tiny", None, "base (untuned)")
    assert (untuned.tasks, untuned.output_dir) == (["mmlu"], str(base.folder))
    assert command_for(spec, evaluation)[:3] == ["eval", "--config", str(evaluation.folder / "eval.yaml")]
    tuned = EvalArgs.from_preset(evaluation.folder / "eval.yaml")
    assert (tuned.adapter, tuned.label) == (str(evaluation.folder.parent), None)  # the run's own label
    assert base.folder == spec.root / "instruct" / "base" / "eval"
    other = hold_lock(base.folder)  # another study process evaluating the untuned model
    try:
        states = [line.split() for line in describe_plan(spec, plan_study(spec)).splitlines()]
    finally:
        other.kill()
        other.wait()
    assert ["running", base.name, f"[{other.pid}", "on", "otherhost]"] in states
    (base.folder / ".running").unlink()
    for job in plan_study(spec).pending(is_done):
        if job.kind == "train":  # only seed 0 measured the untuned model's loss (eval_base)
            details = {"heldout_loss_base": 2.5} if job.seed == 0 else {}
            RunRecord("instruct", "melora r=1 n=8", job.slug, "melora", {"instruct/heldout_loss": 2.0 + job.seed},
                      seed=job.seed, task="instruct", config={"lr": job.lr, "eval_base": job.seed == 0},
                      trainable_params=500, details=details).write(job.folder)  # fmt: skip
        else:
            untuned = job.kind == "base"
            label, params = ("base (untuned)", 0) if untuned else ("melora r=1 n=8", 500)
            RunRecord("eval", label, job.slug, job.slug.split("-")[0], {"mmlu/acc": 0.3 if untuned else 0.4 + 0.1 * job.seed},
                      seed=None if untuned else job.seed, task="eval", trainable_params=params,
                      details={"complete": True}).write(job.folder)  # fmt: skip
    plan = plan_study(spec)
    assert not plan.pending(is_done)
    text, summary = render_study(spec, plan)
    assert summary["base_heldout_loss"] == {"by_seed": {0: 2.5}, "mean": 2.5}
    assert "Untuned model (the reference every run should beat): held-out loss 2.5000 (seed 0)," in text
    assert "## Evaluations of the chosen runs and of the untuned model" in text
    assert "| base (untuned) | 0 | 0.300 (1) |" in text
    assert "| melora r=1 n=8 | 500 | 2.500 ± 0.707 (2) |" in text  # eval_base differs by seed: averaged
    assert "| melora r=1 n=8 | 500 | 0.450 ± 0.071 (2) |" in text
    assert (spec.root / "figures" / "evals_vs_params.png").stat().st_size > 1000  # untuned model dashed
