"""A bounded soak of ``isc serve`` with TLS and a shared secret: a host writer beside clients that
misbehave, on loopback.

``isc serve`` exports a source file with ``--tls=require --tls-verify-peer``
(mutual TLS on the NBD export), answers its control port only to clients
with the certificate and the secret, and serves at most ``--max-clients``
NBD connections. A host writer (:mod:`host_writer`: libnbd, 4 KiB random
writes, queue depth 8) writes to the export for ``--seconds``, alone, then
beside ``--clients`` clients of each kind below, on a fresh server each
time; ``--rounds`` of both give the medians.

===============  ============================================================
kind             what each client does, again after each disconnection
===============  ============================================================
slow reader      with a client certificate, enters transmission, asks for
                 64 READs of 32 MiB and never reads a reply
idle NBD         connects to the NBD port and sends nothing
idle control     connects to the control port and sends nothing
oversize NBD     with a client certificate, sends a WRITE of 64 MiB (over
                 the 32 MiB maximum)
malformed NBD    sends options in plaintext (the server requires TLS), or
                 an option without its magic
unauth control   sends ``{"op": "mark"}`` and a 100 KiB line, no TLS
===============  ============================================================

A client that the server disconnects or refuses waits :data:`PAUSE` seconds
before it tries again, so the clients misbehave without flooding the two
CPUs the host writer and the server share with them.

Reported per mode (median of the rounds): the host's write rate, its p99
write latency and worst stall (``max_gap_us``), and the server's peak RSS
(``VmHWM``), beside its bound from the configured caps (the server's
docstring, :mod:`isc.nbd.server`): the peak alone, plus the data all
connections may hold at once (``max_data``, :data:`~isc.nbd.server.MAX_DATA`,
128 MiB), plus :data:`PER_CONNECTION` for each of ``--max-clients``
connections (requests not read yet, unsent replies, TLS buffers). The
refusals the server logged
say which limit acted. Targets (issue 12): peak RSS within the bound, and
the host's write rate beside the clients at least 80% of its rate alone.

    .venv/bin/python benchmarks/soak.py [--clients 4] [--seconds 10] [--rounds 3]

Stops by itself: every phase lasts ``--seconds``, every wait is bounded, and
every process and socket it made is closed on the way out. Needs openssl
(the credentials, made like the tests'), python3-libnbd (the host writer)
and nothing beyond loopback.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from compare_qemu import IscServer
from datapath import scratch
from host_writer import HostWriter

from isc.auth import Credentials
from isc.nbd import MAX_BLOCK, parse_uri, proto
from isc.nbd.server import MAX_DATA
from isc.tls import client_context

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from certs import make_credentials  # the tests' credentials, made by openssl

MIB = 1 << 20
SIZE = 256 * MIB
"""Bytes of the source file the server exports."""
PAUSE = 0.1
"""Seconds a misbehaving client waits after a disconnection before it tries again."""
WAIT = 10.0
"""Seconds a misbehaving client's connect or read may take."""
WARM_UP = 2.0
"""Seconds the misbehaving clients get before the host writer starts."""
PER_CONNECTION = 5 * MIB // 2
"""Bytes one NBD connection may hold beyond ``max_data``: twice the stream limit of
requests not read yet (512 KiB) and one receive, the unsent replies (64 KiB and a
256 KiB piece) twice under TLS, and the TLS layer's own buffer (256 KiB)."""


