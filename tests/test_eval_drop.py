"""DROP: official answer normalisation and EM/F1 by hand, InstructEval's split, data loading."""

from __future__ import annotations

import json
import random

import pytest

from melora.lab.eval import drop
from tests.test_eval_fixtures import eval_args, tiny_lm


def _q(passage: str, question: str, *spans: str) -> drop.Question:
    return drop.Question(f"s-{passage}", passage, question, spans)


QUESTIONS = [_q(f"P{i // 2}", f"q{i}?", f"ans {i}") for i in range(12)] + [_q("P9", "two?", "x", "y")]


def test_normalisation_follows_drop_eval():
    assert drop.normalize_answer("The  Eagles-Browns, 2") == "eagles browns 2.0"
    assert drop.normalize_answer("3.50") == "3.5"
    assert drop.normalize_answer("an apple") == "apple"


@pytest.mark.parametrize(
    ("pred", "gold", "em", "f1"),
    [
        ("2", "2.0", 1.0, 1.0),
        ("the Eagles", "Eagles", 1.0, 1.0),
        ("John Smith scored", "John Smith", 0.0, 0.8),  # P 2/3, R 1
        ("one two three", "one two three four five six", 0.0, 0.67),  # P 1, R 1/2 -> 2/3, rounded
        ("12 yards", "15 yards", 0.0, 0.0),  # gold number missing from the prediction -> F1 0
        (["a b", "c"], ["c", "a b"], 1.0, 1.0),  # multi-span, any order
        (["x"], ["x", "y"], 0.0, 0.5),  # one of two gold spans matched
    ],
)
def test_em_and_f1_by_hand(pred, gold, em, f1):
    assert drop.drop_metrics(pred, gold) == (em, pytest.approx(f1))


def test_best_metrics_takes_the_max_over_golds():
    assert drop.best_metrics("Smith", ["John Smith", "Smith"]) == (1.0, 1.0)


def test_split_keeps_single_answers_and_holds_out_shot_passages():
    split = drop.make_split(QUESTIONS)
    single = QUESTIONS[:12]
    assert split.shots == random.Random(0).sample(single, k=3)
    shot_passages = {s.passage for s in split.shots}
    assert split.questions == [q for q in single if q.passage not in shot_passages]
    assert drop.make_split(QUESTIONS, limit=2).questions == split.questions[:2]
    with pytest.raises(ValueError, match="more than 3 single-answer questions, found 1"):
        drop.make_split(QUESTIONS[-2:])


def test_official_json_is_converted_like_the_hub(tmp_path):
    qa = [
        {"question": "How many?", "query_id": "a", "answer": {"number": "7", "date": {}, "spans": []},
         "validated_answers": [{"number": "7", "date": {"day": "", "month": "", "year": ""}, "spans": []}]},
        {"question": "When?", "query_id": "b", "answer": {"number": "", "spans": [],
         "date": {"day": "4", "month": "July", "year": "1776"}}},
        {"question": "Who?", "query_id": "c", "answer": {"number": "", "date": {}, "spans": ["Ann", "Bo"]}},
    ]  # fmt: skip
    passages = {"s1": {"passage": "Text one.", "qa_pairs": qa}}
    passages |= {f"s{i}": {"passage": f"T{i}", "qa_pairs": [{"question": "q", "answer": {"number": str(i)}}]}
                 for i in range(2, 6)}  # fmt: skip
    (tmp_path / "drop_dataset_dev.json").write_text(json.dumps(passages))
    questions = drop._read_official(tmp_path / "drop_dataset_dev.json")
    assert [q.spans for q in questions[:3]] == [("7",), ("4 July 1776",), ("Ann", "Bo")]
    split = drop.load(tmp_path)
    assert len(split.shots) == 3 and all(len(set(q.spans)) == 1 for q in split.questions)


def test_evaluate_averages_em_and_f1(monkeypatch):
    split = drop.Split(QUESTIONS[:3], [_q("X", "q?", "John Smith"), _q("Y", "n?", "2")])
    replies = {"q?": " John Smith scored\nnext", "n?": " 2.0"}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, stop, batch_size, groups):
        assert (max_new_tokens, stop) == (16, ("\n",))
        assert all(p.startswith("P") and "\nAnswer: ans" in p for p in prompts)  # the shots come first
        return [replies[p.rsplit(" ", 1)[-1].removesuffix("\nAnswer:")].split("\n")[0] for p in prompts]

    monkeypatch.setattr(drop, "greedy_generate", fake_generate)
    model, tokenizer = tiny_lm()
    result = drop.evaluate(model, tokenizer, split, eval_args(batch_size=2))
    assert result.summary["em"] == pytest.approx((0 + 1) / 2)
    assert result.summary["f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert result.summary["instructeval_acc"] == 1.0  # both completions start with their answer
