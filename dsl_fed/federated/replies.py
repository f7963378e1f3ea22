"""A node's reply is untrusted input: every field is checked before the server uses any of it.

An authenticated node can still send whatever a Flower record holds: a list where a number belongs (MetricRecord
allows lists), NaN, arrays of another shape or dtype, bytes that do not decode, extra or missing keys, records
under other names. The server must neither raise on such a reply - one node would end the run for everybody,
and Flower's own strategies raise when replies disagree on their keys - nor let it into an aggregate.
`check_train_reply` and `check_evaluate_reply` return why a reply is refused (the server logs it against the
node and goes on without it), or None. A reply that passes has exactly the records and keys listed here, with
values of the stated kinds, so Flower's consistency checks cannot fail on it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
from flwr.app import RecordDict

ARRAYS, METRICS = "arrays", "metrics"  # the record names every reply uses
NODE_ID_LIMIT = 2**31  # `partition-id`: a simulation's shard index or a deployed node's random id, below this
NORM_BIT = "norm_bit"  # what Flower's adaptive clipping mod adds: whether the node clipped its update

# train reply metric -> kind; the first two are required, the rest optional (sent without DP only)
TRAIN_METRICS = {"num-examples": "count", "partition-id": "id", "train-loss": "number", "train-uar": "number",
                 "train-seconds": "number", "work-seconds": "number"}
REQUIRED_TRAIN = ("num-examples", "partition-id")


def check_train_reply(content: RecordDict, shapes: Mapping[str, tuple[int, ...]], dtypes: Collection[str],
                      norm_bit: bool = False) -> str | None:
    """Why a training reply must not be aggregated, or None.

    Args:
        content: The reply's RecordDict.
        shapes: Weight name -> shape of the slice the node was sent (exactly these names must come back).
        dtypes: Array dtypes accepted (float32 and the run's transfer dtype).
        norm_bit: The node runs Flower's adaptive clipping mod (``norm_bit`` required, else refused).
    """
    try:
        return _check_train(content, shapes, dtypes, norm_bit)
    except Exception as exc:  # noqa: BLE001 - a record that cannot even be read is refused, never raised
        return f"unreadable reply ({type(exc).__name__}: {str(exc)[:100]})"


def check_evaluate_reply(content: RecordDict, parts: Collection[str], num_classes: int | None) -> str | None:
    """Why an evaluation reply must not be summed, or None.

    A reply carries ``num-examples`` and one ``<part>-confusion`` per requested part (`parts`): the flattened
    class x class counts of the node's clip-level predictions, whose total is ``num-examples``.
    """
    try:
        return _check_evaluate(content, parts, num_classes)
    except Exception as exc:  # noqa: BLE001
        return f"unreadable reply ({type(exc).__name__}: {str(exc)[:100]})"


def _check_train(content: RecordDict, shapes: Mapping[str, tuple[int, ...]], dtypes: Collection[str],
                 norm_bit: bool) -> str | None:
    problem = _records(content, arrays=True)
    if problem:
        return problem
    metrics = content[METRICS]
    kinds = {**TRAIN_METRICS, **({NORM_BIT: "bit"} if norm_bit else {})}
    problem = _keys(set(metrics.keys()), set(kinds), {*REQUIRED_TRAIN, *([NORM_BIT] if norm_bit else [])}, "metric")
    if problem:
        return problem
    for key, value in metrics.items():
        problem = _value(key, value, kinds[key])
        if problem:
            return problem
    arrays = content[ARRAYS]
    problem = _keys(set(arrays.keys()), set(shapes), set(shapes), "weight")
    if problem:
        return problem
    for name in shapes:
        array = arrays[name].numpy()
        if array.dtype.name not in dtypes:
            return f"{name} has dtype {array.dtype.name}, expected {' or '.join(sorted(dtypes))}"
        if array.shape != tuple(shapes[name]):
            return f"{name} has shape {array.shape}, expected {tuple(shapes[name])}"
        if not np.all(np.isfinite(array)):
            return f"non-finite values in {name}"
    return None


def _check_evaluate(content: RecordDict, parts: Collection[str], num_classes: int | None) -> str | None:
    problem = _records(content, arrays=False)
    if problem:
        return problem
    metrics = content[METRICS]
    expected = {"num-examples", *(f"{part}-confusion" for part in parts)}
    problem = _keys(set(metrics.keys()), expected, expected, "metric")
    if problem:
        return problem
    problem = _value("num-examples", metrics["num-examples"], "count", minimum=0)
    if problem:
        return problem
    total = 0
    for part in parts:
        key, counts = f"{part}-confusion", metrics[f"{part}-confusion"]
        if not isinstance(counts, list) or not all(type(c) is int and c >= 0 for c in counts):
            return f"{key} must be a list of whole counts >= 0"
        side = math.isqrt(len(counts))
        if side * side != len(counts) or side < 2 or (num_classes is not None and side != num_classes):
            return f"{key} has {len(counts)} counts, expected {num_classes or 'k'} x {num_classes or 'k'}"
        total += sum(counts)
    if total != metrics["num-examples"]:
        return f"num-examples {metrics['num-examples']} is not the {total} clips the confusion counts hold"
    return None


def _records(content: RecordDict, arrays: bool) -> str | None:
    """Exactly the expected records: one MetricRecord (and one ArrayRecord for training), nothing else."""
    found = {"ArrayRecord": set(content.array_records), "MetricRecord": set(content.metric_records),
             "ConfigRecord": set(content.config_records)}
    wanted = {"ArrayRecord": {ARRAYS} if arrays else set(), "MetricRecord": {METRICS}, "ConfigRecord": set()}
    for kind, keys in found.items():
        if keys != wanted[kind]:
            return f"expected {kind} {sorted(wanted[kind]) or 'none'}, got {sorted(keys) or 'none'}"
    return None


def _keys(found: set[str], allowed: set[str], required: set[str], what: str) -> str | None:
    missing, extra = sorted(required - found), sorted(found - allowed)
    if missing or extra:
        return f"{what}s do not match (missing {missing[:3]}, unexpected {extra[:3]})"
    return None


def _value(key: str, value: object, kind: str, minimum: int = 1) -> str | None:
    """One metric against its kind; `bool` is an int to Python, but never a count, id or number here."""
    if kind in ("count", "id"):
        if type(value) is not int:
            return f"{key} must be a whole number, got {type(value).__name__} {_short(value)}"
        low, high = (minimum, math.inf) if kind == "count" else (0, NODE_ID_LIMIT - 1)
        if not low <= value <= high:
            return f"{key} {value} outside [{low}, {high:g}]"
    elif kind == "bit":
        if type(value) not in (int, bool) or value not in (0, 1):
            return f"{key} must be 0 or 1, got {_short(value)}"
    elif type(value) not in (int, float) or not math.isfinite(value):
        return f"{key} must be a finite number, got {type(value).__name__} {_short(value)}"
    return None


def _short(value: object) -> str:
    return repr(value)[:40]


def short_reason(reason: str | None) -> str:
    """The client's own error message out of the Ray traceback Flower wraps it in."""
    text = (reason or "unknown error").strip()
    _, found, message = text.rpartition("Message: ")
    if found:
        text = message
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error").removesuffix("'>")[:300]
