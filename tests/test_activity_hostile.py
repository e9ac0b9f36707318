"""Hostile tests of the write-intent log's hot set (isc.activity, isc.store) against rule 9.

The hot set grows to the write pattern (from ``max_hot`` up to ``hot_limit``)
and is kept across checkpoints as an LRU: a checkpoint keeps the regions most
recently written and retires those unwritten for a checkpoint interval. Each
test here forces a window that opens and crashes in it: while the checkpoint
that grows the hot set runs, around a region the LRU retired and its next
write, inside a region record's append (before its sync, torn), with a
working set that moves, with the hot set at its limit, while writer threads
race the checkpoints, after checkpoints that failed, inside a recovery's
checkpoint, in random sequences of writes, checkpoints, marks, copies and
crashes, and by SIGKILL of the real ``isc serve --every`` whose hot set grows;
and a crash of the machine that takes back a host write the source never
flushed, after a copy or a pull confirmed it sent.

A crash is an image (:class:`Crashes`): the source's and the destination's
bytes, then a copy of the state directory, in that order, so a write whose
data reached the source has its region record and its write-log entry in the
image (both come before the data). A crash of the process keeps the write
logs (``activity.K.writes``); one of the machine loses them, or leaves them
with the boot id of another boot (the kernel wrote their pages back before
the crash), so the region logs stand for the writes. After each crash the
image is opened: every chunk where the destination differs from the source
must be tracked or in transfer, and one recovery update (mark, incremental
copy) must make the destination equal the source byte for byte.

Checkpoints come when the test calls them (:func:`hold_checkpoints`), except
where a test lets the full hot set start one, and the LRU's clock is the
test's (``PersistentSession._clock``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from helpers import TIMEOUT, Gate, Writers, assert_no_lost_change
from test_crash import (
    ISC,
    MAX_HOT,
    check_after_kill,
    images_newest_first,
    read_source,
    replicated,  # noqa: F401 (a fixture)
    serve_until_killed,
)
from test_store import (
    HOT_REGIONS,
    REGION,
    _record,
    crash_image,
    files,
    hot_session,
    logging_regions,
    machine_crash_image,
    opened,
)

from isc import CorruptMetadata, DestState, IscError, journal
from isc.activity import read_log
from isc.store import (
    METADATA,
    PersistentSession,
    Progress,
    Recovery,
    copy,
    open_session,
    read_state,
    write_atomically,
)

IO = 64 << 10
SIZE = HOT_REGIONS * REGION
INTERVAL = 3600.0
"""The checkpoint interval of :func:`test_store.opened`: the LRU retires a region unwritten
for this long (on the test's clock)."""
KINDS = ("process", "machine", "machine, pages written back")
"""Crashes: of the process; of the machine, its write logs lost or of another boot."""


@dataclass
class Image:
    """What a crash left: the state directory's copy and the LUNs' bytes."""

    state: Path
    luns: dict[Path, bytes]
    kind: str


class Crashes:
    """Crash images of the session in ``root`` (:func:`test_store.hot_session`'s layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images: list[Image] = []

    def take(self, state: Path, kind: str, source: bytes | None = None) -> Image:
        """A crash of ``kind`` (in :data:`KINDS`) now; ``source`` for what the source holds
        after it (default: its bytes now)."""
        luns = {self.root / name: (self.root / name).read_bytes() for name in LUNS}
        if source is not None:
            luns[self.root / "source.img"] = source
        image = (machine_crash_image if kind == "machine" else crash_image)(state)
        if kind == "machine, pages written back":
            for writes in image.glob("activity.*.writes"):
                with open(writes, "r+b") as file:
                    file.seek(16)  # the boot id, after the magic and the generation
                    file.write(b"f" * 36)
        taken = Image(image.rename(self.root / f"crash-{len(self.images)}"), luns, kind)
        self.images.append(taken)
        return taken


LUNS = ("source.img", "dest.img")


def recover(image: Image) -> tuple[PersistentSession, Recovery]:
    """Put the LUNs back as the crash left them and open its state directory."""
    for path, data in image.luns.items():
        with open(path, "r+b") as file:
            file.write(data)
    return open_session(image.state, checkpoint_interval=INTERVAL)


def update_and_compare(stored: PersistentSession) -> None:
    """One recovery update: afterwards every destination is consistent and equals the source.

    A mark left from before (one with nothing saved survives a crash) is ended first: the
    update copies the source as it is now."""
    session = stored.session
    session.unmark()
    session.mark(full=not any(d.in_step(session) for d in stored.destinations))
    copy(stored, "incremental", io_size=IO)
    source = stored.source.read(0, SIZE)
    for dest in stored.destinations:
        assert dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, SIZE) == source, f"{dest.name} differs after the update"


def check(image: Image) -> Recovery:
    """Rule 9 after the crash ``image``: no untracked difference; one update makes them equal."""
    stored, recovery = recover(image)
    with stored:
        for dest in stored.destinations:
            assert_no_lost_change(stored.session, dest.lun)
        update_and_compare(stored)
    return recovery


def hold_checkpoints(stored: PersistentSession) -> None:
    """Let no full hot set start a checkpoint: the test calls them (a close still stops the
    checkpointer)."""
    woken = stored._wake

    class Held(threading.Event):
        def set(self) -> None:
            if stored._closing.is_set():
                woken.set()
                super().set()

    stored._wake = Held()


def flushed_source(stored: PersistentSession) -> list[bytes]:
    """``[the source's bytes as of its last flush]``, kept up to date from now on: what a
    crash of the machine that lost every write since may leave."""
    durable = [stored.source.read(0, SIZE)]
    flush = stored.source.flush

    def flushed() -> None:
        flush()
        durable[0] = stored.source.read(0, SIZE)

    stored.source.flush = flushed
    return durable


def write_in(stored: PersistentSession, region: int, rng: random.Random) -> None:
    """A host write of 512 bytes at a random place in ``region``."""
    stored.session.write(region * REGION + rng.randrange(REGION - 512), rng.randbytes(512))


@contextmanager
def checkpointed(root: Path, rng: random.Random) -> Iterator[PersistentSession]:
    """:func:`test_store.hot_session` in ``root`` (4 regions hot, up to 16), open with the
    checkpoints the test's, after writes to regions 1, 2 and 3 and a checkpoint."""
    with opened(hot_session(root, max_hot=4, hot_limit=16)) as stored:
        hold_checkpoints(stored)
        for region in (1, 2, 3):
            write_in(stored, region, rng)
        stored.checkpoint()
        yield stored


def hot(stored: PersistentSession) -> set[int]:
    return set(stored.session.bitmap.hot_regions().tolist())


# -- the source's unflushed writes ---------------------------------------------------------------


def pulled(stored: PersistentSession) -> None:
    """A pull backup onto the destination, as a tool reading ``NAME@frozen`` of ``isc serve``
    makes one: each chunk of the mark read from the frozen image and stored, the store
    flushed, the chunk confirmed sent (its TRIM), then the mark ended."""
    session, dest = stored.session, stored.destinations[0].lun
    generation, g = session.mark(), session.granularity
    # Its chunks no longer hold what the last copy's samples say (isc.fingerprint): a
    # sample of one would make the next copy take the destination for replaced.
    stored.destinations[0].samples = []
    stored.save()
    for chunk in [c for c in range(session.bitmap.chunks) if session.bitmap.transfer(c)]:
        dest.write(chunk * g, session.read_frozen(chunk * g, g))
        dest.flush()
        session.confirm_sent(chunk, 1, generation)
    session.unmark()


@pytest.mark.parametrize("sent", ["by a copy", "by a pull"])
@pytest.mark.parametrize("retired", ["unwritten for an interval", "by newer regions"])
def test_a_machine_crash_that_loses_unflushed_source_writes_leaves_no_sent_chunk_untracked(
    tmp_path: Path, sent: str, retired: str
) -> None:
    """The host writes without a flush; a copy (or a pull through the frozen image, which
    no ``begin_copy`` records) reads the write from the page cache, sends it and the
    destination is flushed; a checkpoint an interval later retires the region (or newer
    regions push it out of the hot set) and makes the chunk's clear durable. A crash of
    the machine then loses the write on the source unless that checkpoint flushed it
    first: the destination would hold data the source does not, in a chunk neither
    tracked nor in a region log."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=4)
    crashes = Crashes(tmp_path)
    now = [0.0]
    with opened(state) as stored:
        hold_checkpoints(stored)
        stored._clock = lambda: now[0]
        durable = flushed_source(stored)
        stored.session.write(3 * REGION + 100, b"unflushed" * 60)
        stored.checkpoint()  # region 3 stays hot: written since the last one
        if sent == "by a copy":
            stored.session.mark()
            copy(stored, "incremental", io_size=IO)  # sent, the destination flushed
        else:
            pulled(stored)
        if retired == "by newer regions":  # the hot set keeps 2 regions: 1 and 2 are newer
            now[0] = 1.0
            stored.session.write(REGION, b"a")
            stored.session.write(2 * REGION, b"b")
        else:
            now[0] = 2 * INTERVAL
        stored.checkpoint()  # region 3 retired
        assert 3 not in hot(stored)
        image = crashes.take(state, "machine", source=durable[0])
    check(image)


# -- inside the checkpoints that grow the hot set and retire regions ------------------------------


def crash_in_checkpoints(stored: PersistentSession, state: Path, crashes: Crashes):
    """Crash (of each kind in turn) at three points of every checkpoint from now on, after
    host writes made in each window: once the next log holds the kept regions (before the
    snapshot), before the journal write and after it (before the older logs go). The
    writes go to a region kept, one this checkpoint retires (or retired) and a cold one.
    Returns the regions each checkpoint kept."""
    rng = random.Random("windows")
    kept: list[list[int]] = []
    retired: set[int] = set()
    log, journal = stored._log, stored._journal

    def window(candidates) -> None:
        cold = sorted(set(range(HOT_REGIONS)) - hot(stored))
        for group in (*candidates, cold):
            if len(group):
                write_in(stored, rng.choice(sorted(group)), rng)
        crashes.take(state, KINDS[len(crashes.images) % len(KINDS)])

    def prepare(keep):
        fresh = prepare_log(keep)
        kept.append(list(keep))
        retired.clear()
        retired.update(hot(stored) - set(keep))
        window((keep, retired))  # before the snapshot: in it
        return fresh

    def write_journal(*args):
        window((kept[-1], retired))  # after the snapshot: in the next generation only
        write(*args)
        window((kept[-1], retired))

    prepare_log, write = log.prepare, journal.write
    log.prepare, journal.write = prepare, write_journal
    return kept


def test_crashes_in_checkpoints_that_grow_the_hot_set_and_retire_regions_lose_nothing(
    tmp_path: Path,
) -> None:
    """Random writes over a working set that moves at each checkpoint, while the hot set
    doubles from 4 to 32 and the LRU's clock runs: each checkpoint keeps some
    regions and retires others, and a crash at each of its steps, after writes to regions
    of every kind, loses nothing."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=32)
    crashes = Crashes(tmp_path)
    rng = random.Random("moving")
    now = [0.0]
    with opened(state) as stored:
        hold_checkpoints(stored)
        stored._clock = lambda: now[0]
        kept = crash_in_checkpoints(stored, state, crashes)
        for working in (range(0, 12), range(8, 30, 2), range(6, 40, 3), range(40, 64, 2)):
            order = list(working) * 4
            rng.shuffle(order)
            for region in order:
                write_in(stored, region, rng)
            stored.checkpoint()
            now[0] += INTERVAL / 2  # a region unwritten for two rounds retires
        assert stored.hot_capacity == 32, "the hot set did not grow to its limit"
        assert any(len(keep) > 2 for keep in kept), "no checkpoint kept more than max_hot / 2"
    assert len(crashes.images) == 3 * len(kept)
    for image in crashes.images:
        recovery = check(image)
        assert recovery.crashed


# -- a region the LRU retired, and its next write ---------------------------------------------

RECORD = 20
"""Bytes of a region record (:mod:`isc.activity`)."""
CUT = {"whole, not synced": 0, "torn": 7, "not written": RECORD}
"""How much of the record appended last a crash of the machine before its sync leaves out."""


def copied(stored: PersistentSession) -> None:
    """A marked incremental copy: the destination equals the source, nothing is tracked."""
    stored.session.mark()
    copy(stored, "incremental", io_size=IO)
    assert not stored.session.bitmap.tracking_count


@pytest.mark.parametrize("record", list(CUT))
def test_crashes_around_the_next_write_to_a_region_the_lru_retired_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str
) -> None:
    """Region 5 is written and copied, then left unwritten for an interval: the checkpoint
    retires it. A crash of the machine before its next write, inside the append of that
    write's record (the record whole but not synced, torn, or not written: the write has
    not gone yet) and after it loses nothing; after it the region is resent."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=4)
    crashes = Crashes(tmp_path)
    rng = random.Random(record)
    now = [0.0]
    with opened(state) as stored:
        hold_checkpoints(stored)
        stored._clock = lambda: now[0]
        write_in(stored, 5, rng)
        stored.checkpoint()
        copied(stored)
        stored.checkpoint()  # written within the interval: still hot
        assert 5 in hot(stored)
        now[0] = 2 * INTERVAL
        stored.checkpoint()
        assert 5 not in hot(stored)
        crashes.take(state, "machine")
        logged = logging_regions(stored)
        region_log = stored._log._current.fd
        sync = os.fdatasync

        def crash_before_sync(fd: int) -> None:
            if fd == region_log and len(crashes.images) == 1:
                image = crashes.take(state, "machine")
                (path,) = image.state.glob(f"activity.{stored._log.generation}.log")
                os.truncate(path, path.stat().st_size - CUT[record])
            sync(fd)

        monkeypatch.setattr(os, "fdatasync", crash_before_sync)
        write_in(stored, 5, rng)
        monkeypatch.undo()
        assert logged == [5]
        crashes.take(state, "machine")
    before, in_append, after = (check(image) for image in crashes.images)
    assert before.regions_resent == 0
    assert in_append.regions_resent == (record == "whole, not synced")
    assert after.regions_resent == 1 and after.bytes_resent_bound == REGION


# -- damaged and foreign logs ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["the current log", "a log the crash cut short", "an older log"])
def test_a_record_of_a_region_beyond_the_volume(tmp_path: Path, where: str) -> None:
    """A record of a region past the end of the source in a log since the newest checkpoint
    (the current one, or the next one a checkpoint the crash cut short prepared with the
    regions it kept) refuses the open, naming the file and changing nothing: the log
    cannot say what it covers. In a log older than the checkpoint (its deletion did not
    reach the disk) it is not read."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=16)
    crashes = Crashes(tmp_path)
    rng = random.Random(where)
    with opened(state) as stored:
        hold_checkpoints(stored)
        for region in (1, 2, 3, 9):
            write_in(stored, region, rng)
        if where == "a log the crash cut short":
            write = stored._journal.write
            stored._journal.write = lambda *args: (
                crashes.images or crashes.take(state, "machine"),
                write(*args),
            )
        stored.checkpoint()
        if where != "a log the crash cut short":
            crashes.take(state, "machine")
        generation = stored._log.generation
    (image,) = crashes.images
    name = f"activity.{generation - (where == 'an older log')}.log"
    with open(image.state / name, "ab") as log:
        log.write(_record(2, HOT_REGIONS))
    if where == "an older log":
        check(image)
        return
    assert_refused(image, f"{name}: region {HOT_REGIONS} lies outside")


def assert_refused(image: Image, match: str) -> None:
    """The open of ``image`` raises ``CorruptMetadata`` matching ``match``, changing nothing."""
    before = files(image.state)
    with pytest.raises(CorruptMetadata, match=match):
        recover(image)
    after = files(image.state)
    after.pop(".lock")  # the open's attempt
    assert after == before


def test_write_logs_of_another_boot_stand_for_nothing(tmp_path: Path) -> None:
    """Write logs whose pages reached the disk before a crash of the machine hold another
    boot's id: the regions stand for the writes, whole, in every generation since the
    newest checkpoint (here two: the crash cut the checkpoint short)."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=16)
    crashes = Crashes(tmp_path)
    rng = random.Random("boot")
    with opened(state) as stored:
        hold_checkpoints(stored)
        for region in (1, 2):
            write_in(stored, region, rng)
        stored.checkpoint()
        write_in(stored, 2, rng)
        write_in(stored, 7, rng)
        write = stored._journal.write

        def crash_then_write(*args) -> None:
            if not crashes.images:
                write_in(stored, 8, rng)  # after the snapshot: the next generation's
                crashes.take(state, "machine, pages written back")
            write(*args)

        stored._journal.write = crash_then_write
        stored.checkpoint()
    (image,) = crashes.images
    assert len(list(image.state.glob("activity.*.writes"))) == 2
    recovery = check(image)
    # The older generation logged 1 and 2 (kept) and 7; the newer 1, 2 and 7 (kept: the
    # capacity doubled to 8) and 8. Each resends its regions whole.
    assert recovery.regions_resent == 4
    assert recovery.bytes_resent_bound == 7 * REGION


def crashed_pair(root: Path) -> tuple[Image, Image, int]:
    """Crash images (of the process) of two sessions of one layout in ``root``/a and /b at
    the same generation: a wrote regions 10 and 11, b region 40, since their last
    checkpoint. Returns both and that generation."""
    images, generations = [], []
    for name, regions in (("a", (10, 11)), ("b", (40,))):
        (root / name).mkdir()
        crashes, rng = Crashes(root / name), random.Random(name)
        with checkpointed(root / name, rng) as stored:
            for region in regions:
                write_in(stored, region, rng)
            generations.append(stored._log.generation)
            images.append(crashes.take(root / name / "hot", "process"))
    assert generations[0] == generations[1]
    return images[0], images[1], generations[0]


def test_a_region_log_of_another_session_refuses_the_open_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Another session's logs of the same generation put in place of this one's would
    replay its regions for this one's: those this one wrote would not be resent."""
    mine, other, generation = crashed_pair(tmp_path)
    for suffix in ("log", "writes"):
        name = f"activity.{generation}.{suffix}"
        (mine.state / name).write_bytes((other.state / name).read_bytes())
    assert "log holds the activity of session" in (read_state(mine.state).damage or "")
    assert_refused(mine, rf"activity\.{generation}\.log holds the activity of session ")


def test_a_write_log_of_another_session_stands_for_nothing(tmp_path: Path) -> None:
    """Another session's write log beside this one's region log: the regions stand for
    the writes, whole (more is resent, nothing lost)."""
    mine, other, generation = crashed_pair(tmp_path)
    name = f"activity.{generation}.writes"
    (mine.state / name).write_bytes((other.state / name).read_bytes())
    recovery = check(mine)
    assert recovery.bytes_resent_bound >= 2 * REGION


def test_logs_written_before_they_named_their_session_are_read(tmp_path: Path) -> None:
    """A region log without the header that names its session, and a write log whose
    session field is zero (as isc wrote them before), are this session's."""
    mine, _, generation = crashed_pair(tmp_path)
    log, writes = (mine.state / f"activity.{generation}.{s}" for s in ("log", "writes"))
    records = read_log(log)
    log.write_bytes(b"".join(_record(first, last) for first, last in records))
    with open(writes, "r+b") as file:
        file.seek(56)  # the session, after the magic, the generation and the boot id
        file.write(bytes(8))
    assert read_log(log) == records
    recovery = check(mine)
    assert recovery.regions_resent == len({r for f, la in records for r in range(f, la + 1)})
    assert recovery.bytes_resent_bound < 2 * REGION  # the write log's chunks, not regions


# -- the hot set at its limit ------------------------------------------------------------------


def test_new_regions_written_while_a_full_hot_set_at_its_limit_checkpoints_lose_nothing(
    tmp_path: Path,
) -> None:
    """A hot set of 4, its limit: the writes that fill it wake the checkpointer, whose
    checkpoint runs beside the host's writes. Parked once the next log holds the regions
    it keeps, the host writes to hot regions and to new ones, past the limit (they are
    logged in the generation that ends); a crash then, and one after the journal write,
    lose nothing; the checkpoint kept at most half the limit."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=4)
    crashes = Crashes(tmp_path)
    rng = random.Random("limit")
    parked, journaled = Gate(), threading.Event()
    with opened(state) as stored:
        prepare, write = stored._log.prepare, stored._journal.write
        kept: list[list[int]] = []

        def parked_prepare(keep):
            fresh = prepare(keep)
            kept.append(list(keep))
            parked()  # the first checkpoint waits here until the test lets it go
            return fresh

        def journal_write(*args) -> None:
            write(*args)
            journaled.set()

        stored._log.prepare, stored._journal.write = parked_prepare, journal_write
        logged = logging_regions(stored)
        for region in (1, 2, 3, 4, 5):  # 4 fills it; 5 wakes again if a wake came too early
            write_in(stored, region, rng)
        parked.wait_reached()
        for region in (6, 1, 7, 3):
            write_in(stored, region, rng)
        assert len(hot(stored)) == 7 and logged == [1, 2, 3, 4, 5, 6, 7]
        crashes.take(state, "machine")  # the checkpoint holds its lock: the files stay
        parked.open()
        assert journaled.wait(TIMEOUT), "the checkpoint did not reach its journal write"
        for region in (8, 7, 2):
            write_in(stored, region, rng)
        with stored._checkpoint_lock:
            crashes.take(state, "machine, pages written back")
            crashes.take(state, "process")
        assert stored.hot_capacity == 4 and len(kept[0]) <= 2
    for image in crashes.images:
        check(image)


def test_crashes_while_writers_race_the_checkpoints_of_a_growing_hot_set_lose_nothing(
    tmp_path: Path, busy_switching: None
) -> None:
    """Three host writers, one over 8 regions and two over all 64, race the checkpoints
    their full hot set starts (it grows from 4 to 32) and those the test calls; crashes
    of every kind come while they write, between a checkpoint's steps or a record's
    append and its sync, wherever they land (the image is taken under the checkpoint
    lock, so no checkpoint deletes a file while it is copied)."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=32)
    crashes = Crashes(tmp_path)
    rng = random.Random("race")
    stored, _ = open_session(state, checkpoint_interval=INTERVAL)
    with stored:

        def write(writer: int, seq: int, mine: random.Random) -> None:
            write_in(stored, mine.randrange(8 if writer == 0 else HOT_REGIONS), mine)

        with Writers(write, 3, seed=21) as writers:
            for n in range(9):
                writers.allow(rng.randrange(20, 60))
                if n % 3 == 2:
                    stored.checkpoint()
                with stored._checkpoint_lock:
                    crashes.take(state, KINDS[n % len(KINDS)])
            writers.settle()
        assert stored.hot_capacity > 4, "the hot set never grew"
    for image in crashes.images:
        check(image)


def test_the_write_that_fills_the_hot_set_starts_a_checkpoint(tmp_path: Path) -> None:
    """The write whose region fills the hot set wakes the checkpointer from inside its
    record's callback, before the core marks the region hot. The checkpointer must not
    take that wake for a stale one (a wake for a hot set another checkpoint emptied):
    here it looks while the waking write is held right after its wake (else no checkpoint
    would come until the next new region or the interval, an hour here)."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=4)
    with opened(state) as stored:
        looked = threading.Event()
        """The checkpointer began a checkpoint, or went back to waiting."""
        started: list[list[int]] = []
        prepare, woken = stored._log.prepare, stored._wake

        def prepared(keep):
            started.append(keep)
            looked.set()
            return prepare(keep)

        class Watched(threading.Event):
            """The wake, whose writer waits until the checkpointer acted on it."""

            def wait(self, timeout=None) -> bool:
                looked.set()
                return super().wait(timeout)

            def set(self) -> None:
                if stored._closing.is_set():
                    woken.set()
                    super().set()
                    return
                looked.clear()
                super().set()
                assert looked.wait(TIMEOUT), "the checkpointer never looked"

        stored._log.prepare, stored._wake = prepared, Watched()
        woken.set()  # out of its wait on the old wake: it waits on the watched one next
        assert looked.wait(TIMEOUT)
        for region in (1, 2, 3, 4):
            stored.session.write(region * REGION, b"x")
        assert stored.session.bitmap.hot_count == 4
        assert started, "the full hot set started no checkpoint"


# -- failed checkpoints, and a crash while recovering from one ------------------------------------


def test_crashes_after_checkpoints_that_failed_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose journal write fails (the next log began: both logs stay) and one
    whose next log cannot be written (nothing changes but the LRU's memory of what it
    would have kept), each followed by writes to kept, retired and new regions and a
    crash of the machine; then one that succeeds, and a last crash."""
    state, crashes, rng = tmp_path / "hot", Crashes(tmp_path), random.Random("failed")
    with checkpointed(tmp_path, rng) as stored:
        for region in (4, 5, 1):
            write_in(stored, region, rng)

        def full(*args) -> None:
            raise OSError(28, "injected: no space left on the device")

        for failing, step, regions in (
            (stored._journal, "write", (2, 4, 6)),
            (stored._log, "prepare", (3, 5, 7)),
        ):
            with monkeypatch.context() as patch:
                patch.setattr(failing, step, full)
                with pytest.raises(OSError, match="injected"):
                    stored.checkpoint()
            for region in regions:
                write_in(stored, region, rng)
            crashes.take(state, "machine")
        stored.checkpoint()
        for region in (1, 8):
            write_in(stored, region, rng)
        crashes.take(state, "machine")
    for image in crashes.images:
        check(image)


def _open_files() -> tuple[int, str]:
    """How many descriptors this process has open, and what it maps."""
    return len(os.listdir("/proc/self/fd")), Path("/proc/self/maps").read_text()


FAILS_AFTER_PREPARE = {
    "snapshot": lambda stored, patch, fail: patch.setattr(
        journal.Journal, "wants_base", property(fail)
    ),
    "retire_hot": lambda stored, patch, fail: patch.setattr(
        stored,
        "_keep_hot",
        lambda: [HOT_REGIONS + 1],  # the core refuses it
    ),
    "the switch of logs": lambda stored, patch, fail: patch.setattr(
        type(stored._log), "rotate", fail
    ),
}
"""Ways a checkpoint fails between preparing the next generation's logs and going on in it."""


@pytest.mark.parametrize("step", list(FAILS_AFTER_PREPARE))
def test_a_checkpoint_that_fails_before_the_switch_of_logs_leaks_nothing_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A checkpoint that fails after preparing the next generation's logs and before going
    on in them closes them (no descriptor or mapping left) and leaves the generation in
    force as it was (the spare generation it took is gone); writes go on into it, a
    later checkpoint works, and a crash of the machine after it loses nothing."""
    state, crashes, rng = tmp_path / "hot", Crashes(tmp_path), random.Random(step)
    with checkpointed(tmp_path, rng) as stored:
        generation, (fds, _) = stored._log.generation, _open_files()
        write_in(stored, 4, rng)

        def fail(*args) -> None:
            raise OSError(5, "injected: input/output error")

        with monkeypatch.context() as patch:
            FAILS_AFTER_PREPARE[step](stored, patch, fail)
            with pytest.raises((OSError, IscError), match=r"injected|outside"):
                stored.checkpoint()
        now, maps = _open_files()
        assert now <= fds and f"activity.{generation + 1}." not in maps
        assert sorted(p.name for p in state.glob("activity.*")) == [
            f"activity.{generation}.log",
            f"activity.{generation}.writes",
        ]
        assert stored._log.generation == generation
        for region in (4, 5, 1):
            write_in(stored, region, rng)
        crashes.take(state, "machine")
        stored.checkpoint()
        assert stored._log.generation == generation + 1
        for region in (6, 2):
            write_in(stored, region, rng)
        crashes.take(state, "machine")
    for image in crashes.images:
        assert check(image).crashed


SPARE = ("activity-spare.log", "activity-spare.writes")


def test_checkpoints_reuse_the_spare_files_and_a_crash_leaves_the_spare_unread(
    tmp_path: Path,
) -> None:
    """From the second checkpoint on, the next generation's files are the spare's (those of
    a generation an earlier checkpoint made obsolete, kept open): the same inodes, the
    region log cut to the records of the regions kept hot. A crash of either kind leaves
    the spare's files unread, whatever they hold (here a record of a region beyond the
    volume, which in a log would refuse the open): the first checkpoint of the recovery
    deletes them, and nothing is lost."""
    state, crashes, rng = tmp_path / "hot", Crashes(tmp_path), random.Random("spare")
    with checkpointed(tmp_path, rng) as stored:
        spare = [(state / name).stat().st_ino for name in SPARE]
        write_in(stored, 9, rng)
        stored.checkpoint()
        current = [f"activity.{stored._log.generation}.{suffix}" for suffix in ("log", "writes")]
        assert [(state / name).stat().st_ino for name in current] == spare
        kept = list(stored._used[0])
        assert {
            r for first, last in read_log(state / current[0]) for r in range(first, last + 1)
        } == set(kept)
        for region in (9, 4, 1):
            write_in(stored, region, rng)
        for kind in ("process", "machine"):
            crashes.take(state, kind)
    for image in crashes.images:
        with open(image.state / SPARE[0], "ab") as log:
            log.write(_record(2, HOT_REGIONS))
        poisoned = (image.state / SPARE[0]).read_bytes()
        stored, recovery = recover(image)
        with stored:
            assert recovery.crashed
            assert (image.state / SPARE[0]).read_bytes() != poisoned
            for dest in stored.destinations:
                assert_no_lost_change(stored.session, dest.lun)
            update_and_compare(stored)


def test_a_crash_inside_the_checkpoint_of_a_recovery_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovery tracks what the logs hold, then checkpoints it: a second crash of the
    machine before or after that checkpoint's journal write (its older logs still there)
    loses nothing."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=16)
    crashes = Crashes(tmp_path)
    rng = random.Random("recovery")
    with opened(state) as stored:
        hold_checkpoints(stored)
        for region in (1, 2, 3, 9):
            write_in(stored, region, rng)
        stored.checkpoint()
        for region in (2, 10, 11):
            write_in(stored, region, rng)
        (first,) = [crashes.take(state, "machine")]
    write = journal.Journal.write

    def crash_around(self, *args) -> None:
        crashes.take(first.state, "machine")
        write(self, *args)
        crashes.take(first.state, "machine")

    with monkeypatch.context() as patch:
        patch.setattr(journal.Journal, "write", crash_around)
        stored, _ = recover(first)
        stored.close()
    assert len(crashes.images) == 5  # around the recovery's checkpoint and the close's
    recoveries = [check(image) for image in crashes.images[1:]]
    assert recoveries[0].regions_resent > 0  # before the recovery's checkpoint: the logs again


# -- random sequences ----------------------------------------------------------------------------

OPS = ("write", "checkpoint", "tick", "mark", "copy", "unmark", "crash")
WEIGHTS = (70, 8, 5, 4, 5, 2, 4)


class Sequence:
    """A session driven by a seeded random sequence of :data:`OPS`, on the test's clock.

    ``copied`` is the source as of the mark of the last copy that ended: what a
    destination that reads consistent holds.
    """

    def __init__(self, state: Path, crashes: Crashes, rng: random.Random) -> None:
        self.crashes = crashes
        self.rng = rng
        self.now = [0.0]
        self.base = 0
        self.at_mark: bytes | None = None
        self.copied = (crashes.root / "dest.img").read_bytes()
        self.grown = 0
        """The largest capacity the hot set reached."""
        self.in_copies = 0
        """Crashes inside a copy."""
        self.stored = self._open(open_session(state, checkpoint_interval=INTERVAL)[0])

    def _open(self, stored: PersistentSession) -> PersistentSession:
        hold_checkpoints(stored)
        stored._clock = lambda: self.now[0]
        return stored

    def step(self, op: str) -> None:
        stored, rng = self.stored, self.rng
        session = stored.session
        if op == "write":  # within a working set of 8 regions that moves; some span two
            region = (self.base + rng.randrange(8)) % HOT_REGIONS
            offset = min(region * REGION + REGION - rng.randrange(1, REGION), SIZE - 6000)
            session.write(offset, rng.randbytes(rng.choice((512, 4096, 6000))))
        elif op == "checkpoint":
            stored.checkpoint()
            self.grown = max(self.grown, stored.hot_capacity)
            self.base += rng.randrange(4)
        elif op == "tick":
            self.now[0] += rng.choice((10.0, INTERVAL / 2, 2 * INTERVAL))
        elif op == "mark" and not session.bitmap.marked:
            self._mark()
        elif op == "copy":
            if not session.bitmap.marked:
                self._mark()
            self._copy()
        elif op == "unmark":
            session.unmark()
        elif op == "crash":
            self._crash(None)

    def _mark(self) -> None:
        session = self.stored.session
        session.mark(full=not any(d.in_step(session) for d in self.stored.destinations))
        self.at_mark = self.stored.source.read(0, SIZE)

    def _copy(self) -> None:
        """A marked incremental copy; now and then a crash at one of its runs."""
        runs = [0]
        crash_at = self.rng.randrange(1, 3) if self.rng.random() < 0.5 else None
        images = self.crashes.images

        def also(done: int, total: int) -> None:
            runs[0] += 1
            if runs[0] == crash_at:
                self.crashes.take(self.stored.directory, self.rng.choice(KINDS))

        before = len(images)
        copy(self.stored, "incremental", io_size=IO, progress=Progress(self.stored, also=also))
        if len(images) > before:
            self.in_copies += 1
            self._crash(images[-1])
            return
        (dest,) = self.stored.destinations
        assert dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, SIZE) == self.at_mark, "the copy holds no point in time"
        self.copied = self.at_mark

    def _crash(self, image: Image | None) -> None:
        """Crash now (or go on from ``image``, a crash already taken) and recover."""
        if image is None:
            image = self.crashes.take(self.stored.directory, self.rng.choice(KINDS))
        self.stored.close()
        stored, _ = recover(image)
        self.stored = self._open(stored)
        (dest,) = stored.destinations
        assert_no_lost_change(stored.session, dest.lun)
        if dest.state is DestState.CONSISTENT:
            assert dest.lun.read(0, SIZE) == self.copied, "consistent, but no point in time"
        if self.rng.random() < 0.5:
            update_and_compare(stored)
            self.copied = stored.source.read(0, SIZE)

    def close(self) -> None:
        update_and_compare(self.stored)
        self.stored.close()


@pytest.mark.parametrize("seed", range(2))
def test_random_writes_checkpoints_marks_copies_and_crashes_lose_nothing(
    tmp_path: Path, seed: int
) -> None:
    """Seeded random sequences of writes over a moving working set (some spanning two
    regions), checkpoints, clock ticks past the LRU's interval, marks, unmarks, copies and
    crashes of every kind (some inside a copy), on a hot set that grows from 4 to 16: after
    each crash every difference is tracked, a destination that reads consistent holds the
    point in time of its last copy, and an update makes it equal the source."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=16)
    crashes = Crashes(tmp_path)
    rng = random.Random(f"sequence-{seed}")
    sequence = Sequence(state, crashes, rng)
    try:
        for op in rng.choices(OPS, WEIGHTS, k=150):
            sequence.step(op)
    finally:
        sequence.close()
    assert len(crashes.images) >= 6 and sequence.in_copies and sequence.grown > 4


