"""LUNs: the volumes a session tracks and the copy job writes to.

The LUN interface
-----------------
Any object with these members can be a session's source or a destination; the
session and the copy job depend on nothing else (see :class:`LUN`).

``size``
    The LUN size in bytes, fixed for the life of the object.
``read(offset, length) -> bytes``
    The ``length`` bytes at ``[offset, offset + length)``.
``readinto(offset, buffer) -> None``
    Fills the whole writable ``buffer`` (a bytearray, a memoryview slice, a
    numpy array ...) with the bytes at ``[offset, offset + nbytes(buffer))``.
    This is the zero-copy path of the copy job: no intermediate bytes object.
``write(offset, data) -> None``
    Writes all of the bytes-like ``data`` at ``offset``.
``flush() -> None``
    Makes completed writes durable (``fsync`` for a file or block device).
``close() -> None`` and ``closed``
    Releases the LUN; ``close`` is idempotent. LUNs are context managers.

A LUN may also offer ``copies_to(dest) -> bool`` and ``copy_to(offset,
length, dest) -> bool``: a copy of a range to the same range of another LUN
that does not pass through the process (:meth:`FileLUN.copy_to`); the copy
job uses it where it can. And ``problem``: why the LUN cannot be reached
now, or None (:class:`ReconnectingLUN`; wrappers pass it through).

Sparse LUNs (thin volumes, sparse files) may offer two more:

``data_extents(offset, length) -> list[tuple[int, int]]``
    The ``(offset, length)`` ranges of ``[offset, offset + length)`` that may
    hold data, ascending and disjoint; the rest is a hole and reads as zeros.
    One without it is all data. :meth:`FileLUN.data_extents` asks the file
    system (``SEEK_DATA``/``SEEK_HOLE``).
``write_zeroes(offset, length) -> None``
    Makes the range read as zeros, freeing its storage where it can
    (:meth:`FileLUN.write_zeroes` punches a hole, ``NBDLUN`` sends
    ``NBD_CMD_WRITE_ZEROES``). :func:`write_zeroes` falls back to writing
    zeros for a LUN without it. A wrapper that routes writes elsewhere
    (:class:`ForwardingLUN`) must route this too, or not offer it.

The copy job's full copies send the holes of a source with ``data_extents``
as ``write_zeroes``, so a destination ends as sparse as its source.

Offsets and lengths are in bytes and ranges are half-open. I/O outside
``[0, size)`` (``offset < 0``, ``length < 0`` or ``offset + length > size``)
raises :class:`~isc.errors.RangeError` (a ValueError) and transfers nothing;
I/O on a closed LUN raises :class:`~isc.errors.StateError`. Each call moves
its whole range in one operation, however large: never a Python loop per
chunk. Reads and writes of different ranges may run concurrently from any
number of threads; ``close`` must not race with I/O on the same LUN.

Two implementations live here: :class:`MemoryLUN` (a bytearray) and
:class:`FileLUN` (a regular file or a block device such as a loop device);
and :class:`ReconnectingLUN`, a LUN that may be out of reach (a remote
export) opened again on demand.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import fcntl
import functools
import operator
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeAlias, TypeVar, runtime_checkable

from isc.errors import ParameterError, RangeError, StateError

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What ``write`` accepts and ``readinto`` fills: any C-contiguous buffer, not only these."""


@runtime_checkable
class LUN(Protocol):
    """The LUN interface (see the module docstring); for type hints and ``isinstance``."""

    @property
    def size(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, offset: int, buffer: BytesLike) -> None: ...

    def write(self, offset: int, data: BytesLike) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _byte_view(data: object) -> memoryview:
    # A flat unsigned-byte view, so that lengths count bytes and slice
    # assignment accepts any C-contiguous buffer whatever its item format.
    return memoryview(data).cast("B")  # type: ignore[arg-type]


def _check_size(size: int) -> int:
    if isinstance(size, bool):
        raise TypeError("LUN size must be an integer, not bool")
    size = operator.index(size)
    if size <= 0:
        raise ParameterError(f"LUN size must be > 0 bytes, got {size}")
    return size


_L = TypeVar("_L", bound="_Closing")
_T = TypeVar("_T")

