"""The save area: the copy-on-first-write (COFW) data area of a session.

While a session is marked, a host write that is about to overwrite a chunk
the copy job has not sent yet first stores the chunk's original contents
here; the copy job then sends that saved copy instead of the source's new
data and discards it. At unmark the session clears the whole area.

Representation: an index ``chunk -> entry`` and the store's slots
(:class:`isc._core.Slots`, which also counts ``used``). An entry is
``(offset, slot, length)``: ``length`` data bytes at ``offset`` in a
slot of ``slot >= length`` bytes of a store of ``capacity`` bytes, which is
an anonymous memory map (``path=None``) or a file (a reserved-LUN-pool
analogue). The area does not know the session's granularity, so slots are
not fixed: a freed slot goes to a free list keyed by its size; a new entry
takes a free slot of its own size, else the smallest larger one (whole, not
split, so it returns to the list of its real size), else ``[end, end +
length)`` at the end of the allocated part. Within a session all entries
have one size except the LUN's short last chunk, so at most one odd-sized
slot exists and fragmentation stays small.

Clearing the area keeps the store's pages or blocks for the next mark: the
memory stays mapped and the file at its largest size so far, within
``capacity``, until the area is closed. A COFW fills its slot straight from
the source (:meth:`SaveArea.save_from`): one copy, into memory that is
already faulted in after the first mark. For a session on a ``FileLUN`` with
an in-memory area the whole COFW runs in the core (:meth:`SaveArea.file_save`):
a ``pread`` into the slot under the same locks, with no Python frame. A
copy's saved chunks go to a destination file from the core too
(:meth:`SaveArea.saved_write`): copied out under the area's lock and written
after it, the interpreter lock released.

Invariants: ``used`` (the sum of entry lengths) never exceeds ``capacity``;
``end`` never exceeds ``capacity`` either, so a file never grows beyond it;
every byte of ``[0, end)`` lies in exactly one held or free slot. Worked
example: capacity 8 KiB, chunks of 4 KiB, chunk 9 the LUN's short last chunk
of 1 KiB::

    save 9 (1K)   bump   [0, 1K)         end 1K   used 1K
    save 0 (4K)   bump   [1K, 5K)        end 5K   used 5K
    discard 9     free {1K: [0]}                  used 4K
    save 1 (4K)   SaveAreaFull: used would be 8K, within capacity, but the
                  only free slot is 1K and end + 4K = 9K > 8K (fragmentation)
    save 9 (1K)   reuse  [0, 1K)                  used 5K

Costs: ``save``, ``get``, ``readinto`` and ``discard`` are O(1) dict
operations plus one copy of the entry (a ``pwrite``/``pread`` for a file) and
a scan over the distinct free slot sizes (one or two). ``clear`` is
O(entries). One ``threading.Lock`` guards the index and the allocator, and
the copies run under it: an entry becomes visible only once its data is written, and a slot
being read cannot be freed and reused meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import operator
import os
import stat
import threading
from collections.abc import Callable

from isc._core import DeltaBitmap, FileSave, SavedWrite, Slots
from isc._layout import MAX_GRANULARITY
from isc._units import format_bytes, size_label
from isc.errors import ParameterError, RangeError, SaveAreaFull, StateError
from isc.lun import BytesLike, FileLUN

MARK = "user.isc.save-area"
"""The extended attribute on a save area file isc created: how it knows its own leftovers."""


_Slot = tuple[int, int, int]  # (offset, slot size, data length), all in bytes

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.13: Linux's value


class _MemoryStore:
    """Entries are slots of an anonymous memory map of ``capacity`` bytes.

    The map costs no memory until a slot is first written; a page once used
    stays for the next mark (like the file's blocks) until the area is closed.
    """

    def __init__(self, capacity: int) -> None:
        # Private and not reserved: an area as large as a big LUN (a protection's)
        # costs address space only, and memory as it fills, as a dict of copies did.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        try:
            self._map = mmap.mmap(-1, capacity, flags=flags)
        except OSError as exc:  # beyond the address space (128 TiB on x86_64) or its limit
            raise ParameterError(
                f"a save area of {format_bytes(capacity, long=True)} cannot be mapped in "
                f"memory ({exc.strerror}); give a smaller one, or a file for it "
                "(isc create --save-area SIZE,PATH)"
            ) from None
        self.view = memoryview(self._map)

    def fill(self, entry: _Slot, fill: Callable[[memoryview], object]) -> None:
        offset, _, length = entry
        fill(self.view[offset : offset + length])

    def get(self, entry: _Slot) -> bytes:
        offset, _, length = entry
        return bytes(self.view[offset : offset + length])

    def read_into(self, entry: _Slot, out: memoryview) -> None:
        offset, _, length = entry
        out[:] = self.view[offset : offset + length]

    def close(self) -> None:
        self.view.release()
        self._map.close()


class _FileStore:
    """Entries are slots of a file of at most ``capacity`` bytes (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            _remove_leftover(self.path)
            fd = os.open(self.path, flags, 0o600)
        try:
            # Locked before it is marked: a marked file whose lock is free is a leftover.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(OSError):  # no user xattrs here: leftovers stay foreign
                os.setxattr(fd, MARK, b"1")
            st = os.fstat(fd)
        except BaseException:
            os.unlink(self.path)
            os.close(fd)
            raise
        self._fd = fd
        self._identity = (st.st_dev, st.st_ino)
        self._buffer = bytearray(MAX_GRANULARITY)  # a chunk on its way to the file

    def fill(self, entry: _Slot, fill: Callable[[memoryview], object]) -> None:
        offset, _, length = entry
        data = memoryview(self._buffer)[:length]
        fill(data)
        done = 0
        while done < length:
            done += os.pwrite(self._fd, data[done:], offset + done)

    def get(self, entry: _Slot) -> bytes:
        offset, _, length = entry
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise self._short_read_error(offset, length, len(data))
        return data

    def read_into(self, entry: _Slot, out: memoryview) -> None:
        offset, _, length = entry
        got = os.preadv(self._fd, [out], offset)
        if got != length:
            raise self._short_read_error(offset, length, got)

    def _short_read_error(self, offset: int, length: int, got: int) -> OSError:
        return OSError(
            errno.EIO,
            f"save area file {self.path!r} returned {got} of {length} bytes at offset "
            f"{offset}; it was truncated from outside",
        )

    def close(self) -> None:
        # Unlinked while still locked, and only if the path still names the file
        # created here: a file put there since is not isc's to remove.
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        os.close(self._fd)


def _remove_leftover(path: str) -> None:
    """Remove the save area file a killed process left at ``path``; refuse anything else.

    A leftover is a regular file that carries :data:`MARK` and whose lock
    nobody holds. Raises ``ParameterError`` for any other file (and touches
    nothing) and ``StateError`` when a live save area holds it.
    """
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return  # gone meanwhile: the caller creates its file
    fd = -1
    if stat.S_ISREG(found.st_mode):  # never open a device, a FIFO or through a symlink
        with contextlib.suppress(OSError):  # unreadable: not isc's
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if fd < 0 or not _marked(fd):
            raise ParameterError(
                f"save area path {path!r} exists and isc did not create it; give the path of "
                "a new file (isc creates its save area file itself and removes only that)"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(
                f"save area file {path!r} is in use by another isc process; give another path"
            ) from None
        opened, now = os.fstat(fd), os.lstat(path)
        if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
            os.unlink(path)
    finally:
        if fd >= 0:
            os.close(fd)


MAX_CAPACITY = (1 << 63) - 1
"""The largest save area, in bytes: a file's size and a mapping's length are signed
64-bit numbers."""


def _too_large(capacity: int) -> str | None:
    """Why no save area of ``capacity`` bytes can be made, in a file or in memory, or None."""
    if capacity <= MAX_CAPACITY:
        return None
    return (
        f"a save area of {format_bytes(capacity, long=True)} is larger than any file or "
        f"mapping can be ({MAX_CAPACITY} bytes at most); give a smaller one"
    )


def unfit(capacity: int, granularity: int, size: int) -> str | None:
    """Why a save area of ``capacity`` bytes is of no use to a session at ``granularity``
    on a LUN of ``size`` bytes, or None.

    It must hold the LUN's largest chunk (``min(granularity, size)``): a smaller one can
    save nothing, so every COFW would end the mark and every marked copy that meets a host
    write would fail. A capacity of no whole number of chunks is kept as it is: it holds
    ``capacity // granularity`` chunks, and the rest serves the LUN's short last chunk alone.
    Nor can it pass :data:`MAX_CAPACITY`.
    """
    chunk = min(granularity, size)
    if capacity >= chunk:
        return _too_large(capacity)
    return (
        f"save area of {capacity} bytes cannot hold one chunk of {chunk} bytes (granularity "
        f"{size_label(granularity)}): no copy-on-first-write save fits, so every marked copy "
        f"that meets a host write would fail; give a save area of at least "
        f"{size_label(chunk)} (isc create --save-area)"
    )


def _marked(fd: int) -> bool:
    try:
        return os.getxattr(fd, MARK) == b"1"
    except OSError:
        return False


class SaveArea:
    """A bounded store of original chunk contents, keyed by chunk index.

    ``capacity`` is in bytes and must be > 0 (else ``ParameterError``). With
    ``path=None`` the area is in memory (one it cannot map, beyond the address
    space, raises ``ParameterError``); otherwise it lives in a new file that
    it creates at ``path`` (exclusively, mode 0600, not through a symlink),
    locks (``flock``) and marks with the extended attribute :data:`MARK`. The
    file never grows beyond ``capacity`` bytes, and :meth:`close` removes it
    if ``path`` still names it. Anything already at ``path`` raises
    ``ParameterError`` and is left alone, except the marked, unlocked file of
    an area whose process died (a leftover), which is replaced; a marked file
    another area holds raises ``StateError``. On a filesystem without user
    extended attributes a leftover is not recognised: remove it by hand. All
    methods are thread-safe.

    The area does not know the granularity: a session needs one that holds its
    largest chunk, which :func:`unfit` checks (a persistent session's creation
    refuses a smaller one). One larger than :data:`MAX_CAPACITY` raises
    ``ParameterError`` before anything is made.
    """

    def __init__(self, capacity: int, path: str | os.PathLike[str] | None = None) -> None:
        if isinstance(capacity, bool):
            raise TypeError("save area capacity must be an integer number of bytes, not bool")
        capacity = operator.index(capacity)
        if capacity <= 0:
            raise ParameterError(f"save area capacity must be > 0 bytes, got {capacity}")
        if problem := _too_large(capacity):
            raise ParameterError(problem)
        self._capacity = capacity
        self._store: _MemoryStore | _FileStore = (
            _MemoryStore(capacity) if path is None else _FileStore(path)
        )
        # The blocks stay when the slots are reset: the next mark's COFW writes
        # reuse them instead of allocating again (on tmpfs a first write to a
        # block cost 3-4 times a rewrite; in memory a fresh page costs a
        # fault), as a reserved LUN pool is allocated once.
        self._slots = Slots(capacity)
        self._lock = threading.Lock()
        self._index: dict[int, _Slot] = {}
        self._closed = False

    def __repr__(self) -> str:
        where = "memory" if isinstance(self._store, _MemoryStore) else repr(self._store.path)
        state = " closed" if self._closed else ""
        return (
            f"<SaveArea {where} used={self.used}/{self._capacity} chunks={len(self._index)}{state}>"
        )

    @property
    def _label(self) -> str:
        """The save area, as messages name it."""
        if isinstance(self._store, _MemoryStore):
            return "the save area in memory"
        return f"save area {self._store.path!r}"

    # -- the COFW path ---------------------------------------------------------------
    def save(self, chunk: int, data: BytesLike) -> None:
        """Store a copy of ``data`` (1 to 65536 bytes, any bytes-like) as chunk ``chunk``.

        Raises, storing nothing and changing nothing: ``RangeError`` for a
        negative chunk index, ``ParameterError`` for an empty or larger
        ``data``, ``StateError`` when the chunk is already held (a chunk is
        saved at most once per mark) or the area is closed, ``SaveAreaFull``
        when ``used + len(data)`` would exceed ``capacity`` (or no free slot
        fits and the area is at ``capacity``), and ``OSError`` when the file
        write fails.
        """
        view = memoryview(data).cast("B")

        def copy(slot: memoryview) -> None:
            slot[:] = view

        self.save_from(chunk, len(view), copy)

    def save_from(self, chunk: int, length: int, fill: Callable[[memoryview], object]) -> None:
        """Store ``length`` bytes (1 to 65536) as chunk ``chunk``, written by ``fill(view)``
        straight into the slot (e.g. ``source.readinto``): the COFW path copies once.

        ``fill`` runs under the area's lock and must fill the whole view. The
        entry becomes visible only once ``fill`` returned (and, in a file,
        its data was written). Raises what :meth:`save` raises, and what
        ``fill`` raises, storing nothing.
        """
        chunk = self._check_chunk(chunk)
        if not 0 < length <= MAX_GRANULARITY:
            raise ParameterError(
                f"a saved chunk holds 1 to {MAX_GRANULARITY} bytes, got {length} for chunk {chunk}"
            )
        with self._lock:
            self._check_open_locked()
            if chunk in self._index:
                raise StateError(
                    f"chunk {chunk} is already in {self._label}; a chunk is saved at most once "
                    "per mark (discard it or clear the area first)"
                )
            used = self._slots.used + length
            if used > self._capacity:
                raise SaveAreaFull(
                    f"{self._label} cannot take {length} more bytes for chunk {chunk}: it would "
                    f"hold {used} of {self._capacity}; use a larger save area"
                )
            entry = self._slots.take(length)
            if entry is None:
                raise SaveAreaFull(
                    f"{self._label} has no free slot of {length} bytes for chunk {chunk} and it "
                    "is at capacity (fragmented by entries of other sizes); use a "
                    "larger save area"
                )
            try:
                self._store.fill(entry, fill)
            except BaseException:
                self._slots.free(entry)
                raise
            self._index[chunk] = entry

    def file_save(
        self, bitmap: DeltaBitmap, source: FileLUN, lock: threading.Lock, fallback: Callable
    ) -> FileSave | None:
        """The COFW save of a session on ``source`` into this area, done in the core.

        A :class:`~isc._core.FileSave`: ``pread`` from the file straight into
        a slot of this in-memory area, with no Python frame, under ``lock``
        (the session's save lock) and this area's lock; every case but a
        plain success goes to ``fallback`` (the session's Python save). It
        calls no method of this area, so a subclass's ``save_from`` is not
        used on that path. None for a file-backed area: its slots are not
        memory to read into.
        """
        if not isinstance(self._store, _MemoryStore):
            return None
        arena = self._store.view
        return FileSave(bitmap, source, lock, self._slots, self._index, arena, self._lock, fallback)

    def saved_write(self, granularity: int, limit: int) -> SavedWrite:
        """The core call that writes this area's chunks over a copy in a destination file.

        A :class:`~isc._core.SavedWrite` for chunks of ``granularity`` bytes,
        at most ``limit`` bytes per write: under this area's lock it copies
        adjacent chunks from their slots into a buffer (a file area's by
        ``pread``), then writes the buffer after the lock, the interpreter lock
        released for both, and stops at anything but a plain success. Like
        :meth:`file_save` it calls no method of this area.
        """
        store = self._store
        # A closed file area's descriptor is never used: closing empties the index.
        if isinstance(store, _MemoryStore):
            return SavedWrite(self._index, self._lock, store.view, -1, granularity, limit)
        return SavedWrite(self._index, self._lock, None, store._fd, granularity, limit)

    def get(self, chunk: int) -> bytes | None:
        """The saved contents of ``chunk``, or None when it is not held.

        Raises ``StateError`` when closed, ``OSError`` when the file read fails.
        """
        with self._lock:
            self._check_open_locked()
            entry = self._index.get(chunk)
            return None if entry is None else self._store.get(entry)

    def readinto(self, chunk: int, buffer: BytesLike) -> bool:
        """Copy the saved contents of ``chunk`` into ``buffer``; False when not held.

        ``buffer`` must be writable and exactly as long as the saved data, else
        ``ParameterError`` (``TypeError`` when read-only) and the buffer is
        unchanged. Raises ``StateError`` when closed, ``OSError`` when the
        file read fails.
        """
        out = memoryview(buffer).cast("B")
        with self._lock:
            self._check_open_locked()
            entry = self._index.get(chunk)
            if entry is None:
                return False
            length = entry[2]
            if len(out) != length:
                raise ParameterError(
                    f"buffer of {len(out)} bytes for chunk {chunk}, which holds {length}; "
                    "pass a buffer of exactly the saved length"
                )
            self._store.read_into(entry, out)
            return True

    def discard(self, chunk: int, count: int = 1) -> None:
        """Drop the saved copies of chunks ``[chunk, chunk + count)`` and free their bytes.

        No error for chunks not held. Costs O(min(count, saved chunks)) under
        one lock hold. Raises ``StateError`` when closed.
        """
        with self._lock:
            self._check_open_locked()
            index = self._index
            if count > len(index):
                held = [c for c in index if chunk <= c < chunk + count]
            else:
                held = [c for c in range(chunk, chunk + count) if c in index]
            for c in held:
                self._slots.free(index.pop(c))

    def clear(self) -> None:
        """Drop every saved copy (at unmark); ``high_water`` is kept. ``StateError`` when closed."""
        with self._lock:
            self._check_open_locked()
            self._index.clear()
            self._slots.reset()

    def __contains__(self, chunk: object) -> bool:
        return chunk in self._index

    # -- accounting ------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The most bytes the area holds (and the largest its file grows), fixed at creation."""
        return self._capacity

    @property
    def used(self) -> int:
        """Bytes of saved data held now."""
        return self._slots.used

    @property
    def high_water(self) -> int:
        """The largest ``used`` since creation or the last :meth:`reset_high_water`, in bytes."""
        return self._slots.high_water

    def reset_high_water(self) -> None:
        """Restart ``high_water`` from the current ``used``."""
        with self._lock:
            self._slots.reset_high_water()

    @property
    def saved_chunks(self) -> int:
        """Number of chunks held now."""
        return len(self._index)

    @property
    def path(self) -> str | None:
        """The file of a file-backed area, None in memory."""
        return None if isinstance(self._store, _MemoryStore) else self._store.path

    # -- life cycle ------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Drop everything and remove the file; later use raises ``StateError``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._index.clear()
            self._slots.reset()
            self._store.close()

    def __enter__(self) -> SaveArea:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _check_chunk(chunk: int) -> int:
        chunk = operator.index(chunk)
        if chunk < 0:
            raise RangeError(f"chunk index must be >= 0, got {chunk}")
        return chunk

    def _check_open_locked(self) -> None:
        if self._closed:
            raise StateError("the save area is closed; create a new one")
