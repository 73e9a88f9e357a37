"""export_lora refuses corrupt adapters before writing anything, and writes deterministic, umask-following files.

A pristine MELoRA adapter of a tiny MLP (lin0: 32 -> 48, lin1: 48 -> 48, n=4, r=2, head in modules_to_save)
is saved once; each case copies it and breaks one thing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from melora import MELoRAConfig, export_lora, save_adapter
from melora.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.tiny_models import TinyMLP, tiny_llama

A0, B0 = "base_model.model.lin0.melora_A", "base_model.model.lin0.melora_B"
A1, B1 = "base_model.model.lin1.melora_A", "base_model.model.lin1.melora_B"
HEAD = "base_model.model.head.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = MELoRAConfig(
        r=2, n=4, alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["head"], init_weights=False
    )
    folder = tmp_path_factory.mktemp("pristine") / "adapter"
    save_adapter(get_peft_model(TinyMLP(), config), folder)
    return folder


def _config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / ADAPTER_CONFIG).read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del data[key]
            else:
                data[key] = value
        (folder / ADAPTER_CONFIG).write_text(json.dumps(data))  # NaN/Infinity as Python's json writes them

    return edit


def _tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(folder / ADAPTER_WEIGHTS)
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS))

    return edit


def _set(key: str, value: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
    return _tensors(lambda t: t.__setitem__(key, value(t)))


def _drop(key: str):
    return _tensors(lambda t: t.pop(key))


def _file(name: str, change: Callable[[bytes], bytes | None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        content = change((folder / name).read_bytes())
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(content)

    return edit


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


_DELETE = object()
CFG, W = r"adapter_config\.json", r"adapter_model\.safetensors"

# id -> (corruption, regex the error must match); every one is refused, before anything is written.
CORRUPTIONS = {
    # -- the config file
    "missing config": (_file(ADAPTER_CONFIG, lambda b: None), rf"{CFG} does not exist"),
    "config not JSON": (_file(ADAPTER_CONFIG, lambda b: b[:-7]), rf"{CFG} is not valid UTF-8 JSON"),
    "config a list": (
        _file(ADAPTER_CONFIG, lambda b: b"[1, 2]"),
        rf"{CFG} holds a JSON list, not an object of options",
    ),
    "wrong peft_type": (_config(peft_type="LORA"), rf"{CFG} has peft_type 'LORA'; export_lora needs"),
    "no peft_type": (_config(peft_type=_DELETE), rf"{CFG} has peft_type None"),
    "r missing": (_config(r=_DELETE), rf"{CFG} is not a valid MELoRA adapter config .*\n  - r is missing"),
    "r a string": (_config(r="2"), r"r='2': the rank of each mini LoRA must be an integer >= 1"),
    "r 1e9": (_config(r=1e9), r"r=1000000000\.0: the rank of each mini LoRA must be an integer >= 1"),
    "r zero": (_config(r=0), r"r=0: the rank of each mini LoRA must be an integer >= 1"),
    "r a bool": (_config(r=True), r"r=True: the rank of each mini LoRA must be an integer >= 1"),
    "r not the tensors'": (
        _config(r=3),
        rf"(?s){W} .*lin0\.melora_A: shape \(4, 2, 8\), expected \(n, r, d_in/n\) = \(4, 3, k\)",
    ),
    "n a string": (_config(n="4"), r"n='4': the number of mini LoRAs must be an integer >= 1"),
    "n not dividing": (
        _config(n=3),
        r"lin0\.melora_A: shape \(4, 2, 8\), expected \(n, r, d_in/n\) = \(3, 2, k\)",
    ),
    "alpha '8'": (_config(alpha="8"), r"alpha='8': the scaling numerator must be a finite number > 0"),
    "alpha a bool": (_config(alpha=True), r"alpha=True: the scaling numerator must be a finite number > 0"),
    "alpha NaN": (
        _config(alpha=float("nan")),
        r"alpha=nan: the scaling numerator must be a finite number > 0",
    ),
    "alpha inf": (
        _config(alpha=float("inf")),
        r"alpha=inf: the scaling numerator must be a finite number > 0",
    ),
    "alpha null": (_config(alpha=None), r"alpha=None: the scaling numerator must be a finite number > 0"),
    "dropout a string": (_config(dropout="0.1"), r"dropout='0\.1': must lie in \[0, 1\) and be a number"),
    "target_modules an int": (
        _config(target_modules=5),
        r"target_modules=5: must be a list of module names or a regex string",
    ),
    "modules_to_save a string": (
        _config(modules_to_save="head"),
        r"modules_to_save='head': must be a list of module names",
    ),
    "fan_in_fan_out a string": (
        _config(fan_in_fan_out="yes"),
        r"fan_in_fan_out='yes': must be true or false \(a boolean, not str\)",
    ),
    "layers_to_transform strings": (
        _config(layers_to_transform=["0"]),
        r"layers_to_transform=\['0'\]: must be a layer index >= 0",
    ),
    "bad task_type": (
        _config(task_type="TRANSLATE"),
        rf"{CFG} is not a valid MELoRA adapter config .*\n  - Invalid task type: 'TRANSLATE'",
    ),
    "bias all": (
        _config(bias="all"),
        rf"{CFG}: bias='all': a standard LoRA adapter \(and vLLM\) carries no bias",
    ),
    # -- the weights file
    "missing weights": (_file(ADAPTER_WEIGHTS, lambda b: None), rf"{W} does not exist"),
    "truncated weights": (_file(ADAPTER_WEIGHTS, lambda b: b[:-20]), rf"{W} is truncated or corrupted"),
    "garbage weights": (_file(ADAPTER_WEIGHTS, lambda b: b"\x00" * 64), rf"{W} is truncated or corrupted"),
    "melora_A missing (layer dropped)": (
        _drop(A1),
        r"lin1\.melora_B has no .*lin1\.melora_A: the layer's A factor",
    ),
    "melora_B missing": (_drop(B0), r"lin0\.melora_A has no .*lin0\.melora_B: the layer's B factor"),
    "no factors at all": (
        _tensors(lambda t: [t.pop(k) for k in (A0, B0, A1, B1)]),
        rf"(?s){W} cannot be exported .*no MELoRA factors",
    ),
    "A in an n=8 layout, B in n=4": (
        _set(A0, lambda t: t[A0].reshape(8, 1, 8)),
        r"lin0\.melora_A: shape \(8, 1, 8\), expected \(n, r, d_in/n\) = \(4, 2, k\) for n=4, r=2",
    ),
    "B with another r than A": (
        _set(B1, lambda t: torch.randn(4, 12, 3)),
        r"lin1\.melora_B: shape \(4, 12, 3\), expected \(n, d_out/n, r\) = \(4, o, 2\)",
    ),
    "A flattened to 2-D": (
        _set(A1, lambda t: t[A1].reshape(8, 12)),
        r"lin1\.melora_A: shape \(8, 12\), expected",
    ),
    "empty A": (
        _set(A0, lambda t: torch.zeros(4, 2, 0)),
        r"lin0\.melora_A: empty tensor of shape \(4, 2, 0\)",
    ),
    "NaN in A": (_set(A0, lambda t: _with_nan(t[A0])), r"lin0\.melora_A: 1 of 64 values are NaN or infinite"),
    "inf in B": (_set(B1, lambda t: t[B1] / 0), r"lin1\.melora_B: \d+ of 96 values are NaN or infinite"),
    "integer A": (
        _set(A1, lambda t: t[A1].to(torch.int32)),
        r"lin1\.melora_A: dtype torch\.int32, expected a floating",
    ),
    "bool B": (_set(B0, lambda t: t[B0] > 0), r"lin0\.melora_B: dtype torch\.bool, expected a floating"),
    "complex A": (_set(A0, lambda t: t[A0].to(torch.complex64)), r"lin0\.melora_A: dtype torch\.complex64"),
    "base weight carried in (foreign key)": (
        _set("base_model.model.lin0.base_layer.weight", lambda t: torch.randn(48, 32)),
        r"lin0\.base_layer\.weight: not a MELoRA factor .*nor a tensor of modules_to_save \['head'\]",
    ),
    "extra unknown key": (
        _set("base_model.model.lin1.melora_C", lambda t: torch.randn(3)),
        r"lin1\.melora_C: not a MELoRA factor",
    ),
    "adapter name left in the key": (
        _tensors(lambda t: t.__setitem__(A0 + ".default", t.pop(A0))),
        r"lin0\.melora_A\.default: not a MELoRA factor",
    ),
    "NaN in a modules_to_save head": (
        _set(HEAD, lambda t: _with_nan(t[HEAD])),
        r"head\.weight: 1 of 192 values",
    ),
    "integer head": (_set(HEAD, lambda t: t[HEAD].long()), r"head\.weight: dtype torch\.int64"),
}


def test_the_corruption_list_is_long_enough():
    assert len(CORRUPTIONS) >= 40


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_every_corrupt_adapter_is_refused_before_writing(pristine, tmp_path, case):
    corrupt, message = CORRUPTIONS[case]
    folder = tmp_path / "corrupt"
    shutil.copytree(pristine, folder)  # follows the link: a plain folder
    corrupt(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        export_lora(folder, tmp_path / "lora")
    assert str(folder) in str(info.value)  # names the file
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt"
    ]  # nothing written, not even a temp folder


def test_every_problem_is_listed_in_one_error(pristine, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(pristine, folder)
    _drop(A1)(folder)
    _set(A0, lambda t: _with_nan(t[A0]))(folder)
    _set("base_model.model.lin0.base_layer.weight", lambda t: torch.randn(48, 32))(folder)
    with pytest.raises(ValueError, match=r"cannot be exported as a LoRA adapter \(3 problems\)") as info:
        export_lora(folder, tmp_path / "lora")
    assert all(s in str(info.value) for s in ("lin1.melora_B has no", "lin0.melora_A: 1 of 64", "base_layer"))
    _config(r="2", alpha=None)(folder)
    with pytest.raises(ValueError, match=r"not a valid MELoRA adapter config \(2 problems\)"):
        export_lora(folder, tmp_path / "lora")


def test_a_nan_adapter_of_a_live_model_is_refused(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP(), MELoRAConfig(r=1, n=4, target_modules=["lin1"], init_weights=False))
    with torch.no_grad():
        model.base_model.model.lin1.melora_B["default"][0, 0, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"(?s)adapter 'default' of the model cannot be exported .*lin1\.melora_B"
    ):
        export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_valid_variants_still_export(pristine, tmp_path, caplog):
    """fp16 factors, an unknown (newer-PEFT) config field: exported, the field ignored with a warning."""
    folder = tmp_path / "ok"
    shutil.copytree(pristine, folder)
    _tensors(lambda t: t.update({k: v.half() for k, v in t.items()}))(folder)
    _config(some_future_field=1)(folder)
    with caplog.at_level(logging.WARNING, logger="melora.export"):
        export_lora(folder, tmp_path / "lora")
    assert "ignoring unknown fields ['some_future_field']" in caplog.text
    tensors = load_file(tmp_path / "lora" / ADAPTER_WEIGHTS)
    assert tensors["base_model.model.lin0.lora_A.weight"].dtype == torch.float16
    assert tensors["base_model.model.lin0.lora_A.weight"].shape == (8, 32)


def test_exported_target_modules_are_sorted(tmp_path):
    """LoraConfig stores target_modules as a set: without sorting the order follows PYTHONHASHSEED."""
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(tiny_llama(), MELoRAConfig(r=1, n=4, target_modules=names))
    export_lora(model, tmp_path / "lora")
    written = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())["target_modules"]
    assert written == sorted(names)  # 1 chance in 5040 that an unsorted set comes out sorted


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_exported_files_follow_the_umask(pristine, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        export_lora(pristine, tmp_path / "lora")
    finally:
        os.umask(old)
    folder = tmp_path / "lora"
    assert not folder.is_symlink()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        ADAPTER_CONFIG: file_mode,
        ADAPTER_WEIGHTS: file_mode,
    }
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode


def test_trainable_tokens_are_carried_into_the_export(tmp_path):
    """Before, the token deltas were written but the LoRA config lacked trainable_token_indices: dropped."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    config = MELoRAConfig(
        r=1, n=4, target_modules=["q_proj"], init_weights=False, trainable_token_indices=[3, 5]
    )
    model = get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(1.0)
    export_lora(model, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())["trainable_token_indices"] == [3, 5]
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_a_saved_config_is_validated_by_melora_config_itself(pristine, tmp_path):
    """Export has no rules of its own for the fields: the saved config's problems are MELoRAConfig's sentences."""
    from melora.errors import ConfigError

    folder = tmp_path / "corrupt"
    shutil.copytree(pristine, folder)
    fields = {"r": 0, "layers_pattern": "layers", "layers_to_transform": None, "init_weights": "false"}
    _config(**fields)(folder)
    with pytest.raises(ConfigError) as direct:
        MELoRAConfig(n=4, alpha=8, **fields)
    with pytest.raises(ValueError, match=r"not a valid MELoRA adapter config \(3 problems\)") as info:
        export_lora(folder, tmp_path / "lora")
    for problem in direct.value.problems:
        assert "\n  - " + problem in str(info.value)
    assert not (tmp_path / "lora").exists()


def test_a_config_with_layer_zero_and_a_layers_pattern_exports(tmp_path):
    model = get_peft_model(
        tiny_llama(),
        MELoRAConfig(r=1, n=4, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    )
    out = export_lora(model, tmp_path / "lora")
    exported = json.loads((out / ADAPTER_CONFIG).read_text())
    assert exported["layers_to_transform"] == 0 and exported["layers_pattern"] == "layers"


def test_export_lora_command_names_a_full_fine_tunes_run_folder(tmp_path, capsys):
    from melora.cli import main

    (tmp_path / "run" / "model").mkdir(parents=True)
    assert main(["export-lora", str(tmp_path / "run"), str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err
    assert "is the run folder of a full fine-tune: its model/ holds a whole model, not an adapter" in err
    assert not (tmp_path / "lora").exists()
