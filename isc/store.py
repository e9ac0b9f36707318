"""Persistent sessions: a session's state in a directory, safe across crashes.

Layout of a state directory::

    session.json        metadata: source, granularity, save area, destinations
                        (each with its own site or null: isc.remote's
                        agent address; and held_at, the agents a --site
                        named whose protect or rollback may have made the
                        session its export's holder, each saved once connected,
                        before that first request: remove-dest and destroy
                        release it at all; and claimed, whether its own agent's
                        reply named the session its export's holder: one
                        released meanwhile is found, isc.update.check_identities),
                        epoch, checkpointed, source_stamp; rewritten
                        atomically (temp file, fsync, rename, fsync of the
                        directory) at each open, save and close; versioned
    .lock               flock'ed by the process that holds the session
    serve.json          while isc serve holds the session: its process id, exports
                        and control address (isc.serve), for the commands to reach it
    checkpoint.journal  the delta bitmap: checkpoints K, each the bitmap pages
                        changed since the one before (isc.journal)
    activity.<K>.log    the write-intent log begun at checkpoint K: one record
                        per region that became hot, written and fsynced before
                        the first write to the region proceeds
    activity.<K>.writes every host write since checkpoint K, stored into a
                        shared mapping before it proceeds (isc.activity); both
                        name the session (its id), as the journal does
    activity-spare.*    the files of an obsolete generation, kept for the next
                        one (isc.activity); never read

Nothing else: :func:`create_session` refuses a state directory inside another
session's or around one (:func:`_nested`).

Crash safety without a synchronous metadata write per host write (the way
DRBD's activity log works): a write to a region (``region_size`` bytes,
default 4 MiB) that is already hot costs nothing extra; the first write to a
cold region waits for one small log append. A checkpoint holds host writes
for an instant (``DeltaBitmap.snapshot``: a write that then changes a
bitmap page the checkpoint has not written yet first copies the page;
``retire_hot``, a pass over the words of regions hot or written since the
last checkpoint and one bit per 4096 regions), retires the hot regions it
does not keep (below; the kept ones are recorded first in log K+1) and
starts log K+1; then it appends the pages changed since checkpoint K to the
journal as checkpoint K+1 and retires the older logs (one becomes the spare
whose files log K+2 reuses, :mod:`isc.activity`). Its cost follows the
pages changed, not the size of the LUN. Checkpoints run in the background
when the hot set reaches its capacity, when the write log is half full and
every ``checkpoint_interval`` seconds, and when the session is closed, so a
clean close leaves exact bitmaps.

The hot set, kept across checkpoints as DRBD keeps its activity log's
extents (an LRU): a checkpoint keeps hot the regions most recently written
(by the checkpoint that first found each written since the one before), at
most half the hot set's capacity and none left unwritten for a checkpoint
interval; so back-to-back checkpoints do not cool a working set, and an idle
session's hot set empties. The core works the LRU out in one call with the
GIL released (``DeltaBitmap.keep_hot``: a pass over the words of regions
written under the map's mutex, then O(k log k) for the k regions written or
kept), so before its freeze a checkpoint holds the GIL for O(1) Python steps
and the kept regions' records (O(k) in C). The capacity follows the write
pattern, between
two settings of ``session.json``: it starts at ``max_hot`` regions (default
1024: 4 GiB) and doubles, up to ``hot_limit`` (default 4096: 16 GiB; a
session file written before it existed takes the default), at a
checkpoint that finds more regions written within the interval than it can
keep while more than 1 in ``GROW_AT`` (100) of the host writes since the
last one waited for a region record: random writes over more than the hot
set keep missing, a sequential pass misses once a region (1 in 1024 of its
4 KiB writes) and does not grow it. It does not shrink while the session is
open. So what a crash of the machine resends (the hot regions, whole) is at
most ``max(max_hot, hot_limit) * region_size`` bytes, plus the regions first
written while the checkpoint a full hot set starts is taken (it runs beside
the writes: one fsync of the next log, then the snapshot) and, after a crash
inside a checkpoint, those first written since it began. A crash of the
process resends only the chunks written (``activity.K.writes``).

Opening a directory after a crash reads the journal (a checkpoint the crash
cut short is left out: the logs since the one before it are kept), ends an
interrupted copy as failed (unmark: unsent chunks return to tracking, rule 2)
and tracks again what the logs since the newest checkpoint hold: after a
crash of the process the chunks written, after one of the machine the
regions that were hot, whole (bounded above). No change is lost.
Chunks a copy confirmed before
its last checkpoint are not resent: that checkpoint flushed the
destinations of the copy and, once a copy had begun since the one before,
the source (else a crash of the machine could take back a host write the
copy sent, whose chunk the checkpoint keeps cleared). A copy run through
:meth:`PersistentSession.begin_copy` is recorded in ``session.json`` while it
runs, so its destinations read inconsistent until it ends (rule 6) and a
crash in an unmarked full copy, which clears tracking as it begins, leaves
everything to send again (rule 2); its end is saved after a checkpoint that
holds what it put back in tracking when it stopped short. The record keeps
the destinations' fingerprint samples, and each checkpoint during the copy
writes those they hold then, so one replaced after a crash is still found
(rule 12; one ``session.json`` write per checkpoint while a copy runs).

Missing state is corrupt metadata (rule 10). Once ``session.json`` says a
checkpoint was written (``checkpointed``, set after the first; or it has an
epoch or destinations), or a log holds records, a directory without a
checkpoint raises ``CorruptMetadata`` instead of opening with an empty
bitmap, which would lose every change the checkpoint held; so does a
checkpoint or log that cannot be read, and a journal whose newest
checkpoint is not the one the activity logs beside it began with (another
session's journal, or an older copy of this one's) or is older than the one
``session.json`` records (``checkpoint``, written at each save: a journal and
its logs put back from a backup of this session). So does a ``session.json``
saved at a clean close (its source stamp ``closed``) whose ``generation``
(marks so far) is behind the journal's: a backup of the file, whose
destination states would be taken over the bitmap of later marks (not seen:
a copy of the file taken while a session held it, or of an NBD URI
source's, which has no stamp). The way out is
``open_session(reset=True)`` (``isc recover SESSION --reset-destinations``):
every chunk tracked, every destination NEW, the next copy full.

The source (rule 11). An open session holds QEMU's image locks on it
(:class:`SourceLock`): a second session on the same file, under any path
or through a loop device over it, and a QEMU tool that would write or
resize it are refused, and the other way round. A path that names a file
by a process's descriptor (``/proc/self/fd/N``, ``/dev/fd/N``) is refused
as a source or a destination: it would name another file in each later
process. Each local destination holds isc's own lock (:class:`DestinationLock`,
which the source's holds too): another session naming it as a destination
or its source is refused (rule 12), QEMU's readers are not. The locks are
advisory; as root a guard (:mod:`isc.guard`) also
refuses every other program's open of the source for writing while a
session holds it, and refuses the source to a session while a program has
it open for writing. A clean close stamps the source in
``session.json`` (``source_stamp``: device and inode, the inode's generation
and birth time where the file system keeps them, size, mtime) and the next
open compares: another file at the path (one recreated at the deleted one's
inode too, where generation or birth time tell) or another mtime (a write while
no isc process held it) means any chunk may differ, so every chunk is
tracked, a mark ends, the consistent destinations become inconsistent and
``Recovery.source_changed`` says why; another size is refused. Not seen:
after a crash only the identity and size are compared (the session's own
writes moved the mtime); before Linux 6.13 (no multigrain timestamps) a
write in the same clock tick as the close can leave the mtime as it was; a
block device is compared by its device number only; an NBD URI source is
neither locked nor checked; without the guard (not root), a write by a
program that takes no lock while a session holds the source, and with it
what it cannot stop (``truncate(2)`` by path, :mod:`isc.guard`).

:func:`read_state` reads a directory without opening the session (no lock,
no writes), for status reports while another process holds it; it reports
a lost or damaged checkpoint (``damage``) and a changed source rather than
raising.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from isc import journal
from isc._core import DeltaBitmap
from isc.activity import ActivityLog, read_log, read_writes
from isc.auth import Credentials, others_may_change
from isc.copy import CopyJob, CopyResult, Destination, DestState
from isc.errors import CorruptMetadata, IscError, ParameterError, StateError
from isc.guard import WriteGuard, guard_source
from isc.journal import fsync_dir as _fsync_dir
from isc.lun import (
    BIRTH_KEYS,
    FileLUN,
    ReconnectingLUN,
    file_birth,
    loop_backing,
    open_loop_backing,
    same_birth,
)
from isc.remote import (
    HOLDER_TEXT,
    Ack,
    AgentSite,
    RemoteSite,
    RoutingSite,
    agent_address,
    is_holder,
    same_agent,
    session_holder,
)
from isc.savearea import SaveArea, unfit
from isc.session import DEFAULT_SAVE_AREA, Session
from isc.update import DEFAULT_TIMEOUT, check_identities

log = logging.getLogger(__name__)

METADATA = "session.json"
FORMAT = "isc-session"
VERSION = 1
DEFAULT_REGION_SIZE = 4 << 20
DEFAULT_MAX_HOT = 1024
"""Regions a session's hot set holds before its first checkpoint is due (its first capacity)."""
DEFAULT_HOT_LIMIT = 4096
"""The most regions the hot set's capacity grows to (16 GiB of 4 MiB regions)."""
GROW_AT = 100
"""The hot set doubles when more than 1 in ``GROW_AT`` host writes waited for a region record."""
DEFAULT_CHECKPOINT_INTERVAL = 30.0
_LOG = re.compile(r"activity\.(\d+)\.log$")
_WRITES = re.compile(r"activity\.(\d+)\.writes$")
_POLL = 1.0
"""Seconds between the checkpointer's looks at how full the write log is."""
_URI = re.compile(r"nbds?(\+unix)?://|rbd:")
COPY_MODES = ("incremental", "full", "full-unmarked")
CHECKPOINT_EVERY = 1 << 30
"""Bytes a marked copy sends between checkpoints: what a crash can make it send again.

Not less: each checkpoint costs its syncs (the journal's, the next log's with
the hot regions it keeps) beside the copy."""
"""The kinds of copy :meth:`PersistentSession.begin_copy` records (``CopyResult.mode``)."""


def is_uri(target: str) -> bool:
    """Whether ``target`` names an NBD export (``nbd[s]://``, ``nbd[s]+unix://``) or an RBD
    image (``rbd:POOL/IMAGE[?conf=PATH]``, :mod:`isc.rbd`), not a path."""
    return _URI.match(target) is not None


def open_lun(target: str, timeout: float | None = None, session: int | None = None):
    """Open a LUN from a path, an NBD URI (``nbd[s]://``, ``nbd[s]+unix://``: TLS with an s)
    or an RBD image's (``rbd:POOL/IMAGE[?conf=PATH]``: through a qemu-nbd of its own).

    ``timeout`` bounds, in seconds, every wait of an NBD LUN for its server
    (None: :data:`isc.nbd.DEFAULT_TIMEOUT`). A destination of the session whose id
    is ``session``: an NBD export that is that session's own (``isc serve``'s, under
    whatever address) is refused at each connection (rule 11)."""
    if target.startswith("rbd:"):
        from isc.rbd import RBDLUN

        return RBDLUN(target)
    if is_uri(target):
        from isc.nbd import DEFAULT_TIMEOUT, NBDLUN
        from isc.nbd.proto import own_export

        refuse = None if session is None else own_export(session)
        return NBDLUN(target, timeout=timeout or DEFAULT_TIMEOUT, refuse=refuse)
    try:
        return FileLUN(target)
    except PermissionError as exc:
        if exc.errno == errno.EPERM:
            # Another session's guard (isc.guard) refused to open its source for
            # writing: its lock says so in the words of every other refusal.
            SourceLock(target).close()
        raise


