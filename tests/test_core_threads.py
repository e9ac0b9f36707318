"""The compiled delta bitmap under concurrent host writes, marks and scans.

Threads synchronise through events and barriers only. A wait that should end
is bounded by ``TIMEOUT`` and fails the test when it expires; a wait that
should *not* end is observed for ``NOT_YET`` seconds.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import Worker

from isc import _layout, _reference
from isc._core import DeltaBitmap
from isc.errors import StateError

TIMEOUT = 30.0
NOT_YET = 0.2
G = 2048  # granularity of every bitmap here: the most chunks per byte
BLOCK = 4096  # chunks per summary block of the core


def bits(bitmap, field: str) -> np.ndarray:
    """One flag per chunk of ``field`` (tracking, transfer or saved), from the serialized state."""
    raw = getattr(_layout.unpack(bitmap.to_bytes()), field)
    return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: bitmap.chunks] > 0


def assert_well_formed(extents: np.ndarray, chunks: int) -> None:
    assert extents.dtype == np.int64
    assert extents.ndim == 2
    assert extents.shape[1] == 2
    firsts, counts = extents[:, 0], extents[:, 1]
    assert (counts > 0).all()
    # Unlimited runs are maximal: a gap separates each from the next.
    assert (firsts[1:] > firsts[:-1] + counts[:-1]).all()
    if len(extents):
        assert firsts[0] >= 0
        assert firsts[-1] + counts[-1] <= chunks


# -- each write lands wholly before or wholly after each mark --------------------------

WRITERS = 4
REGION = 1 << 15  # chunks per writer; writes never touch a chunk twice
MARKS = 40
PER_MARK = 25  # writes a writer issues at most while it sees one generation
ZEROS = memoryview(bytes(6 * G))  # the data of every write_through


class Pacing:
    """Lets the marker keep up: writers wait for a new mark after PER_MARK writes."""

    def __init__(self, bitmap):
        self.bitmap = bitmap
        self.start = threading.Barrier(WRITERS + 1)
        self.stop = threading.Event()
        self.wrote = threading.Event()
        self.marked = threading.Condition()

    def after_write(self, seen: int, writes: int) -> None:
        if writes % PER_MARK == 0:
            with self.marked:
                assert self.marked.wait_for(
                    lambda: self.bitmap.generation != seen or self.stop.is_set(), TIMEOUT
                ), "no new mark came"

    def new_mark(self) -> None:
        with self.marked:
            self.marked.notify_all()


def steady_generation(bitmap):
    """A write_through write callback that fails if a mark passes the write in flight."""

    def write(_offset, data):
        seen = bitmap.generation
        bytes(data)  # the write's I/O; other threads run meanwhile
        assert bitmap.generation == seen, "a mark passed a write in flight"

    return write


def write_sequentially(bitmap, mode, index, pacing):
    """Write fresh 2..6-chunk ranges up the writer's region; log (first, last, gen0, gen1)."""
    rng = np.random.default_rng(index)
    first, end = index * REGION, (index + 1) * REGION
    log = []
    pacing.start.wait(TIMEOUT)
    try:
        while not pacing.stop.is_set() and first + 6 <= end:
            last = first + int(rng.integers(1, 6))
            # Start and end mid-chunk: the write touches exactly first..last.
            offset = first * G + int(rng.integers(0, G))
            length = last * G + int(rng.integers(1, G + 1)) - offset
            before = bitmap.generation
            if mode == "record_write":
                cofw = bitmap.record_write(offset, length)
            elif mode == "begin_write":
                cofw = bitmap.begin_write(offset, length)
                bitmap.end_write(offset, length, len(cofw) > 0)
            elif mode == "write_through":
                cofw = []
                write = steady_generation(bitmap)
                bitmap.write_through(write, cofw.extend, offset, ZEROS[:length])
            else:
                middle = (first + 1) * G
                lengths = [middle - offset, offset + length - middle]
                cofw = bitmap.record_writes([offset, middle], lengths)
            # Fresh chunks were never in a transfer bitmap: nothing to save.
            assert len(cofw) == 0
            after = bitmap.generation
            log.append((first, last, before, after))
            pacing.wrote.set()
            first = last + 1
            pacing.after_write(after, len(log))
    finally:
        pacing.wrote.set()  # wake the marker, which then sees this writer has stopped
    return log


