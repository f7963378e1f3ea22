"""A folder of backbone embeddings on the machine that holds the audio: computed once, checked on every read.

One file per (frozen front end, chunk set): ``<key>.emb``, where the key is a sha256 over everything that changes
an embedding - the backbone's and spectrogram layer's weights and configs (`front_end_key`) and the bytes of the
decoded chunks (which follow from each audio file's content and the data config, and include an experiment's
simulated noise). A file holds a magic line, a JSON header (key, shape, sha256 of the payload) and the float32
payload. A read that finds a foreign, truncated or damaged file says so in one line and the caller rebuilds it;
nothing unverified is ever returned.

Files are written under a temporary name and renamed into place (`dsl_fed.io.atomic_path`), so two processes
filling the same folder never see each other's half-written file (the last complete one wins; both are equal).
The folder is bounded (`max_bytes`): after a write the least recently used entries go. A full disk only costs the
cache: the embeddings are still returned. The folder carries a ``CACHEDIR.TAG`` (backup tools skip it) that marks
it as ours; `clear` removes only what such a folder holds of ours. The cache never leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_path, atomic_write

MAGIC = b"dsl_fed embeddings v1\n"
SUFFIX = ".emb"
TAG_FILE = "CACHEDIR.TAG"
TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
            "# dsl_fed embedding cache: backbone outputs of local audio, rebuilt when missing\n")
DEFAULT_MAX_BYTES = 4 << 30


def run_folder(cfg) -> Path:
    """The cache folder of a run whose chunks are decoded on this machine (central mode, simulated clients):
    ``.<output.name>.embeddings`` beside the run folder (hidden, outside the published run)."""
    return Path(cfg.output.directory) / f".{cfg.output.name}.embeddings"


NODE_FOLDER = ".dsl_fed_cache"  # hidden: a folder-per-class corpus never takes it for a class


def node_folder(node_config, cfg) -> Path:
    """Where a node keeps what it computes from its own clips: the node config's ``cache-path``, else
    ``.dsl_fed_cache`` in its data folder, else (a simulated node) the run's cache folder (`run_folder`)."""
    if "cache-path" in node_config:
        return Path(str(node_config["cache-path"])).expanduser()
    if "data-path" in node_config:
        data = Path(str(node_config["data-path"])).expanduser()
        return (data if data.is_dir() else data.parent) / NODE_FOLDER
    return run_folder(cfg)


def for_config(folder: str | Path, cfg, note: Callable[[str], None] | None = None) -> "EmbeddingCache":
    """An `EmbeddingCache` in `folder` bounded by ``training.embedding_cache_mb``."""
    return EmbeddingCache(folder, cfg.training.embedding_cache_mb << 20, note)


