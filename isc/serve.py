"""``isc serve``: export a source over NBD with an isc session on its write path.

Any NBD client (qemu-io, nbdcopy, a VM's disk) then makes tracked host
writes. The source is a persistent session's directory (its writes survive
a crash, and ``every`` runs periodic updates to its destinations from the
same process, which owns the session), or a LUN path or URI (an ephemeral
session whose tracking is reported when the server stops).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from isc import store
from isc.nbd import NBDServer, SessionLUN
from isc.session import Session
from isc.update import PeriodicUpdate

log = logging.getLogger(__name__)


def run_serve(
    source: str,
    host: str,
    port: int,
    *,
    granularity: int = 65536,
    every: float | None = None,
    site=None,
    ready=None,
    stop: threading.Event | None = None,
) -> Session:
    """Serve ``source`` until ``stop`` is set; return the session (closed if persistent).

    ``ready(session, uri)`` is called once the export listens. ``every``
    (seconds) runs ``PeriodicUpdate`` on a persistent session's
    destinations with ``site`` (default: protection in this process).
    """
    from isc.remote import LocalSite

    stop = stop or threading.Event()
    persistent = None
    if (Path(source) / store.METADATA).exists():
        persistent, recovery = store.open_session(source)
        session = persistent.session
        if recovery.crashed:
            log.warning(
                "%s: %d region(s) to resend after a crash", session.name, recovery.regions_resent
            )
    else:
        session = Session(store.open_lun(source), granularity, name=Path(source).name)
    update = thread = None
    server = NBDServer(SessionLUN(session), name=session.name)
    try:
        server.start(host, port)
        log.info("serving %s at %s", session.name, server.uri)
        if every and persistent is not None:
            update = PeriodicUpdate(session, persistent.destinations, site or LocalSite())
            thread = update.every(every)
        if ready is not None:
            ready(session, server.uri)
        stop.wait()
    finally:
        if update is not None:
            update.stop()
            thread.join()  # type: ignore[union-attr]
        server.close()
        if persistent is not None:
            persistent.close()
        else:
            session.source.close()
    return session
