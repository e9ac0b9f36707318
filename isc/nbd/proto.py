"""The NBD wire format: the protocol's numbers, its structs and the errno of each error.

Everything here is fixed by the NBD protocol (``doc/proto.md`` of the NBD
project), so the client (:mod:`isc.nbd.client`) and the server
(:mod:`isc.nbd.server`) read and write the same bytes. All integers are big
endian. Nothing here does I/O or keeps state; the encoders return bytes and
:func:`parse_meta_request` raises ``ValueError`` for malformed option data.

A structured reply (``NBD_OPT_STRUCTURED_REPLY``) is one or more chunks,
the last flagged :data:`REPLY_FLAG_DONE`; a block status chunk carries one
metadata context's extents, each a (length, flags) pair of 32-bit integers.
A metadata context is named ``namespace:leaf``: ``base:allocation`` (flags
:data:`STATE_HOLE`, :data:`STATE_ZERO`) and QEMU's
``qemu:dirty-bitmap:NAME`` (flag :data:`STATE_DIRTY`).
"""

from __future__ import annotations

import enum
import errno
import struct

import numpy as np

NBD_PORT = 10809
"""The IANA port of NBD: the port of an ``nbd://`` URI that names none."""

MAX_BLOCK = 32 << 20
"""The longest READ, WRITE or WRITE_ZEROES in bytes :class:`~isc.nbd.NBDServer` accepts.

2^25 bytes, the spec's size that no client should be refused; it is also the
maximum block size the server advertises in ``NBD_INFO_BLOCK_SIZE``.
"""

# -- the protocol's numbers (doc/proto.md) ---------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting, which isc does not speak
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags share these two bits.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_NAMES = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    OPT_ABORT: "NBD_OPT_ABORT",
    OPT_LIST: "NBD_OPT_LIST",
    OPT_STARTTLS: "NBD_OPT_STARTTLS",
    OPT_INFO: "NBD_OPT_INFO",
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31  # bit 31 marks every error reply
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_TOO_BIG = REP_ERR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1  # bit 15 marks every error chunk

STATE_HOLE = 1 << 0  # base:allocation: not allocated
STATE_ZERO = 1 << 1  # base:allocation: reads as zeros
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME: set in the bitmap

# Error values on the wire and the errno each stands for. The spec fixes the
# numbers, whatever the local errno values are; a client reads any other
# value as EINVAL.
WIRE_TO_ERRNO = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.ENOTSUP,
    108: errno.ESHUTDOWN,
}
ERRNO_TO_WIRE = {value: wire for wire, value in WIRE_TO_ERRNO.items()}

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # export size, transmission flags
INFO_EXPORT_DATA = struct.Struct(">HQH")
INFO_BLOCK_SIZE_DATA = struct.Struct(">HIII")  # type, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
OFFSET = struct.Struct(">Q")
HOLE = struct.Struct(">QI")  # offset, hole size
ERROR = struct.Struct(">IH")  # error, message length
U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")

ZEROES_AFTER_EXPORT_NAME = 124  # reserved bytes unless NBD_FLAG_C_NO_ZEROES
MAX_STRING = 4096  # bytes of UTF-8 in an export name or message
MAX_OPTION_DATA = 1 << 16  # the longest option data either side reads into memory
DEFAULT_BLOCK_SIZE = (1, 4096, 0xFFFFFFFF)  # minimum, preferred, maximum
MAX_EXTENT = 0xFFFFFFFF  # the longest extent a block status descriptor can carry


class TransmissionFlag(enum.IntFlag):
    """The 16 transmission flags a server sends with an export (``NBDLUN.flags``)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


def own_export(session_id: int) -> str:
    """The ``NBD_INFO_DESCRIPTION`` of an export that writes the source of the session
    ``session_id`` (``isc serve``'s): that session's destinations refuse an export
    describing itself so, whatever address it answers at (:class:`~isc.nbd.NBDLUN`'s
    ``refuse``), since a copy into it would write the image at a mark back into the
    source."""
    return f"isc export of the source of session {session_id:016x}"


# -- encoding ------------------------------------------------------------------------------
def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One reply to ``option`` during the handshake."""
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply's header; ``error`` is an errno (0: success), sent as the spec's value."""
    return REPLY.pack(SIMPLE_REPLY_MAGIC, ERRNO_TO_WIRE.get(error, 0) if error else 0, handle)


def chunk(handle: int, kind: int, length: int, done: bool) -> bytes:
    """A structured reply chunk's header, for a payload of ``length`` bytes."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, handle, length)


def offset_data(handle: int, offset: int, length: int, done: bool) -> bytes:
    """The header of an ``OFFSET_DATA`` chunk: ``length`` bytes of data at ``offset`` follow."""
    return chunk(handle, REPLY_TYPE_OFFSET_DATA, OFFSET.size + length, done) + OFFSET.pack(offset)


def offset_hole(handle: int, offset: int, length: int, done: bool) -> bytes:
    """An ``OFFSET_HOLE`` chunk: ``length`` (> 0) bytes at ``offset`` read as zeros."""
    return chunk(handle, REPLY_TYPE_OFFSET_HOLE, HOLE.size, done) + HOLE.pack(offset, length)


def error_chunk(handle: int, error: int, message: str) -> bytes:
    """The final ``ERROR`` chunk of a reply: ``error`` (an errno) and a message for humans."""
    text = message.encode(errors="replace")[:MAX_STRING]
    payload = ERROR.pack(ERRNO_TO_WIRE.get(error, ERRNO_TO_WIRE[errno.EINVAL]), len(text)) + text
    return chunk(handle, REPLY_TYPE_ERROR, len(payload), True) + payload


def block_status(handle: int, context: int, extents: np.ndarray, done: bool) -> bytes:
    """A ``BLOCK_STATUS`` chunk: context ``context``'s ``extents``, rows of (length, flags)."""
    descriptors = np.ascontiguousarray(extents, dtype=">u4").tobytes()
    return chunk(handle, REPLY_TYPE_BLOCK_STATUS, 4 + len(descriptors), done) + (
        U32.pack(context) + descriptors
    )


def meta_context(context: int, name: str) -> bytes:
    """The data of an ``NBD_REP_META_CONTEXT`` reply."""
    return U32.pack(context) + name.encode()


def parse_meta_request(data: bytes) -> tuple[bytes, list[bytes]]:
    """The export name and the queries of ``NBD_OPT_LIST/SET_META_CONTEXT`` option data.

    Raises ``ValueError`` saying what is wrong when a length runs past the data,
    data is left over, or a string is longer than :data:`MAX_STRING`.
    """
    at = 0

    def field(size: int, what: str) -> bytes:
        nonlocal at
        if at + size > len(data):
            raise ValueError(f"the {what} runs past the option's {len(data)} bytes")
        piece = data[at : at + size]
        at += size
        return piece

    def string(what: str) -> bytes:
        (length,) = U32.unpack(field(4, f"length of the {what}"))
        if length > MAX_STRING:
            raise ValueError(f"the {what} is {length} bytes, over the {MAX_STRING} allowed")
        return field(length, what)

    name = string("export name")
    (count,) = U32.unpack(field(4, "number of queries"))
    queries = [string("query") for _ in range(min(count, len(data)))]
    if len(queries) != count or at != len(data):
        raise ValueError(f"{count} queries do not fill the option's {len(data)} bytes")
    return name, queries
