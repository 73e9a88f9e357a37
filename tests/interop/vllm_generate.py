"""Greedy generation with vLLM, run in the interop environment (scripts/setup_interop.sh), not in melora's.

    python tests/interop/vllm_generate.py REQUEST.json RESULT.json

REQUEST: {"model": folder, "lora": folder, "max_lora_rank": int, "prompts": [[token ids], ...],
"max_new_tokens": int}. RESULT: {"lora": [[ids], ...], "base": [[ids], ...], "vllm": version}: the
generated token ids of every prompt with the LoRA adapter and without it. vLLM never imports melora or
PEFT here: it reads the exported LoRA folder as any serving deployment would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(request_path: str, result_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for a few prompts
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    llm = LLM(
        model=request["model"],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=request["max_lora_rank"],
        max_loras=1,
        max_model_len=256,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    lora = LoRARequest("melora-export", 1, request["lora"])
    with_lora = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    without = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "vllm": vllm.__version__,
        "lora": [list(out.outputs[0].token_ids) for out in with_lora],
        "base": [list(out.outputs[0].token_ids) for out in without],
    }
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, result_path)


if __name__ == "__main__":  # vLLM starts worker processes: the guard keeps them from rerunning this
    main(sys.argv[1], sys.argv[2])
