"""Atomic outputs: a reader (or a crash) never sees a half-written file or run folder, and runs never mix.

- `atomic_path` / `atomic_write` / `atomic_write_csv`: one file, renamed into place when complete, with the
  permissions of any file the user writes (the umask), not `mkstemp`'s private 0600; `read_history` reads the
  history CSVs back.
- `run_lock`: one writer per output name; a second command on the same name is refused while the first runs.
- `staged_run`: a new run is written into a hidden staging folder and replaces an earlier run of the same name
  only once it is complete (and only if asked to); `settle_attempts` finishes what a killed command left there.
- `check_output_file`: a command never writes onto a file it reads, nor onto a file another program wrote.
- `publish_folder`: a new output folder (node folders, keys) appears complete or not at all, never over anyone's.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dsl_fed.errors import DslFedError

LOCK_TEXT = "dsl_fed lock, PID "  # what a lock file holds: a file of that name without it is not ours
STAGING_INFIX = ".partial-"  # staging folders are .<name>.partial-XXXXXXXX
STAGING_TAG = ".dsl_fed-staging"  # inside every staging folder made here: only those are ever settled or removed


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
def run_lock(run_dir: str | Path, what: str = "run") -> Iterator[None]:
    """Hold ``<parent>/.<name>.lock`` (an flock, with our PID inside) while this process writes `run_dir`.

    The kernel drops the lock when the process dies, however it dies, so a stale lock never blocks a new run.
    Also usable for any other output (a file, a corpus folder): `what` names it in the error.

    Raises:
        DslFedError: another live process holds the lock (its PID is named), or a file of the lock's name
            exists that is not a dsl_fed lock (it is left alone).
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = run_dir.parent / f".{run_dir.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        content = os.read(fd, 64).decode(errors="replace")
        if content and not (content.startswith(LOCK_TEXT) or content.strip().isdigit()):  # digits: older versions
            os.close(fd)
            raise DslFedError(f"{lock}: exists and is not a dsl_fed lock file; move it away (nothing was written)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = content.removeprefix(LOCK_TEXT).strip() or "?"
            os.close(fd)
            other = "output.name" if what == "run" else "path"
            raise DslFedError(f"{run_dir}: another dsl_fed command (PID {holder}) is writing this {what}; wait for it "
                              f"to finish or choose another {other}") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked after we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{LOCK_TEXT}{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def refuse_existing(run_dir: Path, overwrite: bool, resumable: bool = False) -> None:
    """Starting over on an existing run name must be explicit, and only a run is ever replaced (a folder with
    the ``config.yaml`` every run writes first; not, say, the corpus' audio folder or an experiment's tables
    under a name no run has had). Call early, before any slow work."""
    if not (run_dir.exists() or run_dir.is_symlink()):
        return
    if not overwrite:
        resume = ", --resume to continue it" if resumable else ""
        raise DslFedError(f"{run_dir}: a run of this name exists; pass --overwrite to replace it once the new run "
                          f"has finished{resume}, or choose another output.name")
    if not (run_dir / "config.yaml").is_file():
        raise DslFedError(f"{run_dir}: holds no config.yaml, so it is not a dsl_fed run, and --overwrite replaces "
                          "only runs; choose another output.name (nothing was written)")


@contextlib.contextmanager
def staged_run(run_dir: str | Path, overwrite: bool = False,
               resumable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh folder named like `run_dir` inside a new hidden staging folder beside it; publish it when done.

    The staging folder is ``<parent>/.<name>.partial-XXXXXXXX/`` (a unique name, marked as ours inside, so a
    user's folder is never taken for it). When the block succeeds the new run takes `run_dir`'s place (an
    earlier run there is removed only now). When it fails, an earlier run stays untouched and the attempt stays
    in the staging folder (named in the error) until the next command of this name; an attempt of a new name
    that `resumable` accepts (a federated run with a finished round) moves to `run_dir` instead, to be resumed.
    An attempt whose command was killed is settled the same way by the next one (`settle_attempts`).
    Call it under `run_lock`.

    Raises:
        DslFedError: `run_dir` holds an earlier run and `overwrite` is false - before anything is written.
    """
    run_dir = Path(run_dir)
    settle_attempts(run_dir, resumable)
    refuse_existing(run_dir, overwrite, resumable is not None)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}{STAGING_INFIX}", dir=run_dir.parent))
    (staging / STAGING_TAG).write_text("writing\n")
    attempt = staging / run_dir.name
    attempt.mkdir()
    try:
        yield attempt
    except BaseException as exc:
        if _keep(attempt, run_dir, resumable):
            os.replace(attempt, run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            message, where = str(exc).replace(str(attempt), str(run_dir)), f"the incomplete run is in {run_dir}"
        else:
            earlier = f"the earlier run in {run_dir} is untouched; " if run_dir.exists() else ""
            message, where = str(exc), f"{earlier}this attempt is in {attempt} until the next run of this name"
        if isinstance(exc, DslFedError):
            raise DslFedError(f"{message} ({where})") from None
        raise
    (staging / STAGING_TAG).write_text("complete\n")
    _publish(staging, run_dir)


def settle_attempts(run_dir: str | Path, resumable: Callable[[Path], bool] | None = None) -> None:
    """Finish what killed commands left in staging folders of `run_dir` (call under `run_lock`).

    A complete attempt is published, a resumable attempt of a new name moves to `run_dir` (as if its command
    had failed instead of being killed), anything else is removed. Folders without our mark are left alone.
    """
    run_dir = Path(run_dir)
    pattern = re.compile(re.escape(f".{run_dir.name}{STAGING_INFIX}") + r"[A-Za-z0-9_]{8}")
    if not run_dir.parent.is_dir():
        return
    for staging in sorted(run_dir.parent.iterdir()):
        attempt = staging / run_dir.name
        if not (pattern.fullmatch(staging.name) and (staging / STAGING_TAG).is_file()):
            continue
        if (staging / STAGING_TAG).read_text().strip() == "complete":
            _publish(staging, run_dir)
        elif _keep(attempt, run_dir, resumable):
            os.replace(attempt, run_dir)
        shutil.rmtree(staging, ignore_errors=True)


def _keep(attempt: Path, run_dir: Path, resumable: Callable[[Path], bool] | None) -> bool:
    if resumable is None or run_dir.exists() or run_dir.is_symlink() or not attempt.is_dir():
        return False
    try:
        return bool(resumable(attempt))
    except DslFedError:  # a damaged attempt is not worth keeping
        return False


def _publish(staging: Path, run_dir: Path) -> None:
    """Move the complete attempt onto `run_dir`; the earlier run goes into the staging folder and with it."""
    attempt = staging / run_dir.name
    if attempt.is_dir():
        if run_dir.exists() or run_dir.is_symlink():
            os.replace(run_dir, staging / ".replaced")  # run names never start with "."
        os.replace(attempt, run_dir)
    shutil.rmtree(staging, ignore_errors=True)


def check_output_file(path: str | Path, reading: Sequence[str | Path] = (),
                      ours: Callable[[Path], bool] = lambda path: False, what: str = "output") -> None:
    """Refuse to write `path` when it is a file this command reads (under any name: same inode) or an existing
    file that `ours` does not recognise as an earlier output of the same command. Call before any slow work.

    Raises:
        DslFedError: naming `path`; nothing has been written.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise DslFedError(f"{path}: the {what} path exists and is not a file (nothing was written)")
    if not path.exists():
        return
    for source in reading:
        with contextlib.suppress(OSError):
            if os.path.samefile(path, source):
                raise DslFedError(f"{path}: the {what} would overwrite {source}, an input of this command; "
                                  "write it elsewhere (nothing was written)")
    try:
        mine = ours(path)
    except (OSError, ValueError):
        mine = False
    if not mine:
        raise DslFedError(f"{path}: exists and is not an earlier {what} of this command; choose another path or move "
                          "it away (nothing was written)")


def check_empty_folder(path: Path, what: str) -> None:
    """Refuse an output folder that holds anything (a folder is only ever filled when new or empty).

    Raises:
        DslFedError: naming `path`; nothing has been written.
    """
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DslFedError(f"{path}: the {what} exists and is not an empty folder; choose a new one "
                          "(nothing was written)")


def publish_folder(outdir: Path, write: Callable[[Path], object]) -> None:
    """Let `write` fill a new hidden folder beside `outdir` (a unique name: no one else's folder is touched),
    then move it onto `outdir` with `rename_onto_empty`.

    Raises:
        DslFedError: `outdir` was filled by someone else while writing (nothing of ours is left).
    """
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-", dir=outdir.parent))
    try:
        write(staging)
        rename_onto_empty(staging, outdir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def rename_onto_empty(folder: Path, outdir: Path) -> None:
    """Rename `folder` onto `outdir`, which must not exist or be empty: the kernel refuses the rename if
    anything appeared there meanwhile (a second command writing the same folder), and those files stay.

    Raises:
        DslFedError: `outdir` is not empty (or not a folder); `folder` is left where it is.
    """
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp's folders are private; the published one is not
    try:
        os.rename(folder, outdir)  # replaces an empty folder atomically, fails on a non-empty one
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise DslFedError(f"{outdir}: was filled by another command meanwhile; choose a new folder "
                          "(nothing of this one was kept)") from None
