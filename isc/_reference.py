"""A pure-Python twin of :class:`isc._core.DeltaBitmap`: slow and obviously right.

Each bitmap is a Python ``set`` of chunk indices and one ``threading.Lock``
serializes every call. Tests drive this class and the Cython core with the same
operation sequences and compare them after every step; its behaviour is the
definition the core must match.

Like the core it keeps two physical tracking/transfer bitmaps whose roles
swap (``_t``), since snapshots record them that way. A snapshot's records are
the pages that differ from the image last persisted (every non-zero page for
a base); the core may add pages that changed and changed back.
"""

from __future__ import annotations

import operator
import os
import struct
import threading

import numpy as np

from isc import _layout
from isc._layout import DEFAULT_GRANULARITY, check_geometry, chunk_error, write_range_error
from isc.errors import CorruptMetadata, ParameterError, RangeError

_BITMAPS = ("tracking", "transfer", "saved")


class DeltaBitmap:
    def __init__(self, size: int, granularity: int = DEFAULT_GRANULARITY) -> None:
        self.chunks = check_geometry(size, granularity)
        self.size = int(size)
        self.granularity = int(granularity)
        self.marked = False
        self.generation = 0
        self.writes = 0
        # Physical bitmaps 0 and 1 (tracking is _t, transfer 1 - _t) and the saved flags.
        self._arrays: list[set[int]] = [set(), set(), set()]
        self._t = 0
        self._pages = _layout.pages_for(_layout.words_for(self.chunks))
        self._everything = True  # the next snapshot is a base
        self._persisted: dict[int, np.ndarray] = {}  # page images as last persisted
        self._snapshot: list[bytes] | None = None  # records not taken yet
        self._snapshot_image: dict[int, np.ndarray] = {}
        self._lock = threading.Condition()
        self._in_flight = 0
        self._marking = False
        self._frozen = False
        self._region_size = 0
        self._activity_log = None
        self._hot: set[int] = set()
        self._written: set[int] = set()
        self._write_log: memoryview | None = None
        self._saving: list[tuple[int, int]] = []

    @property
    def _tracking(self) -> set[int]:
        return self._arrays[self._t]

    @_tracking.setter
    def _tracking(self, chunks: set[int]) -> None:
        self._arrays[self._t] = chunks

    @property
    def _transfer(self) -> set[int]:
        return self._arrays[1 - self._t]

    @_transfer.setter
    def _transfer(self, chunks: set[int]) -> None:
        self._arrays[1 - self._t] = chunks

    @property
    def _saved(self) -> set[int]:
        return self._arrays[2]

    @_saved.setter
    def _saved(self, chunks: set[int]) -> None:
        self._arrays[2] = chunks

    # -- host write path -------------------------------------------------
    def record_write(self, offset: int, length: int) -> np.ndarray:
        offset, length = _int64(offset), _int64(length)
        self._check_write(offset, length)
        with self._lock:
            self.writes += 1
            return np.array(self._record_locked(offset, length), dtype=np.int64)

    def record_writes(self, offsets, lengths, cofw: bool = True) -> np.ndarray:
        offsets = np.asarray(offsets)
        lengths = np.asarray(lengths)
        if offsets.ndim != 1 or offsets.shape != lengths.shape:
            raise ValueError("offsets and lengths must be 1-D arrays of the same length")
        if offsets.size and (offsets.dtype.kind not in "iu" or lengths.dtype.kind not in "iu"):
            raise TypeError("offsets and lengths must be integer arrays")
        pairs = [(int(o), int(n)) for o, n in zip(offsets, lengths, strict=True)]
        for offset, length in pairs:
            self._check_write(offset, length)
        out: list[int] = []
        with self._lock:
            self.writes += len(pairs)
            for offset, length in pairs:
                out.extend(self._record_locked(offset, length, cofw))
        return np.array(out, dtype=np.int64)

    def begin_write(self, offset: int, length: int) -> np.ndarray:
        offset, length = _int64(offset), _int64(length)
        self._check_write(offset, length)
        span = self._span(offset, length)
        with self._lock:
            while (
                self._marking
                or self._frozen
                or any(_overlap(span, other) for other in self._saving)
            ):
                self._lock.wait()
            cofw = self._record_locked(offset, length)
            self.writes += 1
            if length and self._write_log is not None:
                self._log_write(*span)
            self._in_flight += 1
            if cofw:
                self._saving.append(span)
            regions = self._regions(offset, length)
            self._written |= regions
        if regions and not regions <= self._hot:
            try:
                self._activity_log(min(regions), max(regions))  # type: ignore[misc]
            except BaseException:
                self._unflag(cofw)
                self.end_write(offset, length, bool(cofw))
                raise
            with self._lock:
                self._hot |= regions
        return np.array(cofw, dtype=np.int64)

    def _regions(self, offset: int, length: int) -> set[int]:
        if not self._region_size or not length:
            return set()
        return set(
            range(offset // self._region_size, (offset + length - 1) // self._region_size + 1)
        )

    def write_through(self, write, save, offset: int, data) -> None:
        length = memoryview(data).nbytes
        cofw = self.begin_write(offset, length)
        try:
            if cofw.size:
                try:
                    save(cofw)
                except BaseException:
                    self._unflag(cofw)
                    raise
            write(offset, data)
        finally:
            self.end_write(offset, length, cofw.size > 0)

    def _unflag(self, cofw) -> None:
        with self._lock:
            self._saved -= {int(c) for c in cofw}

    def track_activity(self, region_size: int, log) -> None:
        region_size = _int64(region_size)
        if region_size < self.granularity or region_size & (region_size - 1):
            raise ParameterError(
                f"region size must be a power of two >= the granularity "
                f"{self.granularity}, got {region_size}"
            )
        if not callable(log):
            raise TypeError("log must be callable")
        with self._lock:
            self._region_size, self._activity_log = region_size, log
            self._hot, self._written = set(), set()

    def _log_write(self, first: int, last: int) -> None:
        log = self._write_log
        count = struct.unpack_from("<Q", log)[0]
        if 16 + 16 * (count + 1) > len(log):
            struct.pack_into("<Q", log, 8, 1)
            return
        struct.pack_into("<QQ", log, 16 + 16 * count, first, last)
        struct.pack_into("<Q", log, 0, count + 1)

    def log_writes(self, buffer) -> None:
        log = None if buffer is None else memoryview(buffer).cast("B")
        if log is not None and (len(log) < 16 or np.frombuffer(log, np.uint8).ctypes.data & 7):
            raise ParameterError("the write log needs a buffer of at least 16 bytes, aligned on 8")
        with self._lock:
            self._write_log = log

    def retire_hot(self, keep=None) -> np.ndarray:
        kept = {int(r) for r in (() if keep is None else keep)}
        nregions = -(-self.size // self._region_size) if self._region_size else 0
        outside = [r for r in sorted(kept) if not 0 <= r < nregions]
        if outside:
            raise RangeError(f"region {outside[0]} is outside the LUN's {nregions} regions")
        with self._lock:
            retired = sorted(self._hot - kept)
            self._hot &= kept
            self._written = set()
        return np.array(retired, dtype=np.int64)

    def hot_regions(self, written: bool = False) -> np.ndarray:
        with self._lock:
            regions = self._hot & self._written if written else self._hot
            return np.array(sorted(regions), dtype=np.int64)

    def keep_hot(self, regions, when, now, horizon, capacity, limit, grow):
        capacity, limit = _int64(capacity), _int64(limit)
        if len(regions) != len(when) or not 0 <= capacity <= limit:
            raise ParameterError(
                f"keep_hot needs as many times as regions and 0 <= capacity <= limit, got "
                f"{len(regions)} regions, {len(when)} times, capacity {capacity} and "
                f"limit {limit}"
            )
        written = self.hot_regions(written=True).tolist()
        fresh = set(written)
        older = [
            (int(r), float(w))
            for r, w in zip(regions, when, strict=True)
            if w > horizon and r not in fresh
        ]
        older.sort(key=lambda kept: -kept[1])
        if grow and 2 * (len(written) + len(older)) > capacity:
            capacity = min(2 * capacity, limit)
        newest = sorted(([(r, float(now)) for r in written] + older)[: capacity // 2])
        return (
            np.array([r for r, _ in newest], dtype=np.int64),
            np.array([w for _, w in newest], dtype=np.float64),
            capacity,
        )

    @property
    def hot_count(self) -> int:
        return len(self._hot)

    def end_write(self, offset: int, length: int, cofw: bool) -> None:
        span = self._span(_int64(offset), _int64(length))
        with self._lock:
            if self._in_flight == 0 or (cofw and span not in self._saving):
                raise _layout.end_write_error(offset, length)
            self._in_flight -= 1
            if cofw:
                self._saving.remove(span)
            self._lock.notify_all()

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.granularity, (offset + max(length, 1) - 1) // self.granularity

    def _check_write(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size or offset > self.size:
            raise write_range_error(offset, length, self.size)

    def _record_locked(self, offset: int, length: int, save: bool = True) -> list[int]:
        if length == 0:
            return []
        cofw = []
        for chunk in range(
            offset // self.granularity, (offset + length - 1) // self.granularity + 1
        ):
            self._tracking.add(chunk)
            if save and self.marked and chunk in self._transfer and chunk not in self._saved:
                self._saved.add(chunk)
                cofw.append(chunk)
        return cofw

    # -- states -----------------------------------------------------------
    def mark(self, full: bool = False) -> None:
        with self._lock:
            if self.marked:
                raise _layout.already_marked_error(self.generation)
            self._drain_locked()
            if self.marked:
                raise _layout.already_marked_error(self.generation)
            if full:
                self._transfer = set(range(self.chunks))
                self._tracking = set()
            else:
                self._t = 1 - self._t  # the empty transfer bitmap becomes tracking
            self.marked = True
            self.generation += 1

    def unmark(self) -> None:
        with self._lock:
            if self.marked:
                if len(self._tracking) == self.chunks:  # it is the union: it stays
                    self._transfer = set()
                else:  # tracking merges into the transfer bitmap, which becomes tracking
                    self._transfer |= self._tracking
                    self._tracking = set()
                    self._t = 1 - self._t
                self._saved = set()
                self.marked = False

    def freeze(self) -> None:
        with self._lock:
            while self._marking or self._frozen:
                self._lock.wait()
            self._frozen = True
            while self._in_flight:
                self._lock.wait()

    def thaw(self) -> None:
        with self._lock:
            self._frozen = False
            self._lock.notify_all()

    def clear_tracking(self) -> None:
        with self._lock:
            self._drain_locked()
            self._tracking = set()

    def _drain_locked(self) -> None:
        """Wait for writes in flight (begin_write) to end; new ones wait meanwhile."""
        while self._marking:
            self._lock.wait()
        self._marking = True
        while self._in_flight:
            self._lock.wait()
        self._marking = False
        self._lock.notify_all()

    # -- copy side --------------------------------------------------------
    def test_and_clear(self, chunk: int) -> bool:
        chunk = self._check_chunk(chunk)
        with self._lock:
            was_set = chunk in self._transfer
            self._transfer.discard(chunk)
            self._saved.discard(chunk)
            return was_set

    def clear_transfer(self, first: int, count: int, generation: int = -1) -> int:
        first, count, generation = _int64(first), _int64(count), _int64(generation)
        self._check_chunk_range(first, count)
        with self._lock:
            if generation >= 0 and (not self.marked or self.generation != generation):
                raise _layout.mark_ended_error(generation, self.generation, self.marked)
            span = set(range(first, first + count))
            cleared = len(self._transfer & span)
            self._transfer -= span
            self._saved -= span
            return cleared

    def saved_in(self, first: int, count: int) -> np.ndarray:
        first, count = _int64(first), _int64(count)
        self._check_chunk_range(first, count)
        with self._lock:
            inside = [c for c in sorted(self._saved) if first <= c < first + count]
        return np.array(inside, dtype=np.int64)

    def _check_chunk_range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.chunks:
            raise _layout.chunk_range_error(first, count, self.chunks)

    def extents(self, max_chunks: int = 0) -> np.ndarray:
        max_chunks = _int64(max_chunks)
        if max_chunks < 0:
            raise _layout.max_chunks_error(max_chunks)
        with self._lock:
            runs: list[list[int]] = []
            for chunk in sorted(self._transfer):
                last = runs[-1] if runs else None
                if last and last[0] + last[1] == chunk and (not max_chunks or last[1] < max_chunks):
                    last[1] += 1
                else:
                    runs.append([chunk, 1])
        return np.array(runs, dtype=np.int64).reshape(-1, 2)

    # -- queries ----------------------------------------------------------
    def tracking(self, chunk: int) -> bool:
        return self._check_chunk(chunk) in self._tracking

    def transfer(self, chunk: int) -> bool:
        return self._check_chunk(chunk) in self._transfer

    def is_saved(self, chunk: int) -> bool:
        return self._check_chunk(chunk) in self._saved

    def _check_chunk(self, chunk: int) -> int:
        chunk = _int64(chunk)
        if not 0 <= chunk < self.chunks:
            raise chunk_error(chunk, self.chunks)
        return chunk

    @property
    def tracking_count(self) -> int:
        return len(self._tracking)

    @property
    def transfer_count(self) -> int:
        return len(self._transfer)

    @property
    def saved_count(self) -> int:
        return len(self._saved)

    # -- persistence ------------------------------------------------------
    def to_bytes(self) -> bytes:
        with self._lock:
            bitmaps = (self._bits(s) for s in (self._tracking, self._transfer, self._saved))
            return _layout.pack(
                _layout.State(self.size, self.granularity, self.generation, self.marked, *bitmaps)
            )

    def _bits(self, chunks: set[int]) -> bytes:
        value = sum(1 << c for c in chunks)
        return value.to_bytes(_layout.words_for(self.chunks) * 8, "little")

    @classmethod
    def from_bytes(cls, data) -> DeltaBitmap:
        state = _layout.unpack(data)
        bitmap = cls(state.size, state.granularity)
        bitmap.generation = state.generation
        bitmap.marked = state.marked
        bitmap._tracking, bitmap._transfer, bitmap._saved = (
            _set_of(bits) for bits in (state.tracking, state.transfer, state.saved)
        )
        return bitmap

    # -- the Python protocols ---------------------------------------------
    def __len__(self) -> int:
        return self.chunks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeltaBitmap):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        return (type(self).from_bytes, (self.to_bytes(),))

    def chunks_of(self, which: str) -> np.ndarray:
        if which not in _BITMAPS:
            raise ParameterError(
                f"chunks_of takes 'tracking', 'transfer' or 'saved', got {which!r}"
            )
        with self._lock:
            chunks = getattr(self, "_" + which)
            return np.array(sorted(chunks), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"DeltaBitmap(size={self.size}, granularity={self.granularity}, "
            f"{'marked' if self.marked else 'unmarked'}, generation={self.generation}, "
            f"tracking={self.tracking_count}, transfer={self.transfer_count}, "
            f"saved={self.saved_count})"
        )

    # -- snapshots ----------------------------------------------------------
    def _image(self) -> dict[int, np.ndarray]:
        """Every page of the three physical arrays, by page id."""
        image = {}
        for array, chunks in enumerate(self._arrays):
            words = np.frombuffer(self._bits(chunks), dtype="<u8").astype(np.uint64)
            for page in range(self._pages):
                ident = array * self._pages + page
                image[ident] = words[page * _layout.PAGE_WORDS : (page + 1) * _layout.PAGE_WORDS]
        return image

    def snapshot(self, everything: bool = False) -> tuple[bool, int, bool, int]:
        with self._lock:
            if self._snapshot is not None:
                raise _layout.snapshot_open_error()
            base = bool(everything) or self._everything
            image = self._image()
            if base:
                pages = [i for i, words in image.items() if words.any()]
            else:
                pages = [i for i, w in image.items() if not np.array_equal(w, self._persisted[i])]
            self._snapshot = [
                _layout.encode_page(i, image[i], self.chunks, self._pages) for i in pages
            ]
            self._snapshot_image = image
            self._everything = False
            return base, self._t, self.marked, self.generation

    def snapshot_records(self, out) -> int:
        view = memoryview(out).cast("B")
        if len(view) < _layout.MAX_RECORD:
            raise ParameterError(
                f"a buffer for page records needs at least {_layout.MAX_RECORD} bytes, "
                f"got {len(view)}"
            )
        with self._lock:
            if self._snapshot is None:
                raise _layout.snapshot_closed_error()
            n = 0
            while self._snapshot and n + _layout.MAX_RECORD <= len(view):
                record = self._snapshot.pop(0)
                view[n : n + len(record)] = record
                n += len(record)
            return n

    def snapshot_end(self, committed: bool) -> None:
        with self._lock:
            if self._snapshot is None:
                raise _layout.snapshot_closed_error()
            if committed and self._snapshot:
                raise _layout.snapshot_unfinished_error()
            if committed:
                self._persisted = self._snapshot_image
            else:
                self._everything = True
            self._snapshot = None

    def apply_records(self, data, offset: int = 0) -> int:
        used = 0
        offset = _int64(offset)
        with self._lock:
            self._everything = True
            for ident, words, end in _layout.decode_records(data, self.chunks, offset):
                array, page = divmod(ident, self._pages)
                first = page * _layout.PAGE_WORDS * 64
                chunks = self._arrays[array]
                chunks.difference_update(range(first, min(first + len(words) * 64, self.chunks)))
                bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")
                chunks.update((first + np.flatnonzero(bits)).tolist())
                used = end
        return used

    def load_state(self, t: int, marked: bool, generation: int) -> None:
        t, generation = operator.index(t), _int64(generation)
        if t not in (0, 1) or generation < 0:
            raise ParameterError(
                f"a loaded state needs t in (0, 1) and a generation >= 0, got {t} and {generation}"
            )
        with self._lock:
            if self._snapshot is not None:
                raise _layout.snapshot_open_error()
            transfer, saved = self._arrays[1 - t], self._arrays[2]
            if not marked and (transfer or saved):
                raise CorruptMetadata(
                    "the loaded state is unmarked but has transfer or saved bits set"
                )
            if not saved <= transfer:
                raise CorruptMetadata(
                    "the loaded state has saved chunks without their transfer bit "
                    f"(word {min(saved - transfer) // 64})"
                )
            self._t, self.marked, self.generation = t, bool(marked), generation
            self._everything = False
            self._persisted = self._image()

    def _check(self) -> None:
        assert self._saved <= self._transfer, "saved chunk without transfer bit"
        assert self.marked or not self._transfer, "transfer bits while unmarked"
        assert all(0 <= c < self.chunks for c in self._tracking | self._transfer)


def _int64(value: object) -> int:
    """Convert like the core's int64_t arguments: integers only, within int64."""
    number = operator.index(value)  # type: ignore[arg-type]
    if not -(2**63) <= number < 2**63:
        raise RangeError(f"{number} is outside any LUN (it does not fit in 64 bits)")
    return number


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _set_of(bits: bytes) -> set[int]:
    flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
    return set(np.flatnonzero(flags).tolist())


class Slots:
    """The twin of :class:`isc._core.Slots`: free lists in a dict keyed by slot size."""

    def __init__(self, capacity: int) -> None:
        self._capacity = _int64(capacity)
        if self._capacity <= 0:
            raise ParameterError(f"slots need a capacity > 0 bytes, got {capacity}")
        self._end = 0
        self._free: dict[int, list[int]] = {}  # slot size -> offsets; no empty lists
        self.used = 0
        self.high_water = 0

    def take(self, length: int) -> tuple[int, int, int] | None:
        length = _int64(length)
        if length <= 0 or self.used + length > self._capacity:
            return None
        slot = min((size for size in self._free if size >= length), default=0)
        if slot:
            offsets = self._free[slot]
            offset = offsets.pop()
            if not offsets:
                del self._free[slot]
        elif self._end + length <= self._capacity:
            offset, slot = self._end, length
            self._end += length
        else:
            return None
        self.used += length
        self.high_water = max(self.high_water, self.used)
        return offset, slot, length

    def free(self, entry: tuple[int, int, int]) -> None:
        offset, slot, length = entry
        self._free.setdefault(slot, []).append(offset)
        self.used -= length

    def reset(self) -> None:
        self._free.clear()
        self._end = 0
        self.used = 0

    def reset_high_water(self) -> None:
        self.high_water = self.used


class FileSave:
    """The twin of :class:`isc._core.FileSave`: the same steps through Python calls."""

    def __init__(self, bitmap, source, lock, slots, index, arena, area_lock, fallback) -> None:
        self._bitmap = bitmap
        self._source = source
        self._lock = lock
        self._slots = slots
        self._index = index
        self._arena = arena
        self._area_lock = area_lock
        self._fallback = fallback
        self.chunks = 0
        self.nbytes = 0

    def __call__(self, chunks) -> None:
        todo = np.ascontiguousarray(chunks, dtype=np.int64)
        bitmap = self._bitmap
        g = bitmap.granularity
        i = 0
        with self._lock:
            if not bitmap.marked:
                return
            fd = self._source._fd
            with self._area_lock:
                try:
                    arena = memoryview(self._arena)
                except ValueError:  # released: the area is closed
                    arena = memoryview(b"")
                    fd = -1
                with arena:
                    while fd >= 0 and i < len(todo):
                        chunk = int(todo[i])
                        if bitmap.is_saved(chunk):
                            start = chunk * g
                            length = min(g, bitmap.size - start)
                            entry = None if chunk in self._index else self._slots.take(length)
                            if entry is None:
                                break
                            slot = arena[entry[0] : entry[0] + length]
                            if len(slot) < length or not _pread_all(fd, slot, start):
                                self._slots.free(entry)
                                break
                            self._index[chunk] = entry
                            self.chunks += 1
                            self.nbytes += length
                        i += 1
        if i < len(todo):
            self._fallback(todo[i:])


def _pread_all(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from ``offset``; False on any error or end of file."""
    done = 0
    try:
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                return False
            done += got
    except OSError:
        return False
    return True


class SavedWrite:
    """The twin of :class:`isc._core.SavedWrite`: the same steps through Python calls."""

    def __init__(self, index, area_lock, arena, fd, granularity, limit) -> None:
        if not 0 < granularity <= limit:
            raise ParameterError(
                f"a SavedWrite needs 0 < granularity <= limit, got {granularity} and {limit}"
            )
        self._index = index
        self._area_lock = area_lock
        self._arena = arena
        self._fd = fd
        self._granularity = granularity
        self._limit = limit
        self._most = limit // granularity
        self.chunks = 0
        self.nbytes = 0
        self.writes = 0

    def __call__(self, chunks, end, dest) -> int:
        todo = np.ascontiguousarray(chunks, dtype=np.int64).tolist()
        out = dest._write_fd
        i = 0
        while out >= 0 and i < len(todo):
            with self._area_lock:
                i, group, start = self._gather(todo, i, end)
            if not group or not _pwrite_all(out, b"".join(group), start):
                break
            i += len(group)
            self.chunks += len(group)
            self.nbytes += sum(map(len, group))
            self.writes += 1
        return i

    def _gather(self, todo: list[int], i: int, end: int) -> tuple[int, list[bytes], int]:
        """Past the chunks not held from ``i``: their index, the copies of the adjacent
        held chunks there (none when one cannot go) and their byte offset."""
        arena = None
        if self._arena is not None:
            try:
                arena = memoryview(self._arena)
            except ValueError:  # released: the area is closed
                return i, [], 0
        try:
            return self._copy(todo, i, end, arena)
        finally:
            if arena is not None:
                arena.release()

    def _copy(self, todo, i, end, arena) -> tuple[int, list[bytes], int]:
        g = self._granularity
        group: list[bytes] = []
        start = total = 0
        while i + len(group) < len(todo) and len(group) < self._most:
            chunk = todo[i + len(group)]
            entry = self._index.get(chunk)
            if entry is None:
                if group:
                    break
                i += 1  # flagged, not stored yet: the source's data stands
                continue
            offset, _, length = entry
            if group and (chunk * g != start + total or total + length > self._limit):
                break
            if chunk * g >= end or length != min(g, end - chunk * g):
                break
            if arena is not None:
                if offset + length > len(arena):
                    break
                group.append(bytes(arena[offset : offset + length]))
            else:
                try:
                    data = os.pread(self._fd, length, offset)
                except OSError:
                    data = b""
                if len(data) != length:
                    return i, [], 0
                group.append(data)
            start = start if total else chunk * g
            total += length
        return i, group, start


def _pwrite_all(fd: int, data: bytes, offset: int) -> bool:
    """Write all of ``data`` at ``offset``; False on any error or no progress."""
    done = 0
    try:
        while done < len(data):
            got = os.pwrite(fd, data[done:], offset + done)
            if not got:
                return False
            done += got
    except OSError:
        return False
    return True
