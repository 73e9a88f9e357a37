"""What the interop tests (vLLM, llama.cpp) share: a second tool's environment, and a MELoRA adapter trained
a few steps on real Alpaca examples so that it visibly changes the model's greedy outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA


def require_environment(python: Path, reason: str, needs: tuple[Path, ...] = ()) -> Path:
    """``python`` if its environment (and each file it ``needs``) is there; else skip, or fail in CI
    (MELORA_INTEROP_REQUIRED=1)."""
    if python.is_file() and all(path.is_file() for path in needs):
        return python
    if os.environ.get("MELORA_INTEROP_REQUIRED") == "1":  # CI: a missing environment is a failure
        pytest.fail(reason)
    pytest.skip(reason)


def train_a_few_steps(model, tokenizer, steps: int, max_length: int) -> list[float]:
    """AdamW on 8 real Alpaca examples (prompt + answer), lr high enough to move greedy outputs; returns the
    losses and leaves the model in eval mode."""
    from melora.lab.data.instruct import build_prompt, load_file

    path = SHARED_DATA / "instruct" / "alpaca" / "alpaca_data-00000-03252.json"
    if not path.is_file():
        pytest.skip(f"real Alpaca data not found at {path}")
    texts = [build_prompt(e) + e.output + tokenizer.eos_token for e in load_file(path)[:8]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
