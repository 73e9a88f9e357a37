"""llama.cpp runs the exported LoRA: its greedy tokens and logits equal the MELoRA PeftModel's.

Markers ``interop`` and ``llamacpp``: deselected by default (llama.cpp's converters pin their own transformers,
so they get their own environment). Set it up and run it with

    bash scripts/setup_llamacpp.sh           # .venv-llamacpp: llama-cpp-python built from source + converters
    .venv/bin/python -m pytest -m llamacpp -s

The path a practitioner takes, end to end on SmolLM2-135M in float32:
1. the base model's Hugging Face folder -> ``convert_hf_to_gguf.py --outtype f32`` (llama.cpp's converter);
2. MELoRA trained a few steps on real Alpaca examples -> ``export_lora`` -> ``convert_lora_to_gguf.py
   --outtype f32`` -> loaded by llama.cpp through llama-cpp-python (``Llama(lora_path=...)``);
3. greedy tokens (16 per prompt, argmax of the logits) compared with the PeftModel's here, and the logits at
   every position of prompt + continuation compared within ``LOGIT_ATOL``.

Cases: the base model alone (the conversion error, no adapter); MELoRA r=1 n=8 on q_proj/v_proj (plain
export); per-module n / r / alpha patterns on q/k/v/o_proj exported with ``fold_scaling=True`` (must match),
and the same adapter exported without folding, which llama.cpp reads wrongly (its converter ignores
rank_pattern / alpha_pattern: one lora_alpha, divided by each tensor's rank): those logits must be far off,
and must equal what PEFT computes when the alpha_pattern is dropped, which is the README's claim, measured.

Measured (llama-cpp-python 0.3.36, 2 shared CPU cores; printed with ``-s``): base only, tokens identical, max
|logit diff| 5.8e-05 (logits up to 34); r=1 n=8 plain export, tokens identical, 7e-05 to 1.0e-04 (the
adapter moves logits by 18-26); patterns with fold_scaling, tokens identical, 7e-05 to 1.0e-04; patterns
without folding, tokens differ, 11-19 (and 8e-05 from PEFT with the alpha_pattern dropped). A 1% error in the
exported lora_alpha fails the plain-export test. ``LOGIT_ATOL`` below is 100x the measured error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.interop_common import require_environment, train_a_few_steps

pytestmark = [pytest.mark.interop, pytest.mark.llamacpp]

REPO = Path(__file__).resolve().parents[1]
LLAMACPP_VENV = Path(os.environ.get("MELORA_LLAMACPP_VENV", REPO / ".venv-llamacpp"))
MAX_NEW_TOKENS = 16
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
]
# float32 end to end (f32 GGUF weights and LoRA, f32 KV cache): llama.cpp's logits differ from PyTorch's only
# by summation order. Measured max |diff| about 1e-4 on logits of magnitude ~20 (see the report); the bound
# leaves a wide margin for other CPUs' SIMD paths, yet is far below the unfolded-pattern error (~1e0 and up).
LOGIT_ATOL = 1e-2
# The unfolded pattern export must be wrong by at least this much under llama.cpp, or the check proves nothing.
WRONG_AT_LEAST = 1.0


# ---- the llama.cpp environment ------------------------------------------------------------------------------


def _llamacpp_python() -> Path:
    return require_environment(
        LLAMACPP_VENV / "bin" / "python",
        f"no llama.cpp environment at {LLAMACPP_VENV}: run bash scripts/setup_llamacpp.sh",
        needs=(LLAMACPP_VENV / "llama.cpp" / "convert_lora_to_gguf.py",),
    )


def _run_llamacpp(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    completed = subprocess.run(
        [str(_llamacpp_python()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"OMP_WAIT_POLICY": "PASSIVE", **env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        check=False,
    )
    assert completed.returncode == 0, f"{args[0]} failed:\n{completed.stderr[-4000:]}"
    return completed


def _convert(script: str, *args: str) -> None:
    """Run one of llama.cpp's own converters (from the same source as the llama-cpp-python build)."""
    _run_llamacpp([str(LLAMACPP_VENV / "llama.cpp" / script), *args])


