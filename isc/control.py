"""Control requests: newline-delimited JSON over TCP or a Unix socket, for isc agent and serve.

A request is one JSON object on one line, ``{"id": N, "op": OP, ...}``; every
request gets exactly one reply line ``{"id": N, "ok": true|false, "reason":
TEXT|null, ...}`` plus the fields the server always sends (``info``, and
the agent's ``extents``). A line that is not a JSON object, an unknown op,
a line over :data:`MAX_LINE` bytes or an op that raises gets ``ok: false``
with the reason; a server never crashes on bad input, and a bad line
changes nothing; so does a number that is not finite (``NaN``, ``1e999``).
Requests on one connection are answered in order, one at a time; each
connection is served on its own, so a slow request (a copy) does not hold
up a ``status`` on another connection.

A Unix socket (:meth:`ControlServer.listen_unix`) is created with mode 0600
in a directory only its user may write, so only that user reaches it. A
server without credentials answers only its own user (and root) on TCP too,
loopback included, which every user of the machine reaches: it asks the
kernel who owns the peer's socket (:func:`~isc.auth.stranger`, about 15 µs a
connection) and refuses a peer of another user, or one it cannot tell (another
host's), with one ``ok: false`` line naming the peer and the fix, and a log
line; ``insecure`` lifts that (``--insecure``).

Limits: at most :data:`MAX_CLIENTS` connections at once (one more gets a
refusal line and is closed, with a log line), :data:`MAX_LINE` bytes per
request, and :data:`IDLE_TIMEOUT` seconds of silence between requests.

With :class:`~isc.auth.Credentials` a connection is authenticated before
its first request is read (mutual TLS, a shared secret's challenge-response,
or both; :mod:`isc.auth` has the exchange): a client that fails gets one
``ok: false`` line saying why, the connection closes and the refusal is
logged; none of its lines reaches an op. A client has
:data:`~isc.auth.AUTH_TIMEOUT` seconds to authenticate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping

from isc.auth import AUTH_TIMEOUT, Credentials, Refusal, others_may_change, stranger
from isc.errors import ParameterError

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10
"""The longest request line in bytes, newline included."""
MAX_CLIENTS = 32
"""Connections a control server serves at once; one more gets a refusal line and is closed."""
IDLE_TIMEOUT = 600.0
"""Seconds a connection may wait before its next request; then it is closed."""

Op = Callable[[dict], dict]
"""One operation: takes the request, returns the reply's fields (``ok`` at least)."""


