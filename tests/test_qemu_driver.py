"""The QEMU side of the comparison benchmark: ``benchmarks/qemu.py`` against the real daemon.

Each test runs its own ``qemu-storage-daemon`` (Debian package
qemu-system-common) on a few-MiB image in ``tmp_path``, writes to the
source through the daemon's NBD export with isc's own client, and checks
destinations byte for byte. The QMP client's handling of a stream cut at
odd places is checked against a scripted fake server instead, since a real
daemon cuts it where it likes. Every wait is bounded; a test whose tool is
missing is skipped, naming the package.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from qemu import QMP, DaemonStartError, QemuJobError, QMPError, StorageDaemon

from isc.nbd import NBDLUN

SEED = 20261124
KIB = 1 << 10
MIB = 1 << 20
SIZE = 4 * MIB
CLUSTER = 64 * KIB  # the backup job's copy unit for a raw target in QEMU 7.2
WAIT = 10.0  # seconds any wait on the daemon gets


def tool(name: str) -> str:
    """The path of ``name``, or skip the test naming the package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed; it comes with the Debian package qemu-system-common")
    return path


def running(pid: int) -> bool:
    """Whether process ``pid`` is alive.

    An exited daemon is not our child but init's, which reaps it when it
    gets round to it; until then it is a zombie, gone for every other purpose.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def make_image(path: Path) -> Path:
    """A SIZE-byte raw image: seeded random bytes in the first half, a hole in the second."""
    with open(path, "wb") as f:
        f.write(random.Random(SEED).randbytes(SIZE // 2))
        f.truncate(SIZE)
    return path


def empty_target(daemon: StorageDaemon, path: Path, node: str = "dst") -> Path:
    """Make ``path`` a sparse file as long as the source and open it as node ``node``."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
    daemon.add_target(node, path)
    return path


def host_write(daemon: StorageDaemon, writes: list[tuple[int, bytes]]) -> None:
    """Write each ``(offset, data)`` to the source through the daemon's NBD export."""
    lun = NBDLUN(daemon.uri, timeout=WAIT)
    try:
        for offset, data in writes:
            lun.write(offset, data)
        lun.flush()
    finally:
        lun.close()


