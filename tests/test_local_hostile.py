"""The local data path of a persistent session attacked on one machine where the other hostile
tests do not reach (rules 6, 10 and 11): names of a destination that reach its file through
more than one device, and what the user can give isc that it must not act on.

Already attacked elsewhere, and not repeated here: a loop device straight over the source or
a destination, descriptors as names, the session's own files, links put in place of a
destination, state directories others can write (tests/test_boundary_hostile.py); one
destination file for one session (tests/test_destination_lock.py); corrupt and foreign
session files, checkpoints and logs (tests/test_trust.py, tests/test_store.py,
tests/test_window_hostile.py).

Attacked here, through the real ``isc`` command:

* a loop device over a loop device over a destination file (``losetup`` of ``/dev/loopN``):
  one level of ``LOOP_GET_STATUS64`` names only the inner device's node, so it was taken
  as a second destination (or by a second session); with an offset on the outer device a
  copy wrote the file twice, at two offsets, and reported the outer one consistent over
  data that was not the source's. A writable loop device over the loop device a session
  takes as its source is refused at the open (as root), through the chain too.

* the session's own export as a destination: an NBD URI that named another server at
  add-dest (a placeholder at the socket) and that ``isc serve`` of the session listens on
  now. A marked copy wrote the image at the mark into the source through the session,
  undoing the host writes made since (rules 5 and 11). The export now describes itself
  (``NBD_INFO_DESCRIPTION``, :func:`isc.nbd.proto.own_export`) and the session's
  destinations refuse it at every connection.

Bad input that changes nothing (rule 10):

* an empty ``checkpoint.journal`` (truncated to nothing): refused as a lost checkpoint
  should be, but the line said ``holds no whole checkpoint: None``;
* an older copy of ``session.json`` (a backup's, taken at a clean close) put back after a
  copy failed: on a source whose stamp has no mtime (a block device) the destination
  read consistent again, and in step, holding a mix of the source's images;
* a save area in memory larger than the address space (``--save-area 1P``): ``isc create``
  took it, and every later command on the session failed with ``Cannot allocate memory``,
  naming nothing.

A seeded stress test, bounded to a few seconds, of what the other stress tests do not mix
(tests/test_window_hostile.py: a Python child, two writers, a save area of 64 chunks;
tests/test_crash.py: ``isc update`` and ``isc serve --every``): rounds of copies of each
kind in this process with writer threads racing them, cancels and a save area of a few
chunks of 2 KiB (so marked copies run out of it), then a real ``isc copy`` of each kind
SIGKILLed at a seeded write of an NBD destination served here; that destination fails on
demand in both, and a third destination is taken out and added again between rounds.
After each copy and each kill every destination reported consistent holds one of the
point-in-time images the source went through, and every chunk where a destination in step
differs from the source is tracked (rules 1, 2, 5, 6, 9, 13).

Each refusal is one line naming the object and the fix, and changes nothing. A test that
needs root (loop devices) skips naming what it lacks.
"""

from __future__ import annotations

import errno
import hashlib
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import TIMEOUT, Writers, assert_no_lost_change, fill_random, session_file
from test_agent import daemon
from test_boundary_hostile import run_isc
from test_cli import ISC, files
from test_crash import Tripwire, killed_by
from test_guard import needs_guard
from test_lun import _loop_device as loop_device
from test_pull_hostile import control
from test_serve import Export

from isc import DestState, FileLUN, MemoryLUN
from isc.errors import CopyError, ParameterError, StateError
from isc.lun import ForwardingLUN
from isc.nbd import NBDLUN, NBDServer
from isc.savearea import SaveArea
from isc.store import METADATA, copy, create_session, open_session

G = 4096
SIZE = 64 * G
SMALL = 2048
"""The stress test's granularity, the smallest."""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A random source.img, a d1.img twice its size and a zeroed d2.img, and a session
    ``state`` on source.img with destination d1 copied once (consistent)."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(41))
    FileLUN.create(tmp_path / "d1.img", 2 * SIZE).close()
    FileLUN.create(tmp_path / "d2.img", SIZE).close()
    create_session(tmp_path / "state", str(tmp_path / "source.img"), granularity=G)
    with open_session(tmp_path / "state")[0] as stored:
        stored.add_destination(str(tmp_path / "d1.img"))
        copy(stored, "full")
    return tmp_path


