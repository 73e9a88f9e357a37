"""Per-module n / r / alpha (n_pattern, r_pattern, alpha_pattern): resolution, errors, save/load, merge, export."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from melora import MELoRAConfig, adapter_summary, export_lora, save_adapter
from melora.tuner.layer import MELoRALayer
from tests.tiny_models import tiny_llama

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # tiny Llama: q/o 64 -> 64, GQA k/v 64 -> 32


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"input_ids": torch.randint(0, 120, (2, 9))}


def _patterned(**overrides):
    """A tiny Llama with n, r and alpha differing between q_proj and v_proj (and a non-zero adapter)."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    kwargs = {
        "r": 2,
        "n": 8,
        "alpha": 8,
        "n_pattern": {"v_proj": 4},
        "r_pattern": {"v_proj": 3},
        "alpha_pattern": {"v_proj": 5, r"layers\.1\.self_attn\.q_proj": 3},
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "init_weights": False,
    }
    kwargs.update(overrides)
    model = get_peft_model(copy.deepcopy(base), MELoRAConfig(**kwargs)).eval()
    return base, model


def _melora_layers(model) -> dict[str, MELoRALayer]:
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if isinstance(m, MELoRALayer)
    }


# ---- resolution: the same modules as PEFT's own LoRA rank_pattern / alpha_pattern --------------------------


def test_patterns_select_the_modules_lora_rank_and_alpha_patterns_select():
    """Same keys in a LoraConfig (resolved by PEFT's LoRA tuner) and a MELoRAConfig give the same per-module values."""
    keys = {
        "v_proj": 4,  # a module's short name
        r"layers\.1\.self_attn\.q_proj": 2,  # a regex on the end of the name
        "model.layers.0.self_attn.k_proj": 1,  # a full name
        "layers.1.self_attn.k_proj": 16,  # the tail of a name after a dot
        "elf_attn.o_proj": 32,  # not after a dot: matches nothing
    }
    alphas = {"o_proj": 3.0, "layers.0.self_attn.v_proj": 7.5}
    torch.manual_seed(0)
    lora = get_peft_model(
        tiny_llama(),
        LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, rank_pattern=keys, alpha_pattern=alphas),
    )
    lora_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in lora.named_modules()
        if isinstance(m, LoraLayer)
    }
    lora_r = {name: layer.r["default"] for name, layer in lora_layers.items()}
    lora_alpha = {name: layer.lora_alpha["default"] for name, layer in lora_layers.items()}
    assert len(lora_r) == 8 and set(lora_r.values()) == {1, 2, 4, 8, 16}
    with pytest.warns(RuntimeWarning, match=r"n_pattern keys \['elf_attn.o_proj'\] match no module"):
        melora = get_peft_model(
            tiny_llama(),
            MELoRAConfig(r=1, n=8, alpha=16, target_modules=ATTENTION, n_pattern=keys, alpha_pattern=alphas),
        )
    layers = _melora_layers(melora)
    assert {name: layer.n["default"] for name, layer in layers.items()} == lora_r
    assert {name: layer.alpha["default"] for name, layer in layers.items()} == lora_alpha
    config = melora.peft_config["default"]
    assert config.resolve("model.layers.0.self_attn.v_proj") == (4, 1, 7.5)
    assert config.resolve("model.layers.1.self_attn.o_proj") == (8, 1, 3.0)


def test_patterned_layers_have_their_shapes_and_scalings():
    _, model = _patterned()
    layers = _melora_layers(model)
    q0, q1, v0 = (
        layers["model.layers.0.self_attn.q_proj"],
        layers["model.layers.1.self_attn.q_proj"],
        layers["model.layers.0.self_attn.v_proj"],
    )
    assert q0.melora_A["default"].shape == (8, 2, 8) and q0.melora_B["default"].shape == (8, 8, 2)
    assert v0.melora_A["default"].shape == (4, 3, 16) and v0.melora_B["default"].shape == (4, 8, 3)
    assert (q0.scaling["default"], q1.scaling["default"], v0.scaling["default"]) == (8 / 2, 3 / 2, 5 / 3)
    # the layer's output is W x + (alpha_m / r_m) * blockdiag(B_i A_i) x, built here with torch.block_diag
    x = torch.randn(3, 64)
    A, B = v0.melora_A["default"], v0.melora_B["default"]
    delta = torch.block_diag(*[B[i] @ A[i] for i in range(4)]) * (5 / 3)  # (32, 64)
    expected = v0.get_base_layer()(x) + x @ delta.T
    torch.testing.assert_close(v0(x), expected, atol=1e-5, rtol=1e-5)