def clusters(writes: list[tuple[int, bytes]], size: int) -> int:
    """How many bytes the ``size``-aligned units that ``writes`` touch add up to."""
    touched = {
        unit
        for offset, data in writes
        for unit in range(offset // size, -(-(offset + len(data)) // size))
    }
    return len(touched) * size


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_image(tmp_path / "source.img")


@pytest.fixture
def daemon(tmp_path: Path, source: Path) -> Iterator[StorageDaemon]:
    """A running daemon serving ``source``; stopped after the test, whatever happened."""
    tool("qemu-storage-daemon")
    with StorageDaemon(source, tmp_path, timeout=WAIT) as running_daemon:
        yield running_daemon


# Writes at chunk edges: a granule's last byte, across a 64 KiB cluster
# boundary, in the hole, and the image's last byte.
WRITES = [
    (4 * KIB - 1, b"\x5a"),
    (CLUSTER - 100, b"\xa5" * 200),
    (3 * MIB + 12345, b"\x42" * 70_000),
    (SIZE - 1, b"\xff"),
]


@pytest.mark.parametrize(
    "perf", [None, {"max-workers": 4, "max-chunk": 128 * KIB, "use-copy-range": True}]
)
def test_full_backup_is_a_byte_exact_copy(daemon, tmp_path, source, perf):
    target = empty_target(daemon, tmp_path / "target.img")
    done = daemon.wait_job(daemon.start_backup("dst", sync="full", perf=perf))
    assert target.read_bytes() == source.read_bytes()
    assert done["len"] == done["offset"] == SIZE


def test_incremental_copies_the_writes_since_the_full_backup(daemon, tmp_path, source):
    target = empty_target(daemon, tmp_path / "target.img")
    full = daemon.start_backup("dst", sync="full", bitmap="since-full", granularity=4 * KIB)
    daemon.wait_job(full)
    host_write(daemon, WRITES)
    assert daemon.bitmap_count("since-full") == clusters(WRITES, 4 * KIB)
    assert target.read_bytes() != source.read_bytes()

    done = daemon.wait_job(daemon.start_backup("dst", sync="incremental", bitmap="since-full"))
    assert target.read_bytes() == source.read_bytes()
    # Only the dirty clusters were copied, and the bitmap starts afresh.
    assert done["len"] == done["offset"] == clusters(WRITES, CLUSTER)
    assert daemon.bitmap_count("since-full") == 0


def test_bitmap_made_with_the_backup_catches_a_write_right_after_it(daemon, tmp_path, source):
    before = source.read_bytes()
    target = empty_target(daemon, tmp_path / "target.img")
    full = daemon.start_backup("dst", sync="full", bitmap="since-full", granularity=64 * KIB)
    host_write(daemon, [(0, b"\x11" * 4 * KIB)])
    daemon.wait_job(full)
    assert target.read_bytes() == before  # the source as it was when start_backup returned
    assert daemon.bitmap_count("since-full") == 64 * KIB

    daemon.wait_job(daemon.start_backup("dst", sync="incremental", bitmap="since-full"))
    assert target.read_bytes() == source.read_bytes() != before


def test_a_cancelled_job_raises(daemon, tmp_path):
    empty_target(daemon, tmp_path / "target.img")
    # At one byte a second the job is still running when the cancel comes.
    backup = {"job-id": "slow", "device": "src", "target": "dst", "sync": "full", "speed": 1}
    daemon.qmp.execute("blockdev-backup", backup)
    daemon.qmp.execute("block-job-cancel", {"device": "slow"})
    with pytest.raises(QemuJobError, match="cancelled"):
        daemon.wait_job("slow")


def test_a_refused_transaction_creates_no_bitmap(daemon):
    with pytest.raises(QMPError) as refused:
        daemon.start_backup("no-such-node", sync="full", bitmap="since-full")
    assert refused.value.command == "transaction"
    with pytest.raises(KeyError, match="since-full"):
        daemon.bitmap_count("since-full")


def test_bitmap_can_be_removed(daemon, tmp_path):
    empty_target(daemon, tmp_path / "target.img")
    daemon.wait_job(daemon.start_backup("dst", sync="full", bitmap="since-full"))
    daemon.remove_bitmap("since-full")
    with pytest.raises(KeyError):
        daemon.bitmap_count("since-full")
    daemon.remove_target("dst")
    nodes = {node["node-name"] for node in daemon.qmp.execute("query-named-block-nodes")}
    assert nodes == {"src", "src-file"}


def test_qmp_error_carries_qemus_words_and_the_connection_goes_on(daemon):
    with pytest.raises(QMPError, match="block-dirty-bitmap-remove") as refused:
        daemon.qmp.execute("block-dirty-bitmap-remove", {"node": "src", "name": "nothing"})
    assert refused.value.error_class == "GenericError"
    assert "nothing" in refused.value.desc
    assert daemon.qmp.execute("query-version")["qemu"]["major"] >= 7


def test_events_that_arrive_during_execute_are_kept(daemon, tmp_path):
    empty_target(daemon, tmp_path / "target.img")
    job = daemon.start_backup("dst", sync="full", job_id="kept")
    # QEMU sends the job's first events before its reply to the command:
    # they were read by execute(), so only the buffer can still have them.
    created = daemon.qmp.wait_event("JOB_STATUS_CHANGE", data={"id": job}, timeout=0)
    assert created["data"]["status"] == "created"
    # The job's completion comes before its dismissal ("null"), so waiting
    # for the latter leaves the former in the buffer for wait_job.
    daemon.qmp.wait_event("JOB_STATUS_CHANGE", data={"id": job, "status": "null"})
    assert daemon.wait_job(job)["device"] == "kept"


def test_wait_event_for_an_event_that_never_comes_times_out(daemon):
    with pytest.raises(TimeoutError, match="NO_SUCH_EVENT"):
        daemon.qmp.wait_event("NO_SUCH_EVENT", timeout=0.2)
    assert daemon.qmp.execute("query-version")["qemu"]["major"] >= 7


def test_killed_daemon_ends_a_wait_with_connection_error(daemon):
    os.kill(daemon.pid, signal.SIGKILL)
    with pytest.raises(ConnectionError):
        daemon.qmp.wait_event("NO_SUCH_EVENT", timeout=WAIT)
    with pytest.raises(ConnectionError):
        daemon.qmp.execute("query-version")
    daemon.stop()
    assert not running(daemon.pid)


def test_stop_ends_the_daemon_even_with_a_client_connected(daemon):
    lun = NBDLUN(daemon.uri, timeout=WAIT)
    try:
        daemon.stop()
        assert not running(daemon.pid)
        daemon.stop()
        with pytest.raises(ConnectionError):
            daemon.qmp.execute("query-version")
    finally:
        lun.close()


def test_failed_start_raises_with_the_daemons_message(tmp_path):
    tool("qemu-storage-daemon")
    missing = tmp_path / "missing.img"
    daemon = StorageDaemon(missing, tmp_path, timeout=WAIT)
    with pytest.raises(DaemonStartError, match=r"missing\.img") as failed:
        daemon.start()
    assert "No such file" in failed.value.stderr
    daemon.stop()


def test_bad_backup_arguments_raise_before_anything_is_sent(daemon):
    with pytest.raises(ValueError, match="bitmap"):
        daemon.start_backup("dst", sync="incremental")
    with pytest.raises(ValueError, match="granularity"):
        daemon.start_backup("dst", sync="full", granularity=4 * KIB)
    with pytest.raises(ValueError, match="sync"):
        daemon.start_backup("dst", sync="top")


def test_qmp_reads_messages_however_the_stream_is_cut(tmp_path):
    """Two messages in one read, a message split over two reads, a late reply dropped."""
    path = tmp_path / "fake.sock"
    greeting = {"QMP": {"version": {}, "capabilities": []}}
    event = {"event": "SPLIT", "data": {"n": 1}}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(WAIT)
    asked: list[dict] = []
    failures: list[BaseException] = []

    def line(message: dict) -> bytes:
        return json.dumps(message).encode() + b"\r\n"

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as commands:
                conn.settimeout(WAIT)
                conn.sendall(line(greeting))
                asked.append(json.loads(commands.readline()))
                # The capabilities reply, a stray reply and half an event in one write, which
                # the client reads at once; the other half comes after its next command.
                half = len(line(event)) // 2
                stray = {"return": {}, "id": "stray"}
                conn.sendall(line({"return": {}, "id": 1}) + line(stray) + line(event)[:half])
                asked.append(json.loads(commands.readline()))
                conn.sendall(line(event)[half:] + line({"return": {"ok": True}, "id": 2}))
                commands.readline()  # until the client closes
        except BaseException as exc:
            failures.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    try:
        with QMP(path, timeout=WAIT) as qmp:
            assert qmp.execute("query-status") == {"ok": True}
            assert qmp.wait_event("SPLIT", data={"n": 1}, timeout=0)["data"] == {"n": 1}
    finally:
        server.join(WAIT)
        listener.close()
    assert not server.is_alive()
    assert not failures
    assert [command["execute"] for command in asked] == ["qmp_capabilities", "query-status"]
