"""The melora command: help without PyTorch, one-line user errors with exit 2, --debug tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from melora.cli import SUBCOMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def run(*code_or_args: str, module: bool = False) -> subprocess.CompletedProcess:
    argv = [sys.executable, *(("-m", "melora.cli") if module else ("-c",)), *code_or_args]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_without_importing_torch():
    code = "import sys; from melora.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'peft' in sys.modules)"
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"
    for name in SUBCOMMANDS:
        assert name in done.stdout


def test_import_melora_registers_when_peft_loads():
    code = (
        "import sys, melora\nassert 'peft' not in sys.modules\n"
        "from peft import mapping\nprint('MELORA' in mapping.PEFT_TYPE_TO_CONFIG_MAPPING)"
    )
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_every_subcommand_parser_builds_and_shows_defaults():
    parser = build_parser()
    glue = parser._subparsers._group_actions[0].choices["glue"].format_help()
    assert "--max-length" in glue and "(default: 128)" in glue and "--lr" in glue
    instruct = parser._subparsers._group_actions[0].choices["instruct"].format_help()
    for flag in ("--max-length", "--max-train-samples", "--warmup-ratio", "--output-dir", "--n"):
        assert flag in glue and flag in instruct  # one vocabulary, generated from the same fields


def test_user_error_is_one_line_and_exit_2(capsys):
    assert main(["glue", "--task", "rte", "--output-dir", "x", "--dropout", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("melora glue: error: Invalid adapter options: dropout=1.5")
    assert "--debug" in err[1] and len(err) == 2


def test_missing_study_file_is_a_user_error(capsys, tmp_path):
    assert main(["study", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="dropout=1.5"):
        main(["--debug", "glue", "--task", "rte", "--output-dir", "x", "--dropout", "1.5"])


def test_a_bare_key_error_from_a_library_is_named_as_one(capsys, monkeypatch):
    import melora.study.command as study_command

    def lookup(args):
        raise KeyError("MELORA")  # what a mapping lookup inside PEFT raises

    monkeypatch.setattr(study_command, "main", lookup)
    assert main(["study", "x.yaml"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("melora study: error: KeyError 'MELORA' (an unknown name inside a library")


def test_a_launched_run_destroys_its_process_group_after_success_only(monkeypatch, tmp_path):
    """gloo groups left to the interpreter's exit can abort a rank; after an error they must stay."""
    import torch.distributed as dist

    import melora.study.command as study_command

    def opens_a_group(fails: bool):
        def command(args):
            store = dist.FileStore(str(tmp_path / f"store-{fails}"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
            if fails:
                raise ValueError("bad flag")
            return 0

        return command

    monkeypatch.setattr(study_command, "main", opens_a_group(fails=False))
    assert main(["study", "x.yaml"]) == 0
    assert not dist.is_initialized()
    monkeypatch.setattr(study_command, "main", opens_a_group(fails=True))
    assert main(["study", "x.yaml"]) == 2
    assert dist.is_initialized()  # another rank may still be in a collective: no destroy
    dist.destroy_process_group()
