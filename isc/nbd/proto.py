"""The NBD wire format: the protocol's numbers, its structs and the errno of each error.

Everything here is fixed by the NBD protocol (``doc/proto.md`` of the NBD
project), so the client (:mod:`isc.nbd.client`) and the server
(:mod:`isc.nbd.server`) read and write the same bytes. All integers are big
endian. Nothing here does I/O or keeps state.
"""

from __future__ import annotations

import enum
import errno
import struct

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

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
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
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_FLUSH: "FLUSH",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

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
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")

ZEROES_AFTER_EXPORT_NAME = 124  # reserved bytes unless NBD_FLAG_C_NO_ZEROES
MAX_STRING = 4096  # bytes of UTF-8 in an export name or message
MAX_OPTION_DATA = 1 << 16  # the longest option data either side reads into memory
DEFAULT_BLOCK_SIZE = (1, 4096, 0xFFFFFFFF)  # minimum, preferred, maximum


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
