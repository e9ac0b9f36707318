"""A persistent session's write-intent log: what a crash may have left untracked.

Between two checkpoints (:mod:`isc.journal`), the bitmaps on disk miss the
host writes made since the last one. Generation ``K`` of the log, begun with
checkpoint ``K``, says where those writes may be, in two files:

=======================  ====================================================
``activity.K.log``       the *regions* (``region_size`` bytes) that were hot:
                         each record is written and ``fdatasync``\\ ed before
                         the first write to a cold region proceeds, and the
                         file opens with the regions kept hot from the last
                         generation; survives a crash of the machine
``activity.K.writes``    every host write's chunks, stored into a shared
                         mapping of the file before the write proceeds: no
                         system call, no sync; survives a crash of the
                         process (the kernel keeps the pages), not of the
                         machine
=======================  ====================================================

After a crash, each generation since the newest checkpoint is resent from
its ``.writes`` file when that file is whole and was written since the
machine last booted (its boot id), so only what was written goes again;
otherwise from its regions, whole (as DRBD resyncs its activity log's
extents). A ``.writes`` file holds ``WRITES_BYTES`` of records; a generation
that outgrows it falls back to its regions.

Costs: a write to a hot region adds a 16-byte store to the mapping; the
first write to a cold region one fsynced record. A checkpoint keeps the
regions written since the one before hot (up to half the hot set's
capacity, which :mod:`isc.store` fits to the write pattern), so a steady
working set pays no record after it. :attr:`ActivityLog.logged` counts the
regions recorded in the current generation since it began (the kept ones
not included): how often host writes waited for a record.

Layout of ``activity.K.writes`` (little-endian): magic ``ISCWRITE``, ``K``
u64, the boot id (36 ASCII bytes, zero-padded to 48); then what
``DeltaBitmap.log_writes`` appends: a u64 count, a u64 overflow flag and
``(first_chunk, last_chunk)`` u64 pairs.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isc.errors import CorruptMetadata
from isc.journal import fsync_dir

WRITES_BYTES = 64 << 20
"""Size of a ``.writes`` file: about 4 million host writes per generation."""
_RECORD = struct.Struct("<QQI")
_SECTOR = 512
"""The unit a disk writes whole: a torn append is zero from a multiple of it."""
_WRITES_HEAD = struct.Struct("<8sQ48s")
_WRITES_MAGIC = b"ISCWRITE"
_COUNTS = struct.Struct("<QQ")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def boot_id() -> bytes:
    """This boot of the machine (Linux), or empty bytes where it cannot be told.

    Read once per process (a process outlives no boot): each checkpoint stamps it into
    the next write log, and every system call of a checkpoint is a chance for the host
    writes' thread to wait for the interpreter lock."""
    try:
        return _BOOT_ID.read_bytes().strip()
    except OSError:
        return b""


@dataclass
class Generation:
    """The files of one generation, opened: its region log and its write log's mapping."""

    number: int
    fd: int
    writes: mmap.mmap
    logged: int = 0
    """Regions appended since the generation began."""

    def area(self) -> memoryview:
        """The part of the write log ``DeltaBitmap.log_writes`` appends to."""
        return memoryview(self.writes)[_WRITES_HEAD.size :]

    def close(self) -> None:
        os.close(self.fd)
        self.writes.close()


class ActivityLog:
    """Both logs of the current generation (see the module docstring)."""

    def __init__(self, directory: Path, generation: int) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._current = self._open(generation, [])

    @property
    def generation(self) -> int:
        return self._current.number

    @property
    def logged(self) -> int:
        """Regions recorded in the current generation since it began (kept ones not counted)."""
        return self._current.logged

    def area(self) -> memoryview:
        """Where ``DeltaBitmap.log_writes`` appends this generation's writes."""
        return self._current.area()

    def _open(self, number: int, keep: list[int]) -> Generation:
        """Create generation ``number``'s files, its region log holding ``keep``, durably."""
        path = self.directory / f"activity.{number}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            if keep:
                os.write(fd, b"".join(_record(first, last) for first, last in _runs(keep)))
                os.fdatasync(fd)
            writes = _new_writes(self.directory / f"activity.{number}.writes", number)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        return Generation(number, fd, writes)

    def append(self, first: int, last: int) -> None:
        """Record regions first..last durably; return once they are on disk."""
        with self._lock:
            os.write(self._current.fd, _record(first, last))
            os.fdatasync(self._current.fd)
            self._current.logged += last - first + 1

    def prepare(self, keep: list[int]) -> Generation:
        """Create the next generation's files, its region log holding the regions ``keep``
        stays hot across the switch, durably; pass it to :meth:`rotate`."""
        return self._open(self.generation + 1, keep)

    def rotate(self, generation: Generation) -> Generation:
        """Go on in ``generation`` at once; return the one it ends, to close once the
        bitmap no longer appends to its write log."""
        with self._lock:
            old, self._current = self._current, generation
        return old

    def discard(self, generation: Generation) -> None:
        """Close and delete the files of a prepared ``generation`` never gone on in."""
        generation.close()
        for suffix in ("log", "writes"):
            (self.directory / f"activity.{generation.number}.{suffix}").unlink(missing_ok=True)

    def half_full(self) -> bool:
        """Whether the write log holds half the records it can."""
        with self._lock:
            count = _COUNTS.unpack_from(self._current.writes, _WRITES_HEAD.size)[0]
        return 16 * count > WRITES_BYTES // 2

    def close(self) -> None:
        with self._lock:
            self._current.close()


