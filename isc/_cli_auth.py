"""The security options of the ``isc`` commands that listen (serve, agent) or talk to a site.

============================  ===================================================
``--tls off|on|require``      NBD exports: TLS not offered / offered / required
                              (nbdkit's meaning); on and require need
                              ``--tls-creds``
``--tls-creds DIR``           X.509 credentials (QEMU's layout, :mod:`isc.tls`):
                              the NBD server's certificate, and mutual TLS on the
                              control port
``--tls-verify-peer``         NBD clients need a certificate signed by the CA
``--secret-file FILE``        the control port's shared secret (mode 0600)
``--insecure``                serve other users of the machine, and listen
                              beyond loopback, without TLS and
                              authentication, with a warning
``--tls-psk FILE``            refused: TLS-PSK is not available
``--max-clients N``           NBD clients served at once per export (default
                              :data:`isc.nbd.MAX_CLIENTS`); more are refused
============================  ===================================================

A command that talks to a site (update, rollback, add-dest --site) takes
``--tls-creds`` and ``--secret-file``, the client's end of the same
credentials, and presents them to every agent it asks: ``--site``'s and
each destination's own (``add-dest --site``).

Listening on an address other than loopback (127.0.0.0/8, ::1, localhost)
is refused unless what listens there is secured: an NBD export needs
``--tls=require`` with ``--tls-verify-peer`` (encrypted, and only clients
with a certificate of the CA get in), a control port needs ``--tls-creds``
(mutual TLS; a shared secret alone authenticates but leaves the requests
open to tampering on the way). On loopback, what is not secured serves this
user and root alone (:func:`isc.auth.stranger`). ``--insecure`` lifts both
refusals and logs a warning at start.
"""

from __future__ import annotations

import argparse
import logging

from isc.auth import Credentials, is_loopback
from isc.errors import ParameterError
from isc.nbd import MAX_CLIENTS
from isc.tls import TLS_MODES, ServerTLS, refuse_psk

log = logging.getLogger("isc")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of a command that listens (``isc serve``, ``isc agent``)."""
    group = parser.add_argument_group("security (README: Securing isc)")
    group.add_argument(
        "--tls",
        choices=TLS_MODES,
        default="off",
        help="TLS on the NBD exports: off, on (offered) or require (default off)",
    )
    group.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="X.509 credentials directory (ca-cert.pem, server-cert.pem, server-key.pem): "
        "TLS on the NBD exports and mutual TLS on the control port",
    )
    group.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="NBD clients must present a certificate signed by ca-cert.pem",
    )
    group.add_argument(
        "--tls-psk", metavar="FILE", help="TLS-PSK: not available (needs Python >= 3.13)"
    )
    _secret_option(group)
    group.add_argument(
        "--max-clients",
        type=_at_least_one,
        default=MAX_CLIENTS,
        metavar="N",
        help=f"NBD clients served at once per export; more are refused (default {MAX_CLIENTS})",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="serve other users of the machine, and allow listening beyond loopback, "
        "without TLS and authentication",
    )


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of a command that talks to a site (``isc update``, ``isc rollback``)."""
    parser.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="mutual TLS with the site: ca-cert.pem, client-cert.pem, client-key.pem",
    )
    _secret_option(parser)


def _secret_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--secret-file",
        metavar="FILE",
        help="the control port's shared secret (a file of mode 0600): HMAC challenge-response",
    )


def client_credentials(args: argparse.Namespace) -> Credentials | None:
    """The credentials ``add_client_options`` asked for, or None."""
    if args.tls_creds is None and args.secret_file is None:
        return None
    return Credentials("client", tls_creds=args.tls_creds, secret_file=args.secret_file)


def server_security(
    args: argparse.Namespace, command: str, nbd_host: str | None, control_host: str | None
) -> tuple[ServerTLS | None, Credentials | None]:
    """The NBD exports' TLS and the control port's credentials ``add_server_options``
    asked for, once listening on ``nbd_host`` (None: a Unix socket, this user's alone)
    and ``control_host`` (None: no control port or a Unix socket) is allowed; raises
    ``ParameterError`` naming the option to fix."""
    if args.tls_psk is not None:
        raise refuse_psk("--tls-psk")
    nbd_tls = None
    if args.tls != "off":
        if args.tls_creds is None:
            raise ParameterError(
                f"--tls={args.tls} needs --tls-creds DIR (the server's certificate)"
            )
        nbd_tls = ServerTLS(args.tls_creds, mode=args.tls, verify_peer=args.tls_verify_peer)
    elif args.tls_verify_peer:
        raise ParameterError("--tls-verify-peer needs --tls=on or --tls=require")
    control = None
    if args.tls_creds is not None or args.secret_file is not None:
        control = Credentials("server", tls_creds=args.tls_creds, secret_file=args.secret_file)
    secured = nbd_tls is not None and nbd_tls.required and nbd_tls.verify_peer
    if nbd_host is not None:
        _exposure(
            args, f"{command}'s NBD exports", nbd_host, secured, "--tls=require --tls-verify-peer"
        )
    if control_host is not None:
        secured = control is not None and control.tls
        _exposure(args, f"{command}'s control port", control_host, secured, "--tls-creds DIR")
    return nbd_tls, control


def _exposure(args: argparse.Namespace, what: str, host: str, secured: bool, fix: str) -> None:
    if secured:
        return
    if is_loopback(host):
        if args.insecure:
            log.warning(
                "%s serve every user of this machine on %s without TLS and authentication "
                "(--insecure): any of them can read and change what it serves",
                what,
                host,
            )
        return
    if not args.insecure:
        raise ParameterError(
            f"{what} on {host or 'every interface'} would take requests from the network "
            f"without TLS and authentication: add {fix}, listen on 127.0.0.1, or accept the "
            "risk with --insecure"
        )
    log.warning(
        "%s listen on %s without TLS and authentication (--insecure): anyone who reaches it "
        "can read and change what it serves",
        what,
        host or "every interface",
    )
