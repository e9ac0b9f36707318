"""Security of the NBD face: TLS on isc's server and client, against real peers.

Every server and client is real: isc's :class:`NBDServer` and ``isc serve``,
qemu-nbd with ``--tls-creds``, nbdkit with ``--tls=require``, libnbd's
``nbdinfo``/``nbdcopy`` and python3-libnbd, all over real TLS with
certificates ``openssl`` made for the run (the ``credentials`` fixture,
tests/certs.py). Each refused peer (another CA, an expired or missing
certificate, a plaintext client against ``require``, a server that offers
no TLS to an ``nbds`` URI) must get a clear message and change nothing on
any LUN, and the legitimate client must still work afterwards. A test
whose tool is missing is skipped, naming it.

Without TLS required and peers verified an export serves its own user alone,
loopback TCP included: clients run as another user (uid 65534, through
``setpriv``; those tests need root) are refused, unless the server is insecure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import Gate, HookLUN, Worker
from test_agent import ENV, daemon
from test_nbd import (
    CMD_FLUSH,
    CMD_WRITE,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_STARTTLS,
    REP_ACK,
    REP_ERR_UNSUP,
    REQUEST_MAGIC,
    Raw,
    nbdkit,
    qemu_nbd,
    raw,
    run,
    tool,
)
from test_nbd_protocol import OPT_SET_META_CONTEXT, Client

from isc import MemoryLUN
from isc.errors import AuthenticationError, ParameterError
from isc.nbd import MAX_BLOCK, NBDLUN, NBDServer, parse_uri
from isc.nbd.proto import REQUEST
from isc.nbd.server import _INLINE, _PIECE, _REPLY_BACKLOG, _STAGING, _UNIX_SEND_BUFFER, _Channel
from isc.tls import ServerTLS, client_context

SEED = 20261212
KIB, MIB = 1 << 10, 1 << 20
SIZE = MIB
REP_ERR_INVALID, REP_ERR_TLS_REQD = 2**31 + 3, 2**31 + 5
WAIT = 10.0

# What each refused client hears; the key names the credentials directory it uses.
REFUSED = {
    "other-ca": "its certificate is not trusted",
    "expired": "refuses the client's certificate",
    "no-client": "refuses the client's certificate",
}


def with_tls(uri: str, directory: Path | None = None, **params: str) -> str:
    """``uri`` (nbd or nbds) made an nbds URI with ``tls-certificates=directory``."""
    scheme, rest = uri.split("://", 1)
    uri = f"{scheme.replace('nbds', 'nbd').replace('nbd', 'nbds', 1)}://{rest}"
    if directory is not None:
        params = {"tls-certificates": quote(str(directory), safe="/"), **params}
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"{uri}{'&' if '?' in uri else '?'}{query}" if query else uri


NOBODY = 65534
"""The uid and gid of the other user that tests act as."""
PYTHON = "/usr/bin/python3"
"""The system's Python: another user can run it, and python3-libnbd is for it."""


