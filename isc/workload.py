"""Workloads: streams of host I/O to replay through a session or to analyse.

A workload serves two uses: measuring what tracking costs on the host write
path (:func:`replay` the same workload onto a LUN and onto a session) and
choosing the granularity for a real workload (simulate periodic updates over a
recorded trace). It comes from a seeded generator (:func:`uniform`,
:func:`hotspot`, :func:`sequential`, :func:`mixed`) or from a block trace read
line by line (:func:`read_trace`: MSR Cambridge CSV, ``blkparse`` text, fio
``write_iolog`` versions 2 and 3, told apart by their first line when the
format is not given: :func:`detect_format`). ``str(workload)`` describes a
workload in words for reports.

Representation
--------------
A workload is an iterable of :class:`IOBatch` es: four parallel 1-D numpy
arrays, so a consumer handles a whole batch per call::

    for batch in workload:
        w = batch.write
        bitmap.record_writes(batch.offset[w], batch.length[w])

========  =======  ===============================================================
column    dtype    meaning
========  =======  ===============================================================
time      float64  seconds since the workload's first I/O (which is at 0.0)
offset    int64    first byte of the I/O
length    int64    bytes, > 0
write     bool     True for a write, False for a read
========  =======  ===============================================================

Every workload made here keeps these promises (analysis code relies on them):

* each batch holds ``batch_size`` I/Os, the last one fewer, none is empty, so
  memory stays bounded by the batch size however long the trace;
* ``time`` never decreases along the whole stream, so a batch splits at an
  instant with ``numpy.searchsorted(batch.time, t)``;
* generated I/Os lie inside ``[0, volume_size)``; trace I/Os too when the
  reader is given a ``volume_size``;
* iterating again starts over and yields the same I/Os (a generator reseeds,
  a trace reader reopens its file). One iteration at a time per object: a
  trace reader's :class:`TraceStats` describe its latest iteration.

Generated workloads are deterministic for a given seed, whatever the batch
size: the batch size only changes how the same I/O sequence is cut.
"""

from __future__ import annotations

import abc
import gzip
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, NamedTuple

import numpy as np

from isc._units import format_bytes
from isc.errors import IscError, ParameterError

__all__ = [
    "DEFAULT_ALIGNMENT",
    "DEFAULT_BATCH_SIZE",
    "IO",
    "SECTOR_SIZE",
    "GeneratedWorkload",
    "IOBatch",
    "ReplayResult",
    "TraceError",
    "TraceReader",
    "TraceStats",
    "Workload",
    "detect_format",
    "hotspot",
    "mixed",
    "read_blkparse",
    "read_fio",
    "read_msr",
    "read_trace",
    "replay",
    "sequential",
    "uniform",
]

DEFAULT_BATCH_SIZE = 65536
"""I/Os per :class:`IOBatch` unless told otherwise."""

DEFAULT_ALIGNMENT = 4096
"""Bytes: generated offsets are multiples of it unless told otherwise."""

SECTOR_SIZE = 512
"""Bytes per sector in ``blkparse`` output."""

_INT64_MAX = (1 << 63) - 1
# Generators draw in blocks of this many I/Os whatever the batch size, so the
# I/O sequence depends on the seed alone.
_DRAW = 65536
# replay keeps write payloads of recently seen lengths up to this many bytes.
_PAYLOAD_CACHE = 64 << 20


class TraceError(IscError, ValueError):
    """A trace line that cannot be read: ``path``, 1-based ``lineno`` and ``reason``.

    ``lineno`` 0 means the file as a whole (an empty file whose format is to be detected).
    """

    def __init__(self, path: str, lineno: int, reason: str) -> None:
        super().__init__(f"{path}:{lineno}: {reason}" if lineno else f"{path}: {reason}")
        self.path = path
        self.lineno = lineno
        self.reason = reason


# -- I/O records and batches ---------------------------------------------------------


class IO(NamedTuple):
    """One host I/O: ``time`` in seconds, ``offset`` and ``length`` in bytes."""

    time: float
    offset: int
    length: int
    write: bool


# name, dtype, the array kinds accepted, what they hold
_COLUMNS = (
    ("time", np.float64, "fiu", "numbers"),
    ("offset", np.int64, "iu", "integers"),
    ("length", np.int64, "iu", "integers"),
    ("write", np.bool_, "b", "booleans"),
)


@dataclass(frozen=True, eq=False)
class IOBatch:
    """A batch of I/Os as four parallel 1-D arrays (see the module docstring).

    The constructor converts ``time`` to float64, ``offset`` and ``length`` to
    int64 (they must be integer arrays) and ``write`` to bool (it must be a
    bool array). Raises ``ParameterError`` (a ValueError) when a column is not
    1-D, has the wrong kind, or the lengths differ. It does not check values;
    the workloads of this module do.

    ``len(batch)`` is the number of I/Os, iterating yields :class:`IO`
    records, ``batch[i]`` is one :class:`IO` and ``batch[slice]``,
    ``batch[mask]`` or ``batch[indices]`` is a new batch.
    """

    time: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    write: np.ndarray

    def __post_init__(self) -> None:
        size = None
        for name, dtype, kinds, holds in _COLUMNS:
            column = np.asarray(getattr(self, name))
            if column.ndim != 1:
                raise ParameterError(f"IOBatch.{name} must be 1-D, got shape {column.shape}")
            if column.size and column.dtype.kind not in kinds:
                raise ParameterError(f"IOBatch.{name} must hold {holds}, got {column.dtype}")
            if size is not None and column.size != size:
                raise ParameterError(
                    f"IOBatch columns must have the same length: {name} has {column.size}, "
                    f"time has {size}"
                )
            size = column.size
            object.__setattr__(self, name, column.astype(dtype, copy=False))

    @classmethod
    def concat(cls, batches: Iterable[IOBatch]) -> IOBatch:
        """One batch holding the I/Os of ``batches`` in order (empty for none)."""
        batches = list(batches)
        if len(batches) == 1:
            return batches[0]
        return cls(
            *(
                np.concatenate([getattr(b, name) for b in batches] or [np.empty(0, dtype)])
                for name, dtype, _, _ in _COLUMNS
            )
        )

    def __len__(self) -> int:
        return len(self.offset)

    def __iter__(self) -> Iterator[IO]:
        columns = (self.time, self.offset, self.length, self.write)
        return map(IO._make, zip(*(c.tolist() for c in columns), strict=True))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            return IO(
                float(self.time[index]),
                int(self.offset[index]),
                int(self.length[index]),
                bool(self.write[index]),
            )
        return IOBatch(self.time[index], self.offset[index], self.length[index], self.write[index])

    def __repr__(self) -> str:
        writes = int(np.count_nonzero(self.write))
        return f"<IOBatch {len(self)} I/Os ({writes} writes)>"


