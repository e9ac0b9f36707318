"""Geometry and serialized form of a delta bitmap, shared by ``_core`` and ``_reference``.

A bitmap of ``chunks`` bits is stored as ``words = ceil(chunks / 64)`` little-endian
uint64 words; chunk ``c`` is bit ``c % 64`` of word ``c // 64``. Bits past ``chunks``
in the last word are always zero.

Serialized form (all integers little-endian)::

    magic     8s   b"ISCDELTA"
    version   u32  FORMAT_VERSION
    gran      u32  granularity in bytes
    size      u64  LUN size in bytes
    chunks    u64  ceil(size / gran), stored to catch foreign files early
    gen       u64  generation (number of marks so far)
    marked    u8   0 or 1, then 7 zero bytes
    tracking  words * 8 bytes
    transfer  words * 8 bytes
    saved     words * 8 bytes
    crc       u32  zlib.crc32 of everything before it

``unpack`` checks every field and the invariants between the three bitmaps, so
a file that passes describes a state the engine can be in.

Page records (what a checkpoint writes: ``DeltaBitmap.snapshot_records``,
``isc.journal``). The bitmaps are stored as the engine holds them: physical
arrays 0 and 1 (tracking is array ``t``, transfer ``1 - t``; a mark swaps the
roles, not the words) and 2 (saved), each cut into pages of ``PAGE_WORDS``
words (the last page of an array may be shorter). Page ``p`` of array ``a``
has id ``a * pages + p``, ``pages = ceil(words / PAGE_WORDS)``. A record gives
one page's whole content::

    crc    u32  zlib.crc32 of the rest of the record
    kind   u32  ZERO_PAGE: every word zero; FULL_PAGE: every chunk's bit set;
                SPARSE_PAGE: as follows
    id     u64  the page
    masks  8 x u64 (sparse only): bit i of mask j is set when word 64 j + i
                of the page is not zero
    words  u64 each (sparse only): those words, in order

For example the page ``[0, 5, 0, ..., 0, 1 << 63]`` of 512 words is a sparse
record of 16 + 64 + 16 bytes: masks ``[0b10, 0, ..., 0, 1 << 63]``, words
``[5, 1 << 63]``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from isc.errors import CorruptMetadata, ParameterError, RangeError, StateError

MIN_GRANULARITY = 2048
MAX_GRANULARITY = 65536
DEFAULT_GRANULARITY = 65536

MAGIC = b"ISCDELTA"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQB7x")
_CRC = struct.Struct("<I")

PAGE_WORDS = 512
"""Words per page: a page is 4 KiB of one bitmap."""
ZERO_PAGE, FULL_PAGE, SPARSE_PAGE = 0, 1, 2
"""Kinds of page record."""
_RECORD_HEAD = struct.Struct("<IIQ")
_MASKS = 64
MAX_RECORD = _RECORD_HEAD.size + _MASKS + PAGE_WORDS * 8
"""The longest page record, in bytes: the least buffer ``snapshot_records`` takes."""
ARRAYS = ("bitmap 0", "bitmap 1", "the saved flags")
"""Names of the physical arrays, by index."""
_ONES = (1 << 64) - 1


def check_geometry(size: int, granularity: int) -> int:
    """Validate a LUN size and granularity; return the number of chunks.

    Raises ``TypeError`` for non-integers and ``ParameterError`` (a ValueError)
    for a size that is not positive or a granularity that is not a power of two
    from 2048 to 65536.
    """
    if isinstance(size, bool) or isinstance(granularity, bool):
        raise TypeError("size and granularity must be integers, not bool")
    size = _as_int(size, "size")
    granularity = _as_int(granularity, "granularity")
    if size <= 0:
        raise ParameterError(f"LUN size must be > 0 bytes, got {size}")
    if not (
        MIN_GRANULARITY <= granularity <= MAX_GRANULARITY and granularity & (granularity - 1) == 0
    ):
        raise ParameterError(
            f"granularity must be a power of two from {MIN_GRANULARITY} to "
            f"{MAX_GRANULARITY} bytes, got {granularity}"
        )
    return -(-size // granularity)


def _as_int(value: object, name: str) -> int:
    try:
        return int(value.__index__())  # type: ignore[attr-defined]
    except AttributeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def words_for(chunks: int) -> int:
    """Number of uint64 words that hold ``chunks`` bits."""
    return (chunks + 63) // 64


class State(NamedTuple):
    """The whole state of a delta bitmap, as read from its serialized form."""

    size: int
    granularity: int
    generation: int
    marked: bool
    tracking: bytes
    transfer: bytes
    saved: bytes


def pack(state: State) -> bytes:
    """Serialize ``state`` (bitmaps given as ``words * 8`` bytes each)."""
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        state.granularity,
        state.size,
        -(-state.size // state.granularity),
        state.generation,
        int(state.marked),
    )
    body = b"".join((header, state.tracking, state.transfer, state.saved))
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes | bytearray | memoryview) -> State:
    """Parse and validate a serialized delta bitmap.

    Raises ``CorruptMetadata`` (a ValueError) naming what is wrong when the
    data is truncated, foreign, of an unknown version, fails its checksum, or
    describes an impossible state. Raises ``TypeError`` for non-bytes input.
    """
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size + _CRC.size:
        raise CorruptMetadata(
            f"delta bitmap data is truncated: {len(view)} bytes, the header alone needs "
            f"{_HEADER.size + _CRC.size}"
        )
    magic, version, granularity, size, chunks, generation, marked = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptMetadata(f"not a delta bitmap: magic is {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptMetadata(
            f"delta bitmap format version {version} is not supported (this isc reads "
            f"version {FORMAT_VERSION}); upgrade isc or recreate the session"
        )
    nbytes = words_for(chunks) * 8
    expected = _HEADER.size + 3 * nbytes + _CRC.size
    if len(view) != expected:
        raise CorruptMetadata(
            f"delta bitmap data is {len(view)} bytes, its header announces {expected}: "
            "truncated or padded"
        )
    (crc,) = _CRC.unpack_from(view, expected - _CRC.size)
    if zlib.crc32(view[: expected - _CRC.size]) != crc:
        raise CorruptMetadata("delta bitmap checksum mismatch: the data is corrupt")
    try:
        real_chunks = check_geometry(size, granularity)
    except ParameterError as exc:
        raise CorruptMetadata(f"delta bitmap has an impossible geometry: {exc}") from None
    if real_chunks != chunks:
        raise CorruptMetadata(
            f"delta bitmap says {chunks} chunks, but size {size} at granularity "
            f"{granularity} has {real_chunks}"
        )
    if marked not in (0, 1):
        raise CorruptMetadata(f"delta bitmap marked flag is {marked}, expected 0 or 1")
    start = _HEADER.size
    parts = [bytes(view[start + i * nbytes : start + (i + 1) * nbytes]) for i in range(3)]
    _check_bits(chunks, bool(marked), *parts)
    return State(size, granularity, generation, bool(marked), *parts)


def _check_bits(chunks: int, marked: bool, tracking: bytes, transfer: bytes, saved: bytes) -> None:
    track, xfer, sav = (np.frombuffer(p, dtype="<u8") for p in (tracking, transfer, saved))
    tail = chunks % 64
    if tail:
        pad = np.uint64(~((1 << tail) - 1) & 0xFFFF_FFFF_FFFF_FFFF)
        if (track[-1] | xfer[-1] | sav[-1]) & pad:
            raise CorruptMetadata("delta bitmap has bits set past its last chunk")
    if not marked and (xfer.any() or sav.any()):
        raise CorruptMetadata("delta bitmap is unmarked but has transfer or saved bits set")
    if (sav & ~xfer).any():
        raise CorruptMetadata("delta bitmap has saved chunks whose transfer bit is clear")


def pages_for(words: int) -> int:
    """Pages of one array of ``words`` words."""
    return -(-words // PAGE_WORDS)


def encode_page(ident: int, words: np.ndarray, chunks: int, pages: int) -> bytes:
    """The record of page ``ident`` (see the module docstring) holding ``words`` (uint64).

    ``chunks`` and ``pages`` are the map's: they say whether the page ends
    its array, where the last word holds only the chunks that remain.
    """
    last = _ONES
    if ident % pages == pages - 1 and chunks % 64:
        last = (1 << (chunks % 64)) - 1
    full = np.full(len(words), _ONES, dtype=np.uint64)
    full[-1] = last
    body = b""
    if np.array_equal(words, full):
        kind = FULL_PAGE
    elif not words.any():
        kind = ZERO_PAGE
    else:
        kind = SPARSE_PAGE
        present = np.zeros(PAGE_WORDS, dtype=bool)
        present[: len(words)] = words != 0
        masks = np.packbits(present, bitorder="little").tobytes()
        body = masks + words[words != 0].astype("<u8").tobytes()
    rest = struct.pack("<IQ", kind, ident) + body
    return _CRC.pack(zlib.crc32(rest)) + rest


def decode_records(data, chunks: int, offset: int = 0) -> Iterator[tuple[int, np.ndarray, int]]:
    """``(page id, words, end)`` of each whole record in ``data``, ``end`` the offset past it.

    Raises ``CorruptMetadata`` like ``DeltaBitmap.apply_records`` at a record
    that fails its checksum or does not fit a map of ``chunks`` chunks
    (``offset`` is that of ``data[0]``, for the message).
    """
    view = memoryview(data).cast("B")
    words_per_array = words_for(chunks)
    pages = pages_for(words_per_array)
    at = 0
    while at + _RECORD_HEAD.size <= len(view):
        crc, kind, ident = _RECORD_HEAD.unpack_from(view, at)
        if kind == SPARSE_PAGE:
            if at + _RECORD_HEAD.size + _MASKS > len(view):
                break
            masks = np.frombuffer(view, "<u8", 8, at + _RECORD_HEAD.size)
            size = _RECORD_HEAD.size + _MASKS + 8 * sum(int(m).bit_count() for m in masks)
        elif kind in (ZERO_PAGE, FULL_PAGE):
            size = _RECORD_HEAD.size
        else:
            raise record_error(offset + at, ident, pages, 1)
        if at + size > len(view):
            break
        if zlib.crc32(view[at + 4 : at + size]) != crc:
            raise record_error(offset + at, ident, pages, 1)
        if ident >= 3 * pages:
            raise record_error(offset + at, ident, pages, 2)
        first = ident % pages * PAGE_WORDS
        count = min(PAGE_WORDS, words_per_array - first)
        if kind == ZERO_PAGE:
            words = np.zeros(count, dtype=np.uint64)
        elif kind == FULL_PAGE:
            words = np.full(count, _ONES, dtype=np.uint64)
            if first + count == words_per_array and chunks % 64:
                words[-1] = (1 << (chunks % 64)) - 1
        else:
            present = np.unpackbits(np.frombuffer(masks.tobytes(), np.uint8), bitorder="little")
            if present[count:].any():
                raise record_error(offset + at, ident, pages, 3)
            words = np.zeros(count, dtype=np.uint64)
            body = at + _RECORD_HEAD.size + _MASKS
            words[present[:count].astype(bool)] = np.frombuffer(view[body : at + size], "<u8")
        if first + count == words_per_array and chunks % 64 and int(words[-1]) >> (chunks % 64):
            raise record_error(offset + at, ident, pages, 3)
        at += size
        yield ident, words, at


_RECORD_PROBLEMS = {
    1: "fails its checksum",
    2: "names no page of this map",
    3: "sets bits outside the map",
}


def record_error(offset: int, ident: int, pages: int, problem: int) -> CorruptMetadata:
    """The error for a page record at byte ``offset`` that cannot be loaded (``problem``)."""
    array, page = divmod(ident, pages)
    name = f"page {page} of {ARRAYS[array]}" if array < 3 else f"page id {ident}"
    return CorruptMetadata(f"the page record at byte {offset} ({name}) {_RECORD_PROBLEMS[problem]}")


def snapshot_open_error() -> StateError:
    """The error for opening a snapshot while one is open."""
    return StateError("a snapshot of this delta bitmap is open; end it with snapshot_end first")


def snapshot_closed_error() -> StateError:
    """The error for taking records from, or ending, a snapshot that is not open."""
    return StateError("no snapshot of this delta bitmap is open; call snapshot() first")


def snapshot_unfinished_error() -> StateError:
    """The error for committing a snapshot whose records were not all taken."""
    return StateError(
        "the snapshot still has records to take: call snapshot_records until it returns 0, "
        "or end it with snapshot_end(False)"
    )


def write_range_error(offset: int, length: int, size: int) -> RangeError:
    """The error for a host write ``[offset, offset + length)`` outside a LUN of ``size`` bytes."""
    return RangeError(
        f"write [{offset}, {offset + length}) is outside the LUN [0, {size}); "
        "offsets and lengths must be >= 0 and end at or before the LUN size"
    )


def chunk_error(chunk: int, chunks: int) -> RangeError:
    """The error for a chunk index outside ``[0, chunks)``."""
    return RangeError(f"chunk {chunk} is outside the delta bitmap's chunks [0, {chunks})")


def already_marked_error(generation: int) -> StateError:
    """The error for marking a delta bitmap that is already marked."""
    return StateError(
        f"delta bitmap is already marked (generation {generation}); "
        "unmark it (or finish the transfer) before marking again"
    )


def chunk_range_error(first: int, count: int, chunks: int) -> RangeError:
    """The error for a chunk range ``[first, first + count)`` outside ``[0, chunks)``."""
    return RangeError(
        f"chunk range [{first}, {first + count}) is outside the delta bitmap's chunks "
        f"[0, {chunks}); first and count must be >= 0"
    )


def max_chunks_error(max_chunks: int) -> ParameterError:
    """The error for a negative ``max_chunks``."""
    return ParameterError(f"max_chunks must be >= 0 (0 means unlimited), got {max_chunks}")


def end_write_error(offset: int, length: int) -> StateError:
    """The error for an ``end_write`` that matches no ``begin_write``."""
    return StateError(
        f"end_write({offset}, {length}) matches no write in flight; call it once, "
        "after begin_write with the same range and the cofw flag begin_write implied"
    )


def mark_ended_error(generation: int, current: int, marked: bool) -> StateError:
    """The error for clearing transfer bits of a mark that has ended."""
    now = f"marked at generation {current}" if marked else "unmarked"
    return StateError(
        f"delta bitmap is no longer marked at generation {generation} (it is {now}); "
        "the transfer was interrupted: unmark and copy again"
    )
