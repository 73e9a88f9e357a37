"""Files on disk: the package's one atomic writer (files and folders) and safetensors-only reads.

Every output melora writes (adapters, results.json, tables, exported LoRAs) goes through
``atomic_write_text`` / ``write_json_atomic`` / ``atomic_directory``: a reader sees the old content
or the new one, never a half-written file. Written files follow the user's umask.
"""

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (mkstemp/mkdtemp create 0600/0700)."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temp file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, written atomically (non-JSON values become strings)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_yaml_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as YAML at ``path``, written atomically."""
    import yaml

    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


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


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``; keys may use dashes or underscores (both become underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


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
