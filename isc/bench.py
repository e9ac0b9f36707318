"""Write-path microbenchmark: what a session adds to a host write, measured in this process.

For each LUN kind (a :class:`~isc.MemoryLUN`, and a :class:`~isc.FileLUN` in
``/dev/shm`` when it has room, else in the temporary directory) and each
write size, :func:`write_path` times rounds of ``count`` writes:

* ``no session``: the LUN's own ``write``, the baseline;
* at every granularity, ``Session.write`` in three states: ``unmarked``;
  ``marked, no COFW`` (marked with an empty tracking bitmap, so nothing is
  in the transfer bitmap and no write needs a save); ``marked, COFW`` (a full
  mark before each round, so every write is the first one to its chunks and
  saves all of them to an in-memory save area).

Every write of a round lies in a slot of its own (64 KiB, or the write size
rounded up to 64 KiB), at a seeded offset aligned to the write size, so no two
writes of a round share a chunk at any granularity. The LUN is written once
over before timing, so no timed write allocates a page. Each figure is the
median over ``repeats`` rounds after ``warmup`` rounds, in nanoseconds per
write; the loop's own cost is in every row, the baseline's included. Each
case's rounds alternate with rounds of the baseline on the same LUN, offsets
and data, so both see the same machine load: a row's ``overhead`` is its
median over that paired baseline median, minus one, and the ``no session``
row is the median of all the baseline medians. Nothing is asserted on time: the figures are for
reading side by side. The ``benchmarks/`` pytest-benchmark suites measure
the same rows with more statistics.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from isc import _plot
from isc._layout import MAX_GRANULARITY, MIN_GRANULARITY, check_geometry
from isc._units import format_bytes, size_label
from isc.errors import IscError, ParameterError
from isc.lun import FileLUN, MemoryLUN
from isc.savearea import SaveArea
from isc.session import Session

__all__ = [
    "CASES",
    "DEFAULT_GRANULARITIES",
    "DEFAULT_SIZES",
    "LUN_KINDS",
    "BenchError",
    "BenchRow",
    "WritePathBench",
    "write_path",
]

DEFAULT_GRANULARITIES = tuple(MIN_GRANULARITY << i for i in range(6))
DEFAULT_SIZES = (4096, 65536)
LUN_KINDS = ("memory", "file")
CASES = ("no session", "unmarked", "marked, no COFW", "marked, COFW")
MAX_WRITE = 16 << 20
SEED = 20261124
_SHM = Path("/dev/shm")
_PAGE = 64 << 20  # bytes per write when filling the LUN before timing


class BenchError(IscError, RuntimeError):
    """A benchmark round did not do what it should have (a write lost, a save missing)."""


@dataclass(frozen=True)
class BenchRow:
    """One timed case."""

    lun: str
    """``"MemoryLUN"`` or ``"FileLUN"``."""
    where: str
    """Where the LUN lives: ``"memory"``, ``"tmpfs"`` or ``"tmp dir"``."""
    write_size: int
    """Bytes per write."""
    case: str
    """One of :data:`CASES`."""
    granularity: int | None
    """Chunk size in bytes; None for ``no session``."""
    ns_per_write: float
    """Median nanoseconds per write."""
    overhead: float
    """``ns_per_write`` over the LUN's own write timed in alternating rounds with this
    case, minus 1 (0 for the ``no session`` row itself)."""

    @property
    def writes_per_second(self) -> float:
        """Host writes per second at ``ns_per_write``."""
        return 1e9 / self.ns_per_write


@dataclass(frozen=True)
class WritePathBench:
    """The result of :func:`write_path`."""

    count: int
    repeats: int
    warmup: int
    lun_size: int
    rows: tuple[BenchRow, ...]

    def to_dict(self) -> dict:
        """Parameters and rows as plain JSON-ready types (``writes_per_second`` included)."""
        out = {key: value for key, value in asdict(self).items() if key != "rows"}
        out["rows"] = [
            {**asdict(row), "writes_per_second": row.writes_per_second} for row in self.rows
        ]
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self) -> str:
        """The rows as a table for a terminal, with a line on how they were measured."""
        lines = [
            f"host write path: {self.count} writes per round, median of {self.repeats} rounds "
            f"after {self.warmup} warm-up; LUNs of {format_bytes(self.lun_size, long=True)}",
            "",
        ]
        cells = [("lun", "where", "write", "case", "gran", "ns/write", "writes/s", "overhead")]
        for row in self.rows:
            cells.append(
                (
                    row.lun,
                    row.where,
                    size_label(row.write_size),
                    row.case,
                    "-" if row.granularity is None else size_label(row.granularity),
                    f"{row.ns_per_write:.0f}",
                    f"{row.writes_per_second:,.0f}",
                    "baseline" if row.granularity is None else f"{row.overhead:+.0%}",
                )
            )
        widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
        right = {5, 6, 7}
        for line in cells:
            lines.append(
                "  ".join(
                    c.rjust(w) if i in right else c.ljust(w)
                    for i, (c, w) in enumerate(zip(line, widths, strict=True))
                ).rstrip()
            )
        lines += ["", "overhead: ns/write over the LUN's own write (no session), minus 1"]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike[str]) -> None:
        """ns per write against granularity, one panel per LUN and write size, to a PNG.

        Raises ``PlotUnavailable`` (an IscError) when matplotlib is not
        installed; ``OSError`` when ``path`` cannot be written.
        """
        panels = sorted({(row.lun, row.write_size) for row in self.rows})
        fig = _plot.figure(4.5 * len(panels), 4)
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, (lun, size) in zip(axes, panels, strict=True):
            rows = [row for row in self.rows if (row.lun, row.write_size) == (lun, size)]
            grans = sorted({row.granularity for row in rows if row.granularity is not None})
            for case, style in zip(CASES[1:], ("o-", "s--", "^:"), strict=True):
                points = sorted(
                    (row.granularity, row.ns_per_write) for row in rows if row.case == case
                )
                ax.plot(*zip(*points, strict=True), style, label=case)
            (base,) = [row.ns_per_write for row in rows if row.granularity is None]
            ax.axhline(base, color="black", linewidth=1, label="no session (LUN write)")
            _plot.granularity_axis(ax, grans, size_label)
            ax.set_yscale("log")
            ax.set_ylabel("ns per host write (median, log scale)")
            ax.set_title(f"{lun}, {size_label(size)} writes")
            ax.legend(fontsize="small")
        fig.savefig(os.fspath(path), format="png", dpi=100)


def _positive_int(name: str, value, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name} must be an integer >= 1, got {value!r}")
    if limit is not None and value > limit:
        raise ParameterError(f"{name} must be at most {limit}, got {value}")
    return int(value)


@contextlib.contextmanager
def _lun(kind: str, size: int, directory: str | os.PathLike[str] | None) -> Iterator:
    """A LUN of ``size`` bytes, written over once; yields ``(lun, where)``."""
    if kind == "memory":
        memory = MemoryLUN(size)
        try:
            _fill(memory)
            yield memory, "memory"
        finally:
            memory.close()
        return
    if directory is None and _SHM.is_dir() and shutil.disk_usage(_SHM).free >= 2 * size:
        directory = _SHM
    with tempfile.TemporaryDirectory(prefix="isc-bench-", dir=directory) as tmp:
        where = "tmpfs" if Path(tmp).parent == _SHM else "tmp dir"
        with FileLUN.create(Path(tmp) / "lun.img", size) as lun:
            _fill(lun)
            yield lun, where


def _fill(lun) -> None:
    zeros = bytes(min(_PAGE, lun.size))
    for start in range(0, lun.size, len(zeros)):
        lun.write(start, memoryview(zeros)[: min(len(zeros), lun.size - start)])


def _paired_medians(
    write: Callable[[int, bytes], object],
    baseline: Callable[[int, bytes], object],
    offsets: list[int],
    data: bytes,
    repeats: int,
    warmup: int,
    before: Callable[[], object],
) -> tuple[float, float]:
    """Median ns per write of ``write`` and of ``baseline``, in alternating rounds.

    Each of ``warmup + repeats`` rounds times the baseline, calls ``before``
    (untimed), then times ``write``; the first ``warmup`` rounds are not
    counted. Alternating keeps both figures under the same machine load. The
    garbage collector is off while timing, as ``timeit`` does.
    """
    samples: tuple[list[float], list[float]] = ([], [])
    clock = time.perf_counter_ns
    collecting = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(warmup + repeats):
            for which, target in ((1, baseline), (0, write)):
                if which == 0:
                    before()
                start = clock()
                for offset in offsets:
                    target(offset, data)
                elapsed = clock() - start
                if round_ >= warmup:
                    samples[which].append(elapsed / len(offsets))
    finally:
        if collecting:
            gc.enable()
    return statistics.median(samples[0]), statistics.median(samples[1])


def write_path(
    granularities: Iterable[int] = DEFAULT_GRANULARITIES,
    sizes: Iterable[int] = DEFAULT_SIZES,
    *,
    count: int = 1024,
    repeats: int = 5,
    warmup: int = 1,
    luns: Sequence[str] = LUN_KINDS,
    directory: str | os.PathLike[str] | None = None,
) -> WritePathBench:
    """Time host writes with and without a session (see the module docstring).

    ``granularities`` are chunk sizes in bytes (powers of two, 2 KiB to 64
    KiB), ``sizes`` write sizes in bytes (1 to 16 MiB), ``count`` writes per
    round, ``repeats`` timed rounds per case after ``warmup`` untimed ones,
    ``luns`` a subset of ``("memory", "file")``; ``directory`` holds the
    FileLUN's file (default: ``/dev/shm`` when it has room, else the
    temporary directory). The LUNs take ``count`` slots of at least 64 KiB
    each, and the COFW case a save area as large, in memory.

    Raises ``ParameterError`` for a bad parameter (``TypeError`` for a
    granularity that is not an integer), ``BenchError`` when a round
    did not save what it should have, ``OSError`` when the file cannot be made.
    """
    grans = sorted(set(granularities))
    for g in grans:
        check_geometry(MAX_GRANULARITY, g)
    write_sizes = sorted({_positive_int("write size", s, MAX_WRITE) for s in sizes})
    if not grans or not write_sizes:
        raise ParameterError("give at least one granularity and one write size")
    count = _positive_int("count", count)
    repeats = _positive_int("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ParameterError(f"warmup must be an integer >= 0, got {warmup!r}")
    kinds = list(dict.fromkeys(luns))
    unknown = [kind for kind in kinds if kind not in LUN_KINDS]
    if unknown or not kinds:
        raise ParameterError(f"luns must be some of {LUN_KINDS}, got {list(luns)!r}")
    slot = -(-max(write_sizes) // MAX_GRANULARITY) * MAX_GRANULARITY
    lun_size = count * slot
    rows: list[BenchRow] = []
    for kind in kinds:
        with _lun(kind, lun_size, directory) as (lun, where):
            for size in write_sizes:
                rows += _bench_size(lun, where, size, slot, grans, count, repeats, warmup)
    return WritePathBench(count, repeats, int(warmup), lun_size, tuple(rows))


def _bench_size(lun, where, size, slot, grans, count, repeats, warmup) -> list[BenchRow]:
    rng = np.random.default_rng([SEED, size])
    within = rng.integers(0, slot // size, count) * size
    offsets = (rng.permutation(count) * slot + within).tolist()
    data = rng.bytes(size)
    name = type(lun).__name__

    base_samples = []
    rows = []
    for g in grans:
        touched = sum(
            (offset + size - 1) // g - offset // g + 1 for offset in offsets
        )  # chunks a round saves in the COFW case
        for case in CASES[1:]:
            session = Session(lun, g, SaveArea(count * slot), name=f"bench {g}")
            ns, base = _paired_medians(
                session.write, lun.write, offsets, data, repeats, warmup, _prepare(session, case)
            )
            stats = session.stats
            expected = touched * (warmup + repeats) if case == "marked, COFW" else 0
            session.unmark()
            if stats.aborts or stats.cofw_chunks != expected:
                raise BenchError(
                    f"{case} at granularity {g}: {stats.cofw_chunks} COFW chunks where "
                    f"{expected} were due ({stats.last_abort or 'no abort'})"
                )
            rows.append(BenchRow(name, where, size, case, g, ns, ns / base - 1))
            base_samples.append(base)
    base = statistics.median(base_samples)
    rows.insert(0, BenchRow(name, where, size, "no session", None, base, 0.0))
    if lun.read(offsets[-1], size) != data:
        raise BenchError(f"{name}: the benchmark's writes did not land")
    return rows


def _prepare(session: Session, case: str) -> Callable[[], object]:
    """Put ``session`` in the state of ``case``; return what to do before each round."""
    if case == "marked, no COFW":
        session.mark()  # tracking is empty, so the transfer bitmap is too
    if case != "marked, COFW":
        return _nothing

    def full_mark() -> None:
        session.unmark()
        session.mark(full=True)

    return full_mark


def _nothing() -> None:
    """Nothing to do before a round."""
