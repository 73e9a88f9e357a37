"""A study file: tasks x methods x seeds x learning-rate grid x budget, as one typed object.

    # melora study configs/studies/example.yaml
    name: example                 # results go to results/<name>/ (one folder name: no '/', no '..')
    output_dir: results/example_2 # optional: a folder inside results/, or an absolute path
    runner: glue                  # glue or instruct
    workers: 2                    # runs in parallel (processes); with GPUs: at most this many (default: all fit)
    threads_per_worker: 1         # torch threads of each
    gpus_per_run: 1               # optional: GPUs each run gets (0.5: two runs share one; 2: two whole GPUs);
                                  # the local executor runs as many at once as the machine's GPUs hold and
                                  # gives each its own CUDA_VISIBLE_DEVICES; 0: runs see no GPU
    cpus_per_run: 4               # optional: CPUs each run reserves (Ray's num_cpus; default threads_per_worker)
    executor: local               # local (processes on this machine) or ray (a Ray cluster: docs/scale.md)
    ray_address: auto             # executor ray: the cluster to join (auto: RAY_ADDRESS or the local one)
    base: {model: minilm, data_dir: ../shared/data/glue, batch_size: 32}   # flags every run shares
    tasks:                        # task -> its budget (any runner flag), overriding base
      stsb: {epochs: 3}
      rte: {epochs: 10, max_train_samples: 1000}
    methods:                      # adapter flags; optional per method: seeds, tasks, lr (a fixed grid)
      - {method: lora, r: 8}
      - {method: melora, r: 1, n: 8}
      - {method: melora, r: 1, n: 1, tasks: [stsb], seeds: [0]}
      - {method: lora, r: 1, lr: {stsb: [1.0e-3], rte: [3.0e-3]}}   # lr per task (a one-point grid: no tuning)
    seeds: [0, 1, 2]
    lr_grid: {melora: [1.0e-3, 3.0e-3, 1.0e-2], lora: [3.0e-4, 1.0e-3, 3.0e-3], full: [3.0e-5, 1.0e-4]}
    tune: {seed: 0, extend: 2, factor: 3}   # an edge optimum adds a point beyond it, up to `extend` per side
    select: primary               # glue: each task's primary metric; or a summary key (instruct/heldout_loss)
    analyze: false                # true: `melora analyze` each chosen run's adapter (keep it: save_model) into
                                  # <run>/analysis.json; the report gains the rank and block-diversity tables
    compare: [[melora-r1-n8, lora-r8]]      # paired per-seed comparisons (slugs), first minus second
    eval: {tasks: [mmlu, bbh], limit: {mmlu: 2}, data_dir: ../shared/data/eval, base: true}   # instruct only;
                                  # base: the untuned model is evaluated too (<root>/instruct/base/eval)

Instruct studies use the task name ``instruct`` (one task; its budget under ``tasks: {instruct: {...}}``).
Every value is checked where it is read (``workers: "two"``, ``seeds: [1.7]``, ``seeds: []``, ``tune: 3``,
``lr_grid: {lora: .inf}``, a list where a mapping belongs, ...): one UserError naming the file and the key.
Relative paths (``results/<name>``, a relative ``output_dir``) are relative to the folder the command
runs in (the repository root).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora.lab.args import AdapterArgs, UserError, suggest

RUNNERS = ("glue", "instruct")
EXECUTORS = ("local", "ray")
# Summary keys where lower is better (everything else: higher is better).
LOWER_IS_BETTER = ("loss",)


@dataclass
class MethodEntry:
    """One method row of a study: its adapter options plus where and how it runs."""

    adapter: AdapterArgs
    seeds: list[int] | None = None
    tasks: list[str] | None = None
    lr: list[float] | dict[str, list[float]] | None = None  # one grid, or one grid per task

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
    workers: int | None = None  # None: 1, or with gpus_per_run as many as the GPUs hold
    threads_per_worker: int = 1
    gpus_per_run: float | None = None  # None: runs see whatever GPUs the study sees
    cpus_per_run: int | None = None  # None: threads_per_worker
    executor: str = "local"
    ray_address: str | None = None
    tune: Tune = field(default_factory=Tune)
    select: str = "primary"
    compare: list[list[str]] = field(default_factory=list)
    eval: EvalSpec | None = None
    analyze: bool = False  # analyse each chosen run's kept adapter into <run>/analysis.json (melora analyze)
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

    @property
    def cpus(self) -> int:
        """CPUs each run reserves: ``cpus_per_run``, else its torch threads."""
        return self.cpus_per_run or self.threads_per_worker

    def seeds_for(self, entry: MethodEntry) -> list[int]:
        return list(entry.seeds if entry.seeds is not None else self.seeds)

    def tasks_for(self, entry: MethodEntry) -> list[str]:
        return [t for t in self.tasks if entry.tasks is None or t in entry.tasks]

    def grid_for(self, entry: MethodEntry, task: str | None = None) -> list[float]:
        """The learning rates ``entry`` is tuned over on ``task`` (its own ``lr``, else ``lr_grid``)."""
        if isinstance(entry.lr, dict):
            if task is not None and task in entry.lr:
                return sorted(entry.lr[task])
        elif entry.lr is not None:
            return sorted(entry.lr)
        for key in (entry.slug, entry.adapter.method):
            if key in self.lr_grid:
                return sorted(self.lr_grid[key])
        where = f" on {task}" if task is not None else ""
        raise UserError(
            f"{self.source}: no learning rates for {entry.slug}{where}: add lr_grid.{entry.adapter.method}, "
            f"lr on the method, or lr: {{{task or 'TASK'}: [...]}} on the method."
        )

    def metric_for(self, task: str) -> str:
        """The summary key that selects the learning rate and is compared (``task/metric_best``)."""
        if self.select != "primary":
            return self.select
        if self.runner == "glue":
            from melora.lab.finetune.glue import primary_key

            return f"{task}/{primary_key(task)}_best"
        return "instruct/heldout_loss"

    def lower_is_better(self, metric: str) -> bool:
        return any(word in metric.split("/")[-1] for word in LOWER_IS_BETTER)


_TOP_KEYS = {f.name for f in dataclasses.fields(StudySpec)} - {"source"}
_METHOD_KEYS = {"seeds", "tasks", "lr"}
_TUNE_KEYS = [f.name for f in dataclasses.fields(Tune)]
_EVAL_KEYS = [f.name for f in dataclasses.fields(EvalSpec)]
RESULTS = "results"  # every study's results stay under this folder (unless output_dir is absolute)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any, where: str, low: int) -> int:
    """An integer >= ``low`` (not a bool, not 1.7, not "two")."""
    if not _is_int(value) or value < low:
        raise UserError(f"{where}: expected an integer >= {low}, got {value!r}.")
    return value


def _mapping(value: Any, where: str, example: str, allow_none: bool = True) -> dict[str, Any]:
    """A YAML mapping with text keys (null is an empty one where allowed)."""
    if value is None and allow_none:
        return {}
    if not isinstance(value, dict):
        raise UserError(
            f"{where}: expected a mapping like {example}, got {value!r} ({type(value).__name__})."
        )
    for key in value:
        if not isinstance(key, str):
            raise UserError(f"{where}: key {key!r} is not text; quote it.")
    return dict(value)


def _strings(value: Any, where: str, example: str) -> list[str]:
    """A non-empty list of text items."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"{where}: expected a non-empty list of names like {example}, got {value!r}.")
    return list(value)


