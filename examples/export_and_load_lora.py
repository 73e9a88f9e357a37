"""Save a MELoRA adapter, export it as a standard LoRA, load that with plain PEFT and compare the outputs.

    python examples/export_and_load_lora.py --r 1 --n 8

The export has rank n*r and lora_alpha n*alpha (the same scaling), so PEFT's own LoRA reproduces MELoRA's update
exactly: the logits agree to float rounding. The adapter is given non-zero random weights (``init_weights=False``)
so the comparison means something; a trained adapter is exported the same way (or ``melora export-lora``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

import melora  # noqa: F401  (importing registers the "MELORA" method with PEFT)
from melora import MELoRAConfig, export_lora, save_adapter
from melora.lab.models import (
    load_causal_lm,
)  # offline SmolLM2; or AutoModelForCausalLM.from_pretrained(hub id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="an alias of melora.lab.models or a model folder")
    parser.add_argument("--r", type=int, default=1)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--output-dir", default="runs/example-export")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()
    melora_dir, lora_dir = Path(args.output_dir) / "melora", Path(args.output_dir) / "lora"

    torch.manual_seed(0)
    base, tokenizer = load_causal_lm(args.model)
    config = MELoRAConfig(r=args.r, n=args.n, alpha=args.alpha, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM", init_weights=False)  # fmt: skip
    model = get_peft_model(base, config).eval()
    save_adapter(model, melora_dir)
    export_lora(melora_dir, lora_dir)  # the same as `melora export-lora MELORA_DIR LORA_DIR`
    lora_config = json.loads((lora_dir / "adapter_config.json").read_text())
    print(f"exported {melora_dir} -> {lora_dir}: peft_type {lora_config['peft_type']}, "
          f"r {lora_config['r']}, lora_alpha {lora_config['lora_alpha']}")  # fmt: skip

    fresh, _ = load_causal_lm(args.model)
    lora = PeftModel.from_pretrained(fresh, lora_dir).eval()  # plain PEFT LoRA: no melora code involved
    inputs = tokenizer([args.prompt], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        got = lora(**inputs).logits
        with lora.disable_adapter():
            base_logits = lora(**inputs).logits
    diff = (got - expected).abs().max().item()
    effect = (expected - base_logits).abs().max().item()
    print(
        f"max |logits(LoRA) - logits(MELoRA)| = {diff:.2e} (the adapter itself moves the logits by {effect:.2e})"
    )
    if not diff <= 1e-4 * max(1.0, effect):
        raise SystemExit(f"the exported LoRA differs from the MELoRA adapter by {diff}")


if __name__ == "__main__":
    main()
