"""The ``melora`` command: parses arguments, then calls the runner of the chosen subcommand.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers the
subparser and sets ``func`` (called with the parsed namespace). Only the chosen subcommand's module
is imported, so ``melora --help`` does not load PyTorch.

User errors (a bad flag value, a missing file, n not dividing a layer, an output path that is a file or
not writable) print one line and exit 2; Ctrl-C prints ``melora CMD: interrupted`` and exits 130.
``--debug`` (or ``MELORA_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help); the module is imported only when the subcommand runs.
SUBCOMMANDS = {
    "glue": ("melora.lab.finetune.glue", "fine-tune an encoder on a GLUE task (MELoRA / LoRA / full)"),
    "instruct": ("melora.lab.finetune.instruct", "instruction-tune a causal LM on Alpaca/Dolly-format data"),
    "eval": ("melora.lab.eval.runner", "MMLU, BBH, HumanEval, DROP for a base model, adapter or run folder"),
    "study": (
        "melora.lab.study.command",
        "plan, run (resumably) and report a study file: tasks x methods x lr x seeds",
    ),
    "report": ("melora.lab.report", "aggregate results.json files into tables and plots"),
    "bench": ("melora.lab.bench.runner", "speed / memory / parameter benchmarks"),
    "export-lora": ("melora.export", "convert a MELoRA adapter into a standard LoRA adapter"),
    "analyze": (
        "melora.lab.analyze_command",
        "singular values, effective rank, block diversity of MELoRA / LoRA adapters",
    ),
}
# Errors that are the user's to fix: one line, exit status 2. The OSErrors are about a path the user gave (a
# missing input, an output path that is a file, a folder without write permission); other OSErrors (a full
# disk, an I/O error) keep their traceback.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, *PATH_ERRORS, KeyError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

# what a path error means for the path, and what to do about it
_PATH_FIXES = {
    FileNotFoundError: "no such file or folder; check the path",
    NotADirectoryError: "a part of this path is a file, not a folder; choose another path",
    IsADirectoryError: "is a folder where a file was expected; give a file path",
    FileExistsError: "already exists (as a file or folder in the way); choose another path or move it away",
    PermissionError: "permission denied; choose a path you can read and write, or change its permissions",
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melora",
        description="MELoRA (Mini-Ensemble Low-Rank Adapters) for PEFT: fine-tune, evaluate, study, export.",
        epilog="commands:\n"
        + "\n".join(f"  {name:12s} {text}" for name, (_, text) in SUBCOMMANDS.items())
        + "\n\n`melora COMMAND --help` lists a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (and quantization back-ends' warnings)"
    )
    parser.add_argument("--version", action="version", version=f"melora {version()}")
    return parser


def version() -> str:
    """The installed distribution's version (package metadata), without importing the package."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("melora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


# Extras, by the top-level modules they provide: a command whose import misses one says what to install.
EXTRAS = {
    "lab": (
        "accelerate",
        "datasets",
        "sklearn",
        "scipy",
        "matplotlib",
        "rich",
        "tqdm",
        "yaml",
        "gguf",
        "sentencepiece",
        "google",
    ),
    "quant": ("bitsandbytes", "torchao", "hqq"),
}
# Loggers of optional back-ends that peft / transformers import when installed; at import they warn about
# kernels this machine lacks (CUDA-only libraries, a missing triton), which concerns no ordinary command.
QUIET_LOGGERS = ("torchao", "bitsandbytes", "kernels", "torch.utils._pytree")


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The extra that provides the module ``err`` misses, or None when it is none of ours."""
    top = (err.name or "").split(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with one subcommand registered (all of them when ``command`` is None)."""
    parser = _top_parser()
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, _) in SUBCOMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MELORA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        _top_parser().parse_args(argv or ["--help"])  # prints help (or the error) and exits
        print(f"melora: unknown command {command!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args = build_parser(command).parse_args(argv)
        status = int(args.func(args) or 0)
    except ModuleNotFoundError as err:
        extra = missing_extra(err)
        if extra is None or debug:
            raise
        print(
            f"melora {command}: needs the {extra} extra (missing module {err.name!r}): "
            f"pip install 'melora[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        _default_sigint()  # a second Ctrl-C while Python shuts down ends the process at once, silently
        print(f"melora {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"melora {command}: error: {' '.join(error_message(err).split())}", file=sys.stderr)
        print("(rerun with --debug for the traceback)", file=sys.stderr)
        return 2
    close_process_group()
    return status


def error_message(err: BaseException) -> str:
    """The one line for a user error: its message; for an OSError from a library, the path and what it means."""
    if isinstance(err, KeyError):
        message = str(err.args[0]) if err.args else str(err)
        if len(message.split()) <= 1:  # a bare lookup failure, not our message
            message = f"KeyError {message!r} (an unknown name inside a library; --debug shows where)"
        return message
    if isinstance(err, OSError) and err.filename is not None:  # raised by open(), mkdir(), ... : errno form
        fix = next(text for kind, text in _PATH_FIXES.items() if isinstance(err, kind))
        # a rename (an atomic write) names its source, a temporary file, first: the user's path is its target
        renamed = err.filename2 is not None and not isinstance(err, FileNotFoundError)
        path = str(err.filename2 if renamed else err.filename)
        return f"{path}: {fix} ({err.strerror or type(err).__name__})."
    return str(err)


def _default_sigint() -> None:
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass


def close_process_group() -> None:
    """Destroy the process group a launched run (``accelerate launch``, ``torchrun``) opened.

    Neither the Trainer nor accelerate does: a gloo group left to the interpreter's exit can abort the
    process ("terminate called without an active exception", SIGABRT) while its worker threads still
    hold tensors. Called only after the command succeeded on this rank: after an error another rank
    may still be inside a collective, and destroying the group would hang it.
    """
    dist = sys.modules.get("torch.distributed")  # never imports torch for a command that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