def test_patterned_adapter_saves_reloads_merges_and_is_summarised(tmp_path):
    base, model = _patterned()
    inputs = _inputs()
    out = model(**inputs).logits
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["n_pattern"] == {"v_proj": 4} and saved["r_pattern"] == {"v_proj": 3}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].alpha_pattern == {"v_proj": 5, r"layers\.1\.self_attn\.q_proj": 3}
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2
        torch.testing.assert_close(v1, v2, atol=0, rtol=0)
    torch.testing.assert_close(loaded(**inputs).logits, out, atol=0, rtol=0)

    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, MELoRALayer) for m in merged.modules())
    torch.testing.assert_close(merged(**inputs).logits, out, atol=1e-5, rtol=1e-5)

    rows = {row["module"].removeprefix("base_model.model."): row for row in adapter_summary(model)["modules"]}
    q, v = rows["model.layers.0.self_attn.q_proj"], rows["model.layers.0.self_attn.v_proj"]
    assert (q["n"], q["r"], q["equivalent_rank"], q["params"]) == (8, 2, 16, 2 * (64 + 64))
    assert (v["n"], v["r"], v["equivalent_rank"], v["params"]) == (4, 3, 12, 3 * (64 + 32))
    summary = adapter_summary(model)
    assert summary["adapter_params"] == 2 * (2 * 128 + 3 * 96) == summary["trainable_params"]
    assert summary["equivalent_rank"] == 16
    assert summary["lora_params_same_rank"] == 2 * (16 * 128 + 12 * 96)


def test_patterns_apply_to_a_second_adapter():
    _, model = _patterned()
    model.add_adapter(
        "other", MELoRAConfig(r=1, n=2, n_pattern={"q_proj": 4}, target_modules=["q_proj", "v_proj"])
    )
    layers = _melora_layers(model)
    assert layers["model.layers.0.self_attn.q_proj"].n == {"default": 8, "other": 4}
    assert layers["model.layers.0.self_attn.v_proj"].n == {"default": 4, "other": 2}


# ---- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_pattern": {"v_proj": 0}}, r"n_pattern\['v_proj'\]=0: must be an integer >= 1"),
        ({"n_pattern": {"v_proj": 2.0}}, r"n_pattern\['v_proj'\]=2.0: must be an integer >= 1"),
        ({"r_pattern": {"q_proj": True}}, r"r_pattern\['q_proj'\]=True: must be an integer >= 1"),
        ({"r_pattern": {"q_proj": -1}}, r"r_pattern\['q_proj'\]=-1: must be an integer >= 1"),
        ({"alpha_pattern": {"v_proj": 0}}, r"alpha_pattern\['v_proj'\]=0: must be a finite number > 0"),
        ({"alpha_pattern": {"v_proj": float("inf")}}, r"alpha_pattern\['v_proj'\]=inf: must be a finite"),
        ({"alpha_pattern": {"v_proj": "2"}}, r"alpha_pattern\['v_proj'\]='2': must be a finite number"),
        ({"n_pattern": [("v_proj", 4)]}, r"n_pattern=\[\('v_proj', 4\)\]: must be a dict of module name"),
        ({"r_pattern": {"(v_proj": 2}}, r"r_pattern key '\(v_proj': not a valid regular expression"),
        ({"n_pattern": {3: 2}}, r"n_pattern key 3: must be a non-empty module name or regex string"),
    ],
)
def test_pattern_errors_name_the_field_and_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MELoRAConfig(**kwargs)


def test_all_pattern_problems_come_in_one_error():
    with pytest.raises(
        ValueError, match=r"(?s)n_pattern\['a'\]=0.*r_pattern\['b'\]=0.*alpha_pattern\['c'\]=-1"
    ):
        MELoRAConfig(n_pattern={"a": 0}, r_pattern={"b": 0}, alpha_pattern={"c": -1})


