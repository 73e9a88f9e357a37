"""The wrapped layer against a dense reference W + blockdiag(scaling * B_i A_i), PEFT's LoRA, and itself merged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from melora import MELoRAConfig
from melora.tuner.layer import MELoRALayer


class TwoLayers(torch.nn.Module):
    def __init__(self, d_in=32, d_out=48, conv1d=False):
        super().__init__()
        self.proj = Conv1D(d_out, d_in) if conv1d else torch.nn.Linear(d_in, d_out)
        self.out = torch.nn.Linear(d_out, 8)

    def forward(self, x):
        return self.out(self.proj(x))


def _wrap(n=4, r=2, conv1d=False, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    base = TwoLayers(conv1d=conv1d).to(dtype)
    config = MELoRAConfig(r=r, n=n, alpha=8, target_modules=["proj"], init_weights=False, **kwargs)
    return base, get_peft_model(copy.deepcopy(base), config)


def _layer(model) -> MELoRALayer:
    return model.base_model.model.proj


def _dense_weight(layer: MELoRALayer, adapter="default") -> torch.Tensor:
    """W + blockdiag(scaling * B_i A_i) as (out, in), built by hand with torch.block_diag."""
    A, B = layer.melora_A[adapter].float(), layer.melora_B[adapter].float()
    delta = torch.block_diag(*[B[i] @ A[i] for i in range(A.shape[0])]) * layer.scaling[adapter]
    W = layer.get_base_layer().weight.float()
    W = W.T if isinstance(layer.get_base_layer(), Conv1D) else W
    return W + delta


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(("n", "r"), [(1, 1), (2, 4), (4, 2), (16, 1)])
@pytest.mark.parametrize("leading", [(5,), (2, 3), (2, 2, 3)], ids=["2d", "3d", "4d"])
def test_forward_equals_dense_reference(conv1d, n, r, leading):
    _, model = _wrap(n=n, r=r, conv1d=conv1d)
    layer = _layer(model)
    x = torch.randn(*leading, 32)
    expected = x @ _dense_weight(layer).T + layer.get_base_layer().bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert (layer.in_features, layer.out_features) == (32, 48)


def test_bf16_base_with_fp32_adapter_with_and_without_autocast():
    _, model = _wrap(dtype=torch.bfloat16)
    layer = _layer(model)
    assert layer.melora_A["default"].dtype == torch.float32  # PEFT upcasts adapter weights by default
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    expected = x.float() @ _dense_weight(layer).T + layer.get_base_layer().bias.float()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.03)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast = layer(x)
    assert out_autocast.dtype == torch.bfloat16
    torch.testing.assert_close(out_autocast.float(), expected, atol=0.1, rtol=0.03)


def test_fp16_base_runs_and_merges():
    _, model = _wrap(dtype=torch.float16)
    x = torch.randn(3, 32, dtype=torch.float16)
    before = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), before, atol=2e-2, rtol=2e-2)
    assert torch.isfinite(before).all()


def test_gradients_equal_dense_reference():
    _, model = _wrap(n=4, r=2)
    layer = _layer(model)
    A, B = layer.melora_A["default"], layer.melora_B["default"]
    x = torch.randn(6, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    # Reference: the same loss through a dense W + blockdiag(s * B_i A_i) built from leaf copies of A and B.
    A_ref, B_ref = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    W = layer.get_base_layer().weight.detach()
    dense = W + torch.block_diag(*[B_ref[i] @ A_ref[i] for i in range(4)]) * layer.scaling["default"]
    (x_ref @ dense.T + layer.get_base_layer().bias).pow(2).sum().backward()
    torch.testing.assert_close(A.grad, A_ref.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(B.grad, B_ref.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-5)


def test_only_adapter_parameters_train_and_change():
    _, model = _wrap()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.proj.melora_A.default", "base_model.model.proj.melora_B.default"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1
    )
    model(torch.randn(5, 32)).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == (name in trainable), name


def test_n1_equals_peft_lora_with_the_same_weights():
    torch.manual_seed(0)
    base = TwoLayers()
    melora = get_peft_model(
        copy.deepcopy(base), MELoRAConfig(r=4, n=1, alpha=8, target_modules=["proj"], init_weights=False)
    )
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = _layer(melora)
    lora_layer = lora.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(layer.melora_A["default"][0])
        lora_layer.lora_B["default"].weight.copy_(layer.melora_B["default"][0])
    x = torch.randn(7, 32)
    assert lora_layer.scaling["default"] == layer.scaling["default"] == 2.0
    torch.testing.assert_close(melora(x), lora(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_unmerge_round_trip(conv1d):
    base, model = _wrap(conv1d=conv1d)
    x = torch.randn(4, 32)
    unmerged = model(x)
    weight_before = _layer(model).get_base_layer().weight.detach().clone()
    model.merge_adapter()
    assert _layer(model).merged
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_layer(model).get_base_layer().weight, weight_before, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_second_merge_warns_and_does_nothing():
    _, model = _wrap()
    model.merge_adapter()
    weight = _layer(model).get_base_layer().weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(_layer(model).get_base_layer().weight, weight, atol=0, rtol=0)


def test_merge_and_unload_and_unload():
    base, model = _wrap()
    x = torch.randn(4, 32)
    expected = model(x)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.proj) is torch.nn.Linear
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    unloaded = model.unload()
    assert type(unloaded.proj) is torch.nn.Linear
    assert (unloaded.proj.in_features, unloaded.proj.out_features) == (32, 48)
    torch.testing.assert_close(unloaded(x), base(x))


def test_safe_merge_raises_on_nan_and_leaves_weights():
    _, model = _wrap()
    layer = _layer(model)
    with torch.no_grad():
        layer.melora_B["default"][0, 0, 0] = float("nan")
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=r"Safe merge of adapter 'default' into proj would give NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(layer.get_base_layer().weight, weight, atol=0, rtol=0)
    assert not layer.merged
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_and_unload(safe_merge=True)


def test_disable_adapter_gives_base_and_restores():
    base, model = _wrap()
    x = torch.randn(4, 32)
    adapted = model(x)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))
    torch.testing.assert_close(model(x), adapted)


def test_zero_init_starts_as_base_model():
    torch.manual_seed(0)
    base = TwoLayers()
    model = get_peft_model(copy.deepcopy(base), MELoRAConfig(r=2, n=4, target_modules=["proj"]))
    x = torch.randn(4, 32)
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    assert torch.count_nonzero(_layer(model).melora_A["default"]) > 0


def test_dropout_applies_only_in_training():
    _, model = _wrap(dropout=0.5)
    x = torch.randn(64, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not torch.allclose(model(x), model(x))


def test_a_layer_built_directly_gets_the_one_n_divides_diagnosis():
    """Linear(...) outside get_peft_model: the same diagnosis as MELoRAModel's, with divisors of its own sizes."""
    from melora.tuner.layer import Linear

    with pytest.raises(
        ValueError,
        match=r"^n=5 does not divide in_features=12 of proj \(in_features=12, out_features=18\); use n in "
        r"\{1, 2, 3, 6\} \(divisors of its in_features and out_features\) or n_pattern=\{\"proj\": 3\}, "
        r"or exclude this module \(exclude_modules / target_modules\)\.$",
    ):
        Linear(torch.nn.Linear(12, 18), "default", module_name="proj", r=1, n=5)


