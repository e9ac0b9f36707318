"""``isc._core.run_io``: a checkpoint's system calls in one call, the GIL released once;
and ``region_records``, the kept regions' records it writes.

Each step runs whole and in order; the first that fails stops the rest and
raises ``OSError`` with its errno, naming the step; a malformed step raises
before any step runs. Failures come from real descriptors: a read-only one
(pwrite, ftruncate), a closed one (the syncs), a missing name (rename).
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from isc import _core, activity
from isc._core import IO_FDATASYNC, IO_FSYNC, IO_FTRUNCATE, IO_PWRITE, IO_RENAME, run_io


@pytest.fixture
def directory(tmp_path: Path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    yield tmp_path, fd
    os.close(fd)


def opened(path: Path, flags: int = os.O_RDWR) -> int:
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)


def test_the_steps_run_in_order(directory) -> None:
    path, d = directory
    fd = opened(path / "a")
    try:
        data = bytearray(b"0123456789")
        run_io(
            [
                (IO_PWRITE, fd, b"old records, longer", 0),
                (IO_FTRUNCATE, fd, 0),
                (IO_PWRITE, fd, memoryview(data)[2:6], 3),
                (IO_FDATASYNC, fd),
                (IO_RENAME, d, b"a", b"b"),
                (IO_FSYNC, d),
            ]
        )
        assert sorted(os.listdir(path)) == ["b"]
        assert (path / "b").read_bytes() == b"\0\0\x002345"
        run_io([])
    finally:
        os.close(fd)


def test_a_write_larger_than_one_pwrite_goes_whole(directory) -> None:
    path, _ = directory
    fd = opened(path / "big")
    data = os.urandom(3 << 20)
    try:
        run_io([(IO_PWRITE, fd, data, 1 << 20), (IO_FDATASYNC, fd)])
    finally:
        os.close(fd)
    assert (path / "big").read_bytes() == bytes(1 << 20) + data


@pytest.mark.parametrize("failing", ["pwrite", "ftruncate", "fdatasync", "fsync", "rename"])
def test_the_first_failing_step_stops_the_rest_and_names_itself(directory, failing) -> None:
    """Steps before the failing one are done, none after it."""
    path, d = directory
    fd = opened(path / "log")
    readonly = opened(path / "log", os.O_RDONLY)
    closed = opened(path / "other")
    os.close(closed)
    bad = {
        "pwrite": ((IO_PWRITE, readonly, b"x", 0), errno.EBADF),
        "ftruncate": ((IO_FTRUNCATE, readonly, 0), errno.EINVAL),
        "fdatasync": ((IO_FDATASYNC, closed), errno.EBADF),
        "fsync": ((IO_FSYNC, closed), errno.EBADF),
        "rename": ((IO_RENAME, d, b"missing", b"found"), errno.ENOENT),
    }
    step, code = bad[failing]
    try:
        with pytest.raises(OSError, match=rf"\({failing} of .*, step 1 of 3\)") as raised:
            run_io([(IO_PWRITE, fd, b"before", 0), step, (IO_RENAME, d, b"log", b"after")])
        assert raised.value.errno == code
        assert (path / "log").read_bytes() == b"before"
        assert not (path / "after").exists()
    finally:
        os.close(fd)
        os.close(readonly)


@pytest.mark.parametrize(
    "step, error",
    [
        ((9, 1), ValueError),
        ((IO_FSYNC,), ValueError),
        ((IO_PWRITE, 1, b"x"), ValueError),
        ("not a step", ValueError),
        ((IO_FTRUNCATE, 1, -1), ValueError),
        ((IO_PWRITE, 1, b"x", -1), ValueError),
        ((IO_PWRITE, 1, 42, 0), TypeError),
        ((IO_RENAME, 1, "a", b"b"), TypeError),
        ((IO_FSYNC, "1"), TypeError),
    ],
)
def test_a_malformed_step_raises_before_any_step_runs(directory, step, error) -> None:
    path, d = directory
    fd = opened(path / "log")
    try:
        with pytest.raises(error):
            run_io([(IO_PWRITE, fd, b"first", 0), (IO_RENAME, d, b"log", b"moved"), step])
    finally:
        os.close(fd)
    assert (path / "log").read_bytes() == b""
    assert not (path / "moved").exists()


def test_region_records_hold_one_record_per_run_as_the_activity_log_reads_them(
    tmp_path: Path,
) -> None:
    rng = random.Random(14)
    regions = sorted({*rng.sample(range(1 << 40), 300), *range(50, 60), 1 << 62})
    runs: list[list[int]] = []
    for region in regions:
        if runs and runs[-1][1] == region - 1:
            runs[-1][1] = region
        else:
            runs.append([region, region])
    data = _core.region_records(regions)
    assert data == b"".join(activity._record(first, last) for first, last in runs)
    (tmp_path / "activity.1.log").write_bytes(data)
    assert activity.read_log(tmp_path / "activity.1.log") == [tuple(run) for run in runs]
    assert _core.region_records([]) == b""
    with pytest.raises(ValueError, match="region -1 is negative"):
        _core.region_records([3, -1])
