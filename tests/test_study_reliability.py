"""melora study: one process per run (run locks), signals, exit statuses, and bad study files / results.

Real study processes on tiny models; a ``sitecustomize`` on the children's path counts how often each
run's training starts, independent of the study's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from melora.lab.args import UserError
from melora.lab.records import RunRecord, read_metric, read_run
from melora.lab.study.command import execute
from melora.lab.study.plan import is_done, plan_study
from melora.lab.study.render import render_study
from melora.lab.study.spec import load_study, parse_study
from tests.test_study import REPO, finish, hold_lock, study, whole_checkpoints

COUNTER = """
import os, sys, time
if "--config" in sys.argv and os.environ.get("STUDY_STARTS"):  # a run: count its start
    with open(os.environ["STUDY_STARTS"], "a") as out:
        out.write(sys.argv[sys.argv.index("--config") + 1] + "\\n")
barrier = os.environ.get("STUDY_BARRIER")
if barrier and "study" in sys.argv and "--plan" not in sys.argv:
    # studies started together meet before they first touch the study folder (all planned by then)
    met = []

    def meet(event, args):
        if event == "os.mkdir" and not met and str(args[0]).startswith(os.environ["STUDY_ROOT"]):
            met.append(True)
            open(os.path.join(barrier, str(os.getpid())), "w").close()
            deadline = time.time() + 120
            while len(os.listdir(barrier)) < int(os.environ["STUDY_PARTIES"]) and time.time() < deadline:
                time.sleep(0.001)

    sys.addaudithook(meet)
"""


def tiny_study(tmp_path, **overrides) -> dict:
    """A LoRA study of a tiny BERT: lr 1e-3 and 1e-2 at seed 0, then seed 1 at the better one (3 runs)."""
    from tests.tiny_models import write_tiny_glue

    tiny = write_tiny_glue(tmp_path / "tiny", hidden=32, layers=1, counts=(("train", 32), ("dev", 16)))
    base = {"model": tiny["model"], "data_dir": tiny["data_dir"], "batch_size": 8, "eval_batch_size": 8,
            "max_length": 32, "save_model": False}  # fmt: skip
    data = study(tmp_path, base=base, tasks={"rte": {"epochs": 1}}, seeds=[0, 1], methods=[{"method": "lora", "r": 8}],
                 lr_grid={"lora": [1e-3, 1e-2]}, tune={"extend": 0}, compare=[], workers=2)  # fmt: skip
    data.update(overrides)
    return data


def study_env(tmp_path, parties: int = 0) -> dict[str, str]:
    """The environment of a study process: its children append their run.yaml to ``starts.txt``; with
    ``parties``, that many study processes wait for each other when they first create a folder in the
    study (each has planned by then), so they contend for the same runs at the same moment."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(COUNTER)
    path = os.pathsep.join([str(site), str(REPO / "src")])
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "STUDY_STARTS": str(tmp_path / "starts.txt"),
    }
    if parties:
        (tmp_path / "barrier").mkdir(exist_ok=True)
        env.update(
            STUDY_BARRIER=str(tmp_path / "barrier"),
            STUDY_PARTIES=str(parties),
            STUDY_ROOT=str(tmp_path / "study"),
        )
    return env


