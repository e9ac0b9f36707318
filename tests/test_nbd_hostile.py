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
import threading
import tracemalloc
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers import Gate, HookLUN, Worker
from test_nbd import (
    CMD_READ,
    CMD_WRITE,
    FUA,
    IHAVEOPT,
    OPT_ABORT,
    OPT_GO,
    OPT_LIST,
    OPT_STARTTLS,
    REP_ACK,
    REQUEST_MAGIC,
    Raw,
)
from test_security_nbd import (
    KIB,
    MIB,
    WAIT,
    ReceivingServer,
    TellingChannel,
    WatchedServer,
    connected,
)

from isc import MemoryLUN
from isc.nbd import MAX_BLOCK, NBDServer
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
    WRITE is small, whose first write parks that thread at ``gate`` (if any); it counts
    its writes."""

    def __init__(self, size: int, gate: Gate | None = None) -> None:
        super().__init__(size)
        self.gate = gate
        self.writes = 0

    def write(self, offset: int, data) -> None:
        self.writes += 1
        if self.writes == 1 and self.gate is not None:
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
        self.data += REQUEST.pack(REQUEST_MAGIC, flags, CMD_WRITE, HANDLE, self._at, length)
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
        client.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, HANDLE, SIZE - 512, 512))
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


# -- STARTTLS and TLS ----------------------------------------------------------------------------
class SplitTLS:
    """The client end of TLS over ``sock`` through memory BIOs, socket-like enough for
    :class:`~test_nbd.Raw`: the test decides which ciphertext goes out, and when."""

    def __init__(self, sock: socket.socket, creds: Path) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = client_context(creds, check_hostname=False, certificate=True)
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)

    def handshake(self) -> None:
        """Run the handshake, all but the client's last flight (:meth:`seal` returns it)."""
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self._feed()

    def _feed(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.incoming.write(data)

    def seal(self, data: bytes = b"") -> bytes:
        """The ciphertext of the TLS output pending, then of ``data``."""
        if data:
            self.tls.write(data)
        return self.outgoing.read()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(self.seal(data))

    def recv(self, length: int) -> bytes:
        while True:
            try:
                return self.tls.read(length)  # b"" at the server's close_notify
            except ssl.SSLWantReadError:
                try:
                    self._feed()
                except ConnectionError:
                    return b""


def starttls_by_hand(sock: socket.socket, creds: Path) -> SplitTLS:
    """Greet the server on ``sock``, start TLS and run its handshake but for the client's
    last flight (sent with the next :meth:`SplitTLS.seal` or ``sendall``)."""
    plain = Raw(sock)
    plain.greet()
    assert plain.option(OPT_STARTTLS) == [(REP_ACK, b"")]
    split = SplitTLS(sock, creds)
    split.handshake()
    return split


def write_all_of_max_data(server: NBDServer, creds: Path | None, payload: bytes) -> None:
    """Another client WRITEs ``payload``, all of ``max_data``: it goes through once whoever
    held the data gave it back."""
    with ExitStack() as stack:
        other = connected(stack, server, creds)
        other.request(CMD_WRITE, 0, MAX_BLOCK, payload=payload)
        assert other.reply() == 0


def option_bytes(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def test_a_client_sending_a_staging_buffer_with_its_tls_finished_is_served_on(
    tmp_path, credentials, caplog
):
    creds = credentials["good"]
    gate = Gate()
    lun = ParkingLUN(SIZE, gate)
    lists = _STAGING // 16  # NBD_OPT_LIST options: exactly a staging buffer
    tls = ServerTLS(creds, mode="on", verify_peer=True)
    with ReceivingServer(lun, name="disk", tls=tls, handshake_timeout=2.0) as server:
        server.start_unix(tmp_path / "isc.sock")
        with ExitStack() as stack:
            parker = connected(stack, server, None)  # plaintext: mode "on"
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.connect(server.address)
            split = starttls_by_hand(sock, creds)
            flight = split.seal(option_bytes(OPT_LIST) * lists)  # Finished, then the options
            parker.request(CMD_WRITE, 0, 512, payload=bytes(512))
            gate.wait_reached()
            sock.sendall(flight)  # all of it queued before the server reads it
            gate.open()
            assert parker.reply() == 0
            client = Raw(split)
            for _ in range(lists):
                _, echoed, reply, length = struct.unpack(">QIII", client.recv(20))
                assert (echoed, reply) == (OPT_LIST, 2)  # REP_SERVER "disk"
                client.recv(length)
                assert struct.unpack(">QIII", client.recv(20))[1:3] == (OPT_LIST, REP_ACK)
            # What the client sends next reaches the server too.
            assert client.option(OPT_ABORT) == [(REP_ACK, b"")]
    no_errors_logged(caplog)


INJECTED = option_bytes(OPT_GO, Raw.info_data(b"disk")) + REQUEST.pack(
    REQUEST_MAGIC, 0, CMD_WRITE, HANDLE, 0, 4
)
"""What a man in the middle adds in plaintext after NBD_OPT_STARTTLS (CVE-2011-0411):
entering the export and writing to it."""


@pytest.mark.parametrize("when", ["with-starttls", "after-the-ack"])
def test_plaintext_injected_after_starttls_is_never_acted_on(tmp_path, credentials, when, caplog):
    lun = ParkingLUN(SIZE)
    tls = ServerTLS(credentials["good"], mode="on", verify_peer=True)
    with ReceivingServer(lun, name="disk", tls=tls) as server:
        server.start_unix(tmp_path / "isc.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.address)
            client = Raw(sock)
            client.greet()
            if when == "with-starttls":
                # In the same segment: the server has it staged when STARTTLS is acked.
                sock.sendall(option_bytes(OPT_STARTTLS) + INJECTED + b"evil")
            else:
                sock.sendall(option_bytes(OPT_STARTTLS))
            assert struct.unpack(">QIII", client.recv(20))[1:] == (OPT_STARTTLS, REP_ACK, 0)
            if when == "after-the-ack":
                sock.sendall(INJECTED + b"evil")  # read as the start of a TLS handshake
            assert client.dropped()  # no reply in plaintext, no transmission
        with ExitStack() as stack:  # the others go on
            other = connected(stack, server, credentials["good"])
            other.request(CMD_WRITE, 0, 4, payload=b"good")
            assert other.reply() == 0
    assert lun.read(0, 4) == b"good" and lun.writes == 1
    said = " ".join(r.getMessage() for r in caplog.records)
    why = "data after NBD_OPT_STARTTLS" if when == "with-starttls" else "TLS with"
    assert why in said
    no_errors_logged(caplog)


@pytest.mark.parametrize("what", ["plaintext-after-tls", "close-notify-mid-payload"])
def test_a_tls_client_that_breaks_off_mid_payload_writes_nothing_and_frees_its_data(
    tmp_path, credentials, what, caplog
):
    creds = credentials["good"]
    lun = HookLUN(MemoryLUN(MAX_BLOCK))
    payload = random.Random(SEED).randbytes(MAX_BLOCK)
    tls = ServerTLS(creds, verify_peer=True)
    with ReceivingServer(lun, name="disk", tls=tls, max_data=MAX_BLOCK) as server:
        server.start_unix(tmp_path / "isc.sock")
        with ExitStack() as stack:
            gone = connected(stack, server, creds)
            before = server.received
            gone.request(CMD_WRITE, 0, MAX_BLOCK, payload=payload[: MAX_BLOCK // 2])
            expected = before + REQUEST.size + MAX_BLOCK // 2
            server.wait_for(lambda: server.received >= expected, "half the payload")
            assert server.held == MAX_BLOCK
            if what == "plaintext-after-tls":
                # The rest of the payload in clear, under the TLS layer.
                with socket.socket(fileno=gone.sock.fileno()) as under:
                    under.sendall(payload[MAX_BLOCK // 2 :][: 64 * KIB])
                    under.detach()
                assert gone.dropped()
            else:
                gone.sock = gone.sock.unwrap()  # close_notify; returns at the server's
        write_all_of_max_data(server, creds, payload[::-1])
    assert lun.written == [(0, MAX_BLOCK)]  # the second client's alone
    assert lun.lun.read(0, MAX_BLOCK) == payload[::-1]
    assert server.held == 0
    no_errors_logged(caplog)


def test_a_tls_record_sent_byte_by_byte_is_received_whole(tmp_path, credentials):
    creds = credentials["good"]
    lun = ParkingLUN(SIZE)
    rng = random.Random(SEED)
    small, large = rng.randbytes(300), rng.randbytes(_INLINE + 4 * KIB)
    with ReceivingServer(lun, name="disk", tls=ServerTLS(creds)) as server:
        server.start_unix(tmp_path / "isc.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.address)
            split = starttls_by_hand(sock, creds)
            client = Raw(split)
            assert client.option(OPT_GO, client.info_data(b"disk"))[-1][0] == REP_ACK
            for at, data in ((0, small), (64 * KIB, large)):
                header = REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, HANDLE, at, len(data))
                records = split.seal(header + data)
                for i in range(3000):  # the first record and more, a byte a send
                    sock.sendall(records[i : i + 1])
                sock.sendall(records[3000:])
                assert client.reply() == 0
    assert lun.read(0, 300) == small
    assert lun.read(64 * KIB, len(large)) == large


# -- clients that go mid-message -----------------------------------------------------------------
GONE = ["eof-mid-option-header", "eof-mid-request-header", "rst-mid-payload", "half-close"]


@pytest.mark.parametrize("how", GONE)
def test_a_tcp_client_gone_mid_message_writes_nothing_unwhole_and_the_others_go_on(
    tmp_path, how, caplog
):
    lun = HookLUN(MemoryLUN(MAX_BLOCK))
    rng = random.Random(SEED)
    small = rng.randbytes(4 * KIB)
    payload = rng.randbytes(MAX_BLOCK) if how == "rst-mid-payload" else b""
    with ReceivingServer(lun, name="disk", max_data=MAX_BLOCK) as server:
        server.start("127.0.0.1", 0)
        with socket.create_connection(server.address) as sock:
            client = Raw(sock)
            before = server.received
            if how == "eof-mid-option-header":
                client.greet()
                sock.sendall(option_bytes(OPT_GO)[:10])
                sock.shutdown(socket.SHUT_WR)
            elif how == "eof-mid-request-header":
                client.go()
                sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, HANDLE, 0, 4)[:10])
                sock.shutdown(socket.SHUT_WR)
            elif how == "rst-mid-payload":
                client.go()
                before = server.received
                client.request(CMD_WRITE, 0, MAX_BLOCK, payload=payload[: MAX_BLOCK // 2])
                expected = before + REQUEST.size + MAX_BLOCK // 2
                server.wait_for(lambda: server.received >= expected, "half the payload")
                assert server.held == MAX_BLOCK
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                # Whole requests, then the end of what the client sends: the spec's
                # requests in flight are answered (a WRITE with FUA runs in the pool).
                client.go()
                client.request(CMD_WRITE, 0, len(small), payload=small)
                client.request(CMD_WRITE, 8 * KIB, len(small), flags=FUA, payload=small)
                sock.shutdown(socket.SHUT_WR)
                assert [client.reply(), client.reply()] == [0, 0]
            if how != "rst-mid-payload":
                assert client.dropped()
        # The others go on; after a reset, with all of max_data: it was given back.
        last = payload[::-1] if how == "rst-mid-payload" else small[::-1]
        with socket.create_connection(server.address) as sock:
            other = Raw(sock)
            other.go()
            other.request(CMD_WRITE, 0, len(last), payload=last)
            assert other.reply() == 0
    assert server.held == 0
    first = [(0, 4 * KIB), (8 * KIB, 4 * KIB)] if how == "half-close" else []
    assert sorted(lun.written) == sorted([*first, (0, len(last))])
    assert lun.lun.read(0, len(last)) == last
    no_errors_logged(caplog)


# -- the option phase ----------------------------------------------------------------------------
REP_ERR_INVALID, REP_ERR_TOO_BIG = 2**31 + 3, 2**31 + 9
ODD_PIECES = [1, 7, 16, 4093, _STAGING - 1, _STAGING, _STAGING + 1, 100 * KIB]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_options_longer_than_the_staging_buffer_split_oddly_are_answered(
    tmp_path, credentials, tls, caplog
):
    creds = credentials["good"]
    lun = ParkingLUN(SIZE)
    server_tls = ServerTLS(creds, verify_peer=True) if tls else None
    with ReceivingServer(lun, name="disk", tls=server_tls) as server:
        server.start_unix(tmp_path / "isc.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.address)
            if tls:
                client = Raw(starttls_by_hand(sock, creds))
            else:
                client = Raw(sock)
                client.greet()
            rng = random.Random(SEED)
            # The longest option data the server reads (MAX_OPTION_DATA), one byte more
            # (skipped, then refused), and far more.
            asked = [
                (OPT_LIST, _STAGING, REP_ERR_INVALID),
                (OPT_LIST, _STAGING + 1, REP_ERR_TOO_BIG),
                (OPT_GO, 3 * _STAGING + 3, REP_ERR_TOO_BIG),
            ]
            data = b"".join(option_bytes(o, rng.randbytes(n)) for o, n, _ in asked)
            pieces = iter(ODD_PIECES * 8)
            at = 0
            while at < len(data):  # each piece received before the next is sent
                piece = data[at : at + next(pieces)]
                before = server.received
                client.sock.sendall(piece)
                expected = before + len(piece)
                server.wait_for(lambda e=expected: server.received >= e, f"{expected} bytes")
                at += len(piece)
            for option, _, error in asked:
                _, echoed, reply, length = struct.unpack(">QIII", client.recv(20))
                assert (echoed, reply) == (option, error)
                assert client.recv(length)  # a message
            # The connection goes on: into the export, and a WRITE.
            assert client.option(OPT_GO, client.info_data(b"disk"))[-1][0] == REP_ACK
            client.request(CMD_WRITE, 0, 4, payload=b"good")
            assert client.reply() == 0
    assert lun.writes == 1 and lun.read(0, 4) == b"good"
    no_errors_logged(caplog)


# -- the budgets ---------------------------------------------------------------------------------
class QueueingServer(ReceivingServer):
    """A :class:`ReceivingServer` that counts the requests that asked for data budget."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taking = 0

    async def _take(self, connection, count: int) -> None:
        with self.changed:
            self.taking += 1
            self.changed.notify_all()
        await super()._take(connection, count)  # queues at once: nothing runs between


def test_writes_queued_for_max_data_are_admitted_as_others_disconnect(tmp_path, caplog):
    lun = HookLUN(MemoryLUN(MAX_BLOCK))
    payloads = [random.Random(SEED + i).randbytes(MAX_BLOCK) for i in range(3)]
    with QueueingServer(lun, name="disk", max_data=MAX_BLOCK) as server, ExitStack() as stack:
        server.start_unix(tmp_path / "isc.sock")
        holder, waiter, quitter = (connected(stack, server, None) for _ in range(3))

        def queued(count: int) -> None:
            server.wait_for(lambda: server.taking >= count, f"{count} WRITEs asking for data")

        # The holder takes all of max_data and sends half its payload.
        holder.request(CMD_WRITE, 0, MAX_BLOCK, payload=payloads[0][: MAX_BLOCK // 2])
        queued(1)
        # The waiter's WRITE queues behind it, its client blocked sending its payload.
        sending = Worker(lambda: waiter.request(CMD_WRITE, 0, MAX_BLOCK, payload=payloads[1]))
        queued(2)
        # The quitter's queues behind that, its staging buffer full, and it leaves.
        quitter.request(CMD_WRITE, 0, MAX_BLOCK, payload=payloads[2][: 2 * _STAGING])
        queued(3)
        server.wait_for(lambda: len(server.paused) == 2, "the two queued connections pause")
        assert server.held == MAX_BLOCK
        quitter.sock.close()
        holder.sock.close()  # gone mid-payload: gives max_data to the waiter
        sending.finish()
        assert waiter.reply() == 0
        # The quitter's turn came and went: max_data is whole again for another client.
        write_all_of_max_data(server, None, payloads[1][::-1])
    assert lun.written == [(0, MAX_BLOCK), (0, MAX_BLOCK)]  # the waiter's, the other's
    assert lun.lun.read(0, MAX_BLOCK) == payloads[1][::-1]
    assert server.held == 0 and server.peak_held == MAX_BLOCK
    no_errors_logged(caplog)


# -- memory --------------------------------------------------------------------------------------
PER_CONNECTION = 1.6 * (1 << 20)
"""What the server's docstring bounds each connection's memory by, beyond ``max_data``."""


class HoardServer(WatchedServer, QueueingServer):
    """Tells which connections wait for their clients to read, stopped reading, or asked
    for data budget."""


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest.mark.parametrize("hoard", ["unread-replies", "queued-writes"])
def test_many_clients_filling_their_staging_buffers_stay_within_the_memory_bound(
    tmp_path, credentials, hoard, tls, caplog
):
    greedy = 12
    creds = credentials["good"] if tls else None
    server_tls = ServerTLS(creds, verify_peer=True) if tls else None
    server = HoardServer(MemoryLUN(MAX_BLOCK), name="disk", tls=server_tls, max_data=MAX_BLOCK)
    reads = REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, HANDLE, 0, 64 * KIB) * (2 * _STAGING // 28)
    write = REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, HANDLE, 0, MAX_BLOCK) + bytes(2 * _STAGING)
    tracemalloc.start()
    try:
        with server, ExitStack() as stack:
            server.start_unix(tmp_path / "isc.sock")
            clients = [connected(stack, server, creds) for _ in range(greedy)]
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for client in clients:
                # 2 staging buffers of READ headers, 300 MiB of replies: none read.
                # Or a WRITE of all of max_data: one is admitted, the others queue.
                client.sock.sendall(reads if hoard == "unread-replies" else write)
            if hoard == "unread-replies":
                server.wait_waiting(greedy)
                stopped = greedy
            else:
                server.wait_for(lambda: server.taking >= greedy, "every WRITE asks for data")
                stopped = greedy - 1  # the one admitted receives its payload
            server.wait_for(lambda: len(server.paused) >= stopped, "the connections pause")
            _, peak = tracemalloc.get_traced_memory()
            bound = server.peak_held + greedy * PER_CONNECTION
            assert peak - before <= bound, f"{peak - before} bytes traced, over {bound}"
            assert server.peak_held <= MAX_BLOCK
    finally:
        tracemalloc.stop()
    assert server.held == 0
    no_errors_logged(caplog)


class EndingChannel(TellingChannel):
    """Tells when the TLS layer under it has read the end of its client's stream."""

    async def start_tls(self, context, timeout: float) -> None:
        await super().start_tls(context, timeout)
        layer = self.transport._ssl_protocol  # asyncio's, under the TLS transport
        received = layer.eof_received

        def eof_received():
            keep_open = received()
            with self._server.changed:
                self._server.ended += 1
                self._server.changed.notify_all()
            return keep_open

        layer.eof_received = eof_received


class EndingServer(QueueingServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ended = 0
        self.channels: list[EndingChannel] = []

    def _channel(self) -> EndingChannel:
        self.channels.append(EndingChannel(self))
        return self.channels[-1]


@pytest.mark.parametrize("quitter", ["gone-while-queued", "connected-mid-payload"])
def test_a_tls_client_amid_a_write_lets_the_server_close(tmp_path, credentials, quitter):
    creds = credentials["good"]
    tls = ServerTLS(creds, mode="on", verify_peer=True)
    server = EndingServer(HookLUN(MemoryLUN(MAX_BLOCK)), name="disk", tls=tls, max_data=MAX_BLOCK)
    write = REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, HANDLE, 0, MAX_BLOCK)
    server.start_unix(tmp_path / "isc.sock")
    closing = None
    try:
        with ExitStack() as stack:
            if quitter == "gone-while-queued":
                holder = connected(stack, server, None)  # plaintext: holds max_data
                holder.sock.sendall(write + bytes(KIB))
                server.wait_for(lambda: server.taking >= 1, "the holder's WRITE")
                waiting = connected(stack, server, creds)
                waiting.sock.sendall(write + bytes(2 * _STAGING))  # queued, staging full
                server.wait_for(lambda: server.taking >= 2, "the TLS client's WRITE queued")
                server.wait_for(lambda: server.paused, "the TLS client's connection pauses")
                waiting.sock.close()  # no close_notify
                server.wait_for(lambda: server.ended >= 1, "its TLS layer reads the end")
            else:
                holder = connected(stack, server, creds)  # mid-payload over TLS, and stays
                holder.sock.sendall(write + bytes(KIB))
                server.wait_for(lambda: server.taking >= 1, "the TLS client's WRITE")
            closing = Worker(server.close)
            closing.done.wait(3.0)
            assert closing.done.is_set(), "NBDServer.close() did not return within 3 s"
    finally:
        if closing is not None and not closing.done.is_set():
            for channel in server.channels:  # unstick it, so that nothing outlives the test
                server._loop.call_soon_threadsafe(channel.transport.abort)
        server.close()


class LosingChannel(EndingChannel):
    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        with self._server.changed:
            self._server.lost += 1
            self._server.changed.notify_all()


class LosingServer(EndingServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lost = 0

    def _channel(self) -> LosingChannel:
        self.channels.append(LosingChannel(self))
        return self.channels[-1]


def test_a_tls_connection_dropped_while_its_reading_is_paused_closes(tmp_path, credentials):
    creds = credentials["good"]
    release = threading.Event()
    lun = HookLUN(MemoryLUN(SIZE))
    lun.before_write = lambda n, offset, data: release.wait(WAIT)
    server = LosingServer(lun, name="disk", tls=ServerTLS(creds, verify_peer=True))
    # 17 WRITEs with FUA (in the pool, held there): the 17th waits for a slot of its
    # connection's 16, then a bad request magic, then enough to fill the staging buffer.
    data = b"".join(
        REQUEST.pack(REQUEST_MAGIC, FUA, CMD_WRITE, HANDLE, i * KIB, 512) + bytes(512)
        for i in range(17)
    )
    data += REQUEST.pack(0xBAD, 0, CMD_WRITE, HANDLE, 0, 0) + bytes(_STAGING + 8 * KIB)
    try:
        with server, ExitStack() as stack:
            server.start_unix(tmp_path / "isc.sock")
            client = connected(stack, server, creds)
            client.sock.sendall(data)
            server.wait_for(lambda: server.paused, "the connection stops reading")
            client.sock.close()  # no close_notify
            server.wait_for(lambda: server.ended >= 1, "its TLS layer reads the end")
            release.set()  # the WRITEs end, the bad magic is read: the server drops it
            with server.changed:
                closed = server.changed.wait_for(lambda: server.lost >= 1, 3.0)
            assert closed, "the connection was not closed within 3 s"
    finally:
        release.set()


# -- TLS flow control: asyncio's TLS layer and the channel both stop the socket ---------------
class LayeredChannel(LosingChannel):
    """Watches asyncio's TLS layer under the connection once TLS is on: the most
    ciphertext it holds unread, and whether the socket's reading ever disagrees with
    the layer's own flow control (reading while the layer stopped it, or stopped while
    the layer has not: then the layer would never start it again)."""

    async def start_tls(self, context, timeout: float) -> None:
        await super().start_tls(context, timeout)
        server = self._server
        server.staged_at_switch = self._end - self._start
        layer = self.transport._ssl_protocol
        plain = layer._transport
        received = layer.buffer_updated

        def check() -> None:
            if not plain.is_closing() and plain.is_reading() == layer._ssl_reading_paused:
                server.disagreements.append((plain.is_reading(), layer._ssl_reading_paused))

        def buffer_updated(nbytes: int) -> None:
            received(nbytes)
            server.most_unread = max(server.most_unread, layer._incoming.pending)
            check()

        layer.buffer_updated = buffer_updated
        check()


class LayeredServer(LosingServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.staged_at_switch = 0
        self.most_unread = 0
        self.disagreements: list[tuple[bool, bool]] = []

    def _channel(self) -> LayeredChannel:
        self.channels.append(LayeredChannel(self))
        return self.channels[-1]


TLS_READ = 256 * KIB
"""The most ciphertext asyncio's TLS layer reads at once, and holds unread before it
stops the socket (its high-water mark): it holds at most twice this."""


@pytest.mark.parametrize("when", ["with-its-finished", "in-transmission"])
def test_a_tls_client_flooding_writes_that_wait_for_max_data_stays_bounded(
    tmp_path, credentials, when, caplog
):
    """4 MiB of WRITEs from a TLS client while another client holds all of max_data:
    sent with the client's TLS Finished, queued whole before the server reads it (the
    staging buffer fills while the TLS layer is not yet the connection's), or in
    transmission. The TLS layer holds at most its bound unread, the socket stops and
    starts as it says, every WRITE is answered and written, and the server closes."""
    creds = credentials["good"]
    gate = Gate()
    lun = ParkingLUN(MAX_BLOCK + 8 * MIB, gate)
    tls = ServerTLS(creds, mode="on", verify_peer=True)
    rng = random.Random(SEED)
    held = rng.randbytes(MAX_BLOCK)
    writes = [(MAX_BLOCK + i * MIB, rng.randbytes(MIB)) for i in range(4)]
    flood = b"".join(
        REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, HANDLE, at, len(data)) + data
        for at, data in writes
    )
    server = LayeredServer(lun, name="disk", tls=tls, max_data=MAX_BLOCK)
    server.start_unix(tmp_path / "isc.sock")
    closing = None
    try:
        with ExitStack() as stack:
            holder = connected(stack, server, None)  # plaintext ("on"): holds max_data
            holder.request(CMD_WRITE, 0, MAX_BLOCK, payload=held[: MAX_BLOCK // 2])
            server.wait_for(lambda: server.taking >= 1, "the holder's WRITE")
            assert server.held == MAX_BLOCK
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MIB)
            sock.connect(server.address)
            split = starttls_by_hand(sock, creds)
            client = Raw(split)
            if when == "with-its-finished":
                flight = split.seal(option_bytes(OPT_GO, Raw.info_data(b"disk")) + flood)
                parker = connected(stack, server, None)
                parker.request(CMD_WRITE, MAX_BLOCK + 6 * MIB, 512, payload=bytes(512))
                gate.wait_reached()  # the event loop is parked: nothing more is read
                head = 3 * TLS_READ  # queued whole before the server reads again
                sock.sendall(flight[:head])
                gate.open()
                sending = Worker(lambda: sock.sendall(flight[head:]))
                assert parker.reply() == 0
            else:
                gate.open()
                assert client.option(OPT_GO, client.info_data(b"disk"))[-1][0] == REP_ACK
                sending = Worker(lambda: split.sendall(flood))
            server.wait_for(lambda: server.taking >= 2, "the TLS client's first WRITE queued")
            server.wait_for(lambda: server.paused, "the TLS client's connection pauses")
            with server.changed:  # the TLS layer has stopped the socket, or holds it all
                assert server.most_unread <= 2 * TLS_READ, server.most_unread
            holder.sock.sendall(held[MAX_BLOCK // 2 :])  # gives max_data back
            assert holder.reply() == 0
            sending.finish()
            if when == "with-its-finished":
                for _ in range(2):  # NBD_REP_INFO (export), NBD_REP_ACK
                    _, echoed, reply, length = struct.unpack(">QIII", client.recv(20))
                    assert echoed == OPT_GO
                    client.recv(length)
                assert reply == REP_ACK
                assert server.staged_at_switch == _STAGING, "the window was not forced"
            assert [client.reply() for _ in writes] == [0] * len(writes)
            closing = Worker(server.close)  # the TLS client is still connected
            closing.done.wait(3.0)
            assert closing.done.is_set(), "NBDServer.close() did not return within 3 s"
    finally:
        if closing is not None and not closing.done.is_set():
            for channel in server.channels:
                server._loop.call_soon_threadsafe(channel.transport.abort)
        server.close()
    assert server.held == 0
    assert server.most_unread <= 2 * TLS_READ, server.most_unread
    assert server.disagreements == []
    assert lun.read(0, MAX_BLOCK) == held
    for at, data in writes:
        assert lun.read(at, len(data)) == data
    no_errors_logged(caplog)


class ClosingServer(NBDServer):
    """A server whose ``close()`` lands as a client's handshake completes."""

    async def _handshake(self, channel, client) -> bool:
        done = await super()._handshake(channel, client)
        self.close()  # from the loop's thread: the shutdown runs as this returns
        return done


def test_a_close_that_lands_as_a_handshake_completes_disconnects_the_client(tmp_path):
    server = ClosingServer(MemoryLUN(SIZE), name="disk")
    server.start_unix(tmp_path / "isc.sock")
    try:
        with ExitStack() as stack:
            client = connected(stack, server, None)
            client.sock.settimeout(WAIT)
            # Asyncio's wait_for returns a result that came with a cancellation, so the
            # connection went on into transmission and the server's close() never ended.
            assert client.sock.recv(1) == b"", "the closing server kept serving"
    finally:
        closing = Worker(server.close)
        closing.done.wait(WAIT)
        assert closing.done.is_set(), "NBDServer.close() did not return"
