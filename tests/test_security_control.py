"""Security of the control faces: ``isc serve --control`` and the agent's control port.

A control port changes data and state, so with credentials it answers only
authenticated peers: mutual TLS (certificates ``openssl`` made for the run,
the ``credentials`` fixture), a shared secret's HMAC-SHA256
challenge-response, or both. Checked here on a real :class:`ControlServer`
whose one op counts the requests that reached it, and on real ``isc agent``
and ``isc serve`` processes: plaintext, wrongly authenticated, replayed and
silent peers are each refused with one line and reach no op; a client
refuses an impostor server; the issue's attack (an unauthenticated rollback
sent to the agent in the middle of an update) never reaches the
destination; listening beyond loopback without TLS and authentication is
refused. Without credentials a control port answers its own user alone,
loopback TCP included: a client of another user (uid 65534, through
``setpriv``; those tests need root), or one whose owner cannot be told, gets
one refusal line, unless the server is insecure. After each refusal the
legitimate client still works.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_agent
from helpers import Gate, Worker, wait_until
from test_agent import HOST, IO, SIZE, WAIT, daemon
from test_cli import error_line, isc_run
from test_security_nbd import NOBODY, PYTHON, another_user, with_tls

import isc.auth
import isc.control
from isc import Destination, DestState
from isc.agent import Agent
from isc.auth import MIN_SECRET, Credentials, is_loopback, others_may_change, read_secret, stranger
from isc.commands import status_report
from isc.control import ControlServer
from isc.errors import AuthenticationError, ParameterError
from isc.nbd import NBDLUN
from isc.remote import AgentSite, session_holder
from isc.store import read_state
from isc.update import PeriodicUpdate

# The agent tests' fixtures: a random source, a session on it, an agent's directory.
source, session, exports = test_agent.source, test_agent.session, test_agent.exports


def secret_file(directory: Path, name: str = "secret", value: bytes | None = None) -> Path:
    """A secret file of mode 0600 holding ``value`` (default: 32 random bytes, hex)."""
    path = directory / name
    path.write_bytes(os.urandom(32).hex().encode() + b"\n" if value is None else value)
    path.chmod(0o600)
    return path


def line(sock: socket.socket) -> dict:
    """One JSON line from ``sock``, read byte by byte so that the next stays; {} at EOF."""
    data = b""
    while not data.endswith(b"\n"):
        part = sock.recv(1)
        if not part:
            return {}
        data += part
    return json.loads(data)


def ask(sock: socket.socket, request: dict) -> dict:
    sock.sendall(json.dumps(request).encode() + b"\n")
    return line(sock)


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


class Counted:
    """A control server whose op ``bump`` counts the requests that reached it, on a
    loopback port or (``path``) a Unix socket."""

    def __init__(
        self,
        credentials: Credentials | None,
        path: Path | None = None,
        *,
        host: str = HOST,
        insecure: bool = False,
    ) -> None:
        self.count = 0
        self.server = ControlServer({"bump": self.bump}, credentials=credentials, insecure=insecure)
        self.port = self.server.start(host, 0) if path is None else None
        if path is not None:
            self.server.start_unix(path)

    def bump(self, request: dict) -> dict:
        self.count += 1
        return {"ok": True, "info": {"count": self.count}}


@contextmanager
def counted(
    credentials: Credentials | None, path: Path | None = None, **options
) -> Iterator[Counted]:
    server = Counted(credentials, path, **options)
    try:
        yield server
    finally:
        server.server.close()


def bump(server: Counted, credentials: Credentials) -> dict:
    """A legitimate client's request."""
    with credentials.connect(HOST, server.port, WAIT) as sock:
        return ask(sock, {"id": 7, "op": "bump"})


# -- secret files and addresses --------------------------------------------------------------------
def test_a_good_secret_file_is_read_whitespace_stripped(tmp_path):
    path = secret_file(tmp_path, value=b"  correct horse battery staple \n")
    assert read_secret(path) == b"correct horse battery staple"
    path.chmod(0o400)
    assert read_secret(path) == b"correct horse battery staple"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: p.chmod(0o644), "has mode 0644, so other users may read or change it: chmod"),
        (lambda p: p.chmod(0o620), "has mode 0620"),
        (lambda p: p.write_bytes(b"short\n"), f"holds 5 bytes; a secret has {MIN_SECRET} to"),
        (lambda p: p.unlink(), "No such file or directory; make one with: openssl rand"),
        (lambda p: (p.unlink(), p.symlink_to(p.with_name("real"))), "is a symlink"),
        (lambda p: (p.unlink(), os.mkfifo(p, 0o600)), "is not a regular file"),
        (lambda p: (p.unlink(), p.mkdir(0o700)), "is not a regular file"),
    ],
)
def test_a_secret_file_anyone_else_could_read_or_guess_is_refused(tmp_path, make, why):
    secret_file(tmp_path, "real")
    path = secret_file(tmp_path)
    make(path)
    with pytest.raises(ParameterError, match=why.replace("(", r"\(")) as refused:
        read_secret(path)
    assert str(path) in str(refused.value)


def test_a_secret_file_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    path = secret_file(tmp_path)
    os.chown(path, 1, 1)
    with pytest.raises(ParameterError, match="belongs to uid 1, not to this user"):
        read_secret(path)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


# -- the shared secret ----------------------------------------------------------------------------
@pytest.fixture
def secrets(tmp_path) -> dict[str, Path]:
    return {name: secret_file(tmp_path, name) for name in ("ours", "theirs")}


