"""MELoRA on quantized bases: bitsandbytes 4-bit / 8-bit, torchao int8 weight-only and HQQ 4-bit, on CPU.

Each backend is checked for the same properties on a tiny Llama (q_proj 64 -> 64, v_proj 64 -> 32, n=4, r=2):
- the wrapped layer's output equals ``W_deq x + (alpha/r) blockdiag(B_i A_i) x`` computed by hand in dense fp32
  from the dequantised weight, within the backend's kernel error (``forward_rtol``, relative to max |reference|);
- a few AdamW steps lower the loss and leave the quantized base untouched;
- merging leaves ``W_deq + dW`` requantised: the merged weight is within half a quantisation step of it
  (``merge_rtol``, relative to max |W_deq + dW|), and the merged model's logits stay far closer to the
  unmerged ones than the adapter's own effect;
- ``export_lora`` gives a standard LoRA that plain PEFT loads onto the same quantized base with equal logits.

bitsandbytes 0.50 and torchao run on CPU. transformers 5.24 rejects ``HqqConfig`` ("not available yet"), so the
HQQ base is built the way PEFT's own HQQ tests do, by wrapping the Linear layers in ``HQQLinear``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from melora import MELoRAConfig, export_lora, save_adapter
from melora.tuner.layer import Linear as MELoRALinear
from tests.tiny_models import tiny_llama

TARGETS = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # the package it needs (skips when absent)
    load: Callable[[Path], torch.nn.Module]
    forward_rtol: float  # quantized kernel vs dense fp32 on the dequantised weight
    merge_rtol: float  # half a quantisation step, relative to the largest merged weight


def _bnb(path: Path, **quant) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from melora.tuner.layer import keep_bnb_4bit_layout

    config = BitsAndBytesConfig(**quant)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    for module in model.modules():  # references (plain base, plain PEFT LoRA) in the layout MELoRA keeps
        keep_bnb_4bit_layout(module)
    return model


def _torchao(path: Path) -> torch.nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def _hqq(path: Path) -> torch.nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    for layer in model.model.layers:
        for name in TARGETS:
            linear = getattr(layer.self_attn, name)
            config = BaseQuantizeConfig(nbits=4, group_size=32)
            setattr(
                layer.self_attn, name, HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
            )
    return model


BACKENDS = {
    # nf4 with fp32 compute: the kernel dequantises then multiplies, so only fp32 rounding differs. NF4's widest
    # gap between levels is -1 to -0.696 of the block's absmax: half of it is 0.152, and double quantisation
    # rounds the absmax itself to 8 bits.
    "bnb-4bit": Backend(
        "bnb-4bit",
        "bitsandbytes",
        lambda p: _bnb(
            p,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        forward_rtol=1e-5,
        merge_rtol=0.16,
    ),
    # LLM.int8 also quantises the activations row-wise to int8 (inputs cast to fp16): ~1/127 per product,
    # averaging out over 64 inputs. Row-wise absmax int8 weights: half a step is 1/254 of the row's max.
    "bnb-8bit": Backend(
        "bnb-8bit", "bitsandbytes", lambda p: _bnb(p, load_in_8bit=True), forward_rtol=1e-2, merge_rtol=6e-3
    ),
    # int8 weight-only, per-channel absmax; activations stay fp32.
    "torchao": Backend("torchao", "torchao", _torchao, forward_rtol=1e-5, merge_rtol=6e-3),
    # 4-bit, group 32, min/max with zero points: half a step is (max - min) / 30 <= 2 * absmax / 30.
    "hqq": Backend("hqq", "hqq", _hqq, forward_rtol=1e-5, merge_rtol=0.07),
}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-quant")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(params=list(BACKENDS), ids=list(BACKENDS))
def backend(request) -> Backend:
    spec = BACKENDS[request.param]
    pytest.importorskip(spec.module, reason=f"{spec.name} needs {spec.module} (pip install 'melora[quant]')")
    return spec


def _melora(base: torch.nn.Module, init_weights: bool) -> torch.nn.Module:
    torch.manual_seed(1)
    config = MELoRAConfig(r=2, n=4, alpha=8, dropout=0.0, target_modules=TARGETS, init_weights=init_weights)
    return get_peft_model(base, config)


def _layers(model: torch.nn.Module) -> list[MELoRALinear]:
    return [m for m in model.modules() if isinstance(m, MELoRALinear)]


def _dense_delta(layer: MELoRALinear) -> torch.Tensor:
    """(alpha / r) * blockdiag(B_1 A_1, ..., B_n A_n), built block by block in fp32."""
    A = layer.melora_A["default"].detach().float()  # (n, r, k)
    B = layer.melora_B["default"].detach().float()  # (n, o, r)
    return torch.block_diag(*(B[i] @ A[i] for i in range(A.shape[0]))) * layer.scaling["default"]  # (out, in)


def _stored(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor for comparisons (torchao's weight subclass implements no aten.equal)."""
    from_torchao = type(value).__module__.startswith("torchao")
    return value.dequantize() if from_torchao else value.detach()


