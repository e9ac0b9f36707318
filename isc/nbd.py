"""NBD: LUNs on remote exports (:class:`NBDLUN`) and LUNs exported to clients (:class:`NBDServer`).

The Network Block Device protocol (``doc/proto.md`` of the NBD project; the
spec below) moves byte ranges of an *export* over TCP or a Unix socket. A
remote site's destinations are reached through :class:`NBDLUN`; a session's
source exported through :class:`NBDServer` and :class:`SessionLUN` turns the
writes of any NBD client into tracked host writes.

What both sides speak
---------------------
- the *fixed newstyle* handshake, with ``NBD_FLAG_NO_ZEROES``;
- options ``NBD_OPT_GO`` and ``NBD_OPT_INFO`` (information ``NBD_INFO_EXPORT``,
  ``NBD_INFO_NAME``, ``NBD_INFO_BLOCK_SIZE``), ``NBD_OPT_EXPORT_NAME`` (the
  client's fallback when a server lacks ``NBD_OPT_GO``), ``NBD_OPT_LIST``,
  ``NBD_OPT_ABORT`` and ``NBD_OPT_STARTTLS`` (TLS, below). The server
  answers every other option (structured replies, metadata contexts ...)
  with ``NBD_REP_ERR_UNSUP``;
- *simple replies* only; commands READ, WRITE (with the FUA flag), FLUSH,
  WRITE_ZEROES (the client's :meth:`NBDLUN.write_zeroes`) and DISC;
- the spec's error values (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW,
  ENOTSUP, ESHUTDOWN), which the client raises as ``OSError`` with that errno.

The client
----------
:class:`NBDLUN` is a blocking LUN on one connection. A call is split into
requests of at most :data:`REQUEST_SIZE` bytes (less if the server's maximum
block size is smaller), of which up to :data:`IN_FLIGHT` are on the wire at
once: header and payload go out in one ``sendmsg`` from the caller's buffer,
read replies land by ``recv_into`` straight in it. Calls from several threads
share the connection and the window, each reply going to the call that sent
its handle, so one thread's requests keep the wire busy while another's wait;
a call returns once all its own requests are answered.
The URI forms are those of the NBD URI spec (``doc/uri.md``):
``nbd://host[:port][/export]`` and ``nbd+unix:///[export]?socket=PATH``,
and their TLS forms ``nbds://`` and ``nbds+unix://``.

The server
----------
:class:`NBDServer` serves one LUN from an asyncio event loop to any number of
clients; LUN I/O runs in a thread pool so a slow request stalls no other
client. A request's payload is read whole before the LUN is touched, so a
client that vanishes mid-request leaves no partial write; malformed requests
get an error reply (or, when the stream cannot be resynchronised, a dropped
connection) and never reach the LUN. Replies to one connection's requests may
come out of order, as the spec allows.

Against clients that misbehave the server keeps limits: at most
``max_clients`` connections (:data:`MAX_CLIENTS`; one more is closed at
once, with a log line), ``handshake_timeout`` seconds from connecting to
transmission (:data:`HANDSHAKE_TIMEOUT`, TLS included), and per connection
:data:`_CONNECTION_DATA` bytes of WRITE payloads and READ replies held at
once: a client that reads no replies is no longer read from, while the
others go on. The server's memory stays about twice ``max_clients`` times
that.

TLS (the spec's "TLS support"; credentials in :mod:`isc.tls`)
-------------------------------------------------------------
The server's :class:`~isc.tls.ServerTLS` mode is nbdkit's: without one it
answers ``NBD_OPT_STARTTLS`` with ``NBD_REP_ERR_UNSUP`` (NOTLS); "on" lets
each client choose; "require" (FORCEDTLS) answers every option before TLS
but ``NBD_OPT_STARTTLS`` and ``NBD_OPT_ABORT`` with
``NBD_REP_ERR_TLS_REQD`` and drops a client that sends
``NBD_OPT_EXPORT_NAME`` or lacks fixed newstyle. With ``verify_peer`` a
client needs a certificate signed by the server's CA. A failed handshake
drops that client with a log line. An ``nbds`` URI makes :class:`NBDLUN`
send ``NBD_OPT_STARTTLS`` before any other option and refuse a server that
does not accept it: it never falls back to plaintext. TLS costs CPU on both
ends per byte; the NBD messages are unchanged inside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import errno
import functools
import itertools
import logging
import os
import socket
import ssl
import stat
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

from isc import tls as _tls
from isc.errors import ParameterError, StateError
from isc.lun import LUN, BytesLike, _BaseLUN, _zero_fill
from isc.tls import ServerTLS, TLSSocket, describe, refuse_psk

log = logging.getLogger(__name__)

NBD_PORT = 10809
"""The IANA port of NBD: the port of an ``nbd://`` URI that names none."""

REQUEST_SIZE = 256 << 10
"""Largest payload in bytes of one READ or WRITE request :class:`NBDLUN` sends.

Measured against qemu-nbd: it spends about twice the CPU per byte on 1 MiB
requests as on 256 KiB ones (nbdcopy's default size, too), and larger ones
cost more still; smaller ones add per-request overhead on both ends.
"""

IN_FLIGHT = 32
"""Requests :class:`NBDLUN` keeps on the wire at once, over all calls (8 MiB)."""

SENDER_PATIENCE = 0.01
"""Seconds a call with requests to send waits for another thread's send to end
before it reads replies instead (see NBDLUN._submit)."""

MAX_BLOCK = 32 << 20
"""The longest READ, WRITE or WRITE_ZEROES in bytes :class:`NBDServer` accepts.

2^25 bytes, the spec's size that no client should be refused; it is also the
maximum block size the server advertises in ``NBD_INFO_BLOCK_SIZE``.
"""

# -- the protocol's numbers (doc/proto.md) ---------------------------------------------
_NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option
_CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting, which isc does not speak
_OPTION_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags share these two bits.
_FLAG_FIXED_NEWSTYLE = 1 << 0
_FLAG_NO_ZEROES = 1 << 1

_OPT_EXPORT_NAME = 1
_OPT_ABORT = 2
_OPT_LIST = 3
_OPT_STARTTLS = 5
_OPT_INFO = 6
_OPT_GO = 7

_REP_ACK = 1
_REP_SERVER = 2
_REP_INFO = 3
_REP_ERR = 1 << 31  # bit 31 marks every error reply
_REP_ERR_UNSUP = _REP_ERR + 1
_REP_ERR_POLICY = _REP_ERR + 2
_REP_ERR_INVALID = _REP_ERR + 3
_REP_ERR_TLS_REQD = _REP_ERR + 5
_REP_ERR_UNKNOWN = _REP_ERR + 6
_REP_ERR_SHUTDOWN = _REP_ERR + 7
_REP_ERR_TOO_BIG = _REP_ERR + 9

_INFO_EXPORT = 0
_INFO_NAME = 1
_INFO_BLOCK_SIZE = 3

_CMD_READ = 0
_CMD_WRITE = 1
_CMD_DISC = 2
_CMD_FLUSH = 3
_CMD_WRITE_ZEROES = 6
_CMD_NAMES = {
    _CMD_READ: "READ",
    _CMD_WRITE: "WRITE",
    _CMD_FLUSH: "FLUSH",
    _CMD_WRITE_ZEROES: "WRITE_ZEROES",
}

_CMD_FLAG_FUA = 1 << 0
_CMD_FLAG_NO_HOLE = 1 << 1