# -- a destination reached through a chain of loop devices -------------------------------------


def test_a_loop_device_over_a_loop_device_over_a_destination_is_refused(root: Path) -> None:
    # Before, `isc add-dest state /dev/loopB` (loopB over loopA over d1.img) was taken;
    # with `losetup --offset` on loopB a copy wrote d1.img at two offsets and reported
    # loopB consistent while a direct read of it held the source shifted.
    with loop_device(root / "d1.img") as inner, loop_device(inner) as outer:
        before = session_file(root / "state")
        done = run_isc("add-dest", "state", outer, "--name", "outer", cwd=root, fail=True)
        assert "is already destination d1.img" in done.stderr, done.stderr
        assert session_file(root / "state") == before
        # Another session naming it while this one holds d1.img is refused too.
        run_isc("create", "other", "--source", "d2.img", "--granularity", "4K", cwd=root)
        open_session(root / "other")[0].close()  # its first open fills in its file
        other = session_file(root / "other")
        with open_session(root / "state")[0]:
            done = run_isc("add-dest", "other", outer, "--name", "outer", cwd=root, fail=True)
        assert "in use by another isc session" in done.stderr, done.stderr
        assert session_file(root / "other") == other


@needs_guard
def test_a_writable_loop_device_over_the_loop_device_source_is_refused(root: Path) -> None:
    with loop_device(root / "source.img") as device:
        create_session(root / "on-device", device, granularity=G)
        before = session_file(root / "on-device")
        with (
            loop_device(device) as outer,
            pytest.raises(StateError, match=f"writable through the loop device {outer}"),
        ):
            open_session(root / "on-device")
        assert session_file(root / "on-device") == before


# -- the session's own export as a destination ---------------------------------------------------


def test_the_sessions_own_export_as_a_destination_undoes_no_host_write(root: Path) -> None:
    sock, ctl = root / "s.sock", root / "c.sock"
    uri = f"nbd+unix:///state?socket={sock}"
    # add-dest needs the export up: a placeholder of the source's size answers at the socket.
    with MemoryLUN(SIZE) as placeholder, NBDServer(placeholder, name="state") as server:
        server.start_unix(sock)
        run_isc("add-dest", "state", uri, "--name", "self", cwd=root)
    sock.unlink(missing_ok=True)
    serve = ["serve", str(root / "state"), "--listen", f"unix:{sock}", "--control", f"unix:{ctl}"]
    with daemon(root / "serve.log", *serve) as served, NBDLUN(uri, timeout=TIMEOUT) as host:
        assert control(ctl, "copy", mode="full-unmarked")["ok"]
        assert control(ctl, "mark")["ok"]
        host.write(G, b"after the mark" * 8)
        host.flush()
        done = control(ctl, "copy")
        held = host.read(G, 112)
        served.stop()
    assert held == b"after the mark" * 8, done
    outcome = done["info"]["outcomes"]["self"]
    assert outcome.startswith("failed") and "describes itself as 'isc export of the" in outcome
    assert done["info"]["outcomes"]["d1.img"] == "ok"
    assert (root / "source.img").read_bytes()[G : G + 112] == b"after the mark" * 8


# -- bad input: files of the state directory -----------------------------------------------------


def test_an_empty_checkpoint_journal_is_refused_in_one_line_saying_so(root: Path) -> None:
    journal = root / "state" / "checkpoint.journal"
    journal.write_bytes(b"")
    before = files(root / "state")
    for verb in ("mark", "copy", "unmark", "remove-dest"):
        done = run_isc(
            verb, "state", *(["d1.img"] if verb == "remove-dest" else []), cwd=root, fail=True
        )
        assert f"{journal.relative_to(root)} is empty" in done.stderr, done.stderr
        assert "isc recover state --reset-destinations" in done.stderr, done.stderr
        assert files(root / "state") == before