def _open_named(target: str, what: str, timeout: float | None = None, session: int | None = None):
    """``open_lun``, with an OSError that says which of the session's LUNs failed."""
    try:
        return open_lun(target, timeout, session)
    except OSError as exc:
        message = f"cannot open {what} at {target}: {exc.strerror or exc}"
        raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class Recovery:
    """What opening a state directory found and repaired.

    ``regions_resent`` counts the regions the region logs held since the
    last checkpoint, ``bytes_resent_bound`` the bytes tracked again: the
    writes the write logs held, or those regions whole where a write log
    could not stand for them (:mod:`isc.activity`). ``source_changed`` says
    why the source may differ from every destination (it was written or
    replaced while no isc process held it), or is None.
    """

    crashed: bool
    interrupted_copy: bool
    regions_resent: int
    bytes_resent_bound: int
    source_changed: str | None = None


# -- the source: its lock and its stamp ------------------------------------------------

# QEMU's image locks (block/file-posix.c): shared OFD locks on byte 100 + p for
# each permission p a process uses and on byte 200 + p for each it does not
# share, then a test for anyone else's lock on the bytes that conflict. Taking
# the same bytes makes a qemu-nbd or qemu-img that would write or resize the
# source refuse while a session holds it, and the session refuse a source a
# QEMU process writes; a second session conflicts with the first.
_READ, _WRITE, _RESIZE = 0, 1, 3  # QEMU's BLK_PERM_* bits
_USES, _UNSHARED = (_READ, _WRITE), (_WRITE, _RESIZE)
_LOCKED = tuple(100 + p for p in _USES) + tuple(200 + p for p in _UNSHARED)
_CONFLICTS = tuple(200 + p for p in _USES) + tuple(100 + p for p in _UNSHARED)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: type, whence, start, len, pid
# isc's own byte, outside QEMU's (100 + p, 200 + p for its five permissions):
# a shared OFD lock on it, and a test for anyone else's, for each local file a
# session has open as its source or a destination, and the file under a loop
# device too (rules 11, 12).
# A second session naming one of them as its source or a destination, under
# any path, conflicts; a qemu-img or qemu-nbd that only reads a destination
# takes no lock there and is not refused. OFD locks go with the last
# descriptor of the open: at a close, and at the holder's death (SIGKILL).
_SESSION_BYTE = 400
_IDENTITY = ("rdev", "dev", "ino")


