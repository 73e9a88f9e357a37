"""The study's one results reader (melora.lab.study.results), the report's sections, the time to go."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from melora.lab.records import finished, read_metric, read_run
from melora.lab.study import render
from melora.lab.study.command import describe_plan
from melora.lab.study.cost import duration_text
from melora.lab.study.plan import is_done, plan_study
from melora.lab.study.results import base_runs, chosen_runs, job_runs, per_seed, wall_times
from melora.lab.study.spec import parse_study
from tests.test_study import REPO, finish, study

STUDY_MODULES = sorted(p.stem for p in (REPO / "src" / "melora" / "lab" / "study").glob("*.py"))


def test_queries_read_each_run_once_the_same_way(tmp_path):
    spec = parse_study(study(tmp_path, tune={"extend": 0}, seeds=[0, 1]))
    for _ in range(2):  # the sweeps, then the seeds at the chosen lr
        for job in plan_study(spec).pending(is_done):
            best = (job.lr == 3e-3) == (job.slug == "lora-r8")  # lora's best lr is 3e-3, melora's 1e-3
            finish(
                job, (0.7 if best else 0.6) + 0.01 * job.seed, details={"wall_time_s": 60.0 * (1 + job.seed)}
            )
    plan = plan_study(spec)
    assert plan.chosen == {("rte", "lora-r8"): 3e-3, ("rte", "melora-r1-n8"): 1e-3}
    assert per_seed(plan, "rte", "lora-r8", "rte/accuracy_best") == pytest.approx({0: 0.7, 1: 0.71})
    assert per_seed(plan, "rte", "lora-r8", "rte/mcc") == {}  # a metric the runs do not have
    runs = chosen_runs(plan)
    assert sorted((r.slug, r.seed, r.config["lr"]) for r in runs) == [
        ("lora-r8", 0, 3e-3), ("lora-r8", 1, 3e-3), ("melora-r1-n8", 0, 1e-3), ("melora-r1-n8", 1, 1e-3)
    ]  # fmt: skip
    assert all(r.source and r.source.endswith("results.json") for r in runs)
    unchosen = job_runs(plan, task="rte", slug="lora-r8", chosen=False)
    assert sorted((job.lr, job.seed) for job, _ in unchosen) == [(1e-3, 0), (3e-3, 0), (3e-3, 1)]
    assert sorted(wall_times(plan).values()) == [60.0] * 4 + [120.0] * 2
    assert base_runs(plan) == []
    assert read_run(tmp_path / "nowhere" / "results.json") is None
    assert read_metric(tmp_path / "nowhere" / "results.json", "rte/accuracy_best") is None


def test_an_unfinished_evaluation_counts_for_no_score_but_for_its_time(tmp_path):
    from melora.lab.records import RunRecord

    spec = parse_study(study(tmp_path, runner="instruct", tasks={"instruct": {}}, methods=[{"method": "lora"}],
                             compare=[], seeds=[0], lr_grid={"lora": [1e-3]}, eval={"tasks": ["mmlu"]}))  # fmt: skip
    train, evaluation = plan_study(spec).jobs
    finish(train, 2.0, metric="instruct/heldout_loss")
    RunRecord("eval", "lora r=8", "lora-r8", "lora", {"mmlu/acc": 0.4}, seed=0, task="eval", wall_time_s=30.0,
              details={"complete": False}).write(evaluation.folder)  # fmt: skip
    record = read_run(evaluation.results)
    assert not finished(record) and not is_done(evaluation)
    plan = plan_study(spec)
    assert read_metric(evaluation.results, "mmlu/acc") is None
    assert chosen_runs(plan, "eval") == [] and per_seed(plan, "instruct", "lora-r8", "mmlu/acc", "eval") == {}
    assert wall_times(plan)[evaluation] == 30.0  # the time was spent all the same
    assert finished(read_run(train.results))  # a training run's results.json is written at its end


@pytest.mark.parametrize("module", STUDY_MODULES)
def test_every_study_module_imports_alone(module):
    """No import circle: each module of the study package imports in a fresh interpreter on its own."""
    done = subprocess.run([sys.executable, "-c", f"import melora.lab.study.{module}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_study_modules_import_downward_only():
    """The renderer uses the queries, the tables and the plots; none of those reaches back into it."""
    imports = {}
    for module in STUDY_MODULES:
        tree = ast.parse((REPO / "src" / "melora" / "lab" / "study" / f"{module}.py").read_text())
        imports[module] = {
            node.module.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("melora.lab.study.")
        }
    for module in ("ablation", "learning", "cost", "results", "plan", "figures", "stats", "spec"):
        assert "render" not in imports[module] and "command" not in imports[module], module
    assert imports["results"] == {"plan"} and imports["plan"] == {"spec"}  # plan reads runs through records
    assert {"results", "ablation", "cost"} <= imports["render"]


def test_render_study_joins_its_sections_in_order(tmp_path, monkeypatch):
    spec = parse_study(study(tmp_path, tune={"extend": 0}, seeds=[0]))
    plan = plan_study(spec)
    monkeypatch.setattr(render, "SECTIONS", (lambda s, p: (["# a", ""], {"x": 1, "y": 2}),
                                             lambda s, p: ([], {}), lambda s, p: (["b"], {"x": 3})))  # fmt: skip
    assert render.render_study(spec, plan) == ("# a\n\nb", {"x": 3, "y": 2})


def test_every_section_of_an_unstarted_study_is_empty_but_the_header(tmp_path):
    spec = parse_study(study(tmp_path))
    plan = plan_study(spec)
    lines, summary = render.header_section(spec, plan)
    assert lines[0] == "# Study t" and "0 runs finished, 0.0 run-hours" in lines[2]
    assert summary == {"study": "t", "chosen_lr": {}, "compute": {"runs": 0, "run_hours": 0.0}, "to_go": None}
    for section in render.SECTIONS[1:]:
        lines, summary = section(spec, plan)
        assert summary == {}, section.__name__
        assert not lines or lines[0].startswith("## Learning-rate sweeps"), section.__name__


@pytest.mark.parametrize(
    "hours, text",
    [(0.0, "under 1 min"), (0.2, "about 12 min"), (59.4 / 60, "about 59 min"), (59.6 / 60, "about 1.0 h"),
     (3.44, "about 3.4 h")],
)  # fmt: skip
def test_durations_read_in_minutes_below_an_hour_and_hours_above(hours, text):
    assert duration_text(hours) == text


def test_a_small_study_plans_its_time_to_go_in_minutes(tmp_path):
    spec = parse_study(study(tmp_path, workers=2))
    first = plan_study(spec).jobs[0]
    finish(first, 0.6, details={"wall_time_s": 240.0})  # four minutes a run
    plan = plan_study(spec)
    line = next(x for x in describe_plan(spec, plan).splitlines() if "runs to go" in x)
    pending = len(plan.pending(is_done))
    assert line.startswith(
        f"{pending} runs to go: about {4 * pending} min of run time, about {2 * pending} min with 2 run(s) at once"
    )
    # a study of one GPU a run on a node of 8 (none is here: the count is given, as --plan --gpus 8 does)
    eight = describe_plan(spec, plan, slots=8)
    assert f"{duration_text(4 * pending / 60 / 8)} with 8 run(s) at once" in eight
    text, _ = render.render_study(spec, plan)
    assert f"{pending} known runs to go, about {4 * pending} min of run time" in text
