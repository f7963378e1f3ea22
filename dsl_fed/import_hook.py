"""Run a package's module code inside a context manager the first time it is imported.

Some packages misbehave only while they load (TensorFlow writes to stderr before any log level applies; native
module initialisation mishandles a KeyboardInterrupt). Wrapping their import where it happens, whoever imports
them first, keeps the fix in one place instead of around every ``import`` statement.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager


def wrap_first_import(names: Collection[str], around: Callable[[], AbstractContextManager]) -> None:
    """From now on, the first import of each top-level package in `names` runs its module code inside
    ``around()`` (idempotent for the same `around`)."""
    if not any(isinstance(f, _WrappedImport) and f.around is around for f in sys.meta_path):
        sys.meta_path.insert(0, _WrappedImport(frozenset(names), around))


class _WrappedImport(importlib.abc.MetaPathFinder):
    """Finds one of `names` through the other finders and wraps its loader's ``exec_module`` in `around`."""

    def __init__(self, names: frozenset[str], around: Callable[[], AbstractContextManager]) -> None:
        self.names = names
        self.around = around

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with self.around():
                run(module)

        spec.loader.exec_module = exec_module
        return spec
