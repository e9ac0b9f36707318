"""The agent's durable protection, and rollbacks that record their intent first (rule 8, rule 2).

The journal itself (:class:`isc.agent.Journal`) is tested in this process on
a real file: a save torn by a crash at many points is dropped and the
rollback still restores the protected image; damage before the last batch,
a replaced export and a damaged header make the image "lost" and the
rollback refused; a save that fails (an injected ``fdatasync`` or
``ftruncate`` failure) fails its write and keeps the image.

Then with real processes: ``isc agent`` SIGKILLed at seeded random points
while ``isc update`` copies to it, restarted, and ``isc rollback`` run each
time: the destination must equal its last consistent image byte for byte,
read inconsistent, and every difference from the source must be tracked. A
rollback whose answer never comes (the agent acts, then holds its reply: a
site that blocks on demand) is tried through :class:`AgentSite`'s timeout
and through ``isc rollback`` SIGKILLed while it waits: either way the
destination is inconsistent and what the rollback rewrote is tracked.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import Gate, Worker, assert_no_lost_change, free_ports, wait_until
from test_agent import ENV, HOST, JOURNAL, WAIT, daemon, lun_of
from test_nbd import sparse

from isc import Destination, DestState, FileLUN, IscError, Session
from isc.agent import HEAD_SIZE, HEADER_SIZE, Agent, Export, Journal, open_regular, run_agent
from isc.nbd import NBDLUN
from isc.remote import PROTECT_GRANULARITY, Ack, AgentSite
from isc.store import create_session, open_session, read_state
from isc.update import PeriodicUpdate, UpdateError, rollback

SEED = 20261211
P = PROTECT_GRANULARITY
SLOT = HEAD_SIZE + P  # one journal record
G = 16 << 10  # the source session's granularity
IO = 64 << 10


# -- the journal, in this process -----------------------------------------------------------
SMALL = 5 * P + 1000  # chunks 0-4 and a short chunk 5


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[FileLUN, tuple[int, int], bytes]]:
    """An export file of random bytes, opened as the agent opens it: (LUN, identity, image)."""
    path = tmp_path / "disk"
    image = random.Random(SEED).randbytes(SMALL)
    path.write_bytes(image)
    opened = open_regular(path)
    assert opened is not None
    lun, identity = opened
    with lun:
        yield lun, identity, image


def journal_of(tmp_path: Path) -> Path:
    return tmp_path / ".isc-agent" / "disk.journal"


def test_a_torn_save_is_dropped_and_the_rollback_still_restores_the_image(tmp_path: Path, disk):
    lun, identity, image = disk
    path = journal_of(tmp_path)
    rng = random.Random(SEED + 1)
    journal = Journal.create(path, lun, identity)
    journal.write(P - 100, rng.randbytes(200))  # chunks 0 and 1: the first batch
    synced = path.read_bytes()
    assert len(synced) == HEADER_SIZE + 2 * SLOT
    after_first = lun.read(0, SMALL)
    journal.write(3 * P, rng.randbytes(2 * P + 1000))  # chunks 3, 4 and 5: the second batch
    after_both = lun.read(0, SMALL)
    journal.close()
    whole = path.read_bytes()
    assert len(whole) == HEADER_SIZE + 5 * SLOT

    # A crash while the second batch was saved: the write waiting for it never
    # happened, whatever part of the batch reached the disk.
    near = [0, 1, HEAD_SIZE - 1, HEAD_SIZE, SLOT - 1, SLOT, SLOT + 1, 2 * SLOT, 3 * SLOT - 1]
    cuts = {len(synced) + d for d in near}
    cuts |= {rng.randrange(len(synced), len(whole)) for _ in range(12)}
    for cut in sorted(cuts):
        for tail in (b"", bytes(len(whole) - cut), rng.randbytes(len(whole) - cut)):
            path.write_bytes(whole[:cut] + tail)
            lun.write(0, after_first)
            reopened = Journal(path, lun, identity)
            try:
                info = reopened.info()
                assert info["intact"], (cut, len(tail))
                if info["saved_chunks"] == 2:
                    assert path.stat().st_size == len(synced)  # the torn batch was cut off
                else:  # torn only in the short chunk's padding: the batch is whole
                    assert info["saved_chunks"] == 5 and cut > len(whole) - P + 1000
                reopened.rollback()
            finally:
                reopened.close()
            assert lun.read(0, SMALL) == image, (cut, len(tail))

    path.write_bytes(whole)  # no crash: both batches count
    lun.write(0, after_both)
    reopened = Journal(path, lun, identity)
    assert reopened.info()["saved_chunks"] == 5
    assert reopened.rollback() == ((0, 2 * P), (3 * P, SMALL - 3 * P))
    assert lun.read(0, SMALL) == image
    assert path.stat().st_size == HEADER_SIZE  # protected afresh, at the restored image
    reopened.drop()
    assert not path.exists()


def test_damage_before_the_last_batch_loses_the_image_and_refuses_the_rollback(
    tmp_path: Path, disk
):
    lun, identity, _ = disk
    path = journal_of(tmp_path)
    journal = Journal.create(path, lun, identity)
    journal.write(10, b"\x01" * 10)  # the first batch: chunk 0
    journal.write(2 * P, b"\x02" * 10)  # the second: chunk 2
    journal.close()
    damaged = bytearray(path.read_bytes())
    damaged[HEADER_SIZE + HEAD_SIZE + 5] ^= 0xFF  # one bit of chunk 0's saved data
    path.write_bytes(damaged)
    written = lun.read(0, SMALL)
    reopened = Journal(path, lun, identity)
    try:
        info = reopened.info()
        assert not info["intact"] and f"record at byte {HEADER_SIZE} is damaged" in info["problem"]
        with pytest.raises(IscError, match=r"the protected image was lost: .* is damaged"):
            reopened.rollback()
        assert lun.read(0, SMALL) == written and path.read_bytes() == damaged
        reopened.write(4 * P, b"\x03")  # writes still land; nothing more is saved
        assert path.read_bytes() == damaged
    finally:
        reopened.close()


def test_protecting_an_export_whose_journal_lost_its_image_is_refused(tmp_path: Path):
    # "already protected" would let an update overwrite it with nothing to roll back to.
    sparse(tmp_path / "d.img", 4 * P)
    agent = Agent(tmp_path)
    try:
        export = agent.exports["d.img"]
        assert export.protect() == {"ok": True}
        export.write(0, b"\x01" * 10)
        export.write(2 * P, b"\x02" * 10)
    finally:
        agent.close()
    path = tmp_path / ".isc-agent" / "d.img.journal"
    damaged = bytearray(path.read_bytes())
    damaged[HEADER_SIZE + HEAD_SIZE + 5] ^= 0xFF
    path.write_bytes(damaged)
    agent = Agent(tmp_path)
    try:
        export = agent.exports["d.img"]
        reply = export.protect()
        assert not reply["ok"] and "protected image was lost" in reply["reason"]
        assert "unprotect it" in reply["reason"]
        assert export.unprotect() == {"ok": True}
        assert export.protect() == {"ok": True}  # a fresh image of what it holds now
    finally:
        agent.close()


@pytest.mark.parametrize("change", ["another file", "a damaged header"])
def test_a_journal_that_is_not_this_exports_loses_the_image(tmp_path: Path, disk, change: str):
    lun, identity, _ = disk
    path = journal_of(tmp_path)
    Journal.create(path, lun, identity).close()
    if change == "another file":  # the export was replaced: same name, new inode
        identity = (identity[0], identity[1] + 1)
    else:
        path.write_bytes(b"\0" * HEADER_SIZE)
    reopened = Journal(path, lun, identity)
    try:
        problem = reopened.info()["problem"]
        expected = "protects another file" if change == "another file" else "damaged header"
        assert expected in problem and "unprotect" in problem
        with pytest.raises(IscError, match="the protected image was lost"):
            reopened.rollback()
    finally:
        reopened.drop()


def fail(what: str):
    def raise_(*args: object) -> None:
        raise OSError(errno.EIO, f"injected {what} failure")

    return raise_


def test_a_save_that_fails_fails_its_write_and_keeps_the_image(
    tmp_path: Path, disk, monkeypatch: pytest.MonkeyPatch
):
    lun, identity, image = disk
    path = journal_of(tmp_path)
    journal = Journal.create(path, lun, identity)
    with monkeypatch.context() as patched:
        patched.setattr(os, "fdatasync", fail("fdatasync"))
        with pytest.raises(OSError, match="injected fdatasync failure"):
            journal.write(0, b"\xee" * 100)
    assert lun.read(0, SMALL) == image  # the write waited for its save: it never happened
    assert path.stat().st_size == HEADER_SIZE  # and what reached the journal was cut off
    assert journal.info()["saved_chunks"] == 0
    journal.write(0, b"\xee" * 100)  # the next try saves, then writes

    # A save that fails and cannot be cut off either: no later save may follow it.
    with monkeypatch.context() as patched:
        patched.setattr(os, "fdatasync", fail("fdatasync"))
        patched.setattr(os, "ftruncate", fail("ftruncate"))
        with pytest.raises(OSError, match="injected fdatasync failure"):
            journal.write(P, b"\xdd" * 100)
    with pytest.raises(OSError, match=r"takes no more saves.*roll back or unprotect"):
        journal.write(2 * P, b"\xcc" * 100)
    journal.write(50, b"\xbb")  # chunk 0 is saved already: the write needs no save
    assert (
        lun.read(P, 100) == image[P : P + 100]
        and lun.read(2 * P, 100) == image[2 * P : 2 * P + 100]
    )
    assert journal.rollback() == ((0, P),)
    assert lun.read(0, SMALL) == image
    journal.write(2 * P, b"\xcc" * 100)  # a rollback starts a clean journal
    assert journal.info()["saved_chunks"] == 1
    journal.drop()


# -- real processes -------------------------------------------------------------------------
SIZE = 4 << 20


@contextmanager
def agent_here(directory: Path) -> Iterator[tuple[Agent, int, dict[str, str]]]:
    """``run_agent`` in a thread of this process, so a test can hold its requests."""
    started: queue.Queue[tuple[Agent, int, dict[str, str]]] = queue.Queue()
    stop = threading.Event()
    worker = Worker(
        lambda: run_agent(
            directory, (HOST, 0), nbd_port=0, stop=stop, ready=lambda *ready: started.put(ready)
        )
    )
    try:
        ready = started.get(timeout=WAIT)
    except queue.Empty:
        stop.set()
        worker.finish()
        pytest.fail(f"the agent did not start within {WAIT} s")
    try:
        yield ready
    finally:
        stop.set()
        worker.finish()


def hold_after(agent: Agent, op: str, gate: Gate) -> None:
    """Make ``agent`` carry out ``op`` requests, then hold the reply until ``gate`` opens."""
    carry_out = agent.control.ops[op]

    def held(request: dict) -> dict:
        reply = carry_out(request)
        gate()
        return reply

    agent.control.ops[op] = held


def write_randomly(session: Session, rng: random.Random, count: int) -> None:
    for _ in range(count):
        length = rng.randrange(1, 3 * G)
        session.write(rng.randrange(0, SIZE - length + 1), rng.randbytes(length))


def leave_a_protection(agent: Agent, update: PeriodicUpdate, rng: random.Random) -> None:
    """An update of a CONSISTENT destination whose protection outlives it (unprotect refused).

    Afterwards the destination is CONSISTENT and holds the source, while the
    agent still protects the image from before: a rollback rewrites what the
    update sent.
    """
    ((session, _),) = update.members
    write_randomly(session, rng, 30)
    unprotect = agent.control.ops["unprotect"]
    agent.control.ops["unprotect"] = lambda request: {"ok": False, "reason": "maintenance"}
    try:
        update.run()
    finally:
        agent.control.ops["unprotect"] = unprotect


@pytest.fixture
def volumes(tmp_path: Path) -> tuple[Path, Path]:
    """A source of seeded random bytes and an agent directory with a zeroed export "disk"."""
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(SEED + 2).randbytes(SIZE))
    exports = tmp_path / "exports"
    exports.mkdir()
    sparse(exports / "disk", SIZE)
    return source, exports


@pytest.fixture
def state(tmp_path: Path, volumes) -> Path:
    """A session directory on the source, with no destination yet."""
    directory = tmp_path / "state"
    create_session(directory, str(volumes[0]), granularity=G)
    return directory


class ImpatientRollback(AgentSite):
    """An agent site that waits half a second for a rollback's answer, as long as told else."""

    def rollback(self, dest: Destination, timeout: float | None = None) -> Ack:
        return super().rollback(dest, 0.5)


