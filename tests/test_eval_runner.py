"""``melora eval`` end to end on a tiny saved model: results.json contract, adapters, CLI, errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from melora.lab.args import UserError, load_preset
from melora.lab.eval import runner
from melora.lab.eval.args import EvalArgs
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


def _run(model_dir: Path, data_dir: Path, output_dir: Path, **options) -> dict:
    """``run_eval`` on MMLU, limit 1, batch 2, unless ``options`` say otherwise."""
    defaults = {"tasks": ["mmlu"], "data_dir": str(data_dir), "limit": 1, "batch_size": 2}
    return runner.run_eval(EvalArgs(str(model_dir), output_dir=str(output_dir), **(defaults | options)))


def _logprobs(output_dir: Path) -> torch.Tensor:
    lines = (output_dir / "predictions" / "mmlu.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(line)["logprobs"] for line in lines])


def test_base_model_results_follow_the_contract(tiny_dirs, tmp_path):
    model_dir, data_dir = tiny_dirs
    results = _run(model_dir, data_dir, tmp_path, tasks=["mmlu", "bbh"])
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
    args = {"limit": 2, "batch_size": 4, "adapter": str(adapter)}
    plain = _run(model_dir, data_dir, tmp_path / "a", **args)
    merged = _run(model_dir, data_dir, tmp_path / "b", **args, merge=True)
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
    args = {"limit": 2, "batch_size": 4}
    base = _run(model_dir, data_dir, tmp_path / "base", **args)
    mel = _run(model_dir, data_dir, tmp_path / "melora", **args, adapter=str(adapter))
    lora = _run(model_dir, data_dir, tmp_path / "lora", **args, adapter=str(exported))
    _run(model_dir, data_dir, tmp_path / "merged", **args, adapter=str(adapter), merge=True)
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
        _run(model_dir, data_dir, tmp_path, tasks=["humaneval"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"tasks": ["mmlu", "glue"]},
            r"tasks=\['mmlu', 'glue'\]: Unknown or empty --tasks \['glue'\]; choose from mmlu",
        ),
        ({"tasks": []}, r"tasks=\[\]: Unknown or empty --tasks \[\]"),
        ({"limit": 0}, r"limit=0: limits must be positive numbers of questions, got \{'mmlu': 0\}"),
        (
            {"limit": {"bbh": 2}},
            r"limit=\{'bbh': 2\}: \['bbh'\] are not among the evaluated tasks \['mmlu'\]; add",
        ),
        ({"limit": "mmlu:2"}, r"limit='mmlu:2': give a number or task=N pairs such as mmlu=2,bbh=3"),
        ({"limit": 2.5}, r"limit=2.5: expected a number of questions or task=N pairs"),
        ({"merge": True}, r"merge=True: --merge needs --adapter"),
        ({"batch_size": 0}, r"batch_size=0: expected a positive integer"),
        ({"max_new_tokens": -1}, r"max_new_tokens=-1: expected a positive integer"),
        ({"model": None}, r"model is required: pass --model \(or set model in the preset\)"),
        ({"output_dir": ""}, r"output_dir is required: pass --output-dir"),
    ],
)
def test_bad_options_are_one_user_error_naming_the_field(kwargs, message):
    options = {"model": "m", "tasks": ["mmlu"], "limit": 1, "output_dir": "out"} | kwargs
    with pytest.raises(UserError, match=r"^Invalid eval options: .*" + message):
        EvalArgs(**options)


def test_every_problem_is_named_in_one_error():
    with pytest.raises(UserError) as error:
        EvalArgs(tasks=["mmlu", "glue"], batch_size=0, merge=True, limit="x")
    message = str(error.value)
    for part in ("model is required", "output_dir is required", "tasks=['mmlu', 'glue']", "batch_size=0",
                 "merge=True", "limit='x'"):  # fmt: skip
        assert part in message, part
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"adapter": "nowhere"}, FileNotFoundError, "--adapter nowhere does not exist"),
        ({"data_dir": "missing-dir"}, FileNotFoundError, "--data-dir missing-dir does not exist"),
    ],
)
def test_missing_paths_fail_with_a_clear_message(tiny_dirs, tmp_path, kwargs, error, message):
    model_dir, data_dir = tiny_dirs
    with pytest.raises(error, match=message):
        runner.run_eval(
            EvalArgs(str(model_dir), output_dir=str(tmp_path), **({"data_dir": str(data_dir)} | kwargs))
        )


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
    from melora.lab.records import RunRecord

    model_dir, data_dir = tiny_dirs
    config = MELoRAConfig(r=2, n=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    run_dir = tmp_path / "run"
    _save_adapter(model_dir, config, run_dir / "adapter")
    adapter = {"method": "melora", "r": 2, "n": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
               "modules_to_save": None, "label": "my melora"}  # fmt: skip
    RunRecord("instruct", "my melora", "melora-r2-n2", "melora", {"instruct/heldout_loss": 1.0}, seed=7,
              adapter=adapter, config={"lr": 0.01}, trainable_params=123).write(run_dir)  # fmt: skip
    results = _run(model_dir, data_dir, tmp_path / "ev", adapter=str(run_dir))
    assert (results["label"], results["slug"], results["seed"]) == ("my melora", "melora-r2-n2", 7)
    assert results["config"]["lr"] == 0.01 and results["trainable_params"] == 123
    assert results["complete"] is True
    with pytest.raises(FileNotFoundError, match="no adapter_config.json there or in"):
        _run(model_dir, data_dir, tmp_path / "x", adapter=str(tmp_path))


def test_a_run_folder_needs_no_model_flag(tiny_dirs, tmp_path):
    """`melora eval --adapter RUN_DIR` evaluates on the run's own model; a bare adapter on the base it names."""
    from melora import MELoRAConfig
    from melora.lab.records import RunRecord

    model_dir, data_dir = tiny_dirs
    config = MELoRAConfig(r=2, n=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    run_dir = tmp_path / "run"
    _save_adapter(model_dir, config, run_dir / "adapter")
    RunRecord("instruct", "m", "melora-r2-n2", "melora", {}, seed=0, config={"model": str(model_dir)}).write(
        run_dir
    )
    options = {"tasks": ["mmlu"], "data_dir": str(data_dir), "limit": 1, "batch_size": 2}
    by_run = runner.run_eval(EvalArgs(adapter=str(run_dir), output_dir=str(tmp_path / "a"), **options))
    with_model = _run(model_dir, data_dir, tmp_path / "b", adapter=str(run_dir))
    assert by_run["config"]["model"] == str(model_dir) and by_run["summary"] == with_model["summary"]
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = None
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    (run_dir / "results.json").unlink()
    with pytest.raises(UserError, match=r"names no base model .*: pass --model"):
        runner.run_eval(EvalArgs(adapter=str(run_dir), output_dir=str(tmp_path / "c"), **options))


# --------------------------------------------------------------------------- one schema: flags, presets, tasks

LEGACY_ARGV = ["eval", "--model", "m", "--adapter", "a", "--merge", "--tasks", "mmlu,bbh", "--data-dir", "d",
               "--limit", "mmlu=2", "--batch-size", "3", "--max-new-tokens", "5", "--allow-code-execution",
               "--accept-weak-sandbox", "--label", "x", "--output-dir", "o"]  # fmt: skip


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    runner.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_every_flag_is_an_eval_args_field_and_the_old_flags_still_parse():
    args = _parse(LEGACY_ARGV)
    assert set(vars(args)) - {"config", "func"} == {f.name for f in dataclasses.fields(EvalArgs)}
    options = EvalArgs.from_options(vars(args))
    assert options == EvalArgs("m", "a", merge=True, tasks=["mmlu", "bbh"], data_dir="d", limit={"mmlu": 2},
                               batch_size=3, max_new_tokens=5, allow_code_execution=True,
                               accept_weak_sandbox=True, label="x", output_dir="o")  # fmt: skip
    spaced = _parse(["eval", "--model", "m", "--output-dir", "o", "--tasks", "mmlu", "drop", "--limit", "7"])
    assert EvalArgs.from_options(vars(spaced)).tasks == ["mmlu", "drop"]
    assert EvalArgs.from_options(vars(spaced)).limit == 7


def test_the_weak_sandbox_flag_is_the_one_the_refusal_names():
    from melora.lab.args import flag_name
    from melora.lab.eval.sandbox import ACCEPT_FLAG

    assert flag_name("accept_weak_sandbox") == ACCEPT_FLAG


def test_a_preset_round_trips_and_flags_override_it(tmp_path):
    written = EvalArgs("m", str(tmp_path / "run"), tasks=["bbh", "drop"], limit={"bbh": 2}, batch_size=3,
                       output_dir=str(tmp_path / "ev"), label="mine")  # fmt: skip
    preset = written.to_preset(tmp_path / "eval.yaml")
    assert EvalArgs.from_preset(preset) == written
    args = _parse(["eval", "--config", str(preset), "--batch-size", "5", "--tasks", "bbh"])
    read = EvalArgs.from_options(vars(args), load_preset(preset), preset)
    assert read == dataclasses.replace(written, batch_size=5, tasks=["bbh"])


def test_a_preset_key_that_is_no_field_is_named_with_the_file(tmp_path):
    preset = tmp_path / "eval.yaml"
    preset.write_text("model: m\noutput_dir: o\ntask: [mmlu]\n")
    with pytest.raises(UserError, match=r"eval\.yaml: unknown key 'task' \(did you mean 'tasks'\?\)"):
        EvalArgs.from_preset(preset)
    preset.write_text("model: m\noutput_dir: o\nlimit: mmlu=2\nbatch_size: 0\n")
    with pytest.raises(UserError, match=r"batch_size=0: expected a positive integer"):
        EvalArgs.from_preset(preset)


def test_every_task_module_has_the_one_evaluate_signature():
    import inspect

    from melora.lab.eval.args import TASK_NAMES

    assert tuple(runner.TASKS) == TASK_NAMES
    for name, task in runner.TASKS.items():
        assert inspect.ismodule(task), name  # the module itself: no wrapper, no lambda
        params = inspect.signature(task.evaluate).parameters
        assert list(params)[1:] == ["tokenizer", list(params)[2], "args"], name
        assert params["args"].annotation == "EvalArgs", name
        assert all(p.default is inspect.Parameter.empty for p in params.values()), name


def test_melora_eval_runs_from_a_preset_and_records_it_as_config(tiny_dirs, tmp_path, capsys):
    model_dir, data_dir = tiny_dirs
    preset = EvalArgs(str(model_dir), tasks=["mmlu"], data_dir=str(data_dir), limit=1, batch_size=2,
                      output_dir=str(tmp_path / "ev")).to_preset(tmp_path / "eval.yaml")  # fmt: skip
    args = _parse(["eval", "--config", str(preset), "--label", "from a preset"])
    assert args.func(args) == 0
    assert "| mmlu/acc |" in capsys.readouterr().out
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    expected = EvalArgs.from_preset(preset)
    assert results["label"] == "from a preset"
    assert results["config"] == {**dataclasses.asdict(expected), "label": "from a preset"}
