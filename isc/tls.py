"""TLS for isc's network faces: X.509 credentials, contexts, and a TLS stream for blocking clients.

Credentials live in a directory laid out as QEMU's ``tls-creds-x509``,
nbdkit's ``--tls-certificates`` and libnbd's ``tls-certificates=`` expect, so
one directory serves isc, QEMU, nbdkit and libnbd alike:

===================  ======================================================
``ca-cert.pem``      the CA whose signature every peer's certificate needs
``server-cert.pem``  a server's certificate (its names: the hosts clients
                     connect to), with ``server-key.pem``, its private key
``client-cert.pem``  a client's certificate, with ``client-key.pem``; only
                     for servers that verify their clients
===================  ======================================================

A context is built once, when a server or client is configured: a missing
or unreadable file raises ``ParameterError`` naming it, before anything
listens or connects, and so do a private key that is not this user's alone
(another user's, or one group or others may read or write: ``chmod 600``, as
a secret file, :func:`isc.auth.read_secret`) and a directory, certificate or
CA file that another user could change (whoever may write them chooses whom
isc trusts: ``chmod go-w``, as a session directory). Every context speaks
TLS 1.2 or later. A server that verifies peers refuses a client without a
certificate signed by its CA (expired, from another CA, or none); a client
refuses a server whose certificate does not chain to its CA, has expired, or
(over TCP) does not name the host it connected to. Either refusal ends the connection before any
request is read: :class:`~isc.errors.AuthenticationError` on a client (also
reachable here, as ``isc.tls.AuthenticationError``), a log line on a server.

TLS-PSK (pre-shared keys, nbdkit's ``--tls-psk``) is not available: the
``ssl`` module has PSK callbacks only from Python 3.13, and isc runs on
older ones; :func:`refuse_psk` says so.

:class:`TLSSocket` is TLS over a connected blocking socket for a client
whose threads send and receive at the same time (``isc.nbd.NBDLUN``): one
thread may send while another receives, which an ``ssl.SSLSocket`` does not
promise. The encryption state sits behind a lock held only while bytes are
encrypted or decrypted in memory, never across a system call.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from isc.errors import AuthenticationError, ParameterError

TLS_MODES = ("off", "on", "require")
"""What an NBD server does with TLS, as nbdkit's ``--tls``: not offered, offered, required."""

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a server gives a client to finish a TLS handshake."""

_RECEIVE = 256 << 10  # bytes of ciphertext one receive asks the socket for


def refuse_psk(what: str) -> ParameterError:
    """The error for a request of TLS-PSK (``what``: the option or URI parameter asking)."""
    return ParameterError(
        f"{what}: TLS-PSK is not available: it needs the ssl module's PSK callbacks "
        f"(Python >= 3.13; this is Python {sys.version_info[0]}.{sys.version_info[1]}); "
        "use X.509 credentials (a directory with ca-cert.pem and certificates) instead"
    )


def _file(directory: Path, name: str, role: str, *, key: bool = False) -> str:
    """The path of ``name`` in ``directory``; ``ParameterError`` when it is missing, when
    another user could replace it, or for a ``key`` that is not this user's alone."""
    from isc.auth import not_private  # isc.auth imports this module

    path = directory / name
    if not path.is_file():
        raise ParameterError(
            f"TLS credentials {directory}: no {name} ({role}); a credentials directory "
            f"holds {CA_CERT}, {SERVER_CERT} and {SERVER_KEY} (and {CLIENT_CERT} and "
            f"{CLIENT_KEY} for a client that servers verify)"
        )
    info = path.stat()
    if problem := not_private(info, os.fspath(path)) if key else _replaceable(info, path):
        raise ParameterError(f"TLS credentials {directory}: {name} {problem}")
    return os.fspath(path)