def test_a_client_with_the_secret_is_answered(secrets):
    with counted(Credentials("server", secret_file=secrets["ours"])) as server:
        client = Credentials("client", secret_file=secrets["ours"])
        assert bump(server, client) == {"id": 7, "ok": True, "reason": None, "info": {"count": 1}}
        assert bump(server, client)["info"] == {"count": 2}


def test_an_unauthenticated_request_gets_one_line_and_reaches_no_op(secrets, caplog):
    with counted(Credentials("server", secret_file=secrets["ours"])) as server:
        with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
            first = ask(sock, {"id": 3, "op": "bump"})
            refusal = line(sock)
            assert closed(sock)
        for reply in first, refusal:
            assert reply["ok"] is False
            assert reply["reason"].startswith("authentication required: ")
            assert "--secret-file" in reply["reason"]
        assert refusal["id"] == 3
        assert server.count == 0
        assert bump(server, Credentials("client", secret_file=secrets["ours"]))["ok"]
    assert any("refused: authentication required" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


def test_a_wrong_secret_is_refused_both_ways(secrets):
    with counted(Credentials("server", secret_file=secrets["ours"])) as server:
        wrong = Credentials("client", secret_file=secrets["theirs"])
        with pytest.raises(AuthenticationError, match="refused this client: authentication failed"):
            wrong.connect(HOST, server.port, WAIT)
        assert server.count == 0
        assert bump(server, Credentials("client", secret_file=secrets["ours"]))["ok"]


def hmac_hex(secret: bytes, label: bytes, first: bytes, second: bytes) -> str:
    """The proof, computed here independently of isc.auth."""
    import hashlib
    import hmac

    return hmac.new(secret, label + b"\0" + first + second, hashlib.sha256).hexdigest()


def test_a_replayed_proof_and_malformed_answers_are_refused(secrets, caplog):
    secret = read_secret(secrets["ours"])
    mine = bytes(32)
    with counted(Credentials("server", secret_file=secrets["ours"])) as server:
        with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
            first = line(sock)
            assert first["ok"] is False and first["reason"].startswith("authentication required")
            theirs = bytes.fromhex(first["challenge"])
            proof = hmac_hex(secret, b"isc-client", theirs, mine)
            verdict = ask(sock, {"auth": "hmac-sha256", "challenge": mine.hex(), "proof": proof})
            assert verdict["ok"] is True
            assert verdict["proof"] == hmac_hex(secret, b"isc-server", mine, theirs)
            assert ask(sock, {"id": 1, "op": "bump"})["ok"]
        assert server.count == 1
        answers = [
            {"auth": "hmac-sha256", "challenge": mine.hex(), "proof": proof},  # replayed
            {"auth": "hmac-sha256", "challenge": "zz" * 32, "proof": proof},
            {"auth": "hmac-sha256", "challenge": mine.hex()[:10], "proof": proof},
            {"auth": "md5", "challenge": mine.hex(), "proof": proof},
            {"auth": "hmac-sha256", "challenge": mine.hex(), "proof": 42},
            {"auth": "hmac-sha256", "challenge": mine.hex(), "proof": "\u00e9" * 64},
            {"auth": "hmac-sha256", "challenge": mine.hex()},
        ]
        for answer in answers:
            with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
                assert "challenge" in line(sock)
                reply = ask(sock, answer)
                assert reply["ok"] is False, answer
                assert reply["reason"].startswith("authentication"), reply
                assert closed(sock)
        for garbage in (b"not json\n", b"[1, 2]\n", b"x" * (isc.control.MAX_LINE + 10) + b"\n"):
            with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
                assert "challenge" in line(sock)
                sock.sendall(garbage)
                assert line(sock)["ok"] is False
                assert closed(sock)
        assert server.count == 1
    assert not [r for r in caplog.records if r.exc_info]  # refused, not crashed


def test_a_client_that_never_authenticates_is_dropped(secrets, monkeypatch, caplog):
    monkeypatch.setattr(isc.control, "AUTH_TIMEOUT", 0.2)
    with counted(Credentials("server", secret_file=secrets["ours"])) as server:
        with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
            assert "challenge" in line(sock)
            assert closed(sock)
        assert bump(server, Credentials("client", secret_file=secrets["ours"]))["ok"]
    assert any("no authentication within 0.2 s" in r.getMessage() for r in caplog.records)


@contextmanager
def impostor() -> Iterator[int]:
    """A server that challenges as an isc control port does, then admits any answer with
    a made-up proof of its own; yields its port."""
    listener = socket.create_server((HOST, 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                challenge = {"ok": False, "auth": "hmac-sha256", "challenge": "ab" * 32}
                conn.sendall(json.dumps(challenge).encode() + b"\n")
                line(conn)
                admitted = {"auth": "hmac-sha256", "ok": True, "proof": "00" * 32}
                conn.sendall(json.dumps(admitted).encode() + b"\n")
                line(conn)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(WAIT)


def test_a_client_refuses_a_server_that_cannot_prove_the_secret(secrets):
    client = Credentials("client", secret_file=secrets["ours"])
    refused = pytest.raises(AuthenticationError, match="did not prove that it holds the shared")
    with impostor() as port, refused:
        client.connect(HOST, port, WAIT)


def test_mismatched_kinds_of_credentials_say_so_at_once(credentials, secrets, monkeypatch):
    monkeypatch.setattr(isc.auth, "AUTH_TIMEOUT", 0.2)
    good = credentials["good"]
    with counted(None) as plain, pytest.raises(AuthenticationError, match=r"within 0\.2 s"):
        Credentials("client", secret_file=secrets["ours"]).connect(HOST, plain.port, WAIT)
    with counted(Credentials("server", tls_creds=good)) as tls_only:
        both = Credentials("client", tls_creds=good, secret_file=secrets["ours"])
        with pytest.raises(AuthenticationError, match="does not ask for a shared secret"):
            both.connect(HOST, tls_only.port, WAIT)
    server_side = Credentials("server", tls_creds=good, secret_file=secrets["ours"])
    refused = pytest.raises(AuthenticationError, match="asks for its shared secret")
    with counted(server_side) as server, refused:
        Credentials("client", tls_creds=good).connect(HOST, server.port, WAIT)
    assert plain.count == tls_only.count == server.count == 0


# -- mutual TLS ------------------------------------------------------------------------------------
def test_mutual_tls_admits_certificates_of_the_ca_only(credentials, tmp_path, caplog):
    with counted(Credentials("server", tls_creds=credentials["good"])) as server:
        good = Credentials("client", tls_creds=credentials["good"])
        assert bump(server, good)["ok"]
        with pytest.raises(AuthenticationError, match="its certificate is not trusted"):
            Credentials("client", tls_creds=credentials["other-ca"]).connect(
                HOST, server.port, WAIT
            )
        with pytest.raises(AuthenticationError, match="refused this client's credentials"):
            Credentials("client", tls_creds=credentials["expired"]).connect(HOST, server.port, WAIT)
        with pytest.raises(ParameterError, match=r"no client-cert\.pem"):
            Credentials("client", tls_creds=credentials["no-client"])
        anonymous = ssl.create_default_context(cafile=credentials["good"] / "ca-cert.pem")
        raw = socket.create_connection((HOST, server.port), timeout=WAIT)
        with anonymous.wrap_socket(raw, server_hostname=HOST) as sock:
            sock.sendall(b'{"id": 1, "op": "bump"}\n')
            assert closed(sock)
        with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
            sock.sendall(b'{"id": 1, "op": "bump"}\n')
            assert closed(sock)
        assert server.count == 1
        assert bump(server, good)["info"] == {"count": 2}
    refusals = [
        r.getMessage() for r in caplog.records if "refused: TLS handshake" in r.getMessage()
    ]
    assert len(refusals) == 4, refusals


def test_tls_and_a_secret_together(credentials, secrets, monkeypatch):
    monkeypatch.setattr(isc.auth, "AUTH_TIMEOUT", 0.2)  # the plain client's wait for TLS
    server_side = Credentials("server", tls_creds=credentials["good"], secret_file=secrets["ours"])
    with counted(server_side) as server:
        both = Credentials("client", tls_creds=credentials["good"], secret_file=secrets["ours"])
        assert bump(server, both)["ok"]
        for partial in (
            Credentials("client", tls_creds=credentials["good"]),
            Credentials("client", tls_creds=credentials["good"], secret_file=secrets["theirs"]),
            Credentials("client", secret_file=secrets["ours"]),
        ):
            with pytest.raises(AuthenticationError):
                partial.connect(HOST, server.port, WAIT)
        assert server.count == 1


def test_credentials_are_checked_when_made(credentials, tmp_path):
    with pytest.raises(ParameterError, match="a TLS credentials directory, a secret file"):
        Credentials("server")
    with pytest.raises(ParameterError, match="'server' or 'client'"):
        Credentials("both", tls_creds=credentials["good"])
    with pytest.raises(ParameterError, match="is not a directory"):
        Credentials("server", tls_creds=tmp_path / "nowhere")
    with pytest.raises(ParameterError, match="needs server credentials"):
        ControlServer({}, credentials=Credentials("client", tls_creds=credentials["good"]))
    with pytest.raises(ParameterError, match="needs client credentials"):
        AgentSite(HOST, 1, credentials=Credentials("server", tls_creds=credentials["good"]))
    path = secret_file(tmp_path)
    assert read_secret(path).decode() not in repr(Credentials("client", secret_file=path))


def test_authentication_errors_are_isc_errors_and_permission_errors():
    import isc.tls

    assert isc.AuthenticationError is isc.tls.AuthenticationError is AuthenticationError
    assert issubclass(AuthenticationError, isc.IscError)
    assert issubclass(AuthenticationError, PermissionError)
    assert "AuthenticationError" in isc.__all__
    assert all(hasattr(isc, name) for name in isc.__all__)


# -- isc agent, isc serve and the commands that talk to them ------------------------------------
def agent_options(credentials, secret: Path, tls: bool) -> list[str]:
    """What secures an agent: a shared secret, and with ``tls`` mutual TLS and TLS exports."""
    options = ["--secret-file", str(secret)]
    if tls:
        options += ["--tls-creds", str(credentials["good"]), "--tls=require", "--tls-verify-peer"]
    return options


@contextmanager
def secured_agent(tmp_path: Path, directory: Path, options: list[str]) -> Iterator:
    args = ["--listen", f"{HOST}:0", "--nbd-port", "0", "--dir", str(directory), *options]
    with daemon(tmp_path / "agent.log", "agent", *args) as remote:
        yield remote
        remote.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["secret", "tls+secret"])
def test_an_unauthenticated_rollback_mid_update_never_reaches_the_destination(
    tmp_path, source, session, exports, credentials, tls
):
    secret = secret_file(tmp_path)
    good = credentials["good"]
    client = Credentials("client", tls_creds=good if tls else None, secret_file=secret)
    with secured_agent(tmp_path, exports, agent_options(credentials, secret, tls)) as remote:
        uri = remote.exports["disk"]
        uri = with_tls(uri, good) if tls else uri
        site = AgentSite(HOST, remote.control, timeout=WAIT, credentials=client)
        dest = Destination(NBDLUN(uri, timeout=WAIT), name="disk")
        (first,) = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
        assert first.outcomes == {"disk": "ok"}
        rng = random.Random(5)
        for _ in range(20):
            session.write(rng.randrange(0, SIZE - 4096), rng.randbytes(4096))
        gate = Gate()
        update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO, progress=gate)
        running = Worker(update.run)
        gate.wait_reached()  # marked, the destination protected, one run sent
        # The attack, as it was sent: one line from a plain socket.
        with socket.create_connection((HOST, remote.control), timeout=WAIT) as attacker:
            replies = [ask(attacker, {"op": "rollback", "export": "disk"}), line(attacker)]
            assert closed(attacker)
        if tls:
            assert replies == [{}, {}]  # no TLS, no word: the handshake failed
        else:  # the challenge, then the refusal of the request
            assert [r["ok"] for r in replies] == [False, False]
            assert all("authentication required" in r["reason"] for r in replies)
        # An old client without credentials, and one with the wrong secret.
        wrong_secret = secret_file(tmp_path, "wrong")
        wrong_client = Credentials("client", tls_creds=client.tls_creds, secret_file=wrong_secret)
        for wrong in (None, wrong_client):
            ack = AgentSite(HOST, remote.control, timeout=WAIT, credentials=wrong).rollback(dest)
            assert not ack.ok and "authentication" in ack.reason
        gate.open()
        (second,) = running.finish()
        assert second.outcomes == {"disk": "ok"} and dest.state is DestState.CONSISTENT
        dest.lun.close()
    assert (exports / "disk").read_bytes() == source.read_bytes()
    log = (tmp_path / "agent.log").read_text()
    assert "rollback disk" not in log  # no rollback ever ran
    assert log.count("refused") >= 3 and "Traceback" not in log


def test_serve_control_answers_only_authenticated_clients(tmp_path, source, credentials):
    secret = secret_file(tmp_path)
    good = Credentials("client", tls_creds=credentials["good"], secret_file=secret)
    args = ["serve", str(source), "--listen", f"{HOST}:0", "--control", f"{HOST}:0"]
    args += ["--tls-creds", str(credentials["good"]), "--secret-file", str(secret)]
    with daemon(tmp_path / "serve.log", *args) as served:
        port = served.control
        assert port is not None
        # The second attack: one mark from a plain socket made every update fail.
        with socket.create_connection((HOST, port), timeout=WAIT) as attacker:
            assert ask(attacker, {"op": "mark"}) == {}
        certified = Credentials("client", tls_creds=credentials["good"])
        with pytest.raises(AuthenticationError, match="asks for its shared secret"):
            certified.connect(HOST, port, WAIT)
        with good.connect(HOST, port, WAIT) as sock:
            assert ask(sock, {"id": 1, "op": "status"})["info"]["state"] == "unmarked"
            assert ask(sock, {"id": 2, "op": "mark"})["ok"]
            assert ask(sock, {"id": 3, "op": "unmark"})["ok"]
        served.stop()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_update_and_rollback_take_the_site_credentials(tmp_path, exports, credentials):
    secret = secret_file(tmp_path)
    good = credentials["good"]
    (tmp_path / "source.img").write_bytes(random.Random(9).randbytes(SIZE))
    with secured_agent(tmp_path, exports, agent_options(credentials, secret, True)) as remote:
        site = ["--site", f"{HOST}:{remote.control}", "--timeout", str(WAIT)]
        isc_run("create", "s", "--source", "source.img", cwd=tmp_path)
        isc_run("add-dest", "s", with_tls(remote.exports["disk"], good), "--name", "disk",
                cwd=tmp_path)  # fmt: skip
        secure = ["--tls-creds", str(good), "--secret-file", str(secret)]
        isc_run("update", "s", *site, *secure, cwd=tmp_path)
        assert (exports / "disk").read_bytes() == (tmp_path / "source.img").read_bytes()

        def state() -> dict:
            # An update marks before it asks the site: a failed one leaves a generation more.
            report = status_report(str(tmp_path / "s"), read_state(tmp_path / "s"))
            del report["generation"], report["as_of"]
            return report

        before = state()
        wrong = secret_file(tmp_path, "wrong")
        for attempt, why in (
            ([], "closed the connection"),
            (["--tls-creds", str(good), "--secret-file", str(wrong)], "authentication failed"),
        ):
            done = isc_run("update", "s", *site, *attempt, cwd=tmp_path, check=1)
            assert why in error_line(done), done.stderr
            assert state() == before
        done = isc_run("rollback", "s", "disk", *site, cwd=tmp_path, check=1)
        assert "closed the connection" in error_line(done)
        assert state() == before
        assert (exports / "disk").read_bytes() == (tmp_path / "source.img").read_bytes()
        (tmp_path / "loose").write_text("0123456789abcdef0123")
        (tmp_path / "loose").chmod(0o644)
        done = isc_run("update", "s", *site, "--secret-file", "loose", cwd=tmp_path, check=1)
        assert "chmod 600" in error_line(done)
        done = isc_run("update", "s", "--secret-file", str(secret), cwd=tmp_path, check=1)
        assert "add --site" in error_line(done)


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ([], "NBD exports on 0.0.0.0 would take requests from the network"),
        (["--secret-file", "{secret}"], "NBD exports on 0.0.0.0"),
        (["--tls-creds", "{good}"], "NBD exports on 0.0.0.0"),
        (["--tls-creds", "{good}", "--tls=require"], "add --tls=require --tls-verify-peer"),
    ],
)
def test_an_agent_beyond_loopback_needs_tls_and_authentication(
    tmp_path, exports, credentials, options, why
):
    fill = {"good": credentials["good"], "secret": secret_file(tmp_path)}
    args = ["agent", "--listen", "0.0.0.0:0", "--nbd-port", "0", "--dir", str(exports)]
    done = isc_run(*args, *(o.format(**fill) for o in options), cwd=tmp_path, check=1)
    assert why in error_line(done)
    assert not (exports / ".isc-agent").exists()  # refused before anything was made


