"""The host writer of the QEMU comparison (benchmarks/host_writer.py) against real NBD servers.

The writer process needs libnbd's Python bindings (Debian package
python3-libnbd); without them every test that runs it is skipped, naming the
package. The servers are isc's own NBDServer over a MemoryLUN (TCP on
loopback) and qemu-nbd over a sparse file (Unix socket; Debian package
qemu-utils, skipped when missing). Exports are small, so that a whole image
is compared before and after the writes; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import HookLUN

from isc import MemoryLUN
from isc.nbd import NBDServer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import host_writer  # noqa: E402  (found through the line above)
from host_writer import HostWriter, WriterError, make_changes  # noqa: E402

SEED = 20261124
KIB = 1 << 10
MIB = 1 << 20
SIZE = 4 * MIB
PAGE = 4 * KIB  # the load mode's default block
TIMEOUT = 30.0  # seconds any wait on a process may take before it fails the test


@pytest.fixture(scope="module")
def python() -> str:
    """An interpreter that can run the writer, or skip naming the package that brings one."""
    try:
        return host_writer.writer_python()
    except host_writer.LibnbdMissing as exc:
        pytest.skip(str(exc))


@dataclass
class Export:
    """A running NBD export of SIZE bytes, zero at first."""

    uri: str
    image: Callable[[], bytes]
    """The export's bytes now (read behind the server's back: call it while no write runs)."""
    stop: Callable[[], None]
    """Make the server go away, dropping its clients."""


@contextmanager
def isc_export(
    wrap: Callable[[MemoryLUN], object] = lambda lun: lun, **options
) -> Iterator[Export]:
    """isc's NBDServer over a MemoryLUN (seen through ``wrap``), on TCP loopback."""
    with MemoryLUN(SIZE) as lun, NBDServer(wrap(lun), name="disk", **options) as server:
        server.start("127.0.0.1", 0)
        yield Export(server.uri, lambda: lun.read(0, SIZE), server.close)


