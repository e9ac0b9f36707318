"""Remote sites: where destinations live, and how their last consistent image is kept.

Before an incremental copy overwrites a consistent destination out of order,
the update workflow asks the destination's site to **protect** it: the site
starts a snapshot that preserves the destination's current image (rule 8).
After a successful copy it asks to **unprotect** (drop the snapshot); after a
failed one the protection stays, and **rollback** writes the protected image
back. A **status** reply lists the byte ranges the protection holds (what a
rollback would rewrite), so a caller can track them before it asks for the
rollback (:func:`isc.update.rollback`).

Each request is administrative and answered by an :class:`Ack` (ok, or a
reason), waited for up to a timeout. A site never raises for a refused or
failed request: the ack says so, and the workflow decides. An ack whose
``outcome_unknown`` is set came from no answer after the request was sent (a
timeout, a connection lost): the site may have carried it out.

Where the snapshot lives:

* :class:`LocalSite`: in this process's memory (:class:`Protection`), for as
  long as the process lives. It is isc's own COFW machinery: a
  :class:`~isc.session.Session` on the destination LUN, marked full, so the
  first write to any chunk saves its original data. Writes must go through
  it: the site swaps the destination's LUN for a :class:`ProtectedLUN`.
  Unlike a session's COFW, which lets a host write through when its save
  fails (rule 5), a protection never loses its image (rule 8): a write whose
  save fails (the destination cannot be read, the snapshot is full) fails
  and is not made. A destination that is unreachable when protected is
  still protected: nothing reaches it unsaved, and its copy fails like any
  other write to it, for it alone (rule 13).
* :class:`AgentSite` (an ``isc agent``): on the agent's disk, in a journal of
  saved chunks that survives a crash or restart of the agent (rule 8; the
  journal's format and crash behaviour are in :mod:`isc.agent`). An agent
  is at ``HOST:PORT`` or ``unix:PATH`` (:func:`agent_address`,
  :func:`address_text`; :func:`same_agent` compares two), the text a session
  remembers as a destination's own site. When it fails, the ack's reason
  names the agent and what to check, never an errno or an object.
* :class:`isc.rbd.RBDSite`: in a Ceph cluster, as RBD snapshots.

A site may also offer ``protect_group(dests)`` and ``rollback_group(dests)``
(an ack per destination): a consistency group's destinations protected at
one instant and rolled back as one (one RBD group snapshot);
:func:`group_request` falls back to one request per destination.
:class:`RoutingSite` sends each destination's requests to its own site
(:meth:`isc.store.PersistentSession.site` routes a session's that way).
"""

from __future__ import annotations

import abc
import functools
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from isc.auth import Credentials, connect, read_line
from isc.copy import Destination
from isc.errors import IscError, ParameterError
from isc.lun import ForwardingLUN, same_birth
from isc.savearea import SaveArea
from isc.session import Session

log = logging.getLogger(__name__)

PROTECT_GRANULARITY = 65536
"""Chunk size of a protection snapshot: large chunks keep its COFW cheap."""

MAX_EXTENTS = 16384
"""Most byte ranges one reply lists; more are merged across their smallest gaps.

A list of ranges is what a caller tracks again, so a wider range only costs a
resend, while the reply stays well under the agent's reply line limit."""

MAX_REPLY = 1 << 20
"""Most bytes of an agent's reply line; a longer one is not an isc agent's."""


HOLDER_TEXT = 255
"""Most characters of a holder's ``name`` and ``machine`` (:func:`session_holder`)."""


def session_holder(session_id: int, name: str) -> dict:
    """What names a session to the agents it copies to, as their exports' holder
    (:mod:`isc.agent`): its ``id`` (:mod:`isc.store`'s random 64 bits, as 16 hex digits:
    a session's state directory made again under the same name is another session),
    and its ``name`` and this ``machine``'s host name for messages, each cut to
    :data:`HOLDER_TEXT` characters (``isc create`` refuses a longer name; one made before
    it did is cut here alone, the id tells sessions apart)."""
    machine = socket.gethostname()
    return {
        "id": f"{session_id:016x}",
        "name": name[:HOLDER_TEXT],
        "machine": machine[:HOLDER_TEXT],
    }


