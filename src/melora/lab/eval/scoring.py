"""Batched, deterministic scoring and greedy generation shared by the evaluation tasks.

Every forward pass pads on the left, so the tokens that matter sit in the last columns and only
those columns go through the LM head (``logits_to_keep``); position ids count real tokens only.
Requests that share a few-shot prefix (same ``groups`` key) run that prefix once and continue it
from the KV cache. Requests are sorted by length so a batch wastes little padding, and answers
come back in request order. Generation is a plain argmax loop over the KV cache.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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


LOG_EVERY_S = 30.0  # a progress line in the log this often when stderr is not a terminal


class _Progress:
    """A tqdm bar on stderr over ``total`` rows; where stderr is not a terminal (a log file, a job
    scheduler) the bar is off and a line "<desc>: k/N (x s)" is logged every ``LOG_EVERY_S`` seconds."""

    def __init__(self, total: int, desc: str) -> None:
        import sys

        from tqdm.auto import tqdm

        self.total, self.desc, self.done = total, desc, 0
        self.start = self.logged = time.monotonic()
        terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="q", leave=False, disable=total < 8 or not terminal)
        self.log = not terminal and total >= 8

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        now = time.monotonic()
        if self.log and now - self.logged >= LOG_EVERY_S and self.done < self.total:
            self.logged = now
            logger.info("%s: %d/%d (%.0f s)", self.desc, self.done, self.total, now - self.start)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str) -> _Progress:
    """Progress over ``total`` rows: a bar on a terminal, else a log line every ``LOG_EVERY_S`` s."""
    return _Progress(total, desc)


_progress = progress


def _cut_left(rows: list[list[int]], limit: int, what: str) -> list[list[int]]:
    """Keep the last ``limit`` tokens of each row; one warning per call when any row was longer."""
    cut = sum(len(r) > limit for r in rows)
    if cut:
        logger.warning(
            "%d of %d %s exceed %d tokens and were cut from the left (the model's context)",
            cut,
            len(rows),
            what,
            limit,
        )
    return [r[-limit:] for r in rows]


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions 0..N-1 grouped into batches of similar length, longest first (OOM shows up at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(ids, mask)``, both ``(B, W)``, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    return int(pad)


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for j in range(n):
        if any(r[j] != first[j] for r in rows):
            return j
    return n


def _plan(
    rows: Sequence[Sequence[int]], groups: Sequence[Hashable] | None, reserve: Sequence[int]
) -> list[tuple[int, list[int]]]:
    """Split requests into ``(shared prefix length, members)`` units.

    Members of a group share their longest common token prefix, except the last ``reserve[i]``
    tokens of each row, whose logits are needed. Requests without a group, or alone in theirs,
    form one unit with no shared prefix (and batch together).
    """
    by_group: dict[Hashable, list[int]] = {}
    for i, key in enumerate(groups if groups is not None else range(len(rows))):
        by_group.setdefault(key, []).append(i)
    units, loose = [], []
    for members in by_group.values():
        if len(members) == 1:
            loose += members
            continue
        shared = min(
            [_common_prefix_length([rows[i] for i in members]), *(len(rows[i]) - reserve[i] for i in members)]
        )
        units.append((max(shared, 0), members))
    if loose:
        units.append((0, loose))
    return units


class _Runner:
    """Forward passes over left-padded rows that may continue a cached, shared prefix.

    Layout of one batch: ``[prefix (P, cached)] [pad ...] [row tokens]``; the attention mask hides
    the pads and position ids count real tokens only, so each row sees exactly its own tokens.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x
        self.cache_name = (
            "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        )

    def __call__(self, cache, **kwargs):
        """One forward pass continuing ``cache``; returns ``(logits, cache)``."""
        out = self.model(**kwargs, **{self.cache_name: cache})
        return out.logits, getattr(out, self.cache_name, None)

    def prefix_cache(self, prefix: Sequence[int]):
        if not prefix:
            return None
        ids = torch.tensor([list(prefix)], device=self.device)  # (1, P)
        return self(None, input_ids=ids, use_cache=True, logits_to_keep=1)[1]

    def rows_forward(self, cache, prefix_len: int, rows: list[list[int]], keep: int, use_cache: bool):
        """Logits ``(B, keep, V)`` of the last ``keep`` columns, the full mask ``(B, P + W)``, the cache."""
        ids, mask = _pad_left(rows, self.pad_id)  # (B, W)
        full_mask = torch.cat(
            [torch.ones((len(rows), prefix_len), dtype=torch.long), mask], dim=1
        )  # (B, P + W)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]  # (B, W)
        if cache is not None:
            cache = copy.deepcopy(cache)
            cache.batch_repeat_interleave(len(rows))
        logits, cache = self(
            cache,
            input_ids=ids.to(self.device),
            attention_mask=full_mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=use_cache,
            logits_to_keep=keep,
        )
        return logits, full_mask, cache

    def units(self, rows, groups, reserve, batch_size):
        """Yield ``(cache, P, batch of row indices)`` over every request, sharing prefixes per group."""
        for prefix_len, members in _plan(rows, groups, reserve):
            cache = self.prefix_cache(rows[members[0]][:prefix_len])
            for batch in _length_batches([len(rows[i]) for i in members], batch_size):
                yield cache, prefix_len, [members[b] for b in batch]


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int,
    max_tokens: int | None = None,
    groups: Sequence[Hashable] | None = None,
) -> list[float]:
    """Sum of log p(continuation | context) for each ``(context, continuation)`` pair.

    Context and continuation are tokenized apart (the continuation without special tokens)
    and joined, as lm-evaluation-harness does; the context is cut from the left if the pair
    exceeds ``max_tokens``. Requests with the same ``groups`` key compute their common token
    prefix once (KV cache); the numbers are the same as without groups.
    """
    max_tokens = max_tokens or model_max_length(model)
    rows, n_cont = [], []
    for context, continuation in requests:
        ctx = tokenizer(context).input_ids
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        if not cont:
            raise ValueError(f"Continuation {continuation!r} tokenizes to nothing; it cannot be scored.")
        rows.append(ctx + cont)
        n_cont.append(len(cont))
    rows = _cut_left(rows, max_tokens, "scored sequences")
    out = [0.0] * len(rows)
    runner = _Runner(model, _pad_id(tokenizer))
    bar = _progress(len(rows), "scoring")
    for cache, prefix_len, batch in runner.units(rows, groups, [k + 1 for k in n_cont], batch_size):
        suffixes = [rows[i][prefix_len:] for i in batch]
        keep = max(n_cont[i] for i in batch) + 1
        logits, _, _ = runner.rows_forward(cache, prefix_len, suffixes, keep, use_cache=False)  # (B, keep, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, i in enumerate(batch):
            k = n_cont[i]
            targets = torch.tensor(rows[i][-k:], device=logprobs.device)  # (k,)
            # column t predicts the token in column t + 1: the last k + 1 columns score the last k tokens
            picked = logprobs[b, keep - k - 1 : keep - 1].gather(-1, targets[:, None])  # (k, 1)
            out[i] = float(picked.sum())
        bar.update(len(batch))
    bar.close()
    return out


