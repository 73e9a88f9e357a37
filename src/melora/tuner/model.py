"""MELoRAModel: the PEFT tuner that finds target modules and wraps them with MELoRA layers."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from transformers.pytorch_utils import Conv1D

from melora.tuner.config import MELoRAConfig
from melora.tuner.layer import (
    BASE_ADAPTER_NAME,
    Linear,
    MELoRALayer,
    _features,
    check_n_divides,
    quantization_backend,
    unsupported_module_error,
)

# Same defaults as PEFT's LoRA: BERT/RoBERTa query,value; Llama/Mistral/Qwen/Gemma q_proj,v_proj; GPT-2 c_attn.
TRANSFORMERS_MODELS_TO_MELORA_TARGET_MODULES_MAPPING = dict(
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
)
TRANSFORMERS_MODELS_TO_MELORA_TARGET_MODULES_MAPPING.setdefault("smollm3", ["q_proj", "v_proj"])


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class MELoRAModel(BaseTuner):
    """Adds MELoRA adapters to a model (see :class:`melora.MELoRAConfig`). Build it with ``peft.get_peft_model``."""

    prefix: str = "melora_"
    tuner_layer_cls = MELoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_MELORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: MELoRAConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        n, r, alpha = config.resolve(current_key)
        self._check_n_divides(config, current_key, target, n)
        layer_kwargs = {
            "r": r,
            "n": n,
            "alpha": alpha,
            "dropout": config.dropout,
            "init_weights": config.init_weights,
        }
        if isinstance(target, Linear):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        # torchao: the callable that requantises a merged weight (from transformers' TorchAoConfig)
        layer_kwargs.update(get_quantization_kwargs(self))
        new_module = self._create_new_module(config, adapter_name, target, current_key, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained by default
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(
        self, parent: torch.nn.Module, child_name: str, new_module: torch.nn.Module, child: torch.nn.Module
    ) -> None:
        """Put ``new_module`` at ``parent.<child_name>``; adapter weights follow the device of the base weight.

        BaseTuner's version also copies ``child.weight`` / ``child.bias`` onto any module without a
        ``base_layer``. On unload that module is a ``modules_to_save`` copy, so the trained copy would get the
        original weights back, and a module without ``.weight`` (e.g. BertPooler) raises AttributeError.
        PEFT's LoRA overrides it the same way: only move the adapter's own sub-modules.
        """
        setattr(parent, child_name, new_module)
        if not isinstance(new_module, MELoRALayer):
            return
        base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        weight = getattr(base, "weight", None)
        if weight is None or weight.device.type == "meta":
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(weight.device)

    def _targeted_features(self, config: MELoRAConfig) -> dict[str, tuple[int, int]]:
        """module name -> (in_features, out_features) for every module of the model that ``config`` targets."""
        features = {}
        for key, module in self.model.named_modules():
            if not key or not self._check_target_module_exists(config, key):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            try:
                features[key] = _features(base, key)
            except TypeError:
                continue  # not adaptable; _create_new_module names it
        return features

    def _check_n_divides(self, config: MELoRAConfig, key: str, target: torch.nn.Module, n: int) -> None:
        """Raise if ``n`` does not divide the module's features, suggesting an n or an n_pattern that fits."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        try:
            in_features, out_features = _features(base, key)
        except TypeError:
            return  # _create_new_module raises the type error
        if not in_features % n and not out_features % n:
            return
        # the modules that take their n from the same place (the same n_pattern key, or the default n)
        source = config.pattern_key("n_pattern", key)
        peers = [
            dims
            for name, dims in self._targeted_features(config).items()
            if config.pattern_key("n_pattern", name) == source
        ] or [(in_features, out_features)]
        check_n_divides(key, n, in_features, out_features, peers=peers, pattern_key=source)

    def inject_adapter(self, model: torch.nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        from melora.tuner.layer import keep_bnb_4bit_layout

        for module in model.modules():  # every bnb 4-bit layer, targeted or not (see keep_bnb_4bit_layout)
            keep_bnb_4bit_layout(module)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._warn_unmatched_patterns(model, adapter_name)

    def _warn_unmatched_patterns(self, model: torch.nn.Module, adapter_name: str) -> None:
        """Warn about n/r/alpha pattern keys that matched no module of this adapter (as PEFT does for LoRA)."""
        config = self.peft_config.get(adapter_name)
        if not isinstance(config, MELoRAConfig):
            return
        adapted = [
            name
            for name, module in model.named_modules()
            if isinstance(module, MELoRALayer) and adapter_name in module.melora_A
        ]
        for field_name in ("n_pattern", "r_pattern", "alpha_pattern"):
            pattern = getattr(config, field_name) or {}
            unmatched = sorted(
                key for key in pattern if not any(get_pattern_key([key], name) == key for name in adapted)
            )
            if unmatched:
                warnings.warn(
                    f"{field_name} keys {unmatched} match no module adapted by {adapter_name!r} and are ignored.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    @staticmethod
    def _create_new_module(
        config: MELoRAConfig, adapter_name: str, target: torch.nn.Module, module_name: str, **kwargs: Any
    ) -> Linear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        backend = quantization_backend(base)
        if isinstance(base, torch.nn.Linear) or (backend is not None and backend.layer_type == "linear"):
            if config.fan_in_fan_out:
                warnings.warn(
                    f"{module_name} is a linear layer ({type(base).__name__}): setting fan_in_fan_out=False.",
                    stacklevel=2,
                )
                config.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            if not config.fan_in_fan_out:
                warnings.warn(f"{module_name} is Conv1D: setting fan_in_fan_out=True.", stacklevel=2)
                config.fan_in_fan_out = True
        else:
            raise unsupported_module_error(module_name, base)
        return Linear(
            target, adapter_name, module_name=module_name, fan_in_fan_out=config.fan_in_fan_out, **kwargs
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check every MELoRA tensor's shape against the model before PEFT loads it."""
        state_dict = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        params = dict(model.named_parameters())
        for key, tensor in state_dict.items():
            if ".melora_" not in key:
                continue
            target = params.get(key)
            if target is None:
                target = params.get(key.removeprefix("base_model.model."))
            if target is not None and tuple(target.shape) != tuple(tensor.shape):
                module = key.rsplit(".melora_", 1)[0].removeprefix("base_model.model.")
                n, r, _ = config.resolve(module)
                raise ValueError(
                    f"Adapter tensor {key} has shape {tuple(tensor.shape)} but module {module} of this base model "
                    f"needs {tuple(target.shape)} (n={n}, r={r}). The adapter was trained on a "
                    "different base model: load it onto the model named in its adapter_config.json "
                    f"({config.base_model_name_or_path!r})."
                )
        return state_dict

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``adapter_names=[...]`` (one per batch row; "__base__" = none) to every MELoRA layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode. Mixed-adapter batches are for "
                "inference: call model.eval() first."
            )
        known = set()
        for layer in self.modules():
            if isinstance(layer, MELoRALayer):
                known |= set(layer.melora_A.keys())
        unknown = {name for name in adapter_names if name != BASE_ADAPTER_NAME} - known
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}; "
                f"known adapters: {', '.join(sorted(known))} (or '{BASE_ADAPTER_NAME}')."
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate() repeats each row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, (MELoRALayer, AuxiliaryTrainingWrapper)):  # heads in modules_to_save too
                hook = partial(_inject_adapter_names, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
