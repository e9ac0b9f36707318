"""``isc agent`` and ``isc serve`` as real processes on loopback, driven by the update workflow.

Each test starts ``python -m isc.cli agent`` (or ``serve``) with port 0, reads
the ``export NAME URI`` and ``control HOST:PORT`` lines up to ``ready``, and
kills the process in a ``finally``; every wait on a process, a socket or a
tool is bounded. Replication runs :class:`PeriodicUpdate` in this process,
sending over NBD to the agent's exports and asking its control port to
protect them (:class:`AgentSite`). The result is checked from outside isc:
``qemu-img compare`` of the source file with the export's file, and
``nbdcopy`` reading the export back.

The faults are those of the periodic update workflow (docs/design.md): a site
that is down, that never answers, that refuses one destination of two; an
agent killed mid-copy; a copy that fails while the agent stays up (then
rolled back to the protected image); two updates at once. The control
protocol is also fed bad lines by hand. The tools come from the Debian
packages qemu-utils, nbdkit and libnbd-bin; a test whose tool is missing is
skipped, naming it (see ``test_nbd.tool``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    Gate,
    HookLUN,
    Worker,
    assert_no_lost_change,
    chunk_bytes,
    chunks_touched,
    wait_until,
)
from test_cli import error_line, files, isc_run, state_of
from test_cli_analysis import ISC
from test_identity import recreate_at_same_inode
from test_nbd import nbdkit, qemu_nbd, run, sparse, tool

import isc
from isc import Destination, DestState, FileLUN, MemoryLUN, ParameterError, Session
from isc.agent import HEADER_SIZE, Agent, Journal, open_regular
from isc.lun import ReconnectingLUN
from isc.nbd import NBDLUN
from isc.remote import PROTECT_GRANULARITY, AgentSite, LocalSite
from isc.store import create_session, open_session
from isc.update import PeriodicUpdate, UnmarkedFullCopy, UpdateBusy, UpdateError, rollback

SEED = 20261125
KIB = 1 << 10
MIB = 1 << 20
SIZE = 4 * MIB
G = 16 * KIB  # the source session's granularity
IO = 64 * KIB  # copies go in several runs, so a fault can fall between two of them
WAIT = 10.0  # seconds a daemon gets to start or stop, and any socket wait
HOST = "127.0.0.1"
JOURNAL = Path(".isc-agent") / "disk.journal"  # the protection of export "disk", in its directory
ROOT = Path(isc.__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


# -- the daemons ------------------------------------------------------------------------------
@dataclass
class Daemon:
    """A running ``isc agent`` or ``isc serve`` and what it printed before ``ready``."""

    proc: subprocess.Popen[str]
    exports: dict[str, str]  # export name -> NBD URI
    control: int | None  # the agent's control port
    log: Path  # its stderr

    def site(self, timeout: float = WAIT) -> AgentSite:
        assert self.control is not None, "only an agent has a control port"
        return AgentSite(HOST, self.control, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, as an operator would; it must exit cleanly within WAIT."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(WAIT) == 0, self.log.read_text()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT)


@contextmanager
def daemon(log: Path, *args: str) -> Iterator[Daemon]:
    """Run ``isc ARGS`` until it prints ``ready``; kill it on exit, whatever happened."""
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "isc.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=ENV,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line.strip())
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        exports: dict[str, str] = {}
        control = None
        while True:
            try:
                line = lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"isc {args[0]} printed no 'ready' within {WAIT} s: {log.read_text()}")
            if line is None:
                proc.wait(WAIT)
                pytest.fail(f"isc {args[0]} exited {proc.returncode}: {log.read_text()}")
            if line == "ready":
                break
            kind, *fields = line.split()
            if kind == "export":
                exports[fields[0]] = fields[1]
            else:
                assert kind == "control", line
                if not fields[0].startswith("unix:"):  # a socket's path is known already
                    control = int(fields[0].rpartition(":")[2])
        yield Daemon(proc, exports, control, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        reader.join(WAIT)  # the pipe is at EOF once the process is gone
        proc.stdout.close()  # type: ignore[union-attr]


def agent(directory: Path, log: Path) -> AbstractContextManager[Daemon]:
    """``isc agent`` exporting the files of ``directory`` on any free ports."""
    args = ["--listen", f"{HOST}:0", "--nbd-port", "0", "--dir", str(directory)]
    return daemon(log, "agent", *args)


# -- fixtures and oracles ---------------------------------------------------------------------
@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A source file of SIZE seeded random bytes."""
    path = tmp_path / "source.img"
    path.write_bytes(random.Random(SEED).randbytes(SIZE))
    return path


@pytest.fixture
def session(source: Path) -> Iterator[Session]:
    lun = FileLUN(source)
    try:
        yield Session(lun, G, name="source")
    finally:
        lun.close()


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """An agent's directory: two zero-filled exports of SIZE bytes, "disk" and "spare"."""
    directory = tmp_path / "exports"
    directory.mkdir()
    for name in ("disk", "spare"):
        sparse(directory / name, SIZE)
    return directory


def scribble(session: Session, rng: random.Random, count: int) -> set[int]:
    """``count`` host writes of random data at random places; the chunks they touched."""
    chunks: set[int] = set()
    for _ in range(count):
        length = rng.randrange(1, 3 * G)
        offset = rng.randrange(0, SIZE - length + 1)
        session.write(offset, rng.randbytes(length))
        chunks.update(chunks_touched(offset, length, G))
    return chunks


def tracked(session: Session) -> set[int]:
    bitmap = session.bitmap
    return {c for c in range(bitmap.chunks) if bitmap.tracking(c)}


