"""``isc agent``: a remote array that holds destinations and protects them on request.

The agent exports the regular files of its directory over NBD (export name =
file name) and answers administrative requests on a control port. Symlinks,
special files, subdirectories and dotfiles are not exported: each name is
checked with ``lstat`` and opened with ``O_NOFOLLOW``, and the file opened
must be the one ``lstat`` saw (device and inode), so a symlink swapped in
meanwhile is refused too.

Each export serves the descriptor opened at start until the agent exits. A file
renamed over ``DIR/NAME`` later, or ``NAME`` renamed away or deleted, would leave
it serving a file no name reaches while its ``status`` still named that file's
identity, and an update would report the destination consistent. So each
control request about an export first checks that ``DIR/NAME`` still names the
file served (:meth:`Export.refusal`: device, inode and birth); while it does
not, every request but ``release`` is refused (``"replaced": true``, one line
naming the path, what is there now and the fix: restart the agent, so that it
exports the file now at that name; :meth:`Agent._on_export` says why
``unprotect`` is refused and ``release`` served), and so is every new NBD
connection to it (:meth:`Export.unavailable`, at the handshake). A file
replaced between a protect and the copy's writes takes those writes over the
connection opened after the protect: the update's unprotect, or the next
update's status, is refused, and the destination is not reported consistent
(:mod:`isc.update`).

Protection is durable (rule 8): a protected export has a **journal** in the
agent's state directory ``DIR/.isc-agent/`` (``NAME.journal``), which a
restarted agent finds again. No reflink or LVM snapshot is used: the journal
works on every filesystem.

===========  ====================================  ================================
export       on disk                               a write to it over NBD
===========  ====================================  ================================
unprotected  no journal                            goes to the file
protected    ``NAME.journal``: a header, then the  first write to each 64 KiB chunk
             original data of every chunk          since the protect: the chunk's
             written since the protect             data is appended to the journal
                                                   and fsynced, then the write
                                                   proceeds; later writes to it go
                                                   straight to the file
===========  ====================================  ================================

Requests, each durable before its reply is sent:

* ``protect`` and ``rollback`` first **fence** the export
  (:meth:`~isc.nbd.NBDServer.fence`): every NBD connection open to it is cut,
  the requests it sent that have not started are dropped unanswered (a WRITE
  whose payload was still arriving too), and the writes running are waited
  for, up to :data:`~isc.nbd.server.FENCE_SECONDS`. So no write of a killed
  ``isc update`` (received, held in the server) lands after the answer, over
  what the next update sends or a rollback restored. When one does not end
  in time (a hung file), the request is refused with the reason and nothing
  changes. A client that writes after a protect connects after its answer,
  as ``isc update`` does (:mod:`isc.update`).
* ``protect`` writes the journal's header (temp file, fsync, rename, fsync of
  the directory). An export already protected stays as it is ("already
  protected", ``"kept": true``): the first image is kept. One whose journal
  lost its image is refused. The reply's ``info["image"]`` names the image
  protected: a random id in the header, new at each protect and rollback;
  ``info["identity"]`` the file protected, as ``status`` names it; ``info["holder"]``
  the session that holds the export then (below), as ``status`` names it.
* ``unprotect`` removes the journal and fsyncs the directory. A request that
  names the ``image`` its protect replied with gets, in ``extents``, the
  ranges rollbacks rewrote since (another client's rollback while an update
  copied: what the copy wrote there was undone, :mod:`isc.update` tracks it
  again); the whole export when the agent cannot tell: it restarted since
  that protect while no session held the export, or a ``release`` let the
  export go since (the holder's own or a forced one: another session may have
  claimed it and written anywhere, under a protect of its own that kept the
  image or under none, and the holder's update, still copying after a forced
  release, then tracks everything rather than call it consistent). The
  rollbacks and releases are remembered while the agent runs; one restarted
  while a session held the export still tells about the image protected then
  (a release removes the holder record: none came between). With no release
  and no rollback between its protect and its unprotect (or status), an update
  is told nothing undone, and resends nothing for it.
  Each protect, kept ones too, replies with a new ``info["lease"]``; an
  unprotect that names a lease other than the last protect's leaves the
  protection as it is ("kept": a later protect holds it): an update's
  unprotect that reached the agent late (its client gave up on the answer)
  cannot drop the protection the next update kept and copies under. One
  without a lease (``isc unprotect``), or after a restart, drops it.
* ``rollback`` checks every record, writes each saved chunk back, flushes the
  export, then replaces the journal with an empty one of a new image (temp
  file, rename): the export is protected afresh at the image it holds again.
  Its reply's ``info["identity"]`` names the file rolled back, and ``info["holder"]``
  the session that holds the export then, as ``status`` names them.
  A crash midway repeats it on the next rollback.
* ``status`` reports ``protected``, ``intact``, ``saved_bytes``,
  ``saved_chunks``, ``problem`` and ``extents`` (the ranges a rollback would
  rewrite), ``image`` while protected, ``size`` and ``identity``
  (:func:`export_identity`: the machine, device and inode of the file
  served, and the inode's generation and birth time where the file system
  keeps them), which ``isc update`` records and checks (rule 12). A request
  that names an ``image`` gets ``undone`` too: the ranges ``unprotect``
  would list (an update that failed asks, to track them).

**Holder** (rule 12 across sites): an export is the destination of one session at
a time, its holder: ``{"id", "name", "machine"}`` (:func:`isc.remote.session_holder`:
the session's random 64-bit id decides; its name and machine are for messages), in
``NAME.holder`` of the state directory (JSON, written as the journal's header is: temp
file, fsync, rename, fsync of the directory; a crash leaves the old record or the new,
and a temp file left over is never read). Requests name theirs in ``holder``:

* ``claim`` (``isc add-dest --site``) takes an export that no session holds;
  ``protect`` and ``rollback`` take one too (a session added before holders existed
  claims its export at its next update), once nothing refuses them (the holder, a lost
  image, the fence) and before they change the export: a refused one takes nothing, and
  a crash leaves no protection or rollback of a session that does not hold the export;
  ``unprotect`` takes none.
* ``protect``, ``rollback``, ``unprotect`` and ``claim`` of a session other than the
  holder are refused (``"held": true``, ``info["holder"]``), changing nothing: two
  sessions' copies would leave the export a mix of both. So is a request that names
  **no** holder while one holds the export: an older client cannot prove it is the
  holder. One that names none on an export no session holds is served as before.
* ``release`` lets the export go, and every image protected before it is wholly
  undone for an ``unprotect`` or ``status`` that names it (above): the holder's own
  (``isc remove-dest``), or with ``"force": true`` whoever holds it (``isc release
  ADDRESS NAME``, the operator's, once the holding session is gone). Only a client the
  control port let in asks (its authentication, rule 14).
* ``status`` names the ``holder`` (null when none) and ``holder_problem`` when the
  record cannot be read. A damaged record is not "no holder": every request that
  changes the export, and every claim, is refused naming it until a forced release.
  Nor is one that is not a regular file, or that another user may write (it must be
  the agent's user's or root's, writable by its owner alone, as credentials are:
  :func:`isc.auth.others_may_change`): whoever may write it could name any session.
  Nor does the agent start on a state directory (or a directory to serve) that another
  user may write, in one line naming the fix (``chmod go-w``): whoever may write it
  could unlink a record, which frees the export for a second session, or put a link at
  a record's temp name, through which the agent would write.

One agent serves a directory at a time: it holds a ``flock`` of the directory itself
from its start (before it opens an export) to its end, and a second ``isc agent`` of it
is refused in one line naming the first's process. Each keeps the holders in memory,
read at its start: two would each let a session claim an export the other's holds. The
lock goes with the process, so an agent killed (SIGKILL) is restarted as usual.

Journal format: a header (``ISCJRNL3``, chunk size, export size, the export
file's device and inode, the image's 8-byte id, which of the inode's generation and
birth time the file system keeps and their values (:func:`isc.lun.file_birth`: a file
recreated at the inode of a deleted one is another file), CRC-32) and fixed
slots of a 32-byte record head (chunk, first slot and slot count of its batch,
data length, data CRC-32, head CRC-32) plus one chunk of data. A journal of
the earlier format (``ISCJRNL2``, without the birth) is read and compared on
the fields it has; the next rollback (or a protect after an unprotect) writes
this one. One write appends one batch and waits for its fsync. After a crash,
a batch that is not whole (a torn record: a slot whose CRCs fail, or a file
that ends inside it) is dropped and cut off:
the write that waited for it never happened. A bad slot *before* the last
whole batch is damage, not a crash: the protection reads "not intact" with
the problem, and rollback is refused. So is a journal whose header names
another file (the export was replaced) or is damaged. The way out is an
``unprotect`` (``isc unprotect SESSION DEST``), which the problem names.
(Damage inside the last batch cannot be told from a torn save: it is
dropped as one.)

Costs: every request about an export looks its path up once (an ``open`` with
``O_PATH``, an ``fstat`` and a ``statx``, about 25 µs: no data read; so does each
NBD handshake), never an NBD read or write. A claim (and the first protect of an
export none holds) writes and fsyncs one small file and the directory; the
other requests compare the holder in memory.
The first write to a chunk after a protect costs a read of the chunk,
a journal append and an ``fdatasync``; rewriting it costs nothing more; a
journal holds at most the whole export plus 32 bytes a chunk. A failed append
(disk full, I/O error) fails the write that needed it, which reaches the NBD
client as an error: the journal keeps the image intact rather than let a
write through unsaved; what reached the journal of that save is cut off, and
if even that fails, every later write that needs a save fails until a
rollback or unprotect. Loading a journal at start and a rollback read it
whole. A rollback holds off new writes of the connections its fence did not
cut (those opened since) while it runs, but one of theirs already past its
save may land after it: roll back while no copy writes. A fence costs a
turn of the server's event loop and the time the writes it waits for take;
it holds the export's other requests (status) meanwhile.

Control protocol (:mod:`isc.control`: newline-delimited JSON over TCP, or
over a Unix socket of mode 0600 that only the agent's user reaches). A
request is ``{"id": N, "op": OP, "export": NAME}`` with OP one of
``protect``, ``unprotect`` (and ``"image": ID``, ``"lease": ID``, optional), ``rollback``,
``status``, ``claim``, ``release`` (and ``"force": true``, optional), each but ``status``
with ``"holder": {"id": HEX16, "name": TEXT, "machine": TEXT}`` (optional) (and ``list``,
which needs no export). Every reply is ``{"id": N,
"ok": true|false, "reason": TEXT|null, "extents": [[offset, length], ...],
"info": {...}}`` (``extents``: the byte ranges a rollback rewrote, for
``unprotect`` since the image). An unknown export gets
``ok: false`` with the reason, like any bad request; one whose path no longer
names the file served, ``"replaced": true`` too.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from isc.auth import Credentials, others_may_change
from isc.control import ControlServer, Op
from isc.errors import IscError, ParameterError, StateError
from isc.lun import BIRTH_KEYS, FileLUN, ForwardingLUN, file_birth, same_birth
from isc.nbd import NBD_PORT
from isc.remote import PROTECT_GRANULARITY, holder_text, is_holder, saved_extents
from isc.store import _fsync_dir, write_atomically
from isc.tls import ServerTLS

if TYPE_CHECKING:
    from isc.nbd import NBDServer

log = logging.getLogger(__name__)

EXPORT_OPS = ("protect", "unprotect", "rollback", "status", "claim", "release")
"""The requests about one export (they name it in ``export``)."""

HOLDER_SUFFIX = ".holder"
"""``NAME.holder`` in the state directory: the session that holds export NAME."""

STATE_DIR = ".isc-agent"
"""The agent's state directory inside the directory it serves."""