def another_user() -> list[str]:
    """The command that runs a program as uid and gid :data:`NOBODY`; skips the test
    unless this process is root and has setpriv."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("acting as another user needs root and setpriv (util-linux)")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def plain(uri: str) -> str:
    """The same export without TLS."""
    return uri.replace("nbds", "nbd", 1).split("&tls-", 1)[0]


@contextmanager
def isc_server(
    tmp_path: Path, creds: Path | None, *, mode: str = "require", verify_peer: bool = True
) -> Iterator[tuple[NBDServer, HookLUN, bytes]]:
    """An isc server of random data on a Unix socket; yields it, its LUN and the data."""
    lun = HookLUN(MemoryLUN(SIZE))
    data = random.Random(SEED).randbytes(SIZE)
    lun.lun.write(0, data)
    tls = ServerTLS(creds, mode=mode, verify_peer=verify_peer) if creds is not None else None
    with NBDServer(lun, name="disk", tls=tls) as server:
        server.start_unix(tmp_path / "isc.sock")
        yield server, lun, data


def assert_unchanged(lun: HookLUN, data: bytes) -> None:
    assert lun.writes == 0, f"{lun.writes} write(s) reached the LUN"
    assert lun.lun.read(0, SIZE) == data


def round_trip(uri: str, seed: int = SEED) -> None:
    """A legitimate client writes and reads back over ``uri``."""
    piece = random.Random(seed).randbytes(64 * KIB)
    with NBDLUN(uri, timeout=WAIT) as lun:
        lun.write(128 * KIB, piece)
        lun.flush()
        assert lun.read(128 * KIB, len(piece)) == piece


# -- isc's server and client ---------------------------------------------------------------
def test_the_client_and_server_speak_tls_from_many_threads(tmp_path, credentials):
    with isc_server(tmp_path, credentials["good"]) as (server, lun, data):
        assert server.uri.startswith("nbds+unix://")
        model = bytearray(data)
        with NBDLUN(with_tls(server.uri, credentials["good"]), timeout=WAIT) as client:

            def work(index: int) -> None:
                rng = random.Random(SEED + index)
                region = index * SIZE // 4
                for _ in range(40):
                    offset = region + rng.randrange(0, SIZE // 4 - 64 * KIB)
                    piece = rng.randbytes(rng.randrange(1, 64 * KIB))
                    client.write(offset, piece)
                    model[offset : offset + len(piece)] = piece
                    assert client.read(offset, len(piece)) == piece

            workers = [Worker(lambda i=i: work(i)) for i in range(4)]
            for worker in workers:
                worker.finish()
            assert client.read(0, SIZE) == bytes(model)
        assert lun.lun.read(0, SIZE) == bytes(model)


@pytest.mark.parametrize("creds", sorted(REFUSED))
def test_a_client_with_wrong_credentials_is_refused_and_changes_nothing(
    tmp_path, credentials, creds
):
    with isc_server(tmp_path, credentials["good"]) as (server, lun, data):
        with pytest.raises(AuthenticationError, match=REFUSED[creds]) as refused:
            NBDLUN(with_tls(server.uri, credentials[creds]), timeout=WAIT)
        assert "\n" not in str(refused.value)
        assert_unchanged(lun, data)
        round_trip(with_tls(server.uri, credentials["good"]))


def test_a_plaintext_client_is_refused_by_require(tmp_path, credentials):
    with isc_server(tmp_path, credentials["good"]) as (server, lun, data):
        with pytest.raises(PermissionError, match=r"TLS is required.*use an nbds"):
            NBDLUN(plain(server.uri), timeout=WAIT)
        assert_unchanged(lun, data)
        round_trip(with_tls(server.uri, credentials["good"]))


def test_an_expired_server_certificate_is_refused(tmp_path, credentials):
    with isc_server(tmp_path, credentials["expired"], verify_peer=False) as (server, lun, data):
        with pytest.raises(AuthenticationError, match="certificate has expired"):
            NBDLUN(with_tls(server.uri, credentials["good"]), timeout=WAIT)
        assert_unchanged(lun, data)


def test_a_server_certificate_for_another_host_is_refused(credentials):
    # The certificate names localhost, 127.0.0.1 and ::1; 127.0.0.2 is loopback too.
    lun = HookLUN(MemoryLUN(SIZE))
    with NBDServer(lun, name="disk", tls=ServerTLS(credentials["good"])) as server:
        server.start("127.0.0.2", 0)
        with pytest.raises(AuthenticationError, match=r"not trusted \(.*127\.0\.0\.2"):
            NBDLUN(with_tls(server.uri, credentials["good"]), timeout=WAIT)
        named = server.uri.replace("127.0.0.2", "localhost")
        with pytest.raises(OSError):  # localhost is 127.0.0.1: nobody listens there
            NBDLUN(with_tls(named, credentials["good"]), timeout=WAIT)
        assert lun.writes == 0


def test_tls_verify_peer_false_encrypts_without_checking_the_server(tmp_path, credentials):
    with isc_server(tmp_path, credentials["good"], verify_peer=False) as (server, *_):
        uri = with_tls(server.uri, credentials["other-ca"], **{"tls-verify-peer": "false"})
        round_trip(uri)
        with pytest.raises(AuthenticationError, match="not trusted"):
            NBDLUN(with_tls(server.uri, credentials["other-ca"]), timeout=WAIT)


def test_tls_on_serves_plaintext_and_tls_clients(tmp_path, credentials):
    with isc_server(tmp_path, credentials["good"], mode="on", verify_peer=False) as (server, *_):
        assert server.uri.startswith("nbd+unix://")
        round_trip(server.uri, SEED + 1)
        round_trip(with_tls(server.uri, credentials["no-client"]), SEED + 2)


def test_an_nbds_uri_never_falls_back_to_plaintext(tmp_path, credentials):
    with isc_server(tmp_path, None) as (server, lun, data):
        with pytest.raises(AuthenticationError, match=r"does not offer TLS.*never falls back"):
            NBDLUN(with_tls(server.uri, credentials["good"]), timeout=WAIT)
        assert_unchanged(lun, data)
    refused = pytest.raises(AuthenticationError, match="does not offer TLS")
    with qemu_nbd(tmp_path, size=SIZE, name="disk") as remote, refused:
        NBDLUN(with_tls(remote.uri, credentials["good"]), timeout=WAIT)
    old = nbdkit(tmp_path, "--mask-handshake=0", "memory", f"{SIZE}")
    with old as remote, pytest.raises(AuthenticationError, match="fixed newstyle"):
        NBDLUN(with_tls(remote.uri, credentials["good"]), timeout=WAIT)


def test_bad_server_credentials_are_refused_before_listening(tmp_path, credentials):
    with pytest.raises(ParameterError, match="is not a directory"):
        ServerTLS(tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "server-cert.pem").write_bytes(
        (credentials["good"] / "server-cert.pem").read_bytes()
    )
    with pytest.raises(ParameterError, match=r"no server-key\.pem"):
        ServerTLS(partial)
    (partial / "server-key.pem").write_bytes(
        (credentials["other-ca"] / "server-key.pem").read_bytes()
    )
    (partial / "server-key.pem").chmod(0o600)
    with pytest.raises(ParameterError, match=r"cannot load server-cert\.pem"):
        ServerTLS(partial)
    (partial / "server-key.pem").write_bytes((credentials["good"] / "server-key.pem").read_bytes())
    ServerTLS(partial)  # a server that verifies no peers needs no CA
    with pytest.raises(ParameterError, match=r"no ca-cert\.pem"):
        ServerTLS(partial, verify_peer=True)
    with pytest.raises(ParameterError, match="'on' or 'require'"):
        ServerTLS(credentials["good"], mode="off")
    with isc_server(tmp_path, credentials["good"]) as (server, lun, data):
        with pytest.raises(ParameterError, match="is not a directory"):
            NBDLUN(with_tls(server.uri, tmp_path / "missing"), timeout=WAIT)
        assert_unchanged(lun, data)


def _own_copy(credentials, tmp_path: Path) -> Path:
    """A copy of the good credentials (modes kept) that a test may spoil."""
    return Path(shutil.copytree(credentials["good"], tmp_path / "creds"))


def _uses(directory: Path, role: str) -> None:
    """Load ``directory`` as a ``role`` ("server" or "client") that verifies its peers."""
    if role == "server":
        ServerTLS(directory, verify_peer=True)
    else:
        client_context(directory, check_hostname=True, certificate=True)


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("mode", [0o644, 0o620, 0o604, 0o640], ids=oct)
def test_a_tls_key_other_users_may_read_or_change_is_refused(tmp_path, credentials, role, mode):
    directory = _own_copy(credentials, tmp_path)
    key = directory / f"{role}-key.pem"
    key.chmod(mode)
    with pytest.raises(ParameterError) as refused:
        _uses(directory, role)
    assert str(refused.value) == (
        f"TLS credentials {directory}: {role}-key.pem has mode {mode:04o}, so other users may "
        f"read or change it: chmod 600 {key}"
    )
    key.chmod(0o400)
    _uses(directory, role)


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_tls_key_of_another_user_is_refused(tmp_path, credentials, role):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    directory = _own_copy(credentials, tmp_path)
    os.chown(directory / f"{role}-key.pem", 1, 1)
    with pytest.raises(ParameterError, match=f"{role}-key.pem belongs to uid 1, not to this user"):
        _uses(directory, role)


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("spoiled", ["directory", "ca-cert.pem", "server-cert.pem"])
def test_tls_credentials_other_users_may_replace_are_refused(tmp_path, credentials, role, spoiled):
    # Whoever may write the directory or the CA's file chooses whom isc trusts.
    directory = _own_copy(credentials, tmp_path)
    path = directory if spoiled == "directory" else directory / spoiled
    path.chmod(path.stat().st_mode | 0o022)
    if spoiled == "server-cert.pem" and role == "client":
        _uses(directory, role)  # a client reads no server certificate
        return
    with pytest.raises(ParameterError) as refused:
        _uses(directory, role)
    line = str(refused.value)
    assert line.startswith(f"TLS credentials {directory}") and "\n" not in line
    assert line.endswith(
        "it must be yours (or root's) and writable by its owner alone, and what it holds "
        "says whom isc trusts: "
        f"chmod go-w {path} (and chown it to you)"
    )


def test_the_readme_recipe_makes_credentials_isc_loads(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; it comes with the Debian package openssl")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("mkdir -m 700 creds && cd creds\n")
    recipe = readme[start : readme.index("```", start)]
    done = subprocess.run(
        ["bash", "-e", "-c", recipe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for role in ("server", "client"):
        _uses(tmp_path / "creds", role)


# -- the handshake by hand ----------------------------------------------------------------------
def test_require_refuses_every_option_before_tls_as_the_spec_says(tmp_path, credentials):
    with isc_server(tmp_path, credentials["good"]) as (server, lun, data):
        with raw(server) as client:
            client.greet()
            go = client.info_data(b"disk")
            for option, payload in ((OPT_LIST, b""), (OPT_INFO, go), (OPT_GO, go), (12345, b"")):
                [(reply, message)] = client.option(option, payload)
                assert (reply, message) == (
                    REP_ERR_TLS_REQD,
                    b"TLS is required: start it with NBD_OPT_STARTTLS",
                )
            assert client.option(OPT_STARTTLS, b"x")[0][0] == REP_ERR_INVALID
            assert client.option(OPT_ABORT) == [(REP_ACK, b"")]
            assert client.dropped()
        with raw(server) as client:
            client.greet()
            client.sock.sendall(
                struct.pack(">QII", 0x49484156454F5054, OPT_EXPORT_NAME, 4) + b"disk"
            )
            assert client.dropped()  # the option cannot be refused politely: dropped
        with raw(server) as client:
            client.greet(flags=0)  # no fixed newstyle: no TLS, so no way in
            assert client.dropped()
        with raw(server) as client:
            client.greet()
            assert client.option(OPT_STARTTLS) == [(REP_ACK, b"")]
            context = client_context(credentials["good"], check_hostname=False)
            with context.wrap_socket(client.sock) as tls:
                client.sock = tls
                assert client.option(OPT_STARTTLS)[0][0] == REP_ERR_INVALID  # on already
                assert client.option(OPT_GO, go)[-1][0] == REP_ACK
                client.request(0, 0, 16)  # READ
                assert client.reply() == 0
                assert client.recv(16) == data[:16]
        assert_unchanged(lun, data)


def test_starttls_forgets_structured_replies_and_contexts_negotiated_before(tmp_path, credentials):
    with (
        isc_server(tmp_path, credentials["good"], mode="on") as (server, _, data),
        raw(server) as plain,
    ):
        c = Client(plain.sock)
        c.greet()
        c.structured()
        assert c.contexts(OPT_SET_META_CONTEXT, b"disk", b"base:allocation")
        assert c.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        context = client_context(credentials["good"], check_hostname=False)
        with context.wrap_socket(c.sock) as tls:
            c.sock = tls
            # The spec: a client renegotiates what it wants after STARTTLS.
            ((reply, _),) = c.option(OPT_SET_META_CONTEXT, c.meta_data(b"disk", b"base:"))
            assert reply == REP_ERR_INVALID  # structured replies are off again
            assert c.go_flags() & 128 == 0  # no SEND_DF without structured replies
            c.request(0, 0, 16)  # READ: a simple reply
            assert c.reply() == 0
            assert c.recv(16) == data[:16]


def test_tls_off_answers_starttls_unsupported(tmp_path):
    with isc_server(tmp_path, None) as (server, _, _), raw(server) as client:
        client.greet()
        assert client.option(OPT_STARTTLS)[0][0] == REP_ERR_UNSUP
        assert client.option(OPT_GO, client.info_data(b"disk"))[-1][0] == REP_ACK


def test_a_failed_tls_handshake_is_logged_and_the_server_goes_on(tmp_path, credentials, caplog):
    with isc_server(tmp_path, credentials["good"]) as (server, lun, data):
        with raw(server) as client:
            client.greet()
            client.option(OPT_STARTTLS)
            client.sock.sendall(b"this is not a TLS ClientHello" * 10)
            assert client.dropped()
        assert_unchanged(lun, data)
        round_trip(with_tls(server.uri, credentials["good"]))
    # Closed, the server has finished with every connection: its log is complete.
    failures = [
        r.getMessage() for r in caplog.records if "TLS with client 1 failed" in r.getMessage()
    ]
    assert len(failures) == 1 and "wrong version number" in failures[0]


# -- real peers ---------------------------------------------------------------------------------
def qemu_tls(directory: Path) -> list[str]:
    # QEMU's server endpoint verifies client certificates by default (verify-peer=on).
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={directory},endpoint=server",
        "--tls-creds",
        "tls0",
    ]


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit"])
def test_nbdlun_against_qemu_nbd_and_nbdkit_over_tls(tmp_path, credentials, server):
    good = credentials["good"]
    if server == "qemu-nbd":
        start = qemu_nbd(tmp_path, *qemu_tls(good), size=SIZE, name="disk")
    else:
        start = nbdkit(
            tmp_path,
            "--tls=require",
            f"--tls-certificates={good}",
            "--tls-verify-peer",
            "-e",
            "disk",
            "memory",
            f"{SIZE}",
        )
    with start as remote:
        uri = remote.uri if "/disk?" in remote.uri else remote.uri.replace(":///", ":///disk")
        data = random.Random(SEED).randbytes(SIZE)
        with NBDLUN(with_tls(uri, good), timeout=WAIT) as lun:
            lun.write(0, data)
            lun.flush()
        for creds, message in REFUSED.items():
            with pytest.raises(AuthenticationError, match=message):
                NBDLUN(with_tls(uri, credentials[creds]), timeout=WAIT)
        with pytest.raises(PermissionError, match="use an nbds"):
            NBDLUN(plain(uri), timeout=WAIT)
        with NBDLUN(with_tls(uri, good), timeout=WAIT) as lun:
            assert lun.read(0, SIZE) == data  # nothing the refused clients did reached it


@contextmanager
def isc_serve(tmp_path: Path, credentials, *options: str) -> Iterator[tuple[str, Path, bytes]]:
    """``isc serve`` of a random image on TCP loopback; yields its URI, the image and its data."""
    image = tmp_path / "disk.img"
    data = random.Random(SEED).randbytes(SIZE)
    image.write_bytes(data)
    args = ["serve", str(image), "--listen", "127.0.0.1:0", *options]
    with daemon(tmp_path / "serve.log", *args) as served:
        yield served.exports["disk.img"], image, data
        served.stop()


def serve_tls(credentials) -> list[str]:
    return ["--tls=require", "--tls-creds", str(credentials["good"]), "--tls-verify-peer"]


def test_libnbd_tools_use_isc_serve_over_tls(tmp_path, credentials):
    nbdinfo, nbdcopy = tool("nbdinfo"), tool("nbdcopy")
    with isc_serve(tmp_path, credentials, *serve_tls(credentials)) as (uri, image, data):
        assert uri.startswith("nbds://127.0.0.1:")
        uri = with_tls(uri, credentials["good"])
        info = run(nbdinfo, uri).stdout
        assert "with TLS" in info and f"export-size: {SIZE}" in info
        run(nbdcopy, uri, tmp_path / "copy.img")
        assert (tmp_path / "copy.img").read_bytes() == data
        other = random.Random(SEED + 1).randbytes(SIZE)
        (tmp_path / "other.img").write_bytes(other)
        run(nbdcopy, tmp_path / "other.img", uri)
        script = (
            "import nbd, sys\n"
            "h = nbd.NBD()\n"
            "h.set_uri_allow_local_file(True)\n"
            "h.connect_uri(sys.argv[1])\n"
            "h.pwrite(b'libnbd' * 100, 4096)\n"
            "h.flush()\n"
            "assert h.pread(600, 4096) == b'libnbd' * 100\n"
            "h.shutdown()\n"
        )
        python = Path("/usr/bin/python3")
        if subprocess.run([python, "-c", "import nbd"], capture_output=True).returncode:
            pytest.skip("python3-libnbd is not installed (the Debian package python3-libnbd)")
        run(python, "-c", script, uri)
    expected = bytearray(other)
    expected[4096 : 4096 + 600] = b"libnbd" * 100
    assert image.read_bytes() == bytes(expected)


def test_libnbd_clients_without_the_right_credentials_are_refused(tmp_path, credentials):
    nbdinfo = tool("nbdinfo")
    with isc_serve(tmp_path, credentials, *serve_tls(credentials)) as (uri, image, data):
        attempts = {
            "plaintext": plain(uri),
            **{name: with_tls(uri, credentials[name]) for name in REFUSED},
        }
        for name, attempt in attempts.items():
            done = run(nbdinfo, attempt, check=False)
            assert done.returncode != 0, f"{name}: nbdinfo got in: {done.stdout}"
            assert "export-size" not in done.stdout
        assert image.read_bytes() == data
        assert f"export-size: {SIZE}" in run(nbdinfo, with_tls(uri, credentials["good"])).stdout


# -- who may listen where -------------------------------------------------------------------------
def isc(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``isc ARGS`` to the end (at most WAIT seconds)."""
    return subprocess.run(
        [sys.executable, "-m", "isc.cli", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ([], "without TLS and authentication: add --tls=require --tls-verify-peer"),
        (["--tls=require"], "--tls=require needs --tls-creds"),
        (["--tls=on", "--tls-creds", "{good}", "--tls-verify-peer"], "--tls=require"),
        (["--tls=require", "--tls-creds", "{good}"], "--tls-verify-peer"),
        (["--tls-verify-peer"], "needs --tls=on or --tls=require"),
        (["--tls=require", "--tls-creds", "{missing}"], "is not a directory"),
        (["--tls-psk", "{good}/ca-cert.pem"], "TLS-PSK is not available"),
        (
            ["--tls=require", "--tls-verify-peer", "--tls-creds", "{readable}"],
            "server-key.pem has mode 0644, so other users may read or change it: chmod 600 ",
        ),
    ],
)
def test_serve_refuses_to_expose_an_export_beyond_loopback(tmp_path, credentials, options, why):
    image = tmp_path / "disk.img"
    data = random.Random(SEED).randbytes(SIZE)
    image.write_bytes(data)
    readable = _own_copy(credentials, tmp_path)
    (readable / "server-key.pem").chmod(0o644)
    fill = {"good": credentials["good"], "missing": tmp_path / "missing", "readable": readable}
    args = [option.format(**fill) for option in options]
    done = isc("serve", str(image), "--listen", "0.0.0.0:0", *args)
    assert done.returncode == 1, done.stdout
    (line,) = done.stderr.splitlines()
    assert why in line
    assert "ready" not in done.stdout
    assert image.read_bytes() == data


