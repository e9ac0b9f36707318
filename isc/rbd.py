"""RBD destinations: images of a Ceph cluster, protected by RBD snapshots.

A destination named ``rbd:POOL/IMAGE`` is the image IMAGE of the pool POOL
of the cluster that Ceph's configuration names: ``rbd:POOL/IMAGE?conf=PATH``
gives its ``ceph.conf`` (an absolute path; without it Ceph's default,
``/etc/ceph/ceph.conf``). isc manages no cluster: the pool and the image
must exist, as large as the source at least.

Data (:class:`RBDLUN`): each open LUN runs a ``qemu-nbd`` of its own (QEMU's
rbd driver, Debian's ``qemu-block-extra``), which exports the image on a
Unix socket in a private directory (0700; the socket 0600), and speaks NBD
to it (:class:`~isc.nbd.NBDLUN`). That ``qemu-nbd`` serves this one
connection: it flushes, closes the image and exits when the LUN closes or
this process dies, so none outlives its LUN. The store opens RBD
destinations through a :class:`~isc.lun.ReconnectingLUN`, so an export that
died (or that the site stopped) is started again at the next use.

Protection (:class:`RBDSite`): the snapshot lives in the cluster, so it
survives any process (rule 8 by construction). A destination's snapshot is
named ``isc-SESSION-GENERATION`` after the session that protected it and its
mark, so one left by a failed update (or a killed process) is found and
reused; ``SESSION`` keeps letters, digits and ``_.+-`` of the session's
name, the others become ``_``.

==============  ============================================================
request         what happens in the cluster
==============  ============================================================
protect         nothing when the image has a protection snapshot of the
                session already (left by a failed update: it holds the last
                consistent image, a newer one would not), else ``rbd snap
                create``. Copy-on-write in the OSDs: the same cost for any
                size (0.1 to 0.2 s on the test cluster for 256 MiB or 4 GiB,
                mostly the two ``rbd`` processes; benchmarks/README.md)
unprotect       ``rbd snap rm`` of the session's snapshots
rollback        stop this process's exports of the image (no cached write
                lands after), break the lock of any other client that still
                holds it (a ``qemu-nbd`` that died holding it; ``rbd lock
                rm`` blocklists it, so nothing it had in flight lands
                either), list what changed since the snapshot (``rbd diff
                --from-snap``: the ack's extents), ``rbd snap rollback``.
                Rewrites the changed objects; the protection stays
status          the snapshot and what changed since (``rbd diff``)
protect_group   one ``rbd group snap create`` of the RBD group
                ``isc-SESSION`` (made by isc, named after the first member's
                session; isc adds the images to it), so the images are taken
                at one instant. When no group can hold them (another
                cluster, an image in another group, a member with a leftover
                protection) each is protected alone: nothing writes them
                between the protects, so those are one cut too
rollback_group  ``rbd group snap rollback`` of every image a group snapshot
                holds, as one, after stopping their exports; the others one
                by one. The cluster lists no changes since a group snapshot
                (Ceph 16), so the ack's extents are the whole image: the next
                update resends it all
==============  ============================================================

**Holder** (rule 12 across sites): an image is the destination of one session at a time.
Its metadata key ``isc.holder`` (``rbd image-meta``) names the session that holds it, as
an agent's export's holder record does (:func:`isc.remote.session_holder`, JSON):
``isc add-dest`` claims it (:func:`claim`), protect and rollback check it (and take an
image none holds: a session added before holders claims at its next update), unprotect
checks it, ``isc remove-dest`` and ``isc destroy`` remove it (:func:`release`; one another
session holds they leave alone), and status tells of another's hold as an agent's does
(``isc copy`` leaves the image out then, :func:`isc.store.check_agents`).
Another session's request is refused (``Ack.held``) naming the holder and the fix; so is
one of a value that is not a holder's (damaged): like any held destination, it drops out
of the update alone (:mod:`isc.update`). The way out when the holding session is gone:
``rbd image-meta remove POOL/IMAGE isc.holder`` (Ceph's own authentication). A claim of
a holder out of form (:func:`isc.remote.is_holder`) is refused, writing nothing: the value
would read back damaged. Image metadata has no compare-and-set: a
claim sets the key and reads it back, so of two claims at one instant the later write
holds the image, and the other session's protects are refused from then on; its own
claim may pass if it read the key back before the other wrote it. A check costs one more
``rbd`` run per protect, unprotect, rollback and status (a claim two more).

A group snapshot holds every image of its group, so unprotecting one of
them keeps it until every one was unprotected (this site keeps count; a new
site sees it as a leftover protection of each, which the next update
reuses); rolling one back alone is refused.

Failures: a request never raises; an ``rbd`` command that fails gives a
failed :class:`~isc.remote.Ack` whose reason is ``rbd``'s own, and one that
does not finish within the request's timeout is killed and gives
``outcome_unknown``. An image whose lock a dead client holds makes its next
writer (and ``rbd snap create``) wait until the cluster expires it (``osd
client watch timeout``, 30 s by default); a rollback breaks it at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

from isc.copy import Destination
from isc.errors import IscError, ParameterError
from isc.lun import ForwardingLUN
from isc.nbd import NBDLUN
from isc.remote import Ack, RemoteSite, RoutingSite, held_by, is_holder
from isc.session import Session

log = logging.getLogger(__name__)

SCHEME = "rbd:"
PREFIX = "isc-"
"""What the names of isc's snapshots and RBD groups start with."""