_MAGIC = b"ISCJRNL3"
# magic, chunk size, export size, st_dev, st_ino, image, which of the file's generation
# and birth time are known (bit 0, bit 1), its generation, its birth time (ns)
_HEADER = struct.Struct("<8sIQQQ8sBqq")
_EARLIER = (b"ISCJRNL2", struct.Struct("<8sIQQQ8s"))  # without the file's birth
_HEAD = struct.Struct("<QQIII")  # chunk, batch's first slot, batch's slot count, length, data CRC
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size
HEAD_SIZE = _HEAD.size + _CRC.size


def _sealed(packed: bytes) -> bytes:
    return packed + _CRC.pack(zlib.crc32(packed))


def _header(lun, identity: tuple[int, int], image: bytes, birth: dict[str, int]) -> bytes:
    known = sum(1 << bit for bit, key in enumerate(BIRTH_KEYS) if key in birth)
    born = (birth.get(key, 0) for key in BIRTH_KEYS)
    return _sealed(
        _HEADER.pack(_MAGIC, PROTECT_GRANULARITY, lun.size, *identity, image, known, *born)
    )


def _parse_header(data: bytes) -> tuple[tuple, bytes, dict[str, int], int] | None:
    """What a sealed journal header at the start of ``data`` names: ``(chunk size,
    export size, st_dev, st_ino)``, the image, the file's birth (:func:`file_birth`) and
    the header's length; None if damaged. A header of the earlier format
    (``ISCJRNL2``) names no birth."""
    for magic, layout, with_birth in ((_MAGIC, _HEADER, True), (*_EARLIER, False)):
        if data[:8] == magic and _sealed(data[: layout.size]) == data[: layout.size + _CRC.size]:
            fields = layout.unpack_from(data)
            birth = {}
            if with_birth:
                known, *born = fields[6:]
                birth = {
                    k: v
                    for bit, (k, v) in enumerate(zip(BIRTH_KEYS, born, strict=True))
                    if known >> bit & 1
                }
            return fields[1:5], fields[5], birth, layout.size + _CRC.size
    return None


