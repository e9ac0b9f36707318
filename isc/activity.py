"""A persistent session's write-intent log: what a crash may have left untracked.

Between two checkpoints (:mod:`isc.journal`), the bitmaps on disk miss the
host writes made since the last one. Generation ``K`` of the log, begun with
checkpoint ``K``, says where those writes may be, in two files:

=======================  ====================================================
``activity.K.log``       the *regions* (``region_size`` bytes) that were hot:
                         each record is written and ``fdatasync``\\ ed before
                         the first write to a cold region proceeds, and the
                         file opens with a header naming the session and the
                         regions kept hot from the last generation; survives
                         a crash of the machine
``activity.K.writes``    every host write's chunks, stored into a shared
                         mapping of the file before the write proceeds: no
                         system call, no sync; survives a crash of the
                         process (the kernel keeps the pages), not of the
                         machine
=======================  ====================================================

A generation that a checkpoint on disk made obsolete is not deleted: its
files, renamed ``activity-spare.log`` and ``activity-spare.writes`` and
kept open, become the next generation's (the region log cut to the kept
regions' records, the write log's head rewritten in its mapping, both
renamed back), so a checkpoint neither creates, maps, lists nor deletes
files. No open reads the spare; it is deleted at a close and, after a
crash, by the first checkpoint of the open.

After a crash, each generation since the newest checkpoint is resent from
its ``.writes`` file when that file is whole and was written since the
machine last booted (its boot id), so only what was written goes again;
otherwise from its regions, whole (as DRBD resyncs its activity log's
extents). A ``.writes`` file holds ``WRITES_BYTES`` of records; a generation
that outgrows it falls back to its regions.

Costs: a write to a hot region adds a 16-byte store to the mapping; the
first write to a cold region one fsynced record. A checkpoint costs the log
six system calls (cut, write and sync the region log, two renames, a sync
of the directory; the sync even when it keeps no region, so no crash of the
machine brings an older generation's records back under the new name once
the journal names it) and two more once the journal holds it (the renames
to the spare), each group in one core call (``isc._core.run_io``): the
checkpointing thread releases and re-takes the GIL once per group, not once
per system call, each of which would make a host writer's thread waiting for
the GIL lose it again. A checkpoint keeps the regions written since the one before hot
(up to half the hot set's capacity, which :mod:`isc.store` fits to the
write pattern), so a steady working set pays no record after it.
:attr:`ActivityLog.logged` counts the regions recorded in the current
generation since it began (the kept ones not included): how often host
writes waited for a record.

Both files name the session that wrote them (its session file's ``id``),
as the checkpoint journal does: a log of another session put in the
directory (the same layout, the same generation) would be replayed for this
one's, whose own writes would then not be resent. A region log of another
session refuses the open, as a damaged one does (``CorruptMetadata``); a
write log of another stands for nothing, as one of another boot: its regions
are resent whole. Logs of an earlier isc name no session (no header, a zero
field) and are read as this session's: nothing can tell otherwise.

Layout (little-endian). ``activity.K.log``: a 20-byte header, magic
``ISCREGN1``, the session u64, a crc32 of those 16 bytes (a log of an earlier
isc has none: its first record is at byte 0; a region that large cannot
be), then 20-byte records ``first_region`` u64, ``last_region`` u64, a
crc32 of those 16 bytes. ``activity.K.writes``: magic ``ISCWRITE``, ``K``
u64, the boot id (36 ASCII bytes, zero-padded to 40), the session u64 (zero
in a file of an earlier isc, which padded the boot id to 48); then what
``DeltaBitmap.log_writes`` appends: a u64 count, a u64 overflow flag and
``(first_chunk, last_chunk)`` u64 pairs.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from isc._core import (
    IO_FDATASYNC,
    IO_FSYNC,
    IO_FTRUNCATE,
    IO_PWRITE,
    IO_RENAME,
    region_records,
    run_io,
)
from isc.errors import CorruptMetadata

WRITES_BYTES = 64 << 20
"""Size of a ``.writes`` file: about 4 million host writes per generation."""
_RECORD = struct.Struct("<QQI")
_FILE = re.compile(r"activity\.(\d+)\.(log|writes)\Z")
_SECTOR = 512
"""The unit a disk writes whole: a torn append is zero from a multiple of it."""
_LOG_HEAD = struct.Struct("<8sQI")
_LOG_MAGIC = b"ISCREGN1"
_WRITES_HEAD = struct.Struct("<8sQ40sQ")
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
    end: int = 0
    """Bytes of records in the region log: where the next one goes."""
    logged: int = 0
    """Regions appended since the generation began."""

    def area(self) -> memoryview:
        """The part of the write log ``DeltaBitmap.log_writes`` appends to."""
        return memoryview(self.writes)[_WRITES_HEAD.size :]

    def close(self) -> None:
        os.close(self.fd)
        self.writes.close()


SPARE = "activity-spare"
"""The names (``.log``, ``.writes``) of the files of a generation no checkpoint needs any
more, kept open to be the next one's."""