def _seeds(value: Any, where: str) -> list[int]:
    """A non-empty list of distinct integer seeds >= 0."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: expected a non-empty list of integer seeds like [0, 1, 2], got {value!r}.")
    for item in value:
        if not _is_int(item) or item < 0:
            raise UserError(f"{where}: seed {item!r} is not an integer >= 0; write seeds like [0, 1, 2].")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: {value!r} repeats a seed; list each seed once.")
    return list(value)


def _positive_floats(value: Any, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(
            f"{where}: expected a non-empty list of learning rates like [1.0e-3, 3.0e-3], got {value!r}."
        )
    out = []
    for item in value:
        number = None
        if _is_number(item):
            number = float(item)
        elif isinstance(item, str):  # YAML reads 1e-3 (no dot) as text
            try:
                number = float(item)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise UserError(f"{where}: {item!r} is not a number.")
        if not number > 0:
            raise UserError(f"{where}: learning rates must be > 0, got {item!r}.")
        out.append(number)
    return out


def _study_name(value: Any, source: str) -> str:
    """A single folder name: results go to ``results/<name>/``, never outside ``results/``."""
    if _is_int(value):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(
            f"{source}: name must be a non-empty text (the folder results/<name>/), got {value!r}."
        )
    if "/" in value or "\\" in value or "\0" in value or value in (".", "..") or os.path.isabs(value):
        raise UserError(
            f"{source}: name {value!r} must be one folder name (no '/', '\\', '..'): results go to "
            f"{RESULTS}/<name>/; to write elsewhere set output_dir to an absolute path."
        )
    return value


def _output_dir(value: Any, source: str) -> str | None:
    """None, an absolute folder, or a relative one that stays inside ``results/``."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{source}: output_dir must be a folder path, got {value!r}.")
    if os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    parts = Path(os.path.normpath(value)).parts
    if len(parts) < 2 or parts[0] != RESULTS or ".." in Path(value).parts:
        raise UserError(
            f"{source}: output_dir {value!r} leaves {RESULTS}/: a relative output_dir must be a folder "
            f"inside {RESULTS}/ (e.g. {RESULTS}/my_study, no '..'), or give an absolute path."
        )
    return value