class Journal:
    """The durable protection of one exported file (see the module docstring).

    Make one with :meth:`create` (protect); the constructor opens one found
    at start. ``write`` is the export's write path while protected.
    Thread-safe: one lock orders saves, rollback and close.
    """

    def __init__(
        self, path: Path, lun, identity: tuple[int, int], birth: dict[str, int] | None = None
    ) -> None:
        """Open the journal at ``path`` for ``lun`` (the file of device and inode ``identity``
        and, where known, of ``birth``: :func:`isc.lun.file_birth`)."""
        self.path = path
        self.lun = lun
        self.identity = identity
        self.birth = birth or {}
        self.granularity = PROTECT_GRANULARITY
        self._header_size = HEADER_SIZE  # an earlier format's is shorter
        self.slot = HEAD_SIZE + self.granularity
        self.problem: str | None = None
        """Why the protected image cannot be restored, or None while it is intact."""
        self.image = ""
        """Names the image the journal protects (hex, random): a new one at each protect
        and rollback, so a client can tell whether its protection was rolled back."""
        self._index: dict[int, int] = {}  # chunk -> slot
        self._slots = 0  # slots in the journal
        self._stuck: str | None = None  # why appending is unsafe until the next rollback
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            header = _parse_header(os.pread(self._fd, HEADER_SIZE, 0))
            if header is None:
                self.problem = f"{self.path} has a damaged header; {self._unprotect}"
            elif header[0] != (self.granularity, lun.size, *identity) or not same_birth(
                header[2], self.birth
            ):
                self.problem = (
                    f"{self.path} protects another file (its size, device, inode, generation "
                    f"or birth time differ from the export's): the export was replaced; "
                    f"{self._unprotect}"
                )
            else:
                self.image, self._header_size = header[1].hex(), header[3]
                self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def create(
        cls, path: Path, lun, identity: tuple[int, int], birth: dict[str, int] | None = None
    ) -> Journal:
        """Protect ``lun``: write an empty journal durably (making its directory) and open it."""
        _write_state(path, _header(lun, identity, os.urandom(8), birth or {}))
        return cls(path, lun, identity, birth)

    @property
    def _unprotect(self) -> str:
        """The way out of a lost image, with the isc verb that takes it."""
        return f"unprotect it (isc unprotect SESSION {self.path.name.removesuffix('.journal')})"

    # -- records -------------------------------------------------------------------------
    def _slot_offset(self, slot: int) -> int:
        return self._header_size + slot * self.slot

    def _chunk_length(self, chunk: int) -> int:
        return min(self.granularity, self.lun.size - chunk * self.granularity)

    def _read_slot(self, slot: int, buffer: bytearray) -> tuple[int, int, int, int] | None:
        """The head ``(chunk, first, count, length)`` of a whole, valid slot, else None.

        ``buffer`` (one slot long) receives the slot's bytes.
        """
        got = os.preadv(self._fd, [buffer], self._slot_offset(slot))
        if got < self.slot:
            return None
        head = bytes(buffer[: _HEAD.size])
        (crc,) = _CRC.unpack_from(buffer, _HEAD.size)
        if zlib.crc32(head) != crc:
            return None
        chunk, first, count, length, data_crc = _HEAD.unpack(head)
        chunks = -(-self.lun.size // self.granularity)
        if not (
            chunk < chunks
            and length == self._chunk_length(chunk)
            and first <= slot < first + count
            and zlib.crc32(memoryview(buffer)[HEAD_SIZE : HEAD_SIZE + length]) == data_crc
        ):
            return None
        return chunk, first, count, length

    def _recover(self) -> None:
        """Index the whole batches; drop a torn last batch; flag damage before it."""
        size = os.fstat(self._fd).st_size
        slots = max(0, -(-(size - self._header_size) // self.slot))  # a short last slot counts
        buffer = bytearray(self.slot)
        heads = [self._read_slot(slot, buffer) for slot in range(slots)]
        valid = [slot for slot, head in enumerate(heads) if head is not None]
        end = 0
        if valid:
            last = heads[valid[-1]]
            assert last is not None
            first, count = last[1], last[2]
            whole = first + count <= slots and all(heads[s] for s in range(first, first + count))
            end = first + count if whole else first
            damaged = [slot for slot in range(first) if heads[slot] is None]
            if damaged:
                self.problem = (
                    f"{self.path}: the record at byte {self._slot_offset(damaged[0])} is "
                    f"damaged; the protected image cannot be restored; {self._unprotect}"
                )
                return
        for slot in range(end):
            head = heads[slot]
            assert head is not None
            self._index.setdefault(head[0], slot)
        self._slots = end
        if size != self._slot_offset(end):
            # Cut the torn batch off, so that no part of it is read as a record later.
            os.ftruncate(self._fd, self._slot_offset(end))
            os.fsync(self._fd)
            log.warning("%s: dropped a torn record (a crash during a save)", self.path)

    def _append(self, chunks: list[int]) -> None:
        """Save the current data of ``chunks`` as one batch, durably; caller holds the lock.

        Raises ``OSError`` (saving nothing) when the journal cannot take it.
        """
        if self._stuck is not None:
            raise OSError(errno.EIO, self._stuck)
        first, count = self._slots, len(chunks)
        batch = bytearray(count * self.slot)
        view = memoryview(batch)
        for k, chunk in enumerate(chunks):
            at = k * self.slot
            length = self._chunk_length(chunk)
            data = view[at + HEAD_SIZE : at + HEAD_SIZE + length]
            self.lun.readinto(chunk * self.granularity, data)
            head = _sealed(_HEAD.pack(chunk, first, count, length, zlib.crc32(data)))
            batch[at : at + HEAD_SIZE] = head
        offset = self._slot_offset(first)
        try:
            while view:
                view = view[os.pwrite(self._fd, view, offset + len(batch) - len(view)) :]
            os.fdatasync(self._fd)
        except OSError as exc:
            # Whatever landed of the batch must not be read as records later
            # (a later, shorter batch would make it look whole).
            try:
                os.ftruncate(self._fd, offset)
                os.fsync(self._fd)
            except OSError as cut:
                self._stuck = (
                    f"{self.path} takes no more saves: a failed save ({exc.strerror or exc}) "
                    f"could not be cut off ({cut.strerror or cut}); roll back or unprotect"
                )
            raise
        for k, chunk in enumerate(chunks):
            self._index[chunk] = first + k
        self._slots += count

    # -- the export's write path -----------------------------------------------------------
    def write(self, offset: int, data) -> None:
        """Save the original data of the chunks ``data`` overwrites first, then write it.

        Raises what saving raised (``OSError``), writing nothing; a journal
        that is closed or no longer intact saves nothing.
        """
        length = memoryview(data).nbytes
        g = self.granularity
        with self._lock:
            # An empty write saves nothing; one out of range neither (the LUN refuses it).
            if (
                self._fd >= 0
                and self.problem is None
                and 0 <= offset < offset + length <= self.lun.size
            ):
                chunks = range(offset // g, (offset + length - 1) // g + 1)
                new = [c for c in chunks if c not in self._index]
                if new:
                    self._append(new)
        self.lun.write(offset, data)

    # -- requests --------------------------------------------------------------------------
    def rollback(self, checked: Callable[[], None] | None = None) -> tuple[tuple[int, int], ...]:
        """Write every saved chunk back and start afresh; return the byte ranges rewritten.
        ``checked`` is called once every record passed its check, before anything is
        written (what raises there stops the rollback, writing nothing).

        Raises ``IscError`` (writing nothing) when the journal is not intact
        or a record fails its check.
        """
        with self._lock:
            if self.problem is not None:
                raise IscError(f"the protected image was lost: {self.problem}")
            buffer = bytearray(self.slot)
            order = sorted(self._index.items())
            for _, slot in order:  # check everything before writing anything
                if self._read_slot(slot, buffer) is None:
                    raise IscError(
                        f"the protected image was lost: {self.path}: the record at byte "
                        f"{self._slot_offset(slot)} is damaged"
                    )
            if checked is not None:
                checked()
            for chunk, slot in order:
                self._read_slot(slot, buffer)
                length = self._chunk_length(chunk)
                self.lun.write(chunk * self.granularity, memoryview(buffer)[HEAD_SIZE:][:length])
            self.lun.flush()
            # Protected afresh, as a new image: an empty journal replaces this one whole,
            # so a crash before the rename leaves this one, to be rolled back again.
            image = os.urandom(8)
            write_atomically(self.path, _header(self.lun, self.identity, image, self.birth))
            self.image = image.hex()  # whatever follows: the image protected is a new one
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                # Saves into the journal replaced would be lost: writes fail instead.
                self._stuck = (
                    f"{self.path} could not be opened after a rollback replaced it "
                    f"({exc.strerror or exc}); roll back again or unprotect"
                )
                raise
            self._close_locked()
            self._fd = fd
            self._index.clear()
            self._slots = 0
            self._header_size = HEADER_SIZE  # in this format from now on
            self._stuck = None
            return saved_extents([c for c, _ in order], self.granularity, self.lun.size)

    def info(self) -> dict:
        with self._lock:
            chunks = sorted(self._index)
            return {
                "protected": True,
                "intact": self.problem is None,
                "saved_bytes": sum(self._chunk_length(c) for c in chunks),
                "saved_chunks": len(chunks),
                "problem": self.problem,
                "extents": [
                    list(e) for e in saved_extents(chunks, self.granularity, self.lun.size)
                ],
            }

    def drop(self) -> None:
        """Unprotect: remove the journal durably."""
        with self._lock:
            self._close_locked()
            self.path.unlink()
            _fsync_dir(self.path.parent)

    def close(self) -> None:
        """Close the journal, keeping it on disk (the agent stops). Idempotent."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_state(path: Path, data: bytes) -> None:
    """Write ``path`` of the state directory atomically (temp file, fsync, rename, fsync of
    the directory), making the directory (0700) first when it is missing."""
    try:
        path.parent.mkdir(mode=0o700)
        _fsync_dir(path.parent.parent)
    except FileExistsError:
        pass
    write_atomically(path, data)


def _read_holder(path: Path) -> tuple[dict | None, str | None]:
    """The holder ``path`` records (None: no file), and why it cannot be read (damaged:
    not a holder's JSON record; not a regular file; one another user may write, who
    could name any session there, :func:`isc.auth.others_may_change`) or None."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO there must not stall the agent's start
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | flags)) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None, f"{path} is not a regular file"
            if (problem := others_may_change(info)) is not None:
                return None, f"{path} {problem}"
            data = file.read(4096)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path} cannot be read ({exc.strerror or exc})"
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    if not is_holder(holder):
        return None, f"{path} is damaged (not a holder's record)"
    return holder, None


class Export(ForwardingLUN):
    """One exported file, opened at ``path`` (its name there names the export); its writes
    go through its journal while it is protected."""

    def __init__(self, path: Path, lun, journal_path: Path, identity: tuple[int, int]) -> None:
        super().__init__(lun)
        self.path = path
        self.name = path.name
        self.journal_path = journal_path
        self.identity = identity
        self._birth = file_birth(lun.fileno())
        self._lock = threading.Lock()
        self.journal: Journal | None = None
        self.server: NBDServer | None = None
        """The NBD server of the export (:func:`run_agent` sets it): fenced at each protect
        and rollback (:meth:`_fenced`)."""
        self._lease: str | None = None
        """The last protect's lease (:meth:`unprotect`): None while unprotected, and
        after a restart."""
        self._undone: dict[str, set[int]] = {}
        """Each image the agent can tell about (:meth:`_undone_locked`) -> the chunks
        rollbacks rewrote since it was protected: one it protected, or named to a protect
        (a kept one), or that the session holding the export at its start protected, since
        the last release; ended or not."""
        self.holder_path = journal_path.with_suffix(HOLDER_SUFFIX)
        self.holder, self._holder_problem = _read_holder(self.holder_path)
        """The session that holds the export (``{"id", "name", "machine"}``) or None; why
        its record cannot be read, or None (the module docstring)."""
        if journal_path.exists():
            self.journal = Journal(journal_path, lun, identity, self._birth)
            log.info("%s: protected (journal %s)", self.name, journal_path)
            if self.holder is not None and self.journal.problem is None:
                # Held at the start: no release since that session's protect left the
                # export to another (a release unlinks the record; a claim after it would
                # be the other session's, whose own release ends this image again).
                self._undone[self.journal.image] = set()

    def write(self, offset: int, data) -> None:
        journal = self.journal
        (journal if journal else self.lun).write(offset, data)

    def unavailable(self) -> str | None:
        """Why the export no longer serves the file at its path (:meth:`refusal`'s reason),
        or None while it does: its NBD server asks at each connection's handshake
        (:meth:`isc.nbd.export.LUNExport.unavailable`), so that no client is served a file
        no name reaches."""
        refused = self.refusal()
        return None if refused is None else refused["reason"]

    def refusal(self) -> dict | None:
        """The refusal of a request that relies on the export while ``DIR/NAME`` no longer
        names the file served (``"replaced": true`` and one line naming the fix), or of
        one while that cannot be told; None while it names it.

        The agent serves the descriptor it opened at its start; a file renamed over
        ``DIR/NAME``, or ``NAME`` renamed away or deleted, leaves it serving a file no
        name reaches, while the file at ``DIR/NAME`` is another. ``DIR/NAME`` is opened
        ``O_PATH | O_NOFOLLOW`` (as ``lstat`` looks: a symlink there is another file;
        nothing is read or locked) and compared by device and inode, then by the birth
        :func:`isc.lun.file_birth` reads of it (its birth time: a generation cannot be
        read through such a descriptor) as :func:`isc.lun.same_birth` compares them.
        """
        try:
            fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            now = "missing"
        except OSError as exc:
            reason = (
                f"{self.path} cannot be looked up ({exc.strerror or exc}): whether it is "
                f"still the file the agent serves as export {self.name} cannot be told"
            )
            return {"ok": False, "reason": reason}
        else:
            try:
                seen = os.fstat(fd)
                if (seen.st_dev, seen.st_ino) != self.identity or not stat.S_ISREG(seen.st_mode):
                    now = f"another file (device {seen.st_dev}, inode {seen.st_ino})"
                elif not same_birth(self._birth, file_birth(fd)):
                    now = "another file (its birth time differs)"
                else:
                    return None
            finally:
                os.close(fd)
        reason = (
            f"{self.path} is {now} now, not the file the agent serves as export {self.name} "
            "(opened at its start): restart the agent, so that it exports the file now at "
            "that name"
        )
        return {"ok": False, "replaced": True, "reason": reason}

    def _fenced(self) -> dict | None:
        """Fence the export's NBD server before a protect or rollback acts
        (:meth:`~isc.nbd.NBDServer.fence`): no write of a client connected before (a
        killed update's, held in the server) may land after the answer. None once
        fenced, else the refusal."""
        why = self.server.fence() if self.server is not None else None
        if why is None:
            return None
        return {
            "ok": False,
            "reason": f"{self.name}'s NBD server could not fence the clients connected "
            f"before: {why}; nothing was changed; ask again once the file answers",
        }

    # -- the holder ----------------------------------------------------------------
    def _held_locked(self, holder: dict | None) -> dict | None:
        """The refusal of a request of ``holder`` (None: a request that names none) while
        another session holds the export or its record is damaged, else None. Caller
        holds the lock."""
        fix = f"(isc release ADDRESS {self.name}, ADDRESS: this agent's --listen)"
        if self._holder_problem is not None:
            reason = (
                f"{self.name}'s holder record {self._holder_problem}: which session copies "
                f"into it cannot be told; release it if none does {fix}"
            )
            info = {"holder": None, "problem": self._holder_problem}
            return {"ok": False, "held": True, "reason": reason, "info": info}
        if self.holder is None or (holder is not None and holder["id"] == self.holder["id"]):
            return None
        held = self.holder
        reason = (
            f"{self.name} is held by {holder_text(held)}"
            + (": another session copies into it" if holder else ", and this request names none")
            + f"; remove it from that session, or release it if that session is gone {fix}"
        )
        return {"ok": False, "held": True, "reason": reason, "info": {"holder": held}}

    def _take_locked(self, holder: dict | None) -> None:
        """``holder`` takes the export when no session holds it (durably); once
        :meth:`_held_locked` let its request through. Caller holds the lock."""
        if self.holder is None and holder is not None:
            _write_state(self.holder_path, json.dumps(holder).encode())
            self.holder = holder
            log.info("%s: held by session %s (%s)", self.name, holder["name"], holder["id"])

    def claim(self, holder: dict | None) -> dict:
        """Hold the export for ``holder``, unless another session holds it."""
        if holder is None:
            return {"ok": False, "reason": f"a claim of {self.name} must name its session"}
        with self._lock:
            if (refused := self._held_locked(holder)) is not None:
                return refused
            self._take_locked(holder)
            return {"ok": True, "info": {"holder": holder}}

    def release(self, holder: dict | None, force: bool = False) -> dict:
        """Let the export go: ``holder``'s, or with ``force`` whoever holds it (the operator,
        after the holding session was lost) and a damaged record. Every image protected
        before is wholly undone from then on (:meth:`_undone_locked`)."""
        with self._lock:
            if not force and (refused := self._held_locked(holder)) is not None:
                return refused
            if self.holder is None and self._holder_problem is None:
                return {"ok": True, "reason": "not held"}
            self.holder_path.unlink(missing_ok=True)
            _fsync_dir(self.holder_path.parent)
            was, self.holder, self._holder_problem = self.holder, None, None
            # Every image protected so far is wholly undone for whoever names it from now
            # on: the session that held the export may still copy under it (a forced
            # release), while another claims it and writes anywhere, under a protect of
            # its own that keeps this image, or none; nothing else would tell the first.
            self._undone.clear()
            log.info("%s: released (was %s)", self.name, was)
            return {"ok": True, "info": {"holder": was}}

    # -- requests ------------------------------------------------------------------
    def protect(self, named: bool = False, holder: dict | None = None) -> dict:
        """Protect the export, or keep its protection; ``named``: the reply's ``info`` names
        the image protected (:attr:`image`), as it was when the lock was let go, and the
        file (its ``identity``, as :meth:`status` names it). Refused while another session
        than ``holder`` holds it; one that none holds ``holder`` takes."""
        with self._lock:
            if (refused := self._held_locked(holder)) is not None:
                return refused
            if self.journal is not None and self.journal.problem is not None:
                # Answering "already protected" would let an update overwrite
                # the export with no image left to roll back to.
                return {
                    "ok": False,
                    "reason": f"{self.name} is protected, but its protected image was lost "
                    f"({self.journal.problem}): it can no longer be rolled back",
                }
            refused = self._fenced()
            if refused is not None:
                return refused
            fenced = {} if self.server is None else {"fenced": True}  # the client reconnects
            # Taken once nothing refuses the protect, and before its journal: a crash
            # between the two leaves the export held and unprotected, which the session's
            # next protect takes up, never protected by a session that does not hold it,
            # which another session could claim and copy into under that image.
            self._take_locked(holder)
            if self.journal is not None:
                reply = {"ok": True, "reason": "already protected", "kept": True, **fenced}
            else:
                self.journal = Journal.create(
                    self.journal_path, self.lun, self.identity, self._birth
                )
                reply = {"ok": True, **fenced}
            self._undone.setdefault(self.journal.image, set())  # its unprotect is told
            self._lease = os.urandom(8).hex()
            if not named:
                return reply
            info = {"image": self.image, "identity": self._identity, "lease": self._lease}
            return {**reply, "info": {**info, "holder": self.holder}}

    @property
    def _identity(self) -> str:
        """What tells the file exported from any other (:func:`export_identity`)."""
        return export_identity(self.identity, self._birth)

    @property
    def image(self) -> str | None:
        """The protected image's name (:attr:`Journal.image`), None while unprotected."""
        journal = self.journal
        return journal.image if journal is not None else None

    def unprotect(
        self, image: str | None = None, lease: str | None = None, holder: dict | None = None
    ) -> dict:
        """Drop the protection, unless ``lease`` names another protect's than the last one
        (the module docstring). With ``image`` (the name a protect replied with), the
        reply's ``extents`` list what rollbacks rewrote since that protect
        (:meth:`_undone_locked`). Refused while another session than ``holder`` holds it."""
        with self._lock:
            if (refused := self._held_locked(holder)) is not None:
                return refused
            undone = self._undone_locked(image)
            told = {"extents": undone} if undone else {}
            if self.journal is None:
                return {"ok": True, "reason": "not protected", **told}
            if lease is not None and self._lease is not None and lease != self._lease:
                reason = "a later protect kept the protection: it stays"
                return {"ok": True, "reason": reason, "kept": True, **told}
            self.journal.drop()
            self.journal = None
            self._lease = None
            return {"ok": True, **told}

    def rollback(self, holder: dict | None = None) -> dict:
        """Write the protected image back; refused while another session than ``holder``
        holds the export (one that none holds ``holder`` takes)."""
        with self._lock:
            if (refused := self._held_locked(holder)) is not None:
                return refused
            if self.journal is None:
                return {"ok": False, "reason": f"{self.name} is not protected: no image to restore"}
            refused = self._fenced()
            if refused is not None:
                return refused
            fenced = {} if self.server is None else {"fenced": True}  # the client reconnects
            try:
                # Taken once every record passed its check, before the first is written
                # back: as for a protect, a crash after leaves no export rolled back to an
                # image that no session holds.
                extents = self.journal.rollback(functools.partial(self._take_locked, holder))
            except IscError as exc:
                return {"ok": False, "reason": str(exc)}
            rewritten = {
                c
                for o, n in extents
                for c in range(o // PROTECT_GRANULARITY, -(-(o + n) // PROTECT_GRANULARITY))
            }
            for chunks in self._undone.values():  # the image ended among them
                chunks |= rewritten
            self._undone[self.journal.image] = set()
            rewrote = [list(e) for e in extents]
            info = {"identity": self._identity, "holder": self.holder}
            return {"ok": True, "extents": rewrote, "info": info, **fenced}

    def status(self, image: str | None = None) -> dict:
        """What the protection holds; with ``image`` (a protect's), ``info["undone"]``:
        the ranges rollbacks rewrote since (:meth:`_undone_locked`)."""
        with self._lock:
            info = self.journal.info() if self.journal else {"protected": False}
            if self.journal is not None:
                info["image"] = self.journal.image
            if image is not None:
                info["undone"] = self._undone_locked(image)
            where = {"size": self.size, "identity": self._identity, "holder": self.holder}
            if self._holder_problem is not None:
                where["holder_problem"] = self._holder_problem
            return {"ok": True, "info": {**where, **info}}

    def _undone_locked(self, image: str | None) -> list[list[int]]:
        """The byte ranges rollbacks rewrote since ``image`` was protected: none while it is
        the protected image and no release let the export go since (or no image is named);
        all of the export when this agent cannot tell (:attr:`_undone`: it restarted since
        that image was protected while no session held the export, a release let the
        export go since, or the image is another agent's)."""
        if image is None:
            return []
        chunks = self._undone.get(image)
        if chunks is None:
            return [[0, self.size]]
        return [list(e) for e in saved_extents(sorted(chunks), PROTECT_GRANULARITY, self.size)]

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        super().close()


@functools.cache
def _machine() -> str:
    """This machine's id (systemd's machine-id), else its host name."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as file:
                if found := file.read().strip():
                    return found
        except OSError:
            continue
    return socket.gethostname()


def export_identity(identity: tuple[int, int], birth: dict[str, int]) -> str:
    """What tells an exported file from any other (a status reply's ``identity``): this
    machine's id and the file's device and inode, ``identity``, then ``/KEY=VALUE`` for
    each of ``birth`` (:func:`isc.lun.file_birth`: the inode's generation and birth
    time, where the file system offers them). A file replaced at its path (even one
    given the deleted file's inode number again), another agent's file at this one's
    address, another machine: another identity. On a file system with neither, a file
    recreated at the same inode keeps the identity; only the samples can tell."""
    device, inode = identity
    return f"{_machine()}:{device}:{inode}" + "".join(f"/{k}={v}" for k, v in birth.items())


def open_regular(path: Path) -> tuple[FileLUN, tuple[int, int]] | None:
    """Open ``path`` read-write if it is a regular file, not through a symlink; else None.

    Returns the LUN and the file's ``(st_dev, st_ino)``. A name that changed
    to something else between the check and the open is refused too.
    """
    try:
        seen = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(seen.st_mode):
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
            return None  # replaced by a symlink, removed, or a socket meanwhile
        raise
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino) or not stat.S_ISREG(
            opened.st_mode
        ):
            os.close(fd)
            return None
        # FileLUN.create's way of adopting a descriptor it opened itself.
        lun = FileLUN.__new__(FileLUN)
        lun._attach(fd, path, readonly=False)
    except BaseException:
        os.close(fd)
        raise
    return lun, (opened.st_dev, opened.st_ino)


def _serve_alone(directory: Path) -> int:
    """Lock ``directory`` for this agent alone (``flock`` of the directory itself, which
    makes no file there); the descriptor that holds the lock, released at its close or
    with the process (a SIGKILL too).

    Each agent reads the holder records at its start and keeps them in memory: two agents
    of one directory would each let a session claim an export the other's holds. Raises
    ``StateError`` naming the process that serves it when another agent does.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        found = os.fstat(fd)
        os.close(fd)
        # /proc/locks names the process that took a flock (not one that inherited it).
        inode = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
        try:
            lines = Path("/proc/locks").read_text().splitlines()
        except OSError:
            lines = []
        pids = [
            f[4]
            for f in map(str.split, lines)
            if f[1:3] == ["FLOCK", "ADVISORY"] and f[5:6] == [inode]
        ]
        by = f" (process {pids[0]})" if pids else ""
        raise StateError(
            f"{directory} is served by another isc agent{by}: one agent per directory, as "
            "each keeps its exports' holders in memory; stop that one first, or ask it"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Agent:
    """Serves the regular files of ``directory``: NBD exports plus the control protocol.

    Journals found in ``directory/.isc-agent`` make their exports protected
    again. Raises ``ParameterError`` when ``.isc-agent`` exists and is not a
    directory (a symlink, a file), or when it or ``directory`` is another user's or
    others may write it (:func:`isc.auth.others_may_change`): a file put in
    ``directory`` is exported, a journal put in ``.isc-agent`` is written into an
    export at the next rollback, and whoever may unlink or replace a holder record
    there frees an export for a second session. Raises ``StateError`` while another
    agent serves ``directory`` (:func:`_serve_alone`).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.state = self.directory / STATE_DIR
        """Where the journals live; made at the first protect."""
        if self.state.is_symlink() or (self.state.exists() and not self.state.is_dir()):
            raise ParameterError(
                f"{self.state} is not a directory; the agent keeps its protections there: "
                "move it away"
            )
        for path in (self.directory, self.state):
            try:
                problem = others_may_change(os.stat(path))
            except FileNotFoundError:
                continue  # the directory's is said below; the state directory is made 0700
            if problem is not None:
                raise ParameterError(
                    f"{path} {problem}, as isc agent exports what it holds and its journals "
                    f"and holder records say what it writes and for whom: chmod go-w {path} "
                    "(and chown it to you)"
                )
        self._alone = _serve_alone(self.directory)
        self.exports: dict[str, Export] = {}
        try:
            for path in sorted(self.directory.iterdir()):
                if path.name.startswith("."):
                    continue
                opened = open_regular(path)
                if opened is None:
                    log.info("%s is not a regular file: not exported", path)
                    continue
                lun, identity = opened
                try:
                    export = Export(path, lun, self.state / f"{path.name}.journal", identity)
                except BaseException:
                    lun.close()
                    raise
                self.exports[path.name] = export
        except BaseException:
            self.close()
            raise
        for journal in self.state.glob("*.journal"):
            if journal.name.removesuffix(".journal") not in self.exports:
                log.warning("%s protects no export of %s; left alone", journal, self.directory)
        ops: dict[str, Op] = {op: functools.partial(self._on_export, op) for op in EXPORT_OPS}
        ops["list"] = lambda _: {"ok": True, "info": {n: e.size for n, e in self.exports.items()}}
        self.control = ControlServer(
            ops, defaults={"extents": []}, credentials=credentials, insecure=insecure
        )
        """Answers the control protocol (the module docstring); with ``credentials``
        only to clients that authenticate (:mod:`isc.auth`), without them only to this
        user's unless ``insecure`` (:class:`~isc.control.ControlServer`)."""

    def _on_export(self, op: str, request: dict) -> dict:
        """Answer request ``op`` about one export.

        Each but ``release`` is refused while the export's path no longer names the file
        served (:meth:`Export.refusal`: ``"replaced": true``): ``status``, ``protect``,
        ``rollback`` and ``claim`` would vouch for, or take, a file no name reaches. So
        is ``unprotect``: an update whose copy went to the file served after it was
        replaced asks for it, and a "done" would let it report the destination
        consistent; after the restart the refusal names, the journal names another file
        than the one exported and an unprotect drops it. ``release`` is served: it
        changes no data, only which session holds the name, and a session removed or
        gone must be able to let it go."""
        name = request.get("export")
        export = self.exports.get(name) if isinstance(name, str) else None
        if export is None:
            return {"ok": False, "reason": f"no export named {request.get('export')!r}"}
        if op != "release" and (refused := export.refusal()) is not None:
            log.warning("%s %s: %s", op, export.name, refused["reason"])
            return refused
        image, lease, holder = (request.get(key) for key in ("image", "lease", "holder"))
        image = image if isinstance(image, str) else None
        if holder is not None and not is_holder(holder):
            return {
                "ok": False,
                "reason": 'a holder is {"id": 16 hex digits, "name": TEXT, "machine": TEXT}',
            }
        if op == "protect":  # named, so that its unprotect can tell what happened since
            reply = export.protect(named=True, holder=holder)
        elif op == "unprotect":
            reply = export.unprotect(image, lease if isinstance(lease, str) else None, holder)
        elif op == "status":
            reply = export.status(image)
        elif op == "release":
            reply = export.release(holder, force=request.get("force") is True)
        else:
            reply = getattr(export, op)(holder)
        log.info("%s %s: %s", op, export.name, reply.get("reason") or "ok")
        return reply

    def close(self) -> None:
        """Close the exports, then let the directory go (:func:`_serve_alone`);
        protections stay on disk for the next start."""
        for export in self.exports.values():
            export.close()
        if self._alone >= 0:
            os.close(self._alone)
            self._alone = -1


def run_agent(
    directory: str | Path,
    control: tuple[str, int] | str,
    *,
    nbd_port: int | None = None,
    ready=None,
    stop: threading.Event | None = None,
    tls: ServerTLS | None = None,
    credentials: Credentials | None = None,
    limits: Mapping[str, int] | None = None,
    insecure: bool = False,
) -> None:
    """Serve ``directory`` until ``stop`` is set (or the process is interrupted).

    Control requests on ``control``: ``(host, port)``, or the path of a Unix
    socket (:meth:`~isc.control.ControlServer.listen_unix`: mode 0600, in a
    directory of this user alone). The exports on NBD ports of the same host
    (127.0.0.1 beside a Unix socket) from ``nbd_port`` (default: the control
    port + 1; beside a Unix socket :data:`~isc.nbd.NBD_PORT`) in file-name
    order, each at ``nbd://HOST:PORT/NAME`` (port 0: any free ports).
    ``ready(agent, control_port, uris)`` is called once everything listens
    (``control_port`` None on a Unix socket). ``tls``: how the exports offer
    TLS; ``credentials``: the control port answers only clients that
    authenticate; ``limits``: each export's limits, :class:`~isc.nbd.NBDServer`'s
    keyword arguments (``max_clients``, ``max_data``, ``max_requests``). Unsecured
    (no ``credentials``; ``tls`` not required with peers verified) the control port and
    the exports serve this user (and root) alone, unless ``insecure``.
    """
    from isc.nbd import NBDServer

    agent = Agent(directory, credentials=credentials, insecure=insecure)
    servers = []
    stop = stop or threading.Event()
    if isinstance(control, str):
        host, base = "127.0.0.1", NBD_PORT if nbd_port is None else nbd_port
    else:
        host, base = control[0], control[1] + 1 if nbd_port is None else nbd_port
    try:
        uris = {}
        for offset, (name, export) in enumerate(agent.exports.items()):
            server = NBDServer(export, name=name, tls=tls, insecure=insecure, **(limits or {}))
            server.start(host, base + offset if base else 0)
            servers.append(server)
            export.server = server
            uris[name] = server.uri
            log.info("export %s at %s", name, server.uri)

        async def main() -> None:
            bound = None
            if isinstance(control, str):
                listening = await agent.control.listen_unix(control)
                log.info("control requests on unix:%s", control)
            else:
                listening = await agent.control.listen(*control)
                bound = listening.sockets[0].getsockname()[1]
                log.info("control requests on %s:%d", control[0], bound)
            if ready is not None:
                ready(agent, bound, uris)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, stop.wait)
            await agent.control.shut(listening)

        asyncio.run(main())
    finally:
        for server in servers:
            server.close()
        agent.close()