def test_serve_beyond_loopback_with_tls_and_peers_verified_or_insecure(tmp_path, credentials):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    secure = ["--listen", "0.0.0.0:0", *serve_tls(credentials)]
    with daemon(tmp_path / "secure.log", "serve", str(image), *secure) as served:
        assert served.exports["disk.img"].startswith("nbds://0.0.0.0:")
        served.stop()
    assert "insecure" not in (tmp_path / "secure.log").read_text()
    insecure = ["--listen", "0.0.0.0:0", "--insecure"]
    with daemon(tmp_path / "insecure.log", "serve", str(image), *insecure) as served:
        served.stop()
    warning = (tmp_path / "insecure.log").read_text()
    assert "without TLS and authentication (--insecure)" in warning


# -- limits --------------------------------------------------------------------------------------
class CountingLUN(MemoryLUN):
    """A memory LUN that counts the bytes it has read."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.read_bytes = 0

    def readinto(self, offset: int, buffer) -> None:
        self.read_bytes += memoryview(buffer).nbytes
        super().readinto(offset, buffer)


class WatchedServer(NBDServer):
    """An NBD server that tells when a connection's replies wait for its client to read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: set[object] = set()  # the transports that waited
        self.changed = threading.Condition()

    async def _room(self, writer) -> bool:
        if writer.transport.get_write_buffer_size() > _REPLY_BACKLOG:
            with self.changed:
                self.waiting.add(writer.transport)
                self.changed.notify_all()
        return await super()._room(writer)

    def wait_waiting(self, count: int) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.waiting) >= count, WAIT):
                pytest.fail(f"{len(self.waiting)} connections waited for their client, not {count}")


