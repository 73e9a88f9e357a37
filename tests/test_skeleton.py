"""One run-folder layout and one entry name for every runner (the core's imports: test_core_boundary.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from melora.lab.finetune.training import (
    checkpoint_folders,
    checkpoints_folder,
    run_checkpoint,
    saved_model_folder,
)


def _checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def test_one_run_folder_layout(tmp_path):
    assert checkpoints_folder(tmp_path) == tmp_path / "checkpoints"
    assert (
        saved_model_folder(tmp_path, "melora") == saved_model_folder(tmp_path, "lora") == tmp_path / "adapter"
    )
    assert saved_model_folder(tmp_path, "full") == tmp_path / "model"
    assert checkpoint_folders(tmp_path) == [tmp_path / "checkpoints", tmp_path]


def test_resume_finds_the_new_layout_first_and_still_an_old_glue_run(tmp_path):
    assert run_checkpoint(tmp_path) is None
    old = _checkpoint(tmp_path, 30)  # melora glue wrote checkpoints into the run folder itself before
    assert run_checkpoint(tmp_path) == str(old)
    new = _checkpoint(tmp_path / "checkpoints", 10)
    assert run_checkpoint(tmp_path) == str(new)


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("melora.lab.finetune.glue", "glue"),
        ("melora.lab.finetune.instruct", "instruct"),
        ("melora.export", "export-lora"),
    ],
)
def test_every_command_of_these_modules_enters_through_main(module, command):
    import importlib

    mod = importlib.import_module(module)
    subparsers = argparse.ArgumentParser().add_subparsers()
    mod.add_parser(subparsers)
    func = subparsers.choices[command].get_default("func")
    assert func is mod.main and func.__name__ == "main"


def test_the_final_save_never_asks_the_hub_about_the_bases_vocabulary(tmp_path, monkeypatch):
    """An adapter naming a hub base (the aliases do) made PEFT look the base up on every save: a network call,
    and two warnings when offline. The runners never change the vocabulary, so the save skips that check."""
    import peft.utils.save_and_load as peft_save
    from peft import get_peft_model

    from melora import MELoRAConfig
    from melora.lab.finetune.training import save_final
    from tests.tiny_models import tiny_llama

    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *a, **k: asked.append(a) or None)
    base = tiny_llama()
    base.config._name_or_path = base.name_or_path = "someone/some-model"
    model = get_peft_model(base, MELoRAConfig(r=1, n=4, target_modules=["q_proj"]))
    save_final(model, None, tmp_path / "adapter")
    assert asked == [] and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/some-model"