def test_a_layer_built_directly_checks_r_n_alpha_dropout_with_the_configs_rules():
    from melora.lab.args import UserError
    from melora.tuner.layer import Linear

    (expected,) = MELoRAConfig.hyperparameter_problems(alpha=0)
    with pytest.raises(
        UserError, match=r"^Invalid MELoRA layer proj: alpha=0: the scaling numerator"
    ) as info:
        Linear(torch.nn.Linear(8, 8), "default", module_name="proj", r=1, n=2, alpha=0)
    assert expected in str(info.value)


def test_unsupported_module_has_one_message_from_every_path():
    from melora.tuner.layer import _features, unsupported_module_error

    class WithNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)

    expected = (
        r"^MELoRA cannot adapt norm of type LayerNorm: only torch\.nn\.Linear, transformers' Conv1D and their "
        r"quantized versions \(bitsandbytes, torchao, HQQ\) are supported\. Remove it from target_modules\.$"
    )
    with pytest.raises(TypeError, match=expected):
        get_peft_model(WithNorm(), MELoRAConfig(r=1, n=2, target_modules=["norm"]))
    with pytest.raises(TypeError, match=expected):
        _features(torch.nn.LayerNorm(8), "norm")
    assert str(unsupported_module_error("norm", torch.nn.LayerNorm(8))).startswith("MELoRA cannot adapt norm")