# -- the real command: isc serve --every, killed while its hot set grows ---------------------------

SERVE_KILLS = 3


def test_sigkill_of_isc_serve_every_while_its_hot_set_grows_loses_nothing(
    replicated: tuple[Path, object],  # noqa: F811 (test_crash's fixture)
    tmp_path: Path,
) -> None:
    """``test_crash``'s loop of ``isc serve --every`` killed by its host writer, with a hot
    set that may grow to every region of the source (random writes over all 64 keep
    waiting for records, so it doubles from 4): after each kill, and every other time a
    crash of the machine at that instant (the write logs lost), no destination has an
    untracked difference and one that reads consistent holds a point-in-time image."""
    state, export = replicated
    meta = json.loads((state / METADATA).read_text())
    write_atomically(state / METADATA, json.dumps({**meta, "hot_limit": 64}).encode())
    rng = random.Random("hostile-serve")
    serve = [*ISC, "serve", str(state), "--listen", "127.0.0.1:0", "--every", "0.02"]
    pending = []
    with open(tmp_path / "isc.log", "ab") as log:
        for kill in range(SERVE_KILLS):
            start = read_source(state)
            export.lun.arm(0)  # the host writer kills it, after enough writes to grow
            code, writes = serve_until_killed(serve, export, log, rng, rng.randrange(120, 300))
            assert code == -signal.SIGKILL, (tmp_path / "isc.log").read_text()
            if kill % 2:
                for path in state.glob("activity.*.writes"):
                    path.unlink()
            pending.append(read_state(state).pending_regions)
            check_after_kill(state, partial(images_newest_first, start, writes))
            stored, _ = open_session(state)
            with stored:  # both consistent again: the next run starts from the source
                update_and_compare(stored)
    print(f"\nisc serve --every, hot set up to 64: regions pending at the kills {pending}")
    assert max(pending) > 2 * MAX_HOT, "the hot set never outgrew its first capacity"
