"""``melora eval`` end to end on a tiny saved model: results.json contract, adapters, CLI, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from melora.eval import runner
from tests.test_eval_fixtures import save_tiny_lm, write_eval_data

CONTRACT_KEYS = {"kind", "label", "method", "seed", "config", "versions", "trainable_params",
                 "equivalent_rank", "wall_time_s", "summary"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    return save_tiny_lm(root / "tiny-llama"), write_eval_data(root / "data")


def _save_adapter(model_dir: Path, config, out: Path) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(out)
    return out


def _logprobs(output_dir: Path) -> torch.Tensor:
    lines = (output_dir / "predictions" / "mmlu.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(line)["logprobs"] for line in lines])


def test_base_model_results_follow_the_contract(tiny_dirs, tmp_path):
    model_dir, data_dir = tiny_dirs
    results = runner.run_eval(str(model_dir), None, ["mmlu", "bbh"], str(data_dir), 1, 2, str(tmp_path))
    assert CONTRACT_KEYS <= set(results)
    assert (results["kind"], results["label"], results["method"]) == ("eval", "tiny-llama", "base")
    assert set(results["summary"]) == {"mmlu/acc", "mmlu/acc_macro", "bbh/em", "bbh/instructeval_acc"}
    assert (
        results["tasks"]["mmlu"]["n"] == 2 and results["tasks"]["bbh"]["n"] == 2
    )  # limit 1 per subject / task
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
    table = (tmp_path / "results.md").read_text()
    assert "| mmlu/acc |" in table and "| virology |" in table
    assert len((tmp_path / "predictions" / "mmlu.jsonl").read_text().splitlines()) == 2


def test_adapter_and_merged_adapter_score_the_same(tiny_dirs, tmp_path):
    model_dir, data_dir = tiny_dirs
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = _save_adapter(model_dir, config, tmp_path / "lora-r2")
    args = (["mmlu"], str(data_dir), 2, 4)
    plain = runner.run_eval(str(model_dir), str(adapter), *args, str(tmp_path / "a"))
    merged = runner.run_eval(str(model_dir), str(adapter), *args, str(tmp_path / "b"), merge=True)
    assert (plain["label"], plain["method"], plain["equivalent_rank"]) == ("lora r=2", "lora", 2)
    assert merged["config"]["merge"] and merged["trainable_params"] == plain["trainable_params"]
    assert plain["trainable_params"] == 2 * (
        2 * (64 + 64) + 2 * (64 + 32)
    )  # 2 layers x r=2 x (q 64->64, v 64->32)
    torch.testing.assert_close(_logprobs(tmp_path / "a"), _logprobs(tmp_path / "b"), atol=1e-4, rtol=0)


def test_melora_adapter_its_exported_lora_and_merge_score_the_same(tiny_dirs, tmp_path):
    from melora import MELoRAConfig, export_lora

    model_dir, data_dir = tiny_dirs
    config = MELoRAConfig(r=1, n=4, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    adapter = _save_adapter(model_dir, config, tmp_path / "melora-r1-n4")
    exported = export_lora(adapter, tmp_path / "exported")
    args = (["mmlu"], str(data_dir), 2, 4)
    base = runner.run_eval(str(model_dir), None, *args, str(tmp_path / "base"))
    mel = runner.run_eval(str(model_dir), str(adapter), *args, str(tmp_path / "melora"))
    lora = runner.run_eval(str(model_dir), str(exported), *args, str(tmp_path / "lora"))
    runner.run_eval(str(model_dir), str(adapter), *args, str(tmp_path / "merged"), merge=True)
    assert (mel["label"], mel["method"], mel["equivalent_rank"]) == ("melora r=1 n=4", "melora", 4)
    assert (lora["method"], lora["equivalent_rank"]) == ("lora", 4)
    assert mel["trainable_params"] == 2 * (64 + 64 + 64 + 32)  # per layer r*(d_in + d_out) for q and v
    for other in ("lora", "merged"):
        torch.testing.assert_close(
            _logprobs(tmp_path / "melora"), _logprobs(tmp_path / other), atol=1e-4, rtol=0
        )
    assert not torch.allclose(_logprobs(tmp_path / "melora"), _logprobs(tmp_path / "base"), atol=1e-4)
    assert base["trainable_params"] == 0 and base["equivalent_rank"] is None


def test_humaneval_needs_explicit_permission(tiny_dirs, tmp_path):
    model_dir, data_dir = tiny_dirs
    with pytest.raises(PermissionError, match="pass --allow-code-execution"):
        runner.run_eval(str(model_dir), None, ["humaneval"], str(data_dir), 1, 1, str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tasks": ["mmlu", "glue"]}, ValueError, r"Unknown or empty --tasks \['glue'\]"),
        ({"limit": 0}, ValueError, r"limits must be positive numbers of questions, got \{'mmlu': 0\}"),
        ({"limit": {"bbh": 2}}, ValueError, r"\['bbh'\] are not among the evaluated tasks \['mmlu'\]"),
        ({"merge": True}, ValueError, "--merge needs --adapter"),
        ({"adapter": "nowhere"}, FileNotFoundError, "--adapter nowhere does not exist"),
        ({"data_dir": "missing-dir"}, FileNotFoundError, "--data-dir missing-dir does not exist"),
    ],
)
def test_bad_options_fail_with_a_clear_message(tiny_dirs, tmp_path, kwargs, error, message):
    model_dir, data_dir = tiny_dirs
    options = {"model": str(model_dir), "adapter": None, "tasks": ["mmlu"], "data_dir": str(data_dir),
               "limit": 1, "batch_size": 1, "output_dir": str(tmp_path)} | kwargs  # fmt: skip
    with pytest.raises(error, match=message):
        runner.run_eval(**options)


def test_limits_per_task():
    assert runner.task_limits(2, ["mmlu", "bbh"]) == {"mmlu": 2, "bbh": 2}
    assert runner.task_limits({"bbh": 3}, ["mmlu", "bbh"]) == {"mmlu": None, "bbh": 3}
    assert runner.parse_limit("mmlu=2, bbh=3") == {"mmlu": 2, "bbh": 3}
    assert runner.parse_limit("5") == 5
    with pytest.raises(ValueError, match="give a number or task=N pairs"):
        runner.parse_limit("mmlu:2")


def test_data_dir_may_be_the_parent_of_eval(tmp_path):
    write_eval_data(tmp_path / "eval")
    assert runner.task_data_dir(tmp_path, "mmlu") == tmp_path / "eval" / "mmlu"
    assert runner.task_data_dir(tmp_path, "drop") is None  # not there: read the hub
    assert runner.task_data_dir(None, "mmlu") is None


def test_cli_parses_into_run_eval(tiny_dirs, tmp_path, capsys):
    model_dir, data_dir = tiny_dirs
    parser = argparse.ArgumentParser()
    runner.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", str(model_dir), "--tasks", "bbh", "--data-dir", str(data_dir),
                              "--limit", "bbh=1", "--max-new-tokens", "3", "--output-dir", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    assert "| bbh/em |" in capsys.readouterr().out
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert (config["tasks"], config["max_new_tokens"], config["batch_size"]) == (["bbh"], 3, 4)


def test_a_run_folder_is_accepted_and_labels_the_evaluation(tiny_dirs, tmp_path):
    """`--adapter RUN_DIR` finds RUN_DIR/adapter and takes label, method, r, n and seed from results.json."""
    from melora import MELoRAConfig
    from melora.records import RunRecord

    model_dir, data_dir = tiny_dirs
    config = MELoRAConfig(r=2, n=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    run_dir = tmp_path / "run"
    _save_adapter(model_dir, config, run_dir / "adapter")
    adapter = {"method": "melora", "r": 2, "n": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
               "modules_to_save": None, "label": "my melora"}  # fmt: skip
    RunRecord("instruct", "my melora", "melora-r2-n2", "melora", {"instruct/heldout_loss": 1.0}, seed=7,
              adapter=adapter, config={"lr": 0.01}, trainable_params=123).write(run_dir)  # fmt: skip
    results = runner.run_eval(
        str(model_dir), str(run_dir), ["mmlu"], str(data_dir), 1, 2, str(tmp_path / "ev")
    )
    assert (results["label"], results["slug"], results["seed"]) == ("my melora", "melora-r2-n2", 7)
    assert results["config"]["lr"] == 0.01 and results["trainable_params"] == 123
    assert results["complete"] is True
    with pytest.raises(FileNotFoundError, match="no adapter_config.json there or in"):
        runner.run_eval(str(model_dir), str(tmp_path), ["mmlu"], str(data_dir), 1, 2, str(tmp_path / "x"))
