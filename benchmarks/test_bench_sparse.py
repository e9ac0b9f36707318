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
``a run copied inside the kernel``
    ``FileLUN.copy_to`` of one run of N bytes (64 KiB to 8 MiB) between two
    allocated files, by the calling thread (``one thread``) or in two halves
    on a pool of two threads as the copy job splits a run (``two threads``):
    where a split starts to pay, which sets ``SPLIT_MIN``.

Files live in ``/dev/shm`` when it has room. Nothing here asserts on time.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from datapath import SEED, assert_same, place, random_bytes, scratch, sparse_file, write_random
from test_bench_copy import CHANGE_WRITE, Changer, Volume, _pedantic, _tool

import isc.copy
from isc import CopyJob, Destination, DestState, FileLUN, Session
from isc.copy import DEFAULT_WORKERS

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10
SPARSE_SIZE = 4 * GIB
WRITTEN = 0.01  # share of the sparse volume that holds data
GRANULARITIES = (2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB)
RUN_SIZES = (64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB, 2 * MIB, 8 * MIB)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- the sparse full copy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse() -> Iterator[Volume]:
    """A 4 GiB sparse source, 1% written in 64 KiB pieces, and a destination path."""
    with scratch(SPARSE_SIZE // 10) as where:
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


def _sparse_copy(benchmark, vol: Volume, impl: str, run) -> None:
    """One row of the sparse table: ``run()`` copies ``vol.src`` to a new sparse ``vol.dst``."""
    allocated: list[int] = []

    def prepare():
        sparse_file(vol.dst, vol.size)

        def check() -> None:
            allocated.append(_allocated(vol.dst))
            vol.check()

        return check

    benchmark.group = f"sparse full copy, {vol.size // GIB} GiB, {WRITTEN:.0%} written"
    benchmark.extra_info.update(impl=impl, bytes=vol.size, where=place(vol.src))
    _pedantic(benchmark, run, prepare, rounds=3, warmup=1)
    benchmark.extra_info.update(
        allocated=allocated,
        source_allocated=_allocated(vol.src),
        note=f"destination allocates {max(allocated) / MIB:.1f} MiB "
        f"(source {_allocated(vol.src) / MIB:.1f} MiB)",
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
def test_sparse_isc(benchmark, sparse: Volume, impl, marked, holes, workers, monkeypatch):
    if not holes:
        monkeypatch.setattr(CopyJob, "_holes_known", lambda job: False)
    with FileLUN(sparse.src) as src:
        session = Session(src)

        def run() -> None:
            with FileLUN(sparse.dst) as dst:
                job = CopyJob(session, [Destination(dst, "replica")], workers=workers)
                assert job.full(marked).bytes_sent == sparse.size

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
    ("isc", DEFAULT_WORKERS, isc.copy.SPLIT_MIN),
    *[(f"workers={w}", w, isc.copy.SPLIT_MIN) for w in (1, 2, 4) if w != DEFAULT_WORKERS],
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
        changer = Changer(session)
        runs: list[int] = []

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
        _pedantic(benchmark, run, prepare, rounds=15, warmup=1)
        benchmark.extra_info.update(runs=runs, note=f"{int(np.median(runs))} runs")
    gib.check()


# -- where splitting a run pays ---------------------------------------------------------------


@pytest.mark.parametrize("size", RUN_SIZES, ids=lambda n: f"{n // KIB}K")
@pytest.mark.parametrize("threads", [1, 2], ids=["one thread", "two threads"])
def test_run_split(benchmark, gib: Volume, size: int, threads: int):
    offsets = np.random.default_rng([SEED, size]).integers(0, GIB // size, 64) * size
    rounds = iter(offsets.tolist())
    with (
        FileLUN(gib.src) as src,
        FileLUN(gib.dst) as dst,
        ThreadPoolExecutor(2, "split") as pool,
    ):

        def one() -> None:
            assert src.copy_to(next(rounds), size, dst)

        def two() -> None:
            at = next(rounds)
            halves = [(at, size // 2), (at + size // 2, size // 2)]
            assert all(pool.map(lambda p: src.copy_to(p[0], p[1], dst), halves))

        benchmark.group = f"a run of {size // KIB} KiB copied inside the kernel"
        benchmark.extra_info.update(impl="one thread" if threads == 1 else "two threads")
        benchmark.pedantic(one if threads == 1 else two, rounds=48, warmup_rounds=8)
    assert_same(gib.dst, gib.src, gib.size)
