"""PEFT's generic utilities on MELoRA: LoRA conversion, model/layer status, the low-level injection API, LoRA+.

Tiny models (tests/tiny_models.py): the MLP (lin0: 32 -> 48, lin1: 48 -> 48) and a 2-layer Llama (q_proj 64 -> 64,
v_proj 64 -> 32). Adapters start with a non-zero B (``init_weights=False``) so that they change the outputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import (
    PeftModel,
    get_layer_status,
    get_model_status,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.lora.conversion import convert_to_lora, save_as_lora

from melora import MELoRAConfig
from melora.functional import to_lora_factors
from melora.tuner.layer import MELoRALayer
from tests.tiny_models import TinyMLP, model_output, tiny_llama

# name -> (factory, config kwargs, input builder). Each model has one module with its own n and r (patterns), so
# the modules' total ranks n*r differ: MLP lin0 4*2 = 8, lin1 8*3 = 24; Llama q_proj 4*2 = 8, v_proj 2*6 = 12.
MODELS = {
    "mlp": (
        TinyMLP,
        {"target_modules": ["lin0", "lin1"], "n_pattern": {"lin1": 8}, "r_pattern": {"lin1": 3}},
        lambda: {"x": torch.randn(5, 32)},
    ),
    "llama": (
        tiny_llama,
        {
            "target_modules": ["q_proj", "v_proj"],
            "n_pattern": {"v_proj": 2},
            "r_pattern": {"v_proj": 6},
            "alpha_pattern": {"v_proj": 4.0},
            "task_type": "CAUSAL_LM",
        },
        lambda: {"input_ids": torch.randint(0, 120, (2, 9))},
    ),
}


def _melora_model(name: str, seed: int = 0) -> tuple[PeftModel, torch.nn.Module, dict]:
    """(MELoRA PeftModel with a visible adapter, an untouched copy of its base model, example inputs)."""
    factory, kwargs, inputs = MODELS[name]
    torch.manual_seed(seed)
    base = factory().eval()
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, MELoRAConfig(r=2, n=4, alpha=8.0, init_weights=False, **kwargs)).eval()
    return model, pristine, inputs()


def _melora_layers(model: torch.nn.Module) -> dict[str, MELoRALayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MELoRALayer)}


def _max_total_rank(model: torch.nn.Module) -> int:
    return max(layer.n["default"] * layer.r["default"] for layer in _melora_layers(model).values())


# ---------------------------------------------------------------------------------------------- LoRA conversion


def test_melora_layers_support_lora_conversion():
    model, _, _ = _melora_model("mlp")
    assert all(layer.supports_lora_conversion("default") for layer in _melora_layers(model).values())
    assert model.supports_lora_conversion()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_to_lora_at_rank_n_times_r_reproduces_outputs(name, tmp_path):
    """PEFT's save_as_lora at the largest n*r of the model: the LoRA adapter gives MELoRA's outputs."""
    model, pristine, inputs = _melora_model(name)
    rank = _max_total_rank(model)
    with torch.no_grad():
        expected = model_output(model, inputs)
        base_out = model_output(pristine, inputs)
    assert not torch.allclose(expected, base_out, atol=1e-3)  # the adapter is visible

    save_as_lora(tmp_path, model, rank=rank)
    lora = PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert lora.peft_config["default"].peft_type == "LORA"
    assert lora.peft_config["default"].r == rank
    with torch.no_grad():
        got = model_output(lora, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_converted_factors_equal_the_block_diagonal_update():
    """Per module, PEFT's lora_B @ lora_A equals scaling * blockdiag(B_i) @ blockdiag(A_i) (to_lora_factors)."""
    model, _, _ = _melora_model("llama")
    lora_config, state_dict = convert_to_lora(model, rank=_max_total_rank(model))
    assert lora_config.r == lora_config.lora_alpha  # PEFT bakes the scaling into the factors
    layers = _melora_layers(model)
    assert {key.rsplit(".lora_", 1)[0] for key in state_dict} == set(layers)
    for name, layer in layers.items():
        exact_A, exact_B = to_lora_factors(
            layer.melora_A["default"].detach(), layer.melora_B["default"].detach()
        )
        exact = layer.scaling["default"] * exact_B @ exact_A  # (d_out, d_in)
        converted = state_dict[f"{name}.lora_B.weight"] @ state_dict[f"{name}.lora_A.weight"]
        torch.testing.assert_close(converted, exact, atol=1e-6, rtol=1e-5)