def write_study(tmp_path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def start(tmp_path, path: Path, *flags: str, parties: int = 0) -> subprocess.Popen:
    command = [sys.executable, "-m", "melora.cli", "study", str(path), "--no-progress", *flags]
    return subprocess.Popen(command, env=study_env(tmp_path, parties), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def starts(tmp_path) -> list[str]:
    """Each training start so far, as the run folder's name relative to the study root."""
    counter = tmp_path / "starts.txt"
    root = tmp_path / "study"
    lines = counter.read_text().splitlines() if counter.exists() else []
    return sorted(str(Path(line).parent.relative_to(root)) for line in lines)


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(predicate, process: subprocess.Popen, timeout: float = 300.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the study exited ({process.returncode}) before {what}: {out[-2000:]} {err[-2000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---- one process per run ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_study_processes_started_together_train_each_run_exactly_once(tmp_path):
    path = write_study(tmp_path, tiny_study(tmp_path))
    first, second = start(tmp_path, path, parties=2), start(tmp_path, path, parties=2)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes in ([0, 0], [0, 3]), outputs
    trained = starts(tmp_path)
    assert trained == sorted(set(trained)), f"a run was trained twice: {trained}"
    assert len(trained) == 3
    spec = load_study(path)
    assert all(is_done(job) for job in plan_study(spec).jobs)
    if codes == [0, 3]:  # the one that found runs taken said so, and which
        out = next(o for p, o in zip((first, second), outputs) if p.returncode == 3)[0]
        assert "left to another process" in out and "on " in out


def test_a_run_another_live_process_holds_is_left_to_it_and_the_study_exits_3(tmp_path):
    data = study(tmp_path, methods=[{"method": "lora", "lr": [1e-3]}], seeds=[0], compare=[],
                 base={"model": str(tmp_path / "no-such-model")})  # fmt: skip
    path = write_study(tmp_path, data)
    (job,) = plan_study(load_study(path)).jobs
    holder = hold_lock(job.folder)
    (job.folder / "run.log").write_text("the other process's log\n")
    try:
        done = start(tmp_path, path)
        out, err = done.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 3, out + err
    assert f"1 run(s) left to another process: {job.name} ({holder.pid} on otherhost)" in out
    assert (job.folder / "run.log").read_text() == "the other process's log\n"  # its folder untouched
    assert starts(tmp_path) == []


def test_a_run_that_finished_meanwhile_is_never_deleted_nor_run_again(tmp_path):
    """Planned as missing, finished by another process before this one takes it: left as it is."""
    spec = parse_study(study(tmp_path, methods=[{"method": "lora", "lr": [1e-3]}], seeds=[0], compare=[],
                             base={"model": str(tmp_path / "no-such-model")}))  # fmt: skip
    (job,) = plan_study(spec).pending(is_done)
    finish(job, 0.7)
    (job.folder / "adapter").mkdir()
    assert execute(spec, job) == 0
    assert RunRecord.read(job.folder).summary == {"rte/accuracy_best": 0.7}
    assert (job.folder / "adapter").is_dir() and not (job.folder / ".running").exists()


@pytest.mark.slow
def test_a_stale_lock_naming_a_live_unrelated_process_does_not_block_the_run(tmp_path):
    data = tiny_study(tmp_path, lr_grid={"lora": [1e-3]}, seeds=[0], workers=1)
    path = write_study(tmp_path, data)
    (job,) = plan_study(load_study(path)).jobs
    job.folder.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (job.folder / ".running").write_text(str(sleeper.pid))  # a pid file as older versions wrote it
        shown = subprocess.run([sys.executable, "-m", "melora.cli", "study", str(path), "--plan"],
                               env=study_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert shown.stdout.splitlines()[0].split() == ["to", "run", job.name], shown.stdout + shown.stderr
        done = start(tmp_path, path)
        out, err = done.communicate(timeout=600)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert done.returncode == 0, out + err
    assert is_done(job) and starts(tmp_path) == [str(job.folder.relative_to(tmp_path / "study"))]
    assert not (job.folder / ".running").exists()


# ---- signals --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_study_and_its_runs_and_a_rerun_resumes_each_run_once(tmp_path, signum):
    """The study alone gets the signal (``kill``, or Ctrl-C in its terminal): its run stops with it, the
    study says so in one line with the conventional status, and the same command resumes the run."""
    data = tiny_study(
        tmp_path, lr_grid={"lora": [1e-3]}, seeds=[0], workers=1, tasks={"rte": {"epochs": 100}}
    )
    path = write_study(tmp_path, data)
    root = str(tmp_path / "study")
    (job,) = plan_study(load_study(path)).jobs
    first = start(tmp_path, path)
    wait_until(lambda: whole_checkpoints(job.folder), first, what="an epoch's checkpoint")
    assert processes_naming(root), "the run's process is not found"
    os.kill(first.pid, signum)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 128 + signum, out + err
    assert err.strip().splitlines()[-1] == (
        f"melora study: interrupted by {signal.Signals(signum).name}; 1 run(s) stopped: {job.name}; "
        "rerun the same command to resume them"
    )
    assert "Traceback" not in err
    assert not processes_naming(root), "a run of the stopped study is still running"
    assert not is_done(job) and not (job.folder / ".running").exists()
    if signum == signal.SIGINT:
        return  # resuming is the same after either signal: once is enough
    done = start(tmp_path, path)
    out, err = done.communicate(timeout=900)
    assert done.returncode == 0, out + err
    assert is_done(job) and len(starts(tmp_path)) == 2  # once before the signal, once in the rerun
    assert "# resuming from" in (job.folder / "run.log").read_text()
    assert json.loads(job.results.read_text())["resumed_from"] is not None


# ---- the study file ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"workers": "two"}, r"s\.yaml: workers: expected an integer >= 1, got 'two'"),
        ({"workers": True}, r"s\.yaml: workers: expected an integer >= 1, got True"),
        ({"threads_per_worker": -1}, r"s\.yaml: threads_per_worker: expected an integer >= 1, got -1"),
        ({"tasks": ["rte", "mrpc"]}, r"s\.yaml: tasks must be a non-empty mapping of task: budget"),
        ({"tasks": {"rte": 3}}, r"s\.yaml: tasks\.rte: expected a mapping like"),
        ({"tasks": {"rtee": {}}}, r"s\.yaml: tasks: 'rtee' is not a GLUE task \(did you mean 'rte'\?\)"),
        ({"methods": {}}, r"s\.yaml: methods must be a non-empty list of mappings"),
        ({"methods": {"method": "lora"}}, r"s\.yaml: methods must be a non-empty list of mappings"),
        ({"lr_grid": {"lora": [float("inf")]}}, r"s\.yaml: lr_grid\.lora: inf is not a number"),
        ({"lr_grid": [0.001]}, r"s\.yaml: lr_grid: expected a mapping like"),
        ({"lr_grid": {"lora": [True]}}, r"s\.yaml: lr_grid\.lora: True is not a number"),
        ({"tune": 3}, r"s\.yaml: tune: expected a mapping like \{seed: 0, extend: 2, factor: 3\}, got 3"),
        ({"tune": {"extend": 1.5}}, r"s\.yaml: tune\.extend: expected an integer >= 0, got 1\.5"),
        ({"tune": {"factor": "x"}}, r"s\.yaml: tune\.factor: expected a number > 1, got 'x'"),
        ({"seeds": []}, r"s\.yaml: seeds: expected a non-empty list of integer seeds"),
        ({"seeds": [1.7]}, r"s\.yaml: seeds: seed 1\.7 is not an integer >= 0"),
        ({"seeds": [True]}, r"s\.yaml: seeds: seed True is not an integer >= 0"),
        ({"seeds": 3}, r"s\.yaml: seeds: expected a non-empty list of integer seeds"),
        ({"seeds": [0, 0]}, r"s\.yaml: seeds: \[0, 0\] repeats a seed"),
        (
            {"compare": ["melora-r1-n8", "lora-r8"]},
            r"s\.yaml: compare entry 'melora-r1-n8' must be two method slugs",
        ),
        ({"base": [1]}, r"s\.yaml: base: expected a mapping like"),
        ({"select": 3}, r"s\.yaml: select: expected 'primary' or a summary key"),
    ],
)
def test_every_wrong_typed_value_is_one_error_naming_the_file_and_the_key(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        parse_study(study(tmp_path, **overrides), "s.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval": 5}, r"s\.yaml: eval: expected a mapping like"),
        ({"eval": {"tasks": "mmlu"}}, r"s\.yaml: eval\.tasks: expected a non-empty list of names"),
        ({"eval": {"limit": -2}}, r"s\.yaml: eval\.limit: expected an integer >= 1"),
        ({"eval": {"batch_size": 0}}, r"s\.yaml: eval\.batch_size: expected an integer >= 1, got 0"),
        ({"eval": {"base": "yes"}}, r"s\.yaml: eval\.base: expected true or false, got 'yes'"),
        ({"eval": {"task": ["mmlu"]}}, r"s\.yaml: eval: unknown key 'task' \(did you mean 'tasks'\?\)"),
        ({"tasks": {"rte": {}}}, r"s\.yaml: tasks: instruct studies have the one task 'instruct'"),
        ({"methods": [{"method": "melora", "seeds": [0.5]}]}, r"s\.yaml: methods\[0\]\.seeds: seed 0\.5"),
        ({"methods": [{"method": "melora", "tasks": "instruct"}]}, r"s\.yaml: methods\[0\]\.tasks: expected"),
    ],
)
def test_instruct_study_values_are_checked_too(tmp_path, overrides, message):
    from tests.test_study import instruct_study

    with pytest.raises(UserError, match=message):
        parse_study(instruct_study(tmp_path, lr_grid={"melora": [1e-3]}, **overrides), "s.yaml")


@pytest.mark.parametrize("name", ["../../x", "/abs", "a/b", "..", "a\\b", ""])
def test_a_study_name_cannot_put_results_outside_results(tmp_path, name):
    data = {k: v for k, v in study(tmp_path, name=name).items() if k != "output_dir"}
    with pytest.raises(UserError, match=r"s\.yaml: name .*must be (one folder name|a non-empty text)"):
        parse_study(data, "s.yaml")


def test_a_relative_output_dir_must_stay_inside_results(tmp_path):
    base = {k: v for k, v in study(tmp_path).items() if k != "output_dir"}
    for bad in ("../x", "results/../../x", "outputs/x", "results"):
        with pytest.raises(UserError, match=rf"s\.yaml: output_dir '{bad}' leaves results/"):
            parse_study({**base, "output_dir": bad}, "s.yaml")
    assert parse_study({**base, "output_dir": "results/t_v2"}, "s.yaml").root == Path("results/t_v2")
    assert parse_study(base, "s.yaml").root == Path("results/t")
    assert parse_study({**base, "output_dir": str(tmp_path / "x")}, "s.yaml").root == tmp_path / "x"


# ---- damaged results.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2]", "holds a JSON list, not the object"),
        (b'{"kind": "glue", "label": "lora r=8", "summ', "is not valid JSON"),
        (b"", "is empty"),
        (b'{"kind": "caf\xe9"}', "is not UTF-8 text"),
    ],
    ids=["list", "truncated", "empty", "not-utf8"],
)
def test_a_damaged_results_json_is_one_error_naming_the_file(tmp_path, content, message):
    from melora.lab.records import read_results

    spec = parse_study(
        study(tmp_path, methods=[{"method": "lora", "lr": [1e-3, 3e-3]}], seeds=[0], compare=[])
    )
    job = plan_study(spec).jobs[0]
    job.folder.mkdir(parents=True)
    job.results.write_bytes(content)
    for read in (lambda: read_results(job.results), lambda: RunRecord.read(job.folder), lambda: is_done(job),
                 lambda: read_run(job.results), lambda: read_metric(job.results, "rte/accuracy_best"),
                 lambda: plan_study(spec)):  # fmt: skip
        with pytest.raises(UserError, match=rf"^{re.escape(str(job.results))} {message}.*delete it"):
            read()
    if content != b"[1, 2]":
        return  # the command line, once: one line, exit 2
    path = write_study(tmp_path, study(tmp_path, methods=[{"method": "lora", "lr": [1e-3, 3e-3]}], seeds=[0],
                                       compare=[]))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "melora.cli", "study", str(path), "--plan"],
                          env=study_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"melora study: error: {job.results} {message}" in done.stderr.splitlines()[0]


