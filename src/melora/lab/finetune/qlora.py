"""The QLoRA recipe for the runners: a bitsandbytes-quantized base, trained through MELoRA or LoRA adapters.

``--quantize 4bit`` is QLoRA's setting (Dettmers et al., 2023): NF4 weights with double quantisation (the
absmax constants quantized too) and bf16 compute; ``--quantize 8bit`` is LLM.int8. The optimizer is bitsandbytes'
paged 8-bit AdamW on a GPU (optimizer state pages to CPU memory under pressure) and its plain 8-bit AdamW on CPU,
where paging does not exist.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from melora.lab.args import UserError

QUANTIZE = ("4bit", "8bit")
INSTALL = "pip install 'melora[quant]'"


def training_device() -> str:
    """Where this process trains: its local GPU under torchrun / accelerate, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def check_bitsandbytes(kind: str, device: str) -> None:
    """Raise a UserError if bitsandbytes is missing or cannot quantize ``kind`` on ``device``.

    The check quantizes one small tensor on ``device``, so a build without a backend for it (an old
    bitsandbytes on CPU, a CUDA build that does not match the driver) fails here with its own message,
    before the model is loaded.
    """
    if kind not in QUANTIZE:
        raise UserError(f"quantize={kind!r}: choose one of {', '.join(QUANTIZE)}.")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise UserError(f"--quantize {kind} needs bitsandbytes, which is not installed: {INSTALL}.") from err
    probe = torch.randn(64, 64)
    try:
        if kind == "4bit":
            bnb.nn.Params4bit(probe, requires_grad=False, quant_type="nf4").to(device)
        else:
            bnb.nn.Int8Params(probe, requires_grad=False, has_fp16_weights=False).to(device)
    except Exception as err:  # any backend failure: report it as the user's environment problem
        raise UserError(
            f"--quantize {kind}: bitsandbytes {bnb.__version__} cannot quantize on {device} "
            f"({type(err).__name__}: {err}). Install a bitsandbytes with a backend for this device "
            f"(>= 0.49 has a CPU backend: {INSTALL}), or train without --quantize."
        ) from err


def bnb_config(kind: str) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``kind``: QLoRA's NF4 + double quantisation + bf16, or int8."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def optimizer_name(device: str) -> str:
    """The HF ``optim`` for a quantized run: paged 8-bit AdamW on a GPU, 8-bit AdamW on CPU (no paging)."""
    return "paged_adamw_8bit" if device.startswith("cuda") else "adamw_bnb_8bit"
