"""The incremental session: every host write to a source LUN goes through it.

A session owns the source's :class:`~isc.DeltaBitmap` and its save area. It is
*unmarked* or *marked*:

========  ==================================================================
state     what a host write does
========  ==================================================================
UNMARKED  sets the tracking bits of the chunks it touches, then writes.
MARKED    the same, and first copies to the save area (COFW) the old data of
          every touched chunk whose transfer bit is set and which is not saved
          yet, so the copy job can still send the point-in-time data.
========  ==================================================================

If the save area runs out, the session *aborts* the mark: it unmarks (the
transfer bitmap merges back into tracking, so nothing is lost, rule 2) and the
host write still succeeds (rule 5). The running copy notices when it next
confirms chunks and fails.

Concurrency: host writes may come from many threads while a copy runs. The
core's ``begin_write``/``end_write`` keep each write wholly on one side of a
mark and make a write wait while an overlapping write still saves COFW data.
``_save_lock`` orders saves against unmark: a save lands only while the mark
that asked for it is still current, so a save area never holds data of an
ended mark.

Two kinds of consumer take a mark's chunks: a push copy
(:class:`~isc.copy.CopyJob`) and a pull backup confirming chunks through the
frozen export (:meth:`confirm_pulled`). A mark serves one kind only
(:meth:`claim_mark`): the first to claim it owns it, so a push copy never
sends a mark a pull has confirmed from, and a pull never confirms chunks a
push copy still has to send. Once a push copy ran, a pull confirms nothing
(its destinations did not get what it read); and what a push copy clears,
the last pull backup did not get: the pull falls out of step
(:attr:`Session.pull_epoch`) and needs a full mark.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from isc._core import DeltaBitmap
from isc._layout import DEFAULT_GRANULARITY
from isc.errors import ParameterError, RangeError, SaveAreaFull, StateError
from isc.lun import FileLUN, _zero_fill
from isc.savearea import SaveArea

log = logging.getLogger(__name__)

DEFAULT_SAVE_AREA = 256 << 20
"""Capacity in bytes of the in-memory save area a session makes when given none."""

SAVED_WRITE = 1 << 20
"""The most bytes of saved chunks :meth:`Session.copy_frozen_to` writes in one call."""


class State(enum.Enum):
    """The state of a session."""

    UNMARKED = "unmarked"
    MARKED = "marked"


@dataclass(frozen=True)
class SessionStats:
    """A snapshot of a session's counters.

    ``host_writes`` is ``DeltaBitmap.writes``: host writes plus the ranges
    tracked again after a failed copy or a rollback (rare, and few).
    """

    host_writes: int
    cofw_chunks: int
    cofw_bytes: int
    save_area_used: int
    save_area_high_water: int
    generation: int
    aborts: int
    last_abort: str | None


class Session:
    """An incremental session on ``source`` (any object with the LUN interface).

    ``granularity`` is the chunk size in bytes (a power of two from 2048 to
    65536). ``save_area`` holds COFW data; by default an in-memory
    :class:`SaveArea` of ``min(source.size, 256 MiB)`` bytes. ``bitmap``
    resumes from an existing delta bitmap (e.g. a persistent session's).
    Raises ``TypeError`` for a ``source`` without the LUN interface (see
    :mod:`isc.lun`), such as a path.

    A session is a context manager: leaving the block closes it
    (:meth:`close`); the source stays open, it is the caller's.
    """

    def __init__(
        self,
        source,
        granularity: int = DEFAULT_GRANULARITY,
        save_area: SaveArea | None = None,
        *,
        name: str = "session",
        bitmap: DeltaBitmap | None = None,
    ) -> None:
        if not all(hasattr(source, member) for member in ("size", "readinto", "write")):
            kind = type(source).__name__
            raise TypeError(f"source must be a LUN (e.g. FileLUN(path)), got {kind} {source!r}")
        self.source = source
        self.name = name
        if bitmap is not None and (bitmap.size, bitmap.granularity) != (source.size, granularity):
            raise ParameterError(
                f"the bitmap tracks a {bitmap.size}-byte LUN at {bitmap.granularity}, "
                f"the source is {source.size} bytes at {granularity}"
            )
        self.bitmap = bitmap or DeltaBitmap(source.size, granularity)
        self.granularity = self.bitmap.granularity
        self.save_area = save_area or SaveArea(min(source.size, DEFAULT_SAVE_AREA))
        self._save_lock = threading.Lock()
        self._mark_lock = threading.Lock()
        self.update_lock = threading.Lock()
        """Held by the update workflows (isc.update): one update at a time (rule 7)."""
        self.copy_lock = threading.Lock()
        """Held by a running copy job (isc.copy): one copy at a time, since each clears
        the chunks it sent, which the destinations of another copy may lack."""
        self._marks_held_by: str | None = None
        self._closed = False
        self._cofw_chunks = 0
        self._cofw_bytes = 0
        self._aborts = 0
        self.epoch = 0
        """Counts copies that cleared bits. A destination that took part in the
        latest one (its ``epoch`` equals this) is *in step*: every chunk where
        it may differ from the source is in the tracking or transfer bitmap. One
        that missed a copy lacks chunks the bitmaps no longer hold."""
        self._aborted: tuple[int, str] | None = None  # the generation of the last abort, and why
        self.pull_epoch: int | None = 0
        """The :attr:`epoch` at which a pull backup was last in step (None: never, as
        after a recovery that lost the bitmaps). While it equals
        ``epoch`` every chunk where the last pull backup may differ from the source
        is in the tracking or transfer bitmap, so a pull may take an incremental
        mark; a push copy moves ``epoch`` on and a pull then needs a full mark."""
        self._owner: tuple[int, str] | None = None  # (generation, consumer) of the mark's claim
        self._full_generation = 0  # the generation of the last full mark
        # The host write path is the hot path: bind it straight to the core so
        # a write costs one C-level call, no Python frame (same behaviour as
        # the ``write`` method below, which documents it).
        # A file source with an in-memory save area saves in the core too;
        # every case but a plain success falls back to ``_save``.
        self._file_save = (
            self.save_area.file_save(self.bitmap, source, self._save_lock, self._save)
            if type(source) is FileLUN
            else None
        )
        self.write = functools.partial(  # type: ignore[method-assign]
            self.bitmap.write_through, source.write, self._file_save or self._save
        )
        self._write_saved = self.save_area.saved_write(self.granularity, SAVED_WRITE)

    # -- state -----------------------------------------------------------------
    @property
    def state(self) -> State:
        """``State.MARKED`` between a mark and its unmark, else ``State.UNMARKED``."""
        return State.MARKED if self.bitmap.marked else State.UNMARKED

    @property
    def generation(self) -> int:
        """Number of marks so far."""
        return self.bitmap.generation

    def mark(self, full: bool = False) -> int:
        """Freeze the point in time to copy; return the new generation.

        Waits for host writes in flight to finish; writes arriving meanwhile
        wait for the mark. ``full=True`` puts every chunk in the transfer
        bitmap (a marked full copy). Raises ``StateError`` when marked.
        """
        with self._mark_lock:
            if self.mark_blocker:
                raise StateError(self.mark_blocker)
            self.bitmap.mark(full)
            if full:
                self._full_generation = self.bitmap.generation
        log.info("%s: marked (generation %d, full=%s)", self.name, self.generation, full)
        return self.generation

    @property
    def mark_blocker(self) -> str | None:
        """Why ``mark`` would raise ``StateError`` now, or None if it would not."""
        if self._closed:
            return f"{self.name} is closed; open a new session to mark"
        if self.bitmap.marked:
            return f"{self.name} is already marked (generation {self.generation})"
        if self._marks_held_by:
            return f"{self.name} cannot be marked now: {self._marks_held_by}"
        return None

    @contextmanager
    def marks_held(self, reason: str) -> Iterator[None]:
        """Keep the session unmarked for the block: ``mark`` raises ``StateError``.

        The unmarked full copy holds marks while it runs (a mark would turn
        its half-cleared tracking bitmap into a transfer bitmap). Raises
        ``StateError`` when the session is marked or marks are already held.
        """
        with self._mark_lock:
            if self.mark_blocker:
                raise StateError(f"{self.mark_blocker}; {reason} needs it unmarked")
            self._marks_held_by = reason
        try:
            yield
        finally:
            self._marks_held_by = None

    def unmark(self) -> int:
        """End the mark: unsent chunks go back to tracking, the save area empties.

        Returns how many unsent chunks went back to tracking. Unmarking an
        unmarked session is a no-op that returns 0, as ``DeltaBitmap.unmark``
        and the control socket's ``unmark`` are (so a caller can unmark to
        be sure, without asking first).
        """
        with self._save_lock:
            if not self.bitmap.marked:
                return 0
            unsent = self.bitmap.transfer_count
            self._unmark_locked()
        log.info("%s: unmarked (generation %d)", self.name, self.generation)
        return unsent

    def _unmark_locked(self) -> None:
        self.bitmap.unmark()
        self.save_area.clear()

    # -- the host write path -------------------------------------------------------
    def write(self, offset: int, data) -> None:
        """Write ``data`` (bytes-like) to the source at ``offset``, tracking it.

        While marked, the old data of chunks that still have to be sent is
        saved first (COFW). Never fails because of replication trouble: a full
        save area aborts the mark instead. Raises ``RangeError`` (a
        ValueError) for a range outside the source, before anything changes.
        """
        self.bitmap.write_through(self.source.write, self._save, offset, data)

    def write_zeroes(self, offset: int, length: int, hole: bool = True) -> None:
        """One host write of zeros over ``[offset, offset + length)``, however long: tracked
        and COFW-protected as :meth:`write`, and wholly before or after a mark (rule 4: a
        mark waits for it). It punches a hole in the source if ``hole`` and the source can
        (``write_zeroes``), else writes zeros, :data:`isc.lun.ZERO_PIECE` bytes a call.

        One exception: while marked, a zeroing of more chunks than both the save area
        holds and the mark has left to send (which would abort the mark anyway) is a host
        write per save area's worth, so the array of a write's COFW chunks (8 bytes a
        chunk) stays bounded. Raises ``RangeError`` outside the source, before anything
        changes, and the source's errors.
        """
        size, g = self.source.size, self.granularity
        if offset < 0 or length < 0 or offset + length > size:
            raise RangeError(
                f"zeroes over [{offset}, {offset + length}) are outside the source [0, {size})"
            )
        step = max(length, 1)
        room = max(1, self.save_area.capacity // g)
        if self.bitmap.marked and min(length // g + 2, self.bitmap.transfer_count) > room:
            step = room * g
        for at in range(offset, offset + length, step):
            self._zero(at, min(step, offset + length - at), hole)

    def _zero(self, offset: int, length: int, hole: bool) -> None:
        """One host write of zeros: :meth:`write`'s steps (the core's ``write_through``)
        with the zeroing as its write."""
        cofw = self.bitmap.begin_write(offset, length)
        try:
            if len(cofw):
                self._save(cofw)  # never raises for trouble: the mark is aborted
            if hole and callable(getattr(self.source, "write_zeroes", None)):
                self.source.write_zeroes(offset, length)
            else:
                _zero_fill(self.source.write, offset, length)
        finally:
            self.bitmap.end_write(offset, length, len(cofw) > 0)

    def _save(self, chunks: np.ndarray) -> None:
        """Copy the current data of ``chunks`` (ascending) to the save area.

        Never raises for a failure of the source read or of the save area:
        the mark is aborted instead (its chunks return to tracking, their
        saved flags go) and the host write goes on (rule 5). A chunk the copy
        job sent since the write flagged it is not stored: it no longer has
        a transfer bit, and its saved copy would hold capacity until unmark.
        """
        g = self.granularity
        size = self.source.size
        readinto = self.source.readinto
        with self._save_lock:
            if not self.bitmap.marked:
                return  # the mark was aborted meanwhile: nothing to protect
            todo = chunks.tolist()
            if len(todo) > 1:
                flagged = set(self.bitmap.saved_in(todo[0], todo[-1] + 1 - todo[0]).tolist())
                todo = [chunk for chunk in todo if chunk in flagged]
            elif not self.bitmap.is_saved(todo[0]):
                return  # sent since this write flagged it
            try:
                for chunk in todo:
                    start = chunk * g
                    length = min(g, size - start)
                    # Read straight into the save area's slot: one copy.
                    self.save_area.save_from(chunk, length, functools.partial(readinto, start))
                    self._cofw_chunks += 1
                    self._cofw_bytes += length
            except SaveAreaFull as exc:
                self._abort_locked(f"save area full: {exc}")
            except Exception as exc:
                self._abort_locked(f"COFW of chunk {chunk} failed: {exc}")

    def _abort_locked(self, reason: str) -> None:
        self._aborts += 1
        self._aborted = (self.generation, reason)
        log.warning("%s: mark %d aborted, %s", self.name, self.generation, reason)
        self._unmark_locked()

    # -- the copy side -----------------------------------------------------------------
    def abort_reason(self, generation: int) -> str | None:
        """Why mark ``generation`` was aborted, or None when it was not."""
        if self._aborted is None or self._aborted[0] != generation:
            return None
        return f"mark {generation} of {self.name} was aborted: {self._aborted[1]}"

    def mark_ended(self, generation: int) -> str | None:
        """Why mark ``generation`` is no longer current, or None while it is."""
        bitmap = self.bitmap
        if bitmap.marked and bitmap.generation == generation:
            return None
        aborted = self.abort_reason(generation)
        if aborted is not None:
            return aborted
        if bitmap.generation != generation:
            return (
                f"mark {generation} of {self.name} ended: the session is at generation "
                f"{bitmap.generation}"
            )
        return f"mark {generation} of {self.name} was ended by an unmark"

    def confirm_sent(self, first: int, count: int, generation: int) -> int:
        """Chunks ``[first, first + count)`` reached every destination: clear their
        transfer bits and drop their saved copies; return how many bits were set.

        Raises ``StateError`` saying why, changing nothing, when mark
        ``generation`` is no longer current (what was sent may not be its
        point-in-time data). Ordered against saves: a save that comes later
        finds the chunks sent and stores nothing.
        """
        with self._save_lock:
            return self._confirm_locked(first, count, generation)

    def _confirm_locked(self, first: int, count: int, generation: int) -> int:
        try:
            cleared = self.bitmap.clear_transfer(first, count, generation)
        except StateError:
            raise StateError(self.mark_ended(generation)) from None
        if self.save_area.saved_chunks:
            self.save_area.discard(first, count)
        return cleared

    def claim_mark(self, generation: int, consumer: str) -> None:
        """Make ``consumer`` (``"push copy"`` or ``"pull"``) the one kind that takes the
        chunks of mark ``generation``.

        Raises ``StateError`` saying why, changing nothing, when the other kind
        claimed it first (a mark that ended is the consumer's own check).
        """
        with self._save_lock:
            self._claim_locked(generation, consumer)

    def _claim_locked(self, generation: int, consumer: str) -> None:
        owner = self._owner
        if owner is not None and owner[0] == generation and owner[1] != consumer:
            raise StateError(
                f"mark {generation} of {self.name} is taken by a {owner[1]}: a {consumer} "
                "may not take its chunks too (each would miss what the other sent); "
                "let it end, then mark again"
            )
        self._owner = (generation, consumer)

    def pull_in_step(self, generation: int) -> str | None:
        """Why the transfer bitmap of mark ``generation`` may lack chunks a pull backup
        needs, or None when it holds every change since the last pull."""
        if self.pull_epoch == self.epoch or generation == self._full_generation:
            return None
        return (
            f"a push copy of {self.name} sent and cleared changes since the last pull "
            f"(epoch {self.epoch}, last pull at {self.pull_epoch}): the transfer bitmap of "
            f"mark {generation} lacks them; unmark and pull a full mark "
            '({"op": "mark", "full": true})'
        )

    def confirm_pulled(self, first: int, count: int, generation: int) -> int:
        """A pull backup stored chunks ``[first, first + count)`` of mark ``generation``:
        clear their transfer bits and drop their saved copies (as :meth:`confirm_sent`);
        return how many bits were set.

        Once a push copy ran (``epoch`` moved), the session's changes go to push
        destinations, which did not get them: a pull then reads the image at a
        mark but confirms nothing (a mark may outlive the process that knew
        which consumer took it, so no confirm may clear what a push copy would
        later count as sent). Raises ``StateError`` saying why, changing
        nothing, then, and when the mark ended, a push copy owns it, or the
        pull is out of step (:meth:`pull_in_step`).
        """
        with self._save_lock:
            ended = self.mark_ended(generation)
            if ended is not None:
                raise StateError(ended)
            if self.epoch:
                raise StateError(
                    f"the changes of {self.name} go to push destinations (a push copy ran): "
                    "a pull reads the image at a mark but confirms nothing; unmark, and what "
                    "it read is sent again"
                )
            self._claim_locked(generation, "pull")
            behind = self.pull_in_step(generation)
            if behind is not None:
                raise StateError(behind)
            self.pull_epoch = self.epoch
            return self._confirm_locked(first, count, generation)

    def abandon_mark(self, generation: int) -> None:
        """Unmark after a failed copy of mark ``generation``; no-op once that mark ended."""
        with self._save_lock:
            if self.mark_ended(generation) is None:
                self._unmark_locked()
                log.info("%s: unmarked (generation %d)", self.name, generation)

    def finish_mark(self, generation: int) -> None:
        """Unmark after a successful copy of mark ``generation``.

        Raises ``StateError`` saying why, changing nothing, when that mark is
        no longer current: a copy succeeds only if its own mark lasted to
        its end.
        """
        with self._save_lock:
            ended = self.mark_ended(generation)
            if ended is not None:
                raise StateError(ended)
            self._unmark_locked()
        log.info("%s: unmarked (generation %d)", self.name, generation)

    # -- reading ---------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """The source's current data."""
        return self.source.read(offset, length)

    def read_frozen(self, offset: int, length: int) -> bytes:
        """Data as it was at the mark, for every chunk still to be sent.

        Chunks whose transfer bit is set read as they were at the mark (from
        the save area if they were overwritten since, else from the source).
        Chunks already sent or never changed read as the source is now: their
        point-in-time data already lies on the destinations. Raises
        ``StateError`` when unmarked and ``RangeError`` (a ValueError) for a
        range outside the source.
        """
        size = self.source.size
        if offset < 0 or length < 0 or offset + length > size:
            raise RangeError(
                f"read [{offset}, {offset + length}) is outside the source [0, {size})"
            )
        g = self.granularity
        start = offset // g * g
        end = min(-(-(offset + length) // g) * g, size)
        buffer = bytearray(end - start)
        self.read_frozen_into(start, memoryview(buffer))
        return bytes(buffer[offset - start : offset - start + length])

    def read_frozen_into(self, offset: int, buffer: memoryview) -> None:
        """``read_frozen`` of whole chunks into a writable buffer.

        ``offset`` must be a multiple of the granularity and the buffer must
        end on a chunk boundary or at the end of the source (the copy job's
        runs do). Raises ``StateError`` when unmarked.
        """
        self._check_frozen(offset, "read")
        self.source.readinto(offset, buffer)
        g = self.granularity
        for chunk in self._saved_in(offset, len(buffer)):
            start = chunk * g - offset
            self.save_area.readinto(chunk, buffer[start : min(start + g, len(buffer))])

    def copy_frozen_to(self, offset: int, length: int, dest) -> bool:
        """Write ``read_frozen`` of whole chunks straight to the same range of ``dest``.

        Uses the source's ``copy_to`` (see :mod:`isc.lun`), so the data does
        not pass through this process, then writes the saved chunks of the
        range over it. Returns False, having written nothing, when the source
        cannot copy to ``dest``. The range obeys :meth:`read_frozen_into`'s
        rules. Raises ``StateError`` when unmarked.
        """
        self._check_frozen(offset, "copy")
        copy_to = getattr(self.source, "copy_to", None)
        if copy_to is None or not copy_to(offset, length, dest):
            return False
        g = self.granularity
        end = offset + length
        chunks = self._saved_in(offset, length)
        if not chunks:
            return True
        # The core writes them with the interpreter lock released: a thread
        # taking it back for every chunk made the threads serving the host's
        # writes wait for its switch interval. It stops at anything but a plain
        # success, and the loop below writes the rest, meeting any error.
        chunks = chunks[self._write_saved(chunks, end, dest) :]
        # Saved chunks that follow each other go to ``dest`` in one write, up
        # to the buffer's size: each system call hands the interpreter lock to
        # the threads serving the host's writes and takes it back.
        buffer = memoryview(bytearray(min(len(chunks) * g, SAVED_WRITE)))
        start = filled = 0  # where the chunks gathered in the buffer go, their bytes
        for chunk in chunks:
            at = chunk * g
            if filled and (at != start + filled or filled == len(buffer)):
                dest.write(start, buffer[:filled])
                filled = 0
            # A chunk flagged but not stored yet is not overwritten yet either:
            # the copy holds its old data.
            if self.save_area.readinto(chunk, buffer[filled : filled + min(g, end - at)]):
                start = start if filled else at
                filled += min(g, end - at)
        if filled:
            dest.write(start, buffer[:filled])
        return True

    def _check_frozen(self, offset: int, what: str) -> None:
        if not self.bitmap.marked:
            raise StateError(
                f"{self.name} is unmarked: there is no point in time to {what}; mark it first"
            )
        if offset % self.granularity:
            raise ValueError(
                f"offset {offset} is not a multiple of the granularity {self.granularity}"
            )

    def _saved_in(self, offset: int, length: int) -> list[int]:
        """The chunks of ``[offset, offset + length)`` saved since the mark.

        Call it after reading or copying the source's data of the range: a
        chunk that read may have caught mid-overwrite was flagged saved
        before that write began, and its saved copy was stored before it
        began too.
        """
        if not (self.bitmap.saved_count and length):
            return []
        g = self.granularity
        return self.bitmap.saved_in(offset // g, (length + g - 1) // g).tolist()

    # -- life cycle --------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """End the session: unmark (unsent chunks go back to tracking), close the save area.

        Later marks raise ``StateError``; host writes still reach the source
        and are tracked. The source is left open: it is the caller's.
        Idempotent.
        """
        with self._mark_lock:
            self._closed = True
        self.unmark()
        self.save_area.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reporting ---------------------------------------------------------------------
    @property
    def stats(self) -> SessionStats:
        """Counters since the session was created."""
        fast = self._file_save
        return SessionStats(
            host_writes=self.bitmap.writes,
            cofw_chunks=self._cofw_chunks + (fast.chunks if fast else 0),
            cofw_bytes=self._cofw_bytes + (fast.nbytes if fast else 0),
            save_area_used=self.save_area.used,
            save_area_high_water=self.save_area.high_water,
            generation=self.generation,
            aborts=self._aborts,
            last_abort=self._aborted[1] if self._aborted else None,
        )

    def __repr__(self) -> str:
        return f"Session({self.name!r}, {self.state.value}, {self.bitmap!r})"
