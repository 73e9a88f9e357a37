"""The MELoRA adapter layer: parameters, init, merge/unmerge and forward (math in melora.functional).

Quantized base layers (bitsandbytes 4-bit / 8-bit, torchao, HQQ) go through PEFT's generic quantization backend
(``peft.utils.resolve_quantization_backend``): the forward calls the quantized kernel, and merge/unmerge read the
base weight dequantized, add dW in float32 and requantise it (``BaseTunerLayer.get_base_weight`` /
``set_base_weight``), the way PEFT's MiSS does.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend, QuantizationBackend
from torch import nn
from transformers.pytorch_utils import Conv1D

from melora.errors import UserError
from melora.functional import init_melora_factors, melora_delta_weight, melora_forward
from melora.tuner.config import MELoRAConfig

BASE_ADAPTER_NAME = "__base__"


def quantization_backend(
    base_layer: nn.Module, get_apply_tensor_subclass: Any = None
) -> QuantizationBackend | None:
    """PEFT's quantization backend of ``base_layer`` (None for a plain layer).

    A torchao layer quantized by ``torchao.quantize_`` outside transformers carries no record of its config, so it
    could not be requantised after a merge: it gets a forward-only backend and merging it raises.
    """
    try:
        return resolve_quantization_backend(base_layer, get_apply_tensor_subclass=get_apply_tensor_subclass)
    except ValueError:  # torchao weight without its quantization config
        return ForwardOnlyQuantizationBackend("torchao (quantized outside transformers)")


def keep_bnb_4bit_layout(base_layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight in place on CPUs with AVX512-BF16; undo a repacking.

    On such CPUs ``Linear4bit.forward`` in eval mode without grad rewrites ``weight.data`` and its quant
    state into a CPU-only packed layout (bf16 compute; the round trip back is lossy). PEFT's dequantise /
    requantise, which merge, unmerge and export read, expects the standard layout, and training after
    such an evaluation did not move the loss (bitsandbytes 0.50.2). Under MELoRA every 4-bit layer of
    the model keeps the standard layout on every CPU: the same numbers on every machine, at the cost
    of bnb's packed CPU inference kernel.
    """
    weight = getattr(base_layer, "weight", None)
    if not hasattr(base_layer, "support_avx512bf16_for_cpu") or weight is None:
        return
    base_layer.support_avx512bf16_for_cpu = False
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def _features(base_layer: nn.Module, module_name: str) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a transformers Conv1D or a quantized linear layer."""
    if isinstance(base_layer, nn.Linear):  # also bitsandbytes' Linear4bit / Linear8bitLt and torchao's
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        weight = base_layer.weight
        in_features, out_features = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        return in_features, out_features
    backend = quantization_backend(base_layer)
    if backend is not None and backend.layer_type == "linear" and hasattr(base_layer, "in_features"):
        return base_layer.in_features, base_layer.out_features  # e.g. HQQLinear
    raise unsupported_module_error(module_name, base_layer)


def unsupported_module_error(module_name: str, base_layer: nn.Module) -> TypeError:
    """The error for a targeted module that MELoRA cannot wrap, naming it, its type and the fix."""
    return TypeError(
        f"MELoRA cannot adapt {module_name or 'this module'} of type {type(base_layer).__name__}: only "
        "torch.nn.Linear, transformers' Conv1D and their quantized versions (bitsandbytes, torchao, HQQ) are "
        "supported. Remove it from target_modules."
    )


def check_n_divides(
    module_name: str,
    n: int,
    in_features: int,
    out_features: int,
    peers: list[tuple[int, int]] | None = None,
    pattern_key: str | None = None,
) -> None:
    """Raise if ``n`` does not divide ``in_features`` and ``out_features``, suggesting an n that fits.

    ``peers``: (in_features, out_features) of every targeted module taking its n from the same place (the
    n_pattern key ``pattern_key``, or the default n when it is None); the suggested n divides them all. Without
    peers (a layer built on its own) the suggestion divides this module's features.
    """
    if not in_features % n and not out_features % n:
        return
    what, size = ("in_features", in_features) if in_features % n else ("out_features", out_features)
    common = math.gcd(*(d for dims in (peers or [(in_features, out_features)]) for d in dims))
    choices = ", ".join(str(d) for d in range(1, min(common, 64) + 1) if not common % d)
    own = math.gcd(in_features, out_features)
    fitting = max(d for d in range(1, min(own, n) + 1) if not own % d)
    short = module_name.rsplit(".", 1)[-1]
    if peers is None:
        use = f"use n in {{{choices}}} (divisors of its in_features and out_features)"
    elif pattern_key is None:
        use = f"use n in {{{choices}}} (divisors common to all targeted modules)"
    else:
        use = f'use n_pattern["{pattern_key}"] in {{{choices}}} (divisors common to the modules that key matches)'
    raise ValueError(
        f"n={n} does not divide {what}={size} of {module_name} (in_features={in_features}, "
        f'out_features={out_features}); {use} or n_pattern={{"{short}": {fitting}}}, '
        "or exclude this module (exclude_modules / target_modules)."
    )


def check_rank_fits(module_name: str, r: int, n: int, in_features: int, out_features: int) -> None:
    """Raise if a mini LoRA of rank ``r`` is larger than its block (in_features / n x out_features / n).

    ``B_i A_i`` has rank at most min(in_features / n, out_features / n): a larger r only adds parameters that
    cannot change the update, and an absurd r (10**9 in an edited adapter_config.json) would allocate
    hundreds of GB for ``melora_A`` / ``melora_B``. Checked before anything is allocated.
    """
    block_in, block_out = in_features // n, out_features // n
    limit = min(block_in, block_out)
    if r <= limit:
        return
    short = module_name.rsplit(".", 1)[-1]
    raise UserError(
        f"r={r} is too large for {module_name}: its n={n} mini LoRAs have blocks of in_features/n={block_in} x "
        f"out_features/n={block_out} (in_features={in_features}, out_features={out_features}), so a mini "
        f'LoRA\'s rank can be at most {limit}. Use r <= {limit} (or r_pattern={{"{short}": {limit}}} for '
        "this module), or a smaller n; in a saved adapter, fix r in its adapter_config.json."
    )


def _device_and_dtype(base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the base weights and the dtype for new adapter weights (float32 over integer storage)."""
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        weight = base_layer.W_q  # HQQLinear keeps its packed weight in W_q
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return weight.device, dtype


