"""One run-folder layout and one entry name for every runner; the core imports nothing of the lab."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from melora.finetune.training import (
    checkpoint_folders,
    checkpoints_folder,
    run_checkpoint,
    saved_model_folder,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "melora"
CORE = ["functional.py", "accounting.py", "io.py", "export.py", "errors.py", *sorted(
    str(p.relative_to(SRC)) for p in (SRC / "tuner").glob("*.py")
)]  # fmt: skip
LAB = ("melora.args", "melora.records", "melora.provenance", "melora.finetune", "melora.study", "melora.eval",
       "melora.report", "melora.bench", "melora.data", "melora.cli", "melora.models")  # fmt: skip


def _checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
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
        ("melora.finetune.glue", "glue"),
        ("melora.finetune.instruct", "instruct"),
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


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("relative", CORE)
def test_the_core_never_imports_the_lab(relative):
    lab = sorted(m for m in _imported_modules(SRC / relative) if m.startswith(LAB))
    assert not lab, f"src/melora/{relative} imports the lab: {lab}"


def test_importing_the_core_loads_no_lab_module():
    code = (
        "import sys, melora.tuner, melora.export, melora.functional, melora.accounting, melora.io\n"
        f"print(sorted(m for m in sys.modules if m.startswith({LAB!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
