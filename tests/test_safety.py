"""The edges of the data path: failures and races that must never yield a false CONSISTENT.

Each test forces one window open with a hook (a source, log or save area that
fails or blocks on demand, a bitmap whose ``extents`` runs test code first),
then checks rules 1, 2, 5 and 6. The stress test at the end runs writers, a
small save area, failing destinations, cancels and marks in a loop and
compares every destination reported CONSISTENT with the exact image at its
mark.
"""

from __future__ import annotations

import errno
import random
import threading

import pytest
from helpers import (
    Gate,
    HookLUN,
    Worker,
    Writers,
    assert_no_lost_change,
    fill_random,
    session_directory,
)

from isc import FileLUN, MemoryLUN
from isc._core import DeltaBitmap
from isc._reference import DeltaBitmap as ReferenceBitmap
from isc.copy import CopyJob, CopyResult, Destination, DestState
from isc.errors import CopyError, StateError
from isc.savearea import SaveArea
from isc.session import Session, State
from isc.update import PeriodicUpdate, UpdateError

G = 4096


class FlakySource(MemoryLUN):
    """A memory LUN whose next ``readinto`` raises on demand."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.fail_reads = 0

    def readinto(self, offset: int, buffer) -> None:
        if self.fail_reads:
            self.fail_reads -= 1
            raise OSError(errno.EIO, f"injected read failure at offset {offset}")
        super().readinto(offset, buffer)


class BrokenArea(SaveArea):
    """A save area whose ``save_from`` raises an unexpected error on demand."""

    fail = False

    def save_from(self, chunk, length, fill) -> None:
        if self.fail:
            raise RuntimeError("injected save area bug")
        super().save_from(chunk, length, fill)


class HookedBitmap:
    """A session's bitmap seen through a proxy that runs ``before_extents`` first."""

    def __init__(self, bitmap, before_extents) -> None:
        self._bitmap = bitmap
        self._before = before_extents

    def extents(self, *args):
        self._before()
        return self._bitmap.extents(*args)

    def __getattr__(self, name):
        return getattr(self._bitmap, name)


def marked_session(size: int = 16 * G, capacity: int = 16 * G, source=None, area=None):
    source = source or FlakySource(size)
    fill_random(source, random.Random(1))
    session = Session(source, G, area or SaveArea(capacity))
    dest = Destination(HookLUN(MemoryLUN(size)), "d0")
    CopyJob(session, [dest]).full()
    session.write(0, b"a" * (4 * G))
    session.mark()
    return session, dest


# -- hole: a COFW that fails leaves its chunk flagged saved ---------------------------------------


def test_a_cofw_whose_source_read_fails_aborts_the_mark_and_the_write_lands():
    session, dest = marked_session()
    generation = session.generation
    session.source.fail_reads = 1
    session.write(G, b"b" * 100)  # rule 5: the host write succeeds
    assert session.read(G, 100) == b"b" * 100
    assert session.state is State.UNMARKED
    assert session.bitmap.saved_count == 0
    assert "COFW of chunk 1 failed: [Errno 5] injected read failure" in session.stats.last_abort
    with pytest.raises(StateError, match=f"mark {generation} of session was aborted: COFW"):
        CopyJob(session, [dest]).incremental()
    assert_no_lost_change(session, dest.lun)


def test_a_save_area_that_raises_anything_aborts_the_mark():
    area = BrokenArea(16 * G)
    session, dest = marked_session(area=area)
    area.fail = True
    session.write(2 * G, b"c" * 10)
    assert session.state is State.UNMARKED
    assert "injected save area bug" in session.stats.last_abort
    assert session.bitmap.saved_count == 0
    assert_no_lost_change(session, dest.lun)