def _names(number: int | None) -> tuple[str, str]:
    """The region log's and the write log's file names of generation ``number`` (None: the
    spare's)."""
    stem = SPARE if number is None else f"activity.{number}"
    return f"{stem}.log", f"{stem}.writes"


class ActivityLog:
    """Both logs of the current generation (see the module docstring), the generations it
    ended that the newest checkpoint on disk may still need, and a spare.

    A checkpoint takes the next generation's files from the spare when there
    is one (the files of a generation a newer checkpoint made obsolete,
    kept open under the spare's names): the region log is cut to the
    records kept hot, the write log's head rewritten in its mapping, and
    both renamed; otherwise it creates them. :meth:`retire` turns the
    generations a checkpoint on disk made obsolete into the spare, or
    deletes them. So a checkpoint's system calls are few, and each group of
    them is one core call (``run_io``): every release of the interpreter lock
    lets another thread take it, and the host writes' thread, woken at each,
    waits again for the whole switch interval when it finds the lock taken
    back.
    """

    def __init__(self, directory: Path, generation: int, session: int) -> None:
        self.directory = directory
        self.session = session
        """The id of the session whose logs these are, named in each file's header."""
        self._head = _log_head(session)
        self._lock = threading.Lock()
        self._dir = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._ended: list[Generation] = []
        self._spare: Generation | None = None
        try:
            # Files of older generations (and a spare) a crash left: deleted once a
            # checkpoint on disk is newer than them (retire).
            self._stale = [
                name
                for name in os.listdir(self._dir)
                if name in _names(None)
                or ((match := _FILE.match(name)) and int(match.group(1)) < generation)
            ]
            self._current = self._create(generation, [])
        except BaseException:
            os.close(self._dir)
            raise

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

    def _create(self, number: int, keep: npt.ArrayLike) -> Generation:
        """Create generation ``number``'s files, its region log holding its header and
        ``keep``, durably (the directory synced); on failure nothing of it stays."""
        log, writes = _names(number)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(log, flags, 0o600, dir_fd=self._dir)
        try:
            mapped = _map_writes(os.open(writes, flags, 0o600, dir_fd=self._dir))
        except BaseException:
            os.close(fd)
            _unlink(log, self._dir)
            raise
        generation = Generation(number, fd, mapped)
        try:
            run_io([*self._begin(generation, keep, cut=False), (IO_FSYNC, self._dir)])
        except BaseException:
            self._drop(generation, _names(number))
            raise
        return generation

    def _begin(self, generation: Generation, keep: npt.ArrayLike, cut: bool) -> list[tuple]:
        """Stamp ``generation``'s write log; return the :func:`run_io` steps that make
        the header and ``keep`` its region log, durably. ``cut``: the region log holds
        an older generation's records, cut first, so no crash of the machine brings them
        back as ``generation``'s once a journal names it."""
        _WRITES_HEAD.pack_into(
            generation.writes, 0, _WRITES_MAGIC, generation.number, boot_id(), self.session
        )
        _COUNTS.pack_into(generation.writes, _WRITES_HEAD.size, 0, 0)
        kept = self._head + region_records(keep)
        generation.end, generation.logged = len(kept), 0
        steps: list[tuple] = [(IO_FTRUNCATE, generation.fd, 0)] if cut else []
        return [*steps, (IO_PWRITE, generation.fd, kept, 0), (IO_FDATASYNC, generation.fd)]

    def append(self, first: int, last: int) -> None:
        """Record regions first..last durably; return once they are on disk."""
        with self._lock:
            current = self._current
            os.pwrite(current.fd, _record(first, last), current.end)
            current.end += _RECORD.size
            os.fdatasync(current.fd)
            current.logged += last - first + 1

    def prepare(self, keep: npt.ArrayLike) -> Generation:
        """The next generation's files, its region log holding the regions ``keep`` stays
        hot across the switch, durably; pass it to :meth:`rotate`, or to :meth:`discard`.
        From the spare, its system calls are one :func:`run_io`: the cut, the header and
        kept records, their sync, the renames and the sync of the directory."""
        number = self.generation + 1
        spare, self._spare = self._spare, None
        if spare is None:
            return self._create(number, keep)
        spare.number = number
        try:
            run_io(
                [
                    *self._begin(spare, keep, cut=True),
                    *self._renames(_names(None), _names(number)),
                    (IO_FSYNC, self._dir),
                ]
            )
        except BaseException:
            self._drop(spare, _names(None) + _names(number))
            raise
        return spare

    def _renames(self, old: tuple[str, str], new: tuple[str, str]) -> list[tuple]:
        """The :func:`run_io` steps that rename the files ``old`` to ``new``."""
        return [
            (IO_RENAME, self._dir, os.fsencode(a), os.fsencode(b))
            for a, b in zip(old, new, strict=True)
        ]

    def rotate(self, generation: Generation) -> None:
        """Go on in ``generation`` at once; the one it ends stays until :meth:`retire`."""
        with self._lock:
            self._ended.append(self._current)
            self._current = generation

    def discard(self, generation: Generation) -> None:
        """Close and delete the files of a prepared ``generation`` never gone on in."""
        self._drop(generation, _names(generation.number))

    def _drop(self, generation: Generation, names: tuple[str, ...]) -> None:
        """Close ``generation`` and delete its files, which have ``names``."""
        generation.close()
        for name in names:
            _unlink(name, self._dir)

    def retire(self, checkpoint: int) -> None:
        """Checkpoint ``checkpoint`` is on disk: the generations before it are obsolete.
        One becomes the spare; the others' files, and those a crash left, are deleted.
        A crash before this reaches the disk leaves files older than the checkpoint,
        which the next open ignores. Raises ``OSError`` when a rename or a delete fails:
        every obsolete generation is closed (or the spare) all the same, and its files
        that stay are older than the checkpoint."""
        obsolete = [g for g in self._ended if g.number < checkpoint]
        self._ended = [g for g in self._ended if g.number >= checkpoint]
        spare = obsolete.pop() if obsolete and self._spare is None else None
        stale, self._stale = self._stale, []
        names: list[str] = []
        for generation in obsolete:
            generation.close()
            names += _names(generation.number)
        try:
            for name in stale:  # first: a spare a crash left has the spare's names
                _unlink(name, self._dir)
            if spare is not None:
                run_io(self._renames(_names(spare.number), _names(None)))
                self._spare, spare = spare, None
        finally:
            if spare is not None:  # its renames failed (or a delete before them)
                spare.close()
                names += _names(spare.number) + _names(None)
            for name in names:
                _unlink(name, self._dir)

    def half_full(self) -> bool:
        """Whether the write log holds half the records it can."""
        with self._lock:
            count = _COUNTS.unpack_from(self._current.writes, _WRITES_HEAD.size)[0]
        return 16 * count > WRITES_BYTES // 2

    def close(self) -> None:
        """Close every file; delete the spare's."""
        with self._lock:
            spare, self._spare = self._spare, None
            for generation in [self._current, *self._ended, spare]:
                if generation is not None:
                    generation.close()
            try:
                if spare is not None:
                    for name in _names(None):
                        _unlink(name, self._dir)
            finally:
                os.close(self._dir)