class ControlServer:
    """Answers control requests with ``ops`` (op name -> :data:`Op`).

    ``defaults`` are reply fields every reply carries unless the op sets them.
    ``credentials`` (a server's :class:`~isc.auth.Credentials`): answer only
    clients that authenticate (the module docstring); None answers this user's
    (and root's) alone, unless ``insecure``: anyone's.
    """

    def __init__(
        self,
        ops: Mapping[str, Op],
        defaults: Mapping[str, object] | None = None,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
    ):
        if credentials is not None and credentials.endpoint != "server":
            raise ParameterError(f"a control server needs server credentials, got {credentials!r}")
        self.ops = dict(ops)
        self.defaults = {"info": {}, **(defaults or {})}
        self.credentials = credentials
        self.insecure = insecure
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._answering: set[asyncio.Task] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._unix: tuple[str, int] | None = None  # the socket file's path and inode

    def answer(self, line: bytes) -> dict:
        """The reply to one request line; never raises."""
        try:
            request = json.loads(line, parse_float=_finite, parse_constant=_not_a_number)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return self._reply(
                None, {"ok": False, "reason": f"not JSON: {type(exc).__name__}: {exc}"}
            )
        if not isinstance(request, dict):
            return self._reply(None, {"ok": False, "reason": "a request is a JSON object"})
        op = request.get("op")
        run = self.ops.get(op) if isinstance(op, str) else None
        if run is None:
            known = ", ".join(sorted(self.ops))
            return self._reply(request, {"ok": False, "reason": f"unknown op {op!r} ({known})"})
        try:
            reply = run(request)
        except Exception as exc:
            log.exception("%s failed", op)
            reply = {"ok": False, "reason": f"{op} failed: {exc}"}
        return self._reply(request, reply)

    def _reply(self, request: dict | None, fields: dict) -> dict:
        rid = request.get("id") if request is not None else None
        return {"id": rid, "reason": None, **self.defaults, **fields}

    async def listen(self, host: str, port: int) -> asyncio.Server:
        """Start listening on ``host:port`` (0: any free port) in the running loop.

        Stop with :meth:`shut`.
        """
        return await self._listen(host=host, port=port)

    async def listen_unix(self, path: str | os.PathLike[str]) -> asyncio.Server:
        """Start listening on a Unix socket at ``path`` in the running loop.

        The socket is created with mode 0600 in a directory that must belong to
        this user and be writable by no one else, so only this user reaches
        it; it is removed by :meth:`shut`. Raises ``ParameterError`` naming the
        directory or the file that stands in the way. Stop with :meth:`shut`.
        """
        where = os.path.abspath(path)
        sock = _private_unix_socket(where)
        self._unix = (where, os.lstat(where).st_ino)
        return await self._listen(sock=sock)

    async def _listen(self, **where) -> asyncio.Server:
        self._closing = False
        if self.credentials is None or not self.credentials.tls:
            return await asyncio.start_server(self._client, limit=MAX_LINE, **where)
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: _Unread(
                asyncio.StreamReader(limit=MAX_LINE, loop=loop), self._client, loop=loop
            ),
            **where,
        )

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection: authenticate it, then answer its requests in order."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        if self.credentials is None and not self.insecure:
            refusal = stranger(
                writer.get_extra_info("socket"), "give it --tls-creds or --secret-file"
            )
            if refusal is not None:
                await self._refuse(writer, refusal)
                return
        if len(self._clients) >= MAX_CLIENTS:
            busy = f"too many control connections ({MAX_CLIENTS} at once); try again later"
            await self._refuse(writer, busy)
            return
        self._clients[task] = writer
        try:
            if self.credentials is not None and not await self._authenticate(reader, writer):
                return
            while not self._closing:
                try:
                    line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT)
                except TimeoutError:
                    peer = writer.get_extra_info("peername")
                    log.info("control connection from %s closed: idle %g s", peer, IDLE_TIMEOUT)
                    break
                except asyncio.LimitOverrunError:
                    too_long = f"line too long: a request is at most {MAX_LINE} bytes"
                    writer.write(_encode(self._reply(None, {"ok": False, "reason": too_long})))
                    break
                except asyncio.IncompleteReadError:
                    break
                self._answering.add(task)
                try:
                    reply = await loop.run_in_executor(None, self.answer, line)
                    writer.write(_encode(reply))
                    await writer.drain()
                finally:
                    self._answering.discard(task)
        except ConnectionError:
            pass
        finally:
            del self._clients[task]
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        """Refuse a new connection before it authenticates: log ``reason``, send it
        (unless the client expects TLS) and close."""
        log.warning(
            "control connection from %s refused: %s", writer.get_extra_info("peername"), reason
        )
        if self.credentials is None or not self.credentials.tls:  # a TLS client could not read it
            writer.write(_encode(self._reply(None, {"ok": False, "reason": reason})))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        writer.close()

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Run the credentials' exchange with a new client; False when it was refused."""
        assert self.credentials is not None
        peer = writer.get_extra_info("peername") or "a client"
        try:
            who = await asyncio.wait_for(self.credentials.accept(reader, writer), AUTH_TIMEOUT)
        except Refusal as exc:
            log.warning("control connection from %s refused: %s", peer, exc)
            if not writer.is_closing():
                refusal = self._reply({"id": exc.request_id}, {"ok": False, "reason": str(exc)})
                writer.write(_encode(refusal))
                await writer.drain()
            return False
        except TimeoutError:
            log.warning(
                "control connection from %s refused: no authentication within %g s",
                peer,
                AUTH_TIMEOUT,
            )
            return False
        log.info("control connection from %s: %s", peer, who)
        return True

    async def shut(self, server: asyncio.Server) -> None:
        """Stop ``server`` (from :meth:`listen`): idle connections close at once, one
        whose request is being answered closes after its reply is sent."""
        self._closing = True
        server.close()
        tasks = list(self._clients)
        for task, writer in self._clients.items():
            if task not in self._answering:
                writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        if self._unix is not None:
            path, inode = self._unix
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == inode:  # not a socket someone put there since
                    os.unlink(path)

    # -- in a thread of its own, for servers that run no event loop ----------------------
    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` from a background thread; return the port bound.

        Raises what listening raised (``OSError``: address in use ...).
        """
        server = self._start_thread(lambda: self.listen(host, port))
        return int(server.sockets[0].getsockname()[1])

    def start_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a Unix socket at ``path`` (see :meth:`listen_unix`) from a background
        thread. Raises as :meth:`listen_unix`."""
        self._start_thread(lambda: self.listen_unix(path))

    def _start_thread(self, listen: Callable[[], Awaitable[asyncio.Server]]) -> asyncio.Server:
        started = threading.Event()
        outcome: list[asyncio.Server | Exception] = []

        async def main() -> None:
            try:
                self._loop = asyncio.get_running_loop()
                self._stopped = asyncio.Event()
                server = await listen()
                outcome.append(server)
            except Exception as exc:
                outcome.append(exc)
                return
            finally:
                started.set()
            await self._stopped.wait()
            await self.shut(server)

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name="isc-control", daemon=True
        )
        self._thread.start()
        started.wait()
        if isinstance(outcome[0], Exception):
            self._thread.join()
            self._thread = None
            raise outcome[0]
        return outcome[0]

    def close(self) -> None:
        """Stop listening (after :meth:`start`) and wait for the thread; idempotent."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()
        self._thread = None


_SUN_PATH = 107
"""Bytes of a Unix socket's path: ``sun_path`` holds 108 with the closing NUL."""


def _private_unix_socket(path: str) -> socket.socket:
    """A Unix socket bound at ``path`` with mode 0600, never reachable by others meanwhile.

    It is bound in a fresh directory of mode 0700 beside ``path``, made 0600
    there (through ``/proc/self/fd``, so the detour adds nothing to the
    path's length) and renamed into place. ``path``'s directory must belong
    to this user and be writable by no one else (else another user could
    replace the socket); a stale socket at ``path`` is replaced, anything else
    is refused.
    """
    if len(os.fsencode(path)) > _SUN_PATH:
        raise ParameterError(
            f"socket path {path} is {len(os.fsencode(path))} bytes long and a Unix "
            f"socket's is at most {_SUN_PATH} bytes: pick a shorter one"
        )
    directory = os.path.dirname(path)
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise ParameterError(f"directory {directory} of socket {path}: {exc.strerror}") from None
    problem = others_may_change(info)
    if problem is not None:
        raise ParameterError(
            f"directory {directory} of socket {path} {problem} (make one with mkdir -m 700)"
        )
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ParameterError(f"{path} exists and is not a socket: remove it or pick another")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                raise ParameterError(f"a server listens on {path} already")
    staging = tempfile.mkdtemp(dir=directory, prefix=".isc-socket-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{held}/s")
        os.chmod("s", 0o600, dir_fd=held)
        os.rename("s", path, src_dir_fd=held)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink("s", dir_fd=held)
        os.close(held)
        os.rmdir(staging)
    return sock


class _Unread(asyncio.StreamReaderProtocol):
    """A stream whose first bytes wait in the socket until TLS starts.

    A TLS client sends its ClientHello as soon as it connects; read into the
    stream's buffer, the TLS layer that ``start_tls`` adds would never see it
    and the handshake would hang. ``start_tls`` resumes reading itself.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _encode(reply: dict) -> bytes:
    return json.dumps(reply).encode() + b"\n"
