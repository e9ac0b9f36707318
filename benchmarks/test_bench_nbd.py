"""NBD: isc's client copying 1 GiB to and from a qemu-nbd export, beside nbdcopy, in one run.

Two tables (pytest-benchmark groups), each over a 1 GiB file of seeded random
bytes and a qemu-nbd export of a raw file, both in ``/dev/shm`` when it has
room, the export on a Unix socket (one qemu-nbd process for the module):

``nbd copy 1 GiB to the export``
    ``isc``: a plain loop of 4 MiB ``FileLUN.readinto`` and ``NBDLUN.write``,
    then ``flush``; ``isc, 2 threads``: the same loop in two threads taking
    alternate 4 MiB pieces, sharing one ``NBDLUN`` (so one connection, whose
    requests from both keep the wire busy while either waits for its
    replies); ``isc CopyJob``: the unmarked full copy
    (``CopyJob.full(marked=False)``, io_size 4 MiB) of a session on the file
    to a ``Destination(NBDLUN)``; ``nbdcopy --flush FILE nbd+unix:///...``.
    The export's file is overwritten with a constant before each round, and
    compared with the source after it.
``nbd copy 1 GiB from the export``
    ``isc``: a loop of 4 MiB ``NBDLUN.readinto`` and ``FileLUN.write`` into a
    local file; ``nbdcopy nbd+unix:///... FILE``. The local file is
    overwritten before each round and compared after it.

The issue's target: the copy to the export through ``NBDLUN`` takes at most
1.25 times nbdcopy's time (≥ 80% of its throughput). Nothing here asserts on time:
``python benchmarks/report.py RESULTS.json`` prints the ratios (÷ isc).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from datapath import (
    assert_same,
    place,
    scratch,
    write_pattern,
    write_random,
)

from isc import CopyJob, Destination, FileLUN, Session
from isc.nbd import NBDLUN

GIB = 1 << 30
MIB = 1 << 20
IO_SIZE = 4 * MIB
ROUNDS = 5
WAIT = 10.0  # seconds qemu-nbd gets to start listening


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: qemu-utils, libnbd-bin)")
    return path


@dataclass
class Export:
    """A local source file, a qemu-nbd export of a file the same size, and a local target."""

    src: Path
    exported: Path
    dst: Path
    uri: str
    size: int


def _wait_listening(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(os.fspath(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"qemu-nbd did not listen on {path} (exit status {proc.poll()})")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.02)  # paces the polling; returns early if qemu-nbd dies


@pytest.fixture(scope="module")
def export() -> Iterator[Export]:
    qemu_nbd = _tool("qemu-nbd")
    with scratch(4 * GIB) as where:
        found = Export(where / "src.img", where / "export.img", where / "dst.img", "", GIB)
        write_random(found.src, GIB)
        shutil.copyfile(found.src, found.exported)  # every page allocated, as a volume's
        shutil.copyfile(found.src, found.dst)
        sock = where / "qemu-nbd.sock"
        found.uri = f"nbd+unix:///?socket={sock}"
        args = [qemu_nbd, "-f", "raw", "-k", str(sock), "--persistent", "--shared=8"]
        proc = subprocess.Popen([*args, str(found.exported)], stdin=subprocess.DEVNULL)
        try:
            _wait_listening(sock, proc)
            yield found
        finally:
            proc.kill()
            proc.wait(timeout=WAIT)


def _pedantic(benchmark, run: Callable[[], object], prepare: Callable[[], None], check) -> None:
    """Time ``run()`` for ROUNDS rounds; ``prepare()`` before and ``check()`` after each."""

    def setup():
        prepare()
        return (), {}

    benchmark.pedantic(run, setup=setup, teardown=check, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["note"] = f"{GIB / benchmark.stats.stats.median / 1e9:.2f} GB/s"


# -- to the export ------------------------------------------------------------------------
def _to_export(benchmark, export: Export, impl: str, run: Callable[[], object]) -> None:
    benchmark.group = "nbd copy 1 GiB to the export"
    benchmark.extra_info.update(impl=impl, bytes=export.size, where=place(export.src))
    _pedantic(
        benchmark,
        run,
        lambda: write_pattern(export.exported, export.size, 0x5A),
        lambda: assert_same(export.exported, export.src, export.size),
    )


def test_to_export_isc(benchmark, export: Export) -> None:
    def run() -> None:
        buffer = memoryview(bytearray(IO_SIZE))
        with FileLUN(export.src, readonly=True) as src, NBDLUN(export.uri) as dst:
            for offset in range(0, src.size, IO_SIZE):
                view = buffer[: min(IO_SIZE, src.size - offset)]
                src.readinto(offset, view)
                dst.write(offset, view)
            dst.flush()

    _to_export(benchmark, export, "isc", run)


def test_to_export_isc_two_threads(benchmark, export: Export) -> None:
    def run() -> None:
        with FileLUN(export.src, readonly=True) as src, NBDLUN(export.uri) as dst:
            pieces = range(0, src.size, IO_SIZE)

            def copy(first: int) -> None:
                buffer = memoryview(bytearray(IO_SIZE))
                for offset in pieces[first::2]:
                    view = buffer[: min(IO_SIZE, src.size - offset)]
                    src.readinto(offset, view)
                    dst.write(offset, view)

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                for done in [pool.submit(copy, 0), pool.submit(copy, 1)]:
                    done.result()
            dst.flush()

    _to_export(benchmark, export, "isc, 2 threads", run)


def test_to_export_isc_copy_job(benchmark, export: Export) -> None:
    def run() -> None:
        with FileLUN(export.src, readonly=True) as src, NBDLUN(export.uri) as dst:
            job = CopyJob(Session(src), [Destination(dst, "remote")], io_size=IO_SIZE)
            assert job.full(marked=False).bytes_sent == export.size

    _to_export(benchmark, export, "isc CopyJob", run)


def test_to_export_nbdcopy(benchmark, export: Export) -> None:
    nbdcopy = [_tool("nbdcopy"), "--flush", str(export.src), export.uri]
    _to_export(benchmark, export, "nbdcopy --flush", lambda: subprocess.run(nbdcopy, check=True))


# -- from the export ----------------------------------------------------------------------
def _from_export(benchmark, export: Export, impl: str, run: Callable[[], object]) -> None:
    benchmark.group = "nbd copy 1 GiB from the export"
    benchmark.extra_info.update(impl=impl, bytes=export.size, where=place(export.src))
    _pedantic(
        benchmark,
        run,
        lambda: write_pattern(export.dst, export.size, 0x5A),
        lambda: assert_same(export.dst, export.src, export.size),
    )


def test_from_export_isc(benchmark, export: Export) -> None:
    # The export holds the source's bytes: the copies to it left them there.
    shutil.copyfile(export.src, export.exported)

    def run() -> None:
        buffer = memoryview(bytearray(IO_SIZE))
        with NBDLUN(export.uri) as src, FileLUN(export.dst) as dst:
            for offset in range(0, src.size, IO_SIZE):
                view = buffer[: min(IO_SIZE, src.size - offset)]
                src.readinto(offset, view)
                dst.write(offset, view)

    _from_export(benchmark, export, "isc", run)


def test_from_export_nbdcopy(benchmark, export: Export) -> None:
    shutil.copyfile(export.src, export.exported)
    nbdcopy = [_tool("nbdcopy"), export.uri, str(export.dst)]
    _from_export(benchmark, export, "nbdcopy", lambda: subprocess.run(nbdcopy, check=True))