def assert_replicated(source: Path, export_file: Path, uri: str, tmp_path: Path) -> None:
    """The export equals the source: compared by qemu-img, and read back over NBD by nbdcopy."""
    run(tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", source, export_file)
    copy = tmp_path / "read-back.img"
    copy.unlink(missing_ok=True)
    run(tool("nbdcopy"), uri, copy)
    assert copy.read_bytes() == source.read_bytes()


@pytest.fixture
def replica_tools() -> None:
    """Skip a test that ends in :func:`assert_replicated` before it starts anything when
    its tools are missing: a skip halfway would leave the test's NBD connections open."""
    tool("qemu-img")
    tool("nbdcopy")


def protected(site, dest: Destination) -> bool:
    ack = site.status(dest)
    assert ack.ok, ack.reason
    return ack.info["protected"]


def lun_of(path: Path) -> FileLUN:
    """An export's file, read directly (the agent is not writing to it meanwhile)."""
    return FileLUN(path, readonly=True)


def remote_lun(uri: str) -> ReconnectingLUN:
    """A destination on an agent's export, opened as isc's commands open one: the agent
    cuts the connections open before each protect and rollback (its fence), and the
    update opens a new one after the answer."""
    return ReconnectingLUN(lambda: NBDLUN(uri, timeout=WAIT), SIZE, f"destination at {uri}")


class ReconnectingHook(HookLUN):
    """A :class:`HookLUN` over a :class:`ReconnectingLUN` that passes ``reconnect`` on."""

    def reconnect(self) -> None:
        self.lun.reconnect()


# -- replication ------------------------------------------------------------------------------
@pytest.mark.usefixtures("replica_tools")
def test_updates_to_an_agent_copy_each_mark_and_only_what_changed(
    tmp_path: Path, source: Path, session: Session, exports: Path
):
    rng = random.Random(SEED + 1)
    with agent(exports, tmp_path / "agent.log") as remote:
        assert set(remote.exports) == {"disk", "spare"}
        site = remote.site()
        dest = Destination(remote_lun(remote.exports["disk"]), name="disk")
        update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO)
        changed = set(range(SIZE // G))  # the first update of a new destination is full
        for _ in range(3):
            (result,) = update.run()
            assert result.outcomes == {"disk": "ok"}
            assert result.bytes_sent == sum(chunk_bytes(c, G, SIZE) for c in changed)
            assert dest.state is DestState.CONSISTENT
            assert not protected(site, dest)
            assert not session.bitmap.marked and not tracked(session)
            assert_replicated(source, exports / "disk", remote.exports["disk"], tmp_path)
            changed = scribble(session, rng, 25)
        assert (exports / "spare").read_bytes() == bytes(SIZE)
        dest.lun.close()
        remote.stop()
    assert not list((exports / ".isc-agent").iterdir()), "a protection's journal was left behind"


def test_updates_to_a_qemu_nbd_export_protected_in_this_process(
    tmp_path: Path, source: Path, session: Session
):
    rng = random.Random(SEED + 2)
    with qemu_nbd(tmp_path, size=SIZE) as remote, NBDLUN(remote.uri, timeout=WAIT) as lun:
        dest = Destination(lun, name="qemu")
        site = LocalSite()
        update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO)
        for _ in range(3):
            (result,) = update.run()
            assert result.outcomes == {"qemu": "ok"}
            assert dest.state is DestState.CONSISTENT
            assert dest.lun is lun, "the protection's LUN is still in place"
            assert not protected(site, dest)
            run(tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", source, remote.uri)
            scribble(session, rng, 25)


# -- a site that is down, silent, or refuses one destination ----------------------------------
@pytest.mark.usefixtures("replica_tools")
def test_an_agent_down_refuses_the_update_and_after_a_restart_it_catches_up(
    tmp_path: Path, source: Path, session: Session, exports: Path
):
    rng = random.Random(SEED + 3)
    with agent(exports, tmp_path / "agent.log") as first:
        dest = Destination(remote_lun(first.exports["disk"]), name="disk")
        PeriodicUpdate(session, [dest], first.site(), timeout=WAIT, io_size=IO).run()
        first.stop()
    dest.lun.close()
    image = (exports / "disk").read_bytes()
    changed = scribble(session, rng, 10)
    down = PeriodicUpdate(session, [dest], first.site(), timeout=WAIT, io_size=IO)
    refused = r"cannot protect disk: the agent at .* refused the connection \(is `isc agent`"
    with pytest.raises(UpdateError, match=refused):
        down.run()
    assert not session.bitmap.marked
    assert tracked(session) == changed  # the mark was merged back: nothing to send was lost
    assert dest.state is DestState.CONSISTENT and dest.protected_state is None
    assert (exports / "disk").read_bytes() == image

    with agent(exports, tmp_path / "agent-again.log") as second:
        dest.lun = remote_lun(second.exports["disk"])
        (result,) = PeriodicUpdate(session, [dest], second.site(), timeout=WAIT, io_size=IO).run()
        assert result.bytes_sent == sum(chunk_bytes(c, G, SIZE) for c in changed)
        assert_replicated(source, exports / "disk", second.exports["disk"], tmp_path)
        dest.lun.close()


def test_an_agent_that_never_answers_fails_the_update_after_its_timeout(session: Session):
    # A listener nobody serves: the kernel accepts the connection, nothing replies.
    with socket.create_server((HOST, 0)) as silent:
        dest = Destination(HookLUN(MemoryLUN(SIZE)), name="disk")
        site = AgentSite(HOST, silent.getsockname()[1], timeout=WAIT)
        update = PeriodicUpdate(session, [dest], site, timeout=0.2, io_size=IO)
        with pytest.raises(UpdateError, match=r"did not answer protect disk within 0\.2 s"):
            update.run()
        silent.settimeout(WAIT)
        conn, _ = silent.accept()
        with conn, conn.makefile("rb") as asked:
            request = json.loads(asked.readline())
    assert (request["op"], request["export"]) == ("protect", "disk")
    assert dest.lun.writes == 0
    assert not session.bitmap.marked
    # The full mark a new destination needs went back into tracking: everything is still to send.
    assert session.bitmap.tracking_count == session.bitmap.chunks
    assert dest.state is DestState.NEW and dest.protected_state is None


def test_a_refused_destination_undoes_the_protection_of_the_other(
    tmp_path: Path, session: Session, exports: Path
):
    with agent(exports, tmp_path / "agent.log") as remote:
        site = remote.site()
        known = Destination(remote_lun(remote.exports["disk"]), name="disk")
        ghost = Destination(HookLUN(MemoryLUN(SIZE)), name="ghost")
        update = PeriodicUpdate(session, [known, ghost], site, timeout=WAIT, io_size=IO)
        with pytest.raises(UpdateError, match="cannot protect ghost: no export named 'ghost'"):
            update.run()
        assert not protected(site, known)
        assert known.protected_state is None and known.state is DestState.NEW
        assert ghost.lun.writes == 0
        assert not session.bitmap.marked
        assert (exports / "disk").read_bytes() == bytes(SIZE)
        assert not (exports / JOURNAL).exists()
        known.lun.close()


# -- copies that fail midway ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
@pytest.mark.usefixtures("replica_tools")
def test_an_agent_stopped_mid_copy_keeps_the_protection_for_a_rollback_after_its_restart(
    tmp_path: Path, source: Path, session: Session, exports: Path, how: str
):
    rng = random.Random(SEED + 4)
    with agent(exports, tmp_path / "agent.log") as first:
        dest = Destination(remote_lun(first.exports["disk"]), name="disk")
        PeriodicUpdate(session, [dest], first.site(), timeout=WAIT, io_size=IO).run()
        consistent = (exports / "disk").read_bytes()
        scribble(session, rng, 30)
        runs = 0

        def stop_after_three_runs(done: int, total: int) -> None:
            nonlocal runs
            runs += 1
            if runs == 3:
                first.stop() if how == "SIGTERM" else first.kill()

        doomed = PeriodicUpdate(
            session, [dest], first.site(), timeout=WAIT, io_size=IO, progress=stop_after_three_runs
        )
        with pytest.raises(UpdateError) as failed:
            doomed.run()
    (result,) = failed.value.results
    assert 0 < result.bytes_sent < result.bytes_total
    assert dest.state is DestState.INCONSISTENT
    assert (exports / "disk").read_bytes() != consistent
    with lun_of(exports / "disk") as written:
        assert_no_lost_change(session, written)

    dest.lun.close()
    with agent(exports, tmp_path / "agent-again.log") as second:
        dest.lun = remote_lun(second.exports["disk"])
        site = second.site()
        status = site.status(dest).info  # the protection outlived the agent (rule 8)
        assert status["protected"] and status["intact"] and status["saved_chunks"] > 0
        ack = rollback(session, dest, site, timeout=WAIT)
        assert ack.ok and ack.extents
        assert (exports / "disk").read_bytes() == consistent
        assert dest.state is DestState.CONSISTENT
        with lun_of(exports / "disk") as restored:
            assert_no_lost_change(session, restored)
        PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
        assert dest.state is DestState.CONSISTENT
        assert not protected(site, dest) and not (exports / JOURNAL).exists()
        assert_replicated(source, exports / "disk", second.exports["disk"], tmp_path)
        dest.lun.close()


@pytest.mark.usefixtures("replica_tools")
def test_a_failed_copy_stays_protected_and_rolls_back_to_the_last_consistent_image(
    tmp_path: Path, source: Path, session: Session, exports: Path
):
    rng = random.Random(SEED + 5)
    with agent(exports, tmp_path / "agent.log") as remote:
        site = remote.site()
        hook = ReconnectingHook(remote_lun(remote.exports["disk"]))
        dest = Destination(hook, name="disk")
        update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO)
        update.run()
        consistent = (exports / "disk").read_bytes()
        scribble(session, rng, 30)
        hook.fail_at = hook.writes + 3
        with pytest.raises(UpdateError, match="injected failure"):
            update.run()
        assert (exports / "disk").read_bytes() != consistent  # two runs landed
        assert dest.state is DestState.INCONSISTENT
        status = site.status(dest).info
        assert status["protected"] and status["intact"] and status["saved_chunks"] > 0
        assert not session.bitmap.marked
        with lun_of(exports / "disk") as written:
            assert_no_lost_change(session, written)

        ack = rollback(session, dest, site, timeout=WAIT)
        assert ack.ok and ack.extents
        assert (exports / "disk").read_bytes() == consistent
        assert dest.state is DestState.CONSISTENT
        assert protected(site, dest)  # still protected until an update succeeds
        with lun_of(exports / "disk") as restored:
            assert_no_lost_change(session, restored)

        hook.fail_at = None
        update.run()
        assert not protected(site, dest)
        assert dest.state is DestState.CONSISTENT
        assert_replicated(source, exports / "disk", remote.exports["disk"], tmp_path)
        hook.close()


def test_after_each_protect_and_rollback_the_copies_go_over_a_connection_opened_after_it(
    tmp_path: Path, source: Path, session: Session, exports: Path, caplog
):
    # The agent cuts the connections open before each protect and rollback (its fence):
    # the workflows open new ones after the answer, so each copy and check goes on.
    rng = random.Random(SEED + 7)
    with agent(exports, tmp_path / "agent.log") as remote:
        site = remote.site()
        hook = ReconnectingHook(remote_lun(remote.exports["disk"]))
        dest = Destination(hook, name="disk")
        update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO)
        update.run()
        scribble(session, rng, 10)
        full = UnmarkedFullCopy(session, [dest], site, protect=True, timeout=WAIT, io_size=IO)
        assert full.run().outcomes == {"disk": "ok"}
        assert (exports / "disk").read_bytes() == source.read_bytes()
        update.run()
        scribble(session, rng, 30)
        hook.fail_at = hook.writes + 2
        with pytest.raises(UpdateError, match="injected failure"):
            update.run()
        assert rollback(session, dest, site, timeout=WAIT).ok
        hook.fail_at = None
        caplog.clear()
        update.run()
        assert "cannot check destination" not in caplog.text  # checked before the copy
        assert dest.state is DestState.CONSISTENT
        assert (exports / "disk").read_bytes() == source.read_bytes()
        hook.close()


