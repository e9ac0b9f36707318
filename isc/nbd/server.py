"""The NBD server: :class:`NBDServer` exports one LUN to any number of clients.

It serves from an asyncio event loop; LUN I/O runs in a thread pool so a
slow request stalls no other client. It speaks the fixed newstyle handshake
with ``NBD_FLAG_NO_ZEROES``; options ``NBD_OPT_GO`` and ``NBD_OPT_INFO``
(information ``NBD_INFO_EXPORT``, ``NBD_INFO_NAME``, ``NBD_INFO_BLOCK_SIZE``),
``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_LIST``, ``NBD_OPT_ABORT`` and
``NBD_OPT_STARTTLS`` (TLS, below), and answers every other option with
``NBD_REP_ERR_UNSUP``; simple replies only; commands READ, WRITE (with the
FUA flag), FLUSH, WRITE_ZEROES and DISC.

A request's payload is read whole before the LUN is touched, so a client
that vanishes mid-request leaves no partial write; malformed requests get
an error reply (or, when the stream cannot be resynchronised, a dropped
connection) and never reach the LUN. Replies to one connection's requests
may come out of order, as the spec allows.

Against clients that misbehave the server keeps limits: at most
``max_clients`` connections (:data:`MAX_CLIENTS`; one more is closed at
once, with a log line), ``handshake_timeout`` seconds from connecting to
transmission (:data:`HANDSHAKE_TIMEOUT`, TLS included), and per connection
:data:`_CONNECTION_DATA` bytes of WRITE payloads and READ replies held at
once: a client that reads no replies is no longer read from, while the
others go on. The server's memory stays about twice ``max_clients`` times
that.

TLS (the spec's "TLS support"; credentials in :mod:`isc.tls`): the server's
:class:`~isc.tls.ServerTLS` mode is nbdkit's: without one it answers
``NBD_OPT_STARTTLS`` with ``NBD_REP_ERR_UNSUP`` (NOTLS); "on" lets each
client choose; "require" (FORCEDTLS) answers every option before TLS but
``NBD_OPT_STARTTLS`` and ``NBD_OPT_ABORT`` with ``NBD_REP_ERR_TLS_REQD`` and
drops a client that sends ``NBD_OPT_EXPORT_NAME`` or lacks fixed newstyle.
With ``verify_peer`` a client needs a certificate signed by the server's
CA. A failed handshake drops that client with a log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import itertools
import logging
import os
import ssl
import stat
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import quote

from isc.errors import ParameterError, StateError
from isc.lun import LUN
from isc.nbd import proto
from isc.nbd.proto import MAX_BLOCK, NBD_PORT, TransmissionFlag
from isc.tls import ServerTLS, describe

log = logging.getLogger(__name__)

_SERVER_BLOCK_SIZE = (1, 4096, MAX_BLOCK)


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
        if not isinstance(name, str) or "\0" in name or len(name.encode()) > proto.MAX_STRING:
            raise ParameterError(
                f"an export name is a str without NUL of at most {proto.MAX_STRING} UTF-8 bytes, "
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
        writer.write(
            proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, option, reply, len(data)) + data
        )
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
        writer.write(
            proto.GREETING.pack(
                proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
            )
        )
        await writer.drain()
        (client_flags,) = proto.U32.unpack(await reader.readexactly(4))
        if client_flags & ~(proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES):
            # The spec: the server MUST drop a client that sets an unknown flag.
            raise _Violation(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & proto.FLAG_NO_ZEROES)
        size = self.lun.size
        tls = self.tls
        if tls is not None and not client_flags & proto.FLAG_FIXED_NEWSTYLE:
            # The spec: TLS needs fixed newstyle; without it the server is in NOTLS mode.
            if tls.required:
                raise _Violation("no fixed newstyle negotiation, so no TLS, which is required")
            tls = None
        encrypted = False
        while True:
            magic, option, length = proto.OPTION.unpack(await reader.readexactly(proto.OPTION.size))
            if magic != proto.IHAVEOPT:
                raise _Violation(f"an option starts {magic:#x}, not proto.IHAVEOPT")
            if length > proto.MAX_OPTION_DATA:
                while length:
                    length -= len(await reader.readexactly(min(length, proto.MAX_OPTION_DATA)))
                await self._option_reply(
                    writer, option, proto.REP_ERR_TOO_BIG, b"option data longer than 64 KiB"
                )
                continue
            data = await reader.readexactly(length)
            if option == proto.OPT_STARTTLS:
                if tls is None:
                    reason = b"TLS is off on this server"
                    await self._option_reply(writer, option, proto.REP_ERR_UNSUP, reason)
                elif encrypted or data:
                    reason = (
                        b"TLS is on already" if encrypted else b"NBD_OPT_STARTTLS takes no data"
                    )
                    await self._option_reply(writer, option, proto.REP_ERR_INVALID, reason)
                else:
                    await self._option_reply(writer, option, proto.REP_ACK)
                    await writer.start_tls(
                        tls.context, ssl_handshake_timeout=self.handshake_timeout
                    )
                    encrypted = True
                    log.debug("%r: %s is on TLS", self, peer)
                continue
            if tls is not None and tls.required and not encrypted and option != proto.OPT_ABORT:
                if option == proto.OPT_EXPORT_NAME:
                    # The option cannot fail politely: the spec says drop the client.
                    raise _Violation("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
                await self._option_reply(writer, option, proto.REP_ERR_TLS_REQD, _TLS_REQUIRED)
                continue
            if option == proto.OPT_EXPORT_NAME:
                if not self._exports(data):
                    # The option cannot fail politely: the spec says drop the client.
                    raise _Violation(f"NBD_OPT_EXPORT_NAME of unknown export {data[:80]!r}")
                tail = b"" if no_zeroes else bytes(proto.ZEROES_AFTER_EXPORT_NAME)
                writer.write(proto.EXPORT_NAME_REPLY.pack(size, self.flags) + tail)
                return True
            if option == proto.OPT_ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._option_reply(writer, option, proto.REP_ACK)
                log.debug("%r: %s aborted the handshake", self, peer)
                return False
            if option == proto.OPT_LIST:
                if data:
                    await self._option_reply(
                        writer, option, proto.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"
                    )
                    continue
                name = self.name.encode()
                await self._option_reply(
                    writer, option, proto.REP_SERVER, proto.U32.pack(len(name)) + name
                )
                await self._option_reply(writer, option, proto.REP_ACK)
            elif option in (proto.OPT_INFO, proto.OPT_GO):
                if await self._info(writer, option, data) and option == proto.OPT_GO:
                    return True
            else:
                await self._option_reply(
                    writer,
                    option,
                    proto.REP_ERR_UNSUP,
                    f"option {option} is not supported".encode(),
                )

    async def _info(self, writer: asyncio.StreamWriter, option: int, data: bytes) -> bool:
        """Answer ``NBD_OPT_INFO``/``NBD_OPT_GO``; True when the export was granted."""
        # Data: name length (32 bits), name, request count (16 bits), requests (16 bits each).
        if len(data) < 6 or proto.U32.unpack_from(data)[0] > len(data) - 6:
            await self._option_reply(
                writer, option, proto.REP_ERR_INVALID, b"option data too short"
            )
            return False
        name_length = proto.U32.unpack_from(data)[0]
        name = data[4 : 4 + name_length]
        (count,) = proto.U16.unpack_from(data, 4 + name_length)
        if len(data) != 6 + name_length + 2 * count:
            await self._option_reply(
                writer,
                option,
                proto.REP_ERR_INVALID,
                b"data length does not match the request count",
            )
            return False
        if not self._exports(name):
            message = f"no export {name[:80]!r}; this server exports {self.name!r}".encode()
            await self._option_reply(writer, option, proto.REP_ERR_UNKNOWN, message)
            return False
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_length))
        info = [proto.INFO_EXPORT_DATA.pack(proto.INFO_EXPORT, self.lun.size, self.flags)]
        if proto.INFO_NAME in requests:
            info.append(proto.U16.pack(proto.INFO_NAME) + self.name.encode())
        if proto.INFO_BLOCK_SIZE in requests:
            info.append(proto.INFO_BLOCK_SIZE_DATA.pack(proto.INFO_BLOCK_SIZE, *_SERVER_BLOCK_SIZE))
        for item in info:
            await self._option_reply(writer, option, proto.REP_INFO, item)
        await self._option_reply(writer, option, proto.REP_ACK)
        return True

    async def _transmission(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        slots = asyncio.Semaphore(_SERVER_IN_FLIGHT)
        budget = _Budget(_CONNECTION_DATA)
        mine: set[asyncio.Task[None]] = set()
        try:
            while True:
                header = await reader.readexactly(proto.REQUEST.size)
                magic, flags, command, handle, offset, length = proto.REQUEST.unpack(header)
                if magic != proto.REQUEST_MAGIC:
                    raise _Violation(f"a request starts {magic:#x}, not the request magic")
                if command == proto.CMD_DISC:
                    log.debug("%r: %s disconnected", self, peer)
                    return
                data = b""
                if command == proto.CMD_WRITE and length > MAX_BLOCK:
                    self._reply(writer, handle, errno.EINVAL)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    raise _Violation(f"a WRITE of {length} bytes, over the {MAX_BLOCK} maximum")
                if command == proto.CMD_WRITE and length <= _INLINE_WRITE and not flags:
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
                held = (
                    length
                    if command in (proto.CMD_READ, proto.CMD_WRITE) and length <= MAX_BLOCK
                    else 0
                )
                await slots.acquire()
                try:
                    await budget.take(held)
                except BaseException:
                    slots.release()
                    raise
                try:
                    if command == proto.CMD_WRITE:
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
        writer.write(
            proto.REPLY.pack(proto.SIMPLE_REPLY_MAGIC, proto.ERRNO_TO_WIRE.get(error, 0), handle)
        )

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
        writes = command in (proto.CMD_WRITE, proto.CMD_WRITE_ZEROES)
        allowed = proto.CMD_FLAG_FUA if self.flags & TransmissionFlag.SEND_FUA else 0
        if command == proto.CMD_WRITE_ZEROES:
            allowed |= proto.CMD_FLAG_NO_HOLE
        if command not in (
            proto.CMD_READ,
            proto.CMD_WRITE,
            proto.CMD_FLUSH,
            proto.CMD_WRITE_ZEROES,
        ):
            return errno.EINVAL, None
        if flags & ~allowed:
            return errno.EINVAL, None
        if writes and self.readonly:
            return errno.EPERM, None
        if command == proto.CMD_FLUSH:
            if offset or length:
                return errno.EINVAL, None
        elif length > MAX_BLOCK:
            return errno.EINVAL, None
        elif offset + length > self.lun.size:
            return (errno.ENOSPC if writes else errno.EINVAL), None
        lun = self.lun
        try:
            if command == proto.CMD_READ:
                return 0, lun.read(offset, length)
            if command == proto.CMD_WRITE:
                lun.write(offset, data)
            elif command == proto.CMD_WRITE_ZEROES:
                zeroes = memoryview(self._zeroes)
                for at in range(offset, offset + length, len(zeroes)):
                    lun.write(at, zeroes[: min(len(zeroes), offset + length - at)])
            if command == proto.CMD_FLUSH or flags & proto.CMD_FLAG_FUA:
                lun.flush()
        except Exception as exc:
            code = _wire_error(exc, writes)
            log.warning(
                "%r: %s [%d, %d) failed (%s): %s",
                self,
                proto.CMD_NAMES.get(command, "WRITE_ZEROES"),
                offset,
                offset + length,
                errno.errorcode[code],
                exc,
            )
            return code, None
        return 0, None
