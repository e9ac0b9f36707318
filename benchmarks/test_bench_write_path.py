"""The host write path: what a session adds to a LUN write, beside the raw write, in one run.

For 4 KiB and 64 KiB writes, on a ``FileLUN`` (a file in ``/dev/shm``) and on a
``MemoryLUN``, each table (one pytest-benchmark group) holds:

* the raw write: ``os.pwrite`` on the same file (FileLUN) or a memoryview slice
  assignment into a bytearray of the same size (MemoryLUN), and ``loop only``,
  the cost of the benchmark's own ``for`` loop;
* the LUN's own ``write`` (no session);
* ``Session.write`` at every granularity (2 KiB to 64 KiB) in three cases:
  ``unmarked``; ``marked, no COFW`` (marked right after the session was made,
  so the transfer bitmap is empty and no write needs a COFW); ``marked, COFW``
  (a full mark before each round, so every write is the first one to its chunks
  and saves them all; the save area is large enough that it never fills).

A round is ``BLOCK`` writes at pre-generated, seeded, write-size-aligned
offsets, each in a 64 KiB slot of its own, so no two writes of a round share a
chunk at any granularity. Each round checks afterwards that its data landed
(and, with COFW, that every write saved every chunk it touched). Before each
round of a session row, a round of the LUN's own write at other offsets is
timed too (``paired_write``): the overhead is taken against that baseline, so
that drift between rows cannot pass for overhead. All rows write the same data
object: the speed of a copy depends on where its source lies in memory. Nothing
here asserts on time; ``benchmarks/report_data_path.py`` turns the results into
the overhead of each case over the LUN's own write.
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from datapath import (
    SEED,
    place,
    random_bytes,
    scratch,
)

from isc import FileLUN, MemoryLUN, SaveArea, Session

LUN_SIZE = 1 << 30
WRITE_SIZES = (4096, 65536)
GRANULARITIES = tuple(2048 << i for i in range(6))
SLOT = 65536  # each write of a round lies in a 64 KiB slot of its own
BLOCK = 2048  # writes per timed round
BLOCKS = 8  # pre-generated rounds of offsets, cycled
ROUNDS = 30
CASES = ("unmarked", "marked, no COFW", "marked, COFW")


def _kib(n: int) -> str:
    return f"{n // 1024}K"


@dataclass
class Store:
    """Where a row's writes land: ``put(offsets, data)`` writes a round, ``get`` reads back."""

    put: Callable[[list[int], bytes], None]
    get: Callable[[int, int], bytes]


@dataclass
class Target:
    """A LUN to write to, and the raw write it is measured against."""

    name: str
    lun: FileLUN | MemoryLUN
    raw_name: str
    raw: Store
    where: str

    @property
    def direct(self) -> Store:
        """The LUN's own write and read."""
        return Store(functools.partial(_writes, self.lun.write), self.lun.read)


def _prefault(write: Callable[[int, bytes], object]) -> None:
    # Every page exists before timing: no write pays for allocating one.
    zeros = bytes(SLOT * 1024)
    for start in range(0, LUN_SIZE, len(zeros)):
        write(start, zeros)


def _pwrites(fd: int, offsets: list[int], data: bytes) -> None:
    pwrite = os.pwrite
    for offset in offsets:
        pwrite(fd, data, offset)


def _slice_writes(view: memoryview, offsets: list[int], data: bytes) -> None:
    n = len(data)
    for offset in offsets:
        view[offset : offset + n] = data


def _writes(write: Callable[[int, bytes], object], offsets: list[int], data: bytes) -> None:
    for offset in offsets:
        write(offset, data)


def _loop_only(offsets: list[int], data: bytes) -> None:
    for _offset in offsets:
        pass


@pytest.fixture(scope="module", params=["FileLUN", "MemoryLUN"])
def target(request) -> Iterator[Target]:
    if request.param == "MemoryLUN":
        lun = MemoryLUN(LUN_SIZE)
        shadow = memoryview(bytearray(LUN_SIZE))
        _prefault(lun.write)
        _prefault(lambda offset, data: _slice_writes(shadow, [offset], data))
        yield Target(
            "MemoryLUN",
            lun,
            "memoryview slice",
            Store(
                functools.partial(_slice_writes, shadow),
                lambda offset, n: shadow[offset : offset + n].tobytes(),
            ),
            "memory",
        )
        lun.close()
        return
    with scratch(2 * LUN_SIZE) as where:
        path = where / "lun.img"
        with FileLUN.create(path, LUN_SIZE) as lun:
            _prefault(lun.write)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                yield Target(
                    "FileLUN",
                    lun,
                    "os.pwrite",
                    Store(
                        functools.partial(_pwrites, fd),
                        lambda offset, n: os.pread(fd, n, offset),
                    ),
                    place(path),
                )
            finally:
                os.close(fd)


