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


class PeftTypeName(str):
    """The method's name as PEFT sees it: a plain string ("MELORA") that also answers ``.value`` like an enum.

    PEFT keys its method tables by this string; transformers' ``load_adapter`` reads ``peft_type.value``.
    """

    @property
    def value(self) -> str:
        return str(self)


PEFT_TYPE = PeftTypeName("MELORA")


def _is_real(value: object) -> bool:
    """True for int and float values (not bool, str or None): what arithmetic on alpha/dropout needs."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            problems.append(f"r={self.r!r}: the rank of each mini LoRA must be an integer >= 1 (e.g. r=1).")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            problems.append(
                f"n={self.n!r}: the number of mini LoRAs must be an integer >= 1 (e.g. n=8; n=1 is plain LoRA)."
            )
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(
                f"alpha={self.alpha!r}: the scaling numerator must be a finite number > 0 (e.g. alpha=16); "
                "scaling = alpha / r."
            )
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            problems.append(
                f"dropout={self.dropout!r}: must lie in [0, 1) and be a number (e.g. dropout=0.05)."
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
        if self.layers_pattern and not self.layers_to_transform:
            problems.append("layers_pattern is set but layers_to_transform is not: set both, or neither.")
        problems += self._pattern_problems()
        if problems:
            raise ValueError("Invalid MELoRAConfig:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's loader; an invalid adapter_config.json is a UserError that names the file."""
        from melora.args import UserError

        try:
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as err:
            if not str(err).startswith("Invalid MELoRAConfig"):
                raise
            folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
            raise UserError(
                f"{os.path.join(folder, CONFIG_NAME)}: {err}\nFix the values in that file (or retrain the adapter)."
            ) from None

    def _module_list_problems(self) -> list[str]:
        """target_modules / exclude_modules / modules_to_save / layers_to_transform of the wrong type."""
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

    def _pattern_problems(self) -> list[str]:
        """Problems with n_pattern / r_pattern / alpha_pattern, one line each naming the field and the key.

        A pattern given as None becomes {} (no per-module values).
        """
        problems = []
        for name, what in (
            ("n_pattern", "an integer >= 1 (the number of mini LoRAs)"),
            ("r_pattern", "an integer >= 1 (the rank of each mini LoRA)"),
            ("alpha_pattern", "a finite number > 0"),
        ):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
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
                    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                    ok = ok and math.isfinite(value) and value > 0
                else:
                    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                if not ok:
                    problems.append(f"{name}[{key!r}]={value!r}: must be {what}.")
        return problems
