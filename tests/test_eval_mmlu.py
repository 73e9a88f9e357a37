"""MMLU: CSV / hub loading, the 5-shot prompt, accuracy arithmetic, log-likelihood answers."""

from __future__ import annotations

import pytest
import torch

from melora.lab.eval import mmlu
from melora.lab.eval.scoring import choice_logprobs
from tests.test_eval_fixtures import MMLU_ROWS, eval_args, tiny_lm, write_eval_data

Q = mmlu.Question("2 + 2 = ?", ("3", "4", "5", "6"), "B")


def test_load_reads_subjects_shots_and_limited_questions(tmp_path):
    subjects = mmlu.load(write_eval_data(tmp_path) / "mmlu", limit=1)
    assert [s.name for s in subjects] == ["astronomy", "virology"]
    assert len(subjects[0].dev) == 5 and len(subjects[0].test) == 1
    assert subjects[1].test[0] == mmlu.Question(
        "Flu is caused by?", ("bacteria", "fungi", "prions", "a virus"), "D"
    )


def test_hub_rows_give_the_same_questions(tmp_path, monkeypatch):
    def fake_load_dataset(name, subject, split):
        assert name == "cais/mmlu"
        rows = MMLU_ROWS[subject][split]
        return [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in rows]

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr(mmlu, "SUBJECTS", ("astronomy", "virology"))
    assert mmlu.load(None, limit=2) == mmlu.load(write_eval_data(tmp_path) / "mmlu", limit=2)


def test_bad_answer_column_names_file_and_row(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "dev" / "x_dev.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(
        ValueError, match=r"x_test.csv, line 1: expected 6 columns \(question, A, B, C, D, answer A-D\)"
    ):
        mmlu.load(tmp_path)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No MMLU test CSVs"):
        mmlu.load(tmp_path)


def test_prompt_matches_the_standard_format():
    shot = mmlu.Question("1 + 1 = ?", ("2", "3", "4", "5"), "A")
    expected = (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "1 + 1 = ?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
        "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert mmlu.build_prompt("high_school_mathematics", [shot], Q) == expected


def test_micro_and_macro_accuracy_by_hand():
    summary = mmlu.accuracy_summary({"a": [True, False], "b": [True, True, True, False]})
    assert summary["acc"] == pytest.approx(4 / 6)  # 4 of 6 questions
    assert summary["acc_macro"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    with pytest.raises(ValueError, match="No MMLU questions were evaluated"):
        mmlu.accuracy_summary({"a": []})


def test_evaluate_picks_the_most_likely_letter(tmp_path):
    model, tokenizer = tiny_lm()
    subjects = mmlu.load(write_eval_data(tmp_path) / "mmlu")
    result = mmlu.evaluate(model, tokenizer, subjects, eval_args(batch_size=3))
    prompts = [mmlu.build_prompt(s.name, s.dev, q) for s in subjects for q in s.test]
    scores = choice_logprobs(model, tokenizer, prompts, [" A", " B", " C", " D"], batch_size=1)
    preds = ["ABCD"[int(i)] for i in scores.argmax(-1)]
    assert [p["pred"] for p in result.predictions] == preds
    answers = [q.answer for s in subjects for q in s.test]
    assert result.summary["acc"] == pytest.approx(sum(p == a for p, a in zip(preds, answers)) / 4)
    assert set(result.details["per_subject"]) == {"astronomy", "virology"}
    torch.testing.assert_close(torch.tensor([p["logprobs"] for p in result.predictions]), scores)


def test_a_field_longer_than_csvs_default_limit_is_read(tmp_path):
    """csv's default field limit is 131,072 characters; a real MMLU file has a 189k-character field."""
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
    long = "x" * 189_000
    (tmp_path / "dev" / "big_dev.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "test" / "big_test.csv").write_text(f'"{long}",a,b,c,d,B\n')
    (subject,) = mmlu.load(tmp_path)
    assert subject.test[0].question == long and subject.test[0].answer == "B"