def _tasks(value: Any, runner: str, source: str) -> dict[str, dict[str, Any]]:
    """task -> budget mapping; glue task names are checked, instruct studies have the one task ``instruct``."""
    example = "{rte: {epochs: 10}, stsb: {}}" if runner == "glue" else "{instruct: {epochs: 1}}"
    if not isinstance(value, dict) or not value:
        raise UserError(
            f"{source}: tasks must be a non-empty mapping of task: budget like {example}, got {value!r}."
        )
    tasks = {}
    for task, budget in value.items():
        if not isinstance(task, str):
            raise UserError(f"{source}: tasks: {task!r} is not a task name.")
        if runner == "glue":
            from melora.lab.data.glue import TASKS

            if task not in TASKS:
                raise UserError(
                    f"{source}: tasks: {task!r} is not a GLUE task{suggest(task, sorted(TASKS))}; "
                    f"choose from {', '.join(sorted(TASKS))}."
                )
        elif task != "instruct":
            raise UserError(
                f"{source}: tasks: instruct studies have the one task 'instruct' (its budget under "
                f"tasks: {{instruct: {{...}}}}), got {task!r}."
            )
        tasks[task] = _mapping(budget, f"{source}: tasks.{task}", "{epochs: 3, max_train_samples: 1000}")
    return tasks


def _tune(value: Any, source: str) -> Tune:
    raw = _mapping(value, f"{source}: tune", "{seed: 0, extend: 2, factor: 3}")
    for key in raw:
        if key not in _TUNE_KEYS:
            raise UserError(
                f"{source}: tune: unknown key {key!r}{suggest(key, _TUNE_KEYS)}; known keys {', '.join(_TUNE_KEYS)}."
            )
    tune = Tune()
    if "seed" in raw:
        tune.seed = _integer(raw["seed"], f"{source}: tune.seed", 0)
    if "extend" in raw:
        tune.extend = _integer(raw["extend"], f"{source}: tune.extend", 0)
    if "factor" in raw:
        factor = raw["factor"]
        if not _is_number(factor) or factor <= 1:
            raise UserError(f"{source}: tune.factor: expected a number > 1, got {factor!r}.")
        tune.factor = float(factor)
    return tune


