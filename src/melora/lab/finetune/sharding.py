"""What the runners do when ``accelerate launch`` shards the model (FSDP or DeepSpeed ZeRO-3).

Sharding wrappers split every parameter across ranks: FSDP2 keeps each MELoRA factor as a DTensor
sharded on its first dimension (rank 0 of 2 holds ``A[:n/2]`` of the (n, r, k) tensor, padded when n
is odd), FSDP1 flattens it into a padded flat parameter, ZeRO-3 into a partitioned one. A rank's local
``state_dict()`` is then a piece, never the adapter. So:

- :func:`check_sharding_active`: the launcher asked for FSDP/DeepSpeed but the Trainer runs without
  it (accelerate turns FSDP on only on GPUs and other accelerators) -> one clear error;
- :func:`gathered_state_dict`: the full state dict, gathered from every rank (a collective: all ranks
  call it), for :func:`melora.lab.finetune.training.save_final` on the main process;
- :func:`full_tensor`: one parameter, whole (DTensor -> gathered tensor), for checksums on every rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from melora.lab.args import UserError

# accelerate launch exports these for an FSDP / DeepSpeed config (accelerate.utils.launch).
_REQUESTED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def requested_sharding() -> str | None:
    """'FSDP' or 'DeepSpeed' when ``accelerate launch`` was given such a config, else None."""
    for variable, name in _REQUESTED.items():
        if os.environ.get(variable, "false").lower() == "true":
            return name
    return None


def check_sharding_active(trainer: Any) -> None:
    """Raise when the launch config asks for FSDP/DeepSpeed and the Trainer would silently run DDP."""
    wanted = requested_sharding()
    if wanted is None or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return
    raise UserError(
        f"accelerate launch was given a {wanted} config, but this process has no GPU: accelerate "
        f"{_version('accelerate')} enables {wanted} only on GPUs/accelerators and would silently run plain "
        "DDP instead. On CPU launch with `accelerate launch --num_processes N` (no --config_file) or "
        "torchrun; see docs/distributed.md."
    )


def gathered_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The unsharded model state dict under FSDP / ZeRO-3 (filled on rank 0), None when not sharded.

    A collective: every rank must call it. Tensors keep the shapes of the unwrapped model, so MELoRA
    factors come back as (n, r, k) and (n, o, r).
    """
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (FSDP2's DTensor is gathered: a collective), else itself."""
    gather = getattr(param, "full_tensor", None)
    return gather() if callable(gather) else param


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