def is_holder(value: object) -> bool:
    """Whether ``value`` is a holder (:func:`session_holder`'s shape)."""
    return (
        isinstance(value, dict)
        and set(value) == {"id", "name", "machine"}
        and isinstance(value["id"], str)
        and re.fullmatch("[0-9a-f]{16}", value["id"]) is not None
        and all(
            isinstance(value[k], str) and len(value[k]) <= HOLDER_TEXT for k in ("name", "machine")
        )
    )


def holder_text(holder: dict) -> str:
    """``holder`` (:func:`session_holder`'s) as messages name it: its session's name,
    machine and id."""
    return f"session {holder['name']} on {holder['machine']} (id {holder['id']})"


def held_by(what: str, holder: dict, dest: str, let_go: str) -> str:
    """Why ``what`` (destination ``dest`` at its site) is not this session's to copy into:
    ``holder`` holds it; one line naming the fixes, ``let_go`` when that session is gone."""
    return (
        f"{what} is held by {holder_text(holder)}: the copies of two sessions would leave "
        f"it a mix of both; remove it from that session (isc remove-dest {holder['name']} "
        f"{dest}), or if that session is gone, {let_go}"
    )


@dataclass(frozen=True)
class Ack:
    """A site's answer to one request.

    ``ok`` is True when the request was carried out, else ``reason`` says why.
    ``extents`` lists the ``(offset, length)`` byte ranges a rollback rewrote:
    those now differ from what the last copy sent, so the caller must track
    them again (rule 2). ``info`` carries a status request's details (for a
    protected destination ``info["extents"]``: the ranges a rollback would
    rewrite). ``outcome_unknown`` is True when no answer came after the
    request was sent: the site may have carried it out, though ``ok`` is False.
    ``kept`` is True when a protect found the destination protected already
    and kept that protection: the image it holds is the first one's, not the
    destination's present one. ``fenced`` is True when the site cut the
    connections open to the destination before it acted (an agent's fence,
    :mod:`isc.agent`): the caller's own must be renewed before its next I/O.
    ``held`` is True when the request was refused because another session holds the
    destination (an agent's holder, :mod:`isc.agent`; an RBD image's, :mod:`isc.rbd`):
    it is not this session's to copy into, a trouble of that destination alone.
    ``replaced`` is True when the request was refused because the site serves, as the
    destination, a file no longer at its path (an agent's export renamed over, renamed
    away or deleted since the agent opened it, :meth:`isc.agent.Export.refusal`): the
    file there now is another, which its next copy must fill whole once the site serves
    it; a trouble of that destination alone too.
    """

    request_id: int
    ok: bool
    reason: str | None = None
    extents: tuple[tuple[int, int], ...] = ()
    info: dict = field(default_factory=dict)
    outcome_unknown: bool = False
    kept: bool = False
    fenced: bool = False
    held: bool = False
    replaced: bool = False


class RemoteSite(abc.ABC):
    """A site that can protect, unprotect, roll back and report on destinations.

    Every method waits at most ``timeout`` seconds (None: the site's default)
    and returns an :class:`Ack`; none raises for a failed request.
    """

    _ids = itertools.count(1)

    def _next_id(self) -> int:
        return next(self._ids)

    @abc.abstractmethod
    def protect(self, dest: Destination, timeout: float | None = None) -> Ack:
        """Preserve ``dest``'s current image. Protecting a protected destination succeeds.

        A site may cut the connections to ``dest`` open before (an agent fences its
        export, :mod:`isc.agent`): write to it over one opened after the answer."""

    @abc.abstractmethod
    def unprotect(self, dest: Destination, timeout: float | None = None) -> Ack:
        """Drop ``dest``'s protection. Succeeds when it is not protected."""

    @abc.abstractmethod
    def rollback(self, dest: Destination, timeout: float | None = None) -> Ack:
        """Write the protected image back to ``dest``; it stays protected. Fails if unprotected."""

    @abc.abstractmethod
    def status(self, dest: Destination, timeout: float | None = None) -> Ack:
        """Report whether ``dest`` is protected and how much its snapshot holds.

        ``info``: ``protected``, and for a protected destination ``intact``,
        ``saved_bytes``, ``saved_chunks``, ``problem`` (why it is not intact)
        and ``extents`` (the ranges a rollback would rewrite, as ``[offset,
        length]`` lists).
        """