def _rebatch(blocks: Iterable[IOBatch], size: int) -> Iterator[IOBatch]:
    """Recut a stream of batches into batches of ``size`` I/Os, the last one fewer."""
    pending: list[IOBatch] = []
    have = 0
    for block in blocks:
        while len(block):
            take = min(size - have, len(block))
            pending.append(block[:take])
            have += take
            block = block[take:]
            if have == size:
                yield IOBatch.concat(pending)
                pending, have = [], 0
    if have:
        yield IOBatch.concat(pending)


# -- parameter checks ----------------------------------------------------------------


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ParameterError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _real(name: str, value: Any, low: float, high: float = math.inf) -> float:
    """A finite real in ``[low, high]`` (``high=inf``: no upper bound)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ParameterError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        bound = f"between {low} and {high}" if math.isfinite(high) else f">= {low}"
        raise ParameterError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _positive_real(name: str, value: Any) -> float:
    value = _real(name, value, 0.0)
    if value == 0:
        raise ParameterError(f"{name} must be > 0, got {value}")
    return value


def _volume_size(value: Any) -> int:
    size = _integer("volume_size", value, 1)
    if size > _INT64_MAX:
        raise ParameterError(f"volume_size must be < 2**63 bytes, got {size}")
    return size


# -- generators ----------------------------------------------------------------------

_Draw = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""Draws the next n I/Os of a pattern: (offsets, lengths, writes)."""


class _Pattern(abc.ABC):
    """Where I/Os land, how large they are and which are writes: a workload minus time."""

    volume_size: int

    @abc.abstractmethod
    def sampler(self, rng: np.random.Generator) -> _Draw:
        """A stateful drawing function using ``rng``; each call continues the sequence."""


