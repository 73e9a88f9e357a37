"""Run one experiment: for each case build every configuration, time them interleaved, measure memory."""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from dataclasses import asdict
from typing import Any

import torch

from melora.lab.bench.analysis import evaluate_targets, summary_metrics
from melora.lab.bench.config import Experiment, LayerShape, MethodSpec, ModelCase
from melora.lab.bench.configurations import WorkloadFactory
from melora.lab.bench.harness import KINDS, measure_interleaved, stats
from melora.lab.bench.memory import measure_in_subprocess
from melora.lab.bench.workload import resolve_device

logger = logging.getLogger(__name__)


def hardware_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core count, torch threads and (when used) the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _run_case(
    experiment: Experiment, case: LayerShape | ModelCase, specs: list[MethodSpec], device: torch.device
) -> dict[str, Any]:
    factory = WorkloadFactory(experiment, device)
    workloads, skipped = [], []
    for spec in specs:
        try:
            workloads.append(factory(case, spec))
        except ValueError as error:  # e.g. n does not divide a layer's features
            logger.warning("%s on %s skipped: %s", spec.label, case.label, error)
            skipped.append({"label": spec.label, "reason": str(error)})
    logger.info("%s: timing %d configurations", case.label, len(workloads))
    times = measure_interleaved(
        workloads, device, experiment.repeats, experiment.warmup, experiment.min_time_s
    )
    rows = [
        {
            "label": w.label,
            "method": asdict(w.spec),
            "trainable_params": w.trainable_params,
            "equivalent_rank": w.spec.equivalent_rank,
            "times_s": times[w.label],
            "stats_s": {kind: stats(times[w.label][kind]) for kind in KINDS},
        }
        for w in workloads
    ]
    del workloads
    factory.release()
    gc.collect()
    if experiment.memory:
        logger.info("%s: measuring memory in a worker process", case.label)
        memory = measure_in_subprocess(experiment, case, [MethodSpec(**row["method"]) for row in rows])
        for row in rows:
            row["memory"] = memory[row["label"]]
    return {"case": case.label, "params": asdict(case), "rows": rows, "skipped": skipped}


def run_experiment(experiment: Experiment) -> dict[str, Any]:
    """Measure every configuration of ``experiment``; return the results document (see docs/benchmarks.md)."""
    from melora.lab.provenance import provenance

    if experiment.threads:
        torch.set_num_threads(experiment.threads)
    device = resolve_device(experiment.device)
    torch.manual_seed(experiment.seed)
    specs = experiment.methods()
    start = time.perf_counter()
    cases = [_run_case(experiment, case, specs, device) for case in experiment.cases()]
    targets = evaluate_targets(cases)
    headline = next(spec for spec in specs if spec.name == "melora")
    return {
        "kind": "bench",
        "label": experiment.name,
        "method": "melora",
        "seed": experiment.seed,
        "config": experiment.to_dict(),
        "versions": provenance(),
        "hardware": hardware_info(device),
        "trainable_params": next(
            (row["trainable_params"] for row in cases[0]["rows"] if row["label"] == headline.label), None
        ),
        "equivalent_rank": headline.equivalent_rank,
        "wall_time_s": time.perf_counter() - start,
        "summary": summary_metrics(targets),
        "targets": targets,
        "cases": cases,
    }
