"""melora study across GPUs and machines: the local executor's GPU assignment, and Ray clusters.

The local executor is tested with a fake GPU count (``--gpus 2``: the runs see CUDA_VISIBLE_DEVICES 0 and 1
and train on the CPU). The Ray tests start real Ray clusters on this machine (Ray's own
``ray.cluster_utils.Cluster``), every server bound to 127.0.0.1 only, each node declaring 2 GPUs it does not
have; the cluster is torn down whatever happens. A ``sitecustomize`` on the runs' path records, independent
of the study's bookkeeping, each training process: its run, CUDA_VISIBLE_DEVICES, node, start and end; and
it freezes (SIGSTOP) the runs of the node named in ``<tmp>/hold`` as soon as Trainer has saved their first
checkpoint (in Trainer's own thread, so the freeze is at that point), so that a test's kill lands mid-run
whatever the machine's load."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from melora.lab.args import UserError
from melora.lab.study.devices import GpuPool, local_pool, machine_gpus
from melora.lab.study.spec import parse_study
from tests.test_study import REPO, study
from tests.test_study_reliability import processes_naming

RECORDER = """
import atexit, json, os, sys, time
if "--config" in sys.argv and os.environ.get("SCALE_RECORD"):  # a training run: record where and when
    record = {"config": sys.argv[sys.argv.index("--config") + 1], "pid": os.getpid(),
              "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "node": os.environ.get("MELORA_RAY_NODE"),
              "start": time.time()}
    def _write(event):
        with open(os.environ["SCALE_RECORD"], "a") as out:
            out.write(json.dumps({**record, "event": event, "t": time.time()}) + "\\n")
    _write("start")
    atexit.register(_write, "end")
    hold = os.environ.get("SCALE_HOLD")  # a file naming a node: its runs stop once they have a checkpoint
    if hold and os.path.exists(hold) and open(hold).read().strip() == record["node"]:
        import importlib.abc, importlib.util, signal
        class _Hold(importlib.abc.MetaPathFinder):  # Trainer freezes its process once its first checkpoint is whole
            def find_spec(self, name, path=None, target=None):
                if name != "transformers.trainer":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                load = spec.loader.exec_module
                def exec_module(module):
                    load(module)
                    save = module.Trainer._save_checkpoint
                    def _save_then_freeze(trainer, *args, **kwargs):
                        save(trainer, *args, **kwargs)
                        _write("held")
                        os.kill(os.getpid(), signal.SIGSTOP)  # frozen until its node dies (SIGKILL still lands)
                    module.Trainer._save_checkpoint = _save_then_freeze
                spec.loader.exec_module = exec_module
                return spec
        sys.meta_path.insert(0, _Hold())
"""


def recorder_env(tmp_path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(RECORDER)
    return {
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO / "src")]),
        "SCALE_RECORD": str(tmp_path / "record.jsonl"),
        "OMP_NUM_THREADS": "1",
        "SCALE_HOLD": str(tmp_path / "hold"),
    }


def records(tmp_path) -> list[dict]:
    """Training processes as (run, start, end, gpus, node); a process killed before its end has end None."""
    path = tmp_path / "record.jsonl"
    by_pid: dict[int, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        event = json.loads(line)
        entry = by_pid.setdefault(event["pid"], {**event, "end": None})
        if event["event"] == "end":
            entry["end"] = event["t"]
        if event["event"] == "held":
            entry["held"] = event["t"]
    for entry in by_pid.values():
        entry["run"] = str(Path(entry["config"]).parent.relative_to(tmp_path / "study"))
    return sorted(by_pid.values(), key=lambda e: e["start"])


def overlapping(entries: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of training processes that were alive at the same time."""
    pairs = []
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            a_end, b_end = a["end"] or float("inf"), b["end"] or float("inf")
            if a["start"] < b_end and b["start"] < a_end:
                pairs.append((a, b))
    return pairs


FIRST_CHECKPOINT = "checkpoint-6"  # a scale_study run's first epoch: 48 examples in batches of 8


