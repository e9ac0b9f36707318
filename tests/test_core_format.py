"""The serialized form of the compiled delta bitmap: round trips and every way to break it.

Crafted files carry a valid checksum, so each reaches the check it targets;
both the core and the reference must refuse them with ``CorruptMetadata``.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isc import _core, _layout, _reference
from isc.errors import CorruptMetadata

BITMAPS = (_core.DeltaBitmap, _reference.DeltaBitmap)
HEADER = struct.Struct("<8sIIQQQB7x")  # the header documented in isc._layout


def small_state() -> bytes:
    """A marked 100-chunk bitmap with tracking, transfer and saved bits: 100 bytes."""
    bitmap = _reference.DeltaBitmap(99 * 2048 + 5, 2048)
    bitmap.record_writes([0, 60 * 2048, 99 * 2048], [3 * 2048, 10 * 2048, 5])
    bitmap.mark()
    bitmap.record_writes([2048, 64 * 2048], [1, 2048])
    return bitmap.to_bytes()


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def with_header(data: bytes, **fields) -> bytes:
    """``data`` with header fields replaced and the checksum made valid again."""
    names = ("magic", "version", "granularity", "size", "chunks", "generation", "marked")
    header = dict(zip(names, HEADER.unpack_from(data), strict=True))
    header.update(fields)
    body = HEADER.pack(*(header[n] for n in names)) + data[HEADER.size : -4]
    return with_crc(body)


def state_of(size, granularity, marked=False, tracking=(), transfer=(), saved=(), generation=0):
    """Serialize a state given as chunk lists, valid or not, with a correct checksum."""
    chunks = -(-size // granularity)
    nbits = _layout.words_for(chunks) * 64

    def packed(chunk_list):
        flags = np.zeros(nbits, np.uint8)
        flags[list(chunk_list)] = 1
        return np.packbits(flags, bitorder="little").tobytes()

    return _layout.pack(
        _layout.State(
            size, granularity, generation, marked, packed(tracking), packed(transfer), packed(saved)
        )
    )


def assert_refused(data, match: str) -> None:
    for cls in BITMAPS:
        with pytest.raises(CorruptMetadata, match=match):
            cls.from_bytes(data)


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("granularity", [2048, 65536])
@pytest.mark.parametrize("chunks", [1, 63, 64, 65, 4097, 8193])
@pytest.mark.parametrize("stage", ["unmarked", "marked", "saved", "sent"])
def test_round_trip_is_byte_identical_to_reference(granularity, chunks, stage):
    size = (chunks - 1) * granularity + 3
    rng = np.random.default_rng(chunks)
    offsets = rng.integers(0, size, 40)
    lengths = np.minimum(rng.integers(0, 5 * granularity, 40), size - offsets)
    bitmaps = [cls(size, granularity) for cls in BITMAPS]
    for bitmap in bitmaps:
        bitmap.record_writes(offsets, lengths)
        if stage != "unmarked":
            bitmap.mark()
            bitmap.record_writes(offsets[::3], lengths[::3])
        if stage == "sent":
            bitmap.clear_transfer(0, chunks // 2)
    core, ref = bitmaps
    data = core.to_bytes()
    assert data == ref.to_bytes()
    for cls in BITMAPS:
        loaded = cls.from_bytes(data)
        assert loaded.to_bytes() == data
        loaded._check()
        for name in ("size", "granularity", "chunks", "marked", "generation", "saved_count"):
            assert getattr(loaded, name) == getattr(core, name)
        np.testing.assert_array_equal(loaded.extents(), core.extents())


def test_loaded_bitmap_keeps_working():
    core = _core.DeltaBitmap.from_bytes(small_state())
    ref = _reference.DeltaBitmap.from_bytes(small_state())
    for bitmap in (core, ref):
        bitmap.record_write(60 * 2048, 20 * 2048)
        bitmap.test_and_clear(0)
        bitmap.unmark()
        bitmap.mark(full=True)
        bitmap.record_write(0, 2048)
        bitmap._check()
    assert core.to_bytes() == ref.to_bytes()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_from_bytes_accepts_any_bytes_like(kind):
    data = small_state()
    assert _core.DeltaBitmap.from_bytes(kind(data)).to_bytes() == data


@pytest.mark.parametrize("value", [None, 42, "ISCDELTA", [1, 2], 1.5])
def test_from_bytes_of_non_bytes_is_a_type_error(value):
    for cls in BITMAPS:
        with pytest.raises(TypeError):
            cls.from_bytes(value)


# -- damage -------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [0x01, 0x80, 0xFF])
def test_every_single_byte_corruption_is_refused(flip):
    data = small_state()
    assert len(data) == 100
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= flip
        for cls in BITMAPS:
            with pytest.raises(CorruptMetadata):
                cls.from_bytes(bytes(damaged))


@settings(max_examples=200)
@given(data=st.data())
def test_random_byte_corruptions_are_refused(data):
    original = small_state()
    damaged = bytearray(original)
    positions = st.sets(st.integers(0, len(original) - 1), min_size=1, max_size=4)
    for position in data.draw(positions, "positions"):
        damaged[position] ^= data.draw(st.integers(1, 255), "flip")
    for cls in BITMAPS:
        with pytest.raises(CorruptMetadata):
            cls.from_bytes(bytes(damaged))


def test_truncation_at_every_length_is_refused():
    data = small_state()
    for length in range(len(data)):
        assert_refused(data[:length], "truncated|bytes")


@pytest.mark.parametrize("extra", [b"\0", b"\0" * 8, b"garbage"])
def test_trailing_bytes_are_refused(extra):
    assert_refused(small_state() + extra, "bytes")
    assert_refused(with_crc(small_state()[:-4] + extra), "bytes")


def test_checksum_mismatch_is_named():
    data = bytearray(small_state())
    data[HEADER.size] ^= 1
    assert_refused(bytes(data), "checksum")


# -- well-checksummed nonsense ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": b"ISCDELTB"}, "magic"),
        ({"magic": b"\0" * 8}, "magic"),
        ({"version": 0}, "version 0"),
        ({"version": 2}, "version 2"),
        ({"version": 2**32 - 1}, "version"),
        ({"marked": 2}, "marked flag is 2"),
        ({"marked": 255}, "marked flag"),
        ({"granularity": 4096}, "chunks|bytes"),
        ({"granularity": 3000}, "geometry|chunks|bytes"),
        ({"size": 0}, "geometry|chunks|bytes"),
        ({"chunks": 99}, "bytes|chunks"),
        ({"chunks": 128}, "chunks"),
        ({"size": 128 * 2048}, "chunks"),
        ({"chunks": 2**64 - 1}, "bytes"),
        ({"chunks": 2**60}, "bytes"),
    ],
)
def test_crafted_header_is_refused(fields, match):
    assert_refused(with_header(small_state(), **fields), match)


def test_geometry_that_agrees_with_itself_but_not_the_bitmaps_is_refused():
    # 100 chunks at 2K and 70 chunks at 4K use the same two words per bitmap.
    data = with_header(small_state(), granularity=4096, size=70 * 4096, chunks=70)
    assert_refused(data, "past its last chunk")


def test_impossible_granularity_with_matching_chunk_count_is_refused():
    data = with_header(small_state(), granularity=1024, size=100 * 1024, chunks=100)
    assert_refused(data, "geometry")


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"tracking": [100]}, "past its last chunk"),
        ({"marked": True, "transfer": [127]}, "past its last chunk"),
        ({"marked": True, "transfer": [127], "saved": [127]}, "past its last chunk"),
        ({"marked": True, "transfer": [3], "saved": [3, 4]}, "saved"),
        ({"marked": True, "saved": [99]}, "saved"),
        ({"transfer": [5]}, "unmarked"),
        ({"tracking": [1], "transfer": [0, 99]}, "unmarked"),
        ({"saved": [7]}, "unmarked|saved"),
    ],
)
def test_impossible_bitmaps_are_refused(state, match):
    assert_refused(state_of(99 * 2048 + 5, 2048, **state), match)


def test_crafted_valid_states_load_in_both():
    data = state_of(
        99 * 2048 + 5, 2048, marked=True, tracking=[99], transfer=[0, 63, 64, 99], saved=[64]
    )
    core, ref = (cls.from_bytes(data) for cls in BITMAPS)
    assert core.to_bytes() == ref.to_bytes() == data
    np.testing.assert_array_equal(core.extents(), ref.extents())
    assert core.saved_count == 1
    core._check()
