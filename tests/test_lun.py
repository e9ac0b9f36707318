"""LUNs: both kinds against a bytearray model, their edges, and FileLUN on files and devices.

Every interface test runs on a MemoryLUN, a FileLUN on the test's temporary
directory and a FileLUN on /dev/shm (tmpfs) when the machine has one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from isc.errors import ParameterError, RangeError, StateError
from isc.lun import LUN, FileLUN, ForwardingLUN, MemoryLUN

SHM = "/dev/shm"
# Sizes around a 4 KiB page and a 64 KiB chunk, and one that ends mid-chunk.
SIZES = [1, 4095, 4096, 4097, 3 * 65536 + 5]


def _shm_dir(request) -> str:
    if not os.path.isdir(SHM):
        pytest.skip(f"{SHM} does not exist on this machine")
    directory = tempfile.mkdtemp(prefix="isc-test-", dir=SHM)
    request.addfinalizer(lambda: shutil.rmtree(directory))
    return directory


@pytest.fixture(scope="module", params=["memory", "file", "shm"])
def make_lun(request, tmp_path_factory):
    """A function ``size -> LUN`` of one kind; FileLUN files are unlinked at once."""
    if request.param == "memory":
        return MemoryLUN
    if request.param == "shm":
        directory = _shm_dir(request)
    else:
        directory = str(tmp_path_factory.mktemp("luns"))
    names = itertools.count()

    def make(size: int) -> FileLUN:
        path = os.path.join(directory, f"lun{next(names)}.img")
        lun = FileLUN.create(path, size)
        os.unlink(path)  # the open descriptor keeps the file until close
        return lun

    return make


def _payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _io_range(size: int):
    """(offset, length) pairs: half inside the LUN, half anywhere near it."""
    inside = st.integers(0, size).flatmap(
        lambda offset: st.tuples(st.just(offset), st.integers(0, size - offset))
    )
    anywhere = st.tuples(st.integers(-3, size + 3), st.integers(-3, size + 3))
    return st.one_of(inside, anywhere)


# -- the interface, on every kind -------------------------------------------------


@given(data=st.data())
def test_random_io_matches_a_bytearray_model(make_lun, data):
    size = data.draw(st.sampled_from(SIZES), label="size")
    model = bytearray(size)
    with make_lun(size) as lun:
        for _ in range(data.draw(st.integers(1, 10), label="steps")):
            op = data.draw(st.sampled_from(["write", "read", "readinto"]), label="op")
            offset, length = data.draw(_io_range(size), label="range")
            if op != "read":
                length = max(length, 0)
            inside = offset >= 0 and length >= 0 and offset + length <= size
            if op == "write":
                payload = _payload(data.draw(st.integers(0, 2**32), label="seed"), length)
                if inside:
                    lun.write(offset, payload)
                    model[offset : offset + length] = payload
                else:
                    with pytest.raises(RangeError):
                        lun.write(offset, payload)
            elif op == "read":
                if inside:
                    assert lun.read(offset, length) == model[offset : offset + length]
                else:
                    with pytest.raises(RangeError):
                        lun.read(offset, length)
            else:
                # Guard bytes either side show readinto fills exactly its slice.
                buffer = bytearray(b"\xa5" * (length + 2))
                if inside:
                    lun.readinto(offset, memoryview(buffer)[1:-1])
                    assert buffer[1:-1] == model[offset : offset + length]
                else:
                    with pytest.raises(RangeError):
                        lun.readinto(offset, memoryview(buffer)[1:-1])
                    assert buffer[1:-1] == b"\xa5" * length
                assert buffer[0] == buffer[-1] == 0xA5
        assert lun.read(0, size) == model


@pytest.mark.parametrize("size", SIZES)
def test_new_lun_is_zero_and_has_its_size(make_lun, size):
    with make_lun(size) as lun:
        assert lun.size == size
        assert lun.read(0, size) == bytes(size)
        assert isinstance(lun, LUN)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (-1, 0), (0, 8193), (8192, 1), (8191, 2), (8193, 0), (0, -1), (10**20, 1)],
)
def test_out_of_range_io_raises_range_error_and_changes_nothing(make_lun, offset, length):
    size = 8192
    before = _payload(1, size)
    with make_lun(size) as lun:
        lun.write(0, before)
        with pytest.raises(RangeError, match=r"outside .* \[0, 8192\)"):
            lun.read(offset, length)
        if length >= 0:
            with pytest.raises(RangeError):
                lun.write(offset, b"\xff" * length)
            buffer = bytearray(b"\x00" * length)
            with pytest.raises(RangeError):
                lun.readinto(offset, buffer)
            assert buffer == bytes(length)
        assert lun.read(0, size) == before


def test_range_error_is_a_value_error(make_lun):
    with make_lun(10) as lun, pytest.raises(ValueError):
        lun.write(9, b"ab")


def test_zero_length_io_at_the_end_is_allowed(make_lun):
    with make_lun(100) as lun:
        assert lun.read(100, 0) == b""
        lun.write(100, b"")
        lun.readinto(100, bytearray())
        assert lun.read(0, 100) == bytes(100)


def test_closed_lun_raises_state_error(make_lun):
    lun = make_lun(4096)
    with lun:
        assert not lun.closed
    assert lun.closed
    lun.close()  # idempotent
    for call in (
        lambda: lun.read(0, 1),
        lambda: lun.readinto(0, bytearray(1)),
        lambda: lun.write(0, b"x"),
        lun.flush,
    ):
        with pytest.raises(StateError, match="closed"):
            call()


def test_a_forwarding_lun_closes_the_lun_under_it_at_the_end_of_its_block(make_lun):
    inner = make_lun(4096)
    with ForwardingLUN(inner) as lun:
        lun.write(0, b"x")
        assert not inner.closed
    assert lun.closed and inner.closed


def test_write_and_readinto_take_any_contiguous_buffer(make_lun):
    words = np.arange(1024, dtype=np.uint32)
    with make_lun(3 * 4096) as lun:
        lun.write(0, words)
        lun.write(4096, memoryview(words))
        lun.write(8192, bytearray(words.tobytes()))
        for offset in (0, 4096, 8192):
            assert lun.read(offset, 4096) == words.tobytes()
        out = np.zeros(1024, dtype=np.uint32)
        lun.readinto(4096, out)
        assert np.array_equal(out, words)
        with pytest.raises(TypeError):
            lun.readinto(0, b"read-only")


def test_concurrent_io_on_disjoint_ranges(make_lun, busy_switching):
    threads, span, rounds = 8, 3 * 4096 + 7, 20
    size = threads * span
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(lun, index: int) -> None:
        try:
            start.wait()
            offset = index * span
            buffer = bytearray(span)
            for round_ in range(rounds):
                payload = _payload(index * rounds + round_, span)
                lun.write(offset, payload)
                assert lun.read(offset, span) == payload
                lun.readinto(offset, buffer)
                assert buffer == payload
        except BaseException as exc:
            errors.append(exc)

    with make_lun(size) as lun:
        pool = [threading.Thread(target=worker, args=(lun, i)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        assert not errors, errors
        expected = b"".join(_payload(i * rounds + rounds - 1, span) for i in range(threads))
        assert lun.read(0, size) == expected


@pytest.mark.parametrize("size", [0, -1])
def test_memory_lun_refuses_a_size_that_is_not_positive(size):
    with pytest.raises(ParameterError, match="> 0"):
        MemoryLUN(size)


# -- FileLUN: files, devices and the system calls ----------------------------------


@pytest.fixture(params=["tmp", "shm"])
def file_dir(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "tmp" else _shm_dir(request)


def test_create_refuses_an_existing_path(file_dir):
    path = os.path.join(file_dir, "taken.img")
    with open(path, "wb") as f:
        f.write(b"keep me")
    with pytest.raises(FileExistsError):
        FileLUN.create(path, 4096)
    with open(path, "rb") as f:
        assert f.read() == b"keep me"


@pytest.mark.parametrize("size", [0, -4096])
def test_create_refuses_a_bad_size_and_leaves_no_file(file_dir, size):
    path = os.path.join(file_dir, "none.img")
    with pytest.raises(ParameterError):
        FileLUN.create(path, size)
    assert not os.path.exists(path)


def test_create_that_fails_leaves_no_file_and_no_descriptor(tmp_path, monkeypatch):
    def too_large(fd, length):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(os, "ftruncate", too_large)
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="too large"):
        FileLUN.create(tmp_path / "huge.img", 1 << 50)
    assert not (tmp_path / "huge.img").exists()
    assert len(os.listdir("/proc/self/fd")) == open_fds


def test_create_makes_a_sparse_file(file_dir):
    path = os.path.join(file_dir, "sparse.img")
    size = 256 << 20
    with FileLUN.create(path, size) as lun:
        lun.write(size - 4096, b"\x01" * 4096)
        lun.flush()
        st = os.stat(path)
    assert st.st_size == size
    assert st.st_blocks * 512 <= 1 << 20


def test_file_lun_opens_an_existing_file_and_flushes(tmp_path):
    path = tmp_path / "existing.img"
    content = _payload(7, 10_000)
    path.write_bytes(content)
    with FileLUN(path) as lun:
        assert lun.size == len(content)
        assert lun.read(0, lun.size) == content
        lun.write(9_000, b"\x00" * 1000)
        lun.flush()
    assert path.read_bytes() == content[:9_000] + b"\x00" * 1000


def test_readonly_file_lun_refuses_writes_and_changes_nothing(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x11" * 4096)
    with FileLUN(path, readonly=True) as lun:
        assert lun.read(0, 4) == b"\x11" * 4
        with pytest.raises(StateError, match="read-only"):
            lun.write(0, b"\x22")
        lun.flush()
    assert path.read_bytes() == b"\x11" * 4096


def test_file_lun_refuses_directories_and_empty_files(tmp_path):
    with pytest.raises(ParameterError, match="neither a regular file nor a block device"):
        FileLUN(tmp_path, readonly=True)
    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(ParameterError, match="empty"):
        FileLUN(empty)


def test_reading_past_the_end_of_a_shrunk_file_is_an_os_error(tmp_path):
    path = tmp_path / "shrinks.img"
    path.write_bytes(b"\x33" * 8192)
    with FileLUN(path) as lun:
        os.truncate(path, 6000)
        assert lun.read(0, 6000) == b"\x33" * 6000
        with pytest.raises(OSError, match="shrank") as read_error:
            lun.read(4096, 4096)
        with pytest.raises(OSError, match="shrank") as readinto_error:
            lun.readinto(4096, bytearray(4096))
        os.truncate(path, 0)
        with pytest.raises(OSError, match="shrank"):
            lun.read(0, 1)
    assert not isinstance(read_error.value, RangeError)
    assert not isinstance(readinto_error.value, RangeError)


def _count_calls(monkeypatch, name: str, limit: int | None = None) -> list[int]:
    """Wrap ``os.<name>`` to count its calls and, with ``limit``, to transfer at most that."""
    real = getattr(os, name)
    calls: list[int] = []

    def wrapper(fd, what, offset):
        calls.append(offset)
        if limit is None:
            return real(fd, what, offset)
        if name == "pread":
            return real(fd, min(what, limit), offset)
        view = memoryview(what[0] if name == "preadv" else what).cast("B")[:limit]
        return real(fd, [view] if name == "preadv" else view, offset)

    monkeypatch.setattr(os, name, wrapper)
    return calls


def test_large_io_is_one_system_call(tmp_path, monkeypatch):
    size = 8 << 20
    payload = _payload(3, size)
    with FileLUN.create(tmp_path / "big.img", size) as lun:
        writes = _count_calls(monkeypatch, "pwrite")
        reads = _count_calls(monkeypatch, "pread")
        vector_reads = _count_calls(monkeypatch, "preadv")
        lun.write(0, payload)
        assert lun.read(0, size) == payload
        buffer = bytearray(size)
        lun.readinto(0, buffer)
        assert buffer == payload
    assert (writes, reads, vector_reads) == ([0], [0], [0])


def test_short_reads_and_writes_are_completed(tmp_path, monkeypatch):
    size = 10_000
    payload = _payload(4, size)
    with FileLUN.create(tmp_path / "short.img", size) as lun:
        writes = _count_calls(monkeypatch, "pwrite", limit=3000)
        reads = _count_calls(monkeypatch, "pread", limit=3000)
        vector_reads = _count_calls(monkeypatch, "preadv", limit=3000)
        lun.write(0, np.frombuffer(payload, dtype=np.uint16))
        assert lun.read(0, size) == payload
        buffer = np.zeros(size // 2, dtype=np.uint16)
        lun.readinto(0, buffer)
        assert buffer.tobytes() == payload
    assert writes == reads == vector_reads == [0, 3000, 6000, 9000]


@contextlib.contextmanager
def _loop_device(backing) -> Iterator[str]:
    """A loop device on the file ``backing``, detached on exit; skips the test without one."""
    losetup = shutil.which("losetup")
    if losetup is None:
        pytest.skip("losetup (util-linux) is not installed")
    attach = subprocess.run(
        [losetup, "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if attach.returncode != 0:
        pytest.skip(
            f"cannot attach a loop device (needs root and loop support): {attach.stderr.strip()}"
        )
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "--detach", device], check=True)


def test_file_lun_on_a_loop_device(tmp_path):
    backing = tmp_path / "backing.img"
    content = _payload(5, 1 << 20)
    backing.write_bytes(content)
    with _loop_device(backing) as device:
        with FileLUN(device) as lun:
            assert lun.size == len(content)
            assert lun.read(0, lun.size) == content
            lun.write(4096, b"\xee" * 4096)
            lun.flush()
            with pytest.raises(RangeError):
                lun.write(lun.size - 1, b"ab")
        with FileLUN(device, readonly=True) as lun:
            assert lun.read(4096, 4096) == b"\xee" * 4096
    assert backing.read_bytes() == content[:4096] + b"\xee" * 4096 + content[8192:]


# -- copy_to: a range copied inside the kernel --------------------------------------------------
def test_copy_to_copies_a_range_inside_the_kernel(file_dir):
    size = 3 * 65536 + 5
    payload = _payload(7, size)
    with (
        FileLUN.create(os.path.join(file_dir, "src.img"), size) as source,
        FileLUN.create(os.path.join(file_dir, "dst.img"), size) as dest,
    ):
        source.write(0, payload)
        assert source.copies_to(dest)
        assert source.copy_to(4096, 70_000, dest) is True
        assert source.copy_to(size - 5, 5, dest) is True  # the tail past the last chunk
        expected = bytearray(size)
        expected[4096:74_096] = payload[4096:74_096]
        expected[-5:] = payload[-5:]
        assert dest.read(0, size) == expected


def test_copy_to_completes_short_copies(tmp_path, monkeypatch):
    size = 10_000
    payload = _payload(8, size)
    with (
        FileLUN.create(tmp_path / "src.img", size) as source,
        FileLUN.create(tmp_path / "dst.img", size) as dest,
    ):
        source.write(0, payload)
        real = os.copy_file_range
        calls: list[int] = []

        def short(src, dst, count, offset_src, offset_dst):
            calls.append(offset_src)
            return real(src, dst, min(count, 3000), offset_src, offset_dst)

        monkeypatch.setattr(os, "copy_file_range", short)
        assert source.copy_to(0, size, dest)
        assert dest.read(0, size) == payload
    assert calls == [0, 3000, 6000, 9000]


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS])
def test_copy_to_returns_false_when_the_kernel_cannot_copy(tmp_path, monkeypatch, code):
    size = 8192
    with (
        FileLUN.create(tmp_path / "src.img", size) as source,
        FileLUN.create(tmp_path / "dst.img", size) as dest,
    ):
        source.write(0, b"\x77" * size)

        def refuse(*args):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "copy_file_range", refuse)
        assert source.copy_to(0, size, dest) is False
        assert dest.read(0, size) == bytes(size)


def test_copy_to_raises_a_kernel_error_it_cannot_work_around(tmp_path, monkeypatch):
    with (
        FileLUN.create(tmp_path / "src.img", 4096) as source,
        FileLUN.create(tmp_path / "dst.img", 4096) as dest,
    ):

        def fail(*args):
            raise OSError(errno.EIO, "disk on fire")

        monkeypatch.setattr(os, "copy_file_range", fail)
        with pytest.raises(OSError, match="disk on fire"):
            source.copy_to(0, 4096, dest)


def test_copy_to_refuses_other_luns_and_bad_ranges_changing_nothing(tmp_path):
    size = 8192
    with (
        FileLUN.create(tmp_path / "src.img", size) as source,
        FileLUN.create(tmp_path / "dst.img", size // 2) as small,
        FileLUN.create(tmp_path / "ro.img", size) as writable,
    ):
        source.write(0, b"\x55" * size)
        memory = MemoryLUN(size)
        assert not source.copies_to(memory)
        assert source.copy_to(0, size, memory) is False
        assert memory.read(0, size) == bytes(size)
        for offset, length in [(-1, 10), (0, -1), (size // 2 - 10, 11), (0, size)]:
            with pytest.raises(RangeError):
                source.copy_to(offset, length, small)
        assert small.read(0, size // 2) == bytes(size // 2)
        with (
            FileLUN(tmp_path / "ro.img", readonly=True) as readonly,
            pytest.raises(StateError, match="read-only"),
        ):
            source.copy_to(0, size, readonly)
        assert writable.read(0, size) == bytes(size)
        memory.close()
    with pytest.raises(StateError, match="closed"):
        source.copy_to(0, 10, small)


# -- sparse LUNs: data_extents and write_zeroes -----------------------------------------------
K64 = 65536


def _allocated(lun: FileLUN) -> int:
    return os.fstat(lun._fd).st_blocks * 512


def test_data_extents_lists_the_ranges_a_sparse_file_holds(file_dir):
    size = 40 * K64 + 100
    with FileLUN.create(os.path.join(file_dir, "sparse.img"), size) as lun:
        assert lun.data_extents(0, size) == []
        for at in (2, 3, 9, 30):  # 64 KiB pieces, two of them adjacent
            lun.write(at * K64, _payload(at, K64))
        lun.write(size - 100, b"\x01" * 100)  # the tail, past the last whole block
        expected = [(2 * K64, 2 * K64), (9 * K64, K64), (30 * K64, K64)]
        assert lun.data_extents(0, size) == [*expected, (40 * K64, 100)]
        # A range clips the extents that cross its ends, and a hole-only range has none.
        assert lun.data_extents(3 * K64 + 5, 6 * K64) == [(3 * K64 + 5, K64 - 5), (9 * K64, 5)]
        assert lun.data_extents(4 * K64, 5 * K64) == []
        assert lun.data_extents(size - 50, 50) == [(size - 50, 50)]
        assert lun.data_extents(K64, 0) == []
        # Everything outside the extents reads as zeros.
        data = lun.read(0, size)
        covered = bytearray(size)
        for offset, length in lun.data_extents(0, size):
            covered[offset : offset + length] = data[offset : offset + length]
        assert bytes(covered) == data


def test_data_extents_is_all_data_where_holes_are_unknown(tmp_path, monkeypatch):
    size = 4 * K64
    with FileLUN.create(tmp_path / "lun.img", size) as lun:
        real = os.lseek

        def no_seek_data(fd, offset, how):
            if how in (os.SEEK_DATA, os.SEEK_HOLE):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, offset, how)

        monkeypatch.setattr(os, "lseek", no_seek_data)
        assert lun.data_extents(K64, 2 * K64) == [(K64, 2 * K64)]
        assert lun.data_extents(0, 0) == []


def test_data_extents_of_a_file_without_holes_asks_no_hole_search(file_dir, monkeypatch):
    # The search walks the file's pages under the lock its writes take: a host
    # write beside a full copy of a large file would wait for it.
    size = 4 * K64
    with FileLUN.create(os.path.join(file_dir, "full.img"), size) as lun:
        lun.write(0, _payload(1, size))
        lun.flush()
        assert _allocated(lun) >= size
        real = os.lseek

        def no_search(fd, offset, how):
            assert how not in (os.SEEK_DATA, os.SEEK_HOLE), "a hole search of a full file"
            return real(fd, offset, how)

        monkeypatch.setattr(os, "lseek", no_search)
        assert lun.data_extents(K64, 2 * K64) == [(K64, 2 * K64)]
        assert lun.data_extents(0, 0) == []


def test_data_extents_raises_errors_it_cannot_work_around(tmp_path, monkeypatch):
    with FileLUN.create(tmp_path / "lun.img", K64) as lun:

        def fail(fd, offset, how):
            raise OSError(errno.EIO, "disk on fire")

        monkeypatch.setattr(os, "lseek", fail)
        with pytest.raises(OSError, match="disk on fire"):
            lun.data_extents(0, K64)


def test_write_zeroes_punches_a_hole_and_keeps_the_size(file_dir):
    size = 16 * K64
    payload = _payload(11, size)
    with FileLUN.create(os.path.join(file_dir, "lun.img"), size) as lun:
        lun.write(0, payload)
        full = _allocated(lun)
        lun.write_zeroes(K64 + 100, 10 * K64)  # partial blocks at both ends
        lun.flush()
        expected = bytearray(payload)
        expected[K64 + 100 : 11 * K64 + 100] = bytes(10 * K64)
        assert lun.read(0, size) == expected
        assert os.fstat(lun._fd).st_size == size
        assert _allocated(lun) <= full - 9 * K64  # the whole blocks inside were freed
        assert lun.data_extents(2 * K64, 8 * K64) == []
        lun.write_zeroes(size, 0)  # nothing at the end


def test_write_zeroes_writes_zeros_where_holes_cannot_be_punched(tmp_path, monkeypatch):
    import isc.lun

    size = 4 * K64
    with FileLUN.create(tmp_path / "lun.img", size) as lun:
        lun.write(0, _payload(12, size))
        monkeypatch.setattr(isc.lun, "_fallocate", None)  # a C library without fallocate
        lun.write_zeroes(K64, 2 * K64)
        assert lun.read(K64, 2 * K64) == bytes(2 * K64)
        assert lun.data_extents(0, size) == [(0, size)]  # written, not punched

        def fail(fd, offset, length):
            raise OSError(errno.EIO, "disk on fire")

        monkeypatch.setattr(isc.lun, "_punch_hole", fail)
        with pytest.raises(OSError, match="disk on fire"):
            lun.write_zeroes(0, K64)


def test_write_zeroes_refuses_bad_ranges_and_read_only_changing_nothing(tmp_path):
    size = 2 * K64
    payload = _payload(13, size)
    path = tmp_path / "lun.img"
    with FileLUN.create(path, size) as lun:
        lun.write(0, payload)
        for offset, length in [(-1, 10), (0, -1), (size - 10, 11)]:
            with pytest.raises(RangeError):
                lun.write_zeroes(offset, length)
            with pytest.raises(RangeError):
                lun.data_extents(offset, length)
        assert lun.read(0, size) == payload
    with FileLUN(path, readonly=True) as readonly, pytest.raises(StateError, match="read-only"):
        readonly.write_zeroes(0, size)
    with pytest.raises(StateError, match="closed"):
        lun.write_zeroes(0, 10)
    with pytest.raises(StateError, match="closed"):
        lun.data_extents(0, 10)
    assert path.read_bytes() == payload


def test_write_zeroes_of_a_lun_without_it_writes_zeros(tmp_path):
    from isc.lun import ZERO_PIECE, write_zeroes

    size = 3 * ZERO_PIECE
    memory = MemoryLUN(size)
    memory.write(0, b"\xff" * size)
    written = []
    real = memory.write
    memory.write = lambda offset, data: (written.append(len(data)), real(offset, data))
    write_zeroes(memory, 10, 2 * ZERO_PIECE + 5)
    assert written == [ZERO_PIECE, ZERO_PIECE, 5]
    assert memory.read(0, size) == b"\xff" * 10 + bytes(2 * ZERO_PIECE + 5) + b"\xff" * (
        ZERO_PIECE - 15
    )
    with FileLUN.create(tmp_path / "lun.img", size) as lun:  # one with its own: a hole
        lun.write(0, b"\xff" * size)
        write_zeroes(lun, 0, size)
        assert lun.data_extents(0, size) == []


def test_data_extents_and_write_zeroes_on_a_loop_device(tmp_path):
    backing = tmp_path / "backing.img"
    content = _payload(14, 1 << 20)
    backing.write_bytes(content)
    with _loop_device(backing) as device, FileLUN(device) as lun:
        assert lun.data_extents(4096, 100_000) == [(4096, 100_000)]  # a device: all data
        lun.write_zeroes(K64, K64)  # aligned: punched through to the backing file
        lun.write_zeroes(1000, 100)  # unaligned for the device: zeros written
        lun.flush()
    expected = bytearray(content)
    expected[K64 : 2 * K64] = bytes(K64)
    expected[1000:1100] = bytes(100)
    assert backing.read_bytes() == expected


@pytest.mark.parametrize(
    ("server", "options"),
    [
        ("qemu-nbd", ["--discard=unmap"]),  # WRITE_ZEROES, punched into the backing file
        ("nbdkit", ["--filter=nozero", "memory", "size={size}", "zeromode=none"]),  # none
        # Whole 4 KiB blocks only, and no request over 64 KiB: anything else is EINVAL.
        (
            "nbdkit",
            [
                "--filter=blocksize-policy",
                "memory",
                "size={size}",
                "blocksize-minimum=4096",
                "blocksize-maximum=65536",
                "blocksize-error-policy=error",
            ],
        ),
    ],
    ids=["qemu-nbd", "nbdkit-nozero", "nbdkit-4k-blocks"],
)
def test_nbd_write_zeroes_with_and_without_the_servers_command(tmp_path, server, options):
    from pathlib import Path

    from test_nbd import nbdkit, qemu_nbd

    from isc.nbd import NBDLUN, TransmissionFlag

    size = 16 * K64
    payload = _payload(15, size)
    options = [o.format(size=size) for o in options]
    serving = qemu_nbd(Path(tmp_path), *options, size=size) if server == "qemu-nbd" else None
    serving = serving or nbdkit(Path(tmp_path), *options)
    with serving as remote, NBDLUN(remote.uri) as lun:
        offers = bool(lun.flags & TransmissionFlag.SEND_WRITE_ZEROES)
        assert offers == ("nozero" not in remote.uri and "--filter=nozero" not in options)
        lun.write(0, payload)
        lun.write_zeroes(K64 + 100, 10 * K64)  # partial blocks at both ends
        lun.write_zeroes(size - 10, 10)  # within one block
        lun.flush()
        expected = bytearray(payload)
        expected[K64 + 100 : 11 * K64 + 100] = bytes(10 * K64)
        expected[size - 10 :] = bytes(10)
        assert lun.read(0, size) == expected
        if remote.backing is not None:
            assert os.stat(remote.backing).st_blocks * 512 <= size - 9 * K64
        for offset, length in [(-1, 10), (size - 10, 11)]:
            with pytest.raises(RangeError):
                lun.write_zeroes(offset, length)
        assert lun.read(0, size) == expected
