"""The TFLite export precisions and their short labels, shared by `dsl_fed.export` and `dsl_fed.stats`.

Kept in a module of their own so that neither of the two has to import the other for them (they used to import
each other).
"""

from __future__ import annotations

__all__ = ["QUANT_LABELS", "QUANTIZATIONS"]

# precision -> label in folder names (tflite_<label>) and tables
QUANT_LABELS: dict[str, str] = {"none": "fp32", "float16": "fp16", "dynamic": "dynamic", "int8": "int8"}
QUANTIZATIONS: tuple[str, ...] = tuple(QUANT_LABELS)
