"""Config and tuner checks: bad field types refused up front, unload with modules_to_save, PEFT's messages."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from melora import MELoRAConfig
from melora.tuner.layer import MELoRALayer
from tests.tiny_models import TinyMLP, tiny_bert, tiny_llama


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": float("nan")}, r"alpha=nan: the scaling numerator must be a finite number > 0"),
        ({"alpha": float("inf")}, r"alpha=inf: the scaling numerator must be a finite number > 0"),
        ({"alpha": float("-inf")}, r"alpha=-inf: the scaling numerator must be a finite number > 0"),
        ({"alpha": "8"}, r"alpha='8': the scaling numerator must be a finite number > 0"),
        ({"alpha": None}, r"alpha=None: the scaling numerator must be a finite number > 0"),
        ({"alpha": True}, r"alpha=True: the scaling numerator must be a finite number > 0"),
        ({"alpha": 0}, r"alpha=0: the scaling numerator must be a finite number > 0"),
        ({"dropout": None}, r"dropout=None: must lie in \[0, 1\) and be a number"),
        ({"dropout": "0.1"}, r"dropout='0.1': must lie in \[0, 1\) and be a number"),
        ({"dropout": float("nan")}, r"dropout=nan: must lie in \[0, 1\) and be a number"),
    ],
)
def test_alpha_and_dropout_types_and_finiteness(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MELoRAConfig(r=1, n=4, **kwargs)


def test_config_collects_every_problem_into_one_error():
    with pytest.raises(ValueError, match=r"(?s)Invalid MELoRAConfig:.*alpha=None.*dropout=None") as info:
        MELoRAConfig(r=1, n=4, alpha=None, dropout=None)
    assert str(info.value).count("\n  - ") == 2


def test_valid_alpha_and_dropout_still_accepted():
    config = MELoRAConfig(r=2, n=4, alpha=8, dropout=0.05)
    assert config.scaling == 4.0
    assert MELoRAConfig(r=4, alpha=1.5, dropout=0).scaling == 0.375


def test_regex_target_modules_with_layers_to_transform_is_refused_like_lora():
    regex = r".*\.q_proj"
    with pytest.raises(
        ValueError, match=r"`layers_to_transform` cannot be used when `target_modules` is a str"
    ):
        LoraConfig(target_modules=regex, layers_to_transform=[0])  # PEFT's own sentence ...
    with pytest.raises(
        ValueError,
        match=r"`layers_to_transform` cannot be used when `target_modules` is a str\. "
        r"target_modules='\.\*\\\\\.q_proj' is a regex",
    ):
        MELoRAConfig(r=1, n=4, target_modules=regex, layers_to_transform=[0])  # ... and ours
    with pytest.raises(ValueError, match=r"`layers_pattern` cannot be used when `target_modules` is a str"):
        MELoRAConfig(r=1, n=4, target_modules=regex, layers_to_transform=[0], layers_pattern="layers")
    # A list of names with layers_to_transform keeps working and adapts only layer 0.
    model = get_peft_model(
        tiny_llama(), MELoRAConfig(r=1, n=4, target_modules=["q_proj"], layers_to_transform=[0])
    )
    adapted = [name for name, module in model.named_modules() if isinstance(module, MELoRALayer)]
    assert adapted == ["base_model.model.model.layers.0.self_attn.q_proj"]


def _bert_with_pooler_saved(init_weights: bool = False):
    torch.manual_seed(0)
    base = tiny_bert().eval()
    config = MELoRAConfig(
        r=1, n=4, alpha=8, task_type="SEQ_CLS", modules_to_save=["pooler"], init_weights=init_weights
    )
    model = get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():  # the trained copies differ from the originals, as after training
        wrapper = model.base_model.model.bert.pooler
        wrapper.modules_to_save["default"].dense.weight.mul_(-1.5)
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    return base, model


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_merge_and_unload_with_a_non_linear_module_to_save(how):
    base, model = _bert_with_pooler_saved()
    ids = torch.randint(1, 120, (2, 9))
    trained_pooler = model.base_model.model.bert.pooler.modules_to_save["default"]
    trained_classifier = model.base_model.model.classifier.modules_to_save["default"]
    heads_only = copy.deepcopy(base)  # the base model with the trained heads, no MELoRA update
    heads_only.bert.pooler = copy.deepcopy(trained_pooler)
    heads_only.classifier = copy.deepcopy(trained_classifier)
    with torch.no_grad():
        expected = (
            model(input_ids=ids).logits if how == "merge_and_unload" else heads_only(input_ids=ids).logits
        )
    unloaded = getattr(copy.deepcopy(model), how)()
    assert not any(isinstance(m, MELoRALayer) for m in unloaded.modules())
    assert type(unloaded.bert.pooler).__name__ == "BertPooler"
    with torch.no_grad():
        out = unloaded(input_ids=ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The trained pooler and classifier are kept, not swapped back to the base model's.
    torch.testing.assert_close(unloaded.bert.pooler.dense.weight, trained_pooler.dense.weight)
    assert not torch.allclose(unloaded.classifier.weight, base.classifier.weight)


def _llama_with_two_adapters():
    torch.manual_seed(0)
    config = MELoRAConfig(r=1, n=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("b", MELoRAConfig(r=1, n=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    return model.eval()


def test_mixed_batch_errors_carry_peft_sentences():
    model = _llama_with_two_adapters()
    ids = torch.randint(0, 120, (3, 5))
    with pytest.raises(
        ValueError,
        match=r"Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3 "
        r"respectively\. .*q_proj: got 2 adapter_names for a batch of 3 rows",
    ):
        model(input_ids=ids, adapter_names=["default", "b"])
    model.train()
    with pytest.raises(
        ValueError,
        match=r"Cannot pass `adapter_names` when the model is in training mode\. .*model\.eval\(\)",
    ):
        model(input_ids=ids, adapter_names=["default", "b", "__base__"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(
        ValueError,
        match=r"Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
        r"first\. .*q_proj: unmerge the adapters \['default'\]",
    ):
        model(input_ids=ids, adapter_names=["default", "b", "__base__"])
    model.unmerge_adapter()
    assert model(input_ids=ids, adapter_names=["default", "b", "__base__"]).logits.shape == (3, 5, 120)


def test_mlp_unload_keeps_a_trained_linear_head():
    torch.manual_seed(0)
    model = get_peft_model(
        TinyMLP(),
        MELoRAConfig(r=1, n=4, target_modules=["lin1"], modules_to_save=["head"], init_weights=False),
    ).eval()
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.mul_(2.0)
    x = torch.randn(3, 32)
    expected = model(x)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


# --- adapter configs from files: bounded before anything is allocated ----------------------------------


def _saved_mlp_adapter(folder, **config_changes):
    """A valid tiny MLP adapter (lin0 32->48, lin1 48->48; n=4, r=2) with its adapter_config.json edited."""
    import json

    from peft import get_peft_model

    model = get_peft_model(TinyMLP(), MELoRAConfig(r=2, n=4, target_modules=["lin0", "lin1"]))
    model.save_pretrained(folder)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    return folder


def test_huge_r_in_adapter_config_is_refused_before_any_allocation(tmp_path):
    """r=10**9 made PeftModel.from_pretrained try to allocate hundreds of GB for melora_A / melora_B."""
    import time

    from peft import PeftModel

    from melora.lab.args import UserError

    folder = _saved_mlp_adapter(tmp_path / "adapter", r=10**9)
    start = time.perf_counter()
    with pytest.raises(
        UserError,
        match=r"r=1000000000 is too large for lin0: its n=4 mini LoRAs have blocks of in_features/n=8 x "
        r"out_features/n=12 \(in_features=32, out_features=48\), so a mini LoRA's rank can be at most 8\. "
        r'Use r <= 8 \(or r_pattern=\{"lin0": 8\} for this module\), or a smaller n; in a saved adapter, '
        r"fix r in its adapter_config\.json\.",
    ):
        PeftModel.from_pretrained(TinyMLP(), folder)
    assert time.perf_counter() - start < 10


def test_rank_above_the_block_size_is_refused_and_the_block_size_accepted():
    from peft import get_peft_model

    with pytest.raises(
        ValueError, match=r"r=13 is too large for lin1: .* blocks of in_features/n=12 x out_features/n=12"
    ):
        get_peft_model(TinyMLP(), MELoRAConfig(r=13, n=4, target_modules=["lin1"]))
    with pytest.raises(ValueError, match=r"r=9 is too large for lin0: .*at most 8"):
        get_peft_model(
            TinyMLP(), MELoRAConfig(r=4, n=4, target_modules=["lin0", "lin1"], r_pattern={"lin0": 9})
        )
    model = get_peft_model(TinyMLP(), MELoRAConfig(r=8, n=4, target_modules=["lin0"]))  # full-rank blocks
    assert tuple(model.base_model.model.lin0.melora_A["default"].shape) == (4, 8, 8)


def test_invalid_adapter_config_file_is_named(tmp_path):
    from peft import PeftModel

    from melora.lab.args import UserError

    folder = _saved_mlp_adapter(tmp_path / "adapter", r=0, init_weights="false")
    with pytest.raises(UserError, match=r"(?s)adapter.adapter_config\.json: Invalid MELoRAConfig:.*r=0: .*"
                                        r"init_weights='false': must be true or false.*Fix the values in that file"):  # fmt: skip
        PeftModel.from_pretrained(TinyMLP(), folder)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_weights": "false"}, r"init_weights='false': must be true or false \(a boolean, not str\)"),
        ({"init_weights": 0}, r"init_weights=0: must be true or false \(a boolean, not int\)"),
        ({"fan_in_fan_out": "yes"}, r"fan_in_fan_out='yes': must be true or false"),
        ({"target_modules": 5}, r"target_modules=5: must be a list of module names or a regex string"),
        ({"target_modules": ["q_proj", 3]}, r"target_modules=.*: must be a list of module names"),
        ({"exclude_modules": {"a": 1}}, r"exclude_modules=\{'a': 1\}: must be a list of module names"),
        ({"modules_to_save": "head"}, r"modules_to_save='head': must be a list of module names, e\.g\."),
        ({"layers_to_transform": [0, -1]}, r"layers_to_transform=\[0, -1\]: must be a layer index >= 0"),
        ({"layers_to_transform": "0"}, r"layers_to_transform='0': must be a layer index >= 0"),
    ],
)
def test_config_field_types_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MELoRAConfig(**{"r": 1, "n": 4, **kwargs})


def test_layer_zero_with_layers_pattern_is_accepted_like_peft():
    """layers_to_transform=0 is layer 0, not "unset" (PEFT fixed the same check in every tuner, PR #3425)."""
    config = MELoRAConfig(r=1, n=4, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    model = get_peft_model(tiny_llama(), config)
    adapted = [name for name, module in model.named_modules() if isinstance(module, MELoRALayer)]
    assert adapted == ["base_model.model.model.layers.0.self_attn.q_proj"]
    with pytest.raises(
        ValueError,
        match=r"layers_pattern='layers' is set but layers_to_transform is not: set both "
        r"\(e\.g\. layers_to_transform=\[0, 1\]\), or neither",
    ):
        MELoRAConfig(r=1, n=4, target_modules=["q_proj"], layers_pattern="layers")


def test_config_collects_peft_and_melora_problems_into_one_error():
    from melora.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        MELoRAConfig(
            r=0,
            n=4,
            task_type="TRANSLATE",
            layers_to_transform=[0],
            layers_pattern=3,
            trainable_token_indices="x",
        )
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("Invalid task type: 'TRANSLATE'")
    assert any(p.startswith("r=0: the rank of each mini LoRA") for p in problems)
    assert any(p.startswith("layers_pattern=3: must be the name of the layer list") for p in problems)
    assert any(p.startswith("trainable_token_indices='x': must be a list of token ids") for p in problems)
    assert str(info.value).startswith("Invalid MELoRAConfig:\n  - Invalid task type")
