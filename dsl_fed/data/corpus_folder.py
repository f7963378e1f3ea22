"""Where a generated corpus goes: a folder that is new, empty, or holds an earlier corpus the tool wrote.

`make-demo-data`, `make-speech-data` and the arousal corpus write into a hidden staging folder beside DIR;
only a complete corpus is moved into DIR. DIR's own files are never overwritten or deleted unless this tool
wrote them: ``DIR/.dsl_fed-corpus.json`` lists the files it wrote and the sha256 of the ``manifest.csv`` it
wrote, and a DIR whose ``manifest.csv`` is not that one (a user's corpus, or one edited since) is refused
before anything is synthesised. Re-making a corpus in the same DIR replaces the files of the earlier one
(removing those the new one no longer has) and leaves every other file in DIR alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dsl_fed.errors import DslFedError
from dsl_fed.io import STAGING_INFIX, STAGING_TAG, atomic_write, rename_onto_empty, run_lock, settle_attempts

RECORD = ".dsl_fed-corpus.json"
MANIFEST = "manifest.csv"


@contextlib.contextmanager
def corpus_folder(out_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden folder to write the corpus into (``manifest.csv`` last); publish it into `out_dir` when
    the block succeeds, remove it when it fails. One command per DIR at a time.

    Raises:
        DslFedError: `out_dir` holds a ``manifest.csv`` (or other files) this tool did not write - before
            the block runs, or, for a clash found only once the file names are known, before publishing.
    """
    out_dir = Path(out_dir).absolute()
    if not out_dir.parent.exists():
        out_dir.parent.mkdir(parents=True)
    with run_lock(out_dir, what="corpus folder"):
        settle_attempts(out_dir)  # staging folders of killed earlier attempts go
        earlier = _earlier_files(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{STAGING_INFIX}", dir=out_dir.parent))
        (staging / STAGING_TAG).write_text("writing\n")
        try:
            yield staging
            (staging / STAGING_TAG).unlink()
            written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
            _write_record(staging, written)
            if earlier is None:
                rename_onto_empty(staging, out_dir)
            else:
                _replace(out_dir, staging, earlier, written)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _earlier_files(out_dir: Path) -> set[str] | None:
    """Files of an earlier corpus of ours in `out_dir` (None: `out_dir` is new or empty); refuse anything else."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise DslFedError(f"{out_dir}: exists and is not a folder (nothing was written)")
    if not any(out_dir.iterdir()):
        return None
    record = _read_record(out_dir)
    manifest = out_dir / MANIFEST
    if record is None or (manifest.exists() and _sha256(manifest) not in record["manifests"]):
        what = f"{manifest} was not written by dsl_fed (or was edited since)" if manifest.exists() else \
            "is not empty and holds no corpus written by dsl_fed"
        raise DslFedError(f"{out_dir}: {what}; choose a new or empty folder, or move the files away "
                          "(nothing was written)")
    return set(record["files"])


def _replace(out_dir: Path, staging: Path, earlier: set[str], written: list[str]) -> None:
    """Swap an earlier corpus of ours for the new one; every file not ours stays. A crash midway leaves a
    record claiming both corpora, so the next run recognises and finishes the folder."""
    clashes = [f for f in written if f not in earlier and (out_dir / f).exists()]
    if clashes:
        raise DslFedError(f"{out_dir / clashes[0]}: exists and was not written by dsl_fed; the new corpus would "
                          "overwrite it (nothing was written)")
    both = {"manifests": sorted({*_read_record(out_dir)["manifests"], _sha256(staging / MANIFEST)}),
            "files": sorted({*earlier, *written})}
    atomic_write(out_dir / RECORD, json.dumps(both, indent=1) + "\n")
    for name in sorted(earlier - set(written)):
        (out_dir / name).unlink(missing_ok=True)
        _remove_empty_parents(out_dir / name, out_dir)
    _move_all(staging, out_dir, written)
    _write_record(out_dir, written)


def _move_all(staging: Path, target: Path, files: list[str]) -> None:
    for name in sorted(files, key=lambda f: f == MANIFEST):  # the manifest last: it names the audio
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target / name)


def _write_record(folder: Path, files: list[str]) -> None:
    record = {"manifests": [_sha256(folder / MANIFEST)], "files": sorted({*files, MANIFEST})}
    atomic_write(folder / RECORD, json.dumps(record, indent=1) + "\n")


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and all(isinstance(record.get(k), list) for k in ("manifests", "files"))
    return record if ok else None


def _remove_empty_parents(path: Path, root: Path) -> None:
    for parent in path.parents:
        if parent == root or not parent.is_relative_to(root):
            return
        with contextlib.suppress(OSError):
            parent.rmdir()  # only if empty


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