def test_an_agent_beyond_loopback_with_mutual_tls_or_insecure(tmp_path, exports, credentials):
    secure = ["--tls-creds", str(credentials["good"]), "--tls=require", "--tls-verify-peer"]
    with daemon(tmp_path / "open.log", "agent", "--listen", "0.0.0.0:0", "--nbd-port", "0",
                "--dir", str(exports), "--insecure") as remote:  # fmt: skip
        remote.stop()
    assert "without TLS and authentication (--insecure)" in (tmp_path / "open.log").read_text()
    with daemon(tmp_path / "closed.log", "agent", "--listen", "0.0.0.0:0", "--nbd-port", "0",
                "--dir", str(exports), *secure) as remote:  # fmt: skip
        assert all(uri.startswith("nbds://") for uri in remote.exports.values())
        client = Credentials("client", tls_creds=credentials["good"])
        site = AgentSite(HOST, remote.control, timeout=WAIT, credentials=client)
        assert site.status(Destination(None, name="disk")).ok
        remote.stop()
    assert "insecure" not in (tmp_path / "closed.log").read_text()


def test_serve_control_beyond_loopback_needs_mutual_tls(tmp_path, source, credentials):
    secret = secret_file(tmp_path)
    args = ["serve", str(source), "--listen", f"{HOST}:0", "--control", "0.0.0.0:0"]
    for options in ([], ["--secret-file", str(secret)]):
        done = isc_run(*args, *options, cwd=tmp_path, check=1)
        assert (
            "control port on 0.0.0.0 would take requests from the network without TLS and "
            "authentication: add --tls-creds DIR" in error_line(done)
        )
    secure = ["--tls-creds", str(credentials["good"]), "--secret-file", str(secret)]
    with daemon(tmp_path / "serve.log", *args, *secure) as served:
        client = Credentials("client", tls_creds=credentials["good"], secret_file=secret)
        with client.connect(HOST, served.control, WAIT) as sock:
            assert ask(sock, {"id": 1, "op": "status"})["ok"]
        served.stop()


