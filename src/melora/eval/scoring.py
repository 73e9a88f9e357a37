"""Batched, deterministic scoring and greedy generation shared by the evaluation tasks.

Log-likelihood scoring pads on the right (positions stay 0..T-1, padding sits after the
tokens that matter); generation pads on the left so every row's next token comes from the
last column. Both sort requests by length so a batch wastes little padding, and give the
answers back in request order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 2048  # InstructEval's max_input_length


@dataclass
class TaskResult:
    """One task's outcome: headline metrics (flat), details for the report, one record per example."""

    summary: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)


def model_max_length(model: torch.nn.Module, cap: int = MAX_PROMPT_TOKENS) -> int:
    """Longest prompt we feed: the model's context size, capped at ``cap``."""
    limit = getattr(model.config, "max_position_embeddings", None) or cap
    return min(int(limit), cap)


def fit_shots(build: Callable[[int], str], shots: int, tokenizer, max_tokens: int) -> tuple[str, int]:
    """Return ``(build(k), k)`` for the largest ``k <= shots`` whose prompt fits in ``max_tokens``.

    Like InstructEval, drops few-shot examples from the end until the prompt fits; with zero
    shots the prompt is returned as is (scoring then keeps its last ``max_tokens`` tokens).
    """
    for k in range(shots, 0, -1):
        prompt = build(k)
        if len(tokenizer(prompt).input_ids) <= max_tokens:
            return prompt, k
    return build(0), 0


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (OOM shows up at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(ids, mask)``, both ``(B, T)``, padding left or right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    return int(pad)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int,
    max_tokens: int | None = None,
) -> list[float]:
    """Sum of log p(continuation | context) for each ``(context, continuation)`` pair.

    Context and continuation are tokenized apart (the continuation without special tokens)
    and joined, as lm-evaluation-harness does; the context is cut from the left if the pair
    exceeds ``max_tokens``.
    """
    max_tokens = max_tokens or model_max_length(model)
    rows, n_cont = [], []
    for context, continuation in requests:
        ctx = tokenizer(context).input_ids
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        if not cont:
            raise ValueError(f"Continuation {continuation!r} tokenizes to nothing; it cannot be scored.")
        rows.append((ctx + cont)[-max_tokens:])
        n_cont.append(len(cont))
    out = [0.0] * len(rows)
    device = _device(model)
    for batch in _length_batches([len(r) for r in rows], batch_size):
        ids, mask = _pad([rows[i] for i in batch], _pad_id(tokenizer), left=False)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, i in enumerate(batch):
            end, k = len(rows[i]), n_cont[i]
            targets = ids[b, end - k : end].to(device)  # (k,)
            # logits at position t predict token t + 1
            picked = logprobs[b, end - k - 1 : end - 1].gather(-1, targets[:, None])  # (k, 1)
            out[i] = float(picked.sum())
    return out


@torch.inference_mode()
def choice_logprobs(
    model: torch.nn.Module,
    tokenizer,
    contexts: Sequence[str],
    choices: Sequence[str],
    batch_size: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Log-probabilities ``(N, K)`` of each of the K ``choices`` continuing each of the N ``contexts``.

    When every choice is a single token (" A", " B", ... for most tokenizers) one forward pass
    per context suffices: the choices are read off the last position's distribution. Otherwise
    each (context, choice) pair is scored with :func:`continuation_logprobs`; both give the same
    numbers for single-token choices.
    """
    choice_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in choices]
    if any(len(ids) != 1 for ids in choice_ids):
        pairs = [(ctx, c) for ctx in contexts for c in choices]
        flat = continuation_logprobs(model, tokenizer, pairs, batch_size, max_tokens)
        return torch.tensor(flat, dtype=torch.float32).view(len(contexts), len(choices))
    max_tokens = max_tokens or model_max_length(model)
    targets = torch.tensor([ids[0] for ids in choice_ids])  # (K,)
    rows = [tokenizer(ctx).input_ids[-max_tokens:] for ctx in contexts]
    out = torch.empty((len(rows), len(choices)), dtype=torch.float32)
    device = _device(model)
    for batch in _length_batches([len(r) for r in rows], batch_size):
        ids, mask = _pad([rows[i] for i in batch], _pad_id(tokenizer), left=False)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        last = torch.tensor([len(rows[i]) - 1 for i in batch], device=device)  # (B,)
        final = logits[torch.arange(len(batch), device=device), last].float()  # (B, V)
        picked = torch.log_softmax(final, dim=-1)[:, targets.to(device)]  # (B, K)
        out[batch] = picked.cpu()
    return out


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated text (after ``prompt_width`` columns) holds a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width :]  # (B, generated so far)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 1,
    max_tokens: int | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` (text after the prompt, cut at the first stop string).

    Prompts are left-padded and cut from the left to ``max_tokens - max_new_tokens`` tokens.
    A row stops at eos or at a stop string; the batch stops when every row has.
    """
    max_tokens = max_tokens or model_max_length(model)
    budget = max(1, max_tokens - max_new_tokens)
    rows = [tokenizer(p).input_ids[-budget:] for p in prompts]
    pad_id = _pad_id(tokenizer)
    out = [""] * len(rows)
    device = _device(model)
    for batch in _length_batches([len(r) for r in rows], batch_size):
        ids, mask = _pad([rows[i] for i in batch], pad_id, left=True)
        criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, ids.shape[1])]) if stop else None
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            stopping_criteria=criteria,
        )  # (B, T + new)
        texts = tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            out[i] = truncate_at_stop(text, stop)
    return out
