"""Control requests: newline-delimited JSON over TCP, as ``isc agent`` and ``isc serve`` take them.

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
import threading
from collections.abc import Callable, Mapping

from isc.auth import AUTH_TIMEOUT, Credentials, Refusal
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
    clients that authenticate (the module docstring); None answers anyone.
    """

    def __init__(
        self,
        ops: Mapping[str, Op],
        defaults: Mapping[str, object] | None = None,
        *,
        credentials: Credentials | None = None,
    ):
        if credentials is not None and credentials.endpoint != "server":
            raise ParameterError(f"a control server needs server credentials, got {credentials!r}")
        self.ops = dict(ops)
        self.defaults = {"info": {}, **(defaults or {})}
        self.credentials = credentials
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._answering: set[asyncio.Task] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

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

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            if len(self._clients) >= MAX_CLIENTS:
                await self._refuse_busy(writer)
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

        self._closing = False
        if self.credentials is None or not self.credentials.tls:
            return await asyncio.start_server(client, host, port, limit=MAX_LINE)
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: _Unread(asyncio.StreamReader(limit=MAX_LINE, loop=loop), client, loop=loop),
            host,
            port,
        )

    async def _refuse_busy(self, writer: asyncio.StreamWriter) -> None:
        busy = f"too many control connections ({MAX_CLIENTS} at once); try again later"
        log.warning(
            "control connection from %s refused: %s", writer.get_extra_info("peername"), busy
        )
        if self.credentials is None or not self.credentials.tls:  # a TLS client could not read it
            writer.write(_encode(self._reply(None, {"ok": False, "reason": busy})))
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

    # -- in a thread of its own, for servers that run no event loop ----------------------
    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` from a background thread; return the port bound.

        Raises what listening raised (``OSError``: address in use ...).
        """
        started = threading.Event()
        outcome: list[object] = []

        async def main() -> None:
            try:
                self._loop = asyncio.get_running_loop()
                self._stopped = asyncio.Event()
                server = await self.listen(host, port)
                outcome.append(server.sockets[0].getsockname()[1])
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
        return int(outcome[0])  # type: ignore[call-overload]

    def close(self) -> None:
        """Stop listening (after :meth:`start`) and wait for the thread; idempotent."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()
        self._thread = None


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