def _eval(value: Any, source: str) -> EvalSpec:
    raw = _mapping(value, f"{source}: eval", "{tasks: [mmlu, bbh], limit: {mmlu: 2}}", allow_none=False)
    for key in raw:
        if key not in _EVAL_KEYS:
            raise UserError(
                f"{source}: eval: unknown key {key!r}{suggest(key, _EVAL_KEYS)}; known keys {', '.join(_EVAL_KEYS)}."
            )
    spec = EvalSpec()
    where = f"{source}: eval"
    if "tasks" in raw:
        spec.tasks = _strings(raw["tasks"], f"{where}.tasks", "[mmlu, bbh]")
    if "limit" in raw:
        limit = raw["limit"]
        if isinstance(limit, dict):
            for task, count in limit.items():
                if not isinstance(task, str) or not _is_int(count) or count < 1:
                    raise UserError(f"{where}.limit: {task!r}: {count!r}; expected task: an integer >= 1.")
        elif limit is not None and not (_is_int(limit) and limit >= 1):
            raise UserError(
                f"{where}.limit: expected an integer >= 1 or a mapping like {{mmlu: 2}}, got {limit!r}."
            )
        spec.limit = limit
    if "data_dir" in raw:
        if raw["data_dir"] is not None and not isinstance(raw["data_dir"], str):
            raise UserError(f"{where}.data_dir: expected a folder path, got {raw['data_dir']!r}.")
        spec.data_dir = raw["data_dir"]
    if "batch_size" in raw:
        spec.batch_size = _integer(raw["batch_size"], f"{where}.batch_size", 1)
    for key in ("allow_code_execution", "base"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise UserError(f"{where}.{key}: expected true or false, got {raw[key]!r}.")
            setattr(spec, key, raw[key])
    if "extra" in raw:
        extra = raw["extra"]
        if not isinstance(extra, list) or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in extra
        ):
            raise UserError(
                f"{where}.extra: expected a list of extra `melora eval` arguments, got {extra!r}."
            )
        spec.extra = [str(v) for v in extra]
    return spec


def gpus_per_run(value: Any, where: str) -> float:
    """GPUs per run: 0, a fraction of one GPU (0.25, 0.5: runs share it), or a whole number (1, 2, 8)."""
    number = None
    if _is_number(value):
        number = float(value)
    if number is None or not math.isfinite(number) or number < 0 or (number > 1 and number != int(number)):
        raise UserError(
            f"{where}: gpus_per_run={value!r}: expected 0, a fraction of one GPU such as 0.5 (runs share it), "
            "or a whole number of GPUs such as 2."
        )
    return number


def _executor(value: Any, source: str) -> str:
    if value not in EXECUTORS:
        raise UserError(f"{source}: executor={value!r}; choose one of {', '.join(EXECUTORS)}.")
    return value


def _address(value: Any, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{source}: ray_address={value!r}: expected HOST:PORT, ray://HOST:PORT or auto.")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: expected true or false, got {value!r}.")
    return value


def _method(i: int, raw: Any, tasks: dict[str, Any], source: str) -> MethodEntry:
    where = f"{source}: methods[{i}]"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping like {{method: lora, r: 8}}, got {raw!r}.")
    adapter_keys = {k: v for k, v in raw.items() if k not in _METHOD_KEYS}
    known = [f.name for f in dataclasses.fields(AdapterArgs)]
    for key in adapter_keys:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r}{suggest(str(key), known + sorted(_METHOD_KEYS))}.")
    try:
        adapter = AdapterArgs(**adapter_keys)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {err}") from err
    lr: list[float] | dict[str, list[float]] | None = None
    if isinstance(raw.get("lr"), dict):
        lr = {}
        for task, grid in raw["lr"].items():
            if task not in tasks:
                raise UserError(f"{where}.lr: task {task!r} is not in tasks {sorted(tasks)}.")
            lr[task] = _positive_floats(grid if isinstance(grid, list) else [grid], f"{where}.lr.{task}")
    elif "lr" in raw:
        lr = _positive_floats(raw["lr"], f"{where}.lr")
    seeds = _seeds(raw["seeds"], f"{where}.seeds") if "seeds" in raw else None
    only = _strings(raw["tasks"], f"{where}.tasks", "[rte, stsb]") if "tasks" in raw else None
    unknown_tasks = sorted(set(only or []) - set(tasks))
    if unknown_tasks:
        raise UserError(f"{where}.tasks {unknown_tasks} are not in tasks {sorted(tasks)}.")
    return MethodEntry(adapter, seeds, only, lr)