@pytest.mark.parametrize("bitmap_class", [DeltaBitmap, ReferenceBitmap])
def test_a_write_abandoned_by_its_activity_log_leaves_no_chunk_flagged_saved(bitmap_class):
    bitmap = bitmap_class(16 * G, G)
    bitmap.record_write(0, 16 * G)
    bitmap.mark()
    fail = [True]

    def log(first: int, last: int) -> None:
        if fail[0]:
            raise OSError(errno.ENOSPC, "injected log failure")

    bitmap.track_activity(4 * G, log)
    written = []
    saved = []
    with pytest.raises(OSError, match="injected log failure"):
        bitmap.write_through(lambda o, d: written.append(o), saved.append, G, b"x" * 10)
    assert written == [] and saved == []
    assert not bitmap.is_saved(1)
    fail[0] = False
    # The next write to the chunk saves it: its COFW was not skipped.
    bitmap.write_through(lambda o, d: written.append(o), saved.append, G, b"x" * 10)
    assert [c.tolist() for c in saved] == [[1]] and bitmap.is_saved(1)


@pytest.mark.parametrize("bitmap_class", [DeltaBitmap, ReferenceBitmap])
def test_a_write_whose_save_raises_leaves_no_chunk_flagged_saved(bitmap_class):
    bitmap = bitmap_class(16 * G, G)
    bitmap.record_write(0, 16 * G)
    bitmap.mark()

    def save(chunks) -> None:
        raise KeyboardInterrupt  # not even an Exception

    with pytest.raises(KeyboardInterrupt):
        bitmap.write_through(lambda o, d: None, save, G, b"x" * (2 * G))
    assert bitmap.saved_count == 0
    assert bitmap.saved_in(0, 16).tolist() == []
    bitmap._check()


def test_a_persistent_session_whose_log_fails_keeps_the_cofw(tmp_path):
    # The same hole through Session and the activity log together.
    session, dest = marked_session()
    calls = []

    def log(first: int, last: int) -> None:
        calls.append(first)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected log failure")

    session.bitmap.track_activity(16 * G, log)
    image = session.read(0, 16 * G)
    with pytest.raises(OSError):
        session.write(G, b"z" * 10)
    session.write(G, b"y" * 10)  # must save chunk 1 first
    assert session.stats.cofw_chunks == 1
    CopyJob(session, [dest]).incremental()
    assert dest.lun.read(0, 16 * G) == image


@pytest.mark.parametrize("bitmap_class", [DeltaBitmap, ReferenceBitmap])
def test_ranges_tracked_again_while_marked_flag_nothing_saved(bitmap_class):
    # What a destination that dropped out missed goes back without COFW: a
    # chunk flagged saved with nothing saved would let a later write skip it.
    bitmap = bitmap_class(16 * G, G)
    bitmap.record_write(0, 16 * G)
    bitmap.mark()
    cofw = bitmap.record_writes([0, 8 * G], [2 * G, G], cofw=False)
    assert cofw.tolist() == [] and bitmap.saved_count == 0
    assert [bitmap.tracking(c) for c in (0, 1, 2, 8, 9)] == [True, True, False, True, False]
    assert bitmap.record_write(0, 1).tolist() == [0]  # the host write still saves chunk 0


# -- hole: a mark aborted between the copy's state check and its extents() ----------------------


