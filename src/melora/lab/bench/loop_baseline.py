"""The per-block loop implementation of MELoRA, kept only as the baseline the stacked layer must beat.

This is how the authors' code computes MELoRA: ``n`` separate (Linear(k, r), Linear(r, o)) pairs, the
input sliced in a Python loop and the outputs concatenated. Same function as
:func:`melora.functional.melora_forward`, same parameters; only the execution differs.
"""

from __future__ import annotations

import torch
from torch import nn

from melora.functional import block_diagonal


class LoopMELoRALinear(nn.Module):
    """``y = base(x) + scaling * cat_i(B_i(A_i(x[..., i*k:(i+1)*k])))`` with ``n`` mini LoRA module pairs.

    Shapes: x (..., n*k) -> y (..., n*o); ``A_i.weight`` (r, k), ``B_i.weight`` (o, r). The base is frozen.
    """

    def __init__(self, base: nn.Linear, r: int, n: int, alpha: float) -> None:
        super().__init__()
        if base.in_features % n or base.out_features % n:
            raise ValueError(
                f"loop baseline: n={n} must divide in_features={base.in_features} and "
                f"out_features={base.out_features}."
            )
        self.base = base.requires_grad_(False)
        self.n, self.r, self.scaling = n, r, alpha / r
        self.k, self.o = base.in_features // n, base.out_features // n
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [nn.Linear(self.k, r, bias=False, **factory), nn.Linear(r, self.o, bias=False, **factory)]
            )
            for _ in range(n)
        )
        for _, up in self.blocks:
            nn.init.zeros_(up.weight)
        self.merged = False

    def load_melora_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy stacked MELoRA factors A (n, r, k) and B (n, o, r) into the per-block modules."""
        with torch.no_grad():
            for i, (down, up) in enumerate(self.blocks):
                down.weight.copy_(A[i])  # (r, k)
                up.weight.copy_(B[i])  # (o, r)

    def delta_weight(self) -> torch.Tensor:
        """(out_features, in_features) = scaling * blockdiag(B_i A_i)."""
        blocks = torch.stack([up.weight @ down.weight for down, up in self.blocks])  # (n, o, k)
        return block_diagonal(blocks) * self.scaling

    def merge(self) -> None:
        if not self.merged:
            self.base.weight.data += self.delta_weight().detach()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data -= self.delta_weight().detach()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        outputs = [
            up(down(x[..., i * self.k : (i + 1) * self.k])) for i, (down, up) in enumerate(self.blocks)
        ]
        return result + torch.cat(outputs, dim=-1) * self.scaling  # (..., n*o)


def apply_loop_baseline(
    model: nn.Module, target_modules: list[str] | tuple[str, ...], r: int, n: int, alpha: float
) -> nn.Module:
    """Freeze ``model`` and replace every ``nn.Linear`` whose name ends with a target by the loop layer."""
    model.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    ]
    if not targets:
        raise ValueError(
            f"loop baseline: no nn.Linear named {list(target_modules)} in {type(model).__name__}."
        )
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoopMELoRALinear(module, r=r, n=n, alpha=alpha))
    return model


def loop_layers(model: nn.Module) -> list[LoopMELoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoopMELoRALinear)]
