"""Benchmark experiments as data: which configurations, at which shapes or models, measured how.

An experiment file (YAML) looks like::

    # melora bench benchmarks/layer.yaml
    name: layer
    level: layer                   # "layer": one adapted Linear; "e2e": a whole model
    shapes: {d: [768, 2048], tokens: [512, 2048]}   # layer level: grid of d_in = d_out and tokens
                                   # (add d_out: [...] for d_in -> d_out layers, e.g. 4096 -> 11008)
    models: [{model: minilm, batch: 16, seq_len: 128, target_modules: [query, value]}]  # e2e level
    melora: [{r: [1], n: [1, 2, 4, 8, 16, 32]}, {r: [8], n: [8]}]   # grids of MELoRA (r, n)
    baselines: [lora_same_params, lora_same_rank, gralora, loop, base]
    repeats: 5
    warmup: 1
    compile: false                 # true: every configuration also under torch.compile, in the same run

Every MELoRA (r, n) brings its baselines: LoRA(r) (same parameters), LoRA(n*r) (same rank), GraLoRA with
k = n (see :func:`gralora_for`), the per-block loop (same weights layout as the authors' code) and the
frozen base. Configurations shared by several pairs (LoRA(r), base) are measured once. With ``compile``
each configuration is measured twice in the same interleaved run, eager and ``torch.compile``d (label
suffix " +compile"), so compiled and eager ratios are paired like every other ratio.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

COMPILE_SUFFIX = " +compile"  # label suffix of a configuration measured under torch.compile
METHOD_NAMES = ("base", "melora", "lora", "gralora", "loop")
BASELINES = ("lora_same_params", "lora_same_rank", "gralora", "loop", "base")
LEVELS = ("layer", "e2e", "kernel")
KERNEL_VARIANTS = ("einsum", "bmm", "blockdiag", "bmm_blockdiag", "blockdiag_bmm", "current")
KNOWN_MODEL_TASKS = {
    "minilm": "seq_cls",
    "tiny-bert": "seq_cls",
    "smollm2": "causal_lm",
    "tiny-llama": "causal_lm",
    "smollm2-random": "causal_lm",
}


@dataclass(frozen=True)
class MethodSpec:
    """One configuration: ``name`` in METHOD_NAMES; ``r`` its rank (total rank for LoRA/GraLoRA); ``n``
    mini LoRAs (MELoRA, loop); ``k`` GraLoRA's grid size; ``impl`` a MELoRA forward variant (kernel level
    only, see :mod:`melora.lab.bench.kernels`); ``compiled``: the model runs under ``torch.compile``."""

    name: str
    r: int = 0
    n: int = 1
    k: int = 1
    impl: str = ""
    compiled: bool = False

    def __post_init__(self) -> None:
        if self.name not in METHOD_NAMES:
            raise ValueError(f"method {self.name!r}: choose one of {', '.join(METHOD_NAMES)}.")
        if self.name != "base" and (self.r < 1 or self.n < 1 or self.k < 1):
            raise ValueError(f"method {self.name}: r={self.r}, n={self.n}, k={self.k} must all be >= 1.")
        if self.impl and (self.name != "melora" or self.impl not in KERNEL_VARIANTS):
            raise ValueError(
                f"impl={self.impl!r}: only MELoRA has variants, among {', '.join(KERNEL_VARIANTS)}."
            )
        if self.name == "gralora" and self.r % self.k:
            raise ValueError(
                f"gralora r={self.r}, k={self.k}: GraLoRA's r is its total rank and must be a multiple of k."
            )

    @property
    def label(self) -> str:
        suffix = COMPILE_SUFFIX if self.compiled else ""
        if self.name == "base":
            return "base" + suffix
        if self.name in ("melora", "loop"):
            impl = f"[{self.impl}]" if self.impl else ""
            return f"{self.name}{impl} r={self.r} n={self.n}{suffix}"
        if self.name == "gralora":
            return f"gralora r={self.r} k={self.k}{suffix}"
        return f"lora r={self.r}{suffix}"

    @property
    def equivalent_rank(self) -> int | None:
        """Rank of the weight update: n*r (MELoRA, loop), r (LoRA, GraLoRA's r counts all blocks' ranks)."""
        if self.name == "base":
            return None
        return self.n * self.r if self.name in ("melora", "loop") else self.r


def gralora_for(r: int, n: int) -> MethodSpec:
    """GraLoRA with k = n and the parameter count closest to MELoRA(r, n) from above.

    GraLoRA(R, k) trains R * (d_in + d_out) parameters per layer (like LoRA(R)) and needs R % k == 0, while
    MELoRA(r, n) trains r * (d_in + d_out). With k = n the counts are equal when n divides r (R = r);
    otherwise the smallest allowed R is n * ceil(r / n), i.e. R = n when r < n: the cost of LoRA(n*r)
    for r = 1. Each of GraLoRA's k*k sub-blocks then has rank R / k.
    """
    rank = n * -(-r // n)
    return MethodSpec("gralora", r=rank, k=n)


@dataclass(frozen=True)
class LayerShape:
    """One Linear layer d -> d_out (default d_out = d) applied to ``tokens`` rows."""

    d: int
    tokens: int
    d_out: int | None = None

    @property
    def out_features(self) -> int:
        return self.d if self.d_out is None else self.d_out

    @property
    def label(self) -> str:
        if self.out_features == self.d:
            return f"layer d={self.d} T={self.tokens}"
        return f"layer {self.d}x{self.out_features} T={self.tokens}"


@dataclass(frozen=True)
class ModelCase:
    """A real (``minilm``, ``smollm2``, a hub id or folder) or random (``tiny-bert``, ``tiny-llama``;
    ``smollm2-random``: SmolLM2-135M's architecture with random weights, no download) model, run at ``batch`` x ``seq_len`` tokens with adapters on ``target_modules``. ``task`` is
    "seq_cls" or "causal_lm"; it may be omitted for the four names above."""

    model: str
    batch: int
    seq_len: int
    target_modules: tuple[str, ...]
    task: str | None = None
    layers: int | None = None  # random models only: keep the widths, use this many layers (smoke runs)

    def __post_init__(self) -> None:
        if self.task is None:
            object.__setattr__(self, "task", KNOWN_MODEL_TASKS.get(self.model.lower()))
        if self.task not in ("seq_cls", "causal_lm"):
            raise ValueError(
                f"model {self.model!r}: set task to 'seq_cls' or 'causal_lm' (known without it: "
                f"{', '.join(KNOWN_MODEL_TASKS)})."
            )

    @property
    def label(self) -> str:
        return f"{self.model} {self.batch}x{self.seq_len}"


@dataclass
class Experiment:
    """A benchmark run: configurations x cases, measured interleaved (see the module docstring)."""

    name: str
    level: str
    melora: list[tuple[int, int]]
    shapes: list[LayerShape] = field(default_factory=list)
    models: list[ModelCase] = field(default_factory=list)
    baselines: tuple[str, ...] = BASELINES
    variants: tuple[str, ...] = ()
    repeats: int = 5
    warmup: int = 1
    min_time_s: float = 0.05
    threads: int | None = None
    memory: bool = True
    alpha: float = 16.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.level not in LEVELS:
            problems.append(f"level={self.level!r}: choose 'layer', 'e2e' or 'kernel'.")
        if self.level in ("layer", "kernel") and not self.shapes:
            problems.append(f"level {self.level!r} needs shapes, e.g. shapes: {{d: [768], tokens: [512]}}.")
        if self.level == "kernel" and not self.variants:
            problems.append(f"level 'kernel' needs variants, among {', '.join(KERNEL_VARIANTS)}.")
        unknown_variants = sorted(set(self.variants) - set(KERNEL_VARIANTS))
        if unknown_variants:
            problems.append(f"variants {unknown_variants}: choose among {', '.join(KERNEL_VARIANTS)}.")
        if self.level == "e2e" and not self.models:
            problems.append(
                "level 'e2e' needs models, e.g. models: [{model: minilm, batch: 16, seq_len: 128}]."
            )
        if not self.melora:
            problems.append("melora: give at least one grid, e.g. melora: [{r: [1], n: [8]}].")
        for r, n in self.melora:
            if r < 1 or n < 1:
                problems.append(f"melora pair r={r}, n={n}: both must be >= 1.")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            problems.append(f"baselines {unknown}: choose among {', '.join(BASELINES)}.")
        if self.repeats < 1 or self.warmup < 0:
            problems.append(f"repeats={self.repeats} must be >= 1 and warmup={self.warmup} >= 0.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r}: choose float32, bfloat16 or float16.")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r}: choose auto, cpu or cuda.")
        if self.compile and self.level == "kernel":
            problems.append("compile: true is for the layer and e2e levels, not the kernel level.")
        if problems:
            raise ValueError(f"Invalid benchmark experiment {self.name!r}:\n  - " + "\n  - ".join(problems))

    def methods(self) -> list[MethodSpec]:
        """Every configuration to measure, deduplicated, in a stable order (base first)."""
        specs: list[MethodSpec] = []
        if self.level == "kernel":  # adapter path only: MELoRA variants against LoRA(r) and LoRA(n*r)
            for r, n in self.melora:
                specs += [MethodSpec("melora", r=r, n=n, impl=impl) for impl in self.variants]
                specs += [MethodSpec("lora", r=r), MethodSpec("lora", r=n * r)]
            return list(dict.fromkeys(specs))
        if "base" in self.baselines:
            specs.append(MethodSpec("base"))
        for r, n in self.melora:
            specs.append(MethodSpec("melora", r=r, n=n))
            if "lora_same_params" in self.baselines:
                specs.append(MethodSpec("lora", r=r))
            if "lora_same_rank" in self.baselines:
                specs.append(MethodSpec("lora", r=n * r))
            if "gralora" in self.baselines:
                specs.append(gralora_for(r, n))
            if "loop" in self.baselines:
                specs.append(MethodSpec("loop", r=r, n=n))
        specs = list(dict.fromkeys(specs))
        if self.compile:
            specs += [replace(spec, compiled=True) for spec in specs]
        return specs

    def cases(self) -> list[LayerShape] | list[ModelCase]:
        return self.models if self.level == "e2e" else self.shapes

    def quick(self) -> Experiment:
        """A smoke-test version: first case only, small sizes, 2 repeats, no calibration loops."""
        shapes = [
            replace(
                s,
                d=min(s.d, 256),
                d_out=None if s.d_out is None else min(s.d_out, 512),
                tokens=min(s.tokens, 128),
            )
            for s in self.shapes[:1]
        ]
        models = [
            replace(
                m,
                batch=min(m.batch, 2),
                seq_len=min(m.seq_len, 32),
                layers=2 if m.model.endswith("-random") else m.layers,
            )
            for m in self.models[:1]
        ]
        return replace(
            self,
            name=f"{self.name}-quick",
            shapes=shapes,
            models=models,
            repeats=min(self.repeats, 2),
            warmup=min(self.warmup, 1),
            min_time_s=0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _grid(value: Any, what: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what}: expected an integer or a list of integers, got {value!r}.")
    return values


def experiment_from_dict(data: dict[str, Any]) -> Experiment:
    """Build an :class:`Experiment` from a parsed YAML mapping (grids expanded)."""
    data = dict(data)
    pairs: list[tuple[int, int]] = []
    for grid in data.pop("melora", []):
        pairs += [
            (r, n) for r, n in itertools.product(_grid(grid["r"], "melora r"), _grid(grid["n"], "melora n"))
        ]
    shapes_spec = data.pop("shapes", None)
    shapes = []
    if shapes_spec:
        grids = shapes_spec if isinstance(shapes_spec, list) else [shapes_spec]
        for grid in grids:
            outs = _grid(grid["d_out"], "shapes d_out") if "d_out" in grid else [None]
            shapes += [
                LayerShape(d, t, d_out)
                for d, d_out, t in itertools.product(
                    _grid(grid["d"], "shapes d"), outs, _grid(grid["tokens"], "shapes tokens")
                )
            ]
    models = [
        ModelCase(
            model=m["model"],
            batch=int(m["batch"]),
            seq_len=int(m["seq_len"]),
            target_modules=tuple(m["target_modules"]),
            task=m.get("task"),
            layers=m.get("layers"),
        )
        for m in data.pop("models", [])
    ]
    for key in ("baselines", "variants"):
        if key in data:
            data[key] = tuple(data[key])
    known = set(Experiment.__dataclass_fields__) - {"melora", "shapes", "models"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown benchmark option(s) {unknown}; known options: {sorted(known)}.")
    return Experiment(melora=list(dict.fromkeys(pairs)), shapes=shapes, models=models, **data)
