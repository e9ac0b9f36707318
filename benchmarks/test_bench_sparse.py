"""Sparse full copies and incremental copies at small granularity, beside their peers.

Three sets of tables (pytest-benchmark groups), every round checked byte for
byte afterwards:

``sparse full copy``
    A 4 GiB sparse file with 1% written (655 pieces of 64 KiB at seeded
    random 64 KiB-aligned places, the rest holes) copied to a new sparse file
    of the same size, made before each round: isc's unmarked full copy
    (``isc``), its marked full copy, the unmarked one with one worker thread,
    and with the source's holes ignored (what isc did before it knew them:
    every byte copied); ``cp --sparse=auto`` and ``qemu-img convert -n`` (its
    destination must exist; it finds holes with ``SEEK_DATA`` and zero
    blocks by reading). The note gives the destination's allocated size
    (``du``), the same every round.
``incremental copy at G``
    A 1 GiB random volume and an equal destination; each round changes 1%
    of it through a session (163 writes of 64 KiB, as in ``test_bench_copy``),
    marks, and times ``CopyJob.incremental()`` at granularity G (2 to 64 KiB)
    with ``workers`` 1, 2 and 4 and the default (``isc``), and with the
    default workers splitting every run of 2 chunks or more, as before
    ``SPLIT_MIN`` (``every run split``). Each round checks the slots it
    changed; each row ends with a check of the whole destination. Rows of
    one granularity run one after the other.
``a run copied inside the kernel by two threads, beside one``
    ``FileLUN.copy_to`` of one run of N bytes (64 KiB to 64 MiB) at seeded
    random places between two allocated files, in two halves on a pool of
    two threads as the copy job splits a run, with the calling thread copying
    a run alone between its rounds: where a split starts to pay, which sets
    ``SPLIT_MIN``.

On a machine shared with other work the load drifts between rows, so each
row of the first two sets also times its group's ``isc`` row in the rounds
between its own (untimed by pytest-benchmark, checked as well): the note's
"÷ isc beside" is the ratio of the two medians taken side by side, which
drift cannot fake; the third set likewise. Files live in ``/dev/shm`` when it has room. Nothing here
asserts on time.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from datapath import SEED, assert_same, place, random_bytes, scratch, sparse_file, write_random
from test_bench_copy import CHANGE_WRITE, Changer, Volume, _pedantic, _tool

import isc.copy
from isc import CopyJob, Destination, DestState, FileLUN, Session
from isc.copy import DEFAULT_WORKERS, SPLIT_MIN

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10
SPARSE_SIZE = 4 * GIB
WRITTEN = 0.01  # share of the sparse volume that holds data
GRANULARITIES = (2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB)
RUN_SIZES = tuple(64 * KIB << i for i in range(11))  # 64 KiB to 64 MiB


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _beside(
    benchmark,
    run: Callable[[], object],
    prepare: Callable[[], Callable[[], None]],
    reference: Callable[[], object] | None,
    *,
    rounds: int,
    warmup: int,
) -> float | None:
    """Time ``run()`` (``prepare()`` before each round returns its check), and
    ``reference()`` prepared and checked the same way between its rounds.

    Returns the median time of ``run`` over that of ``reference`` (warm-up
    rounds left out), or None without a reference.
    """
    own: list[float] = []
    other: list[float] = []

    def timed() -> None:
        began = time.perf_counter()
        run()
        own.append(time.perf_counter() - began)

    def prepare_both() -> Callable[[], None]:
        if reference is not None:
            check = prepare()
            began = time.perf_counter()
            reference()
            other.append(time.perf_counter() - began)
            check()
        return prepare()

    _pedantic(benchmark, timed, prepare_both, rounds=rounds, warmup=warmup)
    if reference is None:
        return None
    return statistics.median(own[warmup:]) / statistics.median(other[warmup:])


def _note(ratio: float | None, *more: str) -> str:
    """The note of a row: "÷ isc beside R" when timed beside isc, then ``more``."""
    beside = [] if ratio is None else [f"÷ isc beside {ratio:.2f}"]
    return "; ".join([*beside, *more])


# -- the sparse full copy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse() -> Iterator[Volume]:
    """A 4 GiB sparse source, 1% written in 64 KiB pieces, and a destination path
    (all of whose 4 GiB the copy that ignores holes allocates)."""
    with scratch(SPARSE_SIZE + SPARSE_SIZE // 10) as where:
        vol = Volume(where / "src.img", where / "dst.img", SPARSE_SIZE)
        sparse_file(vol.src, vol.size)
        slots = SPARSE_SIZE // CHANGE_WRITE
        chosen = np.random.default_rng(SEED).choice(slots, int(slots * WRITTEN), replace=False)
        data = random_bytes(np.random.SFC64(SEED), CHANGE_WRITE * len(chosen))
        fd = os.open(vol.src, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for i, slot in enumerate(sorted(chosen.tolist())):
                piece = memoryview(data)[i * CHANGE_WRITE : (i + 1) * CHANGE_WRITE]
                os.pwrite(fd, piece, slot * CHANGE_WRITE)
        finally:
            os.close(fd)
        yield vol


class _HolesUnknown(FileLUN):
    """A FileLUN that does not tell its holes, as before ``data_extents``."""

    data_extents = None


def _isc_sparse_copy(vol: Volume, session: Session, marked: bool = False, workers=None):
    """``run()`` for an isc full copy of ``session``'s source to ``vol.dst``."""

    def run() -> None:
        with FileLUN(vol.dst) as dst:
            job = CopyJob(
                session, [Destination(dst, "replica")], workers=workers or DEFAULT_WORKERS
            )
            assert job.full(marked).bytes_sent == vol.size

    return run


