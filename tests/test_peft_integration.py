"""MELoRA through PEFT's public API on tiny models: adapters, mixed batches, save/load, export, errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import melora
from melora import MELoRAConfig, adapter_summary, export_lora, save_adapter
from melora.tuner.layer import MELoRALayer
from tests.tiny_models import TINY_MODELS, TinyMLP, model_output, tiny_bert, tiny_llama


def _peft(name, n=4, r=2, adapter_name="default", **kwargs):
    factory, targets, make_inputs, task_type, to_save = TINY_MODELS[name]
    torch.manual_seed(0)
    base = factory().eval()
    config = MELoRAConfig(
        r=r,
        n=n,
        alpha=8,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=to_save,
        init_weights=False,
        **kwargs,
    )
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name).eval()
    torch.manual_seed(1)
    return base, model, make_inputs()


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_model_matrix_save_load_merge_disable(name, tmp_path):
    base, model, inputs = _peft(name)
    out = model_output(model, inputs)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, model_output(base, inputs))
    with model.disable_adapter():
        torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs))
    save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(model_output(loaded, inputs), out)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2
        torch.testing.assert_close(v1, v2, atol=0, rtol=0)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, MELoRALayer) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, inputs), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_model_matrix_every_trainable_param_gets_a_gradient(name):
    _, model, inputs = _peft(name)
    model.train()
    model_output(model, inputs).float().pow(2).mean().backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        else:
            assert param.grad is None, pname


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_model_matrix_export_lora_loads_with_plain_peft(name, tmp_path):
    base, model, inputs = _peft(name)
    export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    script = textwrap.dedent(f"""
        import sys, torch, copy
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from peft import PeftModel
        from tests.tiny_models import TINY_MODELS, model_output
        assert "melora" not in sys.modules
        factory, targets, make_inputs, *_ = TINY_MODELS[{name!r}]
        torch.manual_seed(0)
        base = factory().eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        lora = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r}).eval()
        assert "melora" not in sys.modules, "plain PEFT must load the export without melora"
        torch.save(model_output(lora, inputs), {str(tmp_path / "out.pt")!r})
    """)
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    lora_out = torch.load(tmp_path / "out.pt")
    assert (lora_out - model_output(model, inputs)).abs().max() <= 1e-5


def test_export_from_saved_dir_has_standard_keys_and_block_diagonal_factors(tmp_path):
    _, model, _ = _peft("llama", n=4, r=2)
    save_adapter(model, tmp_path / "melora")
    export_lora(tmp_path / "melora", tmp_path / "lora")
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    key_a = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    key_b = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    assert tensors[key_a].shape == (8, 64) and tensors[key_b].shape == (32, 8)  # GQA v_proj: 64 -> 32
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    A, B = layer.melora_A["default"], layer.melora_B["default"]
    torch.testing.assert_close(tensors[key_a], torch.block_diag(*A))
    torch.testing.assert_close(tensors[key_b], torch.block_diag(*B))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)


def test_fresh_process_loading_paths(tmp_path):
    """save -> PeftConfig / PeftModel / AutoPeftModel / transformers load_adapter in a new process."""
    from transformers import LlamaForCausalLM

    _, model, inputs = _peft("llama")
    base_dir = tmp_path / "base"
    model.get_base_model().__class__  # noqa: B018 (the class is what we save below)
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(base_dir)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        MELoRAConfig(
            r=2, n=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_weights=False
        ),
    )
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.eval()
    save_adapter(peft_model, tmp_path / "adapter")
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = model_output(peft_model, inputs)
    script = textwrap.dedent(f"""
        import torch, melora
        from peft import PeftConfig, PeftModel, AutoPeftModelForCausalLM
        from transformers import LlamaForCausalLM
        adapter, base_dir = {str(tmp_path / "adapter")!r}, {str(base_dir)!r}
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        cfg = PeftConfig.from_pretrained(adapter)
        assert type(cfg).__name__ == "MELoRAConfig" and cfg.n == 4 and cfg.r == 2, cfg
        outs = {{}}
        m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter).eval()
        outs["peft"] = m(**inputs).logits
        outs["auto"] = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(**inputs).logits
        hf = LlamaForCausalLM.from_pretrained(base_dir)
        hf.load_adapter(adapter)
        outs["transformers"] = hf.eval()(**inputs).logits
        torch.save(outs, {str(tmp_path / "outs.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    for route, logits in torch.load(tmp_path / "outs.pt").items():
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=route)


def test_import_melora_registers_even_when_peft_was_looked_up_before_it_was_imported(tmp_path):
    """transformers asks ``importlib.util.find_spec("peft")`` before anything imports PEFT."""
    _, model, _ = _peft("mlp")
    save_adapter(model, tmp_path / "adapter")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import melora
        assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
        importlib.util.find_spec("peft")
        from peft import PeftConfig
        assert type(PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})).__name__ == "MELoRAConfig"
        assert not any(type(f).__name__ == "_RegisterAfterPeft" for f in sys.meta_path)  # done: it left
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_fresh_process_without_import_melora_fails_clearly(tmp_path):
    _, model, _ = _peft("mlp")
    save_adapter(model, tmp_path / "adapter")
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "MELORA" in result.stderr