def saved_extents(
    chunks: Iterable[int], granularity: int, size: int, limit: int = MAX_EXTENTS
) -> tuple[tuple[int, int], ...]:
    """The byte ranges ``(offset, length)`` of the sorted chunk numbers ``chunks``.

    Adjacent chunks make one range; the last chunk of a ``size``-byte LUN may
    be short. Past ``limit`` ranges, neighbours are merged across the
    smallest gaps first, so the ranges cover every chunk and possibly more.
    """
    runs: list[list[int]] = []  # [first, last] chunk numbers
    for chunk in chunks:
        if runs and chunk == runs[-1][1] + 1:
            runs[-1][1] = chunk
        else:
            runs.append([chunk, chunk])
    if len(runs) > limit:
        gaps = sorted(range(len(runs) - 1), key=lambda i: runs[i + 1][0] - runs[i][1])
        merge = set(gaps[: len(runs) - limit])
        merged = [runs[0]]
        for i in range(1, len(runs)):
            if i - 1 in merge:
                merged[-1][1] = runs[i][1]
            else:
                merged.append(runs[i])
        runs = merged
    return tuple(
        (first * granularity, min((last + 1) * granularity, size) - first * granularity)
        for first, last in runs
    )


class ProtectedLUN(ForwardingLUN):
    """The LUN interface over a protected destination: writes go through its snapshot.

    ``save(chunks)`` stores the original data of the chunks a write
    overwrites first since the protect, or raises; then the write is not made.
    """

    def __init__(self, lun, snapshot: Session, save: Callable[[np.ndarray], object]) -> None:
        super().__init__(lun)
        self.snapshot = snapshot
        # One C-level call per write, as a session's host write path. When
        # ``save`` raises, the core unflags the chunks and abandons the write.
        self.write = functools.partial(  # type: ignore[method-assign]
            snapshot.bitmap.write_through, lun.write, save
        )


class Protection:
    """A snapshot preserving one LUN's image (the module docstring): :class:`LocalSite`'s.

    ``name`` names the destination in errors. Write through ``front``: a
    write whose save fails raises ``IscError`` saying why and is not made.
    """

    def __init__(self, lun, capacity: int | None = None, name: str = "the LUN") -> None:
        self.lun = lun
        area = SaveArea(capacity or lun.size)
        self.snapshot = Session(lun, PROTECT_GRANULARITY, area, name=f"the protection of {name}")
        self._lock = threading.Lock()  # orders saves against the snapshot's unmark
        self.generation = self.snapshot.mark(full=True)
        self.front = ProtectedLUN(lun, self.snapshot, self._save)

    @property
    def problem(self) -> str | None:
        """Why the protected image can no longer be restored (its snapshot ended), or None."""
        return self.snapshot.mark_ended(self.generation)

    def _save(self, chunks: np.ndarray) -> None:
        """Store the current data of ``chunks`` (ascending, flagged by one write), or raise.

        Raises ``IscError`` saying why, storing nothing, when the LUN cannot be
        read or the save area cannot take them all (rule 8: the write that
        needed them fails instead). Once the snapshot ended (unprotected)
        there is nothing to keep: nothing is stored and the write proceeds.
        """
        g = PROTECT_GRANULARITY
        first, last = int(chunks[0]), int(chunks[-1])
        area = self.snapshot.save_area
        try:
            old = memoryview(
                self.lun.read(first * g, min((last + 1) * g, self.lun.size) - first * g)
            )
            with self._lock:
                if not self.snapshot.bitmap.marked:
                    return
                stored: list[int] = []
                try:
                    for chunk in chunks.tolist():
                        start = (chunk - first) * g
                        area.save(chunk, old[start : start + g])
                        stored.append(chunk)
                except BaseException:
                    for chunk in stored:  # a later write saves them again
                        area.discard(chunk)
                    raise
        except Exception as exc:
            what = f"chunk {first}" if first == last else f"chunks {first}-{last}"
            raise IscError(
                f"{self.snapshot.name} could not save the original data of {what}: {exc}; "
                "the write that needed it was not made, so the protected image stays whole"
            ) from exc

    def rollback(self) -> tuple[tuple[int, int], ...]:
        """Write every saved chunk back; return the byte ranges rewritten.

        Raises ``IscError`` when the snapshot is no longer intact.
        """
        problem = self.problem
        if problem is not None:
            raise IscError(f"the protected image was lost: {problem}")
        area = self.snapshot.save_area
        chunks = self._saved()
        for chunk in chunks:
            self.lun.write(chunk * PROTECT_GRANULARITY, area.get(chunk))
        self.lun.flush()
        # The LUN holds the protected image again: start a fresh snapshot of it.
        with self._lock:
            self.snapshot.unmark()
        self.generation = self.snapshot.mark(full=True)
        return saved_extents(chunks, PROTECT_GRANULARITY, self.lun.size)

    def _saved(self) -> list[int]:
        """The chunks whose original data the snapshot holds, in order."""
        area = self.snapshot.save_area
        bitmap = self.snapshot.bitmap
        return [c for c in bitmap.saved_in(0, bitmap.chunks).tolist() if c in area]

    def drop(self) -> None:
        with self._lock:
            self.snapshot.unmark()
            self.snapshot.save_area.close()

    def info(self) -> dict:
        problem = self.problem
        return {
            "protected": True,
            "intact": problem is None,
            "saved_bytes": self.snapshot.save_area.used,
            "saved_chunks": self.snapshot.save_area.saved_chunks,
            "problem": problem,
            "extents": [
                list(e) for e in saved_extents(self._saved(), PROTECT_GRANULARITY, self.lun.size)
            ],
        }


