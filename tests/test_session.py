"""The session: the host write path, mark/unmark, COFW and the save area.

Rules checked here (docs/design.md): 3 (copy on first write only), 4 (atomic
mark, with writer threads that never pause), 5 (bounded save area: running out
aborts the mark, never the host write) and 10 (bad input changes nothing),
plus ``read_frozen``, the point-in-time view a copy reads.
"""

from __future__ import annotations

import itertools
import random
import threading

import numpy as np
import pytest
from helpers import (
    TIMEOUT,
    HookLUN,
    Writers,
    assert_no_lost_change,
    chunk_bytes,
    chunks_touched,
    fill_random,
    make_lun,
)

from isc import (
    CopyError,
    CopyJob,
    Destination,
    DestState,
    FileLUN,
    MemoryLUN,
    RangeError,
    SaveArea,
    Session,
    State,
    StateError,
)

G = 4096


def bitmap_state(session: Session) -> tuple:
    """Everything a failed call must leave as it was."""
    bitmap = session.bitmap
    return (
        bitmap.marked,
        bitmap.generation,
        bitmap.writes,
        bitmap.tracking_count,
        bitmap.transfer_count,
        bitmap.saved_count,
        bitmap.to_bytes(),
        session.save_area.used,
        session.stats,
    )


# -- the host write path ---------------------------------------------------------------


def test_write_lands_on_the_source_and_sets_exactly_the_touched_chunks():
    size = 20 * G + 1000  # a short last chunk
    session = Session(MemoryLUN(size), G)
    rng = random.Random(7)
    expected = bytearray(size)
    touched: set[int] = set()
    writes = [(0, 1), (G - 1, 2), (3 * G, G), (5 * G + 17, 3 * G), (size - 10, 10), (size, 0)]
    for offset, length in writes:
        data = rng.randbytes(length)
        session.write(offset, data)
        expected[offset : offset + length] = data
        if length:
            touched.update(chunks_touched(offset, length, G))
    assert session.read(0, size) == expected
    assert [c for c in range(session.bitmap.chunks) if session.bitmap.tracking(c)] == sorted(
        touched
    )
    assert session.stats.host_writes == len(writes)
    assert session.stats.cofw_chunks == 0  # unmarked: nothing to save


def test_write_accepts_any_bytes_like():
    session = Session(MemoryLUN(4 * G), G)
    words = np.arange(G // 4, dtype=np.uint32)  # item size 4: the length is G bytes, not G // 4
    session.write(G, words)
    session.write(0, memoryview(bytearray(b"\x07" * 100)))
    assert session.read(G, G) == words.tobytes()
    assert session.read(0, 100) == b"\x07" * 100
    assert [session.bitmap.tracking(c) for c in range(4)] == [True, True, False, False]


BAD_RANGES = [
    (-1, 10),
    (-(2**63), 1),
    (8 * G - 5, 10),
    (8 * G, 1),
    (0, 8 * G + 1),
    (2**62, 1),
    (2**63, 1),
]


@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "marked"])
@pytest.mark.parametrize(("offset", "length"), BAD_RANGES)
def test_write_out_of_range_raises_range_error_and_changes_nothing(offset, length, marked):
    size = 8 * G
    session = Session(MemoryLUN(size), G)
    session.write(0, b"x" * size)  # every chunk tracked, so a mark has COFW to do
    if marked:
        session.mark()
    before_data = session.read(0, size)
    before = bitmap_state(session)
    with pytest.raises(RangeError):
        session.write(offset, b"y" * length)
    assert session.read(0, size) == before_data
    assert bitmap_state(session) == before


# -- mark, unmark and holding marks ------------------------------------------------------


