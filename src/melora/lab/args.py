"""The run schema every runner shares, and the command-line flags generated from it.

Two dataclasses are declared once and composed by the GLUE, instruct and eval runners, the study
command and the benchmarks:

- :class:`AdapterArgs`: the method and its hyperparameters (method, r, n, alpha, dropout, targets,
  modules to save, label), with ``.slug``, ``.peft_config(task_type)`` and ``.apply(model, task_type)``;
- :class:`TrainArgs`: the training loop (epochs, batch size, gradient accumulation, lr, warmup,
  weight decay, seed, output dir, ...).

A runner adds its own dataclass (data and model fields). ``add_dataclass_args`` turns the fields and
their ``metadata["help"]`` into flags (``--max-length`` for ``max_length``; booleans get
``--x/--no-x``), so a field added here appears in every runner at once. ``resolve`` builds the
dataclasses from three layers: the runner's defaults < a YAML preset (``--config``) < the flags.
An unknown or mistyped preset key is a :class:`UserError` naming the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from melora.errors import (
    UserError,  # defined in the core; `from melora.lab.args import UserError` keeps working
)

METHODS = ("melora", "lora", "full")
# Trainer's experiment trackers that --report-to offers (each needs its package; "none" logs nowhere).
REPORT_TO = ("tensorboard", "trackio", "wandb", "mlflow", "none")
DEFAULT_R = {"melora": 1, "lora": 8}
DEFAULT_N = 8


def opt(default: Any = None, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with CLI metadata: ``help``, optional ``choices``, ``flag`` (another flag name)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _problems_error(what: str, problems: list[str]) -> UserError:
    return UserError(f"Invalid {what}: " + "; ".join(problems) + ".")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AdapterArgs:
    """Which method adapts the model, and its hyperparameters (MELoRA: scaling = alpha / r per mini LoRA)."""

    method: str = opt("melora", "melora, lora (PEFT's LoRA) or full fine-tuning", choices=METHODS)
    r: int | None = opt(None, "rank of each mini LoRA (MELoRA) or of the LoRA; default: MELoRA 1, LoRA 8")
    n: int | None = opt(
        None, "number of mini LoRAs (MELoRA only; must divide every targeted layer); default 8"
    )
    alpha: float = opt(16.0, "scaling numerator: scaling = alpha / r")
    dropout: float = opt(0.05, "dropout on the adapter input")
    target_modules: list[str] | None = opt(
        None,
        "module names to adapt; default: PEFT's LoRA table for the model type (BERT query,value; Llama q_proj,v_proj)",
    )
    modules_to_save: list[str] | None = opt(
        None, "extra modules trained in full beside the adapter (a classifier head always is), e.g. pooler"
    )
    n_pattern: dict[str, int] | None = opt(
        None, 'per-module n, e.g. {"v_proj": 4} (module name or regex -> n)'
    )
    r_pattern: dict[str, int] | None = opt(None, "per-module r (LoRA: its rank_pattern)")
    alpha_pattern: dict[str, float] | None = opt(None, "per-module alpha (LoRA: its alpha_pattern)")
    label: str | None = opt(None, "run label in tables; default e.g. 'melora r=1 n=8'")

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        elif self.method == "full":
            self.r = self.n = None
        else:
            self.r = DEFAULT_R[self.method] if self.r is None else self.r
            if self.method == "melora":
                self.n = DEFAULT_N if self.n is None else self.n
            elif self.n not in (None, 1):
                problems.append(f"n={self.n!r}: n applies to MELoRA only; drop it for --method lora")
            elif self.n_pattern:
                problems.append("n_pattern applies to MELoRA only; drop it for --method lora")
            else:
                self.n = None
        if self.method in ("melora", "lora"):
            # r, n, alpha, dropout and the patterns follow MELoRAConfig's rules (LoRA's r/alpha/dropout too)
            from melora.tuner.config import MELoRAConfig

            rules = MELoRAConfig.hyperparameter_problems(
                r=self.r,
                n=1 if self.n is None else self.n,
                alpha=self.alpha,
                dropout=self.dropout,
                n_pattern=self.n_pattern,
                r_pattern=self.r_pattern,
                alpha_pattern=self.alpha_pattern,
            )
            problems += [problem.removesuffix(".") for problem in rules]
        if problems:
            raise _problems_error("adapter options", problems)
        if self.label is None:
            self.label = self.default_label

    @property
    def default_label(self) -> str:
        """``melora r=1 n=8``, ``lora r=8`` or ``full``."""
        if self.method == "melora":
            return f"melora r={self.r} n={self.n}"
        return f"lora r={self.r}" if self.method == "lora" else "full"

    @property
    def slug(self) -> str:
        """A folder name: ``melora-r1-n8``, ``lora-r8`` or ``full``."""
        if self.method == "melora":
            return f"melora-r{self.r}-n{self.n}"
        return f"lora-r{self.r}" if self.method == "lora" else "full"

    def peft_config(self, task_type: str | None = None):
        """A MELoRAConfig / LoraConfig for this method, or None for full fine-tuning.

        The configs get copies of the module lists: PEFT appends the task head to ``modules_to_save``.
        """
        if self.method == "full":
            return None
        targets = list(self.target_modules) if self.target_modules is not None else None
        to_save = list(self.modules_to_save) if self.modules_to_save is not None else None
        if self.method == "melora":
            from melora.tuner.config import MELoRAConfig

            return MELoRAConfig(
                r=self.r,
                n=self.n,
                alpha=self.alpha,
                dropout=self.dropout,
                target_modules=targets,
                modules_to_save=to_save,
                task_type=task_type,
                n_pattern=dict(self.n_pattern or {}),
                r_pattern=dict(self.r_pattern or {}),
                alpha_pattern=dict(self.alpha_pattern or {}),
            )
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            modules_to_save=to_save,
            task_type=task_type,
            rank_pattern=dict(self.r_pattern or {}),
            alpha_pattern=dict(self.alpha_pattern or {}),
        )

    def apply(self, model, task_type: str | None = None):
        """Wrap ``model`` with the adapter; for full fine-tuning make every parameter trainable."""
        peft_config = self.peft_config(task_type)
        if peft_config is None:
            for param in model.parameters():
                param.requires_grad_(True)
            return model
        from peft import get_peft_model

        return get_peft_model(model, peft_config)

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> AdapterArgs:
        """The adapter options stored in a saved adapter_config.json (MELORA or LORA)."""
        kind = str(config.get("peft_type", "")).upper()
        targets = config.get("target_modules")
        targets = sorted(targets) if isinstance(targets, (list, set)) else targets
        if kind == "MELORA":
            return cls(
                "melora",
                r=config.get("r"),
                n=config.get("n"),
                alpha=config.get("alpha", 16.0),
                dropout=config.get("dropout", 0.0),
                target_modules=targets,
            )
        if kind == "LORA":
            return cls(
                "lora",
                r=config.get("r"),
                alpha=config.get("lora_alpha", 8.0),
                dropout=config.get("lora_dropout", 0.0),
                target_modules=targets,
            )
        raise UserError(f"adapter_config.json has peft_type={kind!r}; expected MELORA or LORA.")


@dataclass
class TrainArgs:
    """The training loop every runner shares (HF Trainer underneath)."""

    output_dir: str | None = opt(None, "where results.json, checkpoints and the adapter go (required)")
    epochs: float = opt(3.0, "training epochs")
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides --epochs when > 0)")
    batch_size: int = opt(16, "per-device training batch size")
    eval_batch_size: int = opt(64, "per-device evaluation batch size")
    grad_accum: int = opt(1, "gradient accumulation steps (effective batch = batch x accum x processes)")
    lr: float | None = opt(None, "peak learning rate; default: the runner's per-method value")
    warmup_ratio: float = opt(0.06, "linear warmup, as a fraction of the total steps")
    warmup_steps: int = opt(0, "linear warmup in optimizer steps (overrides --warmup-ratio when > 0)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    lr_scheduler: str = opt("linear", "HF scheduler name (linear, cosine, constant, ...)")
    seed: int = opt(0, "seed of initialisation, dropout and data order")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)")
    save_strategy: str = opt(
        "no", "checkpoints for --resume: epoch, steps or no", choices=("epoch", "steps", "no")
    )
    save_steps: int = opt(50, "checkpoint every K steps when --save-strategy steps")
    resume: bool = opt(False, "continue from the last complete checkpoint in --output-dir")
    stop_after_steps: int | None = opt(None, "checkpoint and stop after K steps (to test --resume)")
    progress: bool = opt(True, "progress bars")
    report_to: list[str] = opt(
        ["none"],
        "experiment trackers that get the training logs, one or several (Trainer's report_to; each needs "
        "its package installed, e.g. pip install tensorboard)",
        choices=REPORT_TO,
    )

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        unknown = [name for name in self.report_to if name not in REPORT_TO]
        if unknown or not self.report_to:
            problems.append(f"report_to={self.report_to!r}: choose from {', '.join(REPORT_TO)}")
        elif "none" in self.report_to and len(self.report_to) > 1:
            problems.append(
                f"report_to={self.report_to!r}: 'none' cannot be combined with a tracker; drop it"
            )
        if not self.output_dir:
            problems.append("output_dir is required: pass --output-dir (or set output_dir in the preset)")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "save_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r}: expected a positive integer")
        if not (_is_number(self.epochs) and self.epochs > 0) and not self.max_steps > 0:
            problems.append(f"epochs={self.epochs!r}: expected a number > 0 (or max_steps > 0)")
        if self.lr is not None and not (_is_number(self.lr) and self.lr > 0):
            problems.append(f"lr={self.lr!r}: expected a finite number > 0")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio!r}: expected a number in [0, 1)")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay!r}: expected a number >= 0")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads={self.threads!r}: expected a positive integer")
        if problems:
            raise _problems_error("training options", problems)

    @property
    def effective_batch_size(self) -> int:
        """Per-device batch x gradient accumulation (x number of processes when distributed)."""
        return self.batch_size * self.grad_accum


# ---- flags from fields --------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    defaults: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of ``cls`` (default None, so presets can fill it); help shows the default."""
    defaults = defaults or {}
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _unwrap_optional(types_[f.name])
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        if f.default_factory is not dataclasses.MISSING and f.name not in defaults:
            default = f.default_factory()
        help_text = f.metadata.get("help", "")
        if default not in (None, "", []) and "default" not in help_text:
            help_text += (
                f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
            )
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(tp)[0]
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif typing.get_origin(tp) is dict or tp is dict:
            kwargs["type"] = _json_mapping
            kwargs["metavar"] = "JSON"
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp!r}")
        parser.add_argument(f.metadata.get("flag", flag_name(f.name)), **kwargs)