def in_transmission(sock: socket.socket, creds: Path | None) -> Raw:
    """A hand-rolled client in transmission, over TLS with ``creds``' client certificate."""
    client = Raw(sock)
    if creds is None:
        client.go()
        return client
    client.greet()
    assert client.option(OPT_STARTTLS) == [(REP_ACK, b"")]
    wrapped = client_context(creds, check_hostname=False, certificate=True).wrap_socket(
        sock, server_hostname="localhost"
    )
    client = Raw(wrapped)
    assert client.option(OPT_GO, client.info_data(b"disk"))[-1][0] == REP_ACK
    return client


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_clients_that_read_no_replies_hold_a_piece_each_and_the_others_go_on(
    tmp_path, credentials, tls, caplog
):
    greedy, size = 4, MAX_BLOCK
    lun = CountingLUN(size)
    data = random.Random(SEED).randbytes(size)
    lun.write(0, data)
    creds = credentials["good"] if tls else None
    server = WatchedServer(
        lun, name="disk", tls=ServerTLS(creds, verify_peer=True) if tls else None, max_data=size
    )
    with server, ExitStack() as stack:
        server.start_unix(tmp_path / "isc.sock")
        for _ in range(greedy):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.settimeout(WAIT)
            sock.connect(server.address)
            client = in_transmission(sock, creds)
            stack.callback(client.sock.close)
            for _ in range(64):  # 2 GiB of replies asked for, none ever read
                client.request(0, 0, size)  # READ
        server.wait_waiting(greedy)
        # Each holds what its socket took (the kernel doubles the size set), one piece of
        # a reply and the backlog, twice under TLS (in the TLS layer and the socket's
        # transport): not the 32 MiB of even one reply.
        held = 2 * _UNIX_SEND_BUFFER + 3 * (_PIECE + _REPLY_BACKLOG)
        assert lun.read_bytes <= greedy * held
        assert server.peak_held <= size
        uri = with_tls(server.uri, creds) if tls else server.uri
        with NBDLUN(uri, timeout=WAIT) as other:  # the others go on
            assert other.read(0, size) == data
            other.write(0, b"still served")
            assert other.read(0, 12) == b"still served"
        assert server.peak_held <= size
    # Closing the server disconnects them quietly, TLS or not.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_server_holds_at_most_max_data_for_all_clients(tmp_path):
    lun = HookLUN(MemoryLUN(2 * MAX_BLOCK))
    gate = Gate()
    lun.before_write = lambda n, offset, data: gate() if n == 1 else None
    payloads = [random.Random(SEED + i).randbytes(MAX_BLOCK) for i in range(2)]
    with NBDServer(lun, name="disk", max_data=MAX_BLOCK) as server:
        server.start_unix(tmp_path / "isc.sock")
        with raw(server) as first, raw(server) as second:
            first.go()
            second.go()
            first.request(1, 0, MAX_BLOCK, payload=payloads[0])  # WRITE, held at the gate
            gate.wait_reached()
            assert server.held == MAX_BLOCK
            sending = Worker(lambda: second.request(1, MAX_BLOCK, MAX_BLOCK, payload=payloads[1]))
            gate.open()
            sending.finish()
            assert first.reply() == 0 and second.reply() == 0
        assert server.peak_held == MAX_BLOCK
        assert lun.read(0, 2 * MAX_BLOCK) == b"".join(payloads)