def test_none_patterns_mean_no_pattern():
    config = MELoRAConfig(n_pattern=None, r_pattern=None, alpha_pattern=None)
    assert (config.n_pattern, config.r_pattern, config.alpha_pattern) == ({}, {}, {})
    assert config.resolve("model.layers.0.self_attn.v_proj") == (8, 1, 16)


def test_n_not_dividing_suggests_common_divisors_and_an_n_pattern():
    # q_proj is 64 -> 64, v_proj 64 -> 32: n=64 divides q_proj but not v_proj's 32 outputs
    with pytest.raises(
        ValueError,
        match=r"n=64 does not divide out_features=32 of model\.layers\.0\.self_attn\.v_proj .*; use n in "
        r"\{1, 2, 4, 8, 16, 32\} \(divisors common to all targeted modules\) or n_pattern=\{\"v_proj\": 32\}",
    ):
        get_peft_model(tiny_llama(), MELoRAConfig(r=1, n=64, target_modules=["q_proj", "v_proj"]))
    # n=48 divides neither; the hint is the largest divisor of gcd(64, 32) below 48
    with pytest.raises(
        ValueError, match=r"n=48 does not divide in_features=64 .* n_pattern=\{\"q_proj\": 32\}"
    ):
        get_peft_model(tiny_llama(), MELoRAConfig(r=1, n=48, target_modules=["q_proj"]))


