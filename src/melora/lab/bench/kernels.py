"""Alternative implementations of the MELoRA adapter path, timed against each other (``level: kernel``).

Each variant computes ``scaling * concat_i(B_i A_i x_i)`` exactly (up to float summation order); they
differ in how the work is laid out. Letters as in :mod:`melora.functional` (T tokens, n blocks, r rank,
k = d_in / n, o = d_out / n).

- ``einsum``: the first implementation: two ``torch.einsum`` calls.
- ``bmm``: two batched matmuls over n on strided views of x: no input copy, but the output (n, T, o) must
  be transposed back to (T, n*o) (one copy forward, one for the input gradient).
- ``blockdiag``: two dense matmuls with the block-diagonal factors (n*r, d_in) and (d_out, n*r): no copy,
  n times the flops of LoRA(r) (those of LoRA(n*r)).
- ``bmm_blockdiag`` / ``blockdiag_bmm``: one stage of each.
- ``current``: whatever :func:`melora.functional.melora_forward` does now.
The LoRA references are the same adapter path with dense factors of rank r and n*r.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from melora.functional import block_diagonal, melora_forward
from melora.lab.bench.config import KERNEL_VARIANTS, Experiment, LayerShape, MethodSpec
from melora.lab.bench.workload import Workload

Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def einsum_variant(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    n, r, k = A.shape
    x_blocks = x.reshape(-1, n, k)  # (T, n, k)
    hidden = torch.einsum("tnk,nrk->tnr", x_blocks, A) * scaling  # (T, n, r)
    out = torch.einsum("tnr,nor->tno", hidden, B)  # (T, n, o)
    return out.reshape(*x.shape[:-1], -1)  # (..., n*o)


def bmm_variant(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    n, r, k = A.shape
    x_blocks = x.reshape(-1, n, k).transpose(0, 1)  # (n, T, k), a view
    hidden = torch.bmm(x_blocks, A.transpose(1, 2)) * scaling  # (n, T, r)
    out = torch.bmm(hidden, B.transpose(1, 2))  # (n, T, o)
    return out.transpose(0, 1).reshape(*x.shape[:-1], -1)  # (..., n*o), a copy


def blockdiag_variant(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    hidden = F.linear(x, block_diagonal(A)) * scaling  # (..., n*r)
    return F.linear(hidden, block_diagonal(B))  # (..., n*o)


def bmm_blockdiag_variant(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    n, r, k = A.shape
    x_blocks = x.reshape(-1, n, k).transpose(0, 1)  # (n, T, k), a view
    hidden = torch.bmm(x_blocks, A.transpose(1, 2)) * scaling  # (n, T, r)
    hidden = hidden.transpose(0, 1).reshape(*x.shape[:-1], n * r)  # (..., n*r), a small copy
    return F.linear(hidden, block_diagonal(B))  # (..., n*o)


def blockdiag_bmm_variant(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    n, r, _ = A.shape
    hidden = F.linear(x, block_diagonal(A)) * scaling  # (..., n*r)
    hidden = hidden.reshape(-1, n, r).transpose(0, 1)  # (n, T, r)
    out = torch.bmm(hidden, B.transpose(1, 2))  # (n, T, o)
    return out.transpose(0, 1).reshape(*x.shape[:-1], -1)  # (..., n*o)


VARIANTS: dict[str, Variant] = {
    "einsum": einsum_variant,
    "bmm": bmm_variant,
    "blockdiag": blockdiag_variant,
    "bmm_blockdiag": bmm_blockdiag_variant,
    "blockdiag_bmm": blockdiag_bmm_variant,
    "current": melora_forward,
}
assert tuple(VARIANTS) == KERNEL_VARIANTS


def lora_path(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA's adapter path: A (r, d_in), B (d_out, r); (..., d_in) -> (..., d_out)."""
    return F.linear(F.linear(x, A) * scaling, B)


def kernel_workload(experiment: Experiment, shape: LayerShape, spec: MethodSpec, device: torch.device):
    """The adapter path alone: x (T, d) requires grad; train = forward + backward with a fixed output grad."""
    dtype = getattr(torch, experiment.dtype)
    generator = torch.Generator().manual_seed(experiment.seed)
    d, d_out, r, n = shape.d, shape.out_features, spec.r, spec.n

    def tensor(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * 0.02).to(device=device, dtype=dtype)

    if spec.name == "melora" and (d % n or d_out % n):
        raise ValueError(f"n={n} does not divide both features of {shape.label}.")
    x, grad_out = tensor(shape.tokens, d), tensor(shape.tokens, d_out)
    if spec.name == "melora":
        fn, A, B = VARIANTS[spec.impl], tensor(n, r, d // n), tensor(n, d_out // n, r)
    else:
        fn, A, B = lora_path, tensor(r, d), tensor(d_out, r)
    for leaf in (x, A, B):
        leaf.requires_grad_(True)

    def train_step() -> None:
        x.grad = A.grad = B.grad = None
        fn(x, A, B, 2.0).backward(grad_out)

    def forward() -> None:
        with torch.inference_mode():
            fn(x, A, B, 2.0)

    def nothing() -> None:
        return None

    return Workload(spec, torch.nn.Module(), train_step, forward, nothing, nothing, A.numel() + B.numel())