def test_a_client_that_stalls_or_trickles_a_write_payload_is_dropped(tmp_path, caplog):
    # Each stalled WRITE asks for the whole pool (max_data); the timeout frees it.
    lun = HookLUN(MemoryLUN(2 * MAX_BLOCK))
    with NBDServer(lun, name="disk", max_data=MAX_BLOCK, payload_timeout=0.3) as server:
        server.start_unix(tmp_path / "isc.sock")
        with raw(server) as silent, raw(server) as trickler:
            for client in (silent, trickler):
                client.sock.settimeout(3.0)  # far over the bound, far under WAIT
                client.go()
            silent.request(1, 0, MAX_BLOCK)  # WRITE header, then nothing
            trickler.request(1, 0, MAX_BLOCK, payload=b"x")
            stop = threading.Event()

            def trickle() -> None:  # a byte now and then, never the whole payload
                with contextlib.suppress(OSError):
                    while not stop.wait(0.05):
                        trickler.sock.send(b"x")

            trickling = Worker(trickle)
            try:
                for client in (silent, trickler):  # each in turn: the pool is FIFO
                    assert client.dropped()
                assert server.held == 0
            finally:
                stop.set()
                trickling.finish()
        assert server.peak_held == MAX_BLOCK
        assert lun.writes == 0
        round_trip(server.uri)  # the others go on
    drops = [r.getMessage() for r in caplog.records if "within 0.3 s" in r.getMessage()]
    assert len(drops) == 2 and all("disconnecting it" in drop for drop in drops)