def test_several_named_adapters_and_delete(tmp_path):
    _, model, inputs = _peft("bert")
    model.add_adapter(
        "other",
        MELoRAConfig(r=1, n=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False),
    )
    out_default = model_output(model, inputs)
    model.set_adapter("other")
    out_other = model_output(model, inputs)
    assert not torch.allclose(out_default, out_other)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.melora_A["other"].shape == (8, 1, 8) and layer.n == {"default": 4, "other": 8}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable if "melora_" in n)
    model.delete_adapter("default")
    for module in model.modules():
        if isinstance(module, MELoRALayer):
            for attr in (*module.adapter_layer_names, *module.other_param_names):
                assert "default" not in getattr(module, attr), attr
    torch.testing.assert_close(model_output(model, inputs), out_other)
    with pytest.raises(ValueError, match="Adapter default does not exist"):
        model.delete_adapter("default")


def test_mixed_adapter_batch_rows_equal_single_adapter_runs():
    _, model, _ = _peft("llama")
    model.add_adapter(
        "b",
        MELoRAConfig(
            r=1, n=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_weights=False
        ),
    )
    model.eval()
    ids = torch.randint(0, 120, (3, 6))
    names = ["default", "__base__", "b"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    singles = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                singles.append(model(input_ids=ids[row : row + 1]).logits)
        else:
            model.set_adapter(name)
            singles.append(model(input_ids=ids[row : row + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)
    gen_mixed = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False)
    model.set_adapter("b")
    gen_b = model.generate(input_ids=ids[2:], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(gen_mixed[2:], gen_b)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=ids, adapter_names=["default", "nope", "b"])


def test_layers_to_transform_and_exclude_modules():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(),
        MELoRAConfig(
            r=1, n=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"
        ),
    )
    adapted = {n for n, m in model.named_modules() if isinstance(m, MELoRALayer)}
    assert adapted == {
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    }
    model = get_peft_model(
        tiny_llama(), MELoRAConfig(r=1, n=4, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    )
    assert {n.rsplit(".", 1)[1] for n, m in model.named_modules() if isinstance(m, MELoRALayer)} == {"q_proj"}


@pytest.mark.parametrize(
    ("factory", "expected"), [(tiny_bert, {"query", "value"}), (tiny_llama, {"q_proj", "v_proj"})]
)
def test_default_target_modules(factory, expected):
    model = get_peft_model(factory(), MELoRAConfig(r=1, n=4))
    assert {n.rsplit(".", 1)[1] for n, m in model.named_modules() if isinstance(m, MELoRALayer)} == expected


def test_gpt2_default_targets_c_attn_conv1d():
    from tests.tiny_models import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), MELoRAConfig(r=1, n=4))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MELoRALayer) and layer.fan_in_fan_out
    assert layer.melora_A["default"].shape == (4, 1, 16) and layer.melora_B["default"].shape == (4, 48, 1)


def test_parameter_accounting():
    model = get_peft_model(tiny_bert(), MELoRAConfig(r=1, n=8, task_type="SEQ_CLS"))
    summary = adapter_summary(model)
    # 2 layers x (query, value) x r*(64+64) = 512 adapter params; LoRA at rank 8 needs 8x more.
    assert summary["adapter_params"] == 4 * 1 * (64 + 64)
    assert summary["lora_params_same_rank"] == 8 * summary["adapter_params"]
    assert summary["equivalent_rank"] == 8
    head = 64 * 2 + 2  # the classifier (modules_to_save)
    assert summary["trainable_params"] == summary["adapter_params"] + head
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == summary["trainable_params"]
    assert melora.format_summary(summary).count("\n") == 1 + 4  # header, 4 module rows, total line


