"""NBD protocol extensions of isc's server, spoken by hand: structured replies, metadata
contexts and block status, TRIM, WRITE_ZEROES flags, CACHE, and their malformed forms.

Every exchange goes through :class:`Raw` (``test_nbd``, the spec's numbers written
out again), extended here to read structured reply chunks, so each test sees the
exact bytes a client sees. The block status answers are checked against a shadow
model computed chunk by chunk from the session's own bitmaps (``tracking(c)``,
``transfer(c)``) and, for ``base:allocation``, from ``SEEK_DATA``/``SEEK_HOLE``
asked directly. Randomness is seeded.
"""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import test_nbd
from helpers import TIMEOUT
from test_nbd import (
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EPERM,
    FUA,
    KIB,
    MIB,
    NO_HOLE,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_INFO,
    REP_SERVER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Raw,
    raw,
)

from isc import FileLUN, MemoryLUN, Session
from isc.nbd import NBDServer, SessionLUN
from isc.nbd import server as server_module
from isc.nbd.export import MAX_EXTENTS, LUNExport, _KnownData

SEED = 20261205
serve = test_nbd.serve  # the fixture: isc servers on Unix sockets in tmp_path

# The spec's numbers for the extensions, written out again.
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10
REP_META_CONTEXT = 4
CMD_TRIM, CMD_CACHE, CMD_BLOCK_STATUS = 4, 5, 7
DF, REQ_ONE, FAST_ZERO = 4, 8, 16
REPLY_FLAG_DONE = 1
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS = 0, 1, 2, 5
TYPE_ERROR = 2**15 + 1
STRUCTURED_REPLY_MAGIC = 0x668E33EF
ENOTSUP = 95
STATE_HOLE, STATE_ZERO, STATE_DIRTY = 1, 2, 1
FLAG_SEND_DF, FLAG_SEND_TRIM, FLAG_SEND_CACHE, FLAG_SEND_FAST_ZERO = 128, 32, 1024, 2048