# -- the receive path: requests received into buffers of their own -------------------------
class ReceivingServer(NBDServer):
    """An NBD server whose connections tell what they received and when they stop reading."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received = 0  # bytes (plaintext) received by all its connections
        self.paused: set[_Channel] = set()  # connections that stopped reading, till they go on
        self.changed = threading.Condition()

    def _channel(self) -> _Channel:
        return TellingChannel(self)

    def wait_for(self, condition, what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(condition, WAIT):
                pytest.fail(f"the server did not get there within {WAIT} s: {what}")


class TellingChannel(_Channel):
    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        server = self._server
        with server.changed:
            server.received += nbytes
            (server.paused.add if self._paused else server.paused.discard)(self)
            server.changed.notify_all()


def connected(stack: ExitStack, server: NBDServer, creds: Path | None) -> Raw:
    """A hand-rolled client of ``server`` in transmission (over TLS with ``creds``),
    closed when ``stack`` closes."""
    sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    sock.connect(server.address)
    client = in_transmission(sock, creds)
    stack.callback(client.sock.close)
    return client


def receiving_server(lun, creds: Path | None, **limits) -> ReceivingServer:
    """A :class:`ReceivingServer` of ``lun`` as "disk", requiring TLS with ``creds``."""
    tls = ServerTLS(creds, verify_peer=True) if creds is not None else None
    return ReceivingServer(lun, name="disk", tls=tls, **limits)


def header(command: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, 0xC0FFEE, offset, length)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_requests_are_served_whole_however_the_client_splits_or_joins_them(
    tmp_path, credentials, tls
):
    lun = HookLUN(MemoryLUN(SIZE))
    creds = credentials["good"] if tls else None
    server = receiving_server(lun, creds)
    rng = random.Random(SEED)
    model = bytearray(SIZE)
    with server, ExitStack() as stack:
        server.start_unix(tmp_path / "isc.sock")
        client = connected(stack, server, creds)

        def send(data: bytes, piece: int) -> None:
            """Send ``data`` in pieces, each received by the server before the next is sent."""
            for at in range(0, len(data), piece):
                before = server.received
                client.sock.sendall(data[at : at + piece])
                expected = before + len(data[at : at + piece])
                server.wait_for(lambda e=expected: server.received >= e, f"{expected} bytes")

        def write(offset: int, length: int) -> bytes:
            data = rng.randbytes(length)
            model[offset : offset + length] = data
            return header(CMD_WRITE, offset, length) + data

        # A small WRITE (run on the loop's thread), header and payload a byte at a time.
        send(write(0, 300), 1)
        assert client.reply() == 0
        # A large one (admitted, then run in the pool): its header a byte at a time,
        # then its payload a byte at a time and in pieces of every size.
        large = write(64 * KIB, _INLINE + 4 * KIB)
        send(large[: REQUEST.size], 1)
        send(large[REQUEST.size : REQUEST.size + 500], 1)
        send(large[REQUEST.size + 500 : REQUEST.size + 500 + 7 * KIB], 1000)
        send(large[REQUEST.size + 500 + 7 * KIB :], 64 * KIB + 1)
        assert client.reply() == 0
        # Many requests in one send, the last header split in two sends.
        joined = write(512 * KIB, 4 * KIB) + write(600 * KIB, 100) + write(700 * KIB, 200 * KIB)
        flush = header(CMD_FLUSH, 0, 0)
        client.sock.sendall(joined + flush[:5])
        client.sock.sendall(flush[5:])
        assert [client.reply() for _ in range(4)] == [0] * 4
    assert lun.lun.read(0, SIZE) == bytes(model)
    assert lun.writes == 5 and lun.flushes == 1
    assert server.peak_held <= _INLINE + 4 * KIB


def test_a_client_that_stops_sending_still_gets_the_replies_to_what_it_sent(tmp_path):
    lun = HookLUN(MemoryLUN(SIZE))
    rng = random.Random(SEED)
    payloads = [rng.randbytes(4 * KIB), rng.randbytes(_INLINE + 4 * KIB)]  # inline; the pool
    with receiving_server(lun, None) as server, ExitStack() as stack:
        server.start_unix(tmp_path / "isc.sock")
        client = connected(stack, server, None)
        client.sock.sendall(
            header(CMD_WRITE, 0, len(payloads[0]))
            + payloads[0]
            + header(CMD_WRITE, 8 * KIB, len(payloads[1]))
            + payloads[1]
        )
        client.sock.shutdown(socket.SHUT_WR)  # the spec's requests in flight are answered
        assert [client.reply(), client.reply()] == [0, 0]
        assert client.dropped()
    assert lun.lun.read(0, 4 * KIB) == payloads[0]
    assert lun.lun.read(8 * KIB, len(payloads[1])) == payloads[1]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_client_gone_mid_payload_writes_nothing_and_gives_its_data_back(
    tmp_path, credentials, tls
):
    lun = HookLUN(MemoryLUN(MAX_BLOCK))
    creds = credentials["good"] if tls else None
    server = receiving_server(lun, creds, max_data=MAX_BLOCK)
    payload = random.Random(SEED).randbytes(MAX_BLOCK)
    with server:
        server.start_unix(tmp_path / "isc.sock")
        with ExitStack() as stack:
            gone = connected(stack, server, creds)
            before = server.received
            gone.sock.sendall(header(CMD_WRITE, 0, MAX_BLOCK) + payload[: MAX_BLOCK // 2])
            expected = before + REQUEST.size + MAX_BLOCK // 2
            server.wait_for(lambda: server.received >= expected, "half the payload")
            assert server.held == MAX_BLOCK  # all of max_data, for this payload
        # Another client's WRITE of all of max_data goes through: the first gave it back.
        with ExitStack() as stack:
            other = connected(stack, server, creds)
            other.request(CMD_WRITE, 0, MAX_BLOCK, payload=payload[::-1])
            assert other.reply() == 0
    assert lun.written == [(0, MAX_BLOCK)]  # the second client's alone
    assert lun.lun.read(0, MAX_BLOCK) == payload[::-1]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_write_waiting_for_max_data_stops_its_connection_reading_until_it_fits(
    tmp_path, credentials, tls
):
    lun = HookLUN(MemoryLUN(2 * MAX_BLOCK))
    gate = Gate()
    lun.before_write = lambda n, offset, data: gate() if n == 1 else None
    creds = credentials["good"] if tls else None
    server = receiving_server(lun, creds, max_data=MAX_BLOCK)
    payloads = [random.Random(SEED + i).randbytes(MAX_BLOCK) for i in range(2)]
    with server, ExitStack() as stack:
        server.start_unix(tmp_path / "isc.sock")
        first, second = (connected(stack, server, creds) for _ in range(2))
        first.request(CMD_WRITE, 0, MAX_BLOCK, payload=payloads[0])  # held at the gate
        gate.wait_reached()
        assert server.held == MAX_BLOCK
        before = server.received
        sending = Worker(
            lambda: second.request(CMD_WRITE, MAX_BLOCK, MAX_BLOCK, payload=payloads[1])
        )
        server.wait_for(lambda: server.paused, "the second connection stops reading")
        # It read its staging buffer full (and the header it parsed) and stopped: the rest
        # of its payload waits in the socket and the client, not in the server.
        assert _STAGING <= server.received - before <= _STAGING + REQUEST.size
        assert server.held == MAX_BLOCK
        gate.open()
        sending.finish()
        assert first.reply() == 0 and second.reply() == 0
        assert not server.paused
    assert server.peak_held == MAX_BLOCK
    assert lun.lun.read(0, 2 * MAX_BLOCK) == b"".join(payloads)


def test_one_client_more_than_max_clients_is_refused(tmp_path, caplog):
    with NBDServer(MemoryLUN(SIZE), name="disk", max_clients=2) as server:
        server.start_unix(tmp_path / "isc.sock")
        with raw(server) as first, raw(server) as second:
            first.greet()
            second.greet()  # both are being served
            with raw(server) as third:
                assert third.dropped()
        round_trip(server.uri)  # room again
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 1 and "2 clients are connected" in refusals[0]


def test_a_client_that_never_finishes_the_handshake_is_dropped(tmp_path, credentials, caplog):
    tls = ServerTLS(credentials["good"])
    with NBDServer(MemoryLUN(SIZE), name="disk", tls=tls, handshake_timeout=0.2) as server:
        server.start_unix(tmp_path / "isc.sock")
        with raw(server) as silent:
            silent.greet()
            assert silent.dropped()
        with raw(server) as stalled_in_tls:
            stalled_in_tls.greet()
            assert stalled_in_tls.option(OPT_STARTTLS) == [(REP_ACK, b"")]
            assert stalled_in_tls.dropped()
        round_trip(with_tls(server.uri, credentials["good"]))
    timeouts = [r.getMessage() for r in caplog.records if "within 0.2 s" in r.getMessage()]
    assert len(timeouts) == 2


def test_server_limits_are_checked():
    for bad in (
        {"max_clients": 0},
        {"max_clients": 1.5},
        {"handshake_timeout": 0},
        {"payload_timeout": 0},
        {"max_data": MAX_BLOCK - 1},
        {"max_requests": 0},
    ):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            NBDServer(MemoryLUN(SIZE), **bad)


def test_serve_takes_max_clients(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    assert isc("serve", str(image), "--max-clients", "0").returncode == 2
    args = ["serve", str(image), "--listen", "127.0.0.1:0", "--max-clients", "1"]
    with daemon(tmp_path / "serve.log", *args) as served:
        host, port = parse_uri(served.exports["disk.img"]).address
        with socket.create_connection((host, port), timeout=WAIT) as first:
            Raw(first).greet()
            with socket.create_connection((host, port), timeout=WAIT) as second:
                assert Raw(second).dropped()
        served.stop()
    assert "1 clients are connected, the most it serves" in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--max-data", "1M", "'1M' is too small: give at least 32M"),
        ("--max-data", "lots", "'lots' is not a size"),
        ("--max-requests", "0", "'0' is not a whole number >= 1"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "agent"])
def test_serve_and_agent_refuse_bad_nbd_limits(tmp_path, command, option, value, why):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    where = (
        [str(image)] if command == "serve" else ["--listen", "127.0.0.1:0", "--dir", str(tmp_path)]
    )
    done = isc(command, *where, option, value)
    assert done.returncode == 2
    line = done.stderr.splitlines()[-1]
    assert line.startswith(f"isc {command}: error: argument {option}: ") and why in line
    assert "ready" not in done.stdout
    assert not (tmp_path / ".isc-agent").exists()


@pytest.mark.parametrize("command", ["serve", "agent"])
def test_serve_and_agent_give_their_exports_the_nbd_limits(tmp_path, command):
    (tmp_path / "luns").mkdir()
    image = tmp_path / "luns" / "disk.img"
    image.write_bytes(bytes(SIZE))
    where = [str(image)] if command == "serve" else ["--dir", str(image.parent)]
    limits = ["--max-clients", "3", "--max-data", "48M", "--max-requests", "5"]
    args = [command, *where, "--listen", "127.0.0.1:0", *limits, "-v"]
    with daemon(tmp_path / "daemon.log", *args) as served:
        round_trip(served.exports["disk.img"])
        served.stop()
    said = "limits: 3 clients, 50331648 bytes of data held, 5 requests in flight"
    assert said in (tmp_path / "daemon.log").read_text()


def test_a_unix_socket_export_is_reachable_by_its_user_alone(tmp_path):
    with NBDServer(MemoryLUN(MIB), name="disk") as server:
        server.start_unix(tmp_path / "isc.sock")
        assert stat.S_IMODE(os.stat(tmp_path / "isc.sock").st_mode) == 0o600
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with (
        NBDServer(MemoryLUN(MIB), name="disk") as server,
        pytest.raises(ParameterError, match="writable by its owner alone"),
    ):
        server.start_unix(shared / "isc.sock")
    assert not (shared / "isc.sock").exists()


# -- other users of the machine ----------------------------------------------------------------
@contextmanager
def shared_credentials(credentials) -> Iterator[Path]:
    """A copy of the good credentials that another user can read (for the test alone)."""
    with tempfile.TemporaryDirectory(prefix="isc-creds-") as directory:
        shared = Path(directory) / "good"
        shutil.copytree(credentials["good"], shared)
        for path in (Path(directory), shared, *shared.iterdir()):
            path.chmod(0o755)
        yield shared


def test_an_nbd_client_of_another_user_is_refused_unless_insecure_or_tls_verifies_it(
    credentials, caplog
):
    nbdinfo, nobody = tool("nbdinfo"), another_user()
    lun = HookLUN(MemoryLUN(SIZE))
    with NBDServer(lun, name="disk") as server:
        server.start("127.0.0.1", 0)
        done = run(*nobody, nbdinfo, "--size", server.uri, check=False)
        assert done.returncode != 0
        round_trip(server.uri)  # this user's client
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 1 and f"belongs to uid {NOBODY}" in refusals[0], refusals
    assert "--tls=require --tls-verify-peer" in refusals[0]
    with NBDServer(MemoryLUN(SIZE), name="disk", insecure=True) as server:
        server.start("127.0.0.1", 0)
        assert run(*nobody, nbdinfo, "--size", server.uri).stdout.strip() == str(SIZE)
    tls = ServerTLS(credentials["good"], mode="require", verify_peer=True)
    with shared_credentials(credentials) as creds, NBDServer(lun, name="disk", tls=tls) as server:
        server.start("127.0.0.1", 0)
        uri = with_tls(server.uri, creds)
        assert run(*nobody, nbdinfo, "--size", uri).stdout.strip() == str(SIZE)


def test_isc_serve_insecure_serves_another_user(tmp_path):
    nbdinfo, nobody = tool("nbdinfo"), another_user()
    with isc_serve(tmp_path, None, "--insecure") as (uri, _, _):
        assert run(*nobody, nbdinfo, "--size", uri).stdout.strip() == str(SIZE)
