"""Atomic file writes (a reader or a crash never sees a half-written checkpoint, model or report) and the
history CSVs they produce."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temp file keeps the target's suffix because some writers (Keras `.keras`, matplotlib) pick the
    format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return path


def atomic_write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write dict rows as CSV atomically; columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buf.getvalue())


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``history.csv`` (central epochs or federated rounds) with numbers parsed back.

    Integers become int, other numbers float, anything else stays text; empty cells are dropped. A missing
    file has no rows.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{key: _number(value) for key, value in raw.items() if value not in ("", None)} for raw in csv.DictReader(f)]


def _number(text: str) -> int | float | str:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text