def test_runs_a_killed_server_acknowledged_but_never_flushed_stay_tracked(
    tmp_path: Path, session: Session
):
    # A server may keep acknowledged writes in a volatile cache until FLUSH
    # (the NBD spec allows it; here nbdkit's cache filter in writeback mode).
    # Killed mid-copy, it loses the runs sent since the last flush: rule 2
    # wants them back in the bitmaps, as after a failed flush.
    rng = random.Random(SEED + 6)
    backing = sparse(tmp_path / "dest.img", SIZE)
    plugin = ["--filter=cache", "file", str(backing), "cache=writeback"]
    with nbdkit(tmp_path, *plugin, backing=backing) as server:
        dest = Destination(NBDLUN(server.uri, timeout=WAIT), name="dest")
        PeriodicUpdate(session, [dest], LocalSite(), timeout=WAIT, io_size=IO).run()
        scribble(session, rng, 30)

        def kill_after_the_first_run(done: int, total: int) -> None:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(WAIT)

        doomed = PeriodicUpdate(
            session,
            [dest],
            LocalSite(),
            timeout=WAIT,
            io_size=IO,
            progress=kill_after_the_first_run,
        )
        with pytest.raises(UpdateError, match="incremental copy of source failed"):
            doomed.run()
        dest.lun.close()
    assert not session.bitmap.marked
    with lun_of(backing) as written:
        assert_no_lost_change(session, written)


# -- rule 7 -----------------------------------------------------------------------------------
@pytest.mark.usefixtures("replica_tools")
def test_a_second_update_while_one_runs_is_refused_and_changes_nothing(
    tmp_path: Path, source: Path, session: Session, exports: Path
):
    with agent(exports, tmp_path / "agent.log") as remote:
        site = remote.site()
        dest = Destination(remote_lun(remote.exports["disk"]), name="disk")
        gate = Gate()
        first = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO, progress=gate)
        running = Worker(first.run)
        gate.wait_reached()  # marked, protected, one run sent
        generation = session.generation
        pending = session.bitmap.transfer_count
        second = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO)
        with pytest.raises(UpdateBusy, match="already running"):
            second.run()
        assert session.bitmap.marked and session.generation == generation
        assert session.bitmap.transfer_count == pending
        assert protected(site, dest)
        gate.open()
        (result,) = running.finish()
        assert result.outcomes == {"disk": "ok"}
        assert not protected(site, dest)
        assert_replicated(source, exports / "disk", remote.exports["disk"], tmp_path)
        dest.lun.close()


@pytest.fixture
def written_since_an_update(
    tmp_path: Path, source: Path, session: Session, exports: Path
) -> Iterator[tuple[Daemon, AgentSite, Destination]]:
    """An agent of ``exports``, its export ``disk`` updated from ``session`` and host
    writes since: the agent, its site and the destination. The test must leave the
    destination consistent: then it must hold the source."""
    with agent(exports, tmp_path / "agent.log") as remote:
        site = remote.site()
        dest = Destination(remote_lun(remote.exports["disk"]), name="disk")
        try:
            PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
            scribble(session, random.Random(SEED + 41), 30)
            yield remote, site, dest
        finally:
            dest.lun.close()
    assert dest.state is DestState.CONSISTENT
    assert (exports / "disk").read_bytes() == source.read_bytes()


def undone_and_mended(session: Session, site: AgentSite, dest: Destination, exports: Path) -> None:
    """``dest`` is inconsistent with every chunk where it differs tracked, and the next
    update makes it consistent, unprotected."""
    assert dest.state is DestState.INCONSISTENT
    with lun_of(exports / "disk") as held:
        assert_no_lost_change(session, held)
    (result,) = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
    assert result.outcomes == {"disk": "ok"} and not protected(site, dest)


def test_a_rollback_by_another_client_during_an_update_leaves_its_ranges_tracked(
    session: Session, exports: Path, written_since_an_update
):
    remote, site, dest = written_since_an_update
    unprotect = site.unprotect

    def rolled_back_first(dest: Destination, timeout: float | None = None):
        # Another client (an operator, another session) rolls the export back once
        # the copy is whole: what it sent holds the old image again.
        assert remote.site().rollback(dest).ok
        return unprotect(dest, timeout)

    site.unprotect = rolled_back_first
    update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO)
    with pytest.raises(UpdateError, match="disk was rolled back by another client of its site"):
        update.run()
    assert not protected(site, dest)
    del site.unprotect  # no more rollbacks: the next update sends what this one undid
    undone_and_mended(session, site, dest, exports)


def test_a_rollback_by_another_client_during_an_update_that_fails_leaves_its_ranges_tracked(
    session: Session, exports: Path, written_since_an_update
):
    remote, site, dest = written_since_an_update
    gate, runs = Gate(), iter(range(2))

    def progress(*done: object) -> None:
        if next(runs, 1):  # the first run is flushed as it is sent (flush_every)
            gate(*done)  # parked after the second, until the rollback is done
            raise OSError("the copy fails after its second run")

    update = PeriodicUpdate(
        session, [dest], site, timeout=WAIT, io_size=IO, flush_every=IO, progress=progress
    )
    running = Worker(update.run)
    try:
        gate.wait_reached()
        assert remote.site().rollback(dest).ok  # undoes the runs the copy sent
    finally:
        gate.open()
    with pytest.raises(UpdateError, match="the copy fails after its second run"):
        running.finish()
    assert protected(site, dest)
    undone_and_mended(session, site, dest, exports)