def test_a_rollback_answered_too_late_counts_as_done(tmp_path: Path, volumes):
    source, exports = volumes
    rng = random.Random(SEED + 3)
    with agent_here(exports) as (agent, port, uris), FileLUN(source) as lun:
        session = Session(lun, G, name="source")
        dest = Destination(NBDLUN(uris["disk"], timeout=WAIT), name="disk")
        update = PeriodicUpdate(session, [dest], AgentSite(HOST, port), timeout=WAIT, io_size=IO)
        update.run()
        protected_image = (exports / "disk").read_bytes()
        leave_a_protection(agent, update, rng)
        assert dest.state is DestState.CONSISTENT
        gate = Gate()
        hold_after(agent, "rollback", gate)
        try:
            with pytest.raises(UpdateError, match=r"within 0\.5 s; it may have happened"):
                rollback(session, dest, ImpatientRollback(HOST, port), timeout=WAIT)
            assert gate.reached.is_set()
        finally:
            gate.open()
        assert (exports / "disk").read_bytes() == protected_image  # the agent did roll back
        assert dest.state is DestState.INCONSISTENT
        with lun_of(exports / "disk") as restored:
            assert_no_lost_change(session, restored)
        update.run()
        assert dest.state is DestState.CONSISTENT
        assert (exports / "disk").read_bytes() == source.read_bytes()
        dest.lun.close()


