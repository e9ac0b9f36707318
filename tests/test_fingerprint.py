"""Rule 12: a destination replaced or wiped since the copy that wrote it is found
before an incremental copy relies on it, and gets every chunk instead."""

from __future__ import annotations

import random

import pytest
from helpers import HookLUN, assert_no_lost_change, fill_random, session_directory
from test_nbd import nbdkit

from isc import MemoryLUN
from isc.copy import CopyJob, Destination, DestState
from isc.errors import StateError
from isc.fingerprint import SAMPLES
from isc.remote import LocalSite
from isc.session import Session
from isc.update import PeriodicUpdate

G = 4096
SIZE = 64 * G


def updated(dests: int = 1, lun=MemoryLUN):
    """A session on random data, its destinations CONSISTENT after a full and an incremental."""
    source = MemoryLUN(SIZE)
    fill_random(source, random.Random(1))
    session = Session(source, G)
    destinations = [Destination(HookLUN(lun(SIZE)), f"d{i}") for i in range(dests)]
    CopyJob(session, destinations).full()
    scribble(session, random.Random(2))
    session.mark()
    CopyJob(session, destinations).incremental()
    return session, destinations


def scribble(session: Session, rng: random.Random, writes: int = 6, spare=()) -> None:
    """Random host writes, none to the chunks of the ``spare`` samples."""
    spared = {chunk for chunk, _ in spare}
    free = [c for c in range(SIZE // G) if c not in spared]
    for _ in range(writes):
        session.write(rng.choice(free) * G + rng.randrange(G // 2), rng.randbytes(G // 2))


def test_every_copy_leaves_samples_of_chunks_holding_data():
    _, (dest,) = updated()
    assert SAMPLES <= len(dest.samples) <= 2 * SAMPLES
    for chunk, _ in dest.samples:
        assert dest.lun.read(chunk * G, G) != bytes(G)


def test_a_wiped_destination_gets_a_full_mark_from_the_update():
    session, (dest,) = updated()
    dest.lun = HookLUN(MemoryLUN(SIZE))  # replaced by an empty volume
    scribble(session, random.Random(3), spare=dest.samples)
    (result,) = PeriodicUpdate(session, [dest], LocalSite()).run()
    assert result.bytes_sent == SIZE  # everything, not the increment
    assert dest.state is DestState.CONSISTENT
    assert dest.lun.read(0, SIZE) == session.read(0, SIZE)


def test_a_replaced_destination_is_seeded_from_one_in_step():
    session, (good, swapped) = updated(2)
    image = bytearray(swapped.lun.read(0, SIZE))
    for chunk, _ in swapped.samples:
        image[chunk * G] ^= 0xFF  # another volume: same size, other bytes
    swapped.lun = HookLUN(MemoryLUN(SIZE))
    swapped.lun.write(0, bytes(image))
    scribble(session, random.Random(4), spare=swapped.samples)
    session.mark()
    result = CopyJob(session, [good, swapped]).incremental()
    assert "does not hold what the last copy wrote" in result.replaced["d1"]
    assert result.bytes_seeded
    for dest in (good, swapped):
        assert dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, SIZE) == session.read(0, SIZE)


def test_a_replaced_destination_with_no_donor_refuses_the_incremental_and_says_why():
    session, (dest,) = updated()
    dest.lun = HookLUN(MemoryLUN(SIZE))
    session.mark()
    with pytest.raises(StateError, match=r"d0: chunk \d+ does not hold what the last copy wrote"):
        CopyJob(session, [dest]).incremental()
    assert dest.state is DestState.NEW and dest.lun.writes == 0
    session.unmark()
    CopyJob(session, [dest]).full()
    assert dest.lun.read(0, SIZE) == session.read(0, SIZE)


def test_a_failed_copy_never_makes_its_destination_look_replaced():
    # The chunks a failed copy wrote differ from the samples for a good reason:
    # the copy dropped those samples before writing.
    session, (dest,) = updated()
    rng = random.Random(5)
    for attempt in range(20):
        scribble(session, rng, 10)
        session.mark()
        dest.lun.fail_at = dest.lun.writes + rng.randrange(1, 6)
        job = CopyJob(session, [dest], io_size=2 * G, flush_every=2 * G)
        with pytest.raises(Exception, match="injected"):
            job.incremental()
        assert job.replaced == {}, attempt
        assert_no_lost_change(session, dest.lun)
        dest.lun.fail_at = None
        session.mark()
        job = CopyJob(session, [dest], io_size=2 * G)
        job.incremental()
        assert job.replaced == {} and dest.state is DestState.CONSISTENT


def test_a_restarted_nbdkit_memory_target_is_found_wiped(tmp_path):
    from isc.nbd import NBDLUN

    source = MemoryLUN(SIZE)
    fill_random(source, random.Random(6))
    session = Session(source, G)
    with nbdkit(tmp_path, "memory", f"size={SIZE}") as remote:
        dest = Destination(NBDLUN(remote.uri), "memory")
        CopyJob(session, [dest]).full()
        scribble(session, random.Random(7))
        session.mark()
        CopyJob(session, [dest]).incremental()
        dest.lun.close()
    scribble(session, random.Random(8), spare=dest.samples)
    (tmp_path / "nbdkit.sock").unlink()
    with nbdkit(tmp_path, "memory", f"size={SIZE}") as remote:  # the same address, wiped
        dest.lun = NBDLUN(remote.uri)
        try:
            (result,) = PeriodicUpdate(session, [dest], LocalSite()).run()
            assert result.bytes_sent == SIZE
            assert dest.state is DestState.CONSISTENT
            assert dest.lun.read(0, SIZE) == session.read(0, SIZE)
        finally:
            dest.lun.close()


def test_samples_survive_a_reopen_of_a_persistent_session(tmp_path):
    from isc.store import copy, open_session

    state = session_directory(tmp_path, SIZE, G, 9)
    with open_session(state)[0] as stored:
        copy(stored, "full")
        samples = stored.destinations[0].samples
        assert len(samples) >= SAMPLES
    with open(tmp_path / "d0.img", "r+b") as wipe:
        wipe.write(bytes(SIZE))
    with open_session(state)[0] as stored:
        assert stored.destinations[0].samples == samples
        stored.session.mark()
        with pytest.raises(StateError, match="replaced"):
            copy(stored, "incremental")
        assert stored.destinations[0].state is DestState.NEW


def test_the_record_of_a_running_copy_keeps_samples_and_its_checkpoints_renew_them(tmp_path):
    # A crash mid-copy leaves the samples of the last checkpoint: those from before
    # the copy, then those the copy holds at each checkpoint (none of a chunk it
    # rewrote), and a destination found replaced out of step.
    import json

    from isc.store import METADATA, copy, open_session

    def recorded() -> dict:
        meta = json.loads((state / METADATA).read_text())
        (dest,) = meta["destinations"]
        return {"copy": "copy" in meta, **dest}

    state = session_directory(tmp_path, SIZE, G, 10)
    with open_session(state)[0] as stored:
        copy(stored, "full")
        (dest,) = stored.destinations
        before = [list(sample) for sample in dest.samples]
        assert before
        stored.begin_copy(stored.destinations, "incremental")
        assert recorded()["samples"] == before and recorded()["state"] == "inconsistent"
        dest.samples = dest.samples[:1]  # what a mark drops and a flush takes
        stored.checkpoint()
        assert recorded()["samples"] == before[:1] and recorded()["epoch"] is not None
        dest.state, dest.epoch, dest.samples = DestState.NEW, None, []  # found replaced
        stored.checkpoint()
        assert recorded()["samples"] == [] and recorded()["epoch"] is None
        assert recorded()["copy"] and recorded()["state"] == "new"
        dest.state, dest.epoch, dest.samples = DestState.CONSISTENT, 1, before[:2]
        stored.save()  # the copy's end: a checkpoint after it writes no record of it
        stored.checkpoint()
        assert not recorded()["copy"] and recorded()["state"] == "consistent"


class Unreadable(HookLUN):
    """A destination whose reads fail while ``unreadable`` is set (a connection
    that died and comes back at its next write, say)."""

    unreadable = False

    def read(self, offset: int, length: int) -> bytes:
        if self.unreadable:
            raise OSError(5, "injected read failure")
        return super().read(offset, length)


@pytest.mark.parametrize("later", ["the same", "replaced", "still unreadable"])
def test_a_destination_the_check_cannot_read_is_checked_once_the_copy_flushed_it(later):
    session, (other, dest) = updated(2)
    scribble(session, random.Random(6), spare=dest.samples)
    dest.lun = Unreadable(dest.lun.lun)
    dest.lun.unreadable = True
    if later == "replaced":  # reached again at its first write: another volume
        wiped = MemoryLUN(SIZE)

        def replace(n: int, offset: int, data) -> None:
            dest.lun.lun, dest.lun.unreadable = wiped, False

        dest.lun.before_write = replace
    elif later == "the same":
        dest.lun.before_write = lambda n, offset, data: setattr(dest.lun, "unreadable", False)
    session.mark()
    result = CopyJob(session, [other, dest]).incremental()
    assert other.state is DestState.CONSISTENT  # one destination's trouble is its own
    assert other.lun.read(0, SIZE) == session.read(0, SIZE)
    if later == "the same":
        assert result.outcomes["d1"] == "ok" and dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, SIZE) == session.read(0, SIZE)
        return
    if later == "replaced":
        assert result.outcomes["d1"].startswith("replaced: chunk")
        assert dest.state is DestState.NEW and not dest.in_step(session)
    else:
        assert "cannot check it is the destination it was" in result.outcomes["d1"]
        assert dest.state is DestState.INCONSISTENT
        dest.lun.unreadable = False
        assert_no_lost_change(session, dest.lun)
    session.mark(full=not dest.in_step(session))
    CopyJob(session, [other, dest]).incremental()
    assert dest.state is DestState.CONSISTENT and dest.lun.read(0, SIZE) == session.read(0, SIZE)


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_destination_that_drops_out_of_a_full_copy_keeps_samples_of_what_it_flushed(marked):
    session, (other, dest) = updated(2)
    dest.lun.fail_at = dest.lun.writes + 12  # writes of 2 chunks, a flush every 4 chunks
    flushes = dest.lun.flushes
    job = CopyJob(session, [other, dest], io_size=2 * G, flush_every=4 * G)
    job.full(marked)
    assert dest.state is DestState.INCONSISTENT and dest.lun.flushes - flushes == 5
    assert dest.samples and all(chunk < 5 * 4 for chunk, _ in dest.samples)
    if not marked:
        session.mark()
    CopyJob(session, [dest]).check_destinations()
    assert dest.state is DestState.INCONSISTENT  # the same volume passes its check
    dest.lun = HookLUN(MemoryLUN(SIZE))  # replaced by a wiped one
    job = CopyJob(session, [dest])
    job.check_destinations()
    assert dest.state is DestState.NEW and "does not hold what the last copy" in job.replaced["d1"]


class Forgetful(HookLUN):
    """A destination that acknowledges writes and, once ``forget`` is set, drops them."""

    forget = False

    def write(self, offset: int, data) -> None:
        if self.forget:
            self.writes += 1
            return
        super().write(offset, data)


@pytest.mark.parametrize("copy", ["incremental", "full"])
def test_a_destination_that_drops_the_writes_it_acknowledges_is_not_called_consistent(copy):
    session, (other, dest) = updated(2)
    dest.lun = Forgetful(dest.lun.lun)
    dest.lun.forget = True
    scribble(session, random.Random(7), writes=40)
    session.mark(full=copy == "full")
    result = CopyJob(session, [other, dest]).incremental()
    assert result.outcomes["d1"].startswith("replaced: chunk")
    assert "read back does not hold what the copy sent there" in result.outcomes["d1"]
    assert dest.state is DestState.NEW and not dest.in_step(session)
    assert other.state is DestState.CONSISTENT
    assert other.lun.read(0, SIZE) == session.read(0, SIZE)


class WrittenWhileRead(MemoryLUN):
    """A source on which, once ``armed``, a host write (``write_first``) lands on a chunk
    just before the copy reads it back to compare (the window between the read and the
    check of the chunk's tracking bit)."""

    armed = False
    write_first = None

    def read(self, offset: int, length: int) -> bytes:
        if self.armed:
            self.armed = False
            self.write_first(offset, b"written meanwhile")
        return super().read(offset, length)


def test_a_host_write_as_the_copy_reads_the_source_back_is_no_mismatch():
    source = WrittenWhileRead(SIZE)
    fill_random(source, random.Random(8))
    session = Session(source, G)
    source.write_first = session.write
    dest = Destination(HookLUN(MemoryLUN(SIZE)), "d0")

    def last_run(done: int, total: int) -> None:
        source.armed = done == total  # the reads that follow are the samples'

    for marked in (True, False):
        result = CopyJob(session, [dest], progress=last_run).full(marked)
        assert result.outcomes["d0"] == "ok" and not source.armed  # a write came
        assert CopyJob(session, [dest]).replaced == {}
        assert dest.state is (DestState.CONSISTENT if marked else DestState.INCONSISTENT)