# -- a hand-rolled NBD client: just enough to misbehave ------------------------------------------
def _recv(sock: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        part = sock.recv(length - len(data))
        if not part:
            raise ConnectionError("the server closed the connection")
        data += part
    return data


def _greet(address: tuple[str, int]) -> socket.socket:
    """A connection past the server's greeting, fixed newstyle without zeroes agreed."""
    sock = socket.create_connection(address, timeout=WAIT)
    try:
        _recv(sock, proto.GREETING.size)
        sock.sendall(proto.U32.pack(proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES))
    except BaseException:
        sock.close()
        raise
    return sock


def _option(sock: socket.socket, option: int, data: bytes = b"") -> int:
    """Send ``option``; return the type of its last reply (an ack or an error)."""
    sock.sendall(proto.OPTION.pack(proto.IHAVEOPT, option, len(data)) + data)
    while True:
        _, _, reply, length = proto.OPTION_REPLY.unpack(_recv(sock, proto.OPTION_REPLY.size))
        _recv(sock, length)
        if reply == proto.REP_ACK or reply & proto.REP_ERR:
            return reply


def _transmission(address: tuple[str, int], export: str, context: ssl.SSLContext) -> socket.socket:
    """An authenticated connection in transmission: STARTTLS with a client certificate, GO."""
    sock = _greet(address)
    try:
        if _option(sock, proto.OPT_STARTTLS) != proto.REP_ACK:
            raise ConnectionError("the server refused STARTTLS")
        sock = context.wrap_socket(sock, server_hostname=address[0])
        if _option(sock, proto.OPT_GO, _go(export)) != proto.REP_ACK:
            raise ConnectionError(f"the server refused export {export!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def _go(export: str) -> bytes:
    """The data of ``NBD_OPT_GO`` for ``export``, asking for no information."""
    name = export.encode()
    return proto.U32.pack(len(name)) + name + bytes(2)


def _request(command: int, handle: int, offset: int, length: int) -> bytes:
    return proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, command, handle, offset, length)


# -- the misbehaving clients ----------------------------------------------------------------------
class Misbehaving:
    """``count`` clients of each kind (the module docstring), each in a thread of its own,
    against the server at ``nbd`` (address, export) and ``control`` (address) until
    :meth:`stop`.

    ``outcomes`` counts, by kind and outcome, what happened to their attempts.
    """

    def __init__(
        self,
        count: int,
        nbd: tuple[tuple[str, int], str],
        control: tuple[str, int],
        context: ssl.SSLContext,
    ) -> None:
        self.nbd, self.export = nbd
        self.control = control
        self.context = context
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        behaviours: dict[str, Callable[[], str]] = {
            "slow reader": self._slow_reader,
            "idle NBD": lambda: self._idle(self.nbd),
            "idle control": lambda: self._idle(self.control),
            "oversize NBD": self._oversize,
            "malformed NBD": self._malformed,
            "unauth control": self._unauthenticated,
        }
        self._threads = [
            threading.Thread(target=self._loop, args=(kind, behave), daemon=True)
            for kind, behave in behaviours.items()
            for _ in range(count)
        ]
        self.size = len(self._threads)
        """The clients in all."""
        for thread in self._threads:
            thread.start()

    def _loop(self, kind: str, behave: Callable[[], str]) -> None:
        while not self._stop.is_set():
            try:
                outcome = behave()
            except (OSError, ssl.SSLError) as exc:
                outcome = f"failed: {type(exc).__name__}"
            with self._lock:
                self.outcomes[f"{kind}: {outcome}"] += 1
            self._stop.wait(PAUSE)

    def _until_closed(self, sock: socket.socket) -> str:
        """Read and drop what the server sends until it closes ``sock`` or the soak ends."""
        sock.settimeout(PAUSE)
        while not self._stop.is_set():
            try:
                if not sock.recv(65536):
                    return "disconnected by the server"
            except TimeoutError:
                continue
        return "held to the end"

    def _slow_reader(self) -> str:
        with _transmission(self.nbd, self.export, self.context) as sock:
            sock.sendall(b"".join(_request(proto.CMD_READ, h, 0, MAX_BLOCK) for h in range(64)))
            self._stop.wait()  # never reads a reply
        return "held to the end"

    def _idle(self, address: tuple[str, int]) -> str:
        with socket.create_connection(address, timeout=WAIT) as sock:
            return self._until_closed(sock)

    def _oversize(self) -> str:
        with _transmission(self.nbd, self.export, self.context) as sock:
            sock.sendall(_request(proto.CMD_WRITE, 1, 0, 2 * MAX_BLOCK))
            return self._until_closed(sock)

    def _malformed(self) -> str:
        with _greet(self.nbd) as sock:
            if _option(sock, proto.OPT_GO, _go(self.export)) != proto.REP_ERR_TLS_REQD:
                return "answered in plaintext"
            sock.sendall(bytes(proto.OPTION.size))  # no IHAVEOPT
            return self._until_closed(sock)

    def _unauthenticated(self) -> str:
        with socket.create_connection(self.control, timeout=WAIT) as sock:
            sock.sendall(json.dumps({"id": 1, "op": "mark"}).encode() + b"\n" + b"x" * (100 << 10))
            return self._until_closed(sock)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT + 1)