def scale_study(tmp_path, epochs: int = 1, lrs=(1e-3, 3e-3, 1e-2, 3e-2), **overrides) -> Path:
    """A tiny LoRA study: one run per learning rate (no tuning), seed 0, with one GPU each."""
    from tests.tiny_models import write_tiny_glue

    tiny = write_tiny_glue(
        tmp_path / "tiny", hidden=32, layers=1, counts=(("train", 48), ("dev", 16)), dropout=0
    )
    base = {"model": tiny["model"], "data_dir": tiny["data_dir"], "batch_size": 8, "eval_batch_size": 8,
            "max_length": 32, "save_model": False, "group_by_length": False}  # fmt: skip
    data = study(tmp_path, base=base, tasks={"rte": {"epochs": epochs}}, seeds=[0], methods=[{"method": "lora", "r": 8}],
                 lr_grid={"lora": list(lrs)}, tune={"extend": 0}, compare=[], gpus_per_run=1)  # fmt: skip
    data.update(overrides)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def failed_logs(root: Path) -> str:
    """The end of each unfinished run's log (what a failed assertion shows)."""
    return "".join(
        f"\n--- {log.parent.relative_to(root)}\n{log.read_text()[-1500:]}"
        for log in sorted(root.glob("*/*/*/*/run.log"))
        if not (log.parent / "results.json").exists()
    )