@pytest.mark.parametrize("mode", ["record_write", "begin_write", "write_through", "record_writes"])
def test_each_write_lands_wholly_before_or_after_each_mark(mode, busy_switching):
    bitmap = DeltaBitmap(WRITERS * REGION * G, G)
    pacing = Pacing(bitmap)
    writers = [
        Worker(lambda i=i: write_sequentially(bitmap, mode, i, pacing)) for i in range(WRITERS)
    ]
    # epoch[c] = k when chunk c was written between mark k-1 and mark k (k >= 1).
    epoch = np.zeros(bitmap.chunks, np.int64)
    pacing.start.wait(TIMEOUT)
    for k in range(1, MARKS + 1):
        assert pacing.wrote.wait(TIMEOUT), "no writer wrote"
        pacing.wrote.clear()
        if any(w.done.is_set() for w in writers):
            break
        bitmap.mark()
        pacing.new_mark()
        for first, count in bitmap.extents():
            assert not epoch[first : first + count].any(), "a chunk was sent twice"
            epoch[first : first + count] = k
        assert bitmap.clear_transfer(0, bitmap.chunks, k) == np.count_nonzero(epoch == k)
        bitmap.unmark()
    pacing.stop.set()
    pacing.new_mark()
    logs = [w.finish() for w in writers]
    assert bitmap.generation == MARKS, "a writer ran out of room"
    epoch[bits(bitmap, "tracking")] = MARKS + 1

    written = np.zeros(bitmap.chunks, bool)
    for first, last, before, after in (entry for log in logs for entry in log):
        landed = np.unique(epoch[first : last + 1])
        assert len(landed) == 1, f"write to chunks {first}..{last} split across marks {landed}"
        # Issued after mark `before` and finished before mark `after + 1`.
        assert before + 1 <= landed[0] <= after + 1, (first, last, before, after, landed)
        written[first : last + 1] = True
    np.testing.assert_array_equal(epoch > 0, written)
    assert len(np.unique(epoch[written])) > 1, "no mark ran while the writers wrote"
    assert bitmap.writes == sum(len(log) for log in logs) * (2 if mode == "record_writes" else 1)
    bitmap._check()


# -- a mark waits for writes in flight ------------------------------------------------


def test_mark_waits_for_the_write_in_flight():
    bitmap = DeltaBitmap(64 * G, G)
    bitmap.begin_write(5 * G + 7, 100)
    marker = Worker(bitmap.mark)
    assert not marker.done.wait(NOT_YET), "mark did not wait for the write in flight"
    assert not bitmap.marked
    bitmap.end_write(5 * G + 7, 100, False)
    marker.finish()
    assert bitmap.marked
    assert bitmap.transfer(5)
    assert bitmap.tracking_count == 0


def test_mark_waits_for_every_write_in_flight():
    bitmap = DeltaBitmap(64 * G, G)
    writes = [(c * G, G) for c in (1, 2, 40)]
    for offset, length in writes:
        bitmap.begin_write(offset, length)
    marker = Worker(bitmap.mark)
    for offset, length in writes:
        assert not marker.done.wait(NOT_YET), "mark did not wait for a write in flight"
        bitmap.end_write(offset, length, False)
    marker.finish()
    assert bitmap.transfer_count == len(writes)


def test_clear_tracking_waits_for_the_write_in_flight():
    bitmap = DeltaBitmap(64 * G, G)
    bitmap.record_write(0, G)
    bitmap.begin_write(9 * G, G)
    clearing = Worker(bitmap.clear_tracking)
    assert not clearing.done.wait(NOT_YET), "clear_tracking did not wait for the write in flight"
    assert bitmap.tracking(0)
    bitmap.end_write(9 * G, G, False)
    clearing.finish()
    assert bitmap.tracking_count == 0


def test_a_write_held_off_by_freeze_is_recorded_when_thaw_returns():
    """``thaw`` returns once each write it woke has had the mutex: a checkpoint that thaws
    and then encodes (a hold of the mutex after another) cannot take the mutex back
    before the woken write runs, which kept that write waiting for the whole encoding."""
    bitmap = DeltaBitmap(64 * G, G)
    bitmap.freeze()
    writer = Worker(lambda: bitmap.begin_write(9 * G, G))
    assert not writer.done.wait(NOT_YET), "begin_write did not wait while frozen"
    assert bitmap.writes == 0
    bitmap.thaw()
    assert bitmap.writes == 1 and bitmap.tracking(9)
    assert len(writer.finish()) == 0
    bitmap.end_write(9 * G, G, False)
    bitmap.thaw()  # not frozen: returns at once
    bitmap._check()


def test_mark_when_marked_fails_at_once_even_with_a_write_in_flight():
    bitmap = DeltaBitmap(64 * G, G)
    bitmap.mark()
    bitmap.begin_write(0, G)
    marker = Worker(bitmap.mark)
    with pytest.raises(StateError, match="already marked"):
        marker.finish()
    bitmap.end_write(0, G, False)