def _llamacpp_outputs(
    tmp: Path,
    model_gguf: Path,
    runs: dict[str, Path | None],
    prompts: list[list[int]],
    sequences: list[list[int]],
) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Greedy tokens of each prompt and logits of each sequence, for each run (a LoRA GGUF or None)."""
    request = tmp / "llamacpp_request.json"
    request.write_text(
        json.dumps(
            {
                "model": str(model_gguf),
                "runs": [
                    {"name": name, "lora": None if lora is None else str(lora)} for name, lora in runs.items()
                ],
                "prompts": prompts,
                "max_new_tokens": MAX_NEW_TOKENS,
                "sequences": sequences,
            }
        )
    )
    prefix = str(tmp / "llamacpp_result")
    _run_llamacpp([str(REPO / "tests" / "llamacpp_run.py"), str(request), prefix])
    result = json.loads(Path(prefix + ".json").read_text())
    with np.load(prefix + ".npz") as npz:
        logits = {name: [npz[f"{name}/{i}"] for i in range(len(sequences))] for name in runs}
    return result, logits


# ---- the PyTorch side ---------------------------------------------------------------------------------------


def _train_a_few_steps(model, tokenizer) -> list[float]:
    return train_a_few_steps(model, tokenizer, steps=3, max_length=64)


@torch.no_grad()
def _greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """Argmax decoding with the KV cache, end-of-sequence ignored (not suppressed): tests/llamacpp_run.py's rule."""
    model.eval()
    outputs = []
    for ids in prompts:
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        tokens = []
        for step in range(MAX_NEW_TOKENS):
            tokens.append(int(out.logits[0, -1].argmax()))
            if step + 1 < MAX_NEW_TOKENS:
                out = model(
                    input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True
                )
        outputs.append(tokens)
    return outputs


@torch.no_grad()
def _logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    model.eval()
    return [model(input_ids=torch.tensor([s])).logits[0].float().numpy() for s in sequences]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def _min_margin(logits: list[np.ndarray], prompts: list[list[int]]) -> float:
    """Smallest gap between the top two logits where a greedy token was chosen (how close a tie came)."""
    gaps = []
    for z, p in zip(logits, prompts, strict=True):
        top2 = np.sort(z[len(p) - 1 : -1], axis=-1)[:, -2:]
        gaps.append(float((top2[:, 1] - top2[:, 0]).min()))
    return min(gaps)


