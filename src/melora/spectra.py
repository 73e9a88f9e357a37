"""Spectra and block diversity of LoRA and MELoRA updates, as pure functions (imports torch only).

Everything is computed from the factors, in float64, without forming the d_out x d_in update.

Letters used in shape comments (as in ``melora.functional``):
    n  number of mini LoRAs (blocks on the diagonal)
    r  rank of each mini LoRA (of the LoRA)
    k  input features per block  (d_in / n)
    o  output features per block (d_out / n)
    m  dimension of an ambient space (k for row spaces, o for column spaces)
    p  number of vectors spanning a subspace

A LoRA update is ``dW = s * B A`` with A (r, d_in), B (d_out, r); a MELoRA update is
``dW = s * blockdiag(B_1 A_1, ..., B_n A_n)`` with A (n, r, k), B (n, o, r). The singular values of a
block-diagonal matrix are the union of its blocks' singular values, and a block's singular values come from an
r x r matrix: with thin QR factorisations ``B_i = Q_B R_B`` and ``A_i^T = Q_A R_A``,
``B_i A_i = Q_B (R_B R_A^T) Q_A^T`` where Q_B and Q_A have orthonormal columns, so ``B_i A_i`` and the small
``R_B R_A^T`` have the same non-zero singular values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# A singular value below this fraction of the largest one counts as zero when a basis's rank is revealed.
RANK_RTOL = 1e-8


def _block_singular_values(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Singular values of each block ``B_i A_i`` (unscaled), by the thin-QR reduction.

    Args:
        A: (n, r, k)
        B: (n, o, r)
    Returns:
        (n, min(r, o, k)) in float64, each row descending.
    """
    R_B = torch.linalg.qr(B.double(), mode="reduced").R  # (n, min(o, r), r)
    R_A = torch.linalg.qr(A.double().transpose(1, 2), mode="reduced").R  # (n, min(k, r), r)
    core = R_B @ R_A.transpose(1, 2)  # (n, min(o, r), min(k, r))
    return torch.linalg.svdvals(core)  # (n, min(r, o, k))


def lora_singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of the LoRA update ``dW = scaling * B A``, without forming dW.

    Args:
        A: (r, d_in)
        B: (d_out, r)
        scaling: s (alpha / r, or alpha / sqrt(r) with rsLoRA)
    Returns:
        (min(r, d_out, d_in),) float64, descending; zeros are kept.
    """
    values = _block_singular_values(A.unsqueeze(0), B.unsqueeze(0))[0]  # (min(r, d_out, d_in),)
    return values * abs(scaling)


def melora_singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of the MELoRA update ``dW = scaling * blockdiag(B_1 A_1, ..., B_n A_n)``.

    A block-diagonal matrix's singular values are the union of its blocks' singular values.

    Args:
        A: (n, r, k)
        B: (n, o, r)
        scaling: s = alpha / r
    Returns:
        (n * min(r, o, k),) float64, descending (n * r values for any valid adapter); zeros are kept.
    """
    values = _block_singular_values(A, B).flatten() * abs(scaling)  # (n * min(r, o, k),)
    return torch.sort(values, descending=True).values


def entropy_effective_rank(singular_values: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli, 2007): ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum_j s_j``.

    Terms with p_k = 0 contribute 0 (0 log 0 = 0). It equals m for m equal non-zero values, 1 for a single
    one, and lies in between otherwise. All zeros (or no values): 0.0.

    Args:
        singular_values: (m,) non-negative
    """
    s = singular_values.double()
    total = s.sum()
    if s.numel() == 0 or total <= 0:
        return 0.0
    p = s[s > 0] / total  # (m',) the non-zero probabilities
    return math.exp(float(-(p * p.log()).sum()))


def rank_above(singular_values: torch.Tensor, fraction: float = 0.01) -> int:
    """The number of singular values strictly above ``fraction`` times the largest (0 for all zeros).

    Args:
        singular_values: (m,) non-negative
        fraction: in [0, 1)
    """
    if not 0 <= fraction < 1:
        raise ValueError(
            f"melora.spectra.rank_above: fraction={fraction}; choose a value in [0, 1), e.g. 0.01."
        )
    s = singular_values.double()
    if s.numel() == 0:
        return 0
    return int((s > fraction * s.max()).sum())


def _product_energy(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``||B_i A_i||_F^2`` per block, as ``sum((B_i^T B_i) * (A_i A_i^T))`` (two r x r Gram matrices).

    Args:
        A: (n, r, k)
        B: (n, o, r)
    Returns:
        (n,) float64
    """
    A, B = A.double(), B.double()
    gram_B = torch.einsum("nor,nos->nrs", B, B)  # (n, r, r)
    gram_A = torch.einsum("nrk,nsk->nrs", A, A)  # (n, r, r)
    return (gram_B * gram_A).sum(dim=(1, 2)).clamp(min=0)  # (n,)


