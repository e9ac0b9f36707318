"""Copies: isc's copy job beside the tools a user would copy a volume with, in one run.

Three sets of tables (pytest-benchmark groups):

``full copy``
    An unmarked full copy (``CopyJob.full(marked=False)``) of a 1 GiB
    ``FileLUN`` to a ``FileLUN`` at io_size 1, 4 and 8 MiB, beside a plain
    Python loop of 1 MiB ``os.preadv``/``os.pwrite`` and ``cp --sparse=never``.
    ``existing``: the destination file exists with every page allocated (a
    volume), and is overwritten with a constant before each round. ``fresh``:
    the destination is a new sparse file each round, so every copy also pays
    for allocating its pages, as ``cp`` does (it truncates its destination).
``incremental copy``
    1% of a 4 GiB source changed by random 64 KiB writes through a session;
    ``CopyJob.incremental()`` after a mark, beside ``rsync --inplace
    --no-whole-file --ignore-times`` of the same change to a destination that
    held the source's image before it (two local files), and beside full
    copies (isc's unmarked full copy and ``cp``). ``--ignore-times`` stops
    rsync's size-and-mtime quick check from skipping the file: it does not see
    a change made within its time resolution.
``copy with a host writer``
    A thread doing 4 KiB random writes through the session, each timed with
    ``time.perf_counter_ns``, while ``full(marked=True)`` runs, while
    ``full(marked=False)`` runs, and alone (idle, for ``WINDOW`` seconds).
    The writer starts when the copy has sent its first run and stops when the
    copy returns; extra_info carries its writes per second, latencies and the
    COFW chunks per copy.

Every round is checked byte for byte afterwards: the destination equals the
source (the point-in-time image taken at the mark for a marked copy with a
writer; for an unmarked one, after the incremental copy that follows it), so a
fast wrong copy fails. Files live in ``/dev/shm`` when it has room. Nothing
here asserts on time: ``benchmarks/report_data_path.py`` prints the ratios.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from datapath import (
    SEED,
    assert_same,
    place,
    random_bytes,
    scratch,
    shm_free,
    sparse_file,
    write_pattern,
    write_random,
)

from isc import CopyJob, CopyResult, Destination, DestState, FileLUN, SaveArea, Session

GIB = 1 << 30
MIB = 1 << 20
IO_SIZES = (1 * MIB, 4 * MIB, 8 * MIB)
BIG = 4 * GIB  # the incremental source, if /dev/shm holds about three copies of it
CHANGE_WRITE = 64 * 1024
WINDOW = 1.0  # seconds the idle writer runs per round
WRITE = 4096  # bytes per host write of the writer thread


def _mib(n: int) -> str:
    return f"{n // MIB}M"


@dataclass
class Volume:
    """A seeded random source file and a destination file beside it."""

    src: Path
    dst: Path
    size: int

    def check(self, expected: Path | None = None) -> None:
        assert_same(self.dst, expected or self.src, self.size)


def _volume(where: Path, size: int) -> Volume:
    vol = Volume(where / "src.img", where / "dst.img", size)
    write_random(vol.src, size)
    shutil.copyfile(vol.src, vol.dst)
    return vol


@pytest.fixture(scope="module")
def gib() -> Iterator[Volume]:
    """1 GiB, with room for a third file (the point-in-time image of a marked copy)."""
    with scratch(4 * GIB) as where:
        yield _volume(where, GIB)


@pytest.fixture(scope="module")
def big() -> Iterator[Volume]:
    """BIG bytes when /dev/shm holds three copies of it, else 1 GiB."""
    size = BIG if shm_free() >= 3 * BIG else GIB
    with scratch(3 * size) as where:
        yield _volume(where, size)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install -y {name})")
    return path


def _pedantic(benchmark, run: Callable[[], object], prepare, rounds: int, warmup: int) -> None:
    """Time ``run()``; ``prepare()`` before each round returns the check to run after it."""
    checks: list[Callable[[], None]] = []

    def setup():
        checks.append(prepare())
        return (), {}

    def teardown() -> None:
        checks.pop()()

    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=warmup)


# -- the unmarked full copy ------------------------------------------------------------


def _python_copy(src: Path, dst: Path, size: int) -> None:
    """The peer: 1 MiB preadv/pwrite through one buffer, then fsync, as the copy job does."""
    view = memoryview(bytearray(MIB))
    fi = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    fo = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < size:
            n = os.preadv(fi, [view[: min(MIB, size - done)]], done)
            done += os.pwrite(fo, view[:n], done)
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


def _full_copy(benchmark, vol: Volume, destination: str, impl: str, run, **info) -> None:
    """One row of a full-copy table: ``run()`` copies ``vol.src`` to ``vol.dst``."""

    def prepare():
        if destination == "fresh":
            sparse_file(vol.dst, vol.size)
        else:
            write_pattern(vol.dst, vol.size, 0x5A)
        return vol.check

    benchmark.group = f"full copy 1 GiB, {destination} destination"
    benchmark.extra_info.update(impl=impl, bytes=vol.size, where=place(vol.src), **info)
    _pedantic(benchmark, run, prepare, rounds=5, warmup=1)


DESTINATIONS = ("existing", "fresh")


@pytest.mark.parametrize("destination", DESTINATIONS)
@pytest.mark.parametrize("io_size", IO_SIZES, ids=_mib)
def test_full_copy_isc(benchmark, gib: Volume, io_size: int, destination: str) -> None:
    with FileLUN(gib.src) as src:
        session = Session(src)

        def run() -> None:
            with FileLUN(gib.dst) as dst:
                job = CopyJob(session, [Destination(dst, "replica")], io_size=io_size)
                assert job.full(marked=False).bytes_sent == gib.size

        _full_copy(benchmark, gib, destination, "isc", run, io_size=io_size)


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_full_copy_python(benchmark, gib: Volume, destination: str) -> None:
    run = functools.partial(_python_copy, gib.src, gib.dst, gib.size)
    _full_copy(benchmark, gib, destination, "python preadv/pwrite", run, io_size=MIB)


def test_full_copy_cp(benchmark, gib: Volume) -> None:
    cp = [_tool("cp"), "--sparse=never", str(gib.src), str(gib.dst)]
    _full_copy(benchmark, gib, "fresh", "cp --sparse=never", lambda: subprocess.run(cp, check=True))


# -- the incremental copy --------------------------------------------------------------


class Changer:
    """Changes 1% of a volume per round with 64 KiB writes through a session, seeded."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.writes = session.source.size // 100 // CHANGE_WRITE
        self.bytes = self.writes * CHANGE_WRITE
        self._rng = np.random.default_rng(SEED)
        self._bits = np.random.SFC64(SEED)

    def change(self) -> None:
        """Write new random data to ``writes`` distinct random 64 KiB-aligned slots
        (``slots``: their numbers)."""
        slots = self._rng.choice(self.session.source.size // CHANGE_WRITE, self.writes, False)
        self.slots = slots.tolist()
        data = memoryview(random_bytes(self._bits, self.bytes))
        for i, slot in enumerate(self.slots):
            piece = data[i * CHANGE_WRITE : (i + 1) * CHANGE_WRITE]
            self.session.write(slot * CHANGE_WRITE, piece)


def _incremental(
    benchmark, vol: Volume, session: Session, impl: str, run, *, before=None, rounds: int
) -> Changer:
    """One row of the incremental table: change 1%, ``before()``, then time ``run()``.

    The destination equals the source before every round, since each round checks it.
    """
    changer = Changer(session)

    def prepare():
        changer.change()
        if before is not None:
            before()
        return vol.check

    benchmark.group = f"incremental copy, 1% of {vol.size // GIB} GiB changed"
    benchmark.extra_info.update(
        impl=impl, bytes=vol.size, changed=changer.bytes, where=place(vol.src)
    )
    _pedantic(benchmark, run, prepare, rounds=rounds, warmup=0)
    return changer


def test_incremental_isc(benchmark, big: Volume) -> None:
    with FileLUN(big.src) as src, FileLUN(big.dst) as dst:
        session = Session(src)
        # The destination holds the source's image and the session is new, so
        # the destination is in step with it: no full first copy is due.
        replica = Destination(dst, "replica", DestState.CONSISTENT, epoch=session.epoch)
        job = CopyJob(session, [replica])
        sent: list[int] = []

        def run() -> None:
            sent.append(job.incremental().bytes_sent)

        changer = _incremental(benchmark, big, session, "isc", run, before=session.mark, rounds=7)
        assert set(sent) == {changer.bytes}, f"sent {sent}, changed {changer.bytes} per round"


def test_incremental_rsync(benchmark, big: Volume) -> None:
    rsync = [_tool("rsync"), "--inplace", "--no-whole-file", "--ignore-times"]
    rsync += [str(big.src), str(big.dst)]
    with FileLUN(big.src) as src:
        run = functools.partial(subprocess.run, rsync, check=True)
        _incremental(benchmark, big, Session(src), "rsync --inplace --no-whole-file", run, rounds=3)


def test_incremental_full_isc(benchmark, big: Volume) -> None:
    with FileLUN(big.src) as src, FileLUN(big.dst) as dst:
        session = Session(src)
        job = CopyJob(session, [Destination(dst, "replica")])
        run = functools.partial(job.full, marked=False)
        _incremental(benchmark, big, session, "isc full copy (unmarked)", run, rounds=3)


def test_incremental_full_cp(benchmark, big: Volume) -> None:
    cp = [_tool("cp"), "--sparse=never", str(big.src), str(big.dst)]
    with FileLUN(big.src) as src:
        run = functools.partial(subprocess.run, cp, check=True)
        _incremental(benchmark, big, Session(src), "cp --sparse=never", run, rounds=3)


# -- a copy with a host writer -----------------------------------------------------------


class HostWriter:
    """A thread of 4 KiB writes through ``session`` at seeded random offsets, each timed.

    ``go`` starts it, ``finish()`` stops it and joins; counts add up over rounds.
    """

    def __init__(self, session: Session) -> None:
        rng = np.random.default_rng([SEED, WRITE])
        self.session = session
        self.offsets = (rng.integers(0, session.source.size // WRITE, 1 << 20) * WRITE).tolist()
        self.data = random_bytes(np.random.SFC64([SEED, WRITE]), WRITE)
        self.latencies: list[int] = []
        self.seconds = 0.0
        self._next = 0
        self._error: BaseException | None = None

    def start(self) -> None:
        self.go = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-writer")
        self._thread.start()

    def finish(self) -> None:
        self.go.set()
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        write, data, offsets = self.session.write, self.data, self.offsets
        latencies, stopped, clock = self.latencies, self._stop.is_set, time.perf_counter_ns
        i = self._next
        self.go.wait()
        began = clock()
        try:
            while not stopped():
                t0 = clock()
                write(offsets[i], data)
                latencies.append(clock() - t0)
                i = (i + 1) % len(offsets)
        except BaseException as exc:
            self._error = exc
        self.seconds += (clock() - began) / 1e9
        self._next = i


def _with_writer(
    benchmark,
    vol: Volume,
    impl: str,
    run: Callable[[CopyJob, HostWriter], object],
    prepare: Callable[[CopyJob], Callable[[], None]],
) -> None:
    """One row of the host-writer table: ``run(job, writer)`` timed with the writer on.

    ``job`` is a full copy job to the destination that starts the writer once
    it has sent its first run. ``prepare(job)`` runs before each round and
    returns that round's check.
    """
    with FileLUN(vol.src) as src, FileLUN(vol.dst) as dst:
        # A save area as large as the source: the marked copy can never abort.
        session = Session(src, save_area=SaveArea(vol.size))
        writer = HostWriter(session)
        job = CopyJob(
            session, [Destination(dst, "replica")], progress=lambda done, total: writer.go.set()
        )
        cofw: list[int] = []

        def before():
            writer.start()
            return prepare(job)

        def timed() -> None:
            try:
                result = run(job, writer)
            finally:
                writer.finish()
            cofw.append(result.cofw_chunks if isinstance(result, CopyResult) else 0)

        benchmark.group = "copy 1 GiB with a host writer (4 KiB random writes)"
        benchmark.extra_info.update(impl=impl, bytes=vol.size, where=place(vol.src))
        _pedantic(benchmark, timed, before, rounds=5, warmup=0)
        assert session.stats.aborts == 0, session.stats.last_abort
        lat = np.array(writer.latencies, dtype=np.int64)
        benchmark.extra_info.update(
            host_writes=len(lat),
            writes_per_second=len(lat) / writer.seconds,
            latency_ns={
                "median": float(np.median(lat)),
                "p99": float(np.percentile(lat, 99)),
                "max": int(lat.max()),
            },
            cofw_chunks=cofw,
            save_area_high_water=session.stats.save_area_high_water,
        )


def _full_copy_of(marked: bool) -> Callable[[CopyJob, HostWriter], CopyResult]:
    return lambda job, writer: job.full(marked)


def _no_check(job: CopyJob) -> Callable[[], None]:
    return lambda: None


def test_writer_idle(benchmark, gib: Volume) -> None:
    def idle(job: CopyJob, writer: HostWriter) -> None:
        writer.go.set()
        time.sleep(WINDOW)

    _with_writer(benchmark, gib, "idle (no copy)", idle, _no_check)


def test_writer_during_unmarked_copy(benchmark, gib: Volume) -> None:
    def prepare(job: CopyJob) -> Callable[[], None]:
        def check() -> None:
            # The destination holds a mix; the incremental copy that follows makes it the source.
            job.session.mark()
            CopyJob(job.session, job.destinations).incremental()
            gib.check()

        return check

    _with_writer(benchmark, gib, "full(marked=False)", _full_copy_of(False), prepare)


def test_writer_during_marked_copy(benchmark, gib: Volume) -> None:
    image = gib.src.with_name("image.img")

    def prepare(job: CopyJob) -> Callable[[], None]:
        # The writer starts after the mark: the copy must equal the source as it is now.
        shutil.copyfile(gib.src, image)
        return lambda: gib.check(image)

    _with_writer(benchmark, gib, "full(marked=True)", _full_copy_of(True), prepare)
    image.unlink()