def _record(first: int, last: int) -> bytes:
    return _RECORD.pack(first, last, zlib.crc32(struct.pack("<QQ", first, last)))


def _runs(regions: list[int]) -> list[tuple[int, int]]:
    """``(first, last)`` of each run of consecutive regions of the ascending ``regions``."""
    ascending = np.asarray(regions, dtype=np.int64)
    ends = np.flatnonzero(np.diff(ascending) != 1)
    firsts = ascending[np.concatenate(([0], ends + 1))]
    lasts = ascending[np.concatenate((ends, [len(ascending) - 1]))]
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


def _new_writes(path: Path, number: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, WRITES_BYTES)  # sparse: pages are taken as records fill them
        writes = mmap.mmap(fd, WRITES_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    _WRITES_HEAD.pack_into(writes, 0, _WRITES_MAGIC, number, boot_id())
    return writes


def read_log(path: Path) -> list[tuple[int, int]]:
    """The records of a region log, without what a crash left of an unfinished append.

    An append is synced before the write it announces proceeds, and the
    next begins after it, so only the end of the file can hold one that did
    not finish: a last record cut short, or zeros to the end of the file
    from a record or from a sector boundary inside it (a crash of the
    machine after the file's size reached the disk and before its data, as
    ext4 and xfs leave it). Its regions were never written: it is ignored.

    Raises ``CorruptMetadata`` naming the file when any other record is
    damaged (zeros followed by a record among them) or the file cannot be
    read; ``FileNotFoundError`` passes (the holder's checkpoint may have
    just deleted it).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptMetadata(f"{path} cannot be read: {exc.strerror or exc}") from None
    records = []
    whole = len(data) - len(data) % _RECORD.size
    for at in range(0, whole, _RECORD.size):
        first, last, crc = _RECORD.unpack_from(data, at)
        if zlib.crc32(data[at : at + 16]) != crc or last < first:
            if _unfinished(data, at):
                break
            raise CorruptMetadata(f"{path}: record at byte {at} is corrupt")
        records.append((first, last))
    return records


def _unfinished(data: bytes, at: int) -> bool:
    """Whether ``data`` is zero from the record at ``at``, or from the sector boundary
    inside it, to its end: what a crash leaves of appends whose data never reached the disk."""
    sector = -(-(at + 1) // _SECTOR) * _SECTOR
    start = at if not data[at:sector].strip(b"\0") else sector
    return start < at + _RECORD.size and not data[start:].strip(b"\0")


def read_writes(path: Path, number: int, chunks: int) -> np.ndarray | None:
    """The chunks generation ``number``'s write log holds, as ascending, disjoint
    ``(first_chunk, last_chunk)`` rows, or None when it cannot stand for its
    regions: missing, unreadable, of another generation or boot, overflowed, or
    naming chunks outside ``[0, chunks)``."""
    try:
        with open(path, "rb") as file:
            head = file.read(_WRITES_HEAD.size + _COUNTS.size)
            if len(head) < _WRITES_HEAD.size + _COUNTS.size:
                return None
            magic, recorded, boot = _WRITES_HEAD.unpack_from(head)
            count, overflow = _COUNTS.unpack_from(head, _WRITES_HEAD.size)
            current = boot_id()
            if (magic, recorded, overflow) != (_WRITES_MAGIC, number, 0) or not current:
                return None
            if boot.rstrip(b"\0") != current or 16 * count > WRITES_BYTES:
                return None
            rows = np.frombuffer(file.read(16 * count), dtype="<u8")
    except OSError:
        return None
    if len(rows) != 2 * count:
        return None
    rows = rows.reshape(-1, 2).astype(np.int64)
    if count and (rows.min() < 0 or rows.max() >= chunks or (rows[:, 1] < rows[:, 0]).any()):
        return None
    return _union(rows)


def _union(rows: np.ndarray) -> np.ndarray:
    """The union of inclusive ``(first, last)`` ranges, as ascending disjoint ones."""
    if not len(rows):
        return rows
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    reach = np.maximum.accumulate(rows[:, 1])
    starts = np.flatnonzero(np.concatenate(([True], rows[1:, 0] > reach[:-1] + 1)))
    return np.column_stack((rows[starts, 0], np.maximum.reduceat(rows[:, 1], starts)))
