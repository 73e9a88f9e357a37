"""YAML presets and study files: read as a mapping with the file named in every error, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from melora.atomic import atomic_write_text


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``; keys may use dashes or underscores (both become underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8."
        ) from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def write_yaml_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as YAML at ``path``, written atomically."""
    import yaml

    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))