class MELoRALayer(BaseTunerLayer):
    """Per-adapter state of a MELoRA-wrapped layer.

    For adapter ``a``: ``melora_A[a]`` (n, r, in_features // n), ``melora_B[a]`` (n, out_features // n, r),
    ``scaling[a] = alpha / r``. The layer keeps the real ``in_features`` / ``out_features``.
    ``quantization_backend`` is PEFT's backend for a quantized base layer, or None.
    """

    # "melora_B" contains "lora_B" on purpose: PEFT's LoRA+ (peft.optimizers.create_loraplus_optimizer) has no
    # per-method hook and puts every trainable parameter whose name contains "lora_B" into its lr * ratio group,
    # so the B factors get the LoRA+ learning rate and the A factors the base one. Keep the names (tested in
    # tests/test_peft_utilities.py).
    adapter_layer_names = ("melora_A", "melora_B")
    other_param_names = ("r", "n", "alpha", "scaling", "melora_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        module_name: str = "",
        get_apply_tensor_subclass: Any = None,
        **kwargs: Any,
    ) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        keep_bnb_4bit_layout(self.get_base_layer())
        # torchao needs get_apply_tensor_subclass (from transformers' TorchAoConfig) to requantise after a merge
        self.quantization_backend = quantization_backend(self.get_base_layer(), get_apply_tensor_subclass)
        self.r: dict[str, int] = {}
        self.n: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.melora_dropout = nn.ModuleDict({})
        self.melora_A = nn.ParameterDict({})
        self.melora_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _features(self.get_base_layer(), module_name)
        self.kwargs = kwargs

    def update_layer(
        self, adapter_name: str, r: int, n: int, alpha: float, dropout: float, init_weights: bool = True
    ) -> None:
        """Create (or replace) adapter ``adapter_name`` on this layer."""
        name = self.module_name or type(self.get_base_layer()).__name__
        problems = MELoRAConfig.hyperparameter_problems(r=r, n=n, alpha=alpha, dropout=dropout)
        if problems:
            raise UserError(f"Invalid MELoRA layer {name}: " + " ".join(problems))
        check_n_divides(name, n, self.in_features, self.out_features)  # a layer built without MELoRAModel
        check_rank_fits(name, r, n, self.in_features, self.out_features)  # before any allocation
        self.r[adapter_name] = r
        self.n[adapter_name] = n
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.melora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        device, dtype = _device_and_dtype(self.get_base_layer())
        A = torch.empty(n, r, self.in_features // n, dtype=dtype, device=device)
        B = torch.empty(n, self.out_features // n, r, dtype=dtype, device=device)
        init_melora_factors(A, B, zero_B=init_weights)
        self.melora_A[adapter_name] = nn.Parameter(A)
        self.melora_B[adapter_name] = nn.Parameter(B)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)


class Linear(nn.Module, MELoRALayer):
    """MELoRA around a ``torch.nn.Linear``, transformers ``Conv1D`` (``fan_in_fan_out=True``) or a quantized Linear.

    ``y = base(x) + (alpha / r) * concat_i(B_i A_i dropout(x)_i)`` for input x of shape (..., in_features);
    equivalently ``y = x @ (W + dW).T + bias`` with ``dW = (alpha / r) * blockdiag(B_1 A_1, ..., B_n A_n)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        module_name: str = "",
        r: int = 1,
        n: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        MELoRALayer.__init__(self, base_layer, module_name=module_name, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r=r, n=n, alpha=alpha, dropout=dropout, init_weights=init_weights)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """dW of ``adapter`` in float32, laid out like the base weight: (out, in), or (in, out) for Conv1D."""
        A = self.melora_A[adapter].float()  # (n, r, k)
        B = self.melora_B[adapter].float()  # (n, o, r)
        delta = melora_delta_weight(A, B, self.scaling[adapter])  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _check_mergeable(self, action: str) -> None:
        """Raise before touching any weight if the quantized base layer cannot be dequantised and requantised."""
        backend = self.quantization_backend
        if backend is None or backend.supports_merge:
            return
        raise TypeError(
            f"Cannot {action} MELoRA into {self.module_name or type(self.get_base_layer()).__name__}: its base "
            f"layer is quantized with {backend.backend_name}, which cannot requantise a merged weight. Keep the "
            "adapter unmerged (it works as is), export it with melora.export_lora and merge into an "
            "unquantized copy of the base model, or load the base through transformers' quantization_config "
            "(e.g. TorchAoConfig) so that PEFT knows how to requantise it."
        )

    def _warn_rounding(self, action: str) -> None:
        if self.quantization_backend is not None:  # one warning per backend, not one per layer
            warnings.warn(
                f"{action} MELoRA into {self.quantization_backend.backend_name} layers requantises their weights: "
                "outputs differ from the unmerged model by the rounding error of one more quantisation.",
                UserWarning,
                stacklevel=3,
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' dW to the base weight in fp32, then cast back.

        A quantized base weight is dequantised first and requantised after (so it carries the rounding error of
        one more quantisation); a backend that cannot requantise raises before anything changes.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._check_mergeable("merge")
        self._warn_rounding("Merging")
        for adapter in adapter_names:
            if adapter not in self.melora_A:
                continue
            weight = self.get_base_weight()  # (out, in) or (in, out); dequantised if quantized
            merged = weight.float() + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Safe merge of adapter {adapter!r} into {self.module_name} would give NaN/Inf weights; the "
                    "adapter is broken (check its training for divergence). Nothing was merged into this layer."
                )
            self.set_base_weight(merged.to(weight.dtype))  # requantised if quantized
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's dW from the base weight (fp32 arithmetic; requantised if quantized)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._check_mergeable("unmerge")
        self._warn_rounding("Unmerging")
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.melora_A:
                weight = self.get_base_weight()
                restored = weight.float() - self.get_delta_weight(adapter)
                self.set_base_weight(restored.to(weight.dtype))

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:  # bnb 4-bit: backprop needs a copy of the kernel's output
            result = self.quantization_backend.maybe_clone_base_result(result)
        return result

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) contribution of one adapter, in the adapter's dtype."""
        A = self.melora_A[adapter]
        x = self.melora_dropout[adapter](x.to(A.dtype))
        return melora_forward(x, A, self.melora_B[adapter], self.scaling[adapter])

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Row b of the batch uses adapter ``adapter_names[b]`` ("__base__" = no adapter)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(  # PEFT's LoRA sentence verbatim, then the detail
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0]} respectively. {self.module_name}: got "
                f"{len(adapter_names)} adapter_names for a batch of {x.shape[0]} rows; pass one name per row."
            )
        result = self._base_forward(x, *args, **kwargs)
        for adapter in set(adapter_names):
            if adapter == BASE_ADAPTER_NAME or adapter not in self.melora_A:
                continue
            rows = torch.tensor([i for i, a in enumerate(adapter_names) if a == adapter], device=x.device)
            update = self._adapter_output(x[rows], adapter)
            result[rows] = result[rows] + update.to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError(
                    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                    f"first. {self.module_name}: unmerge the adapters {self.merged_adapters} before a "
                    "mixed-adapter batch."
                )
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self._base_forward(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.melora_A:
                result = result + self._adapter_output(x, adapter).to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: dW is additive, so PEFT's ``convert_to_lora`` / ``save_as_lora`` accept MELoRA layers.

        PEFT factorises ``get_delta_weight`` by SVD at the rank it is given (it has no hook for a layer's own
        factors). dW has rank at most n*r, so any rank >= n*r reproduces the adapter up to float32 rounding;
        a smaller rank gives the best approximation of that rank. For factors that are exact by construction
        (``to_lora_factors``: lora_A = blockdiag(A_i), lora_B = blockdiag(B_i)) use ``melora.export_lora``.
        """
        return True

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)

    def __repr__(self) -> str:
        return "melora." + super().__repr__()