class Client(Raw):
    """:class:`Raw`, plus structured replies, metadata contexts and block status."""

    def answer(self) -> list[tuple[int, int, bytes]]:
        """The reply to the last request: [(0, error, b"")] for a simple reply, else its
        chunks as (type, flags, payload) up to the one flagged DONE."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv(12))
            assert handle == 0xC0FFEE
            return [(0, error, b"")]
        chunks = []
        while True:
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, kind, handle, length = struct.unpack(">HHQI", self.recv(16))
            assert handle == 0xC0FFEE
            chunks.append((kind, flags, self.recv(length)))
            if flags & REPLY_FLAG_DONE:
                return chunks
            (magic,) = struct.unpack(">I", self.recv(4))

    def error(self) -> int:
        """The error of the last request's reply (0: none); a chunked error carries a message."""
        chunks = self.answer()
        if chunks[0][0] == 0:
            return chunks[0][1]
        ((kind, _, payload),) = [c for c in chunks if c[0] & 2**15] or [(0, 0, b"")]
        if not kind:
            return 0
        error, length = struct.unpack(">IH", payload[:6])
        assert length > 0 and payload[6:].decode(), "an error chunk without a message"
        return error

    def structured(self) -> None:
        assert self.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]

    @staticmethod
    def meta_data(name: bytes, *queries: bytes) -> bytes:
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        return data + b"".join(struct.pack(">I", len(q)) + q for q in queries)

    def contexts(self, option: int, name: bytes, *queries: bytes) -> dict[str, int]:
        """Ask for metadata contexts; {name: id} of the replies (which end with ACK)."""
        replies = self.option(option, self.meta_data(name, *queries))
        assert replies[-1] == (REP_ACK, b""), replies
        found = {}
        for reply, data in replies[:-1]:
            assert reply == REP_META_CONTEXT
            found[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
        return found

    def go_flags(self, name: bytes = b"disk") -> int:
        """NBD_OPT_GO; the transmission flags granted."""
        replies = self.option(OPT_GO, self.info_data(name))
        assert replies[-1][0] == REP_ACK, replies
        return struct.unpack(">HQH", replies[0][1])[2]

    def status(self, offset: int, length: int, flags: int = 0) -> dict[int, list[tuple[int, int]]]:
        """BLOCK_STATUS; {context id: [(length, flags), ...]}."""
        self.request(CMD_BLOCK_STATUS, offset, length, flags=flags)
        chunks = self.answer()
        assert all(kind == TYPE_BLOCK_STATUS for kind, _, _ in chunks), chunks
        found = {}
        for _, _, payload in chunks:
            words = struct.unpack(f">{len(payload) // 4}I", payload)
            found[words[0]] = list(zip(words[1::2], words[2::2], strict=True))
        return found

    def read_chunks(self, offset: int, length: int, flags: int = 0) -> tuple[bytes, list]:
        """A structured READ: the bytes it describes and its chunks as (type, offset, size)."""
        self.request(CMD_READ, offset, length, flags=flags)
        data = bytearray(length)
        covered = np.zeros(length, bool)
        pieces = []
        for kind, _, payload in self.answer():
            if kind == TYPE_OFFSET_DATA:
                at, size = struct.unpack(">Q", payload[:8])[0], len(payload) - 8
                data[at - offset : at - offset + size] = payload[8:]
            elif kind == TYPE_OFFSET_HOLE:
                at, size = struct.unpack(">QI", payload)
            else:
                assert kind == TYPE_NONE and not length, kind
                continue
            assert size > 0 and offset <= at and at + size <= offset + length
            assert not covered[at - offset : at - offset + size].any(), "overlapping chunks"
            covered[at - offset : at - offset + size] = True
            pieces.append((kind, at, size))
        assert covered.all(), "the chunks leave part of the read uncovered"
        return bytes(data), pieces


@contextmanager
def client(server: NBDServer) -> Iterator[Client]:
    with raw(server) as plain:
        yield Client(plain.sock)


def session_server(serve, lun, granularity: int = 64 * KIB, name: str = "disk"):
    """A session named ``name`` on ``lun`` and the server exporting it as "disk"."""
    session = Session(lun, granularity=granularity, name=name)
    return session, serve(SessionLUN(session))


def dirty_model(bit, granularity: int, offset: int, length: int) -> list[tuple[int, int]]:
    """QEMU's qemu:dirty-bitmap extents of [offset, offset + length), chunk by chunk."""
    extents: list[list[int]] = []
    at, end = offset, offset + length
    while at < end:
        chunk = at // granularity
        stop = min((chunk + 1) * granularity, end)
        flags = STATE_DIRTY if bit(chunk) else 0
        if extents and extents[-1][1] == flags:
            extents[-1][0] += stop - at
        else:
            extents.append([stop - at, flags])
        at = stop
    return [tuple(e) for e in extents]


def holes_model(path: Path, offset: int, length: int) -> list[tuple[int, int]]:
    """base:allocation extents asked of the file system directly."""
    extents: list[list[int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        at, end = offset, offset + length
        while at < end:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                data = end
            data = min(data, end)
            if data > at:
                extents.append([data - at, STATE_HOLE | STATE_ZERO])
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            extents.append([hole - data, 0])
            at = hole
    finally:
        os.close(fd)
    return [tuple(e) for e in extents]


# -- negotiation -------------------------------------------------------------------------------
def test_structured_replies_and_metadata_contexts_are_negotiated_as_the_spec_says(serve):
    session, server = session_server(serve, MemoryLUN(4 * MIB), name="vol")
    bitmap = "qemu:dirty-bitmap:vol"
    with client(server) as c:
        c.greet()
        # Metadata contexts need structured replies first.
        for option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            ((reply, message),) = c.option(option, c.meta_data(b"disk"))
            assert reply == REP_ERR_INVALID and b"STRUCTURED_REPLY" in message
        assert c.option(OPT_STRUCTURED_REPLY, b"x")[0][0] == REP_ERR_INVALID
        c.structured()
        assert c.option(OPT_STRUCTURED_REPLY)[0][0] == REP_ERR_INVALID  # only once
        listed = {"base:allocation": 0, bitmap: 0}  # LIST's ids are 0
        assert c.contexts(OPT_LIST_META_CONTEXT, b"disk") == listed
        assert c.contexts(OPT_LIST_META_CONTEXT, b"", b"base:") == {"base:allocation": 0}
        for wildcard in (b"qemu:", b"qemu:dirty-bitmap:"):
            assert c.contexts(OPT_LIST_META_CONTEXT, b"disk", wildcard) == {bitmap: 0}
        assert c.contexts(OPT_LIST_META_CONTEXT, b"disk", b"x-other:", b"nocolon") == {}
        assert c.contexts(OPT_SET_META_CONTEXT, b"disk", b"base:", b"qemu:") == {}
        ((reply, message),) = c.option(OPT_SET_META_CONTEXT, c.meta_data(b"nope", b"base:"))
        assert reply == REP_ERR_UNKNOWN and b"nope" in message
        for bad in (b"\0\0\0\x09disk", c.meta_data(b"disk", b"base:")[:-1], b"\0" * 3):
            assert c.option(OPT_SET_META_CONTEXT, bad)[0][0] == REP_ERR_INVALID
        chosen = c.contexts(OPT_SET_META_CONTEXT, b"disk", bitmap.encode(), b"base:allocation")
        assert set(chosen) == {"base:allocation", bitmap}
        assert len(set(chosen.values())) == 2 and 0 not in chosen.values()
        flags = c.go_flags()
        assert flags & FLAG_SEND_DF and flags & FLAG_SEND_CACHE and flags & FLAG_SEND_FAST_ZERO
        assert not flags & FLAG_SEND_TRIM  # a MemoryLUN frees no space
        session.write(MIB, b"x")
        answer = c.status(0, 4 * MIB)
        assert answer[chosen[bitmap]] == [
            (MIB, 0),
            (64 * KIB, STATE_DIRTY),
            (3 * MIB - 64 * KIB, 0),
        ]
        assert answer[chosen["base:allocation"]] == [(4 * MIB, 0)]  # memory: all data


def test_without_structured_replies_nothing_extended_is_offered(serve):
    server = serve(MemoryLUN(MIB))
    with client(server) as c:
        c.greet()
        assert not c.go_flags() & FLAG_SEND_DF
        c.request(CMD_BLOCK_STATUS, 0, 4096)
        assert c.error() == EINVAL  # a simple reply: no context without structured replies
        c.request(CMD_READ, 0, 8, flags=DF)
        assert c.error() == EINVAL  # DF is not offered either
        c.request(CMD_READ, 0, 4)
        assert c.reply() == 0 and c.recv(4) == bytes(4)


def test_contexts_set_for_one_export_do_not_reach_another(serve):
    session, server = session_server(serve, MemoryLUN(MIB))
    session.mark()
    with client(server) as c:
        c.greet()
        c.structured()
        assert c.contexts(OPT_SET_META_CONTEXT, b"disk@frozen", b"base:allocation")
        c.go_flags(b"disk")
        c.request(CMD_BLOCK_STATUS, 0, 4096)
        assert c.error() == EINVAL
        assert c.read_chunks(0, 4)[0] == bytes(4)  # the connection goes on


# -- block status ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("granularity", "chunks", "tail"),
    [(2 * KIB, 63, 0), (4 * KIB, 64, 1), (16 * KIB, 65, 100), (64 * KIB, 129, 65535)],
)
def test_dirty_bitmap_extents_match_the_bitmap_chunk_by_chunk(granularity, chunks, tail):
    size = chunks * granularity + tail
    rng = random.Random(SEED + granularity)
    session = Session(MemoryLUN(size), granularity=granularity, name="vol")
    export = LUNExport(SessionLUN(session), "vol", readonly=False)
    for _ in range(rng.randrange(1, 40)):
        length = rng.choice([1, granularity, 3 * granularity + 7, size // 5])
        session.write(rng.randrange(size - length + 1), b"\1" * length)
    bitmap = session.bitmap
    for _ in range(200):
        offset = rng.randrange(size)
        length = rng.randrange(1, size - offset + 1)
        one = rng.random() < 0.3
        got = export.block_status(1, offset, length, 1 if one else MAX_EXTENTS).tolist()
        expected = dirty_model(bitmap.tracking, granularity, offset, length)
        assert [tuple(e) for e in got] == (expected[:1] if one else expected), (offset, length)


def test_block_status_over_the_wire_matches_both_bitmaps_and_the_files_holes(serve, tmp_path):
    g = 16 * KIB
    size = 200 * g + 5
    path = tmp_path / "src.img"
    lun = FileLUN.create(path, size)
    rng = random.Random(SEED)
    for _ in range(12):  # data straight on the file: holes and data, no tracking
        lun.write(rng.randrange(size - 20000), rng.randbytes(rng.randrange(1, 20000)))
    session, server = session_server(serve, lun, granularity=g, name="vol")
    for _ in range(10):
        session.write(rng.randrange(size - 3 * g), rng.randbytes(rng.randrange(1, 3 * g)))
    session.mark()
    for _ in range(5):  # tracked after the mark; the first ones are now in transfer
        session.write(rng.randrange(size - g), rng.randbytes(rng.randrange(1, g)))
    bitmap = session.bitmap
    for export, bit in (("disk", bitmap.tracking), ("disk@frozen", bitmap.transfer)):
        with client(server) as c:
            c.greet()
            c.structured()
            ids = c.contexts(
                OPT_SET_META_CONTEXT, export.encode(), b"base:allocation", b"qemu:dirty-bitmap:vol"
            )
            c.go_flags(export.encode())
            for offset, length in [(0, size), (g - 1, 3 * g + 2), (size - 7, 7), (5 * g, g)]:
                answer = c.status(offset, length)
                dirty = answer[ids["qemu:dirty-bitmap:vol"]]
                assert dirty == dirty_model(bit, g, offset, length), (export, offset, length)
                assert sum(n for n, _ in dirty) == length
                one = c.status(offset, length, REQ_ONE)
                assert all(len(extents) == 1 for extents in one.values())
                assert one[ids["qemu:dirty-bitmap:vol"]] == dirty[:1]
                if export == "disk":
                    expected = holes_model(path, offset, length)
                    assert answer[ids["base:allocation"]] == expected
                    assert one[ids["base:allocation"]] == expected[:1]


def test_a_frozen_export_reports_a_chunk_saved_since_the_mark_as_data(serve, tmp_path):
    g = 64 * KIB
    lun = FileLUN.create(tmp_path / "src.img", 16 * g)  # all a hole
    session, server = session_server(serve, lun, granularity=g)
    session.write(2 * g, b"\1")
    session.mark()
    session.write(2 * g, b"\2")  # saved first: at the mark it held the \1
    with client(server) as c:
        c.greet()
        c.structured()
        ids = c.contexts(OPT_SET_META_CONTEXT, b"disk@frozen", b"base:allocation")
        c.go_flags(b"disk@frozen")
        hole = STATE_HOLE | STATE_ZERO
        assert c.status(0, 16 * g)[ids["base:allocation"]] == [
            (2 * g, hole),
            (g, 0),
            (13 * g, hole),
        ]
        data, pieces = c.read_chunks(0, 4 * g)
        assert data == bytes(2 * g) + b"\1" + bytes(2 * g - 1)
        assert [(kind, at) for kind, at, _ in pieces] == [
            (TYPE_OFFSET_HOLE, 0),
            (TYPE_OFFSET_DATA, 2 * g),
            (TYPE_OFFSET_HOLE, 3 * g),
        ]


def test_a_block_status_reply_is_capped_and_the_client_can_go_on(serve, tmp_path):
    g = 2 * KIB
    size = (2 * MAX_EXTENTS + 10) * g
    lun = FileLUN.create(tmp_path / "sparse.img", size)
    session, server = session_server(serve, lun, granularity=g)
    # Every other chunk dirty: one extent per chunk.
    session.bitmap.record_writes(
        np.arange(0, size, 2 * g), np.ones(size // (2 * g), np.int64), cofw=False
    )
    with client(server) as c:
        c.greet()
        c.structured()
        ids = c.contexts(OPT_SET_META_CONTEXT, b"disk", b"qemu:dirty-bitmap:disk")
        c.go_flags()
        (extents,) = c.status(0, size).values()
        assert len(extents) == MAX_EXTENTS
        covered = sum(n for n, _ in extents)
        (rest,) = c.status(covered, size - covered).values()
        assert extents[-1][1] != rest[0][1]
        assert ids


# -- requests: the right error, the connection usable, nothing written ----------------------------
def test_malformed_requests_for_the_new_commands_are_refused_and_change_nothing(serve, tmp_path):
    lun = FileLUN.create(tmp_path / "src.img", 4 * MIB)
    lun.write(0, random.Random(SEED).randbytes(4 * MIB))
    image = lun.read(0, 4 * MIB)
    session, server = session_server(serve, lun)
    with client(server) as c:
        c.greet()
        c.structured()
        c.contexts(OPT_SET_META_CONTEXT, b"disk", b"base:allocation", b"qemu:dirty-bitmap:disk")
        assert c.go_flags() & FLAG_SEND_TRIM
        for command, offset, length, flags, error in [
            (CMD_BLOCK_STATUS, 0, 0, 0, EINVAL),  # zero length
            (CMD_BLOCK_STATUS, 4 * MIB - 10, 11, 0, EINVAL),  # past the end
            (CMD_BLOCK_STATUS, 0, 4096, DF, EINVAL),  # DF belongs to READ
            (CMD_BLOCK_STATUS, 0, 4096, 0x8000, EINVAL),  # no such flag
            (CMD_READ, 0, 4096, REQ_ONE, EINVAL),  # REQ_ONE belongs to BLOCK_STATUS
            (CMD_TRIM, 4 * MIB - 10, 11, 0, EINVAL),  # past the end
            (CMD_TRIM, 0, 4096, NO_HOLE, EINVAL),  # NO_HOLE belongs to WRITE_ZEROES
            (CMD_WRITE_ZEROES, 4 * MIB - 10, 11, 0, ENOSPC),
            (CMD_WRITE_ZEROES, 0, 4096, FAST_ZERO | NO_HOLE, ENOTSUP),  # would write zeros
            (CMD_WRITE_ZEROES, 0, 4096, DF, EINVAL),
            (CMD_CACHE, 4 * MIB - 10, 11, 0, EINVAL),
            (CMD_CACHE, 0, 4096, NO_HOLE, EINVAL),
            (CMD_FLUSH, 0, 1, 0, EINVAL),
            (99, 0, 0, 0, EINVAL),
        ]:
            c.request(command, offset, length, flags=flags)
            assert c.error() == error, (command, offset, length, flags)
        c.request(CMD_CACHE, 0, 4 * MIB)
        assert c.error() == 0
        data, _ = c.read_chunks(0, 4 * MIB)
        assert data == image
    assert lun.read(0, 4 * MIB) == image
    assert session.bitmap.tracking_count == 0


def test_writes_zeroes_and_trims_to_a_frozen_or_read_only_export_fail_eperm(serve):
    lun = MemoryLUN(MIB)
    lun.write(0, b"\7" * MIB)
    session, server = session_server(serve, lun)
    session.mark()
    read_only = serve(MemoryLUN(MIB), readonly=True)
    for target, name in ((server, b"disk@frozen"), (read_only, b"disk")):
        with client(target) as c:
            c.greet()
            c.structured()
            c.go_flags(name)
            c.request(CMD_WRITE, 0, 4, payload=b"xxxx")
            assert c.error() == EPERM
            c.request(CMD_WRITE_ZEROES, 0, 4)
            assert c.error() == EPERM
            if name == b"disk":
                c.request(CMD_TRIM, 0, 4)
                assert c.error() == EPERM
            c.request(CMD_FLUSH)
            assert c.error() == (EINVAL if name == b"disk@frozen" else 0)
    assert lun.read(0, MIB) == b"\7" * MIB
    assert session.bitmap.tracking_count == 0


def test_structured_reads_send_holes_as_holes_and_df_as_one_chunk(serve, tmp_path):
    path = tmp_path / "src.img"
    lun = FileLUN.create(path, 8 * MIB)
    lun.write(MIB, b"\1" * (64 * KIB))
    lun.write(5 * MIB + 3, b"\2" * 10)
    server = serve(lun)
    with client(server) as c:
        c.greet()
        c.structured()
        c.go_flags()
        data, pieces = c.read_chunks(0, 8 * MIB)
        assert data == lun.read(0, 8 * MIB)
        holes = [(at, n) for kind, at, n in pieces if kind == TYPE_OFFSET_HOLE]
        expected = [(0, n) for n, f in holes_model(path, 0, 8 * MIB) if f]
        assert len(holes) == len(expected) >= 2
        assert sum(n for _, n in holes) == sum(n for _, n in expected)
        data, pieces = c.read_chunks(MIB - 5, 2 * MIB, flags=DF)
        assert data == lun.read(MIB - 5, 2 * MIB)
        assert [(kind, at, n) for kind, at, n in pieces] == [(TYPE_OFFSET_DATA, MIB - 5, 2 * MIB)]
        data, pieces = c.read_chunks(0, 0)
        assert (data, pieces) == (b"", [])
        c.request(CMD_READ, 8 * MIB - 1, 2)
        ((kind, flags, payload),) = c.answer()  # an error chunk, never a simple reply
        assert kind == TYPE_ERROR and flags & REPLY_FLAG_DONE
        assert struct.unpack(">I", payload[:4])[0] == EINVAL and b"past the end" in payload


def counted_writes(monkeypatch) -> list[int]:
    """The lengths of the buffers the server's connections write from now on, in order."""
    sent: list[int] = []
    write = server_module._Channel.write

    def counted(channel, data):
        sent.append(len(data))
        write(channel, data)

    monkeypatch.setattr(server_module._Channel, "write", counted)
    return sent


def test_a_small_reads_chunks_go_out_each_in_one_write_header_and_data_together(serve, monkeypatch):
    sent = counted_writes(monkeypatch)
    lun = MemoryLUN(MIB)
    lun.write(0, random.Random(7).randbytes(MIB))
    server = serve(lun)
    with client(server) as c:
        c.greet()
        c.structured()
        c.go_flags()
        sent.clear()
        data, pieces = c.read_chunks(4 * KIB, 64 * KIB)
        assert data == lun.read(4 * KIB, 64 * KIB)
        assert pieces == [(TYPE_OFFSET_DATA, 4 * KIB, 64 * KIB)]
        assert sent == [20 + 8 + 64 * KIB]  # chunk header, offset, data: one write
    with raw(server) as plain:
        plain.go()
        sent.clear()
        plain.request(CMD_READ, 0, 256 * KIB)
        assert plain.reply() == 0 and plain.recv(256 * KIB) == lun.read(0, 256 * KIB)
        assert sent == [16 + 256 * KIB]  # simple reply: one write


def test_a_burst_of_small_writes_is_answered_in_one_write_a_lone_write_alone(serve, monkeypatch):
    sent = counted_writes(monkeypatch)
    lun = MemoryLUN(MIB)
    server = serve(lun)
    payloads = [random.Random(seed).randbytes(512) for seed in range(9)]
    with raw(server) as c:
        c.go()
        sent.clear()
        burst = b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 0xC0FFEE, i * KIB, 512) + data
            for i, data in enumerate(payloads[:8])
        )
        c.sock.sendall(burst)  # 4.3 KB: staged whole by one receive
        assert [c.reply() for _ in range(8)] == [0] * 8
        assert sent == [8 * 16]  # all eight replies in one write: the client woken once
        c.request(CMD_WRITE, 8 * KIB, 512, payload=payloads[8])
        assert c.reply() == 0
        assert sent == [8 * 16, 16]
    assert [lun.read(i * KIB, 512) for i in range(9)] == payloads


# -- TRIM and WRITE_ZEROES through a session ------------------------------------------------------
def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_write_zeroes_of_any_length_punches_holes_tracked_and_saved_first(serve, tmp_path):
    g = 64 * KIB
    size = 96 * MIB  # zeroed by one request, three times MAX_BLOCK
    path = tmp_path / "src.img"
    lun = FileLUN.create(path, size)
    lun.write(0, b"\5" * size)
    session, server = session_server(serve, lun, granularity=g)
    session.write(0, b"\6" * g)
    session.mark()
    with client(server) as c:
        c.greet()
        c.structured()
        c.go_flags()
        c.request(CMD_WRITE_ZEROES, 0, size, flags=FAST_ZERO)
        assert c.error() == 0
        assert lun.read(0, size) == bytes(size)
        assert allocated(path) < MIB  # punched, not written
        bitmap = session.bitmap
        assert bitmap.tracking_count == bitmap.chunks  # every chunk is a host write
        assert session.read_frozen(0, g) == b"\6" * g  # in transfer: saved before
        c.request(CMD_WRITE_ZEROES, 2 * MIB, 5 * MIB, flags=NO_HOLE | FUA)
        assert c.error() == 0
        assert allocated(path) >= 5 * MIB  # NO_HOLE: the range is written
        c.request(CMD_WRITE, 0, 4, payload=b"abcd")
        assert c.error() == 0
        c.request(CMD_TRIM, 0, 3 * g)
        assert c.error() == 0
        assert lun.read(0, 4) == bytes(4)
    assert session.stats.cofw_chunks == 1


def test_fast_zero_on_a_lun_that_frees_no_space_fails_fast_and_changes_nothing(serve):
    lun = MemoryLUN(4 * MIB)
    lun.write(0, b"\3" * (4 * MIB))
    session, server = session_server(serve, lun)
    with client(server) as c:
        c.greet()
        c.structured()
        assert c.go_flags() & FLAG_SEND_FAST_ZERO
        c.request(CMD_WRITE_ZEROES, 0, 4 * MIB, flags=FAST_ZERO)
        assert c.error() == ENOTSUP
        assert lun.read(0, 4 * MIB) == b"\3" * (4 * MIB)
        assert session.bitmap.tracking_count == 0
        c.request(CMD_TRIM, 0, 4096)
        assert c.error() == EINVAL  # not offered: a MemoryLUN frees no space
        c.request(CMD_WRITE_ZEROES, 0, 4 * MIB)
        assert c.error() == 0
        assert lun.read(0, 4 * MIB) == bytes(4 * MIB)
        assert session.bitmap.tracking_count == session.bitmap.chunks


def test_options_list_info_and_go_see_the_frozen_export_only_while_marked(serve):
    session, server = session_server(serve, MemoryLUN(MIB))
    with client(server) as c:
        c.greet()
        assert c.option(OPT_LIST) == [(REP_SERVER, b"\0\0\0\x04disk"), (REP_ACK, b"")]
        ((reply, message),) = c.option(OPT_INFO, c.info_data(b"disk@frozen"))
        assert reply == REP_ERR_UNKNOWN and b"marked" in message
        session.mark()
        listed = [data[4:] for reply, data in c.option(OPT_LIST) if reply == REP_SERVER]
        assert listed == [b"disk", b"disk@frozen"]
        replies = c.option(OPT_INFO, c.info_data(b"disk@frozen"))
        assert replies[0][0] == REP_INFO and replies[-1][0] == REP_ACK


class GatedLUN:
    """A LUN (neither file nor memory, as a network one) whose reads at 0 wait for ``gate``."""

    def __init__(self, size: int) -> None:
        self.lun = MemoryLUN(size)
        self.size, self.closed = size, False
        self.gate = threading.Event()
        self.parked = threading.Event()

    def readinto(self, offset, buffer):
        if offset == 0:
            self.parked.set()
            assert self.gate.wait(TIMEOUT)
        self.lun.readinto(offset, buffer)

    def __getattr__(self, name):
        return getattr(self.lun, name)


def test_a_stalled_read_of_a_lun_that_is_not_local_holds_up_no_other_client(serve):
    lun = GatedLUN(MIB)
    server = serve(lun)
    with client(server) as slow, client(server) as quick:
        for c in (slow, quick):
            c.greet()
            c.structured()
            c.go_flags()
        slow.request(CMD_READ, 0, 4096)
        assert lun.parked.wait(TIMEOUT)
        assert quick.read_chunks(4096, 4096)[0] == bytes(4096)  # served meanwhile
        lun.gate.set()
        assert slow.answer()[0][0] == TYPE_OFFSET_DATA


class FailingFromLUN(MemoryLUN):
    """A memory LUN of patterned bytes whose reads at or past ``broken`` fail."""

    def __init__(self, size: int, broken: int) -> None:
        super().__init__(size)
        self.broken = broken
        super().write(0, bytes(range(256)) * (size // 256))

    def readinto(self, offset, buffer):
        if offset >= self.broken:
            raise OSError(5, "injected read failure")
        super().readinto(offset, buffer)


def test_a_large_read_failing_midway_ends_as_the_spec_says(serve, caplog):
    # A READ over the server's piece size is read and sent piece by piece: a
    # structured reply ends with an error chunk after the data sent; a simple
    # reply, whose data has begun, can only be cut off (a hard disconnect); a failure of the first
    # piece is an ordinary error reply.
    lun = FailingFromLUN(2 * MIB, broken=MIB // 2)
    server = serve(lun)
    pattern = bytes(range(256)) * (MIB // 256)
    with raw(server) as plain, client(server) as chunked:
        plain.go()
        chunked.greet()
        chunked.structured()
        chunked.go_flags()
        chunked.request(CMD_READ, 0, MIB)
        *data, (kind, flags, payload) = chunked.answer()
        assert kind == TYPE_ERROR and flags & REPLY_FLAG_DONE
        assert struct.unpack(">I", payload[:4])[0] == 5  # EIO
        assert b"".join(p[8:] for _, _, p in data) == pattern[: MIB // 2]
        assert [k for k, _, _ in data] == [TYPE_OFFSET_DATA] * len(data)
        assert chunked.read_chunks(MIB // 2 - 4096, 4096)[0] == pattern[-4096:]  # still usable
        plain.request(CMD_READ, MIB // 2, MIB)
        assert plain.reply() == 5  # the first piece failed: nothing was sent
        plain.request(CMD_READ, 0, MIB)
        assert plain.reply() == 0
        received = b""
        while part := plain.sock.recv(MIB):  # cut off: never the whole MiB
            received += part
        assert len(received) < MIB and received == pattern[: len(received)]
    assert any("was sent already" in r.getMessage() for r in caplog.records)


def test_a_small_reply_held_back_is_sent_while_a_large_read_holds_the_turn(serve):
    # The reply to a small WRITE waits to go out with others; a large READ asked just
    # before it takes the connection's turn to send first and, while its client is slow
    # to read, keeps it: the WRITE's reply must still come.
    server = serve(MemoryLUN(8 * MIB))
    with raw(server) as c:
        c.go()
        read = struct.pack(">IHHQQI", test_nbd.REQUEST_MAGIC, 0, CMD_READ, 1, 0, 8 * MIB)
        write = struct.pack(">IHHQQI", test_nbd.REQUEST_MAGIC, 0, CMD_WRITE, 2, 0, 4096)
        c.sock.sendall(read + write + bytes(4096))
        answered = {}
        while len(answered) < 2:
            magic, error, handle = struct.unpack(">IIQ", c.recv(16))
            assert (magic, error) == (SIMPLE_REPLY_MAGIC, 0)
            answered[handle] = c.recv(8 * MIB) if handle == 1 else b""
        assert answered[1] == bytes(8 * MIB)  # read before the write, or after: all zeros


def test_data_extents_of_regions_read_in_turn_are_asked_once_each():
    # nbdcopy's connections read regions of the export at once: each region's data
    # extent is remembered, not only the last one found (on tmpfs each ask is O(file)).
    class Asked:
        size = 1 << 40
        asked = 0

        def data_extents(self, offset, length):
            self.asked += 1
            return [(offset, length)]

    lun = Asked()
    known = _KnownData(lun)
    regions = [0, 300 * MIB, 600 * MIB, 900 * MIB]
    for step in range(64):
        for start in regions:
            assert known(start + step * 256 * KIB, 256 * KIB) == [
                (start + step * 256 * KIB, 256 * KIB)
            ]
    assert lun.asked == len(regions)
    known.forget()
    known(0, 4096)
    assert lun.asked == len(regions) + 1
