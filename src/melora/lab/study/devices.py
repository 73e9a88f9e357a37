"""The GPUs of one machine, handed out to a study's runs: each run gets its own ``CUDA_VISIBLE_DEVICES``.

A study with ``gpus_per_run: g`` runs as many runs at once as the machine's GPUs hold: ``g = 1`` one run
per GPU, ``g = 2`` two whole GPUs per run, ``g = 0.5`` two runs sharing each GPU (small models), and
``g = 0`` runs that see no GPU at all (``CUDA_VISIBLE_DEVICES=""``). Ray's own rule for fractions is
kept: a run asks for a fraction of one GPU or for whole GPUs, never 1.5.
"""

from __future__ import annotations

import os
import threading

from melora.lab.args import UserError

_EPS = 1e-9


def machine_gpus(count: int | None = None) -> list[str]:
    """The GPU ids this process may hand out: ``--gpus N`` (ids 0..N-1, or the first N of
    ``CUDA_VISIBLE_DEVICES``), else ``CUDA_VISIBLE_DEVICES`` when set, else every GPU torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    listed = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else None
    if count is not None:
        if count < 0:
            raise UserError(f"--gpus {count}: expected the number of GPUs of this machine, >= 0.")
        if listed is not None and count > len(listed):
            raise UserError(
                f"--gpus {count}: CUDA_VISIBLE_DEVICES={visible!r} lists only {len(listed)}; "
                "give --gpus at most that, or unset CUDA_VISIBLE_DEVICES."
            )
        return listed[:count] if listed is not None else [str(i) for i in range(count)]
    if listed is not None:
        return listed
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class GpuPool:
    """Hands out ``per_run`` GPUs to each run from ``devices``; thread-safe.

    A fraction goes to the GPU with the most room left (runs spread before they share); whole GPUs are
    taken only when entirely free.
    """

    def __init__(self, devices: list[str], per_run: float) -> None:
        self.devices = list(devices)
        self.per_run = per_run
        self._free = {device: 1.0 for device in self.devices}
        self._guard = threading.Lock()

    @property
    def capacity(self) -> int:
        """How many runs fit at once (0 when none does; ``per_run`` 0: no limit from GPUs, reported as 0)."""
        if self.per_run <= 0:
            return 0
        if self.per_run <= 1:
            return len(self.devices) * int(1 / self.per_run + _EPS)
        return len(self.devices) // int(self.per_run)

    def take(self) -> list[str] | None:
        """The GPU ids for one more run, or None when they are all in use."""
        with self._guard:
            if self.per_run <= 0:
                return []
            if self.per_run <= 1:
                device = max(
                    self.devices, key=lambda d: (self._free[d], -self.devices.index(d)), default=None
                )
                if device is None or self._free[device] + _EPS < self.per_run:
                    return None
                self._free[device] -= self.per_run
                return [device]
            whole = [d for d in self.devices if self._free[d] >= 1.0 - _EPS][: int(self.per_run)]
            if len(whole) < int(self.per_run):
                return None
            for device in whole:
                self._free[device] = 0.0
            return whole

    def give(self, taken: list[str]) -> None:
        """Return what :meth:`take` gave."""
        with self._guard:
            share = self.per_run if self.per_run <= 1 else 1.0
            for device in taken:
                self._free[device] = min(1.0, self._free[device] + share)


def local_pool(per_run: float | None, count: int | None = None) -> GpuPool | None:
    """The pool for a local study, or None when the study leaves GPUs alone (no ``gpus_per_run``)."""
    if per_run is None:
        return None
    devices = machine_gpus(count) if per_run > 0 else []
    pool = GpuPool(devices, per_run)
    if per_run > 0 and pool.capacity == 0:
        raise UserError(
            f"gpus_per_run={per_run:g} but this machine has {len(devices)} GPU(s) "
            f"({'CUDA_VISIBLE_DEVICES=' + repr(os.environ['CUDA_VISIBLE_DEVICES']) if 'CUDA_VISIBLE_DEVICES' in os.environ else 'as torch sees them'}): "
            "set gpus_per_run: 0 to run on CPU, lower it, or give --gpus N."
        )
    return pool
