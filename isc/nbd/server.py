"""The NBD server: :class:`NBDServer` exports a LUN to any number of clients.

It serves from an asyncio event loop. Reads and writes up to :data:`_INLINE`
bytes, the pieces of larger reads, block status from bitmaps read already and
the frozen export's TRIMs run on the loop's thread where the LUN is a file, a
device or memory (cheaper than a thread hand-off while the LUN answers from
memory; one that waits for a slow device makes the others wait); all other
export I/O runs in a thread pool, so a slow request of that kind stalls no
other client. What each export serves (its data, commands and
metadata contexts) is :mod:`isc.nbd.export`'s; here are the sockets, the
handshake, the checks of every request and the limits.

What it speaks
--------------
- the fixed newstyle handshake, with ``NBD_FLAG_NO_ZEROES``;
- options ``NBD_OPT_GO`` and ``NBD_OPT_INFO`` (information ``NBD_INFO_EXPORT``,
  ``NBD_INFO_NAME``, ``NBD_INFO_BLOCK_SIZE``), ``NBD_OPT_EXPORT_NAME``,
  ``NBD_OPT_LIST``, ``NBD_OPT_ABORT``, ``NBD_OPT_STARTTLS`` (TLS, below),
  ``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_LIST_META_CONTEXT`` and
  ``NBD_OPT_SET_META_CONTEXT`` (QEMU's query rules: with no query LIST
  lists every context, ``base:``, ``qemu:`` and ``qemu:dirty-bitmap:`` list
  a namespace and select nothing, an exact name selects its context, other
  queries are ignored; both need structured replies first, and a SET counts
  only for the export the client then enters); every other option gets
  ``NBD_REP_ERR_UNSUP``;
- commands READ (``DF``), WRITE, FLUSH, TRIM, CACHE (a no-op), WRITE_ZEROES
  (``NO_HOLE``, ``FAST_ZERO``; any length within the export), BLOCK_STATUS
  (``REQ_ONE``) and DISC, FUA on every command when the export offers it;
- with structured replies: READ as ``OFFSET_DATA`` chunks and, where the
  export knows the range reads as zeros, ``OFFSET_HOLE`` chunks; errors as
  ``ERROR`` chunks with a message; other successes as simple replies.

Transmission flags are the export's (:mod:`isc.nbd.export`): only what is
implemented is advertised. Request errors, per the spec: EINVAL for an
unknown command, a flag not valid for the command or not advertised, a
command not advertised, a READ or WRITE over :data:`MAX_BLOCK`, a read, trim,
cache or block status past the end, a BLOCK_STATUS of length 0 or without
a negotiated context, a FLUSH with a nonzero offset or length; ENOSPC for a
write or zeroes past the end; EPERM for a write, zeroes or trim the export
refuses; ENOTSUP for a FAST_ZERO that would not be fast; the export's own
failures as EIO (or ENOSPC, EPERM ... when its ``OSError`` says so). All of
these leave the connection usable. A WRITE longer than :data:`MAX_BLOCK` is
answered EINVAL and the connection dropped, since its payload cannot be
skipped cheaply; a bad request magic drops the connection.

A request's payload is read whole before the export is touched, so a client
that vanishes mid-request leaves no partial write. Each connection receives
into a staging buffer of :data:`_STAGING` bytes, where request headers are
parsed in place, and a WRITE's payload, once the WRITE is admitted, straight
into the request's own buffer (one copy from the socket; :class:`_Channel`). A READ's reply is read
and sent in pieces of :data:`_PIECE` bytes, one piece sent once the
connection's unsent replies are down to :data:`_REPLY_BACKLOG` and the next
read only then. Its first piece is read before anything is sent, so a
failure there is an ordinary error reply; a later failure ends a structured
reply with an error chunk after the data sent, and drops the connection
where the data of a simple reply or of a ``DF`` chunk has begun (the spec's
hard disconnect). Every other reply is built whole before it is sent.
Replies to one connection's requests may come out of order, as the spec
allows; one reply is sent at a time, and the small replies of requests run
on the loop's thread wait until the requests the client has sent already are
run, to go out in one ``send``; a READ run there sends each chunk's header and
data as one buffer. The frozen export's requests (a pull's: a *background*
export, ``view.background``) let the other connections' go first: each waits
up to :data:`_YIELDS` turns of the loop while another connection has a request
arriving (its socket readable), staged but not served, or small replies held
back, so a backup uses the gaps between the host's requests instead of
delaying them, and still moves on while the host keeps the loop busy.

Against clients that misbehave the server keeps limits: at most
``max_clients`` connections (:data:`MAX_CLIENTS`; one more is closed at
once, with a log line), ``handshake_timeout`` seconds from connecting to
transmission (:data:`HANDSHAKE_TIMEOUT`, TLS included), ``payload_timeout``
seconds for a WRITE's payload to arrive once it holds part of ``max_data``
(:data:`PAYLOAD_TIMEOUT`; a client that stalls or trickles it is dropped, with
a log line, and what it held given back, its payload written nowhere; a small
WRITE run on the loop's thread holds nothing but its connection and has no
such bound), ``max_requests``
requests in flight outside the loop's thread (:data:`MAX_REQUESTS`; 16 per
connection), and ``max_data`` bytes of WRITE payloads and READ and block
status replies held at once (:data:`MAX_DATA`; :data:`_CONNECTION_DATA` per
connection): a request beyond them waits, first come first served, and its
connection is not read from meanwhile. A client that reads no replies holds
one piece of a large READ (a small one's whole reply, 16 at most) and
:data:`_REPLY_BACKLOG` bytes of unsent replies (twice as much under TLS, as
ciphertext) and is no longer read from, while the others go on. Each
connection also holds up to :data:`_STAGING` bytes of requests it has not
served yet (it stops reading when they fill it), and under TLS a buffer of
256 KiB. So the server's memory beyond its own stays within ``max_data`` plus
about 1.6 MiB per connection, whatever the clients do
(:attr:`NBDServer.held` and :attr:`NBDServer.peak_held` count the first).

TLS (the spec's "TLS support"; credentials in :mod:`isc.tls`): the server's
:class:`~isc.tls.ServerTLS` mode is nbdkit's: without one it answers
``NBD_OPT_STARTTLS`` with ``NBD_REP_ERR_UNSUP`` (NOTLS); "on" lets each
client choose; "require" (FORCEDTLS) answers every option before TLS but
``NBD_OPT_STARTTLS`` and ``NBD_OPT_ABORT`` with ``NBD_REP_ERR_TLS_REQD`` and
drops a client that sends ``NBD_OPT_EXPORT_NAME`` or lacks fixed newstyle.
With ``verify_peer`` a client needs a certificate signed by the server's
CA. A failed handshake drops that client with a log line. Structured
replies and metadata contexts negotiated before ``NBD_OPT_STARTTLS`` are
forgotten, as the spec asks.

Unless TLS is required with ``verify_peer``, or ``insecure``, the server
serves only its own user (and root), also on TCP loopback, which every user
of the machine reaches: before the handshake it asks the kernel who owns
each client's socket (:func:`isc.auth.stranger`, about 15 µs a connection)
and closes a client of another user, or one it cannot tell (another host's),
with a log line naming it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import functools
import itertools
import logging
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import quote

from isc.auth import stranger
from isc.control import _private_unix_socket
from isc.errors import ParameterError, StateError
from isc.lun import LUN
from isc.nbd import proto
from isc.nbd.export import (
    MAX_EXTENTS,
    FrozenExport,
    LUNExport,
    MarkEnded,
    NotFast,
    SessionLUN,
    Unavailable,
    match_contexts,
)
from isc.nbd.proto import MAX_BLOCK, NBD_PORT, TransmissionFlag
from isc.tls import ServerTLS, describe

log = logging.getLogger(__name__)

_SERVER_BLOCK_SIZE = (1, 4096, MAX_BLOCK)


class _Violation(Exception):
    """A client broke the protocol in a way that leaves the stream unusable."""


class _Stalled(Exception):
    """A client did not send what it had begun within the server's bound."""


