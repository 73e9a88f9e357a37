"""Greedy tokens and logits from llama.cpp (llama-cpp-python), run in .venv-llamacpp (scripts/setup_llamacpp.sh).

    python tests/llamacpp_run.py REQUEST.json RESULT_PREFIX

REQUEST: {"model": base.gguf, "runs": [{"name": str, "lora": adapter.gguf or null}, ...],
"prompts": [[token ids], ...], "max_new_tokens": int, "sequences": [[token ids], ...]}.
For each run, the base model is loaded with that LoRA (or none), and
- each prompt is continued greedily (argmax of llama.cpp's float32 logits) for max_new_tokens tokens,
  end-of-sequence ignored;
- each sequence is evaluated in one pass and its logits at every position are kept.
RESULT_PREFIX.json gets {"llama_cpp_python": version, "tokens": {run: [[ids], ...]}};
RESULT_PREFIX.npz the logits, "<run>/<i>" of shape (len(sequences[i]), vocab).
Nothing here imports melora or PEFT: llama.cpp reads the converted GGUF files as any deployment would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

# ggml's OpenMP threads spin while they wait; on a shared 2-core machine that makes a run 3-7x slower (measured:
# 101 s active, 14 s passive, with identical logits). Set before llama_cpp loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _load(model: str, lora: str | None, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=model,
        lora_path=lora,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=int(os.environ.get("MELORA_LLAMACPP_THREADS", "2")),
        logits_all=True,  # keep the logits of every evaluated position in llm.scores
        type_k=llama_cpp.GGML_TYPE_F32,  # float32 KV cache: the default f16 one would add its own error
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        seed=0,
        verbose=False,
    )


def main(request_path: str, result_prefix: str) -> None:
    import llama_cpp

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    longest = max(
        [len(p) + request["max_new_tokens"] for p in request["prompts"]]
        + [len(s) for s in request["sequences"]]
    )
    n_ctx = max(64, longest + 8)
    tokens: dict[str, list[list[int]]] = {}
    logits: dict[str, np.ndarray] = {}
    for run in request["runs"]:
        llm = _load(request["model"], run["lora"], n_ctx)
        generated = []
        for prompt in request["prompts"]:
            llm.reset()
            llm.eval(prompt)
            out: list[int] = []
            for _ in range(request["max_new_tokens"]):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(token)
                llm.eval([token])
            generated.append(out)
        tokens[run["name"]] = generated
        for i, sequence in enumerate(request["sequences"]):
            llm.reset()
            llm.eval(sequence)
            logits[f"{run['name']}/{i}"] = np.array(llm.scores[: len(sequence)], dtype=np.float32)
        llm.close()
    np.savez(result_prefix + ".npz", **logits)
    result = {"llama_cpp_python": llama_cpp.__version__, "tokens": tokens}
    tmp = Path(result_prefix + ".json.tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, result_prefix + ".json")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