def _sparse_copy(benchmark, vol: Volume, impl: str, run) -> None:
    """One row of the sparse table: ``run()`` copies ``vol.src`` to a new sparse ``vol.dst``,
    with isc's unmarked full copy between its rounds unless it is that row."""
    allocated: list[int] = []

    def prepare():
        sparse_file(vol.dst, vol.size)

        def check() -> None:
            allocated.append(_allocated(vol.dst))
            vol.check()

        return check

    benchmark.group = f"sparse full copy, {vol.size // GIB} GiB, {WRITTEN:.0%} written"
    benchmark.extra_info.update(impl=impl, bytes=vol.size, where=place(vol.src))
    with FileLUN(vol.src) as src:
        reference = None if impl == "isc" else _isc_sparse_copy(vol, Session(src))
        ratio = _beside(benchmark, run, prepare, reference, rounds=3, warmup=1)
    allocated = allocated[1::2] if reference else allocated  # the row's own rounds
    source = _allocated(vol.src)
    benchmark.extra_info.update(
        allocated=allocated,
        source_allocated=source,
        beside_isc=ratio,
        note=_note(
            ratio,
            f"destination allocates {max(allocated) / MIB:.1f} MiB (source {source / MIB:.1f} MiB)",
        ),
    )


@pytest.mark.parametrize(
    ("impl", "marked", "holes", "workers"),
    [
        ("isc", False, True, DEFAULT_WORKERS),
        ("isc marked", True, True, DEFAULT_WORKERS),
        ("isc, workers=1", False, True, 1),
        ("isc, holes ignored (before)", False, False, DEFAULT_WORKERS),
    ],
)
def test_sparse_isc(benchmark, sparse: Volume, impl, marked, holes, workers):
    with (FileLUN if holes else _HolesUnknown)(sparse.src) as src:
        run = _isc_sparse_copy(sparse, Session(src), marked, workers)
        _sparse_copy(benchmark, sparse, impl, run)


def test_sparse_cp(benchmark, sparse: Volume) -> None:
    cp = [_tool("cp"), "--sparse=auto", str(sparse.src), str(sparse.dst)]
    _sparse_copy(benchmark, sparse, "cp --sparse=auto", lambda: subprocess.run(cp, check=True))


