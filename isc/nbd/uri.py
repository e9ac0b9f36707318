"""NBD URIs (the NBD project's ``doc/uri.md``): where an export lives and how to reach it.

``nbd://host[:port][/export]`` and ``nbd+unix:///[export]?socket=PATH``, and
their TLS forms ``nbds://`` and ``nbds+unix://`` with libnbd's query
parameters. :func:`parse_uri` reads one into an :class:`NBDAddress`, or
raises ``ParameterError`` saying what is wrong; it touches no network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from isc.errors import ParameterError
from isc.nbd.proto import MAX_STRING, NBD_PORT
from isc.tls import refuse_psk


class ClientTLS(NamedTuple):
    """The TLS an ``nbds://`` or ``nbds+unix://`` URI asks for (libnbd's query parameters)."""

    certificates: str | None = None
    """``tls-certificates=DIR``: the credentials directory (:mod:`isc.tls`); None: the
    system's CAs and no client certificate."""
    verify_peer: bool = True
    """``tls-verify-peer=false`` accepts any server certificate (encryption only)."""


class NBDAddress(NamedTuple):
    """Where an export lives, as :func:`parse_uri` reads it from a URI."""

    address: tuple[str, int] | str
    """``(host, port)`` for TCP, or the path of a Unix socket."""
    export: str
    """The export name ("" is the server's default export)."""
    tls: ClientTLS | None = None
    """The TLS to insist on (``nbds`` schemes), else None."""


_TLS_QUERY = {"tls-certificates", "tls-verify-peer"}
_PSK_QUERY = {"tls-psk-file", "tls-username"}
_BOOLEANS = {"true": True, "on": True, "yes": True, "1": True}
_BOOLEANS |= {"false": False, "off": False, "no": False, "0": False}


def parse_uri(uri: str) -> NBDAddress:
    """Read an NBD URI: ``nbd[s]://host[:port][/export]`` or ``nbd[s]+unix:///[export]?socket=PATH``.

    The export name is the percent-decoded path without its leading ``/``;
    the port defaults to :data:`NBD_PORT`. The ``nbds`` schemes insist on
    TLS, with libnbd's query parameters ``tls-certificates=DIR`` and
    ``tls-verify-peer=true|false`` (:class:`ClientTLS`). Raises
    ``ParameterError`` for anything else, naming what is wrong: another
    scheme, a missing host or socket, a host on a Unix socket, a fragment, a
    query parameter this client does not understand, or TLS-PSK (user info,
    ``tls-psk-file``), which is not available (:func:`isc.tls.refuse_psk`).
    """
    if not isinstance(uri, str):
        raise ParameterError(f"an NBD URI is a str, got {type(uri).__name__}")
    try:
        parts = urlsplit(uri)
        port = parts.port
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        export = unquote(parts.path[1:], errors="strict")
    except ValueError as exc:
        raise ParameterError(f"{uri!r} is not a valid NBD URI: {exc}") from None

    def bad(why: str) -> ParameterError:
        return ParameterError(
            f"{uri!r} is not an NBD URI isc can use: {why}; use nbd://host[:port][/export] "
            "or nbd+unix:///[export]?socket=PATH"
        )

    if parts.scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise bad(f"the scheme is {parts.scheme!r}")
    if parts.path and not parts.path.startswith("/"):
        raise bad("the export name must follow '//authority/'")
    if parts.fragment:
        raise bad(f"it has a fragment #{parts.fragment}")
    if parts.username is not None or _PSK_QUERY & set(query):
        raise refuse_psk(f"{uri!r} asks for TLS-PSK (user info or {sorted(_PSK_QUERY)})")
    if "\0" in export or len(export.encode()) > MAX_STRING:
        raise bad(f"an export name holds no NUL and at most {MAX_STRING} bytes")
    tls = None
    if parts.scheme.startswith("nbds"):
        tls = _client_tls(query, bad)
        query = {key: value for key, value in query.items() if key not in _TLS_QUERY}
    elif _TLS_QUERY & set(query):
        raise bad(f"{sorted(_TLS_QUERY & set(query))} need TLS: use the nbds schemes")
    plain = parts.scheme.removeprefix("nbds").removeprefix("nbd")  # "" or "+unix"
    if not plain:
        if not parts.hostname:
            raise bad(f"{parts.scheme}:// needs a host")
        if query:
            raise bad(f"{parts.scheme}:// takes no query parameter {sorted(query)}")
        return NBDAddress((parts.hostname, NBD_PORT if port is None else port), export, tls)
    if parts.netloc:
        raise bad(f"{parts.scheme}:// takes no host, got {parts.netloc!r}")
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise bad(f"unknown query parameters {unknown}")
    sockets = query.get("socket", [])
    if len(sockets) != 1 or not sockets[0]:
        raise bad(f"{parts.scheme}:// needs exactly one socket=PATH")
    return NBDAddress(sockets[0], export, tls)


def _client_tls(query: dict[str, list[str]], bad: Callable[[str], ParameterError]) -> ClientTLS:
    """The TLS parameters of an ``nbds`` URI's query."""
    for key in _TLS_QUERY & set(query):
        if len(query[key]) != 1 or not query[key][0]:
            raise bad(f"give {key}= once, with a value")
    verify = query.get("tls-verify-peer", ["true"])[0]
    if verify.lower() not in _BOOLEANS:
        raise bad(f"tls-verify-peer is true or false, got {verify!r}")
    return ClientTLS(query.get("tls-certificates", [None])[0], _BOOLEANS[verify.lower()])
