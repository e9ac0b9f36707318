"""What an NBD export serves: its data, the commands it takes and its metadata contexts.

The server (:mod:`isc.nbd.server`) checks each request against the protocol
and the export's transmission flags, then calls the export here, in a
worker thread or on its event loop's thread (``inline``, ``trims_inline``).
An :class:`NBDServer` of a LUN offers one export; of a :class:`SessionLUN`, two:

================  ==========================================================================
export            what it serves
================  ==========================================================================
``NAME``          the LUN (:class:`LUNExport`). Over a :class:`SessionLUN` every WRITE,
                  WRITE_ZEROES and TRIM is a host write of the session: tracked, and
                  saved first (COFW) while the session is marked
``NAME@frozen``   only while the session is marked (:class:`FrozenExport`, pull mode):
                  the image at the mark, read as the copy job reads it
                  (:meth:`~isc.session.Session.read_frozen`); writes are refused, and a
                  TRIM means "this range is sent": the transfer bits of the whole chunks
                  in it clear and their saved data is freed, as a push copy's confirm does
================  ==========================================================================

Metadata contexts (``NBD_CMD_BLOCK_STATUS``), in context id order:

==============================  ===============================================================
``base:allocation``             ``STATE_HOLE | STATE_ZERO`` where the source is known to be a
                                hole (``data_extents``: ``SEEK_DATA``/``SEEK_HOLE`` on a
                                file), else 0 ("data", also wherever it cannot tell); on the
                                frozen export per chunk, a saved chunk counting as data
``qemu:dirty-bitmap:SESSION``   QEMU's semantics: ``STATE_DIRTY`` for every chunk set in the
                                tracking bitmap (``NAME``) or in the transfer bitmap of the
                                mark (``NAME@frozen``), 0 elsewhere; extents end on chunk
                                boundaries or at the end of the query, never past it
==============================  ===============================================================

A reply holds at most :data:`MAX_EXTENTS` extents per context; a client asks
again from where it ends. Costs: a bitmap context reads the bitmap whole
(``DeltaBitmap.to_bytes``, a copy of O(chunks) bytes) once after each change,
then O(chunks queried) per query; ``base:allocation`` costs two ``lseek`` per
data extent of a file. A frozen export connection serves the mark that was
current when it entered transmission: once that mark ends (unmark, an abort,
a new mark) its requests fail with EIO, never reading another point in time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from isc._layout import unpack
from isc.errors import StateError
from isc.lun import BytesLike, FileLUN, MemoryLUN, _BaseLUN, _zero_fill
from isc.nbd import proto
from isc.nbd.proto import TransmissionFlag

MAX_EXTENTS = 1 << 16
"""The most extents one block status reply carries per context (512 KiB of descriptors)."""

FROZEN_SUFFIX = "@frozen"
"""What the frozen export's name adds to the live export's."""

_PROBE = 256 << 20  # bytes of a LUN asked for its data extents at a time
_KNOWN = 1024  # data extents of a LUN remembered at most
_INFINITY = float("inf")
_ALLOCATION = "base:allocation"


class Unavailable(Exception):
    """The export cannot be served now; the message says why and what to do."""


class NotFast(Exception):
    """A WRITE_ZEROES with ``FAST_ZERO`` would be no faster than writing zeros."""


class MarkEnded(StateError):
    """The mark a frozen export connection serves has ended."""


# -- exporting a session ---------------------------------------------------------------------
class SessionLUN(_BaseLUN):
    """The LUN interface over a session: writes are the session's tracked host writes.

    Reads, ``readinto``, ``data_extents`` and ``flush`` go to ``session.source``;
    :meth:`write` is ``session.write`` and :meth:`write_zeroes` a host write
    too, so exporting a ``SessionLUN`` through :class:`~isc.nbd.NBDServer`
    makes every NBD WRITE, WRITE_ZEROES and TRIM a host write that sets
    tracking bits (and saves COFW data while the session is marked).
    :meth:`close` closes neither the session nor its source.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.size = session.source.size
        self._open = True

    def __repr__(self) -> str:
        state = "" if self._open else " closed"
        return f"<SessionLUN {self.session.name!r} size={self.size}{state}>"

    @property
    def _label(self) -> str:
        return f"the export of session {self.session.name!r}"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return not self._open

    def _check(self) -> None:
        if not self._open:
            raise self._closed_error()

    def read(self, offset: int, length: int) -> bytes:
        """The source's bytes at ``[offset, offset + length)``; errors as the source's."""
        self._check()
        return self.session.source.read(offset, length)

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        """Fill ``buffer`` from the source at ``offset``; errors as the source's."""
        self._check()
        self.session.source.readinto(offset, buffer)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The source's data extents (:mod:`isc.lun`); all of the range where it cannot tell."""
        self._check()
        extents = getattr(self.session.source, "data_extents", None)
        if extents is None:
            if offset < 0 or length < 0 or offset + length > self.size:
                raise self._range_error(offset, length)
            return [(offset, length)] if length else []
        return extents(offset, length)

    def write(self, offset: int, data: BytesLike) -> None:
        """A host write through the session (tracked); ``RangeError`` outside the source."""
        self._check()
        self.session.write(offset, data)

    @property
    def frees_space(self) -> bool:
        """Whether :meth:`write_zeroes` frees the source's storage (it has ``write_zeroes``)."""
        return callable(getattr(self.session.source, "write_zeroes", None))

    def write_zeroes(self, offset: int, length: int, hole: bool = True) -> None:
        """Zeros over ``[offset, offset + length)`` through the session
        (:meth:`isc.session.Session.write_zeroes`: one host write however long),
        punching a hole in the source if ``hole`` and it can.

        Raises ``RangeError`` outside the source before anything changes, and
        the source's errors.
        """
        self._check()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        self.session.write_zeroes(offset, length, hole)

    def flush(self) -> None:
        """Flush the source; ``StateError`` when this adapter is closed."""
        self._check()
        self.session.source.flush()

    def close(self) -> None:
        """Close this adapter only; later I/O raises ``StateError``. Idempotent."""
        self._open = False


