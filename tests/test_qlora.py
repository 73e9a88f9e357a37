"""The QLoRA recipe of ``melora instruct --quantize``: its config, optimizer, and errors before any loading."""

from __future__ import annotations

import sys

import pytest
import torch

from melora.cli import main as cli_main
from melora.lab.args import UserError
from melora.lab.finetune.instruct import InstructRun
from melora.lab.finetune.qlora import bnb_config, check_bitsandbytes, optimizer_name


def test_4bit_is_qloras_recipe():
    pytest.importorskip("bitsandbytes", reason="BitsAndBytesConfig validates against bitsandbytes")
    config = bnb_config("4bit")
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("8bit").load_in_8bit


def test_optimizer_is_paged_on_gpu_and_8bit_on_cpu():
    assert optimizer_name("cuda:0") == "paged_adamw_8bit"
    assert optimizer_name("cpu") == "adamw_bnb_8bit"


def test_missing_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(UserError, match=r"--quantize 4bit needs bitsandbytes.*pip install 'melora\[quant\]'"):
        check_bitsandbytes("4bit", "cpu")


def test_backend_that_cannot_quantize_is_a_user_error(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes", reason="the probe goes through bitsandbytes' Params4bit")

    def fail(self, *args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.nn.Params4bit, "to", fail)
    with pytest.raises(
        UserError,
        match=r"--quantize 4bit: bitsandbytes .* cannot quantize on cpu \(RuntimeError: no kernel for this "
        r"device\)\. Install a bitsandbytes with a backend",
    ):
        check_bitsandbytes("4bit", "cpu")


def test_bitsandbytes_cpu_backend_passes_the_probe():
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'melora[quant]')")
    for kind in ("4bit", "8bit"):
        check_bitsandbytes(kind, "cpu")


def test_quantize_options_are_checked():
    with pytest.raises(UserError, match=r"--quantize 4bit trains adapters on frozen quantized weights"):
        InstructRun.from_options({"data": ["d"], "output_dir": "o", "method": "full", "quantize": "4bit"})
    with pytest.raises(UserError, match=r"quantize='3bit': choose one of 4bit, 8bit"):
        InstructRun.from_options({"data": ["d"], "output_dir": "o", "quantize": "3bit"})
    run = InstructRun.from_options({"data": ["d"], "output_dir": "o", "quantize": "8bit"})
    assert run.instruct.quantize == "8bit" and run.to_dict()["quantize"] == "8bit"


def test_cli_reports_a_missing_bitsandbytes_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."}]')
    argv = ["instruct", "--data", str(data), "--output-dir", str(tmp_path / "o"), "--quantize", "4bit",
            "--val-size", "0", "--model", str(tmp_path / "never-loaded")]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (
        "melora instruct: error: --quantize 4bit needs bitsandbytes, which is not installed: "
        "pip install 'melora[quant]'."
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="paged 8-bit AdamW and the CUDA 4-bit kernels need a GPU; none here"
)
def test_qlora_on_gpu_uses_paged_adamw(tmp_path):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'melora[quant]')")
    import json

    from tests.test_instruct_data import build_tiny_tokenizer
    from tests.tiny_models import tiny_llama

    tokenizer = build_tiny_tokenizer()
    tiny_llama(tokenizer, max_position_embeddings=512).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": "1 2 3"} for i in range(12)])
    )
    argv = ["instruct", "--data", str(data), "--model", str(tmp_path / "model"), "--output-dir",
            str(tmp_path / "o"), "--val-size", "4", "--max-steps", "4", "--batch-size", "4", "--lr", "2e-2",
            "--quantize", "4bit", "--bf16", "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["optimizer"] == "paged_adamw_8bit"
    assert results["quantized_base"] == {"bnb 4bit": 4}
    assert results["summary"]["instruct/heldout_loss"] < results["heldout_loss_base"]


@pytest.mark.parametrize("doc", ["README.md", "docs/quantization.md", "docs/results_instruct.md"])
def test_documented_one_gpu_llama2_command_resolves(doc):
    """The LLaMA-2-7B one-GPU QLoRA command in the docs: the authors' preset, 4-bit, effective batch 128."""
    import shlex
    from pathlib import Path

    from tests.test_instruct_runner import REPO, options_from_args, parse

    text = (REPO / doc).read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if "--quantize 4bit" in line and "alpaca_llama2_7b" in line]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[:2] == ["melora", "instruct"]
    argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]  # paths relative to the repo
    run = options_from_args(parse(argv[2:]))
    assert Path(run.instruct.model).name == "Llama-2-7b-hf"
    assert run.instruct.quantize == "4bit" and run.instruct.bf16 and run.instruct.gradient_checkpointing
    assert run.train.batch_size * run.train.grad_accum == 128
