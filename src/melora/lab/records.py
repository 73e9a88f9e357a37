"""The results.json schema every runner writes and ``melora report`` / ``melora study`` read.

A :class:`RunRecord` is the header (what ran, how it scored, where it came from); runner-specific
detail (per-epoch metrics, loss curves, per-task eval results) goes in ``details`` and is written
beside the header fields in the same JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora.errors import UserError

RESULTS_FILE = "results.json"
KINDS = ("glue", "instruct", "eval")
# Options that do not change what a run computes: runs differing only in these may be averaged.
NON_DEFINING = frozenset(
    {
        "seed",
        "output_dir",
        "label",
        "progress",
        "threads",
        "resume",
        "stop_after_steps",
        "data_dir",
        "save_strategy",
        "save_steps",
        "save_model",
        "eval_batch_size",
        "eval_base",
        "adapter",
        "report_to",  # where the logs go, not what is computed
    }
)


@dataclass
class RunRecord:
    """One run's results.json: ``summary`` holds the flat metrics (``task/metric`` -> value)."""

    kind: str
    label: str
    slug: str
    method: str
    summary: dict[str, float]
    seed: int | None = None
    task: str | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    trainable_params: int | None = None
    adapter_params: int | None = None
    head_params: int | None = None
    equivalent_rank: int | None = None
    wall_time_s: float | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # the file it was read from (set by :meth:`read`, for error messages); not written
    source: str | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        details = data.pop("details")
        data.pop("source")
        return {**data, **details}

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/results.json`` atomically."""
        from melora.atomic import write_json_atomic

        return write_json_atomic(Path(folder) / RESULTS_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "results.json") -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"details", "source"}
        missing = [k for k in ("kind", "label", "summary") if k not in data]
        if missing or not isinstance(data.get("summary"), dict):
            raise ValueError(
                f"{source}: not a melora results file; missing {missing or ['summary (a dict)']}."
            )
        header = {k: v for k, v in data.items() if k in names}
        header.setdefault("slug", str(data["label"]).replace(" ", "-").replace("=", ""))
        header.setdefault("method", str(data["label"]).split(" ")[0])
        return cls(**header, details={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunRecord:
        """A results.json (or the run folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        record = cls.from_dict(read_results(path), str(path))
        record.source = str(path)
        return record

    def defining_config(self) -> dict[str, Any]:
        """The options that change what the run computes (for refusing to average unlike runs)."""
        return {k: v for k, v in sorted(self.config.items()) if k not in NON_DEFINING}


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of one results.json; a damaged file is a :class:`~melora.lab.args.UserError` naming it.

    Runners write results.json atomically (a reader never sees half a file), so a file that is not
    UTF-8 JSON holding an object was damaged by something else (a copy cut short, an editor, a merge
    conflict): the error says to delete it, which makes ``melora study`` run that run again. A missing
    file is a FileNotFoundError.
    """
    path = Path(path)
    fix = "it is damaged: delete it (or restore it from git) and rerun"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a results.json file.") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}).") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); {fix}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        what = (
            "is empty"
            if not text.strip()
            else f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        )
        raise UserError(f"{path} {what}; {fix}.") from None
    if not isinstance(data, dict):
        raise UserError(
            f"{path} holds a JSON {type(data).__name__}, not the object a melora results.json is; {fix}."
        )
    return data


# ---- run-level reads: every read of a results.json by the study goes through read_run ----------------------

DAMAGED = "it is damaged: delete it and rerun"


def read_run(path: str | os.PathLike) -> RunRecord | None:
    """The record of a results.json (or of the run folder holding it); None when there is none yet.

    A file that is not a melora results.json (damaged JSON, or an object without ``kind``, ``label``
    and a ``summary`` mapping) is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        return None
    try:
        return RunRecord.read(path)
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a well-formed JSON object that is no RunRecord
        raise UserError(f"{str(err).rstrip('.')}; {DAMAGED}.") from None


def finished(record: RunRecord) -> bool:
    """Whether the run finished: a training run's results.json is written at its end; an evaluation
    writes its own as it goes, and says ``complete`` once every task is scored."""
    return record.kind != "eval" or bool(record.details.get("complete", True))


def metric(record: RunRecord, name: str) -> float | None:
    """``summary[name]`` as a number; None when the run has no such metric. Not a number: a UserError."""
    value = record.summary.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{record.source or 'results.json'}: summary[{name!r}] = {value!r} is not a number; {DAMAGED}."
        ) from None


def read_metric(path: str | os.PathLike, name: str) -> float | None:
    """``summary[name]`` of a finished run's results.json; None when absent, unfinished or not measured."""
    record = read_run(path)
    if record is None or not finished(record):
        return None
    return metric(record, name)


def wall_time(record: RunRecord) -> float:
    """The run's wall time in seconds; 0 where it was not recorded."""
    return float(record.wall_time_s or 0.0)
