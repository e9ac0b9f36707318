"""The save area, in memory and in a file, against a dict model.

A session saves chunks of one size (the granularity) except the LUN's short
last chunk, so the model LUN here has ``CHUNKS`` chunks of ``granularity``
bytes and a last one of ``last`` bytes.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import signal
import stat
import subprocess
import sys
import threading

import pytest
from helpers import TIMEOUT
from hypothesis import given
from hypothesis import strategies as st

from isc import FileLUN, Session, State
from isc._core import FileSave
from isc.errors import ParameterError, RangeError, SaveAreaFull, StateError
from isc.savearea import SaveArea

CHUNKS = 8


@pytest.fixture(scope="module", params=["memory", "file"])
def make_area(request, tmp_path_factory):
    """A function ``capacity -> SaveArea`` of one kind, each file area at a new path."""
    if request.param == "memory":
        return SaveArea
    directory = tmp_path_factory.mktemp("save-areas")
    names = itertools.count()
    return lambda capacity: SaveArea(capacity, directory / f"area{next(names)}")


def _payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _state(area: SaveArea) -> tuple:
    chunks = range(CHUNKS + 1)
    return (
        area.used,
        area.high_water,
        area.saved_chunks,
        [area.get(c) for c in chunks],
        None if area.path is None else os.path.getsize(area.path),
    )


# -- the model ------------------------------------------------------------------------

_OPS = st.sampled_from(["save", "save", "save", "discard", "clear", "get", "readinto", "reset"])


@given(data=st.data())
def test_random_operations_match_a_dict_model(make_area, data):
    granularity = data.draw(st.sampled_from([2048, 4096, 65536]), label="granularity")
    last = data.draw(st.sampled_from([granularity, 1, granularity // 2 + 3]), label="last")
    # Whole numbers of chunks often: then only fragmentation can make a file area full early.
    capacity = data.draw(
        st.integers(1, CHUNKS + 1).map(lambda k: k * granularity)
        | st.integers(1, (CHUNKS + 1) * granularity),
        label="capacity",
    )

    def length(chunk: int) -> int:
        return last if chunk == CHUNKS else granularity

    model: dict[int, bytes] = {}
    used = high = 0
    with make_area(capacity) as area:
        for step in range(data.draw(st.integers(10, 60), label="steps")):
            op = data.draw(_OPS, label="op")
            # The short last chunk often, so that file slots of two sizes mix.
            chunk = data.draw(st.integers(0, CHUNKS) | st.just(CHUNKS), label="chunk")
            if op == "save":
                payload = _payload(step, length(chunk))
                before = _state(area)
                if chunk in model:
                    with pytest.raises(StateError):
                        area.save(chunk, payload)
                    assert _state(area) == before
                elif used + len(payload) > capacity:
                    with pytest.raises(SaveAreaFull):
                        area.save(chunk, payload)
                    assert _state(area) == before
                else:
                    try:
                        area.save(chunk, payload)
                    except SaveAreaFull:
                        # An area may run out early only by fragmentation (slots of
                        # two sizes), and by less than one entry: see the module docstring.
                        assert last != granularity
                        assert used + len(payload) > capacity - granularity
                        assert _state(area) == before
                    else:
                        model[chunk] = payload
                        used += len(payload)
                        high = max(high, used)
            elif op == "discard":
                area.discard(chunk)
                used -= len(model.pop(chunk, b""))
            elif op == "clear":
                area.clear()
                model.clear()
                used = 0
            elif op == "get":
                assert area.get(chunk) == model.get(chunk)
            elif op == "readinto":
                buffer = bytearray(b"\xa5" * length(chunk))
                assert area.readinto(chunk, buffer) == (chunk in model)
                assert buffer == model.get(chunk, b"\xa5" * length(chunk))
            else:
                area.reset_high_water()
                high = used
            assert area.used == used <= capacity
            assert area.high_water == high
            assert area.saved_chunks == len(model)
            assert [c in area for c in range(CHUNKS + 1)] == [c in model for c in range(CHUNKS + 1)]
            if area.path is not None:
                assert os.path.getsize(area.path) <= capacity


# -- edges ------------------------------------------------------------------------------


def test_full_area_stores_nothing_and_changes_nothing(make_area):
    with make_area(10_000) as area:
        area.save(0, b"\x01" * 4096)
        area.save(1, b"\x02" * 4096)
        before = _state(area)
        with pytest.raises(SaveAreaFull, match="cannot take 4096 more bytes") as full:
            area.save(2, b"\x03" * 4096)
        assert isinstance(full.value, RuntimeError)
        assert _state(area) == before
        assert 2 not in area
        area.save(2, b"\x03" * 1808)  # exactly to capacity
        assert area.used == area.high_water == area.capacity == 10_000


def test_an_entry_larger_than_the_whole_area_is_refused(make_area):
    with make_area(100) as area:
        with pytest.raises(SaveAreaFull):
            area.save(0, bytes(101))
        assert area.used == area.saved_chunks == 0


def test_saving_a_chunk_twice_is_a_state_error_and_keeps_the_first(make_area):
    with make_area(1 << 20) as area:
        area.save(5, b"first")
        with pytest.raises(StateError, match="at most once"):
            area.save(5, b"second")
        assert area.get(5) == b"first"
        assert area.used == 5
        area.discard(5)
        area.save(5, b"again")
        assert area.get(5) == b"again"


def test_full_and_short_last_chunks_round_trip(make_area):
    granularity, last = 65536, 1234
    full, short = _payload(1, granularity), _payload(2, last)
    with make_area(4 * granularity) as area:
        area.save(0, memoryview(full))
        area.save(9, bytearray(short))
        assert area.get(0) == full
        assert area.get(9) == short
        buffer = bytearray(last)
        assert area.readinto(9, memoryview(buffer))
        assert buffer == short
        assert area.used == granularity + last


def test_readinto_needs_a_buffer_of_the_saved_length(make_area):
    with make_area(1 << 20) as area:
        area.save(1, b"abc")
        buffer = bytearray(b"xyzw")
        with pytest.raises(ParameterError, match="exactly the saved length"):
            area.readinto(1, buffer)
        assert buffer == b"xyzw"
        assert area.readinto(2, buffer) is False
        assert buffer == b"xyzw"
        assert area.get(2) is None


@pytest.mark.parametrize("length", [0, 65537])
def test_save_refuses_empty_or_oversized_data(make_area, length):
    with make_area(1 << 20) as area:
        with pytest.raises(ParameterError, match="1 to 65536 bytes"):
            area.save(0, bytes(length))
        assert area.used == area.saved_chunks == 0


def test_save_refuses_a_negative_chunk(make_area):
    with make_area(100) as area:
        with pytest.raises(RangeError):
            area.save(-1, b"x")
        assert area.saved_chunks == 0


def test_clear_keeps_high_water_and_reset_restarts_it(make_area):
    with make_area(1000) as area:
        area.save(0, bytes(300))
        area.save(1, bytes(400))
        area.discard(0)
        area.discard(0)  # absent: no error
        assert (area.used, area.high_water) == (400, 700)
        area.clear()
        assert (area.used, area.high_water, area.saved_chunks) == (0, 700, 0)
        area.save(2, bytes(100))
        area.reset_high_water()
        assert area.high_water == 100


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(tmp_path, capacity):
    with pytest.raises(ParameterError, match="> 0 bytes"):
        SaveArea(capacity, tmp_path / "area")
    assert not (tmp_path / "area").exists()


def test_capacity_must_be_an_integer():
    with pytest.raises(TypeError):
        SaveArea(True)
    with pytest.raises(TypeError):
        SaveArea(1.5)


def test_closed_area_raises_state_error(make_area):
    area = make_area(1000)
    with area:
        area.save(0, b"x")
    assert area.closed
    area.close()  # idempotent
    assert (area.used, area.saved_chunks) == (0, 0)
    assert 0 not in area
    for call in (
        lambda: area.save(1, b"y"),
        lambda: area.get(0),
        lambda: area.readinto(0, bytearray(1)),
        lambda: area.discard(0),
        area.clear,
    ):
        with pytest.raises(StateError, match="closed"):
            call()


# -- the file -------------------------------------------------------------------------


def test_file_is_private_bounded_and_removed_on_close(tmp_path):
    path = tmp_path / "area"
    area = SaveArea(3 * 4096, path)
    assert area.path == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for chunk in range(3):
        area.save(chunk, bytes(4096))
    assert os.path.getsize(path) == area.capacity
    with pytest.raises(SaveAreaFull):
        area.save(3, b"x")
    area.clear()
    assert area.used == 0
    assert os.path.getsize(path) == area.capacity  # the blocks stay for the next mark
    for chunk in range(3, 6):  # and are written over: the file does not grow
        area.save(chunk, b"\x01" * 4096)
    assert os.path.getsize(path) == area.capacity
    assert [area.get(chunk) for chunk in range(3, 6)] == [b"\x01" * 4096] * 3
    area.close()
    assert not path.exists()


def test_file_reuses_freed_slots_of_the_same_then_larger_size(tmp_path):
    with SaveArea(2 * 4096, tmp_path / "area") as area:
        area.save(0, b"\x01" * 4096)
        area.save(1, b"\x02" * 4096)
        area.discard(0)
        area.save(2, b"\x03" * 4096)  # the same size: the freed slot
        area.discard(1)
        area.save(9, b"\x04" * 100)  # short: the larger freed slot, whole
        assert os.path.getsize(area.path) == 2 * 4096
        area.discard(9)
        area.save(3, b"\x05" * 4096)  # the slot came back at its full size
        assert area.get(2) == b"\x03" * 4096
        assert area.get(3) == b"\x05" * 4096


def test_file_area_full_by_fragmentation_changes_nothing(tmp_path):
    # The worked example of the module docstring.
    with SaveArea(8192, tmp_path / "area") as area:
        area.save(9, bytes(1024))
        area.save(0, bytes(4096))
        area.discard(9)
        before = _state(area)
        with pytest.raises(SaveAreaFull, match="fragmented"):
            area.save(1, bytes(4096))
        assert _state(area) == before
        area.save(9, bytes(1024))
        assert area.used == 5120


def test_failed_file_write_stores_nothing_and_frees_its_slot(tmp_path, monkeypatch):
    with SaveArea(4096, tmp_path / "area") as area:

        def no_space(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", no_space)
        with pytest.raises(OSError, match="No space"):
            area.save(0, bytes(4096))
        assert (area.used, area.saved_chunks, 0 in area) == (0, 0, False)
        monkeypatch.undo()
        area.save(0, b"\x07" * 4096)
        assert area.get(0) == b"\x07" * 4096


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling symlink", "fifo"])
def test_a_path_that_exists_is_refused_and_left_alone(tmp_path, kind):
    """Naming an existing file (a source, a destination) must never destroy it."""
    path, target = tmp_path / "area", tmp_path / "precious"
    target.write_bytes(b"precious" * 1000)
    if kind == "file":
        path.write_bytes(b"precious" * 1000)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(target if kind == "symlink" else tmp_path / "nowhere")
    before = os.lstat(path)
    with pytest.raises(ParameterError, match="exists and isc did not create it"):
        SaveArea(100, path)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_size) == (
        before.st_ino,
        before.st_mode,
        before.st_size,
    )
    assert target.read_bytes() == b"precious" * 1000
    assert not (tmp_path / "nowhere").exists()


def test_close_removes_only_the_file_it_created(tmp_path):
    path = tmp_path / "area"
    area = SaveArea(4096, path)
    area.save(0, b"x" * 4096)
    (tmp_path / "other").write_bytes(b"someone else's")
    os.replace(tmp_path / "other", path)  # the path now names another file
    area.close()
    assert path.read_bytes() == b"someone else's"


HOLDER = r"""
import sys
from isc.savearea import SaveArea
area = SaveArea(8192, sys.argv[1])
area.save(0, b"x" * 4096)
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_live_area_is_refused_and_a_killed_ones_file_is_replaced(tmp_path):
    path = tmp_path / "area"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(StateError, match="in use by another isc process"):
            SaveArea(8192, path)
        assert path.stat().st_size == 4096
        holder.send_signal(signal.SIGKILL)
        holder.wait(TIMEOUT)
    finally:
        holder.kill()
        holder.wait(TIMEOUT)
        holder.stdin.close()
        holder.stdout.close()
    with SaveArea(8192, path) as area:  # the killed process's leftover: replaced
        assert path.stat().st_size == 0 and area.used == 0
    assert not path.exists()


