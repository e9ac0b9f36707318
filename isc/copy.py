"""The copy job: sends a session's source to its destinations.

Three kinds of copy (MISSION.md, "The states and what each operation does"):

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

Failure (a destination write raises, the mark is aborted, ``cancel()``):
the session unmarks, so every chunk not confirmed on every destination is back
in the tracking bitmap (rule 2); destinations written by this copy become
INCONSISTENT; ``CopyError`` is raised carrying the :class:`CopyResult`. At most
the run in flight was sent in vain.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from isc.errors import CopyError, ParameterError, StateError
from isc.session import Session

log = logging.getLogger(__name__)

DEFAULT_IO_SIZE = 1 << 20
"""Bytes per read and per destination write; runs of chunks are coalesced up to it."""


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

    def __init__(self, lun, name: str | None = None, state: DestState = DestState.NEW) -> None:
        self.lun = lun
        self.name = name or f"destination-{id(self):x}"
        self.state = state

    def __repr__(self) -> str:
        return f"Destination({self.name!r}, {self.state.value})"


@dataclass
class CopyResult:
    """What a copy job did. ``outcomes`` maps destination name to "ok" or the error."""

    mode: str
    bytes_total: int = 0
    bytes_sent: int = 0
    chunks_sent: int = 0
    extents: int = 0
    seconds: float = 0.0
    cofw_chunks: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)


class CopyCancelled(Exception):
    """Raised inside the copy loop by ``cancel()``; surfaces as ``CopyError``."""


class CopyJob:
    """Copies ``session``'s source to ``destinations``.

    ``throttle`` caps the copy at that many bytes per second (None: no cap).
    ``progress(done_bytes, total_bytes)`` is called after each run is sent.
    ``io_size`` is the largest read and write in bytes, a multiple of the
    session's granularity. Raises ``ParameterError`` for bad arguments.
    """

    def __init__(
        self,
        session: Session,
        destinations: Sequence[Destination],
        *,
        throttle: float | None = None,
        progress: Callable[[int, int], object] | None = None,
        io_size: int = DEFAULT_IO_SIZE,
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
        if throttle is not None and throttle <= 0:
            raise ParameterError(f"throttle must be > 0 bytes per second, got {throttle}")
        self.session = session
        self.destinations = list(destinations)
        self.throttle = throttle
        self.progress = progress
        self.io_size = io_size
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop the running copy after the run in flight; it fails with ``CopyError``."""
        self._cancel.set()

    # -- the three copies ----------------------------------------------------------
    def incremental(self) -> CopyResult:
        """Send the marked session's transfer bitmap; unmark and make destinations CONSISTENT.

        A NEW destination needs every chunk, which only a full mark protects:
        the session is unmarked (nothing is lost) and a marked full copy runs.
        Raises ``StateError`` when the session is unmarked.
        """
        if not self.session.bitmap.marked:
            raise StateError(
                f"{self.session.name} is unmarked: an incremental copy sends a marked "
                "point in time; mark the session first"
            )
        if any(d.state is DestState.NEW for d in self.destinations):
            log.info("%s: a destination is new, copying everything", self.session.name)
            self.session.unmark()
            return self.full(marked=True)
        return self._marked_copy("incremental")

    def full(self, marked: bool = True) -> CopyResult:
        """Copy the whole source: marked (ends CONSISTENT) or unmarked (ends INCONSISTENT).

        Raises ``StateError`` when the session is marked.
        """
        if self.session.bitmap.marked:
            raise StateError(
                f"{self.session.name} is marked (generation {self.session.generation}): "
                "a full copy starts unmarked; finish or unmark the current copy first"
            )
        if marked:
            self.session.mark(full=True)
            return self._marked_copy("full")
        return self._unmarked_full_copy()

    # -- marked copies -------------------------------------------------------------
    def _marked_copy(self, mode: str) -> CopyResult:
        session = self.session
        bitmap = session.bitmap
        g = session.granularity
        size = session.source.size
        generation = bitmap.generation
        runs = bitmap.extents(self.io_size // g)
        starts = runs[:, 0] * g
        ends = np.minimum((runs[:, 0] + runs[:, 1]) * g, size)
        result = CopyResult(mode, bytes_total=int((ends - starts).sum()))
        cofw_before = session.stats.cofw_chunks
        buffer = memoryview(bytearray(self.io_size))

        def send_runs() -> None:
            for (first, count), start, end in zip(
                runs.tolist(), starts.tolist(), ends.tolist(), strict=True
            ):
                view = buffer[: end - start]
                session.read_frozen_into(start, view)
                self._send(start, view, result)
                # Clear only if the mark is still ours: an abort in between
                # means the data just sent may not be the point-in-time data.
                bitmap.clear_transfer(first, count, generation)
                if session.save_area.saved_chunks:
                    for chunk in range(first, first + count):
                        session.save_area.discard(chunk)
                result.chunks_sent += count
                self._ran(result, end - start)
            self._flush()

        self._run(result, send_runs, on_failure=session.unmark)
        session.unmark()
        result.cofw_chunks = session.stats.cofw_chunks - cofw_before
        for dest in self.destinations:
            dest.state = DestState.CONSISTENT
        return result

    # -- the unmarked full copy ----------------------------------------------------------
    def _unmarked_full_copy(self) -> CopyResult:
        session = self.session
        size = session.source.size
        result = CopyResult("full-unmarked", bytes_total=size)
        buffer = memoryview(bytearray(self.io_size))
        done = 0
        for dest in self.destinations:
            dest.state = DestState.INCONSISTENT

        def send_all() -> None:
            nonlocal done
            while done < size:
                view = buffer[: min(self.io_size, size - done)]
                session.source.readinto(done, view)
                self._send(done, view, result)
                done += len(view)
                self._ran(result, len(view))
            self._flush()

        def put_back_unsent() -> None:
            # Tracking was cleared when the copy began: what was not sent goes back.
            session.bitmap.record_write(done, size - done)

        with session.marks_held("an unmarked full copy is running"):
            session.bitmap.clear_tracking()
            self._run(result, send_all, on_failure=put_back_unsent)
        return result

    # -- shared steps ------------------------------------------------------------------
    def _send(self, offset: int, data: memoryview, result: CopyResult) -> None:
        """Write one run to every destination; mark each destination touched."""
        for dest in self.destinations:
            try:
                dest.lun.write(offset, data)
            except Exception as exc:
                result.outcomes[dest.name] = f"failed: {exc}"
                raise
            if dest.state is not DestState.INCONSISTENT:
                dest.state = DestState.INCONSISTENT

    def _ran(self, result: CopyResult, nbytes: int) -> None:
        result.bytes_sent += nbytes
        result.extents += 1
        if self.progress is not None:
            self.progress(result.bytes_sent, result.bytes_total)
        if self.throttle is not None:
            ahead = result.bytes_sent / self.throttle - (time.monotonic() - self._started)
            if ahead > 0:
                self._cancel.wait(ahead)
        if self._cancel.is_set():
            raise CopyCancelled(f"the copy of {self.session.name} was cancelled")

    def _run(self, result: CopyResult, body: Callable[[], None], on_failure) -> None:
        """Run ``body``; on any failure restore rule 2 and raise ``CopyError``."""
        self._cancel.clear()
        self._started = time.monotonic()
        try:
            body()
        except BaseException as exc:
            on_failure()
            result.seconds = time.monotonic() - self._started
            for dest in self.destinations:
                result.outcomes.setdefault(dest.name, "interrupted")
            reason = self.session.stats.last_abort if isinstance(exc, StateError) else None
            message = f"{result.mode} copy of {self.session.name} failed: {exc}"
            if reason:
                message += f" ({reason})"
            log.error("%s", message)
            if isinstance(exc, Exception):
                raise CopyError(message, result) from exc
            raise
        result.seconds = time.monotonic() - self._started
        for dest in self.destinations:
            result.outcomes[dest.name] = "ok"

    def _flush(self) -> None:
        for dest in self.destinations:
            dest.lun.flush()
