"""Keeping other programs from writing the source while a session holds it (rule 11).

QEMU's image locks (:class:`isc.store.SourceLock`) are advisory: a program
that takes none writes the source unseen. A :class:`WriteGuard` makes the
kernel ask before every new open of the source's file (its inode, so every
name of it: a hard link, a symlink, ``/proc/PID/fd/N``) and refuses those
for writing, with fanotify permission events, the way an on-access virus
scanner does; and at its start it refuses a source some program already has
open for writing.

=====================  =================================================
state                  what another program's open of the source gets
=====================  =================================================
guarding               read-only (no ``O_TRUNC``): allowed; for writing
                       (``O_WRONLY``, ``O_RDWR``, ``O_TRUNC``, ``creat``):
                       ``EPERM``; one whose flags the guard cannot read
                       (below): ``EPERM``
closed, or its process the kernel lets through every open, those waiting
killed                 for an answer too
unavailable            no guard (not root, a kernel without permission
                       events, a machine without a table of open system
                       calls here, no fanotify group left): the locks
                       stay advisory, and isc logs why once per process
=====================  =================================================

This process's own opens are let through: isc's (each compares the file it
opened with the source by device and inode, and refuses a destination that
is the source in its own words, where ``EPERM`` would say nothing) and the
embedding program's, which holds the session to write through.

How an open is judged: the kernel's event says which thread opens, not how
(the descriptor it hands the guard is opened with the guard's own flags), so
the guard reads the opener's system call and its arguments from
``/proc/TID/syscall`` while the kernel holds that thread in the call: the
flags of ``open``, ``openat`` and ``open_by_handle_at`` are in registers
no other thread can change. ``execve`` is allowed; everything else is
refused whatever its flags: ``openat2`` (its flags lie in the opener's
memory, which another thread may change after the kernel read them), an
open through io_uring, a 32-bit program's, a kernel thread's (``swapon``,
``acct``, nfsd); and every open, a reader's too, of a program whose
``/proc/TID/syscall`` the kernel will not show root (Yama's
``kernel.yama.ptrace_scope`` 3, or a security module that forbids it) or
that runs outside this process's PID namespace (its event names no thread:
isc in a container of its own refuses the host's readers).

At the start (:func:`guard_source`), after the marks are in place (so no
open slips between the look and the mark): a descriptor of the file open
for writing in any process (``/proc/*/fdinfo``; a block device by its
device number, under any node), a writable shared mapping of it
(``/proc/*/maps``) and a loop device over it that is not read-only make the
session refuse the source (``StateError``, one line naming the program and
the fix). The session's own LUN, opened before, is left out.

Costs: the start reads every process's descriptors and mappings (some
10 ms for 120 processes with 450 descriptors and 8000 mappings, more on a
busy machine) and starts a thread; each later open of the source by anyone
waits for that thread (one read of ``/proc``, tens of microseconds, but the
thread needs the interpreter lock: up to 10 ms measured while another
thread of this process runs Python); reads
and writes through descriptors already open, the session's host writes
among them, cost nothing; one fanotify group per held source (the kernel
allows 128 per user: ``fs.fanotify.max_user_groups``).

The responder thread answers every event at once and takes no lock: a
thread of this process that opens the source waits for it in ``os.open``,
which lets the interpreter lock go, so the two never wait for each other.
It alone closes the fanotify group; if it fails, it closes the group first
(the kernel then lets every open through) and logs that the guard stopped.
A SIGKILL of the process closes the group the same way. A child forked
without exec (``multiprocessing``'s default) closes its copies of every
guard's descriptors at once (``os.register_at_fork``): else the group lived
on in the child with no thread to answer it, and the session's close and,
after it, every open of the source waited for the child to exit; the
child's opens are judged as another program's. While the process
is stopped (SIGSTOP, a debugger) every other program's open of the source,
a reader's too, waits for it to run again.

Not closed (the source can still change unseen while a session holds it):
``truncate(2)`` by path and other calls that change a file without opening
it; a descriptor opened for writing before the session and passed on
through a Unix socket, or registered with io_uring (in no process's table);
a descriptor for writing had without an open the kernel asks about: one
taken from another process with ``pidfd_getfd(2)`` (by root, this process's
own LUN's too), or the descriptor the kernel opens for a fanotify listener
whose events' descriptors are for writing (``fanotify_init`` with
``O_RDWR``) at any open of the source, a reader's too;
at the start, a process outside this PID namespace (not in this
``/proc``); a write from another machine (a file on a network file system,
a block device other hosts reach too: iSCSI, an RBD image mapped there);
for a block
device, every open after the start where the kernel sends no permission
events for a device node (Linux 6.18 sends none: the guard finds so by
opening each file once, says so once, and guards the file under a loop
device still), else another node of it made with ``mknod``, and always its
partitions and what is stacked on it (device-mapper, a mounted file system).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import select
import stat
import struct
import threading
import weakref
from collections.abc import Iterator, Sequence

from isc.errors import StateError
from isc.lun import loop_backing

log = logging.getLogger(__name__)

_FAN_CLOEXEC, _FAN_CLASS_CONTENT, _FAN_REPORT_TID = 0x1, 0x4, 0x100
_FAN_MARK_ADD, _FAN_OPEN_PERM = 0x1, 0x10000
_FAN_ALLOW, _FAN_DENY = 0x1, 0x2
_METADATA_VERSION = 3
_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata
_RESPONSE = struct.Struct("iI")  # struct fanotify_response

# The open system calls by number, and the argument that holds their flags
# (None: allowed whatever they are). Any other call is refused.
_OPENS: dict[str, dict[int, int | None]] = {
    "x86_64": {2: 1, 257: 2, 304: 2, 59: None, 322: None},  # open openat open_by_handle_at
    "aarch64": {56: 2, 265: 2, 221: None, 281: None},  # openat open_by_handle_at; execve(at)
}

_warned: set[str] = set()
_owned: set[int] = set()
"""The descriptors of the running guards (their groups, both ends of their pipes), which
a child forked without exec closes at once (:func:`_close_owned_in_child`)."""
_owned_lock = threading.Lock()


class WriteGuard:
    """Refuses every new open for writing of the files open at ``fds`` (see the module).

    Raises ``OSError`` when the kernel refuses a group or a mark (not root,
    no permission events) or asks about none of the files; nothing is left
    behind then. ``unguarded``: those of ``fds`` it does not ask about (a
    device node on Linux 6.18), found by opening each once. :meth:`close`
    ends it and lets every open through again; so does the end of the process.
    """

    def __init__(self, fds: Sequence[int]) -> None:
        opens = _OPENS.get(platform.machine())
        if opens is None:
            raise OSError(f"no table of the open system calls of {platform.machine()}")
        with _owned_lock:  # no fork between the call and the note
            group = _libc_call(
                "fanotify_init",
                _FAN_CLASS_CONTENT | _FAN_CLOEXEC | _FAN_REPORT_TID,
                os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC,
            )
            _owned.add(group)
        try:
            for fd in fds:
                _libc_call("fanotify_mark", group, _FAN_MARK_ADD, _FAN_OPEN_PERM, fd, None)
            with _owned_lock:
                wake, self._wake = os.pipe2(os.O_CLOEXEC)
                _owned.update((wake, self._wake))
        except BaseException:
            _close(group)
            raise
        asked: set[tuple[int, ...]] = set()
        self._thread = threading.Thread(
            target=_respond, args=(group, wake, opens, asked), name="isc-guard", daemon=True
        )
        self._thread.start()
        # A guard dropped without close() (a leaked session) stops its thread.
        self._stop = weakref.finalize(self, _stop, self._wake, self._thread)
        try:
            for fd in fds:
                # The open waits for the thread's answer, which first notes the file.
                flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                os.close(os.open(f"/proc/self/fd/{fd}", flags))
            self.unguarded = [fd for fd in fds if _key(os.fstat(fd)) not in asked]
            if len(self.unguarded) == len(fds):
                raise OSError(_unasked(fds))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop refusing: the thread answers what it read and closes the group. Idempotent."""
        self._stop()