# -- threads ----------------------------------------------------------------------------


def test_threads_save_and_read_distinct_chunks(make_area, busy_switching):
    threads, per_thread, length = 8, 40, 2048
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(area: SaveArea, index: int) -> None:
        try:
            start.wait()
            chunks = range(index * per_thread, (index + 1) * per_thread)
            buffer = bytearray(length)
            for chunk in chunks:
                area.save(chunk, _payload(chunk, length))
            for chunk in chunks:
                assert area.get(chunk) == _payload(chunk, length)
                assert area.readinto(chunk, buffer)
                assert buffer == _payload(chunk, length)
                if chunk % 2:
                    area.discard(chunk)
            for chunk in chunks[1::2]:
                area.save(chunk, _payload(-chunk, length))
        except BaseException as exc:
            errors.append(exc)

    with make_area(threads * per_thread * length) as area:
        pool = [threading.Thread(target=worker, args=(area, i)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        assert not errors, errors
        total = threads * per_thread
        assert area.used == area.high_water == area.capacity
        assert area.saved_chunks == total
        for chunk in range(total):
            seed = -chunk if chunk % 2 else chunk
            assert area.get(chunk) == _payload(seed, length)


@pytest.mark.parametrize("path", [None, "area"])
def test_discard_drops_a_range_of_chunks(tmp_path, path):
    with SaveArea(16 * 4096, None if path is None else tmp_path / path) as area:
        for chunk in (0, 3, 4, 6, 9, 1000):
            area.save(chunk, bytes([chunk % 251]) * 4096)
        area.discard(3, 4)  # 3, 4 and 6 held; 5 not
        assert [c for c in (0, 3, 4, 5, 6, 9, 1000) if c in area] == [0, 9, 1000]
        assert area.used == 3 * 4096
        area.discard(5, 1 << 40)  # far wider than what is held: 9 and 1000
        assert [c for c in (0, 9, 1000) if c in area] == [0]
        assert area.used == 4096 and area.get(0) == bytes(4096)
        area.save(9, b"\x09" * 4096)  # the freed bytes are free again


# -- a session on a file: the COFW save in the core -------------------------------------


@pytest.fixture
def file_session(tmp_path):
    """A function ``(capacity, path=None) -> (Session, FileLUN, contents)`` on 8 chunks of 4 KiB
    and a 100-byte last chunk of random data, closing what it made."""
    made = []

    def make(capacity, path=None):
        contents = _payload(7, 8 * 4096 + 100)
        lun_path = tmp_path / f"source{len(made)}.img"
        lun_path.write_bytes(contents)
        lun = FileLUN(lun_path)
        session = Session(lun, 4096, SaveArea(capacity, path and tmp_path / path))
        made.append((session, lun))
        return session, lun, contents

    yield make
    for session, lun in made:
        session.close()
        lun.close()


@pytest.mark.parametrize("path", [None, "area"])
def test_a_session_on_a_file_saves_in_the_core_into_a_memory_area(file_session, path):
    session, lun, contents = file_session(16 * 4096, path)
    core = path is None  # a file area saves through Python
    assert isinstance(session.write.args[1], FileSave) is core
    session.mark(full=True)
    session.write(4096 - 1, b"x" * 2)  # chunks 0 and 1
    session.write(8 * 4096, b"y")  # the short last chunk
    session.write(4096, b"z")  # saved already
    assert session.read_frozen(0, len(contents)) == contents
    assert lun.read(4096 - 1, 2) == b"xz"
    stats = session.stats
    assert (stats.cofw_chunks, stats.cofw_bytes) == (3, 2 * 4096 + 100)
    assert stats.save_area_used == stats.save_area_high_water == 2 * 4096 + 100
    assert stats.aborts == 0


def test_a_core_save_that_finds_the_area_full_aborts_the_mark(file_session):
    session, lun, _ = file_session(4096)
    session.mark(full=True)
    session.write(0, b"a")
    session.write(2 * 4096, b"b" * 4096)  # no room: the mark ends, the write lands
    assert session.state is State.UNMARKED
    assert session.stats.aborts == 1
    assert "save area full" in session.stats.last_abort
    assert "chunk 2" in session.stats.last_abort
    assert lun.read(2 * 4096, 4096) == b"b" * 4096
    assert session.save_area.used == 0
    assert session.bitmap.tracking(0) and session.bitmap.tracking(2)


def test_a_core_save_that_reads_short_aborts_the_mark_naming_the_chunk(file_session):
    session, lun, _ = file_session(16 * 4096)
    session.mark(full=True)
    session.write(0, b"a")
    os.truncate(lun.path, 3 * 4096 + 10)  # shrunk from outside: chunk 3 reads short
    session.write(3 * 4096, b"b")
    assert session.state is State.UNMARKED
    assert "COFW of chunk 3 failed" in session.stats.last_abort
    assert session.save_area.used == 0
    assert lun.read(3 * 4096, 1) == b"b"


def test_a_core_save_stores_nothing_once_the_chunk_was_sent_or_the_mark_ended(file_session):
    session, _, _ = file_session(16 * 4096)
    generation = session.mark(full=True)
    save = session.write.args[1]
    flagged = session.bitmap.begin_write(0, 3 * 4096)  # chunks 0-2, in flight
    session.confirm_sent(1, 1, generation)  # chunk 1 reached the destinations meanwhile
    save(flagged)
    assert [c for c in range(3) if c in session.save_area] == [0, 2]
    session.bitmap.end_write(0, 3 * 4096, True)
    flagged = session.bitmap.begin_write(5 * 4096, 1)
    session.unmark()
    save(flagged)  # the mark ended before the save: nothing to protect
    session.bitmap.end_write(5 * 4096, 1, True)
    assert session.save_area.saved_chunks == 0
    assert session.stats.cofw_chunks == 2 and session.stats.aborts == 0