def _replaceable(info: os.stat_result, path: Path) -> str | None:
    """Why another user could change ``path`` (``info``: its status), with the fix, or None:
    whoever may write the credentials chooses whom isc trusts."""
    from isc.auth import others_may_change  # isc.auth imports this module

    problem = others_may_change(info)
    return problem and (
        f"{problem}, and what it holds says whom isc trusts: chmod go-w {path} (and chown it "
        "to you)"
    )


def _directory(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise ParameterError(
            f"TLS credentials {os.fspath(directory)!r} is not a directory: give the directory "
            f"that holds {CA_CERT} and the certificates"
        )
    if problem := _replaceable(path.stat(), path):
        raise ParameterError(f"TLS credentials {path} {problem}")
    return path


def _load(context: ssl.SSLContext, directory: Path, cert: str, key: str, role: str) -> None:
    cert_file = _file(directory, cert, role)
    key_file = _file(directory, key, f"{role}'s key", key=True)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ParameterError(
            f"TLS credentials {directory}: cannot load {cert} with {key}: {describe(exc)}"
        ) from None


def _trust(context: ssl.SSLContext, directory: Path) -> None:
    ca_file = _file(directory, CA_CERT, "the CA that signs the peers' certificates")
    try:
        context.load_verify_locations(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ParameterError(
            f"TLS credentials {directory}: cannot load {CA_CERT}: {describe(exc)}"
        ) from None


def server_context(directory: str | os.PathLike[str], *, verify_peer: bool) -> ssl.SSLContext:
    """A server's context from ``directory``; ``verify_peer``: clients need a certificate
    signed by ``ca-cert.pem``. Raises ``ParameterError`` naming a missing or bad file."""
    path = _directory(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, path, SERVER_CERT, SERVER_KEY, "the server's certificate")
    if verify_peer:
        _trust(context, path)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    directory: str | os.PathLike[str] | None,
    *,
    verify_peer: bool = True,
    check_hostname: bool,
    certificate: bool = False,
) -> ssl.SSLContext:
    """A client's context: trusts ``directory``'s ``ca-cert.pem`` (None: the system's CAs)
    and presents its client certificate when it has one (``certificate``: it must).

    ``verify_peer=False`` accepts any server certificate (encryption without
    knowing who the server is); ``check_hostname``: the server's certificate
    must name the host connected to. Raises ``ParameterError`` naming a
    missing or bad file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    path = _directory(directory) if directory is not None else None
    if not verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif path is None:
        context.load_default_certs()
    else:
        _trust(context, path)
    context.check_hostname = verify_peer and check_hostname
    if path is not None and (
        certificate or (path / CLIENT_CERT).exists() or (path / CLIENT_KEY).exists()
    ):
        _load(context, path, CLIENT_CERT, CLIENT_KEY, "this client's certificate")
    return context


def describe(exc: BaseException) -> str:
    """A few words on why a TLS operation failed (for messages)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc.reason)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def handshake_error(exc: BaseException, where: str, directory: object) -> AuthenticationError:
    """One line for a failed TLS handshake or a TLS alert from the peer at ``where``
    (``directory``: this end's credentials, to name in the fix)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AuthenticationError(
            f"TLS with {where} failed: its certificate is not trusted ({describe(exc)}); "
            f"{CA_CERT} in {directory} must be the CA that signed it, and the "
            "certificate must be current and name the host connected to"
        )
    if isinstance(exc, ssl.SSLError) and "ALERT" in (exc.reason or ""):
        return AuthenticationError(
            f"TLS with {where} failed: it refused this end ({describe(exc)}); it wants a "
            f"current {CLIENT_CERT} (with {CLIENT_KEY}) in {directory}, signed by its CA"
        )
    return AuthenticationError(
        f"TLS with {where} failed ({describe(exc)}); is it serving TLS with these credentials?"
    )


class ServerTLS:
    """How an NBD server offers TLS: ``mode`` "on" or "require" (nbdkit's meaning) with the
    X.509 credentials in ``directory``; ``verify_peer`` asks clients for a certificate
    signed by its ``ca-cert.pem``. Raises ``ParameterError`` for another mode or bad files."""

    def __init__(
        self, directory: str | os.PathLike[str], *, mode: str = "require", verify_peer=False
    ) -> None:
        if mode not in ("on", "require"):
            raise ParameterError(f"an NBD server's TLS mode is 'on' or 'require', got {mode!r}")
        self.directory = os.fspath(directory)
        self.mode = mode
        self.verify_peer = bool(verify_peer)
        self.context = server_context(directory, verify_peer=self.verify_peer)

    @property
    def required(self) -> bool:
        """True when plaintext clients are refused (``mode == "require"``)."""
        return self.mode == "require"

    def __repr__(self) -> str:
        peers = ", verify-peer" if self.verify_peer else ""
        return f"<ServerTLS {self.mode} {self.directory!r}{peers}>"


class TLSSocket:
    """The client end of TLS over the connected blocking socket ``sock`` (see the module
    docstring): ``sendall``/``sendmsg``/``recv_into`` like a socket's, for one sending and
    one receiving thread at a time.

    :meth:`handshake` runs the TLS handshake, raising :class:`AuthenticationError`
    when either end refuses the other. Socket errors and timeouts are the
    socket's own; a receive returns 0 bytes once the server closes.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str | None):
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        # _state guards the TLS object and both BIOs. _sending makes whoever
        # drains _outgoing also send it, in drain order: records leave in the
        # order they were made. Bytes a receive makes (a TLS 1.3 key update
        # answer) wait in _outgoing for the next send, as the RFC allows.
        self._state = threading.Lock()
        self._sending = threading.Lock()
        self._receiving = threading.Lock()
        self._healthy = True

    def handshake(self, where: str, directory: object) -> None:
        """Run the TLS handshake with the server at ``where`` (``directory``: for messages)."""
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._fill():
                        raise ConnectionError(
                            f"{where} closed the connection in the TLS handshake"
                        ) from None
            self._flush()
        except ssl.SSLError as exc:
            self._healthy = False
            raise handshake_error(exc, where, directory) from None

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._send_raw(data)

    def _send_raw(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError:
            self._healthy = False
            raise

    def _fill(self) -> bool:
        """Move ciphertext from the socket into the TLS object; False at end of stream."""
        try:
            data = self._sock.recv(_RECEIVE)
        except OSError:
            self._healthy = False
            raise
        with self._state:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()
        return bool(data)

    def sendmsg(self, buffers: Iterable[bytes | memoryview]) -> int:
        """Send every buffer, in order; return the bytes of plaintext sent (all of them)."""
        sent = 0
        with self._sending:
            with self._state:
                for buffer in buffers:
                    view = memoryview(buffer).cast("B")
                    while view:
                        done = self._tls.write(view)
                        view = view[done:]
                        sent += done
                data = self._outgoing.read()
            self._send_raw(data)
        return sent

    def sendall(self, data: bytes | memoryview) -> None:
        """Send all of ``data``."""
        self.sendmsg([data])

    def recv_into(self, view: memoryview) -> int:
        """Receive at most ``len(view)`` bytes of plaintext into ``view``; 0 at end of stream."""
        with self._receiving:
            while True:
                with self._state:
                    try:
                        return self._tls.read(len(view), view)
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLZeroReturnError:  # the server's close_notify
                        return 0
                    except ssl.SSLEOFError:  # closed without close_notify
                        self._healthy = False
                        return 0
                self._fill()  # at end of stream, the next read says how it ended

    def shutdown(self, how: int) -> None:
        """Shut the socket down (wakes a thread blocked on it); the stream is unusable after."""
        self._healthy = False
        self._sock.shutdown(how)

    def close(self) -> None:
        """Send ``close_notify`` unless the stream broke, then close the socket."""
        if self._healthy:
            self._healthy = False
            with contextlib.suppress(OSError, ssl.SSLError), self._sending:
                with self._state:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        self._tls.unwrap()
                    data = self._outgoing.read()
                self._sock.sendall(data)
        self._sock.close()