class FailingAfter(ForwardingLUN):
    """A destination's LUN whose writes after the first ``good`` fail."""

    def __init__(self, lun, good: int) -> None:
        super().__init__(lun)
        self.left = good

    def write(self, offset: int, data) -> None:
        if not self.left:
            raise OSError(errno.EIO, "injected failure")
        self.left -= 1
        self.lun.write(offset, data)


def test_an_older_copy_of_the_session_file_is_refused(tmp_path: Path) -> None:
    with FileLUN.create(tmp_path / "back.img", SIZE) as back:
        fill_random(back, random.Random(43))
    FileLUN.create(tmp_path / "d1.img", SIZE).close()
    with loop_device(tmp_path / "back.img") as device:
        create_session(tmp_path / "state", device, granularity=G)
        with open_session(tmp_path / "state")[0] as stored:
            stored.add_destination(str(tmp_path / "d1.img"), "d1")
            copy(stored, "full")
        backup = (tmp_path / "state" / METADATA).read_bytes()
        rng = random.Random(44)
        with open_session(tmp_path / "state")[0] as stored:
            for chunk in range(0, 32, 2):
                stored.session.write(chunk * G, rng.randbytes(G))
            stored.session.mark()
            (dest,) = stored.destinations
            dest.lun = FailingAfter(dest.lun, 4)
            with pytest.raises(CopyError):
                copy(stored, "incremental", io_size=G)
            assert dest.state is DestState.INCONSISTENT
        (tmp_path / "state" / METADATA).write_bytes(backup)
        before = files(tmp_path / "state")
        done = run_isc("mark", "state", cwd=tmp_path, fail=True)
        assert "older copy" in done.stderr, done.stderr
        assert files(tmp_path / "state") == before


def test_a_save_area_too_large_to_map_is_refused_at_create_in_one_line(root: Path) -> None:
    before = sorted(p.name for p in root.iterdir())
    done = run_isc("create", "big", "--source", "d2.img", "--save-area", "1P", cwd=root, fail=True)
    assert "save area of 1024 TiB cannot be mapped in memory" in done.stderr, done.stderr
    assert "--save-area" in done.stderr, done.stderr
    assert sorted(p.name for p in root.iterdir()) == before
    with pytest.raises(ParameterError, match="cannot be mapped in memory"):
        SaveArea(1 << 50)


# -- stress: copies in this process and real isc copies killed, destinations coming and going ----


class Faulty(Tripwire):
    """An export's LUN that fails every write while ``failing`` is set, and SIGKILLs the
    copying process at its Nth write or flush once armed (:class:`test_crash.Tripwire`)."""

    def __init__(self, lun) -> None:
        super().__init__(lun)
        self.failing = threading.Event()

    def write(self, offset: int, data) -> None:
        if self.failing.is_set():
            raise OSError(errno.EIO, "injected failure of d2")
        super().write(offset, data)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def check_destinations(stored, images: set[bytes]) -> int:
    """Rules 2 and 6 on ``stored`` while nothing writes: a destination in step has every
    difference from the source tracked, and one that reads consistent holds one of
    ``images``. Returns how many read consistent."""
    session, consistent = stored.session, 0
    for dest in stored.destinations:
        if dest.in_step(session):
            assert_no_lost_change(session, dest.lun)
        if dest.state is DestState.CONSISTENT:
            consistent += 1
            held = dest.lun.read(0, session.source.size)
            assert digest(held) in images, f"{dest.name} reads consistent, holds no image"
    return consistent