def test_two_marks_behind_a_write_in_flight_one_wins():
    bitmap = DeltaBitmap(64 * G, G)
    bitmap.begin_write(3 * G, 1)
    markers = [Worker(bitmap.mark) for _ in range(2)]
    assert not any(m.done.wait(NOT_YET) for m in markers)
    bitmap.end_write(3 * G, 1, False)
    outcomes = []
    for marker in markers:
        try:
            marker.finish()
            outcomes.append("marked")
        except StateError:
            outcomes.append("refused")
    assert sorted(outcomes) == ["marked", "refused"]
    assert bitmap.generation == 1
    assert bitmap.transfer(3)


# -- a write overlapping a COFW in flight waits --------------------------------------


def replay_on_reference(steps):
    """Run ``(method, args)`` steps on a reference bitmap; return the last result."""
    reference = _reference.DeltaBitmap(64 * G, G)
    result = None
    for method, args in steps:
        result = getattr(reference, method)(*args)
    return result


def test_overlapping_begin_write_waits_for_the_cofw_write_to_end():
    setup = [("record_write", (5 * G, 3 * G)), ("mark", ())]
    bitmap = DeltaBitmap(64 * G, G)
    for method, args in setup:
        getattr(bitmap, method)(*args)
    first = ("begin_write", (6 * G, G))
    cofw = bitmap.begin_write(*first[1])
    np.testing.assert_array_equal(cofw, replay_on_reference([*setup, first]))
    assert len(cofw), "the first write should need a COFW"

    # Touches chunks 6 and 7: chunk 6 is still being saved.
    second = ("begin_write", (7 * G - 1, 2))
    overlapping = Worker(lambda: bitmap.begin_write(*second[1]))
    assert not overlapping.done.wait(NOT_YET), "the overlapping write did not wait"

    # Writes elsewhere go on meanwhile, with or without COFW.
    elsewhere = Worker(lambda: bitmap.begin_write(20 * G, G))
    assert len(elsewhere.finish()) == 0
    bitmap.end_write(20 * G, G, False)
    neighbour = Worker(lambda: bitmap.begin_write(5 * G, 10))
    assert list(neighbour.finish()) == [5]
    bitmap.end_write(5 * G, 10, True)
    assert not overlapping.done.is_set()

    ended = ("end_write", (6 * G, G, True))
    bitmap.end_write(*ended[1])
    expected = replay_on_reference([*setup, first, ended, second])
    np.testing.assert_array_equal(overlapping.finish(), expected)
    bitmap.end_write(7 * G - 1, 2, len(expected) > 0)
    bitmap._check()


def test_begin_write_overlapping_a_write_without_cofw_does_not_wait():
    bitmap = DeltaBitmap(64 * G, G)
    bitmap.mark()
    assert len(bitmap.begin_write(4 * G, 3 * G)) == 0
    overlapping = Worker(lambda: bitmap.begin_write(5 * G, 10))
    assert len(overlapping.finish()) == 0
    bitmap.end_write(5 * G, 10, False)
    bitmap.end_write(4 * G, 3 * G, False)


def test_record_write_overlapping_a_cofw_in_flight_does_not_wait():
    steps = [("record_write", (0, 4 * G)), ("mark", ()), ("begin_write", (0, G))]
    bitmap = DeltaBitmap(64 * G, G)
    for method, args in steps:
        getattr(bitmap, method)(*args)
    plain = ("record_write", (0, 2 * G))
    writer = Worker(lambda: bitmap.record_write(*plain[1]))
    np.testing.assert_array_equal(writer.finish(), replay_on_reference([*steps, plain]))
    bitmap.end_write(0, G, True)


