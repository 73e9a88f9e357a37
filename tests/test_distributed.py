"""FSDP2 and DeepSpeed ZeRO-2/3 under ``accelerate launch`` (2 CPU processes) against one process.

Each sharded run uses per-device batch 2 x 2 processes; its reference is one process with batch 4, the
same seed and the same sampler order (accelerate's seedable sampler hands consecutive batches of one
permutation to the ranks), and no dropout anywhere, so the two must train the same adapter. The saved
adapter must hold whole MELoRA factors -- A (n, r, k), B (n, o, r) -- not one rank's (flattened, padded)
piece. tests/cpu_sharding.py explains what it takes to run accelerate's FSDP and DeepSpeed on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from melora.cli import main as cli_main
from tests.test_instruct_data import build_tiny_tokenizer
from tests.test_instruct_runner import RECORDS
from tests.tiny_models import tiny_llama, write_tiny_glue

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
ADAPTER = "adapter_model.safetensors"
FP32_ATOL = 1e-5  # measured: 1.8e-7 (GLUE, FSDP2), 1.2e-7 (instruct, FSDP2), 3.3e-7 (GLUE, ZeRO-3)
# bf16 compute, fp32 adapter, Adam at lr 1e-2 for 3 steps: native bf16 dot products (AVX512-BF16) round
# differently for batch 2 x 2 processes than for 4 in one, and Adam's first steps move an element whose
# gradient is near zero by up to lr whatever its size. So every element must agree within one step (lr)
# and each tensor within 2% in norm; measured on an AVX512-BF16 CPU: max 6.4e-3 (v_proj A), norm 1.1%;
# 2.0e-4 on an AVX2 one. Unsynced gradients or misassembled shards are tens of percent off. The fp32
# tests above hold gradient scaling to 1e-5.
BF16_ATOL, BF16_RELATIVE = 1e-2, 0.02


def launch(config: str, argv: list[str], port: int, layer: str | None = None) -> str:
    """``accelerate launch --config_file tests/configs/<config> -m tests.cpu_sharding <argv>``; its stdout."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "DS_ACCELERATOR": "cpu",
    }
    wrap = ["--fsdp_transformer_layer_cls_to_wrap", layer] if layer else []
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(CONFIGS / config), "--main_process_port", str(port), *wrap, "-m", "tests.cpu_sharding", *argv]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def assert_same_adapter(
    sharded: Path, single: Path, atol: float, relative: float | None = None
) -> dict[str, torch.Tensor]:
    """Every factor within ``atol`` of one process's and, if given, within ``relative`` of its norm."""
    ours, reference = load_file(sharded / ADAPTER), load_file(single / ADAPTER)
    assert ours.keys() == reference.keys()
    for key in reference:
        assert ours[key].shape == reference[key].shape, key
        assert ours[key].dtype == torch.float32, key
        gap = (ours[key] - reference[key]).abs().max().item()
        torch.testing.assert_close(
            ours[key], reference[key], rtol=0, atol=atol, msg=f"{key}: max |diff| {gap:.3g}"
        )
        if relative is not None:
            off = ((ours[key] - reference[key]).norm() / reference[key].norm()).item()
            assert off <= relative, f"{key}: |diff| / |reference| = {off:.3g} > {relative}"
    assert any(v.abs().max() > 0 for k, v in reference.items() if "melora_B" in k), "B never left zero"
    return ours


# ---------------------------------------------------------------- GLUE (tiny BERT, RTE layout)


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    """The tiny GLUE task, its flags, and the one-process run (batch 4) every sharded run must equal."""
    tiny = write_tiny_glue(tmp_path_factory.mktemp("glue"), dropout=0.0)
    flags = ["glue", "--task", "rte", "--model", tiny["model"], "--data-dir", tiny["data_dir"], "--epochs", "2",
             "--max-length", "32", "--lr", "5e-3", "--dropout", "0", "--save-strategy", "no",
             "--no-group-by-length", "--no-progress"]  # fmt: skip
    single = tmp_path_factory.mktemp("glue-single")
    assert cli_main([*flags, "--batch-size", "4", "--output-dir", str(single)]) == 0
    return {**tiny, "flags": flags, "single": single / "adapter"}


