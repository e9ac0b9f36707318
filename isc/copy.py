"""The copy job: sends a session's source to its destinations.

Three kinds of copy (docs/design.md, "The states and what each operation does"):

=================  =========================================================
``incremental()``  the session is marked: send the transfer bitmap's chunks
                   (saved ones from the save area), clear each run once every
                   destination has it, unmark on success. Destinations end
                   CONSISTENT.
``full()``         mark with every chunk in the transfer bitmap, then as above.
``full(False)``    the unmarked full copy: clear tracking, copy the whole
                   source with large reads and no COFW lookups while tracking
                   keeps recording. Destinations end INCONSISTENT until the
                   next successful incremental copy.
=================  =========================================================

Sparse sources: a full copy of a source that tells its holes
(``data_extents``, :mod:`isc.lun`; a sparse file) reads and sends only its
data and makes each hole read as zeros on every destination with
:func:`isc.lun.write_zeroes` (a punched hole in a file, ``WRITE_ZEROES`` on
NBD, written zeros elsewhere): a destination ends as sparse as its source,
and old data in it never survives where the source has a hole. Cost per run:
two ``lseek`` per data range found, one ``write_zeroes`` per hole per
destination. The unmarked copy sends the data ranges as the file system
reports them; the marked one whole chunks, and takes as data every chunk
written since the mark (its saved copy says what it held then).

Failure (a destination write raises, the mark is aborted, ``cancel()``):
the session unmarks, so every chunk not confirmed on every destination is back
in the tracking bitmap (rule 2); destinations written by this copy become
INCONSISTENT; ``CopyError`` is raised carrying the :class:`CopyResult`. What
was sent since the last flush of the destinations (at most ``flush_every``
bytes) is sent again next time: a destination may lose acknowledged writes
that it never flushed.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from isc import fingerprint
from isc.errors import CopyError, ParameterError, StateError
from isc.lun import write_zeroes
from isc.session import Session

log = logging.getLogger(__name__)

Ranges: TypeAlias = list[tuple[int, int]]
"""Byte ranges as (offset, length) pairs, ascending and disjoint."""

DEFAULT_IO_SIZE = 4 << 20
"""Bytes per read and per destination write; runs of chunks are coalesced up to it.

