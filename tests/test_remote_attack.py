"""Attacks across processes and networks that earlier rounds left unforced.

Each test forces one window no other test forces, with real peers (isc's NBD
server spoken to by hand; ``isc agent`` processes at fixed ports, SIGKILLed and
started again, with updates run through :mod:`isc.update` in this process) and
hooks that run the racing step at the exact point (no sleeps):

* a pull client of the frozen export ``NAME@frozen`` whose mark ends (an
  unmark) before or while the server works out which parts of a READ are
  holes, or which chunks ``base:allocation`` calls holes: the reply must be
  an error, never zeros acknowledged as the image at the mark;
* an update whose copy fails after another client of the agent rolled the
  destination back (undoing runs the copy had sent and flushed), with the
  agent down when the update asks its status of what was undone (the answer
  lost): what the rollback undid must not be left untracked, so the next
  update never reports the destination CONSISTENT without it;
* the same rollback after a copy that succeeded, before its unprotect, whose
  answer is lost (the agent down): the destination must not be reported
  CONSISTENT holding what the rollback put back;
* a protected unmarked full copy that fails after another client's rollback:
  what the rollback undid of the runs it sent must be tracked, as after a
  failed periodic update.

A test that finds a hole in the current code is marked ``xfail(strict=True)``
with the reason, naming the code; none is left: each hole found here is mended
(the commit after the test's names it).
"""

from __future__ import annotations

import contextlib
import random

import pytest
import test_agent
import test_nbd
import test_peer_hostile
import test_remote_hostile
from helpers import Gate, Worker
from test_agent import IO, SIZE, WAIT
from test_agent_journal import write_randomly
from test_nbd import CMD_READ, KIB, MIB
from test_nbd_protocol import CMD_BLOCK_STATUS, client
from test_pull import EIO, failure, frozen

from isc import DestState, Session
from isc.lun import FileLUN
from isc.nbd import SessionLUN
from isc.update import PeriodicUpdate, UnmarkedFullCopy, UpdateError

SEED = 20261206
serve = test_nbd.serve  # the fixture: isc servers on Unix sockets in tmp_path
source, session = test_agent.source, test_agent.session
env, remote = test_remote_hostile.env, test_peer_hostile.remote
G = 64 * KIB
RUN = 4 * IO  # the copy's first run: more chunks than the samples it takes of them


class HookedFile(FileLUN):
    """A file LUN whose next ``data_extents`` lets ``hook`` run once it has answered."""

    hook = None

    def data_extents(self, offset, length):
        found = super().data_extents(offset, length)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return found


@pytest.mark.parametrize("when", ["after", "during"])
def test_a_frozen_read_or_status_of_holes_once_its_mark_ended_fails(serve, tmp_path, when):
    lun = HookedFile.create(tmp_path / "src.img", MIB)
    session = Session(lun, granularity=G, name="disk")
    server = serve(SessionLUN(session))
    try:
        for command in (CMD_READ, CMD_BLOCK_STATUS):
            session.write(0, b"\1" * G)
            session.mark()
            with client(server) as c:
                allocation = frozen(c)["base:allocation"]
                session.write_zeroes(0, G, True)  # saved first (COFW), then a hole in the file
                # The mark's image: the saved copy, data.
                assert c.read_chunks(0, G)[0] == b"\1" * G
                assert c.status(0, G)[allocation] == [(G, 0)]
                if when == "after":
                    session.unmark()  # the saved copy goes; the file reads as a hole
                else:
                    lun.hook = session.unmark  # once the file said "a hole" at 0
                c.request(command, 0, G)
                error, message = failure(c)
                assert error == EIO and "ended by an unmark" in message, (command, message)
    finally:
        lun.close()


def failing_after_the_second_run(gate: Gate):
    """A copy's progress hook: the copy parks at ``gate`` after its second run (the first
    was flushed as it was sent: ``flush_every``), then fails."""
    runs = iter(range(2))

    def progress(*done: object) -> None:
        if next(runs, 1):
            gate(*done)
            raise OSError("the copy fails after its second run")

    return progress


