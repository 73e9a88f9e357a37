"""MELoRA: Mini-Ensemble Low-Rank Adapters (Ren et al., ACL 2024) as a PEFT method.

``import melora`` registers the "MELORA" method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work with it.
"""

from __future__ import annotations

from melora.accounting import adapter_summary, format_summary
from melora.export import export_lora
from melora.io import save_adapter
from melora.tuner import MELoRAConfig, MELoRALayer, MELoRAModel, register

register()

__version__ = "0.1.0"
__all__ = [
    "MELoRAConfig",
    "MELoRALayer",
    "MELoRAModel",
    "adapter_summary",
    "export_lora",
    "format_summary",
    "save_adapter",
]