def test_classifier_head_is_trained_and_saved(tmp_path):
    model = get_peft_model(tiny_bert(), MELoRAConfig(r=1, n=4, task_type="SEQ_CLS"))
    save_adapter(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert any(k.startswith("base_model.model.classifier") for k in keys)
    assert any(
        n.startswith("base_model.model.classifier") and p.requires_grad for n, p in model.named_parameters()
    )


# ---- bad input: clear errors, nothing half-written --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"r=0: the rank of each mini LoRA must be an integer >= 1"),
        ({"n": 0}, r"n=0: the number of mini LoRAs must be an integer >= 1"),
        ({"dropout": 1.0}, r"dropout=1.0: must lie in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1: must lie in \[0, 1\)"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MELoRAConfig(**kwargs)


def test_n_not_dividing_features_names_module_and_numbers():
    with pytest.raises(
        ValueError, match=r"n=3 does not divide in_features=64 of .*layers\.0\.self_attn\.q_proj"
    ):
        get_peft_model(tiny_llama(), MELoRAConfig(r=1, n=3, target_modules=["q_proj"]))
    # v_proj is 64 -> 32 in the tiny GQA model: n=64 divides in_features but not out_features
    with pytest.raises(
        ValueError,
        match=r"n=64 does not divide out_features=32 of .*v_proj.*divisors common to all targeted modules",
    ):
        get_peft_model(tiny_llama(), MELoRAConfig(r=1, n=64, target_modules=["v_proj"]))


def test_target_modules_matching_nothing():
    with pytest.raises(ValueError, match=r"Target modules \{'nonexistent'\} not found in the base model"):
        get_peft_model(TinyMLP(), MELoRAConfig(r=1, n=4, target_modules=["nonexistent"]))


def test_loading_onto_a_base_with_other_shapes(tmp_path):
    model = get_peft_model(TinyMLP(d_in=32, hidden=48), MELoRAConfig(r=1, n=4, target_modules=["lin1"]))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(
        ValueError,
        match=r"module lin1 of this base model needs \(4, 1, 16\).*shape \(4, 1, 12\)|"
        r"shape \(4, 1, 12\) but module lin1 of this base model needs \(4, 1, 16\)",
    ):
        PeftModel.from_pretrained(TinyMLP(d_in=32, hidden=64), tmp_path / "a")


def test_truncated_adapter_file_gives_clear_error(tmp_path):
    model = get_peft_model(TinyMLP(), MELoRAConfig(r=1, n=4, target_modules=["lin1"]))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated or corrupted"):
        export_lora(tmp_path / "a", tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(Exception, match=r"(?i)incomplete|invalid|deserializ|metadata"):
        PeftModel.from_pretrained(TinyMLP(), tmp_path / "a")


def test_save_is_atomic_when_saving_fails(tmp_path):
    model = get_peft_model(TinyMLP(), MELoRAConfig(r=1, n=4, target_modules=["lin1"]))
    save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    class Boom(RuntimeError):
        pass

    def failing_save(*args, **kwargs):
        raise Boom("disk full")

    model.save_pretrained = failing_save
    with pytest.raises(Boom):
        save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # a plain folder, no staging folder left
    assert not (tmp_path / "a").is_symlink()


def test_export_rejects_non_melora_adapter(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(TinyMLP(), LoraConfig(r=2, target_modules=["lin1"]))
    save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"peft_type 'LORA'; export_lora needs a MELoRA adapter"):
        export_lora(tmp_path / "lora", tmp_path / "out")


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_low_cpu_mem_usage_loading_and_a_second_loaded_adapter(name, tmp_path):
    base, model, inputs = _peft(name)
    save_adapter(model, tmp_path / "a")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", low_cpu_mem_usage=True).eval()
    torch.testing.assert_close(model_output(loaded, inputs), model_output(model, inputs))
    loaded.load_adapter(tmp_path / "a", adapter_name="second", low_cpu_mem_usage=True)
    loaded.set_adapter("second")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    torch.testing.assert_close(model_output(loaded, inputs), model_output(model, inputs))


def test_merge_named_adapters_equals_both_active():
    _, model, inputs = _peft("mlp")
    model.add_adapter("other", MELoRAConfig(r=1, n=8, target_modules=["lin0", "lin1"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    both = model_output(model, inputs)
    model.merge_adapter(adapter_names=["default", "other"])
    lin1 = model.base_model.model.lin1
    assert lin1.merged_adapters == ["default", "other"]
    torch.testing.assert_close(model_output(model, inputs), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model_output(model, inputs), both, atol=1e-5, rtol=1e-5)


def test_mixed_batch_routes_classifier_heads_too():
    _, model, _ = _peft("bert")
    model.add_adapter(
        "b",
        MELoRAConfig(r=1, n=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False),
    )
    with torch.no_grad():  # make the second head differ from the first
        model.base_model.model.classifier.modules_to_save["b"].weight.add_(1.0)
    model.eval()
    ids = torch.randint(1, 120, (2, 7))
    mixed = model(input_ids=ids, adapter_names=["b", "default"]).logits
    model.set_adapter("b")
    row_b = model(input_ids=ids[:1]).logits
    model.set_adapter("default")
    row_default = model(input_ids=ids[1:]).logits
    torch.testing.assert_close(mixed, torch.cat([row_b, row_default]), atol=1e-5, rtol=1e-5)