# -- limits ----------------------------------------------------------------------------------------
def test_one_connection_more_than_max_clients_is_refused(monkeypatch, caplog):
    monkeypatch.setattr(isc.control, "MAX_CLIENTS", 2)
    with counted(None) as server:
        first = socket.create_connection((HOST, server.port), timeout=WAIT)
        second = socket.create_connection((HOST, server.port), timeout=WAIT)
        with first, second:
            for sock in (first, second):  # answered: both are being served
                assert ask(sock, {"id": 1, "op": "bump"})["ok"]
            with socket.create_connection((HOST, server.port), timeout=WAIT) as third:
                refusal = line(third)
                assert closed(third)
        assert refusal["ok"] is False and "too many control connections (2" in refusal["reason"]
        with socket.create_connection((HOST, server.port), timeout=WAIT) as later:
            assert ask(later, {"id": 2, "op": "bump"})["ok"]
        assert server.count == 3
    assert sum("too many control connections" in r.getMessage() for r in caplog.records) == 1


def test_an_idle_connection_is_closed(monkeypatch):
    monkeypatch.setattr(isc.control, "IDLE_TIMEOUT", 0.2)
    with counted(None) as server:
        with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
            assert ask(sock, {"id": 1, "op": "bump"})["ok"]
            assert closed(sock)
        assert server.count == 1


