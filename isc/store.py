"""Persistent sessions: a session's state in a directory, safe across crashes.

Layout of a state directory::

    session.json        metadata: source, granularity, save area, destinations,
                        epoch; rewritten atomically (temp file, fsync, rename,
                        fsync of the directory), versioned
    checkpoint.<K>      the delta bitmap (DeltaBitmap.to_bytes) at some instant
    activity.<K>.log    the write-intent log begun at that instant: one record
                        per region that became hot, written and fsynced before
                        the first write to the region proceeds

Crash safety without a synchronous metadata write per host write (the way
DRBD's activity log works): a write to a region (``region_size`` bytes,
default 4 MiB) that is already hot costs nothing extra; the first write to a
cold region waits for one small log append. A checkpoint freezes host writes
for an instant, copies the bitmap, forgets the hot regions and starts log
K+1, then writes ``checkpoint.K+1`` and deletes the older files. Checkpoints
run in the background when ``max_hot`` regions are hot (bounding what a crash
resends) and every ``checkpoint_interval`` seconds, and when the session is
closed, so a clean close leaves exact bitmaps.

Opening a directory after a crash loads the newest checkpoint, ends an
interrupted copy as failed (unmark: unsent chunks return to tracking, rule 2)
and adds every region of the logs to the tracking bitmap: no change is lost,
at most ``max_hot`` regions more are resent. Chunks a copy confirmed before
its last checkpoint are not resent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from isc._core import DeltaBitmap
from isc.copy import Destination, DestState
from isc.errors import CorruptMetadata, IscError, ParameterError, StateError
from isc.lun import FileLUN
from isc.savearea import SaveArea
from isc.session import DEFAULT_SAVE_AREA, Session

log = logging.getLogger(__name__)

METADATA = "session.json"
FORMAT = "isc-session"
VERSION = 1
DEFAULT_REGION_SIZE = 4 << 20
DEFAULT_MAX_HOT = 64
DEFAULT_CHECKPOINT_INTERVAL = 30.0
_RECORD = struct.Struct("<QQI")
_CHECKPOINT = re.compile(r"checkpoint\.(\d+)$")
_LOG = re.compile(r"activity\.(\d+)\.log$")


def open_lun(target: str):
    """Open a LUN from a path or an NBD URI (``nbd://``, ``nbd+unix://``)."""
    if target.startswith("nbd"):
        from isc.nbd import NBDLUN

        return NBDLUN(target)
    return FileLUN(target)


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ActivityLog:
    """Append-only, fsynced records of regions that became hot."""

    def __init__(self, directory: Path, generation: int) -> None:
        self.directory = directory
        self.generation = generation
        self._lock = threading.Lock()
        self._fd = self._open(generation)

    def _open(self, generation: int) -> int:
        path = self.directory / f"activity.{generation}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        _fsync_dir(self.directory)
        return fd

    def append(self, first: int, last: int) -> None:
        """Record regions first..last durably; return once they are on disk."""
        body = struct.pack("<QQ", first, last)
        record = _RECORD.pack(first, last, zlib.crc32(body))
        with self._lock:
            os.write(self._fd, record)
            os.fdatasync(self._fd)

    def rotate(self) -> int:
        """Start the next generation's file; return its number."""
        fd = self._open(self.generation + 1)
        with self._lock:
            os.close(self._fd)
            self._fd = fd
            self.generation += 1
        return self.generation

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_log(path: Path) -> list[tuple[int, int]]:
    """The records of an activity log; a torn last record (a crash mid-append) is ignored.

    Raises ``CorruptMetadata`` naming the file when a complete record is damaged.
    """
    data = path.read_bytes()
    records = []
    whole = len(data) - len(data) % _RECORD.size
    for at in range(0, whole, _RECORD.size):
        first, last, crc = _RECORD.unpack_from(data, at)
        if zlib.crc32(data[at : at + 16]) != crc or last < first:
            raise CorruptMetadata(f"{path}: record at byte {at} is corrupt")
        records.append((first, last))
    return records


@dataclass(frozen=True)
class Recovery:
    """What opening a state directory found and repaired."""

    crashed: bool
    interrupted_copy: bool
    regions_resent: int
    bytes_resent_bound: int


class PersistentSession:
    """A :class:`Session` whose state lives in a directory; open with :func:`open_session`.

    ``session`` is the live session, ``destinations`` its destinations.
    Call :meth:`save` after changing destinations or their states (the copy
    and update workflows do not know the store), and :meth:`close` at the end.
    """

    def __init__(self, directory: Path, meta: dict, bitmap: DeltaBitmap | None) -> None:
        self.directory = directory
        self.meta = meta
        self.source = open_lun(meta["source"])
        area = meta.get("save_area") or {}
        capacity = area.get("capacity") or min(self.source.size, DEFAULT_SAVE_AREA)
        self.session = Session(
            self.source,
            meta["granularity"],
            SaveArea(capacity, area.get("path")),
            name=meta["name"],
            bitmap=bitmap,
        )
        self.session.epoch = meta.get("epoch", 0)
        self._targets = {d["name"]: d["target"] for d in meta.get("destinations", [])}
        self.destinations = [
            Destination(open_lun(d["target"]), d["name"], DestState(d["state"]), d.get("epoch"))
            for d in meta.get("destinations", [])
        ]
        self.region_size = meta.get("region_size", DEFAULT_REGION_SIZE)
        self.max_hot = meta.get("max_hot", DEFAULT_MAX_HOT)
        self._log: ActivityLog | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._checkpoint_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._lock_fd = -1

    # -- running ---------------------------------------------------------------------
    def _start(self, generation: int, interval: float) -> None:
        self._log = ActivityLog(self.directory, generation)
        self.session.bitmap.track_activity(self.region_size, self._on_hot)
        self._thread = threading.Thread(
            target=self._checkpointer, args=(interval,), name="isc-checkpoint", daemon=True
        )
        self._thread.start()

    def _on_hot(self, first: int, last: int) -> None:
        assert self._log is not None
        self._log.append(first, last)
        if self.session.bitmap.hot_count + (last - first + 1) >= self.max_hot:
            self._wake.set()

    def _checkpointer(self, interval: float) -> None:
        while not self._closing.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if not self._closing.is_set():
                try:
                    self.checkpoint()
                except (OSError, IscError) as exc:
                    log.error("%s: checkpoint failed: %s", self.meta["name"], exc)

    def checkpoint(self) -> None:
        """Save the bitmap now and retire the hot regions (see the module docstring)."""
        assert self._log is not None
        with self._checkpoint_lock:
            bitmap = self.session.bitmap
            bitmap.freeze()
            try:
                data = bitmap.to_bytes()
                bitmap.retire_hot()
                generation = self._log.rotate()
            finally:
                bitmap.thaw()
            write_atomically(self.directory / f"checkpoint.{generation}", data)
            for path in self.directory.iterdir():
                match = _CHECKPOINT.match(path.name) or _LOG.match(path.name)
                if match and int(match.group(1)) < generation:
                    path.unlink()
            _fsync_dir(self.directory)

    def save(self) -> None:
        """Write the metadata (destinations, their states, epoch) atomically."""
        self.meta["epoch"] = self.session.epoch
        self.meta["destinations"] = [
            {
                "name": d.name,
                "target": self._targets[d.name],
                "state": d.state.value,
                "epoch": d.epoch,
            }
            for d in self.destinations
        ]
        write_atomically(self.directory / METADATA, _encode(self.meta))

    def add_destination(self, target: str, name: str | None = None) -> Destination:
        """Add a NEW destination (a path or an NBD URI) and save the metadata.

        Raises ``ParameterError`` for a duplicate name or a destination
        smaller than the source.
        """
        lun = open_lun(target)
        name = name or Path(target).name or target
        if any(d.name == name for d in self.destinations):
            lun.close()
            raise ParameterError(f"{self.meta['name']} already has a destination named {name}")
        if lun.size < self.source.size:
            lun.close()
            raise ParameterError(
                f"destination {name} holds {lun.size} bytes, less than the source's "
                f"{self.source.size}"
            )
        dest = Destination(lun, name)
        self._targets[name] = target
        self.destinations.append(dest)
        self.save()
        return dest

    def close(self) -> None:
        """Checkpoint exactly, save the metadata and release everything."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self._log is not None:
            self.checkpoint()
            self._log.close()
        self.save()
        for dest in self.destinations:
            dest.lun.close()
        self.session.save_area.close()
        self.source.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> PersistentSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(meta: dict) -> bytes:
    return json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n"


def _read_meta(directory: Path) -> dict:
    path = directory / METADATA
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"{directory} holds no isc session (no {METADATA}); create one") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptMetadata(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptMetadata(f"{path} is not an isc session file")
    if meta.get("version") != VERSION:
        raise CorruptMetadata(
            f"{path} has version {meta.get('version')!r}; this isc reads version {VERSION}"
        )
    for key, kind in (("name", str), ("source", str), ("granularity", int)):
        if not isinstance(meta.get(key), kind):
            raise CorruptMetadata(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return meta


def create_session(
    directory: str | os.PathLike[str],
    source: str,
    *,
    granularity: int = 65536,
    name: str | None = None,
    save_area: tuple[int, str | None] | None = None,
    region_size: int = DEFAULT_REGION_SIZE,
    max_hot: int = DEFAULT_MAX_HOT,
) -> None:
    """Create a persistent session for ``source`` in ``directory`` (made if missing).

    Raises ``StateError`` when the directory already holds a session and the
    errors of :class:`Session` and :func:`open_lun` for bad parameters;
    nothing is written then.
    """
    path = Path(directory)
    if (path / METADATA).exists():
        raise StateError(f"{path} already holds an isc session; open it or choose another")
    with open_lun(source) as lun:
        Session(lun, granularity)  # validates the granularity against the source
    if region_size < granularity or region_size & (region_size - 1):
        raise ParameterError(
            f"region size must be a power of two >= the granularity, got {region_size}"
        )
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name or path.name,
        "source": source,
        "granularity": granularity,
        "save_area": {"capacity": save_area[0], "path": save_area[1]} if save_area else None,
        "region_size": region_size,
        "max_hot": max_hot,
        "epoch": 0,
        "destinations": [],
    }
    write_atomically(path / METADATA, _encode(meta))


def open_session(
    directory: str | os.PathLike[str],
    *,
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
) -> tuple[PersistentSession, Recovery]:
    """Open the session in ``directory``, recovering from a crash if there was one.

    Raises ``StateError`` when there is no session, ``CorruptMetadata`` naming
    the file when a file is corrupt, truncated or foreign (nothing is
    overwritten then).
    """
    path = Path(directory)
    meta = _read_meta(path)
    lock = _lock(path)
    try:
        stored, recovery = _recover(path, meta, checkpoint_interval)
    except BaseException:
        os.close(lock)
        raise
    stored._lock_fd = lock
    return stored, recovery


def _lock(directory: Path) -> int:
    """Hold the directory's lock file: one process at a time opens a session."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"{directory} is in use by another isc process") from None
    return fd


def _recover(
    path: Path, meta: dict, checkpoint_interval: float
) -> tuple[PersistentSession, Recovery]:
    checkpoints = sorted(
        (int(m.group(1)), p) for p in path.iterdir() if (m := _CHECKPOINT.match(p.name))
    )
    logs = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _LOG.match(p.name)))
    generation, data = 0, None
    if checkpoints:
        generation, newest = checkpoints[-1]
        data = newest.read_bytes()
    records = [r for gen, p in logs if gen >= generation for r in read_log(p)]
    bitmap = None
    if data is not None:
        try:
            bitmap = DeltaBitmap.from_bytes(data)
        except CorruptMetadata as exc:
            raise CorruptMetadata(f"{path / f'checkpoint.{generation}'}: {exc}") from None
    try:
        stored = PersistentSession(path, meta, bitmap)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptMetadata(f"{path / METADATA}: {type(exc).__name__}: {exc}") from None
    session = stored.session
    interrupted = session.bitmap.marked and (bool(records) or session.bitmap.saved_count > 0)
    if interrupted:
        # The save area did not survive: the copy is over (rule 2 keeps what it owed).
        session.unmark()
    regions = set()
    for first, last in records:
        regions.update(range(first, last + 1))
    size = stored.source.size
    for region in sorted(regions):
        start = region * stored.region_size
        if start < size:
            session.bitmap.record_write(start, min(stored.region_size, size - start))
    newest = max([g for g, _ in checkpoints] + [g for g, _ in logs] + [0])
    stored._start(newest + 1, checkpoint_interval)
    stored.checkpoint()
    recovery = Recovery(
        crashed=bool(records),
        interrupted_copy=interrupted,
        regions_resent=len(regions),
        bytes_resent_bound=len(regions) * stored.region_size,
    )
    if records:
        log.warning(
            "%s: recovered after a crash: %d hot region(s) tracked again%s",
            meta["name"],
            len(regions),
            ", interrupted copy failed" if interrupted else "",
        )
    return stored, recovery
