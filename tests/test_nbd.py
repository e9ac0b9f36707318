"""NBD: isc's client against qemu-nbd and nbdkit, isc's server against libnbd and QEMU tools.

Every server and tool is a real process on a Unix socket in ``tmp_path`` (one
test uses TCP on loopback), started fresh per test and killed in a
``finally``; every wait on one is bounded. The tools come from the Debian
packages qemu-utils, nbdkit and libnbd-bin (``.ci/run`` installs them); a
test whose tool is missing is skipped, naming it.

The robustness tests speak the protocol by hand (:class:`Raw`, with the
spec's numbers written out again here) to send what no well-behaved client
sends.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from isc import CopyJob, Destination, DestState, FileLUN, MemoryLUN, Session
from isc.errors import ParameterError, RangeError, StateError
from isc.lun import RECONNECT_BACKOFF, ReconnectingLUN
from isc.nbd import (
    IN_FLIGHT,
    MAX_BLOCK,
    NBD_PORT,
    NBDLUN,
    REQUEST_SIZE,
    ClientTLS,
    NBDAddress,
    NBDServer,
    SessionLUN,
    TransmissionFlag,
    parse_uri,
)
from isc.nbd.proto import own_export
from isc.tls import ServerTLS, client_context

SEED = 20261124
KIB = 1 << 10
MIB = 1 << 20
SIZE = 32 * MIB  # big enough that a whole-LUN transfer runs several windows of requests
WAIT = 10.0  # seconds any server gets to start listening
TOOL_TIMEOUT = 60  # seconds any tool run gets

PACKAGES = "the Debian packages qemu-utils, nbdkit and libnbd-bin (.ci/run installs them)"


def tool(name: str) -> str:
    """The path of ``name``, or skip the test naming the package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed; it comes with {PACKAGES}")
    return path


def run(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool to the end (at most TOOL_TIMEOUT); fail with its output unless it succeeds."""
    done = subprocess.run(
        [os.fspath(a) for a in args],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode:
        raise AssertionError(f"{args[0]} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


def wait_listening(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Return once the Unix socket at ``path`` accepts a connection; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(os.fspath(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.args!r} did not listen on {path} within {WAIT} s")
        # Pace the polling by waiting on the process itself: returns early if it dies.
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.02)


@dataclass
class Remote:
    """A running NBD server process (or isc's server) and how to reach it."""

    uri: str
    proc: subprocess.Popen[bytes] | None = None
    backing: Path | None = None  # the file that holds the export's bytes, if any


@contextmanager
def spawn(
    args: list[str], sock: Path, backing: Path | None = None, name: str = ""
) -> Iterator[Remote]:
    """Run a server process listening on ``sock``; kill it on exit, whatever happened."""
    with open(sock.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_listening(sock, proc)
            yield Remote(f"nbd+unix:///{name}?socket={sock}", proc, backing)
        finally:
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a stopped process
            proc.wait(timeout=WAIT)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextmanager
def qemu_nbd(tmp_path: Path, *options: str, size: int = SIZE, name: str = "") -> Iterator[Remote]:
    """``qemu-nbd`` exporting a new sparse raw file of ``size`` bytes."""
    backing = sparse(tmp_path / "qemu.img", size)
    sock = tmp_path / "qemu.sock"
    args = [tool("qemu-nbd"), "-f", "raw", "-k", str(sock), "--persistent", "--shared=8"]
    args += ["--export-name", name, *options, str(backing)]
    with spawn(args, sock, backing, quote_name(name)) as remote:
        yield remote


@contextmanager
def nbdkit(tmp_path: Path, *plugin: str, backing: Path | None = None) -> Iterator[Remote]:
    """``nbdkit`` in the foreground with ``plugin`` (and filters) on a Unix socket."""
    sock = tmp_path / "nbdkit.sock"
    args = [tool("nbdkit"), "--foreground", "--exit-with-parent", "--unix", str(sock), *plugin]
    with spawn(args, sock, backing) as remote:
        yield remote


def quote_name(name: str) -> str:
    return name.replace("%", "%25").replace(" ", "%20")


@pytest.fixture(params=["qemu-nbd", "nbdkit-memory", "nbdkit-file", "isc"])
def remote(request, tmp_path: Path) -> Iterator[Remote]:
    """Each server isc's client must work against, exporting SIZE zero bytes."""
    if request.param == "qemu-nbd":
        with qemu_nbd(tmp_path) as found:
            yield found
    elif request.param == "nbdkit-memory":
        with nbdkit(tmp_path, "memory", f"size={SIZE}") as found:
            yield found
    elif request.param == "nbdkit-file":
        backing = sparse(tmp_path / "nbdkit.img", SIZE)
        with nbdkit(tmp_path, "file", str(backing), backing=backing) as found:
            yield found
    else:
        lun = FileLUN.create(tmp_path / "isc.img", SIZE)
        try:
            with NBDServer(lun, name="disk") as server:
                server.start_unix(tmp_path / "isc.sock")
                yield Remote(server.uri, None, Path(lun.path))
        finally:
            lun.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., NBDServer]]:
    """Start isc servers exporting "disk" on Unix sockets in ``tmp_path``; closed after the test."""
    servers: list[NBDServer] = []

    def start(lun, **options) -> NBDServer:
        server = NBDServer(lun, name="disk", **options)
        server.start_unix(tmp_path / f"isc{len(servers)}.sock")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def random_file(path: Path, size: int, seed: int = SEED) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def in_threads(work: Callable[[int], object], count: int, limit: float = TOOL_TIMEOUT) -> None:
    """Run ``work(0) ... work(count - 1)`` in threads; fail with the first error any raised.

    Fails, without waiting any longer, when a thread still runs after ``limit``
    seconds: a deadlock fails the test instead of hanging it (the threads are
    daemons, and a caller must not then close a LUN they may still hold).
    """
    failures: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + limit
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        pytest.fail(f"{stuck} still running after {limit} s: deadlocked?")
    if failures:
        raise failures[0]


# -- URIs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("nbd://example.com", NBDAddress(("example.com", NBD_PORT), "")),
        ("nbd://example.com/", NBDAddress(("example.com", NBD_PORT), "")),
        ("nbd://example.com:1234/disk", NBDAddress(("example.com", 1234), "disk")),
        ("nbd://example.com//disk", NBDAddress(("example.com", NBD_PORT), "/disk")),
        ("nbd://10.0.0.1/hello%20world", NBDAddress(("10.0.0.1", NBD_PORT), "hello world")),
        ("nbd://[::1]:10810/x", NBDAddress(("::1", 10810), "x")),
        ("nbd+unix:///disk?socket=sock", NBDAddress("sock", "disk")),
        ("nbd+unix:///?socket=/run/nbd%20a.sock", NBDAddress("/run/nbd a.sock", "")),
        ("nbd+unix://?socket=%00/abstract", NBDAddress("\0/abstract", "")),
        ("nbds://example.com/disk", NBDAddress(("example.com", NBD_PORT), "disk", ClientTLS())),
        (
            "nbds://example.com:1234/d?tls-certificates=/etc/pki/x&tls-verify-peer=false",
            NBDAddress(("example.com", 1234), "d", ClientTLS("/etc/pki/x", False)),
        ),
        (
            "nbds+unix:///d?socket=s&tls-certificates=c&tls-verify-peer=TRUE",
            NBDAddress("s", "d", ClientTLS("c", True)),
        ),
    ],
)
def test_parse_uri_reads_the_standard_forms(uri, expected):
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("http://example.com/disk", "scheme"),
        ("nbds://example.com/disk?tls-psk-file=keys", "TLS-PSK"),
        ("nbds://alice@example.com/", "TLS-PSK"),
        ("nbd+unix:///?socket=s&tls-certificates=d", "need TLS"),
        ("nbds://example.com/?tls-verify-peer=maybe", "true or false"),
        ("nbds://example.com/?tls-certificates=a&tls-certificates=b", "once"),
        ("nbds://example.com/?tls-certificates=", "once"),
        ("nbds://example.com/?socket=s", "no query parameter"),
        ("nbd:///disk", "needs a host"),
        ("nbd://example.com:99999/", "valid"),
        ("nbd://example.com:port/", "valid"),
        ("nbd://example.com/?socket=s", "no query"),
        ("nbd://user@example.com/", "user info"),
        ("nbd://example.com/disk#part", "fragment"),
        ("nbd://example.com/a%00b", "NUL"),
        ("nbd+unix:///disk", "socket"),
        ("nbd+unix:///disk?socket=", "socket"),
        ("nbd+unix:///disk?socket=a&socket=b", "socket"),
        ("nbd+unix://host/disk?socket=s", "no host"),
        ("nbd+unix:///disk?socket=s&tls-type=x509", "unknown query"),
        ("nbd:disk", "export name"),
    ],
)
def test_parse_uri_refuses_what_it_cannot_use(uri, why):
    with pytest.raises(ParameterError, match=why):
        parse_uri(uri)


