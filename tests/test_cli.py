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
    import melora.lab.study.command as study_command

    def lookup(args):
        raise KeyError("MELORA")  # what a mapping lookup inside PEFT raises

    monkeypatch.setattr(study_command, "main", lookup)
    assert main(["study", "x.yaml"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("melora study: error: KeyError 'MELORA' (an unknown name inside a library")


def test_a_launched_run_destroys_its_process_group_after_success_only(monkeypatch, tmp_path):
    """gloo groups left to the interpreter's exit can abort a rank; after an error they must stay."""
    import torch.distributed as dist

    import melora.lab.study.command as study_command

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


# --- output paths that cannot be written, Ctrl-C: one line, through real processes ------------------------


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory):
    from tests.tiny_models import write_tiny_glue

    return write_tiny_glue(tmp_path_factory.mktemp("tiny-glue"))


def glue_argv(tiny: dict, output_dir: Path, *extra: str) -> list[str]:
    return ["glue", "--task", "rte", "--model", tiny["model"], "--data-dir", tiny["data_dir"],
            "--output-dir", str(output_dir), "--batch-size", "8", "--max-length", "32", "--no-progress",
            "--save-strategy", "no", *extra]  # fmt: skip


def last_lines(stderr: str, count: int = 2) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-count:]


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_output_dir_that_is_or_lies_under_a_file_fails_before_training(tiny_glue, tmp_path, where):
    existing = tmp_path / "notes.txt"
    existing.write_text("the user's file")
    output = existing if where == "a file" else existing / "run"
    done = run(*glue_argv(tiny_glue, output, "--epochs", "50"), module=True)
    assert done.returncode == 2, done.stderr[-3000:]
    error, hint = last_lines(done.stderr)
    problem = (
        "is an existing file, not a folder" if where == "a file" else f"{existing} is a file, not a folder"
    )
    assert error.startswith(f"melora glue: error: output folder {output} ") and problem in error
    assert error.endswith("pass --output-dir a folder you can write to (a new path or an existing folder).")
    assert hint == "(rerun with --debug for the traceback)"
    assert existing.read_text() == "the user's file"
    assert "'loss'" not in done.stdout  # refused before the first training step


def test_instruct_output_dir_under_a_file_fails_before_loading_anything(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("x")
    done = run("instruct", "--data", str(tmp_path / "none.json"), "--model", str(tmp_path / "no-model"),
               "--output-dir", str(existing / "run"), module=True)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    error, _ = last_lines(done.stderr)
    assert error == (
        f"melora instruct: error: output folder {existing / 'run'} cannot be created: {existing} is a file, not a "
        "folder; pass --output-dir a folder you can write to (a new path or an existing folder)."
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_fails_before_training(tiny_glue, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        done = run(*glue_argv(tiny_glue, locked / "run", "--epochs", "50"), module=True)
    finally:
        locked.chmod(0o700)
    assert done.returncode == 2, done.stderr[-3000:]
    error, _ = last_lines(done.stderr)
    assert error.startswith(
        f"melora glue: error: output folder {locked / 'run'} is not writable: Permission denied"
    )


def test_a_library_path_error_is_one_line_naming_the_path(tmp_path):
    """`melora report --output FOLDER`: the IsADirectoryError of the write, named by its path (was a traceback)."""
    results = REPO / "results" / "glue" / "cola" / "lora-r8" / "lr0.0045" / "seed0" / "results.json"
    if not results.is_file():
        pytest.skip("no results.json in results/")
    done = run("report", str(results), "--output", str(tmp_path), module=True)
    assert done.returncode == 2
    assert last_lines(done.stderr) == [
        f"melora report: error: {tmp_path}: is a folder where a file was expected; give a file path (Is a directory).",
        "(rerun with --debug for the traceback)",
    ]


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (PermissionError(13, "Permission denied", "out/table.md"),
         "out/table.md: permission denied; choose a path you can read and write, or change its permissions "
         "(Permission denied)."),
        (FileExistsError(17, "File exists", "out"), "out: already exists (as a file or folder in the way)"),
        (NotADirectoryError(20, "Not a directory", "notes.txt/out"), "notes.txt/out: a part of this path is a file"),
        (IsADirectoryError(21, "Is a directory", ".tmp123", None, "out"), "out: is a folder where a file was expected"),
    ],
)  # fmt: skip
def test_path_errors_are_user_errors_naming_the_path(capsys, monkeypatch, error, line):
    import melora.lab.study.command as study_command

    def fails(args):
        raise error

    monkeypatch.setattr(study_command, "main", fails)
    assert main(["study", "x.yaml"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("melora study: error: " + line) and len(err) == 2


def _start_and_interrupt(argv: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run ``melora ARGV``, send SIGINT once training has logged a loss, return (exit status, stderr)."""
    import signal
    import time

    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**ENV, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        # A command started in the background of a non-interactive shell (as CI may run this suite) inherits
        # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: give the child what a
        # terminal gives it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "melora.cli", *argv],
            env=env,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 240
            while "'loss'" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert proc.poll() is None, err.read_text()[-3000:]
            assert "'loss'" in out.read_text(), "training did not start in time"
            proc.send_signal(signal.SIGINT)
            status = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return status, err.read_text()


def test_ctrl_c_during_training_is_one_line_and_exit_130_and_debug_keeps_the_traceback(tiny_glue, tmp_path):
    status, stderr = _start_and_interrupt(
        glue_argv(tiny_glue, tmp_path / "run", "--epochs", "10000"), tmp_path
    )
    assert status == 130, stderr[-3000:]
    assert last_lines(stderr, 1) == ["melora glue: interrupted"]
    assert "KeyboardInterrupt" not in stderr
    argv = ["--debug", *glue_argv(tiny_glue, tmp_path / "debug", "--epochs", "10000")]
    status, stderr = _start_and_interrupt(argv, tmp_path)
    assert status != 0 and "Traceback" in stderr and "KeyboardInterrupt" in stderr


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "melora.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == f"melora {version('melora')}"


def test_an_ordinary_command_prints_no_quantization_backend_warnings():
    """torchao / bitsandbytes warn at import about kernels this machine lacks; `--debug` still shows them."""
    done = subprocess.run(
        [sys.executable, "-m", "melora.cli", "export-lora", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


def test_a_lab_command_without_its_extra_says_which_extra_to_install():
    script = (
        "import sys\nsys.modules['datasets'] = None\n"  # as if not installed
        "from melora.cli import main\nsys.exit(main(['glue', '--task', 'stsb']))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "melora glue: needs the lab extra (missing module 'datasets'): pip install 'melora[lab]'"
    ]
