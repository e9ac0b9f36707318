"""Snapshots of the delta bitmap: the page records a checkpoint writes, and loading them.

The lockstep machine (``test_core.py``) checks that a snapshot's records, taken
while anything else runs, rebuild the state frozen at the snapshot; here are
the record format, the errors, a snapshot under concurrent host writes, and a
16 TiB map whose checkpoints stay as small as its changes.
"""

from __future__ import annotations

import random
import struct
import threading
import zlib

import numpy as np
import pytest

from isc import _core, _layout, _reference
from isc.errors import CorruptMetadata, ParameterError, RangeError, StateError

BITMAPS = (_core.DeltaBitmap, _reference.DeltaBitmap)
G = 2048


def records_of(bitmap, everything: bool = False) -> tuple[tuple, bytes]:
    """Take a whole snapshot of ``bitmap``: its header and its records."""
    header = bitmap.snapshot(everything)
    out, taken = bytearray(_layout.MAX_RECORD), []
    while n := bitmap.snapshot_records(out):
        taken.append(bytes(out[:n]))
    bitmap.snapshot_end(True)
    return header, b"".join(taken)


def rebuilt(kind, size: int, header: tuple, data: bytes):
    """A map of ``kind`` loaded from one base snapshot."""
    bitmap = kind(size, G)
    assert bitmap.apply_records(data) == len(data)
    bitmap.load_state(*header[1:])
    return bitmap


@pytest.mark.parametrize("kind", BITMAPS)
def test_a_page_record_is_laid_out_as_documented(kind) -> None:
    # Chunks 64..127 are word 1 of page 0; the last chunk of page 0 is bit 63 of word 511.
    bitmap = kind(2 * 512 * 64 * G, G)  # two pages per array
    bitmap.record_writes([64 * G, (512 * 64 - 1) * G], [1, 1])
    (base, t, marked, generation), data = records_of(bitmap)
    assert (base, t, marked, generation) == (True, 0, False, 0)
    rest = struct.pack("<IQ", _layout.SPARSE_PAGE, 0) + struct.pack("<8Q", 0b10, *[0] * 6, 1 << 63)
    rest += struct.pack("<2Q", 1, 1 << 63)
    assert data == struct.pack("<I", zlib.crc32(rest)) + rest


@pytest.mark.parametrize("kind", BITMAPS)
def test_full_and_emptied_pages_take_a_record_head_each(kind) -> None:
    chunks = 512 * 64 + 5  # a second, short page per array
    bitmap = kind(chunks * G, G)
    records_of(bitmap)
    bitmap.mark(full=True)  # transfer is array 1: both its pages fill
    _, data = records_of(bitmap)
    pages = _layout.pages_for(_layout.words_for(chunks))
    decoded = {ident: words for ident, words, _ in _layout.decode_records(data, chunks)}
    assert set(decoded) == {pages, pages + 1}
    assert len(data) == 2 * 16  # FULL_PAGE records have no body
    assert int(decoded[pages + 1][-1]) == (1 << 5) - 1  # the short page's last word
    bitmap.unmark()  # merges into array 1 and swaps: array 1 is tracking, no page changed
    assert records_of(bitmap)[1] == b""
    bitmap.clear_tracking()
    _, data = records_of(bitmap)
    assert len(data) == 2 * 16  # two ZERO_PAGE records


def test_a_mark_or_an_unmark_dirties_no_page() -> None:
    bitmap = _core.DeltaBitmap(1 << 44, G)  # 16 TiB at 2 KiB: 2^18 pages per array
    bitmap.record_write((1 << 44) - 4096, 4096)
    records_of(bitmap)
    bitmap.mark()
    assert bitmap.dirty_pages == 0
    bitmap.record_write(0, 4096)  # tracking is array 1 now
    bitmap.test_and_clear(bitmap.chunks - 1)  # transfer is array 0
    assert bitmap.dirty_pages == 2
    bitmap.unmark()  # merges page 0 of array 1 into page 0 of array 0
    (base, t, marked, generation), data = records_of(bitmap)
    assert not base and (t, marked, generation) == (0, False, 1)
    pages = {i for i, _, _ in _layout.decode_records(data, bitmap.chunks)}
    assert pages == {0, (1 << 18) - 1, 1 << 18}


