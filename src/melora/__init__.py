"""MELoRA: Mini-Ensemble Low-Rank Adapters (Ren et al., ACL 2024) as a PEFT method.

``import melora`` registers the "MELORA" method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work with it.

The import itself is light (the ``melora`` command answers ``--help`` without loading PyTorch):
when PEFT is already imported, MELoRA registers at once; otherwise it registers the moment PEFT
is imported (by you, by transformers, or by using any name below, which load lazily).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("melora")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = [
    "MELoRAConfig",
    "MELoRALayer",
    "MELoRAModel",
    "adapter_summary",
    "export_lora",
    "format_summary",
    "save_adapter",
]
_LAZY = {
    "MELoRAConfig": "melora.tuner",
    "MELoRALayer": "melora.tuner",
    "MELoRAModel": "melora.tuner",
    "register": "melora.tuner",
    "adapter_summary": "melora.accounting",
    "format_summary": "melora.accounting",
    "export_lora": "melora.export",
    "save_adapter": "melora.adapter_folder",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'melora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Hands out PEFT's spec with a loader that, once ``peft`` has executed, imports melora.tuner.

    It stays on ``sys.meta_path`` until PEFT is actually executed: availability checks such as
    transformers' ``importlib.util.find_spec("peft")`` also consult it, and must not use it up.
    """

    def __init__(self) -> None:
        self._looking = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != "peft" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)  # the real finders (this one steps aside)
        finally:
            self._looking = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _PeftLoader):
            spec.loader = _PeftLoader(spec.loader, self)
        return spec


class _PeftLoader(importlib.abc.Loader):
    """PEFT's own loader, then the registration; puts PEFT's loader back on the module."""

    def __init__(self, loader: Any, finder: _RegisterAfterPeft) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        importlib.import_module("melora.tuner")  # registers at the end of its import

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: PEFT's own loader
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)


if "peft" in sys.modules:
    importlib.import_module("melora.tuner")
elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeft())