def test_a_bad_uri_or_timeout_raises_before_connecting():
    with pytest.raises(ParameterError):
        NBDLUN("nbd+unix:///disk")
    with pytest.raises(ParameterError, match="timeout"):
        NBDLUN("nbd+unix:///?socket=/nonexistent", timeout=0)
    with pytest.raises(FileNotFoundError):
        NBDLUN("nbd+unix:///?socket=/nonexistent/isc.sock")


# -- the client against every server ---------------------------------------------------------
def test_random_io_matches_a_model(remote: Remote):
    rng = random.Random(SEED)
    model = bytearray(SIZE)
    with NBDLUN(remote.uri, timeout=30) as lun:
        assert lun.size == SIZE
        assert not lun.readonly
        for _ in range(200):
            roll = rng.random()
            offset = rng.randrange(SIZE)
            length = rng.randrange(min(SIZE - offset, 300 * KIB) + 1)
            if roll < 0.45:
                data = rng.randbytes(length)
                lun.write(offset, data)
                model[offset : offset + length] = data
            elif roll < 0.7:
                assert lun.read(offset, length) == model[offset : offset + length]
            elif roll < 0.95:
                buffer = bytearray(length)
                lun.readinto(offset, memoryview(buffer))
                assert buffer == model[offset : offset + length]
            else:
                lun.flush()
        # More than a window of requests each way, from an odd offset.
        big = rng.randbytes(IN_FLIGHT * REQUEST_SIZE + 3 * REQUEST_SIZE // 2 + 7)
        lun.write(5, big)
        model[5 : 5 + len(big)] = big
        assert lun.read(0, SIZE) == model
        lun.flush()
    assert lun.closed
    if remote.backing is not None:
        assert remote.backing.read_bytes() == model


def test_any_buffer_reads_and_writes(remote: Remote):
    with NBDLUN(remote.uri) as lun:
        words = np.arange(1000, dtype=np.uint64)
        lun.write(8, words)
        back = np.zeros(1000, dtype=np.uint64)
        lun.readinto(8, back)
        assert np.array_equal(back, words)
        lun.write(0, memoryview(b"abcdefgh")[2:6])
        assert lun.read(0, 4) == b"cdef"
        assert lun.read(100, 0) == b""
        with pytest.raises(TypeError):
            lun.readinto(0, b"read-only buffer")


def test_out_of_range_raises_range_error_and_keeps_the_connection(remote: Remote):
    lun = NBDLUN(remote.uri)
    lun.write(SIZE - 4, b"tail")
    for offset, length in [(-1, 1), (SIZE - 3, 4), (SIZE, 1), (0, -1), (0, SIZE + 1)]:
        with pytest.raises(RangeError):
            lun.read(offset, length)
    with pytest.raises(RangeError):
        lun.write(SIZE - 3, b"tail")
    buffer = bytearray(b"keep")
    with pytest.raises(RangeError):
        lun.readinto(SIZE - 3, buffer)
    assert buffer == b"keep"
    assert lun.read(SIZE - 4, 4) == b"tail"
    lun.close()
    lun.close()
    assert lun.closed
    assert "closed" in repr(lun)
    for call in (lambda: lun.read(0, 1), lambda: lun.write(0, b"x"), lun.flush):
        with pytest.raises(StateError):
            call()


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_a_killed_server_raises_connection_error_and_closes_the_lun(tmp_path: Path, kind: str):
    start = qemu_nbd(tmp_path) if kind == "qemu-nbd" else nbdkit(tmp_path, "memory", f"{SIZE}")
    with start as remote:
        lun = NBDLUN(remote.uri, timeout=WAIT)
        lun.write(0, b"x" * 4096)
        remote.proc.kill()
        remote.proc.wait(timeout=WAIT)
        with pytest.raises(ConnectionError):
            lun.write(0, bytes(4 * MIB))
        assert lun.closed
        with pytest.raises(StateError):
            lun.read(0, 1)
        lun.close()


def test_a_stalled_server_times_out_and_closes_the_lun(tmp_path: Path):
    with nbdkit(tmp_path, "memory", f"{SIZE}") as remote:
        lun = NBDLUN(remote.uri, timeout=0.5)
        remote.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                lun.read(0, 4 * MIB)
            assert time.monotonic() - started < WAIT
            assert lun.closed
        finally:
            remote.proc.send_signal(signal.SIGCONT)


class StallingLUN(MemoryLUN):
    """A MemoryLUN whose writes wait, once ``stall`` is cleared, until it is set again."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.stall = threading.Event()
        self.stall.set()

    def write(self, offset, data):
        self.stall.wait(TOOL_TIMEOUT)
        super().write(offset, data)


def test_isc_update_timeout_bounds_every_wait_for_a_stalled_destination(tmp_path: Path):
    from isc.store import create_session, open_session

    source = tmp_path / "vol.img"
    source.write_bytes(random.Random(SEED).randbytes(MIB))
    dest = StallingLUN(MIB)
    state = tmp_path / "vol.isc"
    isc = [sys.executable, "-m", "isc.cli"]
    with NBDServer(dest, name="disk") as server:
        server.start_unix(tmp_path / "dest.sock")
        create_session(state, str(source), granularity=64 * KIB)
        stored, _ = open_session(state)
        with stored:
            stored.add_destination(server.uri, "d")
        run(*isc, "copy", state, "--full")
        stored, _ = open_session(state)
        with stored:
            stored.session.write(0, b"changed")
        dest.stall.clear()
        try:
            started = time.monotonic()
            done = run(*isc, "update", state, "--timeout", "1", check=False)
            took = time.monotonic() - started
        finally:
            dest.stall.set()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "within 1.0 s" in done.stderr, done.stderr
    assert took < 10, f"isc update --timeout 1 took {took:.1f} s"


def test_a_server_that_never_greets_times_out(tmp_path: Path):
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(os.fspath(path))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            NBDLUN(f"nbd+unix:///?socket={path}", timeout=0.3)
        assert time.monotonic() - started < WAIT


def test_export_names_and_an_unknown_export(tmp_path: Path):
    with qemu_nbd(tmp_path, size=4 * MIB, name="my disk") as remote:
        with NBDLUN(remote.uri) as lun:
            assert lun.size == 4 * MIB
            assert lun.target.export == "my disk"
        sock = remote.backing.with_suffix(".sock")
        with pytest.raises(FileNotFoundError, match="other"):
            NBDLUN(f"nbd+unix:///other?socket={sock}")


def test_a_read_only_export(tmp_path: Path):
    with qemu_nbd(tmp_path, "--read-only", size=4 * MIB) as remote, NBDLUN(remote.uri) as lun:
        assert lun.readonly
        assert lun.flags & TransmissionFlag.READ_ONLY
        assert lun.read(0, 10) == bytes(10)
        with pytest.raises(StateError, match="read-only"):
            lun.write(0, b"x")


def test_server_errors_raise_their_errno_and_keep_the_lun(tmp_path: Path):
    errors = ["--filter=error", "memory", f"{4 * MIB}", "error-pwrite=ENOSPC"]
    with nbdkit(tmp_path, *errors, "error-pwrite-rate=100%") as remote, NBDLUN(remote.uri) as lun:
        with pytest.raises(OSError) as failed:
            lun.write(0, bytes(3 * MIB))  # several requests, all failing
        assert failed.value.errno == errno.ENOSPC
        assert not lun.closed
        assert lun.read(0, 3 * MIB) == bytes(3 * MIB)


def test_eshutdown_makes_the_client_disconnect(tmp_path: Path):
    errors = ["--filter=error", "memory", f"{MIB}", "error-pread=ESHUTDOWN"]
    with nbdkit(tmp_path, *errors, "error-pread-rate=100%") as remote:
        lun = NBDLUN(remote.uri)
        with pytest.raises(OSError) as failed:
            lun.read(0, 10)
        assert failed.value.errno == errno.ESHUTDOWN
        assert lun.closed  # the spec: a client told ESHUTDOWN must disconnect


def test_block_size_constraints_are_obeyed(tmp_path: Path):
    policy = [
        "--filter=blocksize-policy",
        "memory",
        f"{4 * MIB}",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=64K",
        "blocksize-error-policy=error",  # a request that breaks them fails EINVAL
    ]
    rng = random.Random(SEED)
    model = bytearray(4 * MIB)
    with nbdkit(tmp_path, *policy) as remote, NBDLUN(remote.uri) as lun:
        assert lun.block_size == (512, 4096, 64 * KIB)
        for offset, length in [(1000, 3000), (100, 10), (511, 2), (4 * MIB - 7, 7), (77, MIB + 5)]:
            data = rng.randbytes(length)
            lun.write(offset, data)
            model[offset : offset + length] = data
            assert lun.read(offset - 1, length + 1) == model[offset - 1 : offset + length]
        assert lun.read(0, 4 * MIB) == model


@pytest.mark.parametrize("mask", ["0", "1"])
def test_servers_without_no_zeroes_or_fixed_newstyle(tmp_path: Path, mask: str):
    # 0: plain newstyle, so NBD_OPT_EXPORT_NAME and its 124 zero bytes; 1: no NO_ZEROES.
    plain = nbdkit(tmp_path, f"--mask-handshake={mask}", "memory", f"{MIB}")
    with plain as remote, NBDLUN(remote.uri) as lun:
        assert lun.size == MIB
        lun.write(10, b"hello")
        assert lun.read(8, 9) == b"\0\0hello\0\0"


def test_copy_job_sends_a_session_to_an_nbd_destination(tmp_path: Path):
    rng = random.Random(SEED)
    source = MemoryLUN(8 * MIB)
    session = Session(source, granularity=64 * KIB)
    for _ in range(50):
        session.write(rng.randrange(8 * MIB - 5000), rng.randbytes(rng.randrange(1, 5000)))
    with qemu_nbd(tmp_path, size=8 * MIB) as remote, NBDLUN(remote.uri) as lun:
        dest = Destination(lun, "remote")
        job = CopyJob(session, [dest])
        job.full(marked=False)
        assert dest.state is DestState.INCONSISTENT
        for _ in range(20):
            session.write(rng.randrange(8 * MIB - 5000), rng.randbytes(rng.randrange(1, 5000)))
        session.mark()
        result = job.incremental()
        assert dest.state is DestState.CONSISTENT
        assert result.bytes_sent < 8 * MIB
        assert lun.read(0, 8 * MIB) == source.read(0, 8 * MIB)


# -- isc's server against real clients --------------------------------------------------------
class CountingLUN(MemoryLUN):
    """A MemoryLUN that counts its flushes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushes = 0

    def flush(self) -> None:
        super().flush()
        self.flushes += 1


def test_nbdinfo_reads_the_export(serve):
    server = serve(MemoryLUN(SIZE))
    info = json.loads(run(tool("nbdinfo"), "--json", server.uri).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    assert export["can_flush"] is export["can_fua"] is export["can_zero"] is True
    assert export["can_multi_conn"] is export["can_df"] is export["can_cache"] is True
    assert export["can_fast_zero"] is True  # offered, and refused fast: memory cannot trim
    assert export["can_trim"] is False  # a MemoryLUN frees no space
    assert export["contexts"] == ["base:allocation"]
    assert export["block_size_maximum"] == MAX_BLOCK
    listed = json.loads(run(tool("nbdinfo"), "--list", "--json", server.uri).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["disk"]


def test_nbdinfo_over_tcp_and_a_read_only_export(tmp_path: Path):
    with NBDServer(MemoryLUN(MIB), name="disk", readonly=True) as server:
        server.start("127.0.0.1", 0)
        port = server.address[1]
        assert server.uri == f"nbd://127.0.0.1:{port}/disk"
        info = json.loads(run(tool("nbdinfo"), "--json", server.uri).stdout)
        (export,) = info["exports"]
        assert export["export-size"] == MIB
        assert export["is_read_only"] is True
        with NBDLUN(server.uri) as lun:
            assert lun.readonly
            assert lun.read(0, 16) == bytes(16)


def test_nbdcopy_to_and_from_the_server(serve, tmp_path: Path):
    lun = CountingLUN(SIZE)
    server = serve(lun)
    data = random_file(tmp_path / "src.img", SIZE)
    run(tool("nbdcopy"), "--flush", tmp_path / "src.img", server.uri)
    assert lun.read(0, SIZE) == data
    assert lun.flushes >= 1
    run(tool("nbdcopy"), server.uri, tmp_path / "dst.img")
    assert (tmp_path / "dst.img").read_bytes() == data


def test_qemu_img_convert_and_compare(serve, tmp_path: Path):
    lun = MemoryLUN(SIZE)
    server = serve(lun)
    src = tmp_path / "src.img"
    data = bytearray(random_file(src, SIZE))
    data[MIB : 2 * MIB] = bytes(MIB)  # a zero run, which qemu-img may send as WRITE_ZEROES
    src.write_bytes(data)
    lun.write(MIB, b"\xff" * MIB)
    qemu_img = tool("qemu-img")
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri)
    assert lun.read(0, SIZE) == data
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", src, server.uri)
    lun.write(SIZE - 1, b"\x01" if data[-1] != 1 else b"\x02")
    differs = run(qemu_img, "compare", "-f", "raw", "-F", "raw", src, server.uri, check=False)
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_qemu_io_writes_zeroes_fua_and_reads_back(serve):
    lun = CountingLUN(4 * MIB)
    lun.write(0, b"\xff" * (4 * MIB))
    server = serve(lun)
    qemu_io = tool("qemu-io")
    commands = ["write -P 0x55 0 64k", "write -z 128k 64k", "write -f -P 0x66 1M 4k", "flush"]
    run(qemu_io, "-f", "raw", *(arg for c in commands for arg in ("-c", c)), server.uri)
    assert lun.read(0, 64 * KIB) == b"\x55" * (64 * KIB)
    assert lun.read(64 * KIB, 64 * KIB) == b"\xff" * (64 * KIB)
    assert lun.read(128 * KIB, 64 * KIB) == bytes(64 * KIB)
    assert lun.read(MIB, 4 * KIB) == b"\x66" * (4 * KIB)
    assert lun.flushes >= 2  # the FUA write and the flush
    read = run(qemu_io, "-r", "-f", "raw", "-c", "read -P 0x55 0 64k", server.uri)
    assert "verification failed" not in read.stdout + read.stderr


def test_writes_from_qemu_io_are_tracked_host_writes(serve):
    session = Session(MemoryLUN(8 * MIB), granularity=64 * KIB)
    server = serve(SessionLUN(session))
    qemu_io = tool("qemu-io")
    writes = ["write -P 0x11 0 64k", "write -P 0x22 1048676 10", "write -P 0x33 5242879 2"]
    run(qemu_io, "-f", "raw", *(arg for c in writes for arg in ("-c", c)), server.uri)
    bitmap = session.bitmap
    assert {c for c in range(bitmap.chunks) if bitmap.tracking(c)} == {0, 16, 79, 80}
    # Marked: the next write to chunk 0 saves its point-in-time data first (COFW).
    session.mark()
    run(qemu_io, "-f", "raw", "-c", "write -P 0x44 0 4k", server.uri)
    assert bitmap.is_saved(0)
    assert session.read_frozen(0, 64 * KIB) == b"\x11" * (64 * KIB)
    assert session.read(0, 4 * KIB) == b"\x44" * (4 * KIB)


def test_a_session_lun_names_its_session_in_errors_not_its_repr():
    session = Session(MemoryLUN(MIB), granularity=64 * KIB, name="vol")
    lun = SessionLUN(session)
    with pytest.raises(RangeError, match=r"outside the export of session 'vol' \[0, 1048576\)"):
        lun.write_zeroes(MIB - 1, 2)
    lun.close()
    with pytest.raises(StateError, match=r"^the export of session 'vol' is closed") as closed:
        lun.read(0, 1)
    assert "<" not in str(closed.value)


def test_threads_share_one_lun(remote: Remote):
    # Disjoint regions, so the expected bytes do not depend on the interleaving.
    threads, region = 6, SIZE // 6
    expected = bytearray(SIZE)
    lun = NBDLUN(remote.uri, timeout=30)

    def worker(index: int) -> None:
        rng = random.Random(SEED + index)
        start = index * region
        for _ in range(25):
            length = rng.choice([1, 4096, 100_000, 3 * REQUEST_SIZE + 17])
            offset = start + rng.randrange(region - length)
            if rng.random() < 0.6:
                data = rng.randbytes(length)
                lun.write(offset, data)
                expected[offset : offset + length] = data
            else:
                assert lun.read(offset, length) == expected[offset : offset + length]

    in_threads(worker, threads)
    assert lun.read(0, SIZE) == expected
    lun.close()


def test_a_server_killed_under_concurrent_io_fails_every_thread(tmp_path: Path):
    outcomes: list[BaseException] = []
    running = threading.Barrier(5)

    def worker(index: int) -> None:
        try:
            for rounds in itertools.count():
                if rounds == 1:
                    running.wait(timeout=WAIT)  # every thread is through one call
                if index % 2:
                    lun.write(index * MIB, bytes(3 * MIB))
                else:
                    lun.read(index * MIB, 3 * MIB)
        except (OSError, StateError) as exc:
            outcomes.append(exc)

    with nbdkit(tmp_path, "memory", f"{SIZE}") as remote:
        lun = NBDLUN(remote.uri, timeout=WAIT)
        killer = threading.Thread(target=lambda: (running.wait(timeout=WAIT), remote.proc.kill()))
        killer.start()
        in_threads(worker, 4, limit=3 * WAIT)
        killer.join(timeout=WAIT)
    # Each thread saw the loss (ConnectionError) or, starting after it, a closed LUN.
    assert len(outcomes) == 4
    assert all(isinstance(e, (ConnectionError, StateError)) for e in outcomes), outcomes
    assert any(isinstance(e, ConnectionError) for e in outcomes)
    assert lun.closed
    lun.close()


class FailingLUN(MemoryLUN):
    """Writes at or past ``MIB`` fail ENOSPC; reads at 0 fail with a non-OSError."""

    def write(self, offset, data):
        if offset >= MIB:
            raise OSError(errno.EDQUOT, "quota exceeded")
        super().write(offset, data)

    def readinto(self, offset, buffer):
        if offset == 0:
            raise RuntimeError("broken")
        super().readinto(offset, buffer)


def test_lun_failures_reach_the_client_as_errors(serve):
    server = serve(FailingLUN(2 * MIB))
    with NBDLUN(server.uri) as lun:
        with pytest.raises(OSError) as full:
            lun.write(MIB, b"x")
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as broken:
            lun.read(0, 10)
        assert broken.value.errno == errno.EIO
        lun.write(10, b"fine")
        assert lun.read(8, 8) == b"\0\0fine\0\0"


def test_closing_the_server_disconnects_its_clients(tmp_path: Path, caplog):
    server = NBDServer(MemoryLUN(MIB))
    server.start_unix(tmp_path / "isc.sock")
    lun = NBDLUN(server.uri)
    lun.write(0, b"x")
    server.close()
    server.close()
    # An idle client's connection ends quietly: no traceback of its cancelled task.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not (tmp_path / "isc.sock").exists()
    with pytest.raises(ConnectionError):
        lun.read(0, 1)
    assert lun.closed
    with pytest.raises(StateError):
        server.start_unix(tmp_path / "again.sock")


def test_closing_the_server_ends_a_tls_connection_still_closing(
    tmp_path: Path, credentials, caplog
):
    # A TLS client dropped at the handshake timeout that stays connected and
    # never answers the server's close_notify: the server's side of the
    # connection is still closing when the server closes.
    tls = ServerTLS(credentials["good"])
    server = NBDServer(MemoryLUN(MIB), name="disk", tls=tls, handshake_timeout=0.2)
    server.start_unix(tmp_path / "isc.sock")
    with raw(server) as client:
        client.greet()
        assert client.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        context = client_context(credentials["good"], verify_peer=True, check_hostname=False)
        with context.wrap_socket(client.sock) as stalled:
            assert stalled.recv(1) == b""  # the server's close_notify, at its timeout
            with socket.socket(fileno=os.dup(stalled.fileno())) as below_tls:
                below_tls.settimeout(WAIT)
                server.close()
                # The server's socket is closed, not left to the garbage collector.
                assert below_tls.recv(1) == b""
    [timeout] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "did not finish the handshake within 0.2 s" in timeout  # and no traceback


def test_server_parameters():
    with pytest.raises(ParameterError):
        NBDServer(MemoryLUN(MIB), name="a\0b")
    with pytest.raises(ParameterError):
        NBDServer(MemoryLUN(MIB), name="x" * 4097)
    with pytest.raises(ParameterError):
        NBDServer(MemoryLUN(MIB), workers=0)
    with pytest.raises(StateError):
        _ = NBDServer(MemoryLUN(MIB)).uri


# -- robustness: what no well-behaved client sends ------------------------------------------------
# The spec's numbers, written out independently of isc.nbd.
NBDMAGIC, IHAVEOPT, OPTION_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
FIXED_NEWSTYLE, NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE = 0, 1, 3
CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 3, 6
FUA, NO_HOLE = 1, 2
EPERM, EINVAL, ENOSPC = 1, 22, 28


class Raw:
    """One end of a hand-rolled NBD conversation on a connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT)

    def recv(self, length: int) -> bytes:
        data = b""
        while len(data) < length:
            part = self.sock.recv(length - len(data))
            if not part:
                raise ConnectionError(f"closed after {len(data)} of {length} bytes")
            data += part
        return data

    def dropped(self) -> bool:
        """True when the server closes the connection (without sending anything more)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greet(self, flags: int = FIXED_NEWSTYLE | NO_ZEROES) -> int:
        magic, newstyle, server_flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, newstyle) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", flags))
        return server_flags

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the final one (ACK or an error)."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, echoed, reply, length = struct.unpack(">QIII", self.recv(20))
            assert (magic, echoed) == (OPTION_REPLY_MAGIC, option)
            replies.append((reply, self.recv(length)))
            if reply == REP_ACK or reply & 2**31:
                return replies

    @staticmethod
    def info_data(name: bytes, *requests: int) -> bytes:
        body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
        return body + struct.pack(f">{len(requests)}H", *requests)

    def go(self, name: bytes = b"disk") -> None:
        self.greet()
        assert self.option(OPT_GO, self.info_data(name))[-1][0] == REP_ACK

    def request(
        self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0, payload=b""
    ) -> None:
        handle = 0xC0FFEE
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, handle, offset, length)
        self.sock.sendall(header + payload)

    def reply(self) -> int:
        magic, error, echoed = struct.unpack(">IIQ", self.recv(16))
        assert (magic, echoed) == (SIMPLE_REPLY_MAGIC, 0xC0FFEE)
        return error


