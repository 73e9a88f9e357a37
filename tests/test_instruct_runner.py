"""``melora instruct``: options, presets, a tiny end-to-end run, and one real SmolLM2 run (slow)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from melora.cli import main as cli_main
from melora.lab.args import UserError, load_preset
from melora.lab.finetune.instruct import InstructRun, add_parser
from tests.test_instruct_data import build_tiny_tokenizer
from tests.tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
RECORDS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "Eat well, sleep, exercise.",
    },
    {"instruction": "Summarise the text.", "input": "Cats sleep a lot.", "output": "Cats nap."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
] * 3


def parse(argv: list[str]) -> argparse.Namespace:
    subparsers = argparse.ArgumentParser().add_subparsers(dest="command")
    add_parser(subparsers)
    return subparsers.choices["instruct"].parse_args(argv)


def options_from_args(args: argparse.Namespace) -> InstructRun:
    return InstructRun.from_options(vars(args), load_preset(args.config), args.config)


def main(argv: list[str]) -> int:
    return cli_main(["instruct", *argv])


def authors_preset() -> InstructRun:
    preset = REPO / "configs" / "instruct" / "alpaca_llama2_7b.yaml"
    return options_from_args(parse(["--config", str(preset), "--data", "d", "--output-dir", "o"]))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, GQA: v_proj 64 -> 32) with a 300-token BPE tokenizer, saved to disk."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer, max_position_embeddings=512).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_options_collect_every_problem():
    with pytest.raises(UserError, match=r"data is required: pass --data"):
        InstructRun.from_options({"output_dir": "out"})
    with pytest.raises(UserError, match=r"method='dora': choose one of melora, lora, full"):
        InstructRun.from_options({"data": ["d"], "output_dir": "out", "method": "dora"})
    with pytest.raises(UserError, match=r"lr=0: expected a finite number > 0"):
        InstructRun.from_options({"data": ["d"], "output_dir": "out", "lr": 0})


def test_unknown_yaml_key_is_an_error(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("learning-rate: 0.1\n")
    args = parse(["--config", str(preset), "--data", "x.json", "--output-dir", str(tmp_path)])
    with pytest.raises(UserError, match=r"p.yaml: unknown key 'learning_rate'"):
        options_from_args(args)


@pytest.mark.parametrize(
    "preset", sorted((REPO / "configs" / "instruct").glob("*.yaml")), ids=lambda p: p.stem
)
def test_presets_resolve_and_flags_override(preset):
    args = parse(["--config", str(preset), "--data", "d", "--output-dir", "o", "--lr", "0.01", "--no-bf16"])
    run = options_from_args(args)
    assert run.train.lr == 0.01 and run.instruct.bf16 is False
    assert run.adapter.target_modules == ["q_proj", "v_proj"]
    assert (run.adapter.alpha, run.adapter.dropout, run.instruct.max_length) == (16, 0.05, 256)


def test_authors_preset_matches_the_paper_recipe():
    run = authors_preset()
    assert (run.train.lr, run.train.epochs, run.train.warmup_steps, run.instruct.train_on_inputs) == (
        3e-4,
        3,
        100,
        True,
    )
    assert run.train.effective_batch_size * 8 == 128  # 8 GPUs
    assert (run.adapter.method, run.adapter.r, run.adapter.n) == ("melora", 1, 8)


@pytest.mark.parametrize(
    ("flags", "label", "rank"),
    [
        (["--method", "melora", "--r", "1", "--n", "8"], "melora r=1 n=8", 8),
        (["--method", "lora", "--r", "4", "--gradient-checkpointing", "--grad-accum", "2"], "lora r=4", 4),
    ],
)
def test_tiny_end_to_end_run(tmp_path, tiny_model_dir, alpaca_file, flags, label, rank):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "run"
    argv = ["--data", str(alpaca_file), "--model", str(tiny_model_dir), "--output-dir", str(out),
            "--val-size", "4", "--max-train-samples", "8", "--batch-size", "4", "--max-steps", "3",
            "--lr", "1e-2", "--no-progress", "--group-by-length", *flags]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "instruct" and results["label"] == label
    assert results["equivalent_rank"] == rank
    assert 0 < results["trainable_params"] < 20_000
    assert len(results["loss_curve"]) == 3 and results["global_steps"] == 3
    for key in ("instruct/heldout_loss", "instruct/train_loss"):
        assert isinstance(results["summary"][key], float)
    assert isinstance(results["heldout_loss_base"], float)
    assert results["config"]["data"] == [str(alpaca_file)]
    assert results["versions"]["torch"] == torch.__version__
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
    assert reloaded.peft_config["default"].r == (1 if flags[1] == "melora" else 4)
    card = (out / "adapter" / "README.md").read_text()
    assert ("melora export-lora" in card) == (flags[1] == "melora")  # MELoRA's card; LoRA keeps PEFT's
    if flags[1] == "melora":
        assert f"base_model: {json.dumps(str(tiny_model_dir))}" in card  # a local base stays as given
        assert f"| instruct/heldout_loss | {results['summary']['instruct/heldout_loss']:.4f} |" in card


def test_tiny_full_finetune_with_packing_and_chat_template(tmp_path, tiny_model_dir, alpaca_file):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model_dir = tmp_path / "model-with-chat"
    tokenizer.save_pretrained(model_dir)
    for file in tiny_model_dir.iterdir():
        if not (model_dir / file.name).exists():
            (model_dir / file.name).symlink_to(file)
    out = tmp_path / "full"
    main(["--data", str(alpaca_file), "--model", str(model_dir), "--output-dir", str(out), "--method", "full",
          "--template", "chat", "--packing", "--train-on-inputs", "--val-size", "0", "--max-steps", "2",
          "--no-progress"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["equivalent_rank"] is None and results["trainable_params"] > 50_000
    assert results["num_train_sequences"] < results["num_train_examples"]  # packing merged examples
    assert "instruct/heldout_loss" not in results["summary"]
    assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
    assert results["saved_to"] == "model" and results["head_params"] is None


@pytest.mark.slow
def test_smollm2_melora_learns_and_reloads(tmp_path):
    """SmolLM2-135M + MELoRA r=1 n=8 on 16 real Alpaca examples: held-out loss drops, adapter reloads."""
    pytest.importorskip("gguf")
    folder = DATA_DIR / "instruct" / "alpaca"
    if not folder.is_dir():
        pytest.skip(f"real Alpaca data not found at {folder}")
    from peft import PeftModel

    from melora.lab.models import load_causal_lm

    out = tmp_path / "smollm2"
    main(["--data", str(folder / "alpaca_data-00000-03252.json"), "--model", "smollm2", "--output-dir", str(out),
          "--max-train-samples", "16", "--val-size", "8", "--batch-size", "4", "--max-steps", "4", "--lr", "2e-3",
          "--max-length", "128", "--no-progress"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["instruct/heldout_loss"] < results["heldout_loss_base"]
    assert results["equivalent_rank"] == 8
    base, _ = load_causal_lm("smollm2")
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    assert type(reloaded.peft_config["default"]).__name__ == "MELoRAConfig"


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem
)
def test_accelerate_configs_parse_and_match_the_preset(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16" and config.num_processes == 8
    preset = authors_preset()
    if config.deepspeed_config:
        assert config.deepspeed_config["gradient_accumulation_steps"] == preset.train.grad_accum
    assert preset.train.effective_batch_size * config.num_processes == 128


def test_kill_and_resume_gives_the_uninterrupted_adapter(tmp_path, tiny_model_dir, alpaca_file):
    """Stop after 2 of 4 steps (a checkpoint), tear a later checkpoint as a kill would, resume: same weights."""
    from safetensors.torch import load_file

    common = ["--data", str(alpaca_file), "--model", str(tiny_model_dir), "--val-size", "4",
              "--batch-size", "2", "--max-steps", "4", "--lr", "1e-2", "--no-progress", "--no-eval-base"]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "straight")]) == 0
    cut = tmp_path / "cut"
    assert main([*common, "--output-dir", str(cut), "--stop-after-steps", "2"]) == 0
    assert not (cut / "results.json").exists() and (cut / "checkpoints" / "checkpoint-2").is_dir()
    for step, state in ((4, None), (3, "")):  # killed before trainer_state.json, or before its text is in
        torn = cut / "checkpoints" / f"checkpoint-{step}"
        torn.mkdir()
        (torn / "adapter_model.safetensors").write_bytes(b"\0" * 8)
        if state is not None:
            (torn / "trainer_state.json").write_text(state)
    assert main([*common, "--output-dir", str(cut), "--resume"]) == 0
    results = json.loads((cut / "results.json").read_text())
    assert results["resumed_from"].endswith("checkpoint-2")
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in straight.items() if "melora_B" in k)


def test_per_module_patterns_reach_the_adapter_from_the_command_line(tmp_path, tiny_model_dir, alpaca_file):
    out = tmp_path / "run"
    argv = ["--data", str(alpaca_file), "--model", str(tiny_model_dir), "--output-dir", str(out), "--val-size", "2",
            "--max-steps", "1", "--no-progress", "--no-eval-base", "--n", "8", "--n-pattern", '{"v_proj": 2}']  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["n"], config["n_pattern"]) == (8, {"v_proj": 2})
    results = json.loads((out / "results.json").read_text())
    # 2 layers x (q: r (64 + 64) + v: r (64 + 32)) at r=1: the parameter count does not depend on n
    assert results["adapter_params"] == 2 * ((64 + 64) + (64 + 32))
    with pytest.raises(UserError, match="n_pattern applies to MELoRA only"):
        InstructRun.from_options(
            {"data": ["d"], "output_dir": "o", "method": "lora", "n_pattern": {"v_proj": 2}}
        )


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_tiny_quantized_run_trains_the_adapter(tmp_path, tiny_model_dir, alpaca_file, kind):
    """QLoRA-style: the base loaded with bitsandbytes (its CPU backend here), MELoRA trained on it."""
    pytest.importorskip("bitsandbytes", reason="--quantize needs bitsandbytes (pip install 'melora[quant]')")
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "run"
    argv = ["--data", str(alpaca_file), "--model", str(tiny_model_dir), "--output-dir", str(out),
            "--val-size", "4", "--max-train-samples", "8", "--batch-size", "4", "--max-steps", "6",
            "--lr", "2e-2", "--warmup-steps", "0", "--lr-scheduler", "constant", "--no-progress",
            "--quantize", kind, "--method", "melora", "--r", "1", "--n", "8"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["quantize"] == kind
    assert results["quantized_base"] == {f"bnb {kind}": 4}  # q_proj and v_proj of both layers
    assert results["optimizer"] == "adamw_bnb_8bit"  # CPU: bitsandbytes' 8-bit AdamW, no paging
    assert results["summary"]["instruct/heldout_loss"] < results["heldout_loss_base"] - 0.01
    curve = [step["loss"] for step in results["loss_curve"]]
    assert len(curve) == 6 and curve[-1] < curve[0], curve
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")  # the adapter loads on a plain base
    assert reloaded.peft_config["default"].peft_type == "MELORA"