def guard_source(fds: Sequence[int], source: str, own: int | None) -> WriteGuard | None:
    """Guard the files open at ``fds`` (the source's, and the file under it if it is a loop
    device); ``own``: the session's LUN's descriptor, left out of the look for writers.

    Raises ``StateError`` (and guards nothing) when a program has the source open for
    writing; returns None where no guard can be had, having said why once.
    """
    try:
        guard = WriteGuard(fds)
    except OSError as exc:
        _warn(source, exc.strerror or str(exc))
        return None
    if guard.unguarded:
        _warn(source, _unasked(guard.unguarded))
    writer = next(writers(fds, own), None)
    if writer is not None:
        guard.close()
        raise StateError(f"the source {source} is {writer}; close it there first")
    return guard


def _unasked(fds: Sequence[int]) -> str:
    """Why the guard cannot refuse opens of the files open at ``fds``."""
    kinds = {"block device" if stat.S_ISBLK(os.fstat(fd).st_mode) else "file" for fd in fds}
    return f"the kernel sends no permission events for opens of the {' or '.join(sorted(kinds))}"


def _warn(source: str, why: str) -> None:
    """Say once per process and reason that other programs can still write a source."""
    if why in _warned:
        return
    _warned.add(why)
    log.warning(
        "%s: other programs can still open the source for writing while a session holds it "
        "(no fanotify guard: %s; it needs root and a kernel with fanotify permission events "
        "for the file): write it only through isc",
        source,
        why,
    )