@contextmanager
def raw(server: NBDServer) -> Iterator[Raw]:
    """A hand-rolled client connected to ``server``'s Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(server.address)
        yield Raw(sock)


def patterned(size: int) -> MemoryLUN:
    lun = MemoryLUN(size)
    lun.write(0, bytes(range(256)) * (size // 256))
    return lun


def test_options_are_answered_as_the_spec_says(serve):
    server = serve(MemoryLUN(MIB))
    with raw(server) as client:
        assert client.greet() == FIXED_NEWSTYLE | NO_ZEROES
        for unsupported in (OPT_STARTTLS, 12345):
            assert [r for r, _ in client.option(unsupported)] == [REP_ERR_UNSUP]
        assert client.option(OPT_LIST, b"x")[0][0] == REP_ERR_INVALID
        assert client.option(OPT_LIST) == [(REP_SERVER, b"\0\0\0\x04disk"), (REP_ACK, b"")]
        assert client.option(OPT_INFO, client.info_data(b"nope"))[0][0] == REP_ERR_UNKNOWN
        assert client.option(OPT_GO, b"\0\0\0\x09disk\0\0")[0][0] == REP_ERR_INVALID
        assert client.option(OPT_GO, client.info_data(b"disk")[:-1])[0][0] == REP_ERR_INVALID
        assert client.option(OPT_GO, client.info_data(b"disk") + b"\0\3")[0][0] == REP_ERR_INVALID
        replies = client.option(OPT_INFO, client.info_data(b"disk", INFO_NAME, INFO_BLOCK_SIZE))
        flags = int(server.flags)
        assert replies == [
            (REP_INFO, struct.pack(">HQH", INFO_EXPORT, MIB, flags)),
            (REP_INFO, struct.pack(">H", INFO_NAME) + b"disk"),
            (REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 * MIB)),
            (REP_ACK, b""),
        ]
        # The default export "" is the same LUN; GO then enters transmission.
        assert client.option(OPT_GO, client.info_data(b"")) == replies[:1] + replies[-1:]
        client.request(CMD_READ, 0, 4)
        assert client.reply() == 0
        assert client.recv(4) == bytes(4)


def test_abort_and_bad_client_flags_end_the_handshake(serve):
    server = serve(MemoryLUN(MIB))
    with raw(server) as client:
        client.greet()
        assert client.option(OPT_ABORT) == [(REP_ACK, b"")]
        assert client.dropped()
    with raw(server) as client:
        client.greet(flags=FIXED_NEWSTYLE | 4)
        assert client.dropped()


def test_export_name_sends_zeroes_unless_asked_not_to(serve):
    server = serve(patterned(MIB))
    with raw(server) as client:
        client.greet(flags=FIXED_NEWSTYLE)
        client.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 4) + b"disk")
        size, flags = struct.unpack(">QH", client.recv(10))
        assert (size, flags) == (MIB, int(server.flags))
        assert client.recv(124) == bytes(124)
        client.request(CMD_READ, 256, 3)
        assert client.reply() == 0
        assert client.recv(3) == b"\0\1\2"
    with raw(server) as client:
        client.greet()
        client.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 4) + b"nope")
        assert client.dropped()  # the option cannot fail any other way


def test_bad_requests_get_errors_and_change_nothing(serve):
    lun = patterned(MIB)
    server = serve(lun)
    with raw(server) as client:
        client.go()
        for command, offset, length, flags, payload, error in [
            (99, 0, 0, 0, b"", EINVAL),  # unknown command
            (4, 0, 4096, 0, b"", EINVAL),  # TRIM, not advertised
            (CMD_READ, MIB - 10, 20, 0, b"", EINVAL),  # past the end
            (CMD_READ, 0, MAX_BLOCK + 1, 0, b"", EINVAL),  # over the maximum block size
            (CMD_READ, 0, 10, 0x80, b"", EINVAL),  # unknown flag
            (CMD_WRITE, MIB - 10, 20, 0, b"\xaa" * 20, ENOSPC),  # past the end
            (CMD_WRITE, 0, 20, 0x80, b"\xaa" * 20, EINVAL),  # unknown flag
            (CMD_WRITE, 2**64 - 10, 20, 0, b"\xaa" * 20, ENOSPC),  # offset + length overflows
            (CMD_WRITE_ZEROES, MIB - 10, 20, 0, b"", ENOSPC),
            (CMD_FLUSH, 1, 0, 0, b"", EINVAL),  # offset and length are reserved
        ]:
            client.request(command, offset, length, flags=flags, payload=payload)
            assert client.reply() == error, (command, offset, length, flags)
        client.request(CMD_READ, 0, MIB)
        assert client.reply() == 0
        assert client.recv(MIB) == patterned(MIB).read(0, MIB)
    assert lun.read(0, MIB) == patterned(MIB).read(0, MIB)


def test_fua_and_flush_reach_the_lun_before_the_reply(serve):
    lun = CountingLUN(MIB)
    server = serve(lun)
    with raw(server) as client:
        client.go()
        client.request(CMD_WRITE, 0, 4, payload=b"abcd")
        assert client.reply() == 0
        assert lun.flushes == 0
        client.request(CMD_WRITE, 0, 4, flags=FUA, payload=b"efgh")
        assert client.reply() == 0
        assert lun.flushes == 1
        client.request(CMD_WRITE_ZEROES, 4, 4, flags=FUA | NO_HOLE)
        assert client.reply() == 0
        assert lun.flushes == 2
        client.request(CMD_FLUSH)
        assert client.reply() == 0
        assert lun.flushes == 3
    assert lun.read(0, 9) == b"efgh\0\0\0\0\0"


def test_writes_to_a_read_only_export_fail_eperm(serve):
    lun = patterned(MIB)
    server = serve(lun, readonly=True)
    assert server.flags & TransmissionFlag.READ_ONLY
    with raw(server) as client:
        client.go()
        client.request(CMD_WRITE, 0, 4, payload=b"xxxx")
        assert client.reply() == EPERM
        client.request(CMD_WRITE_ZEROES, 0, 4)
        assert client.reply() == EPERM
    assert lun.read(0, MIB) == patterned(MIB).read(0, MIB)


def test_garbage_drops_only_its_own_connection(serve):
    lun = patterned(MIB)
    server = serve(lun)
    with NBDLUN(server.uri) as good, raw(server) as bad:
        bad.go()
        bad.sock.sendall(b"garbage! " * 10)
        assert bad.dropped()
        good.write(0, b"still here")
        assert good.read(0, 10) == b"still here"
    assert lun.read(10, MIB - 10) == patterned(MIB).read(10, MIB - 10)


def test_an_oversized_write_is_refused_and_its_client_dropped(serve):
    lun = patterned(MIB)
    server = serve(lun)
    with raw(server) as client:
        client.go()
        client.request(CMD_WRITE, 0, 64 * MIB, payload=b"\xaa" * 4096)
        assert client.reply() == EINVAL
        assert client.dropped()
    with NBDLUN(server.uri) as again:
        assert again.read(0, MIB) == patterned(MIB).read(0, MIB)


def test_a_client_gone_mid_write_payload_writes_nothing(serve):
    lun = patterned(MIB)
    server = serve(lun)
    with raw(server) as client:
        client.go()
        client.request(CMD_WRITE, 0, MIB, payload=b"\xaa" * (MIB // 2))
    # The payload can never complete now; the server goes on serving others.
    with NBDLUN(server.uri) as again:
        assert again.read(0, MIB) == patterned(MIB).read(0, MIB)
    assert lun.read(0, MIB) == patterned(MIB).read(0, MIB)


# -- the client against servers that break the protocol -------------------------------------------
@contextmanager
def fake_server(path: Path, script: Callable[[Raw], None]) -> Iterator[None]:
    """A one-connection server running ``script`` on the accepted socket in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen()
    failures: list[BaseException] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                script(Raw(conn))
            except BaseException as exc:
                failures.append(exc)

    thread = threading.Thread(target=serve_one)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=WAIT)
        listener.close()
    assert not thread.is_alive()
    assert not failures, failures