# -- the control protocol, by hand ------------------------------------------------------------
@contextmanager
def control(remote: Daemon) -> Iterator[socket.socket]:
    with socket.create_connection((HOST, remote.control), timeout=WAIT) as sock:
        yield sock


def ask(sock: socket.socket, line: bytes) -> dict:
    """Send one line; return the one reply line."""
    sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        part = sock.recv(65536)
        assert part, f"the agent closed the connection instead of answering {line[:60]!r}"
        reply += part
    assert reply.count(b"\n") == 1, reply
    return json.loads(reply)


def request(rid: object, op: object, export: object = None) -> bytes:
    return json.dumps({"id": rid, "op": op, "export": export}).encode() + b"\n"


def snapshot_of(remote: Daemon, exports: Path) -> tuple[dict, dict[str, bytes]]:
    """Every export's status reply and file bytes: what a bad request must not change."""
    with control(remote) as sock:
        status = {name: ask(sock, request(0, "status", name)) for name in ("disk", "spare")}
    return status, {name: (exports / name).read_bytes() for name in ("disk", "spare")}


def nbd_write(uri: str, offset: int, data: bytes) -> None:
    with NBDLUN(uri, timeout=WAIT) as lun:
        lun.write(offset, data)
        lun.flush()


def test_protect_and_unprotect_are_durable_before_their_replies(tmp_path: Path, exports: Path):
    image = random.Random(SEED + 7).randbytes(SIZE)
    (exports / "disk").write_bytes(image)
    logs = iter(tmp_path / f"agent-{n}.log" for n in range(5))
    with agent(exports, next(logs)) as first:
        with control(first) as sock:
            assert ask(sock, request(1, "protect", "disk"))["ok"]
        first.kill()  # right after the reply
    with agent(exports, next(logs)) as second:
        nbd_write(second.exports["disk"], G, b"\x5a" * G)
        with control(second) as sock:
            again = ask(sock, request(2, "protect", "disk"))
            assert again["ok"] and again["reason"] == "already protected"
        second.kill()
    with agent(exports, next(logs)) as third:
        nbd_write(third.exports["disk"], 3 * MIB, b"\xa5" * 3 * G)
        with control(third) as sock:
            info = ask(sock, request(3, "status", "disk"))["info"]
            # The first image is kept: both writes since the first protect are in it.
            assert info["protected"] and info["intact"] and info["saved_chunks"] == 2
            assert info["extents"] == [[0, 64 * KIB], [3 * MIB, 64 * KIB]]
        third.kill()
    with agent(exports, next(logs)) as fourth:
        with control(fourth) as sock:
            rolled = ask(sock, request(4, "rollback", "disk"))
            assert rolled["ok"] and rolled["extents"] == [[0, 64 * KIB], [3 * MIB, 64 * KIB]]
            assert (exports / "disk").read_bytes() == image
            assert ask(sock, request(5, "unprotect", "disk"))["ok"]
        fourth.kill()
    assert not (exports / JOURNAL).exists()
    with agent(exports, next(logs)) as fifth, control(fifth) as sock:
        info = ask(sock, request(6, "status", "disk"))["info"]
        expected = {"size": SIZE, "protected": False, "identity": info["identity"]}
        assert info == {**expected, "holder": None}  # no session named itself: none holds it


def test_a_protection_does_not_pass_to_a_file_recreated_at_its_inode(tmp_path: Path, exports: Path):
    # Rule 12 at the journal: a file deleted and recreated at the same inode number while
    # the agent was down (a restore from a backup) is not the file it protects; rolling
    # the old file's chunks into it would mix two files.
    (exports / "disk").write_bytes(random.Random(SEED + 8).randbytes(SIZE))
    with agent(exports, tmp_path / "agent-1.log") as first:
        with control(first) as sock:
            assert ask(sock, request(1, "protect", "disk"))["ok"]
        nbd_write(first.exports["disk"], G, b"\x5a" * G)  # its chunk saved in the journal
        first.kill()
    restored = random.Random(SEED + 9).randbytes(SIZE)
    recreate_at_same_inode(exports / "disk", restored)
    with agent(exports, tmp_path / "agent-2.log") as second, control(second) as sock:
        info = ask(sock, request(2, "status", "disk"))["info"]
        assert info["protected"] and not info["intact"]
        assert "protects another file" in info["problem"] and "isc unprotect" in info["problem"]
        rolled = ask(sock, request(3, "rollback", "disk"))
        assert not rolled["ok"] and "the protected image was lost" in rolled["reason"]
        assert (exports / "disk").read_bytes() == restored
        assert ask(sock, request(4, "unprotect", "disk"))["ok"]


def test_a_journal_of_the_earlier_format_keeps_its_protection(tmp_path: Path, exports: Path):
    image = random.Random(SEED + 10).randbytes(SIZE)
    (exports / "disk").write_bytes(image)
    with agent(exports, tmp_path / "agent-1.log") as first:
        with control(first) as sock:
            assert ask(sock, request(1, "protect", "disk"))["ok"]
        nbd_write(first.exports["disk"], 3 * MIB, b"\xa5" * G)
        first.kill()
    # The journal as an earlier agent wrote it: header ISCJRNL2, without the file's birth.
    journal, disk = exports / JOURNAL, (exports / "disk").stat()
    data = journal.read_bytes()
    assert data[:8] == b"ISCJRNL3"
    head = struct.pack(
        "<8sIQQQ8s", b"ISCJRNL2", PROTECT_GRANULARITY, SIZE, disk.st_dev, disk.st_ino, data[36:44]
    )
    journal.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + data[HEADER_SIZE:])
    with agent(exports, tmp_path / "agent-2.log") as second, control(second) as sock:
        info = ask(sock, request(2, "status", "disk"))["info"]
        assert info["protected"] and info["intact"] and info["saved_chunks"] == 1
        rolled = ask(sock, request(3, "rollback", "disk"))
        assert rolled["ok"] and rolled["extents"] == [[3 * MIB, 64 * KIB]]
        assert (exports / "disk").read_bytes() == image
    assert journal.read_bytes()[:8] == b"ISCJRNL3"  # written in the new format


def test_a_journal_not_opened_again_after_its_rollback_fails_the_writes_it_would_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    p = PROTECT_GRANULARITY
    served = open_regular(sparse(tmp_path / "d.img", 4 * p))
    assert served is not None
    lun, identity = served
    path = tmp_path / ".isc-agent" / "d.img.journal"
    journal = Journal.create(path, lun, identity)
    try:
        journal.write(0, b"\x01" * 10)
        opened, image = os.open, journal.image

        def no_more_files(name, flags: int, *args: object) -> int:
            if Path(name) == path and flags & os.O_RDWR:  # the reopen, not the temp file
                raise OSError(errno.EMFILE, "Too many open files")
            return opened(name, flags, *args)

        monkeypatch.setattr(os, "open", no_more_files)
        with pytest.raises(OSError, match="Too many open files"):
            journal.rollback()
        monkeypatch.undo()
        assert lun.read(0, 10) == bytes(10) and journal.image != image  # written back
        # A save would go to the journal the rollback replaced: the write fails instead.
        with pytest.raises(OSError, match="could not be opened after a rollback"):
            journal.write(p, b"\x02" * 10)
        assert lun.read(p, 10) == bytes(10)
        assert journal.rollback() == ((0, p),)  # again, and it takes saves once more
        journal.write(p, b"\x02" * 10)
        assert journal.info()["saved_chunks"] == 1
    finally:
        journal.close()
        lun.close()