def test_cofw_saves_each_chunk_at_most_once_per_mark(busy_switching):
    """Overlapping writes in flight from many threads while marks come and go."""
    chunks, writes_each = 300, 400
    bitmap = DeltaBitmap(chunks * G, G)
    bitmap.record_write(0, chunks * G // 2)
    pacing = Pacing(bitmap)

    def writer(index):
        rng = np.random.default_rng(100 + index)
        saved = []  # (generation, chunk) of every COFW this thread did
        pacing.start.wait(TIMEOUT)
        try:
            for n in range(1, writes_each + 1):
                offset = int(rng.integers(0, chunks * G))
                length = min(int(rng.integers(0, 8 * G)), chunks * G - offset)
                cofw = bitmap.begin_write(offset, length)
                # No mark can pass a write in flight: this is the mark it landed in.
                generation = bitmap.generation
                saved.extend((generation, int(c)) for c in cofw)
                bitmap.end_write(offset, length, len(cofw) > 0)
                pacing.wrote.set()
                pacing.after_write(generation, n)
        finally:
            pacing.wrote.set()
        return saved

    writers = [Worker(lambda i=i: writer(i)) for i in range(WRITERS)]
    transfer_at = {}  # generation -> transfer bits right after its mark
    pacing.start.wait(TIMEOUT)
    while True:
        # Cleared before the check: a writer that ends after it sets it again.
        pacing.wrote.clear()
        if all(w.done.is_set() for w in writers):
            break
        bitmap.mark()
        pacing.new_mark()
        transfer_at[bitmap.generation] = bits(bitmap, "transfer")
        assert_well_formed(bitmap.extents(), chunks)
        # Let writes happen while marked.
        assert pacing.wrote.wait(TIMEOUT), "no writer wrote"
        bitmap.unmark()
    saved = [pair for w in writers for pair in w.finish()]
    assert len(saved) == len(set(saved)), "a chunk was saved twice in one mark"
    assert saved, "no write needed a COFW"
    for generation, chunk in saved:
        assert transfer_at[generation][chunk], f"chunk {chunk} saved without a transfer bit"
    bitmap._check()
    assert bitmap.writes == WRITERS * writes_each + 1


# -- batches, scans and state changes at once -------------------------------------------


def test_concurrent_batches_scans_and_marks_lose_nothing(busy_switching):
    chunks = 3 * BLOCK + 77
    size = chunks * G - 100
    bitmap = DeltaBitmap(size, G)
    batches, start, done = 150, threading.Barrier(WRITERS + 2), threading.Event()

    def writer(index):
        rng = np.random.default_rng(200 + index)
        touched = np.zeros(chunks, bool)
        count = 0
        start.wait(TIMEOUT)
        for _ in range(batches):
            n = int(rng.integers(1, 17))
            offsets = rng.integers(0, size, n)
            lengths = np.minimum(rng.integers(0, 70 * G, n), size - offsets)
            bitmap.record_writes(offsets, lengths)
            for offset, length in zip(offsets, lengths, strict=True):
                if length:
                    touched[offset // G : (offset + length - 1) // G + 1] = True
            count += n
        return touched, count

    def scanner():
        scans = 0
        start.wait(TIMEOUT)
        while not done.is_set() or scans == 0:
            assert_well_formed(bitmap.extents(), chunks)
            limit = scans % 70 + 1
            pieces = bitmap.extents(limit)
            assert (pieces[:, 1] <= limit).all()
            assert (pieces[1:, 0] >= pieces[:-1].sum(axis=1)).all()
            # A snapshot is one consistent state: it loads and passes every check.
            DeltaBitmap.from_bytes(bitmap.to_bytes())._check()
            scans += 1
        return scans

    writers = [Worker(lambda i=i: writer(i)) for i in range(WRITERS)]
    scan = Worker(scanner)
    start.wait(TIMEOUT)
    cycles = 0
    while not all(w.done.is_set() for w in writers) or cycles == 0:
        bitmap.mark()
        bitmap.unmark()
        cycles += 1
    results = [w.finish() for w in writers]
    done.set()
    assert scan.finish() > 0

    bitmap._check()
    written = np.logical_or.reduce([touched for touched, _ in results])
    tracking = bits(bitmap, "tracking")
    np.testing.assert_array_equal(tracking, written)
    assert bitmap.tracking_count == tracking.sum()
    assert bitmap.transfer_count == bitmap.saved_count == 0
    assert bitmap.writes == sum(count for _, count in results)
    assert bitmap.generation == cycles


# -- == locks both maps ------------------------------------------------------------------


def test_comparisons_both_ways_in_two_threads_while_writes_go_on():
    """``a == b`` and ``b == a`` take the two mutexes in one order: both threads finish
    (``Worker.finish`` fails the test after ``TIMEOUT``)."""
    a, b = DeltaBitmap(4 * BLOCK * G, G), DeltaBitmap(4 * BLOCK * G, G)
    start = threading.Barrier(3)

    def compare(x, y):
        start.wait(TIMEOUT)
        for _ in range(3000):
            x == y  # noqa: B015

    def write():
        start.wait(TIMEOUT)
        for chunk in range(0, 4 * BLOCK, 7):
            a.record_write(chunk * G, G)
            b.record_write(chunk * G, G)

    comparers = [Worker(lambda: compare(a, b)), Worker(lambda: compare(b, a))]
    writer = Worker(write)
    writer.finish()
    for worker in comparers:
        worker.finish()
    assert a == b
    assert a.tracking_count == len(range(0, 4 * BLOCK, 7))
