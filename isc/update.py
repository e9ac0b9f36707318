"""The two workflows: the periodic incremental update and the unmarked full copy.

Periodic incremental update (docs/design.md; the patent's figures 3-9):

1. take each session's update lock; if an update is already running, refuse
   with :class:`UpdateBusy`, log, and change nothing;
2. mark (every session of a consistency group at one point in time);
3. ask the site to protect every destination, each waiting for its ack or a
   timeout (a consistency group's with one group request where the site
   offers it); one refused because another session holds it (``Ack.held``:
   an agent's export or RBD image is one session's destination at a time), or
   because its agent serves a file no longer at its path (``Ack.replaced``)
   becomes NEW and drops out of this update, which fails for it alone once
   the others are copied (rule 13); if any other fails, unprotect the ones
   this update protected (a protection kept from a failed update stays: its
   destination holds a mix), unmark, log and raise :class:`UpdateError`. A destination's
   connection is renewed after an answer that says the site cut it
   (``Ack.fenced``; ``reconnect()`` of an :class:`~isc.nbd.NBDLUN` or a
   :class:`~isc.lun.ReconnectingLUN`), and after a rollback's: an agent cuts
   those open before it protects or rolls back (its fence, :mod:`isc.agent`),
   so the copy opens one after the answer;
4. transfer the marked data and wait for it to finish;
5. on success the copy unmarks, the site unprotects, and the destinations are
   consistent, but for one whose unprotect ack lists ranges (``extents``: a
   rollback by another client of an agent undid them during the copy, or, the
   whole export, that or a release of its hold there): those
   are tracked again, it is inconsistent and the update fails; on failure
   the copy unmarks (merge) and the protection stays, so :func:`rollback`
   can restore the last consistent image (what a rollback by another client
   undid of the copy meanwhile is tracked too: an agent's status lists it;
   when the agent answers neither unprotect nor status, the destination is
   inconsistent and out of step: its next copy gives it every chunk); one
   whose unprotect is refused because another session holds it now (an
   operator's forced ``isc release`` during the copy, then that session's
   claim: it may have written there), or whose status says so when its
   unprotect or its copy failed, becomes NEW and the update fails for it;
6. release the locks in every case.

Unmarked full copy (figures 12-18): the same lock; optionally protect; the
destinations are flagged inconsistent; the whole source is copied unmarked
(what a rollback by another client undid of it is tracked, as in step 5);
the lock is released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager

from isc.copy import CopyJob, CopyResult, Destination, DestState
from isc.errors import CopyError, IscError, ParameterError, StateError
from isc.remote import Ack, RemoteSite, group_request, is_holder, same_export
from isc.session import Session

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
"""Seconds to wait for each acknowledgement from a site."""


class UpdateBusy(IscError, RuntimeError):
    """An update of the session is already running; nothing was changed."""


class UpdateError(IscError, RuntimeError):
    """An update could not complete; ``results`` holds what each copy did."""

    def __init__(self, message: str, results: Sequence[CopyResult] = ()) -> None:
        super().__init__(message)
        self.results = list(results)


Member = tuple[Session, Sequence[Destination]]


@contextmanager
def update_locks(members: Sequence[Member]) -> Iterator[None]:
    """Hold every member session's update lock, or raise UpdateBusy holding none.

    Updates, rollbacks and the copies ``isc serve`` runs on request all take it.
    """
    with ExitStack() as held:
        for session, _ in members:
            if not session.update_lock.acquire(blocking=False):
                log.warning("%s: an update is already running; this one is refused", session.name)
                raise UpdateBusy(
                    f"an update or copy of {session.name} is already running; "
                    "wait for it to finish (nothing was changed)"
                )
            held.callback(session.update_lock.release)
        yield


def mark_group(sessions: Sequence[Session], full: Sequence[bool] | None = None) -> None:
    """Mark several sessions at one point in time.

    Every session's host writes in flight finish and new ones wait until all
    are marked, so no write to any member lands between the first and the
    last mark. ``full[i]`` asks for a full mark of ``sessions[i]``. Raises
    ``StateError`` (marking none) when any session is already marked.
    """
    full = full or [False] * len(sessions)
    for session in sessions:
        if session.mark_blocker:
            raise StateError(f"{session.mark_blocker}; no session of the group was marked")
    with ExitStack() as frozen:
        for session in sessions:
            session.bitmap.freeze()
            frozen.callback(session.bitmap.thaw)
        marked: list[Session] = []
        try:
            for session, whole in zip(sessions, full, strict=True):
                session.mark(full=whole)
                marked.append(session)
        except BaseException:
            for session in marked:
                session.unmark()  # nothing was written meanwhile: no change is lost
            raise


class PeriodicUpdate:
    """Incremental updates of ``session``'s ``destinations``, protected by ``site``.

    ``PeriodicUpdate.group([(session, destinations), ...], site)`` updates a
    consistency group: all sessions are marked at one point in time.
    ``timeout`` bounds each wait for a site's acknowledgement, in seconds.
    ``copy_options`` go to each :class:`CopyJob` (throttle, io_size, progress).
    """

    def __init__(
        self,
        session: Session,
        destinations: Sequence[Destination],
        site: RemoteSite,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        **copy_options,
    ) -> None:
        self.members: list[Member] = [(session, list(destinations))]
        self.site = site
        self.timeout = timeout
        self.copy_options = copy_options
        self._stop = threading.Event()

    @classmethod
    def group(
        cls,
        members: Sequence[Member],
        site: RemoteSite,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        **copy_options,
    ) -> PeriodicUpdate:
        """An update of several sessions, marked together."""
        update = cls(members[0][0], members[0][1], site, timeout=timeout, **copy_options)
        update.members = [(s, list(d)) for s, d in members]
        names = [d.name for d in update.destinations]
        if len(set(names)) != len(names):
            raise ParameterError(
                f"destination names must be unique across a group (a site knows them by "
                f"name), got {names}"
            )
        return update

    @property
    def destinations(self) -> list[Destination]:
        return [d for _, dests in self.members for d in dests]

    def run(self) -> list[CopyResult]:
        """One update (steps 1-6 above); return each member's copy result.

        Raises ``UpdateBusy`` when an update of a member is running,
        ``UpdateError`` when protection or a copy failed (after restoring
        rule 2; failed copies' destinations stay protected).
        """
        with update_locks(self.members):
            # Build the jobs first: bad copy options are refused before anything changes.
            jobs = [CopyJob(s, d, **self.copy_options) for s, d in self.members]
            for job in jobs:
                job.check_destinations()  # rule 12: a replaced destination needs a full mark
            sessions = [s for s, _ in self.members]
            # A destination that is new or missed a copy, with no member
            # destination in step to seed it from, needs a full mark.
            mark_group(sessions, [self._needs_full(s, d) for s, d in self.members])
            for session in sessions:
                log.info("%s: marked for update (generation %d)", session.name, session.generation)
            named, held = _protect_all(self.site, self.destinations, self.timeout, sessions)
            results, failures = [], []
            consistent, behind = [], []
            for job in jobs:
                session, dests = job.session, job.destinations
                generation = session.generation
                if lost := [d for d in dests if d.name in held]:
                    # Another session's (rule 12 across sites): out of this copy (rule 13).
                    failures += [f"{session.name}: {held[d.name]}" for d in lost]
                    behind += lost
                    dests = [d for d in dests if d not in lost]
                    if not dests:
                        session.abandon_mark(generation)
                        results.append(CopyResult("incremental"))
                        continue
                    job = CopyJob(session, dests, **self.copy_options)
                try:
                    result = job.incremental()
                except Exception as exc:  # any failure: never leave the session marked
                    session.abandon_mark(generation)  # e.g. a mark aborted before its copy began
                    results.append(getattr(exc, "result", None) or CopyResult("incremental"))
                    failures.append(f"{session.name}: {exc}")
                    _track_undone(self.site, session, dests, named, self.timeout)
                    behind += dests
                    names = ", ".join(d.name for d in dests)
                    log.error("%s: update failed, %s stay protected", session.name, names)
                    continue
                results.append(result)
                copied = [d for d in dests if result.outcomes.get(d.name) == "ok"]
                undone = _unprotect_copied(self.site, session, copied, self.timeout, named)
                done = [d for d in copied if d.name not in undone]
                dropped = [d for d in dests if d not in copied]
                _track_undone(self.site, session, dropped, named, self.timeout)
                failures += [f"{session.name}: {why}" for why in undone.values()]
                consistent += done
                behind += [d for d in dests if d not in done]
                if dropped:
                    failures.append(
                        f"{session.name}: "
                        + ", ".join(f"{d.name} {result.outcomes[d.name]}" for d in dropped)
                        + "; it stays protected and its next update sends what it missed"
                    )
                    log.error(
                        "%s: %s dropped out of the update and stay protected",
                        session.name,
                        ", ".join(d.name for d in dropped),
                    )
                log.info(
                    "%s: update of %s done, %d bytes sent",
                    session.name,
                    ", ".join(d.name for d in done),
                    result.bytes_sent,
                )
            if failures:
                message = "update failed: " + "; ".join(failures)
                if len(self.members) > 1:
                    message += _group_report(consistent, behind)
                raise UpdateError(message, results)
            return results

    @staticmethod
    def _needs_full(session: Session, dests: Sequence[Destination]) -> bool:
        return bool(dests) and not any(d.in_step(session) for d in dests)

    def every(self, seconds: float) -> threading.Thread:
        """Run an update every ``seconds`` in a background thread until :meth:`stop`.

        A failed or refused update is logged and the next one runs on time.
        """
        if seconds <= 0:
            raise ParameterError(f"the update interval must be > 0 seconds, got {seconds}")
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(seconds):
                try:
                    self.run()
                except IscError as exc:
                    log.error("periodic update: %s", exc)

        thread = threading.Thread(target=loop, name="isc-periodic-update", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop the loop started by :meth:`every` after the update in progress."""
        self._stop.set()


class UnmarkedFullCopy:
    """The unmarked full copy workflow of ``session`` to ``destinations``.

    With ``protect=True`` the site protects each destination first, so a
    failed copy can be rolled back; protection is dropped after a success.
    """

    def __init__(
        self,
        session: Session,
        destinations: Sequence[Destination],
        site: RemoteSite | None = None,
        *,
        protect: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        **copy_options,
    ) -> None:
        if protect and site is None:
            raise ParameterError("an unmarked full copy with protect=True needs a site")
        self.session = session
        self.destinations = list(destinations)
        self.site = site
        self.protect = protect
        self.timeout = timeout
        self.copy_options = copy_options

    def run(self) -> CopyResult:
        """Copy everything unmarked; destinations end INCONSISTENT.

        Raises ``UpdateBusy`` when an update is running and ``UpdateError``
        when protection or the copy failed (rule 2 restored).
        """
        with update_locks([(self.session, self.destinations)]):
            named: set[str] = set()  # those whose agent tells what a rollback undid
            if self.protect:
                named, _ = _protect_all(
                    self.site, self.destinations, self.timeout, [], spare_held=False
                )
            try:
                job = CopyJob(self.session, self.destinations, **self.copy_options)
                result = job.full(marked=False)
            except (CopyError, StateError) as exc:
                _track_undone(self.site, self.session, self.destinations, named, self.timeout)
                raise UpdateError(f"unmarked full copy failed: {exc}") from exc
            done = [d for d in self.destinations if result.outcomes.get(d.name) == "ok"]
            if self.protect:  # the destinations end inconsistent: what a rollback undid is tracked
                _unprotect_copied(self.site, self.session, done, self.timeout, named)
            dropped = [d for d in self.destinations if d not in done]
            _track_undone(self.site, self.session, dropped, named, self.timeout)
            if dropped:
                failed = ", ".join(f"{d.name} {result.outcomes[d.name]}" for d in dropped)
                raise UpdateError(
                    f"unmarked full copy failed for {failed}; the others were copied", [result]
                )
            return result


def check_identities(
    site: RemoteSite,
    destinations: Sequence[Destination],
    identities: dict[str, str],
    agents: set[str],
    timeout: float = DEFAULT_TIMEOUT,
    held: dict[str, str] | None = None,
    claimed: set[str] | None = None,
) -> list[str]:
    """Rule 12 at the agents: ask ``site`` (each waiting ``timeout`` seconds) what
    identifies the export of each of ``destinations`` named in ``agents``
    (:func:`isc.agent.export_identity`: its machine, device and inode, and the inode's
    generation and birth time). One that differs from ``identities`` (name -> identity
    seen before; :func:`isc.remote.same_export`) is another file than the one the last copies wrote
    (replaced, recreated at the same inode, another agent at that address): it becomes
    NEW, so its next copy is a full one. Returns a line for each such destination;
    records in ``identities`` what each agent said (an identity of an earlier agent,
    without generation or birth time, is replaced by the new form). One whose agent does
    not answer is left as it is (its samples still check it, :mod:`isc.fingerprint`).
    One another session holds (``Ack.held``, :mod:`isc.agent`), or whose agent serves a
    file no longer at the export's path (``Ack.replaced``: the file there is another),
    becomes NEW, gets a line each time, and goes into ``held`` (name -> why) when given.

    ``claimed`` (when given) names the destinations whose export this session is known to
    hold (an agent's reply said so: its claim, a protect or rollback, a status; kept up to
    date here, :func:`_hold_let_go`): one whose agent now says no session holds it was let go
    while no update of this session ran (an operator's forced ``isc release``), and another
    session may have claimed it, written anywhere and let it go since: it becomes NEW, with
    a line."""
    found = []
    for dest in destinations:
        ack = site.status(dest, timeout) if dest.name in agents else None
        seen = ack.info.get("identity") if ack is not None and ack.ok else None
        if ack is not None and (why := _not_ours(ack)) is not None:
            # Another session copies into it (rule 12 across sites), or the file at its
            # path is not the one its agent serves: nothing it holds is ours.
            dest.start_over()
            found.append(why)
            if held is not None:
                held[dest.name] = str(ack.reason)
        let_go = None if ack is None or claimed is None else _hold_let_go(dest, ack, claimed)
        if isinstance(seen, str):
            known = identities.get(dest.name)
            if (
                known is not None
                and not same_export(known, seen)
                and dest.state is not DestState.NEW
            ):
                dest.start_over()
                found.append(
                    f"{dest.name} is not the export it was (its agent names another file: "
                    f"{seen}, not {known}): it gets a full copy"
                )
                let_go = None  # another file holds no hold of this session's: that line says why
            identities[dest.name] = seen
        if let_go is not None:
            dest.start_over()
            found.append(let_go)
    return found


def _hold_let_go(dest: Destination, ack: Ack, claimed: set[str]) -> str | None:
    """Why ``dest`` must start over because its agent's status ``ack`` says the hold this
    session had on its export was let go meanwhile (one line), else None; ``claimed`` (the
    destinations this session is known to hold) follows what ``ack`` tells. No answer, or
    one without ``holder`` (an agent of before holders), tells nothing; one that names
    this session confirms the hold (a session of before the record, an add-dest whose
    claim answer was lost, a crash between a protect and its save are known to hold it
    from then on); another session's (``Ack.held``) ends it, and that one's own line says
    so. One NEW already gets no line: nothing of it is relied on."""
    if not ack.ok or "holder" not in ack.info:
        return None
    if ack.held:  # another session's, or a damaged record
        claimed.discard(dest.name)
        return None
    if is_holder(ack.info["holder"]):  # this session's (AgentSite tells another's: held)
        claimed.add(dest.name)
        return None
    if ack.info["holder"] is not None or dest.name not in claimed:
        return None  # not a holder's form, or not known held: of before, an answer not saved
    claimed.discard(dest.name)
    if dest.state is DestState.NEW:
        return None
    return (
        f"{dest.name} is held by no session at its agent, though this session held it: its "
        "hold was let go (isc release) while no update ran, and another session may have "
        f"written there since; {dest.name} gets a full copy"
    )


def _not_ours(ack: Ack) -> str | None:
    """Why the destination a site's ``ack`` is about is not this session's to copy into
    now, in one line with what follows, or None: another session holds it (``Ack.held``),
    or its agent serves a file that is no longer at its path (``Ack.replaced``). Either
    way it becomes NEW: its next copy gives it every chunk."""
    if ack.held:
        return f"{ack.reason}; it gets a full copy once it is this session's again"
    if ack.replaced:
        return f"{ack.reason}; its next copy is a full one"
    return None


def _group_report(consistent: Sequence[Destination], behind: Sequence[Destination]) -> str:
    """What a consistency group's destinations hold after an update some members failed."""
    report = "; the group's destinations do not hold one point in time"
    if consistent:
        report += ": " + ", ".join(d.name for d in consistent) + " hold this update's cut"
    return (
        report
        + ", "
        + ", ".join(d.name for d in behind)
        + " do not (their protected images hold the previous cut)"
    )


def _ask(site, request: str, dest: Destination, timeout: float) -> Ack:
    """Send one request to ``site``; a site that raises counts as a failed request."""
    try:
        ack = getattr(site, request)(dest, timeout)
    except Exception as exc:
        ack = _raised(request, exc)
    log.info("%s %s: %s", request, dest.name, "ok" if ack.ok else ack.reason)
    return ack


def _ask_group(site, request: str, dests: Sequence[Destination], timeout: float) -> list[Ack]:
    """:func:`_ask` for a consistency group's ``dests``: one group request where the site
    offers it (:func:`isc.remote.group_request`)."""
    try:
        acks = group_request(site, request, dests, timeout)
    except Exception as exc:
        acks = [_raised(request, exc)] * len(dests)
    for dest, ack in zip(dests, acks, strict=True):
        log.info("%s %s: %s", request, dest.name, "ok" if ack.ok else ack.reason)
    return acks


def _unprotect_copied(
    site,
    session: Session,
    dests: Sequence[Destination],
    timeout: float,
    named: Collection[str] = (),
) -> dict[str, str]:
    """Unprotect ``dests``, which a copy of ``session`` brought up to date.

    An ack that lists ranges (``extents``, an agent's) says a rollback by another
    client rewrote them since the protect, or (the whole export) that or a release of
    the hold (:func:`_undone_by` says which it may be): it undid part of the copy, or
    all of it. Those ranges are tracked again (rule 2) and the destination is
    INCONSISTENT. For one of ``named`` (its protect named its image) whose unprotect
    failed (no answer: the agent went down), its status says them instead
    (:func:`_undone`); when that fails too, nothing does: it is INCONSISTENT and out of
    step. One whose unprotect is
    refused because another session holds it now (``Ack.held``), or because its agent
    serves a file no longer at its path (``Ack.replaced``: the copy went to a file no
    name reaches), becomes NEW. Returns each such destination's name with why, in one
    line.
    """
    undone = {}
    for dest in dests:
        ack = _ask(site, "unprotect", dest, timeout)
        if ack.ok:
            dest.protected_state = None
        if (why := _not_ours(ack)) is not None:
            # Released (forced) and taken by another session since the protect: it may
            # have written there, before the copy or after it (rule 12 across sites);
            # or replaced at its path since: the copy reached the file that was there.
            dest.start_over()
            undone[dest.name] = why
            log.error("%s", undone[dest.name])
            continue
        extents = ack.extents if ack.ok or dest.name not in named else _undone(site, dest, timeout)
        if isinstance(extents, str):  # nothing tells what was undone: it was told why
            if dest.state is not DestState.NEW:  # NEW: another session's now (_undone)
                dest.state = DestState.INCONSISTENT
            undone[dest.name] = extents
            continue
        if extents:
            _track(session, extents)
            dest.state = DestState.INCONSISTENT
            undone[dest.name] = (
                f"{dest.name} {_undone_by(extents, session.source.size)} during the copy: "
                f"the {len(extents)} range(s) it undid are tracked again, and {dest.name} "
                "is inconsistent until its next update"
            )
            log.error("%s", undone[dest.name])
    return undone


def _undone_by(extents, size: int) -> str:
    """What the ranges an agent said were undone (``extents``) tell of who undid them, for
    a ``size``-byte source: some ranges, a rollback by another client of the site; the
    whole export, that or a release of the hold (an operator's forced ``isc release``:
    after one the agent tells nothing finer, :mod:`isc.agent`)."""
    if len(extents) == 1 and extents[0][0] == 0 and extents[0][1] >= size:
        return "was rolled back by another client of its site, or its hold there let go,"
    return "was rolled back by another client of its site"


def _undone(site, dest: Destination, timeout: float) -> list | str:
    """The ranges rollbacks by other clients of ``dest``'s agent rewrote since its protect
    (its status's ``undone``), or why nothing tells them (one line, logged): the agent
    does not answer, and ``dest`` falls out of step (no epoch, and no samples, which are
    no scrub), so its next copy gives it every chunk, seeded from a destination in step
    or a full copy, and the other destinations resend nothing for it (rule 13); or the
    status says the export is not this session's to copy into now (:func:`_not_ours`:
    another session holds it since a forced release, and may have written anywhere in
    it; or its file was replaced), and ``dest`` starts over (NEW), as a refused
    unprotect makes it."""
    ack = _ask(site, "status", dest, timeout)
    if (why := _not_ours(ack)) is not None:  # an answer, but not about this session's
        dest.start_over()
    elif ack.ok:
        return ack.info.get("undone") or []
    else:
        dest.epoch, dest.samples = None, []
        why = (
            f"{dest.name}'s agent answered no status ({ack.reason}): what a rollback by "
            f"another client may have undone of the copy to it is unknown: {dest.name} is "
            "inconsistent, and its next update gives it every chunk"
        )
    log.error("%s", why)
    return why


def _track_undone(
    site, session: Session, dests: Sequence[Destination], named: set[str], timeout: float
) -> None:
    """After a failed copy of ``session``, track what rollbacks by other clients of an
    agent undid of it (rule 2): the ``undone`` ranges a status lists (:func:`_undone`)
    for each of ``dests`` whose protect named its image (``named``). The unmark merged
    only what the copy had not sent; what it sent and a rollback undid is tracked
    nowhere else."""
    for dest in dests:
        if dest.name in named and isinstance(undone := _undone(site, dest, timeout), list):
            _track(session, undone)


def _reconnect(dests: Sequence[Destination], acks: Sequence[Ack]) -> None:
    """Give each destination whose site cut its connections before it acted (``Ack.fenced``:
    an agent's fence, so that no write of a killed update lands after it), or may
    have (an answer lost: ``Ack.outcome_unknown``), a new
    connection for its next I/O (``reconnect()``, as an :class:`~isc.nbd.NBDLUN` and a
    :class:`~isc.lun.ReconnectingLUN` offer it); one opened after the answer is served.
    One that cannot reconnect now (unreachable, or its export is of another size now:
    replaced) is logged, and drops out of its copy at its first I/O as an unreachable
    destination does."""
    for dest, ack in zip(dests, acks, strict=False):  # acks may stop early
        reconnect = getattr(dest.lun, "reconnect", None)
        if not (ack.fenced or ack.outcome_unknown) or reconnect is None:
            continue
        try:
            reconnect()
        except (OSError, IscError) as exc:
            log.warning("%s: cannot open a new connection: %s", dest.name, exc)


def _raised(request: str, exc: Exception) -> Ack:
    return Ack(0, False, f"{request} raised {type(exc).__name__}: {exc}", outcome_unknown=True)


def _protect_all(
    site, dests: Sequence[Destination], timeout: float, marked, spare_held: bool = True
) -> tuple[set[str], dict[str, str]]:
    """Protect every destination, or undo: unprotect those this call protected (not
    those kept from a failed update), unmark ``marked``, raise. Returns the names of
    those whose ack named the image protected (an agent's: :func:`_track_undone`),
    and (``spare_held``) each refused because another session holds it (``Ack.held``)
    or its agent serves a file no longer at its path (``Ack.replaced``) with why: the
    others are protected and copied (rule 13). Such a one becomes NEW whatever follows,
    an abandoned update too: nothing it holds is this session's.

    A consistency group (several ``marked`` sessions) is protected by one
    group request where the site offers it, so its destinations are taken
    at one instant (an RBD group snapshot).
    """
    states = [dest.state for dest in dests]
    if len(marked) > 1:
        acks = _ask_group(site, "protect", dests, timeout)
    else:
        acks = []
        for dest in dests:  # up to the first refusal
            acks.append(_ask(site, "protect", dest, timeout))
            if not acks[-1].ok and not (spare_held and _not_ours(acks[-1])):
                break
    _reconnect(dests, acks)
    for dest, state, ack in zip(dests, states, acks, strict=False):  # acks may stop early
        # A protection kept from a failed update holds its first image, whose state
        # was recorded then; a fresh one holds the present image, whatever an older
        # record says (a protection can be dropped outside isc).
        if ack.ok and not (ack.kept and dest.protected_state is not None):
            dest.protected_state = state
    answered = list(zip(dests, acks, strict=False))  # acks may stop early
    for dest, ack in answered:
        if not ack.ok and _not_ours(ack):  # another session's, or replaced: nothing is ours
            dest.start_over()  # even when the update is abandoned below
    held = {d.name: str(a.reason) for d, a in answered if spare_held and _not_ours(a) and not a.ok}
    refused = next(((d, a) for d, a in answered if not a.ok and d.name not in held), None)
    if refused is not None:
        for protected, ack in zip(dests, acks, strict=False):
            # Not one kept from a failed update: its destination still holds a mix.
            if ack.ok and not ack.kept and _ask(site, "unprotect", protected, timeout).ok:
                protected.protected_state = None
        for session in marked:
            session.unmark()
        dest, ack = refused
        message = f"cannot protect {dest.name}: {ack.reason}; the update was abandoned"
        log.error("%s", message)
        raise UpdateError(message)
    named = {dest.name for dest, ack in zip(dests, acks, strict=True) if "image" in ack.info}
    return named, held


def rollback(
    session: Session,
    dest: Destination,
    site: RemoteSite,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    persist: Callable[[], object] | None = None,
) -> Ack:
    """Restore ``dest``'s protected image, tracking first what that may rewrite.

    A rollback rewrites ranges that no longer hold what the copies sent, so
    they must be in ``session``'s tracking bitmap (rule 2) before the site
    acts: a lost answer or a crash must not leave them untracked. So:

    1. ask the site's status: ``dest`` must be protected and its image intact, and
       held by no other session (``Ack.held``) (else ``UpdateError``, nothing changed);
    2. track the ranges its protection holds (the status's ``extents``; the
       whole source when the site does not list them) and flag ``dest``
       INCONSISTENT;
    3. ``persist()``, when given, makes that durable (a persistent session
       checkpoints and saves); if it raises, ``dest`` keeps its state, the
       site is not asked, and the exception propagates;
    4. ask the site to roll back. Done: ``dest`` is back in the state it had
       when it was protected (CONSISTENT after a failed update; INCONSISTENT
       when that is not known here) and the ack's ``extents`` are tracked
       too. Refused: ``dest`` keeps its state, ``UpdateError``. No answer
       (``outcome_unknown``, or a site that raised): it may have happened,
       so ``dest`` stays INCONSISTENT with the ranges tracked, and
       ``UpdateError`` says so; the next update resends them.

    Raises ``StateError`` when the session is marked.
    """
    return rollback_group([(session, dest)], site, timeout, persist=persist)[0]


def rollback_group(
    members: Sequence[tuple[Session, Destination]],
    site: RemoteSite,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    persist: Callable[[], object] | None = None,
) -> list[Ack]:
    """:func:`rollback` of several destinations, each with its session, together.

    For a consistency group: its destinations go back to the cut their
    protections hold. Each step is taken for all before the next: every
    status (a problem with one raises ``UpdateError``, nothing changed),
    every ``_track``, one ``persist()``; then the site is asked once where it
    offers a group request (``rollback_group``: an RBD group snapshot is
    rolled back as one, :func:`isc.remote.group_request`), else once per
    destination. Each destination then fares as :func:`rollback` says, and
    ``UpdateError`` names every one that failed. Returns an ack each.

    Raises ``StateError`` when a session is marked.
    """
    sessions = list({id(session): session for session, _ in members}.values())
    with update_locks([(session, []) for session in sessions]):
        for session in sessions:
            if session.bitmap.marked:
                raise StateError(f"{session.name} is marked; unmark it before a rollback")
        infos = []
        for _, dest in members:
            status = _ask(site, "status", dest, timeout)
            info = status.info
            if not status.ok:
                problem = status.reason  # without it, what a rollback would rewrite is unknown
            elif status.held:  # another session's: its protection is not this session's
                problem = status.reason
            elif not info.get("protected"):
                problem = f"{dest.name} is not protected: there is no image to restore"
            elif info.get("intact") is False:
                problem = f"the protected image was lost: {info.get('problem')}"
            else:
                problem = None
            if problem is not None:
                raise UpdateError(f"rollback of {dest.name} failed: {problem}; nothing was changed")
            infos.append(info)
        before = [dest.state for _, dest in members]
        for (session, dest), info in zip(members, infos, strict=True):
            _track(session, info.get("extents"))
            dest.state = DestState.INCONSISTENT
        if persist is not None:
            try:
                persist()
            except BaseException:
                for (_, dest), state in zip(members, before, strict=True):
                    dest.state = state  # the site was not asked: dest holds what it held
                raise
        dests = [dest for _, dest in members]
        if len(dests) > 1:
            acks = _ask_group(site, "rollback", dests, timeout)
        else:
            acks = [_ask(site, "rollback", dests[0], timeout)]
        _reconnect(dests, acks)
        failures = []
        for (session, dest), state, ack in zip(members, before, acks, strict=True):
            if ack.ok:
                _track(session, ack.extents)
                dest.state = dest.protected_state or DestState.INCONSISTENT
            elif ack.outcome_unknown:
                failures.append(
                    f"rollback of {dest.name}: {ack.reason}; it may have happened: {dest.name} "
                    "is inconsistent and the ranges its protection held are tracked, so the "
                    "next update resends them"
                )
            else:
                dest.state = state
                failures.append(f"rollback of {dest.name} failed: {ack.reason}")
        if failures:
            raise UpdateError("; ".join(failures))
        return acks


def _track(session: Session, extents) -> None:
    """Record ``extents`` (``(offset, length)`` pairs from a site) as written to the source.

    Anything that is not a list of such pairs counts as "everything may have
    changed": the whole source is tracked.
    """
    size = session.source.size
    try:
        ranges = [(int(offset), int(length)) for offset, length in extents]
    except (TypeError, ValueError):
        ranges = [(0, size)]
    if any(offset < 0 or length < 0 for offset, length in ranges):
        ranges = [(0, size)]
    for offset, length in ranges:
        if offset < size and length:
            session.bitmap.record_write(offset, min(length, size - offset))