@torch.inference_mode()
def choice_logprobs(
    model: torch.nn.Module,
    tokenizer,
    contexts: Sequence[str],
    choices: Sequence[str],
    batch_size: int,
    max_tokens: int | None = None,
    groups: Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """Log-probabilities ``(N, K)`` of each of the K ``choices`` continuing each of the N ``contexts``.

    When every choice is a single token (" A", " B", ... for most tokenizers) one forward pass
    per context suffices: the choices are read off the last position's distribution. Otherwise
    each (context, choice) pair is scored with :func:`continuation_logprobs`; both give the same
    numbers for single-token choices. ``groups`` as in :func:`continuation_logprobs`.
    """
    choice_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in choices]
    if any(len(ids) != 1 for ids in choice_ids):
        pairs = [(ctx, c) for ctx in contexts for c in choices]
        # the K pairs of one context share it; with groups, a whole group shares its common prefix
        pair_groups = [g for g in (groups if groups is not None else range(len(contexts))) for _ in choices]
        flat = continuation_logprobs(model, tokenizer, pairs, batch_size, max_tokens, pair_groups)
        return torch.tensor(flat, dtype=torch.float32).view(len(contexts), len(choices))
    max_tokens = max_tokens or model_max_length(model)
    targets = torch.tensor([ids[0] for ids in choice_ids])  # (K,)
    rows = _cut_left([tokenizer(ctx).input_ids for ctx in contexts], max_tokens, "prompts")
    out = torch.empty((len(rows), len(choices)), dtype=torch.float32)
    runner = _Runner(model, _pad_id(tokenizer))
    bar = _progress(len(rows), "scoring")
    for cache, prefix_len, batch in runner.units(rows, groups, [1] * len(rows), batch_size):
        logits, _, _ = runner.rows_forward(
            cache, prefix_len, [rows[i][prefix_len:] for i in batch], 1, use_cache=False
        )
        final = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)
        out[batch] = final[:, targets.to(final.device)].cpu()  # (B, K)
        bar.update(len(batch))
    bar.close()
    return out


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return {int(i) for i in ids if i is not None}


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 1,
    max_tokens: int | None = None,
    groups: Sequence[Hashable] | None = None,
) -> list[str]:
    """Greedy (argmax) completions of ``prompts``: the text after the prompt, cut at the first stop string.

    Prompts are left-padded and cut from the left to ``max_tokens - max_new_tokens`` tokens. A row
    stops at an eos token or a stop string; a batch stops when all its rows have. ``groups`` share
    their common prompt prefix through the KV cache, as in :func:`continuation_logprobs`.
    """
    max_tokens = max_tokens or model_max_length(model)
    if max_new_tokens >= max_tokens:
        logger.warning(
            "max_new_tokens=%d does not fit the model's %d-token context; generating at most %d",
            max_new_tokens,
            max_tokens,
            max_tokens // 2,
        )
        max_new_tokens = max_tokens // 2
    budget = max_tokens - max_new_tokens
    rows = _cut_left([tokenizer(p).input_ids for p in prompts], budget, "prompts")
    eos = torch.tensor(sorted(_eos_ids(model, tokenizer)))
    runner = _Runner(model, _pad_id(tokenizer))
    out = [""] * len(rows)
    bar = _progress(len(rows), "generating")
    for cache, prefix_len, batch in runner.units(rows, groups, [1] * len(rows), batch_size):
        logits, mask, cache_b = runner.rows_forward(
            cache, prefix_len, [rows[i][prefix_len:] for i in batch], 1, True
        )
        positions = mask.sum(-1) - 1  # (B,) position of each row's last token
        new = torch.empty((len(batch), 0), dtype=torch.long)
        done = torch.zeros(len(batch), dtype=torch.bool)
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(-1).cpu()  # (B,)
            token = torch.where(done, runner.pad_id, token)
            new = torch.cat([new, token[:, None]], dim=1)  # (B, t)
            done |= torch.isin(token, eos)
            if stop:
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                done |= torch.tensor([any(s in t for s in stop) for t in texts])
            if bool(done.all()) or new.shape[1] == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)  # (B, T + 1)
            positions = positions + 1
            logits, cache_b = runner(
                cache_b,
                input_ids=token[:, None].to(runner.device),
                attention_mask=mask.to(runner.device),
                position_ids=positions[:, None].to(runner.device),
                use_cache=True,
                logits_to_keep=1,
            )
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(batch, texts):
            out[i] = truncate_at_stop(text, stop)
        bar.update(len(batch))
    bar.close()
    return out