def old_server_handshake(peer: Raw, size: int = 4096) -> None:
    """Fixed newstyle without NBD_OPT_GO: answers it ERR_UNSUP, then takes EXPORT_NAME."""
    peer.sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES))
    assert struct.unpack(">I", peer.recv(4))[0] == FIXED_NEWSTYLE | NO_ZEROES
    magic, option, length = struct.unpack(">QII", peer.recv(16))
    assert (magic, option) == (IHAVEOPT, OPT_GO)
    peer.recv(length)
    peer.sock.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, OPT_GO, REP_ERR_UNSUP, 0))
    magic, option, length = struct.unpack(">QII", peer.recv(16))
    assert (magic, option, peer.recv(length)) == (IHAVEOPT, OPT_EXPORT_NAME, b"disk")
    peer.sock.sendall(struct.pack(">QH", size, 1 | 4))  # HAS_FLAGS | SEND_FLUSH; no zeroes


def test_the_client_keeps_at_most_in_flight_requests_on_the_wire(tmp_path: Path):
    size = (IN_FLIGHT + 1) * REQUEST_SIZE

    def script(peer: Raw) -> None:
        old_server_handshake(peer, size)
        window = [struct.unpack(">IHHQQI", peer.recv(28)) for _ in range(IN_FLIGHT)]
        # A full window sent, nothing answered: the next request must wait.
        assert select.select([peer.sock], [], [], 0.2)[0] == []
        for _, _, command, handle, offset, length in reversed(window):  # answer out of order
            assert (command, length) == (CMD_READ, REQUEST_SIZE)
            fill = bytes([offset // REQUEST_SIZE]) * length
            peer.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + fill)
        _, _, command, handle, offset, length = struct.unpack(">IHHQQI", peer.recv(28))
        assert (command, offset) == (CMD_READ, IN_FLIGHT * REQUEST_SIZE)
        fill = bytes([IN_FLIGHT]) * length
        peer.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + fill)
        assert struct.unpack(">IHHQQI", peer.recv(28))[2] == 2  # NBD_CMD_DISC

    path = tmp_path / "window.sock"
    with fake_server(path, script), NBDLUN(f"nbd+unix:///disk?socket={path}") as lun:
        data = lun.read(0, size)
    assert data == b"".join(bytes([i]) * REQUEST_SIZE for i in range(IN_FLIGHT + 1))


