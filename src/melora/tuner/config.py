"""MELoRAConfig: the adapter's hyper-parameters, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig


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
        if problems:
            raise ValueError("Invalid MELoRAConfig:\n  - " + "\n  - ".join(problems))

    @property
    def scaling(self) -> float:
        """alpha / r, the factor applied to every mini LoRA's output."""
        return self.alpha / self.r