@pytest.mark.parametrize(
    "request_line",
    [
        b'{"id": 1, "op": "bump", "throttle": 1e999}\n',
        b'{"id": 1, "op": "bump", "throttle": NaN}\n',
        b'{"id": 1, "op": "bump", "throttle": -Infinity}\n',
        b'{"id": 1, "op": "bump", "n": ' + b"9" * 5000 + b"}\n",
    ],
)
def test_numbers_that_are_not_finite_are_refused(request_line):
    with counted(None) as server, socket.create_connection((HOST, server.port)) as sock:
        sock.settimeout(WAIT)
        sock.sendall(request_line)
        reply = line(sock)
        assert reply["ok"] is False and reply["reason"].startswith("not JSON")
        assert server.count == 0


def test_a_malformed_export_name_gets_ok_false_without_a_traceback(exports, caplog):
    agent = Agent(exports)
    try:
        for name in (["disk"], {"disk": 1}, 7, None):
            reply = agent.control.answer(json.dumps({"id": 1, "op": "rollback", "export": name}))
            assert reply["ok"] is False and "no export named" in reply["reason"]
    finally:
        agent.close()
    assert not [r for r in caplog.records if r.exc_info]


# -- Unix sockets ---------------------------------------------------------------------------------
def test_serve_control_on_a_unix_socket_reaches_this_user_only(tmp_path, source):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = private / "control.sock"
    (private / "stale.sock").touch()
    with daemon(tmp_path / "serve.log", "serve", str(source), "--listen", f"{HOST}:0",
                "--control", f"unix:{path}") as served:  # fmt: skip
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        assert sorted(p.name for p in private.iterdir()) == ["control.sock", "stale.sock"]
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(path))
            assert ask(sock, {"id": 1, "op": "status"})["info"]["state"] == "unmarked"
        other = tmp_path / "other.img"  # a source of its own: the first one is locked
        other.write_bytes(bytes(4096))
        done = isc_run("serve", str(other), "--listen", f"{HOST}:0", "--control",
                       f"unix:{path}", cwd=tmp_path, check=1)  # fmt: skip
        assert f"a server listens on {path} already" in error_line(done)
        served.stop()
    assert not path.exists()  # removed on stop