class SourceLock:
    """The lock a session holds on its source file or block device while it is open.

    ``opened``: the source's LUN, opened from ``path``; the file it has open
    is the one locked (and stamped), whatever ``path`` names by now, so a
    rename between the two opens cannot leave the file the session writes
    unlocked. On a loop device the file under it is locked too
    (:func:`~isc.lun.open_loop_backing`): a session on the device and one on
    the file conflict.

    Raises ``StateError`` when another session, or a program that writes
    or resizes the source under QEMU's image locking, holds it, or a program
    has it open for writing; ``OSError`` when the source cannot be opened or
    locked. The locks are advisory, as QEMU's are; where it can (as root),
    a :class:`~isc.guard.WriteGuard` also refuses every open of the source
    for writing by any other program until :meth:`close`. Without it a
    program that takes no lock is not stopped, and the source's stamp
    (:meth:`stamp`, checked at the next open) finds only what it did while
    no session held the source.
    """

    def __init__(self, path: str, opened: FileLUN | None = None) -> None:
        self._guard: WriteGuard | None = None
        name = path if opened is None else f"/proc/self/fd/{opened.fileno()}"
        self._fds = _open_with_backing(name)
        self.fd = self._fds[0]
        try:
            for fd in self._fds:
                for byte in _LOCKED:
                    _lock_byte(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
            held = [
                b
                for fd in self._fds
                for b in _CONFLICTS
                if _lock_byte(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, b)
            ]
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot lock the source at {path}: {exc.strerror}") from exc
        if held:
            self.close()
            raise StateError(
                f"the source {path} is in use by another isc session or a program that writes "
                f"it (an image lock on byte {held[0]}, as QEMU takes); one session per source: "
                "close the other first"
            )
        try:
            _hold_session_byte(self._fds, f"the source {path}")
            self._guard = guard_source(self._fds, path, None if opened is None else opened.fileno())
        except BaseException:
            self.close()
            raise

    def stamp(self) -> dict:
        """The source's identity, size and mtime now (see :func:`_stamp`)."""
        return _stamp(os.fstat(self.fd), self.fd)

    def close(self) -> None:
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.fd = -1


class DestinationLock:
    """isc's lock (:data:`_SESSION_BYTE`) on a local destination a session has open: the
    file ``lun`` opened, whatever its path names by now, and the file under it when it
    is a loop device. ``what`` names the destination in the refusal.

    Raises ``StateError`` when another isc session holds that file as its
    source or a destination; ``OSError`` when it cannot be locked. QEMU's
    image locks are left alone: a qemu-img or qemu-nbd may read the
    replica, and QEMU's own locks alone decide whether one may write it.
    Released at :meth:`close` or with the process.
    """

    def __init__(self, lun: FileLUN, what: str) -> None:
        self._fds = _open_with_backing(f"/proc/self/fd/{lun.fileno()}")
        try:
            _hold_session_byte(self._fds, what)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _open_with_backing(name: str) -> list[int]:
    """Read-only descriptors of the file at ``name`` and, for a loop device, of the file
    under it (:func:`~isc.lun.open_loop_backing`), for locks."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        backing = open_loop_backing(fd)
    except BaseException:
        os.close(fd)
        raise
    return [fd] if backing is None else [fd, backing]


def _hold_session_byte(fds: list[int], what: str) -> None:
    """Lock :data:`_SESSION_BYTE` of each of ``fds`` for this session alone; a
    ``StateError`` naming ``what`` and the holder when another session has it."""
    for fd in fds:
        # Shared, as a read-only descriptor allows, then a test for anyone else's: of two
        # sessions at once both may refuse, never both hold.
        _lock_byte(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _SESSION_BYTE)
        if _lock_byte(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _SESSION_BYTE):
            raise StateError(
                f"{what} is in use by another isc session{_lock_holder(fd)} as its source or "
                "a destination; one session per file: close the other, take it out of that "
                "session (isc remove-dest) or give another file"
            )


def _lock_holder(fd: int) -> str:
    """`` (process PID: its command line)`` of a process holding :data:`_SESSION_BYTE`
    of the file open at ``fd``, found in ``/proc/*/fdinfo`` (an OFD lock names no
    process to ``F_OFD_GETLK``), or an empty string when none can be read."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    wanted = ["READ", "-1", inode, str(_SESSION_BYTE), str(_SESSION_BYTE)]
    mine = Path(f"/proc/{os.getpid()}/fdinfo/{fd}")
    for info in Path("/proc").glob("[0-9]*/fdinfo/*"):
        if info == mine:
            continue
        try:
            lines = info.read_text().splitlines()
        except OSError:  # gone, or another user's
            continue
        if any(line.split()[-5:] == wanted for line in lines if line.startswith("lock:")):
            pid = info.parent.parent.name
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                return f" (process {pid})"
            return f" (process {pid}: {command.decode(errors='replace').strip()})"
    return ""


def _lock_byte(fd: int, command: int, kind: int, byte: int) -> bool:
    """One lock call on ``byte`` of ``fd``; for a test, whether another holds a lock there."""
    answer = fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


def _stamp(st: os.stat_result, fd: int | None = None) -> dict:
    """What names the source under any path, and for a file what moves when it is written;
    with ``fd`` (the file open), what tells it from a file recreated at its inode
    (:func:`isc.lun.file_birth`: ``gen``, ``btime_ns`` where the file system keeps them).

    A block device is its device number (its node's mtime does not move on writes).
    """
    if stat.S_ISBLK(st.st_mode):
        return {"rdev": st.st_rdev}
    birth = {} if fd is None else file_birth(fd)
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    } | birth


def _identity(target: str) -> tuple | None:
    """One LUN's name under any spelling: its URI, an RBD image's id or its stamp's identity
    (a loop device's is its file's); None if unreadable."""
    if target.startswith("rbd:"):
        from isc.rbd import RBDImage

        return RBDImage.parse(target).identity()
    if is_uri(target):
        return (target,)
    try:
        stamp = _stamp(os.stat(target))
        if "rdev" in stamp:
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                backing = loop_backing(fd)
            finally:
                os.close(fd)
            if backing is not None:
                stamp = {"dev": backing[0], "ino": backing[1]}
    except OSError:
        return None
    return tuple(stamp.get(key) for key in _IDENTITY)


def _by_descriptor(target: str) -> str | None:
    """Why ``target`` names no file of its own, or None: a path that reaches into procfs
    (``/proc/self/fd/N``, ``/dev/fd/N``, ``/dev/stdin``) names what each process that
    opens it has open under a number, so the session file would name another LUN (the
    source, a journal) in every later isc process."""
    if is_uri(target):
        return None
    path, proc = os.path.abspath(target), os.stat("/proc").st_dev
    for _ in range(40):  # the kernel's bound on symbolic links in one lookup
        parent = os.path.realpath(os.path.dirname(path))
        try:
            if os.stat(parent).st_dev == proc:
                return (
                    f"{target} names a file by a process's descriptor, another file in each "
                    "process; give the file's own path"
                )
        except OSError:
            return None
        leaf = os.path.join(parent, os.path.basename(path))
        if not os.path.islink(leaf):
            return None
        path = os.path.join(parent, os.readlink(leaf))
    return None


def _check_distinct(directory: Path, source: object, destinations: list[Destination]) -> None:
    """Refuse a destination file that is now the source or another destination (its path
    replaced by a link to it since add-dest checked): a copy would write the source's
    image over the source itself. Compared by the files opened, by device and inode."""
    seen: dict[tuple, str] = {}
    for what, lun in [("the source", source), *((d.name, d.lun) for d in destinations)]:
        if not isinstance(lun, FileLUN):
            continue
        identity = _identity(f"/proc/self/fd/{lun.fileno()}")
        if identity is None:
            continue
        if identity in seen:
            raise StateError(
                f"{directory / METADATA}: destination {what} at {lun.path} is the file of "
                f"{seen[identity]} now; put its own file back at that path"
            )
        seen[identity] = what if what == "the source" else f"destination {what}"


def _source_change(recorded: dict | None, now: dict | None, source: str) -> str | None:
    """Why the source may have changed outside the session since ``recorded``, or None.

    The mtime counts only in a stamp taken at a clean close: while a session
    holds the source its own writes move it, so after a crash only the
    identity and the size are compared.
    """
    if recorded is None or now is None:
        return None
    if any(recorded.get(key) != now.get(key) for key in _IDENTITY) or not same_birth(recorded, now):
        return f"{source} is not the file the session tracked: it was replaced or renamed"
    if recorded.get("size") != now.get("size"):
        return f"{source} changed size from {recorded['size']} to {now['size']} bytes"
    if recorded.get("closed") and recorded.get("mtime_ns") != now.get("mtime_ns"):
        return f"{source} was modified while no isc process held it (its mtime moved)"
    return None


class PersistentSession:
    """A :class:`Session` whose state lives in a directory; open with :func:`open_session`.

    ``session`` is the live session, ``destinations`` its destinations.
    Call :meth:`save` after changing destinations or their states (the copy
    and update workflows do not know the store), and :meth:`close` at the end.
    """

    def __init__(
        self,
        directory: Path,
        meta: dict,
        bitmap: DeltaBitmap | None,
        timeout: float | None = None,
    ) -> None:
        self.directory = directory
        self.meta = meta
        self._timeout = timeout
        with ExitStack() as opened:
            # Close what was opened if a later LUN or the save area fails.
            self.source = _open_named(meta["source"], "the source", timeout)
            opened.callback(self.source.close)
            self._source_lock = (
                None if is_uri(meta["source"]) else SourceLock(meta["source"], self.source)
            )
            if self._source_lock is not None:
                opened.callback(self._source_lock.close)
            if bitmap is not None and bitmap.size != self.source.size:
                raise StateError(
                    f"the source {meta['source']} holds {self.source.size} bytes and {directory} "
                    f"tracks {bitmap.size}: restore its size, or start again with "
                    f"isc recover {directory} --reset-destinations"
                )
            area = meta["save_area"] or {}
            capacity = area.get("capacity") or min(self.source.size, DEFAULT_SAVE_AREA)
            luns = (meta["source"], *(d["target"] for d in meta["destinations"]))
            if area.get("path") is not None and _identity(area["path"]) in {
                _identity(lun) for lun in luns
            } - {None}:
                raise ParameterError(
                    f"{directory / METADATA}: the save area path {area['path']} is the source "
                    "or a destination; give the path of a new file"
                )
            try:
                save_area = SaveArea(capacity, area.get("path"))
            except IscError as exc:
                raise type(exc)(f"{directory / METADATA}: {exc}") from None
            opened.callback(save_area.close)
            self.session = Session(
                self.source, meta["granularity"], save_area, name=meta["name"], bitmap=bitmap
            )
            self.destinations = []
            for d in meta["destinations"]:
                what = f"destination {d['name']}"
                if is_uri(d["target"]):
                    # A remote destination may be down now or later: it is opened at
                    # its first use and again after an outage, so no host write and
                    # no other destination waits for it (rule 13).
                    lun = ReconnectingLUN(
                        partial(open_lun, d["target"], timeout, meta["id"]),
                        self.source.size,
                        f"{what} at {d['target']}",
                    )
                else:
                    lun = _open_named(d["target"], what, timeout, meta["id"])
                opened.callback(lun.close)
                dest = Destination(lun, d["name"], DestState(d["state"]), d["epoch"])
                dest.samples = [(chunk, crc) for chunk, crc in d.get("samples", [])]
                if d.get("protected_state") is not None:
                    dest.protected_state = DestState(d["protected_state"])
                self.destinations.append(dest)
            _check_distinct(directory, self.source, self.destinations)
            self._dest_locks: dict[str, DestinationLock] = {}
            for dest in self.destinations:
                if isinstance(dest.lun, FileLUN):
                    lock = DestinationLock(dest.lun, f"destination {dest.name} at {dest.lun.path}")
                    opened.callback(lock.close)
                    self._dest_locks[dest.name] = lock
            opened.pop_all()
        self.session.epoch = meta["epoch"]
        self.session.pull_epoch = meta.get("pull_epoch", 0)
        self._targets = {d["name"]: d["target"] for d in meta["destinations"]}
        self._sites: dict[str, str | None] = {
            d["name"]: d.get("site") for d in meta["destinations"]
        }
        """Each destination's own site (``add_destination(site=...)``), or None."""
        self._held_at: dict[str, list[str]] = {
            d["name"]: list(d.get("held_at", [])) for d in meta["destinations"]
        }
        """The agents besides its own site that each destination's export may be held at for
        this session: recorded before their first protect or rollback (:meth:`site`)."""
        self.identities: dict[str, str] = {
            d["name"]: d["identity"] for d in meta["destinations"] if d.get("identity")
        }
        """What each destination's agent last said identifies its export
        (:func:`isc.agent.export_identity`), checked before an update relies on it."""
        self.claimed: set[str] = {d["name"] for d in meta["destinations"] if d.get("claimed")}
        """The destinations whose export at their own agent this session is known to hold:
        the agent's reply to its claim (:meth:`add_destination`), to a protect or rollback
        (:meth:`site`), or its status (:func:`check_agents`) named this session. One whose
        agent says later that no session holds it was let go meanwhile (a forced ``isc
        release``): :func:`isc.update.check_identities` makes it NEW."""
        self.held_elsewhere: dict[str, str] = {}
        """The destinations whose agent or RBD image said another session holds them, or
        whose agent serves a file no longer at their export's path (``Ack.replaced``), at
        the last :func:`check_agents`, with why: :func:`copy` leaves them out."""
        self.region_size = meta["region_size"]
        self.max_hot = meta["max_hot"]
        self.hot_limit = max(meta.get("hot_limit", DEFAULT_HOT_LIMIT), self.max_hot)
        self.hot_capacity = self.max_hot
        """Hot regions at which a checkpoint is due, between max_hot and hot_limit
        (:meth:`_keep_hot`)."""
        self._writes_at = 0
        """The bitmap's count of host writes when the current generation began."""
        self._woken_in = -1
        """The generation whose full hot set last woke the checkpointer."""
        self._copies = 0
        """Copies begun (:meth:`begin_copy`)."""
        self._flushed_for: tuple[int, int, bool] | None = None
        """Copies begun, generation and marked when the last checkpoint flushed the source."""
        self._used = (np.empty(0, np.int64), np.empty(0, np.float64))
        """The regions kept hot by the last checkpoint and when each was last found written."""
        self._clock = time.monotonic
        self._interval = DEFAULT_CHECKPOINT_INTERVAL
        self._log: ActivityLog | None = None
        self._journal: journal.Journal | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._checkpoint_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._lock_fd = -1
        self._closed = False
        self._checkpointed = False
        self._checkpoint_seq = meta.get("checkpoint", 0)
        """The generation of the newest checkpoint on disk, recorded at each save."""
        self._receiving: list[Destination] = []
        """The destinations of the copy :meth:`begin_copy` recorded, until :meth:`save`."""
        self._recorded: dict = {}
        """The metadata :meth:`begin_copy` wrote, whose samples checkpoints bring up to date."""
        self._meta_lock = threading.Lock()
        """Held to write ``session.json``: a checkpoint's samples never land after a save."""
        self._stamp = None if self._source_lock is None else self._source_lock.stamp()
        """The source's stamp as of this open; ``closed`` once a clean close took it again."""

    # -- running ---------------------------------------------------------------------
    def _start(self, generation: int, interval: float, loaded: journal.Loaded | None) -> None:
        self._interval = interval
        self._journal = journal.Journal(self.directory, loaded, self.meta["id"])
        self._log = ActivityLog(self.directory, generation, self.meta["id"])
        self.session.bitmap.track_activity(self.region_size, self._on_hot)
        self.session.bitmap.log_writes(self._log.area())
        self._thread = threading.Thread(
            target=self._checkpointer, args=(interval,), name="isc-checkpoint", daemon=True
        )
        self._thread.start()

    def _on_hot(self, first: int, last: int) -> None:
        assert self._log is not None
        self._log.append(first, last)
        if self.session.bitmap.hot_count + (last - first + 1) >= self.hot_capacity:
            self._woken_in = self._log.generation
            self._wake.set()

    def _keep_hot(self) -> np.ndarray:
        """The regions to keep hot across this checkpoint, ascending: the most recently
        written, written within a checkpoint interval, at most half the capacity, which
        grows first if they are more and writes kept waiting (see the module docstring).

        One core call (``DeltaBitmap.keep_hot``) with the GIL released: the
        checkpointing thread holds it for O(1) steps here, whatever the hot set, so
        a host write's thread waiting for it is not held up.
        """
        bitmap = self.session.bitmap
        now = self._clock()
        regions, when = self._used
        waited = self._log.logged * GROW_AT > bitmap.writes - self._writes_at
        regions, when, self.hot_capacity = bitmap.keep_hot(
            regions, when, now, now - self._interval, self.hot_capacity, self.hot_limit, waited
        )
        self._used = (regions, when)
        return regions

    def _checkpointer(self, interval: float) -> None:
        due = time.monotonic() + interval
        while not self._closing.is_set():
            woken = self._wake.wait(min(interval, _POLL))
            self._wake.clear()
            if self._closing.is_set():
                break
            # A wake for a hot set that another checkpoint has since emptied is stale:
            # this one would find little written and retire the working set. (The hot
            # set's size would not tell: the waking write makes its regions hot after.)
            full = woken and self._woken_in == self._log.generation
            # A full write log makes a crash resend whole regions: checkpoint before.
            if full or time.monotonic() >= due or self._log_half_full():
                try:
                    self.checkpoint()
                except (OSError, IscError) as exc:
                    log.error("%s: checkpoint failed: %s", self.meta["name"], exc)
                due = time.monotonic() + interval

    def _log_half_full(self) -> bool:
        with self._checkpoint_lock:
            return self._log is not None and self._log.half_full()

    def checkpoint(self) -> None:
        """Save the bitmap now and retire the hot regions (see the module docstring).

        Raises ``StateError`` once the session is closed.
        """
        with self._checkpoint_lock:
            if self._log is None:
                raise StateError(f"{self.meta['name']} is closed; open it again to checkpoint")
            bitmap = self.session.bitmap
            # Regions written since the last checkpoint stay hot, logged in the next
            # generation first (a closing session keeps none: nothing writes).
            keep = np.empty(0, np.int64) if self._closing.is_set() else self._keep_hot()
            fresh = self._log.prepare(keep)
            # The metadata lock from before the snapshot until the running copy's
            # destinations are read: a copy ending in between would put back the runs its
            # destinations had not flushed (after the snapshot, which holds them cleared)
            # and end its record, and no one would flush them. Its end waits instead.
            self._meta_lock.acquire()
            try:
                bitmap.freeze()
                # O(1) while host writes wait: the pages are written after the thaw.
                header = bitmap.snapshot(self._journal.wants_base)
                try:
                    bitmap.retire_hot(keep)
                    bitmap.log_writes(fresh.area())
                    self._log.rotate(fresh)
                    self._writes_at = bitmap.writes
                except BaseException:
                    bitmap.snapshot_end(False)
                    raise
            except BaseException:
                # Before writes go on: the generation in force stays, its write log too.
                bitmap.log_writes(self._log.area())
                self._log.discard(fresh)
                raise
            finally:
                bitmap.thaw()
                receiving = list(self._receiving)
                self._meta_lock.release()
            generation = fresh.number
            try:
                # The state just taken may record chunks as sent that a destination
                # still holds in a volatile cache: flush every destination of the
                # running copy before the checkpoint makes that durable. A flush
                # that fails leaves the older checkpoint and every log since it.
                for dest in receiving:
                    dest.lun.flush()
                # A copy, or a pull confirming through the frozen image (which no
                # begin_copy records, only a mark), may have sent a host write the
                # source holds only in a volatile cache: a crash of the machine would
                # take it back while the checkpoint keeps its chunk cleared, in a
                # region it may retire. So flush it unless nothing began or was marked.
                sent = (self._copies, bitmap.generation, bitmap.marked)
                if sent != self._flushed_for or sent[2] or receiving:
                    self.source.flush()
                self._journal.write(bitmap, generation, header)
            except BaseException:
                bitmap.snapshot_end(False)
                raise
            bitmap.snapshot_end(True)
            self._checkpointed = True
            self._checkpoint_seq = generation
            self._flushed_for = sent
            # Older logs reappearing after a crash are ignored: the journal is newer.
            self._log.retire(generation)
            self._record_samples()

    def _record_samples(self) -> None:
        """While a copy runs, write into the record :meth:`begin_copy` made the fingerprint
        samples its destinations hold now, and make one the copy found replaced (out of
        step) out of step there too (rule 12 after a crash).

        Each was taken after the copy wrote and flushed its chunk, or is an older one
        the copy does not write (:mod:`isc.fingerprint`), so it holds whichever
        checkpoint a crash leaves. Written after the checkpoint: a crash in between
        leaves older samples, which may name a chunk the copy has since cleared and
        rewritten, and cost a full copy (never a trusted replaced destination).
        """
        with self._meta_lock:
            if not self._receiving:
                return
            meta = self._recorded
            for dest in self._receiving:
                entry = next(d for d in meta["destinations"] if d["name"] == dest.name)
                entry["samples"] = [list(sample) for sample in dest.samples]
                if dest.epoch is None:
                    entry["epoch"], entry["state"] = None, DestState.NEW.value
            write_atomically(self.directory / METADATA, _encode(meta))

    def save(self) -> None:
        """Write the metadata (destinations, their states, epoch) atomically.

        Ends what :meth:`begin_copy` recorded: call it once the copy is over
        (an unmarked full copy's record ends after a checkpoint,
        :meth:`_checkpoint_unmarked_end`). Raises ``StateError`` once the
        session is closed (its directory is not this process's any more),
        writing nothing.
        """
        with self._meta_lock:
            if self._closed:
                raise StateError(f"{self.meta['name']} is closed; open it again to save")
            copying = self._receiving
            unmarked = bool(copying) and self._recorded["copy"]["mode"] == "full-unmarked"
            self._receiving = []
        if unmarked:
            self._checkpoint_unmarked_end(copying)
        with self._meta_lock:
            if self._closed:
                raise StateError(f"{self.meta['name']} is closed; open it again to save")
            self._write_meta_locked()

    def _checkpoint_unmarked_end(self, copying: list[Destination]) -> None:
        """Checkpoint after an unmarked full copy, before its record ends (rules 2, 9).

        It cleared tracking as it began, so a checkpoint taken while it ran holds
        every chunk clear, and what it did not send and flush (it failed, was
        cancelled, a destination dropped out) went back to tracking in memory
        only: with its record gone, a crash before the next checkpoint left
        those chunks untracked on destinations read in step. None of them needs
        a flush now (each flushed what it keeps clear). If the checkpoint fails,
        the copy's destinations fall out of step instead (NEW: every chunk).
        """
        try:
            self.checkpoint()
        except (OSError, IscError) as exc:
            if self._closed:  # a close in another thread checkpointed after the copy
                raise
            log.error(
                "%s: no checkpoint after the unmarked full copy (%s): its destinations "
                "need every chunk",
                self.meta["name"],
                exc,
            )
            for dest in copying:
                dest.start_over()

    def _save_destinations(self) -> None:
        """:meth:`save` after a destination was added or removed, but the record of a running
        copy (:meth:`begin_copy`) stays, so that a crash recovery still ends that copy as
        failed (rules 2, 6, 9)."""
        with self._meta_lock:
            self._write_meta_locked()

    def _write_meta_locked(self) -> None:
        """Write the metadata; while a copy runs, its record with its destinations as it
        recorded them (inconsistent, with the samples of the last checkpoint) and the
        others as they are now."""
        self.meta = meta = self._current_meta()
        if self._receiving:
            copying = set(self._recorded["copy"]["destinations"])
            recorded = {d["name"]: d for d in self._recorded["destinations"]}
            dests = [
                recorded[d["name"]] if d["name"] in copying else d for d in meta["destinations"]
            ]
            meta = self._recorded = {**self._recorded, "destinations": dests}
        write_atomically(self.directory / METADATA, _encode(meta))

    def begin_copy(self, destinations, mode: str) -> None:
        """Record durably that a copy (``mode`` in :data:`COPY_MODES`) to ``destinations`` starts.

        Call it before the copy or update writes anything, and :meth:`save`
        after it ends (the workflows do not know the store). Until then the
        metadata shows those destinations inconsistent, as each becomes at its
        first write (rule 6), and an open after a crash ends the copy as
        failed: an unmarked full copy, which cleared tracking as it began,
        leaves every chunk to send again; a marked one leaves in step only the
        destinations of the copy that were in step (what it cleared reached
        them and no other), rule 2. Raises ``ParameterError`` for an unknown
        mode or destination, before writing anything.
        """
        names = [d.name for d in destinations]
        unknown = [name for name in names if name not in self._targets]
        if mode not in COPY_MODES or unknown:
            raise ParameterError(
                f"begin_copy needs a mode in {COPY_MODES} and destinations of "
                f"{self.meta['name']}; got {mode!r} and unknown {unknown}"
            )
        meta = self._current_meta()
        for dest in meta["destinations"]:
            if dest["name"] in names:
                dest["state"] = DestState.INCONSISTENT.value
        # The samples stay (rule 12 after a crash): after a crash one of a chunk
        # the copy had not cleared at the last checkpoint is not checked (the
        # chunk is tracked again), and each checkpoint writes the samples the
        # copy holds then (_record_samples), none of a chunk it rewrote.
        meta["copy"] = {"mode": mode, "destinations": names}
        with self._meta_lock:
            write_atomically(self.directory / METADATA, _encode(meta))
            self._recorded = meta
            self._receiving = list(destinations)
        self._copies += 1

    def _current_meta(self) -> dict:
        meta = {key: value for key, value in self.meta.items() if key != "copy"}
        meta["epoch"] = self.session.epoch
        # Marks so far: an older copy of this file put back is found by them (see _load).
        meta["generation"] = self.session.generation
        meta["pull_epoch"] = self.session.pull_epoch
        meta["destinations"] = [
            {
                "name": d.name,
                "target": self._targets[d.name],
                # The isc agent that protects it (isc.remote.agent_address), or None.
                "site": self._sites[d.name],
                # The agents a --site named that may hold its export for this session.
                "held_at": list(self._held_at[d.name]),
                "identity": self.identities.get(d.name),
                # Its own agent's reply named this session its export's holder.
                "claimed": d.name in self.claimed,
                "state": d.state.value,
                "epoch": d.epoch,
                "samples": [list(sample) for sample in d.samples],
                # What a rollback whose answer comes restores it to (isc.update.rollback).
                "protected_state": d.protected_state and d.protected_state.value,
                # Why it could not be reached at its last use, for isc status.
                "problem": getattr(d.lun, "problem", None),
            }
            for d in self.destinations
        ]
        # From the first checkpoint on, a missing one is a lost one (see _load).
        meta["checkpointed"] = self._checkpointed or meta.get("checkpointed", False)
        # An older journal found at the next open is a backup's (see _load).
        meta["checkpoint"] = self._checkpoint_seq
        meta["source_stamp"] = self._stamp
        return meta

    def site(self, site, credentials: Credentials | None = None):
        """The site of each of this session's destinations: its own isc agent for one added
        with a site (:meth:`add_destination`), reached with ``credentials``; an RBD image's
        cluster for one (:func:`isc.rbd.with_rbd`); ``site`` for the others: an agent
        there is asked in this session's name, and names itself in the session file before
        it protects or rolls back one (:meth:`_may_hold`: that may hold the export)."""
        from isc.rbd import with_rbd

        if isinstance(site, AgentSite):  # the --site of the others: asked in this name too
            site = AgentSite.at(site.address, site.credentials, site.timeout, self._holder)
            site.before_send = partial(self._may_hold, where=site.where)
        own = {name: where for name, where in self._sites.items() if where is not None}
        agents: dict[str, RemoteSite] = {
            where: _Holding(self._agent(where, credentials), self.claimed) for where in own.values()
        }
        routed = RoutingSite({n: agents[w] for n, w in own.items()}, site) if own else site
        return with_rbd(routed, self.session, self._targets, self._holder)

    @property
    def _holder(self) -> dict:
        """This session as the holder of the agents' exports and RBD images it copies to
        (:func:`isc.remote.session_holder`; :mod:`isc.agent`, :mod:`isc.rbd`)."""
        return session_holder(self.meta["id"], self.meta["name"])

    def _agent(self, where: str, credentials: Credentials | None) -> AgentSite:
        """The isc agent at ``where`` (an address :func:`isc.remote.agent_address` reads),
        asked in this session's name (:attr:`_holder`)."""
        return AgentSite.at(agent_address(where), credentials, holder=self._holder)

    def _may_hold(self, op: str, dest: Destination, where: str) -> None:
        """Before request ``op`` about ``dest`` goes to the agent at ``where`` (a ``--site``,
        connected: :attr:`isc.remote.AgentSite.before_send`): for a protect or rollback,
        which takes an export no session holds (:mod:`isc.agent`), record durably that
        ``dest``'s export may be held for this session there, so that a crash after the
        request leaves a hold :meth:`release` knows. Once per agent; the record of a
        running copy (:meth:`begin_copy`) gets it too. Raises ``StateError`` once the
        session is closed, ``ParameterError`` for a destination not its own, and
        ``OSError`` when the file cannot be written."""
        if op not in ("protect", "rollback"):
            return
        name = dest.name
        with self._meta_lock:
            known = self._held_at.get(name)
            if known is None:
                raise ParameterError(f"{self.meta['name']} has no destination {name!r}")
            if any(same_agent(where, other) for other in known):
                return
            if self._closed:
                raise StateError(f"{self.meta['name']} is closed; open it again to protect")
            known.append(where)
            for entry in self._recorded["destinations"] if self._receiving else []:
                if entry["name"] == name:
                    entry["held_at"] = list(known)
            self._write_meta_locked()

    @staticmethod
    def held(dest: dict) -> bool:
        """Whether this session may hold ``dest`` (a destination's record) where
        :meth:`release` lets it go: at its agent (a site of its own, or an agent a
        ``--site`` named, ``held_at``) or in its RBD image's metadata."""
        from isc import rbd

        return bool(_agents_of(dest)) or rbd.is_rbd(dest["target"])

    def release(self, dest: dict, credentials: Credentials | None) -> list[str]:
        """Let ``dest`` (a destination's record) go from this session's hold, before
        :meth:`remove_destination` takes it out (a crash between leaves it in the session,
        free: its next update claims it again, or remove-dest finds it released):
        :func:`release_destination`, reached with ``credentials``."""
        return release_destination(dest, self._holder, credentials, self._timeout)

    def destination(self, name: str) -> Destination:
        """The destination named ``name``; ``ParameterError`` naming those there are."""
        dest = next((d for d in self.destinations if d.name == name), None)
        if dest is None:
            names = ", ".join(d.name for d in self.destinations) or "none"
            raise ParameterError(
                f"{self.meta['name']} has no destination {name!r} (it has {names})"
            )
        return dest

    def remove_destination(self, name: str) -> Destination:
        """Take destination ``name`` out of the session, save the metadata (as
        :meth:`add_destination` does) and close its LUN, whose data stays as it is; return it.

        Raises ``ParameterError`` for an unknown name and ``StateError`` while a
        copy to it runs (from :meth:`begin_copy` to :meth:`save`); nothing changes then.
        """
        dest = self.destination(name)
        if dest in self._receiving:
            raise StateError(
                f"a copy to destination {name} of {self.meta['name']} is running; remove it "
                "once the copy ends"
            )
        self.destinations.remove(dest)
        del self._targets[name]
        del self._sites[name]
        del self._held_at[name]
        self.identities.pop(name, None)
        self.claimed.discard(name)
        self._save_destinations()
        dest.lun.close()
        if (lock := self._dest_locks.pop(name, None)) is not None:
            lock.close()
        return dest

    def add_destination(
        self,
        target: str,
        name: str | None = None,
        site: str | None = None,
        credentials: Credentials | None = None,
    ) -> Destination:
        """Add a NEW destination (a path or an NBD URI) and save the metadata (the record
        of a running copy stays, :meth:`begin_copy`: a crash still ends that copy).

        ``site``: the ``isc agent`` (``HOST:PORT`` or ``unix:PATH``, its control
        port) that exports ``target`` as ``name`` and protects it, remembered
        for :meth:`site`; it is asked about the export first, with
        ``credentials``. Raises ``ParameterError`` for a duplicate name, a
        destination smaller than the source, a target that is, under whatever
        spelling (a symlink, a hard link, a relative path; the same device and
        inode, or the same URI), the source, a destination already or the save
        area file, a file of the state directory (or in any session's: :func:`_in_session`),
        a path that names a file by
        a process's descriptor
        (``/proc/self/fd/N``), and a site that is not an agent's address, that cannot be
        reached or has no such export, or with a target that is not an NBD
        URI. NBD URIs compare as strings: two URIs of one export pass. Nothing
        changes then.
        """
        from isc import rbd

        name = name or Path(target).name or target
        problem = self._clash(target, name)
        nbd = is_uri(target) and not rbd.is_rbd(target)
        if problem is None and site is not None and not nbd:
            problem = (
                f"{target} is not an NBD URI: a destination at a site (--site) is the agent's "
                "NBD export, through which the agent protects what is written to it"
            )
        if problem is not None:
            raise ParameterError(problem)
        agent = None if site is None else self._agent(site, credentials)
        claimed = False
        lun = _open_named(target, "the destination", self._timeout, self.meta["id"])
        dest = Destination(lun, name)
        try:
            # The file opened, not the path checked above: a link put there since.
            _check_distinct(self.directory, self.source, [*self.destinations, dest])
            what = f"destination {name} at {target}"
            lock = DestinationLock(lun, what) if isinstance(lun, FileLUN) else None
        except BaseException:
            lun.close()
            raise
        try:
            if lun.size < self.source.size:
                problem = (
                    f"destination {name} holds {lun.size} bytes, less than the source's "
                    f"{self.source.size}"
                )
            elif agent is not None:
                ack = agent.status(dest, self._timeout)
                if ack.ok and "holder" in ack.info:  # an agent that holds exports: claim it
                    ack = agent.claim(dest, self._timeout)
                    claimed = ack.ok and is_holder(ack.info.get("holder"))
                if not ack.ok:
                    # The agent knows an export by the destination's name alone (isc.agent).
                    unknown = ack.reason == f"no export named {name!r}"
                    named = " (the name must be its export's: --name)" if unknown else ""
                    problem = f"cannot add {name} at site {agent.where}: {ack.reason}{named}"
            elif rbd.is_rbd(target):  # the image's metadata names its holder
                why = rbd.claim(target, self._holder, self._timeout or DEFAULT_TIMEOUT)
                problem = None if why is None else f"cannot add {name}: {why}"
            if problem is not None:
                raise ParameterError(problem)
        except BaseException:
            # Whatever ends the add (a refusal, a bug or ^C in the site's status) leaves
            # nothing open: a lock held on would refuse the same file's next add as held.
            lun.close()
            if lock is not None:
                lock.close()
            raise
        if lock is not None:
            self._dest_locks[name] = lock
        self._targets[name] = target
        self._sites[name] = None if agent is None else agent.where
        self._held_at[name] = []
        if claimed:
            self.claimed.add(name)
        self.destinations.append(dest)
        self._save_destinations()
        return dest

    def _clash(self, target: str, name: str) -> str | None:
        """Why ``target`` named ``name`` cannot be a new destination of this session, or None."""
        from isc import rbd

        session = self.meta["name"]
        if any(d.name == name for d in self.destinations):
            return f"{session} already has a destination named {name}"
        if problem := _by_descriptor(target):
            return problem
        taken = [(self.meta["source"], f"is the source of {session}")]
        taken += [
            (self._targets[d.name], f"is already destination {d.name} of {session}")
            for d in self.destinations
        ]
        if self.session.save_area.path is not None:
            taken.append((self.session.save_area.path, f"is the save area of {session}"))
        taken += [
            (str(p), f"is {p.name}, a file of the state directory of {session}")
            for p in self.directory.iterdir()
        ]
        identity = _identity(target)
        for other, what in taken:
            if identity is not None and identity == _identity(other):
                return f"{target} {what}; give another LUN"
        if not is_uri(target) and not rbd.is_rbd(target):  # another session's log, say
            return _in_session(Path(target), "give a LUN outside every session's")
        return None

    def close(self) -> None:
        """Checkpoint exactly, save the metadata and release everything. Idempotent.

        The source's stamp saved now (its mtime, taken while it is still
        locked) lets the next open see a write made while no session held it.
        A copy still running in another thread keeps its record (:meth:`begin_copy`):
        the checkpoint holds it half way, and the next open ends it as failed.
        """
        if self._closed:
            return
        try:
            self._stop_checkpointer()
            if self._log is not None:
                self.checkpoint()
            if self._source_lock is not None:
                self._stamp = {**self._source_lock.stamp(), "closed": True}
            self._save_destinations()
        finally:
            self._release()

    def _stop_checkpointer(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _release(self) -> None:
        """Close the log, the journal, the LUNs, the save area and the lock, writing nothing."""
        self._closed = True
        with self._checkpoint_lock:
            if self._log is not None:
                self.session.bitmap.log_writes(None)
                self._log.close()
                self._log = None
            if self._journal is not None:
                self._journal.close()
        for dest in self.destinations:
            dest.lun.close()
        for lock in self._dest_locks.values():
            lock.close()
        self._dest_locks.clear()
        self.session.save_area.close()
        self.source.close()
        if self._source_lock is not None:
            self._source_lock.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> PersistentSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- copies of a persistent session --------------------------------------------------


def _agents_of(dest: dict) -> list[str]:
    """The agents that may hold ``dest``'s export (a destination's record) for its session:
    its own site, and those a ``--site`` named (``held_at``; none in a record of before)."""
    return ([dest["site"]] if dest.get("site") else []) + dest.get("held_at", [])


def release_destination(
    dest: dict, holder: dict, credentials: Credentials | None, timeout: float | None
) -> list[str]:
    """Let ``dest`` (a destination's record) go from ``holder``'s hold (its session's,
    :func:`isc.remote.session_holder`): at each agent that may hold it (its own site, then
    those ``held_at`` names), reached with ``credentials``, or in its RBD image's metadata,
    each waiting ``timeout`` seconds. Returns a line for each place it could not (why, and
    the fix); none when it is not :meth:`PersistentSession.held`. An agent or image that
    answers that another session holds it holds nothing of this one's (a forced ``isc
    release`` or ``rbd image-meta remove`` let it go)."""
    from isc import rbd

    name, kept = dest["name"], []
    for where in _agents_of(dest):
        agent = AgentSite.at(agent_address(where), credentials, holder=holder)
        ack = agent.release(Destination(None, name), timeout)
        if not ack.ok and not (ack.held and is_holder(ack.info.get("holder"))):
            kept.append((ack.reason, f"isc release {where} {name}"))
    if rbd.is_rbd(dest["target"]):
        why = rbd.release(dest["target"], holder, timeout or DEFAULT_TIMEOUT)
        if why is not None:
            image = rbd.RBDImage.parse(dest["target"]).spec
            kept.append((why, f"rbd image-meta remove {image} {rbd.HOLDER_KEY}"))
    return [
        f"{name} stays held for {holder['name']} ({why}); let it go there: {fix}"
        for why, fix in kept
    ]


def agent_sites(stored: PersistentSession) -> set[str]:
    """The names of ``stored``'s destinations that have an isc agent of their own."""
    return {d["name"] for d in stored.meta["destinations"] if d.get("site")}


def check_agents(stored: PersistentSession, site, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Rule 12 at the agents, before a copy or update relies on ``stored``'s destinations:
    :func:`isc.update.check_identities` of those with an isc agent of their own, and of the
    RBD images (whose status reads their holder, :mod:`isc.rbd`), asked at ``site``
    (:meth:`PersistentSession.site`), each waiting ``timeout`` seconds. Every copy and
    update of a session directory (``isc copy``, ``isc update``, and ``isc serve``'s
    control port and periodic updates) runs it. Returns a line for each found to be another
    file, held by another session, or held by none though this session held it
    (:attr:`PersistentSession.claimed`: let go meanwhile) (it becomes NEW: its next copy is
    a full one; the copy leaves a held one out, :attr:`PersistentSession.held_elsewhere`)."""
    from isc import rbd

    images = {d["name"] for d in stored.meta["destinations"] if rbd.is_rbd(d["target"])}
    agents = agent_sites(stored) | images
    stored.held_elsewhere.clear()
    return check_identities(
        site,
        stored.destinations,
        stored.identities,
        agents,
        timeout,
        stored.held_elsewhere,
        stored.claimed,
    )


class _Holding(RemoteSite):
    """A destination's own isc agent (``agent``), whose protect and rollback answers that
    name this session the export's holder (:mod:`isc.agent`: ``info["holder"]``) add the
    destination to ``claimed`` (:attr:`PersistentSession.claimed`): a protect that took an
    export no session held, after a forced release the last status found, is known."""

    def __init__(self, agent: AgentSite, claimed: set[str]) -> None:
        self.agent = agent
        self.claimed = claimed

    def protect(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._noted(dest, self.agent.protect(dest, timeout))

    def rollback(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self._noted(dest, self.agent.rollback(dest, timeout))

    def unprotect(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self.agent.unprotect(dest, timeout)

    def status(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self.agent.status(dest, timeout)

    def _noted(self, dest: Destination, ack: Ack) -> Ack:
        holder, ours = ack.info.get("holder") or {}, self.agent.holder
        if ack.ok and is_holder(holder) and ours is not None and holder["id"] == ours["id"]:
            self.claimed.add(dest.name)
        return ack


def copy_destinations(stored: PersistentSession) -> list[Destination]:
    """``stored``'s destinations; ``StateError`` when it has none."""
    if not stored.destinations:
        raise StateError(
            f"{stored.meta['name']} has no destinations; add one with isc add-dest first"
        )
    return stored.destinations


class Progress:
    """A copy's progress hook: a bar on a terminal, and a checkpoint every ``every`` bytes.

    The checkpoints let a marked copy cut short by a crash resume without
    resending what they confirmed; the destinations are flushed before each,
    so none confirms data a destination could still lose. :func:`copy` turns
    them off for an unmarked full copy, which confirms nothing before it
    ends (a crash in it leaves everything to send). ``also(done, total)`` is
    called after each run too.
    """

    def __init__(
        self,
        stored: PersistentSession,
        *,
        every: int = CHECKPOINT_EVERY,
        also: Callable[[int, int], object] | None = None,
        bar: bool | None = None,
    ) -> None:
        self.stored = stored
        self.every = every
        self.also = also
        self.show = sys.stderr.isatty() if bar is None else bar
        self.checkpoints = True
        """Whether this copy takes checkpoints (reset by :meth:`close`)."""
        self._bar = None
        self._checkpointed = 0

    def __call__(self, done: int, total: int) -> None:
        # Not after the last run: the copy's end is saved right after it.
        if self.checkpoints and done - self._checkpointed >= self.every and done < total:
            try:
                self.stored.checkpoint()  # it flushes the copy's destinations first
            except OSError as exc:
                # A destination that dropped out of the copy cannot flush; the
                # older checkpoint and the logs still cover everything.
                log.warning("%s: checkpoint skipped: %s", self.stored.meta["name"], exc)
            self._checkpointed = done
        if self.show:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
                )
            self._bar.update(done - self._bar.n)
        if self.also is not None:
            self.also(done, total)

    def close(self) -> None:
        """End one copy's bar; the hook can serve the next copy."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._checkpointed = 0
        self.checkpoints = True


def copy(
    stored: PersistentSession,
    mode: str,
    *,
    progress: Progress | None = None,
    started: Callable[[CopyJob], object] | None = None,
    **copy_options,
) -> CopyResult:
    """Copy ``stored``'s source to all its destinations; ``mode`` is one of ``COPY_MODES``.

    The copy is recorded before it writes (``begin_copy``) and its outcome
    saved after it, whether it succeeds or raises. ``copy_options`` go to
    :class:`CopyJob`; ``started(job)`` is called before the job runs (to
    cancel it from elsewhere). A ``full`` copy of a marked session is the marked
    full copy of its mark: every chunk joins that mark's transfer bitmap, which
    needs no chunk written since the mark (``StateError`` otherwise, changing
    nothing: their data at the mark is gone). Raises what the copy job raises. A
    destination :func:`check_agents` found held by another session, or replaced at its
    agent's path, is left out (``StateError`` when none is left).
    """
    dests = [d for d in copy_destinations(stored) if d.name not in stored.held_elsewhere]
    if not dests:
        held = "; ".join(stored.held_elsewhere.values())
        raise StateError(f"{stored.meta['name']} has no destination of its own to copy to: {held}")
    progress = progress or Progress(stored)
    progress.checkpoints = mode != "full-unmarked"
    job = CopyJob(stored.session, dests, progress=progress, **copy_options)
    if started is not None:
        started(job)
    of_mark = mode == "full" and stored.session.bitmap.marked
    if of_mark:
        _mark_every_chunk(stored.session)
    stored.begin_copy(dests, mode)
    try:
        if of_mark:
            return dataclasses.replace(job.incremental(), mode="full")
        if mode == "incremental":
            return job.incremental()
        return job.full(marked=mode == "full")
    finally:
        progress.close()
        stored.save()


def _mark_every_chunk(session: Session) -> None:
    """Make the mark of ``session`` a full one, its point in time unchanged.

    Since nothing was written since the mark, the source is still the image
    at the mark: marking again, in full, freezes that same image (the
    generation moves on). In a served session a host write may land between
    the check and the new mark; the copy then holds it too: a point in time
    a moment later, as consistent.
    """
    bitmap = session.bitmap
    if bitmap.tracking_count:
        raise StateError(
            f"{session.name} is marked (generation {session.generation}) and "
            f"{bitmap.tracking_count} chunk(s) were written since: a full copy of that mark "
            "cannot be made; unmark it (isc unmark) and run the full copy again"
        )
    session.unmark()
    session.mark(full=True)


def update(stored: PersistentSession, workflow, progress: Progress) -> list[CopyResult]:
    """Run one update of ``workflow``, recorded as :func:`copy` records a copy.

    ``workflow`` is a :class:`~isc.update.PeriodicUpdate` of ``stored``'s
    session whose copies report to ``progress`` (its checkpoints). Returns
    and raises what ``workflow.run()`` does; the outcome is saved either way.
    """
    stored.begin_copy(workflow.destinations, "incremental")
    try:
        return workflow.run()
    finally:
        progress.close()
        stored.save()


def _encode(meta: dict) -> bytes:
    return json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n"


def _read_meta(directory: Path) -> dict:
    path = directory / METADATA
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"{directory} holds no isc session (no {METADATA}); create one") from None
    except NotADirectoryError:
        raise StateError(
            f"{directory} is not an isc session directory: give the directory isc create made"
        ) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptMetadata(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptMetadata(f"{path} is not an isc session file")
    if meta.get("version") != VERSION:
        raise CorruptMetadata(
            f"{path} has version {meta.get('version')!r}; this isc reads version {VERSION}"
        )
    problem = _meta_problem(meta)
    if problem:
        raise CorruptMetadata(f"{path}: {problem}")
    return meta


def _count(value: object, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _samples_ok(samples: object) -> bool:
    """Whether ``samples`` is a list of [chunk, crc32] pairs (isc.fingerprint)."""
    return isinstance(samples, list) and all(
        isinstance(s, list) and len(s) == 2 and _count(s[0]) and _count(s[1]) and s[1] < 1 << 32
        for s in samples
    )


def _is_site(value: object) -> bool:
    """Whether ``value`` is an agent's address (:func:`isc.remote.agent_address`)."""
    try:
        return isinstance(value, str) and agent_address(value) is not None
    except ParameterError:
        return False


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a session file's fields, or None.

    Every field is checked here, so a damaged file fails at open with its name
    rather than later inside a host write or a copy.
    """
    for key, kind in (("name", str), ("source", str)):
        if not isinstance(meta.get(key), kind):
            return f"field {key!r} is missing or not a {kind.__name__}"
    for key, low in (("granularity", 1), ("region_size", 1), ("max_hot", 1), ("epoch", 0)):
        if not _count(meta.get(key), low):
            return f"field {key!r} is missing or not an integer >= {low}"
    if not _count(meta.get("generation", 0), 0):
        return "field 'generation' is not an integer >= 0"
    if meta.get("pull_epoch") is not None and not _count(meta["pull_epoch"], 0):
        return "field 'pull_epoch' is not null or an integer >= 0"
    if not _count(meta.get("hot_limit", 1), 1):
        return "field 'hot_limit' is not an integer >= 1"
    if "id" in meta and not (_count(meta["id"], 1) and meta["id"] < 1 << 64):
        return "field 'id' is not an integer from 1 to 2**64 - 1"
    region, granularity = meta["region_size"], meta["granularity"]
    if region < granularity or region & (region - 1):
        return f"region_size {region} is not a power of two >= the granularity {granularity}"
    area = meta.get("save_area", False)
    if area is not None and not (
        isinstance(area, dict)
        and (area.get("capacity") is None or _count(area.get("capacity"), 1))
        and isinstance(area.get("path"), (str, type(None)))
    ):
        return "field 'save_area' is not null nor {capacity: bytes or null, path: str or null}"
    dests = meta.get("destinations")
    if not isinstance(dests, list):
        return "field 'destinations' is missing or not a list"
    states = tuple(state.value for state in DestState)
    for dest in dests:
        if not (
            isinstance(dest, dict)
            and isinstance(dest.get("name"), str)
            and isinstance(dest.get("target"), str)
            and dest.get("state") in states
            and (dest.get("epoch") is None or _count(dest.get("epoch")))
            and _samples_ok(dest.get("samples", []))
            and dest.get("protected_state") in (None, *states)
            and isinstance(dest.get("problem"), (str, type(None)))
            and (dest.get("site") is None or _is_site(dest["site"]))
            and isinstance(dest.get("held_at", []), list)
            and all(_is_site(where) for where in dest.get("held_at", []))
            and isinstance(dest.get("identity"), (str, type(None)))
            and isinstance(dest.get("claimed", False), bool)
        ):
            return (
                f"destination {dest!r} is not {{name, target, site, held_at, identity, claimed, "
                "state, epoch, samples, protected_state, problem}"
            )
    names = [dest["name"] for dest in dests]
    if len(set(names)) != len(names):
        return f"destination names repeat: {names}"
    if not isinstance(meta.get("checkpointed", False), bool):
        return "field 'checkpointed' is not true or false"
    if not _count(meta.get("checkpoint", 0)):
        return "field 'checkpoint' is not an integer >= 0"
    stamp = meta.get("source_stamp")
    if stamp is not None and not (
        isinstance(stamp, dict)
        and set(stamp) <= {*_IDENTITY, *BIRTH_KEYS, "size", "mtime_ns", "closed"}
        and all(type(value) is int for key, value in stamp.items() if key != "closed")
        and isinstance(stamp.get("closed", False), bool)
    ):
        return (
            f"field 'source_stamp' is not null nor {{dev, ino, size, mtime_ns, closed}}: {stamp!r}"
        )
    copy = meta.get("copy")
    if copy is not None and not (
        isinstance(copy, dict)
        and copy.get("mode") in COPY_MODES
        and isinstance(copy.get("destinations"), list)
        and all(name in names for name in copy["destinations"])
    ):
        return f"field 'copy' is not {{mode, destinations of this session}}: {copy!r}"
    return None


def create_session(
    directory: str | os.PathLike[str],
    source: str,
    *,
    granularity: int = 65536,
    name: str | None = None,
    save_area: tuple[int, str | None] | None = None,
    region_size: int = DEFAULT_REGION_SIZE,
    max_hot: int = DEFAULT_MAX_HOT,
    hot_limit: int = DEFAULT_HOT_LIMIT,
) -> None:
    """Create a persistent session for ``source`` in ``directory`` (made if missing).

    ``region_size``, ``max_hot`` and ``hot_limit`` set the write-intent log
    (see the module docstring): a machine crash resends at most about
    ``max(max_hot, hot_limit) * region_size`` bytes, and random writes over
    more than that wait for a log record at their first write to a region.
    ``save_area`` is ``(capacity, path or None)``: a file's path must name
    nothing yet (the session creates the file at each open and removes it at
    close). Raises ``StateError`` when the directory already holds a session
    or the files of one, or another session holds the source (its lock);
    ``ParameterError`` for bad parameters (a ``name`` over
    :data:`~isc.remote.HOLDER_TEXT` characters too), a save area smaller than one chunk
    or larger than any file can be (:func:`~isc.savearea.unfit`: a capacity of no whole
    number of chunks is
    kept as given), a save area path that exists or lies
    in ``directory`` (its names are the session's files'), a directory inside
    another session's directory or around one (:func:`_nested`), or a directory
    that is another user's or writable by others (it is made 0755);
    and the errors of :func:`open_lun` for a source that cannot be opened;
    nothing is written then.
    """
    path = Path(directory)
    if name is not None and len(name) > HOLDER_TEXT:
        raise ParameterError(
            f"the session's name is {len(name)} characters long: at most {HOLDER_TEXT}, which "
            "its agents and RBD images keep to name it"
        )
    if (path / METADATA).exists():
        raise StateError(f"{path} already holds an isc session; open it or choose another")
    if path.is_dir():
        _check_private(path)
    leftovers = path.is_dir() and any(
        p.name == journal.NAME or _LOG.match(p.name) or _WRITES.match(p.name)
        for p in path.iterdir()
    )
    if leftovers:
        # They would be read as this session's state at its first open.
        raise StateError(f"{path} holds files of an earlier isc session; choose an empty directory")
    if problem := _nested(path):
        raise ParameterError(problem)
    if problem := _by_descriptor(source):
        raise ParameterError(problem)
    with _open_named(source, "the source") as lun:
        Session(lun, granularity)  # validates the granularity against the source
        if not is_uri(source):
            SourceLock(source, lun).close()  # refuses a source another session holds
        size = lun.size
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name or path.absolute().name,
        "source": source,
        "granularity": granularity,
        "save_area": {"capacity": save_area[0], "path": save_area[1]} if save_area else None,
        "region_size": region_size,
        "max_hot": max_hot,
        "hot_limit": hot_limit,
        "epoch": 0,
        "destinations": [],
        "id": _new_id(),
    }
    problem = _meta_problem(meta)
    if problem:
        raise ParameterError(f"cannot create a session in {path}: {problem}")
    if save_area is not None and (problem := unfit(save_area[0], granularity, size)):
        raise ParameterError(problem)
    if save_area is not None and save_area[1] is None:
        SaveArea(save_area[0]).close()  # refuses one too large to map: every open would fail
    area = save_area[1] if save_area else None
    if area is not None and os.path.lexists(area):
        raise ParameterError(
            f"save area path {area} exists: isc creates its save area file itself (and "
            "removes only that); give the path of a new file"
        )
    if area is not None and not os.path.isdir(os.path.dirname(os.path.abspath(area))):
        raise ParameterError(f"save area path {area}: its directory does not exist")
    if area is not None and path.is_dir() and os.path.samefile(os.path.dirname(area) or ".", path):
        # Its name could be one the session's files take (checkpoint.journal,
        # .lock): each later open would then refuse the file isc did not create.
        raise ParameterError(
            f"save area path {area} lies in the session directory {path}, whose names are "
            "isc's own files'; give a path outside it"
        )
    if area is not None and (problem := _in_session(Path(area), "give a path outside it")):
        raise ParameterError(f"save area path {problem}")
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomically(path / METADATA, _encode(meta))


def _nested(path: Path) -> str | None:
    """Why ``path`` cannot be a new session's state directory, lying in another
    session's or holding one, or None.

    A state directory holds its session's files alone: another session's directory
    there takes names they take (one named ``checkpoint.journal`` stopped every open)
    and keeps :func:`destroy_session` from removing it. Up, :func:`_in_session`. Down,
    every directory ``path`` already holds (symbolic links not followed): a walk as long
    as its tree.
    """
    if problem := _in_session(path, "give a directory outside every session's"):
        return problem
    if path.is_dir():
        for inner, _, _, dir_fd in os.fwalk(path):
            if inner != str(path) and (name := _session_named(dir_fd)) is not None:
                return (
                    f"{path} holds {os.path.realpath(inner)}, the state directory of session "
                    f"{name}, which holds its own files alone; give a directory that holds "
                    "no session"
                )
    return None


def _in_session(path: Path, fix: str) -> str | None:
    """Why ``path`` (a directory, or a file to be, of a new session or destination) lies in
    a session's state directory, which holds its own files alone, ending with ``fix``; or
    None. The directories themselves are walked, by device and inode, whatever path
    names them: from the deepest one of ``path`` that exists, each parent (``..``) to the
    root."""
    existing = path
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd, up = os.open(existing, flags), 0
    try:
        while (name := _session_named(fd)) is None:
            parent = os.open("..", flags, dir_fd=fd)
            top = os.path.samestat(os.fstat(parent), os.fstat(fd))
            os.close(fd)
            fd, up = parent, up + 1
            if top:
                return None
    except OSError:
        return None  # a parent it may not read: no session of this user's above
    finally:
        os.close(fd)
    outer = Path(os.path.realpath(existing))
    for _ in range(up):
        outer = outer.parent
    return (
        f"{path} lies in {outer}, the state directory of session {name}, which holds its own "
        f"files alone; {fix}"
    )


def _session_named(dir_fd: int) -> str | None:
    """The name of the session whose state directory ``dir_fd`` is, or None."""
    try:
        fd = os.open(
            METADATA, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    with open(fd, "rb") as file:
        try:
            meta = json.loads(file.read()) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        return str(meta.get("name"))
    return None


def open_session(
    directory: str | os.PathLike[str],
    *,
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    reset: bool = False,
    timeout: float | None = None,
) -> tuple[PersistentSession, Recovery]:
    """Open the session in ``directory``, recovering from a crash if there was one.

    The source is locked (:class:`SourceLock`) until :meth:`~PersistentSession.close`.
    A source written or replaced while no isc process held it (its stamp
    moved, see :func:`_source_change`) may differ anywhere from every
    destination: every chunk is tracked, a mark ends, the consistent
    destinations become inconsistent and ``Recovery.source_changed`` says why.

    ``reset=True`` starts again when the bitmap is lost or damaged: the
    checkpoint and log files are not read, every chunk is tracked and every
    destination becomes NEW, so the next copy of each is full.

    ``timeout`` bounds, in seconds, every wait for the NBD server of the
    source or a destination (:func:`open_lun`).

    Raises ``StateError`` when there is no session, or another process holds
    it or its source, or the source's size changed, or a destination's path
    names the source's file (or another destination's) by now; ``CorruptMetadata``
    naming the file when a file is corrupt, truncated, foreign, missing (a
    checkpoint the session file or a log shows was written) or unreadable;
    ``ParameterError`` when the save area path names a file isc did not
    create, or the directory is another user's or writable by others (its
    session file names what isc writes). Nothing is overwritten then.
    """
    path = Path(directory)
    _read_meta(path)  # a directory that holds no session gets no lock file
    _check_private(path)
    lock = _lock(path)
    try:
        # Read under the lock: a process that held it since the read above may
        # have saved a change, which the open would otherwise overwrite at its save.
        meta = _read_meta(path)
        stored, recovery = _recover(path, meta, checkpoint_interval, reset, timeout)
    except BaseException:
        os.close(lock)
        raise
    stored._lock_fd = lock
    return stored, recovery


@dataclass(frozen=True)
class StoredState:
    """A state directory as its files describe it, read without opening the session.

    ``bitmap`` is the newest checkpoint (None before the first open, or when
    ``damage`` says why the checkpoint or a log cannot be used: the next open
    refuses until a reset). When ``in_use``, another process holds the
    session: the bitmap is as of its last checkpoint and ``meta`` as of its
    last save. Otherwise ``pending_regions`` counts the regions logged before
    a crash, which the next open tracks again, and ``source_changed`` says
    why the next open will track every chunk (see :func:`open_session`).
    """

    meta: dict
    bitmap: DeltaBitmap | None
    in_use: bool
    pending_regions: int
    damage: str | None = None
    source_changed: str | None = None


def read_state(directory: str | os.PathLike[str], *, tries: int = 5) -> StoredState:
    """Read a session's files without taking its lock or writing anything.

    Raises ``StateError`` when there is no session (or its files kept
    changing under ``tries`` reads) and ``CorruptMetadata`` naming the file
    when the session file is corrupt, truncated or foreign; a damaged or
    missing checkpoint or log is reported in ``damage``.
    """
    path = Path(directory)
    for attempt in range(tries):
        meta = _read_meta(path)
        in_use = is_held(path)
        damage = None
        try:
            _, loaded, regions, _ = _load(path, meta, with_logs=not in_use)
            bitmap = loaded and loaded.bitmap
        except FileNotFoundError:
            continue  # the holder's checkpoint deleted a log being read: read again
        except CorruptMetadata as exc:
            if in_use and attempt < tries - 1:
                continue  # the read fell between the holder's checkpoint and its log's deletion
            bitmap, regions, damage = None, set(), str(exc)
        changed = None if in_use else _source_change_now(meta)
        return StoredState(meta, bitmap, in_use, len(regions), damage, changed)
    raise StateError(f"{path} kept changing while it was read; try again")


_OWN_FILES = re.compile(
    r"(session\.json|serve\.json|\.lock|checkpoint\.journal|activity(\.\d+|-spare)\.(log|writes)"
    r"|\.(session\.json|checkpoint\.journal)\.tmp)\Z"
)
"""The names of the files a session keeps in its directory (the layout above)."""


def destroy_session(
    directory: str | os.PathLike[str],
    credentials: Credentials | None = None,
    timeout: float | None = None,
) -> tuple[list[str], list[str] | None]:
    """Delete the session in ``directory``: let each destination it may hold go
    (:func:`release_destination`, reached with ``credentials``, each agent or cluster
    waiting ``timeout`` seconds), then delete its files and the directory. Returns the
    files' names, and a line for each hold it could not let go (why, and the fix): best
    effort, the session goes whatever its sites say; None when it held none.

    Released first: killed before its files go, it is still a session that destroy
    releases and removes. The source, the destinations and a save area file are not
    touched. Refuses, removing and releasing nothing, with ``StateError`` when
    ``directory`` is not an isc session directory (no session file of isc's format: one
    that cannot be read is not taken for one), another process holds the session (its
    lock, held while releasing and deleting), or the directory holds anything isc did
    not put there (other files, subdirectories, symbolic links: those are never
    followed); ``ParameterError`` when ``directory`` itself is a symbolic link.
    """
    path = Path(directory)
    if path.is_symlink():
        raise ParameterError(f"{path} is a symbolic link; give the session directory itself")
    try:
        meta = json.loads((path / METADATA).read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        raise StateError(f"{path} is not an isc session directory; nothing removed") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(
            f"{path / METADATA} is not an isc session file; nothing removed (if {path} held "
            "a session, remove it by hand)"
        )
    lock = _lock(path)
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with os.scandir(dir_fd) as entries:
                names = {e.name: e.is_file(follow_symlinks=False) for e in entries}
            foreign = sorted(n for n, plain in names.items() if not (plain and _OWN_FILES.match(n)))
            if foreign:
                raise StateError(
                    f"{path} holds files isc did not make ({', '.join(foreign)}): move them "
                    "out and destroy it again; nothing removed"
                )
            kept = _release_all(path, meta, credentials, timeout)
            # The session file goes last but the lock: stopped halfway, what is
            # left is still a session that destroy removes.
            last = [METADATA, ".lock"]
            ordered = sorted(set(names) - set(last)) + [n for n in last if n in names]
            for name in ordered:
                os.unlink(name, dir_fd=dir_fd)
            _fsync_dir(path)
        finally:
            os.close(dir_fd)
    finally:
        os.close(lock)
    try:
        path.rmdir()
    except OSError as exc:
        raise StateError(
            f"the session's files in {path} are removed, but the directory stays: "
            f"{exc.strerror} (something was put in it meanwhile)"
        ) from None
    return ordered, kept


def _release_all(
    path: Path, meta: dict, credentials: Credentials | None, timeout: float | None
) -> list[str] | None:
    """For :func:`destroy_session`: let each destination of the session ``meta`` (``path``'s
    session file) may hold go (:func:`release_destination`); a line for each hold it could
    not let go, None when it held none (a session file of before ids held none)."""
    problem = _meta_problem(meta)
    if problem is not None:
        return [
            f"{path / METADATA} is damaged ({problem}): which exports it holds cannot be "
            "told; let each go at its agent (isc release SITE EXPORT) or image (rbd "
            "image-meta remove IMAGE isc.holder)"
        ]
    held = [d for d in meta["destinations"] if PersistentSession.held(d)]
    if "id" not in meta or not held:
        return None
    holder = session_holder(meta["id"], meta["name"])
    return [line for d in held for line in release_destination(d, holder, credentials, timeout)]


def _source_change_now(meta: dict) -> str | None:
    """:func:`_source_change` of a session not held, from the file at its source's path."""
    if is_uri(meta["source"]):
        return None
    try:
        # Opened, as the session's open stamps it: the inode's generation and birth time
        # tell a file recreated at the source's inode from it, which a stat cannot.
        fd = os.open(meta["source"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"{meta['source']} cannot be checked: {exc.strerror or exc}"
    try:
        now = _stamp(os.fstat(fd), fd)
    finally:
        os.close(fd)
    return _source_change(meta.get("source_stamp"), now, meta["source"])


def _load(
    path: Path, meta: dict, *, with_logs: bool
) -> tuple[int, journal.Loaded | None, set[int], list[tuple[int, int]]]:
    """The highest generation, the journal's newest checkpoint, the regions logged since it
    and the ``(offset, length)`` byte ranges to track again (:mod:`isc.activity`).

    Raises ``CorruptMetadata`` naming the file that is damaged, unreadable
    or does not fit the metadata, or the checkpoint that is missing though
    the session file or a log shows it was written (an empty bitmap would
    lose every change it held), before anything is opened or written. A
    checkpoint cut short by a crash is left out while the logs since the one
    before it are there (a newer checkpoint on disk deletes them).
    """
    logs = sorted(_logs(path))
    where = path / journal.NAME
    try:
        loaded = journal.read(where)
    except FileNotFoundError:
        loaded = None
    except OSError as exc:
        raise CorruptMetadata(f"{where} cannot be read: {exc.strerror or exc}") from None
    generation, bitmap = 0, None
    if loaded is not None:
        generation, bitmap = loaded.seq, loaded.bitmap
        if bitmap.granularity != meta["granularity"]:
            raise CorruptMetadata(
                f"{where} tracks at {bitmap.granularity} bytes, {path / METADATA} says "
                f"{meta['granularity']}"
            )
        if loaded.torn and with_logs and generation not in {gen for gen, _ in logs}:
            raise CorruptMetadata(
                f"{where}: {loaded.torn}, and the activity logs since checkpoint {generation} "
                "were deleted: it was whole once, and is damaged"
            )
        if with_logs and logs and generation not in {gen for gen, _ in logs}:
            # The log begun with the newest checkpoint lives until a newer one is on
            # disk: logs without it beside a whole journal mean the journal is not
            # this directory's own (another session's, or an older copy of it), whose
            # bitmap would silently lose what this one tracked.
            raise CorruptMetadata(
                f"{where} ends at checkpoint {generation}, but the activity logs beside it "
                f"are of checkpoints {', '.join(str(gen) for gen, _ in logs)}: it is not this "
                "session's (another's, or an older copy): put its own back"
            )
        if generation < meta.get("checkpoint", 0):
            # Its own logs may be put back beside it too: the session file says more.
            raise CorruptMetadata(
                f"{where} ends at checkpoint {generation}, but {path / METADATA} records "
                f"checkpoint {meta['checkpoint']}: it is an older copy of this session's (a "
                "backup's), whose bitmap lacks what was tracked since: put its own back"
            )
        closed = (meta.get("source_stamp") or {}).get("closed")
        if closed and bitmap.generation > meta.get("generation", bitmap.generation):
            # A clean close saves the file after its last checkpoint, and the next open
            # saves it again before any mark: a mark past the one it records is newer.
            raise CorruptMetadata(
                f"{path / METADATA} was saved at a clean close after mark {meta['generation']}, "
                f"but {where} holds mark {bitmap.generation}, made since: it is an older copy "
                "of this session's file (a backup's), whose destination states are stale: put "
                "its own back"
            )
        if loaded.session and meta.get("id") and loaded.session != meta["id"]:
            raise CorruptMetadata(
                f"{where} holds the checkpoints of session {loaded.session:#x}, "
                f"{path / METADATA} is session {meta['id']:#x}: it is not this session's: "
                "put its own back"
            )
    elif meta.get("checkpointed") or meta["epoch"] or meta["destinations"]:
        raise CorruptMetadata(_lost(path, f"{path / METADATA} records one"))
    regions: set[int] = set()
    resend: list[tuple[int, int]] = []
    region = meta["region_size"]
    for gen, log_path in [(gen, p) for gen, p in logs if gen >= generation and with_logs]:
        records = read_log(log_path, meta.get("id", 0))
        if records and bitmap is None:
            raise CorruptMetadata(_lost(path, f"{log_path} records writes"))
        for first, last in records:
            if last * region >= bitmap.size:
                raise CorruptMetadata(f"{log_path}: region {last} lies outside the tracked LUN")
            regions.update(range(first, last + 1))
        writes = None
        if bitmap is not None:
            writes = read_writes(
                path / f"activity.{gen}.writes", gen, bitmap.chunks, meta.get("id", 0)
            )
        if writes is not None:
            g = bitmap.granularity
            resend += [(first * g, (last + 1 - first) * g) for first, last in writes.tolist()]
        else:
            resend += [(first * region, (last + 1 - first) * region) for first, last in records]
    return max([generation, *(gen for gen, _ in logs)]), loaded, regions, resend


def _logs(path: Path) -> list[tuple[int, Path]]:
    """``(generation, path)`` of every activity log in ``path``."""
    found = []
    for p in path.iterdir():
        match = _LOG.match(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return found


def _read_file(path: Path) -> bytes:
    """The bytes of a log; ``CorruptMetadata`` naming it when it cannot be read.

    ``FileNotFoundError`` passes: the holder's checkpoint may have just deleted it.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptMetadata(f"{path} cannot be read: {exc.strerror or exc}") from None


def _lost(path: Path, evidence: str) -> str:
    return (
        f"the checkpoint ({journal.NAME}, the tracking bitmap) in {path} is missing though "
        f"{evidence}: the changes it held are lost"
    )


def is_held(directory: Path) -> bool:
    """Whether a process holds the session in ``directory`` (its lock), read without waiting."""
    try:
        fd = os.open(directory / ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _lock(directory: Path) -> int:
    """Hold the directory's lock file: one process at a time opens a session."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"{directory} is in use by another isc process") from None
    return fd


def _new_id() -> int:
    """A new session's ``id``: random, never 0 (a journal's "no session named")."""
    return secrets.randbits(64) or 1


def _check_private(directory: Path) -> None:
    """Refuse a state directory another user could change: its session file names the
    LUNs isc reads and writes, so whoever may write it chooses them."""
    problem = others_may_change(os.stat(directory))
    if problem is not None:
        raise ParameterError(
            f"session directory {directory} {problem}, as its files name what isc writes: "
            f"chmod go-w {directory} (and chown it to you)"
        )


def _recover(
    path: Path, meta: dict, checkpoint_interval: float, reset: bool, timeout: float | None
) -> tuple[PersistentSession, Recovery]:
    if reset:
        # The checkpoint and logs are not read: they are what may be lost or damaged.
        last = max([meta.get("checkpoint", 0), *(gen for gen, _ in _logs(path))])
        loaded, regions, resend = None, set(), []
        meta = {key: value for key, value in meta.items() if key != "copy"}
        meta["pull_epoch"] = None  # the bitmaps are lost: a pull backup needs a full mark
        meta["destinations"] = [
            {**d, "state": DestState.NEW.value, "epoch": None, "protected_state": None}
            for d in meta["destinations"]
        ]
    else:
        try:
            last, loaded, regions, resend = _load(path, meta, with_logs=True)
        except CorruptMetadata as exc:
            raise CorruptMetadata(
                f"{exc}; isc recover {path} --reset-destinations starts again with full copies"
            ) from None
    # A session file of an earlier isc names no session: it gets its id now, saved
    # with the checkpoint below (until then its journal is checked as before).
    meta.setdefault("id", _new_id())
    try:
        stored = PersistentSession(path, meta, loaded and loaded.bitmap, timeout)
    except IscError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptMetadata(f"{path / METADATA}: {type(exc).__name__}: {exc}") from None
    try:
        recorded = None if reset else meta.get("source_stamp")
        changed = _source_change(recorded, stored._stamp, meta["source"])
        recovery = _repair(stored, regions, resend, meta.get("copy"), changed)
        if reset:
            stored.session.bitmap.record_write(0, stored.source.size)
        stored._start(last + 1, checkpoint_interval, loaded)
        stored.checkpoint()
        # After the checkpoint: an interrupted copy's end is recorded last. From
        # here on the file says a checkpoint exists and no clean close stamped the
        # source (a crash now leaves the session's own writes in its mtime).
        stored.save()
    except BaseException:
        stored._stop_checkpointer()
        stored._release()
        raise
    return stored, recovery


def _repair(
    stored: PersistentSession,
    regions: set[int],
    resend: list[tuple[int, int]],
    copy: dict | None,
    changed: str | None,
) -> Recovery:
    """Apply what the logs, an unfinished copy and the source's stamp say (rules 2, 6, 9, 11).

    ``resend`` holds the ``(offset, length)`` ranges the logs say may hold
    writes since the last checkpoint; ``regions`` the region log's regions.
    """
    session = stored.session
    size = stored.source.size
    saved = session.bitmap.saved_count > 0
    interrupted = copy is not None or (session.bitmap.marked and (bool(resend) or saved))
    if session.bitmap.marked and (interrupted or changed):
        # The save area did not survive (or the point in time is void): the copy
        # is over (rule 2 keeps what it owed).
        session.unmark()
    if changed:
        # Written outside the session: any chunk may differ from every destination.
        session.bitmap.record_write(0, size)
        for dest in stored.destinations:
            if dest.state is DestState.CONSISTENT:
                dest.state = DestState.INCONSISTENT
        log.warning("%s: %s: every chunk is tracked again", stored.meta["name"], changed)
    offsets = np.array([offset for offset, _ in resend], dtype=np.int64)
    lengths = np.minimum([length for _, length in resend], size - offsets).astype(np.int64)
    session.bitmap.record_writes(offsets, lengths)
    resent = int(lengths.sum())
    if copy is not None and copy["mode"] == "full-unmarked":
        # It cleared tracking as it began; where it stopped is unknown.
        session.bitmap.record_write(0, size)
    elif copy is not None:
        # What it cleared reached every destination of the copy and no other.
        before = session.epoch
        session.epoch += 1
        for dest in stored.destinations:
            if dest.name in copy["destinations"] and dest.epoch == before:
                dest.epoch = session.epoch
    recovery = Recovery(
        crashed=bool(resend) or copy is not None,
        interrupted_copy=interrupted,
        regions_resent=len(regions),
        bytes_resent_bound=resent,
        source_changed=changed,
    )
    if recovery.crashed:
        log.warning(
            "%s: recovered after a crash: %d byte(s) written since the last checkpoint "
            "tracked again%s",
            stored.meta["name"],
            resent,
            f", {copy['mode'] if copy else 'interrupted'} copy failed" if interrupted else "",
        )
    return recovery