START_TIMEOUT = 30.0
"""Seconds a ``qemu-nbd`` may take to open its image and listen."""

HOLDER_KEY = "isc.holder"
"""The image metadata key that names the session holding the image (the module docstring)."""

_NAME = re.compile(r"[\w.+-]+")
_SNAPSHOT = re.compile(r"isc-(.+)-(\d+)")


class RBDError(IscError, OSError):
    """An ``rbd`` command failed; ``unknown`` when it did not finish (it may have acted)."""

    def __init__(self, message: str, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


def is_rbd(target: str) -> bool:
    """Whether ``target`` names an RBD image (``rbd:POOL/IMAGE[?conf=PATH]``)."""
    return target.startswith(SCHEME)


@dataclass(frozen=True)
class RBDImage:
    """An RBD image: ``pool``/``image`` of the cluster ``conf`` (None: Ceph's default)."""

    pool: str
    image: str
    conf: str | None = None

    @classmethod
    def parse(cls, uri: str) -> RBDImage:
        """The image ``uri`` names; ``ParameterError`` saying what is wrong with it."""
        form = f"{uri!r} is not rbd:POOL/IMAGE[?conf=/path/to/ceph.conf]"
        if not is_rbd(uri):
            raise ParameterError(f"{form}: it does not start with {SCHEME}")
        spec, _, query = uri[len(SCHEME) :].partition("?")
        pool, _, image = spec.partition("/")
        for what, name in (("pool", pool), ("image", image)):
            if not _NAME.fullmatch(name):
                raise ParameterError(
                    f"{form}: the {what} name {name!r} is empty or has characters other than "
                    "letters, digits and _.+-"
                )
        options: dict[str, str] = {}
        for item in query.split("&") if query else ():
            key, eq, value = item.partition("=")
            if key != "conf" or not eq or key in options:
                raise ParameterError(f"{form}: {item!r} is not one conf=PATH")
            options[key] = unquote(value)
        conf = options.get("conf")
        if conf is not None and not os.path.isabs(conf):
            raise ParameterError(f"{form}: conf={conf} is not an absolute path")
        return cls(pool, image, conf)

    @property
    def spec(self) -> str:
        return f"{self.pool}/{self.image}"

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.spec}" + (f"?conf={quote(self.conf)}" if self.conf else "")

    def __str__(self) -> str:
        return self.uri

    def rbd(self, *args: str, timeout: float) -> str:
        """Run ``rbd ARGS`` on this image's cluster; its output, or ``RBDError``."""
        return _rbd(self.conf, args, timeout)

    def identity(self, timeout: float = 30.0) -> tuple | None:
        """What names this image under any URI (its pool and id), or None if it cannot be read."""
        try:
            info = _json(self, "info", self.spec, timeout=timeout)
        except RBDError:
            return None
        return ("rbd", self.pool, info.get("id"))


