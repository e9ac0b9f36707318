"""The delta bitmap core (``isc._core.DeltaBitmap``) against its peers, in one run.

Each pytest-benchmark group is one table: isc beside what a user would pick
instead — the pure-Python reference twin (small bitmaps only: it is slow),
bitarray, pyroaring (32-bit indices only) and numpy (bool arrays and uint64
word arrays). Nothing here asserts on time; the targets are checked by reading
the tables, which ``benchmarks/report.py`` prints with each entry's ratio to
isc. Peers get their chunk ranges already computed from the byte ranges isc
takes, which favours them. The batch and extents cases check, once and
outside the timing, that every entry computes the same bits or runs.

Per-call operations run in rounds of ``BLOCK`` calls over pre-generated,
seeded arguments, each round taking the next block, so a round touches fresh
parts of the bitmap; ``loop only`` rows give the Python loop's own cost.

``ISC_CORE_BEFORE=PATH`` (a build of an earlier ``isc/_core.pyx``) adds
``isc before`` rows to the ``unmark`` tables: the earlier core, loaded beside
this checkout's, in the same run. Without it those rows are skipped.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from bitarray import bitarray
from bitarray.util import zeros
from pyroaring import BitMap

from isc import _reference
from isc._core import DeltaBitmap

SEED = 20261124
BIG = 1 << 27  # chunks: 8 TiB at 64 KiB, 256 GiB at 2 KiB; 16 MiB per bitmap
SMALL = 1 << 16  # chunks: 8 KiB per bitmap, cache-resident
GRANULARITIES = [2048 << i for i in range(6)]
DEFAULT = 65536
BLOCK = 1024  # calls per timed round of the per-call cases
BATCH = 100_000  # writes per record_writes call
_ONES = (1 << 64) - 1


# -- running a case ---------------------------------------------------------------


@dataclass
class Case:
    """One table row: ``run`` timed ``rounds`` times, ``setup`` before each round.

    ``rounds=0`` lets pytest-benchmark calibrate (only without ``setup``).
    ``items`` calls/writes/runs happen per ``run``; ``note`` is computed after.
    """

    run: Callable[..., object]
    rounds: int = 0
    setup: Callable[[], tuple[tuple, dict]] | None = None
    items: int = 0
    unit: str = ""
    note: Callable[[], str] | None = None


def _measure(benchmark, group: str, impl: str, case: Case, bitmap_bytes: int = 0) -> None:
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, items=case.items, unit=case.unit)
    if bitmap_bytes:
        benchmark.extra_info["bitmap_bytes"] = bitmap_bytes
    if case.rounds:
        benchmark.pedantic(case.run, setup=case.setup, rounds=case.rounds, warmup_rounds=1)
    else:
        benchmark(case.run)
    if case.note:
        benchmark.extra_info["note"] = case.note()


def _cycle(blocks: list, prepare: Callable[[object], None] = lambda block: None):
    """A pedantic setup that prepares and hands out the next block each round."""
    it = itertools.cycle(blocks)

    def setup():
        block = next(it)
        prepare(block)
        return (block,), {}

    return setup


def _size(nbytes: int) -> str:
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _geometry(chunks: int, granularity: int) -> str:
    return (
        f"2^{chunks.bit_length() - 1} chunks @ {_size(granularity)} "
        f"({_size(chunks * granularity)} LUN)"
    )


def _id(chunks: int, granularity: int) -> str:
    return f"2^{chunks.bit_length() - 1}-{granularity >> 10}K"


@functools.cache
def _core_before():
    """The core built at ``ISC_CORE_BEFORE``, loaded beside this checkout's (skips without it)."""
    path = os.environ.get("ISC_CORE_BEFORE")
    if not path:
        pytest.skip("set ISC_CORE_BEFORE to a build of an earlier core to compare with it")
    spec = importlib.util.spec_from_file_location("isc._core", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- workloads --------------------------------------------------------------------


def _writes(chunks: int, granularity: int, count: int, stream: int):
    """Seeded random host writes: 4 KiB-aligned, 4 KiB to 1 MiB in 4 KiB steps."""
    rng = np.random.default_rng([SEED, stream, chunks, granularity])
    lengths = rng.integers(1, 257, count, dtype=np.int64) * 4096
    offsets = rng.integers(0, (chunks * granularity - lengths) // 4096 + 1) * 4096
    return offsets, lengths


def _chunk_ranges(offsets, lengths, granularity: int):
    """Half-open chunk ranges ``[lo, hi)`` covered by the byte ranges."""
    shift = granularity.bit_length() - 1
    return offsets >> shift, ((offsets + lengths - 1) >> shift) + 1


def _pairs(a, b) -> list[tuple[int, int]]:
    """Two parallel arrays as a list of Python-int pairs."""
    return list(zip(a.tolist(), b.tolist(), strict=True))


def _blocks(a, b, nblocks: int) -> list[list[tuple[int, int]]]:
    """Split two parallel arrays into ``nblocks`` lists of Python-int pairs."""
    return [_pairs(x, y) for x, y in zip(np.split(a, nblocks), np.split(b, nblocks), strict=True)]


def _merged(lo, hi):
    """Union of half-open ranges as sorted, disjoint, non-adjacent ``(starts, ends)``."""
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)
    fresh = np.ones(lo.size, dtype=bool)
    fresh[1:] = lo[1:] > reach[:-1]
    return lo[fresh], np.maximum.reduceat(hi, np.flatnonzero(fresh))


def _expand(lo, hi):
    """Every chunk index of the ranges ``[lo, hi)``, concatenated."""
    counts = hi - lo
    firsts = np.repeat(lo - np.cumsum(counts) + counts, counts)
    return firsts + np.arange(int(counts.sum()))


def _runs(positions) -> np.ndarray:
    """(first, count) rows of the runs of sorted, distinct chunk indices."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [positions.size]))
    return np.column_stack((positions[starts], ends - starts))


def _runs_of_words(words) -> np.ndarray:
    nonzero = np.flatnonzero(words)
    bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(-1, 64)
    rows, cols = np.nonzero(bits)
    return _runs(nonzero[rows] * 64 + cols)


def _set_words(words, lo: int, hi: int) -> None:
    """Set chunks ``[lo, hi)`` in a uint64 word array (the numpy word-array idiom)."""
    wlo, whi = lo >> 6, (hi - 1) >> 6
    first = (_ONES << (lo & 63)) & _ONES
    last = _ONES >> (63 - ((hi - 1) & 63))
    if wlo == whi:
        words[wlo] |= first & last
    else:
        words[wlo] |= first
        words[wlo + 1 : whi] = _ONES
        words[whi] |= last


# -- 1. record_write: one host write per call -----------------------------------------

RECORD_IMPLS = [
    "isc",
    "isc, warm",
    "isc marked",
    "isc marked, every write COFW",
    "reference",
    "bitarray a[lo:hi] = 1",
    "pyroaring add_range",
    "numpy bool a[lo:hi] = True",
    "numpy uint64 words",
    "loop only",
]
RECORD_GEOMETRIES = [(BIG, g) for g in GRANULARITIES] + [(SMALL, DEFAULT), (SMALL, 2048)]


def _resident(bitmap: DeltaBitmap) -> DeltaBitmap:
    """Write every page of the three bitmaps once, as a session that has run before has.

    Until written, a fresh (calloc) bitmap reads as the kernel's shared zero
    page, which makes reads of never-written bitmaps (saved, transfer) look
    cheaper than they are in a long-lived session.
    """
    bitmap.mark(full=True)
    firsts = np.arange(0, bitmap.chunks, 4096 * 8, dtype=np.int64)  # one chunk per page
    bitmap.record_writes(firsts * bitmap.granularity, np.full(firsts.size, bitmap.granularity))
    bitmap.unmark()
    bitmap.clear_tracking()
    return bitmap


def _remark(bitmap: DeltaBitmap, offsets, lengths) -> None:
    """Start a fresh mark whose transfer bitmap holds exactly these writes."""
    bitmap.unmark()
    bitmap.clear_tracking()
    bitmap.record_writes(offsets, lengths)
    bitmap.mark()


def _cofw_note(bitmap: DeltaBitmap, blocks, prepare) -> Callable[[], str]:
    def note() -> str:
        writes = hits = saved = 0
        density = 0.0
        for block in blocks[:8]:
            prepare(block)
            density += bitmap.transfer_count / bitmap.chunks
            for offset, length in block:
                cofw = bitmap.record_write(offset, length).size
                writes += 1
                hits += cofw > 0
                saved += cofw
        return (
            f"transfer {100 * density / 8:.3g}% set; {100 * hits / writes:.0f}% of writes "
            f"return COFW chunks, {saved / writes:.1f} chunks per write"
        )

    return note


def _record_write_case(impl: str, chunks: int, granularity: int) -> Case:
    nblocks = 128
    offsets, lengths = _writes(chunks, granularity, nblocks * BLOCK, stream=1)
    lo, hi = _chunk_ranges(offsets, lengths, granularity)
    byte_blocks = _blocks(offsets, lengths, nblocks)
    chunk_blocks = _blocks(lo, hi, nblocks)
    size = chunks * granularity
    rounds = 16 if impl == "reference" else nblocks

    if impl.startswith("isc"):
        bitmap = _resident(DeltaBitmap(size, granularity))

        def run(block):
            record = bitmap.record_write
            for offset, length in block:
                record(offset, length)

        if impl == "isc, warm":
            return Case(run, rounds, _cycle(byte_blocks), BLOCK, "write")
        # The previous interval's writes: one per 1024 chunks of the LUN.
        prior = _writes(chunks, granularity, chunks // 1024, stream=2)
        if impl == "isc":
            # A marked round's bitmap work (_remark) on a twin of the same
            # geometry, after emptying this tracking bitmap as unmark does the
            # marked one's: both rows start from the same cache state.
            twin = _resident(DeltaBitmap(size, granularity))

            def cold(block):
                bitmap.clear_tracking()
                _remark(twin, *prior)

            return Case(run, rounds, _cycle(byte_blocks, cold), BLOCK, "write")
        if impl == "isc marked":

            def prepare(block):
                _remark(bitmap, *prior)

        else:

            def prepare(block):
                _remark(bitmap, *(np.array(column) for column in zip(*block, strict=True)))

        note = _cofw_note(bitmap, byte_blocks, prepare)
        return Case(run, rounds, _cycle(byte_blocks, prepare), BLOCK, "write", note)

    if impl == "reference":
        twin = _reference.DeltaBitmap(size, granularity)

        def run(block):
            record = twin.record_write
            for offset, length in block:
                record(offset, length)

        return Case(run, rounds, _cycle(byte_blocks), BLOCK, "write")

    if impl.startswith("bitarray"):
        bits = zeros(chunks)

        def run(block):
            for first, end in block:
                bits[first:end] = 1

    elif impl.startswith("pyroaring"):
        roaring = BitMap()

        def run(block):
            add = roaring.add_range
            for first, end in block:
                add(first, end)

    elif impl.startswith("numpy bool"):
        flags = np.zeros(chunks, dtype=bool)

        def run(block):
            for first, end in block:
                flags[first:end] = True

    elif impl.startswith("numpy uint64"):
        words = np.zeros(chunks // 64, dtype=np.uint64)

        def run(block):
            set_words = _set_words
            for first, end in block:
                set_words(words, first, end)

    else:

        def run(block):
            for _first, _end in block:
                pass

    return Case(run, rounds, _cycle(chunk_blocks), BLOCK, "write")


@pytest.mark.parametrize(
    ("impl", "chunks", "granularity"),
    [
        pytest.param(impl, chunks, gran, id=f"{impl}-{_id(chunks, gran)}")
        for chunks, gran in RECORD_GEOMETRIES
        for impl in RECORD_IMPLS
        if impl != "reference" or chunks == SMALL
    ],
)
def test_record_write(benchmark, impl, chunks, granularity):
    case = _record_write_case(impl, chunks, granularity)
    _measure(benchmark, f"1 record_write, {_geometry(chunks, granularity)}", impl, case)


# -- 2. record_writes: a batch of host writes per call -----------------------------------

BATCH_IMPLS = [
    "isc record_writes",
    "reference record_writes",
    "bitarray loop a[lo:hi] = 1",
    "pyroaring loop add_range",
    "numpy bool, expand ranges, a[idx] = True",
    "numpy bool, merge ranges, difference array + cumsum",
]
BATCH_GEOMETRIES = [(BIG, g) for g in GRANULARITIES] + [(SMALL, DEFAULT), (SMALL, 2048)]


def _record_writes_case(impl: str, chunks: int, granularity: int) -> tuple[Case, Callable]:
    """The case and a check that the bits set are exactly the batch's chunks."""
    offsets, lengths = _writes(chunks, granularity, BATCH, stream=3)
    lo, hi = _chunk_ranges(offsets, lengths, granularity)
    starts, ends = _merged(lo, hi)
    expected = int((ends - starts).sum())
    note = f"{(hi - lo).mean():.1f} chunks per write"

    if impl.startswith("isc") or impl.startswith("reference"):
        kind = DeltaBitmap if impl.startswith("isc") else _reference.DeltaBitmap
        bitmap = _resident(kind(chunks * granularity, granularity))
        rounds = 20 if impl.startswith("isc") else 3

        def setup():
            bitmap.clear_tracking()
            return (), {}

        def run():
            bitmap.record_writes(offsets, lengths)

        def count():
            return bitmap.tracking_count

    elif impl.startswith("bitarray"):
        bits = zeros(chunks)
        pairs = _pairs(lo, hi)
        rounds = 5

        def setup():
            bits.setall(0)
            return (), {}

        def run():
            for first, end in pairs:
                bits[first:end] = 1

        count = bits.count

    elif impl.startswith("pyroaring"):
        roaring = BitMap()
        pairs = _pairs(lo, hi)
        rounds = 5

        def setup():
            roaring.clear()
            return (), {}

        def run():
            add = roaring.add_range
            for first, end in pairs:
                add(first, end)

        def count():
            return len(roaring)

    else:
        flags = np.zeros(chunks, dtype=bool)
        rounds = 3

        def setup():
            flags.fill(False)
            return (), {}

        if "expand" in impl:

            def run():
                flags[_expand(lo, hi)] = True

        else:
            # Merged ranges are disjoint and non-adjacent: the running sum of
            # +1 at each start and -1 at each end is 0 or 1, so int8 is exact
            # and its bytes are the bool mask.
            def run():
                first, end = _merged(lo, hi)
                diff = np.zeros(chunks + 1, dtype=np.int8)
                diff[first] = 1
                diff[end] = -1
                mask = np.cumsum(diff[:-1], dtype=np.int8).view(bool)
                np.logical_or(flags, mask, out=flags)

        def count():
            return int(np.count_nonzero(flags))

    def check():
        assert count() == expected, f"{impl} set {count()} chunks, expected {expected}"

    return Case(run, rounds, setup, BATCH, "write", lambda: note), check


@pytest.mark.parametrize(
    ("impl", "chunks", "granularity"),
    [
        pytest.param(impl, chunks, gran, id=f"{impl}-{_id(chunks, gran)}")
        for chunks, gran in BATCH_GEOMETRIES
        for impl in BATCH_IMPLS
        if not impl.startswith("reference") or (chunks, gran) == (SMALL, DEFAULT)
    ],
)
def test_record_writes(benchmark, impl, chunks, granularity):
    case, check = _record_writes_case(impl, chunks, granularity)
    group = f"2 record_writes, {BATCH} writes per call, {_geometry(chunks, granularity)}"
    _measure(benchmark, group, "isc" if impl.startswith("isc") else impl, case)
    check()


# -- 3. mark: the O(1) role swap ---------------------------------------------------------

MARK_GEOMETRIES = [(1 << 14, DEFAULT), (BIG, DEFAULT), (1 << 28, DEFAULT), (1 << 33, 2048)]
PAIR_IMPLS = [
    "isc",
    "reference",
    "numpy uint64: swap, |=, zero",
    "bitarray: swap, |=, setall(0)",
    "pyroaring: swap, |=, clear()",
]


def _pair_case(impl: str, chunks: int, granularity: int) -> Case:
    if impl in ("isc", "reference"):
        kind = DeltaBitmap if impl == "isc" else _reference.DeltaBitmap
        bitmap = kind(chunks * granularity, granularity)

        def run():
            bitmap.mark()
            bitmap.unmark()

        return Case(run)

    # Peers: mark swaps the roles of two bitmaps; unmark ORs the transfer
    # bitmap into tracking and empties it.
    if impl.startswith("numpy"):
        roles = [np.zeros(chunks // 64, dtype=np.uint64) for _ in range(2)]

        def unmark(tracking, transfer):
            np.bitwise_or(tracking, transfer, out=tracking)
            transfer.fill(0)

    elif impl.startswith("bitarray"):
        roles = [zeros(chunks) for _ in range(2)]

        def unmark(tracking, transfer):
            tracking |= transfer
            transfer.setall(0)

    else:
        roles = [BitMap() for _ in range(2)]

        def unmark(tracking, transfer):
            tracking |= transfer
            transfer.clear()

    def run():
        roles.reverse()
        unmark(*roles)

    return Case(run)


@pytest.mark.parametrize(
    ("impl", "chunks", "granularity"),
    [
        pytest.param(impl, chunks, gran, id=f"{impl}-{_id(chunks, gran)}")
        for chunks, gran in MARK_GEOMETRIES
        for impl in PAIR_IMPLS
        if (impl != "reference" or chunks < BIG) and (impl == "isc" or chunks < 1 << 32)
    ],
)
def test_mark_unmark_pair(benchmark, impl, chunks, granularity):
    case = _pair_case(impl, chunks, granularity)
    _measure(benchmark, f"3a mark + unmark, {_geometry(chunks, granularity)}", impl, case)


@pytest.mark.parametrize(
    ("impl", "chunks", "granularity"),
    [
        pytest.param(impl, chunks, gran, id=f"{impl}-{_id(chunks, gran)}")
        for chunks, gran in MARK_GEOMETRIES
        for impl in ("isc", "reference", "timer floor: empty call")
        if impl != "reference" or chunks < BIG
    ],
)
def test_mark(benchmark, impl, chunks, granularity):
    if impl == "timer floor: empty call":
        case = Case(lambda: None, 2000, lambda: ((), {}))
    else:
        kind = DeltaBitmap if impl == "isc" else _reference.DeltaBitmap
        bitmap = kind(chunks * granularity, granularity)

        def setup():
            bitmap.unmark()
            return (), {}

        case = Case(bitmap.mark, 2000, setup)
    _measure(benchmark, f"3b mark alone, {_geometry(chunks, granularity)}", impl, case)


# -- 4. unmark: merge a full transfer bitmap into tracking --------------------------------

UNMARK_IMPLS = [
    "isc",
    "isc, tracking and saved fully set too",
    "isc, every bitmap full but for one chunk",
    "isc before, tracking and saved fully set too",
    "isc before, every bitmap full but for one chunk",
    "reference",
    "numpy uint64 bitwise_or(a, b, out=a)",
    "numpy bool bitwise_or(a, b, out=a)",
    "bitarray a |= b",
    "pyroaring a |= b",
]


def _unmark_case(impl: str, chunks: int) -> Case:
    size = chunks * DEFAULT
    if impl.startswith("isc") or impl == "reference":
        kind = DeltaBitmap if impl.startswith("isc") else _reference.DeltaBitmap
        if impl.startswith("isc before"):
            kind = _core_before().DeltaBitmap
        bitmap = _resident(kind(size, DEFAULT))
        worst = "fully" in impl or "but for one" in impl

        def setup():
            bitmap.mark(full=True)
            if "fully" in impl:
                bitmap.record_write(0, size)
            elif worst:  # no bitmap is the union: the merge reads both
                bitmap.clear_transfer(0, 1)
                bitmap.record_write(DEFAULT, size - DEFAULT)
            return (), {}

        rounds = {(False, SMALL): 200, (False, BIG): 40, (True, SMALL): 100, (True, BIG): 5}
        return Case(bitmap.unmark, 20 if impl == "reference" else rounds[worst, chunks], setup)

    if impl.startswith("numpy"):
        dtype, length = (np.uint64, chunks // 64) if "uint64" in impl else (bool, chunks)
        tracking = np.zeros(length, dtype=dtype)
        transfer = np.full(length, np.iinfo(np.uint64).max if dtype is np.uint64 else True)

        def run():
            np.bitwise_or(tracking, transfer, out=tracking)

        return Case(run)

    if impl.startswith("bitarray"):
        tracking, transfer = zeros(chunks), bitarray(chunks)
        transfer.setall(1)

        def run():
            operator.ior(tracking, transfer)

        return Case(run)

    full = BitMap()
    full.add_range(0, chunks)

    def setup():
        return (BitMap(),), {}

    def run(tracking):
        tracking |= full

    return Case(run, 200, setup)


@pytest.mark.parametrize(
    ("impl", "chunks"),
    [
        pytest.param(impl, chunks, id=f"{impl}-{_id(chunks, DEFAULT)}")
        for chunks in (SMALL, BIG)
        for impl in UNMARK_IMPLS
        if impl != "reference" or chunks == SMALL
    ],
)
def test_unmark(benchmark, impl, chunks):
    case = _unmark_case(impl, chunks)
    group = f"4 unmark with a full transfer bitmap, {_geometry(chunks, DEFAULT)}"
    _measure(benchmark, group, impl, case, bitmap_bytes=chunks // 8)


# -- 5. extents: runs of the transfer bitmap ----------------------------------------------

EXTENT_IMPLS = [
    "isc",
    "reference",
    "bitarray search(1) + numpy runs",
    "pyroaring to_array() + numpy runs",
    "numpy bool flatnonzero + diff",
    "numpy uint64 flatnonzero words + unpackbits + diff",
]
EMPTY = 1 << 33  # 16 TiB at 2 KiB: 1 GiB per bitmap


def _extents_case(impl: str, chunks: int, granularity: int) -> tuple[Case, np.ndarray]:
    """The case and the runs it must return."""
    rng = np.random.default_rng([SEED, 5, chunks, granularity])
    positions = np.unique(rng.integers(0, chunks, chunks // 1000)) if chunks < EMPTY else []
    positions = np.asarray(positions, dtype=np.int64)
    expected = _runs(positions)
    rounds = 0

    if impl in ("isc", "reference"):
        kind = DeltaBitmap if impl == "isc" else _reference.DeltaBitmap
        bitmap = kind(chunks * granularity, granularity)
        bitmap.record_writes(positions * granularity, np.full(positions.size, granularity))
        bitmap.mark()
        run = bitmap.extents
        rounds = 5 if impl == "reference" else 0
    elif impl.startswith("bitarray"):
        bits = zeros(chunks)
        bits[positions.tolist()] = 1

        def run():
            return _runs(np.fromiter(bits.search(1), dtype=np.int64))

    elif impl.startswith("pyroaring"):
        roaring = BitMap(positions.astype(np.uint32))

        def run():
            return _runs(np.frombuffer(roaring.to_array(), dtype=np.uint32))

    elif impl.startswith("numpy bool"):
        flags = np.zeros(chunks, dtype=bool)
        flags[positions] = True

        def run():
            return _runs(np.flatnonzero(flags))

    else:
        words = np.zeros(chunks // 64, dtype=np.uint64)
        np.bitwise_or.at(words, positions >> 6, np.uint64(1) << (positions & 63).astype(np.uint64))

        def run():
            return _runs_of_words(words)

    runs = len(expected)
    note = f"{positions.size} chunks set in {runs} runs"
    return Case(run, rounds, items=runs, unit="run" if runs else "", note=lambda: note), expected


@pytest.mark.parametrize(
    ("impl", "chunks", "granularity"),
    [
        pytest.param(impl, chunks, gran, id=f"{impl}-{_id(chunks, gran)}")
        for chunks, gran in ((BIG, DEFAULT), (SMALL, DEFAULT), (EMPTY, 2048))
        for impl in EXTENT_IMPLS
        if (impl != "reference" or chunks == SMALL)
        # An empty 2^33-bit map: pyroaring holds 32-bit indices only, and a
        # numpy bool array would be 8 GiB.
        and not (chunks == EMPTY and impl.startswith(("reference", "pyroaring", "numpy bool")))
    ],
)
def test_extents(benchmark, impl, chunks, granularity):
    case, expected = _extents_case(impl, chunks, granularity)
    np.testing.assert_array_equal(np.asarray(case.run()).reshape(-1, 2), expected)
    density = "empty" if chunks == EMPTY else "0.1% of chunks set"
    group = f"5 extents, {density}, {_geometry(chunks, granularity)}"
    _measure(benchmark, group, impl, case, bitmap_bytes=chunks // 8)


# -- 6. test_and_clear: one transfer bit per call ------------------------------------------

CLEAR_IMPLS = [
    "isc",
    "reference",
    "bitarray: if a[c]: a[c] = 0",
    "pyroaring: if c in b: b.discard(c)",
    "numpy bool: if a[c]: a[c] = False",
    "loop only",
]


def _test_and_clear_case(impl: str, chunks: int) -> Case:
    nblocks = min(128, chunks // (4 * BLOCK))
    rng = np.random.default_rng([SEED, 6, chunks])
    picked = rng.choice(chunks, nblocks * BLOCK, replace=False)
    blocks = [block.tolist() for block in np.split(picked, nblocks)]

    if impl in ("isc", "reference"):
        kind = DeltaBitmap if impl == "isc" else _reference.DeltaBitmap
        bitmap = _resident(kind(chunks * DEFAULT, DEFAULT))
        one_chunk = np.full(BLOCK, DEFAULT)

        def prepare(block):
            _remark(bitmap, np.array(block) * DEFAULT, one_chunk)

        def run(block):
            test_and_clear = bitmap.test_and_clear
            for chunk in block:
                test_and_clear(chunk)

    elif impl.startswith("bitarray"):
        bits = zeros(chunks)

        def prepare(block):
            bits[block] = 1

        def run(block):
            for chunk in block:
                if bits[chunk]:
                    bits[chunk] = 0

    elif impl.startswith("pyroaring"):
        roaring = BitMap()

        def prepare(block):
            roaring.update(block)

        def run(block):
            discard = roaring.discard
            for chunk in block:
                if chunk in roaring:
                    discard(chunk)

    elif impl.startswith("numpy"):
        flags = np.zeros(chunks, dtype=bool)

        def prepare(block):
            flags[block] = True

        def run(block):
            for chunk in block:
                if flags[chunk]:
                    flags[chunk] = False

    else:

        def prepare(block):
            pass

        def run(block):
            for _chunk in block:
                pass

    return Case(run, 16 if impl == "reference" else 128, _cycle(blocks, prepare), BLOCK, "call")


@pytest.mark.parametrize(
    ("impl", "chunks"),
    [
        pytest.param(impl, chunks, id=f"{impl}-{_id(chunks, DEFAULT)}")
        for chunks in (BIG, SMALL)
        for impl in CLEAR_IMPLS
        if impl != "reference" or chunks == SMALL
    ],
)
def test_test_and_clear(benchmark, impl, chunks):
    case = _test_and_clear_case(impl, chunks)
    _measure(benchmark, f"6 test_and_clear, {_geometry(chunks, DEFAULT)}", impl, case)
