"""``isc serve``: export a source over NBD with an isc session on its write path.

Any NBD client (qemu-io, nbdcopy, a VM's disk) then makes tracked host
writes. The source is a persistent session's directory (its writes survive
a crash, and ``every`` runs periodic updates to its destinations from the
same process, which owns the session), or a LUN path or URI (an ephemeral
session whose tracking is reported when the server stops). A file or block
device source is locked while it is served, as a session directory's is
(:class:`~isc.store.SourceLock`): another session or a QEMU writer on it is
refused, and the other way round.

With a control address the server also answers requests about its session
(:mod:`isc.control`: newline-delimited JSON), so another program can drive
the copies of the session the server owns:

==========================  =====================================================
``{"op": "status"}``        ``info``: the session's state, counts and destinations
                            (each with its state, epoch, ``reachable`` and the
                            ``problem`` when it is not)
``{"op": "mark"}``          freeze a point in time (``"full": true``: every chunk);
                            ``info.frozen`` names the export of the image at the mark
``{"op": "unmark"}``        end the mark; unsent chunks go back to tracking
                            (``"sent": true``: the chunks not confirmed yet count as
                            sent and are dropped, for a pull that read them all;
                            it needs ``"generation"``, the mark's number, and any
                            unmark naming a mark that ended is refused)
``{"op": "copy"}``          copy to every destination of a session directory:
                            ``"mode"`` one of :data:`~isc.store.COPY_MODES`
                            (default ``incremental``), optional ``"throttle"``
                            (bytes per second, at least :data:`MIN_THROTTLE`)
                            and ``"busy_share"`` (:data:`MIN_BUSY_SHARE` to 1,
                            default :data:`BUSY_SHARE`), ``"timeout"`` (seconds
                            each destination's agent may take to answer, up to
                            :data:`MAX_TIMEOUT`; default
                            :data:`~isc.update.DEFAULT_TIMEOUT`); answered when the
                            copy ends, ``info`` holding the
                            :class:`~isc.copy.CopyResult` and ``replaced``: a
                            line for each destination whose agent now serves
                            another file (rule 12: it got every chunk)
==========================  =====================================================

Pull mode: while the session is marked the server also exports
``NAME@frozen``, the image at the mark with the transfer bitmap as its
``qemu:dirty-bitmap:NAME`` context (:mod:`isc.nbd.export`). A backup tool
marks, reads the dirty extents of that export, TRIMs each range it has
stored (its transfer bits clear and its saved data is freed, as a push
copy's would), then unmarks: whatever it did not confirm goes back to
tracking, so a failed pull costs a resend, never a lost change. ``status``
counts what pulls confirmed and read (``info.pull``).

While it serves a session directory the server says so in it
(:data:`SERVED`: its process id, export and control address), so that
``isc status``/``mark``/``unmark``/``copy`` on that directory ask it
(:func:`served_by`); the file goes when the server stops, and one a killed
server left is ignored (the session's lock went with the server).

A copy, mark or unmark is refused while another one or a periodic update
runs (a periodic update that comes while a copy runs is skipped). Stopping
the server cancels a running copy (it fails as any copy does: what was not
sent stays tracked) and waits for a periodic update to end.

Every copy and periodic update is recorded in the session directory while
it runs (:func:`isc.store.copy`, :func:`isc.store.update`) and checkpoints
as it goes, as ``isc update`` does: after a crash its destinations read
inconsistent and only what was not confirmed is sent again.

Host writes never wait for a destination. A destination on an NBD export is
connected at its first use and again after an outage
(:class:`~isc.lun.ReconnectingLUN`): the server starts while one is down
(it logs which, and ``status`` says so, as ``isc status`` does from the
session file, saved after that first try and after every copy), a copy to
one that is down fails for it, and a later copy reconnects, trying at most
every :data:`~isc.lun.RECONNECT_BACKOFF` seconds while it stays down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from isc import store
from isc.auth import Credentials
from isc.control import ControlServer
from isc.copy import CopyJob, CopyResult
from isc.errors import CopyError, IscError
from isc.lun import ReconnectingLUN
from isc.nbd import NBDServer, SessionLUN
from isc.nbd.export import FrozenExport
from isc.nbd.proto import own_export
from isc.remote import LocalSite, RemoteSite
from isc.session import Session
from isc.tls import ServerTLS
from isc.update import DEFAULT_TIMEOUT, PeriodicUpdate, update_locks

log = logging.getLogger(__name__)

BUSY_SHARE = {"incremental": 0.25, "full": 0.25, "full-unmarked": 0.1}
"""The default ``busy_share`` (see :class:`~isc.copy.CopyJob`) of each mode of copy
the control port runs. The served host writes share this process, its CPUs and
memory bandwidth with the copy, so while they come the copy works a quarter of
the time, or a tenth for an unmarked full copy: a marked copy keeps more, since
every host write to a chunk it has not sent yet pays a save (and fills the save
area) for as long as it runs. Measured with ``benchmarks/compare_qemu.py``."""


class SessionControl:
    """The control requests ``isc serve`` answers about ``session`` (the module docstring).

    ``persistent`` is the session directory's :class:`~isc.store.PersistentSession`
    when there is one; copies need it (they go to its destinations). ``site``: with
    ``persistent``, its destinations' site (:meth:`~isc.store.PersistentSession.site`),
    which protects them for periodic updates and whose agents every copy and update asks
    first what file each destination is (:func:`isc.store.check_agents`, rule 12).
    ``credentials``: answer only authenticated clients (:class:`~isc.control.ControlServer`);
    ``insecure``: without them, serve other users too.
    ``pull``: the server's export of the image at the mark, whose counts ``status`` reports.
    """

    def __init__(
        self,
        session: Session,
        persistent: store.PersistentSession | None = None,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
        pull: FrozenExport | None = None,
        site: RemoteSite | None = None,
    ):
        self.session = session
        self.persistent = persistent
        self.site = site
        self.pull = pull
        self._stopping = threading.Event()
        self._job: CopyJob | None = None  # the last copy started
        # Held from a recorded copy's begin_copy to its save: a second one in
        # between would overwrite the record of the first, and a crash then
        # leave its destinations reading consistent while they hold a mix.
        self._recording = threading.Lock()
        self._updates: threading.Thread | None = None
        self.server = ControlServer(
            {"status": self.status, "mark": self.mark, "unmark": self.unmark, "copy": self.copy},
            credentials=credentials,
            insecure=insecure,
        )

    def _exclusive(self):
        """The session's update lock, held, or ``UpdateBusy`` (see :func:`update_locks`)."""
        return update_locks([(self.session, ())])

    def status(self, request: dict) -> dict:
        session = self.session
        bitmap = session.bitmap
        info = {
            "name": session.name,
            "state": session.state.value,
            "generation": session.generation,
            "epoch": session.epoch,
            "granularity": session.granularity,
            "size": session.source.size,
            "tracked_chunks": bitmap.tracking_count,
            "transfer_chunks": bitmap.transfer_count,
            "tracked_bytes": bitmap_bytes(bitmap, bitmap.tracking_count, bitmap.tracking),
            "transfer_bytes": bitmap_bytes(bitmap, bitmap.transfer_count, bitmap.transfer),
            "busy": session.update_lock.locked(),
            "destinations": self._destinations(),
        }
        if self.pull is not None:
            info["pull"] = {
                "export": self.pull.name,
                "confirmed_chunks": self.pull.confirmed_chunks,
                "bytes_read": self.pull.bytes_read,
            }
        return {"ok": True, "info": info}

    def mark(self, request: dict) -> dict:
        full = request.get("full", False)
        if not isinstance(full, bool):
            return {"ok": False, "reason": f"full must be true or false, got {full!r}"}
        try:
            with self._exclusive():
                generation = self.session.mark(full)
        except IscError as exc:
            return {"ok": False, "reason": str(exc)}
        info = {
            "generation": generation,
            "transfer_chunks": self.session.bitmap.transfer_count,
            "granularity": self.session.granularity,
            # None, or why a pull of this mark cannot be incremental (Session.pull_in_step)
            "pull_behind": self.session.pull_in_step(generation),
        }
        if self.pull is not None:
            info["frozen"] = self.pull.name
        return {"ok": True, "info": info}

    def unmark(self, request: dict) -> dict:
        sent = request.get("sent", False)
        if not isinstance(sent, bool):
            return {"ok": False, "reason": f"sent must be true or false, got {sent!r}"}
        generation = request.get("generation")
        if sent and generation is None:
            return {
                "ok": False,
                "reason": 'unmark with "sent": true drops chunks: name the mark they belong to, '
                '"generation" as mark answered',
            }
        if generation is not None and not (_positive(generation) and isinstance(generation, int)):
            reason = f"generation must be a mark's number, got {generation!r}"
            return {"ok": False, "reason": reason}
        session = self.session
        dropped = 0
        try:
            with self._exclusive():
                if generation is not None and (ended := session.mark_ended(generation)):
                    return {"ok": False, "reason": f"{ended}; this unmark changes nothing"}
                if sent:
                    dropped = session.confirm_pulled(0, session.bitmap.chunks, generation)
                count = session.bitmap.transfer_count
                session.unmark()
        except IscError as exc:
            return {"ok": False, "reason": str(exc)}
        return {"ok": True, "info": {"returned_chunks": count, "dropped_chunks": dropped}}

    def copy(self, request: dict) -> dict:
        mode = request.get("mode", "incremental")
        if mode not in store.COPY_MODES:
            return {"ok": False, "reason": f"mode must be one of {store.COPY_MODES}, got {mode!r}"}
        throttle = request.get("throttle")
        share = request.get("busy_share", BUSY_SHARE[mode])
        timeout = request.get("timeout", DEFAULT_TIMEOUT)
        if throttle is not None and not (_positive(throttle) and throttle >= MIN_THROTTLE):
            return {
                "ok": False,
                "reason": f"throttle must be >= {MIN_THROTTLE} bytes per second, got {throttle!r}",
            }
        if not (_positive(share, 1) and share >= MIN_BUSY_SHARE):
            reason = f"busy_share must be in [{MIN_BUSY_SHARE}, 1], got {share!r}"
            return {"ok": False, "reason": reason}
        if not _positive(timeout, MAX_TIMEOUT):
            reason = (
                f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}] (each "
                f"destination's agent may take that long to answer), got {timeout!r}"
            )
            return {"ok": False, "reason": reason}
        if self.persistent is None:
            return {
                "ok": False,
                "reason": f"{self.session.name} has no destinations: serve a session "
                "directory (isc create, isc add-dest) to copy from the server",
            }
        stored = self.persistent
        try:
            with self._exclusive(), self._recording:
                replaced = self._check_agents(stored, timeout)
                progress = store.Progress(stored, bar=False)
                result = store.copy(
                    stored,
                    mode,
                    progress=progress,
                    started=self._started,
                    throttle=throttle,
                    busy_share=share,
                )
        except CopyError as exc:
            return {"ok": False, "reason": str(exc), "info": self._result(exc.result, replaced)}
        except IscError as exc:
            return {"ok": False, "reason": str(exc)}
        return {"ok": True, "info": self._result(result, replaced)}

    def _check_agents(
        self, stored: store.PersistentSession, timeout: float = DEFAULT_TIMEOUT
    ) -> list[str]:
        """:func:`isc.store.check_agents` before a copy or update, each agent given
        ``timeout`` seconds to answer; each line found is logged."""
        replaced = store.check_agents(stored, self.site, timeout)
        for found in replaced:
            log.warning("%s: %s", self.session.name, found)
        return replaced

    def _started(self, job: CopyJob) -> None:
        self._job = job
        if self._stopping.is_set():  # close() came before it could see the job
            job.cancel(self._stop_reason)

    @property
    def _stop_reason(self) -> str:
        return f"isc serve of {self.session.name} is stopping"

    def _result(self, result, replaced: list[str]) -> dict:
        return {**asdict(result), "destinations": self._destinations(), "replaced": replaced}

    def _destinations(self) -> list[dict]:
        dests = self.persistent.destinations if self.persistent is not None else []
        report = []
        for d in dests:
            problem = getattr(d.lun, "problem", None)
            report.append(
                {
                    "name": d.name,
                    "state": d.state.value,
                    "epoch": d.epoch,
                    "reachable": problem is None,
                    "problem": problem,
                }
            )
        return report

    def every(self, seconds: float, updated: Updated | None = None) -> None:
        """Run the periodic update of the session directory's destinations every ``seconds``,
        protected by :attr:`site`, until :meth:`close`; each is recorded (:func:`isc.store.update`).

        A failed update is logged and the next one runs on time. ``updated(stored, result,
        failure)`` is called after each, from the updates' thread, with the session
        directory: the :class:`~isc.copy.CopyResult`, or None and why it failed or
        was skipped.
        Raises ``StateError`` when the session has no destinations.
        """
        stored = self.persistent
        assert stored is not None, "periodic updates need a session directory"
        dests = store.copy_destinations(stored)
        progress = store.Progress(stored, bar=False)
        update = PeriodicUpdate(self.session, dests, self.site, progress=progress)
        self._updates = threading.Thread(
            target=self._update_every,
            args=(seconds, stored, update, progress, updated or (lambda *_: None)),
            name="isc-periodic-update",
            daemon=True,
        )
        self._updates.start()

    def _update_every(
        self,
        seconds: float,
        stored: store.PersistentSession,
        update: PeriodicUpdate,
        progress: store.Progress,
        updated: Updated,
    ) -> None:
        name = self.session.name
        while not self._stopping.wait(seconds):
            if not self._recording.acquire(blocking=False):
                log.warning("%s: a copy is running; this periodic update is skipped", name)
                updated(stored, None, "skipped: a copy asked for on the control port is running")
                continue
            try:
                self._check_agents(stored)
                (result,) = store.update(stored, update, progress)  # one session: one copy
            except (IscError, OSError) as exc:
                log.error("%s: periodic update failed: %s", name, exc)
                updated(stored, None, str(exc))
            else:
                updated(stored, result, None)
            finally:
                self._recording.release()

    def start(self, host: str, port: int) -> int:
        """Answer requests on ``host:port`` (0: any free port); return the port bound."""
        return self.server.start(host, port)

    def start_unix(self, path: str) -> None:
        """Answer requests on a Unix socket at ``path`` (mode 0600: this user only)."""
        self.server.start_unix(path)

    def close(self) -> None:
        """Cancel a running copy, wait for it and a periodic update in progress to end
        (a copy's reply is sent), stop answering. Idempotent."""
        self._stopping.set()
        job = self._job
        if job is not None:
            job.cancel(self._stop_reason)  # also ends a throttle's or busy_share's wait
        if self._updates is not None:
            self._updates.join()
        with self.session.update_lock:
            pass
        self.server.close()