def test_mark_and_unmark_move_the_bitmaps_and_empty_the_save_area():
    size = 16 * G
    session = Session(MemoryLUN(size), G)
    session.write(0, b"a" * (3 * G))  # chunks 0-2
    assert session.state is State.UNMARKED
    assert session.mark() == 1 == session.generation
    assert session.state is State.MARKED
    with pytest.raises(StateError):
        session.mark()
    assert session.generation == 1
    session.write(G, b"b" * 10)  # chunk 1: COFW
    session.write(8 * G, b"c" * 10)  # chunk 8: tracked, not in transfer, no COFW
    assert session.stats.cofw_chunks == 1
    assert session.save_area.used == G
    session.unmark()
    assert session.state is State.UNMARKED
    assert session.save_area.used == 0
    # Nothing was sent: the transfer bitmap went back into tracking (rule 2).
    assert [c for c in range(16) if session.bitmap.tracking(c)] == [0, 1, 2, 8]
    assert session.bitmap.transfer_count == 0
    session.unmark()  # no-op when unmarked
    assert session.bitmap.tracking_count == 4


def test_full_mark_puts_every_chunk_in_transfer():
    size = 10 * G + 1
    session = Session(MemoryLUN(size), G)
    session.write(0, b"a")
    session.mark(full=True)
    assert session.bitmap.transfer_count == session.bitmap.chunks == 11
    assert session.bitmap.tracking_count == 0


def test_marks_held_refuses_marks_and_is_refused_when_marked():
    session = Session(MemoryLUN(4 * G), G)
    with session.marks_held("a test holds marks"):
        with pytest.raises(StateError, match="a test holds marks"):
            session.mark()
        with pytest.raises(StateError), session.marks_held("a second holder"):
            pass
        session.write(0, b"still writable")
    assert session.mark() == 1
    with pytest.raises(StateError), session.marks_held("while marked"):
        pass
    assert session.state is State.MARKED


# -- read_frozen -------------------------------------------------------------------------


def test_read_frozen_returns_the_mark_image_for_unsent_chunks_after_overwrites():
    size = 24 * G + 700  # the short last chunk is saved too
    rng = random.Random(11)
    session = Session(MemoryLUN(size), G)
    fill_random(session.source, rng)
    for offset in (0, 5 * G, 9 * G + 100, size - 300):
        session.write(offset, rng.randbytes(min(2 * G, size - offset)))
    session.mark()
    image = session.read(0, size)
    transfer = [c for c in range(session.bitmap.chunks) if session.bitmap.transfer(c)]
    assert transfer  # the mark froze something
    for _ in range(30):  # overwrite transfer chunks and others, some many times
        offset = rng.randrange(size)
        session.write(offset, rng.randbytes(min(rng.randrange(1, 3 * G), size - offset)))
    now = session.read(0, size)
    frozen = session.read_frozen(0, size)
    for c in range(session.bitmap.chunks):
        lo, hi = c * G, min((c + 1) * G, size)
        want = image if c in transfer else now
        assert frozen[lo:hi] == want[lo:hi], f"chunk {c}"
    assert session.stats.cofw_chunks == session.bitmap.saved_count > 0
    # Any window, aligned or not, reads as the same bytes of the whole.
    windows = [(0, 1), (0, 100), (G - 1, 2), (5 * G + 3, G), (size - 1, 1), (size, 0)]
    windows += [(o, rng.randrange(size - o + 1)) for o in rng.sample(range(size), 20)]
    for offset, length in windows:
        assert session.read_frozen(offset, length) == frozen[offset : offset + length], (
            offset,
            length,
        )
    for offset, length in [(-1, 1), (size, 1), (0, size + 1), (5, -1)]:
        with pytest.raises(RangeError):
            session.read_frozen(offset, length)


def test_read_frozen_skips_chunks_already_sent():
    # Mid-copy, sent chunks read as the source is now, unsent ones as at the mark.
    size = 12 * G
    rng = random.Random(5)
    session = Session(MemoryLUN(size), G)
    fill_random(session.source, rng)
    dest = Destination(MemoryLUN(size), "d")
    CopyJob(session, [dest]).full()
    session.write(0, rng.randbytes(size))
    session.mark()
    image = session.read(0, size)
    views = []

    def progress(done: int, total: int) -> None:
        sent = done // G
        session.write(0, rng.randbytes(size))  # COFW of every unsent chunk
        now = session.read(0, size)
        frozen = session.read_frozen(0, size)
        assert frozen[: sent * G] == now[: sent * G]
        assert frozen[sent * G :] == image[sent * G :]
        views.append(sent)

    CopyJob(session, [dest], io_size=G, progress=progress).incremental()
    assert views == list(range(1, 13))
    assert dest.lun.read(0, size) == image