def test_glue_fsdp2_saves_whole_factors_equal_to_one_process(glue, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "fsdp2"
    stdout = launch(
        "fsdp2_cpu_2proc.yaml",
        [*glue["flags"], "--batch-size", "2", "--output-dir", str(out)],
        29561,
        "BertLayer",
    )
    ranks = sorted(line for line in stdout.splitlines() if line.startswith("[rank "))
    assert len(ranks) == 2 and ranks[0][10:] == ranks[1][10:], "ranks disagree on metrics or weights"
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs"][-1]["step"] == 24  # 48 examples / (2 x 2) x 2
    saved = assert_same_adapter(out / "adapter", glue["single"], FP32_ATOL)
    query = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert saved[f"{query}.melora_A"].shape == (8, 1, 8)  # (n, r, k): n=8, r=1, k=64/8
    assert saved[f"{query}.melora_B"].shape == (8, 8, 1)  # (n, o, r)
    base = AutoModelForSequenceClassification.from_pretrained(glue["model"])
    loaded = PeftModel.from_pretrained(base, out / "adapter")  # one process, no sharding
    layer = loaded.base_model.model.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(layer.melora_A["default"].detach(), saved[f"{query}.melora_A"])


@pytest.mark.parametrize(
    ("config", "port"),
    [("deepspeed_zero2_cpu_2proc.yaml", 29562), ("deepspeed_zero3_cpu_2proc.yaml", 29563)],
    ids=["zero2", "zero3"],
)
def test_glue_deepspeed_equals_one_process(glue, tmp_path, config, port):
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed")
    out = tmp_path / "ds"
    launch(config, [*glue["flags"], "--batch-size", "2", "--output-dir", str(out)], port)
    saved = assert_same_adapter(out / "adapter", glue["single"], FP32_ATOL)
    assert saved["base_model.model.bert.encoder.layer.1.attention.self.value.melora_A"].shape == (8, 1, 8)


# ---------------------------------------------------------------- instruct (tiny Llama, GQA)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """A tiny Llama, Alpaca records, the flags, and one-process runs (batch 4) in fp32 and bf16.

    ``v_proj`` gets n=1: its A (1, 1, 64) and B (1, 32, 1) cannot split evenly over 2 ranks (FSDP2 pads).
    """
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("llama")
    tiny_llama(tokenizer, max_position_embeddings=512).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    data.write_text(json.dumps(RECORDS * 2))
    flags = ["instruct", "--data", str(data), "--model", str(model_dir), "--val-size", "4", "--max-steps", "3",
             "--lr", "1e-2", "--dropout", "0", "--n-pattern", '{"v_proj": 1}', "--no-progress"]  # fmt: skip
    runs = {"flags": flags, "model": str(model_dir)}
    for precision, extra in (("fp32", ["--no-eval-base"]), ("bf16", ["--bf16"])):
        single = tmp_path_factory.mktemp(f"instruct-single-{precision}")
        assert cli_main([*flags, *extra, "--batch-size", "4", "--output-dir", str(single)]) == 0
        runs[precision] = single
    return runs


def test_instruct_fsdp2_resumes_from_sharded_checkpoint_equal_to_one_process(instruct, tmp_path):
    """Stop after 2 of 3 steps (each rank writes its shards), resume on 2 ranks: the one-process adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from melora.export import export_lora

    out = tmp_path / "fsdp2"
    argv = [*instruct["flags"], "--no-eval-base", "--batch-size", "2", "--output-dir", str(out)]
    launch("fsdp2_cpu_2proc.yaml", [*argv, "--stop-after-steps", "2"], 29564, "LlamaDecoderLayer")
    checkpoint = out / "checkpoints" / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and not (checkpoint / ADAPTER).exists()
    launch("fsdp2_cpu_2proc.yaml", [*argv, "--resume"], 29565, "LlamaDecoderLayer")
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from"].endswith("checkpoint-2") and results["global_steps"] == 3
    saved = assert_same_adapter(out / "adapter", instruct["fp32"] / "adapter", FP32_ATOL)
    v_proj = "base_model.model.model.layers.0.self_attn.v_proj"
    assert saved[f"{v_proj}.melora_A"].shape == (1, 1, 64) and saved[f"{v_proj}.melora_B"].shape == (1, 32, 1)
    assert saved["base_model.model.model.layers.1.self_attn.q_proj.melora_A"].shape == (8, 1, 8)

    # the sharded run's adapter in one process: MELoRA forward == exported LoRA == merged weights
    inputs = {"input_ids": torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))}
    melora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(instruct["model"]), out / "adapter"
    )
    with torch.no_grad():
        expected = melora(**inputs).logits
        base = melora.get_base_model()
        with melora.disable_adapter():
            assert (melora(**inputs).logits - expected).abs().max() > 1e-4, "the adapter changes nothing"
    export_lora(out / "adapter", tmp_path / "lora")
    lora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(instruct["model"]), tmp_path / "lora"
    )
    merged = melora.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(lora(**inputs).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)
    assert merged is base


def test_instruct_fsdp2_bf16_base_fp32_adapter_equals_one_process(instruct, tmp_path):
    out = tmp_path / "bf16"
    launch(
        "fsdp2_cpu_2proc.yaml",
        [*instruct["flags"], "--bf16", "--batch-size", "2", "--output-dir", str(out)],
        29566,
        "LlamaDecoderLayer",
    )
    assert_same_adapter(out / "adapter", instruct["bf16"] / "adapter", BF16_ATOL, BF16_RELATIVE)  # fp32
    ours = json.loads((out / "results.json").read_text())
    reference = json.loads((instruct["bf16"] / "results.json").read_text())
    assert ours["config"]["bf16"] is True
    # FSDP2 cannot evaluate before training: the base loss is measured after it, with the adapter off
    assert ours["heldout_loss_base"] == pytest.approx(reference["heldout_loss_base"], abs=0.05)
    assert ours["summary"]["instruct/heldout_loss"] == pytest.approx(
        reference["summary"]["instruct/heldout_loss"], abs=0.02
    )