def run_study(tmp_path, path: Path, *flags: str, env: dict | None = None, timeout: float = 600):
    command = [sys.executable, "-m", "melora.cli", "study", str(path), "--no-progress", *flags]
    return subprocess.run(command, env={**os.environ, **recorder_env(tmp_path), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def metrics(root: Path) -> dict[str, dict]:
    """Each finished run's dev metrics per epoch, by run name."""
    out = {}
    for path in sorted(root.glob("*/*/*/*/results.json")):
        result = json.loads(path.read_text())
        out[str(path.parent.relative_to(root))] = {"best": result["best"], "epochs": result["epochs"]}
    return out


# ---- the GPU pool ------------------------------------------------------------------------------------------


def test_one_gpu_a_run_gives_each_concurrent_run_its_own_gpu_until_none_is_left():
    pool = GpuPool(["0", "1", "2", "3"], 1)
    taken = [pool.take() for _ in range(4)]
    assert sorted(d for t in taken for d in t) == ["0", "1", "2", "3"] and pool.capacity == 4
    assert pool.take() is None
    pool.give(taken[2])
    assert pool.take() == taken[2]


def test_a_fraction_spreads_runs_over_the_gpus_before_they_share_one():
    pool = GpuPool(["0", "1"], 0.5)
    assert pool.capacity == 4
    first = [pool.take() for _ in range(2)]
    assert sorted(first) == [["0"], ["1"]]  # spread first
    assert sorted(pool.take() + pool.take()) == ["0", "1"]  # then share
    assert pool.take() is None


def test_whole_gpus_a_run_are_taken_only_when_all_free():
    pool = GpuPool(["0", "1", "2", "3", "4"], 2)
    a, b = pool.take(), pool.take()
    assert len(set(a) | set(b)) == 4 and pool.capacity == 2
    assert pool.take() is None  # one GPU left, a run needs two
    pool.give(a)
    assert sorted(pool.take()) == sorted(a)


def test_zero_gpus_a_run_hides_every_gpu():
    pool = local_pool(0.0, count=4)
    assert pool is not None and pool.take() == [] and pool.take() == []


def test_the_gpu_count_comes_from_the_flag_or_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert machine_gpus() == ["4", "6"]
    assert machine_gpus(1) == ["4"]
    with pytest.raises(UserError, match="lists only 2"):
        machine_gpus(3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert machine_gpus(3) == ["0", "1", "2"]


def test_a_study_asking_for_gpus_on_a_machine_without_any_says_what_to_do(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="gpus_per_run=1 but this machine has 0 GPU.*gpus_per_run: 0"):
        local_pool(1.0)


@pytest.mark.parametrize("value", [1.5, -1, "one", float("nan")])
def test_gpus_per_run_must_be_a_fraction_or_whole_gpus(tmp_path, value):
    with pytest.raises(UserError, match="gpus_per_run"):
        parse_study(study(tmp_path, gpus_per_run=value), "s.yaml")


def test_an_unknown_executor_names_the_choices(tmp_path):
    with pytest.raises(UserError, match="executor='slurm'; choose one of local, ray"):
        parse_study(study(tmp_path, executor="slurm"), "s.yaml")


# ---- Ray --------------------------------------------------------------------------------------------------


RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
BLIND_NODE = """
import sys, time, types
from ray.cluster_utils import Cluster
cluster = Cluster()  # its head runs elsewhere: join it
cluster.head_node = types.SimpleNamespace(gcs_address=sys.argv[1])
node = cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2, num_gpus=2)
print("joined", node.node_id[:8], flush=True)
while True:
    time.sleep(60)
"""


@contextlib.contextmanager
def local_ray(tmp_path, workers: int):
    """A Ray cluster on 127.0.0.1: a head and ``workers`` worker nodes, 2 CPUs and 2 (declared) GPUs each;
    yields (cluster, worker nodes, temp dir). Torn down whatever happens."""
    pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    saved = dict(os.environ)
    # Ray resolves 127.0.0.1 to the machine's outward address unless single-machine mode is on; with it on,
    # every server binds the loopback address only (checked below)
    os.environ.update(recorder_env(tmp_path), **RAY_ENV)
    os.environ["RAY_TMPDIR"] = temp_dir  # what Ray writes outside its session (the address file) stays in it
    os.makedirs(os.path.join(temp_dir, "ray"))
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        common = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "num_gpus": 2}
        cluster = Cluster(initialize_head=True, head_node_args={**common, "include_dashboard": False,
                                                                 "temp_dir": temp_dir})  # fmt: skip
        yield cluster, [cluster.add_node(**common) for _ in range(workers)], temp_dir
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if cluster is not None:
            cluster.shutdown()
        for pid in processes_naming(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster(tmp_path):
    """Two nodes: (cluster, the worker node, temp dir)."""
    with local_ray(tmp_path, workers=1) as (cluster, workers, temp_dir):
        yield cluster, workers[0], temp_dir


@pytest.fixture
def ray_head(tmp_path):
    """One node: (cluster, temp dir)."""
    with local_ray(tmp_path, workers=0) as (cluster, _, temp_dir):
        yield cluster, temp_dir


def ray_study(path: Path, cluster) -> list[str]:
    """The command line of the study at ``path`` on ``cluster``."""
    return [sys.executable, "-m", "melora.cli", "study", str(path), "--no-progress", "--executor", "ray",
            "--address", cluster.address]  # fmt: skip


def wait_until_held(tmp_path, driver: subprocess.Popen, count: int, node: str | None = None) -> list[dict]:
    """The first ``count`` runs (of ``node``, or of any node) frozen after their checkpoint (``hold``)."""
    deadline = time.time() + 300
    where = f" on node {node}" if node else ""
    while True:
        held = [e for e in records(tmp_path) if e.get("held") and node in (None, e["node"])]
        if len(held) >= count:
            return held[:count]
        assert driver.poll() is None, driver.communicate()
        assert time.time() < deadline, f"{count} run(s) never reached a checkpoint{where}"
        time.sleep(0.2)


def each_run_finished_once(tmp_path, runs: int, dead_at: float) -> dict[str, list[dict]]:
    """Each run's training processes, by run: ``runs`` runs with results, each finished by exactly one process
    and never two alive at once (a process killed mid-run, with no end, counts as dead by ``dead_at``)."""
    by_run: dict[str, list[dict]] = {}
    for entry in records(tmp_path):
        by_run.setdefault(entry["run"], []).append(entry)
    assert len(by_run) == runs and len(metrics(tmp_path / "study")) == runs
    for run, attempts in by_run.items():
        assert len([a for a in attempts if a["end"] is not None]) == 1, (run, attempts)  # finished once
        for attempt in attempts:
            attempt["end"] = attempt["end"] or dead_at
        assert not overlapping(attempts), (run, attempts)  # never two live copies of one run
    return by_run


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening_addresses(pids: set[int]) -> list[str]:
    """The local addresses the given processes listen on (TCP), from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addresses.append(fields[1].split(":")[0])
    return addresses


def _is_loopback(hex_address: str) -> bool:
    if len(hex_address) == 8:  # IPv4, little-endian
        return hex_address.endswith("7F")
    return hex_address in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


@pytest.mark.slow
@pytest.mark.ray
def test_a_study_on_two_ray_nodes_spreads_its_runs_and_equals_the_local_executor_on_two_gpus(
    tmp_path, ray_cluster
):
    cluster, _, temp_dir = ray_cluster
    addresses = listening_addresses(set(processes_naming(temp_dir)))
    assert addresses and all(_is_loopback(a) for a in addresses), addresses
    path = scale_study(tmp_path, epochs=2)
    started = time.time()
    done = run_study(tmp_path, path, "--executor", "ray", "--address", cluster.address,
                     env=RAY_ENV)  # fmt: skip
    ray_s = time.time() - started
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    on_ray = metrics(tmp_path / "study")
    entries = records(tmp_path)
    assert len(on_ray) == 4 and len(entries) == 4 and all(e["end"] for e in entries)
    assert len({e["node"] for e in entries}) == 2, "the runs spread over both nodes"
    for a, b in overlapping(entries):
        if a["node"] == b["node"]:
            assert a["gpus"] != b["gpus"], (a, b)
    # the same study on the local executor of a machine with 2 (fake) GPUs: two runs at once, each on its own
    # GPU, never three; the same runs, seeds and metrics as on the cluster
    shutil.move(tmp_path / "study", tmp_path / "on_ray")
    (tmp_path / "record.jsonl").unlink()
    started = time.time()
    done = run_study(tmp_path, path, "--gpus", "2")
    local_s = time.time() - started
    assert done.returncode == 0, done.stderr[-3000:]
    entries = records(tmp_path)
    assert len(entries) == 4 and all(e["end"] for e in entries) and {e["gpus"] for e in entries} == {"0", "1"}
    pairs = overlapping(entries)
    assert pairs, "two GPUs: two runs at once"
    assert all(a["gpus"] != b["gpus"] for a, b in pairs), pairs
    assert not any(
        (a, b) in pairs and (b, c) in pairs and (a, c) in pairs
        for i, a in enumerate(entries)
        for j, b in enumerate(entries[i + 1 :], i + 1)
        for c in entries[j + 1 :]
    ), "never three runs on two GPUs"
    assert metrics(tmp_path / "study") == on_ray
    print(f"tiny study (4 runs): Ray two nodes {ray_s:.0f} s, local executor {local_s:.0f} s")


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_killed_mid_study_ends_with_every_run_finished_once(tmp_path, ray_cluster):
    cluster, worker, _ = ray_cluster
    path = scale_study(tmp_path, epochs=2)
    command = ray_study(path, cluster)
    env = {**os.environ, **recorder_env(tmp_path), **RAY_ENV}
    worker_node = worker.node_id[:8]
    # the worker node's runs stop after their first checkpoint, so the kill lands mid-run whatever the load
    (tmp_path / "hold").write_text(worker_node)
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    try:
        (victim,) = wait_until_held(tmp_path, driver, 1, worker_node)
        killed_at = time.time()
        cluster.remove_node(worker, allow_graceful=False)
        while _alive(victim["pid"]):  # the run's process dies with its node (its parent-death signal)
            assert time.time() < killed_at + 60, "the killed node's run outlived it by a minute"
            time.sleep(0.05)
        dead_at = time.time()
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 0, out[-2000:] + err[-3000:] + failed_logs(tmp_path / "study")
    by_run = each_run_finished_once(tmp_path, 4, dead_at)
    retried = by_run[victim["run"]]
    assert len(retried) == 2 and retried[0]["pid"] == victim["pid"] and retried[1]["start"] > dead_at
    assert retried[1]["node"] != worker_node  # retried on the surviving node
    log = (tmp_path / "study" / victim["run"] / "run.log").read_text()
    assert "# resuming from" in log  # continued from its checkpoint
    result = json.loads((tmp_path / "study" / victim["run"] / "results.json").read_text())
    assert Path(result["resumed_from"]).name == FIRST_CHECKPOINT
    assert not [p for p in processes_naming(str(tmp_path)) if p != driver.pid]


@pytest.mark.slow
@pytest.mark.ray
def test_a_driver_killed_mid_study_then_started_again_finishes_every_run_once(tmp_path, ray_head):
    cluster, _ = ray_head
    path = scale_study(tmp_path, epochs=2, lrs=(1e-3, 3e-3))
    command = ray_study(path, cluster)
    env = {**os.environ, **recorder_env(tmp_path), **RAY_ENV}
    (tmp_path / "hold").write_text(cluster.head_node.node_id[:8])  # runs stop after their first checkpoint
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    try:
        # both (declared) GPUs busy with a run that has a checkpoint
        held = wait_until_held(tmp_path, driver, 2)
        # --plan says where each running run is: its node and its GPU, as Ray gave them
        shown = subprocess.run([*command, "--plan"], env=env, capture_output=True, text=True, timeout=120)
        assert len({e["gpus"] for e in held}) == 2, held
        for entry in held:
            line = [x for x in shown.stdout.splitlines() if f" {entry['run']} " in x] or [
                shown.stdout + shown.stderr
            ]
            assert line[0].startswith("running"), line[0]
            assert f"(node {entry['node']} gpu {entry['gpus']})]" in line[0], line[0]
        os.killpg(driver.pid, signal.SIGKILL)  # the driver only: the runs live in Ray's workers
        driver.wait()
        killed_at = time.time()
        while any(_alive(e["pid"]) for e in held):  # Ray ends a dead driver's tasks, and their runs with them
            assert time.time() < killed_at + 60, "the runs of a dead driver outlived it by a minute"
            time.sleep(0.05)
        dead_at = time.time()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    (tmp_path / "hold").unlink()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (
        again.stdout[-2000:] + again.stderr[-3000:] + failed_logs(tmp_path / "study")
    )
    by_run = each_run_finished_once(tmp_path, 2, dead_at)
    for victim in held:  # each killed run was started again after its death and continued its checkpoint
        attempts = by_run[victim["run"]]
        assert len(attempts) == 2 and attempts[0]["pid"] == victim["pid"] and attempts[1]["start"] > dead_at
        assert "# resuming from" in (tmp_path / "study" / victim["run"] / "run.log").read_text()
        result = json.loads((tmp_path / "study" / victim["run"] / "results.json").read_text())
        assert Path(result["resumed_from"]).name == FIRST_CHECKPOINT


@pytest.mark.ray
def test_a_node_that_cannot_see_the_study_folder_is_named_before_any_run_starts(tmp_path, ray_head):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare (user and mount namespaces) to give a node its own view of the disk")
    cluster, temp_dir = ray_head
    shared = tmp_path / "shared"
    shared.mkdir()
    path = scale_study(tmp_path, output_dir=str(shared / "study"))
    # a second node like a machine that does not mount the shared storage: in its own mount namespace an empty
    # file system lies over the study's folder (the model and data it still sees). It joins as the fixture's
    # nodes do (`ray start` joins no cluster in single-machine mode, and outside it binds the outward address)
    log = tmp_path / "node.log"
    with open(log, "w") as out:
        node = subprocess.Popen(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"',
                                 "sh", str(shared), sys.executable, "-c", BLIND_NODE, cluster.address],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (joined := re.findall(r"^joined ([0-9a-f]{8})", log.read_text(), re.M)):
            assert node.poll() is None and time.time() < deadline, (
                "the node did not start: " + log.read_text()
            )
            time.sleep(0.2)
        addresses = listening_addresses(set(processes_naming(temp_dir)))
        assert addresses and all(_is_loopback(a) for a in addresses), addresses
        done = run_study(tmp_path, path, "--executor", "ray", "--address", cluster.address, env=RAY_ENV,
                         timeout=300)  # fmt: skip
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "cannot see" in line]
    assert len(lines) == 1 and str(shared / "study") in lines[0], done.stderr[-3000:]
    assert re.findall(r"\(node ([0-9a-f]{8})\)", lines[0]) == joined, lines[0]  # that node, and only it
    assert not records(tmp_path), "no run started"
    assert not list((shared / "study").glob(".storage-check-*")), "the probe file is removed"


def test_executor_ray_without_ray_says_what_to_install(tmp_path, monkeypatch):
    from melora.lab.study.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    spec = parse_study(study(tmp_path, executor="ray"), "s.yaml")
    with pytest.raises(UserError, match=r"^executor ray needs Ray .*pip install 'melora\[ray\]'$"):
        RayExecutor(spec)