def writers(fds: Sequence[int], own: int | None) -> Iterator[str]:
    """What has the files open at ``fds`` open for writing now, each said in a few words:
    descriptors and shared writable mappings in every process (but ``own`` of this one),
    and loop devices over them that are not read-only (but those among ``fds``)."""
    infos = [os.fstat(fd) for fd in fds]
    keys = {_key(info) for info in infos}
    files = {(info.st_dev, info.st_ino) for info in infos}
    devices = {info.st_rdev for info in infos if stat.S_ISBLK(info.st_mode)}
    me = os.getpid()
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if (pid, int(fd)) == (me, own) or _key(os.stat(f"/proc/{pid}/fd/{fd}")) not in keys:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = int(next(x for x in info if x.startswith("flags:")).split()[1], 8)
                if _for_writing(flags):
                    yield f"open for writing by pid {pid} ({_program(pid)}, descriptor {fd})"
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    perms, _, dev, inode = line.split()[1:5]
                    major, minor = (int(x, 16) for x in dev.split(":"))
                    if perms[1] + perms[3] == "ws" and (
                        (os.makedev(major, minor), int(inode)) in files
                    ):
                        yield f"mapped shared and writable by pid {pid} ({_program(pid)})"
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process or the descriptor is gone, or not ours to read
    yield from _loops(files, devices)


def _loops(files: set[tuple[int, int]], devices: set[int]) -> Iterator[str]:
    """Loop devices (but ``devices``) over one of ``files`` that are not read-only."""
    for name in sorted(os.listdir("/sys/block")):
        if not os.path.isdir(f"/sys/block/{name}/loop"):
            continue
        try:
            with open(f"/sys/block/{name}/ro") as ro:
                if ro.read().strip() != "0":
                    continue
            fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_rdev not in devices and loop_backing(fd) in files:
                yield (
                    f"writable through the loop device /dev/{name} over it (losetup -d "
                    f"/dev/{name}, or attach it with losetup --read-only)"
                )
        finally:
            os.close(fd)


def _key(info: os.stat_result) -> tuple[int, ...]:
    """A file by device and inode; a block device by its number, under any node."""
    return (info.st_rdev,) if stat.S_ISBLK(info.st_mode) else (info.st_dev, info.st_ino)


def _for_writing(flags: int) -> bool:
    """Whether an open with ``flags`` may change the file (``O_TRUNC`` truncates even read-only)."""
    return flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)


def _program(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "gone"


def _verdict(tid: int, opens: dict[int, int | None]) -> int:
    """Allow the open thread ``tid`` (of another process) is in unless it may write, or its
    flags cannot be read."""
    try:
        with open(f"/proc/{tid}/syscall", "rb") as f:
            call = f.read().split()
        flags_at = opens[int(call[0])]
        if flags_at is None or not _for_writing(int(call[1 + flags_at], 16)):
            return _FAN_ALLOW
    except (OSError, KeyError, ValueError, IndexError):
        pass  # gone, "running" (not in a call), a call not in the table
    return _FAN_DENY


def _respond(
    group: int, wake: int, opens: dict[int, int | None], asked: set[tuple[int, ...]]
) -> None:
    """The responder thread: answer each event of ``group`` until ``wake``'s writer closes;
    note in ``asked`` the files this process's own opens were asked about."""
    try:
        poller = select.poll()
        poller.register(group, select.POLLIN)
        poller.register(wake, select.POLLIN)
        while all(fd != wake for fd, _ in poller.poll()):
            events = os.read(group, 64 * _EVENT.size)
            for at in range(0, len(events), _EVENT.size):
                size, version, _, _, _, fd, tid = _EVENT.unpack_from(events, at)
                if version != _METADATA_VERSION or size != _EVENT.size:
                    raise OSError(f"fanotify events of version {version}, not {_METADATA_VERSION}")
                if os.path.exists(f"/proc/self/task/{tid}"):  # this process's own
                    asked.add(_key(os.fstat(fd)))
                    verdict = _FAN_ALLOW
                else:
                    verdict = _verdict(tid, opens)
                os.write(group, _RESPONSE.pack(fd, verdict))
                os.close(fd)
    except BaseException:
        _close(group)  # first: the kernel lets waiting and later opens through
        group = -1
        log.exception("the guard of the source stopped: other programs can write it now")
    finally:
        if group != -1:
            _close(group)
        _close(wake)


def _stop(wake: int, thread: threading.Thread) -> None:
    _close(wake)  # the thread's poll sees the pipe hang up
    if thread is not threading.current_thread():
        thread.join()


def _close(fd: int) -> None:
    """Close ``fd``, one of :data:`_owned`, unless a fork closed it in this process."""
    with _owned_lock:
        if fd in _owned:
            _owned.remove(fd)
            os.close(fd)


def _close_owned_in_child() -> None:
    """In a child forked without exec: close every guard's descriptors (the module)."""
    for fd in _owned:
        os.close(fd)
    _owned.clear()
    _owned_lock.release()  # the forking thread held it, and is the child's thread


os.register_at_fork(
    before=_owned_lock.acquire,
    after_in_parent=_owned_lock.release,
    after_in_child=_close_owned_in_child,
)


def _libc_call(name: str, *args: object) -> int:
    function = getattr(_libc, name)
    answer = function(*args)
    if answer < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")
    return answer


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