# Error values on the wire and the errno each stands for. The spec fixes the
# numbers, whatever the local errno values are; a client reads any other
# value as EINVAL.
_WIRE_TO_ERRNO = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.ENOTSUP,
    108: errno.ESHUTDOWN,
}
_ERRNO_TO_WIRE = {value: wire for wire, value in _WIRE_TO_ERRNO.items()}

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, data length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
_EXPORT = struct.Struct(">QH")  # export size, transmission flags
_INFO_EXPORT_DATA = struct.Struct(">HQH")
_INFO_BLOCK_SIZE_DATA = struct.Struct(">HIII")  # type, minimum, preferred, maximum
_REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")

_ZEROES_AFTER_EXPORT_NAME = 124  # reserved bytes unless NBD_FLAG_C_NO_ZEROES
_MAX_STRING = 4096  # bytes of UTF-8 in an export name or message
_MAX_OPTION_DATA = 1 << 16  # the longest option data either side reads into memory
_DEFAULT_BLOCK_SIZE = (1, 4096, 0xFFFFFFFF)  # minimum, preferred, maximum
_SERVER_BLOCK_SIZE = (1, 4096, MAX_BLOCK)


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


# -- URIs -------------------------------------------------------------------------------
class ClientTLS(NamedTuple):
    """The TLS an ``nbds://`` or ``nbds+unix://`` URI asks for (libnbd's query parameters)."""

    certificates: str | None = None
    """``tls-certificates=DIR``: the credentials directory (:mod:`isc.tls`); None: the
    system's CAs and no client certificate."""
    verify_peer: bool = True
    """``tls-verify-peer=false`` accepts any server certificate (encryption only)."""


class NBDAddress(NamedTuple):
    """Where an export lives, as :func:`parse_uri` reads it from a URI."""

    address: tuple[str, int] | str
    """``(host, port)`` for TCP, or the path of a Unix socket."""
    export: str
    """The export name ("" is the server's default export)."""
    tls: ClientTLS | None = None
    """The TLS to insist on (``nbds`` schemes), else None."""


_TLS_QUERY = {"tls-certificates", "tls-verify-peer"}
_PSK_QUERY = {"tls-psk-file", "tls-username"}
_BOOLEANS = {"true": True, "on": True, "yes": True, "1": True}
_BOOLEANS |= {"false": False, "off": False, "no": False, "0": False}


def parse_uri(uri: str) -> NBDAddress:
    """Read an NBD URI: ``nbd[s]://host[:port][/export]`` or ``nbd[s]+unix:///[export]?socket=PATH``.

    The export name is the percent-decoded path without its leading ``/``;
    the port defaults to :data:`NBD_PORT`. The ``nbds`` schemes insist on
    TLS, with libnbd's query parameters ``tls-certificates=DIR`` and
    ``tls-verify-peer=true|false`` (:class:`ClientTLS`). Raises
    ``ParameterError`` for anything else, naming what is wrong: another
    scheme, a missing host or socket, a host on a Unix socket, a fragment, a
    query parameter this client does not understand, or TLS-PSK (user info,
    ``tls-psk-file``), which is not available (:func:`isc.tls.refuse_psk`).
    """
    if not isinstance(uri, str):
        raise ParameterError(f"an NBD URI is a str, got {type(uri).__name__}")
    try:
        parts = urlsplit(uri)
        port = parts.port
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        export = unquote(parts.path[1:], errors="strict")
    except ValueError as exc:
        raise ParameterError(f"{uri!r} is not a valid NBD URI: {exc}") from None

    def bad(why: str) -> ParameterError:
        return ParameterError(
            f"{uri!r} is not an NBD URI isc can use: {why}; use nbd://host[:port][/export] "
            "or nbd+unix:///[export]?socket=PATH"
        )

    if parts.scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise bad(f"the scheme is {parts.scheme!r}")
    if parts.path and not parts.path.startswith("/"):
        raise bad("the export name must follow '//authority/'")
    if parts.fragment:
        raise bad(f"it has a fragment #{parts.fragment}")
    if parts.username is not None or _PSK_QUERY & set(query):
        raise refuse_psk(f"{uri!r} asks for TLS-PSK (user info or {sorted(_PSK_QUERY)})")
    if "\0" in export or len(export.encode()) > _MAX_STRING:
        raise bad(f"an export name holds no NUL and at most {_MAX_STRING} bytes")
    tls = None
    if parts.scheme.startswith("nbds"):
        tls = _client_tls(query, bad)
        query = {key: value for key, value in query.items() if key not in _TLS_QUERY}
    elif _TLS_QUERY & set(query):
        raise bad(f"{sorted(_TLS_QUERY & set(query))} need TLS: use the nbds schemes")
    plain = parts.scheme.removeprefix("nbds").removeprefix("nbd")  # "" or "+unix"
    if not plain:
        if not parts.hostname:
            raise bad(f"{parts.scheme}:// needs a host")
        if query:
            raise bad(f"{parts.scheme}:// takes no query parameter {sorted(query)}")
        return NBDAddress((parts.hostname, NBD_PORT if port is None else port), export, tls)
    if parts.netloc:
        raise bad(f"{parts.scheme}:// takes no host, got {parts.netloc!r}")
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise bad(f"unknown query parameters {unknown}")
    sockets = query.get("socket", [])
    if len(sockets) != 1 or not sockets[0]:
        raise bad(f"{parts.scheme}:// needs exactly one socket=PATH")
    return NBDAddress(sockets[0], export, tls)


def _client_tls(query: dict[str, list[str]], bad: Callable[[str], ParameterError]) -> ClientTLS:
    """The TLS parameters of an ``nbds`` URI's query."""
    for key in _TLS_QUERY & set(query):
        if len(query[key]) != 1 or not query[key][0]:
            raise bad(f"give {key}= once, with a value")
    verify = query.get("tls-verify-peer", ["true"])[0]
    if verify.lower() not in _BOOLEANS:
        raise bad(f"tls-verify-peer is true or false, got {verify!r}")
    return ClientTLS(query.get("tls-certificates", [None])[0], _BOOLEANS[verify.lower()])


# -- the client -----------------------------------------------------------------------------
def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("the NBD server closed the connection")
        view = view[got:]


def _recv(sock: socket.socket, length: int) -> bytes:
    buffer = bytearray(length)
    _recv_into(sock, memoryview(buffer))
    return bytes(buffer)


def _send(sock: socket.socket, header: bytes, payload: memoryview | None = None) -> None:
    if payload is None:
        sock.sendall(header)
        return
    # One system call for the header and the payload, from the caller's buffer.
    sent = sock.sendmsg([header, payload])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(payload):
        sock.sendall(payload[sent - len(header) :])


def _option_reply(sock: socket.socket, option: int) -> tuple[int, bytes]:
    """One reply of the server to ``option``: (reply type, data)."""
    magic, echoed, reply, length = _OPTION_REPLY.unpack(_recv(sock, _OPTION_REPLY.size))
    if magic != _OPTION_REPLY_MAGIC or echoed != option:
        raise _protocol_error(f"bad option reply (magic {magic:#x}, option {echoed})")
    if length > _MAX_OPTION_DATA:
        raise _protocol_error(f"an option reply of {length} bytes")
    return reply, _recv(sock, length)


def _protocol_error(what: str) -> OSError:
    return OSError(errno.EPROTO, f"the NBD server broke the protocol: {what}")