def _json_mapping(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON mapping, got {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON mapping, got {text!r}")
    return value


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` (from YAML) checked against field type ``tp``; YAML's ``4e-4`` string becomes a float."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: null is not allowed; expected {getattr(inner, '__name__', inner)}.")
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(inner) is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    elif typing.get_origin(inner) is dict or inner is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    name = getattr(inner, "__name__", str(inner))
    raise UserError(f"{where}: expected {name}, got {value!r} ({type(value).__name__}).")


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve(
    classes: dict[str, type],
    *,
    defaults: dict[str, Any] | None = None,
    preset: dict[str, Any] | None = None,
    preset_path: str | os.PathLike | None = None,
    flags: dict[str, Any] | None = None,
    ignore: tuple[str, ...] = ("config", "func", "command", "debug"),
) -> dict[str, Any]:
    """Build each dataclass in ``classes`` from defaults < preset < flags (None flags are unset).

    ``classes`` maps a part name ("adapter", "train", "glue", ...) to its dataclass; every key of
    the flat layers belongs to exactly one of them. Returns ``{part: instance}``.
    """
    owner: dict[str, str] = {}
    types_: dict[str, Any] = {}
    for part, cls in classes.items():
        for name, tp in field_types(cls).items():
            owner[name], types_[name] = part, tp
    source = str(preset_path) if preset_path else "preset"
    merged: dict[str, Any] = dict(defaults or {})
    for key, value in (preset or {}).items():
        if key not in owner:
            raise UserError(f"{source}: unknown key {key!r}{suggest(key, sorted(owner))}.")
        merged[key] = coerce(types_[key], value, f"{source}: key {key!r}")
    for key, value in (flags or {}).items():
        if key in ignore or value is None:
            continue
        if key not in owner:
            raise UserError(f"unknown option {key!r}{suggest(key, sorted(owner))}.")
        merged[key] = value
    built: dict[str, Any] = {}
    for part, cls in classes.items():
        kwargs = {k: v for k, v in merged.items() if owner.get(k) == part}
        try:
            built[part] = cls(**kwargs)
        except UserError:
            raise
        except (TypeError, ValueError) as err:
            raise UserError(str(err).replace("\n", " ")) from err
    return built


class RunOptions:
    """Base of a runner's options dataclass: one field per part (e.g. ``glue``, ``adapter``, ``train``).

    A subclass sets ``PARTS`` (part name -> dataclass), ``DEFAULTS`` (the runner's defaults for any
    field) and ``DEFAULT_LR`` (per method, used when no lr is given).
    """

    PARTS: ClassVar[dict[str, type]] = {}
    TITLES: ClassVar[dict[str, str]] = {"adapter": "adapter", "train": "training"}
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    DEFAULT_LR: ClassVar[dict[str, float]] = {}

    def __post_init__(self) -> None:
        train, adapter = getattr(self, "train"), getattr(self, "adapter")  # noqa: B009
        if train.lr is None:
            train.lr = self.DEFAULT_LR[adapter.method]

    @classmethod
    def from_options(
        cls,
        flags: dict[str, Any] | None = None,
        preset: dict[str, Any] | None = None,
        preset_path: str | os.PathLike | None = None,
    ):
        """Defaults < preset < flags; unknown keys are a UserError naming the key (and the file)."""
        return cls(
            **resolve(cls.PARTS, defaults=cls.DEFAULTS, preset=preset, preset_path=preset_path, flags=flags)
        )

    def to_dict(self) -> dict[str, Any]:
        """Every option as one flat mapping (what results.json stores as ``config``)."""
        out: dict[str, Any] = {}
        for part in self.PARTS:
            out.update(dataclasses.asdict(getattr(self, part)))
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, presets: str) -> None:
        """``--config`` plus one flag group per part (the runner's defaults shown in the help)."""
        parser.add_argument("--config", default=None, help=f"YAML preset ({presets}); flags override it")
        for part, part_cls in cls.PARTS.items():
            group = parser.add_argument_group(cls.TITLES.get(part, part))
            add_dataclass_args(group, part_cls, defaults=cls.DEFAULTS)


def load_preset(path: str | os.PathLike | None) -> dict[str, Any]:
    """The flat mapping of a YAML preset (``{}`` for None), as a :class:`UserError` when unreadable."""
    if path is None:
        return {}
    from melora.lab.yaml_files import read_yaml

    try:
        return read_yaml(Path(path))
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from err
