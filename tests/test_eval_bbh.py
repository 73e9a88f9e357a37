"""BBH: task files / hub loading, the 3-shot prompt, answer extraction, per-task averages."""

from __future__ import annotations

import pytest

from melora.lab.eval import bbh
from tests.test_eval_fixtures import BBH_TASKS, eval_args, tiny_lm, write_eval_data


def test_first_three_examples_are_shots_the_rest_questions(tmp_path):
    tasks = bbh.load(write_eval_data(tmp_path) / "bbh")
    assert [t.name for t in tasks] == ["boolean_expressions", "date_understanding"]
    assert [e.target for e in tasks[0].shots] == ["False", "True", "True"]
    assert tasks[0].questions == [bbh.Example("False and True is", "False")]
    assert bbh.load(tmp_path / "bbh", limit=0)[0].questions == []


def test_hub_rows_give_the_same_tasks(tmp_path, monkeypatch):
    def fake_load_dataset(name, task, split):
        assert (name, split) == ("lukaemon/bbh", "test")
        return BBH_TASKS[task]

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr(bbh, "TASKS", tuple(BBH_TASKS))
    assert bbh.load(None) == bbh.load(write_eval_data(tmp_path) / "bbh")


def test_prompt_matches_instructeval():
    shots = [bbh.Example("1 + 1 =", "2"), bbh.Example("2 + 2 =", "4")]
    prompt = bbh.build_prompt(shots, bbh.Example("3 + 3 =", "6"))
    assert prompt == "1 + 1 =\nAnswer: 2\n\n2 + 2 =\nAnswer: 4\n\n3 + 3 =\nAnswer:"


@pytest.mark.parametrize(
    ("completion", "target", "answer"),
    [
        (" (B) 12/25/1937\nQ: next", "(B)", "(B)"),
        (" B", "(B)", "(B)"),
        (" B) because", "(B)", "(B)"),
        (" B. because", "(B)", "(B)"),
        (" Because", "(B)", "Because"),
        (" A man", "(A)", "A man"),
        ("  True \n", "True", "True"),
        (" dog   cat", "cat dog", "dog cat"),
        ("", "True", ""),
    ],
)
def test_extract_answer(completion, target, answer):
    assert bbh.extract_answer(completion, target) == answer


def test_exact_match_versus_instructeval_prefix_rule():
    assert bbh.score(" True", "True") == (True, True)
    assert bbh.score(" Trueish", "True") == (False, True)  # InstructEval's startswith is looser
    assert bbh.score(" B", "(B)") == (True, False)  # the letter alone maps to the option


def test_per_task_average_by_hand(tmp_path, monkeypatch):
    tasks = bbh.load(write_eval_data(tmp_path) / "bbh")
    tasks = [bbh.Task("t1", tasks[0].shots, [bbh.Example("a", "True"), bbh.Example("b", "False")]),
             bbh.Task("t2", tasks[1].shots, [bbh.Example("c", "(A)")] * 3)]  # fmt: skip
    replies = {"a": " True", "b": " Falsehood", "c": " (A)"}
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, stop, batch_size, groups):
        seen.update(max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size, groups=groups)
        return [next(r for q, r in replies.items() if p.endswith(f"\n\n{q}\nAnswer:")) for p in prompts]

    monkeypatch.setattr(bbh, "greedy_generate", fake_generate)
    model, tokenizer = tiny_lm()
    result = bbh.evaluate(model, tokenizer, tasks, eval_args(batch_size=2))
    assert result.details["per_task"] == {"t1": 0.5, "t2": 1.0}
    assert result.summary["em"] == pytest.approx((0.5 + 1.0) / 2)  # tasks weigh equally
    assert result.summary["instructeval_acc"] == pytest.approx(
        (1.0 + 1.0) / 2
    )  # "Falsehood" starts with "False"
    assert len(result.predictions) == 5
    assert seen == {"max_new_tokens": 32, "stop": ("\n",), "batch_size": 2,
                    "groups": ["t1", "t1", "t2", "t2", "t2"]}  # fmt: skip


def test_evaluate_runs_generation_on_a_tiny_model(tmp_path):
    model, tokenizer = tiny_lm()
    tasks = bbh.load(write_eval_data(tmp_path) / "bbh")
    result = bbh.evaluate(model, tokenizer, tasks, eval_args(batch_size=2, max_new_tokens=4))
    assert len(result.predictions) == 2
    assert all("\n" not in p["completion"] for p in result.predictions)
    assert 0.0 <= result.summary["em"] <= 1.0