def test_convert_to_lora_below_n_times_r_is_only_an_approximation():
    """A rank below n*r truncates the SVD: the outputs differ (so the exactness test above can fail)."""
    model, pristine, inputs = _melora_model("mlp")
    lora_config, state_dict = convert_to_lora(model, rank=_max_total_rank(model) - 4)
    lora = get_peft_model(pristine, lora_config).eval()
    set_peft_model_state_dict(lora, state_dict)
    with torch.no_grad():
        assert not torch.allclose(model_output(lora, inputs), model_output(model, inputs), atol=1e-4)


def test_convert_to_lora_refuses_trained_biases():
    model, _, _ = _melora_model("mlp")
    model.peft_config["default"].bias = "melora_only"
    with pytest.raises(ValueError, match=r"bias=melora_only, this is not supported"):
        convert_to_lora(model, rank=24)


# ----------------------------------------------------------------------------------------------- model status


def _two_adapter_mlp() -> PeftModel:
    """ "default" on lin0 and lin1 (active, trainable), "other" on lin1 only (inactive)."""
    torch.manual_seed(0)
    config = MELoRAConfig(r=2, n=4, target_modules=["lin0", "lin1"], init_weights=False)
    model = get_peft_model(TinyMLP(), config)
    model.add_adapter("other", MELoRAConfig(r=1, n=2, target_modules=["lin1"], init_weights=False))
    return model