_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})
"""``copy_file_range`` errors that mean "not between these files": copy through a buffer."""

_NO_PUNCH = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})
"""``fallocate`` errors that mean "no hole punching here" (a file system without it,
a block device that cannot, a range a device will not take): write zeros instead."""

_NO_SEEK_DATA = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})
"""``lseek(SEEK_DATA)`` errors that mean "holes unknown here": all of it is data."""

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

ZERO_PIECE = 1 << 20
"""Bytes per write when zeros are written as data (:func:`write_zeroes`)."""

COPY_PIECE = 2 << 20
"""Bytes per ``copy_file_range`` call of :meth:`FileLUN.copy_to`, which yields its CPU
(``sched_yield``) between pieces. A kernel that does not preempt itself
(``PREEMPT_NONE``) lets a thread woken on the CPU of a long copy wait for the copy's
end or the next tick (4 ms at HZ 250); a thread serving the host's writes waits for
at most one piece instead: 2 MiB took 0.5-0.7 ms on tmpfs (64 MiB: 18-19 ms)."""


@functools.cache
def _zeros() -> memoryview:
    # calloc'd and never written: its pages stay unallocated until read.
    return memoryview(bytes(ZERO_PIECE))


def _zero_fill(write: Callable[[int, memoryview], object], offset: int, length: int) -> None:
    """``write`` zeros over ``[offset, offset + length)``, :data:`ZERO_PIECE` bytes a call."""
    zeros = _zeros()
    for at in range(offset, offset + length, ZERO_PIECE):
        write(at, zeros[: min(ZERO_PIECE, offset + length - at)])


