"""The tensor math of MELoRA, as pure functions (imports torch only).

Letters used in shape comments:
    T  tokens (all leading dimensions of the input flattened)
    n  number of mini LoRAs (blocks on the diagonal)
    r  rank of each mini LoRA
    k  input features per block  (d_in / n)
    o  output features per block (d_out / n)

A MELoRA adapter holds ``A`` of shape (n, r, k) and ``B`` of shape (n, o, r). Block i maps input
slice i (features i*k ... (i+1)*k) to output slice i, so the update to ``W`` (d_out, d_in) is

    dW = scaling * blockdiag(B_1 A_1, ..., B_n A_n)        (n*o, n*k)

which has rank up to n*r while holding r * (d_in + d_out) parameters.
"""

from __future__ import annotations

import torch


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """Place ``n`` blocks of shape (p, q) on the diagonal of a zero matrix.

    Args:
        blocks: (n, p, q)
    Returns:
        (n*p, n*q) with ``blocks[i]`` at rows i*p.., columns i*q.. and zeros elsewhere.
    """
    n, p, q = blocks.shape
    dense = blocks.new_zeros(n, p, n, q)  # (n, p, n, q)
    index = torch.arange(n, device=blocks.device)
    dense[index, :, index, :] = blocks  # diagonal entries (i, :, i, :) <- block i
    return dense.reshape(n * p, n * q)


def melora_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense weight update ``scaling * blockdiag(B_i A_i)``.

    Args:
        A: (n, r, k)
        B: (n, o, r)
    Returns:
        (n*o, n*k), i.e. (d_out, d_in), in the dtype of the inputs.
    """
    blocks = torch.bmm(B, A)  # (n, o, k)
    return block_diagonal(blocks) * scaling


def melora_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter output ``scaling * concat_i(B_i A_i x_i)`` for any leading dimensions.

    No loop over blocks; two matmuls whose layout depends on the total rank n*r (measured in
    docs/benchmarks.md, "What was tried"):
    - n*r <= 32: dense matmuls with the block-diagonal factors (n*r, d_in) and (d_out, n*r). No copy of x or
      of the output; the zeros cost n times LoRA(r)'s flops, which is nothing next to the memory traffic
      at such small ranks.
    - n*r > 32: batched matmuls over the n blocks on strided views of x (no input copy); only the output is
      transposed back, and the flops stay those of LoRA(r).
    The scaling is applied to the rank-(n*r) intermediate, the smallest tensor on the path.

    Args:
        x: (..., d_in), contiguous or not
        A: (n, r, k) with n*k == d_in
        B: (n, o, r)
    Returns:
        (..., n*o) = (..., d_out)
    """
    n, r, k = A.shape
    leading = x.shape[:-1]
    if x.shape[-1] != n * k:
        raise ValueError(
            f"melora_forward: input has {x.shape[-1]} features, the adapter expects n*k = {n}*{k} = {n * k}."
        )
    if n * r <= 32:  # the crossover measured on CPU (docs/benchmarks.md)
        A_dense = A[0] if n == 1 else block_diagonal(A)  # (n*r, d_in); n = 1: a view, no copy
        B_dense = B[0] if n == 1 else block_diagonal(B)  # (d_out, n*r)
        hidden = torch.nn.functional.linear(x, A_dense) * scaling  # (..., n*r)
        return torch.nn.functional.linear(hidden, B_dense)  # (..., n*o)
    x_blocks = x.reshape(-1, n, k).transpose(0, 1)  # (n, T, k), a strided view when x is contiguous
    hidden = torch.bmm(x_blocks, A.transpose(1, 2)) * scaling  # (n, T, r)
    out = torch.bmm(hidden, B.transpose(1, 2))  # (n, T, o)
    return out.transpose(0, 1).reshape(*leading, n * B.shape[1])  # (..., d_out)


def to_lora_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA factors of rank n*r holding the MELoRA update exactly.

    ``lora_B @ lora_A == blockdiag(B_i A_i)``; the scaling is left to the caller.

    Args:
        A: (n, r, k)
        B: (n, o, r)
    Returns:
        lora_A (n*r, d_in) and lora_B (d_out, n*r).
    """
    return block_diagonal(A), block_diagonal(B)


def init_melora_factors(A: torch.Tensor, B: torch.Tensor, zero_B: bool = True) -> None:
    """Initialise in place: each A_i like ``nn.Linear(k, r)`` (kaiming-uniform, bound 1/sqrt(k)); B zero.

    With ``zero_B=False`` B gets the same kind of uniform init (bound 1/sqrt(r)), so the adapter is visible
    from step 0 (for tests).

    Args:
        A: (n, r, k)
        B: (n, o, r)
    """
    with torch.no_grad():
        k = A.shape[-1]
        A.uniform_(-(k**-0.5), k**-0.5)
        if zero_B:
            B.zero_()
        else:
            r = B.shape[-1]
            B.uniform_(-(r**-0.5), r**-0.5)