Updated = Callable[[store.PersistentSession, CopyResult | None, str | None], object]
"""Told of each periodic update of a session directory: its result, or None and why it
failed."""

MIN_THROTTLE = 1024
"""The slowest copy a control request may ask for, in bytes per second: much slower
ones would wait longer than a timer can count (``"throttle": 1e-300`` once did)."""
MIN_BUSY_SHARE = 0.01
"""The smallest ``busy_share`` a control request may ask for, for the same reason."""
MAX_TIMEOUT = 1e9
"""The longest ``timeout`` a copy request may give, in seconds: the most ``isc copy
--timeout`` takes, and a wait a timer can count (``threading.TIMEOUT_MAX``)."""


def bitmap_bytes(bitmap, count: int, is_set: Callable[[int], bool]) -> int:
    """The bytes of ``count`` chunks of ``bitmap`` set in one of its bitmaps (``is_set``,
    its test of a chunk): the last chunk, when among them, may be short."""
    nbytes = count * bitmap.granularity
    if count and is_set(bitmap.chunks - 1):
        nbytes -= bitmap.chunks * bitmap.granularity - bitmap.size
    return nbytes


def _positive(value: object, most: float = float("inf")) -> bool:
    """Whether ``value`` is a JSON number in ``(0, most]``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= most


def run_serve(
    source: str,
    host: str,
    port: int,
    *,
    unix: str | None = None,
    granularity: int = 65536,
    every: float | None = None,
    site=None,
    site_credentials: Credentials | None = None,
    control: tuple[str, int] | str | None = None,
    ready=None,
    stop: threading.Event | None = None,
    tls: ServerTLS | None = None,
    credentials: Credentials | None = None,
    insecure: bool = False,
    limits: Mapping[str, int] | None = None,
    updated: Updated | None = None,
) -> Session:
    """Serve ``source`` until ``stop`` is set; return the session (closed if persistent).

    ``ready(session, uri, control_port)`` is called once the export (and the
    control port, if ``control`` is given as ``(host, port)``, or as the path
    of a Unix socket; else ``control_port`` is None) listens and each destination that may be out of
    reach was tried once. ``every`` (seconds) runs ``PeriodicUpdate`` on a
    persistent session's destinations with ``site`` (default: protection in
    this process) for those without a site of their own (``add-dest --site``,
    reached with ``site_credentials``), telling ``updated`` of each, see
    :meth:`SessionControl.every`.
    ``tls``: how the export offers TLS;
    ``credentials``: the control port answers only clients that authenticate;
    ``insecure``: the export, and the control port without ``credentials``, serve
    other users of the machine too (else this user and root alone, MISSION rule 14);
    ``limits``: the export's limits, :class:`~isc.nbd.NBDServer`'s keyword
    arguments (``max_clients``, ``max_data``, ``max_requests``). ``unix``: export on a Unix socket
    at this path (mode 0600, in a directory that is this user's alone) instead
    of ``host:port``.
    """
    stop = stop or threading.Event()
    persistent = None
    source_lock = None
    if (Path(source) / store.METADATA).exists():
        persistent, recovery = store.open_session(source)
        session = persistent.session
        if recovery.crashed:
            log.warning(
                "%s: %d region(s) to resend after a crash", session.name, recovery.regions_resent
            )
    else:
        with ExitStack() as opened:
            lun = store.open_lun(source)
            opened.callback(lun.close)
            if not store.is_uri(source):
                # Rule 11, as a session directory's source: no other session or
                # QEMU writer while this one tracks it.
                source_lock = store.SourceLock(source, lun)  # the file the LUN opened
                opened.callback(source_lock.close)
            session = Session(lun, granularity, name=Path(source).name)
            opened.pop_all()
    # The export says whose source it writes, so no destination of this session takes
    # it, whatever address it was added at (rule 11: a copy would write the source).
    description = "" if persistent is None else own_export(persistent.meta["id"])
    server = NBDServer(
        SessionLUN(session),
        name=session.name,
        tls=tls,
        insecure=insecure,
        description=description,
        **(limits or {}),
    )
    routed = None if persistent is None else persistent.site(site or LocalSite(), site_credentials)
    controls = SessionControl(
        session,
        persistent,
        credentials=credentials,
        insecure=insecure,
        pull=server.frozen,
        site=routed,
    )
    try:
        if unix is not None:
            server.start_unix(unix)
        else:
            server.start(host, port)
        log.info("serving %s at %s", session.name, server.uri)
        if persistent is not None:
            _reach(persistent.destinations)
            persistent.save()  # isc status shows which are out of reach
        control_port = None
        if isinstance(control, str):
            controls.start_unix(control)
        elif control is not None:
            control_port = controls.start(*control)
        if every and persistent is not None:
            controls.every(every, updated)
        if persistent is not None:
            where = f"unix:{control}" if isinstance(control, str) else None
            if control_port is not None:
                where = f"{control[0]}:{control_port}"  # type: ignore[index]
            _announce(persistent.directory, session.name, server.uri, where, credentials)
        if ready is not None:
            ready(session, server.uri, control_port)
        stop.wait()
    finally:
        controls.close()
        server.close()
        if persistent is not None:
            with contextlib.suppress(FileNotFoundError):
                (persistent.directory / SERVED).unlink()
            persistent.close()
        else:
            session.source.close()
        if source_lock is not None:
            source_lock.close()
    return session


SERVED = "serve.json"
"""The file in a session directory that says how to reach the ``isc serve`` holding it."""


def _announce(directory: Path, name: str, uri: str, control: str | None, credentials) -> None:
    """Write :data:`SERVED`: this process, its export and its control address."""
    info = {
        "pid": os.getpid(),
        "exports": {name: uri},
        "control": control,
        "authenticated": credentials is not None,
    }
    store.write_atomically(directory / SERVED, json.dumps(info).encode() + b"\n")


def served_by(directory: str | os.PathLike[str]) -> dict | None:
    """What :data:`SERVED` in ``directory`` says while the ``isc serve`` that wrote it
    holds the session (``pid``, ``exports``, ``control``: ``HOST:PORT``, ``unix:PATH``
    or None, ``authenticated``); None when no server holds it (a file left by
    one that was killed is ignored: its lock went with it)."""
    path = Path(directory)
    try:
        info = json.loads((path / SERVED).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not store.is_held(path) or not _alive(info.get("pid")):
        return None
    return info


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _reach(destinations) -> None:
    """Try once each destination that may be out of reach; log those that are."""
    for dest in destinations:
        if isinstance(dest.lun, ReconnectingLUN) and (problem := dest.lun.reach()):
            log.warning("%s; copies to it fail until it is back", problem)