def isc(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "isc.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=ENV,
        )


def finished(proc: subprocess.Popen[bytes], log: Path) -> int:
    """Wait for ``proc``; its exit status."""
    try:
        return proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT)
        pytest.fail(f"{proc.args} did not finish within {WAIT} s: {log.read_text()}")


def test_isc_rollback_killed_while_the_agent_answers_leaves_the_change_tracked(
    tmp_path: Path, volumes, state: Path
):
    source, exports = volumes
    rng = random.Random(SEED + 4)
    with agent_here(exports) as (agent, port, uris):
        site = AgentSite(HOST, port, timeout=WAIT)
        stored, _ = open_session(state)
        with stored:
            stored.add_destination(uris["disk"], "disk")
            update = PeriodicUpdate(
                stored.session, stored.destinations, site, timeout=WAIT, io_size=IO
            )
            update.run()
            protected_image = (exports / "disk").read_bytes()
            leave_a_protection(agent, update, rng)
        assert read_state(state).meta["destinations"][0]["state"] == "consistent"

        gate = Gate()
        hold_after(agent, "rollback", gate)
        log = tmp_path / "rollback.log"
        proc = isc("rollback", str(state), "disk", "--site", f"{HOST}:{port}", log=log)
        try:
            wait_until(gate.reached.is_set, proc, "the agent's rollback", log)
            proc.send_signal(signal.SIGKILL)  # while it waits for the answer
        finally:
            assert finished(proc, log) == -signal.SIGKILL
            gate.open()
        assert (exports / "disk").read_bytes() == protected_image  # the agent did roll back

        stored, _ = open_session(state)
        with stored, lun_of(exports / "disk") as restored:
            (dest,) = stored.destinations
            assert dest.state is DestState.INCONSISTENT
            assert_no_lost_change(stored.session, restored)
            # In the session's name: isc rollback made it the export's holder.
            held = stored.site(site)
            PeriodicUpdate(stored.session, [dest], held, timeout=WAIT, io_size=IO).run()
            assert dest.state is DestState.CONSISTENT
        assert (exports / "disk").read_bytes() == source.read_bytes()


