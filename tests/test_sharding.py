"""melora.lab.finetune.sharding and the distributed configs, without launching processes (the runs: test_distributed)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from melora.lab.args import UserError
from melora.lab.finetune.sharding import check_sharding_active, full_tensor, requested_sharding
from melora.lab.finetune.training import last_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]


def trainer(fsdp: bool = False, deepspeed: bool = False) -> SimpleNamespace:
    return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed)


@pytest.mark.parametrize(
    ("variable", "name"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_a_sharding_config_that_would_run_as_ddp_is_an_error(monkeypatch, variable, name):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_sharding_active(trainer())  # nothing requested: plain runs and DDP pass
    monkeypatch.setenv(variable, "true")
    assert requested_sharding() == name
    with pytest.raises(
        UserError, match=rf"given a {name} config, but this process has no GPU.*docs/distributed.md"
    ):
        check_sharding_active(trainer())
    check_sharding_active(trainer(fsdp=name == "FSDP", deepspeed=name == "DeepSpeed"))


def test_full_tensor_leaves_plain_tensors_alone():
    weight = torch.randn(8, 1, 8)
    assert full_tensor(weight) is weight


def test_a_checkpoint_of_fsdp_shards_counts_as_complete(tmp_path):
    shards = tmp_path / "checkpoint-4" / "pytorch_model_fsdp_0"
    shards.mkdir(parents=True)
    assert last_complete_checkpoint(tmp_path) is None  # no trainer_state.json yet: cut short
    state = shards.parent / "trainer_state.json"
    for torn in ("", '{"best_metric": null, "global_step": 4, "log_hist', "{}"):  # created, not (all) written
        state.write_text(torn)
        assert last_complete_checkpoint(tmp_path) is None, torn
    state.write_text(json.dumps({"best_metric": None, "global_step": 4, "log_history": []}))
    assert last_complete_checkpoint(tmp_path) == str(shards.parent)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("tests/configs/fsdp2_cpu_2proc.yaml", "FSDP"),
        ("tests/configs/deepspeed_zero2_cpu_2proc.yaml", "DEEPSPEED"),
        ("tests/configs/deepspeed_zero3_cpu_2proc.yaml", "DEEPSPEED"),
        ("configs/accelerate/fsdp_llama2_7b.yaml", "FSDP"),
        ("configs/accelerate/deepspeed_zero3_llama2_7b.yaml", "DEEPSPEED"),
    ],
)
def test_distributed_configs_parse_with_accelerate(path, kind):
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / path))
    assert config.distributed_type == kind and config.use_cpu is False
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    elif "deepspeed_config_file" in config.deepspeed_config:
        settings = json.loads((REPO / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert settings["zero_optimization"]["stage"] == 3
        assert (
            settings["zero_optimization"]["stage3_param_persistence_threshold"] == 0
        )  # shard even tiny tensors
    else:
        assert config.deepspeed_config["zero_stage"] in (2, 3)