@pytest.mark.parametrize("kind", BITMAPS)
def test_snapshot_calls_out_of_turn_are_state_errors_and_change_nothing(kind) -> None:
    bitmap = kind(100 * G, G)
    bitmap.record_write(0, 10 * G)
    before = bitmap.to_bytes()
    with pytest.raises(StateError, match="no snapshot"):
        bitmap.snapshot_records(bytearray(_layout.MAX_RECORD))
    with pytest.raises(StateError, match="no snapshot"):
        bitmap.snapshot_end(True)
    bitmap.snapshot()
    with pytest.raises(StateError, match="snapshot of this delta bitmap is open"):
        bitmap.snapshot()
    with pytest.raises(StateError, match="snapshot of this delta bitmap is open"):
        bitmap.load_state(0, False, 0)
    with pytest.raises(ParameterError, match=f"at least {_layout.MAX_RECORD} bytes"):
        bitmap.snapshot_records(bytearray(100))
    with pytest.raises(StateError, match="still has records to take"):
        bitmap.snapshot_end(True)
    assert bitmap.snapshot_records(bytearray(_layout.MAX_RECORD))  # still open, records intact
    bitmap.snapshot_end(False)
    assert bitmap.to_bytes() == before
    assert bitmap.snapshot()[0]  # after an abandoned snapshot comes a base


@pytest.mark.parametrize("kind", BITMAPS)
def test_a_record_that_fails_its_checksum_names_its_page_and_byte(kind) -> None:
    size = 50_000 * G  # two pages per array
    source = _core.DeltaBitmap(size, G)
    source.record_writes([0, 40_000 * G], [G, G])
    _, data = records_of(source)
    second = 16 + 64 + 8  # the first record holds one word
    bitmap = kind(size, G)
    assert bitmap.apply_records(data[: second + 20]) == second  # stops before a cut record
    at = second + 16 + 64 + 2  # in the second record's word
    damaged = data[:at] + bytes([data[at] ^ 4]) + data[at + 1 :]
    with pytest.raises(CorruptMetadata, match=rf"at byte {1000 + second} \(page 1 of bitmap 0\)"):
        kind(size, G).apply_records(damaged, 1000)


@pytest.mark.parametrize("kind", BITMAPS)
def test_records_that_do_not_fit_the_map_are_refused(kind) -> None:
    chunks = 70  # one page of two words per array; chunk 70 would be word 1, bit 6
    words = np.array([0, 1 << 6], dtype=np.uint64)
    past_end = _layout.encode_page(0, words, chunks + 64, 1)
    with pytest.raises(CorruptMetadata, match="sets bits outside the map"):
        kind(chunks * G, G).apply_records(past_end)
    no_page = _layout.encode_page(3, np.zeros(2, np.uint64), chunks, 1)
    with pytest.raises(CorruptMetadata, match=r"\(page id 3\) names no page"):
        kind(chunks * G, G).apply_records(no_page)


@pytest.mark.parametrize("kind", BITMAPS)
def test_load_state_refuses_impossible_states(kind) -> None:
    source = _core.DeltaBitmap(100 * G, G)
    source.record_write(0, 10 * G)
    source.mark()
    source.record_write(0, G)  # chunk 0 saved
    header, data = records_of(source)
    assert header[1:] == (1, True, 1)  # tracking is array 1, transfer array 0
    empty_transfer = data + _layout.encode_page(0, np.zeros(2, np.uint64), 100, 1)
    for records, args, error, match in (
        (data, (1, False, 1), CorruptMetadata, "unmarked but has transfer or saved"),
        (empty_transfer, (1, True, 1), CorruptMetadata, r"without their transfer bit \(word 0\)"),
        (data, (2, True, 1), ParameterError, "t in"),
        (data, (1, True, -1), ParameterError, "generation >= 0"),
    ):
        bitmap = kind(100 * G, G)
        bitmap.apply_records(records)
        with pytest.raises(error, match=match):
            bitmap.load_state(*args)
    assert rebuilt(kind, 100 * G, header, data).to_bytes() == source.to_bytes()