def _report(case: str, text: str) -> None:
    print(f"[llama.cpp interop] {case}: {text}", file=sys.stderr)


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M: its Hugging Face folder, its f32 GGUF from llama.cpp's converter, the prompts."""
    _llamacpp_python()
    pytest.importorskip("gguf")
    from melora.lab.data.instruct import ALPACA_PROMPT_NO_INPUT
    from melora.lab.models import load_causal_lm

    tmp = tmp_path_factory.mktemp("llamacpp_base")
    model, tokenizer = load_causal_lm("smollm2")
    base_dir = tmp / "base"
    model.save_pretrained(base_dir)  # the same fp32 weights as the PeftModel's base
    tokenizer.save_pretrained(base_dir)
    # transformers 5 names its tokenizer class "TokenizersBackend", which the converters' transformers (4.57)
    # does not know; the tokenizer.json itself is the same fast tokenizer, whose v4 class reads it.
    tok_config = json.loads((base_dir / "tokenizer_config.json").read_text())
    if tok_config.get("tokenizer_class") == "TokenizersBackend":
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (base_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    base_gguf = tmp / "base-f32.gguf"
    _convert("convert_hf_to_gguf.py", str(base_dir), "--outtype", "f32", "--outfile", str(base_gguf))
    prompts = [tokenizer(ALPACA_PROMPT_NO_INPUT.format(instruction=i))["input_ids"] for i in INSTRUCTIONS]
    base_tokens = _greedy(model, prompts)
    return {
        "base_dir": base_dir,
        "base_gguf": base_gguf,
        "prompts": prompts,
        "base_tokens": base_tokens,
        "model": model,
    }


def _fresh_model():
    from melora.lab.models import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm("smollm2")


def _lora_gguf(smollm2, lora_dir: Path) -> Path:
    out = lora_dir.with_suffix(".gguf")
    _convert(
        "convert_lora_to_gguf.py", "--base", str(smollm2["base_dir"]), "--outtype", "f32", "--outfile", str(out),
        str(lora_dir),
    )  # fmt: skip
    return out


# ---- tests --------------------------------------------------------------------------------------------------


def test_llamacpp_base_model_matches_transformers(smollm2, tmp_path):
    """No adapter: what the GGUF conversion and llama.cpp's kernels alone contribute."""
    model, prompts, tokens = smollm2["model"], smollm2["prompts"], smollm2["base_tokens"]
    sequences = [p + t for p, t in zip(prompts, tokens)]
    expected = _logits(model, sequences)
    result, got = _llamacpp_outputs(tmp_path, smollm2["base_gguf"], {"base": None}, prompts, sequences)
    diff = _max_diff(got["base"], expected)
    _report(
        "base only",
        f"llama-cpp-python {result['llama_cpp_python']}: tokens identical {result['tokens']['base'] == tokens}, "
        f"max |logit diff| {diff:.2e} (logits up to {max(float(np.abs(z).max()) for z in expected):.1f}, "
        f"closest greedy top-2 gap {_min_margin(expected, prompts):.3f})",
    )
    assert result["tokens"]["base"] == tokens
    assert diff < LOGIT_ATOL


def test_llamacpp_runs_the_exported_lora_like_the_peft_model(smollm2, tmp_path):
    """MELoRA r=1 n=8 on q_proj/v_proj (v_proj is 576 -> 192), trained, plain export: no patterns to lose."""
    from peft import get_peft_model

    from melora import MELoRAConfig, export_lora

    model, tokenizer = _fresh_model()
    prompts, base_tokens = smollm2["prompts"], smollm2["base_tokens"]
    config = MELoRAConfig(r=1, n=8, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    losses = _train_a_few_steps(peft_model, tokenizer)
    assert losses[-1] < losses[0], losses
    tokens = _greedy(peft_model, prompts)
    assert tokens != base_tokens, (
        "the trained adapter must change some greedy output, or the test proves nothing"
    )
    sequences = [p + t for p, t in zip(prompts, tokens)]
    expected = _logits(peft_model, sequences)

    lora_dir = export_lora(peft_model, tmp_path / "lora")
    exported = json.loads((lora_dir / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["r"] == 8 and not exported.get("rank_pattern")
    lora_gguf = _lora_gguf(smollm2, lora_dir)
    result, got = _llamacpp_outputs(tmp_path, smollm2["base_gguf"], {"lora": lora_gguf}, prompts, sequences)
    diff = _max_diff(got["lora"], expected)
    _report(
        "r=1 n=8 q/v, plain export",
        f"tokens identical {result['tokens']['lora'] == tokens} ({sum(a != b for a, b in zip(tokens, base_tokens))}"
        f"/{len(prompts)} prompts changed by the adapter), max |logit diff| {diff:.2e}, "
        f"adapter's effect on logits {_max_diff(expected, _logits_without_adapter(peft_model, sequences)):.2f}, "
        f"closest greedy top-2 gap {_min_margin(expected, prompts):.3f}",
    )
    assert result["tokens"]["lora"] == tokens
    assert diff < LOGIT_ATOL


def _logits_without_adapter(peft_model, sequences):
    with peft_model.disable_adapter():
        return _logits(peft_model, sequences)


PATTERN_CONFIG = {
    "r": 1,
    "n": 8,
    "alpha": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "n_pattern": {
        "k_proj": 4,
        "v_proj": 4,
    },  # exported ranks 4, alphas 64 -> llama.cpp scales by 128/4 = 32, not 16
    "r_pattern": {
        r"layers\.0\.self_attn\.q_proj": 2,
        "o_proj": 2,
    },  # ranks 16: llama.cpp 128/16 = 8, not 16 / 2
    "alpha_pattern": {"o_proj": 8, "v_proj": 32},
}


def test_llamacpp_patterns_need_fold_scaling(smollm2, tmp_path):
    """Per-module n / r / alpha: the fold_scaling export matches; the plain one is wrong under llama.cpp."""
    from peft import PeftModel, get_peft_model

    from melora import MELoRAConfig, export_lora

    model, tokenizer = _fresh_model()
    prompts, base_tokens = smollm2["prompts"], smollm2["base_tokens"]
    peft_model = get_peft_model(model, MELoRAConfig(task_type="CAUSAL_LM", **PATTERN_CONFIG))
    losses = _train_a_few_steps(peft_model, tokenizer)
    assert losses[-1] < losses[0], losses
    tokens = _greedy(peft_model, prompts)
    assert tokens != base_tokens, (
        "the trained adapter must change some greedy output, or the test proves nothing"
    )
    sequences = [p + t for p, t in zip(prompts, tokens)]
    expected = _logits(peft_model, sequences)

    folded_dir = export_lora(peft_model, tmp_path / "folded", fold_scaling=True)
    plain_dir = export_lora(peft_model, tmp_path / "plain")
    folded_cfg = json.loads((folded_dir / "adapter_config.json").read_text())
    plain_cfg = json.loads((plain_dir / "adapter_config.json").read_text())
    assert folded_cfg["r"] == folded_cfg["lora_alpha"] == 16 and not folded_cfg.get("rank_pattern")
    assert plain_cfg["rank_pattern"] and plain_cfg["alpha_pattern"]

    # What llama.cpp is documented to compute from the plain export: each module's own rank (rank_pattern is
    # in the tensors' shapes) but one lora_alpha (alpha_pattern lost). PEFT computes that when the
    # alpha_pattern is dropped from the config.
    ignored_dir = tmp_path / "alpha_pattern_dropped"
    ignored_dir.mkdir()
    (ignored_dir / "adapter_model.safetensors").write_bytes(
        (plain_dir / "adapter_model.safetensors").read_bytes()
    )
    (ignored_dir / "adapter_config.json").write_text(json.dumps({**plain_cfg, "alpha_pattern": {}}))
    del peft_model, model
    fresh, _ = _fresh_model()
    in_peft = PeftModel.from_pretrained(fresh, plain_dir, adapter_name="plain")
    in_peft.load_adapter(ignored_dir, adapter_name="alpha_pattern_dropped")
    plain_in_peft = _logits(in_peft, sequences)
    in_peft.set_adapter("alpha_pattern_dropped")
    predicted_wrong = _logits(in_peft, sequences)
    del in_peft, fresh

    runs = {"folded": _lora_gguf(smollm2, folded_dir), "plain": _lora_gguf(smollm2, plain_dir)}
    result, got = _llamacpp_outputs(tmp_path, smollm2["base_gguf"], runs, prompts, sequences)
    folded_diff = _max_diff(got["folded"], expected)
    plain_diff = _max_diff(got["plain"], expected)
    plain_vs_predicted = _max_diff(got["plain"], predicted_wrong)
    _report(
        "patterns q/k/v/o, fold_scaling=True",
        f"tokens identical {result['tokens']['folded'] == tokens}, max |logit diff| {folded_diff:.2e}, "
        f"closest greedy top-2 gap {_min_margin(expected, prompts):.3f}",
    )
    _report(
        "patterns q/k/v/o, plain export (no folding)",
        f"tokens identical {result['tokens']['plain'] == tokens}, max |logit diff| {plain_diff:.2e} "
        f"(plain PEFT on the same export: {_max_diff(plain_in_peft, expected):.2e}; llama.cpp vs PEFT without "
        f"alpha_pattern: {plain_vs_predicted:.2e})",
    )
    assert result["tokens"]["folded"] == tokens
    assert folded_diff < LOGIT_ATOL
    # The plain export is right for PEFT, which reads the patterns ...
    assert _max_diff(plain_in_peft, expected) < 1e-3
    # ... and wrong for llama.cpp, in exactly the documented way: alpha_pattern ignored.
    assert plain_diff > WRONG_AT_LEAST
    assert plain_vs_predicted < LOGIT_ATOL
