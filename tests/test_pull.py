"""Pull mode: the frozen export ``NAME@frozen`` of a marked session, and TRIM as "sent".

A backup tool marks the session, reads the image at the mark from the frozen
export guided by its ``qemu:dirty-bitmap`` context (the transfer bitmap),
TRIMs what it has stored, then unmarks. The tests check rule 1 (what the
frozen export serves is the image at the mark, whatever host writes come
meanwhile), rule 2 (what was not confirmed goes back to tracking), rule 3
(a confirmed chunk costs no COFW) and that a connection never serves another
point in time than its own mark. Library-level tests speak the protocol by
hand (``test_nbd_protocol.Client``); the end-to-end test runs ``isc serve`` on
Unix sockets and the README's libnbd script with the system's python3.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import test_nbd
from helpers import TIMEOUT
from test_nbd import CMD_READ, CMD_WRITE, EPERM, FUA, KIB, MIB, run, tool
from test_nbd_protocol import (
    CMD_BLOCK_STATUS,
    CMD_TRIM,
    OPT_SET_META_CONTEXT,
    STATE_DIRTY,
    TYPE_ERROR,
    TYPE_OFFSET_DATA,
    client,
    session_server,
)
from test_readme import blocks, section
from test_serve import line_reader, next_line

from isc import MemoryLUN, Session
from isc.nbd import NBDLUN, SessionLUN

SEED = 20261206
serve = test_nbd.serve  # the fixture: isc servers on Unix sockets in tmp_path
EIO = 5
SYSTEM_PYTHON = "/usr/bin/python3"
"""The interpreter python3-libnbd (Debian) installs its ``nbd`` module for."""


def frozen(c, session_name: str = "disk") -> dict[str, int]:
    """Enter disk@frozen with both contexts; their ids."""
    c.greet()
    c.structured()
    ids = c.contexts(
        OPT_SET_META_CONTEXT,
        b"disk@frozen",
        b"base:allocation",
        f"qemu:dirty-bitmap:{session_name}".encode(),
    )
    c.go_flags(b"disk@frozen")
    return ids


def failure(c) -> tuple[int, str]:
    """The error chunk the last request got: (error, message)."""
    ((kind, _, payload),) = c.answer()
    assert kind == TYPE_ERROR
    error, length = struct.unpack(">IH", payload[:6])
    return error, payload[6 : 6 + length].decode()


def test_the_frozen_export_serves_the_image_at_the_mark_while_host_writes_go_on(serve):
    g = 16 * KIB
    size = 64 * g
    rng = random.Random(SEED)
    lun = MemoryLUN(size)
    lun.write(0, rng.randbytes(size))
    session, server = session_server(serve, lun, granularity=g)
    for _ in range(20):
        session.write(rng.randrange(size - g), rng.randbytes(rng.randrange(1, 2 * g)))
    session.mark()
    at_mark = lun.read(0, size)
    bitmap = session.bitmap
    dirty = [c for c in range(bitmap.chunks) if bitmap.transfer(c)]
    with client(server) as c, NBDLUN(server.uri, timeout=TIMEOUT) as live:
        ids = frozen(c)
        for chunk in dirty:
            # A host write through the live export lands first: COFW keeps the mark's data.
            live.write(chunk * g + rng.randrange(g - 8), rng.randbytes(8))
            data, _ = c.read_chunks(chunk * g, g)
            assert data == at_mark[chunk * g : (chunk + 1) * g], chunk
        (extents,) = [e for i, e in c.status(0, size).items() if i == ids["qemu:dirty-bitmap:disk"]]
        dirty_bytes = [n for n, flags in extents if flags == STATE_DIRTY]
        assert sum(dirty_bytes) == len(dirty) * g
    assert session.stats.cofw_chunks == len(dirty)
    assert server.frozen.bytes_read == len(dirty) * g


def test_trim_confirms_whole_chunks_frees_their_saved_data_and_ends_their_cofw(serve):
    g = 16 * KIB
    size = 10 * g + 100  # the last chunk is short
    session, server = session_server(serve, MemoryLUN(size), granularity=g)
    session.write(0, bytes(size))  # every chunk in transfer after the mark
    session.mark()
    for chunk in (1, 2, 3):
        session.write(chunk * g, b"\1")  # saved
    used = session.save_area.used
    bitmap = session.bitmap
    with client(server) as c:
        frozen(c)
        c.request(CMD_TRIM, g + 1, 2 * g)  # only chunk 2 lies wholly inside
        assert c.error() == 0
        assert [bitmap.transfer(chunk) for chunk in (1, 2, 3)] == [True, False, True]
        assert session.save_area.used == used - g
        c.request(CMD_TRIM, 10 * g - 5, 105)  # chunk 9 is not whole; the short chunk 10 is
        assert c.error() == 0
        assert (bitmap.transfer(9), bitmap.transfer(10)) == (True, False)
        c.request(CMD_TRIM, 5 * g, 0)
        assert c.error() == 0
        cofw = session.stats.cofw_chunks
        session.write(2 * g, b"\2")  # sent already: no save
        session.write(10 * g, b"\2")
        assert session.stats.cofw_chunks == cofw
        session.write(4 * g, b"\2")  # still to send: saved
        assert session.stats.cofw_chunks == cofw + 1
    assert server.frozen.confirmed_chunks == 2
    assert bitmap.transfer_count == 9


def test_a_frozen_connection_fails_once_its_mark_ends_and_never_serves_the_next(serve):
    session, server = session_server(serve, MemoryLUN(MIB))
    session.write(0, b"\1" * MIB)
    session.mark()
    with client(server) as c:
        frozen(c)
        assert c.read_chunks(0, 16)[0] == b"\1" * 16
        session.unmark()
        for command, length in ((CMD_READ, 16), (CMD_BLOCK_STATUS, 4096), (CMD_TRIM, MIB)):
            c.request(command, 0, length)
            error, message = failure(c)
            assert error == EIO and "ended by an unmark" in message, command
        session.write(0, b"\2" * MIB)
        session.mark()  # a new point in time: not this connection's
        c.request(CMD_READ, 0, 16)
        error, message = failure(c)
        assert error == EIO and "session is at generation 2" in message
        c.request(CMD_WRITE, 0, 4, payload=b"xxxx")
        assert c.error() == EPERM
    with client(server) as c:  # a new connection serves the new mark
        frozen(c)
        assert c.read_chunks(0, 16)[0] == b"\2" * 16
    assert session.bitmap.transfer_count == 16  # the old connection's TRIM confirmed nothing


class UnmarkingLUN(MemoryLUN):
    """A MemoryLUN whose next read lets ``hook`` run first (an unmark landing mid-read)."""

    hook = None

    def readinto(self, offset, buffer):
        hook, self.hook = self.hook, None
        super().readinto(offset, buffer)
        if hook is not None:
            hook()


def test_a_mark_that_ends_during_a_frozen_read_fails_the_read(serve):
    g = 64 * KIB
    lun = UnmarkingLUN(4 * g)
    session, server = session_server(serve, lun, granularity=g)
    session.write(0, b"\1" * g)
    session.mark()

    def overwrite_and_unmark():
        session.write(0, b"\2" * g)  # saved first, then the source changes
        session.unmark()  # the saved copy goes: what was read is not the mark's

    with client(server) as c:
        frozen(c)
        lun.hook = overwrite_and_unmark
        c.request(CMD_READ, 0, g)
        error, message = failure(c)
        assert error == EIO and "unmark" in message


def test_unmark_returns_what_a_pull_did_not_confirm_to_tracking(serve):
    g = 64 * KIB
    session, server = session_server(serve, MemoryLUN(16 * g), granularity=g)
    session.write(0, b"\1" * (8 * g))
    session.mark()
    with client(server) as c:
        frozen(c)
        c.request(CMD_TRIM, 0, 3 * g)
        assert c.error() == 0
    session.unmark()
    bitmap = session.bitmap
    assert [c for c in range(bitmap.chunks) if bitmap.tracking(c)] == [3, 4, 5, 6, 7]


# -- isc serve, its control port and a libnbd client ----------------------------------------------
def ask(path: Path, op: str, **fields: object) -> dict:
    """One control request on a Unix socket; its reply, which must be ok."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(json.dumps({"id": 1, "op": op, **fields}).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"], reply
    return reply["info"]