def test_an_export_keeps_its_identity_across_restarts_and_a_replaced_file_gets_another(
    tmp_path: Path, exports: Path
):
    def identities(directory: Path) -> dict[str, str]:
        served = Agent(directory)
        try:
            return {n: e.status()["info"]["identity"] for n, e in served.exports.items()}
        finally:
            served.close()

    first = identities(exports)
    assert identities(exports) == first  # a restarted agent: the same files
    assert first["disk"] != first["spare"]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(exports, elsewhere)  # the same names and bytes, other files
    assert not set(identities(elsewhere).values()) & set(first.values())
    (exports / "disk").rename(tmp_path / "old-disk")  # kept: its inode is not reused
    shutil.copy(exports / "spare", exports / "disk")
    assert identities(exports)["disk"] not in first.values()


def test_an_agent_exports_regular_files_only(tmp_path: Path, exports: Path):
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"\x11" * SIZE)
    (exports / "link.img").symlink_to(outside)
    os.mkfifo(exports / "pipe")
    (exports / "folder").mkdir()
    (exports / ".hidden").write_bytes(bytes(SIZE))
    with agent(exports, tmp_path / "agent.log") as remote:
        assert set(remote.exports) == {"disk", "spare"}
        with control(remote) as sock:
            for rid, name in enumerate(["link.img", "pipe", "folder", ".hidden", ".isc-agent"]):
                reply = ask(sock, request(rid, "protect", name))
                assert not reply["ok"] and f"no export named {name!r}" in reply["reason"]
        remote.stop()
    assert outside.read_bytes() == b"\x11" * SIZE


def test_open_regular_refuses_what_is_not_a_regular_file(tmp_path: Path, exports: Path):
    (exports / "link.img").symlink_to(exports / "disk")
    os.mkfifo(exports / "pipe")
    for name in ("link.img", "pipe", "missing"):
        assert open_regular(exports / name) is None, name
    opened = open_regular(exports / "disk")
    assert opened is not None
    lun, identity = opened
    with lun:
        stat = (exports / "disk").stat()
        assert identity == (stat.st_dev, stat.st_ino) and lun.size == SIZE


def test_an_agent_refuses_a_state_directory_that_is_not_one(tmp_path: Path, exports: Path):
    (exports / ".isc-agent").symlink_to(tmp_path)
    with pytest.raises(ParameterError, match=r"\.isc-agent is not a directory"):
        Agent(exports)


BAD_LINES = [
    (b"not json\n", None, "not JSON"),
    (b"\xff\xfe{}\n", None, "not JSON"),
    (b"[1, 2]\n", None, "a request is a JSON object"),
    (b'"protect"\n', None, "a request is a JSON object"),
    (b"null\n", None, "a request is a JSON object"),
    (b"\n", None, "not JSON"),
    (request(1, "explode", "disk"), 1, "unknown op 'explode'"),
    (request(2, None, "disk"), 2, "unknown op None"),
    (request(3, "protect", "nope"), 3, "no export named 'nope'"),
    (request(4, "unprotect", None), 4, "no export named None"),
    (request(5, "status", ["disk"]), 5, "no export named ['disk']"),
    (request("six", "rollback", "spare"), "six", "spare is not protected"),
]


def test_bad_control_lines_get_error_replies_and_change_nothing(
    tmp_path: Path, session: Session, exports: Path
):
    with agent(exports, tmp_path / "agent.log") as remote:
        # "disk" holds a protection whose image has saved data: a bad line must not touch it.
        with control(remote) as sock:
            assert ask(sock, request(0, "protect", "disk"))["ok"]
        with NBDLUN(remote.exports["disk"], timeout=WAIT) as lun:
            lun.write(G, b"\x5a" * G)
            lun.flush()
        before = snapshot_of(remote, exports)
        assert before[0]["disk"]["info"]["saved_chunks"] == 1

        with control(remote) as sock:
            for line, rid, reason in BAD_LINES:
                reply = ask(sock, line)
                assert reply["ok"] is False, line
                assert reply["id"] == rid, line
                assert reason in reply["reason"], (line, reply)
            assert ask(sock, request(7, "status", "spare"))["ok"]  # the connection still works

        with control(remote) as sock:
            sock.sendall(b'{"id": 8, "op": "unprot')  # and hangs up mid-line

        with control(remote) as sock:
            reply = ask(sock, b"x" * (64 * KIB + 1) + b"\n")
            assert reply["ok"] is False and "too long" in reply["reason"]
            assert sock.recv(1) == b""  # the rest of that line cannot be read: it hangs up

        with control(remote) as sock:
            assert ask(sock, request(9, "list")) == {
                "id": 9,
                "ok": True,
                "reason": None,
                "extents": [],
                "info": {"disk": SIZE, "spare": SIZE},
            }
        assert snapshot_of(remote, exports) == before
        assert remote.proc.poll() is None


def test_a_deeply_nested_request_gets_an_error_reply(tmp_path: Path, exports: Path):
    # Valid JSON under 64 KiB, but deeper than the decoder's recursion limit.
    with agent(exports, tmp_path / "agent.log") as remote:
        with control(remote) as sock:
            reply = ask(sock, b"[" * 20000 + b"]" * 20000 + b"\n")
            assert reply["ok"] is False
        with control(remote) as sock:
            assert ask(sock, request(1, "status", "disk"))["ok"]


# -- isc serve --------------------------------------------------------------------------------
def serve(source: Path, log: Path, *options: str) -> AbstractContextManager[Daemon]:
    return daemon(log, "serve", str(source), "--listen", f"{HOST}:0", *options)


def test_serve_writes_from_qemu_io_and_nbdcopy_reach_the_source(tmp_path: Path, source: Path):
    expected = bytearray(source.read_bytes())
    small = tmp_path / "small.bin"
    small.write_bytes(random.Random(SEED + 6).randbytes(100_000))
    with serve(source, tmp_path / "serve.log", "--granularity", "8K") as served:
        ((name, uri),) = served.exports.items()
        assert name == "source.img"
        run(tool("qemu-io"), "-f", "raw", "-c", "write -P 0x55 1M 64k", uri)
        run(tool("nbdcopy"), "--flush", small, uri)
        served.stop()
    expected[MIB : MIB + 64 * KIB] = b"\x55" * (64 * KIB)
    expected[:100_000] = small.read_bytes()
    assert source.read_bytes() == expected


def session_directory(tmp_path: Path, source: Path, granularity: int) -> Path:
    """A session directory on ``source`` with one NEW destination "d1" (``dest.img``)."""
    directory = tmp_path / "state"
    sparse(tmp_path / "dest.img", SIZE)
    create_session(directory, str(source), granularity=granularity)
    stored, _ = open_session(directory)
    with stored:
        stored.add_destination(str(tmp_path / "dest.img"), "d1")
    return directory


def test_serve_a_session_directory_tracks_what_clients_write(tmp_path: Path, source: Path):
    granularity = 8 * KIB
    state = session_directory(tmp_path, source, granularity)
    expected = bytearray(source.read_bytes())
    writes = [(MIB, 64 * KIB, 0x55), (100_000, 10, 0x66), (3 * MIB - 1, 2, 0x77)]
    with serve(state, tmp_path / "serve.log") as served:
        (uri,) = served.exports.values()
        commands = [arg for o, n, p in writes for arg in ("-c", f"write -P {p:#x} {o} {n}")]
        run(tool("qemu-io"), "-f", "raw", *commands, uri)
        served.stop()
    for offset, length, pattern in writes:
        expected[offset : offset + length] = bytes([pattern]) * length
    stored, recovery = open_session(state)
    with stored:
        assert not recovery.crashed
        bitmap = stored.session.bitmap
        assert {c for c in range(bitmap.chunks) if bitmap.tracking(c)} == {
            c for o, n, _ in writes for c in chunks_touched(o, n, granularity)
        }
        assert [d.name for d in stored.destinations] == ["d1"]
    assert source.read_bytes() == expected


