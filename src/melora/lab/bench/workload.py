"""What the harness times: a :class:`Workload` (one configuration's closures), and the device helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from melora.lab.bench.config import MethodSpec


@dataclass
class Workload:
    """One configuration ready to time."""

    spec: MethodSpec
    model: nn.Module
    train_step: Callable[[], None]
    forward: Callable[[], None]
    merge: Callable[[], None]
    unmerge: Callable[[], None]
    trainable_params: int

    @property
    def label(self) -> str:
        return self.spec.label


def compiled(model: nn.Module) -> Callable[..., object]:
    """``torch.compile(model)`` with room in dynamo's cache for every configuration of a run.

    A run compiles the same ``forward`` code for many models and for three modes each (train, inference,
    merged); past dynamo's default cache limit (8 entries per code object) it would silently fall back to
    eager for the later configurations.
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4096
    )
    return torch.compile(model)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device: auto or cpu.")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