class NBDLUN(_BaseLUN):
    """A LUN on an NBD export, over one connection (the module docstring has the details).

    ``uri`` is ``nbd://host[:port][/export]`` or ``nbd+unix:///[export]?socket=PATH``,
    or with TLS ``nbds://...``, ``nbds+unix://...`` (:func:`parse_uri`).
    ``timeout`` (seconds; None waits forever) bounds the connect, the
    handshake and every wait for the server during I/O.

    Raises ``ParameterError`` for a bad URI or an empty export, and
    ``OSError`` when the connection or the handshake fails: the socket's own
    error (``ConnectionRefusedError``, ``FileNotFoundError`` for a missing
    socket, ``TimeoutError`` ...), ``FileNotFoundError`` when the server has no
    such export, ``PermissionError`` when it refuses it, errno ``EPROTO`` when
    it breaks the protocol, :class:`~isc.tls.AuthenticationError` (a
    ``PermissionError``) for an ``nbds`` URI when the server offers no TLS or
    either end refuses the other's certificate.

    After the handshake, an error the server reports for a request raises
    ``OSError`` with its errno, once every other request of the call is
    answered; the LUN stays usable. A lost connection, a timeout or a
    protocol violation raises ``OSError`` (``ConnectionError``,
    ``TimeoutError``, ``EPROTO``) and closes the LUN, since nothing more can be
    known of the requests in flight. ``RangeError`` and ``StateError`` are
    raised as by every LUN, before anything is sent; :meth:`write` on a
    read-only export raises ``StateError``.
    """

    def __init__(self, uri: str, *, timeout: float | None = 60.0) -> None:
        self.uri = uri
        self.target = parse_uri(uri)
        """The address and export name read from ``uri``."""
        if timeout is not None and not timeout > 0:
            raise ParameterError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._whole_blocks = threading.Lock()
        self._handles = itertools.count(1)
        self._sock: socket.socket | None = None
        self._inflight: dict[int, tuple[_Call, int, memoryview]] = {}
        self._reading = False  # a thread is receiving replies
        self._receiving_into: _Call | None = None  # whose READ payload the reader receives
        self._busy = 0  # calls running
        self._failure: OSError | None = None  # why the connection is unusable
        self.size = 0
        self.flags = TransmissionFlag.HAS_FLAGS
        """The export's transmission flags."""
        self.block_size = _DEFAULT_BLOCK_SIZE
        """The server's (minimum, preferred, maximum) block sizes in bytes, else the defaults."""
        sock = self._connect()
        try:
            sock = self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    @property
    def readonly(self) -> bool:
        """True when the server exports the LUN read-only (``NBD_FLAG_READ_ONLY``)."""
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run or the connection was lost."""
        return self._sock is None or self._failure is not None

    def __repr__(self) -> str:
        state = " closed" if self.closed else " readonly" if self.readonly else ""
        return f"<NBDLUN {self.uri!r} size={self.size}{state}>"

    # -- connection and handshake ---------------------------------------------------------
    def _connect(self) -> socket.socket:
        address = self.target.address
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection(address, timeout=self.timeout)
        # The spec asks both ends of a TCP connection to disable Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _handshake(self, sock: socket.socket) -> socket.socket:
        """Negotiate the export; return the stream to use: ``sock``, or TLS over it."""
        magic, newstyle, flags = _GREETING.unpack(_recv(sock, _GREETING.size))
        if magic != _NBDMAGIC:
            raise _protocol_error(f"its greeting starts {magic:#x}, not NBDMAGIC")
        if newstyle == _CLISERV_MAGIC:
            raise _protocol_error("it offers only oldstyle negotiation, which isc does not speak")
        if newstyle != _IHAVEOPT:
            raise _protocol_error(f"its greeting has {newstyle:#x} where IHAVEOPT belongs")
        client_flags = flags & (_FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES)
        sock.sendall(_U32.pack(client_flags))
        tls = self.target.tls
        if tls is None:
            self._negotiate(sock, client_flags)
            return sock
        if not client_flags & _FLAG_FIXED_NEWSTYLE:
            raise self._no_tls("it lacks fixed newstyle negotiation, which TLS needs")
        stream = self._starttls(sock, tls)
        where = f"the NBD server at {self.uri!r}"
        try:
            self._negotiate(stream, client_flags)  # type: ignore[arg-type]
        except ssl.SSLError as exc:  # an alert: the server refused this client's certificate
            raise _tls.handshake_error(exc, where, tls.certificates) from None
        except ConnectionError:
            raise _tls.AuthenticationError(
                f"{where} hung up right after the TLS handshake, as a server does that refuses "
                f"the client's certificate: it wants a current {_tls.CLIENT_CERT} (with "
                f"{_tls.CLIENT_KEY}) signed by its CA in tls-certificates={tls.certificates}"
            ) from None
        return stream  # type: ignore[return-value]

    def _negotiate(self, sock: socket.socket, client_flags: int) -> None:
        """Haggle options up to transmission: ``NBD_OPT_GO``, else ``NBD_OPT_EXPORT_NAME``."""
        if client_flags & _FLAG_FIXED_NEWSTYLE and self._go(sock):
            return
        self._export_name(sock, no_zeroes=bool(client_flags & _FLAG_NO_ZEROES))

    def _starttls(self, sock: socket.socket, tls: ClientTLS) -> TLSSocket:
        """``NBD_OPT_STARTTLS`` first of all options, then the TLS handshake; never plaintext."""
        sock.sendall(_OPTION.pack(_IHAVEOPT, _OPT_STARTTLS, 0))
        reply, payload = _option_reply(sock, _OPT_STARTTLS)
        if reply & _REP_ERR:
            with contextlib.suppress(OSError):  # a soft disconnect
                sock.sendall(_OPTION.pack(_IHAVEOPT, _OPT_ABORT, 0))
            said = payload.decode(errors="replace") or f"error reply {reply - _REP_ERR}"
            raise self._no_tls(f"it answered NBD_OPT_STARTTLS: {said}")
        if reply != _REP_ACK:
            raise _protocol_error(f"option reply type {reply} to NBD_OPT_STARTTLS")
        address = self.target.address
        tcp = isinstance(address, tuple)
        context = _tls.client_context(
            tls.certificates, verify_peer=tls.verify_peer, check_hostname=tcp
        )
        stream = TLSSocket(sock, context, address[0] if tcp else None)
        stream.handshake(f"the NBD server at {self.uri!r}", tls.certificates or "the system's CAs")
        return stream

    def _no_tls(self, why: str) -> _tls.AuthenticationError:
        return _tls.AuthenticationError(
            f"the NBD server at {self.uri!r} does not offer TLS ({why}); an nbds URI never "
            "falls back to plaintext: use nbd:// or nbd+unix:// to connect without TLS"
        )

    def _go(self, sock: socket.socket) -> bool:
        """``NBD_OPT_GO`` asking for block sizes; False when the server lacks it."""
        name = self.target.export.encode()
        data = _U32.pack(len(name)) + name + _U16.pack(1) + _U16.pack(_INFO_BLOCK_SIZE)
        sock.sendall(_OPTION.pack(_IHAVEOPT, _OPT_GO, len(data)) + data)
        export: tuple[int, int] | None = None
        block_size: tuple[int, ...] = _DEFAULT_BLOCK_SIZE
        while True:
            reply, payload = _option_reply(sock, _OPT_GO)
            if reply == _REP_INFO:
                if len(payload) < 2:
                    raise _protocol_error("an NBD_REP_INFO without a type")
                (kind,) = _U16.unpack_from(payload)
                if kind == _INFO_EXPORT:
                    if len(payload) != _INFO_EXPORT_DATA.size:
                        raise _protocol_error(f"NBD_INFO_EXPORT of {len(payload)} bytes")
                    _, size, flags = _INFO_EXPORT_DATA.unpack(payload)
                    export = (size, flags)
                elif kind == _INFO_BLOCK_SIZE:
                    if len(payload) != _INFO_BLOCK_SIZE_DATA.size:
                        raise _protocol_error(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
                    block_size = _INFO_BLOCK_SIZE_DATA.unpack(payload)[1:]
            elif reply == _REP_ACK:
                if export is None:
                    raise _protocol_error("it accepted NBD_OPT_GO without NBD_INFO_EXPORT")
                self._enter_transmission(sock, export[0], export[1], block_size)
                return True
            elif reply == _REP_ERR_UNSUP:
                return False
            elif reply & _REP_ERR:
                # A soft disconnect: the spec's only polite way for a client to leave.
                with contextlib.suppress(OSError):
                    sock.sendall(_OPTION.pack(_IHAVEOPT, _OPT_ABORT, 0))
                raise self._refused(reply, payload)
            else:
                raise _protocol_error(f"option reply type {reply} to NBD_OPT_GO")

    def _refused(self, reply: int, payload: bytes) -> OSError:
        code = {
            _REP_ERR_UNKNOWN: errno.ENOENT,
            _REP_ERR_POLICY: errno.EACCES,
            _REP_ERR_TLS_REQD: errno.EACCES,
            _REP_ERR_SHUTDOWN: errno.ESHUTDOWN,
        }.get(reply, errno.EPROTO)
        message = payload.decode(errors="replace")
        if reply == _REP_ERR_TLS_REQD:
            message = f"{message or 'TLS is required'}; use an nbds:// or nbds+unix:// URI"
        message = message or f"error reply {reply - _REP_ERR}"
        return OSError(
            code, f"the NBD server at {self.uri!r} refused export {self.target.export!r}: {message}"
        )

    def _export_name(self, sock: socket.socket, no_zeroes: bool) -> None:
        name = self.target.export.encode()
        sock.sendall(_OPTION.pack(_IHAVEOPT, _OPT_EXPORT_NAME, len(name)) + name)
        try:
            size, flags = _EXPORT.unpack(_recv(sock, _EXPORT.size))
            if not no_zeroes:
                _recv(sock, _ZEROES_AFTER_EXPORT_NAME)
        except ConnectionError:
            raise ConnectionError(
                f"the NBD server at {self.uri!r} closed the connection on NBD_OPT_EXPORT_NAME: "
                f"it has no export {self.target.export!r} or refuses it"
            ) from None
        self._enter_transmission(sock, size, flags, _DEFAULT_BLOCK_SIZE)

    def _enter_transmission(
        self, sock: socket.socket, size: int, flags: int, block_size: tuple[int, ...]
    ) -> None:
        minimum, preferred, maximum = block_size
        if not flags & TransmissionFlag.HAS_FLAGS:
            raise _protocol_error(f"transmission flags {flags:#x} lack NBD_FLAG_HAS_FLAGS")
        if (
            minimum < 1
            or minimum & (minimum - 1)
            or minimum > 1 << 16
            or maximum < minimum
            or (maximum != 0xFFFFFFFF and maximum % minimum)
        ):
            raise _protocol_error(f"block sizes {block_size} break the spec's constraints")
        if size == 0:
            with contextlib.suppress(OSError):
                sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
            raise ParameterError(f"export {self.target.export!r} at {self.uri!r} is empty")
        self.size = size
        self.flags = TransmissionFlag(flags)
        self.block_size = (minimum, preferred, maximum)
        limit = min(REQUEST_SIZE, maximum)
        self._request_size = max(limit - limit % minimum, minimum)

    # -- I/O --------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Return the ``length`` bytes at ``offset``.

        Raises ``RangeError`` outside the LUN, ``StateError`` when closed, and
        ``OSError`` as the class docstring says.
        """
        if self.closed:
            raise self._closed_error()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        buffer = bytearray(length)
        self._read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        """Fill all of the writable ``buffer`` with the bytes at ``offset``.

        Raises ``RangeError`` outside the LUN and ``StateError`` when closed,
        leaving ``buffer`` unchanged; ``TypeError`` for a read-only or
        non-contiguous buffer; ``OSError`` as the class docstring says (the
        buffer then holds an unknown mix of old and new bytes).
        """
        if self.closed:
            raise self._closed_error()
        view = memoryview(buffer)
        if view.readonly:
            raise TypeError(f"readinto needs a writable buffer, got a read-only {type(buffer)}")
        view = view.cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise self._range_error(offset, len(view))
        self._read_into(offset, view)

    def write(self, offset: int, data: BytesLike) -> None:
        """Write all of ``data`` (any C-contiguous buffer) at ``offset``.

        Raises ``RangeError`` outside the LUN, ``StateError`` when closed or
        when the export is read-only (both write nothing), and ``OSError`` as
        the class docstring says (the range then holds an unknown mix).
        """
        if self.closed:
            raise self._closed_error()
        if self.readonly:
            raise StateError(f"{self!r}: the server exports it read-only")
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise self._range_error(offset, len(view))
        block = self.block_size[0]
        if block == 1:
            self._submit(_CMD_WRITE, offset, view)
            return
        start, end = self._aligned(offset, len(view))
        # The server takes only whole blocks. A partial block is read, patched
        # and written back; the lock keeps another write of this LUN to the
        # same block from landing in between and being undone (other clients
        # of the export are not excluded).
        with self._whole_blocks:
            if start == offset and end == offset + len(view):
                self._submit(_CMD_WRITE, offset, view)
                return
            span = memoryview(bytearray(end - start))
            self._submit(_CMD_READ, start, span[:block])
            if len(span) > block:
                self._submit(_CMD_READ, end - block, span[-block:])
            span[offset - start : offset - start + len(view)] = view
            self._submit(_CMD_WRITE, start, span)

    def flush(self) -> None:
        """Ask the server to make completed writes durable (``NBD_CMD_FLUSH``).

        Does nothing when the server does not offer FLUSH. Raises
        ``StateError`` when closed and ``OSError`` as the class docstring says.
        """
        if self.closed:
            raise self._closed_error()
        if self.flags & TransmissionFlag.SEND_FLUSH:
            self._submit(_CMD_FLUSH, 0, memoryview(b""))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros (:func:`isc.lun.write_zeroes`).

        ``NBD_CMD_WRITE_ZEROES`` when the export offers it: no payload, the
        server may free the blocks, requests of up to its maximum block size
        (at most :data:`MAX_BLOCK`); a partial minimum-size block at either
        end is written as zeros. Otherwise WRITE requests of zeros. Raises as
        :meth:`write`.
        """
        if self.closed:
            raise self._closed_error()
        if self.readonly:
            raise StateError(f"{self!r}: the server exports it read-only")
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise self._range_error(offset, length)
        minimum, _, maximum = self.block_size
        first = min(-(-offset // minimum) * minimum, end)
        last = max(end - end % minimum, first)
        if not self.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            first = last = end
        _zero_fill(self.write, offset, first - offset)
        if last > first:
            step = min(maximum, MAX_BLOCK)
            # No payload: the requests' "view" is a range of the length.
            self._submit(_CMD_WRITE_ZEROES, first, range(last - first), step - step % minimum)
        _zero_fill(self.write, last, end - last)

    def close(self) -> None:
        """Disconnect (``NBD_CMD_DISC``); later I/O raises ``StateError``. Idempotent.

        Waits for calls of other threads still running (the LUN interface
        says ``close`` does not race with I/O).
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)
            self._release_locked()

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest range of whole minimum-size blocks around ``[offset, offset + length)``."""
        block = self.block_size[0]
        if block == 1 or not length:
            return offset, offset + length
        return offset - offset % block, min(-(-(offset + length) // block) * block, self.size)

    def _read_into(self, offset: int, view: memoryview) -> None:
        start, end = self._aligned(offset, len(view))
        if start == offset and end == offset + len(view):
            self._submit(_CMD_READ, offset, view)
            return
        span = memoryview(bytearray(end - start))
        self._submit(_CMD_READ, start, span)
        view[:] = span[offset - start : offset - start + len(view)]

    # -- the requests in flight ----------------------------------------------------------
    # Calls from any number of threads share the connection and one window of
    # IN_FLIGHT requests, registered in _inflight by handle before they are
    # sent. A call sends while the window has room and the send lock is free;
    # otherwise, when replies are due and no thread is reading, it becomes the
    # reader: it takes one reply off the wire, hands it to the call that owns
    # the handle (a READ's payload goes straight into that call's buffer) and
    # gives the role up again. No thread ever waits for the send lock: a
    # server that stops reading requests until its replies are read (one
    # that serves a request at a time) would deadlock a thread holding the
    # lock in sendmsg with one queued behind it that owns the replies.
    # _cond guards every field but the socket I/O itself, which the send lock
    # (sender) and the _reading flag (reader) keep to one thread each.

    def _submit(self, command: int, offset: int, view: memoryview | range, step: int = 0) -> None:
        """Send ``command`` over ``view`` at ``offset`` as pipelined requests of ``step``
        bytes (default: the request size); wait for all replies.

        Raises ``StateError`` when closed, the first error a reply reports
        once all are in, or the failure that broke the connection.
        """
        step = step or self._request_size
        pieces = deque((offset + at, view[at : at + step]) for at in range(0, len(view), step))
        if command == _CMD_FLUSH:
            pieces.append((0, view))
        call = _Call(command)
        cond = self._cond
        with cond:
            if self.closed:
                raise self._closed_error()
            self._busy += 1
            try:
                patient = True  # may still wait for another thread's send before reading
                while True:
                    sending = pieces and call.error is None and self._failure is None
                    if not sending and not call.pending and self._receiving_into is not call:
                        break
                    can_send = sending and len(self._inflight) < IN_FLIGHT
                    if can_send and self._send_lock.acquire(blocking=False):
                        patient = True
                        at, piece = pieces.popleft()
                        handle = next(self._handles)
                        self._inflight[handle] = (call, at, piece)
                        call.pending += 1
                        cond.release()
                        try:
                            self._send_request(command, handle, at, piece)
                        finally:
                            self._send_lock.release()
                            cond.acquire()
                            cond.notify_all()
                    elif self._inflight and not self._reading and can_send and patient:
                        # Another thread is sending: let it finish so that ours go
                        # out too before anyone waits for replies (a server may
                        # answer only once it has them all). If its send stays
                        # blocked (a server that reads no request until its
                        # replies are read), become the reader after all.
                        patient = cond.wait(SENDER_PATIENCE)
                    elif self._inflight and not self._reading:
                        patient = True
                        self._reading = True
                        cond.release()
                        try:
                            self._receive_reply()
                        finally:
                            cond.acquire()
                            self._reading = False
                            cond.notify_all()
                    else:
                        cond.wait()
                if call.error is None and pieces:
                    call.error = self._failure  # the connection ended before these went out
            finally:
                self._busy -= 1
                if self._failure is not None and not self._busy:
                    self._release_locked()
                cond.notify_all()  # close() may be waiting for the last call to end
        if call.error is not None:
            raise call.error

    def _send_request(self, command: int, handle: int, offset: int, piece: memoryview) -> None:
        """Send one request (the caller holds the send lock, not ``_cond``)."""
        header = _REQUEST.pack(_REQUEST_MAGIC, 0, command, handle, offset, len(piece))
        sock = self._sock
        assert sock is not None  # a busy LUN keeps its socket
        try:
            _send(sock, header, piece if command == _CMD_WRITE else None)
        except OSError as exc:
            raise self._break(exc) from exc

    def _receive_reply(self) -> None:
        """Take one reply off the wire and hand it to its call (the caller is the reader)."""
        sock = self._sock
        assert sock is not None  # a busy LUN keeps its socket
        try:
            magic, error, handle = _REPLY.unpack(_recv(sock, _REPLY.size))
            if magic == _STRUCTURED_REPLY_MAGIC:
                raise _protocol_error("it sent a structured reply, which was never negotiated")
            if magic != _SIMPLE_REPLY_MAGIC:
                raise _protocol_error(f"a reply starts {magic:#x}")
            with self._cond:
                entry = self._inflight.get(handle)
                if entry is None:
                    raise _protocol_error(f"a reply for handle {handle}, which is not in flight")
                call, at, piece = entry
                payload = call.command == _CMD_READ and not error
                if payload:
                    # Until the payload is in, the call must not return, even
                    # failed: its caller would get back a buffer still being filled.
                    self._receiving_into = call
            if payload:
                try:
                    _recv_into(sock, piece)
                finally:
                    with self._cond:
                        self._receiving_into = None
        except OSError as exc:
            raise self._break(exc) from exc
        with self._cond:
            if self._inflight.pop(handle, None) is None:
                return  # the connection broke meanwhile and failed the call
            call.pending -= 1
            if error and call.error is None:
                code = _WIRE_TO_ERRNO.get(error, errno.EINVAL)
                name = _CMD_NAMES[call.command]
                where = f" [{at}, {at + len(piece)})" if call.command != _CMD_FLUSH else ""
                call.error = OSError(code, f"{self!r}: {name}{where} failed: {os.strerror(code)}")
                if code == errno.ESHUTDOWN:
                    # The spec: told the server is shutting down, a client
                    # sends nothing more and disconnects (once idle, politely).
                    self._failure = self._failure or call.error

    def _break(self, exc: OSError) -> OSError:
        """The stream broke: fail every call in flight; return the error to raise for ``exc``."""
        with self._cond:
            if self._failure is None or self._failure.errno == errno.ESHUTDOWN:
                self._failure = self._lost(exc)
                # Wakes a thread blocked on the socket. No DISC: it could land
                # inside a half-sent WRITE payload and be written as data.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
            for call, _, _ in self._inflight.values():
                call.error = call.error or self._failure
                call.pending = 0
            self._inflight.clear()
            self._cond.notify_all()
            return self._failure

    def _lost(self, exc: OSError) -> OSError:
        if isinstance(exc, TimeoutError):
            return TimeoutError(
                f"{self!r}: no answer from the NBD server within {self.timeout} s; "
                "the LUN is closed"
            )
        if exc.errno == errno.EPROTO:
            return OSError(errno.EPROTO, f"{exc.strerror}; the LUN is closed")
        return ConnectionError(f"{self!r}: the connection to the NBD server was lost ({exc})")

    def _release_locked(self) -> None:
        """Close the socket (the caller holds ``_cond``, no call runs); DISC first if it can."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._failure is None or self._failure.errno == errno.ESHUTDOWN:
            with contextlib.suppress(OSError):  # a server already gone needs no goodbye
                sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, next(self._handles), 0, 0))
        sock.close()


