"""A study's runs as tasks of a Ray cluster (``executor: ray``; docs/scale.md).

The driver (``melora study``) plans exactly as on one machine; each run becomes one Ray task asking for the
study's ``cpus_per_run`` and ``gpus_per_run``. The task runs on a worker node, in the driver's working folder
(every node must see the study's folder and the data at the same path: shared storage, checked at start),
and calls the same :func:`melora.lab.study.command.execute` as the local executor: the run's flock, its
``melora glue|instruct`` subprocess (``CUDA_VISIBLE_DEVICES`` as Ray assigned it), its checkpoints.

Faults: a node that dies takes its task's worker and (by the parent-death signal) its run's process with it;
the kernel releases the run's lock, and Ray retries the task on another node (``max_retries``), where
:func:`execute` takes the lock and continues from the run's last checkpoint. The lock keeps a run to one live
copy. A driver that dies takes its tasks with it (Ray ends a driver's tasks when it exits); started again, it
plans from the folders and resumes each unfinished run from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from melora.lab.args import UserError
from melora.lab.study.plan import Job
from melora.lab.study.spec import StudySpec

logger = logging.getLogger(__name__)

RETRIES = 3  # a run whose node dies is retried this many times on other nodes
LOCK_WAIT_S = 120.0  # a retried run waits this long for the dead node's lock on the run to be released
CHECK_TIMEOUT_S = 180.0  # the storage check's tasks must all answer within this
POLL_S = 0.5  # ray.wait returns this often, so that Ctrl-C and SIGTERM reach the driver


def _run_job(spec: StudySpec, job: Job, cwd: str) -> int | None:
    """The Ray task: run ``job`` here, in the driver's working folder (the same path on shared storage)."""
    import ray

    from melora.lab.study.command import execute

    os.chdir(cwd)
    node = ray.get_runtime_context().get_node_id()[:8]
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")  # Ray set it from the task's num_gpus
    where = f"node {node}" + (f" gpu {gpus}" if gpus else "")
    return execute(spec, job, {"MELORA_RAY_NODE": node}, where, lock_wait_s=LOCK_WAIT_S)


def _sees(cwd: str, probe: str) -> tuple[bool, bool]:
    """The storage check's task: does this node see the driver's folder and the probe file it wrote?"""
    return os.path.isdir(cwd), os.path.isfile(probe)


class RayExecutor:
    """Runs jobs as tasks of the Ray cluster at ``address`` (``spec.ray_address``; ``auto``: ``RAY_ADDRESS``
    or the cluster started on this machine). Same interface as :class:`~melora.lab.study.command.LocalExecutor`."""

    def __init__(self, spec: StudySpec, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError(
                "executor ray needs Ray on this machine and on every node: pip install 'melora[ray]'"
            ) from None
        self.ray = ray
        self.spec = spec
        self.address = address or spec.ray_address or "auto"
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(
                f"executor ray: no Ray cluster at {self.address!r} ({str(err).splitlines()[0]}); start one "
                "(`ray start --head`, KubeRay, Ray on SLURM: docs/scale.md) or give --address HOST:PORT."
            ) from None
        # every path the runs use must mean the same on every node: make the study folder absolute
        spec.output_dir = str(spec.root.resolve())
        self.cwd = os.getcwd()
        self.check_cluster()
        self.task = ray.remote(_run_job).options(
            num_cpus=spec.cpus,
            num_gpus=spec.gpus_per_run or 0,
            max_retries=RETRIES,
            retry_exceptions=False,
        )

    def describe(self) -> str:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        total = self.ray.cluster_resources()
        return (
            f"Ray cluster {self.address} ({len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, "
            f"{total.get('GPU', 0):g} GPUs), {self.spec.cpus} CPU(s) and {self.spec.gpus_per_run or 0:g} GPU(s) a run"
        )

    def check_cluster(self) -> None:
        """One line if no node could ever take a run, or if a node cannot see the study's folder."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        need = {"CPU": float(self.spec.cpus), "GPU": float(self.spec.gpus_per_run or 0)}
        if not any(all(n["Resources"].get(k, 0) >= v for k, v in need.items() if v) for n in nodes):
            have = ", ".join(
                f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU {n['Resources'].get('GPU', 0):g} GPU"
                for n in nodes
            )
            raise UserError(
                f"executor ray: no node of {self.address} has the {need['CPU']:g} CPU(s) and {need['GPU']:g} GPU(s) a "
                f"run asks for ({have}); lower cpus_per_run / gpus_per_run or add nodes."
            )
        root = Path(self.spec.root)
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".storage-check-{uuid.uuid4().hex}"
        probe.write_text("written by the study's driver; every node must see it\n")
        try:
            check = ray.remote(_sees)
            refs = {
                n["NodeID"]: check.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(self.cwd, str(probe))
                for n in nodes
            }
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
            blind = []
            for node in nodes:
                ref = refs[node["NodeID"]]
                if ref not in ready:
                    blind.append(f"{node['NodeManagerAddress']} (no answer in {CHECK_TIMEOUT_S:.0f} s)")
                    continue
                sees_cwd, sees_probe = ray.get(ref)
                if not (sees_cwd and sees_probe):
                    blind.append(f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})")
        finally:
            probe.unlink(missing_ok=True)
        if blind:
            raise UserError(
                f"executor ray: node(s) {', '.join(blind)} cannot see {self.cwd} and {root}: every node must "
                "mount the study's folder and data at the same path (shared storage, docs/scale.md)."
            )

    def submit(self, job: Job, running: int) -> Any:
        """Queue ``job`` on the cluster (Ray starts it when a node has the resources)."""
        return self.task.remote(self.spec, job, self.cwd)

    def wait_any(self, handles: list[Any]) -> list[Any]:
        while True:
            ready, _ = self.ray.wait(handles, num_returns=1, timeout=POLL_S)
            if ready:
                return ready

    def result(self, handle: Any) -> int | None:
        try:
            return self.ray.get(handle)
        except (
            self.ray.exceptions.RayError
        ) as err:  # its node died more than RETRIES times, or it was cancelled
            logger.error("a run's Ray task failed: %s", str(err).splitlines()[0])
            return 1

    def stop(self, handles: list[Any]) -> None:
        """Cancel the running tasks (their workers are killed, and with them the runs' processes)."""
        for handle in handles:
            try:
                self.ray.cancel(handle, force=True)
            except Exception as err:  # already finished, or its node is gone
                logger.debug("cancel: %s", err)
        deadline = time.monotonic() + 30
        while handles and time.monotonic() < deadline:
            _, handles = self.ray.wait(handles, num_returns=len(handles), timeout=1.0)

    def close(self) -> None:
        self.ray.shutdown()