def parse_study(data: dict[str, Any], source: str = "study") -> StudySpec:
    """A StudySpec from the YAML mapping; every unknown key or bad value is a one-line UserError.

    Every value's type and range is checked here, naming ``source`` (the file) and the key."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of key: value, got {type(data).__name__}.")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for key in data:
        if key not in _TOP_KEYS:
            raise UserError(f"{source}: unknown key {key!r}{suggest(key, sorted(_TOP_KEYS))}.")
    for key in ("name", "runner", "tasks", "methods"):
        if key not in data:
            raise UserError(f"{source}: missing key {key!r}.")
    runner = data["runner"]
    if not isinstance(runner, str) or runner not in RUNNERS:
        raise UserError(f"{source}: runner={runner!r}; choose one of {', '.join(RUNNERS)}.")
    name = _study_name(data["name"], source)
    output_dir = _output_dir(data.get("output_dir"), source)
    tasks = _tasks(data["tasks"], runner, source)
    raw_methods = data["methods"]
    if not isinstance(raw_methods, list) or not raw_methods:
        raise UserError(
            f"{source}: methods must be a non-empty list of mappings like "
            f"[{{method: lora, r: 8}}, {{method: melora, r: 1, n: 8}}], got {raw_methods!r}."
        )
    methods = [_method(i, raw, tasks, source) for i, raw in enumerate(raw_methods)]
    slugs = [m.slug for m in methods]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise UserError(f"{source}: methods {duplicates} appear twice; each (method, r, n) once.")
    grid_raw = _mapping(
        data.get("lr_grid"), f"{source}: lr_grid", "{melora: [1.0e-3, 3.0e-3], lora: [3.0e-4]}"
    )
    grid = {k: _positive_floats(v, f"{source}: lr_grid.{k}") for k, v in grid_raw.items()}
    tune = _tune(data.get("tune"), source)
    eval_spec = None
    raw_eval = data.get("eval")
    if not (raw_eval is None or raw_eval is False or raw_eval == {}):  # absent, false or {}: no evaluations
        if runner != "instruct":
            raise UserError(f"{source}: eval applies to instruct studies only.")
        eval_spec = _eval(raw_eval, source)
    compare_raw = data.get("compare")
    if compare_raw is None:
        compare_raw = []
    if not isinstance(compare_raw, list):
        raise UserError(
            f"{source}: compare must be a list of slug pairs like [[melora-r1-n8, lora-r8]], got {compare_raw!r}."
        )
    for pair in compare_raw:
        if not isinstance(pair, list) or len(pair) != 2 or any(p not in slugs for p in pair):
            raise UserError(f"{source}: compare entry {pair!r} must be two method slugs from {slugs}.")
    compare = [list(pair) for pair in compare_raw]
    select = data.get("select", "primary")
    if not isinstance(select, str) or not select:
        raise UserError(
            f"{source}: select: expected 'primary' or a summary key like rte/accuracy_best, got {select!r}."
        )
    spec = StudySpec(
        name=name,
        runner=runner,
        tasks=tasks,
        methods=methods,
        seeds=_seeds(data["seeds"], f"{source}: seeds") if "seeds" in data else [0],
        lr_grid=grid,
        base=_mapping(data.get("base"), f"{source}: base", "{model: minilm, batch_size: 32}"),
        output_dir=output_dir,
        workers=None if data.get("workers") is None else _integer(data["workers"], f"{source}: workers", 1),
        threads_per_worker=_integer(data.get("threads_per_worker", 1), f"{source}: threads_per_worker", 1),
        gpus_per_run=None if data.get("gpus_per_run") is None else gpus_per_run(data["gpus_per_run"], source),
        cpus_per_run=None
        if data.get("cpus_per_run") is None
        else _integer(data["cpus_per_run"], f"{source}: cpus_per_run", 1),
        executor=_executor(data.get("executor", "local"), source),
        ray_address=_address(data.get("ray_address"), source),
        tune=tune,
        select=select,
        compare=compare,
        eval=eval_spec,
        analyze=_flag(data.get("analyze", False), f"{source}: analyze"),
        source=source,
    )
    for entry in methods:
        for task in spec.tasks_for(entry):
            spec.grid_for(entry, task)  # every method has learning rates on every task it runs
    return spec


def load_study(path: str | Path) -> StudySpec:
    """The study file at ``path``, checked; every problem is one UserError naming the file."""
    from melora.lab.args import load_preset

    try:
        data = load_preset(path)
    except UserError as err:  # e.g. not UTF-8: say which file
        if str(path) not in str(err):
            raise UserError(f"{path}: {err}") from err
        raise
    return parse_study(data, str(path))
