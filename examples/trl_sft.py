"""Supervised fine-tuning with TRL's SFTTrainer and a MELoRA config, on a CPU or a GPU.

    python examples/trl_sft.py --max-steps 20

SFTTrainer wraps the model with the MELoRA config itself (``peft_config=``). TRL defaults to bf16, which a CPU
cannot run: ``bf16=torch.cuda.is_available()`` keeps the default on a GPU and turns it off elsewhere.
Prints the loss on the training pairs before and after, and saves the MELoRA adapter.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import melora  # noqa: F401  (importing registers the "MELORA" method with PEFT)
from melora import MELoRAConfig
from melora.lab.models import load_causal_lm  # offline SmolLM2; SFTTrainer also takes a hub name

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 12 + 30?", "12 + 30 = 42."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
    ("How do you say good morning in French?", "Bonjour."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("Sort 3, 1, 2.", "1, 2, 3."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="an alias of melora.lab.models or a model folder")
    parser.add_argument("--num-examples", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--output-dir", default="runs/example-sft")
    args = parser.parse_args()

    pairs = PAIRS[: args.num_examples]
    dataset = Dataset.from_dict({  # conversational prompt/completion: TRL applies the chat template
        "prompt": [[{"role": "user", "content": q}] for q, _ in pairs],
        "completion": [[{"role": "assistant", "content": a}] for _, a in pairs],
    })  # fmt: skip
    model, tokenizer = load_causal_lm(args.model)
    trainer = SFTTrainer(
        model=model,
        peft_config=MELoRAConfig(
            r=1, n=8, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
        train_dataset=dataset,
        eval_dataset=dataset,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.lr,
            max_length=128,
            bf16=torch.cuda.is_available(),  # TRL's default is bf16, which a CPU cannot run
            logging_steps=max(1, args.max_steps // 5),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        ),
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(args.output_dir)  # a MELoRA adapter: PeftModel.from_pretrained after `import melora`
    print(
        f"loss on the {len(pairs)} training pairs: {before:.4f} before, {after:.4f} after {args.max_steps} steps"
    )
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