def _rbd(conf: str | None, args: Sequence[str], timeout: float) -> str:
    command = ["rbd", *(("-c", conf) if conf else ()), *args]
    words = []  # the command and the image, group or snapshot it acts on
    for arg in args:
        if not arg.startswith("-"):
            words.append(arg)
            if "/" in arg:
                break
    what = " ".join(words)
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError:
        raise RBDError("the rbd command is missing: install Debian's ceph-common") from None
    except subprocess.TimeoutExpired:
        raise RBDError(f"rbd {what} did not finish within {timeout:g} s", unknown=True) from None
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        said = [line for line in lines if line.startswith("rbd: ")]
        reason = said[-1][len("rbd: ") :] if said else (lines[-1] if lines else "no reason given")
        raise RBDError(f"rbd {what}: {reason}")
    return done.stdout


def _json(image: RBDImage, *args: str, timeout: float):
    return _rbd_json(image.conf, args, timeout)


def _rbd_json(conf: str | None, args: Sequence[str], timeout: float):
    """``rbd ARGS --format json``, read; ``RBDError`` when it fails or prints no JSON."""
    printed = _rbd(conf, (*args, "--format", "json"), timeout)
    try:
        return json.loads(printed)
    except ValueError:
        raise RBDError(f"rbd {' '.join(args)} printed no JSON: {printed[:200]!r}") from None


# -- data: one qemu-nbd per open LUN ---------------------------------------------------

_exports: dict[RBDImage, weakref.WeakSet[RBDLUN]] = {}
_exports_lock = threading.Lock()


def stop_exports(image: RBDImage) -> int:
    """Close every open :class:`RBDLUN` of ``image`` in this process; return how many.

    Each ``qemu-nbd`` flushes and exits; a :class:`~isc.lun.ReconnectingLUN`
    over one opens it again at its next use.
    """
    with _exports_lock:
        luns = list(_exports.get(image, ()))
    for lun in luns:
        lun.close()
    return len(luns)