class LocalSite(RemoteSite):
    """A site for destinations in this process; answers at once.

    ``capacity`` bounds each snapshot's save area in bytes (default: the
    destination's size, so a protection can always hold the whole image).
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity <= 0:
            raise ParameterError(f"a snapshot capacity must be > 0 bytes, got {capacity}")
        self.capacity = capacity
        self._protections: dict[str, tuple[Destination, Protection]] = {}

    def protect(self, dest: Destination, timeout: float | None = None) -> Ack:
        rid = self._next_id()
        entry = self._protections.get(dest.name)
        if entry is not None:
            problem = entry[1].problem
            if problem is not None:
                return Ack(
                    rid,
                    False,
                    f"{dest.name} is protected, but its protected image was lost ({problem}): "
                    "it can no longer be rolled back; unprotect it to drop the protection",
                )
            return Ack(rid, True, "already protected", kept=True)
        try:
            protection = Protection(dest.lun, self.capacity, dest.name)
        except Exception as exc:
            return Ack(rid, False, f"cannot protect {dest.name}: {exc}")
        self._protections[dest.name] = (dest, protection)
        dest.lun = protection.front
        log.info("protected %s", dest.name)
        return Ack(rid, True)

    def unprotect(self, dest: Destination, timeout: float | None = None) -> Ack:
        rid = self._next_id()
        entry = self._protections.pop(dest.name, None)
        if entry is None:
            return Ack(rid, True, "not protected")
        _, protection = entry
        dest.lun = protection.lun
        protection.drop()
        log.info("unprotected %s", dest.name)
        return Ack(rid, True)

    def rollback(self, dest: Destination, timeout: float | None = None) -> Ack:
        rid = self._next_id()
        entry = self._protections.get(dest.name)
        if entry is None:
            return Ack(rid, False, f"{dest.name} is not protected: there is no image to restore")
        try:
            extents = entry[1].rollback()
        except Exception as exc:
            return Ack(rid, False, str(exc))
        log.info("rolled back %s (%d ranges)", dest.name, len(extents))
        return Ack(rid, True, extents=extents)

    def status(self, dest: Destination, timeout: float | None = None) -> Ack:
        rid = self._next_id()
        entry = self._protections.get(dest.name)
        return Ack(rid, True, info=entry[1].info() if entry else {"protected": False})


class RequestSite(RemoteSite):
    """A site whose four requests all go through one :meth:`_request` (e.g. a wire protocol)."""

    @abc.abstractmethod
    def _request(self, op: str, dest: Destination, timeout: float | None) -> Ack:
        """Carry out request ``op`` ("protect", "unprotect", "rollback" or "status")."""

    def protect(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._request("protect", dest, timeout)

    def unprotect(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._request("unprotect", dest, timeout)

    def rollback(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._request("rollback", dest, timeout)

    def status(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._request("status", dest, timeout)


class AgentSite(RequestSite):
    """The site of an ``isc agent`` at ``host:port`` (its control port), or on the Unix
    socket at the path ``unix`` (``isc agent --listen unix:PATH``).

    A destination is known to the agent by its export name, which must be
    the destination's ``name``. Each request opens a connection, sends one
    JSON line and waits up to ``timeout`` seconds (default ``timeout`` of the
    site) for the reply line; an agent that is down, slow or answers
    nonsense gives a failed :class:`Ack` saying so in words: which agent,
    what happened and what to check, never an errno or an object.

    ``credentials`` (a client's :class:`~isc.auth.Credentials`: mutual TLS, a
    shared secret or both) authenticate each connection both ways before the
    request goes out; a failure on either side is a failed :class:`Ack`
    whose reason says which, and the request was never sent.

    The site remembers the image each protect named (:mod:`isc.agent`) and
    names it with that export's unprotect and status: their ``extents`` and
    ``info["undone"]`` list what rollbacks by other clients rewrote since; and
    the protect's lease, named with that unprotect: one that reaches the agent
    after a later protect (of another update) leaves the protection to it. It
    also remembers the file each reply named (``info["identity"]``,
    :func:`isc.agent.export_identity`): a protect or rollback that names another
    file than the site's last reply about that export fails (the agent was
    replaced since, e.g. between an update's identity check and its protect, or
    a rollback's status and its request), so that no copy and no destination
    state relies on it; the next identity check finds the new file (rule 12). A
    whole reply must come within the timeout, and a reply of the wrong shape
    is a failed ack whose outcome is unknown.

    ``holder`` (:func:`session_holder`) names the session in each request but
    ``status``: the agent holds an export for one session at a time (:mod:`isc.agent`).
    A request another session's hold refused, and a status that names another holder
    (or a damaged record), give an ack with ``held`` set whose reason names the holder
    and the fix (``isc remove-dest`` there, or ``isc release ADDRESS EXPORT``).

    ``before_send(op, dest)``, when set, is called once the connection is made (and
    authenticated), before the request goes out: a session records there what the
    request may change (:meth:`isc.store.PersistentSession.site`: the agent may come to
    hold the export). When it raises (``OSError``, ``IscError``) the request is not sent
    and the ack says why.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        unix: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        credentials: Credentials | None = None,
        holder: dict | None = None,
    ) -> None:
        if credentials is not None and credentials.endpoint != "client":
            raise ParameterError(
                f"an agent site needs client credentials, got a {credentials.endpoint}'s"
            )
        self.address: tuple[str, int] | str
        """``(host, port)``, or the path of the Unix socket."""
        if unix is not None and host is None and port is None:
            self.address = os.path.abspath(unix)
        elif unix is None and host is not None and port is not None:
            self.address = (host, port)
        else:
            raise ParameterError(
                "an agent site is at a host and port, or at a Unix socket (unix=PATH): "
                "give one of the two"
            )
        self.where = address_text(self.address)
        """The agent's address as ``isc --site`` takes it: ``HOST:PORT`` or ``unix:PATH``."""
        self.timeout = timeout
        self.credentials = credentials
        self.holder = holder
        """The session this site's requests come from (:func:`session_holder`), named in
        each that changes an export, or None (an operator's: :meth:`release` ``force``)."""
        self._images: dict[str, str] = {}
        """Each export's protected image as the last protect through this site named it:
        its unprotect drops that image only (:meth:`isc.agent.Export.unprotect`)."""
        self._leases: dict[str, str] = {}
        """Each export's lease from the last protect through this site: its unprotect
        leaves a protection a later protect kept (:meth:`isc.agent.Export.unprotect`)."""
        self._identities: dict[str, str] = {}
        """Each export's file as the last reply about it named it."""
        self.before_send: Callable[[str, Destination], object] | None = None

    @classmethod
    def at(
        cls,
        address: tuple[str, int] | str,
        credentials: Credentials | None = None,
        timeout: float = 30.0,
        holder: dict | None = None,
    ) -> AgentSite:
        """The agent at ``address`` (:func:`agent_address`'s: ``(host, port)`` or a path)."""
        if isinstance(address, str):
            return cls(unix=address, timeout=timeout, credentials=credentials, holder=holder)
        return cls(*address, timeout=timeout, credentials=credentials, holder=holder)

    def claim(self, dest: Destination, timeout: float | None = None) -> Ack:
        """Hold ``dest``'s export for :attr:`holder`: refused (``held``) while another
        session holds it (:mod:`isc.agent`)."""
        return self._request("claim", dest, timeout)

    def release(self, dest: Destination, timeout: float | None = None, force: bool = False) -> Ack:
        """Let ``dest``'s export go: :attr:`holder`'s hold, or with ``force`` whichever
        session's (the operator's ``isc release``, once that session is gone)."""
        return self._request("release", dest, timeout, {"force": True} if force else {})

    def _request(
        self, op: str, dest: Destination, timeout: float | None, extra: dict | None = None
    ) -> Ack:
        rid = self._next_id()
        wait = self.timeout if timeout is None else timeout
        who = f"the agent at {self.where}"
        request = {"id": rid, "op": op, "export": dest.name, **(extra or {})}
        if op != "status" and self.holder is not None:
            request["holder"] = self.holder
        if op in ("unprotect", "status") and dest.name in self._images:
            request["image"] = self._images[dest.name]
        if op == "unprotect" and dest.name in self._leases:
            request["lease"] = self._leases[dest.name]
        line = json.dumps(request).encode() + b"\n"
        sent = False  # once the whole line is out, the agent may act on it
        try:
            with connect(self.address, wait, self.credentials) as sock:
                sock.settimeout(wait)
                if self.before_send is not None:
                    try:
                        self.before_send(op, dest)
                    except (OSError, IscError) as exc:
                        return Ack(rid, False, f"{who} was not asked to {op} {dest.name}: {exc}")
                sock.sendall(line)
                sent = True
                # The whole reply within ``wait``, however slowly the agent drips it;
                # an agent that refuses a client sends two lines at once: the first counts.
                reply = json.loads(read_line(sock, time.monotonic() + wait, MAX_REPLY))
        except TimeoutError:
            reason = f"{who} did not answer {op} {dest.name} within {wait:g} s"
            return Ack(rid, False, reason, outcome_unknown=sent)
        except (OSError, ValueError, RecursionError) as exc:  # nested too deep to decode
            return Ack(rid, False, self._trouble(exc, op, dest.name), outcome_unknown=sent)
        if isinstance(reply, dict) and reply.get("id") is None and reply.get("ok") is False:
            # Refused before any request was read (authentication): nothing was done.
            why = reply.get("reason") or "no reason given"
            return Ack(rid, False, f"{who} refused {op} {dest.name}: {why}")
        if not isinstance(reply, dict) or reply.get("id") != rid:
            reason = f"{who} answered {op} {dest.name} with a reply for another request"
            return Ack(rid, False, reason, outcome_unknown=True)
        info, extents = reply.get("info") or {}, _pairs(reply.get("extents") or [])
        if not isinstance(info, dict) or not isinstance(reply.get("ok"), bool) or extents is None:
            reason = (
                f"{who} answered {op} {dest.name} with a reply of the wrong shape (its ok is not "
                "true or false, its info not an object or its extents not [offset, length] "
                f"pairs): is {self.where} an isc agent?"
            )
            return Ack(rid, False, reason, outcome_unknown=True)
        if reply.get("held") is True and reply["ok"] is False:
            return Ack(rid, False, self._held(dest.name, info), info=info, held=True)
        if reply.get("replaced") is True and reply["ok"] is False:
            return Ack(rid, False, f"{who}: {reply.get('reason')}", info=info, replaced=True)
        if op == "status" and self._held_by_another(info):
            # Answered, but the export is another session's: not this one's to copy into.
            return Ack(rid, True, self._held(dest.name, info), extents, info, held=True)
        identity = info.get("identity")
        if isinstance(identity, str):
            known = self._identities.get(dest.name, identity)
            self._identities[dest.name] = identity
            if op in ("protect", "rollback") and not same_export(known, identity):
                reason = (
                    f"{who} now serves another file as {dest.name} ({identity}) than it "
                    f"did a moment before ({known}), and its {op} was of that one: it was "
                    f"replaced; update again, and the identity check gives {dest.name} a "
                    "full copy"
                )
                return Ack(rid, False, reason, info=info)
        if op == "protect" and reply["ok"]:
            for remembered, key in ((self._images, "image"), (self._leases, "lease")):
                if isinstance(info.get(key), str):
                    remembered[dest.name] = info[key]
        elif op == "unprotect" and reply["ok"]:
            self._images.pop(dest.name, None)
            self._leases.pop(dest.name, None)
        return Ack(
            rid,
            reply["ok"],
            reply.get("reason"),
            extents,
            info,
            kept=reply.get("kept") is True,
            fenced=reply.get("fenced") is True,
        )

    def _held_by_another(self, info: dict) -> bool:
        """Whether a status ``info`` says a session other than :attr:`holder` holds the
        export, or that its holder record is damaged."""
        if "holder_problem" in info:
            return True
        held = info.get("holder")
        return self.holder is not None and is_holder(held) and held["id"] != self.holder["id"]

    def _held(self, name: str, info: dict) -> str:
        """Why the agent refused a request about export ``name`` whose holder (``info``'s) is
        another session, or whose holder record is damaged: one line naming the fix."""
        holder, release = info.get("holder"), f"isc release {self.where} {name}"
        if not is_holder(holder):
            return (
                f"{name} at {self.where}: its holder record at the agent "
                f"{info.get('problem', info.get('holder_problem'))}: "
                f"which session copies into it cannot be told; if none does, release it: "
                f"{release}"
            )
        return held_by(f"{name} at {self.where}", holder, name, f"release it: {release}")

    def _trouble(self, exc: OSError | ValueError | RecursionError, op: str, name: str) -> str:
        """Why request ``op`` about ``name`` failed with ``exc``: one line for a user."""
        who = f"the agent at {self.where}"
        if isinstance(exc, IscError):  # authentication: the message names the fix
            return str(exc)
        if not isinstance(exc, OSError):  # not JSON, a line too long, or nested too deep
            return (
                f"{who} answered {op} {name} with something that is not an isc agent's reply "
                f"(is {self.where} the control port, --listen, of an isc agent?)"
            )
        if isinstance(exc, ConnectionRefusedError):
            return f"{who} refused the connection (is `isc agent` running there?)"
        if isinstance(exc, FileNotFoundError):
            return (
                f"{who} cannot be reached: no socket at {self.address} (is `isc agent "
                f"--listen {self.where}` running?)"
            )
        if isinstance(exc, socket.gaierror):
            host = self.address[0]
            return f"{who} cannot be reached: the host {host} is unknown ({exc.strerror})"
        if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return (
                f"{who} closed the connection before answering {op} {name} (it stopped, or "
                "it requires authentication: give its --tls-creds or --secret-file)"
            )
        return f"{who} cannot be reached for {op} {name}: {exc.strerror or exc}"


