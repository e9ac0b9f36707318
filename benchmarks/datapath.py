"""What the data-path benchmark suites share.

Scratch space, seeded images and byte checks (no pytest needed: the QEMU
comparison script uses them too; conftest.py records what else kept the
machine busy during each benchmark). Big files go to ``/dev/shm`` (tmpfs, so the figures are of the
code, not of a disk) when it has room, else to the system's temporary
directory; either way they live in a directory that is removed when the suite
is done with it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SEED = 20261124
PIECE = 64 << 20  # bytes per read or write when making and checking images
SHM = Path("/dev/shm")


def shm_free() -> int:
    """Free bytes in ``/dev/shm``, 0 when there is none."""
    return shutil.disk_usage(SHM).free if SHM.is_dir() else 0


@contextmanager
def scratch(need: int) -> Iterator[Path]:
    """A new empty directory, in ``/dev/shm`` if it has ``need`` bytes free; removed on exit."""
    where = SHM if shm_free() >= need else None
    with tempfile.TemporaryDirectory(prefix="isc-bench-", dir=where) as path:
        yield Path(path)


def place(path: Path) -> str:
    """Where ``path`` lives, for the tables: "tmpfs" or "tmp dir"."""
    return "tmpfs" if path.is_relative_to(SHM) else "tmp dir"


def random_bytes(bits: np.random.BitGenerator, length: int) -> bytes:
    """``length`` bytes from the seeded generator ``bits`` (fast: raw 64-bit draws)."""
    return bits.random_raw(-(-length // 8)).tobytes()[:length]


def write_random(path: Path, size: int, seed: int = SEED) -> None:
    """Make ``path`` a file of ``size`` seeded random bytes."""
    bits = np.random.SFC64(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for start in range(0, size, PIECE):
            _write_all(fd, random_bytes(bits, min(PIECE, size - start)), start)
    finally:
        os.close(fd)


def write_pattern(path: Path, size: int, byte: int) -> None:
    """Overwrite the first ``size`` bytes of ``path`` with ``byte``, in place (pages stay)."""
    pattern = bytes([byte]) * min(PIECE, size)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for start in range(0, size, PIECE):
            _write_all(fd, memoryview(pattern)[: min(PIECE, size - start)], start)
    finally:
        os.close(fd)


def sparse_file(path: Path, size: int) -> None:
    """Make ``path`` a new sparse file of ``size`` bytes (an unallocated destination)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def first_difference(path: Path, expected: Path, size: int) -> int | None:
    """The first byte below ``size`` where the files differ, or where either ends
    before ``size``; None when both hold the same ``size`` bytes."""
    a = b = bytearray()
    fa = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    fb = os.open(expected, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start in range(0, size, PIECE):
            n = min(PIECE, size - start)
            if len(a) != n:
                a, b = bytearray(n), bytearray(n)
            got = min(os.preadv(fa, [a], start), os.preadv(fb, [b], start))
            # Whole bytearrays compare with memcmp; memoryviews compare byte by byte.
            if (a != b) if got == n else (a[:got] != b[:got]):
                diff = np.frombuffer(a, np.uint8, got) != np.frombuffer(b, np.uint8, got)
                return start + int(np.argmax(diff))
            if got != n:
                return start + got
        return None
    finally:
        os.close(fa)
        os.close(fb)


def assert_same(path: Path, expected: Path, size: int) -> None:
    """Fail, naming the first differing byte, unless both files hold the same ``size`` bytes."""
    first = first_difference(path, expected, size)
    if first is not None:
        raise AssertionError(f"{path} differs from {expected} (or ends) at byte {first}")
