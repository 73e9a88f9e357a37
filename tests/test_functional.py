"""The pure tensor math against independent references (a dense block-diagonal matrix, finite differences)."""

from __future__ import annotations

import pytest
import torch

from melora.functional import (
    block_diagonal,
    init_melora_factors,
    melora_delta_weight,
    melora_forward,
    to_lora_factors,
)


def _factors(n, r, d_in, d_out, dtype=torch.float32):
    g = torch.Generator().manual_seed(n * 100 + r)
    A = torch.randn(n, r, d_in // n, generator=g, dtype=dtype)
    B = torch.randn(n, d_out // n, r, generator=g, dtype=dtype)
    return A, B


def _dense_reference(A, B, scaling):
    """scaling * blockdiag(B_i A_i), built block by block with torch.block_diag."""
    return torch.block_diag(*[B[i] @ A[i] for i in range(A.shape[0])]) * scaling


@pytest.mark.parametrize(
    ("n", "r", "d_in", "d_out"), [(1, 2, 12, 8), (4, 1, 16, 24), (8, 2, 32, 16), (3, 4, 9, 12)]
)
def test_delta_weight_equals_block_diag_of_products(n, r, d_in, d_out):
    A, B = _factors(n, r, d_in, d_out)
    delta = melora_delta_weight(A, B, scaling=0.5)
    assert delta.shape == (d_out, d_in)
    torch.testing.assert_close(delta, _dense_reference(A, B, 0.5))


def test_block_diagonal_places_blocks_and_zeros():
    blocks = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3) + 1
    torch.testing.assert_close(block_diagonal(blocks), torch.block_diag(blocks[0], blocks[1]))


@pytest.mark.parametrize("leading", [(5,), (2, 7), (2, 3, 4)])
@pytest.mark.parametrize(("n", "r"), [(1, 1), (4, 2), (8, 1)])
def test_forward_matches_dense_matmul(leading, n, r):
    d_in, d_out = 16, 24
    A, B = _factors(n, r, d_in, d_out)
    x = torch.randn(*leading, d_in)
    out = melora_forward(x, A, B, scaling=2.0)
    assert out.shape == (*leading, d_out)
    torch.testing.assert_close(out, x @ _dense_reference(A, B, 2.0).T)


def test_forward_non_contiguous_input():
    A, B = _factors(4, 2, 16, 8)
    x = torch.randn(16, 6, 3).permute(2, 1, 0)  # (3, 6, 16), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(melora_forward(x, A, B, 1.0), x @ _dense_reference(A, B, 1.0).T)


def test_forward_rejects_wrong_feature_count():
    A, B = _factors(4, 1, 16, 8)
    with pytest.raises(ValueError, match=r"input has 12 features, the adapter expects n\*k = 4\*4 = 16"):
        melora_forward(torch.randn(2, 12), A, B, 1.0)


def test_gradients_match_finite_differences():
    A, B = _factors(2, 2, 6, 4, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, A, B: melora_forward(x, A, B, 1.5), (x, A, B))


def test_lora_factors_reproduce_the_update():
    A, B = _factors(4, 2, 16, 12)
    lora_A, lora_B = to_lora_factors(A, B)
    assert lora_A.shape == (8, 16) and lora_B.shape == (12, 8)
    torch.testing.assert_close(lora_B @ lora_A, _dense_reference(A, B, 1.0))
    assert torch.linalg.matrix_rank(lora_B @ lora_A) == 8  # rank n*r from r*(d_in+d_out) parameters


def test_init_is_kaiming_uniform_per_block_and_zero_b():
    A = torch.empty(8, 4, 64)
    B = torch.empty(8, 32, 4)
    init_melora_factors(A, B, zero_B=True)
    bound = 64**-0.5  # nn.Linear(64, 4) bound: 1/sqrt(fan_in) with fan_in = d_in/n
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(B) == 0
    init_melora_factors(A, B, zero_B=False)
    assert torch.count_nonzero(B) == B.numel()