def _pairs(value: object) -> tuple[tuple[int, int], ...] | None:
    """``value`` (a reply's ``extents``) as ``(offset, length)`` pairs; None when it is not a
    list of ``[integer, integer]`` lists."""
    if not isinstance(value, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(type(n) is int for n in pair)
        for pair in value
    ):
        return None
    return tuple((offset, length) for offset, length in value)


def same_export(known: str, seen: str) -> bool:
    """Whether two :func:`isc.agent.export_identity` strings may name one file: the
    machine, device and inode equal, and each ``/KEY=VALUE`` both hold (an earlier
    agent's identity has none: it compares on the fields it has)."""
    known_file, *known_birth = known.split("/")
    seen_file, *seen_birth = seen.split("/")
    return known_file == seen_file and same_birth(
        dict(item.partition("=")[::2] for item in known_birth),
        dict(item.partition("=")[::2] for item in seen_birth),
    )


def agent_address(text: str) -> tuple[str, int] | str:
    """An ``isc agent``'s control port from ``HOST:PORT`` (an IPv6 host in brackets) or
    ``unix:PATH``: ``(host, port)``, or the socket's path made absolute.

    Raises ``ParameterError`` saying what is wrong with ``text``.
    """
    if text.startswith("unix:"):
        if not text[5:]:
            raise ParameterError("unix:PATH needs a path")
        return os.path.abspath(text[5:])
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ParameterError(f"{text!r} is not HOST:PORT (a port from 1 to 65535)")
    return host.strip("[]"), int(port)