def test_read_frozen_raises_state_error_when_unmarked():
    session = Session(MemoryLUN(4 * G), G)
    with pytest.raises(StateError, match="unmarked"):
        session.read_frozen(0, G)
    session.mark()
    assert session.read_frozen(0, G) == bytes(G)
    session.unmark()
    with pytest.raises(StateError):
        session.read_frozen(0, G)


# -- rule 3: copy on first write only ----------------------------------------------------------


def test_cofw_only_for_unsent_transfer_chunks_once_per_mark():
    chunks = 32
    size = chunks * G - 300  # the short last chunk is a transfer chunk too
    rng = random.Random(21)
    session = Session(MemoryLUN(size), G)
    fill_random(session.source, rng)
    dest_lun = HookLUN(MemoryLUN(size))
    dest = Destination(dest_lun, "d")
    CopyJob(session, [dest]).full()
    in_transfer = set(range(0, chunks, 2)) | {chunks - 1}
    for c in sorted(in_transfer):
        session.write(c * G, rng.randbytes(chunk_bytes(c, G, size)))
    session.mark()
    image = session.read(0, size)
    assert {c for c in range(chunks) if session.bitmap.transfer(c)} == in_transfer

    sent: set[int] = set()
    expected = {"cofw": 0, "bytes": 0}
    saved: set[int] = set()

    def host_write(offset: int, length: int) -> None:
        # The oracle: a chunk costs a COFW the first time a write touches it
        # while it is in transfer and not sent yet.
        for c in chunks_touched(offset, length, G):
            if c in in_transfer and c not in sent and c not in saved:
                saved.add(c)
                expected["cofw"] += 1
                expected["bytes"] += chunk_bytes(c, G, size)
        session.write(offset, rng.randbytes(length))

    # Mid-run: the run being sent was read already but is not confirmed yet.
    plan = {
        3: [(0, 10), (3 * G, G), (9 * G, 2 * G)],  # sent, not in transfer, both kinds
        6: [(10 * G, 5), (10 * G + 7, 5), (20 * G - 1, 5 * G + 2)],  # again, twice, a span
        9: [(size - 5, 5), (size - 5, 5), (0, size)],  # the short chunk, twice; everything
    }

    def before_write(n: int, offset: int, data) -> None:
        for offset_, length in plan.get(n, []):
            host_write(offset_, length)

    def progress(done: int, total: int) -> None:
        sent.update(chunks_touched(dest_lun.written[-1][0], dest_lun.written[-1][1], G))

    dest_lun.before_write = before_write
    dest_lun.writes = 0  # number the incremental copy's writes from 1
    before = session.stats
    result = CopyJob(session, [dest], io_size=G, progress=progress).incremental()
    after = session.stats
    assert expected["cofw"] > 3  # the plan did exercise COFW
    assert after.cofw_chunks - before.cofw_chunks == expected["cofw"] == result.cofw_chunks
    assert after.cofw_bytes - before.cofw_bytes == expected["bytes"]
    assert dest.lun.read(0, size) == image  # the saved data is what was sent
    assert dest.state is DestState.CONSISTENT

    # A new mark: every chunk is in transfer again, each saved once however often written.
    session.mark()
    for _ in range(3):
        session.write(0, rng.randbytes(size))
    assert session.stats.cofw_chunks - after.cofw_chunks == chunks
    assert session.stats.cofw_bytes - after.cofw_bytes == size


def test_unmarked_full_copy_never_causes_a_cofw():
    size = 40 * G
    rng = random.Random(8)
    session = Session(MemoryLUN(size), G)
    fill_random(session.source, rng)
    session.write(0, rng.randbytes(size))  # a full tracking bitmap

    def progress(done: int, total: int) -> None:
        session.write(rng.randrange(size - 2 * G), rng.randbytes(2 * G))

    dest = Destination(MemoryLUN(size), "d")
    result = CopyJob(session, [dest], io_size=4 * G, progress=progress).full(marked=False)
    assert result.extents == 10
    assert session.stats.cofw_chunks == 0 == result.cofw_chunks
    assert session.stats.save_area_high_water == 0
    assert dest.state is DestState.INCONSISTENT


