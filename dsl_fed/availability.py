"""Which clients are online in which round (``federated.availability``): the trace file and a diurnal generator.

Real fleets are not all there at once: phones train while charging on Wi-Fi, mostly at night in their own time
zone. A trace names, per client, the rounds it is online; the server samples each round among the online clients
only (`dsl_fed.federated.strategy`).

The file is a CSV with the header ``client,online_from,online_to`` and one row per online interval: ``client`` is
the client id (a simulation's partition id, 0..N-1; a deployed node's random id from its ``.dsl_fed_node_id``),
``online_from`` / ``online_to`` are 1-based rounds, inclusive. A client may have several rows (one per day, say);
overlapping rows simply add up. **A client without a row is never online**: the file says when each client is
there, and a client it does not describe is not there - a forgotten or mistyped row then keeps one client out
(logged by the server) instead of silently giving it every round, which would over-weight it.

This module needs no Flower: ``dsl_fed make-availability`` and the config checks use it before anything starts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsl_fed.config import MAX_COUNT
from dsl_fed.errors import DslFedError

HEADER = ("client", "online_from", "online_to")
MAX_ROUND = MAX_COUNT  # the config's bound on rounds: a larger round is a typo
MAX_CLIENT = 10**9  # client ids are below this (`dsl_fed.data.nodes.NODE_ID_RANGE`, a test keeps them equal)


@dataclass(frozen=True)
class Trace:
    """Online intervals per client: client id -> ``[(from, to), ...]`` (1-based rounds, inclusive)."""

    intervals: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    source: str = field(default="", compare=False)  # the file (or "diurnal"), for messages
    rows: dict[int, int] = field(default_factory=dict, compare=False)  # client -> CSV line of its first row

    def online(self, client: int, server_round: int) -> bool:
        """Whether `client` is online in (1-based, absolute) round `server_round`; False for a client without rows."""
        return any(start <= server_round <= end for start, end in self.intervals.get(client, ()))

    def online_clients(self, server_round: int) -> list[int]:
        """The clients online in `server_round`, in id order."""
        return [c for c in sorted(self.intervals) if self.online(c, server_round)]

    def first_round(self, client: int) -> int | None:
        """The first round `client` is online in, None if it has no row."""
        return min((start for start, _ in self.intervals.get(client, ())), default=None)

    @property
    def clients(self) -> list[int]:
        """Every client the trace has a row for."""
        return sorted(self.intervals)

    def share(self, num_clients: int, rounds: int) -> float:
        """Mean share of `num_clients` clients (ids 0..n-1) online over rounds 1..`rounds`."""
        online = np.zeros((num_clients, rounds), bool)
        for client in range(num_clients):
            for start, end in self.intervals.get(client, ()):
                online[client, start - 1:end] = True
        return float(online.mean())

    def check_clients(self, num_clients: int, what: str = "the federation") -> None:
        """Refuse ids outside 0..num_clients-1 (a simulation's partition ids), naming the first one and its row.

        Raises:
            DslFedError: ``file:row: client C is not in the federation ...``.
        """
        outside = [c for c in self.clients if c >= num_clients]
        if outside:
            where = f"{self.source}:{self.rows[outside[0]]}" if outside[0] in self.rows else self.source
            raise DslFedError(f"{where}: client {outside[0]} is not in {what} (client ids 0-{num_clients - 1}; "
                              f"{len(outside)} such client(s) in the file)")


def read_trace(path: str | Path, num_clients: int | None = None) -> Trace:
    """Read and check an availability CSV (see the module docstring); `num_clients` also bounds the ids.

    Raises:
        DslFedError: one line naming ``file:row`` (the CSV line) and what is wrong.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DslFedError(f"{path}: availability trace not found (federated.availability)") from None
    except IsADirectoryError:
        raise DslFedError(f"{path}: is a folder, expected an availability CSV (federated.availability)") from None
    except OSError as exc:
        raise DslFedError(f"{path}: cannot read the availability trace ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DslFedError(f"{path}: not UTF-8 text (byte {exc.start}); an availability trace is a CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or tuple(cell.strip() for cell in header) != HEADER:
            found = ",".join(header) if header else "nothing"
            raise DslFedError(f"{path}:1: expected the header {','.join(HEADER)}, found {found[:80]!r}")
        intervals: dict[int, list[tuple[int, int]]] = {}
        first_rows: dict[int, int] = {}
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(HEADER):
                raise DslFedError(f"{path}:{line}: expected {len(HEADER)} values ({','.join(HEADER)}), "
                                  f"found {len(row)}")
            client, start, end = (_whole(path, line, name, cell) for name, cell in zip(HEADER, row, strict=True))
            if client >= MAX_CLIENT:
                raise DslFedError(f"{path}:{line}: client {client} is not a client id (ids are below {MAX_CLIENT})")
            if not 1 <= start <= MAX_ROUND:
                raise DslFedError(f"{path}:{line}: online_from {start} must be a round in 1..{MAX_ROUND} "
                                  "(rounds count from 1)")
            if not start <= end <= MAX_ROUND:
                raise DslFedError(f"{path}:{line}: online_to {end} must be in online_from..{MAX_ROUND} "
                                  f"(online_from is {start}; both rounds are inclusive)")
            intervals.setdefault(client, []).append((start, end))
            first_rows.setdefault(client, line)
    except csv.Error as exc:
        raise DslFedError(f"{path}:{reader.line_num}: not a valid CSV row ({exc})") from None
    if not intervals:
        raise DslFedError(f"{path}: no rows after the header: no client would ever be online")
    trace = Trace({c: tuple(sorted(v)) for c, v in intervals.items()}, str(path), first_rows)
    if num_clients is not None:
        trace.check_clients(num_clients)
    return trace


def _whole(path: Path, line: int, name: str, cell: str) -> int:
    text = cell.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise DslFedError(f"{path}:{line}: {name} must be a whole number >= 0, got {cell[:40]!r}")
    return int(text)


def diurnal_trace(num_clients: int, rounds: int, rounds_per_day: int = 24, online_share: float = 0.3,
                  seed: int = 0) -> Trace:
    """A synthetic diurnal trace: each client has a random phase (its time zone) and is online for the same
    contiguous ``round(online_share * rounds_per_day)`` rounds (at least one) of every simulated day.

    Over whole days every client is online exactly that share of the rounds (the request, rounded to whole
    rounds), and every client is online at least once a day. Deterministic per seed (a public, non-private
    generator: the trace is a test fixture, not a secret).
    """
    for name, value in (("num_clients", num_clients), ("rounds", rounds), ("rounds_per_day", rounds_per_day)):
        if not 1 <= value <= MAX_ROUND:
            raise DslFedError(f"{name} must be in [1, {MAX_ROUND}], got {value}")
    if not 0 < online_share <= 1:
        raise DslFedError(f"online share must be in (0, 1], got {online_share}")
    window = max(1, round(online_share * rounds_per_day))
    phases = np.random.default_rng(seed).integers(0, rounds_per_day, size=num_clients)
    r = np.arange(rounds)  # round r + 1
    online = (r[None, :] - phases[:, None]) % rounds_per_day < window
    return Trace({c: tuple(_runs(online[c])) for c in range(num_clients) if online[c].any()}, "diurnal")


def _runs(mask: np.ndarray) -> Iterable[tuple[int, int]]:
    """Maximal runs of True in `mask` as 1-based inclusive (from, to)."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        yield int(start) + 1, int(stop)


def trace_csv(trace: Trace) -> str:
    """The trace as the CSV `read_trace` reads: one row per interval, clients and intervals in order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for client in trace.clients:
        writer.writerows((client, start, end) for start, end in trace.intervals[client])
    return out.getvalue()


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` to `path` atomically; an existing file is refused (it is not this command's to replace).

    Raises:
        DslFedError: `path` exists (nothing was written).
    """
    from dsl_fed.io import atomic_write, check_output_file

    check_output_file(path, what="availability trace")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, trace_csv(trace))