# -- isc serve's control port -----------------------------------------------------------------
@pytest.fixture
def state(tmp_path: Path, source: Path) -> Path:
    return session_directory(tmp_path, source, G)


def serve_controlled(source: Path, log: Path, *options: str) -> AbstractContextManager[Daemon]:
    return serve(source, log, "--control", f"{HOST}:0", *options)


def host_write(uri: str, writes: list[tuple[int, bytes]]) -> None:
    with NBDLUN(uri, timeout=WAIT) as lun:
        for offset, data in writes:
            lun.write(offset, data)
        lun.flush()


def test_serve_control_drives_the_copies_of_its_session(tmp_path: Path, source: Path, state: Path):
    rng = random.Random(SEED + 20)
    dest = tmp_path / "dest.img"
    with serve_controlled(state, tmp_path / "serve.log") as served, control(served) as sock:
        (uri,) = served.exports.values()
        status = ask(sock, json.dumps({"id": 1, "op": "status"}).encode() + b"\n")
        assert status["ok"] and status["info"]["state"] == "unmarked"
        assert status["info"]["destinations"] == [
            {"name": "d1", "state": "new", "epoch": None, "reachable": True, "problem": None}
        ]

        full = ask(sock, b'{"id": 2, "op": "copy", "mode": "full"}\n')
        assert full["ok"], full["reason"]
        assert full["info"]["bytes_sent"] == SIZE
        assert full["info"]["destinations"][0]["state"] == "consistent"
        assert dest.read_bytes() == source.read_bytes()

        host_write(uri, [(rng.randrange(SIZE - G), rng.randbytes(G)) for _ in range(5)])
        marked = ask(sock, b'{"id": 3, "op": "mark"}\n')
        assert marked["ok"] and 1 <= marked["info"]["transfer_chunks"] <= 10
        at_mark = source.read_bytes()
        host_write(uri, [(rng.randrange(SIZE - G), rng.randbytes(G)) for _ in range(5)])
        incremental = ask(sock, b'{"id": 4, "op": "copy"}\n')
        assert incremental["ok"], incremental["reason"]
        assert incremental["info"]["mode"] == "incremental"
        assert incremental["info"]["chunks_sent"] == marked["info"]["transfer_chunks"]
        assert dest.read_bytes() == at_mark  # the marked point in time, not the later writes

        unmarked = ask(sock, b'{"id": 5, "op": "copy", "mode": "full-unmarked"}\n')
        assert unmarked["ok"], unmarked["reason"]
        assert unmarked["info"]["destinations"][0]["state"] == "inconsistent"
        assert ask(sock, b'{"id": 6, "op": "mark"}\n')["ok"]
        assert ask(sock, b'{"id": 7, "op": "copy"}\n')["ok"]
        assert dest.read_bytes() == source.read_bytes()
        final = ask(sock, b'{"id": 8, "op": "status"}\n')["info"]
        assert final["state"] == "unmarked" and final["tracked_chunks"] == 0
        assert final["destinations"][0]["state"] == "consistent"
        served.stop()
    stored, recovery = open_session(state)  # what the server did was saved
    with stored:
        assert not recovery.crashed
        assert stored.destinations[0].state is DestState.CONSISTENT


BAD_SERVE_REQUESTS = [
    ({"op": "copy", "mode": "sideways"}, "mode must be one of"),
    ({"op": "copy", "throttle": -1}, "throttle must be >= 1024 bytes per second"),
    ({"op": "copy", "throttle": "fast"}, "throttle must be >= 1024"),
    ({"op": "copy", "throttle": 1e-300}, "throttle must be >= 1024"),
    ({"op": "copy"}, "is unmarked: an incremental copy sends a marked point in time"),
    ({"op": "copy", "busy_share": 0}, "busy_share must be in [0.01, 1]"),
    ({"op": "copy", "busy_share": 1e-300}, "busy_share must be in [0.01, 1]"),
    ({"op": "copy", "busy_share": 1.5}, "busy_share must be in [0.01, 1]"),
    ({"op": "copy", "busy_share": True}, "busy_share must be in [0.01, 1]"),
    ({"op": "mark", "full": "yes"}, "full must be true or false"),
    ({"op": "protect"}, "unknown op 'protect'"),
]


def test_serve_control_refuses_bad_requests_and_changes_nothing(
    tmp_path: Path, source: Path, state: Path
):
    with serve_controlled(state, tmp_path / "serve.log") as served, control(served) as sock:
        host_write(next(iter(served.exports.values())), [(G, b"\x33" * G)])
        before = ask(sock, b'{"id": 0, "op": "status"}\n')
        files = source.read_bytes(), (tmp_path / "dest.img").read_bytes()
        for rid, (request, reason) in enumerate(BAD_SERVE_REQUESTS, 1):
            reply = ask(sock, json.dumps({"id": rid, **request}).encode() + b"\n")
            assert reply["ok"] is False and reply["id"] == rid, reply
            assert reason in reply["reason"], (request, reply)
        assert ask(sock, b'{"id": 0, "op": "status"}\n') == before
        assert (source.read_bytes(), (tmp_path / "dest.img").read_bytes()) == files
        assert ask(sock, b'{"id": 9, "op": "mark"}\n')["ok"]
        again = ask(sock, b'{"id": 10, "op": "mark"}\n')
        assert again["ok"] is False and "already marked" in again["reason"]
        served.stop()


def test_serve_control_of_a_lun_without_a_session_directory_cannot_copy(
    tmp_path: Path, source: Path
):
    with serve_controlled(source, tmp_path / "serve.log") as served, control(served) as sock:
        assert ask(sock, b'{"id": 1, "op": "mark"}\n')["ok"]
        reply = ask(sock, b'{"id": 2, "op": "copy"}\n')
        assert reply["ok"] is False and "has no destinations" in reply["reason"]
        assert ask(sock, b'{"id": 3, "op": "status"}\n')["info"]["destinations"] == []
        served.stop()


def test_stopping_serve_cancels_its_running_copy(tmp_path: Path, source: Path, state: Path):
    log = tmp_path / "serve.log"
    with (
        serve_controlled(state, log) as served,
        control(served) as copying,
        control(served) as other,
    ):
        # A marked full copy throttled to 1 KiB/s: after its first run it waits
        # for more than an hour, so it is still running below.
        copying.sendall(b'{"id": 1, "op": "copy", "mode": "full", "throttle": 1024}\n')
        for _ in range(10_000):
            if ask(other, b'{"id": 2, "op": "status"}\n')["info"]["busy"]:
                break
        else:
            pytest.fail("the copy never started")
        refused = ask(other, b'{"id": 3, "op": "copy", "mode": "full"}\n')
        assert refused["ok"] is False and "is already running" in refused["reason"]
        served.proc.send_signal(signal.SIGTERM)
        copying.settimeout(WAIT)
        reply = json.loads(copying.makefile("rb").readline())
        assert reply["id"] == 1 and reply["ok"] is False
        assert "stopping" in reply["reason"]
        assert reply["info"]["bytes_sent"] > 0  # cancelled in the throttle's wait
        assert served.proc.wait(WAIT) == 0, log.read_text()
    stored, recovery = open_session(state)
    with stored:
        assert not recovery.crashed and not recovery.interrupted_copy
        assert stored.destinations[0].state is DestState.INCONSISTENT
        bitmap = stored.session.bitmap
        # Rule 2: the unsent rest is tracked, and so is the run sent but never flushed.
        assert bitmap.tracking_count == bitmap.chunks


