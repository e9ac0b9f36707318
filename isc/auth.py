"""Authenticated control connections: mutual TLS, a shared secret, or both.

The control ports (``isc agent``'s, ``isc serve --control``) change data and
state, so with :class:`Credentials` a server answers only peers that prove
who they are, and a client talks only to a server that proves it too:

=============  ===========================================================
mutual TLS     the whole connection is TLS (:mod:`isc.tls`); each end
               presents a certificate signed by the CA of the other's
               credentials directory (``ca-cert.pem``; the server's
               ``server-cert.pem``, the client's ``client-cert.pem``)
shared secret  HMAC-SHA256 challenge-response (DRBD's ``cram-hmac-alg``
               idea) with a secret read from a file only its owner can
               read; the secret itself never crosses the wire
both           the challenge-response runs inside the TLS connection
=============  ===========================================================

The server speaks first, once the connection (and TLS) is up; then the
exchange runs one JSON line at a time, before any request (``s`` and ``c``
are 32 random bytes from the server and the client, hex on the wire;
``HMAC(label, x, y)`` is HMAC-SHA256 keyed with the secret over
``label || 0 || x || y``)::

    S: {"id": null, "ok": false, "reason": "authentication required: ...",
        "auth": "hmac-sha256", "challenge": s}
    C: {"auth": "hmac-sha256", "challenge": c, "proof": HMAC("isc-client", s, c)}
    S: {"auth": "hmac-sha256", "ok": true, "proof": HMAC("isc-server", c, s)}

The client proves first, so a peer that does not hold the secret learns
nothing computed from it; fresh challenges on both sides make an old proof
useless, and the two labels keep one side's proof from serving as the
other's. The first line is also what a client that knows nothing of this
reads as the answer to its request: ``ok: false`` and why. With TLS alone
the server's first line is ``{"auth": "x509", "ok": true}``: the handshake
has checked the client's certificate.

A control port on a Unix socket runs the same exchange. A client checks
there that the server's certificate is signed by its CA, but not which host
it names: a socket has no host name (its path, in a directory of its user
alone, says which server it is).

A peer that fails gets one line ``{"ok": false, "reason": ...}`` (the id of
its request, when it sent one) and the connection closes; the server logs
the refusal. No line of an unauthenticated connection is ever read as a
request, so nothing changes. A client raises
:class:`~isc.errors.AuthenticationError`, one line naming the server and the
fix.

A listener with neither (no secret, and no TLS that verifies its peers)
serves its own user alone (:func:`stranger`, which the NBD server and the
control server ask of each new connection): the kernel tells who owns the
peer's socket, and a peer of another user, or one whose owner cannot be
told, is refused before anything is read from it.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import ssl
import stat
import struct
import time

from isc import tls
from isc.errors import AuthenticationError, ParameterError

HMAC_AUTH = "hmac-sha256"
"""The ``auth`` value of the challenge-response lines."""
X509_AUTH = "x509"
"""The ``auth`` value of the line that admits a client authenticated by TLS alone."""

CHALLENGE_BYTES = 32
MIN_SECRET = 16
"""The shortest secret in bytes accepted: shorter ones can be guessed offline."""
MAX_SECRET = 4096
AUTH_TIMEOUT = 10.0
"""Seconds a server gives a client to authenticate before it drops the connection."""

AUTH_REQUIRED = (
    "authentication required: this server answers only clients that prove they hold its "
    f"shared secret ({HMAC_AUTH} challenge-response; isc's --secret-file)"
)
_MAX_LINE = 4096  # bytes of one line of the exchange, either way
_CLIENT, _SERVER = b"isc-client", b"isc-server"
_MAKE_SECRET = "make one with: openssl rand -hex 32 > FILE && chmod 600 FILE"


class Refusal(AuthenticationError):
    """A server refused a client; ``request_id`` is the id of the request it sent
    instead of authenticating, if any, so the refusal answers it."""

    def __init__(self, message: str, request_id: object = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The shared secret in the file at ``path``, surrounding whitespace removed.

    The file must be a regular file (not a symlink), owned by this user and
    readable by no one else (mode 0600 or 0400), holding at least
    :data:`MIN_SECRET` bytes. Raises ``ParameterError`` naming the file and the
    fix otherwise.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ParameterError(f"secret file {name} is a symlink; give the file itself") from None
        raise ParameterError(f"secret file {name}: {exc.strerror}; {_MAKE_SECRET}") from None
    try:
        # The checks are on the file opened, not on the path: nothing can swap it in between.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ParameterError(f"secret file {name} is not a regular file; {_MAKE_SECRET}")
        if problem := not_private(info, name):
            raise ParameterError(f"secret file {name} {problem}")
        secret = os.read(fd, MAX_SECRET + 1).strip()
    finally:
        os.close(fd)
    if not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise ParameterError(
            f"secret file {name} holds {len(secret)} bytes; a secret has {MIN_SECRET} to "
            f"{MAX_SECRET} bytes: {_MAKE_SECRET}"
        )
    return secret


def not_private(info: os.stat_result, name: str) -> str | None:
    """Why the file ``name`` (``info``: its status) holding a secret (a shared secret, a
    TLS private key) is not this user's alone, or None: another user owns it, or its mode
    lets group or others at it. The words end with the fix."""
    if info.st_uid != os.geteuid():
        return (
            f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}): chown it, "
            "or use a file of your own"
        )
    if info.st_mode & 0o077:
        return (
            f"has mode {stat.S_IMODE(info.st_mode):04o}, so other users may read or change "
            f"it: chmod 600 {name}"
        )
    return None


def others_may_change(info: os.stat_result) -> str | None:
    """Why another user could change what is in the directory ``info`` describes, or None.

    It must belong to this user or to root (who may change anything anyway, as
    OpenSSH's StrictModes allows) and be writable by its owner alone, or whoever
    else may write it replaces what isc finds there.
    """
    if info.st_uid in (os.geteuid(), 0) and not info.st_mode & 0o022:
        return None
    return (
        f"has mode {stat.S_IMODE(info.st_mode):04o} and owner uid {info.st_uid}: it must be "
        "yours (or root's) and writable by its owner alone"
    )


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only: ``localhost``,
    127.0.0.0/8 or ::1 (an IPv4-mapped one too). Any other name, and "" (every
    interface), is not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


NETLINK_SOCK_DIAG = 4
"""The netlink family that finds a socket of this machine's network namespace by its
addresses and tells its owner (Linux's ``sock_diag``, which ``ss`` uses)."""
_SOCK_DIAG_BY_FAMILY = 20  # the request, and the type of its answer
_NLMSG_ERROR = 2  # the type of a refusal (struct nlmsgerr: a negative errno first)
_NETLINK = struct.Struct("=IHHII")  # struct nlmsghdr: length, type, flags, seq, pid
_DIAG_REQUEST = struct.Struct("=BBBBI")  # struct inet_diag_req_v2 up to the socket's id
_SOCKET_ID = struct.Struct(">HH16s16s")  # sport, dport, src, dst (network order) ...
_SOCKET_ID_TAIL = struct.Struct("=IQ")  # ... interface, cookie (any: all ones)
_DIAG_ANSWER = struct.Struct("=BB")  # struct inet_diag_msg: family, state, ...
_DIAG_UID = 4 + _SOCKET_ID.size + _SOCKET_ID_TAIL.size + 12  # ... expires, queues, uid
_TIME_WAIT = 6  # a socket that has closed: it reads as root's
_UCRED = struct.Struct("=3i")  # struct ucred, what SO_PEERCRED gives: pid, uid, gid


def stranger(sock: socket.socket, fix: str) -> str | None:
    """Why the peer of ``sock``, a connection that a listener neither TLS with peer
    verification nor secret-authenticated accepted, is not served; None when the peer
    belongs to this user (the effective uid) or root.

    Such a listener serves the local user alone (MISSION rule 14), also on TCP
    loopback, which every user of the machine reaches. On a Unix socket the kernel
    says who connected (``SO_PEERCRED``). Over TCP the peer must be a socket of this
    machine: the kernel finds it by its addresses (its local one is ``sock``'s peer,
    its remote one ``sock``'s own; an IPv4-mapped address as the IPv4 one) through
    ``sock_diag`` (:data:`NETLINK_SOCK_DIAG`) and says its owner. A peer it does not
    find (another host's, or closed already) is refused, and so is every peer when it
    cannot be asked. One netlink round trip a connection: about 15 µs. The reason
    names the peer and ends with ``fix`` (how to secure the listener), or
    ``--insecure``.
    """
    mine = os.geteuid()
    if sock.family == socket.AF_UNIX:
        _, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        peer = "the client process"
    else:
        try:
            name, own = sock.getpeername(), sock.getsockname()
        except OSError as exc:  # reset by the peer already
            return _stranger(f"cannot tell who the client is: {exc.strerror}", mine, fix)
        peer = f"{name[0]}:{name[1]}"
        owner = _tcp_owner(_address(name), _address(own))
        if isinstance(owner, str):
            return _stranger(f"cannot tell who {peer} is: {owner}", mine, fix)
        uid = owner
    if uid in (mine, 0):
        return None
    return _stranger(f"{peer} belongs to uid {uid}", mine, fix)


def _stranger(why: str, mine: int, fix: str) -> str:
    return (
        f"{why}, and without TLS and authentication this listener serves uid {mine} (and "
        f"root) alone: {fix}, or allow every user with --insecure"
    )


_Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _address(name: tuple) -> _Address:
    """The address (an IPv4-mapped one as IPv4, an IPv6 one's scope dropped) and port of
    a socket's name."""
    address = ipaddress.ip_address(name[0].partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, name[1]


def _tcp_owner(local: _Address, remote: _Address) -> int | str:
    """The uid owning the TCP socket of this machine at ``local`` connected to ``remote``,
    or why it is not known."""
    (here, here_port), (there, there_port) = local, remote
    family = socket.AF_INET if here.version == 4 else socket.AF_INET6
    request = (
        _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0)
        + _SOCKET_ID.pack(here_port, there_port, here.packed, there.packed)
        + _SOCKET_ID_TAIL.pack(0, (1 << 64) - 1)
    )
    header = _NETLINK.pack(_NETLINK.size + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        ) as diag:
            diag.sendto(header + request, (0, 0))
            answer = diag.recv(1024)
    except OSError as exc:
        return f"sock_diag: {exc.strerror}"
    _, kind, _, _, _ = _NETLINK.unpack_from(answer)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", answer, _NETLINK.size)
        if -error != errno.ENOENT:
            return f"sock_diag: {os.strerror(-error)}"
    elif _DIAG_ANSWER.unpack_from(answer, _NETLINK.size)[1] != _TIME_WAIT:
        (uid,) = struct.unpack_from("=I", answer, _NETLINK.size + _DIAG_UID)
        return int(uid)
    return "no socket of this machine has that address (another host's, or closed already)"


def _proof(secret: bytes, label: bytes, first: bytes, second: bytes) -> str:
    return hmac.new(secret, label + b"\0" + first + second, hashlib.sha256).hexdigest()


def _same(proof: str, expected: str) -> bool:
    """Whether a proof from the wire is the one expected, in constant time (any text)."""
    return hmac.compare_digest(proof.encode(errors="replace"), expected.encode())


def _challenge(message: dict) -> bytes | None:
    """The challenge of an exchange line, or None when it has no valid one."""
    value = message.get("challenge") if message.get("auth") == HMAC_AUTH else None
    if not isinstance(value, str) or len(value) != 2 * CHALLENGE_BYTES:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def _line(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _parse(line: bytes) -> dict:
    """A line of the exchange as a JSON object ({} when it is none)."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return {}
    return message if isinstance(message, dict) else {}


class Credentials:
    """How one end of a control connection proves who it is, and checks the other.

    ``endpoint`` is "server" or "client" (as QEMU's ``tls-creds-x509``).
    ``tls_creds``: a credentials directory (:mod:`isc.tls`); a server then
    requires client certificates signed by its ``ca-cert.pem``, a client
    presents its ``client-cert.pem`` and checks the server's certificate and
    host name. ``secret_file``: the shared secret (:func:`read_secret`). At
    least one is needed. Everything is read and checked here: bad
    credentials raise ``ParameterError`` naming the file before anything
    listens or connects.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        tls_creds: str | os.PathLike[str] | None = None,
        secret_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if endpoint not in ("server", "client"):
            raise ParameterError(f"endpoint is 'server' or 'client', got {endpoint!r}")
        if tls_creds is None and secret_file is None:
            raise ParameterError(
                "credentials need a TLS credentials directory, a secret file, or both"
            )
        self.endpoint = endpoint
        self.tls_creds = os.fspath(tls_creds) if tls_creds is not None else None
        self.secret_file = os.fspath(secret_file) if secret_file is not None else None
        self._context: ssl.SSLContext | None = None
        if tls_creds is not None:
            self._context = (
                tls.server_context(tls_creds, verify_peer=True)
                if endpoint == "server"
                else tls.client_context(tls_creds, check_hostname=True, certificate=True)
            )
        self._secret = read_secret(secret_file) if secret_file is not None else None

    def __repr__(self) -> str:
        what = [f"tls_creds={self.tls_creds!r}"] if self.tls_creds else []
        what += [f"secret_file={self.secret_file!r}"] if self.secret_file else []
        return f"<Credentials {self.endpoint} {' '.join(what)}>"

    @property
    def tls(self) -> bool:
        """True when the connections are TLS (mutual)."""
        return self._context is not None

    # -- the server's end -------------------------------------------------------------
    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Authenticate the client of a new connection; return who it is, for the log.

        Upgrades the connection to TLS first when there are TLS credentials.
        Raises :class:`Refusal` (the caller sends its line and closes),
        ``ConnectionError`` when the client leaves.
        """
        if self.endpoint != "server":
            raise ParameterError(f"{self!r} is a client's: it cannot accept connections")
        who = "the client"
        if self._context is not None:
            try:
                await writer.start_tls(self._context, ssl_handshake_timeout=tls.HANDSHAKE_TIMEOUT)
            except ssl.SSLError as exc:
                raise Refusal(f"TLS handshake failed ({tls.describe(exc)})") from None
            subject = dict(part[0] for part in writer.get_extra_info("peercert")["subject"])
            who = f"the client with certificate CN={subject.get('commonName', '?')}"
        if self._secret is None:
            writer.write(_line({"auth": X509_AUTH, "ok": True}))
            await writer.drain()
            return who
        mine = os.urandom(CHALLENGE_BYTES)
        challenge = {"id": None, "ok": False, "reason": AUTH_REQUIRED}
        writer.write(_line({**challenge, "auth": HMAC_AUTH, "challenge": mine.hex()}))
        await writer.drain()
        answer = _parse(await _read_line(reader))
        theirs, proof = _challenge(answer), answer.get("proof")
        if theirs is None or not isinstance(proof, str):
            raise Refusal(AUTH_REQUIRED, answer.get("id"))
        if not _same(proof, _proof(self._secret, _CLIENT, mine, theirs)):
            raise Refusal(
                "authentication failed: the client's proof does not match this server's "
                "shared secret (the secret files differ)"
            )
        proof = _proof(self._secret, _SERVER, theirs, mine)
        writer.write(_line({"auth": HMAC_AUTH, "ok": True, "proof": proof}))
        await writer.drain()
        return f"{who} holding the shared secret"

    # -- the client's end -------------------------------------------------------------
    def connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        """A connection to the control port at ``host:port``, authenticated both ways.

        ``timeout`` bounds the connect and each wait for the server. Raises
        :class:`~isc.errors.AuthenticationError` when either end refuses the
        other, ``OSError`` (``TimeoutError``, ``ConnectionRefusedError`` ...)
        when the connection fails.
        """
        self._check_client()
        sock = socket.create_connection((host, port), timeout=timeout)
        return self._authenticate(sock, f"{host}:{port}", self._context, host.strip("[]"), timeout)

    def connect_unix(self, path: str | os.PathLike[str], timeout: float | None) -> socket.socket:
        """A connection to the control port on the Unix socket at ``path``, authenticated
        both ways; raises as :meth:`connect`. Over TLS the server's certificate must be
        signed by the CA, but names no host: the socket has none."""
        self._check_client()
        context = self._unix_context if self._context is not None else None
        sock = _unix_connection(path, timeout)
        return self._authenticate(sock, f"unix:{os.fspath(path)}", context, None, timeout)

    @functools.cached_property
    def _unix_context(self) -> ssl.SSLContext:
        assert self.tls_creds is not None
        return tls.client_context(self.tls_creds, check_hostname=False, certificate=True)

    def _check_client(self) -> None:
        if self.endpoint != "client":
            raise ParameterError(f"{self!r} is a server's: it cannot connect")

    def _authenticate(
        self,
        sock: socket.socket,
        where: str,
        context: ssl.SSLContext | None,
        hostname: str | None,
        timeout: float | None,
    ) -> socket.socket:
        """Run the exchange on the new connection ``sock`` to ``where``; return it ready
        for requests (upgraded to TLS by ``context``), or close it and raise."""
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=hostname)
            first = _parse(_first_line(sock, where, timeout))
            if self._secret is not None:
                self._prove(sock, where, first)
            elif first.get("auth") == HMAC_AUTH:
                raise AuthenticationError(
                    f"{where} asks for its shared secret: give the file that holds it "
                    "(--secret-file)"
                )
            elif first.get("auth") != X509_AUTH or first.get("ok") is not True:
                raise AuthenticationError(_refused(where, first))
        except ssl.SSLError as exc:
            sock.close()
            raise tls.handshake_error(exc, where, self.tls_creds) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _prove(self, sock: socket.socket, where: str, first: dict) -> None:
        """Answer the server's challenge in ``first``; check the server's proof."""
        assert self._secret is not None
        theirs = _challenge(first)
        if theirs is None:
            said = first.get("reason") or first.get("auth") or "no challenge"
            raise AuthenticationError(
                f"{where} does not ask for a shared secret ({said}): it runs without "
                "--secret-file, or is not an isc control port"
            )
        mine = os.urandom(CHALLENGE_BYTES)
        proof = _proof(self._secret, _CLIENT, theirs, mine)
        sock.sendall(_line({"auth": HMAC_AUTH, "challenge": mine.hex(), "proof": proof}))
        wait = sock.gettimeout()  # the connection's, bounding this wait in all
        deadline = None if wait is None else time.monotonic() + wait
        verdict = _parse(_recv_line(sock, where, deadline))
        if verdict.get("ok") is not True:
            raise AuthenticationError(_refused(where, verdict))
        proof = verdict.get("proof")
        if not isinstance(proof, str) or not _same(
            proof, _proof(self._secret, _SERVER, mine, theirs)
        ):
            raise AuthenticationError(
                f"{where} did not prove that it holds the shared secret: it is not the server "
                "it claims to be, or its secret file differs"
            )


def _refused(where: str, reply: dict) -> str:
    return f"{where} refused this client: {reply.get('reason') or 'no reason given'}"


def connect(
    address: tuple[str, int] | str, timeout: float | None, credentials: Credentials | None = None
) -> socket.socket:
    """A connection to the control port at ``address``, ``(host, port)`` or the path of a
    Unix socket: plain without ``credentials``, else authenticated
    (:meth:`Credentials.connect`, :meth:`Credentials.connect_unix`)."""
    if isinstance(address, str):
        if credentials is None:
            return _unix_connection(address, timeout)
        return credentials.connect_unix(address, timeout)
    if credentials is None:
        return socket.create_connection(address, timeout=timeout)
    return credentials.connect(*address, timeout)


def _unix_connection(path: str | os.PathLike[str], timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise Refusal("authentication failed: a line too long") from None
    except asyncio.IncompleteReadError:
        raise ConnectionError("the client left during authentication") from None


def _first_line(sock: socket.socket, where: str, timeout: float | None) -> bytes:
    """The server's first line, which an authenticating server sends at once."""
    wait = AUTH_TIMEOUT if timeout is None else min(timeout, AUTH_TIMEOUT)
    try:
        return _recv_line(sock, where, time.monotonic() + wait)
    except TimeoutError:
        raise AuthenticationError(
            f"{where} sent no authentication line within {wait:g} s: it does not ask for "
            "these credentials (it runs without --secret-file, or wants TLS: --tls-creds)"
        ) from None


def _recv_line(sock: socket.socket, where: str, deadline: float | None) -> bytes:
    """One line from the server (it sends nothing more until this end answers), received
    by ``deadline`` (:func:`read_line`'s)."""
    try:
        return read_line(sock, deadline, _MAX_LINE)
    except ConnectionAbortedError:
        raise AuthenticationError(
            f"{where} closed the connection during authentication: it refused this "
            "client's credentials, or does not use credentials of this kind"
        ) from None
    except ValueError:
        raise AuthenticationError(f"{where} sent a line over {_MAX_LINE} bytes") from None


def read_line(sock: socket.socket, deadline: float | None, limit: int) -> bytes:
    """The first line from ``sock``, its newline included, all of it received by
    ``deadline`` (a :func:`time.monotonic` instant; None: each receive waits for as long
    as the socket's timeout says), however slowly the peer sends it.

    Raises ``TimeoutError`` at the deadline, ``ConnectionAbortedError`` when the peer
    closes the connection first, ``ValueError`` past ``limit`` bytes. What follows the
    first line (a refusal comes with the answer to a request) is dropped.
    """
    data = bytearray()
    timeout = sock.gettimeout()
    try:
        while b"\n" not in data:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            part = sock.recv(limit + 1)
            if not part:
                raise ConnectionAbortedError
            data += part
            end = data.find(b"\n")
            if (end if end >= 0 else len(data)) > limit:
                raise ValueError(f"a line over {limit} bytes")
    finally:
        sock.settimeout(timeout)
    return bytes(data[: data.index(b"\n") + 1])
