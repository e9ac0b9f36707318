"""Persistent sessions (isc.store): round trips, corrupt files, crashes, the lock.

Rules checked here (docs/design.md): 2 and 9 (after a crash, every chunk where a
destination may differ from the source is tracked; confirmed chunks are not
resent), 6 (a destination a crashed copy touched reads inconsistent), 10
(corrupt, truncated or foreign metadata raises ``CorruptMetadata`` naming the
file and changes nothing on disk; bad parameters write nothing).

A crash is simulated by copying the state directory while the session is
open: the copy holds exactly what a process killed at that instant leaves on
disk. ``test_crash.py`` kills real processes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import TIMEOUT, assert_no_lost_change, fill_random
from hypothesis import given
from hypothesis import strategies as st

import isc
from isc import CopyJob, CorruptMetadata, DeltaBitmap, DestState, FileLUN, IscError, journal
from isc._core import IO_PWRITE, run_io
from isc.errors import ParameterError, StateError
from isc.store import (
    DEFAULT_HOT_LIMIT,
    METADATA,
    PersistentSession,
    copy,
    create_session,
    open_session,
    read_state,
)

G = 4096
SIZE = 64 * G + 1000  # a short last chunk
REGION = 16 * G  # five activity regions
IO = 4 * G
ROOT = Path(isc.__file__).resolve().parent.parent


def make_session(root: Path) -> Path:
    """A state directory for a random source with two zeroed destinations, opened once."""
    rng = random.Random(7)
    with FileLUN.create(root / "source.img", SIZE) as source:
        fill_random(source, rng)
    for name in ("d1", "d2"):
        FileLUN.create(root / f"{name}.img", SIZE).close()
    state = root / "state"
    create_session(state, str(root / "source.img"), granularity=G, region_size=REGION, max_hot=1000)
    with opened(state) as stored:
        stored.add_destination(str(root / "d1.img"), "d1")
        stored.add_destination(str(root / "d2.img"), "d2")
    return state


@pytest.fixture
def env(tmp_path: Path) -> Path:
    return make_session(tmp_path)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One session for the fuzz tests, which copy its state directory for each example."""
    return make_session(tmp_path_factory.mktemp("template"))


@contextmanager
def opened(state: Path) -> Iterator[PersistentSession]:
    """Open without background checkpoints, so a test decides when one happens."""
    stored, _ = open_session(state, checkpoint_interval=3600)
    try:
        yield stored
    finally:
        stored.close()


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def crash_image(state: Path) -> Path:
    """What a process holding ``state`` open would leave if it were killed now."""
    image = state.with_name(state.name + "-crashed")
    shutil.copytree(state, image, ignore=shutil.ignore_patterns(".lock"))
    return image


def write_random(stored: PersistentSession, rng: random.Random, count: int) -> None:
    for _ in range(count):
        length = rng.randrange(1, 3 * G)
        stored.session.write(rng.randrange(0, SIZE - length), rng.randbytes(length))


def seed_copies(stored: PersistentSession, dests=None) -> None:
    """Unmarked full copy then an incremental: the destinations end consistent and in step."""
    dests = stored.destinations if dests is None else dests
    job = CopyJob(stored.session, dests, io_size=IO)
    job.full(marked=False)
    stored.session.mark()
    job.incremental()
    stored.save()


# -- round trips ---------------------------------------------------------------------------


def test_round_trip_keeps_exact_bitmaps_and_destination_states(env: Path) -> None:
    rng = random.Random(1)
    with opened(env) as stored:
        seed_copies(stored, stored.destinations[:1])
        write_random(stored, rng, 40)
        before = stored.session.bitmap.to_bytes()
        dests = [(d.name, d.state, d.epoch) for d in stored.destinations]
        epoch = stored.session.epoch
    with opened(env) as stored:
        assert stored.session.bitmap.to_bytes() == before
        assert [(d.name, d.state, d.epoch) for d in stored.destinations] == dests
        assert dests[0][1] is DestState.CONSISTENT and dests[1][1] is DestState.NEW
        assert stored.session.epoch == epoch


def test_a_mark_without_saved_chunks_survives_a_clean_close(env: Path) -> None:
    with opened(env) as stored:
        write_random(stored, random.Random(2), 20)
        stored.session.mark()
        before = stored.session.bitmap.to_bytes()
    stored, recovery = open_session(env)
    with stored:
        assert not recovery.interrupted_copy and not recovery.crashed
        assert stored.session.bitmap.marked
        assert stored.session.bitmap.to_bytes() == before


def test_a_mark_with_saved_chunks_ends_at_reopen_and_loses_no_change(env: Path) -> None:
    with opened(env) as stored:
        write_random(stored, random.Random(3), 20)
        stored.session.mark()
        write_random(stored, random.Random(4), 20)  # COFW: the save area dies with the process
        assert stored.session.bitmap.saved_count
        expected = DeltaBitmap.from_bytes(stored.session.bitmap.to_bytes())
    expected.unmark()
    stored, recovery = open_session(env)
    with stored:
        assert recovery.interrupted_copy and not recovery.crashed
        assert stored.session.bitmap.to_bytes() == expected.to_bytes()


def test_a_second_open_is_refused_until_the_first_closes(env: Path) -> None:
    with opened(env), pytest.raises(StateError, match="in use by another isc process"):
        open_session(env)
    with opened(env) as stored:
        assert stored.session.name == "state"


def test_close_is_idempotent_and_a_closed_session_refuses_checkpoints(env: Path) -> None:
    stored, _ = open_session(env)
    stored.close()
    stored.close()
    with pytest.raises(StateError, match="closed"):
        stored.checkpoint()


def test_missing_session_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="holds no isc session"):
        open_session(tmp_path)