_SERVER_IN_FLIGHT = 16  # requests one connection may have in the thread pool at once
_CONNECTION_DATA = MAX_BLOCK
"""Bytes of WRITE payloads and READ and block status replies one connection may hold in
the server at once: one request of the largest size, or many smaller ones (nbdcopy keeps
16 MiB in flight)."""
MAX_CLIENTS = 64
"""The connections an :class:`NBDServer` serves at once unless told otherwise."""
MAX_DATA = 4 * MAX_BLOCK
"""Bytes of WRITE payloads and READ and block status replies all connections of an
:class:`NBDServer` hold at once, unless told otherwise (``max_data``; at least
:data:`~isc.nbd.proto.MAX_BLOCK`, so that the largest WRITE fits)."""
MAX_REQUESTS = 128
"""Requests all connections of an :class:`NBDServer` have in flight outside the event
loop's thread at once, unless told otherwise (``max_requests``)."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client has to reach transmission, TLS included (``NBDServer``'s default)."""
PAYLOAD_TIMEOUT = 60.0
"""Seconds a WRITE's payload has to arrive whole once it holds part of ``max_data``
(``NBDServer``'s default): a 32 MiB payload needs about 0.6 MB/s."""
FENCE_SECONDS = 5.0
"""Seconds :meth:`NBDServer.fence` waits for the requests running in the thread pool
unless told otherwise (read at each call)."""


