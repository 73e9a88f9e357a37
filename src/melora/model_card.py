"""The model card (README.md) of a saved MELoRA adapter: what it is, what it adapts, how to load it.

PEFT's ``save_pretrained`` writes a blank template card; :func:`write_model_card` replaces it with one that a
reader of the Hub page (or of the folder) can act on: the method and its paper, r, n and the equivalent rank
n*r, alpha, the targeted modules, the parameter count, the base model, the two loading routes (``import
melora`` + ``PeftModel.from_pretrained``, or ``melora export-lora`` to a standard LoRA adapter for tools that
do not import melora) and, when given, the training run's scores. The YAML header carries ``library_name:
peft``, ``base_model`` and the tags that the Hub indexes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from melora.atomic import atomic_write_text

PAPER = "https://arxiv.org/abs/2402.17263"
TAGS = ("melora", "peft", "lora")
CARD_FILE = "README.md"


def _config_dict(config: Any) -> dict[str, Any]:
    """A MELoRAConfig (or any PEFT config) or an adapter_config.json mapping, as a plain dict."""
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config: expected a MELoRAConfig or a dict, got {type(config).__name__}")


def _yaml_string(value: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(value)


def _targets(config: dict[str, Any]) -> str:
    targets = config.get("target_modules")
    if targets is None:
        return "PEFT's default for the model type"
    if isinstance(targets, str):
        return f"modules matching the regular expression `{targets}`"
    return ", ".join(f"`{name}`" for name in sorted(targets))


def _patterns(config: dict[str, Any]) -> list[str]:
    lines = []
    for key, what in (("n_pattern", "n"), ("r_pattern", "r"), ("alpha_pattern", "alpha")):
        pattern = config.get(key) or {}
        if pattern:
            shown = ", ".join(f"`{name}`: {value}" for name, value in sorted(pattern.items()))
            lines.append(f"- per-module {what}: {shown}")
    return lines


def _format_score(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def model_card(
    config: Any,
    base: str,
    trainable_params: int | None = None,
    scores: dict[str, Any] | None = None,
) -> str:
    """The text of a MELoRA adapter's README.md (see :func:`write_model_card`)."""
    cfg = _config_dict(config)
    r, n, alpha = cfg.get("r"), cfg.get("n"), cfg.get("alpha")
    rank = r * n if isinstance(r, int) and isinstance(n, int) else "n*r"
    tags = "\n".join(f"- {tag}" for tag in TAGS)
    header = f"---\nlibrary_name: peft\nbase_model: {_yaml_string(base)}\ntags:\n{tags}\n---\n"
    lines = [
        header,
        f"# MELoRA adapter for {base}",
        "",
        f"A [MELoRA]({PAPER}) (mini-ensemble low-rank adapters, arXiv 2402.17263) adapter for `{base}`. "
        f"Each adapted weight gets n = {n} mini LoRAs of rank r = {r} on the block diagonal, an update of "
        f"rank up to n*r = {rank} from r*(d_in + d_out) parameters per weight (a LoRA of that rank needs n "
        "times as many).",
        "",
        "## Adapter",
        "",
        "| | |",
        "|---|---|",
        f"| method | MELoRA ({PAPER}) |",
        f"| r (rank of each mini LoRA) | {r} |",
        f"| n (mini LoRAs per weight) | {n} |",
        f"| equivalent rank n*r | {rank} |",
        f"| alpha (scaling = alpha / r) | {alpha} |",
        f"| target modules | {_targets(cfg)} |",
    ]
    if cfg.get("modules_to_save"):
        lines.append(f"| trained in full | {', '.join(f'`{m}`' for m in sorted(cfg['modules_to_save']))} |")
    if trainable_params is not None:
        lines.append(f"| adapter parameters (trainable) | {trainable_params:,} |")
    lines.append(f"| base model | `{base}` |")
    lines += ["", *_patterns(cfg)] if _patterns(cfg) else []
    lines += [
        "",
        "## Load it with PEFT",
        "",
        "MELoRA is a PEFT method that the `melora` package registers when it is imported:",
        "",
        "```bash",
        "pip install melora",
        "```",
        "",
        "```python",
        "import melora  # registers MELoRA with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f'base = AutoModel.from_pretrained("{base}")  # the Auto class of your task',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        "Without `import melora`, PEFT does not know the method and raises `KeyError: 'MELORA'` while "
        "reading `adapter_config.json`.",
        "",
        "## Tools that do not import melora: export a standard LoRA adapter",
        "",
        "A MELoRA update is a LoRA of rank n*r with block-diagonal factors, so it converts exactly into a "
        "plain LoRA adapter that any LoRA-aware tool (PEFT alone, vLLM, llama.cpp converters, ...) loads:",
        "",
        "```bash",
        "melora export-lora ADAPTER LORA_DIR",
        "```",
        "",
        f"`LORA_DIR` then holds a LoRA adapter of rank {rank} for `{base}`.",
    ]
    if scores:
        lines += ["", "## Scores of the training run", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_format_score(value)} |" for name, value in sorted(scores.items())]
    return "\n".join(lines) + "\n"


def write_model_card(
    folder: str | os.PathLike,
    config: Any,
    base: str,
    trainable_params: int | None = None,
    scores: dict[str, Any] | None = None,
) -> Path:
    """Write ``<folder>/README.md`` for a saved MELoRA adapter (replacing PEFT's template) and return its path.

    ``config``: the adapter's MELoRAConfig or its adapter_config.json as a dict; ``base``: the base model's
    hub id or path; ``trainable_params``: the parameters the adapter trained; ``scores``: the run's metrics
    (name -> value), listed when given.
    """
    return atomic_write_text(Path(folder) / CARD_FILE, model_card(config, base, trainable_params, scores))