Large enough that a copy sharing its process with the host's writes (``isc
serve``) takes the interpreter lock back rarely: at 1 MiB the host's write
rate during a full copy was measurably lower. A copy of a file through a
buffer of this size runs as fast as through 1 MiB."""

KERNEL_RUN = 64 << 20
"""Bytes per run when the source copies to every destination inside the kernel
(``copy_to``, see :mod:`isc.lun`): one call, no buffer, and at most one
``busy_share`` wait for all of it (the kernel copies it in pieces of
:data:`isc.lun.COPY_PIECE`)."""

DEFAULT_WORKERS = min(os.cpu_count() or 1, 4)
"""Threads that copy a run inside the kernel while the host is not writing."""

SPLIT_MIN = 4 << 20
"""Fewest bytes a worker thread is given of a run: a run smaller than twice this
is copied by one thread. Handing half a run to another thread cost about
0.1 ms on a 2-vCPU VM, so a split paid only from runs of 4 MiB (2% faster)
and clearly from 16 MiB (15%); the small runs of incremental copies never pay
it (benchmarks/README.md, "Sparse full copies and incremental copies per
workers")."""

DEFAULT_FLUSH_EVERY = 256 << 20
"""Bytes sent between flushes of every destination during a copy.

A destination may keep acknowledged writes in a volatile cache until it
flushes, so a failed copy puts back what it sent since the last flush; this
bounds that resend.
"""


def _gaps(start: int, end: int, ranges: Ranges) -> Ranges:
    """The parts of ``[start, end)`` outside ``ranges`` (which lie inside it)."""
    gaps = []
    at = start
    for offset, length in ranges:
        if offset > at:
            gaps.append((at, offset - at))
        at = offset + length
    if at < end:
        gaps.append((at, end - at))
    return gaps


class DestState(enum.Enum):
    """What a destination holds."""

    NEW = "new"
    """Never copied to: its contents are unknown, its first copy is a full one."""
    CONSISTENT = "consistent"
    """An exact point-in-time image of the source."""
    INCONSISTENT = "inconsistent"
    """A mix of points in time; the next successful incremental copy fixes it."""


class Destination:
    """A LUN that receives copies, with its state."""

    def __init__(
        self,
        lun,
        name: str | None = None,
        state: DestState = DestState.NEW,
        epoch: int | None = None,
    ) -> None:
        self.lun = lun
        self.name = name or f"destination-{id(self):x}"
        self.state = state
        self.epoch = epoch
        """The session epoch this destination is in step with; None until its first copy."""
        self.protected_state: DestState | None = None
        """The state this destination had when its site last protected it."""
        self.samples: list[fingerprint.Sample] = []
        """Checksums of a few of its chunks, checked before an incremental copy
        relies on it (:mod:`isc.fingerprint`)."""

    def start_over(self) -> None:
        """Make it NEW and out of step, without samples: nothing it holds is relied on, and
        its next copy gives it every chunk (replaced, wiped, or another session's)."""
        self.state, self.epoch, self.samples = DestState.NEW, None, []

    def in_step(self, session: Session) -> bool:
        """Whether every chunk where this destination may differ from ``session``'s
        source is in its tracking or transfer bitmap (it took part in the last copy)."""
        return self.epoch is not None and self.epoch == session.epoch

    def __repr__(self) -> str:
        return f"Destination({self.name!r}, {self.state.value})"


@dataclass
class CopyResult:
    """What a copy job did. ``outcomes`` maps destination name to "ok" or the error.

    ``bytes_sent`` counts source bytes sent (each to every destination; a
    sparse copy's holes count as sent, for progress and ``throttle`` too);
    ``bytes_seeded`` counts bytes copied from an in-step destination to
    destinations that were not in step.
    """

    mode: str
    bytes_total: int = 0
    bytes_sent: int = 0
    bytes_seeded: int = 0
    chunks_sent: int = 0
    extents: int = 0
    seconds: float = 0.0
    cofw_chunks: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    """Destinations found replaced before the copy (they became NEW), and why."""


class CopyCancelled(Exception):
    """Raised inside the copy loop by ``cancel()``; surfaces as ``CopyError``."""


def _one_copy(copy: Callable[..., CopyResult]) -> Callable[..., CopyResult]:
    """A copy method of :class:`CopyJob`: refused while the job or another job runs a copy
    of its session, or once it is closed (``StateError``, changing nothing)."""

    @functools.wraps(copy)
    def run(job: CopyJob, *args, **kwargs) -> CopyResult:
        name = job.session.name
        if not job._busy.acquire(blocking=False):
            raise StateError(f"this job is copying {name} already; wait for that copy to end")
        try:
            # Checked holding _busy: close() sets the flag, then waits for _busy.
            if job._closed:
                raise StateError(f"the copy job of {name} is closed; make a new CopyJob")
            # Two copies of a mark would each clear chunks the other's destinations
            # lack, and the one that joined last would call its own consistent.
            if not job.session.copy_lock.acquire(blocking=False):
                raise StateError(f"another copy job is copying {name}; wait for that copy to end")
            try:
                return copy(job, *args, **kwargs)
            finally:
                job.session.copy_lock.release()
        finally:
            job._busy.release()

    return run


class CopyJob:
    """Copies ``session``'s source to ``destinations``.

    ``throttle`` caps the copy at that many bytes per second (None: no cap).
    ``progress(done_bytes, total_bytes)`` is called after each run is sent.
    ``io_size`` is the largest read and write in bytes, a multiple of the
    session's granularity. ``flush_every`` bytes sent, every destination is
    flushed. A run copied inside the kernel is split among ``workers``
    threads while the host is not writing (no host write since the last
    run), each getting at least :data:`SPLIT_MIN` bytes of it; while the
    host writes, one thread copies and the other CPUs are the host's.
    ``busy_share`` (0 to 1) is the most of its time the copy works while
    the host writes: after a run during which the host wrote, the
    copy waits until the run was that share of the time since it began, so
    the host's writes keep the CPUs and memory bandwidth the rest of the
    time (1: never wait). Raises ``ParameterError`` for bad arguments.

    One copy of a session runs at a time, whatever the job
    (:attr:`Session.copy_lock`): each clears the chunks it sent, which the
    destinations of another would lack. A copy while another job copies the
    same session raises ``StateError``, changing nothing.

    A copy job is a context manager: leaving the block closes it
    (:meth:`close`), so no copy of it runs past the block.
    """

    def __init__(
        self,
        session: Session,
        destinations: Sequence[Destination],
        *,
        throttle: float | None = None,
        progress: Callable[[int, int], object] | None = None,
        io_size: int = DEFAULT_IO_SIZE,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        workers: int = DEFAULT_WORKERS,
        busy_share: float = 1.0,
    ) -> None:
        if not destinations:
            raise ParameterError("a copy job needs at least one destination")
        names = [d.name for d in destinations]
        if len(set(names)) != len(names):
            raise ParameterError(f"destination names must be unique, got {names}")
        for dest in destinations:
            if dest.lun.size < session.source.size:
                raise ParameterError(
                    f"destination {dest.name} holds {dest.lun.size} bytes, "
                    f"less than the source's {session.source.size}"
                )
        if io_size <= 0 or io_size % session.granularity:
            raise ParameterError(
                f"io_size must be a positive multiple of the granularity "
                f"{session.granularity}, got {io_size}"
            )
        if flush_every <= 0:
            raise ParameterError(f"flush_every must be > 0 bytes, got {flush_every}")
        if throttle is not None and throttle <= 0:
            raise ParameterError(f"throttle must be > 0 bytes per second, got {throttle}")
        if workers < 1:
            raise ParameterError(f"workers must be >= 1, got {workers}")
        if not 0 < busy_share <= 1:
            raise ParameterError(f"busy_share must be in (0, 1], got {busy_share}")
        self.session = session
        self.destinations = list(destinations)
        self.throttle = throttle
        self.progress = progress
        self.io_size = io_size
        self.flush_every = flush_every
        self.workers = workers
        self.busy_share = busy_share
        self._cancel = threading.Event()
        self._cancel_reason: str | None = None
        self._busy = threading.Lock()  # held while a copy of this job runs
        self._closed = False
        copies_to = getattr(session.source, "copies_to", None)
        self._kernel = {d.name for d in self.destinations if copies_to and copies_to(d.lun)}
        """The destinations the source copies to inside the kernel (``copy_to``)."""
        self._pool: ThreadPoolExecutor | None = None  # while a copy runs, if workers > 1
        self._active = list(self.destinations)
        """The destinations still in the running copy (one that fails drops out)."""
        self.replaced: dict[str, str] = {}
        """Destinations :meth:`check_destinations` found replaced, by name, with why."""
        self._unchecked: set[str] = set()
        """Destinations :meth:`check_destinations` could not read: checked at the copy's end."""
        self._host_writes = 0  # the session's write count at the last run
        self._sparse = False  # the running copy sends the source's holes as holes

    def cancel(self, reason: str | None = None) -> None:
        """Stop the running copy after the run in flight (or the next copy of this job,
        after its first run, when none runs yet); it fails with ``CopyError``, whose
        message gives ``reason`` (default: "the copy of NAME was cancelled")."""
        self._cancel_reason = reason
        self._cancel.set()

    def close(self) -> None:
        """Cancel a copy of this job running in another thread and wait for it to end
        (it fails with ``CopyError``; rule 2 keeps what it had not sent); later copies
        raise ``StateError``. The destinations stay open: they are the caller's.
        Idempotent."""
        self._closed = True
        self.cancel(f"the copy job of {self.session.name} was closed")
        with self._busy:
            pass

    def __enter__(self) -> CopyJob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the three copies ----------------------------------------------------------
    @_one_copy
    def incremental(self) -> CopyResult:
        """Send the marked session's transfer bitmap; unmark and make destinations CONSISTENT.

        Destinations receive the source as it was at the caller's mark. A
        destination not in step with the session (NEW, or left out of an
        earlier copy: see :attr:`Session.epoch`) needs more than the transfer
        bitmap: under a full mark it gets it anyway; otherwise it is first
        seeded, outside the transfer bitmap, from a destination of this job
        that is in step (whose data there equals the source at the mark).
        Raises ``StateError``, changing nothing, when the session is
        unmarked, or when a destination needs seeding and none can give it.
        """
        session = self.session
        bitmap = session.bitmap
        if not bitmap.marked:
            raise StateError(
                session.abort_reason(bitmap.generation)
                or f"{session.name} is unmarked: an incremental copy sends a marked "
                "point in time; mark the session first"
            )
        session.claim_mark(bitmap.generation, "push copy")  # before anything is judged
        self.check_destinations()
        stale = [d for d in self.destinations if not d.in_step(session)]
        donor = next((d for d in self.destinations if d.in_step(session)), None)
        if stale and bitmap.transfer_count != bitmap.chunks and donor is None:
            names = ", ".join(d.name for d in stale)
            why = "".join(f"; {name}: {reason}" for name, reason in self.replaced.items())
            raise StateError(
                f"destination(s) {names} of {session.name} are new, replaced or missed an "
                "earlier copy and no destination of this copy is in step to seed them "
                f"from; unmark the session and run a full copy{why}"
            )
        if bitmap.transfer_count == bitmap.chunks:
            stale = []
        result = self._marked_copy("incremental", donor, stale)
        result.replaced = dict(self.replaced)
        return result

    def check_destinations(self) -> None:
        """Rule 12: find destinations replaced or wiped since the copy that wrote them.

        Each destination in step with samples is checked (:mod:`isc.fingerprint`);
        one that fails becomes NEW and out of step, so the next copy gives it
        every chunk (seeded from a destination in step, or a full copy), and
        goes into :attr:`replaced` with why. A destination that cannot be
        read now may be reached again by the copy's writes (a reconnecting
        LUN), perhaps at a volume that replaced it: the marked copy checks it
        once it has flushed, before it could call it CONSISTENT.
        """
        self._unchecked = set()
        for dest in self.destinations:
            if dest.samples and dest.in_step(self.session):
                try:
                    self._check(dest)
                except Exception as exc:
                    log.warning(
                        "%s: cannot check destination %s now: %s", self.session.name, dest.name, exc
                    )
                    self._unchecked.add(dest.name)

    def _check(self, dest: Destination) -> bool:
        """Whether ``dest`` still holds what its samples say; if not it is
        :meth:`_replaced`. Read errors propagate."""
        session = self.session
        reason = fingerprint.mismatch(
            dest.lun, dest.samples, session.bitmap, session.granularity, session.source.size
        )
        if reason is not None:
            self._replaced(dest, reason)
        return reason is None

    def _replaced(self, dest: Destination, reason: str) -> None:
        """``dest`` is not the volume its samples describe: NEW and out of step, so
        its next copy gives it every chunk, and in :attr:`replaced` with why."""
        name = self.session.name
        log.warning("%s: destination %s needs every chunk: %s", name, dest.name, reason)
        dest.start_over()
        self.replaced[dest.name] = reason

    def _check_late(self, result: CopyResult) -> None:
        """Check the destinations :meth:`check_destinations` could not read; one that
        fails or still cannot be read drops out of the copy (:meth:`_reject`)."""
        for dest in [d for d in self._active if d.name in self._unchecked]:
            try:
                if not self._check(dest):
                    self._reject(dest, result)
            except Exception as error:
                self._reject(dest, result, error)

    def _reject(self, dest: Destination, result: CopyResult, error: Exception | None = None):
        """Take ``dest`` out of the copy: it was found :meth:`_replaced` (``error`` None;
        it stays NEW), or reading it to tell failed with ``error``."""
        if error is None:
            outcome = f"replaced: {self.replaced[dest.name]}"
            cause: Exception = CopyError(f"destination {dest.name} {outcome}", result)
        else:
            outcome = f"failed: cannot check it is the destination it was: {error}"
            cause = error
        try:
            self._drop(dest, result, outcome, cause)
        finally:
            if error is None:  # replaced: every chunk, not only what it missed
                dest.start_over()

    @_one_copy
    def full(self, marked: bool = True) -> CopyResult:
        """Copy the whole source: marked (ends CONSISTENT) or unmarked (ends INCONSISTENT).

        Raises ``StateError``, changing nothing, when the session is marked.
        """
        if self.session.bitmap.marked:
            raise StateError(
                f"{self.session.name} is marked (generation {self.session.generation}): "
                "a full copy starts unmarked; finish or unmark the current copy first"
            )
        if marked:
            self.session.claim_mark(self.session.mark(full=True), "push copy")
            return self._marked_copy("full", None, [])
        return self._unmarked_full_copy()

    def _join(self) -> None:
        """Start clearing bits: destinations outside this copy fall out of step."""
        self.session.epoch += 1
        for dest in self.destinations:
            # One that dropped out already is in step unless it was being seeded.
            if dest in self._active or dest.name not in self._stale:
                dest.epoch = self.session.epoch

    # -- marked copies -------------------------------------------------------------
    def _marked_copy(
        self, mode: str, donor: Destination | None, stale: list[Destination]
    ) -> CopyResult:
        session = self.session
        bitmap = session.bitmap
        g = session.granularity
        size = session.source.size
        generation = bitmap.generation
        result = CopyResult(mode)
        cofw_before = session.stats.cofw_chunks
        self._sparse = bitmap.transfer_count == bitmap.chunks and self._holes_known()
        runs = starts = ends = np.empty(0, dtype=np.int64)
        sent = flushed = 0  # runs cleared; runs cleared and flushed on every destination

        def send_runs() -> None:
            nonlocal runs, starts, ends, sent, flushed
            runs = bitmap.extents(self._run_size() // g)
            starts = runs[:, 0] * g
            ends = np.minimum((runs[:, 0] + runs[:, 1]) * g, size)
            result.bytes_total = int((ends - starts).sum())
            buffer = memoryview(bytearray(self.io_size))
            for dest in self.destinations:
                # The chunks this copy may write are about to change.
                dest.samples = [] if dest in stale else fingerprint.prune(dest.samples, bitmap)
            if stale:
                self._seed(donor, stale, starts, ends, buffer, result)
            self._join()
            firsts, counts = runs[:, 0].tolist(), runs[:, 1].tolist()
            for first, count, start, end in zip(
                firsts, counts, starts.tolist(), ends.tolist(), strict=True
            ):
                self._transfer(start, end, buffer, result, frozen=True)
                # Clear only if the mark is still ours: an abort in between
                # means the data just sent may not be the point-in-time data.
                session.confirm_sent(first, count, generation)
                sent += 1
                result.chunks_sent += count
                self._ran(result, end - start)
                if self._flush_due(result):
                    self._sample(result, runs[flushed:sent], anywhere=False)
                    flushed = sent
            self._flush(result)
            flushed = sent
            self._check_late(result)
            self._sample(result, runs if not stale else np.array([[0, bitmap.chunks]]))
            # Whatever the number of runs (none at all too), the copy holds the
            # point in time only if its mark lasted to the end.
            session.finish_mark(generation)

        def missed() -> None:
            # A destination dropped out: what it had not flushed goes back.
            bitmap.record_writes(starts[flushed:], ends[flushed:] - starts[flushed:], cofw=False)

        def restore() -> None:
            session.abandon_mark(generation)
            # A destination may keep acknowledged writes in a volatile cache
            # until it flushes: runs sent since the last flush go back too, and
            # the run in flight, whose writes may have landed after its mark
            # ended and over what a later copy sent there.
            again = slice(flushed, sent + 1)
            bitmap.record_writes(starts[again], ends[again] - starts[again])

        self._run(result, send_runs, restore, missed, generation, stale)
        result.cofw_chunks = session.stats.cofw_chunks - cofw_before
        for dest in self._active:
            dest.state = DestState.CONSISTENT
        return result

    def _seed(self, donor, stale, starts, ends, buffer, result: CopyResult) -> None:
        """Copy from ``donor`` to ``stale`` every byte outside the transfer runs."""
        runs = list(zip(starts.tolist(), (ends - starts).tolist(), strict=True))
        for gap_start, gap_length in _gaps(0, self.session.source.size, runs):
            gap_end = gap_start + gap_length
            for offset in range(gap_start, gap_end, self.io_size):
                view = buffer[: min(self.io_size, gap_end - offset)]
                try:
                    donor.lun.readinto(offset, view)
                except Exception as exc:
                    # Without their donor the stale destinations cannot be seeded.
                    for dest in (donor, *stale):
                        self._drop(dest, result, f"failed: seeding from {donor.name}: {exc}", exc)
                    return
                self._send(stale, offset, view, result)
                result.bytes_seeded += len(view)

    # -- the unmarked full copy ----------------------------------------------------------
    def _unmarked_full_copy(self) -> CopyResult:
        session = self.session
        size = session.source.size
        result = CopyResult("full-unmarked", bytes_total=size)
        g = session.granularity
        done = flushed = 0
        self._sparse = self._holes_known()

        def send_all() -> None:
            nonlocal done, flushed
            self._join()
            buffer = memoryview(bytearray(self.io_size))
            step = self._run_size()
            while done < size:
                end = min(done + step, size)
                self._transfer(done, end, buffer, result, frozen=False)
                sent, done = end - done, end
                self._ran(result, sent)
                if self._flush_due(result):
                    first = flushed // g
                    runs = np.array([[first, -(-done // g) - first]])
                    self._sample(result, runs, anywhere=False)
                    flushed = done
            self._flush(result)
            flushed = done
            self._sample(result, np.array([[0, session.bitmap.chunks]]))

        def put_back() -> None:
            # Tracking was cleared when the copy began: what was not sent and
            # flushed goes back.
            session.bitmap.record_write(flushed, size - flushed)

        with session.marks_held("an unmarked full copy is running"):
            for dest in self.destinations:
                dest.state = DestState.INCONSISTENT
                dest.samples = []
            session.bitmap.clear_tracking()
            self._run(result, send_all, put_back, put_back)
        return result

    def _sample(self, result: CopyResult, runs: np.ndarray, anywhere: bool = True) -> None:
        """New fingerprint samples of every destination still in the copy, ``runs``
        being what it wrote (:func:`isc.fingerprint.take`). The copy takes some
        at each flush too, of what it flushed (not ``anywhere``): a destination
        that drops out later can still be told from one that replaced it.

        Each chunk read back is compared with the source's where no host
        write came since the copy's start (tracking clear): a destination that
        holds other bytes (it acknowledged writes it did not make, or another
        writer changed it) is :meth:`_replaced`; one that cannot be read back
        fails. Either drops out of the copy (:meth:`_reject`).
        """
        session = self.session
        for dest in list(self._active):
            try:
                dest.samples = fingerprint.take(
                    dest.lun,
                    runs,
                    session.granularity,
                    session.source.size,
                    dest.samples,
                    anywhere,
                    session.source,
                    session.bitmap,
                )
            except fingerprint.Differs as differs:
                self._replaced(dest, str(differs))
                self._reject(dest, result)
            except Exception as exc:
                self._reject(dest, result, exc)

    # -- shared steps ------------------------------------------------------------------
    def _holes_known(self) -> bool:
        """Whether the source tells its holes (``data_extents``, see :mod:`isc.lun`)."""
        return callable(getattr(self.session.source, "data_extents", None))

    def _run_size(self) -> int:
        """Bytes per run: :data:`KERNEL_RUN` when the source copies to every
        destination inside the kernel, else (or when throttled, to keep the
        rate even) ``io_size``."""
        if self.throttle is None and len(self._kernel) == len(self.destinations):
            return max(self.io_size, KERNEL_RUN)
        return self.io_size

    def _pieces(self, ranges: Ranges, quiet: bool) -> list[Ranges]:
        """``ranges`` in groups, one per worker thread while the host is ``quiet`` and
        each would get :data:`SPLIT_MIN` bytes, else one group. Groups split
        ranges at whole chunks from their starts."""
        g = self.session.granularity
        total = sum(length for _, length in ranges)
        count = min(self.workers, total // SPLIT_MIN) if quiet else 1
        if count <= 1:
            return [ranges]
        share = -(-total // count // g) * g
        groups: list[Ranges] = [[]]
        room = share
        for offset, length in ranges:
            while length:
                if not room:
                    groups.append([])
                    room = share
                take = min(length, room)
                groups[-1].append((offset, take))
                offset, length, room = offset + take, length - take, room - take
        return groups

    def _transfer(
        self, start: int, end: int, buffer: memoryview, result: CopyResult, *, frozen: bool
    ) -> None:
        """Send ``[start, end)`` of the source (as at the mark if ``frozen``) to every
        destination: inside the kernel where the source can copy to it, else read
        into ``buffer`` and written in pieces of its size. In a sparse copy, the
        source's holes go as ``write_zeroes`` instead."""
        session = self.session
        writes = session.bitmap.writes
        quiet, self._host_writes = writes == self._host_writes, writes
        began = time.monotonic()
        data = self._data_ranges(start, end, frozen) if self._sparse else [(start, end - start)]
        self._send_run(data, buffer, result, frozen, quiet)
        if self._sparse:
            self._zero(_gaps(start, end, data), result)
        if self.busy_share < 1 and not (quiet and session.bitmap.writes == writes):
            # The host wrote during or before this run: leave it the time.
            wait = (time.monotonic() - began) * (1 / self.busy_share - 1)
            self._cancel.wait(min(wait, threading.TIMEOUT_MAX))  # longer raises OverflowError

    def _data_ranges(self, start: int, end: int, frozen: bool) -> Ranges:
        """The (offset, length) ranges of ``[start, end)`` to send as data; the rest
        was a hole of the source (at the mark, if ``frozen``) and reads as zeros.

        Unfrozen: the source's ``data_extents``. Frozen: whole chunks, and a
        chunk written since the mark counts as data whatever the source holds
        now. The race: a host write changes a chunk of the transfer bitmap
        only after flagging it saved (COFW), and the flag stays until the
        chunk is sent or the mark ends. So reading the flags *after* the
        holes, a chunk found in a hole and not flagged was a hole at the mark
        too; a flagged one may have held anything then (its data went to the
        save area before a write, or a discard, changed it) and is sent from
        the frozen view. A mark that ends meanwhile drops the flags, and the
        copy fails at its next ``confirm_sent``.
        """
        extents = self.session.source.data_extents(start, end - start)
        if not frozen:
            return extents
        bitmap = self.session.bitmap
        g = self.session.granularity
        first = start // g
        count = -(-(end - start) // g)
        data = np.zeros(count + 2, np.int8)  # one flag per chunk, padded with a 0 each side
        for offset, length in extents:
            data[1 + (offset - start) // g : 1 + -(-(offset + length - start) // g)] = 1
        if bitmap.saved_count:
            data[1 + bitmap.saved_in(first, count) - first] = 1
        edges = np.flatnonzero(np.diff(data)).tolist()  # rises and falls, alternately
        return [
            (start + a * g, min(start + b * g, end) - start - a * g)
            for a, b in zip(edges[0::2], edges[1::2], strict=True)
        ]

    def _zero(self, holes: Ranges, result: CopyResult) -> None:
        """Make ``holes`` read as zeros on every destination still in the copy
        (:func:`isc.lun.write_zeroes`); one that fails drops out."""
        if not holes:
            return
        for dest in list(self._active):
            dest.state = DestState.INCONSISTENT
            try:
                for offset, length in holes:
                    write_zeroes(dest.lun, offset, length)
            except Exception as exc:
                self._drop(dest, result, f"failed: {exc}", exc)

    def _send_run(
        self, ranges: Ranges, buffer: memoryview, result: CopyResult, frozen: bool, quiet: bool
    ) -> None:
        """Send ``ranges`` of the source (whole chunks if ``frozen``) to every destination."""
        session = self.session
        copy = session.copy_frozen_to if frozen else getattr(session.source, "copy_to", None)
        through_buffer = []
        groups = self._pieces(ranges, quiet)
        for dest in list(self._active):
            if copy is None or dest.name not in self._kernel:
                through_buffer.append(dest)
                continue
            dest.state = DestState.INCONSISTENT

            def copy_group(group: Ranges, lun=dest.lun) -> bool:
                return all(copy(offset, length, lun) for offset, length in group)

            try:
                if self._pool is not None and len(groups) > 1:
                    copied = all(list(self._pool.map(copy_group, groups)))
                else:
                    copied = copy_group(ranges)
            except Exception as exc:
                generation = self._generation
                if (
                    isinstance(exc, StateError)
                    and generation is not None
                    and session.mark_ended(generation)
                ):
                    raise  # the mark ended: the copy is over for every destination
                self._drop(dest, result, f"failed: {exc}", exc)
                continue
            if not copied:
                through_buffer.append(dest)
        if not through_buffer:
            return
        read = session.read_frozen_into if frozen else session.source.readinto
        for offset, length in ranges:
            end = offset + length
            for at in range(offset, end, len(buffer)):
                view = buffer[: min(len(buffer), end - at)]
                read(at, view)
                self._send(through_buffer, at, view, result)

    def _send(self, dests, offset: int, data: memoryview, result: CopyResult) -> None:
        """Write one run to ``dests``; each becomes INCONSISTENT before it is touched,
        and one whose write fails drops out of the copy."""
        for dest in dests:
            if dest not in self._active:
                continue  # it dropped out earlier in this run
            dest.state = DestState.INCONSISTENT
            try:
                dest.lun.write(offset, data)
            except Exception as exc:
                self._drop(dest, result, f"failed: {exc}", exc)

    def _drop(self, dest: Destination, result: CopyResult, outcome: str, exc: Exception) -> None:
        """Take ``dest`` out of the running copy after it failed (rule 13).

        What it missed goes back into the tracking bitmap, so its next copy
        sends it (the others receive those chunks again too, which costs a
        resend and nothing else); a destination that was being seeded falls
        out of step instead. When no destination is left the copy fails with
        ``exc``.
        """
        if dest not in self._active:
            return
        self._active.remove(dest)
        dest.state = DestState.INCONSISTENT
        result.outcomes[dest.name] = outcome
        log.error(
            "%s: destination %s dropped out of the copy: %s", self.session.name, dest.name, outcome
        )
        if not self._active:
            raise exc
        if dest.name in self._stale:
            dest.epoch = self._epochs[dest.name]
        else:
            self._missed()

    def _ran(self, result: CopyResult, nbytes: int) -> None:
        result.bytes_sent += nbytes
        result.extents += 1
        if self.progress is not None:
            self.progress(result.bytes_sent, result.bytes_total)
        if self.throttle is not None:
            ahead = result.bytes_sent / self.throttle - (time.monotonic() - self._started)
            if ahead > 0:
                self._cancel.wait(min(ahead, threading.TIMEOUT_MAX))  # longer raises OverflowError
        if self._cancel.is_set():
            raise CopyCancelled(
                self._cancel_reason or f"the copy of {self.session.name} was cancelled"
            )

    def _flush_due(self, result: CopyResult) -> bool:
        """Flush every destination once ``flush_every`` bytes were sent since the last flush."""
        if result.bytes_sent - self._flushed_bytes < self.flush_every:
            return False
        self._flush(result)
        return True

    def _flush(self, result: CopyResult) -> None:
        for dest in list(self._active):
            try:
                dest.lun.flush()
            except Exception as exc:
                self._drop(dest, result, f"flush failed: {exc}", exc)
        self._flushed_bytes = result.bytes_sent

    def _with_workers(self, body: Callable[[], None]) -> None:
        """Run ``body`` with the worker threads; they are all done when this returns."""
        if self.workers == 1:
            body()
            return
        with ThreadPoolExecutor(self.workers, "isc-copy") as pool:
            self._pool = pool
            try:
                body()
            finally:
                self._pool = None

    def _run(
        self,
        result: CopyResult,
        body: Callable[[], None],
        restore: Callable[[], None],
        missed: Callable[[], None],
        generation: int | None = None,
        stale: Sequence[Destination] = (),
    ) -> None:
        """Run ``body``; on any failure ``restore`` rule 2 and raise ``CopyError``.

        ``missed()`` puts back what a destination that drops out of the copy
        missed. ``generation`` is the mark a marked copy sends.
        """
        session = self.session
        self._started = time.monotonic()
        self._flushed_bytes = 0
        self._host_writes = session.bitmap.writes
        self._active = list(self.destinations)
        self._missed = missed
        self._generation = generation
        self._stale = {d.name for d in stale}
        self._epochs = {d.name: d.epoch for d in self.destinations}
        try:
            self._with_workers(body)
        except BaseException as exc:
            ended = None if generation is None else session.mark_ended(generation)
            restore()
            result.seconds = time.monotonic() - self._started
            for dest in self._active:
                result.outcomes.setdefault(dest.name, "interrupted")
            message = f"{result.mode} copy of {session.name} failed: {exc}"
            if ended and ended not in message:
                message += f" ({ended})"
            log.error("%s", message)
            if isinstance(exc, Exception):
                raise CopyError(message, result) from exc
            raise
        finally:
            # A cancel stops the copy it came during or before, not a later one.
            self._cancel.clear()
            self._cancel_reason = None
        result.seconds = time.monotonic() - self._started
        for dest in self._active:
            result.outcomes[dest.name] = "ok"
