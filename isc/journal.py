"""A delta bitmap's checkpoints on disk: one file of page records, appended to.

A persistent session (:mod:`isc.store`) keeps its bitmaps in
``checkpoint.journal``: a sequence of checkpoints, each a *segment* holding
the page records of one snapshot (``DeltaBitmap.snapshot``, format in
:mod:`isc._layout`). The first segment is a *base* (every page that holds a
set bit); each later one holds the pages changed since the one before it.
Replaying them in order onto an empty map rebuilds the state of the last.
All integers little-endian::

    header   magic 8s b"ISCJRNL1", seq u64 (the checkpoint's generation: the
             activity log begun with it), records u64 (bytes of records),
             generation u64 (marks so far), size u64, granularity u32,
             flags u8 (1: base, 2: marked), t u8 (which physical array is
             tracking), 6 zero bytes, session u64 (the ``id`` of the session
             file that wrote it; 0 in files written before it was kept),
             crc u32 (zlib.crc32 of the 60 before)
    records  page records, ``records`` bytes
    commit   seq u64, crc u32 of the records, crc u32 of these 12 bytes

States and costs:

| operation | what it writes | cost |
|---|---|---|
| checkpoint (delta) | a segment, appended (a core call per MiB); ``fdatasync`` | O(pages changed) |
| checkpoint (base) | a new file; ``fsync``, rename, ``fsync`` of its directory | O(pages) |
| open | nothing: it reads the file once, into the map | O(file) |

A delta's last writes (of a segment that fits the buffer, its only ones) and
its ``fdatasync`` go in one core call (``run_io``): one release of the GIL.
The records are encoded, summed and written 64 KiB at a time, so the
checkpointing thread never keeps a CPU for long from a host writer waiting for
it: the core yields the CPU every 0.2 ms of its work, between pages or writes.
A base is written for the first checkpoint, after a failed one, and when
the segments appended since the base outgrow it (and ``COMPACT_AFTER``), so
the file stays within about twice the base plus that, and the work of the
bases spreads over the changes that made them.

Failures. Nothing is written in place: a crash leaves the old file and, at
most, a torn last segment (one whose header, records or commit fails its
checksum, or that the file ends inside), which :func:`read` leaves out: the
state is then the checkpoint before it, and the activity logs since that one
(which :mod:`isc.store` deletes only once a newer checkpoint is on disk)
cover what it held. Any other damage raises ``CorruptMetadata`` naming the
file, the checkpoint and the page. A failed write raises and leaves the file
readable as before it; the bitmap's next snapshot is a base, so nothing
after the failure is appended to a file it may have left half-written.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from isc._core import IO_FDATASYNC, IO_PWRITE, DeltaBitmap, run_io
from isc._layout import MAX_RECORD
from isc.errors import CorruptMetadata

NAME = "checkpoint.journal"
MAGIC = b"ISCJRNL1"
COMPACT_AFTER = 64 << 20
"""Bytes of segments appended after the base below which no new base is written."""
_HEADER = struct.Struct("<8sQQQQIBB6xQ")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
_COMMIT = struct.Struct("<QII")
_BASE, _MARKED = 1, 2
_BUFFER = 1 << 20  # bytes of records per read or write
_PIECE = 64 << 10  # bytes of records encoded and summed at a time


@dataclass(frozen=True)
class Segment:
    """One checkpoint of a journal file, as its header and commit describe it."""

    at: int
    seq: int
    records: int
    generation: int
    size: int
    granularity: int
    base: bool
    marked: bool
    t: int
    records_crc: int
    session: int

    @property
    def end(self) -> int:
        return self.at + HEADER_SIZE + self.records + _COMMIT.size


@dataclass(frozen=True)
class Loaded:
    """What :func:`read` found: the map, and where appending goes on.

    ``torn`` says why the checkpoint after ``seq`` was left out (a crash
    while it was written), or is None. ``session`` is the session that wrote
    the checkpoint (0: unknown, a file of an earlier isc).
    """

    bitmap: DeltaBitmap
    seq: int
    end: int
    base_bytes: int
    torn: str | None
    session: int


def read(path: Path) -> Loaded:
    """Rebuild the map of the newest whole checkpoint in the journal at ``path``.

    Reads the file once into the map, in pieces of ``_BUFFER`` bytes (no copy
    of the whole). A torn last segment is left out (``Loaded.torn``). Raises
    ``CorruptMetadata`` naming the file (and the checkpoint and page) when it
    holds no whole checkpoint or any other segment is damaged or foreign;
    ``FileNotFoundError`` when there is none.
    """
    with open(path, "rb", buffering=0) as file:
        segments, torn = _segments(file, path)
        while True:
            if not segments:
                why = f"holds no whole checkpoint: {torn}" if torn else "is empty"
                raise CorruptMetadata(f"{path} {why}")
            try:
                bitmap = _replay(file, path, segments)
            except _Torn as exc:
                # The last segment was cut short by a crash: the one before stands.
                segments, torn = segments[:-1], str(exc)
                continue
            last = segments[-1]
            return Loaded(bitmap, last.seq, last.end, segments[0].end, torn, last.session)


class _Torn(Exception):
    """The last segment fails a check: a crash while it was written."""


def _segments(file, path: Path) -> tuple[list[Segment], str | None]:
    """The whole segments of ``file`` from their headers and commits, and why the rest is not."""
    segments: list[Segment] = []
    at, length = 0, os.fstat(file.fileno()).st_size
    while at < length:
        problem = None
        head = os.pread(file.fileno(), HEADER_SIZE, at)
        if len(head) < HEADER_SIZE:
            problem = "the file ends inside a checkpoint's header"
        elif (
            zlib.crc32(head[: _HEADER.size]) != _HEADER_CRC.unpack_from(head, _HEADER.size)[0]
            or head[:8] != MAGIC
        ):
            problem = f"the checkpoint header at byte {at} fails its checksum"
        if problem is None:
            _, seq, records, generation, size, granularity, flags, t, session = _HEADER.unpack_from(
                head
            )
            tail = os.pread(file.fileno(), _COMMIT.size, at + HEADER_SIZE + records)
            if len(tail) < _COMMIT.size:
                problem = f"the file ends inside checkpoint {seq}"
            else:
                commit_seq, crc, commit_crc = _COMMIT.unpack(tail)
                if commit_seq != seq or zlib.crc32(tail[:12]) != commit_crc:
                    problem = f"checkpoint {seq} has no valid commit record"
        if problem is not None:
            # Only the last segment can be torn: each is on disk before the next is begun.
            return segments, problem
        base, marked = bool(flags & _BASE), bool(flags & _MARKED)
        segment = Segment(
            at, seq, records, generation, size, granularity, base, marked, t, crc, session
        )
        _check_fits(segment, segments, path)
        segments.append(segment)
        at = segment.end
    return segments, None


def _check_fits(segment: Segment, before: list[Segment], path: Path) -> None:
    """Refuse a whole segment that does not follow the ones ``before`` it."""
    first = before[0] if before else segment
    problem = None
    if segment.base != (not before):
        problem = "the first checkpoint is not a base" if not before else "a base follows"
    elif (segment.size, segment.granularity) != (first.size, first.granularity):
        problem = (
            f"it tracks {segment.size} bytes at {segment.granularity}, the first "
            f"{first.size} at {first.granularity}"
        )
    elif before and segment.seq <= before[-1].seq:
        problem = f"it follows checkpoint {before[-1].seq}"
    elif segment.t not in (0, 1):
        problem = f"its tracking array is {segment.t}"
    if problem is not None:
        raise CorruptMetadata(f"{path}: checkpoint {segment.seq} at byte {segment.at}: {problem}")


def _replay(file, path: Path, segments: list[Segment]) -> DeltaBitmap:
    """A new map with every segment's records applied; ``_Torn`` if the last fails a check."""
    first = segments[0]
    try:
        bitmap = DeltaBitmap(first.size, first.granularity)
    except ValueError as exc:
        raise CorruptMetadata(f"{path}: the first checkpoint's geometry: {exc}") from None
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    for segment in segments:
        try:
            _apply(file, segment, bitmap, view)
        except CorruptMetadata as exc:
            if segment is segments[-1]:
                raise _Torn(f"checkpoint {segment.seq}: {exc}") from None
            raise CorruptMetadata(f"{path}: checkpoint {segment.seq}: {exc}") from None
    last = segments[-1]
    try:
        bitmap.load_state(last.t, last.marked, last.generation)
    except CorruptMetadata as exc:
        raise CorruptMetadata(f"{path}: checkpoint {last.seq}: {exc}") from None
    return bitmap