def test_records_hold_the_state_at_the_snapshot_while_writers_go_on(busy_switching) -> None:
    size = 64 * 512 * 64 * G  # 64 pages per array
    bitmap = _core.DeltaBitmap(size, G)
    stop = threading.Event()
    # freeze() holds host writes only: a copy's clear_transfer goes on while frozen,
    # so the state compared with is taken with the clears held off, by this lock.
    clears = threading.Lock()

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            offset = int(rng.integers(0, size // G)) * G
            bitmap.write_through(lambda *a: None, lambda *a: None, offset, bytes(G))
            if offset % 7 == 0:
                with clears:
                    bitmap.clear_transfer(offset // G, 1)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    try:
        replica = None
        for round_ in range(12):
            if round_ % 4 == 2:
                bitmap.mark(full=round_ % 8 == 2)
            elif round_ % 4 == 0:
                bitmap.unmark()
            with clears:
                bitmap.freeze()  # hold writes while the state is copied for comparison
                frozen = bitmap.to_bytes()
                header = bitmap.snapshot()
                bitmap.thaw()
            out, taken = bytearray(_layout.MAX_RECORD * 3), []
            while n := bitmap.snapshot_records(out):
                taken.append(bytes(out[:n]))
            bitmap.snapshot_end(True)
            if header[0]:
                replica = _core.DeltaBitmap(size, G)
            data = b"".join(taken)
            assert replica.apply_records(data) == len(data)
            replica.load_state(*header[1:])
            assert replica.to_bytes() == frozen
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_a_write_blocked_on_the_map_goes_in_between_two_holds_of_the_encoding() -> None:
    """A write that finds ``snapshot_records`` holding the map's mutex gets it when that
    hold ends, not when the encoding does: it waits for a few pages' work at most. The
    snapshot holds the page it changed as it was, the next one holds the write (rule 2)."""
    pages = 1024  # per array: 32 holds of 32 pages to encode one chunk in each
    page = 512 * 64 * G  # bytes of the LUN behind a page of a bitmap
    bitmap = _core.DeltaBitmap(pages * page, G)
    _, base = records_of(bitmap)
    bitmap.record_writes([p * page for p in range(pages)], [G] * pages)
    frozen = bitmap.to_bytes()
    late = (pages - 1) * page + G  # a chunk of the last page: encoded in the last hold
    ready, wrote = threading.Event(), threading.Event()
    writer = threading.Thread(
        target=lambda: (ready.set(), bitmap.record_write(late, G), wrote.set())
    )
    seen = []

    def hold_end() -> None:  # the mutex held: the writer blocks on it
        if not seen:
            writer.start()
            ready.wait()
        seen.append(wrote.is_set())

    header = bitmap.snapshot()
    bitmap._on_hold_end(hold_end)
    out, taken = bytearray(1 << 20), []
    while n := bitmap.snapshot_records(out):
        taken.append(bytes(out[:n]))
    bitmap._on_hold_end(None)
    writer.join()
    assert len(seen) == pages // 32 - 1 and not seen[0]
    assert any(seen), "the write waited for the whole encoding"
    bitmap.snapshot_end(True)
    replica = _core.DeltaBitmap(pages * page, G)
    for data in (base, b"".join(taken)):
        assert replica.apply_records(data) == len(data)
    replica.load_state(*header[1:])
    assert replica.to_bytes() == frozen  # the last page as it was at the snapshot
    header, data = records_of(bitmap)
    assert replica.apply_records(data) == len(data)
    replica.load_state(*header[1:])
    assert replica.to_bytes() == bitmap.to_bytes() and replica.tracking_count == pages + 1


@pytest.mark.big
def test_a_16tib_map_checkpoints_what_changed_only() -> None:
    bitmap = _core.DeltaBitmap(1 << 44, G)
    header, data = records_of(bitmap)
    assert header[0] and data == b""  # an empty map's base holds nothing
    for offset in range(0, 1 << 44, 1 << 40):  # 16 writes, one page of tracking each
        bitmap.record_write(offset, 4096)
    header, data = records_of(bitmap)
    assert not header[0] and len(data) == 16 * (16 + 64 + 8)
    replica = _core.DeltaBitmap(1 << 44, G)
    replica.apply_records(records_of(bitmap, everything=True)[1])
    replica.load_state(*header[1:])
    assert replica.tracking_count == bitmap.tracking_count == 16 * 2


# -- activity: the regions kept hot and the log of host writes -----------------------------


@pytest.mark.parametrize("kind", BITMAPS)
def test_the_write_log_holds_each_host_write_before_it_proceeds(kind) -> None:
    bitmap = kind(64 * G, G)
    log = np.zeros(2 + 2 * 3, dtype=np.uint64)  # room for three records
    bitmap.log_writes(log)
    seen = []

    def write(offset, data):
        seen.append(log[: 2 + 2 * int(log[0])].tolist())

    bitmap.write_through(write, None, 5 * G + 1, b"x" * (2 * G))
    bitmap.end_write(0, 3 * G, bool(bitmap.begin_write(0, 3 * G).size))
    bitmap.record_write(40 * G, G)  # not a host write: not logged
    bitmap.write_through(write, None, 63 * G, b"y")
    assert seen[0] == [1, 0, 5, 7]  # logged before the write went on
    assert log.tolist() == [3, 0, 5, 7, 0, 2, 63, 63]
    bitmap.write_through(write, None, 10 * G, b"z")  # no room: flagged, the write goes on
    assert log[:2].tolist() == [3, 1] and len(seen) == 3
    bitmap.log_writes(None)
    bitmap.write_through(write, None, 11 * G, b"z")
    assert log[:2].tolist() == [3, 1]
    with pytest.raises(ParameterError, match="at least 16 bytes"):
        bitmap.log_writes(bytearray(8))


def test_keep_hot_is_the_lru_of_the_regions_written_and_matches_the_twin() -> None:
    """``keep_hot`` (the LRU a checkpoint keeps hot, in one core call): the regions written
    since ``retire_hot`` first, then the earlier ones written after the horizon, newest
    first, cut to half the capacity (grown first when asked), ascending; the core and the
    twin agree over seeded rounds of writes and checkpoints, and bad input changes
    nothing."""
    rng = random.Random(14)
    maps = [kind(8192 * G, G) for kind in BITMAPS]  # 8192 regions: 2 words of summary
    used = [(np.empty(0, np.int64), np.empty(0, np.float64))] * 2
    for bitmap in maps:
        bitmap.track_activity(G, lambda first, last: None)
    for bitmap in maps:  # regions 1 and 7 written; 3 kept from before at times 5 and 9
        for region in (7, 1):
            bitmap.write_through(lambda o, d: None, None, region * G, b"x")
        regions, when, capacity = bitmap.keep_hot([1, 3, 5], [1.0, 5.0, 9.0], 10.0, 2.0, 4, 8, True)
        # 2 written and 2 older is more than half of 4: grown to 8, nothing cut.
        assert (regions.tolist(), when.tolist(), capacity) == (
            [1, 3, 5, 7],
            [10.0, 5.0, 9.0, 10.0],
            8,
        )
        regions, when, capacity = bitmap.keep_hot(
            [1, 3, 5], [1.0, 5.0, 9.0], 10.0, 6.0, 4, 8, False
        )
        assert (regions.tolist(), when.tolist(), capacity) == ([1, 7], [10.0, 10.0], 4)
        with pytest.raises(ParameterError, match="as many times as regions"):
            bitmap.keep_hot([1, 3], [1.0], 10.0, 2.0, 4, 8, True)
        with pytest.raises(ParameterError, match="capacity 9 and limit 8"):
            bitmap.keep_hot([], [], 10.0, 2.0, 9, 8, True)
        bitmap.retire_hot([1, 7])
    for step in range(40):
        for _ in range(rng.randrange(30)):
            offset = rng.randrange(8192) * G
            for bitmap in maps:
                bitmap.write_through(lambda o, d: None, None, offset, b"x")
        now, capacity, grow = float(step), rng.choice([0, 2, 16, 64]), rng.random() < 0.5
        horizon = now - rng.choice([3, 8]) + 0.5
        got = [
            bitmap.keep_hot(*kept, now, horizon, capacity, 64, grow)
            for bitmap, kept in zip(maps, used, strict=True)
        ]
        core, twin = got
        assert core[0].tolist() == twin[0].tolist() and core[1].tolist() == twin[1].tolist()
        assert core[2] == twin[2]
        used = [(regions, when) for regions, when, _ in got]
        retired = [
            bitmap.retire_hot(regions).tolist()
            for bitmap, (regions, _) in zip(maps, used, strict=True)
        ]
        assert retired[0] == retired[1]
        assert maps[0].hot_regions().tolist() == maps[1].hot_regions().tolist()
        assert maps[0].hot_count == maps[1].hot_count


@pytest.mark.parametrize("kind", BITMAPS)
def test_retire_hot_keeps_the_hot_regions_asked_for(kind) -> None:
    bitmap = kind(64 * G, G)
    logged = []
    bitmap.track_activity(8 * G, lambda first, last: logged.append((first, last)))
    for offset in (0, 9 * G, 17 * G):
        bitmap.write_through(lambda o, d: None, None, offset, b"x")
    bitmap.retire_hot([0, 1, 2])
    bitmap.write_through(lambda o, d: None, None, 18 * G, b"x")  # region 2, hot: not logged
    assert bitmap.hot_regions().tolist() == [0, 1, 2]
    assert bitmap.hot_regions(written=True).tolist() == [2]
    assert bitmap.retire_hot([2, 5]).tolist() == [0, 1]  # region 5 was not hot
    assert bitmap.hot_count == 1 and bitmap.hot_regions(written=True).tolist() == []
    bitmap.write_through(lambda o, d: None, None, 0, b"x")  # retired: logged again
    assert logged == [(0, 0), (1, 1), (2, 2), (0, 0)]
    with pytest.raises(RangeError, match="region 8 is outside"):
        bitmap.retire_hot([1, 8])
    assert bitmap.hot_regions().tolist() == [0, 2]
