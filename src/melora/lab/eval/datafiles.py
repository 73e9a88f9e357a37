"""Reading the evaluation sets' local files (``--data-dir``) so that every defect is one clear line.

A file that is not UTF-8, a line that is not JSON, a record without a field the task needs or
with a field of the wrong type: each is a :class:`~melora.lab.args.UserError` that names the file,
the line (or, inside one JSON document, the place such as ``examples[3]``), what was found and
what to do, instead of a ``KeyError`` or ``UnicodeDecodeError`` deep inside a task.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from melora.lab.args import UserError

_JSON_TYPES = ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number"),
               (dict, "an object"), (list, "an array"), (type(None), "null"))  # fmt: skip


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, with its article: "a string", "an object", "null"..."""
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), f"a {type(value).__name__}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it ends in ``.gz``; a broken archive is a UserError."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise UserError(
            f"{path}: not a readable gzip file ({exc or type(exc).__name__}); "
            "download it again or give the uncompressed .jsonl."
        ) from None


def decode(data: bytes, path: Path) -> str:
    """``data`` as UTF-8 text, or a UserError naming the line with the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(
            f"{path}, line {line}: byte {data[exc.start : exc.start + 1]!r} at column {column} is not "
            "UTF-8; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def read_text(path: Path) -> str:
    return decode(read_bytes(path), path)


def _no_lone_surrogates(value: Any, where: str) -> None:
    """A ``\\udXXX`` escape without its pair decodes to a string no file or terminal can take."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{where}: a \\u escape encodes half a character ({exc.object[exc.start]!r}, a lone "
            "surrogate); fix the text."
        ) from None


def read_json(path: Path) -> Any:
    """One JSON document; invalid JSON is a UserError with its line and column."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "fix the file or download it again."
        ) from None
    _no_lone_surrogates(value, str(path))
    return value


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """``(where, record)`` for each non-blank line of a JSON Lines file (``.jsonl`` or ``.jsonl.gz``),
    ``where`` being ``"<file>, line <n>"``; each line must hold one JSON object."""
    records = []
    for number, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: U+2028 is data
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one "
                "JSON object."
            ) from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object on each line, got {json_type(record)}.")
        _no_lone_surrogates(record, where)
        records.append((where, record))
    return records


def need(record: Any, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record[key]``, checked: a UserError naming ``where`` when the record is not an object, the
    field is missing, or its value is not of ``kind`` (``int`` excludes true/false)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {json_type(record)} {_shown(record)}.")
    if key not in record:
        keys = ", ".join(map(repr, sorted(map(str, record))[:8])) or "none"
        raise UserError(f"{where}: the field {key!r} is missing (fields there: {keys}).")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        wanted = " or ".join(dict.fromkeys(json_type(k()) for k in kinds))
        raise UserError(
            f"{where}: the field {key!r} must be {wanted}, got {json_type(value)} {_shown(value)}."
        )
    return value