def _ids() -> torch.Tensor:
    return torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(2))


def test_layers_are_wrapped_with_their_backend(backend, tiny_llama_dir):
    model = _melora(backend.load(tiny_llama_dir), init_weights=True)
    layers = _layers(model)
    assert len(layers) == 4
    names = {layer.quantization_backend.backend_name for layer in layers}
    assert names == {backend.name.replace("-", " ")}
    assert f"quantization_backend='{names.pop()}'" in repr(layers[0])
    # adapter weights are fp32 (the base stores integers); B = 0 so step 0 equals the quantized base
    assert all(layer.melora_A["default"].dtype == torch.float32 for layer in layers)
    base = backend.load(tiny_llama_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, base(input_ids=_ids()).logits)


def test_forward_matches_dense_reference(backend, tiny_llama_dir):
    model = _melora(backend.load(tiny_llama_dir), init_weights=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    for layer in _layers(model):
        with torch.no_grad():
            W = layer.get_base_weight().float()  # (out, in), dequantised
            reference = x @ W.T + x @ _dense_delta(layer).T  # (5, out); tiny Llama has no bias
            adapter_only = x @ _dense_delta(layer).T
            out = layer(x).float()
        error = (out - reference).abs().max().item()
        assert error <= backend.forward_rtol * reference.abs().max().item(), (layer.module_name, error)
        assert adapter_only.abs().max() > 0.1  # the adapter's share is visible, so a dropped delta would fail


def test_training_lowers_the_loss_and_keeps_the_base(backend, tiny_llama_dir):
    model = _melora(backend.load(tiny_llama_dir), init_weights=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".melora_" in n for n in trainable)
    frozen = {k: _stored(v).clone() for k, v in model.state_dict().items() if ".melora_" not in k}
    ids = _ids()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(_stored(value), frozen[key]), key


def test_merge_requantises_and_unmerge_restores(backend, tiny_llama_dir):
    base_logits = backend.load(tiny_llama_dir)(input_ids=_ids()).logits.detach()
    model = _melora(backend.load(tiny_llama_dir), init_weights=False)
    layers = _layers(model)
    with torch.no_grad():
        unmerged = model(input_ids=_ids()).logits
        original = {layer.module_name: layer.get_base_weight().float().clone() for layer in layers}
        expected = {name: original[name] + _dense_delta(layer) for name, layer in zip(original, layers)}
    with pytest.warns(UserWarning, match="requantises their weights"):
        model.merge_adapter()
    steps = {}
    for layer in layers:
        target = expected[layer.module_name]
        steps[layer.module_name] = backend.merge_rtol * target.abs().max().item()
        error = (layer.get_base_weight().float() - target).abs().max().item()
        assert error <= steps[layer.module_name], (layer.module_name, error)
    with torch.no_grad():
        merged = model(input_ids=_ids()).logits
    effect = (unmerged - base_logits).abs().max().item()
    assert (merged - unmerged).abs().max().item() < 0.25 * effect
    with pytest.warns(UserWarning, match="Unmerging MELoRA"):
        model.unmerge_adapter()
    for layer in layers:  # two roundings: the merged one at the merged scale, then the restored one
        error = (layer.get_base_weight().float() - original[layer.module_name]).abs().max().item()
        assert error <= 2 * steps[layer.module_name], (layer.module_name, error)


def test_merge_and_unload_keeps_quantized_layers(backend, tiny_llama_dir):
    model = _melora(backend.load(tiny_llama_dir), init_weights=False)
    with torch.no_grad():
        unmerged = model(input_ids=_ids()).logits
    quantized_type = type(_layers(model)[0].get_base_layer())
    with pytest.warns(UserWarning, match="requantises their weights"):
        plain = model.merge_and_unload()
    assert not any(isinstance(m, MELoRALinear) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is quantized_type
    with torch.no_grad():
        merged = plain(input_ids=_ids()).logits
    base = backend.load(tiny_llama_dir)(input_ids=_ids()).logits.detach()
    assert (merged - unmerged).abs().max() < 0.25 * (unmerged - base).abs().max()


def test_export_lora_loads_in_plain_peft_on_the_same_base(backend, tiny_llama_dir, tmp_path):
    model = _melora(backend.load(tiny_llama_dir), init_weights=False)
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(backend.load(tiny_llama_dir), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_torchao_quantized_outside_transformers_refuses_to_merge(tiny_llama_dir):
    pytest.importorskip("torchao", reason="needs torchao (pip install 'melora[quant]')")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    quantize_(base, Int8WeightOnlyConfig())  # no TorchAoConfig: nothing records how to requantise
    model = _melora(base, init_weights=False)
    layer = _layers(model)[0]
    before = _stored(layer.get_base_layer().weight).clone()
    with torch.no_grad():
        model(input_ids=_ids())  # the forward works
    with pytest.raises(
        TypeError, match=r"Cannot merge MELoRA into .*q_proj: .*torchao \(quantized outside transformers\)"
    ):
        model.merge_and_unload()
    assert not layer.merged
    assert torch.equal(_stored(layer.get_base_layer().weight), before)


def test_save_load_round_trip_and_mixed_batch(backend, tiny_llama_dir, tmp_path):
    model = _melora(backend.load(tiny_llama_dir), init_weights=False).eval()
    base = backend.load(tiny_llama_dir).eval()
    with torch.no_grad():
        expected, plain = model(input_ids=_ids()).logits, base(input_ids=_ids()).logits
    save_adapter(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(backend.load(tiny_llama_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_ids()).logits, expected)
        mixed = reloaded(input_ids=_ids(), adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], expected[0])
    torch.testing.assert_close(mixed[1], plain[1])


def test_n_that_does_not_divide_a_quantized_layer_names_it(backend, tiny_llama_dir):
    config = MELoRAConfig(r=1, n=3, target_modules=TARGETS)
    with pytest.raises(
        ValueError,
        match=r"n=3 does not divide in_features=64 of model\.layers\.0\.self_attn\.q_proj .*use n in",
    ):
        get_peft_model(backend.load(tiny_llama_dir), config)


def test_bnb_4bit_keeps_its_layout_after_an_eval_forward_so_merges_stay_exact(tiny_llama_dir):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights in place during eval forwards; MELoRA stops it."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, device_map="cpu")
    layer = base.model.layers[0].self_attn.q_proj
    stored = layer.weight.data.clone()
    with torch.no_grad():
        base.eval()(input_ids=_ids())  # where bnb would repack (AVX512-BF16 CPUs only)
    model = _melora(base, init_weights=False)
    assert layer.support_avx512bf16_for_cpu is False
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, stored)  # a repacking, if there was one, was undone
    with torch.no_grad():
        model.eval()(input_ids=_ids())
    assert torch.equal(layer.weight.data, stored)