def _unlink(name: str, directory: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)


def _record(first: int, last: int) -> bytes:
    return _RECORD.pack(first, last, zlib.crc32(struct.pack("<QQ", first, last)))


def _log_head(session: int) -> bytes:
    """The header of a region log of the session ``session``."""
    return _LOG_HEAD.pack(_LOG_MAGIC, session, zlib.crc32(struct.pack("<8sQ", _LOG_MAGIC, session)))


def _map_writes(fd: int) -> mmap.mmap:
    """A shared mapping of the new write log open at ``fd``, which it closes."""
    try:
        os.ftruncate(fd, WRITES_BYTES)  # sparse: pages are taken as records fill them
        return mmap.mmap(fd, WRITES_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def read_log(path: Path, session: int = 0) -> list[tuple[int, int]]:
    """The records of a region log, without what a crash left of an unfinished append.

    An append is synced before the write it announces proceeds, and the
    next begins after it, so only the end of the file can hold one that did
    not finish: a last record cut short, or zeros to the end of the file
    from a record or from a sector boundary inside it (a crash of the
    machine after the file's size reached the disk and before its data, as
    ext4 and xfs leave it). Its regions were never written: it is ignored.

    Raises ``CorruptMetadata`` naming the file when any other record or its
    header is damaged (zeros followed by a record among them), when its header
    names another session than ``session`` (a nonzero id: a log of an earlier
    isc names none and passes), or the file cannot be read;
    ``FileNotFoundError`` passes (the holder's checkpoint may have just deleted it).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptMetadata(f"{path} cannot be read: {exc.strerror or exc}") from None
    start = 0
    if data.startswith(_LOG_MAGIC) and len(data) >= _LOG_HEAD.size:
        start = _LOG_HEAD.size
        _, owner, crc = _LOG_HEAD.unpack_from(data)
        if zlib.crc32(data[: start - 4]) != crc:
            raise CorruptMetadata(f"{path}: its header is corrupt")
        if session and owner != session:
            raise CorruptMetadata(
                f"{path} holds the activity of session {owner:#x}, not of session "
                f"{session:#x} that reads it: it is not this session's: put its own back"
            )
    records = []
    whole = len(data) - (len(data) - start) % _RECORD.size
    for at in range(start, whole, _RECORD.size):
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


def read_writes(path: Path, number: int, chunks: int, session: int = 0) -> np.ndarray | None:
    """The chunks generation ``number``'s write log holds, as ascending, disjoint
    ``(first_chunk, last_chunk)`` rows, or None when it cannot stand for its
    regions: missing, unreadable, of another generation, boot or session than
    ``session`` (both nonzero: one of an earlier isc names none), overflowed, or
    naming chunks outside ``[0, chunks)``."""
    try:
        with open(path, "rb") as file:
            head = file.read(_WRITES_HEAD.size + _COUNTS.size)
            if len(head) < _WRITES_HEAD.size + _COUNTS.size:
                return None
            magic, recorded, boot, owner = _WRITES_HEAD.unpack_from(head)
            count, overflow = _COUNTS.unpack_from(head, _WRITES_HEAD.size)
            current = boot_id()
            if (magic, recorded, overflow) != (_WRITES_MAGIC, number, 0) or not current:
                return None
            if boot.rstrip(b"\0") != current or 16 * count > WRITES_BYTES:
                return None
            if session and owner and owner != session:
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