def test_isc_rollback_after_a_failed_update_restores_the_state_the_destination_had(
    tmp_path: Path, volumes, state: Path
):
    source, exports = volumes
    rng = random.Random(SEED + 6)
    log = tmp_path / "isc.log"

    def run(command: str, *args: str) -> int:
        return finished(isc(command, str(state), *args, *at_site, log=log), log)

    def destination() -> dict:
        (meta,) = read_state(state).meta["destinations"]
        return meta

    with agent_here(exports) as (agent, port, uris):
        at_site = ("--site", f"{HOST}:{port}")
        stored, _ = open_session(state)
        with stored:
            stored.add_destination(uris["disk"], "disk")
        assert run("update") == 0, log.read_text()
        consistent = (exports / "disk").read_bytes()
        stored, _ = open_session(state)
        with stored:
            write_randomly(stored.session, rng, 30)
        export = agent.exports["disk"]
        writes = itertools.count()

        def fail_after_one(offset: int, data) -> None:
            if next(writes):
                raise OSError(errno.EIO, "injected failure of the export")
            Export.write(export, offset, data)

        export.write = fail_after_one  # type: ignore[method-assign]
        try:
            assert run("update") == 1, log.read_text()  # it fails midway: disk stays protected
        finally:
            del export.write
        assert (exports / "disk").read_bytes() != consistent
        assert destination()["state"] == "inconsistent"
        assert destination()["protected_state"] == "consistent"
        assert run("rollback", "disk") == 0, log.read_text()  # a process of its own
        assert (exports / "disk").read_bytes() == consistent
        assert destination()["state"] == "consistent"  # what it held when protected
        stored, _ = open_session(state)
        with stored, lun_of(exports / "disk") as restored:
            assert_no_lost_change(stored.session, restored)
        assert run("update") == 0, log.read_text()
        assert (exports / "disk").read_bytes() == source.read_bytes()
        assert destination()["protected_state"] is None  # unprotected