def copy_racing_writers(stored, rng: random.Random, images: set[bytes], d2: Faulty) -> bool:
    """One copy of a seeded kind in this process while two writer threads write a seeded
    amount, maybe cancelled at a seeded write, d2 maybe failing. Whether it failed."""
    session = stored.session
    size = session.source.size
    kind = rng.choice(("incremental", "incremental", "full", "full-unmarked"))
    if kind != "full-unmarked":
        in_step = all(d.in_step(session) for d in stored.destinations)
        session.mark(full=kind == "full" or not in_step)
        images.add(digest(session.source.read(0, size)))
    job_of, cancel_at, lock, count = (
        [],
        rng.choice((None, rng.randrange(1, 150))),
        threading.Lock(),
        [0],
    )

    def write(writer: int, seq: int, wrng: random.Random) -> None:
        length = wrng.choice((512, SMALL, 3 * SMALL + 100))
        session.write(wrng.randrange(size - length), wrng.randbytes(length))
        with lock:
            count[0] += 1
            if count[0] == cancel_at and job_of:
                job_of[0].cancel()

    d2.failing.set() if rng.random() < 0.25 else d2.failing.clear()
    with Writers(write, 2, rng.randrange(1 << 30)) as writers:
        writers.allow(rng.randrange(0, 200))
        try:
            copy(
                stored,
                "incremental" if kind != "full-unmarked" else kind,
                io_size=4 * SMALL,
                started=job_of.append,
            )
            failed = False
        except (CopyError, StateError):
            failed = True
        writers.settle()
    d2.failing.clear()
    return failed


def test_stress_of_copies_kills_failures_and_destinations_coming_and_going(tmp_path: Path) -> None:
    rng = random.Random("local-stress")
    size = 256 * SMALL + 1024  # a short last chunk
    with FileLUN.create(tmp_path / "source.img", size) as source:
        fill_random(source, rng)
    for name in ("d1", "d2", "d3"):
        FileLUN.create(tmp_path / f"{name}.img", size).close()
    d2 = Faulty(FileLUN(tmp_path / "d2.img"))
    export = Export(tmp_path / "d2.sock", d2)
    state = tmp_path / "state"
    create_session(
        state, str(tmp_path / "source.img"), granularity=SMALL, save_area=(12 * SMALL, None)
    )
    images: set[bytes] = set()
    rounds, kills, failed, consistent = 6, 0, 0, 0
    export.start()
    try:
        with open_session(state)[0] as stored:
            stored.add_destination(str(tmp_path / "d1.img"), "d1")
            stored.add_destination(export.uri, "d2")
            stored.add_destination(str(tmp_path / "d3.img"), "d3")
        with open(tmp_path / "isc.log", "ab") as log:
            for _ in range(rounds):
                with open_session(state)[0] as stored:
                    # After the kill of the round before (or nothing, at the first).
                    consistent += check_destinations(stored, images)
                    failed += copy_racing_writers(stored, rng, images, d2)
                    consistent += check_destinations(stored, images)
                    if rng.random() < 0.4:
                        if any(d.name == "d3" for d in stored.destinations):
                            stored.remove_destination("d3")
                        else:
                            stored.add_destination(str(tmp_path / "d3.img"), "d3")
                    # A real isc copy of a seeded kind with no host writes: its image is
                    # the source now. An incremental one copies this mark.
                    kind = rng.choice(([], ["--full"], ["--full", "--unmarked"]))
                    if not kind:
                        stored.session.mark(
                            full=not all(d.in_step(stored.session) for d in stored.destinations)
                        )
                    images.add(digest(stored.source.read(0, size)))
                d2.arm(rng.choice((0, 1, 2, 3, rng.randrange(1, 8))))  # a copy writes a few runs
                d2.failing.set() if rng.random() < 0.25 else d2.failing.clear()
                proc = subprocess.Popen(
                    [*ISC, "copy", str(state), *kind], stdout=subprocess.DEVNULL, stderr=log
                )
                d2.target(proc.pid)
                code = killed_by(export, proc)
                d2.failing.clear()
                assert code in (0, 1, -signal.SIGKILL), (tmp_path / "isc.log").read_text()
                kills += code == -signal.SIGKILL
                failed += code == 1
        assert "Traceback" not in (tmp_path / "isc.log").read_text()
        with open_session(state)[0] as stored:
            consistent += check_destinations(stored, images)
            # One full copy makes every destination the source again.
            copy(stored, "full")
            source_now = stored.source.read(0, size)
            for dest in stored.destinations:
                assert dest.state is DestState.CONSISTENT and dest.lun.read(0, size) == source_now
    finally:
        export.stop()
        d2.close()
    print(
        f"\nlocal stress: {rounds} rounds, {kills} kills, {failed} failed copies, "
        f"{consistent} consistent destinations checked against the images"
    )
    assert kills and failed and consistent, (kills, failed, consistent)
