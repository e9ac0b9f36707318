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
"""

from __future__ import annotations

import struct
import zlib
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