def test_the_client_falls_back_to_export_name(tmp_path: Path):
    def script(peer: Raw) -> None:
        old_server_handshake(peer)
        magic, _, command, handle, offset, length = struct.unpack(">IHHQQI", peer.recv(28))
        assert (magic, command, offset, length) == (REQUEST_MAGIC, CMD_READ, 8, 4)
        peer.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + b"data")
        assert struct.unpack(">IHHQQI", peer.recv(28))[2] == 2  # NBD_CMD_DISC

    path = tmp_path / "old.sock"
    with fake_server(path, script), NBDLUN(f"nbd+unix:///disk?socket={path}") as lun:
        assert lun.size == 4096
        assert lun.read(8, 4) == b"data"


def test_calls_from_two_threads_are_on_the_wire_together(tmp_path: Path):
    def script(peer: Raw) -> None:
        old_server_handshake(peer, 2 * REQUEST_SIZE)
        # Both threads' requests arrive before either is answered.
        first, second = (struct.unpack(">IHHQQI", peer.recv(28)) for _ in range(2))
        for _, _, command, handle, offset, length in (second, first):
            assert (command, length) == (CMD_READ, REQUEST_SIZE)
            fill = bytes([1 + offset // REQUEST_SIZE]) * length
            peer.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + fill)
        assert struct.unpack(">IHHQQI", peer.recv(28))[2] == 2  # NBD_CMD_DISC

    path = tmp_path / "two.sock"
    results: dict[int, bytes] = {}
    with fake_server(path, script):
        lun = NBDLUN(f"nbd+unix:///disk?socket={path}", timeout=WAIT)
        in_threads(lambda i: results.update({i: lun.read(i * REQUEST_SIZE, REQUEST_SIZE)}), 2)
        lun.close()
    assert results == {i: bytes([1 + i]) * REQUEST_SIZE for i in range(2)}


def test_a_server_serving_one_request_at_a_time_never_deadlocks_threads(tmp_path: Path):
    # It blocks sending a READ reply until the client reads it, and reads no
    # request meanwhile: a thread sending a WRITE payload must not keep the
    # thread owning that reply from reading it.
    size = 8 * MIB
    disk = bytearray(size)

    def script(peer: Raw) -> None:
        old_server_handshake(peer, size)
        while True:
            _, _, command, handle, offset, length = struct.unpack(">IHHQQI", peer.recv(28))
            if command == 2:  # NBD_CMD_DISC
                return
            reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle)
            if command == CMD_WRITE:
                disk[offset : offset + length] = peer.recv(length)
            elif command == CMD_READ:
                reply += disk[offset : offset + length]
            peer.sock.sendall(reply)

    path = tmp_path / "serial.sock"
    data = random.Random(SEED).randbytes(4 * MIB)

    def worker(index: int) -> None:
        for _ in range(4):
            if index:
                lun.write(4 * MIB, data)
            else:
                lun.read(0, 4 * MIB)

    with fake_server(path, script):
        lun = NBDLUN(f"nbd+unix:///disk?socket={path}", timeout=WAIT)
        in_threads(worker, 2, limit=3 * WAIT)
        assert lun.read(4 * MIB, 4 * MIB) == data
        lun.close()