class _Budget:
    """Bytes to share: takers wait, first come first served, until enough are given back."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.peak = 0
        """The most bytes taken at once."""
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def take(self, count: int) -> None:
        if not self._waiting and self.free >= count:
            self.free -= count
        else:
            taken = asyncio.get_running_loop().create_future()
            self._waiting.append((count, taken))
            try:
                await taken
            except asyncio.CancelledError:
                if taken.cancelled():
                    with contextlib.suppress(ValueError):
                        self._waiting.remove((count, taken))
                    self._grant()
                else:  # granted as it was cancelled
                    self.give(count)
                raise
        self.peak = max(self.peak, self.total - self.free)

    def give(self, count: int) -> None:
        self.free += count
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            count, taken = self._waiting.popleft()
            if not taken.cancelled():
                self.free -= count
                taken.set_result(None)


class _Channel(asyncio.BufferedProtocol):
    """One client's connection: what it sends received into buffers, its replies sent.

    Bytes arrive in a staging buffer of :data:`_STAGING` bytes, from which the request
    headers are parsed in place and small payloads copied out; once a request's payload
    is asked for (:meth:`receive_into`), what is not staged yet is received straight
    into the request's own buffer, one copy from the socket (asyncio's stream reader
    made three or four: into a new ``bytes``, into its buffer, out of it, into one
    buffer for a large payload). A payload used at once (a WRITE run on the loop's
    thread) is lent where it is staged, or received into one buffer the connection
    reuses (:meth:`borrow`). After a large payload the next header is received alone,
    as another large payload likely follows it. Reading stops while the staging buffer
    is full and nobody waits for more, so a client whose requests wait for the
    server's budgets is not read from. Writing mirrors
    ``asyncio.StreamWriter``'s ``write``/``drain``, with the transport's flow control.
    """

    def __init__(self, server: NBDServer) -> None:
        self._server = server
        self.transport: Any = None  # asyncio's Transport, or its TLS transport after STARTTLS
        self.loop: asyncio.AbstractEventLoop | None = None  # asking for it costs a getpid()
        self._staging = bytearray(_STAGING)
        self._staged = memoryview(self._staging)
        self._start = 0  # staged bytes not consumed yet: [_start, _end)
        self._end = 0
        self._target: memoryview | None = None  # the part of a payload still to receive
        self._scratch = bytearray()  # the buffer borrow() lends, grown as needed
        self._large = False  # the last payload was large: receive no more than a header ahead
        self._wanted = 0  # staged bytes the waiter waits for
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # reading
        self._unpaused: asyncio.Future[None] | None = None  # writing: set while paused
        self._eof = False
        self._tls = False
        self.closed: asyncio.Future[None] | None = None  # done once the connection is lost
        self.task: asyncio.Task[None] | None = None  # NBDServer._handle, serving it

    # -- asyncio's callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.loop = loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        self.task = loop.create_task(self._server._handle(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target
        if self._start:
            size = self._end - self._start
            self._staged[:size] = self._staged[self._start : self._end]
            self._start, self._end = 0, size
        if self._large and self._end - self._start < self._wanted:
            # Another large payload is likely next: its header alone, so that the payload
            # goes straight to its buffer, not here first (and fills no staging buffer).
            return self._staged[self._end : self._start + self._wanted]
        return self._staged[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            # Let go of it once full: Python 3.11's TLS transport asks for a buffer
            # again at once and takes an empty one for the end of the stream.
            self._target = self._target[nbytes:] or None
            ready = self._target is None
        else:
            self._end += nbytes
            ready = self._end - self._start >= self._wanted
            if self._end == _STAGING and self._start == 0 and not self._paused:
                self._paused = True  # full: read more once something waits for it
                self.transport.pause_reading()
        if ready:
            self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Stay open to answer what the client sent (the spec: requests in flight are
        # answered); over TLS asyncio closes at the peer's close_notify anyway.
        return not self._tls

    def pause_writing(self) -> None:
        assert self.loop is not None
        self._unpaused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._unpaused is not None:
            self._unpaused.set_result(None)
            self._unpaused = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._eof = True
        self._wake()
        self.resume_writing()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def pending(self) -> bool:
        """Whether a whole request header is staged, not yet served."""
        return self._end - self._start >= proto.REQUEST.size

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    # -- receiving
    async def _wait(self, wanted: int, expected: int) -> None:
        """Wait for more bytes: ``wanted`` staged, or the payload target filled
        (``IncompleteReadError`` of ``expected`` bytes when the client is gone)."""
        if self._eof:
            raise asyncio.IncompleteReadError(b"", expected)
        self._wanted = wanted
        assert self.loop is not None
        self._waiter = self.loop.create_future()
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._wanted = 0

    async def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """The next ``layout.size`` bytes, unpacked (parsed where they are staged)."""
        while self._end - self._start < layout.size:
            await self._wait(layout.size, layout.size)
        fields = layout.unpack_from(self._staging, self._start)
        self._start += layout.size
        return fields

    async def receive(self, length: int) -> bytearray:
        """The next ``length`` bytes, in a buffer of their own."""
        if self._end - self._start >= length:
            data = self._staging[self._start : self._start + length]
            self._start += length
            return data
        data = bytearray(length)
        await self.receive_into(memoryview(data))
        return data

    async def borrow(self, length: int) -> memoryview:
        """The next ``length`` bytes in a buffer lent until the next call that receives:
        where they are staged, else in a buffer the channel reuses (for a payload used at
        once, as a WRITE run on the loop's thread: no buffer to allocate and fill)."""
        if self._end - self._start >= length:
            data = self._staged[self._start : self._start + length]
            self._start += length
            return data
        if len(self._scratch) < length:
            self._scratch = bytearray(length)
        data = memoryview(self._scratch)[:length]
        await self.receive_into(data)
        return data

    async def receive_into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` with the next bytes: what is staged, then straight from the socket."""
        self._large = len(buffer) >= _STAGING // 2
        staged = min(len(buffer), self._end - self._start)
        buffer[:staged] = self._staged[self._start : self._start + staged]
        self._start += staged
        if staged < len(buffer):
            self._target = buffer[staged:]
            try:
                while self._target is not None:
                    await self._wait(0, len(buffer))
            finally:
                self._target = None

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Go on over TLS (the server's side of the handshake), within ``timeout`` s."""
        if self._end > self._start:
            raise _Violation("data after NBD_OPT_STARTTLS before the TLS handshake")
        assert self.loop is not None
        plain = self.transport
        self.transport = await self.loop.start_tls(
            plain, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        self._tls = True
        if self._paused:
            # Data that came with the client's last handshake message filled the staging
            # buffer before the TLS transport was ours, and stopped the plaintext one:
            # stop the TLS transport instead, which _wait() resumes. The plaintext one's
            # stop was ours alone: asyncio's TLS layer finished the handshake within one
            # read of at most 256 KiB, its high-water mark, so it had not stopped it too.
            plain.resume_reading()
            self.transport.pause_reading()

    # -- sending
    def write(self, data: Any) -> None:
        self.transport.write(data)

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def get_extra_info(self, name: str) -> Any:
        return self.transport.get_extra_info(name)

    async def drain(self) -> None:
        """Wait until the transport takes more (``ConnectionResetError`` once it is lost)."""
        if self.transport.is_closing():
            await asyncio.sleep(0)  # lets connection_lost run
        if self._unpaused is not None:
            await asyncio.shield(self._unpaused)
        assert self.closed is not None
        if self.closed.done():
            raise ConnectionResetError("the connection was lost")

    def close(self) -> None:
        if self._paused:
            # asyncio's TLS layer, having read the client's end while reading was
            # paused, finishes closing only once reading goes on.
            self._paused = False
            self.transport.resume_reading()
        self.transport.close()

    async def wait_closed(self) -> None:
        assert self.closed is not None
        await self.closed


class _Connection:
    """One client's share of the server in transmission: its requests in flight, the data
    it holds, and the order of its replies (one reply is sent at a time)."""

    def __init__(self, client: _Client, channel: _Channel) -> None:
        self.client = client
        self.channel = channel
        self.slots = asyncio.Semaphore(_SERVER_IN_FLIGHT)
        self.budget = _Budget(_CONNECTION_DATA)
        self.sending = asyncio.Lock()
        self.requests: set[asyncio.Task[None]] = set()
        self.later: list[bytes] = []  # small replies to send together (NBDServer._later)
        self.fd = channel.get_extra_info("socket").fileno()
        self.fenced = False  # cut by NBDServer.fence: none of its requests starts any more
        self.running = 0  # its requests running in the thread pool (NBDServer._fencing)


_INLINE = 256 << 10
"""READs and WRITEs up to this size without FUA run on the event loop's thread, in
the order they arrive, not in the pool: the hand-off to a worker thread and back
costs more than such a request itself while the LUN answers from memory (4 KiB
writes at queue depth 8 ran at 16 000/s through the pool, 100 000/s inline;
nbdcopy moving 1 GiB in 256 KiB requests cost the server 1.4 CPU seconds through
the pool, 0.6 inline, qemu-nbd 0.5, both ways). The price: while one of them
waits for a slow device, the other clients wait too. A FUA write (it waits for a
flush), larger writes and every request to a LUN that is not a file, a device or
memory (an NBD source, whose server could take seconds) use the pool; a larger
READ of such a LUN is read here too, piece by piece (:data:`_PIECE`). So does a
BLOCK_STATUS, unless the bitmaps it reports were read whole already since they
last changed (``status_is_cheap``: ``nbdinfo --map`` of a 1 TiB bitmap took
0.41 s through the pool, 0.14 s inline, qemu-nbd 0.10 s)."""
_YIELDS = 16
"""Turns of the event loop a background request (the frozen export's) lets the
foreground's ready requests go first, at most (:meth:`NBDServer._after_foreground`).
Beside a host writing 4 KiB at queue depth 8, three interleaved rounds at load 6-8:
with 8 turns its writes kept 76-80% of their idle rate during pulls of 1% of 1 GiB
(pulls of 210-220 ms), with 12 80-83% (195-236 ms), with 16 81-98% (236-268 ms) and
fewer host writes lost per pull; 32 made pulls of 406-560 ms. A pull beside a host that
never pauses gets one request served per this many turns."""
_SMALL_REPLY = 4 << 10
"""A reply of one buffer up to this size, to a request run on the loop's thread, waits
to go out with the others of its burst (:meth:`NBDServer._later`); a larger one (a READ's
data) goes out at once, not copied into their joint buffer."""
_TLS_REQUIRED = b"TLS is required: start it with NBD_OPT_STARTTLS"
_PIECE = _INLINE
"""A READ reply is read and sent in pieces of at most this many bytes, each sent once the
connection's unsent replies are down to :data:`_REPLY_BACKLOG`."""
_REPLY_BACKLOG = 64 << 10
"""Unsent reply bytes of one connection (its transport's write buffer, ciphertext under
TLS) after which no more of its replies is made or sent until its client reads."""
_UNIX_SEND_BUFFER = 1 << 20
"""The send buffer asked of the kernel for a client on a Unix socket (``SO_SNDBUF``;
Linux's default of 208 KiB is less than one 256 KiB READ reply, which then left a part
in the transport to send later: 20% more server CPU for nbdcopy's reads). TCP sizes its
own (``tcp_wmem``, up to 4 MiB); either is kernel memory, outside the limits here."""
_STAGING = 64 << 10
"""Bytes of requests a connection receives ahead of the one being served (headers, small
payloads, the start of a larger one) before it stops reading; a payload's rest goes
straight from the socket into the request's own buffer (:class:`_Channel`)."""
_WRITES = (proto.CMD_WRITE, proto.CMD_WRITE_ZEROES, proto.CMD_TRIM)
_PAST_THE_END = {proto.CMD_WRITE: errno.ENOSPC, proto.CMD_WRITE_ZEROES: errno.ENOSPC}
_ADVERTISED = {
    proto.CMD_FLUSH: int(TransmissionFlag.SEND_FLUSH),
    proto.CMD_TRIM: int(TransmissionFlag.SEND_TRIM),
    proto.CMD_CACHE: int(TransmissionFlag.SEND_CACHE),
    proto.CMD_WRITE_ZEROES: int(TransmissionFlag.SEND_WRITE_ZEROES),
}
# The transmission flags as ints: checked for every request, where an operation on the
# IntFlag costs a microsecond (3 µs a request, a fifth of a small inline WRITE's cost).
_SEND_FUA, _SEND_DF, _SEND_FAST_ZERO, _READ_ONLY = (
    int(flag)
    for flag in (
        TransmissionFlag.SEND_FUA,
        TransmissionFlag.SEND_DF,
        TransmissionFlag.SEND_FAST_ZERO,
        TransmissionFlag.READ_ONLY,
    )
)


def _wire_error(exc: BaseException, writes: bool) -> int:
    """The spec's error value for an exception an export raised."""
    if isinstance(exc, NotFast):
        return errno.ENOTSUP
    if isinstance(exc, MarkEnded):
        return errno.EIO
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


class _Client:
    """What one connection negotiated."""

    def __init__(self, peer: object) -> None:
        self.peer = peer
        self.structured = False
        self.meta: tuple[Any, list[int]] | None = None  # the last SET: its export, contexts
        self.view: Any = None  # what transmission serves (an export's attach())
        self.flags = int(TransmissionFlag.HAS_FLAGS)  # the export's, as an int
        self.contexts: list[int] = []  # selected contexts of the view (id = index + 1)

    def forget(self) -> None:
        """TLS started: what was negotiated before it does not count (the spec)."""
        self.structured = False
        self.meta = None


class NBDServer:
    """Exports a LUN over NBD to any number of clients.

    ``lun`` is any object with the LUN interface, exported as ``name`` (the
    default export "" reaches it too; :class:`~isc.nbd.export.LUNExport`).
    Every WRITE goes through ``lun.write``, WRITE_ZEROES and TRIM through
    ``lun.write_zeroes`` where it has one (TRIM is offered only then) and
    FLUSH or FUA through ``lun.flush``: export a :class:`SessionLUN` to make
    them tracked host writes. A :class:`SessionLUN` is also exported as
    ``name@frozen`` while its session is marked
    (:class:`~isc.nbd.export.FrozenExport`, pull mode; :attr:`frozen`).
    ``readonly`` (also implied by a true ``lun.readonly``) advertises
    ``NBD_FLAG_READ_ONLY`` and answers writes EPERM. ``workers`` threads run
    the I/O of all clients but small READs and WRITEs, which run on the server's
    event loop thread in the order they arrive (:data:`_INLINE`). ``tls``
    (:class:`~isc.tls.ServerTLS`) offers or requires TLS (the module
    docstring); without it the server speaks plaintext only. ``max_clients``,
    ``handshake_timeout``, ``payload_timeout``, ``max_requests`` and ``max_data`` are the limits
    against misbehaving clients (the module docstring). Without ``tls`` required with
    ``verify_peer`` it serves only clients of its own user (and root), unless ``insecure``.
    ``description`` is the ``NBD_INFO_DESCRIPTION`` of ``name`` for a client that asks
    (``isc serve`` says whose source it writes: :func:`~isc.nbd.proto.own_export`).

    Serve with ``await serve(...)``/``serve_unix(...)`` in a running event
    loop, or from a background thread with :meth:`start`/:meth:`start_unix`;
    :meth:`close` ends either. A server serves once. Raises
    ``ParameterError`` for a name or description over 4096 UTF-8 bytes or holding NUL, for
    ``workers < 1``, or for a limit out of its range. The module docstring
    lists what it speaks and how it answers bad requests.
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
        payload_timeout: float = PAYLOAD_TIMEOUT,
        max_data: int = MAX_DATA,
        max_requests: int = MAX_REQUESTS,
        insecure: bool = False,
        description: str = "",
    ):
        for what, text in (("an export name", name), ("a description", description)):
            if not isinstance(text, str) or "\0" in text or len(text.encode()) > proto.MAX_STRING:
                raise ParameterError(
                    f"{what} is a str without NUL of at most {proto.MAX_STRING} UTF-8 bytes, "
                    f"got {text!r:.80}"
                )
        if workers < 1:
            raise ParameterError(f"workers must be >= 1, got {workers}")
        for what, value, least in (
            ("max_clients", max_clients, 1),
            ("max_requests", max_requests, 1),
            ("max_data", max_data, MAX_BLOCK),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ParameterError(f"{what} must be an integer >= {least}, got {value!r}")
        for what, seconds in (
            ("handshake_timeout", handshake_timeout),
            ("payload_timeout", payload_timeout),
        ):
            if not seconds > 0:
                raise ParameterError(f"{what} must be > 0 seconds, got {seconds}")
        self.max_clients = max_clients
        """Connections served at once; more are refused with a log line."""
        self.handshake_timeout = handshake_timeout
        """Seconds a client has from connecting to entering transmission."""
        self.payload_timeout = payload_timeout
        """Seconds a WRITE's payload has to arrive once it holds part of ``max_data``."""
        self.max_requests = max_requests
        """Requests in flight outside the loop's thread, all connections together."""
        self._data = _Budget(max_data)
        self._slots = asyncio.Semaphore(max_requests)
        self.lun = lun
        self.name = name
        self.description = description
        self.tls = tls
        """How clients get TLS (None: not at all)."""
        self.anyone = insecure or (tls is not None and tls.required and tls.verify_peer)
        """Whether clients of other users (and hosts) are served too."""
        self.readonly = bool(readonly or getattr(lun, "readonly", False))
        self.export = LUNExport(lun, name, self.readonly)
        """The export of ``lun`` (:class:`~isc.nbd.export.LUNExport`)."""
        self.frozen = FrozenExport(lun, name) if isinstance(lun, SessionLUN) else None
        """The point-in-time export of a :class:`SessionLUN`'s session, else None."""
        self._exports: dict[str, Any] = {"": self.export, name: self.export}
        if self.frozen is not None:
            self._exports[self.frozen.name] = self.frozen
        self.address: tuple[str, int] | str | None = None
        """``(host, port)`` or the Unix socket path once listening, else None."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="isc-nbd"
        )
        self._clients = itertools.count(1)
        self._connections: set[asyncio.Task[None]] = set()
        self._foreground: set[_Connection] = set()  # in transmission, not to a background view
        self._arriving = select.poll()  # the sockets of self._foreground, to see requests come
        self._requests: set[asyncio.Task[None]] = set()
        # What a fence cuts: each connection in transmission, and after it while the
        # thread pool still holds a request of it (a request refers to its connection).
        self._transmitting: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._fencing = threading.Condition()  # guards _Connection.fenced and .running
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
    def held(self) -> int:
        """Bytes of WRITE payloads and READ and block status replies held now, all clients."""
        return self._data.total - self._data.free

    @property
    def peak_held(self) -> int:
        """The most bytes :attr:`held` at once so far; never over ``max_data``."""
        return self._data.peak

    @property
    def flags(self) -> TransmissionFlag:
        """The transmission flags of ``name`` for a client without structured replies."""
        return self.export.flags(structured=False)

    @property
    def uri(self) -> str:
        """An NBD URI that reaches the export; ``StateError`` before it listens."""
        return self.uri_of(self.name)

    def uri_of(self, export: str) -> str:
        """An NBD URI that reaches export ``export`` of this server (``StateError`` before
        it listens)."""
        address = self.address
        if address is None:
            raise StateError(f"{self!r} is not listening; start or serve it first")
        name = quote(export, safe="")
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
        loop = asyncio.get_running_loop()
        await self._serve(functools.partial(loop.create_server, self._channel, host, port))

    async def serve_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a Unix socket at ``path`` and serve until :meth:`close`.

        The socket is made with mode 0600 in a directory that must belong to
        this user and be writable by no one else, so only this user reaches
        it (:class:`~isc.control.ControlServer`'s rule: ``ParameterError``
        naming the directory or the file in the way otherwise). A stale
        socket at ``path`` is replaced; the socket is removed on close.
        Raises as :meth:`serve`.
        """
        where = os.path.abspath(path)

        async def listen() -> asyncio.Server:
            sock = _private_unix_socket(where)
            loop = asyncio.get_running_loop()
            return await loop.create_unix_server(self._channel, sock=sock)

        await self._serve(listen, where)

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

    async def _serve(
        self, listen: Callable[[], Awaitable[asyncio.Server]], path: str | None = None
    ) -> None:
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
        self.address = path if path is not None else (name[0], name[1])
        self._ready.set()
        log.info(
            "%r: exporting (limits: %d clients, %d bytes of data held, %d requests in flight)",
            self,
            self.max_clients,
            self._data.total,
            self.max_requests,
        )
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

    # -- fencing ------------------------------------------------------------------------------
    def fence(self, timeout: float | None = None) -> str | None:
        """Cut off every connection open now and wait for what it left running.

        For a site about to protect or roll back the LUN: no write of a client that
        was there before (one killed with its writes still in the server) may land
        after this returns. Every connection open now, to any export of this
        server, is dropped (its client sees a lost connection, never an answer to a
        request not carried out); its requests not yet started are dropped
        unanswered, a WRITE whose payload was arriving too; those running (in
        the thread pool) are waited for, up to ``timeout`` seconds
        (:data:`FENCE_SECONDS` by default). Connections opened meanwhile or later
        are served as usual. Returns None once nothing of the connections cut runs
        any more (at once when the server does not serve), else why not, in one
        line: a request still running at the timeout (a hung file) may still land.
        Call it from any thread but the server's own.
        """
        timeout = FENCE_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + timeout
        loop = self._loop
        if loop is None:
            return None  # it never served
        try:
            cutting = asyncio.run_coroutine_threadsafe(self._cut(), loop)
        except RuntimeError:  # the loop has ended: so have its requests
            return None
        try:
            cut = cutting.result(timeout)
        except concurrent.futures.TimeoutError:
            cutting.cancel()
            return (
                f"its connections could not be cut within {timeout:g} s: a request holds "
                "its event loop (its LUN does not answer)"
            )
        with self._fencing:
            if not self._fencing.wait_for(
                lambda: not any(c.running for c in cut), deadline - time.monotonic()
            ):
                running = sum(c.running for c in cut)
                return (
                    f"{running} request(s) of the connections cut still ran after "
                    f"{timeout:g} s (its LUN does not answer) and may still land"
                )
        log.info("%r: fenced: %d connection(s) cut", self, len(cut))
        return None

    async def _cut(self) -> list[_Connection]:
        """The loop's part of :meth:`fence`: flag the connections in transmission or with
        requests in the thread pool (none of those starts after this: :meth:`_run_unfenced`)
        and drop every connection (its task ends at its next step: nothing it received is
        run). Returns the connections flagged, whose running requests the fence waits for."""
        with self._fencing:
            cut = list(self._transmitting)
            for connection in cut:
                connection.fenced = True
        for connection in cut:
            connection.channel.transport.abort()
        for task in self._connections:
            task.cancel()
        return cut

    def _run_unfenced(self, connection: _Connection, *request: Any) -> list[Any] | None:
        """:meth:`_run` in the thread pool, unless a fence cut the connection (then None:
        the request is dropped unanswered); counted while it runs, for the fence."""
        with self._fencing:
            if connection.fenced:
                return None
            connection.running += 1
        try:
            return self._run(connection.client, *request)
        finally:
            with self._fencing:
                connection.running -= 1
                self._fencing.notify_all()

    # -- one connection ---------------------------------------------------------------------
    def _channel(self) -> _Channel:
        """A new connection's protocol; it calls :meth:`_handle` once connected."""
        return _Channel(self)

    async def _handle(self, channel: _Channel) -> None:
        """Serve one client (:meth:`_serve_client`) once it is connected."""
        peer = channel.get_extra_info("peername") or f"client {next(self._clients)}"
        sock = channel.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SEND_BUFFER)
        try:
            await self._serve_client(channel, peer)
        except asyncio.CancelledError:
            if not self._closed:
                raise
            # _shutdown cancelled it, amid the client's requests or while its
            # connection closes. Close it now: a TLS connection waits for the
            # peer's close_notify, and its socket would outlive the server.
            # Then end normally: nobody awaits this task.
            channel.transport.abort()
            log.info("%r: disconnected %s: the server is closing", self, peer)

    async def _serve_client(self, channel: _Channel, peer: object) -> None:
        task = asyncio.current_task()
        assert task is not None
        if not self.anyone:
            refusal = stranger(
                channel.get_extra_info("socket"), "give it --tls=require --tls-verify-peer"
            )
            if refusal is not None:
                log.warning("%r: refusing %s: %s", self, peer, refusal)
                channel.close()
                return
        if len(self._connections) >= self.max_clients:
            log.warning(
                "%r: refusing %s: %d clients are connected, the most it serves (max_clients)",
                self,
                peer,
                len(self._connections),
            )
            channel.close()
            return
        self._connections.add(task)
        client = _Client(peer)
        try:
            # Not wait_for: Python 3.11's returns a result that came with a cancellation,
            # so a connection whose handshake ended as the server closed went on.
            async with asyncio.timeout(self.handshake_timeout):
                done = await self._handshake(channel, client)
            if done:
                await self._transmission(channel, client)
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
        except _Stalled as exc:
            log.warning("%r: %s stalled: %s; disconnecting it", self, peer, exc)
        except ssl.SSLError as exc:
            log.warning("%r: TLS with %s failed (%s); disconnecting it", self, peer, describe(exc))
        except Exception:
            log.exception("%r: unexpected failure serving %s; disconnecting it", self, peer)
        finally:
            self._connections.discard(task)
            if self._closed:
                # Not close(): it waits for unsent replies to go out, and under TLS for
                # the client's close_notify, which a client that reads nothing, or one
                # whose connection stopped reading, never lets through.
                channel.transport.abort()
            else:
                channel.close()
            with contextlib.suppress(Exception):
                await channel.wait_closed()

    async def _option_reply(
        self, channel: _Channel, option: int, reply: int, data: bytes = b""
    ) -> None:
        channel.write(proto.option_reply(option, reply, data))
        await channel.drain()

    def _find(self, name: bytes) -> tuple[Any, str | None]:
        """The export called ``name`` and why it cannot be used now (None: it can);
        (None, why) when there is none."""
        try:
            export = self._exports.get(name.decode())
        except UnicodeDecodeError:
            export = None
        if export is None:
            return None, (
                f"no export {name[:80]!r}; this server exports {self.name!r}"
                + (f" and, while marked, {self.frozen.name!r}" if self.frozen is not None else "")
            )
        return export, export.unavailable()

    async def _handshake(self, channel: _Channel, client: _Client) -> bool:
        """Haggle options; True when the client enters transmission."""
        flags = proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
        channel.write(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, flags))
        await channel.drain()
        (client_flags,) = await channel.unpack(proto.U32)
        if client_flags & ~(proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES):
            # The spec: the server MUST drop a client that sets an unknown flag.
            raise _Violation(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & proto.FLAG_NO_ZEROES)
        tls = self.tls
        if tls is not None and not client_flags & proto.FLAG_FIXED_NEWSTYLE:
            # The spec: TLS needs fixed newstyle; without it the server is in NOTLS mode.
            if tls.required:
                raise _Violation("no fixed newstyle negotiation, so no TLS, which is required")
            tls = None
        encrypted = False
        while True:
            magic, option, length = await channel.unpack(proto.OPTION)
            if magic != proto.IHAVEOPT:
                raise _Violation(f"an option starts {magic:#x}, not IHAVEOPT")
            if length > proto.MAX_OPTION_DATA:
                while length:
                    length -= len(await channel.receive(min(length, proto.MAX_OPTION_DATA)))
                await self._option_reply(
                    channel, option, proto.REP_ERR_TOO_BIG, b"option data longer than 64 KiB"
                )
                continue
            data = bytes(await channel.receive(length))
            if option == proto.OPT_STARTTLS:
                if tls is None:
                    reason = b"TLS is off on this server"
                    await self._option_reply(channel, option, proto.REP_ERR_UNSUP, reason)
                elif encrypted or data:
                    reason = (
                        b"TLS is on already" if encrypted else b"NBD_OPT_STARTTLS takes no data"
                    )
                    await self._option_reply(channel, option, proto.REP_ERR_INVALID, reason)
                else:
                    await self._option_reply(channel, option, proto.REP_ACK)
                    await channel.start_tls(tls.context, self.handshake_timeout)
                    encrypted = True
                    client.forget()
                    log.debug("%r: %s is on TLS", self, client.peer)
                continue
            if tls is not None and tls.required and not encrypted and option != proto.OPT_ABORT:
                if option == proto.OPT_EXPORT_NAME:
                    # The option cannot fail politely: the spec says drop the client.
                    raise _Violation("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
                await self._option_reply(channel, option, proto.REP_ERR_TLS_REQD, _TLS_REQUIRED)
                continue
            if option == proto.OPT_EXPORT_NAME:
                export, why = self._find(data)
                if export is None or why is not None:
                    # The option cannot fail politely: the spec says drop the client.
                    raise _Violation(f"NBD_OPT_EXPORT_NAME of {data[:80]!r}: {why}")
                self._enter(client, export)
                tail = b"" if no_zeroes else bytes(proto.ZEROES_AFTER_EXPORT_NAME)
                channel.write(proto.EXPORT_NAME_REPLY.pack(export.size, client.flags) + tail)
                return True
            if option == proto.OPT_ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._option_reply(channel, option, proto.REP_ACK)
                log.debug("%r: %s aborted the handshake", self, client.peer)
                return False
            if option == proto.OPT_LIST:
                await self._list(channel, data)
            elif option in (proto.OPT_INFO, proto.OPT_GO):
                if await self._info(channel, client, option, data) and option == proto.OPT_GO:
                    return True
            elif option == proto.OPT_STRUCTURED_REPLY:
                if data or client.structured:
                    why = b"it takes no data" if data else b"structured replies are on already"
                    await self._option_reply(channel, option, proto.REP_ERR_INVALID, why)
                else:
                    client.structured = True
                    await self._option_reply(channel, option, proto.REP_ACK)
            elif option in (proto.OPT_LIST_META_CONTEXT, proto.OPT_SET_META_CONTEXT):
                await self._meta_context(channel, client, option, data)
            else:
                await self._option_reply(
                    channel,
                    option,
                    proto.REP_ERR_UNSUP,
                    f"option {option} is not supported".encode(),
                )

    async def _list(self, channel: _Channel, data: bytes) -> None:
        """Answer ``NBD_OPT_LIST``: every export that can be used now."""
        option = proto.OPT_LIST
        if data:
            await self._option_reply(
                channel, option, proto.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"
            )
            return
        for name, export in self._exports.items():
            if name == export.name and export.unavailable() is None:
                raw = name.encode()
                await self._option_reply(
                    channel, option, proto.REP_SERVER, proto.U32.pack(len(raw)) + raw
                )
        await self._option_reply(channel, option, proto.REP_ACK)

    async def _meta_context(
        self, channel: _Channel, client: _Client, option: int, data: bytes
    ) -> None:
        """Answer ``NBD_OPT_LIST_META_CONTEXT`` or ``NBD_OPT_SET_META_CONTEXT``."""
        listing = option == proto.OPT_LIST_META_CONTEXT
        if not listing:
            client.meta = None  # the spec: a SET replaces the last one, even when it fails
        if not client.structured:
            why = f"{proto.OPT_NAMES[option]} needs NBD_OPT_STRUCTURED_REPLY first"
            await self._option_reply(channel, option, proto.REP_ERR_INVALID, why.encode())
            return
        try:
            name, queries = proto.parse_meta_request(data)
        except ValueError as exc:
            await self._option_reply(channel, option, proto.REP_ERR_INVALID, str(exc).encode())
            return
        export, why = self._find(name)
        if export is None or why is not None:
            await self._option_reply(channel, option, proto.REP_ERR_UNKNOWN, why.encode())
            return
        chosen = match_contexts(export.contexts, queries, listing=listing)
        for index in chosen:
            reply = proto.meta_context(0 if listing else index + 1, export.contexts[index])
            await self._option_reply(channel, option, proto.REP_META_CONTEXT, reply)
        if not listing:
            client.meta = (export, chosen)
        await self._option_reply(channel, option, proto.REP_ACK)

    def _enter(self, client: _Client, export: Any) -> None:
        """Set up ``client`` to serve ``export`` (raises :class:`Unavailable`)."""
        client.view = export.attach()
        client.flags = int(export.flags(client.structured))
        meta = client.meta
        client.contexts = meta[1] if meta is not None and meta[0] is export else []

    async def _info(self, channel: _Channel, client: _Client, option: int, data: bytes) -> bool:
        """Answer ``NBD_OPT_INFO``/``NBD_OPT_GO``; True when the export was granted."""
        # Data: name length (32 bits), name, request count (16 bits), requests (16 bits each).
        if len(data) < 6 or proto.U32.unpack_from(data)[0] > len(data) - 6:
            await self._option_reply(
                channel, option, proto.REP_ERR_INVALID, b"option data too short"
            )
            return False
        name_length = proto.U32.unpack_from(data)[0]
        name = data[4 : 4 + name_length]
        (count,) = proto.U16.unpack_from(data, 4 + name_length)
        if len(data) != 6 + name_length + 2 * count:
            await self._option_reply(
                channel,
                option,
                proto.REP_ERR_INVALID,
                b"data length does not match the request count",
            )
            return False
        export, why = self._find(name)
        if export is not None and why is None and option == proto.OPT_GO:
            try:
                self._enter(client, export)
            except Unavailable as exc:
                why = str(exc)
        if export is None or why is not None:
            await self._option_reply(channel, option, proto.REP_ERR_UNKNOWN, why.encode())
            return False
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_length))
        flags = export.flags(client.structured)
        info = [proto.INFO_EXPORT_DATA.pack(proto.INFO_EXPORT, export.size, flags)]
        if proto.INFO_NAME in requests:
            info.append(proto.U16.pack(proto.INFO_NAME) + export.name.encode())
        if proto.INFO_DESCRIPTION in requests and self.description and export is self.export:
            info.append(proto.U16.pack(proto.INFO_DESCRIPTION) + self.description.encode())
        if proto.INFO_BLOCK_SIZE in requests:
            info.append(proto.INFO_BLOCK_SIZE_DATA.pack(proto.INFO_BLOCK_SIZE, *_SERVER_BLOCK_SIZE))
        for item in info:
            await self._option_reply(channel, option, proto.REP_INFO, item)
        await self._option_reply(channel, option, proto.REP_ACK)
        return True

    # -- transmission -----------------------------------------------------------------------
    async def _transmission(self, channel: _Channel, client: _Client) -> None:
        channel.transport.set_write_buffer_limits(high=_REPLY_BACKLOG)
        connection = _Connection(client, channel)
        self._transmitting.add(connection)
        background = client.view.background
        if not background:
            self._foreground.add(connection)
            self._arriving.register(connection.fd, select.POLLIN)
        try:
            while True:
                magic, flags, command, handle, offset, length = await channel.unpack(proto.REQUEST)
                if magic != proto.REQUEST_MAGIC:
                    raise _Violation(f"a request starts {magic:#x}, not the request magic")
                if background:
                    await self._after_foreground()
                if command == proto.CMD_DISC:
                    log.debug("%r: %s disconnected", self, client.peer)
                    return
                data: bytes | bytearray | memoryview = b""
                if command == proto.CMD_WRITE and length > MAX_BLOCK:
                    message = f"a WRITE of {length} bytes, over the {MAX_BLOCK} maximum"
                    self._send(channel, self._error(client, handle, errno.EINVAL, message))
                    with contextlib.suppress(ConnectionError):
                        await channel.drain()
                    raise _Violation(message)
                if client.view.inline and (
                    (
                        command in (proto.CMD_READ, proto.CMD_WRITE)
                        and length <= _INLINE
                        and not flags & proto.CMD_FLAG_FUA
                    )
                    or (
                        command == proto.CMD_BLOCK_STATUS
                        and client.view.status_is_cheap(client.contexts)
                    )
                    or (command == proto.CMD_TRIM and client.view.trims_inline)
                ):
                    # Small reads and writes, block status from bitmaps read already
                    # and the frozen export's TRIMs run here, in order: a thread
                    # hand-off costs more than the request (see _INLINE).
                    if command == proto.CMD_WRITE:
                        data = await channel.borrow(length)  # written before the next receive
                    reply = self._run(client, flags, command, handle, offset, length, data)
                    if not connection.sending.locked():
                        if len(reply) == 1 and len(reply[0]) <= _SMALL_REPLY:
                            self._later(connection, reply[0])
                            continue
                        if self._room_now(channel):
                            self._send_later(connection)
                            self._send(channel, reply)
                            continue
                    await self._reply(connection, reply)
                    continue
                # The request's payload or its reply's first piece: a client that
                # sends more than its budget, or reads no replies, waits; its
                # socket's buffers and TCP hold the rest.
                held = self._held(client, command, length)
                await self._admit(connection, held)
                try:
                    if command == proto.CMD_WRITE:
                        # The whole payload first: a client gone mid-payload writes nothing.
                        data = await self._payload(channel, length)
                    if command == proto.CMD_READ:
                        work = self._stream_read(connection, flags, handle, offset, length)
                    else:
                        work = self._request(
                            connection, flags, command, handle, offset, length, data
                        )
                    task = asyncio.create_task(work)
                except BaseException:
                    self._release(connection, held)
                    raise
                task.add_done_callback(lambda _, held=held: self._release(connection, held))
                for tasks in (connection.requests, self._requests):
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            if not background:
                self._foreground.discard(connection)
                if all(c.fd != connection.fd for c in self._foreground):  # not reused yet
                    self._arriving.unregister(connection.fd)
            # The spec: requests in flight are answered before the connection closes.
            if connection.requests:
                await asyncio.shield(asyncio.gather(*connection.requests, return_exceptions=True))
            self._send_later(connection)

    async def _after_foreground(self) -> None:
        """Let the requests of foreground connections that are ready now, and their held
        replies, go first: a background request (a pull's) waits up to :data:`_YIELDS`
        turns of the loop while any such connection has a request arriving (its socket
        readable), staged or a reply held (the host's writes must not wait for a backup;
        the backup must not starve)."""
        for _ in range(_YIELDS):
            if not self._foreground or not (
                any(c.later or c.channel.pending() for c in self._foreground)
                or self._arriving.poll(0)
            ):
                return
            await asyncio.sleep(0)

    @staticmethod
    def _held(client: _Client, command: int, length: int) -> int:
        """Bytes a request holds from its admission until it is answered: a WRITE's payload,
        a small READ's reply, a block status reply (a larger READ takes its pieces as it goes:
        :meth:`_stream_read`)."""
        if command == proto.CMD_WRITE or (command == proto.CMD_READ and length <= _PIECE):
            return length if length <= MAX_BLOCK else 0
        if command == proto.CMD_BLOCK_STATUS:
            return 8 * MAX_EXTENTS * len(client.contexts)
        return 0

    async def _admit(self, connection: _Connection, held: int) -> None:
        """Wait for a slot of the connection's and of the server's, then for ``held`` bytes
        of the connection's budget and of the server's (:meth:`_release` gives them back)."""
        await connection.slots.acquire()
        try:
            await self._slots.acquire()
            try:
                await self._take(connection, held)
            except BaseException:
                self._slots.release()
                raise
        except BaseException:
            connection.slots.release()
            raise

    def _release(self, connection: _Connection, held: int) -> None:
        connection.slots.release()
        self._slots.release()
        self._give(connection, held)

    async def _take(self, connection: _Connection, count: int) -> None:
        """``count`` bytes of the connection's budget, then of the server's."""
        await connection.budget.take(count)
        try:
            await self._data.take(count)
        except BaseException:
            connection.budget.give(count)
            raise

    def _give(self, connection: _Connection, count: int) -> None:
        self._data.give(count)
        connection.budget.give(count)

    async def _payload(self, channel: _Channel, length: int) -> bytearray:
        """A WRITE's payload, whole within :attr:`payload_timeout` (else :class:`_Stalled`)."""
        try:
            async with asyncio.timeout(self.payload_timeout):
                return await channel.receive(length)
        except TimeoutError:
            raise _Stalled(
                f"the {length}-byte payload of a WRITE did not arrive within "
                f"{self.payload_timeout:g} s"
            ) from None

    async def _request(
        self,
        connection: _Connection,
        flags: int,
        command: int,
        handle: int,
        offset: int,
        length: int,
        data: bytes | bytearray,
    ) -> None:
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(
            self._executor,
            self._run_unfenced,
            connection,
            flags,
            command,
            handle,
            offset,
            length,
            data,
        )
        if reply is not None:
            await self._reply(connection, reply)

    async def _reply(self, connection: _Connection, reply: list[Any]) -> None:
        """Send a whole reply once the connection's earlier ones are out of its way."""
        async with self._turn(connection):
            if await self._room(connection.channel):
                self._send(connection.channel, reply)

    @contextlib.asynccontextmanager
    async def _turn(self, connection: _Connection) -> AsyncIterator[None]:
        """The connection's turn to send a reply, the small ones held for later sent first."""
        async with connection.sending:
            self._send_later(connection, turn=True)
            yield

    @classmethod
    def _later(cls, connection: _Connection, reply: bytes) -> None:
        """Send a small reply (a header alone) once the requests the connection has sent
        already are run: the replies to a burst of small writes go out in one ``send``,
        which wakes the client once (4 KiB writes from libnbd at queue depth 8 cost the
        server 15 µs of CPU each, not 22, and ran 40% faster)."""
        connection.later.append(reply)
        if len(connection.later) == 1:
            loop = connection.channel.loop
            assert loop is not None
            loop.call_soon(cls._send_later, connection)

    @staticmethod
    def _send_later(connection: _Connection, turn: bool = False) -> None:
        """Send the replies held for later, unless another reply holds the turn to send
        (``turn``: the caller holds it): whoever takes it sends them first."""
        if connection.later and (turn or not connection.sending.locked()):
            if not connection.channel.is_closing():
                connection.channel.write(b"".join(connection.later))
            connection.later.clear()

    @staticmethod
    def _room_now(channel: _Channel) -> bool:
        """Whether a reply may go out now without waiting: the connection's unsent replies
        are within :data:`_REPLY_BACKLOG` bytes and its client is there."""
        return (
            channel.transport.get_write_buffer_size() <= _REPLY_BACKLOG and not channel.is_closing()
        )

    @staticmethod
    async def _room(channel: _Channel) -> bool:
        """Wait until the connection's unsent replies are down to :data:`_REPLY_BACKLOG`
        bytes; False when its client is gone (nobody to answer)."""
        if channel.transport.get_write_buffer_size() > _REPLY_BACKLOG:
            with contextlib.suppress(ConnectionError):
                await channel.drain()
        return not channel.is_closing()

    @staticmethod
    def _send(channel: _Channel, reply: list[Any]) -> None:
        """Queue a reply's pieces: one by one, since ``writelines`` may join them in a copy
        (each piece is a buffer of its own, never reused)."""
        for piece in reply:
            channel.write(piece)

    async def _stream_read(
        self, connection: _Connection, flags: int, handle: int, offset: int, length: int
    ) -> None:
        """Answer a READ not run inline: its reply made and sent piece by piece
        (:meth:`_read_steps`), each piece sent once the connection's earlier replies are
        down to :data:`_REPLY_BACKLOG` and the next read only then, so that a client that
        reads no replies makes the server hold one piece of a large READ.

        A large READ (over :data:`_PIECE`) holds the connection's turn to send from its
        start, and one piece of the budgets; a small one is read first, concurrently with
        the connection's others. The first piece is read before anything is sent, so that
        its failure is an ordinary error reply; a later one's failure is an error chunk
        when the reply is structured and between chunks, and otherwise (part of a simple
        reply or of a ``DF`` chunk was sent) drops the connection, as the spec asks."""
        client, channel = connection.client, connection.channel
        refusal = self._refusal(client, flags, proto.CMD_READ, offset, length)
        if refusal is not None:
            await self._reply(connection, self._error(client, handle, *refusal))
            return
        view = client.view
        loop = asyncio.get_running_loop()

        async def read(function: Callable[..., Any], *args: Any) -> Any:
            if view.inline:
                return function(*args)
            return await loop.run_in_executor(self._executor, function, *args)

        large = length > _PIECE
        async with contextlib.AsyncExitStack() as stack:
            if large:
                await stack.enter_async_context(self._turn(connection))
                await self._take(connection, _PIECE)
                stack.callback(self._give, connection, _PIECE)
            try:
                steps, data = await read(self._first_piece, client, flags, handle, offset, length)
            except Exception as exc:
                steps, failed = (
                    [],
                    self._failure(client, proto.CMD_READ, handle, offset, length, exc),
                )
            if not large:
                await stack.enter_async_context(self._turn(connection))
            if not steps:
                if await self._room(channel):
                    self._send(channel, failed)
                return
            for i, (header, start, size) in enumerate(steps):
                if i:
                    try:
                        data = await read(self._piece, view, start, size)
                    except Exception as exc:
                        failed = self._failure(client, proto.CMD_READ, handle, start, size, exc)
                        if header is None:
                            log.warning(
                                "%r: disconnecting %s: part of the reply to its READ "
                                "[%d, %d) was sent already",
                                self,
                                client.peer,
                                offset,
                                offset + length,
                            )
                            channel.transport.abort()
                        elif await self._room(channel):
                            self._send(channel, failed)
                        return
                if not await self._room(channel):
                    return
                if header is not None:
                    channel.write(header)
                if size:
                    channel.write(data)

    # -- one request (in a worker thread, or inline for small writes) ------------------------
    def _error(self, client: _Client, handle: int, error: int, message: str) -> list[bytes]:
        """The reply reporting ``error`` (an errno): an error chunk with structured replies."""
        if client.structured:
            return [proto.error_chunk(handle, error, message)]
        return [proto.simple_reply(handle, error)]

    def _refusal(
        self, client: _Client, flags: int, command: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        """Why the protocol refuses the request, as (errno, message), or None."""
        name = proto.CMD_NAMES.get(command)
        if name is None:
            return errno.EINVAL, f"unknown command {command}"
        offered = client.flags
        allowed = proto.CMD_FLAG_FUA if offered & _SEND_FUA else 0
        if command == proto.CMD_READ and offered & _SEND_DF:
            allowed |= proto.CMD_FLAG_DF
        elif command == proto.CMD_WRITE_ZEROES:
            allowed |= proto.CMD_FLAG_NO_HOLE
            if offered & _SEND_FAST_ZERO:
                allowed |= proto.CMD_FLAG_FAST_ZERO
        elif command == proto.CMD_BLOCK_STATUS:
            allowed |= proto.CMD_FLAG_REQ_ONE
        if flags & ~allowed:
            return errno.EINVAL, f"flags {flags & ~allowed:#x} are not valid for {name} here"
        view = client.view
        if command in _WRITES and (
            offered & _READ_ONLY or (command != proto.CMD_TRIM and not view.writable)
        ):
            return errno.EPERM, f"{view.name!r} takes no writes"
        if command in _ADVERTISED and not offered & _ADVERTISED[command]:
            return errno.EINVAL, f"{name} is not offered by {view.name!r}"
        if command == proto.CMD_FLUSH:
            if offset or length:
                return errno.EINVAL, "FLUSH takes no offset or length"
            return None
        if command in (proto.CMD_READ, proto.CMD_WRITE) and length > MAX_BLOCK:
            return errno.EINVAL, f"a {name} of {length} bytes, over the {MAX_BLOCK} maximum"
        if command == proto.CMD_BLOCK_STATUS:
            if not client.contexts:
                return errno.EINVAL, (
                    "no metadata context was negotiated for this export (NBD_OPT_SET_META_CONTEXT)"
                )
            if not length:
                return errno.EINVAL, "BLOCK_STATUS needs a nonzero length"
        if offset + length > view.size:
            return _PAST_THE_END.get(command, errno.EINVAL), (
                f"{name} [{offset}, {offset + length}) is past the end of {view.name!r} "
                f"({view.size} bytes)"
            )
        return None

    def _run(
        self,
        client: _Client,
        flags: int,
        command: int,
        handle: int,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview,
    ) -> list[Any]:
        """Run one request against the connection's export; return its whole reply."""
        refusal = self._refusal(client, flags, command, offset, length)
        if refusal is not None:
            return self._error(client, handle, *refusal)
        view = client.view
        try:
            if command == proto.CMD_READ:
                return self._read(client, flags, handle, offset, length)
            if command == proto.CMD_BLOCK_STATUS:
                limit = 1 if flags & proto.CMD_FLAG_REQ_ONE else MAX_EXTENTS
                last = client.contexts[-1]
                return [
                    proto.block_status(
                        handle, c + 1, view.block_status(c, offset, length, limit), c == last
                    )
                    for c in client.contexts
                ]
            if command == proto.CMD_WRITE:
                view.write(offset, data)
            elif command == proto.CMD_WRITE_ZEROES:
                view.write_zeroes(
                    offset,
                    length,
                    may_trim=not flags & proto.CMD_FLAG_NO_HOLE,
                    fast=bool(flags & proto.CMD_FLAG_FAST_ZERO),
                )
            elif command == proto.CMD_TRIM:
                view.trim(offset, length)
            if command == proto.CMD_FLUSH or flags & proto.CMD_FLAG_FUA:
                view.flush()
        except Exception as exc:
            return self._failure(client, command, handle, offset, length, exc)
        return [proto.simple_reply(handle)]

    def _failure(
        self, client: _Client, command: int, handle: int, offset: int, length: int, exc: Exception
    ) -> list[bytes]:
        """The error reply for an exception the export raised, logged unless it is the
        ``NotFast`` a FAST_ZERO asks for."""
        code = _wire_error(exc, command in _WRITES)
        if code != errno.ENOTSUP:
            log.warning(
                "%r: %s [%d, %d) failed (%s): %s",
                self,
                proto.CMD_NAMES[command],
                offset,
                offset + length,
                errno.errorcode[code],
                exc,
            )
        return self._error(client, handle, code, str(exc))

    @classmethod
    def _read(cls, client: _Client, flags: int, handle: int, offset: int, length: int) -> list[Any]:
        """A READ's whole reply (run inline: at most :data:`_INLINE` bytes): each chunk's
        header and data in one buffer, read in after the header, so that it goes out in one
        ``send`` (a header sent on its own cost a system call and a wakeup of the client)."""
        return [
            cls._piece(client.view, start, size, header or b"")
            for header, start, size in cls._read_steps(client, flags, handle, offset, length)
        ]

    @classmethod
    def _first_piece(
        cls, client: _Client, flags: int, handle: int, offset: int, length: int
    ) -> tuple[list[tuple[bytes | None, int, int]], memoryview]:
        """A READ's steps (:meth:`_read_steps`) and the data of the first."""
        steps = cls._read_steps(client, flags, handle, offset, length)
        _, start, size = steps[0]
        return steps, cls._piece(client.view, start, size)

    @staticmethod
    def _piece(view: Any, offset: int, length: int, header: bytes = b"") -> memoryview:
        """``header``, then ``length`` bytes of ``view`` at ``offset``, in a buffer of their
        own."""
        buffer = memoryview(bytearray(len(header) + length))
        buffer[: len(header)] = header
        if length:
            view.readinto(offset, buffer[len(header) :])
        return buffer

    @staticmethod
    def _read_steps(
        client: _Client, flags: int, handle: int, offset: int, length: int
    ) -> list[tuple[bytes | None, int, int]]:
        """A READ's reply as steps (header, offset, length): each sends its header, if
        any, then that many bytes of data from ``offset``, at most :data:`_PIECE`.

        A simple reply is one header, then its data over as many steps as it takes.
        A structured one is chunks of data (of at most :data:`_PIECE`, so that an
        error chunk may follow any of them) and of holes where the export knows the
        range reads as zeros; with ``DF`` one data chunk, its data over many steps."""
        whole: list[tuple[bytes, int, int]] = []  # header, offset, data length
        if not client.structured:
            whole.append((proto.simple_reply(handle), offset, length))
        elif not length:
            whole.append((proto.chunk(handle, proto.REPLY_TYPE_NONE, 0, True), offset, 0))
        else:
            if flags & proto.CMD_FLAG_DF:
                extents = [(offset, length)]
            else:
                extents = client.view.data_extents(offset, length)
            parts: list[tuple[int, int, bool]] = []  # offset, length, data
            at = offset
            for start, size in extents:
                if start > at:
                    parts.append((at, start - at, False))
                step = size if flags & proto.CMD_FLAG_DF else _PIECE
                parts += [
                    (s, min(step, start + size - s), True) for s in range(start, start + size, step)
                ]
                at = start + size
            if at < offset + length:
                parts.append((at, offset + length - at, False))
            for i, (start, size, is_data) in enumerate(parts):
                done = i == len(parts) - 1
                if is_data:
                    whole.append((proto.offset_data(handle, start, size, done), start, size))
                else:
                    whole.append((proto.offset_hole(handle, start, size, done), start, 0))
        steps: list[tuple[bytes | None, int, int]] = []
        for header, start, size in whole:
            steps.append((header, start, min(size, _PIECE)))
            steps += [
                (None, s, min(_PIECE, start + size - s))
                for s in range(start + _PIECE, start + size, _PIECE)
            ]
        return steps