def address_text(address: tuple[str, int] | str) -> str:
    """``address`` (:func:`agent_address`'s) as the text :func:`agent_address` reads back."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def same_agent(one: str, other: str) -> bool:
    """Whether the addresses ``one`` and ``other`` (as :func:`agent_address` reads them) name
    one control port: the same host (case aside) and port, or the same Unix socket (its
    device and inode when both paths exist, else the same path)."""
    a, b = agent_address(one), agent_address(other)
    if isinstance(a, str) and isinstance(b, str):
        try:
            first, second = os.stat(a), os.stat(b)
        except OSError:
            return a == b
        return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
    if isinstance(a, str) or isinstance(b, str):
        return False
    return (a[0].lower(), a[1]) == (b[0].lower(), b[1])


class RoutingSite(RemoteSite):
    """Each destination's requests go to its own site: ``routes[dest.name]``, else ``default``.

    A group request (``protect_group``, ``rollback_group``) goes to each site
    once with its share of the destinations, as a group request where the
    site offers one (:func:`group_request`). The acks come back in order.
    """

    def __init__(self, routes: dict[str, RemoteSite], default: RemoteSite) -> None:
        self.routes = routes
        self.default = default

    def _site(self, dest: Destination) -> RemoteSite:
        return self.routes.get(dest.name, self.default)

    def protect(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._site(dest).protect(dest, timeout)

    def unprotect(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._site(dest).unprotect(dest, timeout)

    def rollback(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._site(dest).rollback(dest, timeout)

    def status(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._site(dest).status(dest, timeout)

    def protect_group(
        self, dests: Sequence[Destination], timeout: float | None = None
    ) -> list[Ack]:
        return self._split("protect", dests, timeout)

    def rollback_group(
        self, dests: Sequence[Destination], timeout: float | None = None
    ) -> list[Ack]:
        return self._split("rollback", dests, timeout)

    def _split(
        self, request: str, dests: Sequence[Destination], timeout: float | None
    ) -> list[Ack]:
        shares: dict[int, tuple[RemoteSite, list[int]]] = {}
        for i, dest in enumerate(dests):
            site = self._site(dest)
            shares.setdefault(id(site), (site, []))[1].append(i)
        acks: list[Ack | None] = [None] * len(dests)
        for site, indexes in shares.values():
            answers = group_request(site, request, [dests[i] for i in indexes], timeout)
            for i, ack in zip(indexes, answers, strict=True):
                acks[i] = ack
        return acks  # type: ignore[return-value]


def group_request(
    site: RemoteSite, request: str, dests: Sequence[Destination], timeout: float | None
) -> list[Ack]:
    """``request`` ("protect" or "rollback") for a consistency group's ``dests``; an ack each.

    One request where ``site`` offers a group form (``protect_group``,
    ``rollback_group``: e.g. one RBD group snapshot for all), else one per
    destination in turn.
    """
    together = getattr(site, f"{request}_group", None)
    if together is not None:
        return list(together(dests, timeout))
    return [getattr(site, request)(dest, timeout) for dest in dests]