class _Call:
    """One LUN call's requests: how many are in flight, and the first error."""

    __slots__ = ("command", "error", "pending")

    def __init__(self, command: int) -> None:
        self.command = command
        self.pending = 0
        self.error: OSError | None = None


# -- exporting a session ---------------------------------------------------------------------
class SessionLUN(_BaseLUN):
    """The LUN interface over a session: writes are the session's tracked host writes.

    Reads, ``readinto`` and ``flush`` go to ``session.source``; :meth:`write` is
    ``session.write``, so exporting a ``SessionLUN`` through :class:`NBDServer`
    makes every NBD WRITE a host write that sets tracking bits (and saves
    COFW data while the session is marked). :meth:`close` closes neither the
    session nor its source.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.size = session.source.size
        self._open = True

    def __repr__(self) -> str:
        state = "" if self._open else " closed"
        return f"<SessionLUN {self.session.name!r} size={self.size}{state}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return not self._open

    def _check(self) -> None:
        if not self._open:
            raise self._closed_error()

    def read(self, offset: int, length: int) -> bytes:
        """The source's bytes at ``[offset, offset + length)``; errors as the source's."""
        self._check()
        return self.session.source.read(offset, length)

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        """Fill ``buffer`` from the source at ``offset``; errors as the source's."""
        self._check()
        self.session.source.readinto(offset, buffer)

    def write(self, offset: int, data: BytesLike) -> None:
        """A host write through the session (tracked); ``RangeError`` outside the source."""
        self._check()
        self.session.write(offset, data)

    def flush(self) -> None:
        """Flush the source; ``StateError`` when this adapter is closed."""
        self._check()
        self.session.source.flush()

    def close(self) -> None:
        """Close this adapter only; later I/O raises ``StateError``. Idempotent."""
        self._open = False


