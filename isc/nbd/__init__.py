"""NBD: LUNs on remote exports (:class:`NBDLUN`) and LUNs exported to clients (:class:`NBDServer`).

The Network Block Device protocol (``doc/proto.md`` of the NBD project; the
spec below) moves byte ranges of an *export* over TCP or a Unix socket. A
remote site's destinations are reached through :class:`NBDLUN`; a session's
source exported through :class:`NBDServer` and :class:`SessionLUN` turns the
writes of any NBD client into tracked host writes, publishes the tracking
bitmap as the ``qemu:dirty-bitmap:NAME`` metadata context, and while the
session is marked offers backup tools the image at the mark (pull mode).

The package is laid out as QEMU's ``nbd/`` folder, each module readable
without the others:

=====================  ===============================================================
:mod:`isc.nbd.proto`   the wire format: the protocol's numbers, structs and error values
:mod:`isc.nbd.uri`     NBD URIs (``nbd://``, ``nbd+unix://``, their ``nbds`` forms)
:mod:`isc.nbd.client`  :class:`NBDLUN`, a blocking LUN on one connection
:mod:`isc.nbd.export`  what an export serves: a LUN, a session's (:class:`SessionLUN`)
                       and the image at its mark (``NAME@frozen``), and their contexts
:mod:`isc.nbd.server`  :class:`NBDServer`: sockets, the handshake, requests and limits
=====================  ===============================================================

The names below are the public ones; import them from ``isc.nbd``.
"""

from isc.nbd.client import DEFAULT_TIMEOUT, IN_FLIGHT, NBDLUN, REQUEST_SIZE, SENDER_PATIENCE
from isc.nbd.export import SessionLUN
from isc.nbd.proto import MAX_BLOCK, NBD_PORT, TransmissionFlag
from isc.nbd.server import HANDSHAKE_TIMEOUT, MAX_CLIENTS, NBDServer
from isc.nbd.uri import ClientTLS, NBDAddress, parse_uri

__all__ = [
    "DEFAULT_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "IN_FLIGHT",
    "MAX_BLOCK",
    "MAX_CLIENTS",
    "NBDLUN",
    "NBD_PORT",
    "REQUEST_SIZE",
    "SENDER_PATIENCE",
    "ClientTLS",
    "NBDAddress",
    "NBDServer",
    "SessionLUN",
    "TransmissionFlag",
    "parse_uri",
]