def _local(lun: Any) -> bool:
    """Whether ``lun`` (a session's source, for a :class:`SessionLUN`) is a file, a device
    or memory: the server may run its small requests on the event loop's thread, where
    one over a network could hold up every client for as long as its server took."""
    if isinstance(lun, SessionLUN):
        lun = lun.session.source
    return isinstance(lun, (FileLUN, MemoryLUN))


def _frees_space(lun: Any) -> bool:
    """Whether ``lun`` zeroes a range without writing data."""
    if isinstance(lun, SessionLUN):
        return lun.frees_space
    return callable(getattr(lun, "write_zeroes", None))


# -- extents ---------------------------------------------------------------------------------
def _runs(
    bits: np.ndarray, first: int, granularity: int, offset: int, end: int, limit: int
) -> np.ndarray:
    """Extents of ``[offset, end)`` from one bit per chunk from chunk ``first`` on.

    Rows of (length, bit), one per run of equal bits, each ending on a chunk
    boundary or at ``end``; at most ``limit`` rows.
    """
    starts = np.concatenate(([0], np.flatnonzero(np.diff(bits))[:limit] + 1))
    edges = (first + starts) * granularity
    edges[0] = offset
    ends = np.append(edges[1:], end)[:limit]
    return np.column_stack((ends - edges[:limit], bits[starts[:limit]])).astype(np.uint32)