def test_model_status_of_two_adapters_one_active():
    model = _two_adapter_mlp()
    status = get_model_status(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert status.base_model_type == "TinyMLP"
    assert status.adapter_model_type == "MELoRAModel"
    assert status.peft_types == {"default": "MELORA", "other": "MELORA"}
    assert status.trainable_params == trainable == 4 * 2 * (8 + 12) + 4 * 2 * (12 + 12)
    assert status.total_params == sum(p.numel() for p in model.parameters())
    assert status.num_adapter_layers == 2
    assert status.enabled is True
    assert status.active_adapters == ["default"]
    assert status.merged_adapters == []
    assert status.requires_grad == {"default": True, "other": False}
    assert status.available_adapters == ["default", "other"]
    assert status.devices == {"default": ["cpu"], "other": ["cpu"]}
    assert status.quantization_backend is None


def test_layer_status_of_two_adapters_one_active():
    model = _two_adapter_mlp()
    by_name = {status.name: status for status in get_layer_status(model)}
    assert set(by_name) == {"model.lin0", "model.lin1"}
    lin0, lin1 = by_name["model.lin0"], by_name["model.lin1"]
    assert lin0.module_type == lin1.module_type == "melora.Linear"
    assert lin0.available_adapters == ["default"]
    assert lin1.available_adapters == ["default", "other"]
    assert lin1.requires_grad == {"default": True, "other": False}
    assert lin1.devices == {"default": ["cpu"], "other": ["cpu"]}
    assert lin0.active_adapters == lin1.active_adapters == ["default"]
    assert lin0.enabled and lin1.enabled
    assert lin0.merged_adapters == lin1.merged_adapters == []


def test_status_follows_merge_set_adapter_and_disable():
    model = _two_adapter_mlp()
    model.merge_adapter()
    status = get_model_status(model)
    assert status.merged_adapters == ["default"]
    assert [s.merged_adapters for s in get_layer_status(model)] == [["default"], ["default"]]
    model.unmerge_adapter()
    assert get_model_status(model).merged_adapters == []

    model.set_adapter("other")  # PEFT makes the newly active adapter trainable and freezes the others
    status = get_model_status(model)
    assert status.active_adapters == ["other"]
    assert status.requires_grad == {"default": False, "other": True}
    assert status.trainable_params == 2 * 1 * (24 + 24)

    with model.disable_adapter():
        assert get_model_status(model).enabled is False
    assert get_model_status(model).enabled is True


def test_status_of_a_model_without_peft_model():
    model = inject_adapter_in_model(MELoRAConfig(r=2, n=4, target_modules=["lin0"]), TinyMLP())
    status = get_model_status(model)
    assert (status.base_model_type, status.adapter_model_type, status.peft_types) == ("other", "None", {})
    assert status.num_adapter_layers == 1
    assert status.available_adapters == ["default"]
    assert status.requires_grad == {"default": True}


def test_peft_type_prints_like_peft_enums_but_compares_as_a_string():
    config = MELoRAConfig(r=1, n=2)
    assert str(config.peft_type) == "PeftType.MELORA"  # as str(PeftType.LORA) == "PeftType.LORA"
    assert config.peft_type == "MELORA" and config.peft_type.value == "MELORA"
    assert json.dumps(config.to_dict()["peft_type"]) == '"MELORA"'  # adapter_config.json keeps the plain name
    assert hash(config.peft_type) == hash("MELORA")


# ------------------------------------------------------------------------------- inject_adapter_in_model (no PeftModel)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inject_adapter_in_model_matches_get_peft_model(name):
    model, pristine, inputs = _melora_model(name)
    config = copy.deepcopy(model.peft_config["default"])
    injected = inject_adapter_in_model(config, pristine).eval()
    layers = _melora_layers(injected)
    assert set(layers) == {key.removeprefix("base_model.model.") for key in _melora_layers(model)}
    assert all(type(layer).__name__ == "Linear" for layer in layers.values())

    state = get_peft_model_state_dict(model)
    injected_state = get_peft_model_state_dict(injected)
    assert {key.removeprefix("base_model.model.") for key in state} == set(injected_state)
    assert not all(
        torch.equal(injected_state[k.removeprefix("base_model.model.")], v) for k, v in state.items()
    )

    result = set_peft_model_state_dict(
        injected, {k.removeprefix("base_model.model."): v for k, v in state.items()}
    )
    assert not result.unexpected_keys
    assert not [key for key in result.missing_keys if "melora_" in key]
    with torch.no_grad():
        torch.testing.assert_close(
            model_output(injected, inputs), model_output(model, inputs), atol=0, rtol=0
        )


def test_inject_adapter_in_model_state_dict_round_trip():
    config = MELoRAConfig(r=2, n=4, target_modules=["lin0", "lin1"], init_weights=False)
    torch.manual_seed(0)
    base = TinyMLP().eval()
    fresh_base = copy.deepcopy(base)
    source = inject_adapter_in_model(copy.deepcopy(config), base)
    target = inject_adapter_in_model(copy.deepcopy(config), fresh_base)  # other random A and B
    inputs = torch.randn(5, 32)
    with torch.no_grad():
        assert not torch.allclose(source(inputs), target(inputs))
    state = get_peft_model_state_dict(source)
    assert set(state) == {"lin0.melora_A", "lin0.melora_B", "lin1.melora_A", "lin1.melora_B"}
    set_peft_model_state_dict(target, state)
    round_trip = get_peft_model_state_dict(target)
    assert set(round_trip) == set(state)
    assert all(torch.equal(round_trip[key], value) for key, value in state.items())
    with torch.no_grad():
        torch.testing.assert_close(target(inputs), source(inputs), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------- LoRA+


def test_loraplus_gives_b_factors_the_ratio_learning_rate():
    """LoRA+ finds "lora_B" in "melora_B" (PEFT has no per-method hook): B at lr * ratio, A at lr."""
    model, _, _ = _melora_model("llama")
    lr, ratio = 1e-4, 16.0
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    a_names = [name for name in trainable if ".melora_A." in name]
    b_names = [name for name in trainable if ".melora_B." in name]
    assert len(a_names) == len(b_names) == 4 and len(trainable) == 8  # 2 layers x (q_proj, v_proj)
    assert {lr_of[id(trainable[name])] for name in a_names} == {lr}
    assert {lr_of[id(trainable[name])] for name in b_names} == {lr * ratio}
    assert set(lr_of) == {id(p) for p in trainable.values()}
