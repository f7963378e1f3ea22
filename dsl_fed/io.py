"""Atomic outputs: a reader (or a crash) never sees a half-written file or run folder, and runs never mix.

- `atomic_path` / `atomic_write` / `atomic_write_csv`: one file, renamed into place when complete, with the
  permissions of any file the user writes (the umask), not `mkstemp`'s private 0600; `read_history` reads the
  history CSVs back.
- `run_lock`: one writer per run folder; a second command on the same run name is refused while the first runs.
- `staged_run`: a new run is written into a hidden staging folder and replaces an earlier run of the same name
  only once it is complete (and only if asked to).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dsl_fed.errors import DslFedError


def _umask() -> int:
    try:  # Linux reports it without changing it (changing it briefly would race other threads' file creation)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temp file keeps the target's suffix because some writers (Keras `.keras`, matplotlib) pick the
    format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.fchmod(fd, 0o666 & ~_umask())
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


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``<parent>/.<name>.lock`` (an flock, with our PID inside) while this process writes `run_dir`.

    The kernel drops the lock when the process dies, however it dies, so a stale lock never blocks a new run.

    Raises:
        DslFedError: another live process holds the lock (its PID is named).
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = run_dir.parent / f".{run_dir.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DslFedError(f"{run_dir}: another dsl_fed command (PID {holder}) is writing this run; wait for it to "
                              "finish or choose another output.name") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked after we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def refuse_existing(run_dir: Path, overwrite: bool) -> None:
    """Starting over on an existing run name must be explicit; call early, before any slow work."""
    if run_dir.exists() and not overwrite:
        raise DslFedError(f"{run_dir}: a run of this name exists; pass --overwrite to replace it once the new run "
                          "has finished, or choose another output.name")


@contextlib.contextmanager
def staged_run(run_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh folder named like `run_dir` inside ``<parent>/.<name>.partial/``; publish it when done.

    When the block succeeds the new run takes `run_dir`'s place (an earlier run there is removed only now).
    When it fails, an earlier run stays untouched and the attempt is left in the staging folder; if there was
    no earlier run, the incomplete attempt moves to `run_dir` (a federated run can then be resumed).
    Call it under `run_lock`: the staging folder of an earlier failed attempt of this name is cleared.

    Raises:
        DslFedError: `run_dir` holds an earlier run and `overwrite` is false - before anything is written.
    """
    run_dir = Path(run_dir)
    refuse_existing(run_dir, overwrite)
    staging = run_dir.parent / f".{run_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / run_dir.name).mkdir(parents=True)
    try:
        yield staging / run_dir.name
    except BaseException as exc:
        if not run_dir.exists():
            os.replace(staging / run_dir.name, run_dir)
            staging.rmdir()
            where = f"the incomplete run is in {run_dir}"
        else:
            where = f"the earlier run in {run_dir} is untouched; this attempt is in {staging / run_dir.name}"
        if isinstance(exc, DslFedError):
            raise DslFedError(f"{exc} ({where})") from None
        raise
    old = run_dir.parent / f".{run_dir.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        os.replace(run_dir, old)
    os.replace(staging / run_dir.name, run_dir)
    staging.rmdir()
    shutil.rmtree(old, ignore_errors=True)
