"""Peak memory of each configuration's training step, measured in a separate worker process.

CPU: the resident-set high-water mark (``VmHWM`` in /proc/self/status) is per process, so the timing
process (which holds every configuration at once) cannot give it. One worker per case
(``python -m melora.lab.bench.memory``) first runs every configuration once on a few tokens (so that lazy
initialisations are not charged to whichever configuration comes first), then builds the configurations
one after the other; for each, once the model is built, the mark is reset (writing "5" to /proc/self/clear_refs, Linux >= 4.0) and warm-up + one
training step run. The worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor is its own
mapping and freeing it gives the memory back to the OS: the previous configuration's memory cannot be
reused unseen. Reported: ``peak_mb`` (the worker at its peak: imports, the model and for the e2e level
the shared base it was copied from, inputs, activations, gradients, optimizer state) and ``step_mb``
(``peak_mb`` minus the resident size just before training: what the training step adds). Where the reset
is not allowed, ``hwm_reset`` is False and ``peak_mb`` may include earlier peaks.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, same two numbers.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from melora.lab.bench.config import Experiment, LayerShape, MethodSpec, ModelCase

MARKER = "MELORA_BENCH_MEMORY "


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line.")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _measure_workload(workload, device: torch.device, steps: int) -> dict[str, Any]:
    from melora.lab.bench.workload import synchronize

    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            workload.train_step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20, "source": "cuda_max_allocated"}
    before_kib = _status_kib("VmRSS")
    reset = _reset_hwm()
    for _ in range(steps):
        workload.train_step()
    peak_kib = _status_kib("VmHWM")
    return {
        "peak_mb": peak_kib / 1024,
        "step_mb": (peak_kib - before_kib) / 1024,
        "source": "VmHWM",
        "hwm_reset": reset,
    }


def measure_in_this_process(
    experiment: Experiment, case: LayerShape | ModelCase, specs: list[MethodSpec]
) -> dict[str, dict[str, Any]]:
    """label -> memory numbers (MB) of warm-up + 1 training steps, one configuration after the other."""
    from melora.lab.bench.configurations import WorkloadFactory
    from melora.lab.bench.workload import resolve_device

    if experiment.threads:
        torch.set_num_threads(experiment.threads)
    device = resolve_device(experiment.device)
    factory = WorkloadFactory(experiment, device)
    for spec in specs:  # first use of each code path (lazy inits, kernels) outside the measurements
        workload = factory(_small(case), spec)
        for _ in range(2):
            workload.train_step()
        del workload
    results = {}
    for spec in specs:
        workload = factory(case, spec)
        if spec.compiled:  # compiling (for these shapes) is not part of the step's memory
            workload.train_step()
        _release_memory()
        results[spec.label] = _measure_workload(workload, device, max(experiment.warmup, 1) + 1)
        del workload
        _release_memory()
    return results


def _small(case: LayerShape | ModelCase) -> LayerShape | ModelCase:
    """The same layer or model on a handful of tokens."""
    if isinstance(case, LayerShape):
        return replace(case, tokens=8)
    return replace(case, batch=1, seq_len=8)


def _payload(experiment: Experiment, case: LayerShape | ModelCase, specs: list[MethodSpec]) -> str:
    return json.dumps(
        {
            "experiment": {k: v for k, v in asdict(experiment).items() if k not in ("shapes", "models")},
            "case": asdict(case),
            "level": experiment.level,
            "specs": [asdict(spec) for spec in specs],
        }
    )


def measure_in_subprocess(
    experiment: Experiment, case: LayerShape | ModelCase, specs: list[MethodSpec], timeout_s: float = 1800
) -> dict[str, dict[str, Any]]:
    """Run :func:`measure_in_this_process` in a fresh worker interpreter and return its numbers."""
    completed = subprocess.run(
        [sys.executable, "-m", "melora.lab.bench.memory", _payload(experiment, case, specs)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    for line in completed.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    raise RuntimeError(
        f"memory measurement on {case.label} failed (exit {completed.returncode}):\n"
        f"{completed.stderr[-2000:]}"
    )


def _main(payload: str) -> None:
    data = json.loads(payload)
    settings = data["experiment"]
    settings["melora"] = [tuple(pair) for pair in settings["melora"]]
    settings["baselines"] = tuple(settings["baselines"])
    settings["variants"] = tuple(settings["variants"])
    if data["level"] != "e2e":
        case: LayerShape | ModelCase = LayerShape(**data["case"])
        experiment = Experiment(shapes=[case], **settings)
    else:
        case = ModelCase(**{**data["case"], "target_modules": tuple(data["case"]["target_modules"])})
        experiment = Experiment(models=[case], **settings)
    result = measure_in_this_process(experiment, case, [MethodSpec(**spec) for spec in data["specs"]])
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