@pytest.mark.parametrize(
    "server_side", [{"secret_file": "ours"}, {"tls_creds": "good"}], ids=["secret", "tls"]
)
def test_credentials_authenticate_on_a_unix_socket_too(tmp_path, secrets, credentials, server_side):
    def made(endpoint: str, kind: dict) -> Credentials:
        files = {**secrets, **credentials}
        return Credentials(endpoint, **{key: files[name] for key, name in kind.items()})

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = private / "control.sock"
    wrong = {"secret_file": "theirs"} if "secret_file" in server_side else {"tls_creds": "other-ca"}
    with counted(made("server", server_side), path) as server:
        with made("client", server_side).connect_unix(path, WAIT) as sock:
            assert ask(sock, {"id": 1, "op": "bump"})["ok"]
        with pytest.raises(AuthenticationError, match=f"unix:{path}"):
            made("client", wrong).connect_unix(path, WAIT)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(path))
            sock.sendall(b'{"id": 2, "op": "bump"}\n')
            replies = [line(sock), line(sock)]
            assert closed(sock)
        assert all(reply.get("ok") is not True for reply in replies)
        assert server.count == 1


def test_an_agent_on_a_unix_socket_is_the_site_of_update_rollback_and_serve(
    tmp_path, source, exports, credentials
):
    # Mutual TLS and a shared secret (each alone on a Unix socket: the test above).
    secret = secret_file(tmp_path)
    good = credentials["good"]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = private / "agent.sock"
    args = ["--listen", f"unix:{path}", "--nbd-port", "0", "--dir", str(exports)]
    options = agent_options(credentials, secret, tls=True)
    with daemon(tmp_path / "agent.log", "-v", "agent", *args, *options) as remote:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        assert remote.exports["disk"].split("://")[1].startswith(f"{HOST}:")  # on loopback
        uri = with_tls(remote.exports["disk"], good)
        site = ["--site", f"unix:{path}"]
        secure = ["--secret-file", str(secret), "--tls-creds", str(good)]
        isc_run("create", "s", "--source", "source.img", cwd=tmp_path)
        isc_run("add-dest", "s", uri, "--name", "disk", cwd=tmp_path)
        isc_run("update", "s", *site, *secure, cwd=tmp_path)
        assert (exports / "disk").read_bytes() == source.read_bytes()
        # The socket reaches only this user, and still only with the credentials.
        done = isc_run("update", "s", *site, cwd=tmp_path, check=1)
        assert f"the agent at unix:{path}" in error_line(done)
        client = Credentials("client", tls_creds=good, secret_file=secret)
        holder = session_holder(read_state(tmp_path / "s").meta["id"], "s")  # s holds disk
        agent = AgentSite(unix=path, timeout=WAIT, credentials=client, holder=holder)
        # The writes of an update that failed under a protection, rolled back by isc rollback.
        dest = Destination(None, name="disk")
        assert agent.protect(dest).ok
        with NBDLUN(uri, timeout=WAIT) as lun:
            lun.write(SIZE // 2, b"\xff" * 65536)
            lun.flush()
        done = isc_run("rollback", "s", "disk", *site, *secure, cwd=tmp_path)
        assert done.stdout.startswith("rolled back disk: 1 range(s) rewritten")
        assert (exports / "disk").read_bytes() == source.read_bytes()
        assert agent.unprotect(dest).ok
        # isc serve's periodic updates protect the destination at the same site.
        serve = ["serve", str(tmp_path / "s"), "--listen", f"{HOST}:0", "--every", "0.05"]
        with daemon(tmp_path / "serve.log", *serve, *site, *secure) as served:
            with NBDLUN(served.exports["s"], timeout=WAIT) as lun:
                lun.write(0, random.Random(12).randbytes(65536))
                lun.flush()
            wait_until(
                lambda: (exports / "disk").read_bytes() == source.read_bytes(),
                served.proc,
                "update that sends the host write",
                served.log,
            )
            served.stop()
        remote.stop()
    log = (tmp_path / "agent.log").read_text()
    assert log.count(": protect disk: ok") >= 3  # by isc update, this test, isc serve
    assert ": rollback disk: ok" in log and "Traceback" not in log
    assert not path.exists()  # removed on stop


def test_an_agent_socket_where_others_could_reach_it_is_refused(tmp_path, exports):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    args = ["agent", "--listen", f"unix:{shared}/agent.sock", "--nbd-port", "0"]
    done = isc_run(*args, "--dir", str(exports), cwd=tmp_path, check=1)
    assert (
        "must be yours (or root's) and writable by its owner alone (make one with mkdir -m 700)"
        in error_line(done)
    )
    assert list(shared.iterdir()) == [] and not (exports / ".isc-agent").exists()


def test_an_agent_site_is_at_a_host_and_port_or_a_unix_socket(tmp_path):
    assert AgentSite(unix="run/agent.sock").address == os.path.abspath("run/agent.sock")
    assert AgentSite(HOST, 7).address == (HOST, 7)
    for wrong in ({}, {"host": HOST}, {"port": 7}, {"host": HOST, "port": 7, "unix": "s"}):
        with pytest.raises(ParameterError, match="at a host and port, or at a Unix socket"):
            AgentSite(**wrong)  # type: ignore[arg-type]
    ack = AgentSite(unix=tmp_path / "nobody.sock", timeout=WAIT).status(Destination(None, "d"))
    assert not ack.ok and not ack.outcome_unknown
    assert f"the agent at unix:{tmp_path / 'nobody.sock'} cannot be reached" in ack.reason


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda d: d.chmod(0o777), "and writable by its owner alone"),
        (lambda d: d.chmod(0o720), "has mode 0720"),
        (lambda d: (d / "control.sock").write_text("x"), "exists and is not a socket"),
        (lambda d: d.rmdir(), "No such file or directory"),
    ],
)
def test_a_control_socket_where_others_could_reach_it_is_refused(tmp_path, make, why):
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o700)
    make(directory)
    with pytest.raises(ParameterError, match=why):
        ControlServer({}).start_unix(directory / "control.sock")
    if directory.exists():
        assert not [p for p in directory.iterdir() if p.name.startswith(".isc-socket")]