def test_add_destination_refuses_duplicates_and_small_luns(env: Path) -> None:
    small = env.parent / "small.img"
    FileLUN.create(small, SIZE - 1).close()
    with opened(env) as stored:
        before = files(env)
        with pytest.raises(ParameterError, match="already has a destination named d1"):
            stored.add_destination(str(env.parent / "d2.img"), "d1")
        with pytest.raises(ParameterError, match="less than the source"):
            stored.add_destination(str(small))
        with pytest.raises(FileNotFoundError, match="cannot open the destination"):
            stored.add_destination(str(env.parent / "missing.img"))
        assert files(env) == before
        assert [d.name for d in stored.destinations] == ["d1", "d2"]


# -- creating ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"granularity": 3000}, ParameterError, "granularity"),
        ({"region_size": 3 * G}, ParameterError, "region_size"),
        ({"max_hot": 0}, ParameterError, "max_hot"),
        ({"hot_limit": 0}, ParameterError, "hot_limit"),
        ({"save_area": (0, None)}, ParameterError, "save_area"),
        ({"source": "missing.img"}, FileNotFoundError, "cannot open the source"),
    ],
)
def test_create_refuses_bad_parameters_and_writes_nothing(
    tmp_path: Path, options: dict, error: type, match: str
) -> None:
    FileLUN.create(tmp_path / "source.img", SIZE).close()
    source = str(tmp_path / options.pop("source", "source.img"))
    with pytest.raises(error, match=match):
        create_session(tmp_path / "state", source, **options)
    assert not (tmp_path / "state").exists()


def test_create_refuses_an_existing_session_or_its_leftovers(env: Path) -> None:
    source = str(env.parent / "source.img")
    with pytest.raises(StateError, match="already holds an isc session"):
        create_session(env, source, granularity=G)
    (env / METADATA).unlink()
    before = files(env)
    with pytest.raises(StateError, match="files of an earlier isc session"):
        create_session(env, source, granularity=G)
    assert files(env) == before


def test_create_refuses_a_state_directory_inside_or_around_another_sessions(env: Path) -> None:
    source = str(env.parent / "d2.img")
    (env.parent / "alias").symlink_to(env)  # another spelling: found by device and inode
    for inner in (env / "sub", env.parent / "alias" / "a" / "b"):
        with pytest.raises(ParameterError, match=f"lies in {env}, the state directory of"):
            create_session(inner, source, granularity=G)
    assert not (env / "sub").exists() and not (env / "a").exists()
    with pytest.raises(ParameterError, match=f"holds {env}, the state directory of session"):
        create_session(env.parent, source, granularity=G)
    assert not (env.parent / METADATA).exists()


@pytest.mark.parametrize("in_file", [False, True], ids=["memory", "file"])
@pytest.mark.parametrize("capacity", [1, G - 1])
def test_create_refuses_a_save_area_smaller_than_one_chunk(
    tmp_path: Path, capacity: int, in_file: bool
) -> None:
    FileLUN.create(tmp_path / "source.img", SIZE).close()
    area = str(tmp_path / "area.bin") if in_file else None
    message = f"save area of {capacity} bytes cannot hold one chunk of {G} bytes .granularity 4K."
    source = str(tmp_path / "source.img")
    with pytest.raises(ParameterError, match=message) as refused:
        create_session(tmp_path / "state", source, granularity=G, save_area=(capacity, area))
    assert "give a save area of at least 4K" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.img"]


def test_a_save_area_of_the_whole_source_shorter_than_a_chunk_is_taken(tmp_path: Path) -> None:
    # Its one chunk is short: an area of the source's size holds it.
    FileLUN.create(tmp_path / "source.img", 1000).close()
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "source.img"), granularity=G, save_area=(1000, None))
    with opened(state) as stored:
        stored.session.mark(full=True)
        stored.session.write(0, b"x" * 1000)  # saves the chunk: the mark stays
        assert stored.session.bitmap.marked and stored.session.save_area.used == 1000


