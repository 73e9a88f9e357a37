"""A study file: tasks x methods x seeds x learning-rate grid x budget, as one typed object.

    # melora study configs/studies/example.yaml
    name: example                 # results go to results/<name>/ unless output_dir says otherwise
    runner: glue                  # glue or instruct
    workers: 2                    # runs in parallel (processes)
    threads_per_worker: 1         # torch threads of each
    base: {model: minilm, data_dir: ../shared/data/glue, batch_size: 32}   # flags every run shares
    tasks:                        # task -> its budget (any runner flag), overriding base
      stsb: {epochs: 3}
      rte: {epochs: 10, max_train_samples: 1000}
    methods:                      # adapter flags; optional per method: seeds, tasks, lr (a fixed grid)
      - {method: lora, r: 8}
      - {method: melora, r: 1, n: 8}
      - {method: melora, r: 1, n: 1, tasks: [stsb], seeds: [0]}
    seeds: [0, 1, 2]
    lr_grid: {melora: [1.0e-3, 3.0e-3, 1.0e-2], lora: [3.0e-4, 1.0e-3, 3.0e-3], full: [3.0e-5, 1.0e-4]}
    tune: {seed: 0, extend: 2, factor: 3}   # an edge optimum adds a point beyond it, up to `extend` per side
    select: primary               # glue: each task's primary metric; or a summary key (instruct/heldout_loss)
    compare: [[melora-r1-n8, lora-r8]]      # paired per-seed comparisons (slugs), first minus second
    eval: {tasks: [mmlu, bbh], limit: {mmlu: 2}, data_dir: ../shared/data/eval, base: true}   # instruct only;
                                  # base: the untuned model is evaluated too (<root>/instruct/base/eval)

Instruct studies use the task name ``instruct`` (one task; its budget under ``tasks: {instruct: {...}}``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora.args import AdapterArgs, UserError, suggest

RUNNERS = ("glue", "instruct")
# Summary keys where lower is better (everything else: higher is better).
LOWER_IS_BETTER = ("loss",)


@dataclass
class MethodEntry:
    """One method row of a study: its adapter options plus where and how it runs."""

    adapter: AdapterArgs
    seeds: list[int] | None = None
    tasks: list[str] | None = None
    lr: list[float] | None = None

    @property
    def slug(self) -> str:
        return self.adapter.slug

    @property
    def label(self) -> str:
        return self.adapter.label


@dataclass
class Tune:
    """The learning-rate search: run the grid at ``seed``; extend an edge optimum by ``factor``."""

    seed: int = 0
    extend: int = 2
    factor: float = 3.0


@dataclass
class EvalSpec:
    """Evaluations run on every chosen instruct run (``melora eval`` flags)."""

    tasks: list[str] = field(default_factory=lambda: ["mmlu", "bbh"])
    limit: Any = None
    data_dir: str | None = None
    batch_size: int = 4
    allow_code_execution: bool = False
    extra: list[str] = field(default_factory=list)
    base: bool = False  # also evaluate the untuned model once: the reference every tuned run should beat


@dataclass
class StudySpec:
    """A parsed, checked study file."""

    name: str
    runner: str
    tasks: dict[str, dict[str, Any]]
    methods: list[MethodEntry]
    seeds: list[int]
    lr_grid: dict[str, list[float]]
    base: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    workers: int = 1
    threads_per_worker: int = 1
    tune: Tune = field(default_factory=Tune)
    select: str = "primary"
    compare: list[list[str]] = field(default_factory=list)
    eval: EvalSpec | None = None
    source: str = "study"

    @property
    def root(self) -> Path:
        return Path(self.output_dir or Path("results") / self.name)

    def method(self, slug: str) -> MethodEntry:
        for entry in self.methods:
            if entry.slug == slug:
                return entry
        raise UserError(
            f"{self.source}: no method with slug {slug!r}; have {[m.slug for m in self.methods]}."
        )

    def seeds_for(self, entry: MethodEntry) -> list[int]:
        return list(entry.seeds if entry.seeds is not None else self.seeds)

    def tasks_for(self, entry: MethodEntry) -> list[str]:
        return [t for t in self.tasks if entry.tasks is None or t in entry.tasks]

    def grid_for(self, entry: MethodEntry) -> list[float]:
        if entry.lr is not None:
            return sorted(entry.lr)
        for key in (entry.slug, entry.adapter.method):
            if key in self.lr_grid:
                return sorted(self.lr_grid[key])
        raise UserError(
            f"{self.source}: no learning rates for {entry.slug}: add lr_grid.{entry.adapter.method} or lr on the method."
        )

    def metric_for(self, task: str) -> str:
        """The summary key that selects the learning rate and is compared (``task/metric_best``)."""
        if self.select != "primary":
            return self.select
        if self.runner == "glue":
            from melora.finetune.glue import primary_key

            return f"{task}/{primary_key(task)}_best"
        return "instruct/heldout_loss"

    def lower_is_better(self, metric: str) -> bool:
        return any(word in metric.split("/")[-1] for word in LOWER_IS_BETTER)


_TOP_KEYS = {f.name for f in dataclasses.fields(StudySpec)} - {"source"}
_METHOD_KEYS = {"seeds", "tasks", "lr"}


def _positive_floats(value: Any, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"{where}: expected a non-empty list of learning rates, got {value!r}.")
    out = []
    for item in value:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {item!r} is not a number.") from None
        if not number > 0:
            raise UserError(f"{where}: learning rates must be > 0, got {item!r}.")
        out.append(number)
    return out


def parse_study(data: dict[str, Any], source: str = "study") -> StudySpec:
    """A StudySpec from the YAML mapping; every unknown key or bad value is a one-line UserError."""
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for key in data:
        if key not in _TOP_KEYS:
            raise UserError(f"{source}: unknown key {key!r}{suggest(key, sorted(_TOP_KEYS))}.")
    for key in ("name", "runner", "tasks", "methods"):
        if key not in data:
            raise UserError(f"{source}: missing key {key!r}.")
    if data["runner"] not in RUNNERS:
        raise UserError(f"{source}: runner={data['runner']!r}; choose one of {', '.join(RUNNERS)}.")
    tasks = data["tasks"]
    if isinstance(tasks, list):
        tasks = {t: {} for t in tasks}
    if not isinstance(tasks, dict) or not tasks:
        raise UserError(f"{source}: tasks must be a non-empty mapping of task: budget.")
    tasks = {str(t): dict(b or {}) for t, b in tasks.items()}
    methods = []
    for i, raw in enumerate(data["methods"] or []):
        if not isinstance(raw, dict):
            raise UserError(f"{source}: methods[{i}] must be a mapping, got {raw!r}.")
        adapter_keys = {k: v for k, v in raw.items() if k not in _METHOD_KEYS}
        known = [f.name for f in dataclasses.fields(AdapterArgs)]
        for key in adapter_keys:
            if key not in known:
                raise UserError(
                    f"{source}: methods[{i}]: unknown key {key!r}{suggest(key, known + sorted(_METHOD_KEYS))}."
                )
        try:
            adapter = AdapterArgs(**adapter_keys)
        except (TypeError, ValueError) as err:
            raise UserError(f"{source}: methods[{i}]: {err}") from err
        lr = _positive_floats(raw["lr"], f"{source}: methods[{i}].lr") if "lr" in raw else None
        unknown_tasks = sorted(set(raw.get("tasks") or []) - set(tasks))
        if unknown_tasks:
            raise UserError(f"{source}: methods[{i}].tasks {unknown_tasks} are not in tasks {sorted(tasks)}.")
        methods.append(MethodEntry(adapter, raw.get("seeds"), raw.get("tasks"), lr))
    if not methods:
        raise UserError(f"{source}: methods is empty.")
    slugs = [m.slug for m in methods]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise UserError(f"{source}: methods {duplicates} appear twice; each (method, r, n) once.")
    grid = {
        str(k): _positive_floats(v, f"{source}: lr_grid.{k}") for k, v in (data.get("lr_grid") or {}).items()
    }
    tune_raw = data.get("tune") or {}
    try:
        tune = Tune(**tune_raw)
    except TypeError as err:
        raise UserError(f"{source}: tune: {err}; known keys seed, extend, factor.") from err
    if tune.factor <= 1 or tune.extend < 0:
        raise UserError(f"{source}: tune needs factor > 1 and extend >= 0, got {tune_raw!r}.")
    eval_spec = None
    if data.get("eval"):
        if data["runner"] != "instruct":
            raise UserError(f"{source}: eval applies to instruct studies only.")
        try:
            eval_spec = EvalSpec(**data["eval"])
        except TypeError as err:
            raise UserError(f"{source}: eval: {err}.") from err
    compare = [list(pair) for pair in data.get("compare") or []]
    for pair in compare:
        if len(pair) != 2 or any(p not in slugs for p in pair):
            raise UserError(f"{source}: compare entry {pair!r} must be two method slugs from {slugs}.")
    spec = StudySpec(
        name=str(data["name"]),
        runner=data["runner"],
        tasks=tasks,
        methods=methods,
        seeds=[int(s) for s in data.get("seeds") or [0]],
        lr_grid=grid,
        base=dict(data.get("base") or {}),
        output_dir=data.get("output_dir"),
        workers=int(data.get("workers", 1)),
        threads_per_worker=int(data.get("threads_per_worker", 1)),
        tune=tune,
        select=str(data.get("select", "primary")),
        compare=compare,
        eval=eval_spec,
        source=source,
    )
    for entry in methods:
        spec.grid_for(entry)  # every method has learning rates
    if spec.workers < 1 or spec.threads_per_worker < 1:
        raise UserError(f"{source}: workers and threads_per_worker must be >= 1.")
    return spec


def load_study(path: str | Path) -> StudySpec:
    from melora.args import load_preset

    return parse_study(load_preset(path), str(path))
