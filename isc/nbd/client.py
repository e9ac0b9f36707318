"""The NBD client: :class:`NBDLUN`, a LUN on a remote export.

:class:`NBDLUN` is a blocking LUN on one connection. It speaks the fixed
newstyle handshake with ``NBD_FLAG_NO_ZEROES``; ``NBD_OPT_GO`` asking for
``NBD_INFO_BLOCK_SIZE`` (``NBD_OPT_EXPORT_NAME`` when a server lacks it);
``NBD_OPT_STARTTLS`` for an ``nbds`` URI; simple replies only; commands
READ, WRITE, FLUSH, WRITE_ZEROES (:meth:`NBDLUN.write_zeroes`) and DISC. The
server's errors (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP,
ESHUTDOWN) are raised as ``OSError`` with that errno.

A call is split into requests of at most :data:`REQUEST_SIZE` bytes (less
if the server's maximum block size is smaller), of which up to
:data:`IN_FLIGHT` are on the wire at once: header and payload go out in one
``sendmsg`` from the caller's buffer, read replies land by ``recv_into``
straight in it. Calls from several threads share the connection and the
window, each reply going to the call that sent its handle, so one thread's
requests keep the wire busy while another's wait; a call returns once all
its own requests are answered.

TLS: an ``nbds`` URI makes :class:`NBDLUN` send ``NBD_OPT_STARTTLS`` before
any other option and refuse a server that does not accept it: it never
falls back to plaintext. TLS costs CPU on both ends per byte; the NBD
messages are unchanged inside it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import ssl
import threading
from collections import deque
from collections.abc import Iterator

from isc import tls as _tls
from isc.errors import ParameterError, StateError
from isc.lun import BytesLike, _BaseLUN, _zero_fill
from isc.nbd import proto
from isc.nbd.proto import MAX_BLOCK, TransmissionFlag
from isc.nbd.uri import ClientTLS, parse_uri
from isc.tls import TLSSocket

REQUEST_SIZE = 256 << 10
"""Largest payload in bytes of one READ or WRITE request :class:`NBDLUN` sends.

