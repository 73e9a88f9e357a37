"""lm-evaluation-harness scores a MELoRA model exactly as melora's own MMLU scorer does.

Three ways in: the PeftModel object (``HFLM(pretrained=model)``), the exported LoRA folder
(``peft=<lora dir>``, plain PEFT), and the MELoRA adapter folder (``peft=<melora dir>``, which works
only in a process that has imported melora).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model

from melora import MELoRAConfig, export_lora, save_adapter
from melora.lab.eval import mmlu
from melora.lab.eval.scoring import choice_logprobs
from tests.test_eval_fixtures import save_tiny_lm, tiny_lm, write_eval_data

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance  # noqa: E402 (after the importorskip)

LETTERS = [" A", " B", " C", " D"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny Llama with a non-zero MELoRA adapter, its MMLU prompts, and melora's scores for them."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    base, tokenizer = tiny_lm()
    torch.manual_seed(3)
    config = MELoRAConfig(r=2, n=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    subjects = mmlu.load(write_eval_data(tmp) / "mmlu")
    prompts = [mmlu.build_prompt(s.name, s.dev, q) for s in subjects for q in s.test]  # 5-shot each
    expected = choice_logprobs(model, tokenizer, prompts, LETTERS, batch_size=2)  # (N, 4), what MMLU uses
    with model.disable_adapter():
        base_scores = choice_logprobs(model, tokenizer, prompts, LETTERS, batch_size=2)
    assert (expected - base_scores).abs().max() > 1e-3  # the adapter changes the scores
    return {"tmp": tmp, "model": model, "tokenizer": tokenizer, "prompts": prompts, "expected": expected}


def _harness_scores(lm, prompts) -> torch.Tensor:
    """(N, 4) log-likelihoods of " A".." D" after each prompt, from lm-eval's ``loglikelihood`` requests."""
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(prompt, letter), idx=i)
        for prompt in prompts
        for i, letter in enumerate(LETTERS)
    ]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    return torch.tensor([logprob for logprob, _ in results], dtype=torch.float32).view(len(prompts), 4)


def test_hflm_on_the_peft_model_object_matches_melora_scoring(setting):
    lm = lm_eval_hf.HFLM(
        pretrained=setting["model"], tokenizer=setting["tokenizer"], batch_size=3, max_length=4096
    )
    scores = _harness_scores(lm, setting["prompts"])
    torch.testing.assert_close(scores, setting["expected"], atol=1e-4, rtol=0)


def test_hflm_with_the_exported_lora_folder_matches_melora_scoring(setting):
    tmp = setting["tmp"]
    base_dir = save_tiny_lm(tmp / "base")
    export_lora(setting["model"], tmp / "lora")
    lm = lm_eval_hf.HFLM(
        pretrained=str(base_dir), peft=str(tmp / "lora"), device="cpu", batch_size=3, max_length=4096
    )
    assert type(lm.model.peft_config["default"]).__name__ == "LoraConfig"
    scores = _harness_scores(lm, setting["prompts"])
    torch.testing.assert_close(scores, setting["expected"], atol=1e-4, rtol=0)


def test_hflm_with_the_melora_folder_matches_in_a_process_that_imported_melora(setting):
    tmp = setting["tmp"]
    base_dir = save_tiny_lm(tmp / "base_for_melora")
    save_adapter(setting["model"], tmp / "melora")
    lm = lm_eval_hf.HFLM(
        pretrained=str(base_dir), peft=str(tmp / "melora"), device="cpu", batch_size=3, max_length=4096
    )
    assert type(lm.model.peft_config["default"]) is MELoRAConfig
    scores = _harness_scores(lm, setting["prompts"])
    torch.testing.assert_close(scores, setting["expected"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_lm_eval_command_line_with_the_exported_lora_matches_melora_scoring(setting):
    """``lm_eval run --model hf --model_args pretrained=<base>,peft=<exported lora>``: lm-eval's own command,
    which never imports melora, on a local task whose documents are melora's MMLU prompts."""
    tmp = setting["tmp"]
    base_dir = save_tiny_lm(tmp / "cli_base")
    export_lora(setting["model"], tmp / "cli_lora")
    task_dir = tmp / "tasks"
    task_dir.mkdir()
    items = task_dir / "items.jsonl"
    items.write_text("".join(json.dumps({"prompt": p, "answer": 0}) + "\n" for p in setting["prompts"]))
    (task_dir / "melora_mmlu_prompts.yaml").write_text(
        textwrap.dedent(f"""\
            task: melora_mmlu_prompts
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {items}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{prompt}}}}"
            doc_to_choice: [" A", " B", " C", " D"]
            doc_to_target: answer
            target_delimiter: ""
            metric_list:
              - metric: acc
        """)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={base_dir},peft={tmp / 'cli_lora'},max_length=4096",
         "--device", "cpu", "--tasks", "melora_mmlu_prompts", "--include_path", str(task_dir),
         "--batch_size", "2", "--output_path", str(tmp / "cli_out"), "--log_samples"],
        check=True, cwd=tmp, env=env,
    )  # fmt: skip
    (samples,) = (tmp / "cli_out").rglob("samples_melora_mmlu_prompts_*.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    scores = torch.tensor([[float(resp[0][0]) for resp in row["resps"]] for row in rows])
    assert [row["doc"]["prompt"] for row in rows] == setting["prompts"]
    torch.testing.assert_close(scores, setting["expected"], atol=1e-4, rtol=0)
