"""Fine-tune SmolLM2-135M-Instruct with MELoRA and the plain transformers Trainer, on Alpaca-format examples.

    python examples/train_melora_peft.py --max-steps 20
    python examples/train_melora_peft.py --data alpaca_data.json --num-examples 256 --max-steps 200

``--data`` is an Alpaca-format JSON file (a list of {"instruction", "input", "output"}); without it a handful of
examples written below are used. Prints the loss on the training examples before and after, and saves the adapter
(reload it with ``PeftModel.from_pretrained(base, OUTPUT_DIR)`` in a process that ran ``import melora``).
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import melora  # noqa: F401  (importing registers the "MELORA" method with PEFT)
from melora import MELoRAConfig, save_adapter
from melora.lab.models import (
    load_causal_lm,
)  # offline SmolLM2; or AutoModelForCausalLM.from_pretrained(hub id)

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
EXAMPLES = [
    {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "12 + 30 = 42."},
    {
        "instruction": "Give the opposite of the word.",
        "input": "cold",
        "output": "The opposite of cold is hot.",
    },
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3."},
    {
        "instruction": "Write the plural of the word.",
        "input": "mouse",
        "output": "The plural of mouse is mice.",
    },
    {"instruction": "How many legs does a spider have?", "input": "", "output": "A spider has eight legs."},
]


def tokenize(example: dict, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Prompt + response + EOS; the loss is on the response only (prompt labels are -100)."""
    template = PROMPT_INPUT if example.get("input", "").strip() else PROMPT
    prompt = tokenizer(template.format(**example), add_special_tokens=False).input_ids
    response = tokenizer(example["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    input_ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; padding is masked by length, not by pad id (SmolLM2's pad token is its end-of-turn token)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [pad_id] * pad)
        batch["labels"].append(f["labels"] + [-100] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="an alias of melora.lab.models or a model folder")
    parser.add_argument("--data", help="Alpaca-format JSON file (default: the examples in this script)")
    parser.add_argument("--num-examples", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--r", type=int, default=1)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/example-melora")
    args = parser.parse_args()

    examples = EXAMPLES
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            examples = json.load(f)
    examples = examples[: args.num_examples]

    torch.manual_seed(0)
    base, tokenizer = load_causal_lm(args.model)
    config = MELoRAConfig(
        r=args.r, n=args.n, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    train = [tokenize(e, tokenizer, args.max_length) for e in examples]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=max(1, args.max_steps // 5),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=train,
        eval_dataset=train,
        data_collator=lambda features: collate(features, tokenizer.pad_token_id),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    save_adapter(model, args.output_dir)
    print(
        f"loss on the {len(train)} training examples: {before:.4f} before, {after:.4f} after {args.max_steps} steps"
    )
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