@pytest.mark.parametrize("bad", ["structured", "unknown handle", "bad magic"])
def test_a_server_breaking_the_protocol_closes_the_lun(tmp_path: Path, bad: str):
    def script(peer: Raw) -> None:
        old_server_handshake(peer)
        handle = struct.unpack(">IHHQQI", peer.recv(28))[3]
        if bad == "structured":
            peer.sock.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, 0, handle, 0))
        elif bad == "unknown handle":
            peer.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle + 1))
        else:
            peer.sock.sendall(struct.pack(">IIQ", 0x12345678, 0, handle))
        peer.dropped()

    path = tmp_path / "bad.sock"
    with fake_server(path, script):
        lun = NBDLUN(f"nbd+unix:///disk?socket={path}")
        with pytest.raises(OSError) as broken:
            lun.read(0, 16)
        assert broken.value.errno == errno.EPROTO
        assert lun.closed


# -- a LUN that reconnects: a destination whose server goes away and comes back ----------------
def reconnecting(uri: str, size: int, clock: Callable[[], float] = time.monotonic):
    """A ReconnectingLUN on ``uri``; ``opens`` (an attribute) counts its connection attempts."""
    opens: list[float] = []

    def connect() -> NBDLUN:
        opens.append(clock())
        return NBDLUN(uri, timeout=WAIT)

    lun = ReconnectingLUN(connect, size, f"destination d at {uri}", clock=clock)
    lun.opens = opens  # type: ignore[attr-defined]
    return lun


