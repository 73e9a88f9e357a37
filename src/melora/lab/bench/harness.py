"""Timing harness: warm up, then measure all configurations of a case round-robin, repeat after repeat.

Interleaving matters on a shared machine: a slow period hits every configuration of the same repeat, so
ratios computed per repeat (paired) are far steadier than absolute times. Each measurement runs the
closure ``number`` times (calibrated in the warm-up so one measurement lasts at least ``min_time_s``)
and records the mean per call; on CUDA the device is synchronised before and after.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable

import torch

from melora.lab.bench.workload import Workload, synchronize

logger = logging.getLogger(__name__)

KINDS = ("train", "forward", "forward_merged")
MAX_NUMBER = 50


def time_call(fn: Callable[[], None], device: torch.device, number: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` calls, with device synchronisation."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / number


def _measure_kind(workload: Workload, kind: str, device: torch.device, number: int) -> float:
    if kind == "forward_merged":
        workload.merge()  # merging is not part of the timed region
        try:
            return time_call(workload.forward, device, number)
        finally:
            workload.unmerge()
    fn = workload.train_step if kind == "train" else workload.forward
    return time_call(fn, device, number)


def calibrate(workload: Workload, device: torch.device, warmup: int, min_time_s: float) -> dict[str, int]:
    """Run ``warmup`` calls of each kind (at least one) and pick the number of calls per measurement.

    A compiled workload first runs each kind once untimed: that call compiles."""
    numbers = {}
    for kind in KINDS:
        if workload.spec.compiled:
            _measure_kind(workload, kind, device, 1)
        seconds = math.inf
        for _ in range(max(warmup, 1)):
            seconds = min(seconds, _measure_kind(workload, kind, device, 1))
        numbers[kind] = max(1, min(MAX_NUMBER, math.ceil(min_time_s / max(seconds, 1e-9))))
    return numbers


def measure_interleaved(
    workloads: list[Workload], device: torch.device, repeats: int, warmup: int, min_time_s: float
) -> dict[str, dict[str, list[float]]]:
    """label -> kind -> one time (s) per repeat; in each repeat every workload is measured once, in a
    rotated order so that no configuration always runs first."""
    numbers = {w.label: calibrate(w, device, warmup, min_time_s) for w in workloads}
    times = {w.label: {kind: [] for kind in KINDS} for w in workloads}
    for repeat in range(repeats):
        shift = repeat % len(workloads)
        for workload in workloads[shift:] + workloads[:shift]:
            for kind in KINDS:
                seconds = _measure_kind(workload, kind, device, numbers[workload.label][kind])
                times[workload.label][kind].append(seconds)
        logger.info("repeat %d/%d done", repeat + 1, repeats)
    return times


def stats(values: list[float]) -> dict[str, float]:
    """Median, min and max of a list of times (seconds)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