@functools.cache
def _offset_blocks(write_size: int, stream: int = 0) -> list[list[int]]:
    rng = np.random.default_rng([SEED, write_size, stream])
    blocks = []
    for _ in range(BLOCKS):
        slots = rng.choice(LUN_SIZE // SLOT, BLOCK, replace=False)
        within = rng.integers(0, SLOT // write_size, BLOCK)
        blocks.append((slots * SLOT + within * write_size).tolist())
    return blocks


@functools.cache
def _data(write_size: int) -> bytes:
    return random_bytes(np.random.SFC64([SEED, write_size]), write_size)


def _measure(
    benchmark,
    target: Target,
    write_size: int,
    run: Callable[[list[int], bytes], None],
    store: Store | None,
    *,
    before_round: Callable[[], object] = lambda: None,
    after_round: Callable[[], object] = lambda: None,
    paired: Store | None = None,
    **info: object,
) -> None:
    """Time ``run(offsets, data)`` over rounds of BLOCK writes; check each round in ``store``.

    With ``paired``, a round of ``paired.put`` at other offsets precedes each
    round, timed here: its median per write goes to extra_info as
    ``paired_write``, a baseline measured side by side with the row.
    """
    data = _data(write_size)
    blocks = itertools.cycle(_offset_blocks(write_size))
    paired_blocks = itertools.cycle(_offset_blocks(write_size, 1))
    paired_times: list[float] = []
    if store is not None:
        # Zero what the row writes, so that its checks see its own writes.
        zeros = bytes(write_size)
        for block in _offset_blocks(write_size):
            store.put(block, zeros)

    def setup():
        if paired is not None:
            started = time.perf_counter()
            paired.put(next(paired_blocks), data)
            paired_times.append((time.perf_counter() - started) / BLOCK)
        before_round()
        return (next(blocks), data), {}

    def teardown(offsets: list[int], data: bytes) -> None:
        if store is not None:
            wrong = [o for o in offsets if store.get(o, write_size) != data]
            assert not wrong, f"{len(wrong)} of {len(offsets)} writes did not land"
        after_round()

    benchmark.group = f"host write {write_size // 1024} KiB, {target.name}"
    benchmark.extra_info.update(
        lun=target.name, where=target.where, write_size=write_size, items=BLOCK, unit="write"
    )
    benchmark.extra_info.update(info)
    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=1)
    if paired_times:
        benchmark.extra_info["paired_write"] = statistics.median(paired_times)


@pytest.mark.parametrize("write_size", WRITE_SIZES, ids=_kib)
def test_loop_only(benchmark, target: Target, write_size: int) -> None:
    _measure(benchmark, target, write_size, _loop_only, None, impl="loop only", case="floor")


@pytest.mark.parametrize("write_size", WRITE_SIZES, ids=_kib)
def test_raw_write(benchmark, target: Target, write_size: int) -> None:
    _measure(
        benchmark, target, write_size, target.raw.put, target.raw, impl=target.raw_name, case="raw"
    )


@pytest.mark.parametrize("write_size", WRITE_SIZES, ids=_kib)
def test_lun_write(benchmark, target: Target, write_size: int) -> None:
    _measure(
        benchmark,
        target,
        write_size,
        target.direct.put,
        target.direct,
        impl=f"{target.name}.write",
        case="no session",
    )


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=_kib)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("write_size", WRITE_SIZES, ids=_kib)
def test_session_write(
    benchmark, target: Target, write_size: int, case: str, granularity: int
) -> None:
    cofw = case == "marked, COFW"
    # Enough room for every chunk a round touches: writes lie in distinct slots.
    session = Session(target.lun, granularity, SaveArea(BLOCK * SLOT))
    chunks_per_round = BLOCK * max(write_size // granularity, 1)
    rounds = 0

    def full_mark() -> None:
        session.unmark()
        session.mark(full=True)

    def count_round() -> None:
        nonlocal rounds
        rounds += 1
        stats = session.stats
        expected = rounds * chunks_per_round if cofw else 0
        assert stats.aborts == 0, stats.last_abort
        assert stats.cofw_chunks == expected, f"{stats.cofw_chunks} COFW chunks, not {expected}"

    if case == "marked, no COFW":
        session.mark()  # tracking is empty, so the transfer bitmap is too
    _measure(
        benchmark,
        target,
        write_size,
        functools.partial(_writes, session.write),
        target.direct,
        before_round=full_mark if cofw else lambda: None,
        after_round=count_round,
        paired=target.direct,
        impl="Session.write",
        case=case,
        granularity=granularity,
    )
    session.unmark()