def test_a_reconnecting_lun_reconnects_to_a_restarted_qemu_nbd(tmp_path: Path):
    backing = sparse(tmp_path / "disk.img", 4 * MIB)
    sock = tmp_path / "qemu.sock"
    args = [tool("qemu-nbd"), "-f", "raw", "-k", str(sock), "--persistent", str(backing)]
    uri = f"nbd+unix:///?socket={sock}"
    with reconnecting(uri, 4 * MIB) as lun:
        with spawn(args, sock) as remote:
            lun.write(0, b"a" * 4096)
            lun.flush()
            remote.proc.kill()
            remote.proc.wait(timeout=WAIT)
            with pytest.raises(ConnectionError, match=re.escape(f"d at {uri} lost its connection")):
                lun.write(0, bytes(4 * MIB))
        assert not lun.closed and lun.problem.startswith(f"destination d at {uri} lost its")
        with spawn(args, sock):
            lun.write(4096, b"b" * 4096)  # the next use reconnects, at once
            assert lun.problem is None and len(lun.opens) == 2
            assert lun.read(0, 8192) == b"a" * 4096 + b"b" * 4096
    assert lun.closed
    with pytest.raises(StateError, match="is closed"):
        lun.read(0, 1)


def test_a_reconnecting_lun_zeroes_with_write_zeroes_so_the_export_stays_sparse(tmp_path: Path):
    backing = sparse(tmp_path / "disk.img", 4 * MIB)
    sock = tmp_path / "qemu.sock"
    args = [tool("qemu-nbd"), "-f", "raw", "-k", str(sock), "--persistent", str(backing)]
    with spawn(args, sock), reconnecting(f"nbd+unix:///?socket={sock}", 4 * MIB) as lun:
        lun.write(0, b"a" * MIB)
        lun.flush()
        allocated = os.stat(backing).st_blocks
        lun.write_zeroes(0, 4 * MIB)
        lun.flush()
        assert lun.read(0, 4 * MIB) == bytes(4 * MIB)
        assert os.stat(backing).st_blocks < allocated  # freed, not written as data


