"""Batched log-likelihood scoring and greedy generation on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from melora.lab.eval.scoring import (
    choice_logprobs,
    continuation_logprobs,
    fit_shots,
    greedy_generate,
    truncate_at_stop,
)
from tests.test_eval_fixtures import tiny_lm

CONTEXTS = ["Question one?\nAnswer:", "Q2\nAnswer:", "A much longer third question here, really.\nAnswer:"]
LETTERS = [" A", " B", " C", " D"]


def test_single_token_fast_path_equals_full_scoring():
    model, tokenizer = tiny_lm()
    fast = choice_logprobs(model, tokenizer, CONTEXTS, LETTERS, batch_size=2)  # (3, 4)
    pairs = [(c, x) for c in CONTEXTS for x in LETTERS]
    full = torch.tensor(continuation_logprobs(model, tokenizer, pairs, batch_size=5)).view(3, 4)
    assert fast.shape == (3, 4)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)


def test_scores_do_not_depend_on_batching_or_padding():
    model, tokenizer = tiny_lm()
    batched = choice_logprobs(model, tokenizer, CONTEXTS, LETTERS, batch_size=3)
    alone = torch.cat([choice_logprobs(model, tokenizer, [c], LETTERS, batch_size=1) for c in CONTEXTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_multi_token_continuation_is_a_sum_of_token_logprobs():
    model, tokenizer = tiny_lm()
    # "xy" is two byte tokens: log p(xy | c) = log p(x | c) + log p(y | c x)
    (both,) = continuation_logprobs(model, tokenizer, [("ctx:", "xy")], batch_size=1)
    (first,) = continuation_logprobs(model, tokenizer, [("ctx:", "x")], batch_size=1)
    (second,) = continuation_logprobs(model, tokenizer, [("ctx:x", "y")], batch_size=1)
    assert both == pytest.approx(first + second, abs=1e-5)
    multi = choice_logprobs(model, tokenizer, ["ctx:"], ["xy", "x"], batch_size=1)
    assert multi[0].tolist() == pytest.approx([both, first], abs=1e-5)


def test_greedy_generation_is_deterministic_and_left_padding_safe():
    model, tokenizer = tiny_lm()
    batched = greedy_generate(model, tokenizer, CONTEXTS, max_new_tokens=6, batch_size=3)
    alone = [greedy_generate(model, tokenizer, [c], max_new_tokens=6)[0] for c in CONTEXTS]
    assert batched == alone
    assert batched == greedy_generate(model, tokenizer, CONTEXTS, max_new_tokens=6, batch_size=2)


def test_generation_is_cut_at_stop_strings():
    model, tokenizer = tiny_lm()
    full = greedy_generate(model, tokenizer, CONTEXTS[:1], max_new_tokens=8)[0]
    stop = full[2]  # a character the model is known to produce
    cut = greedy_generate(model, tokenizer, CONTEXTS[:1], max_new_tokens=8, stop=[stop])[0]
    assert cut == full[: full.index(stop)]


def test_truncate_at_stop_uses_earliest_match():
    assert truncate_at_stop("abc\ndef\nclass X", ["\nclass", "\nd"]) == "abc"
    assert truncate_at_stop("no stop", ["\n"]) == "no stop"


def test_fit_shots_drops_shots_until_prompt_fits():
    _, tokenizer = tiny_lm()

    def build(k: int) -> str:
        return "shot!" * k + "question"

    assert fit_shots(build, 3, tokenizer, max_tokens=100) == (build(3), 3)
    assert fit_shots(build, 3, tokenizer, max_tokens=len("question") + 10) == (build(2), 2)
    assert fit_shots(build, 3, tokenizer, max_tokens=1) == ("question", 0)


def test_bad_batch_size_is_rejected():
    model, tokenizer = tiny_lm()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        choice_logprobs(model, tokenizer, CONTEXTS, LETTERS, batch_size=0)


SHOTS = "Shared few-shot header with several examples.\nAnswer: A\n\n"
GROUPED = [SHOTS + "First question?\nAnswer:", SHOTS + "Second, longer question here?\nAnswer:",
           "Unrelated prompt\nAnswer:", SHOTS + "Third?\nAnswer:"]  # fmt: skip
KEYS = ["shots", "shots", "alone", "shots"]


def test_shared_prefix_cache_gives_the_same_scores():
    model, tokenizer = tiny_lm()
    plain = choice_logprobs(model, tokenizer, GROUPED, LETTERS, batch_size=2)
    cached = choice_logprobs(model, tokenizer, GROUPED, LETTERS, batch_size=2, groups=KEYS)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
    multi = choice_logprobs(model, tokenizer, GROUPED, ["xy", " A"], batch_size=3, groups=KEYS)
    pairs = [(c, x) for c in GROUPED for x in ["xy", " A"]]
    expected = torch.tensor(continuation_logprobs(model, tokenizer, pairs, batch_size=1)).view(4, 2)
    torch.testing.assert_close(multi, expected, atol=1e-5, rtol=0)


def test_shared_prefix_cache_gives_the_same_generations():
    model, tokenizer = tiny_lm()
    plain = greedy_generate(model, tokenizer, GROUPED, max_new_tokens=5, batch_size=2)
    cached = greedy_generate(model, tokenizer, GROUPED, max_new_tokens=5, batch_size=2, groups=KEYS)
    assert cached == plain


def test_plan_shares_the_longest_common_prefix_within_groups():
    from melora.lab.eval.scoring import _plan

    rows = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [9, 9], [1, 2, 7]]
    assert _plan(rows, ["g", "g", "h", "g"], reserve=[1, 1, 1, 1]) == [(2, [0, 1, 3]), (0, [2])]
    assert _plan(rows, ["g", "g", "h", "g"], reserve=[3, 1, 1, 1]) == [(1, [0, 1, 3]), (0, [2])]
    assert _plan(rows, None, reserve=[1, 1, 1, 1]) == [(0, [0, 1, 2, 3])]


def test_overlong_prompts_are_cut_from_the_left_with_one_warning(caplog):
    """A prompt longer than the context, and max_new_tokens past it, generate instead of raising."""
    from tests.test_eval_fixtures import tiny_tokenizer
    from tests.tiny_models import tiny_llama

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, max_position_embeddings=32).eval()
    long = "word " * 200
    with caplog.at_level("WARNING", logger="melora.lab.eval.scoring"):
        out = greedy_generate(model, tokenizer, [long, CONTEXTS[0]], max_new_tokens=64, batch_size=2)
    assert len(out) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert any("does not fit the model's 32-token context" in w for w in warnings)
    assert sum("were cut from the left" in w for w in warnings) == 1  # one warning for the whole call
    kept = choice_logprobs(model, tokenizer, [long], LETTERS, batch_size=1)
    assert kept.shape == (1, 4) and torch.isfinite(kept).all()