# -- the server -------------------------------------------------------------------------------
class _Violation(Exception):
    """A client broke the protocol in a way that leaves the stream unusable."""


_SERVER_IN_FLIGHT = 16  # requests one connection may have in the thread pool at once
_CONNECTION_DATA = MAX_BLOCK
"""Bytes of WRITE payloads and READ replies one connection may hold in the server at once:
one request of the largest size, or many smaller ones (nbdcopy keeps 16 MiB in flight)."""
MAX_CLIENTS = 64
"""The connections an :class:`NBDServer` serves at once unless told otherwise; with
:data:`_CONNECTION_DATA` it bounds the server's memory (about twice their product)."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client has to reach transmission, TLS included (``NBDServer``'s default)."""


class _Budget:
    """Bytes one connection may hold; its one taker waits until enough are given back."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._given = asyncio.Event()

    async def take(self, count: int) -> None:
        while self.free < count:
            self._given.clear()
            await self._given.wait()
        self.free -= count

    def give(self, count: int) -> None:
        self.free += count
        self._given.set()


_INLINE_WRITE = 64 << 10
"""WRITEs up to this size without flags run on the event loop's thread, not in
the pool: the hand-off to a worker thread and back cost more than a small
write itself (4 KiB writes at queue depth 8 ran at 16 000/s through the pool,
100 000/s inline). A FUA write (it waits for a flush) and larger I/O use the pool."""
_TLS_REQUIRED = b"TLS is required: start it with NBD_OPT_STARTTLS"
_REPLY_BACKLOG = 64 << 10  # unsent reply bytes after which the loop waits for the client
_STREAM_LIMIT = 4 << 20  # bytes a connection buffers before it stops reading the socket
_ZERO_PIECE = 1 << 20  # bytes per LUN write of a WRITE_ZEROES


def _wire_error(exc: BaseException, writes: bool) -> int:
    """The spec's error value for an exception a LUN raised."""
    if isinstance(exc, StateError):
        return errno.EPERM if writes else errno.EIO
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return errno.ENOSPC
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return errno.EPERM
        if exc.errno in (errno.ENOMEM, errno.EINVAL, errno.ESHUTDOWN):
            return exc.errno
    if isinstance(exc, ValueError):
        return errno.EINVAL
    return errno.EIO