def test_sparse_qemu_img(benchmark, sparse: Volume) -> None:
    qemu = [_tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw"]
    qemu += [str(sparse.src), str(sparse.dst)]
    run = functools.partial(subprocess.run, qemu, check=True)
    _sparse_copy(benchmark, sparse, "qemu-img convert -n", run)


# -- incremental copies and workers -------------------------------------------------------


@pytest.fixture(scope="module")
def gib() -> Iterator[Volume]:
    """1 GiB of seeded random data and an equal destination."""
    with scratch(3 * GIB) as where:
        vol = Volume(where / "src.img", where / "dst.img", GIB)
        write_random(vol.src, vol.size)
        subprocess.run(["cp", str(vol.src), str(vol.dst)], check=True)
        yield vol


WORKER_ROWS = [
    ("isc", DEFAULT_WORKERS, SPLIT_MIN),
    *[(f"workers={w}", w, SPLIT_MIN) for w in (1, 2, 4) if w != DEFAULT_WORKERS],
    (f"workers={DEFAULT_WORKERS}, every run split (before)", DEFAULT_WORKERS, 1),
]


@pytest.mark.parametrize(
    ("impl", "workers", "split_min"), WORKER_ROWS, ids=[r[0] for r in WORKER_ROWS]
)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: f"{g // KIB}K")
def test_incremental_workers(
    benchmark, gib: Volume, granularity: int, impl: str, workers: int, split_min: int, monkeypatch
):
    monkeypatch.setattr(isc.copy, "SPLIT_MIN", split_min)
    with FileLUN(gib.src) as src, FileLUN(gib.dst) as dst:
        session = Session(src, granularity)
        # The destination equals the source: in step with the new session.
        replica = Destination(dst, "replica", DestState.CONSISTENT, epoch=session.epoch)
        job = CopyJob(session, [replica], workers=workers)
        isc_job = CopyJob(session, [replica])
        changer = Changer(session)
        runs: list[int] = []

        def reference() -> None:
            with monkeypatch.context() as default:
                default.setattr(isc.copy, "SPLIT_MIN", SPLIT_MIN)
                assert isc_job.incremental().bytes_sent == changer.bytes

        def prepare():
            changer.change()
            session.mark()
            return check

        def run() -> None:
            result = job.incremental()
            assert result.bytes_sent == changer.bytes
            runs.append(result.extents)

        def check() -> None:
            # The slots written this round; the whole file once the row is done.
            for slot in changer.slots:
                at = slot * CHANGE_WRITE
                assert src.read(at, CHANGE_WRITE) == dst.read(at, CHANGE_WRITE), slot

        benchmark.group = f"incremental copy at {granularity // KIB} KiB, 1% of 1 GiB changed"
        benchmark.extra_info.update(
            impl=impl, workers=workers, granularity=granularity, where=place(gib.src)
        )
        reference_or_none = None if impl == "isc" else reference
        ratio = _beside(benchmark, run, prepare, reference_or_none, rounds=15, warmup=1)
        note = _note(ratio, f"{int(np.median(runs))} runs")
        benchmark.extra_info.update(runs=runs, beside_isc=ratio, note=note)
    gib.check()


# -- where splitting a run pays ---------------------------------------------------------------


@pytest.mark.parametrize("size", RUN_SIZES, ids=lambda n: f"{n // KIB}K")
def test_run_split(benchmark, gib: Volume, size: int):
    offsets = np.random.default_rng([SEED, size]).integers(0, GIB // size, 256) * size
    places = iter(offsets.tolist())
    with (
        FileLUN(gib.src) as src,
        FileLUN(gib.dst) as dst,
        ThreadPoolExecutor(2, "split") as pool,
    ):

        def one() -> None:
            assert src.copy_to(next(places), size, dst)

        def two() -> None:
            at = next(places)
            halves = [(at, size // 2), (at + size // 2, size // 2)]
            assert all(pool.map(lambda p: src.copy_to(p[0], p[1], dst), halves))

        benchmark.group = "a run copied inside the kernel by two threads, beside one"
        benchmark.extra_info.update(impl=f"{size // KIB} KiB in two halves", bytes=size)
        ratio = _beside(benchmark, two, lambda: lambda: None, one, rounds=96, warmup=16)
        benchmark.extra_info.update(beside_one=ratio, note=f"÷ one thread beside {ratio:.2f}")
    assert_same(gib.dst, gib.src, gib.size)
