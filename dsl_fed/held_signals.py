"""Ctrl-C and SIGTERM held while native libraries import, delivered right after.

Python raises KeyboardInterrupt between any two bytecodes, also in Python code that native module
initialisation runs. There it is mishandled: pybind11 (TensorFlow, optree) aborts the process ("terminate called
after throwing pybind11::error_already_set"), other extensions clear the error and the command runs on as if
never interrupted, and importlib's module-lock callbacks print it as "Exception ignored". Blocking the two
signals for the few seconds an import takes makes the kernel keep them pending; the handler runs as soon as
the import is done, in code that handles it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from dsl_fed.import_hook import wrap_first_import

SIGNALS = {signal.SIGINT, signal.SIGTERM}

# Top-level packages whose import runs native initialisation (pybind11, LLVM, C extensions with Python calls).
NATIVE_PACKAGES = frozenset({
    "numpy", "scipy", "sklearn", "numba", "llvmlite", "librosa", "soundfile", "tensorflow", "keras", "optree",
    "ml_dtypes", "h5py", "ai_edge_litert", "ray", "flwr", "grpc", "matplotlib", "PIL", "psutil", "yaml",
    "cryptography", "dp_accounting", "tqdm",
})


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stay pending inside the block (this thread; others started in it inherit the mask)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def hold_signals_during_native_imports() -> None:
    """From now on, the first import of each package in `NATIVE_PACKAGES` runs with the signals held."""
    wrap_first_import(NATIVE_PACKAGES, held_signals)