class NBDServer:
    """Exports one LUN over NBD to any number of clients.

    ``lun`` is any object with the LUN interface; every WRITE and
    WRITE_ZEROES goes through ``lun.write`` (export a :class:`SessionLUN` to
    make them tracked host writes) and FLUSH or FUA through ``lun.flush``.
    ``readonly`` (also implied by a true ``lun.readonly``) advertises
    ``NBD_FLAG_READ_ONLY`` and answers writes EPERM. ``name`` is the export
    name; the default export "" reaches the LUN too. ``workers`` threads run
    the LUN I/O of all clients but small WRITEs, which run on the server's
    event loop thread in the order they arrive (:data:`_INLINE_WRITE`).
    ``tls`` (:class:`~isc.tls.ServerTLS`) offers or requires TLS (the module
    docstring); without it the server speaks plaintext only.

    Serve with ``await serve(...)``/``serve_unix(...)`` in a running event
    loop, or from a background thread with :meth:`start`/:meth:`start_unix`;
    :meth:`close` ends either. A server serves once. Raises
    ``ParameterError`` for a name over 4096 UTF-8 bytes or holding NUL, or
    for ``workers < 1``.

    Transmission flags: HAS_FLAGS, SEND_FLUSH, CAN_MULTI_CONN (every
    connection shares the one LUN, so a flush on any covers all), and either
    SEND_FUA and SEND_WRITE_ZEROES or READ_ONLY. Request errors, per the
    spec: EINVAL for an unknown command or flag, a read past the end, a
    length over :data:`MAX_BLOCK`, or a FLUSH with a nonzero offset or
    length; ENOSPC for a write past the end; EPERM for a write to a read-only
    export; the LUN's own failures as EIO (or ENOSPC, EPERM ... when its
    ``OSError`` says so). A WRITE longer than :data:`MAX_BLOCK` is answered
    EINVAL and the connection dropped, since its payload cannot be skipped
    cheaply; a bad request magic drops the connection.
    """

    def __init__(
        self,
        lun: LUN,
        *,
        readonly: bool = False,
        name: str = "",
        workers: int = 8,
        tls: ServerTLS | None = None,
        max_clients: int = MAX_CLIENTS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ):
        if not isinstance(name, str) or "\0" in name or len(name.encode()) > _MAX_STRING:
            raise ParameterError(
                f"an export name is a str without NUL of at most {_MAX_STRING} UTF-8 bytes, "
                f"got {name!r:.80}"
            )
        if workers < 1:
            raise ParameterError(f"workers must be >= 1, got {workers}")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ParameterError(f"max_clients must be an integer >= 1, got {max_clients!r}")
        if not handshake_timeout > 0:
            raise ParameterError(f"handshake_timeout must be > 0 seconds, got {handshake_timeout}")
        self.max_clients = max_clients
        """Connections served at once; more are refused with a log line."""
        self.handshake_timeout = handshake_timeout
        """Seconds a client has from connecting to entering transmission."""
        self.lun = lun
        self.name = name
        self.tls = tls
        """How clients get TLS (None: not at all)."""
        self.readonly = bool(readonly or getattr(lun, "readonly", False))
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
        flags |= TransmissionFlag.CAN_MULTI_CONN
        if self.readonly:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES
        self.flags = flags
        """The transmission flags every client gets."""
        self.address: tuple[str, int] | str | None = None
        """``(host, port)`` or the Unix socket path once listening, else None."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="isc-nbd"
        )
        self._zeroes = bytes(min(_ZERO_PIECE, lun.size))
        self._clients = itertools.count(1)
        self._connections: set[asyncio.Task[None]] = set()
        self._requests: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closed = False
        self._ready = threading.Event()
        self._ready_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = f" at {self.address}" if self.address is not None else ""
        return f"<NBDServer {self.name!r} of {self.lun!r}{where}>"

    @property
    def uri(self) -> str:
        """An NBD URI that reaches the export; ``StateError`` before it listens."""
        address = self.address
        if address is None:
            raise StateError(f"{self!r} is not listening; start or serve it first")
        name = quote(self.name, safe="")
        scheme = "nbds" if self.tls is not None and self.tls.required else "nbd"
        if isinstance(address, str):
            return f"{scheme}+unix:///{name}?socket={quote(address, safe='/')}"
        host, port = address
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/{name}"

    # -- running ------------------------------------------------------------------------------
    async def serve(self, host: str = "127.0.0.1", port: int = NBD_PORT) -> None:
        """Listen on TCP ``host:port`` (port 0: any free one) and serve until :meth:`close`.

        ``address`` holds the bound address once listening. Raises the
        ``OSError`` of a failed bind, ``StateError`` when this server already
        served. Cancelling it closes the server as :meth:`close` does.
        """
        await self._serve(
            functools.partial(asyncio.start_server, self._handle, host, port, limit=_STREAM_LIMIT)
        )

    async def serve_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a Unix socket at ``path`` and serve until :meth:`close`.

        A stale socket file at ``path`` is replaced; the socket file is
        removed on close. Raises as :meth:`serve`.
        """
        await self._serve(
            functools.partial(
                asyncio.start_unix_server, self._handle, os.fspath(path), limit=_STREAM_LIMIT
            )
        )

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve TCP from a background thread; return once listening (``address`` is set).

        Raises as :meth:`serve`; :meth:`close` stops the thread.
        """
        self._start_thread(self.serve(host, port))

    def start_unix(self, path: str | os.PathLike[str]) -> None:
        """Serve a Unix socket from a background thread; return once listening."""
        self._start_thread(self.serve_unix(path))

    def close(self) -> None:
        """Stop: no new clients, requests in flight finish, every client is disconnected.

        With :meth:`start`, returns when all that is done and the thread has
        ended; called from another thread than a ``serve`` coroutine's loop,
        returns at once and the coroutine finishes the job. Idempotent.
        """
        self._closed = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                stop.set()
            else:
                with contextlib.suppress(RuntimeError):  # the loop has ended already
                    loop.call_soon_threadsafe(stop.set)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> NBDServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_thread(self, main: Coroutine[Any, Any, None]) -> None:
        if self._thread is not None or self._stop is not None or self._closed:
            main.close()
            raise StateError(f"{self!r} has served already; an NBDServer serves once")
        self._thread = threading.Thread(
            target=self._thread_main, args=(main,), name="isc-nbd-server", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._ready_error is not None:
            self._thread.join()
            raise self._ready_error

    def _thread_main(self, main: Coroutine[Any, Any, None]) -> None:
        try:
            asyncio.run(main)
        except BaseException as exc:
            if self._ready_error is None:
                log.exception("%r: the server thread failed", self)
                self._ready_error = exc
        finally:
            self._ready.set()

    async def _serve(self, listen: Callable[[], Awaitable[asyncio.Server]]) -> None:
        if self._stop is not None or self._closed:
            raise StateError(f"{self!r} has served already; an NBDServer serves once")
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            server = await listen()
        except BaseException as exc:
            self._ready_error = exc
            self._ready.set()
            raise
        name = server.sockets[0].getsockname()
        self.address = name if isinstance(name, str) else (name[0], name[1])
        self._ready.set()
        log.info("%r: exporting", self)
        try:
            if not self._closed:
                await self._stop.wait()
        finally:
            await self._shutdown(server)

    async def _shutdown(self, server: asyncio.Server) -> None:
        self._closed = True  # also when the serve coroutine was cancelled: see _handle
        server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        # Requests already in the thread pool run to the end before the LUN is let go.
        await asyncio.gather(*self._requests, return_exceptions=True)
        await server.wait_closed()
        self._executor.shutdown(wait=True)
        if isinstance(self.address, str):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(self.address).st_mode):
                    os.unlink(self.address)
        log.info("%r: closed", self)

    # -- one connection ---------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername") or f"client {next(self._clients)}"
        if len(self._connections) >= self.max_clients:
            log.warning(
                "%r: refusing %s: %d clients are connected, the most it serves (max_clients)",
                self,
                peer,
                len(self._connections),
            )
            writer.close()
            return
        self._connections.add(task)
        try:
            handshake = self._handshake(reader, writer, peer)
            if await asyncio.wait_for(handshake, self.handshake_timeout):
                await self._transmission(reader, writer, peer)
        except TimeoutError:
            log.warning(
                "%r: %s did not finish the handshake within %g s; disconnecting it",
                self,
                peer,
                self.handshake_timeout,
            )
        except asyncio.IncompleteReadError:
            log.info("%r: %s left in the middle of a message", self, peer)
        except ConnectionError as exc:
            log.info("%r: %s dropped the connection (%s)", self, peer, exc)
        except _Violation as exc:
            log.warning("%r: %s broke the protocol (%s); disconnecting it", self, peer, exc)
        except ssl.SSLError as exc:
            log.warning("%r: TLS with %s failed (%s); disconnecting it", self, peer, describe(exc))
        except asyncio.CancelledError:
            if not self._closed:
                raise
            # _shutdown cancelled it: end normally. Before Python 3.12,
            # asyncio.start_server's done callback calls exception() on the
            # task, which raises for a cancelled one, and logs that traceback.
            log.info("%r: disconnecting %s: the server is closing", self, peer)
        except Exception:
            log.exception("%r: unexpected failure serving %s; disconnecting it", self, peer)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _option_reply(
        self, writer: asyncio.StreamWriter, option: int, reply: int, data: bytes = b""
    ) -> None:
        writer.write(_OPTION_REPLY.pack(_OPTION_REPLY_MAGIC, option, reply, len(data)) + data)
        await writer.drain()

    def _exports(self, name: bytes) -> bool:
        try:
            return name.decode() in ("", self.name)
        except UnicodeDecodeError:
            return False

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> bool:
        """Haggle options; True when the client enters transmission."""
        writer.write(_GREETING.pack(_NBDMAGIC, _IHAVEOPT, _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES))
        await writer.drain()
        (client_flags,) = _U32.unpack(await reader.readexactly(4))
        if client_flags & ~(_FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES):
            # The spec: the server MUST drop a client that sets an unknown flag.
            raise _Violation(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & _FLAG_NO_ZEROES)
        size = self.lun.size
        tls = self.tls
        if tls is not None and not client_flags & _FLAG_FIXED_NEWSTYLE:
            # The spec: TLS needs fixed newstyle; without it the server is in NOTLS mode.
            if tls.required:
                raise _Violation("no fixed newstyle negotiation, so no TLS, which is required")
            tls = None
        encrypted = False
        while True:
            magic, option, length = _OPTION.unpack(await reader.readexactly(_OPTION.size))
            if magic != _IHAVEOPT:
                raise _Violation(f"an option starts {magic:#x}, not IHAVEOPT")
            if length > _MAX_OPTION_DATA:
                while length:
                    length -= len(await reader.readexactly(min(length, _MAX_OPTION_DATA)))
                await self._option_reply(
                    writer, option, _REP_ERR_TOO_BIG, b"option data longer than 64 KiB"
                )
                continue
            data = await reader.readexactly(length)
            if option == _OPT_STARTTLS:
                if tls is None:
                    reason = b"TLS is off on this server"
                    await self._option_reply(writer, option, _REP_ERR_UNSUP, reason)
                elif encrypted or data:
                    reason = (
                        b"TLS is on already" if encrypted else b"NBD_OPT_STARTTLS takes no data"
                    )
                    await self._option_reply(writer, option, _REP_ERR_INVALID, reason)
                else:
                    await self._option_reply(writer, option, _REP_ACK)
                    await writer.start_tls(
                        tls.context, ssl_handshake_timeout=self.handshake_timeout
                    )
                    encrypted = True
                    log.debug("%r: %s is on TLS", self, peer)
                continue
            if tls is not None and tls.required and not encrypted and option != _OPT_ABORT:
                if option == _OPT_EXPORT_NAME:
                    # The option cannot fail politely: the spec says drop the client.
                    raise _Violation("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
                await self._option_reply(writer, option, _REP_ERR_TLS_REQD, _TLS_REQUIRED)
                continue
            if option == _OPT_EXPORT_NAME:
                if not self._exports(data):
                    # The option cannot fail politely: the spec says drop the client.
                    raise _Violation(f"NBD_OPT_EXPORT_NAME of unknown export {data[:80]!r}")
                tail = b"" if no_zeroes else bytes(_ZEROES_AFTER_EXPORT_NAME)
                writer.write(_EXPORT.pack(size, self.flags) + tail)
                return True
            if option == _OPT_ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._option_reply(writer, option, _REP_ACK)
                log.debug("%r: %s aborted the handshake", self, peer)
                return False
            if option == _OPT_LIST:
                if data:
                    await self._option_reply(
                        writer, option, _REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"
                    )
                    continue
                name = self.name.encode()
                await self._option_reply(writer, option, _REP_SERVER, _U32.pack(len(name)) + name)
                await self._option_reply(writer, option, _REP_ACK)
            elif option in (_OPT_INFO, _OPT_GO):
                if await self._info(writer, option, data) and option == _OPT_GO:
                    return True
            else:
                await self._option_reply(
                    writer, option, _REP_ERR_UNSUP, f"option {option} is not supported".encode()
                )

    async def _info(self, writer: asyncio.StreamWriter, option: int, data: bytes) -> bool:
        """Answer ``NBD_OPT_INFO``/``NBD_OPT_GO``; True when the export was granted."""
        # Data: name length (32 bits), name, request count (16 bits), requests (16 bits each).
        if len(data) < 6 or _U32.unpack_from(data)[0] > len(data) - 6:
            await self._option_reply(writer, option, _REP_ERR_INVALID, b"option data too short")
            return False
        name_length = _U32.unpack_from(data)[0]
        name = data[4 : 4 + name_length]
        (count,) = _U16.unpack_from(data, 4 + name_length)
        if len(data) != 6 + name_length + 2 * count:
            await self._option_reply(
                writer, option, _REP_ERR_INVALID, b"data length does not match the request count"
            )
            return False
        if not self._exports(name):
            message = f"no export {name[:80]!r}; this server exports {self.name!r}".encode()
            await self._option_reply(writer, option, _REP_ERR_UNKNOWN, message)
            return False
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_length))
        info = [_INFO_EXPORT_DATA.pack(_INFO_EXPORT, self.lun.size, self.flags)]
        if _INFO_NAME in requests:
            info.append(_U16.pack(_INFO_NAME) + self.name.encode())
        if _INFO_BLOCK_SIZE in requests:
            info.append(_INFO_BLOCK_SIZE_DATA.pack(_INFO_BLOCK_SIZE, *_SERVER_BLOCK_SIZE))
        for item in info:
            await self._option_reply(writer, option, _REP_INFO, item)
        await self._option_reply(writer, option, _REP_ACK)
        return True

    async def _transmission(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        slots = asyncio.Semaphore(_SERVER_IN_FLIGHT)
        budget = _Budget(_CONNECTION_DATA)
        mine: set[asyncio.Task[None]] = set()
        try:
            while True:
                header = await reader.readexactly(_REQUEST.size)
                magic, flags, command, handle, offset, length = _REQUEST.unpack(header)
                if magic != _REQUEST_MAGIC:
                    raise _Violation(f"a request starts {magic:#x}, not the request magic")
                if command == _CMD_DISC:
                    log.debug("%r: %s disconnected", self, peer)
                    return
                data = b""
                if command == _CMD_WRITE and length > MAX_BLOCK:
                    self._reply(writer, handle, errno.EINVAL)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    raise _Violation(f"a WRITE of {length} bytes, over the {MAX_BLOCK} maximum")
                if command == _CMD_WRITE and length <= _INLINE_WRITE and not flags:
                    # Small plain writes run here, in order: a thread hand-off
                    # costs more than the write (see _INLINE_WRITE).
                    data = await reader.readexactly(length)
                    error, _ = self._execute(flags, command, offset, length, data)
                    self._reply(writer, handle, error)
                    if writer.transport.get_write_buffer_size() > _REPLY_BACKLOG:
                        await writer.drain()
                    continue
                # The request's payload or reply data: a client that sends
                # more than the budget, or reads no replies, waits; its
                # socket's buffers and TCP hold the rest.
                held = length if command in (_CMD_READ, _CMD_WRITE) and length <= MAX_BLOCK else 0
                await slots.acquire()
                try:
                    await budget.take(held)
                except BaseException:
                    slots.release()
                    raise
                try:
                    if command == _CMD_WRITE:
                        # The whole payload first: a client gone mid-payload writes nothing.
                        data = await reader.readexactly(length)
                    task = asyncio.create_task(
                        self._request(writer, flags, command, handle, offset, length, data)
                    )
                except BaseException:
                    slots.release()
                    budget.give(held)
                    raise
                task.add_done_callback(lambda _, held=held: (slots.release(), budget.give(held)))
                for tasks in (mine, self._requests):
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            # The spec: requests in flight are answered before the connection closes.
            if mine:
                await asyncio.shield(asyncio.gather(*mine, return_exceptions=True))

    def _reply(self, writer: asyncio.StreamWriter, handle: int, error: int) -> None:
        writer.write(_REPLY.pack(_SIMPLE_REPLY_MAGIC, _ERRNO_TO_WIRE.get(error, 0), handle))

    async def _request(
        self,
        writer: asyncio.StreamWriter,
        flags: int,
        command: int,
        handle: int,
        offset: int,
        length: int,
        data: bytes,
    ) -> None:
        loop = asyncio.get_running_loop()
        error, payload = await loop.run_in_executor(
            self._executor, self._execute, flags, command, offset, length, data
        )
        if writer.is_closing():
            return  # the client is gone: nobody to answer
        self._reply(writer, handle, error)
        if payload:
            writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def _execute(
        self, flags: int, command: int, offset: int, length: int, data: bytes
    ) -> tuple[int, bytes | None]:
        """Run one request against the LUN (in a worker thread): (errno or 0, read data)."""
        writes = command in (_CMD_WRITE, _CMD_WRITE_ZEROES)
        allowed = _CMD_FLAG_FUA if self.flags & TransmissionFlag.SEND_FUA else 0
        if command == _CMD_WRITE_ZEROES:
            allowed |= _CMD_FLAG_NO_HOLE
        if command not in (_CMD_READ, _CMD_WRITE, _CMD_FLUSH, _CMD_WRITE_ZEROES):
            return errno.EINVAL, None
        if flags & ~allowed:
            return errno.EINVAL, None
        if writes and self.readonly:
            return errno.EPERM, None
        if command == _CMD_FLUSH:
            if offset or length:
                return errno.EINVAL, None
        elif length > MAX_BLOCK:
            return errno.EINVAL, None
        elif offset + length > self.lun.size:
            return (errno.ENOSPC if writes else errno.EINVAL), None
        lun = self.lun
        try:
            if command == _CMD_READ:
                return 0, lun.read(offset, length)
            if command == _CMD_WRITE:
                lun.write(offset, data)
            elif command == _CMD_WRITE_ZEROES:
                zeroes = memoryview(self._zeroes)
                for at in range(offset, offset + length, len(zeroes)):
                    lun.write(at, zeroes[: min(len(zeroes), offset + length - at)])
            if command == _CMD_FLUSH or flags & _CMD_FLAG_FUA:
                lun.flush()
        except Exception as exc:
            code = _wire_error(exc, writes)
            log.warning(
                "%r: %s [%d, %d) failed (%s): %s",
                self,
                _CMD_NAMES.get(command, "WRITE_ZEROES"),
                offset,
                offset + length,
                errno.errorcode[code],
                exc,
            )
            return code, None
        return 0, None
