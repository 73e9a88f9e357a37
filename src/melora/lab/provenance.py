"""Where a result came from: library versions, hardware and the source revision.

Runners and benchmarks store ``provenance()`` in every results file, so a number can always be
traced to the code and machine that produced it.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any


@functools.cache
def git_revision(path: str | None = None) -> str | None:
    """The git commit of the source tree holding this package (``-dirty`` when modified), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def provenance() -> dict[str, Any]:
    """Versions, hardware and revision, stored in every results.json."""
    import accelerate
    import peft
    import torch
    import transformers

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "melora": _installed_version("melora"),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
    }


def _installed_version(distribution: str) -> str | None:
    """A distribution's version from its package metadata (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