# -- destinations at their own sites, through the isc command ---------------------------------
def cli_session(tmp_path: Path, source: Path) -> None:
    """``isc create s`` on ``source`` at G, with the local destination "local" (``local.img``)."""
    sparse(tmp_path / "local.img", SIZE)
    isc_run("create", "s", "--source", str(source), "--granularity", "16K", cwd=tmp_path)
    isc_run("add-dest", "s", "local.img", "--name", "local", cwd=tmp_path)


def site_of(remote: Daemon) -> str:
    return f"{HOST}:{remote.control}"


def states(tmp_path: Path) -> dict[str, tuple[str, str | None]]:
    """Each destination's state and site, as ``isc status --json`` prints them."""
    report = json.loads(isc_run("status", "s", "--json", cwd=tmp_path).stdout)
    return {d["name"]: (d["state"], d["site"]) for d in report["destinations"]}


def test_a_session_of_a_local_file_and_an_agent_export_updates_and_rolls_back_each_at_its_site(
    tmp_path: Path, source: Path, exports: Path
):
    cli_session(tmp_path, source)
    with agent(exports, tmp_path / "agent.log") as remote:
        site = site_of(remote)
        uri = remote.exports["disk"]
        added = isc_run("add-dest", "s", uri, "--site", site, "--json", cwd=tmp_path)
        assert json.loads(added.stdout)["site"] == site
        assert states(tmp_path) == {"local": ("new", None), "disk": ("new", site)}
        text = isc_run("status", "s", cwd=tmp_path).stdout
        assert f"    site {site} (its isc agent)" in text and "None" not in text

        # No --site: the local file is protected in the process, the export by its agent.
        done = isc_run("update", "s", "--json", "--timeout", str(WAIT), cwd=tmp_path)
        assert json.loads(done.stdout)["outcomes"] == {"local": "ok", "disk": "ok"}
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}
        image = source.read_bytes()
        assert (tmp_path / "local.img").read_bytes() == image
        assert (exports / "disk").read_bytes() == image
        disk = Destination(None, name="disk")
        assert not protected(remote.site(), disk)

        # An update killed mid-copy: its first run reached the export under the agent's
        # protection, and the process that ran it is gone (SIGKILL).
        rng = random.Random(SEED + 7)
        stored, _ = open_session(tmp_path / "s")
        with stored:
            for chunk in (3, 40, 77, 200):  # apart: one run each
                stored.session.write(chunk * G, rng.randbytes(G))
        proc = subprocess.Popen(
            [*ISC, "update", "s", "--throttle", "1K", "--timeout", str(WAIT)],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:  # a run of 16 KiB at 1 KiB/s: it waits 16 s after the first
            wait_until(lambda: (exports / "disk").read_bytes() != image, proc, "first run")
        finally:
            proc.kill()
            proc.wait(WAIT)
        assert protected(remote.site(), disk)
        assert states(tmp_path) == {"local": ("inconsistent", None), "disk": ("inconsistent", site)}

        # The rollback goes to the export's own site, without --site.
        done = isc_run("rollback", "s", "disk", "--json", cwd=tmp_path)
        record = json.loads(done.stdout)
        assert record["destination"] == "disk" and record["ranges"]
        assert (exports / "disk").read_bytes() == image
        assert states(tmp_path)["disk"] == ("inconsistent", site)  # as the crash left it

        done = isc_run("update", "s", "--json", "--timeout", str(WAIT), cwd=tmp_path)
        assert json.loads(done.stdout)["outcomes"] == {"local": "ok", "disk": "ok"}
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}
        assert (tmp_path / "local.img").read_bytes() == source.read_bytes()
        assert (exports / "disk").read_bytes() == source.read_bytes()
        assert not protected(remote.site(), disk)


def test_a_site_on_the_command_line_that_is_not_a_destinations_own_is_refused(
    tmp_path: Path, source: Path, exports: Path
):
    cli_session(tmp_path, source)
    elsewhere = f"{HOST}:1"
    with agent(exports, tmp_path / "agent.log") as remote:
        site = site_of(remote)
        isc_run("add-dest", "s", remote.exports["disk"], "--site", site, cwd=tmp_path)
        before = files(tmp_path / "s")
        for command in (["update", "s"], ["rollback", "s", "disk"]):
            done = isc_run(*command, "--site", elsewhere, cwd=tmp_path, check=1)
            assert error_line(done) == (
                f"isc: error: --site {elsewhere} is not the site of destination disk, {site} "
                "(its own, from add-dest --site): leave --site out, and each destination goes "
                "to its own site; to move disk to another agent, remove-dest it and add-dest it "
                "with that --site"
            )
            assert files(tmp_path / "s") == before
        # The same site is no contradiction: it is the site of "local" too, which has none
        # of its own, and which that agent does not export.
        done = isc_run("update", "s", "--site", site, cwd=tmp_path, check=1)
        assert "cannot protect local: no export named 'local'" in error_line(done)
        assert not protected(remote.site(), Destination(None, name="disk"))
        # A rollback of "local" goes to --site, whatever the other destination's site.
        done = isc_run("rollback", "s", "local", "--site", elsewhere, cwd=tmp_path, check=1)
        assert f"the agent at {elsewhere} refused the connection" in error_line(done)
    assert (exports / "disk").read_bytes() == bytes(SIZE)
    assert states(tmp_path) == {"local": ("new", None), "disk": ("new", site)}


def test_a_site_on_a_unix_socket_is_remembered_by_its_path_and_known_under_another(
    tmp_path: Path, source: Path, exports: Path
):
    cli_session(tmp_path, source)
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to("run")
    socket_path = tmp_path / "run" / "agent.sock"
    args = ["--listen", f"unix:{socket_path}", "--nbd-port", "0", "--dir", str(exports)]
    with daemon(tmp_path / "agent.log", "agent", *args) as remote:
        uri = remote.exports["disk"]
        isc_run("add-dest", "s", uri, "--site", "unix:run/agent.sock", cwd=tmp_path)
        site = f"unix:{socket_path}"
        assert states(tmp_path) == {"local": ("new", None), "disk": ("new", site)}
        # The same socket under another path is the same site, not a contradiction: the
        # agent is asked, for the local destination too, which it does not export.
        other = "unix:link/agent.sock"
        done = isc_run("update", "s", "--site", other, cwd=tmp_path, check=1)
        assert "cannot protect local: no export named 'local'" in error_line(done)
        isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path)
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}
    assert (exports / "disk").read_bytes() == source.read_bytes()


def test_add_dest_at_a_site_refuses_what_its_agent_would_not_protect(
    tmp_path: Path, source: Path, exports: Path
):
    cli_session(tmp_path, source)
    sparse(tmp_path / "spare.img", SIZE)
    with agent(exports, tmp_path / "agent.log") as remote:
        site, uri = site_of(remote), remote.exports["disk"]
        other_uri = uri.replace(HOST, "localhost")  # the same export, not a destination yet
        before = state_of(tmp_path)
        for args, message in (
            (["spare.img"], "spare.img is not an NBD URI: a destination at a site (--site) is"),
            ([other_uri, "--name", "ghost"], "no export named 'ghost' (the name must be its"),
            ([uri, "--site", f"{HOST}:1"], f"the agent at {HOST}:1 refused the connection"),
        ):
            given = args if "--site" in args else [*args, "--site", site]
            done = isc_run("add-dest", "s", *given, cwd=tmp_path, check=1)
            assert message in error_line(done)
            assert state_of(tmp_path) == before
        secret_file(tmp_path / "secret")
        done = isc_run("add-dest", "s", uri, "--secret-file", "secret", cwd=tmp_path, check=1)
        assert error_line(done) == (
            "isc: error: --tls-creds and --secret-file are for a site: add --site"
        )
        assert state_of(tmp_path) == before


