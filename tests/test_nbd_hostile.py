"""isc's NBD server against hostile clients: the windows of its receive path forced open.

The server receives through a protocol of its own (``_Channel`` in
:mod:`isc.nbd.server`): a staging buffer of ``_STAGING`` bytes where headers
are parsed in place, WRITE payloads received straight into their own buffer,
reading paused while the staging buffer is full, and STARTTLS switching the
same protocol over to TLS. Each test here drives a real server (in-process
:class:`NBDServer` on a real socket, real TLS with tests/certs.py's
certificates) into one edge of that design and checks what the NBD spec and
isc's docs promise: nothing written that was not whole, the right reply, error
or disconnect, the budgets given back (``NBDServer.held``), the other clients
unaffected, no traceback logged.

To place bytes exactly in the staging buffer, a first WRITE parks the
server's event loop in its LUN (a :class:`~helpers.Gate`) while the client
queues the rest in the socket: once the gate opens, the server's next read
takes ``_STAGING`` bytes at once.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import struct
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers import Gate, HookLUN
from test_nbd import CMD_WRITE, FUA, IHAVEOPT, OPT_ABORT, OPT_LIST, OPT_STARTTLS, REP_ACK, Raw
from test_security_nbd import (
    KIB,
    ReceivingServer,
    TellingChannel,
    connected,
    in_transmission,
)

from isc import MemoryLUN
from isc.nbd.proto import REQUEST
from isc.nbd.server import _INLINE, _STAGING
from isc.tls import ServerTLS, client_context

SEED = 20261206
SIZE = 1 << 20
HANDLE = 0xC0FFEE


class FillingChannel(TellingChannel):
    """A connection that counts the times its staging buffer filled exactly."""

    def buffer_updated(self, nbytes: int) -> None:
        full = self._start == 0 and self._end + nbytes == _STAGING and self._target is None
        super().buffer_updated(nbytes)
        if full:
            self._server.fills += 1


class FillingServer(ReceivingServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fills = 0

    def _channel(self) -> FillingChannel:
        return FillingChannel(self)


class ParkingLUN(MemoryLUN):
    """A memory LUN, so the server writes to it on its event loop's thread when the
    WRITE is small, whose first write parks that thread at ``gate``."""

    def __init__(self, size: int, gate: Gate) -> None:
        super().__init__(size)
        self.gate = gate
        self.writes = 0

    def write(self, offset: int, data) -> None:
        self.writes += 1
        if self.writes == 1:
            self.gate()
        super().write(offset, data)


def no_errors_logged(caplog) -> None:
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, bad


class Burst:
    """WRITEs laid out byte by byte, with the model of what the LUN holds after them."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.model = bytearray(SIZE)
        self.data = bytearray()
        self.writes = 0
        self._at = 0  # the next free offset: no two WRITEs overlap, whatever their order

    def write(self, length: int, flags: int = 0) -> Burst:
        payload = self.rng.randbytes(length)
        self.model[self._at : self._at + length] = payload
        self.data += REQUEST.pack(0x25609513, flags, CMD_WRITE, HANDLE, self._at, length)
        self.data += payload
        self._at += length
        self.writes += 1
        return self

    def small(self, count: int, length: int = 4) -> Burst:
        for _ in range(count):
            self.write(length)
        return self


# Layouts of the bytes the server stages after the parked WRITE (32 bytes a small WRITE).
LAYOUTS = {
    # 2048 WRITEs of 32 bytes fill the staging buffer exactly; one more follows.
    "exactly-full": lambda b: b.small(_STAGING // 32).small(2),
    # A header whose first 10 bytes end the staging buffer, compacted to take the rest.
    "header-straddles": lambda b: b.small(_STAGING // 32 - 2).write(26).small(3),
    # A payload that starts staged and ends received into the buffer the channel lends,
    # into a buffer of its own (FUA: run in the pool), or one over _INLINE.
    "payload-straddles-lent": lambda b: b.small(2000).write(4 * KIB).small(2),
    "payload-straddles-own": lambda b: b.small(2000).write(4 * KIB, FUA).small(2),
    "large-payload-straddles": lambda b: b.small(2000).write(_INLINE + 4 * KIB).small(3),
    # A payload that is exactly what is staged, lent and copied out.
    "payload-exactly-staged-lent": lambda b: (
        b.small(2000).write(_STAGING - 2000 * 32 - 28).small(2)
    ),
    "payload-exactly-staged-own": lambda b: (
        b.small(2000).write(_STAGING - 2000 * 32 - 28, FUA).small(2)
    ),
}


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_requests_across_the_staging_buffer_end_are_served_whole(
    tmp_path, credentials, layout, tls, caplog
):
    gate = Gate()
    lun = ParkingLUN(SIZE, gate)
    creds = credentials["good"] if tls else None
    server = FillingServer(
        lun, name="disk", tls=ServerTLS(creds, verify_peer=True) if tls else None
    )
    parked = random.Random(SEED).randbytes(512)
    burst = LAYOUTS[layout](Burst(SEED))
    with server, ExitStack() as stack:
        server.start_unix(tmp_path / "isc.sock")
        client = connected(stack, server, creds)
        client.sock.sendall(REQUEST.pack(0x25609513, 0, CMD_WRITE, HANDLE, SIZE - 512, 512))
        client.sock.sendall(parked)
        gate.wait_reached()  # the event loop is parked in the LUN: nothing more is read
        head = 96 * KIB  # queued whole in the socket before the server reads again
        client.sock.sendall(burst.data[:head])
        gate.open()
        client.sock.sendall(burst.data[head:])
        errors = [client.reply() for _ in range(burst.writes + 1)]
        assert errors == [0] * (burst.writes + 1)
        assert server.fills >= 1, "the staging buffer never filled exactly"
    assert server.held == 0
    burst.model[SIZE - 512 :] = parked
    assert lun.read(0, SIZE) == bytes(burst.model)
    assert lun.writes == burst.writes + 1
    no_errors_logged(caplog)
