"""Text files of the datasets, read as UTF-8 with a bad byte named by file and line."""

from __future__ import annotations

from pathlib import Path

from melora.errors import UserError


def read_utf8(path: Path, rule: str, encoding: str = "utf-8") -> str:
    """``path`` decoded with ``encoding`` (``utf-8``, or ``utf-8-sig`` to drop a leading BOM); a byte that is
    not UTF-8 is a UserError naming the file and line and stating ``rule`` (e.g. "GLUE TSVs are UTF-8")."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{path}, line {line}: byte {data[err.start : err.start + 1]!r} is not UTF-8 ({err.reason}); "
            f"{rule}: save the file as UTF-8."
        ) from None