Measured against qemu-nbd: it spends about twice the CPU per byte on 1 MiB
requests as on 256 KiB ones (nbdcopy's default size, too), and larger ones
cost more still; smaller ones add per-request overhead on both ends.
"""

IN_FLIGHT = 32
"""Requests :class:`NBDLUN` keeps on the wire at once, over all calls (8 MiB)."""

DEFAULT_TIMEOUT = 60.0
"""Seconds :class:`NBDLUN` waits for its server at most, unless told otherwise."""

SENDER_PATIENCE = 0.01
"""Seconds a call with requests to send waits for another thread's send to end
before it reads replies instead (see NBDLUN._submit)."""


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("the NBD server closed the connection")
        view = view[got:]


@contextlib.contextmanager
def _within(sock: socket.socket, seconds: float | None, what: str) -> Iterator[None]:
    """Bound the whole exchange over ``sock`` inside the block to ``seconds`` (None: no
    bound), where a socket's timeout bounds each wait: a peer that sends a byte at a
    time would hold the block for ever. Past it the socket is shut down and the block
    raises ``TimeoutError`` saying ``what``."""
    if seconds is None:
        yield
        return
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    except OSError as exc:
        if expired.is_set():
            raise TimeoutError(f"{what} within {seconds} s") from exc
        raise
    finally:
        timer.cancel()
    if expired.is_set():  # it ran out as the block ended: the socket is shut down
        raise TimeoutError(f"{what} within {seconds} s")


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
    magic, echoed, reply, length = proto.OPTION_REPLY.unpack(_recv(sock, proto.OPTION_REPLY.size))
    if magic != proto.OPTION_REPLY_MAGIC or echoed != option:
        raise _protocol_error(f"bad option reply (magic {magic:#x}, option {echoed})")
    if length > proto.MAX_OPTION_DATA:
        raise _protocol_error(f"an option reply of {length} bytes")
    return reply, _recv(sock, length)


def _protocol_error(what: str) -> OSError:
    return OSError(errno.EPROTO, f"the NBD server broke the protocol: {what}")


class NBDLUN(_BaseLUN):
    """A LUN on an NBD export, over one connection (the module docstring has the details).

    ``uri`` is ``nbd://host[:port][/export]`` or ``nbd+unix:///[export]?socket=PATH``,
    or with TLS ``nbds://...``, ``nbds+unix://...`` (:func:`parse_uri`).
    ``timeout`` (seconds; None waits forever) bounds the connect, the
    handshake and every wait for the server during I/O. ``refuse``: a connection
    (the first or a :meth:`reconnect`) to an export whose ``NBD_INFO_DESCRIPTION``
    is this string raises ``OSError`` (``EINVAL``): a session's destinations refuse
    its own ``isc serve`` export (:func:`~isc.nbd.proto.own_export`).

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
    known of the requests in flight. Messages name the server by its URI
    (``the NBD server at 'nbd://…' closed the connection (Broken pipe)``).
    ``RangeError`` and ``StateError`` are
    raised as by every LUN, before anything is sent; :meth:`write` on a
    read-only export raises ``StateError``.
    """

    def __init__(
        self, uri: str, *, timeout: float | None = DEFAULT_TIMEOUT, refuse: str | None = None
    ) -> None:
        self.uri = uri
        self.refuse = refuse
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
        self._shut = False  # close() ran: unlike a lost connection, no reconnect reopens it
        self.size = 0
        self.flags = TransmissionFlag.HAS_FLAGS
        """The export's transmission flags."""
        self.block_size = proto.DEFAULT_BLOCK_SIZE
        """The server's (minimum, preferred, maximum) block sizes in bytes, else the defaults."""
        sock = self._connect()
        try:
            with _within(sock, self.timeout, f"{self._server} did not finish its handshake"):
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

    @property
    def _label(self) -> str:
        return f"the NBD LUN at {self.uri!r}"

    @property
    def _server(self) -> str:
        """The server, as messages name it."""
        return f"the NBD server at {self.uri!r}"

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
        magic, newstyle, flags = proto.GREETING.unpack(_recv(sock, proto.GREETING.size))
        if magic != proto.NBDMAGIC:
            raise _protocol_error(f"its greeting starts {magic:#x}, not proto.NBDMAGIC")
        if newstyle == proto.CLISERV_MAGIC:
            raise _protocol_error("it offers only oldstyle negotiation, which isc does not speak")
        if newstyle != proto.IHAVEOPT:
            raise _protocol_error(f"its greeting has {newstyle:#x} where proto.IHAVEOPT belongs")
        client_flags = flags & (proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES)
        sock.sendall(proto.U32.pack(client_flags))
        tls = self.target.tls
        if tls is None:
            self._negotiate(sock, client_flags)
            return sock
        if not client_flags & proto.FLAG_FIXED_NEWSTYLE:
            raise self._no_tls("it lacks fixed newstyle negotiation, which TLS needs")
        stream = self._starttls(sock, tls)
        try:
            self._negotiate(stream, client_flags)  # type: ignore[arg-type]
        except ssl.SSLError as exc:  # an alert: the server refused this client's certificate
            raise _tls.handshake_error(exc, self._server, tls.certificates) from None
        except ConnectionError:
            raise _tls.AuthenticationError(
                f"{self._server} hung up right after the TLS handshake, as a server does that "
                f"refuses the client's certificate: it wants a current {_tls.CLIENT_CERT} (with "
                f"{_tls.CLIENT_KEY}) signed by its CA in tls-certificates={tls.certificates}"
            ) from None
        return stream  # type: ignore[return-value]

    def _negotiate(self, sock: socket.socket, client_flags: int) -> None:
        """Haggle options up to transmission: ``NBD_OPT_GO``, else ``NBD_OPT_EXPORT_NAME``."""
        if client_flags & proto.FLAG_FIXED_NEWSTYLE and self._go(sock):
            return
        self._export_name(sock, no_zeroes=bool(client_flags & proto.FLAG_NO_ZEROES))

    def _starttls(self, sock: socket.socket, tls: ClientTLS) -> TLSSocket:
        """``NBD_OPT_STARTTLS`` first of all options, then the TLS handshake; never plaintext."""
        sock.sendall(proto.OPTION.pack(proto.IHAVEOPT, proto.OPT_STARTTLS, 0))
        reply, payload = _option_reply(sock, proto.OPT_STARTTLS)
        if reply & proto.REP_ERR:
            with contextlib.suppress(OSError):  # a soft disconnect
                sock.sendall(proto.OPTION.pack(proto.IHAVEOPT, proto.OPT_ABORT, 0))
            said = payload.decode(errors="replace") or f"error reply {reply - proto.REP_ERR}"
            raise self._no_tls(f"it answered NBD_OPT_STARTTLS: {said}")
        if reply != proto.REP_ACK:
            raise _protocol_error(f"option reply type {reply} to NBD_OPT_STARTTLS")
        address = self.target.address
        tcp = isinstance(address, tuple)
        context = _tls.client_context(
            tls.certificates, verify_peer=tls.verify_peer, check_hostname=tcp
        )
        stream = TLSSocket(sock, context, address[0] if tcp else None)
        stream.handshake(self._server, tls.certificates or "the system's CAs")
        return stream

    def _no_tls(self, why: str) -> _tls.AuthenticationError:
        return _tls.AuthenticationError(
            f"{self._server} does not offer TLS ({why}); an nbds URI never "
            "falls back to plaintext: use nbd:// or nbd+unix:// to connect without TLS"
        )

    def _go(self, sock: socket.socket) -> bool:
        """``NBD_OPT_GO`` asking for block sizes (and the description, to
        :attr:`refuse`); False when the server lacks it."""
        name = self.target.export.encode()
        wanted = [proto.INFO_BLOCK_SIZE] + [proto.INFO_DESCRIPTION] * (self.refuse is not None)
        data = (
            proto.U32.pack(len(name))
            + name
            + proto.U16.pack(len(wanted))
            + b"".join(proto.U16.pack(kind) for kind in wanted)
        )
        sock.sendall(proto.OPTION.pack(proto.IHAVEOPT, proto.OPT_GO, len(data)) + data)
        export: tuple[int, int] | None = None
        block_size: tuple[int, ...] = proto.DEFAULT_BLOCK_SIZE
        description = b""
        while True:
            reply, payload = _option_reply(sock, proto.OPT_GO)
            if reply == proto.REP_INFO:
                if len(payload) < 2:
                    raise _protocol_error("an NBD_REP_INFO without a type")
                (kind,) = proto.U16.unpack_from(payload)
                if kind == proto.INFO_EXPORT:
                    if len(payload) != proto.INFO_EXPORT_DATA.size:
                        raise _protocol_error(f"NBD_INFO_EXPORT of {len(payload)} bytes")
                    _, size, flags = proto.INFO_EXPORT_DATA.unpack(payload)
                    export = (size, flags)
                elif kind == proto.INFO_BLOCK_SIZE:
                    if len(payload) != proto.INFO_BLOCK_SIZE_DATA.size:
                        raise _protocol_error(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
                    block_size = proto.INFO_BLOCK_SIZE_DATA.unpack(payload)[1:]
                elif kind == proto.INFO_DESCRIPTION:
                    description = payload[2:]
            elif reply == proto.REP_ACK:
                if export is None:
                    raise _protocol_error("it accepted NBD_OPT_GO without NBD_INFO_EXPORT")
                if self.refuse is not None and description == self.refuse.encode():
                    raise OSError(
                        errno.EINVAL,
                        f"{self._server} describes itself as {self.refuse!r}: a copy there would "
                        "write the source it exports",
                    )
                self._enter_transmission(sock, export[0], export[1], block_size)
                return True
            elif reply == proto.REP_ERR_UNSUP:
                return False
            elif reply & proto.REP_ERR:
                # A soft disconnect: the spec's only polite way for a client to leave.
                with contextlib.suppress(OSError):
                    sock.sendall(proto.OPTION.pack(proto.IHAVEOPT, proto.OPT_ABORT, 0))
                raise self._refused(reply, payload)
            else:
                raise _protocol_error(f"option reply type {reply} to NBD_OPT_GO")

    def _refused(self, reply: int, payload: bytes) -> OSError:
        code = {
            proto.REP_ERR_UNKNOWN: errno.ENOENT,
            proto.REP_ERR_POLICY: errno.EACCES,
            proto.REP_ERR_TLS_REQD: errno.EACCES,
            proto.REP_ERR_SHUTDOWN: errno.ESHUTDOWN,
        }.get(reply, errno.EPROTO)
        message = payload.decode(errors="replace")
        if reply == proto.REP_ERR_TLS_REQD:
            message = f"{message or 'TLS is required'}; use an nbds:// or nbds+unix:// URI"
        message = message or f"error reply {reply - proto.REP_ERR}"
        return OSError(code, f"{self._server} refused export {self.target.export!r}: {message}")

    def _export_name(self, sock: socket.socket, no_zeroes: bool) -> None:
        name = self.target.export.encode()
        sock.sendall(proto.OPTION.pack(proto.IHAVEOPT, proto.OPT_EXPORT_NAME, len(name)) + name)
        try:
            size, flags = proto.EXPORT_NAME_REPLY.unpack(_recv(sock, proto.EXPORT_NAME_REPLY.size))
            if not no_zeroes:
                _recv(sock, proto.ZEROES_AFTER_EXPORT_NAME)
        except ConnectionError:
            raise ConnectionError(
                f"{self._server} closed the connection on NBD_OPT_EXPORT_NAME: "
                f"it has no export {self.target.export!r} or refuses it"
            ) from None
        self._enter_transmission(sock, size, flags, proto.DEFAULT_BLOCK_SIZE)

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
                sock.sendall(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_DISC, 0, 0, 0))
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
            raise StateError(f"{self._server} exports it read-only; write to a writable export")
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise self._range_error(offset, len(view))
        block = self.block_size[0]
        if block == 1:
            self._submit(proto.CMD_WRITE, offset, view)
            return
        start, end = self._aligned(offset, len(view))
        # The server takes only whole blocks. A partial block is read, patched
        # and written back; the lock keeps another write of this LUN to the
        # same block from landing in between and being undone (other clients
        # of the export are not excluded).
        with self._whole_blocks:
            if start == offset and end == offset + len(view):
                self._submit(proto.CMD_WRITE, offset, view)
                return
            span = memoryview(bytearray(end - start))
            self._submit(proto.CMD_READ, start, span[:block])
            if len(span) > block:
                self._submit(proto.CMD_READ, end - block, span[-block:])
            span[offset - start : offset - start + len(view)] = view
            self._submit(proto.CMD_WRITE, start, span)

    def flush(self) -> None:
        """Ask the server to make completed writes durable (``NBD_CMD_FLUSH``).

        Does nothing when the server does not offer FLUSH. Raises
        ``StateError`` when closed and ``OSError`` as the class docstring says.
        """
        if self.closed:
            raise self._closed_error()
        if self.flags & TransmissionFlag.SEND_FLUSH:
            self._submit(proto.CMD_FLUSH, 0, memoryview(b""))

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
            raise StateError(f"{self._server} exports it read-only; write to a writable export")
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
            self._submit(proto.CMD_WRITE_ZEROES, first, range(last - first), step - step % minimum)
        _zero_fill(self.write, last, end - last)

    def reconnect(self) -> None:
        """Open a new connection to the export, then leave the old one (``NBD_CMD_DISC``
        when it is still usable); also after the old one was lost, not after
        :meth:`close`. For a site that cuts the connections open before it protects
        or rolls back the export (an agent's fence, :mod:`isc.agent`): call it after
        the site's answer, while no I/O of this LUN runs.

        Raises ``StateError`` after :meth:`close`, or when the export's size is not
        the one the LUN had (the old connection is kept); ``OSError`` as opening
        the LUN does (the old connection is kept).
        """
        with self._cond:
            if self._shut:
                raise self._closed_error()
        size = self.size
        old = (self.flags, self.block_size, self._request_size)
        sock = self._connect()
        try:
            with _within(sock, self.timeout, f"{self._server} did not finish its handshake"):
                sock = self._handshake(sock)
            if self.size != size:
                raise StateError(
                    f"{self._server} now exports {self.size} bytes, not {size}: "
                    "the export was replaced; open a new LUN"
                )
        except BaseException:
            sock.close()
            self.size, (self.flags, self.block_size, self._request_size) = size, old
            raise
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)
            if self._shut:  # closed meanwhile
                sock.close()
                raise self._closed_error()
            self._release_locked()
            self._sock, self._failure = sock, None

    def close(self) -> None:
        """Disconnect (``NBD_CMD_DISC``); later I/O raises ``StateError``. Idempotent.

        Waits for calls of other threads still running (the LUN interface
        says ``close`` does not race with I/O).
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)
            self._shut = True
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
            self._submit(proto.CMD_READ, offset, view)
            return
        span = memoryview(bytearray(end - start))
        self._submit(proto.CMD_READ, start, span)
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
        if command == proto.CMD_FLUSH:
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
        header = proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, command, handle, offset, len(piece))
        sock = self._sock
        assert sock is not None  # a busy LUN keeps its socket
        try:
            _send(sock, header, piece if command == proto.CMD_WRITE else None)
        except OSError as exc:
            raise self._break(exc) from exc

    def _receive_reply(self) -> None:
        """Take one reply off the wire and hand it to its call (the caller is the reader)."""
        sock = self._sock
        assert sock is not None  # a busy LUN keeps its socket
        try:
            magic, error, handle = proto.REPLY.unpack(_recv(sock, proto.REPLY.size))
            if magic == proto.STRUCTURED_REPLY_MAGIC:
                raise _protocol_error("it sent a structured reply, which was never negotiated")
            if magic != proto.SIMPLE_REPLY_MAGIC:
                raise _protocol_error(f"a reply starts {magic:#x}")
            with self._cond:
                entry = self._inflight.get(handle)
                if entry is None:
                    raise _protocol_error(f"a reply for handle {handle}, which is not in flight")
                call, at, piece = entry
                payload = call.command == proto.CMD_READ and not error
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
                code = proto.WIRE_TO_ERRNO.get(error, errno.EINVAL)
                name = proto.CMD_NAMES[call.command]
                where = f" [{at}, {at + len(piece)})" if call.command != proto.CMD_FLUSH else ""
                call.error = OSError(
                    code, f"{name}{where} failed at {self._server}: {os.strerror(code)}"
                )
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
                f"no answer from {self._server} within {self.timeout} s; the LUN is closed"
            )
        if exc.errno == errno.EPROTO:
            return OSError(errno.EPROTO, f"{exc.strerror}; the LUN is closed")
        why = f" ({exc.strerror})" if exc.strerror else ""  # none for an end of stream
        return ConnectionError(f"{self._server} closed the connection{why}; the LUN is closed")

    def _release_locked(self) -> None:
        """Close the socket (the caller holds ``_cond``, no call runs); DISC first if it can."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._failure is None or self._failure.errno == errno.ESHUTDOWN:
            with contextlib.suppress(OSError):  # a server already gone needs no goodbye
                sock.sendall(
                    proto.REQUEST.pack(
                        proto.REQUEST_MAGIC, 0, proto.CMD_DISC, next(self._handles), 0, 0
                    )
                )
        sock.close()


class _Call:
    """One LUN call's requests: how many are in flight, and the first error."""

    __slots__ = ("command", "error", "pending")

    def __init__(self, command: int) -> None:
        self.command = command
        self.pending = 0
        self.error: OSError | None = None