def block_frobenius_norms(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The Frobenius norm of each scaled block, ``||s B_i A_i||_F``, from the factors.

    Args:
        A: (n, r, k)
        B: (n, o, r)
    Returns:
        (n,) float64
    """
    return _product_energy(A, B).sqrt() * abs(scaling)


def energy_shares(block_norms: torch.Tensor) -> torch.Tensor:
    """How much of dW's energy each block carries: ``||dW_i||_F^2 / sum_j ||dW_j||_F^2`` (sums to 1).

    The blocks sit on the diagonal, so their energies add up to ``||dW||_F^2``. All-zero blocks: all zeros.

    Args:
        block_norms: (n,) Frobenius norms of the blocks
    Returns:
        (n,) float64
    """
    energy = block_norms.double() ** 2
    total = energy.sum()
    return energy / total if total > 0 else torch.zeros_like(energy)


def effective_block_count(shares: torch.Tensor) -> float:
    """``exp(-sum_i q_i log q_i)`` of the energy shares q: 1 when one block carries all, n when all carry 1/n.

    The entropy effective rank applied to the shares (which already sum to 1).

    Args:
        shares: (n,) from ``energy_shares``
    """
    return entropy_effective_rank(shares)


def coefficient_of_variation(values: torch.Tensor) -> float:
    """``std / mean`` with the population standard deviation (0.0 for equal values or a zero mean).

    Args:
        values: (n,)
    """
    v = values.double()
    mean = v.mean()
    if v.numel() == 0 or mean == 0:
        return 0.0
    return float(v.std(correction=0) / mean)


def orthonormal_basis(span: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """Orthonormal columns spanning the column space of ``span``, as many as its numerical rank.

    The rank counts singular values above ``rtol`` times the largest (an SVD reveals it; a QR without pivoting
    would keep directions of a rank-deficient spanning set).

    Args:
        span: (m, p)
    Returns:
        (m, rank) float64 with orthonormal columns; (m, 0) for a zero matrix.
    """
    U, s, _ = torch.linalg.svd(span.double(), full_matrices=False)  # (m, min(m, p)), (min(m, p),)
    if s.numel() == 0 or s[0] == 0:
        return U[:, :0]
    return U[:, : int((s > rtol * s[0]).sum())]


def principal_angle_cosines(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of U and V (Bjorck & Golub, 1973).

    With orthonormal bases Q_U and Q_V of the two spaces, the cosines are the singular values of
    ``Q_U^T Q_V``: 1 for a shared direction, 0 for orthogonal ones.

    Args:
        U: (m, p)
        V: (m, q)
    Returns:
        (min(rank U, rank V),) float64 in [0, 1], descending.
    """
    Q_U, Q_V = orthonormal_basis(U), orthonormal_basis(V)  # (m, rank U), (m, rank V)
    return torch.linalg.svdvals(Q_U.T @ Q_V).clamp(max=1.0)  # (min(rank U, rank V),)


def mean_subspace_overlap(spans: Sequence[torch.Tensor]) -> float:
    """Mean over pairs i < j of the mean squared cosine of the principal angles between span i and span j.

    0 when every pair of subspaces is orthogonal, 1 when all are the same subspace (or nested). For one pair,
    the sum of the squared cosines is ``||Q_i^T Q_j||_F^2`` (Q orthonormal bases), divided here by the number
    of angles ``min(dim_i, dim_j)``. Pairs with a zero subspace have no angles and are left out; with no pair
    left the result is NaN.

    Args:
        spans: n matrices (m, p_i) whose columns span the subspaces of R^m
    """
    bases = [orthonormal_basis(span) for span in spans]
    dims = torch.tensor([basis.shape[1] for basis in bases], dtype=torch.float64)  # (n,)
    width = int(dims.max()) if bases else 0
    if width == 0:
        return math.nan
    stacked = torch.stack(
        [torch.nn.functional.pad(basis, (0, width - basis.shape[1])) for basis in bases]
    )  # (n, m, p): each basis padded with zero columns
    cross = torch.einsum("iap,jaq->ijpq", stacked, stacked)  # (n, n, p, p): Q_i^T Q_j
    squared_cosines = (cross**2).sum(dim=(2, 3))  # (n, n): sum of cos^2 of the principal angles
    angles = torch.minimum(dims[:, None], dims[None, :])  # (n, n): number of principal angles
    upper = torch.triu(torch.ones_like(angles, dtype=torch.bool), diagonal=1) & (angles > 0)  # pairs i < j
    if not upper.any():
        return math.nan
    return float((squared_cosines[upper] / angles[upper]).mean())


def random_subspace_overlap(dims: Sequence[int], ambient: int) -> float:
    """What ``mean_subspace_overlap`` gives in expectation for uniformly random subspaces of these dimensions.

    For independent random subspaces of dimensions p and q in R^m, ``E ||Q_p^T Q_q||_F^2 = p q / m``, so the
    expected mean squared cosine is ``max(p, q) / m`` (r / m for two r-dimensional ones). Averaged over the
    same pairs as ``mean_subspace_overlap`` (zero-dimensional ones left out); NaN without a pair.

    Args:
        dims: the subspaces' dimensions
        ambient: m
    """
    kept = [d for d in dims if d > 0]
    pairs = [max(a, b) / ambient for i, a in enumerate(kept) for b in kept[i + 1 :]]
    return sum(pairs) / len(pairs) if pairs else math.nan


def block_row_spans(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Matrices whose columns span the row space of each block ``B_i A_i``, in the block's input slice R^k.

    With ``B_i = Q_B R_B`` (Q_B orthonormal columns), ``B_i A_i`` and ``R_B A_i`` have the same row space.

    Args:
        A: (n, r, k)
        B: (n, o, r)
    Returns:
        (n, k, min(o, r)) float64
    """
    R_B = torch.linalg.qr(B.double(), mode="reduced").R  # (n, min(o, r), r)
    return (R_B @ A.double()).transpose(1, 2)  # (n, k, min(o, r))


def block_column_spans(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Matrices whose columns span the column space of each block ``B_i A_i``, in its output slice R^o.

    With ``A_i^T = Q_A R_A`` (Q_A orthonormal columns), ``B_i A_i`` and ``B_i R_A^T`` have the same column space.

    Args:
        A: (n, r, k)
        B: (n, o, r)
    Returns:
        (n, o, min(k, r)) float64
    """
    R_A = torch.linalg.qr(A.double().transpose(1, 2), mode="reduced").R  # (n, min(k, r), r)
    return B.double() @ R_A.transpose(1, 2)  # (n, o, min(k, r))


def diagonal_energy_fraction(A: torch.Tensor, B: torch.Tensor, n: int) -> float:
    """The fraction of ``||B A||_F^2`` lying in the n diagonal blocks of size (d_out/n, d_in/n).

    How much of a LoRA update a block-diagonal (MELoRA) update with n blocks could hold at all: 1 for a
    block-diagonal B A, 0 for one with nothing on the diagonal, about 1/n for a random dense matrix.
    Block i is ``B[i*o:(i+1)*o] A[:, i*k:(i+1)*k]``. NaN for B A = 0.

    Args:
        A: (r, d_in) with d_in divisible by n
        B: (d_out, r) with d_out divisible by n
        n: the number of diagonal blocks
    """
    r, d_in = A.shape
    d_out = B.shape[0]
    if n < 1 or d_in % n or d_out % n:
        raise ValueError(
            f"melora.spectra.diagonal_energy_fraction: n={n} does not divide d_out={d_out} and d_in={d_in}; "
            "choose n dividing both."
        )
    total = float(_product_energy(A.unsqueeze(0), B.unsqueeze(0))[0])
    if total == 0:
        return math.nan
    A_blocks = A.reshape(r, n, d_in // n).transpose(0, 1)  # (n, r, k): the columns of input slice i
    B_blocks = B.reshape(n, d_out // n, r)  # (n, o, r): the rows of output slice i
    return float(_product_energy(A_blocks, B_blocks).sum()) / total