def test_a_mark_aborted_before_the_copy_lists_its_runs_fails_the_copy():
    # With the mark gone, extents() finds no run at all: nothing is sent, and
    # the copy must still not report the destination CONSISTENT.
    session, dest = marked_session(capacity=G // 2)
    dest.state = DestState.INCONSISTENT  # it holds a mix from an earlier failed copy
    generation = session.generation

    def abort() -> None:
        session.write(0, b"1")  # its COFW overflows the half-chunk save area

    session.bitmap = HookedBitmap(session.bitmap, abort)
    with pytest.raises(CopyError, match=f"mark {generation} of session was aborted: save area"):
        CopyJob(session, [dest]).incremental()
    session.bitmap = session.bitmap._bitmap
    assert dest.state is DestState.INCONSISTENT
    assert session.state is State.UNMARKED
    assert_no_lost_change(session, dest.lun)


def test_a_copy_whose_mark_ends_after_its_last_run_does_not_succeed():
    session, dest = marked_session()
    generation = session.generation
    job = CopyJob(session, [dest], flush_every=1 << 30)

    def unmark_at_the_end(done: int, total: int) -> None:
        if done == total:
            session.unmark()

    job.progress = unmark_at_the_end
    with pytest.raises(CopyError, match=f"mark {generation} of session was ended by an unmark"):
        job.incremental()
    assert dest.state is DestState.INCONSISTENT


# -- hole: a late save after its chunk was sent -------------------------------------------------


class ParkedSession(Session):
    """A session whose next COFW parks at ``save_gate`` before it saves anything."""

    save_gate: Gate | None = None

    def _save(self, chunks) -> None:
        if self.save_gate is not None:
            gate, self.save_gate = self.save_gate, None
            gate()
        super()._save(chunks)


def test_a_save_that_lands_after_its_chunk_was_sent_stores_nothing():
    size = 16 * G
    source = MemoryLUN(size)
    fill_random(source, random.Random(1))
    session = ParkedSession(source, G, SaveArea(size))
    dest = Destination(HookLUN(MemoryLUN(size)), "d0")
    CopyJob(session, [dest]).full()
    session.write(0, b"a" * (4 * G))
    session.mark()
    image = source.read(0, size)
    # Park the host write's COFW after the core flagged chunk 0, before its save.
    gate = session.save_gate = Gate()
    writer = Worker(lambda: session.write(0, b"w" * 10))
    gate.wait_reached()
    parked = Gate()
    job = CopyJob(session, [dest], io_size=4 * G, progress=lambda done, total: parked())
    copy = Worker(job.incremental)
    parked.wait_reached()  # run 0 (chunks 0-3) is sent and confirmed
    assert not session.bitmap.transfer(0)
    gate.open()
    writer.finish()
    assert session.save_area.saved_chunks == 0
    assert session.save_area.used == 0
    parked.open()
    copy.finish()
    assert dest.state is DestState.CONSISTENT
    assert dest.lun.read(0, size) == image


# -- any exception out of a copy unmarks --------------------------------------------------------


def test_any_exception_out_of_a_copy_unmarks_and_the_next_update_runs():
    session, dest = marked_session()

    def bug() -> None:
        raise MemoryError("injected: no memory for the extent list")

    session.bitmap = HookedBitmap(session.bitmap, bug)
    with pytest.raises(CopyError, match="no memory"):
        CopyJob(session, [dest]).incremental()
    session.bitmap = session.bitmap._bitmap
    assert session.state is State.UNMARKED
    assert_no_lost_change(session, dest.lun)

    def bad_progress(done: int, total: int) -> None:
        raise ZeroDivisionError("injected bug in a progress hook")

    from isc.remote import LocalSite

    update = PeriodicUpdate(session, [dest], LocalSite(), progress=bad_progress)
    with pytest.raises(UpdateError, match="injected bug"):
        update.run()
    assert session.state is State.UNMARKED
    update.copy_options = {}
    update.run()
    assert dest.state is DestState.CONSISTENT
    assert dest.lun.read(0, session.source.size) == session.read(0, session.source.size)


# -- stress: writers, aborts, failing destinations, cancels -------------------------------------


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_stress_every_destination_reported_consistent_holds_its_point_in_time(
    busy_switching, tmp_path, kind
):
    # A file source's COFW saves run in the core (FileSave), a memory one's in Python.
    size = 48 * G + 512
    rng = random.Random(11)
    source = MemoryLUN(size) if kind == "memory" else FileLUN.create(tmp_path / "s.img", size)
    fill_random(source, rng)
    session = Session(source, G, SaveArea(6 * G))
    dests = [Destination(HookLUN(MemoryLUN(size)), f"d{i}") for i in range(3)]
    CopyJob(session, dests).full()
    images = {d.name: source.read(0, size) for d in dests}

    def write(writer: int, seq: int, wrng: random.Random) -> None:
        length = wrng.randrange(1, 3 * G)
        offset = wrng.randrange(0, size - length + 1)
        session.write(offset, wrng.randbytes(length))

    counts = {"ok": 0, "failed": 0, "dropped": 0}
    with Writers(write, 2, seed=12) as writers:
        for round_ in range(150):
            writers.allow(8)
            writers.pause()
            image = source.read(0, size)
            full = round_ % 10 == 9
            job = CopyJob(session, dests, io_size=2 * G, flush_every=4 * G)
            if not full:
                session.mark()
            for dest in dests:
                dest.lun.fail_at = None
                if rng.random() < 0.2:
                    dest.lun.fail_at = dest.lun.writes + rng.randrange(1, 8)
            cancel_at = rng.randrange(1, 6) * 2 * G if rng.random() < 0.15 else None

            def progress(done: int, total: int, job=job, cancel_at=cancel_at) -> None:
                # A full copy marks as it starts: the writers race it from its first run.
                writers.resume()
                if cancel_at is not None and done >= cancel_at:
                    job.cancel()

            job.progress = progress
            if not full:
                writers.resume()
            try:
                result = job.full() if full else job.incremental()
            except CopyError as exc:
                result = exc.result
                counts["failed"] += 1
            except StateError as exc:  # the mark was aborted before the copy began
                assert "was aborted: save area full" in str(exc)
                result = CopyResult("incremental")
                counts["failed"] += 1
            else:
                counts["ok"] += 1
            writers.pause()
            assert job.replaced == {}  # rule 12 never mistakes a failed copy for a replacement
            for dest in dests:
                ok = result.outcomes.get(dest.name) == "ok"
                counts["dropped"] += not ok
                if dest.state is DestState.CONSISTENT:
                    if ok:
                        images[dest.name] = image
                    assert dest.lun.read(0, size) == images[dest.name], (round_, dest.name)
                assert_no_lost_change(session, dest.lun)
            assert session.state is State.UNMARKED
            assert session.save_area.used == 0
            session.bitmap._check()
            writers.resume()
        writers.settle()
    assert counts["ok"] and counts["failed"] and counts["dropped"], counts
    assert session.stats.aborts, "the small save area never overflowed"
    for dest in dests:
        dest.lun.fail_at = None
    session.mark()
    CopyJob(session, dests).incremental()
    for dest in dests:
        assert dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, size) == source.read(0, size)
    if kind == "file":
        assert session._file_save.chunks, "no COFW save ran in the core"
        source.close()