def test_a_results_json_whose_metric_is_not_a_number_names_the_file_and_the_key(tmp_path):
    spec = parse_study(
        study(tmp_path, methods=[{"method": "lora", "lr": [1e-3, 3e-3]}], seeds=[0], compare=[])
    )
    job = plan_study(spec).jobs[0]
    finish(job, 0.5)
    data = json.loads(job.results.read_text())
    data["summary"]["rte/accuracy_best"] = "high"
    job.results.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"summary\['rte/accuracy_best'\] = 'high' is not a number"):
        plan_study(spec)


def test_a_results_json_that_is_no_run_record_names_the_file_wherever_the_study_reads_it(tmp_path):
    """JSON objects, but not melora results: the plan, the report and every query say so the same way."""
    spec = parse_study(
        study(tmp_path, methods=[{"method": "lora", "lr": [1e-3, 3e-3]}], seeds=[0], compare=[])
    )
    job = plan_study(spec).jobs[0]
    finish(job, 0.5)
    data = json.loads(job.results.read_text())
    no_label = {k: v for k, v in data.items() if k != "label"}
    for broken in ({**data, "summary": ["rte/accuracy_best", 0.5]}, no_label):
        job.results.write_text(json.dumps(broken))
        for read in (lambda: read_run(job.results), lambda: is_done(job), lambda: plan_study(spec)):
            with pytest.raises(
                UserError, match=rf"^{re.escape(str(job.results))}: not a melora results file.*delete it"
            ):
                read()
    one_lr = parse_study(study(tmp_path, methods=[{"method": "lora", "lr": [1e-3]}], seeds=[0], compare=[]))
    plan = plan_study(one_lr)  # one lr: nothing to tune, so nothing read until the report
    with pytest.raises(UserError, match=r"not a melora results file; missing \['label'\]"):
        render_study(one_lr, plan)
