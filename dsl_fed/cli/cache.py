"""`dsl_fed cache info|clear DIR`: the size of an embedding cache folder, or remove it.

A run's cache is ``.<output.name>.embeddings`` beside its run folder; a SuperNode's is its ``cache-path`` or
``.dsl_fed_cache`` in its data folder. Only a folder marked as a dsl_fed embedding cache is touched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsl_fed.errors import DslFedError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache",
        help="show the size of a phase-1 embedding cache folder, or remove it",
        description="Phase 1 keeps backbone embeddings in a cache folder on the machine holding the audio; "
        "'info' reports its size, 'clear' removes it (only a folder marked as a dsl_fed embedding cache).",
    )
    p.add_argument("action", choices=("info", "clear"), help="info: entries and size; clear: remove the cache")
    p.add_argument("folder", metavar="DIR", type=Path, help="the cache folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsl_fed import embedding_cache

    folder: Path = args.folder
    if args.action == "clear":
        size, count = embedding_cache.clear(folder)
        print(f"{folder}: removed {count} entries, {size / 2**20:.1f} MiB")
        return 0
    if not embedding_cache.is_cache_folder(folder):
        raise DslFedError(f"{folder}: not a dsl_fed embedding cache")
    size, count = embedding_cache.folder_size(folder)
    print(f"{folder}: {count} entries, {size / 2**20:.1f} MiB")
    return 0
