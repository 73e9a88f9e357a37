"""MELoRAConfig: the adapter's hyper-parameters, validated when built."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME
from peft.utils.other import get_pattern_key

from melora.errors import ConfigError, UserError


class PeftTypeName(str):
    """The method's name as PEFT sees it: a plain string ("MELORA") that also answers ``.value`` like an enum.

    PEFT keys its method tables by this string; transformers' ``load_adapter`` reads ``peft_type.value``.
    ``str()`` gives "PeftType.MELORA", as ``str(PeftType.LORA)`` gives "PeftType.LORA": PEFT's
    ``get_model_status`` reports ``str(peft_type).partition(".")[-1]`` (else it would report "").
    Equality, hashing, JSON and ``.value`` use the plain string.
    """

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"


PEFT_TYPE = PeftTypeName("MELORA")


def _is_real(value: object) -> bool:
    """True for int and float values (not bool, str or None): what arithmetic on alpha/dropout needs."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MELoRAConfig(PeftConfig):
    """Configuration of a MELoRA adapter (Ren et al., ACL 2024, arXiv 2402.17263).

    Each targeted linear layer ``y = W x`` (W: d_out x d_in) gets ``n`` mini LoRAs of rank ``r`` on the
    diagonal: ``y = W x + (alpha / r) * concat_i(B_i A_i x_i)`` with x_i the i-th of n equal input chunks.
    The update has rank up to ``n * r`` and ``r * (d_in + d_out)`` trainable parameters per layer.

    Conventions:
        - ``r`` is the rank of each mini LoRA; the equivalent (total) rank is ``n * r``.
        - ``scaling = alpha / r`` (the authors' convention: alpha applies per mini LoRA). A LoRA exported from
          this adapter has rank ``n * r`` and ``lora_alpha = n * alpha`` so its scaling is the same.
        - ``n`` must divide both in_features and out_features of every targeted layer.
        - ``n_pattern`` / ``r_pattern`` / ``alpha_pattern`` override n, r, alpha per module. A key is a module
          name or a regex, matched exactly as PEFT's LoRA matches ``rank_pattern`` keys: the key must match the
          end of the module name after a dot (``"v_proj"`` hits ``model.layers.0.self_attn.v_proj``); the
          first matching key wins.

    Args:
        r: rank of each mini LoRA (>= 1).
        n: number of mini LoRAs (>= 1). ``n = 1`` is a plain LoRA of rank r.
        alpha: scaling numerator; scaling = alpha / r.
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: module names / regex / "all-linear"; None picks defaults for known architectures
            (BERT/RoBERTa: query, value; Llama/Mistral/Qwen/Gemma: q_proj, v_proj; GPT-2: c_attn).
        exclude_modules: module names / regex never adapted.
        fan_in_fan_out: True for layers storing weight as (in, out) such as GPT-2's Conv1D (set automatically).
        bias: "none", "all" or "melora_only": which biases are trained.
        modules_to_save: extra modules trained and saved in full (e.g. a classifier head).
        init_weights: True: A kaiming-uniform, B zero (the adapter starts as a no-op). False: B random too.
        layers_to_transform / layers_pattern: restrict adaptation to some layer indices.
        trainable_token_indices: passed through to PEFT (used by TRL when a chat template adds tokens).
        n_pattern: module name / regex -> n for those modules, e.g. ``{"k_proj": 4, "v_proj": 4}`` for GQA.
        r_pattern: module name / regex -> r for those modules.
        alpha_pattern: module name / regex -> alpha for those modules (their scaling is alpha / their r).
    """

    r: int = field(default=1, metadata={"help": "Rank of each mini LoRA."})
    n: int = field(default=8, metadata={"help": "Number of mini LoRAs on the diagonal."})
    alpha: float = field(default=16, metadata={"help": "Scaling numerator: scaling = alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True if the layer stores weight as (in, out)."}
    )
    bias: Literal["none", "all", "melora_only"] = field(default="none", metadata={"help": "Biases to train."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-init B so the adapter starts as a no-op."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={"help": "Token indices whose embeddings are trained (PEFT's TrainableTokens)."},
    )
    n_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module n: module name or regex -> n (keys matched like LoRA's rank_pattern)."},
    )
    r_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module r: module name or regex -> r (keys matched like LoRA's rank_pattern)."},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module alpha: module name or regex -> alpha (matched like LoRA's alpha_pattern)."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        try:
            super().__post_init__()  # PEFT's own checks (task_type)
        except ValueError as err:
            problems.append(str(err))
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        for name in ("n_pattern", "r_pattern", "alpha_pattern"):  # None: no per-module values
            if getattr(self, name) is None:
                setattr(self, name, {})
        problems += self.hyperparameter_problems(
            r=self.r,
            n=self.n,
            alpha=self.alpha,
            dropout=self.dropout,
            n_pattern=self.n_pattern,
            r_pattern=self.r_pattern,
            alpha_pattern=self.alpha_pattern,
        )
        for name in ("fan_in_fan_out", "init_weights"):
            value = getattr(self, name)
            # a JSON "false" string is truthy: refuse it rather than misread it
            if not isinstance(value, bool):
                problems.append(
                    f"{name}={value!r}: must be true or false (a boolean, not {type(value).__name__})."
                )
        problems += self._module_list_problems()
        if self.bias not in ("none", "all", "melora_only"):
            problems.append(f"bias={self.bias!r}: choose 'none', 'all' or 'melora_only'.")
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                problems.append(f"{name}={value!r}: must be a string or null (got {type(value).__name__}).")
        if not _is_token_indices(self.trainable_token_indices):
            problems.append(
                f"trainable_token_indices={self.trainable_token_indices!r}: must be a list of token ids, a "
                '{module name: [token ids]} mapping or null, e.g. [0, 5] or {"embed_tokens": [0, 5]}.'
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # PEFT's LoraConfig sentence, verbatim, then the fix.
            problems.append(
                "`layers_to_transform` cannot be used when `target_modules` is a str. "
                f"target_modules={self.target_modules!r} is a regex matched against full module names, so "
                "layers_to_transform would be ignored: put the layer indices into the regex, or pass "
                "target_modules as a list of names."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            problems.append(
                "`layers_pattern` cannot be used when `target_modules` is a str. "
                "Put the layer names into the regex, or pass target_modules as a list of names."
            )
        # `is None`, not falsiness: layers_to_transform=0 is layer 0 (PEFT fixed the same check, PR #3425)
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append(
                f"layers_pattern={self.layers_pattern!r} is set but layers_to_transform is not: set both "
                "(e.g. layers_to_transform=[0, 1]), or neither."
            )
        if problems:
            raise ConfigError(problems)

    @staticmethod
    def hyperparameter_problems(
        r: Any = 1,
        n: Any = 1,
        alpha: Any = 16,
        dropout: Any = 0.0,
        n_pattern: Any = None,
        r_pattern: Any = None,
        alpha_pattern: Any = None,
    ) -> list[str]:
        """The rules for r, n, alpha, dropout and the per-module patterns: one line per problem, [] if none.

        The one home of these rules: the config applies them when built, the runners' ``AdapterArgs`` before
        building one (also for PEFT's LoRA, whose r / alpha / dropout follow the same rules) and the layer when
        created directly. Each line names the field, the value, what it must be and an example.
        """
        problems = []
        if not _is_int(r) or r < 1:
            problems.append(f"r={r!r}: the rank of each mini LoRA must be an integer >= 1 (e.g. r=1).")
        if not _is_int(n) or n < 1:
            problems.append(
                f"n={n!r}: the number of mini LoRAs must be an integer >= 1 (e.g. n=8; n=1 is plain LoRA)."
            )
        if not _is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
            problems.append(
                f"alpha={alpha!r}: the scaling numerator must be a finite number > 0 (e.g. alpha=16); "
                "scaling = alpha / r."
            )
        if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
            problems.append(f"dropout={dropout!r}: must lie in [0, 1) and be a number (e.g. dropout=0.05).")
        problems += _pattern_problems(n_pattern=n_pattern, r_pattern=r_pattern, alpha_pattern=alpha_pattern)
        return problems

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's loader; an invalid adapter_config.json is a UserError that names the file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ConfigError as err:
            folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
            raise UserError(
                f"{os.path.join(folder, CONFIG_NAME)}: {err}\nFix the values in that file (or retrain the adapter)."
            ) from None

    def _module_list_problems(self) -> list[str]:
        """target_modules / exclude_modules / modules_to_save / layers_to_transform / layers_pattern of the wrong type."""
        problems = []
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            names_ok = isinstance(value, (list, set, tuple)) and all(isinstance(v, str) and v for v in value)
            if value is None or names_ok or (isinstance(value, str) and name != "modules_to_save"):
                continue
            kind = "a list of module names" + (" or a regex string" if name != "modules_to_save" else "")
            problems.append(f'{name}={value!r}: must be {kind}, e.g. {name}=["q_proj", "v_proj"].')
        layers = self.layers_to_transform
        indices = [layers] if isinstance(layers, int) else layers
        if layers is not None and (
            not isinstance(indices, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
        ):
            problems.append(
                f"layers_to_transform={layers!r}: must be a layer index >= 0 or a list of them, e.g. [0, 1]."
            )
        pattern = self.layers_pattern
        if pattern is not None and not (
            isinstance(pattern, str)
            or (isinstance(pattern, (list, tuple)) and all(isinstance(v, str) and v for v in pattern))
        ):
            problems.append(
                f'layers_pattern={pattern!r}: must be the name of the layer list or a list of names, e.g. "layers".'
            )
        return problems

    @property
    def scaling(self) -> float:
        """alpha / r, the factor applied to every mini LoRA's output (modules without a pattern)."""
        return self.alpha / self.r

    def resolve(self, module_name: str) -> tuple[int, int, float]:
        """``(n, r, alpha)`` for the module ``module_name`` (its name in the base model), patterns applied.

        Each pattern is looked up with PEFT's ``get_pattern_key``, the function LoRA uses for ``rank_pattern``
        and ``alpha_pattern``, so a key selects the same modules here as in a LoraConfig.
        """
        return (
            self._lookup(self.n_pattern, module_name, self.n),
            self._lookup(self.r_pattern, module_name, self.r),
            self._lookup(self.alpha_pattern, module_name, self.alpha),
        )

    def pattern_key(self, field_name: str, module_name: str) -> str | None:
        """The key of pattern ``field_name`` ("n_pattern", ...) that applies to ``module_name``, or None."""
        pattern = getattr(self, field_name) or {}
        key = get_pattern_key(pattern.keys(), module_name)
        return key if key in pattern else None

    @staticmethod
    def _lookup(pattern: dict[str, Any] | None, module_name: str, default: Any) -> Any:
        if not pattern:
            return default
        return pattern.get(get_pattern_key(pattern.keys(), module_name), default)


def _pattern_problems(**patterns: Any) -> list[str]:
    """Problems with n_pattern / r_pattern / alpha_pattern, one line each naming the field and the key."""
    problems = []
    for name, what in (
        ("n_pattern", "an integer >= 1 (the number of mini LoRAs)"),
        ("r_pattern", "an integer >= 1 (the rank of each mini LoRA)"),
        ("alpha_pattern", "a finite number > 0"),
    ):
        pattern = patterns.get(name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            problems.append(
                f"{name}={pattern!r}: must be a dict of module name or regex -> value, "
                f'e.g. {name}={{"v_proj": 4}}.'
            )
            continue
        for key, value in pattern.items():
            if not isinstance(key, str) or not key:
                problems.append(f"{name} key {key!r}: must be a non-empty module name or regex string.")
                continue
            try:
                re.compile(key)
            except re.error as err:
                problems.append(f"{name} key {key!r}: not a valid regular expression ({err}).")
                continue
            if name == "alpha_pattern":
                ok = _is_real(value) and math.isfinite(value) and value > 0
            else:
                ok = _is_int(value) and value >= 1
            if not ok:
                problems.append(f"{name}[{key!r}]={value!r}: must be {what}.")
    return problems


def _is_token_indices(value: object) -> bool:
    """None, a list of token ids, or a {module name: [token ids]} mapping (PEFT's trainable_token_indices)."""
    if value is None:
        return True
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and isinstance(v, list) and all(map(_is_int, v)) for k, v in value.items()
        )
    return isinstance(value, list) and all(map(_is_int, value))