def test_a_reconnecting_lun_backs_off_while_its_server_stays_down(tmp_path: Path):
    now = [100.0]
    path = tmp_path / "d.sock"
    uri = f"nbd+unix:///?socket={path}"
    data = MemoryLUN(MIB)
    with reconnecting(uri, MIB, clock=lambda: now[0]) as lun:
        assert lun.problem is None and not lun.opens  # nothing is tried before the first use
        with pytest.raises(RangeError):
            lun.write(MIB - 1, b"xy")
        assert not lun.opens
        with pytest.raises(ConnectionError, match=re.escape(f"d at {uri} is unreachable: No such")):
            lun.write(0, b"x")
        assert lun.problem == f"destination d at {uri} is unreachable: No such file or directory"
        first, most = RECONNECT_BACKOFF
        for delay in (first, 2 * first, 4 * first, 8 * first, 16 * first, 32 * first, most, most):
            now[0] += delay - 0.01
            with pytest.raises(ConnectionError, match=r"\(next try in 0.0 s\)"):
                lun.flush()  # fails at once: no connection is tried
            tried = len(lun.opens)
            now[0] += 0.01
            assert lun.reach() == lun.problem is not None
            assert len(lun.opens) == tried + 1
        with NBDServer(data) as server:
            server.start_unix(path)
            now[0] += most
            lun.write(MIB - 3, b"abc")
            assert lun.problem is None and lun.reach() is None
        assert data.read(MIB - 3, 3) == b"abc"
        with pytest.raises(ConnectionError, match="lost its connection"):
            lun.read(0, 1)
        with pytest.raises(ConnectionError, match="is unreachable"):
            lun.read(0, 1)  # after a lost connection the first reconnect is at once
        opens = len(lun.opens)
        with pytest.raises(ConnectionError, match=rf"next try in {first:.1f} s"):
            lun.read(0, 1)  # ... and the backoff starts again from the first delay
        assert len(lun.opens) == opens


def test_a_reconnecting_lun_refuses_an_export_smaller_than_it(serve):
    server = serve(MemoryLUN(MIB - 512))
    short = f"it holds {MIB - 512} bytes, not the {MIB}"
    with reconnecting(server.uri, MIB) as lun, pytest.raises(ConnectionError, match=short):
        lun.read(0, 1)


# -- NBDLUN.reconnect: a new connection for an export whose server cut the old one ------------
def test_reconnect_goes_on_over_a_new_connection_after_the_server_cut_the_old(tmp_path: Path):
    image = MemoryLUN(MIB)
    socket_path = tmp_path / "nbd.sock"
    with NBDServer(image, name="disk") as server:
        server.start_unix(socket_path)
        lun = NBDLUN(f"nbd+unix:///disk?socket={socket_path}")
        lun.write(0, b"a" * 4096)
        assert server.fence() is None  # cuts the connection open, as an agent's protect does
        lun.reconnect()
        lun.write(4096, b"b" * 4096)
        assert lun.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        assert image.read(4096, 4096) == b"b" * 4096
        lun.reconnect()  # also over a connection still usable: a polite goodbye, then on
        assert lun.read(0, 4096) == b"a" * 4096
        lun.close()
        with pytest.raises(StateError, match="is closed"):
            lun.reconnect()


def test_a_client_refuses_an_export_describing_itself_as_it_was_told_at_every_connection(
    tmp_path: Path,
):
    """``NBDLUN(refuse=...)``: a session's destinations refuse its own ``isc serve`` export
    by the description it gives (``NBD_INFO_DESCRIPTION``), whatever address it answers at,
    at the first connection and at a reconnect to a server that came since."""
    socket_path = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={socket_path}"
    own = own_export(0x1234)
    with NBDServer(MemoryLUN(MIB), name="disk") as server:
        server.start_unix(socket_path)
        lun = NBDLUN(uri, refuse=own)  # another server: taken
        lun.write(0, b"a" * 4096)
    with NBDServer(MemoryLUN(MIB), name="disk", description=own) as server:
        server.start_unix(socket_path)
        with pytest.raises(OSError, match="describes itself as 'isc export of the source") as err:
            lun.reconnect()
        assert err.value.errno == errno.EINVAL
        with pytest.raises(OSError, match="describes itself"):
            NBDLUN(uri, refuse=own)
        with NBDLUN(uri, refuse=own_export(0x4321)) as other, NBDLUN(uri) as plain:
            other.write(0, b"b" * 4096)  # another session's destination, and a host: served
            assert plain.read(0, 4096) == b"b" * 4096
        if shutil.which("nbdinfo"):
            shown = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, check=True)
            assert json.loads(shown.stdout)["exports"][0]["description"] == own
    lun.close()
    with pytest.raises(ParameterError, match="a description is a str without NUL"):
        NBDServer(MemoryLUN(MIB), description="a\0b")


def test_reconnect_to_an_export_of_another_size_or_to_no_server_keeps_the_lun_as_it_was(
    tmp_path: Path,
):
    socket_path = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={socket_path}"
    with NBDServer(MemoryLUN(MIB), name="disk") as server:
        server.start_unix(socket_path)
        lun = NBDLUN(uri)
    with pytest.raises(OSError):  # the server is gone: nothing to connect to
        lun.reconnect()
    assert lun.size == MIB
    with NBDServer(MemoryLUN(2 * MIB), name="disk") as server:
        server.start_unix(socket_path)
        with pytest.raises(StateError, match=f"now exports {2 * MIB} bytes, not {MIB}"):
            lun.reconnect()
        assert lun.size == MIB
        with pytest.raises(ConnectionError):  # still the old connection, which the server ended
            lun.read(0, 4096)
    lun.close()