def front_end_key(model) -> str:
    """sha256 over what maps a chunk to its embedding: the spectrogram layer and the backbone (configs + weights)."""
    digest = hashlib.sha256(MAGIC)
    for layer in (model.spectrogram, model.backbone):
        digest.update(json.dumps(layer.get_config(), sort_keys=True, default=str).encode())
        for weight in layer.weights:
            array = np.ascontiguousarray(weight.numpy())
            digest.update(f"{weight.path}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def chunks_key(waveforms: np.ndarray) -> str:
    """sha256 of the decoded chunks (their shape, dtype and bytes)."""
    array = np.ascontiguousarray(waveforms)
    digest = hashlib.sha256(f"{array.dtype}:{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """Embeddings of chunk sets under one folder; `note` receives the one-line messages (default: stderr)."""

    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 note: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.note = note or (lambda line: print(line, file=sys.stderr))
        self.hits = 0
        self.misses = 0

    def get(self, front_end: str, waveforms: np.ndarray, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The embeddings of `waveforms` under `front_end`: read if a valid entry exists, else computed and stored."""
        key = hashlib.sha256(f"{front_end}/{chunks_key(waveforms)}".encode()).hexdigest()
        path = self.folder / f"{key}{SUFFIX}"
        if path.exists():
            found, problem = read_entry(path, key, len(waveforms))
            if found is not None:
                self.hits += 1
                os.utime(path)  # least recently used goes first
                return found
            self.note(f"embedding cache: {path}: {problem}; rebuilding it")
        self.misses += 1
        embeddings = np.ascontiguousarray(compute(), dtype=np.float32)
        self._store(path, key, embeddings)
        return embeddings

    def _store(self, path: Path, key: str, embeddings: np.ndarray) -> None:
        payload = embeddings.tobytes()
        header = {"key": key, "shape": list(embeddings.shape), "dtype": "float32",
                  "sha256": hashlib.sha256(payload).hexdigest()}
        try:
            mark_folder(self.folder)
            with atomic_path(path) as tmp, tmp.open("wb") as f:
                f.write(MAGIC + json.dumps(header).encode() + b"\n")
                f.write(payload)
            evicted = self._bound(keep=path)
        except OSError as exc:  # a full or read-only disk costs the cache, not the training
            self.note(f"embedding cache: cannot write {path} ({exc.strerror or exc}); using the embeddings "
                      "without caching them")
            return
        size, count = folder_size(self.folder)
        gone = f", {evicted} least recently used removed" if evicted else ""
        self.note(f"embedding cache {self.folder}: {count} entries, {size / 2**20:.1f} MiB "
                  f"(bound {self.max_bytes / 2**20:.0f} MiB{gone})")

    def _bound(self, keep: Path) -> int:
        """Remove least recently used entries until the folder fits `max_bytes` (never `keep`); how many went."""
        entries = sorted(_entries(self.folder), key=lambda p: _stat(p)[1])
        total = sum(_stat(p)[0] for p in entries)
        removed = 0
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            total -= _stat(entry)[0]
            entry.unlink(missing_ok=True)
            removed += 1
        return removed


def read_entry(path: Path, key: str, rows: int) -> tuple[np.ndarray | None, str]:
    """``(embeddings, "")`` if `path` is a complete entry for `key` with `rows` rows, else ``(None, what is wrong)``."""
    try:
        with path.open("rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None, "not a dsl_fed embedding file"
            header = json.loads(f.readline())
            payload = f.read()
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"
    if not isinstance(header, dict) or header.get("key") != key:
        return None, "holds another key (a foreign or renamed file)"
    shape = header.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n >= 0 for n in shape)):
        return None, "damaged header"
    expected = shape[0] * shape[1] * 4
    if len(payload) != expected:
        return None, f"truncated ({len(payload)} of {expected} payload bytes)"
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return None, "checksum mismatch (damaged)"
    if shape[0] != rows:
        return None, f"holds {shape[0]} rows, expected {rows}"
    return np.frombuffer(payload, dtype=np.float32).reshape(shape).copy(), ""


def mark_folder(folder: Path) -> None:
    """Create `folder` with our ``CACHEDIR.TAG``; refuse a folder that holds files but no tag of ours."""
    tag = folder / TAG_FILE
    if tag.is_file() and tag.read_text(errors="replace") == TAG_TEXT:
        return
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OSError(f"{folder} is not an empty folder nor a dsl_fed embedding cache")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(tag, TAG_TEXT)


def is_cache_folder(folder: Path) -> bool:
    tag = Path(folder) / TAG_FILE
    return tag.is_file() and tag.read_text(errors="replace") == TAG_TEXT


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, entries) of the cache entries in `folder`."""
    entries = list(_entries(folder))
    return sum(_stat(p)[0] for p in entries), len(entries)


def clear(folder: str | Path) -> tuple[int, int]:
    """Remove a cache folder's entries, temporary files and tag (then the folder, if empty); (bytes, entries) freed.

    Raises:
        DslFedError: `folder` is not a dsl_fed embedding cache (nothing is removed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DslFedError(f"{folder}: no such folder")
    if not is_cache_folder(folder):
        raise DslFedError(f"{folder}: not a dsl_fed embedding cache (no {TAG_FILE} of ours); nothing was removed")
    size, count = folder_size(folder)
    for path in folder.iterdir():
        ours = path.suffix == SUFFIX or (path.name.startswith(".") and path.name.endswith(f".tmp{SUFFIX}"))
        if path.is_file() and ours:
            path.unlink(missing_ok=True)
    (folder / TAG_FILE).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
    return size, count


def _entries(folder: Path):
    if folder.is_dir():
        yield from (p for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".") and p.is_file())


def _stat(path: Path) -> tuple[int, float]:
    try:
        st = path.stat()
    except FileNotFoundError:  # another process evicted it meanwhile
        return 0, 0.0
    return st.st_size, st.st_mtime


__all__ = ["EmbeddingCache", "run_folder", "for_config", "front_end_key", "chunks_key", "read_entry", "clear",
           "folder_size", "is_cache_folder"]
