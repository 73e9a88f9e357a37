"""PEFT integration of MELoRA: config, layer, tuner, and registration with PEFT's method tables."""

from __future__ import annotations

from melora.tuner.config import PEFT_TYPE, MELoRAConfig
from melora.tuner.layer import Linear, MELoRALayer
from melora.tuner.model import MELoRAModel

__all__ = ["PEFT_TYPE", "Linear", "MELoRAConfig", "MELoRALayer", "MELoRAModel", "register"]

# The PEFT versions this registration was written and tested against (see pyproject.toml).
TESTED_PEFT_VERSIONS = ">=0.21,<0.22"


def register() -> None:
    """Make "MELORA" a PEFT method without touching PEFT's PeftType enum.

    PEFT's ``register_peft_method`` only accepts names already in its enum, but every PEFT code path
    (get_peft_model, PeftConfig/PeftModel.from_pretrained, AutoPeftModel*, transformers' load_adapter)
    looks the method up by the string stored in adapter_config.json. Filling PEFT's mapping dicts under
    the key "MELORA" is therefore enough. Idempotent.
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MELoRAConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MELoRAModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = MELoRAModel.prefix


register()  # importing the PEFT integration makes "MELORA" a PEFT method