def _apply(file, segment: Segment, bitmap: DeltaBitmap, view: memoryview) -> None:
    """Stream one segment's records into ``bitmap``, checking them and their sum."""
    start = segment.at + HEADER_SIZE
    done = held = crc = 0  # records applied; bytes in the buffer not applied yet
    while done < segment.records:
        want = min(len(view) - held, segment.records - done - held)
        got = os.preadv(file.fileno(), [view[held : held + want]], start + done + held)
        if got < want:
            raise CorruptMetadata("the file ends inside its records")
        crc = zlib.crc32(view[held : held + got], crc)
        held += got
        used = bitmap.apply_records(view[:held], start + done)
        view[: held - used] = bytes(view[used:held])  # a record cut by the buffer's end
        done += used
        held -= used
        if held and done + held == segment.records:
            raise CorruptMetadata(f"its last record, at byte {start + done}, is cut short")
    if crc != segment.records_crc:
        raise CorruptMetadata("its records fail their checksum")


class Journal:
    """Writes the checkpoints of one state directory (see the module docstring).

    ``loaded`` is what :func:`read` found there, or None to start a new file
    at the first checkpoint. ``session`` names the session in each checkpoint
    (its session file's ``id``), so another's journal is told from its own.
    """

    def __init__(self, directory: Path, loaded: Loaded | None, session: int) -> None:
        self.path = directory / NAME
        self.session = session
        self._fd = -1
        self._end = 0
        self._base_bytes = 0
        if loaded is not None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self._end, self._base_bytes = loaded.end, loaded.base_bytes
            if loaded.torn:
                os.ftruncate(self._fd, self._end)  # what a crash cut short
        self._buffer = bytearray(HEADER_SIZE + _BUFFER + _COMMIT.size)

    @property
    def wants_base(self) -> bool:
        """Whether the next checkpoint should start a new file with a base."""
        appended = self._end - self._base_bytes
        return self._fd < 0 or appended > max(COMPACT_AFTER, self._base_bytes)

    def write(self, bitmap: DeltaBitmap, seq: int, header: tuple[bool, int, bool, int]) -> None:
        """Write the open snapshot of ``bitmap`` (``header`` is what ``snapshot`` returned)
        as checkpoint ``seq``, durably, then return. The caller ends the snapshot."""
        base, t, marked, generation = header
        if base:
            tmp = self.path.with_name(f".{NAME}.tmp")
            fd, at = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), 0
        else:
            fd, at = self._fd, self._end
        try:
            # The records gather behind room for the header and go out when the buffer
            # is full; a checkpoint that fits is one write, header and commit included.
            # They are encoded and summed a piece at a time: no long stretch of work
            # keeps a CPU from a host writer waiting for it (the core yields it
            # every 0.2 ms, zlib does not).
            view = memoryview(self._buffer)
            position, held, crc = at + HEADER_SIZE, HEADER_SIZE, 0
            while True:
                n = bitmap.snapshot_records(view[held : min(held + _PIECE, HEADER_SIZE + _BUFFER)])
                crc = zlib.crc32(view[held : held + n], crc)
                held += n
                if n == 0:
                    break
                if HEADER_SIZE + _BUFFER - held < MAX_RECORD:
                    _pwrite_all(fd, view[HEADER_SIZE:held], position)
                    position, held = position + held - HEADER_SIZE, HEADER_SIZE
            records = position + held - HEADER_SIZE - at - HEADER_SIZE
            flags = (_BASE if base else 0) | (_MARKED if marked else 0)
            head = _HEADER.pack(
                MAGIC,
                seq,
                records,
                generation,
                bitmap.size,
                bitmap.granularity,
                flags,
                t,
                self.session,
            )
            head += _HEADER_CRC.pack(zlib.crc32(head))
            end = held + _COMMIT.size
            _COMMIT.pack_into(view, held, seq, crc, zlib.crc32(struct.pack("<QI", seq, crc)))
            # The last writes and the sync in one core call: one release of the GIL.
            if position == at + HEADER_SIZE:
                view[:HEADER_SIZE] = head
                steps = _pieces(fd, view[:end], at)
            else:
                steps = [*_pieces(fd, view[HEADER_SIZE:end], position), (IO_PWRITE, fd, head, at)]
            run_io([*steps, (IO_FDATASYNC, fd)])
            position += held - HEADER_SIZE
            if base:
                os.replace(tmp, self.path)
                fsync_dir(self.path.parent)
        except BaseException:
            if base:
                os.close(fd)
            raise
        if base:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._base_bytes = fd, position + _COMMIT.size
        self._end = position + _COMMIT.size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    run_io(_pieces(fd, data, offset))


def _pieces(fd: int, data: memoryview, offset: int) -> list[tuple]:
    """The :func:`run_io` steps that write ``data`` at ``offset``, ``_PIECE`` bytes each:
    ``run_io`` yields the CPU between them, to a host writer waiting for it."""
    return [(IO_PWRITE, fd, data[i : i + _PIECE], offset + i) for i in range(0, len(data), _PIECE)]


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` durable (a created, renamed or deleted file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