class RBDLUN(ForwardingLUN):
    """An RBD image (an :class:`RBDImage` or its URI) as a LUN, through a ``qemu-nbd`` of its own.

    See the module docstring. ``timeout`` bounds the opening of the image and
    each wait for ``qemu-nbd`` during I/O, as :class:`~isc.nbd.NBDLUN`'s.
    Raises ``ParameterError`` for a bad URI and ``OSError`` naming the image
    when ``qemu-nbd`` is missing, or cannot open the image (with its reason),
    or does not within ``timeout`` (the cluster is out of reach). I/O raises
    as ``NBDLUN``'s; once ``qemu-nbd`` died the LUN is closed.
    """

    def __init__(self, image: RBDImage | str, *, timeout: float | None = 60.0) -> None:
        self.image = image if isinstance(image, RBDImage) else RBDImage.parse(image)
        qemu_nbd = shutil.which("qemu-nbd")
        if qemu_nbd is None:
            raise OSError(
                errno.ENOENT,
                "qemu-nbd is missing: RBD images need Debian's qemu-utils and qemu-block-extra "
                "(QEMU's rbd driver)",
            )
        self._dir = tempfile.mkdtemp(prefix="isc-rbd-")  # 0700
        sock = os.path.join(self._dir, "nbd.sock")
        self.process: subprocess.Popen[bytes] | None = None
        try:
            with open(os.path.join(self._dir, "qemu-nbd.log"), "wb") as errors:
                self.process = subprocess.Popen(
                    [qemu_nbd, "-f", "raw", "--socket", sock, self._qemu_filename()],
                    stdin=subprocess.DEVNULL,
                    stdout=errors,
                    stderr=errors,
                    umask=0o177,  # the socket: 0600
                    start_new_session=True,  # a Ctrl-C meant for isc does not stop the export
                )
            lun = self._connect(f"nbd+unix:///?socket={sock}", timeout)
        except BaseException:
            self._end(wait=0)
            raise
        super().__init__(lun)
        with _exports_lock:
            _exports.setdefault(self.image, weakref.WeakSet()).add(self)

    def _qemu_filename(self) -> str:
        """The image in QEMU's JSON syntax: any path is taken as it is, no escaping."""
        options = {"driver": "rbd", "pool": self.image.pool, "image": self.image.image}
        if self.image.conf:
            options["conf"] = self.image.conf
        return "json:" + json.dumps({"file": options})

    def _connect(self, uri: str, timeout: float | None) -> NBDLUN:
        """Connect once ``qemu-nbd`` listens: the first connection is the one it serves.

        It listens before it opens the image, so the handshake waits for
        that, and a failed open ends the connection.
        """
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                return NBDLUN(uri, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    why = f"no socket after {START_TIMEOUT:g} s"
                    raise self._failed(errno.ETIMEDOUT, why) from None
            except OSError as exc:
                try:
                    code = self.process.wait(timeout=START_TIMEOUT)  # it exits if the open failed
                except subprocess.TimeoutExpired:
                    conf = self.image.conf or "/etc/ceph/ceph.conf"
                    reason = f"{exc}; is the cluster of {conf} up and reachable?"
                    raise self._failed(errno.ETIMEDOUT, reason) from None
                raise self._failed(errno.EIO, self._qemu_reason(code)) from None
            try:
                code = self.process.wait(timeout=0.01)  # paces the tries; returns if it exits
            except subprocess.TimeoutExpired:
                continue
            raise self._failed(errno.EIO, self._qemu_reason(code))

    def _failed(self, code: int, reason: str) -> OSError:
        return OSError(code, f"qemu-nbd cannot export the RBD image {self.image.spec}: {reason}")

    def _qemu_reason(self, code: int) -> str:
        with open(os.path.join(self._dir, "qemu-nbd.log"), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        reason = lines[-1] if lines else f"qemu-nbd exited with status {code}"
        reason = reason.rpartition("': ")[2]  # not the JSON it was given again
        if "Unknown driver 'rbd'" in reason or "Unknown protocol" in reason:
            reason += " (install Debian's qemu-block-extra: QEMU's rbd driver)"
        return reason

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros: the image's objects there are freed (see
        :meth:`NBDLUN.write_zeroes <isc.nbd.NBDLUN.write_zeroes>`)."""
        self.lun.write_zeroes(offset, length)

    def close(self) -> None:
        """Disconnect; ``qemu-nbd`` flushes, closes the image and exits. Idempotent."""
        with _exports_lock:
            _exports.get(self.image, weakref.WeakSet()).discard(self)
        try:
            self.lun.close()
        finally:
            self._end(wait=START_TIMEOUT)

    def _end(self, wait: float) -> None:
        """Give ``qemu-nbd`` ``wait`` seconds to exit, then kill it; remove its directory."""
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                if wait:
                    log.warning("qemu-nbd of %s did not exit when its client left", self.image)
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RBDLUN:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the holder: image metadata -------------------------------------------------------


class _Damaged(RBDError):
    """An image's metadata :data:`HOLDER_KEY` names no session in a holder's form: which
    session copies into it cannot be told, so it is no session's to copy into but the one
    the operator lets in (the module docstring)."""


def _holder(image: RBDImage, wait: float) -> dict | None:
    """The session ``image``'s metadata names as its holder, None when none; ``RBDError``
    when it cannot be read, ``_Damaged`` when it names none in a holder's form."""
    try:
        value = image.rbd("image-meta", "get", image.spec, HOLDER_KEY, timeout=wait)
    except RBDError as exc:
        if "(2) No such file or directory" in str(exc):
            return None
        raise
    try:
        holder = json.loads(value)
    except ValueError:
        holder = None
    if not is_holder(holder):
        raise _Damaged(
            f"{image}: its metadata {HOLDER_KEY} is damaged (not a holder's record): which "
            f"session copies into it cannot be told; if none does, remove it: "
            f"rbd image-meta remove {image.spec} {HOLDER_KEY}"
        )
    return holder


def _held(image: RBDImage, holder: dict | None, wait: float, claim: bool) -> str | None:
    """Why a request of ``holder`` (None: one that names no session) about ``image`` is
    refused, another session holding it; else None, with ``claim`` taking an image that
    none holds. ``RBDError`` when the metadata cannot be read or set."""
    held = _holder(image, wait)
    if held is None and claim and holder is not None:
        if not is_holder(holder):  # it would read back as damaged, refusing every session
            return (
                f"{image}: this session cannot be named its holder ({HOLDER_KEY} takes a "
                "session's name and machine of at most 255 characters each): nothing was written"
            )
        image.rbd("image-meta", "set", image.spec, HOLDER_KEY, json.dumps(holder), timeout=wait)
        held = _holder(image, wait)  # another claim's write may have come in between
    if held is None or (holder is not None and held["id"] == holder["id"]):
        return None
    let_go = f"let it go: rbd image-meta remove {image.spec} {HOLDER_KEY}"
    return held_by(str(image), held, "DEST", let_go)


def claim(uri: str, holder: dict, timeout: float = 30.0) -> str | None:
    """Hold the image ``uri`` for ``holder`` (``isc add-dest``); why not (another session
    holds it, or its metadata cannot be had), in one line, else None."""
    try:
        return _held(RBDImage.parse(uri), holder, timeout, claim=True)
    except RBDError as exc:
        return str(exc)


def release(uri: str, holder: dict, timeout: float = 30.0) -> str | None:
    """Let the image ``uri`` go from ``holder`` (``isc remove-dest``, ``isc destroy``); why
    not, else None. One another session holds holds nothing of ``holder``'s: None."""
    image = RBDImage.parse(uri)
    try:
        if _held(image, holder, timeout, claim=False) is None:
            image.rbd("image-meta", "remove", image.spec, HOLDER_KEY, timeout=timeout)
    except RBDError as exc:
        if "(2) No such file or directory" in str(exc):
            return None  # none held it
        return str(exc)
    return None


# -- protection: RBD snapshots ---------------------------------------------------------


def _label(name: str) -> str:
    return "".join(c if _NAME.fullmatch(c) else "_" for c in name)


def snapshot_name(session: Session) -> str:
    """The name of the protection snapshot ``session``'s current mark takes."""
    return f"{PREFIX}{_label(session.name)}-{session.generation}"


@dataclass(frozen=True)
class _Protection:
    """One protection snapshot of an image: its own, or its share of a group snapshot."""

    name: str
    size: int
    group: tuple[str, str] | None = None
    """``(pool, group)`` of a group snapshot."""

    def __str__(self) -> str:
        if self.group:
            return f"the group snapshot {self.group[0]}/{self.group[1]}@{self.name}"
        return f"the snapshot {self.name}"


@dataclass
class _Entry:
    image: RBDImage
    session: Session  # its name and generation name the snapshots
    holder: dict | None = None  # the session as the image's holder (the module docstring)


class RBDSite(RemoteSite):
    """The site of RBD destinations: protection by RBD snapshots (the module docstring).

    Register each destination with :meth:`add`. ``timeout`` is the default
    wait, in seconds, for each request.
    """

    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._entries: dict[str, _Entry] = {}
        # Images that unprotected their share of a group snapshot, by snapshot:
        # it goes once all of its images did.
        self._released: dict[tuple[str, str, str], set[tuple[str, str]]] = {}

    def add(
        self, name: str, image: RBDImage | str, session: Session, holder: dict | None = None
    ) -> None:
        """Make destination ``name``, on ``image``, known; ``session`` copies to it, named
        ``holder`` (:func:`isc.remote.session_holder`) in the image's metadata."""
        self._entries[name] = _Entry(
            image if isinstance(image, RBDImage) else RBDImage.parse(image), session, holder
        )

    def _refused_held(self, rid: int, entry: _Entry, wait: float, claim: bool) -> Ack | None:
        """The refusal of a request about ``entry``'s image another session holds, or whose
        holder value is damaged (``Ack.held``: that image's trouble alone, as an agent's
        damaged holder record is), else None (with ``claim``, taking one none holds)."""
        try:
            why = _held(entry.image, entry.holder, wait, claim)
        except _Damaged as exc:
            why = str(exc)
        return None if why is None else Ack(rid, False, why, held=True)

    def _entry(self, dest: Destination) -> _Entry:
        entry = self._entries.get(dest.name)
        if entry is None:
            raise RBDError(f"{dest.name} is not an RBD destination of this site")
        return entry

    def _wait(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _protections(self, entry: _Entry, wait: float) -> list[_Protection]:
        """The image's protection snapshots of ``entry``'s session, oldest first."""
        found = []
        label = _label(entry.session.name)
        snaps = _json(entry.image, "snap", "ls", "--all", entry.image.spec, timeout=wait)
        for snap in sorted(snaps, key=lambda s: s["id"]):
            space = snap.get("namespace", {})
            if space.get("type") == "group":
                group, name = space.get("group", ""), space.get("group snap", "")
                if group.startswith(PREFIX) and _SNAPSHOT.fullmatch(name):
                    pool = space.get("pool", entry.image.pool)
                    found.append(_Protection(name, snap["size"], (pool, group)))
            elif (match := _SNAPSHOT.fullmatch(snap["name"])) and match.group(1) == label:
                found.append(_Protection(snap["name"], snap["size"]))
        return found

    @staticmethod
    def _refused(rid: int, exc: RBDError) -> Ack:
        return Ack(rid, False, str(exc), outcome_unknown=exc.unknown)

    def protect(self, dest: Destination, timeout: float | None = None) -> Ack:
        rid = self._next_id()
        try:
            entry = self._entry(dest)
            wait = self._wait(timeout)
            if (refused := self._refused_held(rid, entry, wait, claim=True)) is not None:
                return refused
            held = self._protections(entry, wait)
            if held:
                self._claim(entry, held[0])
                return Ack(rid, True, f"already protected by {held[0]}", kept=True)
            name = snapshot_name(entry.session)
            image = entry.image
            image.rbd("snap", "create", "--no-progress", f"{image.spec}@{name}", timeout=wait)
        except RBDError as exc:
            return self._refused(rid, exc)
        log.info("protected %s: snapshot %s@%s", dest.name, image.spec, name)
        return Ack(rid, True)

    def unprotect(self, dest: Destination, timeout: float | None = None) -> Ack:
        rid = self._next_id()
        kept = []
        try:
            entry = self._entry(dest)
            wait = self._wait(timeout)
            if (refused := self._refused_held(rid, entry, wait, claim=False)) is not None:
                return refused
            image = entry.image
            for held in self._protections(entry, wait):
                if held.group is None:
                    snap = f"{image.spec}@{held.name}"
                    image.rbd("snap", "rm", "--no-progress", snap, timeout=wait)
                else:
                    kept += self._release(entry, held, wait)
        except RBDError as exc:
            return self._refused(rid, exc)
        if kept:
            return Ack(rid, True, f"the group snapshot stays for {', '.join(kept)}")
        log.info("unprotected %s", dest.name)
        return Ack(rid, True)

    def _claim(self, entry: _Entry, held: _Protection) -> None:
        """``entry``'s image needs ``held`` again (a later update reuses it)."""
        if held.group is not None:
            key = (*held.group, held.name)
            self._released.get(key, set()).discard((entry.image.pool, entry.image.image))

    def _release(self, entry: _Entry, held: _Protection, wait: float) -> list[str]:
        """Release ``entry``'s share of a group snapshot; remove it if it was the last.

        Returns the images that still hold it.
        """
        assert held.group is not None
        pool, group = held.group
        key = (pool, group, held.name)
        released = self._released.setdefault(key, set())
        released.add((entry.image.pool, entry.image.image))
        members = _group_images(entry.image.conf, pool, group, wait)
        left = [f"{p}/{i}" for p, i in members if (p, i) not in released]
        if not left:
            _rbd(entry.image.conf, ("group", "snap", "rm", f"{pool}/{group}@{held.name}"), wait)
            del self._released[key]
        return left

    def rollback(self, dest: Destination, timeout: float | None = None) -> Ack:
        return self.rollback_group([dest], timeout)[0]

    def status(self, dest: Destination, timeout: float | None = None) -> Ack:
        rid = self._next_id()
        try:
            entry = self._entry(dest)
            wait = self._wait(timeout)
            # As an agent's status tells (isc.remote.AgentSite): the copies that ask no
            # protect (isc copy, :func:`isc.store.check_agents`) leave it out then.
            if (refused := self._refused_held(rid, entry, wait, claim=False)) is not None:
                return refused
            held = self._protections(entry, wait)
            if not held:
                return Ack(rid, True, info={"protected": False})
            extents = _changed(entry.image, held[0], wait)
        except RBDError as exc:
            return self._refused(rid, exc)
        info = {
            "protected": True,
            "intact": True,
            "problem": None,
            "snapshot": str(held[0]),
            "saved_bytes": sum(length for _, length in extents),
            "saved_chunks": None,
            "extents": [list(e) for e in extents],
        }
        return Ack(rid, True, info=info)

    def protect_group(
        self, dests: Sequence[Destination], timeout: float | None = None
    ) -> list[Ack]:
        """Protect ``dests`` at one instant: one RBD group snapshot (the module docstring)."""
        wait = self._wait(timeout)
        try:
            entries = [self._entry(d) for d in dests]
            if len(dests) < 2 or len({e.image.conf for e in entries}) > 1:
                raise RBDError("the images are not two or more of one cluster")
            if any(_held(e.image, e.holder, wait, claim=True) for e in entries):
                raise RBDError("another session holds a member")  # its protect says which
            if any(self._protections(e, wait) for e in entries):
                raise RBDError("a member has a leftover protection, which it keeps")
            first = entries[0]
            group = (first.image.pool, f"{PREFIX}{_label(first.session.name)}")
            _join(first.image.conf, group, [e.image for e in entries], wait)
        except RBDError as exc:
            log.info("no group snapshot (%s): each destination is protected alone", exc)
            return [self.protect(d, timeout) for d in dests]
        name = snapshot_name(first.session)
        spec = f"{group[0]}/{group[1]}@{name}"
        try:
            _rbd(first.image.conf, ("group", "snap", "create", spec), wait)
        except RBDError as exc:
            return [self._refused(self._next_id(), exc) for _ in dests]
        log.info("protected %s: group snapshot %s", ", ".join(d.name for d in dests), spec)
        reason = f"protected by the group snapshot {spec}"
        return [Ack(self._next_id(), True, reason) for _ in dests]

    def rollback_group(
        self, dests: Sequence[Destination], timeout: float | None = None
    ) -> list[Ack]:
        """Roll ``dests`` back: those a group snapshot holds as one, the others one by one.

        A group snapshot is rolled back only with every image it holds among
        ``dests``; else their rollback is refused.
        """
        wait = self._wait(timeout)
        acks: dict[int, Ack] = {}
        plans: dict[tuple, tuple[_Protection, list[int]]] = {}  # a rollback: the dests it restores
        for i, dest in enumerate(dests):
            try:
                entry = self._entry(dest)
                refused = self._refused_held(self._next_id(), entry, wait, claim=True)
                found = self._protections(entry, wait) if refused is None else []
            except RBDError as exc:
                acks[i] = self._refused(self._next_id(), exc)
                continue
            if refused is not None:
                acks[i] = refused
                continue
            if not found:
                reason = f"{dest.name} is not protected: there is no image to restore"
                acks[i] = Ack(self._next_id(), False, reason)
                continue
            oldest = found[0]
            key = (oldest.group, oldest.name) if oldest.group else ("image", i)
            plans.setdefault(key, (oldest, []))[1].append(i)
        for held, indexes in plans.values():
            answers = self._roll_back(held, [dests[i] for i in indexes], wait)
            acks.update(zip(indexes, answers, strict=True))
        return [acks[i] for i in range(len(dests))]

    def _roll_back(self, held: _Protection, dests: list[Destination], wait: float) -> list[Ack]:
        """Roll back ``dests`` (one, or the members of a group snapshot) to ``held``."""
        entries = [self._entry(d) for d in dests]
        images = [entry.image for entry in entries]
        try:
            if held.group is not None:
                members = _group_images(images[0].conf, *held.group, wait)
                missing = set(members) - {(image.pool, image.image) for image in images}
                if missing:
                    others = ", ".join(sorted(f"{p}/{i}" for p, i in missing))
                    raise RBDError(
                        f"{held} also holds {others}: roll them back together "
                        "(isc.update.rollback_group)"
                    )
            for image in images:
                _stop(image, wait)
            extents = [_changed(image, held, wait) for image in images]
            command: tuple[str, ...]
            if held.group is not None:
                command = ("group", "snap", "rollback", f"{'/'.join(held.group)}@{held.name}")
            else:
                command = ("snap", "rollback", f"{images[0].spec}@{held.name}")
            _rbd(images[0].conf, (*command, "--no-progress"), wait)
        except RBDError as exc:
            return [self._refused(self._next_id(), exc) for _ in dests]
        for dest, ranges in zip(dests, extents, strict=True):
            log.info("rolled back %s to %s (%d ranges)", dest.name, held, len(ranges))
        return [Ack(self._next_id(), True, extents=ranges) for ranges in extents]


def _size(image: RBDImage, wait: float) -> int:
    return int(_json(image, "info", image.spec, timeout=wait)["size"])


def _changed(image: RBDImage, held: _Protection, wait: float) -> tuple[tuple[int, int], ...]:
    """The byte ranges of ``image`` that differ from its protection ``held``.

    A group snapshot's (the cluster lists no changes since one), or when the
    list cannot be had: the whole image.
    """
    if held.group is None:
        try:
            diff = _json(image, "diff", "--from-snap", held.name, image.spec, timeout=wait)
        except RBDError as exc:
            log.warning("%s: no list of changes since %s (%s): the whole image", image, held, exc)
        else:
            ranges: list[list[int]] = []
            for extent in diff:
                offset, length = int(extent["offset"]), int(extent["length"])
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1][1] += length
                else:
                    ranges.append([offset, length])
            return tuple((offset, length) for offset, length in ranges)
    return ((0, max(held.size, _size(image, wait))),)


def _stop(image: RBDImage, wait: float) -> None:
    """Make sure nothing writes ``image`` any more: stop this process's exports of it,
    then break the lock of any other client (``rbd lock rm`` blocklists it)."""
    stop_exports(image)
    for lock in _json(image, "lock", "ls", image.spec, timeout=wait):
        log.warning(
            "%s: breaking the lock of %s at %s (blocklisting it): nothing it has in flight "
            "lands after the rollback",
            image,
            lock["locker"],
            lock["address"],
        )
        image.rbd("lock", "rm", image.spec, lock["id"], lock["locker"], timeout=wait)


def _group_images(conf: str | None, pool: str, group: str, wait: float) -> list[tuple[str, str]]:
    found = _rbd_json(conf, ("group", "image", "list", f"{pool}/{group}"), wait)
    return [(m["pool"], m["image"]) for m in found]


def _join(
    conf: str | None, group: tuple[str, str], images: Sequence[RBDImage], wait: float
) -> None:
    """Make isc's RBD group ``group`` hold exactly ``images``, or raise ``RBDError``.

    Its membership changes only while it has no snapshot (no protection pending).
    """
    spec = f"{group[0]}/{group[1]}"
    if group[1] in _rbd_json(conf, ("group", "ls", group[0]), wait):
        members = set(_group_images(conf, *group, wait))
    else:
        _rbd(conf, ("group", "create", spec), wait)
        members = set()
    wanted = {(i.pool, i.image) for i in images}
    if members == wanted:
        return
    if _rbd_json(conf, ("group", "snap", "ls", spec), wait):
        raise RBDError(f"the RBD group {spec} holds other images and a snapshot")
    for pool, image in members - wanted:
        _rbd(conf, ("group", "image", "remove", spec, f"{pool}/{image}"), wait)
    for pool, image in wanted - members:
        _rbd(conf, ("group", "image", "add", spec, f"{pool}/{image}"), wait)


def with_rbd(
    site: RemoteSite, session: Session, targets: Mapping[str, str], holder: dict | None = None
) -> RemoteSite:
    """The site for ``session``'s destinations ``targets`` (name to path or URI), named
    ``holder`` in their images' metadata.

    ``site`` for the others; when some are RBD images, a
    :class:`~isc.remote.RoutingSite` that sends theirs to an :class:`RBDSite`.
    """
    names = [name for name, target in targets.items() if is_rbd(target)]
    if not names:
        return site
    rbd_site = RBDSite()
    for name in names:
        rbd_site.add(name, targets[name], session, holder)
    return RoutingSite(dict.fromkeys(names, rbd_site), site)