class _Placed(_Pattern):
    """One placement rule with an I/O size distribution, an alignment and a write fraction."""

    def __init__(
        self,
        volume_size: Any,
        io_size: int | Mapping[int, float],
        alignment: Any,
        write_fraction: Any,
    ) -> None:
        self.volume_size = _volume_size(volume_size)
        self.alignment = _integer("alignment", alignment, 1)
        self.write_fraction = _real("write_fraction", write_fraction, 0.0, 1.0)
        if isinstance(io_size, Mapping):
            if not io_size:
                raise ParameterError("io_size must name at least one size, got an empty mapping")
            sizes = [_integer("io_size", size, 1) for size in io_size]
            weights = np.array([_real("io_size weight", w, 0.0) for w in io_size.values()])
            if weights.sum() <= 0:
                raise ParameterError(f"io_size weights must not all be zero, got {dict(io_size)}")
        else:
            sizes = [_integer("io_size", io_size, 1)]
            weights = np.ones(1)
        too_big = [size for size in sizes if size > self.volume_size]
        if too_big:
            raise ParameterError(
                f"io_size {too_big[0]} bytes does not fit in the volume of "
                f"{self.volume_size} bytes; use smaller I/Os or a larger volume"
            )
        self.sizes = np.array(sizes, dtype=np.int64)
        self.weights = weights / weights.sum()

    def sampler(self, rng: np.random.Generator) -> _Draw:
        place = self._placer(rng)

        def draw(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if self.sizes.size == 1:
                lengths = np.full(n, self.sizes[0], dtype=np.int64)
            else:
                lengths = rng.choice(self.sizes, n, p=self.weights)
            offsets = place(lengths)
            return offsets, lengths, rng.random(n) < self.write_fraction

        return draw

    def _at(self, position: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Aligned offsets at ``position`` (in [0, 1)) of each I/O's range of valid starts."""
        slots = (self.volume_size - lengths) // self.alignment + 1
        slot = np.minimum((position * slots).astype(np.int64), slots - 1)
        return slot * self.alignment

    @abc.abstractmethod
    def _placer(self, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        """A stateful function from I/O lengths to their offsets."""


class _Uniform(_Placed):
    def _placer(self, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        return lambda lengths: self._at(rng.random(lengths.size), lengths)


class _Hotspot(_Placed):
    def __init__(self, *args: Any, skew: Any, regions: Any) -> None:
        super().__init__(*args)
        self.skew = _real("skew", skew, 0.0)
        self.regions = _integer("regions", regions, 1)
        popularity = np.arange(1, self.regions + 1, dtype=np.float64) ** -self.skew
        self.popularity = popularity / popularity.sum()

    def _placer(self, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        # The hottest regions are scattered over the volume, as a file
        # system scatters hot files: region of popularity rank i is by_rank[i].
        by_rank = rng.permutation(self.regions)

        def place(lengths: np.ndarray) -> np.ndarray:
            region = by_rank[rng.choice(self.regions, lengths.size, p=self.popularity)]
            return self._at((region + rng.random(lengths.size)) / self.regions, lengths)

        return place


class _Sequential(_Placed):
    def __init__(self, *args: Any, start: Any) -> None:
        super().__init__(*args)
        self.start = _integer("start", start, 0)
        if self.start % self.alignment or self.start >= self.volume_size:
            raise ParameterError(
                f"start {self.start} must be a multiple of the alignment {self.alignment} "
                f"below the volume size {self.volume_size}"
            )

    def _placer(self, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
        cursor = self.start

        def place(lengths: np.ndarray) -> np.ndarray:
            nonlocal cursor
            steps = -(-lengths // self.alignment) * self.alignment
            # before[j]: bytes the I/Os ahead of j advance the cursor. before + lengths
            # never decreases, so the I/Os that fit before the end of the volume are
            # a prefix found by binary search; the rest wrap to offset 0.
            before = np.cumsum(steps) - steps
            ends = before + lengths
            offsets = np.empty_like(lengths)
            i = 0
            while i < lengths.size:
                base = cursor - before[i]
                fit = int(np.searchsorted(ends[i:], self.volume_size - base, side="right"))
                if fit == 0:
                    cursor = 0
                    continue
                offsets[i : i + fit] = base + before[i : i + fit]
                i += fit
                cursor = int(base + before[i - 1] + steps[i - 1])
            return offsets

        return place


class _Mixed(_Pattern):
    def __init__(self, patterns: Sequence[_Pattern], weights: np.ndarray) -> None:
        self.patterns = patterns
        self.weights = weights
        self.volume_size = patterns[0].volume_size

    def sampler(self, rng: np.random.Generator) -> _Draw:
        draws = [pattern.sampler(rng) for pattern in self.patterns]

        def draw(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            which = rng.choice(len(draws), n, p=self.weights)
            offsets = np.empty(n, dtype=np.int64)
            lengths = np.empty(n, dtype=np.int64)
            writes = np.empty(n, dtype=np.bool_)
            for component, component_draw in enumerate(draws):
                picked = np.flatnonzero(which == component)
                if picked.size:
                    offsets[picked], lengths[picked], writes[picked] = component_draw(picked.size)
            return offsets, lengths, writes

        return draw


class Workload(abc.ABC):
    """A re-iterable stream of host I/O in :class:`IOBatch` es (see the module docstring).

    ``batch_size`` is the number of I/Os per batch; ``volume_size`` the
    volume size in bytes when known (every I/O then lies inside it), else None.
    ``str(workload)`` says what it is in words (the reports print it).
    """

    batch_size: int
    volume_size: int | None

    @abc.abstractmethod
    def __iter__(self) -> Iterator[IOBatch]:
        """The I/Os from the first, in batches of ``batch_size``."""

    @abc.abstractmethod
    def __str__(self) -> str:
        """The workload in words, e.g. ``"MSR Cambridge trace web_0.csv"``."""


class GeneratedWorkload(Workload):
    """``count`` I/Os drawn from a pattern with ``numpy.random.default_rng(seed)``.

    Made by :func:`uniform`, :func:`hotspot`, :func:`sequential` and
    :func:`mixed`. Arrivals form a Poisson process of ``rate`` I/Os per
    second: the first I/O is at time 0, the gaps are exponential with mean
    ``1 / rate`` seconds.
    """

    volume_size: int

    def __init__(
        self, kind: str, pattern: _Pattern, count: Any, rate: Any, seed: Any, batch_size: Any
    ) -> None:
        self.kind = kind
        self.pattern = pattern
        self.volume_size = pattern.volume_size
        self.count = _integer("count", count, 0)
        self.rate = _positive_real("rate", rate)
        self.seed = _integer("seed", seed, 0)
        self.batch_size = _integer("batch_size", batch_size, 1)

    def __iter__(self) -> Iterator[IOBatch]:
        return _rebatch(self._blocks(), self.batch_size)

    def _blocks(self) -> Iterator[IOBatch]:
        rng = np.random.default_rng(self.seed)
        draw = self.pattern.sampler(rng)
        clock = 0.0
        left = self.count
        while left:
            n = min(_DRAW, left)
            offsets, lengths, writes = draw(n)
            elapsed = np.cumsum(rng.exponential(1.0 / self.rate, n))
            times = np.empty(n)
            times[0] = clock
            times[1:] = clock + elapsed[:-1]
            clock += float(elapsed[-1])
            yield IOBatch(times, offsets, lengths, writes)
            left -= n

    def __repr__(self) -> str:
        return (
            f"<GeneratedWorkload {self.kind}: {self.count} I/Os on {self.volume_size} bytes, "
            f"{self.rate:g}/s, seed {self.seed}>"
        )

    def __str__(self) -> str:
        return (
            f"{self.kind} workload: {self.count} I/Os on "
            f"{format_bytes(self.volume_size, long=True)} at {self.rate:g} I/Os/s, "
            f"seed {self.seed}"
        )


def uniform(
    volume_size: int,
    count: int,
    *,
    io_size: int | Mapping[int, float] = 4096,
    alignment: int = DEFAULT_ALIGNMENT,
    write_fraction: float = 1.0,
    rate: float = 1000.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> GeneratedWorkload:
    """``count`` I/Os at uniformly random aligned offsets of a ``volume_size``-byte volume.

    ``io_size`` is a size in bytes or a mapping ``{size: weight}`` to draw
    sizes from (weights need not sum to 1). Offsets are multiples of
    ``alignment`` bytes, chosen so every I/O ends inside the volume. Each I/O
    is a write with probability ``write_fraction`` (0 to 1), else a read.
    ``rate`` is in I/Os per second (see :class:`GeneratedWorkload`).

    Raises ``ParameterError`` (a ValueError) for a non-integer or out-of-range
    parameter, or an I/O size larger than the volume.
    """
    pattern = _Uniform(volume_size, io_size, alignment, write_fraction)
    return GeneratedWorkload("uniform", pattern, count, rate, seed, batch_size)


def hotspot(
    volume_size: int,
    count: int,
    *,
    skew: float = 1.0,
    regions: int = 1000,
    io_size: int | Mapping[int, float] = 4096,
    alignment: int = DEFAULT_ALIGNMENT,
    write_fraction: float = 1.0,
    rate: float = 1000.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> GeneratedWorkload:
    """Like :func:`uniform`, but most I/O hits a few hot regions (Zipf's law).

    The volume is cut into ``regions`` equal regions; the region of popularity
    rank ``k`` (1 = hottest) receives a share of the I/O proportional to
    ``k ** -skew``, and within a region offsets are uniform. The ranks are
    scattered over the volume by a seeded permutation. ``skew=0`` is uniform;
    with ``regions=1000`` and ``skew=1`` the hottest 20 % of the regions take
    about 79 % of the I/O. The regions' popularities take 8 bytes each. The
    other parameters are as for :func:`uniform`.

    Raises ``ParameterError`` for a negative ``skew``, ``regions < 1`` and as
    :func:`uniform` does.
    """
    pattern = _Hotspot(volume_size, io_size, alignment, write_fraction, skew=skew, regions=regions)
    return GeneratedWorkload("hotspot", pattern, count, rate, seed, batch_size)


def sequential(
    volume_size: int,
    count: int,
    *,
    start: int = 0,
    io_size: int | Mapping[int, float] = 65536,
    alignment: int = DEFAULT_ALIGNMENT,
    write_fraction: float = 1.0,
    rate: float = 1000.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> GeneratedWorkload:
    """``count`` back-to-back I/Os from byte ``start``, wrapping to 0 at the end of the volume.

    Each I/O begins where the previous one ended, rounded up to ``alignment``
    bytes; an I/O that would run past the end of the volume goes to offset 0
    instead. ``start`` must be a multiple of ``alignment`` below
    ``volume_size``. ``io_size`` defaults to 64 KiB; the other parameters are
    as for :func:`uniform`.

    Raises ``ParameterError`` for a bad ``start`` and as :func:`uniform` does.
    """
    pattern = _Sequential(volume_size, io_size, alignment, write_fraction, start=start)
    return GeneratedWorkload("sequential", pattern, count, rate, seed, batch_size)


def mixed(
    components: Sequence[tuple[GeneratedWorkload, float]],
    count: int,
    *,
    rate: float = 1000.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> GeneratedWorkload:
    """``count`` I/Os, each drawn from one of ``components`` chosen by weight.

    ``components`` is a sequence of ``(workload, weight)`` pairs, e.g.
    ``[(sequential(size, 0), 0.2), (hotspot(size, 0), 0.8)]``: each I/O comes
    from component ``i`` with probability ``weight_i / sum(weights)``. Only a
    component's pattern is used (placement, sizes, alignment, write
    fraction); its count, rate, seed and batch size are not. A sequential
    component keeps its position across the I/Os it contributes. Components
    may themselves be mixtures. ``rate``, ``seed`` and ``batch_size`` are as
    for :func:`uniform`.

    Raises ``ParameterError`` when ``components`` is empty, holds something
    other than generated workloads, has negative or all-zero weights, or its
    workloads have different volume sizes.
    """
    components = list(components)
    if not components:
        raise ParameterError("mixed needs at least one (workload, weight) component")
    patterns = []
    weights = []
    for component in components:
        if not (isinstance(component, tuple) and len(component) == 2):
            raise ParameterError(
                f"a mixed component must be a (workload, weight) pair, got {component!r}"
            )
        workload, weight = component
        if not isinstance(workload, GeneratedWorkload):
            raise ParameterError(
                f"mixed components must be generated workloads, got {type(workload).__name__}"
            )
        patterns.append(workload.pattern)
        weights.append(_real("mixed component weight", weight, 0.0))
    sizes = {pattern.volume_size for pattern in patterns}
    if len(sizes) > 1:
        raise ParameterError(
            f"mixed components must share one volume size, got {sorted(sizes)} bytes"
        )
    total = sum(weights)
    if total <= 0:
        raise ParameterError("mixed component weights must not all be zero")
    pattern = _Mixed(patterns, np.array(weights) / total)
    return GeneratedWorkload("mixed", pattern, count, rate, seed, batch_size)


# -- trace readers -------------------------------------------------------------------


class _Malformed(Exception):
    """A line the parser cannot read; ``fatal`` ones stop the reader even with skip_bad."""

    def __init__(self, reason: str, fatal: bool = False) -> None:
        super().__init__(reason)
        self.fatal = fatal


def _show(text: bytes, limit: int = 80) -> str:
    shown = text.decode("utf-8", "backslashreplace").strip()
    return repr(shown if len(shown) <= limit else shown[: limit - 3] + "...")


def _count(token: bytes, what: str) -> int:
    """A non-negative decimal integer field."""
    try:
        value = int(token)
    except ValueError:
        raise _Malformed(f"{what} {_show(token)} is not an integer") from None
    if value < 0:
        raise _Malformed(f"{what} {value} is negative")
    return value


def _seconds(token: bytes, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise _Malformed(f"{what} {_show(token)} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise _Malformed(f"{what} {_show(token)} is not a finite number >= 0")
    return value


@dataclass
class TraceStats:
    """What a :class:`TraceReader` met in its latest iteration (updated as it goes)."""

    lines: int = 0
    """Lines read, header, blank and skipped lines included."""
    ios: int = 0
    """I/Os yielded."""
    ignored: int = 0
    """Well-formed lines that are no I/O (headers, other events or actions, I/Os of
    length 0, summaries) or that a filter left out."""
    skipped_bad: int = 0
    """Malformed or out-of-volume lines skipped because of ``skip_bad``."""
    reordered: int = 0
    """I/Os stamped earlier than the I/O before them; their time was raised to it."""
    extent: int = 0
    """The largest ``offset + length`` among the I/Os yielded, in bytes (the least
    volume size that holds them)."""
    duration: float = 0.0
    """Seconds from the first I/O yielded to the last: 0 for a trace without
    timestamps (a fio version 2 iolog without ``wait`` lines) read without a rate."""


class TraceReader(Workload):
    """A block trace read line by line: iterate it for :class:`IOBatch` es.

    Made by :func:`read_trace` and the ``read_*`` functions, whose docstrings
    give each format. The file is opened anew for each iteration (a name
    ending in ``.gz`` is read through gzip) and never held in memory: one
    batch of ``batch_size`` I/Os at a time. Times are in seconds from the
    first I/O yielded and never decrease (an I/O stamped earlier than the one
    before it takes that one's time, counted in ``stats.reordered``). With a
    ``rate`` (I/Os per second) the trace's own times are set aside: the n-th
    I/O yielded (from 0) is at ``n / rate`` seconds, which gives a trace
    without timestamps a pace.

    A malformed line raises :class:`TraceError` naming the file, the 1-based
    line and what is wrong; so does an I/O that ends past ``volume_size``
    bytes when that is given (``None``: no limit). With ``skip_bad=True``
    such lines are skipped and counted in ``stats.skipped_bad`` instead.
    A file of another format (one whose first non-blank line another format
    starts with, and that yields no I/O read as this one) raises
    :class:`TraceError` at that line saying what it looks like, skip_bad or
    not. ``stats`` (a :class:`TraceStats`) describes the latest iteration.
    ``OSError`` from opening or reading the file propagates.
    """

    format: ClassVar[str]
    _tick: float
    """Seconds per unit of the times ``_parse`` returns."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        skip_bad: bool = False,
        volume_size: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        rate: float | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.skip_bad = bool(skip_bad)
        self.volume_size = None if volume_size is None else _volume_size(volume_size)
        self.batch_size = _integer("batch_size", batch_size, 1)
        self.rate = None if rate is None else _positive_real("rate", rate)
        self.stats = TraceStats()

    @abc.abstractmethod
    def _reset(self) -> None:
        """Forget the state of any earlier iteration."""

    @abc.abstractmethod
    def _parse(self, line: bytes) -> tuple[float, int, int, bool] | None:
        """``(time, offset, length, write)`` of a non-blank line, or None for no I/O.

        ``time`` is in units of ``_tick`` seconds, from any origin. Raises
        ``_Malformed`` for a line that cannot be read.
        """

    def __iter__(self) -> Iterator[IOBatch]:
        stats = self.stats = TraceStats()
        self._reset()
        limit = _INT64_MAX if self.volume_size is None else self.volume_size
        columns: tuple[list[float], list[int], list[int], list[bool]] = ([], [], [], [])
        times, offsets, lengths, writes = columns
        origin = None
        last = 0.0
        first: tuple[int, bytes] | None = None  # the first non-blank line, to judge a misread
        with _open_trace(self.path) as lines:
            for lineno, line in enumerate(lines, 1):
                stats.lines = lineno
                if first is None and line.strip():
                    first = (lineno, line)
                try:
                    io = self._parse(line) if line.strip() else None
                    if io is not None and io[1] + io[2] > limit:
                        raise _Malformed(self._beyond(io[1], io[2]))
                except _Malformed as exc:
                    if exc.fatal or not self.skip_bad:
                        misread = None if stats.ios else self._misread(first)
                        raise misread or TraceError(
                            self.path, lineno, f"{exc} in {_show(line)}"
                        ) from None
                    stats.skipped_bad += 1
                    continue
                if io is None:
                    stats.ignored += 1
                    continue
                stamp, offset, length, write = io
                if self.rate is not None:
                    seconds = stats.ios / self.rate
                else:
                    if origin is None:
                        origin = stamp
                    seconds = (stamp - origin) * self._tick
                    if seconds < last:
                        stats.reordered += 1
                        seconds = last
                last = stats.duration = seconds
                times.append(seconds)
                offsets.append(offset)
                lengths.append(length)
                writes.append(write)
                stats.ios += 1
                stats.extent = max(stats.extent, offset + length)
                if len(offsets) == self.batch_size:
                    yield IOBatch(*map(np.array, columns))
                    for column in columns:
                        column.clear()
        if offsets:
            yield IOBatch(*map(np.array, columns))
        elif not stats.ios:
            misread = self._misread(first)
            if misread is not None:
                raise misread

    def _misread(self, first: tuple[int, bytes] | None) -> TraceError | None:
        """The error for a file of another format, judged by its first non-blank line."""
        if first is None:
            return None
        lineno, line = first
        other = _sniff(line)
        if other is None or other == self.format:
            return None
        return TraceError(
            self.path,
            lineno,
            f"read as format {self.format!r}, but the file looks like {_FORMATS[other][1]}: "
            f"use format {other!r}, or give none to have it detected",
        )

    def _beyond(self, offset: int, length: int) -> str:
        if self.volume_size is None:
            return f"I/O [{offset}, {offset + length}) ends past 2**63 bytes"
        return (
            f"I/O [{offset}, {offset + length}) ends past the volume size {self.volume_size} bytes"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path!r}>"

    def __str__(self) -> str:
        pace = "" if self.rate is None else f" at {self.rate:g} I/Os/s"
        return f"{_FORMATS[self.format][0]} {self.path}{pace}"


def _open_trace(path: str) -> BinaryIO:
    """The trace file at ``path`` for reading bytes, through gzip when it ends in ``.gz``."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


class _MsrReader(TraceReader):
    format = "msr"
    _tick = 1e-7  # Windows filetime: 100 ns ticks

    def __init__(self, path: Any, *, hostname: str | None, disk: int | None, **common: Any):
        super().__init__(path, **common)
        self.hostname = hostname
        self.disk = None if disk is None else _integer("disk", disk, 0)
        self._host = None if hostname is None else hostname.encode()

    def _reset(self) -> None:
        pass

    def _parse(self, line: bytes) -> tuple[float, int, int, bool] | None:
        fields = line.split(b",")
        if len(fields) != 7:
            raise _Malformed(f"expected 7 comma-separated fields, found {len(fields)}")
        stamp = _count(fields[0], "timestamp")
        disk = _count(fields[2], "disk number")
        kind = fields[3].strip().lower()
        if kind not in (b"read", b"write"):
            raise _Malformed(f"type {_show(fields[3])} is neither Read nor Write")
        offset = _count(fields[4], "offset")
        length = _count(fields[5], "size")
        if (
            length == 0
            or (self._host is not None and fields[1].strip() != self._host)
            or (self.disk is not None and disk != self.disk)
        ):
            return None
        return stamp, offset, length, kind == b"write"


_DEVICE = re.compile(rb"\d+,\d+\Z")


class _BlkparseReader(TraceReader):
    format = "blkparse"
    _tick = 1.0

    def __init__(self, path: Any, *, action: str, device: str | None, **common: Any):
        super().__init__(path, **common)
        if action not in ("Q", "C"):
            raise ParameterError(
                f"blkparse action must be 'Q' (queued) or 'C' (completed), got {action!r}"
            )
        if device is not None and not _DEVICE.match(device.encode()):
            raise ParameterError(f"blkparse device must look like '8,0', got {device!r}")
        self.action = action
        self.device = device
        self._action = action.encode()
        self._device = None if device is None else device.encode()

    def _reset(self) -> None:
        pass

    def _parse(self, line: bytes) -> tuple[float, int, int, bool] | None:
        tokens = line.split()
        if not _DEVICE.match(tokens[0]):
            return None  # not an event: the summary blocks, notes
        if len(tokens) < 7:
            raise _Malformed(
                "truncated event: expected device, CPU, sequence, time, PID, action and RWBS"
            )
        _count(tokens[1], "CPU")
        _count(tokens[2], "sequence number")
        stamp = _seconds(tokens[3], "time")
        _count(tokens[4], "PID")
        rwbs = tokens[6]
        write = b"W" in rwbs
        if (
            tokens[5] != self._action
            or not (write or b"R" in rwbs)
            or (self._device is not None and tokens[0] != self._device)
        ):
            return None
        if len(tokens) > 7 and tokens[7].startswith(b"("):
            return None  # a packet command: its bytes, no sector range
        if len(tokens) < 10 or tokens[8] != b"+":
            raise _Malformed("expected 'SECTOR + COUNT' after the RWBS field")
        sector = _count(tokens[7], "sector")
        count = _count(tokens[9], "sector count")
        if count == 0:
            return None  # a flush carries no data
        return stamp, sector * SECTOR_SIZE, count * SECTOR_SIZE, write


_FIO_HEADERS = {b"fio version 2 iolog": 2, b"fio version 3 iolog": 3}
_FIO_FILE_ACTIONS = frozenset((b"add", b"open", b"close"))
_FIO_IO_ACTIONS = frozenset((b"read", b"write", b"sync", b"datasync", b"trim", b"wait"))


class _FioReader(TraceReader):
    format = "fio"

    def __init__(self, path: Any, *, filename: str | None, time_unit: Any, **common: Any):
        super().__init__(path, **common)
        self.filename = filename
        self.time_unit = _positive_real("time_unit", time_unit)
        self._filename = None if filename is None else filename.encode()
        self._reset()

    def _reset(self) -> None:
        self.version: int | None = None
        self._tick = 1e-6
        self._clock = 0  # version 2: microseconds advanced by wait lines

    def _parse(self, line: bytes) -> tuple[float, int, int, bool] | None:
        if self.version is None:
            version = _FIO_HEADERS.get(line.strip())
            if version is None:
                raise _Malformed(
                    "not a fio iolog: the first line must be 'fio version 2 iolog' or "
                    "'fio version 3 iolog'",
                    fatal=True,
                )
            self.version = version
            self._tick = 1e-6 if version == 2 else self.time_unit
            return None
        tokens = line.split()
        if self.version == 3:
            if len(tokens) not in (3, 5):
                raise _Malformed(
                    "expected 'TIMESTAMP FILENAME ACTION' or "
                    f"'TIMESTAMP FILENAME ACTION OFFSET LENGTH', found {len(tokens)} fields"
                )
            stamp = _count(tokens[0], "timestamp")
            del tokens[0]
        elif len(tokens) in (2, 4):
            stamp = self._clock
        else:
            raise _Malformed(
                "expected 'FILENAME ACTION' or 'FILENAME ACTION OFFSET LENGTH', "
                f"found {len(tokens)} fields"
            )
        name, action = tokens[0], tokens[1]
        if len(tokens) == 2:
            if action not in _FIO_FILE_ACTIONS:
                raise _Malformed(f"unknown file action {_show(action)}")
            return None
        if action not in _FIO_IO_ACTIONS:
            raise _Malformed(f"unknown I/O action {_show(action)}")
        offset = _count(tokens[2], "offset")
        length = _count(tokens[3], "length")
        if action == b"wait":
            if self.version == 2:
                self._clock += offset  # fio: wait OFFSET microseconds after the last wait
            return None  # fio ignores wait in version 3
        if (
            length == 0
            or action not in (b"read", b"write")
            or (self._filename is not None and name != self._filename)
        ):
            return None
        return stamp, offset, length, action == b"write"


# -- telling the formats apart ------------------------------------------------------

# format: (the format in words, what its first line looks like)
_FORMATS = {
    "msr": ("MSR Cambridge trace", "an MSR Cambridge trace (7 comma-separated fields)"),
    "blkparse": (
        "blkparse trace",
        "blkparse output ('MAJ,MIN CPU SEQ TIME PID ACTION RWBS ...' events)",
    ),
    "fio": ("fio iolog", "a fio iolog (a 'fio version N iolog' header)"),
}
_FIO_HEADER = re.compile(rb"fio version \d+ iolog\Z")
_SNIFF_BYTES = 4096  # detect_format reads at most this much of a line


def _sniff(line: bytes) -> str | None:
    """The format whose traces can start with ``line`` (not blank), or None."""
    text = line.strip()
    if _FIO_HEADER.match(text):
        return "fio"
    fields = text.split(b",")
    if (
        len(fields) == 7
        and fields[0].strip().isdigit()
        and fields[3].strip().lower() in (b"read", b"write")
    ):
        return "msr"
    tokens = text.split()
    if (
        len(tokens) >= 7
        and _DEVICE.match(tokens[0])
        and tokens[1].isdigit()
        and tokens[2].isdigit()
    ):
        return "blkparse"
    return None


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of the trace at ``path``, told by its first non-blank line.

    ``"fio"`` for a ``fio version N iolog`` header, ``"msr"`` for seven
    comma-separated fields with an integer timestamp and a type of Read or
    Write, ``"blkparse"`` for an event line (``MAJ,MIN CPU SEQ ...``). Reads
    the blank lines and at most 4 KiB of the first other line (through gzip
    for a name ending in ``.gz``).

    Raises :class:`TraceError` for an empty file (``lineno`` 0) or a first
    line of none of the formats (naming it); ``OSError`` propagates.
    """
    path = os.fspath(path)
    lineno = 0
    with _open_trace(path) as lines:
        while True:
            line = lines.readline(_SNIFF_BYTES)
            if not line:
                raise TraceError(path, 0, "the file is empty: there is no trace to read")
            lineno += 1
            if line.strip():
                break
    found = _sniff(line)
    if found is None:
        *others, last = (looks for _, looks in _FORMATS.values())
        raise TraceError(
            path,
            lineno,
            f"cannot tell the trace format: {_show(line)} starts neither {', '.join(others)} "
            f"nor {last}; give the format: {', '.join(_FORMATS)}",
        )
    return found


def read_msr(
    path: str | os.PathLike[str],
    *,
    hostname: str | None = None,
    disk: int | None = None,
    skip_bad: bool = False,
    volume_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rate: float | None = None,
) -> TraceReader:
    """A reader of an MSR Cambridge block trace (CSV without a header).

    Each line is ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``:
    a Windows filetime (100 ns ticks), ``Read`` or ``Write`` (any case),
    offset and size in bytes. ``hostname`` and ``disk`` keep only that host's
    or disk's I/Os. Lines of size 0 are no I/O. Malformed: a field count other
    than 7, a timestamp, disk number, offset or size that is not a
    non-negative integer, another type. See :class:`TraceReader` for
    ``skip_bad``, ``volume_size``, ``batch_size``, ``rate`` and the errors.

    Raises ``ParameterError`` for a negative ``disk`` or bad common options.
    """
    return _MsrReader(
        path,
        hostname=hostname,
        disk=disk,
        skip_bad=skip_bad,
        volume_size=volume_size,
        batch_size=batch_size,
        rate=rate,
    )


def read_blkparse(
    path: str | os.PathLike[str],
    *,
    action: str = "Q",
    device: str | None = None,
    skip_bad: bool = False,
    volume_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rate: float | None = None,
) -> TraceReader:
    """A reader of ``blkparse``'s default text output.

    Event lines read ``MAJ,MIN CPU SEQ SECONDS PID ACTION RWBS ...``; those
    whose action is ``action`` (``"Q"``, queued, or ``"C"``, completed) and
    whose RWBS field holds ``W`` (write) or ``R`` (read) are I/Os, with
    ``SECTOR + COUNT`` after RWBS in 512-byte sectors. Other events (plugs,
    merges, flushes without data, discards, packet commands) are no I/O, nor
    is a line that
    does not start with a device number (the per-CPU and total summaries
    blkparse prints at the end). ``device`` (e.g. ``"8,0"``) keeps that
    device's events only. Malformed: an event line with fewer than 7 fields,
    a bad CPU, sequence number, time or PID, or an I/O event without a valid
    ``SECTOR + COUNT``. See :class:`TraceReader` for the rest.

    Raises ``ParameterError`` for another ``action``, a ``device`` not of the
    form ``MAJ,MIN`` or bad common options.
    """
    return _BlkparseReader(
        path,
        action=action,
        device=device,
        skip_bad=skip_bad,
        volume_size=volume_size,
        batch_size=batch_size,
        rate=rate,
    )


def read_fio(
    path: str | os.PathLike[str],
    *,
    filename: str | None = None,
    time_unit: float = 1e-6,
    skip_bad: bool = False,
    volume_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rate: float | None = None,
) -> TraceReader:
    """A reader of a fio ``write_iolog`` file, version 2 or 3 (told by its first line).

    Version 2 (``fio version 2 iolog``): lines ``FILENAME ACTION`` (add, open,
    close) and ``FILENAME ACTION OFFSET LENGTH`` (read, write, sync,
    datasync, trim, wait); ``wait`` advances the clock by OFFSET microseconds.
    Version 3 (``fio version 3 iolog``): the same, each line led by a
    timestamp in units of ``time_unit`` seconds (fio writes microseconds;
    pass ``1e-3`` for a log in milliseconds), and ``wait`` ignored as fio
    ignores it. Only read and write actions of length > 0 are I/Os;
    ``filename`` keeps that file's I/Os only. Malformed: a wrong field
    count, an unknown action, a timestamp, offset or length that is not a
    non-negative integer. A missing header raises :class:`TraceError` even
    with ``skip_bad``. See :class:`TraceReader` for the rest.

    Raises ``ParameterError`` for a ``time_unit`` that is not > 0 or bad
    common options.
    """
    return _FioReader(
        path,
        filename=filename,
        time_unit=time_unit,
        skip_bad=skip_bad,
        volume_size=volume_size,
        batch_size=batch_size,
        rate=rate,
    )


_READERS: dict[str, Callable[..., TraceReader]] = {
    "msr": read_msr,
    "blkparse": read_blkparse,
    "fio": read_fio,
}


def read_trace(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    skip_bad: bool = False,
    volume_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rate: float | None = None,
    **options: Any,
) -> TraceReader:
    """A reader of the trace at ``path`` in ``format``: ``"msr"``, ``"blkparse"`` or ``"fio"``.

    ``format=None`` detects it from the file's first non-blank line
    (:func:`detect_format`, which reads that line now); otherwise nothing is
    read until the reader is iterated. ``options`` go to :func:`read_msr`,
    :func:`read_blkparse` or :func:`read_fio` (e.g. ``hostname=``,
    ``action=``, ``time_unit=``); ``rate`` is as for :class:`TraceReader`.

    Raises ``ParameterError`` for an unknown format or a bad option value,
    ``TypeError`` for an option the format does not have, and, detecting,
    :class:`TraceError` for a file of no known format and ``OSError``.
    """
    if format is None:
        format = detect_format(path)
    reader = _READERS.get(format)
    if reader is None:
        raise ParameterError(
            f"unknown trace format {format!r}; use one of {', '.join(map(repr, _READERS))}"
        )
    return reader(
        path,
        skip_bad=skip_bad,
        volume_size=volume_size,
        batch_size=batch_size,
        rate=rate,
        **options,
    )


# -- replay --------------------------------------------------------------------------

_DEFAULT_PATTERN = np.random.default_rng(0x15C).bytes(4096)


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay` did: I/O counts, bytes, and wall-clock seconds."""

    writes: int
    bytes_written: int
    reads: int
    bytes_read: int
    seconds: float


class _Payloads:
    """The data replay writes: for a length n, the first n bytes of the pattern repeated."""

    def __init__(self, pattern: bytes) -> None:
        self._pattern = pattern
        self._cache: dict[int, bytes] = {}
        self._cached = 0

    def __call__(self, length: int) -> bytes:
        data = self._cache.get(length)
        if data is None:
            data = (self._pattern * -(-length // len(self._pattern)))[:length]
            if self._cached + length > _PAYLOAD_CACHE:
                self._cache.clear()
                self._cached = 0
            self._cache[length] = data
            self._cached += length
        return data


def replay(
    target: Any,
    workload: Iterable[IOBatch] | IOBatch,
    *,
    timed: bool = False,
    speed: float = 1.0,
    data: bytes | None = None,
    reads: bool = False,
) -> ReplayResult:
    """Issue the I/Os of ``workload`` to ``target``, in order; return what was done.

    ``target`` is a :class:`~isc.session.Session` (host writes tracked) or any
    object with ``write(offset, data)``, such as a LUN (untracked, to measure
    the cost of tracking by comparison). Each write of n bytes writes the
    first n bytes of ``data`` repeated end to end (a non-empty bytes-like
    pattern; by default 4096 fixed pseudo-random bytes), from a buffer reused
    for every write of that length. Reads go to ``target.read(offset,
    length)`` when ``reads`` is true, else they are skipped.

    Untimed, the I/Os go as fast as the target takes them. With
    ``timed=True`` each waits until its time in the workload divided by
    ``speed`` (2.0 replays twice as fast) has passed since the replay began;
    an I/O already late goes at once. ``seconds`` in the result is the wall
    time of the whole replay.

    Raises ``ParameterError`` for an empty ``data``, a ``speed`` that is not
    > 0, or ``reads=True`` with a target that has no ``read``. Errors from the
    target (``RangeError`` for an I/O outside it) and from the workload
    (``TraceError``) propagate; the I/Os before them were issued.
    """
    pattern = _DEFAULT_PATTERN if data is None else bytes(data)
    if not pattern:
        raise ParameterError("replay data must be a non-empty bytes-like pattern")
    speed = _positive_real("speed", speed)
    if reads and not callable(getattr(target, "read", None)):
        raise ParameterError(
            f"reads=True needs a target with read(offset, length); {target!r} has none"
        )
    if isinstance(workload, IOBatch):
        workload = (workload,)
    payload = _Payloads(pattern)
    write = target.write
    read = target.read if reads else None
    writes = bytes_written = read_count = bytes_read = 0
    clock = time.perf_counter
    start = clock()
    for batch in workload:
        if not reads and not batch.write.all():
            batch = batch[batch.write]
        due = (batch.time / speed).tolist() if timed else None
        for i, (offset, length, is_write) in enumerate(
            zip(batch.offset.tolist(), batch.length.tolist(), batch.write.tolist(), strict=True)
        ):
            if due is not None:
                wait = due[i] - (clock() - start)
                if wait > 0:
                    time.sleep(wait)
            if is_write:
                write(offset, payload(length))
                writes += 1
                bytes_written += length
            elif read is not None:
                read(offset, length)
                read_count += 1
                bytes_read += length
    return ReplayResult(writes, bytes_written, read_count, bytes_read, clock() - start)