@contextmanager
def qemu_export(tmp_path: Path) -> Iterator[Export]:
    """qemu-nbd over a sparse raw file, on a Unix socket."""
    qemu_nbd = shutil.which("qemu-nbd")
    if qemu_nbd is None:
        pytest.skip("qemu-nbd is not installed; it comes with the Debian package qemu-utils")
    backing = tmp_path / "qemu.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    sock = tmp_path / "qemu.sock"
    args = [qemu_nbd, "-f", "raw", "-k", str(sock), "--persistent", "--shared=8", "-x", "disk"]
    with open(tmp_path / "qemu.log", "wb") as log:
        proc = subprocess.Popen(
            [*args, str(backing)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        wait_listening(sock, proc)
        yield Export(f"nbd+unix:///disk?socket={sock}", backing.read_bytes, proc.kill)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)


def wait_listening(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Return once the Unix socket at ``path`` accepts a connection; fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe,
            suppress(FileNotFoundError, ConnectionRefusedError),
        ):
            probe.connect(os.fspath(path))
            return
        if proc.poll() is not None:
            pytest.fail(f"qemu-nbd exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            pytest.fail(f"qemu-nbd did not listen on {path} within {TIMEOUT} s")
        # Pace the polling by waiting on the process itself: returns early if it dies.
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.02)


@pytest.fixture(params=["isc", "qemu-nbd"])
def export(request, tmp_path: Path, python: str) -> Iterator[Export]:
    """Each server the writer must drive, exporting SIZE zero bytes."""
    with isc_export() if request.param == "isc" else qemu_export(tmp_path) as found:
        yield found


def changed(before: bytes, after: bytes, unit: int) -> set[int]:
    """The offsets of the ``unit``-byte pieces that differ between two images."""
    return {
        offset
        for offset in range(0, len(before), unit)
        if before[offset : offset + unit] != after[offset : offset + unit]
    }


def writer(python: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the writer process with ``args`` and ``stdin`` to the end (at most TIMEOUT)."""
    return subprocess.run(
        [python, str(BENCHMARKS / "host_writer.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


# -- changes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("qd", [1, 8])
def test_changes_writes_the_expected_number_of_whole_distinct_blocks(export, qd):
    block, fraction = 64 * KIB, 0.3
    expected = round(SIZE * fraction / block)
    before = export.image()
    result = make_changes(export.uri, fraction, block=block, qd=qd, seed=SEED, timeout=TIMEOUT)
    after = export.image()
    assert (result["writes"], result["bytes"], result["size"]) == (expected, expected * block, SIZE)
    blocks = changed(before, after, block)
    assert len(blocks) == expected
    # Random data differ from the zeros in every page a write covers, so the
    # changed pages are exactly the pages of the changed blocks: whole, aligned.
    assert changed(before, after, PAGE) == {b + p for b in blocks for p in range(0, block, PAGE)}
    assert result["rate"] == pytest.approx(result["writes"] / result["seconds"])
    assert result["p50"] <= result["p99"] <= result["max"]


def test_changes_repeat_per_seed(python):
    def run(seed: int) -> bytes:
        with isc_export() as export:
            make_changes(export.uri, 0.25, block=16 * KIB, seed=seed, timeout=TIMEOUT)
            return export.image()

    first, again, other = run(1), run(1), run(2)
    assert first == again
    zero = bytes(SIZE)
    assert changed(zero, first, 16 * KIB) != changed(zero, other, 16 * KIB)


def test_changes_of_nothing_and_of_everything(python):
    with isc_export() as export:
        assert make_changes(export.uri, 0, timeout=TIMEOUT)["writes"] == 0
        assert export.image() == bytes(SIZE)
        result = make_changes(export.uri, 1.0, block=256 * KIB, timeout=TIMEOUT)
        assert result["writes"] == SIZE // (256 * KIB)
        assert len(changed(bytes(SIZE), export.image(), PAGE)) == SIZE // PAGE


def test_changes_refuse_more_blocks_than_the_export_holds(python):
    # 4 MiB holds 2 whole blocks of 1.5 MiB, but all of it rounds to 3 of them.
    with isc_export() as export:
        with pytest.raises(WriterError, match="holds only 2 whole"):
            make_changes(export.uri, 1.0, block=1536 * KIB, timeout=TIMEOUT)
        assert export.image() == bytes(SIZE)


# -- load --------------------------------------------------------------------------------------
def window(load: HostWriter, export: Export) -> tuple[dict, set[int]]:
    """Run ``load`` until a write of it has completed, then pause it; return the window's stats
    and the offsets of the pages it changed.

    The writer submits write qd + 1 only once one has completed, so more than
    qd changed pages prove a completion: the wait is for that, bounded, never
    for a time.
    """
    before = export.image()
    load.run()
    deadline = time.monotonic() + TIMEOUT
    while len(changed(before, export.image(), PAGE)) <= load.qd:
        if time.monotonic() > deadline:
            pytest.fail(f"{load!r} changed at most {load.qd} pages in {TIMEOUT} s")
    stats = load.pause()
    return stats, changed(before, export.image(), PAGE)


def check_window(stats: dict, qd: int) -> None:
    """The window stats agree with each other (no claim about how fast anything is)."""
    assert stats["writes"] > 0
    assert stats["bytes"] == stats["writes"] * PAGE
    assert 0 <= stats["drained"] <= qd
    assert stats["rate"] == pytest.approx(stats["writes"] / stats["seconds"])
    window_us = stats["seconds"] * 1e6
    assert 0 < stats["p50"] <= stats["p99"] <= stats["max"] <= window_us
    # writes + 1 gaps fill the window, so the longest is at least their mean.
    assert window_us / (stats["writes"] + 1) <= stats["max_gap_us"] * (1 + 1e-9)
    assert stats["max_gap_us"] <= window_us * (1 + 1e-9)


@pytest.mark.parametrize("qd", [1, 8])
def test_load_windows_write_and_report(export, qd):
    with HostWriter(export.uri, qd=qd, seed=SEED, timeout=TIMEOUT) as load:
        for _ in range(2):
            stats, pages = window(load, export)
            check_window(stats, qd)
            assert len(pages) <= stats["writes"] + stats["drained"]
    assert load.returncode == 0


class Records:
    """Stands in for the writer's pipeline: the latencies and completion times of a window (ns)."""

    block = PAGE

    def __init__(self, latencies: list[int], completions: list[int]) -> None:
        self.records = array("q", latencies), array("q", completions)

    def take(self) -> tuple[array, array]:
        return self.records


def test_window_stats_count_the_writes_completed_before_the_pause():
    stats = host_writer._window(Records([5000, 7000, 9000], [15000, 20000, 40000]), 10000, 30000)
    assert stats == {
        "writes": 2,
        "bytes": 2 * PAGE,
        "seconds": 20e-6,
        "rate": pytest.approx(1e5),
        "p50": 5.0,
        "p99": 7.0,
        "max": 7.0,
        "max_gap_us": 10.0,  # from the last completion to the pause
        "drained": 1,
    }
    nothing = host_writer._window(Records([9000], [40000]), 10000, 30000)
    assert (nothing["writes"], nothing["p50"], nothing["max"]) == (0, None, None)
    assert (nothing["max_gap_us"], nothing["drained"]) == (20.0, 1)


def test_window_percentiles_are_nearest_rank():
    times = [1000 * (i + 1) for i in range(100)]
    stats = host_writer._window(Records(times[::-1], times), 0, times[-1])
    assert (stats["p50"], stats["p99"], stats["max"]) == (50.0, 99.0, 100.0)


def test_a_server_that_goes_away_fails_the_writer(export):
    with HostWriter(export.uri, qd=8, timeout=TIMEOUT) as load:
        load.run()
        export.stop()
        # The server may answer the writes in flight before it hangs up, and
        # the pause may then drain them in time: the next run sees the end.
        with pytest.raises(WriterError, match=r"the writer failed: .*(connect|reset|closed)"):
            load.pause()
            load.run()
            load.pause()
    assert load.returncode == host_writer.FAILED


def failing(**faults) -> Callable[[MemoryLUN], HookLUN]:
    """A wrap for isc_export that makes the server answer a write or flush with EIO."""

    def wrap(lun: MemoryLUN) -> HookLUN:
        hooked = HookLUN(lun)
        vars(hooked).update(faults)
        return hooked

    return wrap


def test_a_write_the_server_fails_fails_the_load(python):
    with (
        isc_export(failing(fail_at=1)) as export,
        HostWriter(export.uri, qd=1, timeout=TIMEOUT) as load,
    ):
        load.run()
        with pytest.raises(
            WriterError, match=r"the write of 4096 bytes at offset \d+ failed: Input"
        ):
            load.pause()
    assert load.returncode == host_writer.FAILED


@pytest.mark.parametrize(
    ("faults", "why"),
    [
        ({"fail_at": 5}, r"the write of 65536 bytes at offset \d+ failed: Input"),
        ({"fail_flush": True}, r"nbd_flush: .*Input"),
    ],
)
def test_a_write_or_flush_the_server_fails_fails_the_changes(python, faults, why):
    with isc_export(failing(**faults)) as export, pytest.raises(WriterError, match=why):
        make_changes(export.uri, 0.5, timeout=TIMEOUT)


def test_a_read_only_export_fails_the_writer(python):
    with isc_export(readonly=True) as export:
        load = HostWriter(export.uri, qd=1, timeout=TIMEOUT)
        with load, pytest.raises(WriterError, match=r"the writer failed: .*EPERM"):
            load.run()
        with pytest.raises(WriterError, match=r"failed: .*EPERM"):
            make_changes(export.uri, 0.5, timeout=TIMEOUT)


def test_no_server_fails_the_writer_at_once(python, tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    with pytest.raises(WriterError, match=r"the writer failed: nbd_connect_uri: .*ENOENT"):
        HostWriter(uri, qd=1, timeout=TIMEOUT)
    with pytest.raises(WriterError, match=r"failed: nbd_connect_uri: .*ENOENT"):
        make_changes(uri, 0.5, timeout=TIMEOUT)


def test_a_block_larger_than_the_export_is_refused(python):
    with isc_export() as export, pytest.raises(WriterError, match="no whole block"):
        HostWriter(export.uri, qd=1, block=SIZE + 1, timeout=TIMEOUT)


def test_the_load_protocol_by_hand(python):
    with isc_export() as export:
        assert writer(python, export.uri, "load").stdout == "ready\n"  # end of input quits
        done = writer(python, export.uri, "load", "--qd", "4", stdin="run\n")
        assert (done.returncode, done.stdout) == (0, "ready\nrunning\n")
        done = writer(python, export.uri, "load", stdin="pause\n")
        assert done.returncode == host_writer.FAILED
        assert done.stdout.startswith("ready\n")
        assert json.loads(done.stdout.splitlines()[1]) == {
            "error": "unexpected command 'pause' while paused"
        }


# -- bad arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"fraction": 1.5}, "fraction"),
        ({"fraction": -0.1}, "fraction"),
        ({"fraction": float("nan")}, "fraction"),
        ({"fraction": 0.5, "qd": 0}, "qd"),
        ({"fraction": 0.5, "block": 0}, "block"),
    ],
)
def test_bad_changes_options_raise_before_anything_runs(options, why):
    with pytest.raises(ValueError, match=why):
        make_changes("nbd://127.0.0.1:1/", **options)


@pytest.mark.parametrize(
    ("options", "why"),
    [({"qd": 0}, "qd"), ({"qd": 1.5}, "qd"), ({"qd": 1, "block": -4096}, "block")],
)
def test_bad_load_options_raise_before_anything_runs(options, why):
    with pytest.raises(ValueError, match=why):
        HostWriter("nbd://127.0.0.1:1/", **options)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["changes"], "--fraction"),
        (["changes", "--fraction", "2"], "fraction"),
        (["load", "--qd", "0"], "qd"),
        (["load", "--block", "x"], "--block"),
        (["stir"], "stir"),
    ],
)
def test_the_writer_process_refuses_bad_arguments(python, args, why):
    done = writer(python, "nbd://127.0.0.1:1/", *args)
    assert done.returncode == 2
    assert why in done.stderr


def test_calls_out_of_order_raise(export):
    with HostWriter(export.uri, qd=1, timeout=TIMEOUT) as load:
        with pytest.raises(RuntimeError, match="paused already"):
            load.pause()
        load.run()
        with pytest.raises(RuntimeError, match="running already"):
            load.run()
        load.pause()
    with pytest.raises(RuntimeError, match="has ended"):
        load.run()