def test_n_pattern_not_dividing_names_the_pattern_key():
    with pytest.raises(
        ValueError,
        match=r"n=3 does not divide in_features=64 of model\.layers\.0\.self_attn\.v_proj .*"
        r"use n_pattern\[\"v_proj\"\] in \{1, 2, 4, 8, 16, 32\}",
    ):
        get_peft_model(
            tiny_llama(), MELoRAConfig(r=1, n=8, n_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"])
        )


def test_matching_patterns_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _patterned()


# ---- export: plain PEFT LoRA reproduces a patterned adapter --------------------------------------------------


def _load_with_plain_peft(lora_dir: Path, tmp_path: Path, inputs) -> torch.Tensor:
    """Logits of a fresh tiny Llama + the LoRA in ``lora_dir``, in a new process that never imports melora."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from peft import PeftModel
        from tests.tiny_models import tiny_llama
        torch.manual_seed(0)
        base = tiny_llama().eval()
        lora = PeftModel.from_pretrained(base, {str(lora_dir)!r}).eval()
        assert "melora" not in sys.modules, "plain PEFT must load the export without melora"
        torch.save(lora(**torch.load({str(tmp_path / "inputs.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    return torch.load(tmp_path / "out.pt")


def test_export_writes_rank_and_alpha_patterns_that_plain_peft_reproduces(tmp_path):
    _, model = _patterned()
    inputs = _inputs()
    export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    # per module: rank n*r and lora_alpha n*alpha; q (8*2=16, 8*8=64 / layer 1: 8*3=24), v (4*3=12, 4*5=20)
    # the (rank, alpha) pairs: q0 (16, 64), q1 (16, 24), v0 (12, 20), v1 (12, 20): v's pair is the default
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (12, 20)
    assert config["rank_pattern"] == {"q_proj": 16}
    assert config["alpha_pattern"] == {
        r"model\.layers\.0\.self_attn\.q_proj": 64,
        r"model\.layers\.1\.self_attn\.q_proj": 24,
    }
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (12, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 16)
    lora_out = _load_with_plain_peft(tmp_path / "lora", tmp_path, inputs)
    assert (lora_out - model(**inputs).logits).abs().max() <= 1e-5


def test_export_from_a_saved_patterned_adapter_equals_export_from_the_model(tmp_path):
    _, model = _patterned()
    save_adapter(model, tmp_path / "melora")
    export_lora(model, tmp_path / "from_model")
    export_lora(tmp_path / "melora", tmp_path / "from_dir")
    for name in ("rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        from_model = json.loads((tmp_path / "from_model" / "adapter_config.json").read_text())[name]
        assert json.loads((tmp_path / "from_dir" / "adapter_config.json").read_text())[name] == from_model
    a = load_file(tmp_path / "from_model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "from_dir" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_short_pattern_key_only_when_all_modules_of_that_name_agree(tmp_path):
    """alpha differs between layer 0 and layer 1 v_proj: the exported key must name the layer."""
    _, model = _patterned(alpha_pattern={"layers.0.self_attn.v_proj": 6})
    inputs = _inputs()
    export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    # q (16, 64) x2, v0 (12, 24), v1 (12, 32): q is the default; v keeps one rank but two alphas
    assert (config["r"], config["lora_alpha"]) == (16, 64)
    assert config["rank_pattern"] == {"v_proj": 12}
    assert config["alpha_pattern"] == {
        r"model\.layers\.0\.self_attn\.v_proj": 24,
        r"model\.layers\.1\.self_attn\.v_proj": 32,
    }
    lora_out = _load_with_plain_peft(tmp_path / "lora", tmp_path, inputs)
    assert (lora_out - model(**inputs).logits).abs().max() <= 1e-5


def _merge_ignoring_patterns(lora_dir: Path, rule: str) -> torch.nn.Module:
    """A fresh tiny Llama with the LoRA merged the way a tool that ignores rank/alpha patterns applies it.

    llama.cpp's converter keeps only the config's single ``lora_alpha`` and at run time scales each tensor by
    ``lora_alpha / rank`` with the rank read off lora_B's shape; vLLM scales every module by the config's
    ``lora_alpha / r``.
    """
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    torch.manual_seed(0)
    base = tiny_llama().eval()
    modules = dict(base.named_modules())
    with torch.no_grad():
        for key, lora_A in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_B = tensors[key.replace(".lora_A.", ".lora_B.")]
            rank = lora_B.shape[1] if rule == "llama.cpp" else config["r"]
            modules[name].weight += (config["lora_alpha"] / rank) * lora_B @ lora_A
    return base


def test_fold_scaling_export_is_exact_for_plain_peft_and_for_tools_that_ignore_patterns(tmp_path):
    _, model = _patterned()
    inputs = _inputs()
    out = model(**inputs).logits
    export_lora(model, tmp_path / "plain")
    export_lora(model, tmp_path / "folded", fold_scaling=True)
    config = json.loads((tmp_path / "folded" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 16)  # the largest rank, n*r = 8*2 on q_proj
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    tensors = load_file(tmp_path / "folded" / "adapter_model.safetensors")
    v_A = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    v_B = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert v_A.shape == (16, 64) and v_B.shape == (32, 16)  # rank 12 padded to 16 with zeros
    assert not v_A[12:].any() and not v_B[:, 12:].any()
    assert (_load_with_plain_peft(tmp_path / "folded", tmp_path, inputs) - out).abs().max() <= 1e-5
    with torch.no_grad():
        for rule in ("llama.cpp", "vllm"):
            folded = _merge_ignoring_patterns(tmp_path / "folded", rule)(**inputs).logits
            assert (folded - out).abs().max() <= 1e-5, rule
            # without folding, one lora_alpha (and, for vLLM, one r) gives some modules the wrong scale
            plain = _merge_ignoring_patterns(tmp_path / "plain", rule)(**inputs).logits
            assert (plain - out).abs().max() > 1e-3, rule


def test_export_cli_fold_scaling_flag(tmp_path):
    import argparse

    from melora.export import add_parser

    _, model = _patterned()
    save_adapter(model, tmp_path / "melora")
    subparsers = argparse.ArgumentParser().add_subparsers()
    add_parser(subparsers)
    args = subparsers.choices["export-lora"].parse_args(
        [str(tmp_path / "melora"), str(tmp_path / "lora"), "--fold-scaling"]
    )
    assert args.func(args) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["alpha_pattern"] == {}


def test_export_cli_accepts_a_run_folder(tmp_path):
    from melora.cli import main

    _, model = _patterned()
    save_adapter(model, tmp_path / "run" / "adapter")
    assert main(["export-lora", str(tmp_path / "run"), str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