# -- rule 5: a bounded save area ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "file"])
def test_a_full_save_area_aborts_the_mark_but_the_host_write_lands(where, tmp_path):
    chunks = 32
    size = chunks * G
    rng = random.Random(4)
    capacity = 2 * G
    save_area = SaveArea(capacity, tmp_path / "save.area" if where == "file" else None)
    session = Session(MemoryLUN(size), G, save_area)
    fill_random(session.source, rng)
    dest = Destination(MemoryLUN(size), "d")
    CopyJob(session, [dest]).full()
    session.write(0, rng.randbytes(size))
    session.mark()
    seen = []

    def progress(done: int, total: int) -> None:
        if seen:
            return
        for c in (20, 21, 22):  # unsent transfer chunks: the third does not fit
            data = rng.randbytes(100)
            session.write(c * G + 50, data)
            assert session.read(c * G + 50, 100) == data
            seen.append((session.state, session.stats.aborts, session.save_area.used))

    job = CopyJob(session, [dest], io_size=4 * G, progress=progress)
    with pytest.raises(CopyError) as failure:
        job.incremental()
    assert seen == [
        (State.MARKED, 0, G),
        (State.MARKED, 0, 2 * G),
        (State.UNMARKED, 1, 0),
    ]
    stats = session.stats
    assert stats.aborts == 1
    assert "save area full" in stats.last_abort
    assert stats.save_area_high_water <= capacity
    assert session.save_area.used == 0
    assert failure.value.result.bytes_sent == 4 * G  # one run went out before the abort
    assert dest.state is DestState.INCONSISTENT
    assert_no_lost_change(session, dest.lun)
    session.mark()
    CopyJob(session, [dest]).incremental()
    assert dest.lun.read(0, size) == session.read(0, size)
    assert dest.state is DestState.CONSISTENT
    assert session.stats.save_area_high_water <= capacity


def test_a_save_area_failure_aborts_the_mark_but_the_host_write_lands():
    class FailingSaveArea(SaveArea):
        def save_from(self, chunk, length, fill):
            raise OSError(5, "injected save area I/O error")

    session = Session(MemoryLUN(8 * G), G, FailingSaveArea(8 * G))
    session.write(0, b"a" * (8 * G))
    session.mark()
    session.write(G, b"b" * G)
    assert session.state is State.UNMARKED
    assert session.stats.aborts == 1
    assert "COFW of chunk 1 failed: [Errno 5] injected save area I/O error" in (
        session.stats.last_abort
    )
    assert session.read(G, G) == b"b" * G
    assert session.bitmap.tracking_count == 8  # nothing lost


def test_the_save_area_never_exceeds_its_capacity_under_concurrent_writes():
    size = 64 * G
    rng = random.Random(12)
    capacity = 5 * G
    session = Session(MemoryLUN(size), G, SaveArea(capacity))
    fill_random(session.source, rng)
    dest = Destination(MemoryLUN(size), "d")
    CopyJob(session, [dest]).full()

    def write(writer: int, seq: int, wrng: random.Random) -> None:
        offset = wrng.randrange(size - 3 * G)
        session.write(offset, wrng.randbytes(wrng.randrange(1, 3 * G)))

    def progress(done: int, total: int) -> None:
        # Two more writes per run sent; wait for one, the other races the next run.
        finished = writers.total_done
        writers.allow(2)
        writers.wait_done(finished + 1)

    job = CopyJob(session, [dest], io_size=2 * G, progress=progress)
    failures = 0
    with Writers(write, 3, seed=100) as writers:
        for _ in range(6):
            writers.allow(40)
            writers.settle()
            session.mark()
            try:
                job.incremental()
            except CopyError:
                failures += 1
                assert session.state is State.UNMARKED
            assert session.stats.save_area_high_water <= capacity
        writers.settle()
    assert failures == session.stats.aborts > 0  # every abort failed its copy, and some did
    session.mark()
    CopyJob(session, [dest]).incremental()
    assert dest.lun.read(0, size) == session.read(0, size)