def _chunk_bits(words: np.ndarray, first: int, last: int) -> np.ndarray:
    """Bits ``[first, last)`` of little-endian uint64 ``words`` (the core's layout), as uint8."""
    raw = np.frombuffer(words, np.uint8)[first // 8 : (last + 7) // 8]
    return np.unpackbits(raw, bitorder="little")[first % 8 : first % 8 + last - first]


def _merge(extents: list[tuple[int, int]], limit: int) -> np.ndarray:
    """(length, flags) rows with neighbours of equal flags joined; at most ``limit`` rows."""
    merged: list[list[int]] = []
    for length, flags in extents:
        if merged and merged[-1][1] == flags:
            merged[-1][0] += length
        elif len(merged) == limit:
            break
        else:
            merged.append([length, flags])
    return np.array(merged, dtype=np.uint32).reshape(-1, 2)


def _allocation(
    data_extents: Callable[[int, int], list[tuple[int, int]]], offset: int, end: int, limit: int
) -> np.ndarray:
    """``base:allocation`` of ``[offset, end)`` from a LUN's ``data_extents``."""
    hole = proto.STATE_HOLE | proto.STATE_ZERO
    extents: list[tuple[int, int]] = []
    at = offset
    while at < end and len(extents) <= limit:
        stop = min(end, at + _PROBE)
        for start, length in data_extents(at, stop - at):
            if start > at:
                extents.append((start - at, hole))
            extents.append((length, 0))
            at = start + length
        if at < stop:
            extents.append((stop - at, hole))
            at = stop
    return _merge(extents, limit)


def match_contexts(contexts: tuple[str, ...], queries: list[bytes], *, listing: bool) -> list[int]:
    """The indexes of ``contexts`` that ``queries`` choose, by QEMU's rules.

    An exact name chooses its context. Listing (``NBD_OPT_LIST_META_CONTEXT``),
    no query at all chooses every context, and a namespace alone (``base:``,
    ``qemu:``) or ``qemu:dirty-bitmap:`` chooses every context in it; when
    selecting, these choose nothing. Any other query chooses nothing.
    """
    if listing and not queries:
        return list(range(len(contexts)))
    chosen: set[int] = set()
    for raw in queries:
        query = raw.decode(errors="replace")
        for index, name in enumerate(contexts):
            wildcard = query in ("base:", "qemu:", "qemu:dirty-bitmap:")
            if query == name or (listing and wildcard and name.startswith(query)):
                chosen.add(index)
    return sorted(chosen)


class _KnownData:
    """A LUN's ``data_extents``, remembering the data extents found.

    On tmpfs ``lseek(SEEK_HOLE)`` walks every page up to the next hole, so
    asking for each read of a large allocated file costs O(file) per read
    (a 1 GiB read as 256 KiB requests took 15 s instead of 1 s). Each query
    asks ahead (:data:`_PROBE` bytes) and the extents it finds are remembered
    (up to :data:`_KNOWN` of them; more are forgotten all at once); a read
    inside one asks nothing (QEMU's file driver keeps a cache of the same
    kind). Clients that read several regions at once (nbdcopy's connections)
    each find theirs: one remembered extent made them ask on nearly every
    read. Calling a range data that was since zeroed is harmless (data may
    read as zeros), so only holes the export itself makes (:meth:`forget`)
    end them.
    """

    def __init__(self, lun: Any) -> None:
        self._extents = getattr(lun, "data_extents", None)
        self._size = lun.size
        self._lock = threading.Lock()
        self._known: list[tuple[int, int]] = []  # (start, stop): sorted, disjoint

    def __call__(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The ranges of ``[offset, offset + length)`` that may hold data."""
        end = offset + length
        if self._extents is None or self._covered(offset, end):
            return [(offset, length)] if length else []
        found = self._extents(offset, max(length, min(_PROBE, self._size - offset)))
        with self._lock:
            merged = sorted(self._known + [(s, s + n) for s, n in found if n])
            known: list[tuple[int, int]] = []
            for start, stop in merged if len(merged) <= _KNOWN else []:
                if known and start <= known[-1][1]:
                    start, before = known.pop()
                    stop = max(stop, before)
                known.append((start, stop))
            self._known = known
        return [(max(s, offset), min(s + n, end) - max(s, offset)) for s, n in found if s < end]

    def _covered(self, offset: int, end: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._known, (offset, _INFINITY)) - 1
            return i >= 0 and end <= self._known[i][1]

    def uncached(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The LUN's own answer (all of the range where it has no ``data_extents``)."""
        if self._extents is None:
            return [(offset, length)] if length else []
        return self._extents(offset, length)

    def forget(self) -> None:
        """The export made a hole: ask again from now on."""
        with self._lock:
            self._known = []


class _Snapshot:
    """A delta bitmap's words, read again only once the bitmap changed.

    A host write bumps ``writes``; a mark, unmark, confirm or clear moves the
    generation, the marked flag or a count. ``get`` reads that key before the
    bitmap, so a change after the key was read also shows in the next key.
    """

    def __init__(self, bitmap: Any) -> None:
        self._bitmap = bitmap
        self._lock = threading.Lock()
        self._key: tuple[int, ...] | None = None
        self._state: Any = None

    def _now(self) -> tuple[int, ...]:
        b = self._bitmap
        return (b.generation, b.marked, b.writes, b.tracking_count, b.transfer_count, b.saved_count)

    def fresh(self) -> bool:
        """Whether :meth:`get` would answer without reading the bitmap (O(chunks)) again."""
        return self._now() == self._key

    def get(self) -> Any:
        """The bitmap's state (``isc._layout.State``: words as bytes) as of this call or later."""
        key = self._now()
        with self._lock:
            if key != self._key:
                self._state = unpack(self._bitmap.to_bytes())
                self._key = key
            return self._state


# -- the exports -------------------------------------------------------------------------------
class LUNExport:
    """A LUN as an export; over a :class:`SessionLUN`, with the tracking bitmap's context.

    ``writable`` is False for a read-only export, which advertises
    ``NBD_FLAG_READ_ONLY``. TRIM and fast zeroing are offered when the LUN
    frees space (``write_zeroes``). The export is its own per-connection view
    (:meth:`attach`): it holds no state of a client.
    """

    def __init__(self, lun: Any, name: str, readonly: bool) -> None:
        self.lun = lun
        self.name = name
        self.size = lun.size
        self.writable = not readonly
        self.inline = _local(lun)
        """Whether small requests may run on the server's event loop thread."""
        self.background = False
        """Whether its requests let other clients' ready requests go first: no, the host's."""
        self.trims_inline = False
        """Whether a TRIM may run there: never, as it writes (punching a hole, saving
        the old data of every chunk it covers while the session is marked)."""
        self._frees = _frees_space(lun)
        self._data = _KnownData(lun)
        session = lun.session if isinstance(lun, SessionLUN) else None
        self.granularity = session.granularity if session is not None else 0
        self._bitmap = _Snapshot(session.bitmap) if session is not None else None
        self.contexts: tuple[str, ...] = (_ALLOCATION,)
        """The metadata contexts it offers; context id = index + 1."""
        if session is not None:
            self.contexts += (f"qemu:dirty-bitmap:{session.name}",)

    def __repr__(self) -> str:
        return f"<LUNExport {self.name!r} of {self.lun!r}>"

    def flags(self, structured: bool) -> TransmissionFlag:
        """The transmission flags for a client; ``structured``: it has structured replies."""
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
        flags |= TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE
        if not self.writable:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES
            flags |= TransmissionFlag.SEND_FAST_ZERO
            if self._frees:
                flags |= TransmissionFlag.SEND_TRIM
        if structured:
            flags |= TransmissionFlag.SEND_DF
        return flags

    def unavailable(self) -> str | None:
        """Why a client cannot use the export now: what the LUN's own ``unavailable()``
        says where it has one (an agent's export whose file was replaced at its path,
        :meth:`isc.agent.Export.unavailable`), else never."""
        unavailable = getattr(self.lun, "unavailable", None)
        return None if unavailable is None else unavailable()

    def attach(self) -> LUNExport:
        """The view a connection serves."""
        return self

    # -- requests (in worker threads) --------------------------------------------------------
    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The ranges of ``[offset, offset + length)`` that may hold data; the rest reads zero."""
        return self._data(offset, length)

    def readinto(self, offset: int, view: memoryview) -> None:
        self.lun.readinto(offset, view)

    def write(self, offset: int, data: BytesLike) -> None:
        self.lun.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        """Zero the range: freeing space when ``may_trim`` and the LUN can, else writing
        zeros. ``fast``: raise :class:`NotFast`, changing nothing, unless it frees space."""
        if may_trim and self._frees:
            self.lun.write_zeroes(offset, length)
            self._data.forget()
        elif fast:
            raise NotFast(
                "zeroing without a hole (NO_HOLE) or on a LUN that cannot free space "
                "writes zeros: no faster than a WRITE"
            )
        elif isinstance(self.lun, SessionLUN):
            self.lun.write_zeroes(offset, length, hole=False)  # one host write (rule 4)
        else:
            _zero_fill(self.lun.write, offset, length)

    def trim(self, offset: int, length: int) -> None:
        """Free the range (it reads as zeros after)."""
        self.lun.write_zeroes(offset, length)
        self._data.forget()

    def flush(self) -> None:
        self.lun.flush()

    def status_is_cheap(self, contexts: list[int]) -> bool:
        """Whether a block status of ``contexts`` needs no new read of the bitmap whole."""
        return 1 not in contexts or self._bitmap is None or self._bitmap.fresh()

    def block_status(self, context: int, offset: int, length: int, limit: int) -> np.ndarray:
        """Context ``context``'s extents of ``[offset, offset + length)``: (length, flags) rows."""
        end = offset + length
        if context == 0:
            return _allocation(self._data.uncached, offset, end, limit)
        assert self._bitmap is not None
        g = self.granularity
        first, last = offset // g, -(-end // g)
        bits = _chunk_bits(self._bitmap.get().tracking, first, last)
        return _runs(bits, first, g, offset, end, limit)


class FrozenExport:
    """``NAME@frozen``: the image at the mark of a marked session, for pull backups.

    Each connection is served by a view bound to the mark current when it
    entered transmission (:meth:`attach`). Not writable; TRIM confirms chunks
    as sent (:meth:`~isc.session.Session.confirm_sent`). ``confirmed_chunks``
    counts the transfer bits those TRIMs cleared, ``bytes_read`` what clients
    read, over every mark.
    """

    writable = False

    def __init__(self, lun: SessionLUN, name: str) -> None:
        self.session = lun.session
        self.name = name + FROZEN_SUFFIX
        self.size = lun.size
        self.granularity = self.session.granularity
        self.contexts = (_ALLOCATION, f"qemu:dirty-bitmap:{self.session.name}")
        self.confirmed_chunks = 0
        self.bytes_read = 0
        self._bitmap = _Snapshot(self.session.bitmap)
        self._data = _KnownData(self.session.source)
        self._count = threading.Lock()

    def __repr__(self) -> str:
        return f"<FrozenExport {self.name!r}>"

    def flags(self, structured: bool) -> TransmissionFlag:
        """HAS_FLAGS, SEND_TRIM, CAN_MULTI_CONN, SEND_CACHE (and SEND_DF with structured
        replies). Not READ_ONLY, though writes are refused: clients refuse to TRIM an
        export that says it is read-only."""
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_TRIM
        flags |= TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE
        if structured:
            flags |= TransmissionFlag.SEND_DF
        return flags

    def unavailable(self) -> str | None:
        """Why a client cannot use the export now, or None while the session is marked."""
        if self.session.bitmap.marked:
            return None
        return (
            f"{self.name} is served only while session {self.session.name} is marked: "
            "mark it first (the control port's mark, or isc mark)"
        )

    def attach(self) -> _FrozenView:
        """A view of the current mark; :class:`Unavailable` when the session is unmarked."""
        bitmap = self.session.bitmap
        generation = bitmap.generation
        if not bitmap.marked:
            raise Unavailable(self.unavailable())
        return _FrozenView(self, generation)

    def _counted(self, confirmed: int = 0, read: int = 0) -> None:
        with self._count:
            self.confirmed_chunks += confirmed
            self.bytes_read += read


class _FrozenView:
    """One connection's frozen export: mark ``generation``, or errors once it ended."""

    writable = False

    def __init__(self, export: FrozenExport, generation: int) -> None:
        self.export = export
        self.generation = generation
        self.session = export.session
        self.name, self.size, self.contexts = export.name, export.size, export.contexts
        self.flags = export.flags
        self.inline = _local(self.session.source)
        self.background = True
        """A pull's requests let the host's ready requests go first (the server's
        ``_after_foreground``): a backup must not hold up the host's writes."""
        self.trims_inline = self.inline
        """A TRIM clears bits and frees saved copies in memory (O(chunks) under the save
        lock, which a host write holds while it saves): cheaper than the thread hand-off,
        which a pull client pays at each of its extents."""

    def _check(self) -> None:
        """:class:`MarkEnded` once the mark this view serves has ended."""
        reason = self.session.mark_ended(self.generation)
        if reason is not None:
            raise MarkEnded(
                f"{self.name}: {reason}; what this connection read since may not be the "
                "image at its mark: mark again and pull from a new connection"
            )

    def _data_chunks(self, first: int, last: int) -> np.ndarray:
        """One bit per chunk of ``[first, last)``: 1 unless it is known to read as zeros at
        the mark (a hole in the source now, and not saved since the mark)."""
        g, session = self.export.granularity, self.session
        data = np.zeros(last - first, np.uint8)
        end = min(last * g, self.size)
        for start, length in self.export._data(first * g, end - first * g):
            data[start // g - first : -(-(start + length) // g) - first] = 1
        if session.bitmap.saved_count:
            data[session.bitmap.saved_in(first, last - first) - first] = 1
        return data

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The ranges of ``[offset, offset + length)`` that may hold data at the mark,
        in whole chunks (clipped to the range)."""
        if not length:
            return []
        found = self.export._data(offset, length)
        if found == [(offset, length)]:
            return found  # all data now, so all data at the mark: saved chunks are data too
        g = self.export.granularity
        first, last = offset // g, -(-(offset + length) // g)
        runs = _runs(self._data_chunks(first, last), first, g, offset, offset + length, last)
        extents, at = [], offset
        for run, data in runs.tolist():
            if data:
                extents.append((at, run))
            at += run
        # Holes are told from the save area too: a mark that ended meanwhile freed it.
        self._check()
        return extents

    def readinto(self, offset: int, view: memoryview) -> None:
        """The image at the mark (``read_frozen``); :class:`MarkEnded` once it ended."""
        self._check()
        g = self.export.granularity
        start, end = offset // g * g, min(-(-(offset + len(view)) // g) * g, self.size)
        if (start, end) == (offset, offset + len(view)):
            self.session.read_frozen_into(offset, view)
        else:
            span = memoryview(bytearray(end - start))
            self.session.read_frozen_into(start, span)
            view[:] = span[offset - start : offset - start + len(view)]
        # A mark that ended during the read may have let the source change
        # under it before its saved data was laid over: refuse what was read.
        self._check()
        self.export._counted(read=len(view))

    def trim(self, offset: int, length: int) -> None:
        """The range is sent: clear the transfer bits of the whole chunks in it (the last,
        short chunk of the source counts as whole) and free their saved data."""
        g = self.export.granularity
        end = offset + length
        first = -(-offset // g)
        count = (-(-end // g) if end == self.size else end // g) - first
        if count <= 0:
            self._check()
            return
        try:
            cleared = self.session.confirm_pulled(first, count, self.generation)
        except StateError:
            self._check()
            raise
        self.export._counted(confirmed=cleared)

    def flush(self) -> None:
        self._check()

    def status_is_cheap(self, contexts: list[int]) -> bool:
        """Whether a block status of ``contexts`` needs no new read of the bitmap whole."""
        return 1 not in contexts or self.export._bitmap.fresh()

    def block_status(self, context: int, offset: int, length: int, limit: int) -> np.ndarray:
        """Context ``context``'s extents: holes at the mark, or the transfer bitmap."""
        self._check()
        g = self.export.granularity
        end = offset + length
        first, last = offset // g, -(-end // g)
        if context == 0:
            hole = proto.STATE_HOLE | proto.STATE_ZERO
            runs = _runs(self._data_chunks(first, last), first, g, offset, end, limit)
            self._check()  # as in data_extents: the saved data the holes were told from
            runs[:, 1] = np.where(runs[:, 1], 0, hole)
            return runs
        state = self.export._bitmap.get()
        if not state.marked or state.generation != self.generation:
            self._check()
        behind = self.session.pull_in_step(self.generation)
        if behind is not None:
            raise StateError(f"{self.name}: {behind}")
        return _runs(_chunk_bits(state.transfer, first, last), first, g, offset, end, limit)
