"""The GPU path, run on the device named by ``MELORA_TEST_DEVICE`` (default cpu; benchmarks/gpu.sh sets cuda).

On CPU these check the same code paths in the same dtypes (bf16 base, fp32 adapter, autocast, compile);
the host-sync check needs CUDA and skips elsewhere.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import get_peft_model

from melora import MELoRAConfig
from melora.functional import melora_forward
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("MELORA_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"MELORA_TEST_DEVICE={name} but torch sees no CUDA device")
    return torch.device(name)


def _dense_update(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * blockdiag(B_i A_i), block by block, in float64 on the CPU: the reference."""
    blocks = [B[i].double().cpu() @ A[i].double().cpu() for i in range(A.shape[0])]
    return torch.block_diag(*blocks) * scaling


@pytest.mark.parametrize(("n", "r"), [(8, 1), (4, 8), (32, 2)])  # n*r = 8, 32: dense path; 64: bmm path
def test_forward_and_grads_on_device_equal_the_dense_reference(device, n, r):
    g = torch.Generator().manual_seed(n + r)
    d_in, d_out, tokens = 128, 64, 48
    A = torch.randn(n, r, d_in // n, generator=g).to(device).requires_grad_()
    B = torch.randn(n, d_out // n, r, generator=g).to(device).requires_grad_()
    x = torch.randn(3, tokens // 3, d_in, generator=g).to(device).requires_grad_()
    out = melora_forward(x, A, B, 0.5)
    assert out.device.type == device.type and out.shape == (3, tokens // 3, d_out)
    reference = x.detach().double().cpu() @ _dense_update(A.detach(), B.detach(), 0.5).T
    torch.testing.assert_close(out.detach().double().cpu(), reference, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn(out.shape, generator=g).to(device)
    out.backward(grad_out)
    # d/dx of <grad_out, x dW^T> is grad_out dW; finite-difference-free, from the dense reference
    expected_dx = grad_out.double().cpu() @ _dense_update(A.detach(), B.detach(), 0.5)
    torch.testing.assert_close(x.grad.double().cpu(), expected_dx, rtol=1e-4, atol=1e-4)
    assert A.grad.shape == A.shape and B.grad.shape == B.shape and torch.isfinite(A.grad).all()


def _peft_llama(device: torch.device, dtype: torch.dtype, **config):
    torch.manual_seed(0)
    base = tiny_llama().to(device=device, dtype=dtype)
    settings = {"r": 2, "n": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False, **config}
    return get_peft_model(base, MELoRAConfig(**settings))


def test_bf16_base_keeps_fp32_adapter_weights_and_matches_an_fp32_run(device):
    model = _peft_llama(device, torch.bfloat16)
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(
        p.dtype == torch.float32 for p in adapter.values()
    )  # PEFT's autocast_adapter_dtype
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    reference = copy.deepcopy(model).float()  # the same weights, all fp32
    ids = torch.randint(0, 100, (2, 12), device=device)
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference(input_ids=ids).logits, rtol=0.05, atol=0.05)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in adapter.values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_autocast_bf16_trains_fp32_adapters(device):
    model = _peft_llama(device, torch.float32)
    ids = torch.randint(0, 100, (2, 12), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert losses[-1] < losses[0], losses


def test_merge_in_bf16_matches_the_unmerged_model(device):
    model = _peft_llama(device, torch.bfloat16)
    model.eval()
    ids = torch.randint(0, 100, (2, 12), device=device)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        model.merge_adapter()
        merged = model(input_ids=ids).logits.float()
        model.unmerge_adapter()
        restored = model(input_ids=ids).logits.float()
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)  # bf16 rounding of W + dW
    torch.testing.assert_close(restored, unmerged, rtol=0.05, atol=0.05)


def test_forward_and_backward_make_no_host_sync(device):
    if device.type != "cuda":
        pytest.skip("host-device synchronisation exists only on CUDA")
    model = _peft_llama(device, torch.bfloat16)
    ids = torch.randint(0, 100, (2, 12), device=device)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 12, layer.in_features, device=device, dtype=torch.bfloat16)
    layer(x)  # first call: lazy initialisations outside the checked region
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().sum().backward()
        model(input_ids=ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_model_on_device_equals_eager(device):
    torch._dynamo.reset()
    model = _peft_llama(device, torch.float32)
    model.eval()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)  # inductor: the backend users get
    ids = torch.randint(0, 100, (2, 12), device=device)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