def test_a_stale_control_socket_is_replaced(tmp_path):
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o700)
    path = directory / "control.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))  # left behind by a killed server: nobody listens
    with counted(None, path) as server, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        assert ask(sock, {"id": 1, "op": "bump"})["ok"]
        assert server.count == 1
    assert not path.exists()


def test_a_control_socket_whose_path_fits_is_served_however_deep_its_directory(tmp_path):
    # The socket is bound in a staging directory beside its path: that detour
    # must not make a path that fits too long for a Unix socket.
    directory = tmp_path / "d"
    limit = 107  # bytes of a Unix socket's path (108 with its NUL)
    directory = directory.with_name("d" * (limit - len(str(tmp_path)) - len("/control.sock") - 1))
    directory.mkdir(mode=0o700)
    path = directory / "control.sock"
    assert len(os.fsencode(path)) == limit
    with counted(None, path) as server, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        assert ask(sock, {"id": 1, "op": "bump"})["ok"]
        assert server.count == 1
    assert list(directory.iterdir()) == []


def test_a_control_socket_path_too_long_for_a_unix_socket_is_refused_plainly(tmp_path):
    directory = tmp_path / ("d" * max(1, 120 - len(str(tmp_path))))
    directory.mkdir(mode=0o700)
    path = directory / "control.sock"
    with pytest.raises(ParameterError, match=r"is at most 107 bytes: pick a shorter one"):
        ControlServer({}).start_unix(path)
    assert list(directory.iterdir()) == []


# -- other users of the machine ----------------------------------------------------------------
# As another user: connect to HOST PORT, send a line (if given), print the first line back.
FIRST_LINE = """import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as sock:
    sock.sendall(sys.argv[3].encode())
    print(sock.makefile().readline(), end="")
"""
# As another user: connect to a TCP (HOST PORT) or Unix (PATH) socket, send a byte, and
# stay until the other end closes.
STAY = """import socket, sys
if len(sys.argv) == 2:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
else:
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
with sock:
    sock.sendall(b"x")
    sock.recv(1)
"""


