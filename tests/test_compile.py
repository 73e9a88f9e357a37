"""torch.compile: MELoRA models trace with zero graph breaks, and compiled outputs and grads equal eager."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from melora import MELoRAConfig
from tests.tiny_models import tiny_bert, tiny_llama


def _model(kind: str, dropout: float):
    torch.manual_seed(0)
    if kind == "llama":
        base, targets, inputs = (
            tiny_llama(),
            ["q_proj", "v_proj"],
            {"input_ids": torch.randint(0, 100, (2, 8))},
        )
    else:
        base, targets, inputs = tiny_bert(), ["query", "value"], {"input_ids": torch.randint(0, 100, (2, 8))}
    config = MELoRAConfig(r=2, n=4, dropout=dropout, target_modules=targets, init_weights=False)
    return get_peft_model(base, config), inputs


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["eval", "train", "merged"])
def test_no_graph_breaks(kind, dropout, mode):
    torch._dynamo.reset()
    model, inputs = _model(kind, dropout)
    if mode == "merged":
        model.merge_adapter()
    model.train(mode == "train")
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_compiled_forward_and_gradients_equal_eager(kind):
    torch._dynamo.reset()
    model, inputs = _model(kind, dropout=0.0)
    model.eval()  # the base models' own dropout off: both runs compute the same function
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    out_eager = model(**inputs).logits
    out_compiled = compiled(**inputs).logits
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
    out_eager.square().mean().backward()
    out_compiled.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, param in compiled_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6)


def test_mixed_adapter_batches_compile_with_peft_hooks_outside_the_graph():
    """PEFT's adapter_names= route (one adapter per row) registers forward pre-hooks inside
    PeftModel.forward, which dynamo cannot trace (setattr on torch.utils.hooks.RemovableHandle): so no
    fullgraph there, but torch.compile with that break still gives the eager outputs."""
    torch._dynamo.reset()
    model, inputs = _model("llama", dropout=0.0)
    model.add_adapter(
        "other", MELoRAConfig(r=1, n=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    )
    model.eval()
    names = ["default", "other"]
    with torch.no_grad():
        expected = model(**inputs, adapter_names=names).logits
        assert not torch.allclose(expected[0], model(**inputs, adapter_names=["other", "other"]).logits[0])
        with pytest.raises(torch._dynamo.exc.Unsupported, match="setattr"):
            torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)(
                **inputs, adapter_names=names
            )
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
        torch.testing.assert_close(
            compiled(**inputs, adapter_names=names).logits, expected, rtol=1e-5, atol=1e-6
        )