# -- durability: a checkpoint follows a flush of what it records as sent ---------------------------


class VolatileLUN:
    """A destination that keeps acknowledged writes in a cache until ``flush``;
    ``power_cut()`` loses what was not flushed."""

    def __init__(self, lun) -> None:
        self.lun = lun
        self.size = lun.size
        self.closed = False
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def write(self, offset: int, data) -> None:
        with self._lock:
            self._cache[offset] = bytes(data)

    def readinto(self, offset: int, buffer) -> None:
        view = memoryview(buffer).cast("B")
        self.lun.readinto(offset, view)
        with self._lock:
            for at, data in self._cache.items():
                lo, hi = max(at, offset), min(at + len(data), offset + len(view))
                if lo < hi:
                    view[lo - offset : hi - offset] = data[lo - at : hi - at]

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(offset, buffer)
        return bytes(buffer)

    def flush(self) -> None:
        with self._lock:
            cache, self._cache = self._cache, {}
        for at, data in sorted(cache.items()):
            self.lun.write(at, data)
        self.lun.flush()

    def power_cut(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        self.closed = True
        self.lun.close()


class Crash(BaseException):
    """The process dies here (raised from a progress hook)."""


@pytest.mark.parametrize("seed", range(6))
def test_a_power_cut_at_a_destination_after_a_checkpoint_loses_no_change(tmp_path, seed):
    from isc.store import open_session

    rng = random.Random(seed)
    size = 64 * G
    state = session_directory(tmp_path, size, G, seed)
    with open_session(state, checkpoint_interval=3600)[0] as stored:
        CopyJob(stored.session, stored.destinations).full(marked=False)
        stored.save()
    stored, _ = open_session(state, checkpoint_interval=3600)
    session, (dest,) = stored.session, stored.destinations
    for _ in range(12):
        length = rng.randrange(1, 3 * G)
        session.write(rng.randrange(0, size - length), rng.randbytes(length))
    volatile = dest.lun = VolatileLUN(dest.lun)
    crash_at = rng.randrange(1, 8)
    runs = 0

    def progress(done: int, total: int) -> None:
        nonlocal runs
        runs += 1
        if runs == crash_at:
            stored.checkpoint()  # the checkpointer thread may take one at any time
            volatile.power_cut()
            raise Crash

    stored.begin_copy([dest], "incremental")
    session.mark()
    with pytest.raises(Crash):
        CopyJob(
            session, [dest], io_size=2 * G, flush_every=1 << 30, progress=progress
        ).incremental()
    stored._stop_checkpointer()
    stored._release()  # what a crash leaves: nothing more written
    reopened, recovery = open_session(state)
    with reopened:
        assert recovery.interrupted_copy
        (dest,) = reopened.destinations
        assert dest.state is not DestState.CONSISTENT
        assert_no_lost_change(reopened.session, dest.lun)


def test_a_destination_that_cannot_flush_drops_out_and_checkpoints_go_on_without_it(tmp_path):
    from isc.store import Progress, copy, open_session

    size = 64 * G
    state = session_directory(tmp_path, size, G, 3, ("good", "bad"))
    with open_session(state, checkpoint_interval=3600)[0] as stored:
        copy(stored, "full")
        good, bad = stored.destinations
        bad.lun = HookLUN(bad.lun)
        bad.lun.fail_flush = True
        stored.session.write(0, random.Random(4).randbytes(size // 2))
        stored.session.mark()
        progress = Progress(stored, every=4 * G, bar=False)
        result = copy(stored, "incremental", progress=progress, io_size=4 * G, flush_every=8 * G)
        assert result.outcomes["good"] == "ok" and result.outcomes["bad"].startswith("flush")
        assert good.state is DestState.CONSISTENT and bad.state is DestState.INCONSISTENT
        bad.lun = bad.lun.lun
    reopened, _ = open_session(state)
    with reopened:
        good, bad = reopened.destinations
        assert good.state is DestState.CONSISTENT and bad.state is DestState.INCONSISTENT
        assert good.lun.read(0, size) == reopened.session.read(0, size)
        assert_no_lost_change(reopened.session, bad.lun)
        reopened.session.mark()
        copy(reopened, "incremental")
        assert bad.lun.read(0, size) == reopened.session.read(0, size)


# -- window: a host write between the check of a full copy of a mark and its new full mark ------


@pytest.mark.parametrize("window", ["before the unmark", "between the unmark and the new mark"])
def test_a_write_in_the_window_of_a_full_copy_of_a_mark_reaches_the_destination(
    tmp_path, monkeypatch, window
):
    """``isc mark && isc copy --full``: the copy checks that nothing was written since the
    mark, then marks again in full. A host write in between is in the new mark's image:
    the destination, CONSISTENT, holds it, and nothing stays owed (rule 2)."""
    from isc import store

    state = session_directory(tmp_path, 64 * G, G, seed=5)
    with store.open_session(state)[0] as stored:
        session = stored.session
        session.mark()
        generation = session.generation
        hooked = "unmark" if window == "before the unmark" else "mark"
        original = getattr(session, hooked)

        def write_then(*args, **kwargs):
            session.write(17 * G + 100, b"w" * (2 * G))
            return original(*args, **kwargs)

        monkeypatch.setattr(session, hooked, write_then)
        result = store.copy(stored, "full")
        monkeypatch.undo()

        assert result.mode == "full" and session.generation > generation
        assert [d.state for d in stored.destinations] == [DestState.CONSISTENT]
        assert not session.bitmap.marked and session.bitmap.tracking_count == 0
        source = (tmp_path / "source.img").read_bytes()
        assert source[17 * G + 100 : 19 * G + 100] == b"w" * (2 * G)
        assert (tmp_path / "d0.img").read_bytes() == source