# -- one phase ----------------------------------------------------------------------------------
def peak_rss(pid: int) -> int:
    """The peak resident set of process ``pid`` in bytes (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def phase(
    work: Path, creds: Path, secret: Path, args: argparse.Namespace, seed: int, clients: int
) -> dict:
    """A fresh server, the host writer for ``args.seconds`` beside ``clients`` clients of each
    kind; its stats, the server's peak RSS, the refusals it logged and the machine's load
    average (other processes share its CPUs)."""
    log = work / f"serve-{seed}-{clients}.log"
    secure = ["--tls=require", "--tls-verify-peer", "--tls-creds", str(creds)]
    secure += ["--secret-file", str(secret), "--max-clients", str(args.max_clients)]
    authenticated = Credentials("client", tls_creds=creds, secret_file=secret)
    with ExitStack() as stack:
        server = IscServer(work / "source.img", log, *secure, credentials=authenticated)
        stack.callback(server.close)
        address, export, _ = parse_uri(server.uri)
        assert isinstance(address, tuple)
        uri = f"{server.uri}?tls-certificates={creds}"
        writer = stack.enter_context(HostWriter(uri, qd=8, block=4096, seed=seed))
        crowd = None
        if clients:
            control = server.sock.getpeername()[:2]
            context = client_context(creds, check_hostname=True, certificate=True)
            crowd = Misbehaving(clients, (address, export), control, context)
            stack.callback(crowd.stop)
        time.sleep(WARM_UP)  # alone too: both phases start the writer alike
        load = os.getloadavg()[0]
        writer.run()
        time.sleep(args.seconds)
        stats = writer.pause()
        status = server.request("status")  # the control port still answers its client
        assert "state" in status, status
        peak = peak_rss(server.proc.pid)
    text = log.read_text()
    return {
        "clients": crowd.size if crowd else 0,
        "rate": stats["rate"],
        "p99_us": stats["p99"],
        "max_gap_us": stats["max_gap_us"],
        "peak_rss": peak,
        "load": load,
        "logged": {
            "max_clients": text.count("(max_clients)"),
            "handshake_timeout": text.count("did not finish the handshake"),
            "protocol": text.count("broke the protocol"),
            "tls": text.count("TLS with"),
            "control": text.count("control connection from"),
        },
        "outcomes": dict(crowd.outcomes) if crowd else {},
    }


# -- the report ---------------------------------------------------------------------------------
def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def report(alone: list[dict], crowded: list[dict], args: argparse.Namespace) -> str:
    base = median(alone, "peak_rss")
    bound = base + MAX_DATA + args.max_clients * PER_CONNECTION
    rows = [
        "| host writer | clients | writes/s | p99 µs | worst stall ms | server peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in (("alone", alone), ("beside misbehaving clients", crowded)):
        rows.append(
            f"| {name} | {runs[0]['clients']} | {median(runs, 'rate'):,.0f} | "
            f"{median(runs, 'p99_us'):,.0f} | {median(runs, 'max_gap_us') / 1000:,.1f} | "
            f"{median(runs, 'peak_rss') / MIB:,.0f} MiB |"
        )
    ratio = median(crowded, "rate") / median(alone, "rate")
    peak = max(run["peak_rss"] for run in crowded)
    per_client = (median(crowded, "peak_rss") - base) / crowded[0]["clients"]
    logged: collections.Counter[str] = collections.Counter()
    for run in crowded:
        logged.update(run["logged"])
    rows += [
        "",
        f"Host write rate beside the clients: {ratio:.0%} of its rate alone (target >= 80%).",
        f"Server peak RSS beside the clients: at most {peak / MIB:,.0f} MiB; the bound of the "
        f"caps is {bound / MIB:,.0f} MiB (alone + max_data {MAX_DATA // MIB} MiB + "
        f"{args.max_clients} connections x {PER_CONNECTION / MIB:.1f} MiB). Each misbehaving "
        f"client added {per_client / MIB:,.1f} MiB: {args.max_clients} of them would peak near "
        f"{(base + args.max_clients * per_client) / MIB:,.0f} MiB.",
        "Server log lines over the rounds beside the clients: "
        + ", ".join(f"{key} {value}" for key, value in sorted(logged.items())),
        "",
        "Per round, alone | beside: writes/s, peak RSS MiB, load average at the start: "
        + "; ".join(
            f"{a['rate']:,.0f} | {c['rate']:,.0f}, {a['peak_rss'] / MIB:.0f} | "
            f"{c['peak_rss'] / MIB:.0f}, {a['load']:.1f} | {c['load']:.1f}"
            for a, c in zip(alone, crowded, strict=True)
        ),
    ]
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="clients of each kind (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="host writes per phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both phases (default 3)")
    parser.add_argument(
        "--max-clients", type=int, default=16, help="isc serve --max-clients (default 16)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch(SIZE + 64 * MIB) as work:
        (work / "credentials").mkdir()
        creds = make_credentials(work / "credentials")["good"]
        secret = work / "secret"
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
        with open(work / "source.img", "wb") as source:
            for _ in range(SIZE // MIB):  # allocated, so that no phase pays for it
                source.write(bytes(MIB))
        alone, crowded = [], []
        for seed in range(args.rounds):
            alone.append(phase(work, creds, secret, args, seed, 0))
            crowded.append(phase(work, creds, secret, args, seed, args.clients))
            print(f"round {seed + 1}: {json.dumps([alone[-1], crowded[-1]])}", flush=True)
        print(report(alone, crowded, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