def first_line_as_nobody(host: str, port: int, request: dict) -> dict:
    """The first line a control server at ``host:port`` says to another user who sends
    ``request``."""
    done = subprocess.run(
        [*another_user(), PYTHON, "-c", FIRST_LINE, host, str(port), json.dumps(request) + "\n"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("host", [HOST, "::1"], ids=["ipv4", "ipv6"])
def test_a_control_client_of_another_user_is_refused_unless_insecure(host, caplog):
    request = {"id": 3, "op": "bump"}
    with counted(None, host=host) as server:
        refusal = first_line_as_nobody(host, server.port, request)
        with socket.create_connection((host, server.port), timeout=WAIT) as sock:
            assert ask(sock, request)["ok"]  # this user's client
        assert server.count == 1
    assert refusal["ok"] is False and refusal["id"] is None
    assert f"belongs to uid {NOBODY}" in refusal["reason"]
    assert (
        "give it --tls-creds or --secret-file, or allow every user with --insecure"
        in (refusal["reason"])
    )
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(logged) == 1 and f"belongs to uid {NOBODY}" in logged[0]
    with counted(None, host=host, insecure=True) as server:
        assert first_line_as_nobody(host, server.port, request)["ok"]
        assert server.count == 1


def test_a_control_port_with_a_secret_asks_another_user_for_it(secrets):
    with counted(Credentials("server", secret_file=secrets["ours"])) as server:
        challenge = first_line_as_nobody(HOST, server.port, {"id": 3, "op": "bump"})
        assert challenge["auth"] == isc.auth.HMAC_AUTH and "challenge" in challenge
        assert server.count == 0


def test_an_agent_serves_another_user_only_when_insecure(tmp_path, exports):
    args = ["agent", "--listen", f"{HOST}:0", "--nbd-port", "0", "--dir", str(exports)]
    with daemon(tmp_path / "agent.log", *args) as remote:
        refusal = first_line_as_nobody(HOST, remote.control, {"id": 1, "op": "list"})
        assert f"belongs to uid {NOBODY}" in refusal["reason"]
        with socket.create_connection((HOST, remote.control), timeout=WAIT) as sock:
            assert ask(sock, {"id": 2, "op": "list"})["ok"]
        remote.stop()
    with daemon(tmp_path / "open.log", *args, "--insecure") as remote:
        assert first_line_as_nobody(HOST, remote.control, {"id": 1, "op": "list"})["ok"]
        remote.stop()


def test_isc_serve_control_serves_another_user_only_when_insecure(tmp_path, source):
    args = ["serve", str(source), "--listen", f"{HOST}:0", "--control", f"{HOST}:0"]
    with daemon(tmp_path / "serve.log", *args) as served:
        refusal = first_line_as_nobody(HOST, served.control, {"id": 1, "op": "mark"})
        assert refusal["ok"] is False and f"belongs to uid {NOBODY}" in refusal["reason"]
        with socket.create_connection((HOST, served.control), timeout=WAIT) as sock:
            assert ask(sock, {"id": 2, "op": "status"})["info"]["state"] == "unmarked"
    with daemon(tmp_path / "open.log", *args, "--insecure") as served:
        assert first_line_as_nobody(HOST, served.control, {"id": 1, "op": "mark"})["ok"]
        with socket.create_connection((HOST, served.control), timeout=WAIT) as sock:
            assert ask(sock, {"id": 2, "op": "status"})["info"]["state"] == "marked"
    assert "serve every user of this machine" in (tmp_path / "open.log").read_text()


@contextmanager
def listening(kind: str) -> Iterator[tuple[socket.socket, list[str]]]:
    """A listening socket of ``kind`` that another user reaches, and its address as
    :data:`STAY`'s arguments."""
    if kind == "unix":
        with tempfile.TemporaryDirectory(prefix="isc-peer-") as directory:
            os.chmod(directory, 0o755)
            path = os.path.join(directory, "s")
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(path)
                os.chmod(path, 0o777)
                listener.listen()
                yield listener, [path]
        return
    family = socket.AF_INET if kind == "ipv4" else socket.AF_INET6
    with socket.socket(family) as listener:
        if kind == "ipv4-mapped":  # dual stack: an IPv4 client's address is IPv4-mapped
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(({"ipv4": HOST, "ipv6": "::1"}.get(kind, "::"), 0))
        listener.listen()
        yield listener, ["::1" if kind == "ipv6" else HOST, str(listener.getsockname()[1])]


@pytest.mark.parametrize("kind", ["ipv4", "ipv6", "ipv4-mapped", "unix"])
def test_stranger_tells_whose_the_peer_is(kind):
    nobody = another_user()
    with listening(kind) as (listener, where):
        with subprocess.Popen([*nobody, PYTHON, "-c", STAY, *where]) as theirs:
            accepted, _ = listener.accept()
            with accepted:
                accepted.settimeout(WAIT)
                assert accepted.recv(1) == b"x"  # connected, and still there
                if kind == "ipv4-mapped":
                    assert accepted.getpeername()[0] == f"::ffff:{HOST}"
                why = stranger(accepted, "FIX")
            assert theirs.wait(WAIT) == 0
        assert why is not None and f"belongs to uid {NOBODY}" in why and ": FIX, or" in why
        address = where[0] if kind == "unix" else (where[0], int(where[1]))
        with isc.auth.connect(address, WAIT):  # this user's
            accepted, _ = listener.accept()
            with accepted:
                assert stranger(accepted, "FIX") is None


class Elsewhere:
    """A connection from an address no socket of this machine has (another host's)."""

    family = socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        return ("192.0.2.1", 40000)  # TEST-NET-1: nobody's

    def getsockname(self) -> tuple[str, int]:
        return (HOST, 10809)


def test_a_peer_whose_owner_cannot_be_told_is_refused(monkeypatch, caplog):
    why = stranger(Elsewhere(), "FIX")  # type: ignore[arg-type]
    assert (
        why is not None and "cannot tell who 192.0.2.1:40000 is: no socket of this machine" in why
    )
    with socket.socket() as listener:  # a client reset before the check: its address is gone
        listener.bind((HOST, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=WAIT) as client:
            accepted, _ = listener.accept()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        with accepted:
            accepted.settimeout(WAIT)
            with pytest.raises(ConnectionResetError):
                accepted.recv(1)
            why = stranger(accepted, "FIX")
        assert why is not None and "cannot tell who the client is" in why
    # The kernel cannot be asked: every TCP client is refused, with one line.
    monkeypatch.setattr(isc.auth, "NETLINK_SOCK_DIAG", 31)  # a netlink family Linux lacks
    with counted(None) as server:
        with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
            refusal = ask(sock, {"id": 1, "op": "bump"})
            assert closed(sock)
        assert server.count == 0
    assert refusal["ok"] is False and "sock_diag: Protocol not supported" in refusal["reason"]
    assert any("sock_diag" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("uid", "mode", "refused"),
    [(1000, 0o755, False), (0, 0o755, False), (0, 0o775, True), (2000, 0o755, True)],
)
def test_a_directory_is_trusted_when_this_user_or_root_owns_it_and_its_owner_alone_writes_it(
    monkeypatch, uid, mode, refused
):
    # As OpenSSH's StrictModes: root may change anything anyway, so a directory of root's
    # (/etc/isc) is as safe for uid 1000 as its own; another user's is not.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    info = os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, 0, 0, 0, 0, 0))
    assert (others_may_change(info) is not None) is refused