def test_a_rollback_by_another_client_then_the_failed_updates_status_lost(session, remote):
    dest, _ = test_peer_hostile.first_update(session, remote)
    with dest.lun:
        rng = random.Random(SEED)
        session.write(0, rng.randbytes(RUN))
        write_randomly(session, rng, 20)
        gate = Gate()
        progress = failing_after_the_second_run(gate)
        site = test_peer_hostile.site_of(remote)
        update = PeriodicUpdate(
            session, [dest], site, timeout=WAIT, io_size=RUN, flush_every=1, progress=progress
        )
        running = Worker(update.run)
        try:
            gate.wait_reached()
            assert test_peer_hostile.site_of(remote).rollback(dest).ok  # undoes the runs sent
            remote.end()  # SIGKILL: the failed update's status gets no answer
        finally:
            gate.open()
        with pytest.raises(UpdateError, match="the copy fails after its second run"):
            running.finish()
        remote.start()
        # Host writes to every sampled chunk: the samples, skipped for chunks written
        # since, cannot tell the chunks the rollback undid (the samples are no scrub).
        g = session.granularity
        for chunk, _ in dest.samples:
            session.write(chunk * g, b"host write")
        image = session.source.read(0, SIZE)
        PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
        test_peer_hostile.assert_honest(session, dest, remote.directory / "disk", image)


def test_a_rollback_by_another_client_then_the_unprotects_answer_lost(session, remote):
    dest, _ = test_peer_hostile.first_update(session, remote)
    with dest.lun:
        write_randomly(session, random.Random(SEED + 1), 20)
        image = session.source.read(0, SIZE)
        site = test_peer_hostile.site_of(remote)
        unprotect = site.unprotect

        def rolled_back_then_down(dest, timeout=None):
            # Another client rolls the export back once the copy is whole: what it
            # sent holds the old image again; then the agent dies, unasked.
            assert test_peer_hostile.site_of(remote).rollback(dest).ok
            remote.end()
            return unprotect(dest, timeout)

        site.unprotect = rolled_back_then_down  # type: ignore[method-assign]
        with contextlib.suppress(UpdateError):
            PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
        # Never CONSISTENT; in step only with every difference tracked, else its next
        # copy gives it every chunk.
        assert dest.state is not DestState.CONSISTENT
        if dest.in_step(session):
            test_peer_hostile.assert_honest(session, dest, remote.directory / "disk", image)
        del site.unprotect
        remote.start()
        image = session.source.read(0, SIZE)
        PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
        assert dest.state is DestState.CONSISTENT
        test_peer_hostile.assert_honest(session, dest, remote.directory / "disk", image)


def test_a_protected_unmarked_full_copy_failing_after_another_clients_rollback(session, remote):
    dest, _ = test_peer_hostile.first_update(session, remote)
    with dest.lun:
        rng = random.Random(SEED + 2)
        session.write(0, rng.randbytes(RUN))
        write_randomly(session, rng, 20)
        gate = Gate()
        progress = failing_after_the_second_run(gate)
        site = test_peer_hostile.site_of(remote)
        full = UnmarkedFullCopy(
            session,
            [dest],
            site,
            protect=True,
            timeout=WAIT,
            io_size=RUN,
            flush_every=1,
            progress=progress,
        )
        running = Worker(full.run)
        try:
            gate.wait_reached()
            assert test_peer_hostile.site_of(remote).rollback(dest).ok  # undoes the runs sent
        finally:
            gate.open()
        with pytest.raises(UpdateError, match="the copy fails after its second run"):
            running.finish()
        assert dest.state is not DestState.CONSISTENT
        if dest.in_step(session):
            test_peer_hostile.assert_honest(session, dest, remote.directory / "disk", b"")
