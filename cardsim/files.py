"""Reading and writing the project's own files: JSON read with errors that name the file and line, and atomic
writes (readers see the old file or the new one, never a half-written one)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeAlias

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
"""A JSON document as ``json.dumps`` takes it."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` aside in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, error: type[Exception], what: str = "file") -> Any:
    """The JSON document in ``path``; ``error`` naming the file (and the line) when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"{path}: cannot read {what}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a UTF-8 text file") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err