KILLS = 20
"""Agents killed mid-update in the crash loop."""


def test_the_agent_killed_mid_update_then_a_rollback_restores_the_last_consistent_image(
    tmp_path: Path, volumes, state: Path
):
    source, exports = volumes
    rng = random.Random(SEED + 5)
    journal = exports / JOURNAL
    control_port, nbd_port = free_ports(2)
    site = ("--site", f"{HOST}:{control_port}")
    logs = tmp_path / "logs"
    logs.mkdir()

    def agent(n: int):
        return daemon(
            logs / f"agent-{n}.log",
            "agent",
            *("--listen", f"{HOST}:{control_port}", "--nbd-port", str(nbd_port)),
            *("--dir", str(exports)),
        )

    def run(*args: str) -> None:
        log = logs / f"{args[0]}.log"
        assert finished(isc(*args, log=log), log) == 0, log.read_text()

    def host_writes() -> None:
        stored, _ = open_session(state)
        with stored:
            write_randomly(stored.session, rng, 30)

    with agent(0) as first:
        stored, _ = open_session(state)
        with stored:
            stored.add_destination(first.exports["disk"], "disk")
        run("update", str(state), *site)
    consistent = source.read_bytes()
    assert (exports / "disk").read_bytes() == consistent

    def journal_slots() -> int:
        try:
            return (journal.stat().st_size - HEADER_SIZE) // SLOT
        except FileNotFoundError:
            return -1

    for n in range(1, KILLS + 2):
        with agent(n) as remote:
            if n > 1:  # the previous agent was killed mid-update: roll back
                run("rollback", str(state), "disk", *site)
                assert (exports / "disk").read_bytes() == consistent, f"after kill {n - 1}"
                stored, _ = open_session(state)
                with stored, lun_of(exports / "disk") as restored:
                    # The state it had when protected, which the session file kept.
                    assert stored.destinations[0].state is DestState.CONSISTENT
                    assert_no_lost_change(stored.session, restored)
            if n == KILLS + 1:
                break
            if n % 5 == 0:  # now and then an update that succeeds: a new consistent image
                run("update", str(state), *site)
                consistent = source.read_bytes()
                assert (exports / "disk").read_bytes() == consistent
            host_writes()
            slots = rng.randrange(1, 6)
            log = logs / f"update-{n}.log"
            updating = isc("update", str(state), *site, "--throttle", "1M", log=log)
            try:
                saved = functools.partial(lambda at_least: journal_slots() >= at_least, slots)
                wait_until(saved, updating, f"{slots} saves", log)
                remote.kill()
            finally:
                assert finished(updating, log) == 1, log.read_text()
