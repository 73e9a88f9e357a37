"""Adapter files on disk: atomic folder writes and safetensors-only reads with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target`` in one rename.

    On an exception the temp folder is removed and ``target`` is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(model: Any, output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(output_dir)`` done atomically (safetensors; a crash leaves no half-written folder)."""
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    return Path(output_dir)


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of ``adapter_dir`` as a dict, with a clear error when missing or corrupt."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {adapter_dir} is not a saved PEFT adapter folder.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the adapter.") from err


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_model.safetensors`` (never a pickle file), with a clear error when corrupt."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = Path(adapter_dir) / "adapter_model.bin"
        hint = (
            " Only safetensors are read; re-save it with safe_serialization=True." if pickled.exists() else ""
        )
        raise FileNotFoundError(f"{path} does not exist.{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is truncated or corrupted ({err}); re-save or re-download the adapter."
        ) from err
