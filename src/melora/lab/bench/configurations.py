"""Build each benchmark configuration as a :class:`Workload`: a model with its adapter, inputs, and the
three closures the harness times (training step, forward, merged forward).

Conventions, the same for every configuration so that differences are the adapter alone:
- only adapter weights train (no classifier head); the base is frozen;
- the input of the adapted stack requires grad (layer level: the layer input; end to end: the embedding
  output), so every backward runs down to the input — the frozen base's own cost, the floor;
- a training step is zero_grad + forward + backward + AdamW step (no optimizer for the frozen base).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from melora.lab.bench.config import Experiment, LayerShape, MethodSpec, ModelCase
from melora.lab.bench.kernels import kernel_workload
from melora.lab.bench.loop_baseline import apply_loop_baseline, loop_layers
from melora.lab.bench.workload import Workload, compiled


class SingleLinear(nn.Module):
    """The layer-level model: one bias-free ``proj`` Linear d -> d_out (adapter target ``proj``)."""

    def __init__(self, d: int, d_out: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d if d_out is None else d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def attach_adapter(
    model: nn.Module, spec: MethodSpec, target_modules: list[str] | tuple[str, ...], alpha: float
) -> nn.Module:
    """Freeze ``model`` and add the adapter of ``spec`` (PEFT for melora/lora/gralora; in place for loop)."""
    model.requires_grad_(False)
    targets = list(target_modules)
    if spec.name == "base":
        return model
    if spec.name == "loop":
        return apply_loop_baseline(model, targets, r=spec.r, n=spec.n, alpha=alpha)
    import peft

    import melora  # noqa: F401  (registers MELORA with PEFT)
    from melora.lab.args import AdapterArgs

    if spec.name in ("melora", "lora"):  # the runners' schema builds the config, as for GLUE / instruct
        n = spec.n if spec.name == "melora" else None
        adapter = AdapterArgs(spec.name, r=spec.r, n=n, alpha=alpha, dropout=0.0, target_modules=targets)
        config = adapter.peft_config()
    else:
        config = peft.GraloraConfig(r=spec.r, gralora_k=spec.k, alpha=alpha, target_modules=targets)
    return peft.get_peft_model(model, config)


def _merge_functions(model: nn.Module, spec: MethodSpec) -> tuple[Callable[[], None], Callable[[], None]]:
    if spec.name == "base":
        return (lambda: None), (lambda: None)
    if spec.name == "loop":
        layers = loop_layers(model)
        return (lambda: [m.merge() for m in layers]), (lambda: [m.unmerge() for m in layers])
    return model.merge_adapter, model.unmerge_adapter


def _make_workload(
    spec: MethodSpec, model: nn.Module, loss_fn: Callable[[], torch.Tensor], forward_fn: Callable[[], object]
) -> Workload:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def train_step() -> None:
        model.train()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        if optimizer is not None:
            optimizer.step()

    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            forward_fn()

    merge, unmerge = _merge_functions(model, spec)
    return Workload(spec, model, train_step, forward, merge, unmerge, sum(p.numel() for p in params))


def layer_workload(
    experiment: Experiment, shape: LayerShape, spec: MethodSpec, device: torch.device
) -> Workload:
    """MELoRA/LoRA/... on one ``proj`` Linear (d -> d_out); input x (T, d) requires grad, output grad is
    fixed."""
    dtype = getattr(torch, experiment.dtype)
    generator = torch.Generator().manual_seed(experiment.seed)
    base = SingleLinear(shape.d, shape.out_features)
    with torch.no_grad():
        base.proj.weight.normal_(0.0, shape.d**-0.5, generator=generator)
    model = attach_adapter(base.to(device=device, dtype=dtype), spec, ["proj"], experiment.alpha)
    x = torch.randn(shape.tokens, shape.d, generator=generator).to(device=device, dtype=dtype)  # (T, d)
    grad_out = torch.randn(shape.tokens, shape.out_features, generator=generator).to(
        device=device, dtype=dtype
    )
    x.requires_grad_(True)
    call = compiled(model) if spec.compiled else model

    def loss() -> torch.Tensor:
        x.grad = None
        return (call(x) * grad_out).sum()  # d loss / d y = grad_out

    return _make_workload(spec, model, loss, lambda: call(x))


SMOLLM2_135M = {  # SmolLM2-135M's architecture (its GGUF's config), for random-weight benchmarks
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


RANDOM_MODELS = ("tiny-bert", "tiny-llama", "smollm2-random")


def random_model(name: str, layers: int | None = None) -> nn.Module:
    """A random-weight model, no download: tiny BERT / Llama (hidden 64, 2 layers) for tests and smoke
    runs, or ``smollm2-random`` (SmolLM2-135M's shapes; ``layers`` of its 30 if given) for benchmarks
    where its package is absent (GPU machines)."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"model {name!r}: the random models are {', '.join(RANDOM_MODELS)}.")
    torch.manual_seed(0)
    if name == "smollm2-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers or 30}))
    if name == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        return BertForSequenceClassification(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    return LlamaForCausalLM(config)


def load_base_model(case: ModelCase, experiment: Experiment, device: torch.device) -> nn.Module:
    """The frozen base model of ``case`` on ``device`` in the experiment's dtype."""
    dtype = getattr(torch, experiment.dtype)
    if case.model.startswith("tiny-") or case.model.endswith("-random"):
        model = random_model(case.model, case.layers)
    elif case.task == "seq_cls":
        from melora.lab.models import load_sequence_classifier

        model, _ = load_sequence_classifier(case.model, num_labels=2)
    else:
        from melora.lab.models import load_causal_lm

        model, _ = load_causal_lm(case.model)
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def model_workload(
    experiment: Experiment, case: ModelCase, spec: MethodSpec, base: nn.Module, device: torch.device
) -> Workload:
    """``spec`` on a copy of ``base``, fed random token ids (batch x seq_len) with labels."""
    model = copy.deepcopy(base)
    model.enable_input_require_grads()  # backward runs to the embedding output for every configuration
    model = attach_adapter(model, spec, case.target_modules, experiment.alpha)
    generator = torch.Generator().manual_seed(experiment.seed)
    vocab = base.config.vocab_size
    input_ids = torch.randint(0, vocab, (case.batch, case.seq_len), generator=generator).to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if case.task == "seq_cls":
        labels = torch.randint(0, 2, (case.batch,), generator=generator).to(device)
    else:
        labels = input_ids
    call = compiled(model) if spec.compiled else model

    return _make_workload(spec, model, lambda: call(**inputs, labels=labels).loss, lambda: call(**inputs))


class WorkloadFactory:
    """Builds workloads of one case, loading (and caching) the base model once for the e2e level."""

    def __init__(self, experiment: Experiment, device: torch.device) -> None:
        self.experiment = experiment
        self.device = device
        self._base: tuple[str, nn.Module] | None = None

    def __call__(self, case: LayerShape | ModelCase, spec: MethodSpec) -> Workload:
        if self.experiment.level == "kernel":
            return kernel_workload(self.experiment, case, spec, self.device)
        if isinstance(case, LayerShape):
            return layer_workload(self.experiment, case, spec, self.device)
        if self._base is None or self._base[0] != case.model:
            self._base = (case.model, load_base_model(case, self.experiment, self.device))
        return model_workload(self.experiment, case, spec, self._base[1], self.device)

    def release(self) -> None:
        self._base = None