def test_a_save_area_that_is_no_multiple_of_the_chunk_keeps_its_size(tmp_path: Path) -> None:
    # Kept as given: it holds one chunk of G, and the rest serves the short last chunk alone.
    state = make_session(tmp_path)
    shutil.rmtree(state)
    create_session(state, str(tmp_path / "source.img"), granularity=G, save_area=(G + G // 2, None))
    assert read_state(state).meta["save_area"] == {"capacity": G + G // 2, "path": None}
    with opened(state) as stored:
        session = stored.session
        session.mark(full=True)
        session.write(SIZE - 10, b"last")  # the short last chunk: 1000 bytes
        session.write(0, b"first")
        assert session.save_area.used == G + 1000 and session.bitmap.marked
        session.write(G, b"second")  # no room for another chunk: the mark ends
        assert not session.bitmap.marked
        assert session.bitmap.tracking_count == session.bitmap.chunks  # nothing lost


def test_a_save_area_smaller_than_a_chunk_of_an_older_session_loses_nothing(env: Path) -> None:
    # Sessions made before create refused such an area still open: every COFW aborts
    # the mark, so a marked copy that meets a host write fails and resends (rules 2, 5).
    meta = _meta(env)
    meta["save_area"] = {"capacity": G - 1, "path": None}
    (env / METADATA).write_text(json.dumps(meta))
    with opened(env) as stored:
        seed_copies(stored)
        session = stored.session
        session.unmark()
        session.write(0, b"x" * 10)  # tracked only: unmarked
        session.mark()  # chunk 0 to send
        session.write(5, b"y")  # its COFW does not fit: the mark ends, the write lands
        assert not session.bitmap.marked and session.read(0, 6) == b"xxxxxy"
        with pytest.raises(IscError, match="save area full"):
            copy(stored, "incremental", io_size=IO)
        for dest in stored.destinations:
            assert_no_lost_change(session, dest.lun)


# -- corrupt files -------------------------------------------------------------------------


def _meta(env: Path) -> dict:
    return json.loads((env / METADATA).read_bytes())


def _with(**fields):
    def edit(meta: dict) -> bytes:
        meta.update(fields)
        return json.dumps(meta).encode()

    return edit


def _dest_with(**fields):
    def edit(meta: dict) -> bytes:
        meta["destinations"][0].update(fields)
        return json.dumps(meta).encode()

    return edit


SESSION_DAMAGE = {
    "empty": lambda meta: b"",
    "not JSON": lambda meta: b"{not json",
    "truncated": lambda meta: json.dumps(meta).encode()[:40],
    "not UTF-8": lambda meta: b"\xff\xfe\x00",
    "a list": lambda meta: b"[1, 2]",
    "foreign": _with(format="something-else"),
    "newer version": _with(version=2),
    "granularity a string": _with(granularity="4K"),
    "granularity a bool": _with(granularity=True),
    "granularity 3000": _with(granularity=3000),
    "no source": _with(source=None),
    "save area a string": _with(save_area="64M"),
    "save area capacity 0": _with(save_area={"capacity": 0, "path": None}),
    "region size not a power of two": _with(region_size=3 * G),
    "max_hot null": _with(max_hot=None),
    "hot_limit a string": _with(hot_limit="8"),
    "negative epoch": _with(epoch=-1),
    "destinations not a list": _with(destinations={"d1": {}}),
    "destination a number": _with(destinations=[1]),
    "destination state unknown": _dest_with(state="shiny"),
    "destination state unhashable": _dest_with(state=["new"]),
    "destination epoch a string": _dest_with(epoch="3"),
    "destination protected state unknown": _dest_with(protected_state="shiny"),
    "destination problem a number": _dest_with(problem=3),
    "destination names repeat": lambda meta: json.dumps(
        {**meta, "destinations": [meta["destinations"][0]] * 2}
    ).encode(),
    "copy of an unknown destination": _with(copy={"mode": "full", "destinations": ["d9"]}),
    "copy of an unknown mode": _with(copy={"mode": "sideways", "destinations": ["d1"]}),
}


def status_error(env: Path) -> str:
    """What :func:`read_state` says is wrong: the error it raises, or the damage it reports."""
    try:
        state = read_state(env)
    except CorruptMetadata as exc:
        return str(exc)
    assert state.damage is not None and state.bitmap is None
    return state.damage


@pytest.mark.parametrize("damage", SESSION_DAMAGE.values(), ids=SESSION_DAMAGE.keys())
def test_corrupt_session_file_names_the_file_and_changes_nothing(env: Path, damage) -> None:
    (env / METADATA).write_bytes(damage(_meta(env)))
    before = files(env)
    with pytest.raises(CorruptMetadata, match=METADATA):
        open_session(env)
    assert METADATA in status_error(env)
    assert files(env) == before


def _checkpoint(env: Path) -> Path:
    return env / journal.NAME


def _foreign_checkpoint(data: bytes) -> bytes:
    """The journal of a session that tracks the same LUN at another granularity."""
    with tempfile.TemporaryDirectory() as tmp:
        bitmap = DeltaBitmap(SIZE, 2 * G)
        writer = journal.Journal(Path(tmp), None, 1)
        writer.write(bitmap, 1, bitmap.snapshot())
        writer.close()
        return (Path(tmp) / journal.NAME).read_bytes()


def _flipped(at: int):
    return lambda data: data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


CHECKPOINT_DAMAGE = {
    "empty": lambda data: b"",
    # The last checkpoint, cut short: a crash in it would have kept the logs it replaced.
    "truncated": lambda data: data[:-5],
    "the base's header": _flipped(50),
    "the last commit": _flipped(-3),
    "random bytes": lambda data: random.Random(5).randbytes(len(data)),
    "another granularity": _foreign_checkpoint,
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE.values(), ids=CHECKPOINT_DAMAGE.keys())
def test_corrupt_checkpoint_names_the_file_and_changes_nothing(env: Path, damage) -> None:
    path = _checkpoint(env)
    path.write_bytes(damage(path.read_bytes()))
    before = files(env)
    with pytest.raises(CorruptMetadata, match=path.name):
        open_session(env)
    assert path.name in status_error(env)
    assert files(env) == before


def _record(first: int, last: int) -> bytes:
    body = struct.pack("<QQ", first, last)
    return body + struct.pack("<I", zlib.crc32(body))


def _log(env: Path) -> Path:
    (path,) = env.glob("activity.*.log")
    return path


@pytest.mark.parametrize(
    "record",
    [
        _record(1, 2)[:-1] + bytes([_record(1, 2)[-1] ^ 0xFF]),  # bad checksum
        _record(3, 1),  # last before first
        _record(0, 5),  # region 5 starts past the end of the source
        _record(2**63, 2**64 - 1),  # would be an endless range
    ],
    ids=["bad checksum", "reversed", "past the end", "huge"],
)
def test_corrupt_activity_log_names_the_file_and_changes_nothing(env: Path, record) -> None:
    path = _log(env)
    path.write_bytes(_record(0, 0) + record)
    before = files(env)
    with pytest.raises(CorruptMetadata, match=path.name):
        open_session(env)
    assert path.name in status_error(env)
    assert files(env) == before


def test_torn_last_log_record_is_ignored(env: Path) -> None:
    path = _log(env)
    path.write_bytes(_record(1, 2) + _record(4, 4)[:11])
    for writes in env.glob("activity.*.writes"):
        writes.unlink()  # as after a crash of the machine: the regions stand for the writes
    stored, recovery = open_session(env)
    with stored:
        assert recovery.crashed and recovery.regions_resent == 2
        tracked = [
            c for c in range(stored.session.bitmap.chunks) if stored.session.bitmap.tracking(c)
        ]
        assert tracked == list(range(REGION // G, 3 * REGION // G))


# -- checkpoints: the journal ----------------------------------------------------------------


def test_a_checkpoint_writes_the_pages_that_changed_not_the_lun(tmp_path: Path) -> None:
    FileLUN.create(tmp_path / "big.img", 1 << 36).close()  # 64 GiB, sparse: 2^25 chunks
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "big.img"), granularity=2048)
    with opened(state) as stored:
        path = _checkpoint(state)
        before = path.stat().st_size
        for offset in range(0, 1 << 36, 1 << 32):  # 16 pages of tracking
            stored.session.write(offset, b"x" * 4096)
        stored.checkpoint()
        grown = path.stat().st_size - before
        stored.session.mark()
        stored.checkpoint()  # a mark swaps roles: no page changes
        marked = path.stat().st_size - before - grown
    assert grown == journal.HEADER_SIZE + 16 * (16 + 64 + 8) + 16
    assert marked == journal.HEADER_SIZE + 16


def _journal_with_pages(env: Path) -> tuple[bytes, list[journal.Segment]]:
    """Write, checkpoint twice: the journal's bytes and its segments (base, then changes)."""
    rng = random.Random(21)
    with opened(env) as stored:
        seed_copies(stored)
        write_random(stored, rng, 20)
        stored.checkpoint()
        write_random(stored, rng, 20)
    data = _checkpoint(env).read_bytes()
    with open(_checkpoint(env), "rb") as file:
        segments, torn = journal._segments(file, _checkpoint(env))
    assert torn is None and sum(s.records > 0 for s in segments) >= 2
    return data, segments


def test_a_damaged_page_of_an_older_checkpoint_names_the_file_and_the_page(env: Path) -> None:
    data, segments = _journal_with_pages(env)
    older = next(s for s in segments[:-1] if s.records)
    at = older.at + journal.HEADER_SIZE + 20  # inside the segment's first page record
    _checkpoint(env).write_bytes(_flipped(at)(data))
    before = files(env)
    with pytest.raises(CorruptMetadata, match=rf"{journal.NAME}: checkpoint {older.seq}: .*page"):
        open_session(env)
    assert files(env) == before


def test_a_checkpoint_cut_short_by_a_crash_is_left_out_and_loses_no_change(env: Path) -> None:
    """A kill while a checkpoint is written leaves it torn anywhere: cut, or with any byte
    of it (a page record, the header, the commit) unwritten. Its checksums say so, and the
    checkpoint before it and the activity logs since then (still there) lose no change."""
    rng = random.Random(22)
    with opened(env) as stored:
        seed_copies(stored)
        write_random(stored, rng, 30)
        stored.checkpoint()
        write_random(stored, rng, 30)  # logged in the log the next checkpoint retires
        image = crash_image(env)
        length = _checkpoint(env).stat().st_size
        stored.checkpoint()
        segment = _checkpoint(env).read_bytes()[length:]
        expected = stored.session.bitmap.to_bytes()
    assert len(segment) > journal.HEADER_SIZE + 16 + 16  # it holds page records
    for cut in sorted(rng.sample(range(len(segment)), 12)):
        torn = [segment[:cut], segment[:cut] + bytes(len(segment) - cut), _flipped(cut)(segment)]
        for tail in torn:
            attempt = image.with_name(f"torn-{cut}")
            shutil.rmtree(attempt, ignore_errors=True)
            shutil.copytree(image, attempt)
            with open(_checkpoint(attempt), "ab") as file:
                file.write(tail)
            stored, recovery = open_session(attempt)
            with stored:
                assert recovery.crashed
                for dest in stored.destinations:
                    assert_no_lost_change(stored.session, dest.lun)
                bitmap = DeltaBitmap.from_bytes(expected)
                assert all(  # what the whole checkpoint held is tracked
                    stored.session.bitmap.tracking(c)
                    for c in range(bitmap.chunks)
                    if bitmap.tracking(c)
                )


def test_the_journal_starts_a_new_file_once_the_changes_outgrow_the_base(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "COMPACT_AFTER", 1000)
    rng = random.Random(23)
    sizes = []
    with opened(env) as stored:
        for _ in range(12):
            write_random(stored, rng, 10)
            stored.checkpoint()
            sizes.append(_checkpoint(env).stat().st_size)
        expected = stored.session.bitmap.to_bytes()
    assert any(after < before for before, after in itertools.pairwise(sizes))
    assert max(sizes) < 3 * 1000  # base + what follows it + one more checkpoint
    with opened(env) as stored:
        assert stored.session.bitmap.to_bytes() == expected


def test_a_failed_checkpoint_write_keeps_the_older_one_and_the_next_starts_afresh(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(24)
    calls = []

    def failing(steps):
        calls.append(steps)
        if len(calls) == 1:  # the checkpoint's one write: half of it reaches the file
            _, fd, data, offset = steps[0]
            run_io([(IO_PWRITE, fd, bytes(data)[: len(data) // 2], offset)])
            raise OSError(28, "No space left on device")
        run_io(steps)

    with opened(env) as stored:
        seed_copies(stored)
        write_random(stored, rng, 30)
        stored.checkpoint()
        write_random(stored, rng, 30)
        monkeypatch.setattr(journal, "run_io", failing)
        with pytest.raises(OSError, match="No space left"):
            stored.checkpoint()
        image = crash_image(env)  # what a crash right after the failure leaves
        monkeypatch.setattr(journal, "run_io", run_io)
        write_random(stored, rng, 5)
        stored.checkpoint()  # a base, in a new file
        with open(_checkpoint(env), "rb") as file:
            segments, _ = journal._segments(file, _checkpoint(env))
        assert len(segments) == 1 and segments[0].base
        expected = stored.session.bitmap.to_bytes()
    with opened(env) as stored:
        assert stored.session.bitmap.to_bytes() == expected
    stored, recovery = open_session(image)
    with stored:
        assert recovery.crashed
        for dest in stored.destinations:
            assert_no_lost_change(stored.session, dest.lun)


# -- crashes -------------------------------------------------------------------------------


def test_crash_after_writes_tracks_every_logged_region(env: Path) -> None:
    rng = random.Random(8)
    with opened(env) as stored:
        seed_copies(stored)
        stored.checkpoint()
        write_random(stored, rng, 30)
        image = crash_image(env)
        assert read_state(env).in_use
    state = read_state(image)
    assert not state.in_use and state.pending_regions > 0
    before = files(image)
    stored, recovery = open_session(image)
    with stored:
        assert recovery.crashed and recovery.regions_resent == state.pending_regions
        assert not recovery.interrupted_copy
        for dest in stored.destinations:
            assert dest.state is DestState.CONSISTENT
            assert_no_lost_change(stored.session, dest.lun)
    assert before != files(image)  # the recovery was checkpointed


def _tracked(stored: PersistentSession) -> set[int]:
    bitmap = stored.session.bitmap
    return {c for c in range(bitmap.chunks) if bitmap.tracking(c)}


@pytest.mark.parametrize(
    "tail",
    [bytes(n) for n in range(1, 21)]
    + [bytes(60), _record(3, 3)[:12] + bytes(8), _record(3, 3)[:12] + bytes(48)],
    ids=[f"{n} zero bytes" for n in range(1, 21)]
    + ["three zero records", "a record torn at a sector", "torn at a sector, then zeros"],
)
def test_a_zero_filled_or_torn_tail_of_the_log_is_an_unfinished_append(
    env: Path, tail: bytes
) -> None:
    """After a crash of the machine the log's size can reach the disk before the data of an
    append that was never synced (ext4, xfs): zeros to the end of the file, from a record or
    from the sector boundary inside it (byte 512 here) on. The write the append announced
    waited for its sync, so it never happened: the records before stand, nothing is
    refused."""
    path = _log(env)
    path.write_bytes(_record(1, 2) * 25 + tail)
    for writes in env.glob("activity.*.writes"):
        writes.unlink()  # as after a crash of the machine: the regions stand for the writes
    assert read_state(env).damage is None
    stored, recovery = open_session(env)
    with stored:
        assert recovery.crashed and recovery.regions_resent == 2


@pytest.mark.parametrize(
    "bad",
    [bytes(20) + _record(4, 4), bytes(45) + _record(4, 4)[5:], _record(4, 4)[:9] + bytes(11)],
    ids=["a zero record, then a record", "zeros, then a record", "zeros from no sector"],
)
def test_zeros_the_log_cannot_hold_after_a_crash_are_corrupt(env: Path, bad: bytes) -> None:
    """Zeros followed by a whole record are no unfinished append (each append is synced
    before the next begins), nor is a record zero from inside a sector: corrupt metadata
    naming the file, and nothing changes."""
    path = _log(env)
    path.write_bytes(_record(1, 2) + bad)
    before = files(env)
    with pytest.raises(CorruptMetadata, match=f"{path.name}: record at byte 20 is corrupt"):
        open_session(env)
    assert path.name in status_error(env)
    assert files(env) == before


@pytest.mark.parametrize("write_log", ["kept", "of another boot", "overflowed", "lost"])
def test_a_crash_resends_what_was_written_or_the_regions_whole(env: Path, write_log) -> None:
    """After a crash of the process the write log says which chunks were written since the
    last checkpoint; where it cannot stand for them (a crash of the machine loses it), the
    region log does, a whole region for a write."""
    with opened(env) as stored:
        stored.checkpoint()
        for offset in (G + 5, 40 * G):  # regions 0 and 2
            stored.session.write(offset, b"x" * 10)
        image = crash_image(env)
    (writes,) = image.glob("activity.*.writes")
    with open(writes, "r+b") as file:
        if write_log == "of another boot":
            file.seek(16)
            file.write(b"0" * 36)
        elif write_log == "overflowed":
            file.seek(64 + 8)
            file.write(struct.pack("<Q", 1))
    if write_log == "lost":
        writes.unlink()
    stored, recovery = open_session(image)
    with stored:
        assert recovery.crashed and recovery.regions_resent == 2
        if write_log == "kept":
            assert _tracked(stored) == {1, 40}
            assert recovery.bytes_resent_bound == 2 * G
        else:
            assert _tracked(stored) == set(range(16)) | set(range(32, 48))
            assert recovery.bytes_resent_bound == 2 * REGION


def test_the_hot_set_stays_across_checkpoints_until_a_region_goes_an_interval_unwritten(
    env: Path,
) -> None:
    """Back-to-back checkpoints keep a working set hot (an LRU, as DRBD's activity log);
    a region left unwritten for a checkpoint interval (3600 s here) cools."""
    now = [0.0]
    with opened(env) as stored:
        seed_copies(stored)
        stored._clock = lambda: now[0]
        logged = logging_regions(stored)
        stored.session.write(0, b"x")
        stored.session.write(2 * REGION, b"x")
        for _ in range(4):
            stored.checkpoint()
            stored.session.write(10, b"x")  # still hot: no record, no sync
        stored.session.write(2 * REGION + 10, b"x")  # hot too, after four checkpoints
        assert logged == [0, 2]
        for now[0] in (1000.0, 4000.0, 4700.0):  # region 2 last found written at 1000
            stored.checkpoint()
            stored.session.write(10, b"x")
        stored.session.write(2 * REGION + 10, b"x")  # it cooled: a record again
        assert logged == [0, 2, 2]
        image = machine_crash_image(env)
    stored, recovery = open_session(image)
    with stored:  # region 0 is in the log as kept hot, region 2 as logged again
        assert recovery.regions_resent == 2
        assert_no_lost_change(stored.session, stored.destinations[0].lun)


HOT_REGIONS = 64


def hot_session(root: Path, max_hot: int, hot_limit: int) -> Path:
    """A session on a zeroed source of ``HOT_REGIONS`` regions whose one destination is in
    step, its hot set starting at ``max_hot`` regions and growing to ``hot_limit``."""
    for name in ("source", "dest"):
        FileLUN.create(root / f"{name}.img", HOT_REGIONS * REGION).close()
    state = root / "hot"
    create_session(
        state,
        str(root / "source.img"),
        granularity=G,
        region_size=REGION,
        max_hot=max_hot,
        hot_limit=hot_limit,
    )
    with opened(state) as stored:
        stored.add_destination(str(root / "dest.img"), "dest")
        seed_copies(stored)
    return state


def logging_regions(stored: PersistentSession) -> list[int]:
    """The first region of each record the session's region log appends from now on."""
    logged: list[int] = []
    append = stored._log.append
    stored._log.append = lambda first, last: (logged.append(first), append(first, last))
    return logged


def machine_crash_image(state: Path) -> Path:
    """What a crash of the machine leaves: the write logs' unsynced pages are gone."""
    image = crash_image(state)
    for writes in image.glob("activity.*.writes"):
        writes.unlink()
    return image


def write_rounds(stored: PersistentSession, regions: list[int], rng: random.Random) -> None:
    """Ten writes to each of ``regions`` in a random order, then a checkpoint."""
    order = regions * 10
    rng.shuffle(order)
    for region in order:
        stored.session.write(region * REGION + rng.randrange(REGION - 512), rng.randbytes(512))
    stored.checkpoint()


@pytest.mark.parametrize("hot_limit", [32, 8])
def test_the_hot_set_grows_to_the_working_set_within_its_limit(
    tmp_path: Path, hot_limit: int
) -> None:
    """Random writes over 12 regions, a hot set of 4 to start: it doubles while writes keep
    waiting for records, until the 12 stay hot (no record at all) or it reaches its limit."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=hot_limit)
    working = list(range(0, 60, 5))
    rng = random.Random(hot_limit)
    with opened(state) as stored:
        for _ in range(6):
            write_rounds(stored, working, rng)
        logged = logging_regions(stored)
        write_rounds(stored, working, rng)
        assert stored.hot_capacity == hot_limit
        if hot_limit >= 2 * len(working):
            assert logged == []
        else:  # what a checkpoint keeps is bounded: the others wait for a record again
            assert len(logged) >= len(working) - hot_limit // 2
        # One instant: a checkpoint the writes woke (a log half full) retires logs as the
        # copy reads them, which no crash leaves.
        with stored._checkpoint_lock:
            image = machine_crash_image(state)
    stored, recovery = open_session(image)
    with stored:
        assert_no_lost_change(stored.session, stored.destinations[0].lun)
        assert recovery.regions_resent <= len(working)


def test_a_crash_after_the_hot_set_grew_and_before_its_checkpoint_loses_nothing(
    tmp_path: Path,
) -> None:
    """The checkpoint that grows the hot set logs the regions it keeps in the next log
    before it writes the journal: a crash between the two finds both logs."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=64)
    images = []
    with opened(state) as stored:
        write_journal = stored._journal.write

        def crash_then_write(*args):
            if stored.hot_capacity > 4 and not images:
                images.append(machine_crash_image(state))
            write_journal(*args)

        stored._journal.write = crash_then_write
        write_rounds(stored, [1, 2, 3], random.Random(3))  # 3 records in 30 writes: it grows
        assert stored.hot_capacity == 8 and images  # half of 8 kept: all three
        assert stored.session.bitmap.hot_regions().tolist() == [1, 2, 3]
    stored, recovery = open_session(images[0])
    with stored:
        assert_no_lost_change(stored.session, stored.destinations[0].lun)
        assert recovery.regions_resent == 3


def test_a_session_file_without_a_hot_limit_takes_the_default(env: Path) -> None:
    meta = _meta(env)
    del meta["hot_limit"]
    (env / METADATA).write_text(json.dumps(meta))
    with opened(env) as stored:
        assert stored.hot_limit == DEFAULT_HOT_LIMIT and stored.hot_capacity == 1000


def test_a_write_to_a_region_just_evicted_waits_for_its_record_again(tmp_path: Path) -> None:
    """A checkpoint keeps half the hot set's capacity: of three regions written, the third
    is evicted, and the next write to it is logged before it proceeds."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=4)
    with opened(state) as stored:
        logged = logging_regions(stored)
        for region in (1, 2, 3):
            stored.session.write(region * REGION, b"x")
        stored.checkpoint()
        assert stored.session.bitmap.hot_regions().tolist() == [1, 2]
        stored.session.write(3 * REGION + 7, b"y")
        assert logged == [1, 2, 3, 3]
        image = machine_crash_image(state)
    stored, recovery = open_session(image)
    with stored:
        assert_no_lost_change(stored.session, stored.destinations[0].lun)
        assert recovery.regions_resent == 3
        assert stored.session.bitmap.tracking(3 * REGION // G)


def _crash_mid_copy(env: Path, mode: str, dests: slice, at_run: int) -> tuple[Path, set[int]]:
    """Run a ``mode`` copy to ``destinations[dests]``; take its crash image at run ``at_run``.

    Returns the image and the chunks the copy had to send (for a marked copy).
    """
    image: list[Path] = []
    with opened(env) as stored:
        seed_copies(stored)
        write_random(stored, random.Random(9), 60)
        bitmap = stored.session.bitmap
        if mode == "incremental":
            stored.session.mark()
        to_send = {c for c in range(bitmap.chunks) if bitmap.transfer(c)}

        def progress(done: int, total: int) -> None:
            if not image and done >= at_run * IO:
                stored.checkpoint()
                image.append(crash_image(env))

        job_dests = stored.destinations[dests]
        job = CopyJob(stored.session, job_dests, io_size=IO, progress=progress)
        stored.begin_copy(job_dests, mode)
        if mode == "incremental":
            job.incremental()
        else:
            job.full(marked=mode == "full")
        stored.save()
    return image[0], to_send


def test_crash_in_an_unmarked_full_copy_resends_everything(env: Path) -> None:
    image, _ = _crash_mid_copy(env, "full-unmarked", slice(None), at_run=5)
    stored, recovery = open_session(image)
    with stored:
        bitmap = stored.session.bitmap
        assert recovery.crashed and recovery.interrupted_copy
        # The copy cleared tracking as it began and sent only part: all is tracked.
        assert bitmap.tracking_count == bitmap.chunks
        assert all(d.state is DestState.INCONSISTENT for d in stored.destinations)
        stored.session.mark()
        CopyJob(stored.session, stored.destinations, io_size=IO).incremental()
        source = stored.source.read(0, SIZE)
        for dest in stored.destinations:
            assert dest.state is DestState.CONSISTENT
            assert dest.lun.read(0, SIZE) == source


def test_crash_in_a_marked_copy_keeps_what_it_confirmed(env: Path) -> None:
    image, to_send = _crash_mid_copy(env, "incremental", slice(0, 1), at_run=3)
    stored, recovery = open_session(image)
    with stored:
        bitmap = stored.session.bitmap
        d1, d2 = stored.destinations
        assert recovery.interrupted_copy and not bitmap.marked
        assert d1.state is DestState.INCONSISTENT and d2.state is DestState.CONSISTENT
        # d1 got what the copy cleared; d2, left out of the copy, did not: only d1 is in step.
        assert d1.epoch == stored.session.epoch != d2.epoch
        assert_no_lost_change(stored.session, d1.lun)
        # What the copy confirmed before its last checkpoint is not sent again.
        confirmed = {c for c in to_send if not bitmap.tracking(c)}
        assert len(confirmed) >= 3 * IO // G - 1  # the last chunk is short
        source = stored.source.read(0, SIZE)
        stored.session.mark()
        result = CopyJob(stored.session, [d1], io_size=IO).incremental()
        assert result.bytes_seeded == 0
        assert d1.state is DestState.CONSISTENT and d1.lun.read(0, SIZE) == source


# A child that runs a MODE copy to d1 and d2 and, while the copy's first write to d1 waits
# on an event, adds (or with "remove": adds and removes) destination d3, checkpoints (as the
# background checkpointer would at any time; it must flush the copy's destinations first),
# lets the copy go on, and SIGKILLs itself once the copy has written d2 once: a crash with
# the copy under way after the add-dest.
EDIT_MID_COPY_CHILD = r"""
import os, signal, sys, threading
from isc.store import copy, open_session

mode, edit, state, d3, io = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
stored, _ = open_session(state, checkpoint_interval=3600)

class Parked:
    # A LUN whose first write waits for `go` after setting `reached`; the second
    # write of one with `stop` kills the process (the first completed).
    def __init__(self, lun, stop=False):
        self.lun, self.size, self.writes, self.flushes, self.stop = lun, lun.size, 0, 0, stop
        self.reached, self.go = threading.Event(), threading.Event()
    closed = property(lambda self: self.lun.closed)
    def read(self, offset, length): return self.lun.read(offset, length)
    def readinto(self, offset, buffer): self.lun.readinto(offset, buffer)
    def flush(self):
        self.flushes += 1
        self.lun.flush()
    def close(self): self.lun.close()
    def write(self, offset, data):
        self.writes += 1
        if self.writes == 1 and not self.stop:
            self.reached.set()
            assert self.go.wait(60)
        if self.writes == 2 and self.stop:
            os.kill(os.getpid(), signal.SIGKILL)
        self.lun.write(offset, data)

d1, d2 = stored.destinations
d1.lun, d2.lun = Parked(d1.lun), Parked(d2.lun, stop=True)
threading.Thread(target=copy, args=(stored, mode), kwargs={"io_size": io}, daemon=True).start()
assert d1.lun.reached.wait(60)
stored.add_destination(d3, "d3")
if edit == "remove":
    stored.remove_destination("d3")
stored.checkpoint()
if not d1.lun.flushes or not d2.lun.flushes:
    sys.exit("the checkpoint did not flush the copy's destinations")
d1.lun.go.set()
threading.Event().wait(60)
sys.exit("the copy did not write d2 twice")
"""


@pytest.mark.parametrize("edit", ["add", "remove"])
@pytest.mark.parametrize("mode", ["incremental", "full-unmarked"])
def test_a_crash_after_a_destination_was_added_mid_copy_keeps_the_copy_s_record(
    env: Path, mode: str, edit: str
) -> None:
    """Rules 2, 6, 9: adding (or removing) a destination while a copy runs keeps the
    record of the copy that a crash recovery reads: its destinations read inconsistent
    and what it cleared is sent again when it was unmarked."""
    with opened(env) as stored:
        seed_copies(stored)
        write_random(stored, random.Random(11), 40)
        if mode == "incremental":
            stored.session.mark()
    FileLUN.create(env.parent / "d3.img", SIZE).close()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    args = [mode, edit, str(env), str(env.parent / "d3.img"), str(IO)]
    child = subprocess.run(
        [sys.executable, "-c", EDIT_MID_COPY_CHILD, *args],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    stored, recovery = open_session(env)
    with stored:
        assert recovery.interrupted_copy
        names = [d.name for d in stored.destinations]
        assert names == (["d1", "d2", "d3"] if edit == "add" else ["d1", "d2"])
        source = stored.source.read(0, SIZE)
        for dest in stored.destinations:
            if dest.state is DestState.CONSISTENT:
                assert dest.lun.read(0, SIZE) == source, f"{dest.name} reads consistent"
        for dest in stored.destinations[:2]:
            assert dest.state is DestState.INCONSISTENT
            assert_no_lost_change(stored.session, dest.lun)
        stored.session.mark()
        copy(stored, "incremental", io_size=IO)
        for dest in stored.destinations:
            assert dest.state is DestState.CONSISTENT and dest.lun.read(0, SIZE) == source


# -- read_state ----------------------------------------------------------------------------


def test_read_state_writes_nothing_and_sees_a_copy_in_progress(env: Path) -> None:
    with opened(env) as stored:
        stored.begin_copy(stored.destinations[:1], "full")
        before = files(env)
        state = read_state(env)
        assert files(env) == before
        assert state.in_use and state.meta["copy"] == {"mode": "full", "destinations": ["d1"]}
        assert [d["state"] for d in state.meta["destinations"]] == ["inconsistent", "new"]
        stored.save()
    assert "copy" not in read_state(env).meta


# -- fuzzing -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["capacity", "path", "name", "target", "state", "epoch", "mode"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=8,
)
_FIELDS = (
    "name",
    "source",
    "granularity",
    "save_area",
    "region_size",
    "max_hot",
    "hot_limit",
    "epoch",
    "destinations",
    "copy",
    "format",
    "version",
    "checkpointed",
    "source_stamp",
)
PATH_FIELDS = ("source", "destinations", "save_area")


@contextmanager
def scratch_copy(env: Path) -> Iterator[Path]:
    """A fresh copy of the state directory, and the working directory inside it.

    A fuzzed relative path (a save area file) then lands in the scratch space.
    """
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "state"
        shutil.copytree(env, copy)
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            yield copy
        finally:
            os.chdir(cwd)


def _open_or_clear_error(state: Path, allowed: tuple[type[BaseException], ...]) -> None:
    """Open ``state`` and use it, or fail with an allowed error that names the file."""
    before = files(state)
    try:
        stored, _ = open_session(state, checkpoint_interval=3600)
    except allowed as exc:
        assert files(state) == before
        assert isinstance(exc, OSError) or str(state) in str(exc)
        return
    with stored:  # opened: then every field is fit for use
        assert type(stored.session.epoch) is int
        assert all(d.epoch is None or type(d.epoch) is int for d in stored.destinations)
        stored.session.write(0, b"x" * 100)
        stored.session.mark()
        stored.session.unmark()
        stored.checkpoint()


@given(key=st.sampled_from(sorted(_FIELDS)), value=json_values)
def test_fuzzed_session_field_opens_cleanly_or_raises_a_clear_error(template: Path, key, value):
    with scratch_copy(template) as state:
        meta = _meta(state)
        meta[key] = value
        (state / METADATA).write_text(json.dumps(meta))
        allowed = (IscError, OSError) if key in PATH_FIELDS else (IscError,)
        _open_or_clear_error(state, allowed)


@given(data=st.binary(max_size=200))
def test_fuzzed_session_bytes_raise_corrupt_metadata(template: Path, data: bytes) -> None:
    with scratch_copy(template) as state:
        (state / METADATA).write_bytes(data)
        with pytest.raises(CorruptMetadata, match=METADATA):
            open_session(state)


@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10_000),
    tail=st.binary(max_size=8),
)
def test_fuzzed_checkpoint_opens_unchanged_or_raises_corrupt_metadata(
    template: Path, edits, cut: int, tail: bytes
) -> None:
    with scratch_copy(template) as state:
        path = _checkpoint(state)
        data = bytearray(path.read_bytes())
        original = bytes(data)
        for at, value in edits:
            data[at % len(data)] = value
        data = data[: len(data) - cut % 16] + tail
        path.write_bytes(bytes(data))
        if bytes(data[: len(original)]) == original:
            _open_or_clear_error(state, ())  # at most a tail that a crash cut short
        else:
            with pytest.raises(CorruptMetadata, match=path.name):
                open_session(state)


def test_a_session_of_an_earlier_isc_without_an_id_gets_one_and_keeps_its_changes(
    env: Path,
) -> None:
    # Session files and journals written before checkpoints named their session
    # (no "id"; the header's session field zero) open as before and get an id.
    state = env
    with opened(state) as stored:
        stored.session.write(3 * G, b"tracked")
    meta = json.loads((state / METADATA).read_bytes())
    del meta["id"]
    (state / METADATA).write_text(json.dumps(meta))
    header = journal.HEADER_SIZE - 4  # a header's bytes before its crc
    with open(state / journal.NAME, "r+b") as file:  # as an earlier isc wrote it
        segments, _ = journal._segments(file, state / journal.NAME)
        for segment in segments:
            file.seek(segment.at)
            head = bytearray(file.read(header))
            head[header - 8 :] = bytes(8)
            file.seek(segment.at)
            file.write(head + struct.pack("<I", zlib.crc32(head)))
    assert journal.read(state / journal.NAME).session == 0
    with opened(state) as stored:
        assert stored.session.bitmap.tracking(3)
    named = json.loads((state / METADATA).read_bytes())["id"]
    assert named and journal.read(state / journal.NAME).session == named


@pytest.mark.parametrize("fault", [KeyboardInterrupt, MemoryError])
def test_add_destination_closes_what_it_opened_when_the_sites_status_raises(
    env: Path, monkeypatch: pytest.MonkeyPatch, fault: type[BaseException]
) -> None:
    """A site whose status raises (a bug, ^C) leaves no LUN open: the same target is added
    at once when the site answers. A file at a site is refused before anything opens."""
    from isc.nbd import NBDServer
    from isc.remote import Ack, AgentSite

    opened_luns = []

    def raising(site: AgentSite, dest: isc.Destination, timeout: float | None = None) -> Ack:
        opened_luns.append(dest.lun)
        raise fault

    FileLUN.create(env.parent / "d3.img", SIZE).close()
    monkeypatch.chdir(env.parent)
    with contextlib.ExitStack() as stack:
        exported = stack.enter_context(FileLUN(str(env.parent / "d3.img")))
        server = stack.enter_context(NBDServer(exported, name="d3"))
        server.start_unix(env.parent / "nbd.sock")
        target = server.uri
        with opened(env) as stored:
            # A file whose name starts as a URI's scheme does is a file all the same.
            FileLUN.create(env.parent / "nbd-d4.img", SIZE).close()
            with pytest.raises(ParameterError, match=r"^nbd-d4\.img is not an NBD URI"):
                stored.add_destination("nbd-d4.img", "d4", "unix:agent.sock")
            before = files(env)
            monkeypatch.setattr(AgentSite, "status", raising)
            with pytest.raises(fault):
                stored.add_destination(target, "d3", "unix:agent.sock")
            assert [lun.closed for lun in opened_luns] == [True]
            assert files(env) == before
            monkeypatch.setattr(AgentSite, "status", lambda *_: Ack(0, True))
            stored.add_destination(target, "d3", "unix:agent.sock")
            assert [d.name for d in stored.destinations] == ["d1", "d2", "d3"]