def write_zeroes(lun: LUN, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` of ``lun`` read as zeros.

    ``lun.write_zeroes`` where it has one (it may free the storage), else
    ``lun.write`` of zeros. Raises as they do.
    """
    own = getattr(lun, "write_zeroes", None)
    if own is not None:
        own(offset, length)
    else:
        _zero_fill(lun.write, offset, length)


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate`` (64-bit offsets), or None where the C library has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call


_fallocate = _load_fallocate()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)``: free the blocks of the range; it reads as
    zeros, the size stays. ``OSError`` from the kernel (``EOPNOTSUPP`` without libc's)."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "the C library has no fallocate")
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class _Closing:
    """The context manager of every LUN here: the block's end closes the LUN."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _BaseLUN(_Closing, abc.ABC):
    """What both LUN kinds share: the errors and the context manager."""

    size: int

    @property
    def _label(self) -> str:
        """The LUN, as messages name it (a subclass names itself better than its repr)."""
        return repr(self)

    def _range_error(self, offset: int, length: int) -> RangeError:
        return RangeError(
            f"I/O [{offset}, {offset + length}) (length {length}) is outside {self._label} "
            f"[0, {self.size}); offsets and lengths must be >= 0 and end at or before the "
            "LUN size"
        )

    def _closed_error(self) -> StateError:
        return StateError(f"{self._label} is closed; open a new LUN to do I/O")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the LUN; later I/O raises ``StateError``. Idempotent."""


class MemoryLUN(_BaseLUN):
    """A LUN held in memory: ``size`` zero bytes in a bytearray.

    Raises ``ParameterError`` when ``size`` is not positive. Every copy is a
    single slice operation that holds the GIL, so concurrent calls on any
    ranges are safe; :meth:`close` frees the memory.
    """

    def __init__(self, size: int) -> None:
        self.size = _check_size(size)
        self._view: memoryview | None = memoryview(bytearray(self.size))

    def __repr__(self) -> str:
        state = " closed" if self._view is None else ""
        return f"<MemoryLUN size={self.size}{state}>"

    @property
    def _label(self) -> str:
        return "the memory LUN"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._view is None

    def read(self, offset: int, length: int) -> bytes:
        """Return the ``length`` bytes at ``offset``.

        Raises ``RangeError`` outside the LUN, ``StateError`` when closed.
        """
        view = self._view
        if view is None:
            raise self._closed_error()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        return view[offset : offset + length].tobytes()

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        """Fill all of the writable ``buffer`` with the bytes at ``offset``.

        Raises ``RangeError`` outside the LUN and ``StateError`` when closed,
        leaving ``buffer`` unchanged; ``TypeError`` for a read-only or
        non-contiguous buffer.
        """
        view = self._view
        if view is None:
            raise self._closed_error()
        out = _byte_view(buffer)
        length = len(out)
        if offset < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        out[:] = view[offset : offset + length]

    def write(self, offset: int, data: BytesLike) -> None:
        """Write all of ``data`` (any C-contiguous buffer) at ``offset``.

        Raises ``RangeError`` outside the LUN and ``StateError`` when closed,
        and writes nothing.
        """
        view = self._view
        if view is None:
            raise self._closed_error()
        if type(data) is not bytes and type(data) is not bytearray:
            data = _byte_view(data)
        end = offset + len(data)
        if offset < 0 or end > self.size:
            raise self._range_error(offset, len(data))
        view[offset:end] = data

    def flush(self) -> None:
        """Nothing to make durable; raises ``StateError`` when closed."""
        if self._view is None:
            raise self._closed_error()

    def close(self) -> None:
        """Free the memory; later I/O raises ``StateError``. Idempotent."""
        self._view = None


class FileLUN(_BaseLUN):
    """A LUN on an existing regular file or block device (e.g. a loop device).

    ``size`` is the file size, or for a block device its end as reported by
    ``lseek``, taken once at open. The LUN does ``pread``/``pwrite`` on one
    close-on-exec descriptor without a lock, so concurrent calls are as safe
    as the kernel makes them. A file that shrinks below ``size`` later makes
    reads past its new end raise ``OSError`` rather than return zeros.

    Raises ``FileNotFoundError``/``PermissionError`` (OSError) when ``path``
    cannot be opened, ``ParameterError`` when it is neither a regular file nor
    a block device (a FIFO is refused at once, not waited on) or is empty.
    With ``readonly=True`` the file is opened read-only and :meth:`write`
    raises ``StateError``.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        # Without blocking and without taking a terminal: a FIFO would wait for a
        # writer before the check below could refuse it.
        flags = os.O_RDONLY if readonly else os.O_RDWR
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            self._attach(fd, path, readonly)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int) -> FileLUN:
        """Create a sparse file of ``size`` bytes at ``path`` and open it as a LUN.

        Raises ``ParameterError`` when ``size`` is not positive and
        ``FileExistsError`` when ``path`` exists; in both cases nothing on
        disk changes. A failure after creating the file removes it again.
        """
        size = _check_size(size)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            os.ftruncate(fd, size)
            lun = cls.__new__(cls)
            lun._attach(fd, path, readonly=False)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return lun

    def _attach(self, fd: int, path: str | os.PathLike[str], readonly: bool) -> None:
        # Owns fd only on success; on failure the caller closes it.
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise ParameterError(
                f"{os.fspath(path)!r} is neither a regular file nor a block device; "
                "a FileLUN needs one of those"
            )
        if size <= 0:
            raise ParameterError(
                f"{os.fspath(path)!r} is empty; a LUN needs a size > 0 bytes "
                "(FileLUN.create makes a sparse file of a given size)"
            )
        self.path = os.fspath(path)
        self.size = size
        self.readonly = readonly
        self._regular = stat.S_ISREG(st.st_mode)
        self._fd = fd
        # write() checks one value for both "closed" and "read-only": -1 for either.
        self._write_fd = -1 if readonly else fd

    def __repr__(self) -> str:
        state = " closed" if self._fd < 0 else " readonly" if self.readonly else ""
        return f"<FileLUN {self.path!r} size={self.size}{state}>"

    @property
    def _label(self) -> str:
        return f"LUN file {self.path!r}"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._fd < 0

    def fileno(self) -> int:
        """The descriptor of the file opened, for ``fstat`` and locks (I/O goes through the
        LUN): the file itself, whatever its path names by now. ``StateError`` once closed."""
        fd = self._fd
        if fd < 0:
            raise self._closed_error()
        return fd

    def read(self, offset: int, length: int) -> bytes:
        """Return the ``length`` bytes at ``offset``.

        Raises ``RangeError`` outside the LUN, ``StateError`` when closed and
        ``OSError`` when the file ends before ``offset + length``.
        """
        fd = self._fd
        if fd < 0:
            raise self._closed_error()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            part = os.pread(fd, length - done, offset + done)
            if not part:
                raise self._eof_error(offset, length, done)
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        """Fill all of the writable ``buffer`` with the bytes at ``offset``.

        Raises ``RangeError`` outside the LUN and ``StateError`` when closed,
        leaving ``buffer`` unchanged; ``OSError`` when the file ends before
        the buffer is full (the buffer then holds a prefix of the data);
        ``TypeError`` for a read-only or non-contiguous buffer.
        """
        fd = self._fd
        if fd < 0:
            raise self._closed_error()
        view = memoryview(buffer)
        if view.readonly:
            raise TypeError(f"readinto needs a writable buffer, got a read-only {type(buffer)}")
        length = view.nbytes
        if offset < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        done = os.preadv(fd, [buffer], offset)
        if done != length:
            self._read_rest(fd, offset, _byte_view(buffer), done)

    def _read_rest(self, fd: int, offset: int, view: memoryview, done: int) -> None:
        # A short read: a signal, the 2 GiB per-call cap, or a file that shrank.
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                raise self._eof_error(offset, len(view), done)
            done += got

    def write(self, offset: int, data: BytesLike) -> None:
        """Write all of ``data`` (any C-contiguous buffer) at ``offset``.

        Raises ``RangeError`` outside the LUN, ``StateError`` when closed or
        read-only (both write nothing), and ``OSError`` from the kernel.
        """
        fd = self._write_fd
        if fd < 0:
            raise self._closed_error() if self._fd < 0 else self._readonly_error()
        # len() counts items, not bytes, for buffers of wider items; the byte
        # count of any buffer costs a memoryview, which bytes objects skip.
        kind = type(data)
        length = len(data) if kind is bytes or kind is bytearray else memoryview(data).nbytes
        if offset < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        done = os.pwrite(fd, data, offset)
        if done != length:
            self._write_rest(fd, offset, _byte_view(data), done)

    def _write_rest(self, fd: int, offset: int, view: memoryview, done: int) -> None:
        # A short write (signal, device limit, the 2 GiB per-call cap): go on
        # from where the kernel stopped.
        while done < len(view):
            written = os.pwrite(fd, view[done:], offset + done)
            if written == 0:
                raise OSError(
                    errno.EIO,
                    f"{self._label}: write at offset {offset + done} made no progress "
                    f"({done} of {len(view)} bytes written)",
                )
            done += written

    def copies_to(self, dest: object) -> bool:
        """Whether :meth:`copy_to` may copy to ``dest``: both are regular files."""
        return isinstance(dest, FileLUN) and self._regular and dest._regular

    def copy_to(self, offset: int, length: int, dest: object) -> bool:
        """Copy ``[offset, offset + length)`` to the same range of ``dest`` inside the kernel.

        ``copy_file_range`` in pieces of :data:`COPY_PIECE` bytes, yielding
        the CPU between them: the data never passes through this process, and
        the interpreter lock is released for each piece. Returns
        False, having copied nothing, when ``dest`` is not a regular file's
        FileLUN or the kernel cannot copy between the two files (another file
        system, ``EXDEV``); the caller then copies through a buffer. Raises
        ``RangeError`` outside either LUN, ``StateError`` when either is closed
        or ``dest`` is read-only, and ``OSError`` from the kernel (the range
        then holds an unknown mix on ``dest``).
        """
        if not self.copies_to(dest):
            return False
        assert isinstance(dest, FileLUN)
        source, target = self._fd, dest._write_fd
        if source < 0 or target < 0:
            closed = self if source < 0 else dest
            raise closed._closed_error() if closed._fd < 0 else dest._readonly_error()
        if offset < 0 or length < 0 or offset + length > min(self.size, dest.size):
            raise (self if offset + length > self.size else dest)._range_error(offset, length)
        done = 0
        while done < length:
            try:
                copied = os.copy_file_range(
                    source, target, min(length - done, COPY_PIECE), offset + done, offset + done
                )
            except OSError as exc:
                if done == 0 and exc.errno in _NO_KERNEL_COPY:
                    return False
                raise
            if copied == 0:
                raise self._eof_error(offset, length, done)
            done += copied
            if done < length:
                os.sched_yield()  # a thread woken on this CPU meanwhile goes first
        return True

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The ``(offset, length)`` ranges of ``[offset, offset + length)`` that hold data.

        Ascending and disjoint; the rest is holes, which read as zeros. Asks
        the file system with ``lseek(SEEK_DATA)`` and ``lseek(SEEK_HOLE)``: two
        system calls per range found, however large the holes. Where it
        cannot tell (a block device, a file system without holes) the whole
        range is data, as it is for a file with as many blocks allocated as
        its size: it has no holes to find, and the search costs a walk of the
        file's pages under the lock its writes take (up to 28 ms for 1 GiB on
        tmpfs, a stall of the host's writes). Raises ``RangeError`` outside
        the LUN, ``StateError`` when closed, and ``OSError`` when the file
        shrank below the range (what lies past its end is no hole).
        """
        fd = self._fd
        if fd < 0:
            raise self._closed_error()
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise self._range_error(offset, length)
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size < end:
            # Past its end a shrunk file reads as an error, not as a hole.
            raise self._eof_error(offset, length, max(0, info.st_size - offset))
        if info.st_blocks * 512 >= self.size:
            return [(offset, length)] if length else []
        extents = []
        at = offset
        while at < end:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # no data from here to the end of the file
                if exc.errno in _NO_SEEK_DATA:
                    return [(offset, length)] if length else []
                raise
            if data >= end:
                break
            at = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            extents.append((data, at - data))
        return extents

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros, freeing its blocks.

        Punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``: the size stays,
        partial blocks at the ends are zeroed), and extends a file someone cut
        short to the range's end; where the file system or device cannot
        punch, writes zeros. Raises ``RangeError`` outside the LUN,
        ``StateError`` when closed or read-only (both change nothing), and
        ``OSError`` from the kernel.
        """
        fd = self._write_fd
        if fd < 0:
            raise self._closed_error() if self._fd < 0 else self._readonly_error()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._range_error(offset, length)
        if not length:
            return
        try:
            _punch_hole(fd, offset, length)
        except OSError as exc:
            if exc.errno not in _NO_PUNCH:
                raise
            _zero_fill(self.write, offset, length)
            return
        # A punch keeps the size: a file that someone cut short would still end
        # before the range, reading as an error there, not as zeros.
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size < offset + length:
            os.ftruncate(fd, offset + length)

    def _eof_error(self, offset: int, length: int, done: int) -> OSError:
        return OSError(
            errno.EIO,
            f"{self._label}: read [{offset}, {offset + length}) hit the end of the file after "
            f"{done} bytes; the file shrank below the LUN size",
        )

    def _readonly_error(self) -> StateError:
        return StateError(
            f"{self._label} was opened read-only; open it with readonly=False to write"
        )

    def flush(self) -> None:
        """``fsync`` the file: completed writes survive a crash. ``StateError`` when closed."""
        fd = self._fd
        if fd < 0:
            raise self._closed_error()
        os.fsync(fd)

    def close(self) -> None:
        """Close the descriptor (without ``fsync``); later I/O raises ``StateError``. Idempotent."""
        fd = self._fd
        if fd >= 0:
            self._fd = self._write_fd = -1
            os.close(fd)


_LOOP_GET_STATUS64 = 0x4C05  # linux/loop.h
_LOOP_INFO64 = struct.Struct("=QQ216x")  # struct loop_info64: lo_device, lo_inode, the rest


def loop_backing(fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file under the loop device open at ``fd``, or None when
    ``fd`` is not a loop device with a file: the file its data is, under any name. Under
    a loop device over a loop device ... it is the file at the bottom: the node of the
    device beneath is not where the data is. Each level is opened by the name the kernel
    keeps for what it is over; one whose name is gone (attached through a link removed
    since: ``NAME (deleted)``) is named by its device and inode (``LOOP_GET_STATUS64``)."""
    try:
        beneath = _open_loop_status(fd)
    except ParameterError:  # what it is over is not at the name kept
        beneath = None
    if beneath is None:
        return _loop_status(fd)
    try:
        found = loop_backing(beneath)
        if found is None:  # beneath is the file
            info = os.fstat(beneath)
            found = info.st_dev, info.st_ino
    finally:
        os.close(beneath)
    return found


def _loop_status(fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what the loop device open at ``fd`` is over, one level
    down (``LOOP_GET_STATUS64``), or None when it is not a loop device with a file."""
    info = os.fstat(fd)
    if not stat.S_ISBLK(info.st_mode):
        return None
    rdev = f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    if not os.path.isdir(f"/sys/dev/block/{rdev}/loop"):
        return None  # the ioctl's number may mean something else to another driver
    status = bytearray(_LOOP_INFO64.size)
    try:
        fcntl.ioctl(fd, _LOOP_GET_STATUS64, status)
    except OSError:  # detached meanwhile
        return None
    device, inode = _LOOP_INFO64.unpack(status)
    return device, inode


_FS_IOC_GETVERSION = 0x80087601  # linux/fs.h: _IOR('v', 1, long), the inode's generation
_STATX_BTIME, _AT_EMPTY_PATH = 0x800, 0x1000
_STATX = struct.Struct("=IIQIIIHxxQQQQ16xqI4x")  # struct statx up to stx_btime
_STATX_SIZE = 256  # the whole struct statx, which the kernel fills


def _load_statx() -> Callable[[int, bytes, int, int, ctypes.Array], int] | None:
    """libc's ``statx``, or None where the C library has none (glibc before 2.28)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
    call.restype = ctypes.c_int
    return call


_statx = _load_statx()
BIRTH_KEYS = ("gen", "btime_ns")
"""What :func:`file_birth` may report: the keys :func:`same_birth` compares."""


def file_birth(fd: int) -> dict[str, int]:
    """What tells the file open at ``fd`` from a later one at the same device and inode
    (a file deleted and another created, which ext4, xfs, tmpfs give the inode number
    again): ``gen``, the inode's generation (``FS_IOC_GETVERSION``: ext4 and xfs keep
    one, tmpfs not), and ``btime_ns``, its birth time (``statx``: ext4, xfs, tmpfs).
    Each only where the file system offers it: an empty dict where it offers neither
    (then device and inode alone name the file, as before)."""
    found = {}
    generation = bytearray(8)
    with contextlib.suppress(OSError):  # ENOTTY: no generation on this file system
        fcntl.ioctl(fd, _FS_IOC_GETVERSION, generation)
        found["gen"] = struct.unpack("=q", generation)[0]
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx is not None and _statx(fd, b"", _AT_EMPTY_PATH, _STATX_BTIME, buffer) == 0:
        fields = _STATX.unpack_from(buffer)
        if fields[0] & _STATX_BTIME:
            found["btime_ns"] = fields[-2] * 1_000_000_000 + fields[-1]
    return found


def same_birth(recorded: dict, now: dict) -> bool:
    """Whether two :func:`file_birth` reports may be of one file: compared on the keys
    both hold, so a record made before (or on a file system without) them passes."""
    return all(recorded[key] == now[key] for key in BIRTH_KEYS if key in recorded and key in now)


def open_loop_backing(fd: int) -> int | None:
    """A read-only descriptor of the file under the loop device open at ``fd`` (checked by
    device and inode: the name the kernel keeps may since name another file), or None when
    ``fd`` is not a loop device with a file; under a chain of loop devices, of the file at
    its bottom (the kernel refuses cycles). ``ParameterError`` when no name reaches a file
    of the chain (:func:`_open_loop_status`): a lock needs a descriptor of the file, and
    there is none to open without a name. The loop device's own is no process's (no
    ``/proc/PID/fd``), and ``open_by_handle_at`` needs the inode's generation, which
    ``LOOP_GET_STATUS64`` does not give (ext4 alone opens an inode without it)."""
    found = _open_loop_status(fd)
    if found is None:
        return None
    try:
        deeper = open_loop_backing(found)
    except BaseException:
        os.close(found)
        raise
    if deeper is None:
        return found
    os.close(found)
    return deeper


def _open_loop_status(fd: int) -> int | None:
    """A read-only descriptor of what the loop device open at ``fd`` is over, one level
    down, or None when ``fd`` is not a loop device with a file. ``ParameterError`` when
    the name the kernel keeps for it does not open it: gone (attached through a link
    removed since: ``NAME (deleted)``), another file by now, or out of reach."""
    backing = _loop_status(fd)
    if backing is None:
        return None
    rdev = os.fstat(fd).st_rdev
    device = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    name = "?"
    try:
        with open(f"{device}/loop/backing_file") as f:
            name = f.read().rstrip("\n")
        found = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = exc.strerror
    else:
        info = os.fstat(found)
        if (info.st_dev, info.st_ino) == backing:
            return found
        os.close(found)
        why = "another file is at that name now"
    raise ParameterError(
        f"the file under the loop device /dev/{os.path.basename(os.path.realpath(device))} "
        f"cannot be opened by the name the kernel keeps for it, {name!r} ({why}): it has no "
        "name isc can lock it by; attach a loop device to a path of that file"
    )


class ForwardingLUN(_Closing):
    """The LUN interface passed through to ``lun``; subclasses change what they need.

    Wrappers that route writes elsewhere (a protection snapshot, an export
    that may be protected) derive from it and override ``write``.
    """

    def __init__(self, lun: LUN) -> None:
        self.lun = lun
        self.size = lun.size

    @property
    def closed(self) -> bool:
        return self.lun.closed

    def read(self, offset: int, length: int) -> bytes:
        return self.lun.read(offset, length)

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        self.lun.readinto(offset, buffer)

    def write(self, offset: int, data: BytesLike) -> None:
        self.lun.write(offset, data)

    def flush(self) -> None:
        self.lun.flush()

    def close(self) -> None:
        self.lun.close()

    @property
    def problem(self) -> str | None:
        """Why the LUN underneath cannot be reached now, or None."""
        return getattr(self.lun, "problem", None)

    def reconnect(self) -> None:
        """The LUN underneath's ``reconnect`` (an NBD LUN's: a new connection), if it has one."""
        reconnect = getattr(self.lun, "reconnect", None)
        if reconnect is not None:
            reconnect()


RECONNECT_BACKOFF = (1.0, 60.0)
"""Seconds a :class:`ReconnectingLUN` waits before it tries again after a failed
open: the first, doubled after each further failure up to the second."""


class ReconnectingLUN(_BaseLUN):
    """The first ``size`` bytes of the LUN ``open()`` returns, opened on demand.

    For a LUN that may be out of reach for a while, such as a destination on
    a remote NBD export: no call fails because of it before the LUN is used,
    and an outage lasts only as long as the LUN's own. The LUN is opened at
    the first I/O, and again at the first I/O after its connection broke
    (it turned ``closed`` by itself, as :class:`~isc.nbd.NBDLUN` does). After
    a failed open no other is tried for :data:`RECONNECT_BACKOFF` seconds,
    doubled at each further failure up to a cap, so a LUN that stays down is
    not hammered; I/O meanwhile fails at once.

    ``what`` names the LUN in errors (e.g. "destination d2 at nbd://..").
    ``problem`` says why it cannot be reached now (None: it could at its
    last use, or was not used yet). Raises, for I/O:

    ============================  ====================================================
    ``ConnectionError``           it cannot be opened ("... is unreachable: ...", with
                                  the time to the next try while backing off), or
                                  its connection broke during the call ("... lost
                                  its connection: ..."); the next call reconnects
    ``RangeError``                outside ``[0, size)``, before anything is tried
    ``StateError``                after :meth:`close`
    anything else                 as the LUN underneath raises it (an error the
                                  server reports ...)
    ============================  ====================================================

    A LUN smaller than ``size`` counts as unreachable. ``clock`` (seconds,
    monotonic) is for tests.
    """

    def __init__(
        self,
        open: Callable[[], LUN],
        size: int,
        what: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = _check_size(size)
        self.what = what
        self._open = open
        self._clock = clock
        self._lock = threading.Lock()  # one open at a time; guards the fields below
        self._lun: LUN | None = None
        self._closed = False
        self._problem: str | None = None
        self._failures = 0  # failed opens in a row
        self._retry_at = 0.0  # no open before this time

    def __repr__(self) -> str:
        state = " closed" if self._closed else " unreachable" if self._problem else ""
        return f"<ReconnectingLUN {self.what} size={self.size}{state}>"

    @property
    def _label(self) -> str:
        return self.what

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run (an outage does not close it)."""
        return self._closed

    @property
    def problem(self) -> str | None:
        """Why the LUN cannot be reached now, or None."""
        return self._problem

    def reach(self) -> str | None:
        """Open the LUN now if it is not open (unless backing off); return :attr:`problem`."""
        with contextlib.suppress(ConnectionError):
            self._opened()
        return self._problem

    def read(self, offset: int, length: int) -> bytes:
        self._in_range(offset, length)
        return self._use(lambda lun: lun.read(offset, length))

    def readinto(self, offset: int, buffer: BytesLike) -> None:
        self._in_range(offset, memoryview(buffer).nbytes)
        self._use(lambda lun: lun.readinto(offset, buffer))

    def write(self, offset: int, data: BytesLike) -> None:
        self._in_range(offset, memoryview(data).nbytes)
        self._use(lambda lun: lun.write(offset, data))

    def flush(self) -> None:
        self._use(lambda lun: lun.flush())

    def write_zeroes(self, offset: int, length: int) -> None:
        """:func:`write_zeroes` on the LUN underneath: an NBD export's WRITE_ZEROES
        frees its storage instead of taking zeros as data."""
        self._in_range(offset, length)
        self._use(lambda lun: write_zeroes(lun, offset, length))

    def reconnect(self) -> None:
        """Close the LUN underneath, if it is open: the next I/O opens it again, at once
        (no back-off: nothing failed), as :meth:`isc.nbd.NBDLUN.reconnect` opens a new
        connection. For a site that cuts the connections open before it protects or
        rolls back the LUN (an agent's fence, :mod:`isc.agent`): call it after the
        site's answer, while no I/O of this LUN runs."""
        with self._lock:
            lun, self._lun = self._lun, None
        if lun is not None:
            lun.close()

    def close(self) -> None:
        """Close the LUN underneath; later I/O raises ``StateError``. Idempotent."""
        with self._lock:
            self._closed = True
            lun, self._lun = self._lun, None
        if lun is not None:
            lun.close()

    def _in_range(self, offset: int, length: int) -> None:
        """``RangeError`` outside ``[0, size)``, before the LUN is opened."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._range_error(offset, length)

    def _opened(self) -> LUN:
        """The open LUN, opened now if it is not; ``ConnectionError`` when it cannot be."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            lun = self._lun
            if lun is not None and not lun.closed:
                return lun
            if lun is not None:  # its connection broke: no call of it runs any more
                self._lun = None
                lun.close()
            now = self._clock()
            if now < self._retry_at:
                raise ConnectionError(f"{self._problem} (next try in {self._retry_at - now:.1f} s)")
            try:
                lun = self._open()
            except (OSError, ParameterError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise self._unreachable(now, reason) from exc
            if lun.size < self.size:
                lun.close()
                raise self._unreachable(
                    now, f"it holds {lun.size} bytes, not the {self.size} needed"
                )
            self._lun = lun
            self._problem = None
            self._failures = 0
            self._retry_at = 0.0
            return lun

    def _unreachable(self, now: float, reason: str) -> ConnectionError:
        """Count a failed open (the caller holds the lock); the error to raise."""
        first, most = RECONNECT_BACKOFF
        self._retry_at = now + min(first * 2**self._failures, most)
        self._failures += 1
        self._problem = f"{self.what} is unreachable: {reason}"
        return ConnectionError(self._problem)

    def _use(self, call: Callable[[LUN], _T]) -> _T:
        """``call(lun)`` on the open LUN; a connection that breaks meanwhile is reopened
        at the next use."""
        lun = self._opened()
        try:
            return call(lun)
        except (OSError, StateError) as exc:
            if not lun.closed or self._closed:
                raise  # the LUN's own error: it stays open
            problem = f"{self.what} lost its connection: {getattr(exc, 'strerror', None) or exc}"
            with self._lock:
                if self._lun is lun:  # no other call has reconnected meanwhile
                    self._problem = problem
            raise ConnectionError(f"{problem}; its next use reconnects") from exc