def libnbd_python() -> str:
    """The system python3 if it can import libnbd's module, else skip naming the package."""
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, check=False)
    if done.returncode:
        pytest.skip(f"{SYSTEM_PYTHON} cannot import nbd: install python3-libnbd")
    return SYSTEM_PYTHON


def test_a_pull_backup_through_isc_serve_with_the_readmes_libnbd_script(tmp_path: Path):
    python = libnbd_python()
    qemu_io, qemu_img, nbdinfo = tool("qemu-io"), tool("qemu-img"), tool("nbdinfo")
    (script,) = blocks(section("Pull backups over NBD"), "python")
    (tmp_path / "pull.py").write_text(script)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    source = tmp_path / "vol.img"
    source.write_bytes(random.Random(SEED).randbytes(8 * MIB))
    shutil.copyfile(source, tmp_path / "backup.img")  # the last backup: the source as it is
    nbd_sock, control = run_dir / "nbd.sock", run_dir / "ctl.sock"
    command = [sys.executable, "-m", "isc.cli", "serve", str(source)]
    command += ["--listen", f"unix:{nbd_sock}", "--control", f"unix:{control}"]
    serving = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = line_reader(serving.stdout)
        assert (
            next_line(lines, "isc serve") == f"export vol.img nbd+unix:///vol.img?socket={nbd_sock}"
        )
        while next_line(lines, "isc serve") != "ready":
            pass
        assert nbd_sock.stat().st_mode & 0o777 == 0o600
        live = f"nbd+unix:///vol.img?socket={nbd_sock}"
        pull = f"nbd+unix:///vol.img@frozen?socket={nbd_sock}"
        writes = ["write -P 0x11 100k 8k", "write -z 3M 1M", "discard 5M 128k"]
        run(qemu_io, "-f", "raw", *(arg for w in writes for arg in ("-c", w)), live)
        assert ask(control, "mark")["frozen"] == "vol.img@frozen"
        shutil.copyfile(source, tmp_path / "at-mark.img")  # no write runs: the image at the mark
        run(qemu_io, "-f", "raw", "-c", "write -P 0x22 0 6M", live)  # after the mark
        shown = run(nbdinfo, "--map=qemu:dirty-bitmap:vol.img", pull).stdout.split("\n")
        dirty = [line.split() for line in shown if line.strip().endswith("dirty")]
        assert [(int(start), int(length)) for start, length, *_ in dirty] == [
            (64 * KIB, 64 * KIB),
            (3 * MIB, MIB),
            (5 * MIB, 128 * KIB),
        ]
        done = subprocess.run(
            [python, "pull.py", pull, "qemu:dirty-bitmap:vol.img", "backup.img"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "copied 1245184 bytes in 3 extents\n"
        run(
            qemu_img,
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            tmp_path / "backup.img",
            tmp_path / "at-mark.img",
        )
        status = ask(control, "status")
        assert status["transfer_chunks"] == 0  # every chunk confirmed by a TRIM
        assert status["pull"]["confirmed_chunks"] == 19
        assert ask(control, "unmark") == {"returned_chunks": 0, "dropped_chunks": 0}
        assert ask(control, "status")["tracked_chunks"] == 96  # the 6 MiB written after the mark
    finally:
        serving.terminate()
        serving.wait(timeout=TIMEOUT)


# -- a pull beside push copies: each mark has one kind of consumer -------------------------------
def push_session(serve, chunks: int, g: int = 16 * KIB):
    """A session served as "disk" with one push destination, CONSISTENT after a full copy."""
    from isc.copy import CopyJob, Destination

    session, server = session_server(serve, MemoryLUN(chunks * g), granularity=g)
    session.write(0, bytes(range(256)) * (chunks * g // 256))
    dest = Destination(MemoryLUN(chunks * g), "d0")
    CopyJob(session, [dest]).full()
    return session, server, dest


def test_after_a_push_copy_a_pull_reads_a_full_mark_and_confirms_nothing(serve):
    from isc.copy import CopyJob

    g = 16 * KIB
    session, server, dest = push_session(serve, 16, g)  # the push copy moved the epoch
    session.write(3 * g, b"\5" * g)
    generation = session.mark()
    assert "push copy" in session.pull_in_step(generation)
    with client(server) as c:
        frozen(c)
        c.request(CMD_BLOCK_STATUS, 0, 16 * g)  # its dirty bitmap lacks what the copy sent
        error, message = failure(c)
        assert error == EIO and "full" in message
        c.request(CMD_TRIM, 0, 16 * g)
        error, message = failure(c)
        assert error == EPERM and "push destinations" in message
    assert session.bitmap.transfer_count == 1  # nothing confirmed
    session.unmark()
    generation = session.mark(full=True)
    assert session.pull_in_step(generation) is None  # a full mark may be read whole
    with client(server) as c:
        dirty = frozen(c)["qemu:dirty-bitmap:disk"]
        assert c.status(0, 16 * g)[dirty] == [(16 * g, STATE_DIRTY)]
        c.request(CMD_TRIM, 0, 16 * g)
        assert failure(c)[0] == EPERM
    session.unmark()
    session.mark()
    CopyJob(session, [dest]).incremental()  # the push side got what the pulls read
    assert dest.lun.read(0, 16 * g) == session.source.read(0, 16 * g)


def test_a_push_copy_refuses_a_mark_a_pull_confirmed_from_and_the_pull_keeps_it(serve):
    from isc.copy import CopyJob, Destination
    from isc.errors import StateError

    g = 16 * KIB
    session, server = session_server(serve, MemoryLUN(16 * g), granularity=g)
    dest = Destination(MemoryLUN(16 * g), "d0")  # new: a full mark is the copy it needs
    generation = session.mark(full=True)
    with client(server) as c:
        frozen(c)
        c.request(CMD_TRIM, 3 * g, g)
        assert c.error() == 0
        with pytest.raises(StateError, match="taken by a pull"):
            CopyJob(session, [dest]).incremental()
        assert session.bitmap.marked and session.generation == generation
        assert session.bitmap.transfer(7)  # the pull still has it to take
        c.request(CMD_TRIM, 7 * g, g)
        assert c.error() == 0
    session.unmark()


class GatedLUN(MemoryLUN):
    """A MemoryLUN that records its reads and writes in order, and whose next call of the
    kind ``gated`` ("read" or "write") waits at ``gate`` once it has set ``entered`` (the
    thread that serves it held up in it)."""

    def __init__(self, size: int, gated: str = "read") -> None:
        super().__init__(size)
        self.calls: list[tuple[str, int]] = []
        self.gated = gated
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def _call(self, kind: str, offset: int) -> None:
        self.calls.append((kind, offset))
        if kind == self.gated:
            gate, self.gate = self.gate, None
            if gate is not None:
                self.entered.set()
                assert gate.wait(TIMEOUT)

    def readinto(self, offset, buffer):
        self._call("read", offset)
        super().readinto(offset, buffer)

    def write(self, offset, data):
        self._call("write", offset)
        super().write(offset, data)


def test_a_pulls_request_lets_the_host_requests_ready_beside_it_go_first(serve):
    g = 64 * KIB
    lun = GatedLUN(16 * g)
    session, server = session_server(serve, lun, granularity=g)
    session.write(0, b"\1" * (2 * g))
    session.mark()
    lun.calls.clear()
    with client(server) as pull, client(server) as host:
        frozen(pull)
        host.go()
        lun.gate = gate = threading.Event()
        pull.request(CMD_READ, 0, g)
        pull.request(CMD_READ, g, g)  # received with the first: served next, at once
        assert lun.entered.wait(TIMEOUT)  # the server's loop is held up in the first read
        host.request(CMD_WRITE, 9 * g, 4 * KIB, payload=b"\2" * (4 * KIB))
        gate.set()  # the host's write arrived meanwhile: it goes before the second read
        assert host.reply() == 0
        for _ in range(2):
            assert [kind for kind, _, _ in pull.answer()] == [TYPE_OFFSET_DATA]
    assert lun.calls == [("read", 0), ("write", 9 * g), ("read", g)]


def test_a_pulls_request_goes_ahead_while_the_host_always_has_a_request_ready(serve):
    # The host's second FUA write waits for the server's only slot, which its first holds
    # in the pool, its payload staged, unserved: the host stays "ready" until the gate
    # opens. The pull's READ must not wait for that: it gives way a bounded number of turns.
    g = 64 * KIB
    lun = GatedLUN(16 * g, gated="write")
    lun.write(0, b"\3" * g)
    session = Session(lun, granularity=g, name="disk")
    server = serve(SessionLUN(session), max_requests=1)
    session.write(0, b"\1" * g)
    session.mark()
    with client(server) as pull, client(server) as host:
        frozen(pull)
        host.go()
        lun.gate = gate = threading.Event()
        host.request(CMD_WRITE, 8 * g, 4 * KIB, flags=FUA, payload=b"\2" * (4 * KIB))
        assert lun.entered.wait(TIMEOUT)  # in the pool, holding the only slot
        host.request(CMD_WRITE, 9 * g, 4 * KIB, flags=FUA, payload=b"\2" * (4 * KIB))
        data, _ = pull.read_chunks(0, g)
        assert data == b"\1" * g  # the image at the mark, while the host's writes wait
        gate.set()
        assert [host.reply(), host.reply()] == [0, 0]
    assert lun.read(8 * g, 4 * KIB) == lun.read(9 * g, 4 * KIB) == b"\2" * (4 * KIB)