# -- rule 4: each host write lands wholly before or wholly after a mark ------------------------
#
# Writer w owns the region [w * REGION, (w + 1) * REGION) and writes to it only.
# Its write number s (s = 1, 2, ...) covers several chunks, crosses chunk
# boundaries, and fills every 512-byte sector it covers with the stamp
# (w + 1, s, sector number, MAGIC). The writer logs (offset, length) of write s
# before issuing it. Never-written sectors are zeros.
#
# The check, per writer, on a destination after a copy: let K be the largest
# write number found in the writer's region. Replay the log's first K writes
# over zeros and compare the whole region byte for byte with that image.
# Equality means the region holds exactly the state after writes 1..K: no
# write before K is missing or half-applied (it would leave an older or torn
# sector), and no write after K shows (K is the largest number seen). So the
# mark cut each writer's sequence of writes between two writes. Moreover K must
# be at least the number of writes that had finished before mark() was called
# and at most the number begun when it returned.

SECTOR = 512
MAGIC = 0x15C0FFEE


def stamped(writer: int, seqs: np.ndarray, first_sector: int) -> bytes:
    """Sectors from ``first_sector`` as last written by ``writer``'s writes ``seqs`` (0: never)."""
    n = len(seqs)
    written = seqs > 0
    words = np.zeros((n, SECTOR // 16, 4), "<u4")
    words[:, :, 0] = np.where(written, writer + 1, 0)[:, None]
    words[:, :, 1] = seqs[:, None]
    words[:, :, 2] = np.where(written, np.arange(first_sector, first_sector + n), 0)[:, None]
    words[:, :, 3] = np.where(written, MAGIC, 0)[:, None]
    return words.tobytes()


def writes_seen(region: bytes, writer: int, first_sector: int, log: list) -> int:
    """Check that ``region`` holds ``writer``'s state after a prefix of ``log``; return K."""
    seqs = np.frombuffer(region, "<u4").reshape(-1, SECTOR // 16, 4)[:, 0, 1]
    k = int(seqs.max())
    assert k <= len(log), f"writer {writer}: write {k} shows but only {len(log)} were logged"
    replay = np.zeros(len(seqs), np.uint32)
    for seq, (offset, length) in enumerate(log[:k], 1):
        lo = offset // SECTOR - first_sector
        replay[lo : lo + length // SECTOR] = seq
    if region != stamped(writer, replay, first_sector):
        bad = np.flatnonzero(seqs != replay)
        pytest.fail(
            f"writer {writer}: the region is not the state after writes 1..{k}: "
            f"{len(bad)} sectors differ, e.g. sector {bad[:1]} holds write {seqs[bad[:1]]} "
            f"where the replay has {replay[bad[:1]]}"
        )
    return k


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.parametrize("granularity", [2048, 65536])
def test_each_host_write_lands_wholly_before_or_after_a_mark(
    granularity, kind, tmp_path, busy_switching
):
    g = granularity
    nwriters = 3
    region = 24 * g
    size = nwriters * region
    source = make_lun(kind, size, tmp_path, "source")
    session = Session(source, g)
    logs: list[list[tuple[int, int]]] = [[] for _ in range(nwriters)]

    def write(writer: int, seq: int, rng: random.Random) -> None:
        sectors = rng.randrange(g // SECTOR + 1, 3 * g // SECTOR + 1)  # 2 to 4 chunks
        first = writer * region // SECTOR + rng.randrange(region // SECTOR - sectors + 1)
        logs[writer].append((first * SECTOR, sectors * SECTOR))
        assert len(logs[writer]) == seq
        session.write(first * SECTOR, stamped(writer, np.full(sectors, seq, np.uint32), first))

    dest = Destination(make_lun(kind, size, tmp_path, "dest"), "d")

    def progress(done: int, total: int) -> None:
        writers.allow(2)  # writes race the rest of the copy

    job = CopyJob(session, [dest], io_size=2 * g, progress=progress)
    seen: list[list[int]] = []
    overlapped = 0
    with Writers(write, nwriters, seed=40) as writers:
        writers.allow(30)
        writers.settle()
        job.full()  # the destination starts CONSISTENT, from a quiet source
        for _ in range(40):
            # Mark while the writers run flat out, then let only a few more
            # writes race the copy.
            target = writers.total_done + 3
            writers.allow(10**9)
            writers.wait_done(target)
            finished = list(writers.done)
            session.mark()
            started = list(writers.started)
            writers.limit(0)
            overlapped += sum(started) > sum(finished)
            job.incremental()
            assert dest.state is DestState.CONSISTENT
            image = dest.lun.read(0, size)
            ks = []
            for w in range(nwriters):
                lo = w * region
                k = writes_seen(image[lo : lo + region], w, lo // SECTOR, logs[w])
                assert finished[w] <= k <= started[w], (w, finished, k, started)
                ks.append(k)
            seen.append(ks)
        writers.settle()
    assert overlapped  # some marks did fall amid writes
    for earlier, later in itertools.pairwise(seen):  # no mark goes back in time
        assert all(a <= b for a, b in zip(earlier, later, strict=True)), seen
    assert sum(seen[-1]) > sum(seen[0])  # the marks did move forward
    dest.lun.close()
    source.close()


def test_a_mark_waits_for_a_write_in_flight():
    # A host write is parked inside its source I/O; mark() must not return
    # until it has landed, and the write must be part of the marked image.
    size = 8 * G
    source = HookLUN(MemoryLUN(size))
    session = Session(source, G)
    inside, release, marked = threading.Event(), threading.Event(), threading.Event()

    def park(n: int, offset: int, data) -> None:
        inside.set()
        assert release.wait(TIMEOUT)

    source.before_write = park
    writer = threading.Thread(target=session.write, args=(G, b"w" * (2 * G)))
    writer.start()
    assert inside.wait(TIMEOUT)
    marker = threading.Thread(target=lambda: (session.mark(), marked.set()))
    marker.start()
    assert not marked.wait(0.05)  # a bounded look: the mark is still waiting
    assert session.state is State.UNMARKED
    source.before_write = None
    release.set()
    writer.join(TIMEOUT)
    marker.join(TIMEOUT)
    assert marked.is_set() and not writer.is_alive()
    assert [session.bitmap.transfer(c) for c in range(4)] == [False, True, True, False]
    assert session.read_frozen(0, size) == bytes(G) + b"w" * (2 * G) + bytes(size - 3 * G)


def test_copy_frozen_to_needs_a_mark_whole_chunks_and_a_source_that_copies(tmp_path):
    with (
        FileLUN.create(tmp_path / "s.img", 4 * G) as source,
        FileLUN.create(tmp_path / "d.img", 4 * G) as dest,
    ):
        session = Session(source, G)
        session.write(0, b"\x11" * 4 * G)  # every chunk to send at the next mark
        with pytest.raises(StateError, match="unmarked"):
            session.copy_frozen_to(0, G, dest)
        session.mark()
        with pytest.raises(ValueError, match="granularity"):
            session.copy_frozen_to(100, G, dest)
        memory = MemoryLUN(4 * G)
        assert session.copy_frozen_to(0, 4 * G, memory) is False  # nothing written
        assert memory.read(0, 4 * G) == bytes(4 * G)
        session.write(G, b"\x22" * 10)  # COFW: chunk 1's old data is saved
        assert session.stats.cofw_chunks == 1
        assert session.copy_frozen_to(0, 4 * G, dest) is True
        assert dest.read(0, 4 * G) == b"\x11" * 4 * G  # the image at the mark


def test_write_zeroes_is_a_tracked_host_write_and_refuses_a_bad_range_changing_nothing():
    source = MemoryLUN(64 * 4096)
    session = Session(source, 4096)
    session.write(0, b"x" * 3 * 4096)
    session.mark()
    session.write_zeroes(4096, 4096 + 10)  # chunks 1 and 2: saved first, then tracked
    assert source.read(4096, 4096 + 10) == bytes(4096 + 10)
    assert session.read_frozen(0, 3 * 4096) == b"x" * 3 * 4096
    assert [session.bitmap.tracking(c) for c in range(4)] == [False, True, True, False]
    session.write_zeroes(0, 0)  # nothing, as a write of no bytes
    for offset, length in ((0, -1), (-1, 1), (63 * 4096, 4097)):
        with pytest.raises(RangeError, match="outside the source"):
            session.write_zeroes(offset, length)
    assert source.read(0, 4096) == b"x" * 4096 and session.bitmap.tracking_count == 2