@contextmanager
def agent_with_a_secret(tmp_path: Path, source: Path, exports: Path) -> Iterator[tuple[str, str]]:
    """A CLI session ``s`` of ``source`` in ``tmp_path`` and an agent of ``exports`` that
    answers only holders of the secret in ``tmp_path/secret``: its site and export ``disk``."""
    secret = secret_file(tmp_path / "secret")
    cli_session(tmp_path, source)
    args = ["--listen", f"{HOST}:0", "--nbd-port", "0", "--dir", str(exports)]
    with daemon(tmp_path / "agent.log", "agent", *args, "--secret-file", str(secret)) as remote:
        yield site_of(remote), remote.exports["disk"]


def test_the_credentials_on_the_command_line_go_to_every_agent(
    tmp_path: Path, source: Path, exports: Path
):
    with agent_with_a_secret(tmp_path, source, exports) as (site, uri):
        done = isc_run("add-dest", "s", uri, "--site", site, cwd=tmp_path, check=1)
        assert f"the agent at {site} refused status disk: authentication" in error_line(done)
        isc_run("add-dest", "s", uri, "--site", site, "--secret-file", "secret", cwd=tmp_path)
        done = isc_run("update", "s", cwd=tmp_path, check=1)
        assert f"the agent at {site} refused protect disk: authentication" in error_line(done)
        assert states(tmp_path) == {"local": ("new", None), "disk": ("new", site)}
        isc_run("update", "s", "--secret-file", "secret", "--timeout", str(WAIT), cwd=tmp_path)
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}
    assert (exports / "disk").read_bytes() == source.read_bytes()


def test_only_a_client_with_the_credentials_releases_an_export(
    tmp_path: Path, source: Path, exports: Path
):
    """Rule 14: ``isc release`` and ``isc remove-dest``'s release go through the agent's
    authenticated control port; without the secret nothing is released."""
    holder = exports / ".isc-agent" / "disk.holder"
    with agent_with_a_secret(tmp_path, source, exports) as (site, uri):
        isc_run("add-dest", "s", uri, "--site", site, "--secret-file", "secret", cwd=tmp_path)
        held = holder.read_bytes()
        done = isc_run("release", site, "disk", cwd=tmp_path, check=1)
        assert f"the agent at {site} refused release disk: authentication" in error_line(done)
        assert holder.read_bytes() == held
        done = isc_run("remove-dest", "s", "disk", cwd=tmp_path)  # removed, with a warning
        assert "refused release disk: authentication" in done.stderr
        assert f"isc release {site} disk" in done.stderr
        assert holder.read_bytes() == held
        done = isc_run("release", site, "disk", "--secret-file", "secret", cwd=tmp_path)
        assert done.stdout.startswith(f"released disk at {site} from session s on ")
        assert not holder.exists()


def test_isc_serve_every_reaches_each_destinations_own_agent_with_the_credentials(
    tmp_path: Path, source: Path, exports: Path
):
    from test_serve import isc_serve, next_line

    with agent_with_a_secret(tmp_path, source, exports) as (site, uri):
        isc_run("add-dest", "s", uri, "--site", site, "--secret-file", "secret", cwd=tmp_path)
        before = state_of(tmp_path)
        # A --site that is not the destination's own is refused before serving.
        other = ["serve", "s", "--listen", f"{HOST}:0", "--every", "60", "--site", f"{HOST}:1"]
        done = isc_run(*other, cwd=tmp_path, check=1)
        assert f"--site {HOST}:1 is not the site of destination disk, {site}" in error_line(done)
        assert state_of(tmp_path) == before
        serve = ["s", "--listen", f"{HOST}:0", "--every", "0.05", "--secret-file", "secret"]
        with isc_serve(tmp_path, *serve) as (_, output):
            update = json.loads(next_line(output, "isc serve") or "null")
            assert update["ok"], (tmp_path / "serve.log").read_text()
            assert {d["name"]: d["state"] for d in update["destinations"]} == {
                "local": "consistent",
                "disk": "consistent",
            }
    assert (exports / "disk").read_bytes() == source.read_bytes()


def secret_file(path: Path) -> Path:
    """A shared secret of seeded bytes at ``path``, of mode 0600 as isc requires."""
    path.write_text(random.Random(SEED + 8).randbytes(32).hex())
    path.chmod(0o600)
    return path


@contextmanager
def impostor(answer: bytes | None) -> Iterator[str]:
    """HOST:PORT of a listener that is no agent: it reads a request, then sends ``answer``
    (None: nothing, until the test ends) and hangs up."""
    done = threading.Event()
    with socket.create_server((HOST, 0)) as server:
        server.settimeout(WAIT)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(WAIT)
                conn.recv(65536)
                if answer is None:
                    done.wait(WAIT)
                else:
                    conn.sendall(answer)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield f"{HOST}:{server.getsockname()[1]}"
        finally:
            done.set()
            thread.join(WAIT)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (f"{HOST}:1", "the agent at {site} refused the connection (is `isc agent` running there?)"),
        (
            "unix:{tmp}/none.sock",
            "the agent at {site} cannot be reached: no socket at {tmp}/none.sock (is `isc agent "
            "--listen {site}` running?)",
        ),
        (
            "no-such-host.invalid:10900",
            "the agent at {site} cannot be reached: the host no-such-host.invalid is unknown (",
        ),
        (
            b"220 smtp.example.com ESMTP\r\n",
            "the agent at {site} answered protect local with something that is not an isc "
            "agent's reply (is {site} the control port, --listen, of an isc agent?)",
        ),
        (
            b"",
            "the agent at {site} closed the connection before answering protect local (it "
            "stopped, or it requires authentication: give its --tls-creds or --secret-file)",
        ),
        (None, "the agent at {site} did not answer protect local within 0.5 s"),
    ],
    ids=["refused", "no socket", "unknown host", "not an agent", "hangs up", "silent"],
)
def test_a_site_that_fails_is_named_in_words_and_changes_nothing(
    tmp_path: Path, source: Path, where: str | bytes | None, message: str
):
    cli_session(tmp_path, source)
    isc_run("copy", "s", "--full", cwd=tmp_path)
    before = state_of(tmp_path)
    connected = not isinstance(where, str)  # an impostor takes the connection
    with contextlib.ExitStack() as stack:
        if not isinstance(where, str):
            where = stack.enter_context(impostor(where))
        site = where.format(tmp=tmp_path)
        done = isc_run("update", "s", "--site", site, "--timeout", "0.5", cwd=tmp_path, check=1)
        line = error_line(done)
    expected = message.format(site=site, tmp=tmp_path)
    assert line.startswith(f"isc: error: cannot protect local: {expected}")
    assert line.endswith("; the update was abandoned")
    assert "Errno" not in line and "<" not in line
    after = state_of(tmp_path)
    assert after.pop("generation") == before.pop("generation") + 1  # marked, then unmarked
    # Connected, the session names the agent before it sends the protect, which may hold
    # the export for it (isc.store); one it cannot reach is not named.
    (dest,), (was,) = after["destinations"], before["destinations"]
    assert dest.pop("held_at") == ([site] if connected else [])
    assert was.pop("held_at") == []
    assert after == before
