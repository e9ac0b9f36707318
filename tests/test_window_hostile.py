"""The local data path's windows attacked: the session, the copy, the save area, the
checkpoints and a crash, each between a check or a change and what relies on it
(rules 2, 6, 9, 10 and 11).

Already attacked elsewhere and not repeated here: COFW reads and save areas that fail,
aborted marks around a copy's runs, writes of saved chunks (tests/test_safety.py,
tests/test_savedwrite_hostile.py); a checkpoint cut short or torn, at every system call,
and the hot set's reuse of regions and of log files (tests/test_store.py,
tests/test_crash.py, tests/test_activity_hostile.py, tests/test_logreuse_hostile.py);
another session's journal, the source swapped or written outside a session, a truncated
destination (tests/test_boundary_hostile.py, tests/test_trust.py,
tests/test_sparse_hostile.py); a destination added or removed while a copy runs
(tests/test_store.py).

Attacked here, each hole found named with the code that closed it:

* a checkpoint journal and its activity logs put back from a backup of the same session
  (the same session id, older checkpoints), whose bitmap lacks what was tracked since:
  opened as current (``session.json`` now records the newest checkpoint, isc.store);
* the source another ``isc`` process holds, given to ``isc add-dest`` of another session;
* a copy cancelled, closed or failing while a host write's COFW save is parked in the
  source's read;
* a save area file on a small tmpfs that fills mid-copy (ENOSPC);
* two copy jobs of one session at once: the one that joined last reported its
  destination CONSISTENT without the runs the other cleared (``Session.copy_lock``);
* a copy that fails and ends between a checkpoint's snapshot and its flush of the
  running copy's destinations: the checkpoint recorded the runs sent without flushing
  them, and a crash with a power cut at the destination lost them (the metadata lock
  held across the two, isc.store);
* a close while a copy runs in another thread: it dropped the copy's record while its
  checkpoint held an unmarked full copy half way, so its unsent chunks read untracked
  at the next open (the record stays, isc.store);
* a write to a region a checkpoint kept hot (no region record), then SIGKILL, with and
  without the write logs;
* an unmarked full copy cut short (a destination dropped out, or the copy failed) after
  a checkpoint that held tracking cleared, its end saved, then a crash before the next
  checkpoint: what it put back in tracking, in memory only, was lost and its
  destinations read in step (its end is saved after a checkpoint, isc.store; found by
  the stress below);
* a seeded stress in a child process SIGKILLed at seeded points: writer threads writing
  the source through the session, marked and unmarked copies to two destinations,
  cancels, a destination failing on demand, a small save area file, checkpoints racing
  it all. The child checks every destination it saw reported CONSISTENT against the
  image at its mark (rules 1 and 6) and that every chunk where one in step differs from
  the source is tracked (rule 2); after each kill the parent reopens the session and
  checks the same for what the crash left (rule 9), then one update makes each
  destination equal to the source.

Every wait is bounded (:data:`helpers.TIMEOUT`), randomness is seeded; the tmpfs and the
source's guard need root and skip without it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import (
    TIMEOUT,
    Gate,
    HookLUN,
    Worker,
    assert_no_lost_change,
    fill_random,
    session_directory,
)
from test_crash import run_and_kill
from test_safety import VolatileLUN
from test_serve import line_reader, next_line

import isc
from isc import DestState, MemoryLUN, journal
from isc.copy import CopyJob, Destination
from isc.errors import CopyError, CorruptMetadata, StateError
from isc.lun import ForwardingLUN
from isc.savearea import SaveArea
from isc.session import Session
from isc.store import copy, open_session, read_state

G = 4096
SIZE = 1 << 20
ROOT = Path(isc.__file__).resolve().parent.parent


def _own_files(state: Path) -> list[Path]:
    return [p for p in state.iterdir() if p.name.startswith(("checkpoint", "activity"))]


def test_a_journal_and_logs_put_back_from_a_backup_of_the_session_are_refused(
    tmp_path: Path,
) -> None:
    state = session_directory(tmp_path, SIZE, G, seed=1)
    backup = tmp_path / "backup"
    backup.mkdir()
    for p in _own_files(state):
        shutil.copy2(p, backup / p.name)
    with open_session(state)[0] as stored:
        stored.session.write(5 * G, b"x" * 100)  # tracked from here on, not in the backup
    for p in _own_files(state):
        p.unlink()
    for p in backup.iterdir():
        shutil.copy2(p, state / p.name)
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    with pytest.raises(CorruptMetadata, match="older copy") as refused:
        open_session(state)
    assert len(str(refused.value).splitlines()) == 1
    assert journal.NAME in str(refused.value) and "--reset-destinations" in str(refused.value)
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before
    assert "older copy" in read_state(state).damage
    # The way out the message names starts again, and the next open trusts what it wrote.
    open_session(state, reset=True)[0].close()
    with open_session(state)[0] as stored:
        assert stored.session.bitmap.tracking(5)


HOLD = r"""
import sys
from isc.store import open_session

with open_session(sys.argv[1])[0]:
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the source's guard (isc.guard) needs root")
def test_the_source_another_isc_process_holds_is_refused_as_a_destination(
    tmp_path: Path,
) -> None:
    """``isc add-dest`` of a file another process's session holds as its source: a copy
    would write it outside the session that tracks it (rule 11). The image locks do not
    stop it (a destination takes none); the holder's guard refuses the open."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    held = session_directory(tmp_path / "a", SIZE, G, seed=1)
    other = session_directory(tmp_path / "b", SIZE, G, seed=2)
    victim = tmp_path / "a" / "source.img"
    before = read_state(other).meta["destinations"]
    holder = python_child(HOLD, held)
    try:
        assert next_line(line_reader(holder.stdout), "the holder") == "held"
        isc = Path(sys.executable).with_name("isc")
        added = subprocess.run(
            [str(isc), "add-dest", str(other), str(victim), "--name", "victim"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)
    assert added.returncode == 1, added
    assert len(added.stderr.strip().splitlines()) == 1 and "source.img" in added.stderr
    assert read_state(other).meta["destinations"] == before


def python_child(script: str, state: Path) -> subprocess.Popen[str]:
    """A child Python running ``script`` on ``state``, talking through its standard input
    and output."""
    return subprocess.Popen(
        [sys.executable, "-c", script, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def child_env() -> dict:
    """The environment of a child Python that imports this checkout's ``isc``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# -- a copy that ends while a host write's COFW save is parked ---------------------------------


class ParkedSaves(ForwardingLUN):
    """A source whose reads from the thread ``parked_in`` (a host write's COFW) wait at ``gate``."""

    def __init__(self, lun) -> None:
        super().__init__(lun)
        self.gate = Gate()
        self.parked_in: threading.Thread | None = None

    def readinto(self, offset: int, buffer) -> None:
        if threading.current_thread() is self.parked_in:
            self.gate()
        self.lun.readinto(offset, buffer)


@pytest.mark.parametrize("end", ["cancel", "close", "failure"])
def test_a_copy_ending_while_a_cofw_save_is_parked_loses_nothing(end: str) -> None:
    rng = random.Random(f"parked-{end}")
    source = ParkedSaves(MemoryLUN(SIZE))
    fill_random(source.lun, rng)
    target = HookLUN(MemoryLUN(SIZE))
    dest = Destination(target, "d0")
    session = Session(source, G, SaveArea(SIZE))
    job = CopyJob(session, [dest], io_size=G, workers=1)
    job.full(marked=False)
    for chunk in range(8):
        session.write(chunk * G, rng.randbytes(G))
    session.mark()
    job.progress = progress = Gate()  # the incremental copy parks after its first run
    if end == "failure":
        target.fail_at = target.writes + 2  # the second run's write
    copying = Worker(job.incremental)
    progress.wait_reached()
    data = rng.randbytes(G)

    def host_write() -> None:
        source.parked_in = threading.current_thread()
        session.write(5 * G, data)  # chunk 5 is unsent: its COFW reads the source

    writing = Worker(host_write)
    source.gate.wait_reached()  # the save holds the session's save lock, parked in its read
    if end == "cancel":
        job.cancel()
    closing = Worker(job.close) if end == "close" else None
    progress.open()
    source.gate.open()
    writing.finish()
    with pytest.raises(CopyError):
        copying.finish()
    if closing is not None:
        closing.finish()
    assert not session.bitmap.marked and session.save_area.used == 0
    assert dest.state is DestState.INCONSISTENT
    assert source.read(5 * G, G) == data  # the host write landed
    assert_no_lost_change(session, target)
    session.mark()
    CopyJob(session, [dest], io_size=G, workers=1).incremental()
    assert dest.state is DestState.CONSISTENT and target.read(0, SIZE) == source.read(0, SIZE)


# -- a save area file on a file system that fills ---------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 64 KiB tmpfs mounted at ``tmp_path/small`` (needs root to mount)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_save_area_whose_file_system_fills_mid_copy_aborts_the_mark_and_loses_nothing(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    rng = random.Random("enospc")
    state = session_directory(tmp_path, SIZE, G, seed=3)
    meta = json.loads((state / "session.json").read_text())
    meta["save_area"] = {"capacity": SIZE, "path": str(small_tmpfs / "area")}  # > the tmpfs
    (state / "session.json").write_text(json.dumps(meta))
    with open_session(state)[0] as stored:
        session = stored.session
        (dest,) = stored.destinations
        copy(stored, "full")
        for chunk in range(64):
            session.write(chunk * G, rng.randbytes(G))
        session.mark()
        gate = Gate()
        # A throttle keeps runs of io_size, not one in-kernel run of the whole source.
        runs = {"io_size": G, "throttle": 1e12, "started": parked(gate)}
        copying = Worker(lambda: copy(stored, "incremental", **runs))
        gate.wait_reached()
        writes = [(chunk * G, rng.randbytes(G)) for chunk in range(32, 64)]
        for offset, data in writes:  # 32 COFW saves of 4 KiB: the 17th finds no space
            session.write(offset, data)
        assert not session.bitmap.marked and "No space" in session.stats.last_abort
        gate.open()
        with pytest.raises(CopyError, match="aborted"):
            copying.finish()
        assert all(session.read(offset, G) == data for offset, data in writes)
        assert session.save_area.used == 0 and dest.state is DestState.INCONSISTENT
        assert_no_lost_change(session, dest.lun)
        # The next update, within the space left, makes the destination whole.
        session.mark()
        session.write(0, rng.randbytes(G))
        copy(stored, "incremental")
        assert dest.state is DestState.CONSISTENT
        assert_no_lost_change(session, dest.lun)


def parked(gate: Gate):
    """A ``started`` hook for :func:`isc.store.copy`: the copy parks at ``gate`` after its
    first run."""

    def started(job: CopyJob) -> None:
        progress = job.progress

        def park(done: int, total: int) -> None:
            progress(done, total)
            gate()

        job.progress = park

    return started


# -- a seeded stress, SIGKILLed at seeded points -----------------------------------------------

# The child runs copies of the session in a loop while writer threads write its source
# through it, a seeded number of writes a step; host writes hold ``quiet`` so the image
# at a mark is read whole. A step is a
# marked incremental, marked full or unmarked full copy, perhaps cancelled after a seeded
# host write, to d0 and d1 (whose writes fail on demand), beside checkpoints every 10 ms
# and a save area of 64 chunks. After each it checks, with the writers held: every
# destination it reports CONSISTENT holds the image at its mark (rules 1 and 6), and every
# chunk where one in step differs from the source is tracked (rule 2); it prints "bad ..."
# if not, then "step N".
STRESS_CHILD = r"""
import random, sys, threading
import numpy as np
from isc import DestState
from isc.errors import CopyError, StateError
from isc.lun import ForwardingLUN
from isc.store import copy, open_session

state, seed = sys.argv[2], int(sys.argv[3])  # sys.argv[1]: the mode, "stress"
rng = random.Random(seed)
stored, _ = open_session(state, checkpoint_interval=0.01)
session = stored.session
size, g = session.source.size, session.granularity
quiet = threading.Lock()
budget = threading.Semaphore(0)  # host writes allowed: a seeded number each step
cancel_at = [None, None]  # (write number, job)
writes = [0]


class Failing(ForwardingLUN):
    fail = 0.0

    def write(self, offset, data):
        if rng.random() < self.fail:
            raise OSError(5, "injected failure of d1")
        self.lun.write(offset, data)


d0, d1 = stored.destinations
d1.lun = Failing(d1.lun)


def writer(number):
    wrng = random.Random(seed * 10 + number)
    while budget.acquire():
        length = wrng.choice((512, g, 3 * g + 100))
        with quiet:
            session.write(wrng.randrange(0, size - length), wrng.randbytes(length))
            writes[0] += 1
            if cancel_at[0] is not None and writes[0] >= cancel_at[0]:
                cancel_at[1].cancel()
                cancel_at[0] = None


def differs(a, b):
    x = np.frombuffer(a, np.uint8).reshape(-1, g)
    y = np.frombuffer(b, np.uint8).reshape(-1, g)
    return np.flatnonzero((x != y).any(axis=1)).tolist()


# By destination: the image at the mark of its last copy that ended "ok" (what one
# that reads CONSISTENT at the open holds, the parent checked).
images = {d.name: d.lun.read(0, size) for d in stored.destinations}
threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(2)]
for thread in threads:
    thread.start()
print("open", flush=True)
for step in range(1, 10_000):
    kind = rng.choice(("incremental", "incremental", "full", "full-unmarked"))
    d1.lun.fail = rng.choice((0.0, 0.0, 0.05))
    budget.release(rng.randrange(10, 150))
    image = None
    with quiet:
        if session.bitmap.marked:
            session.unmark()
        if kind != "full-unmarked":
            stale = not all(d.in_step(session) for d in stored.destinations)
            session.mark(full=kind == "full" or stale)
            image = session.source.read(0, size)

    def started(job):
        if rng.random() < 0.3:
            with quiet:
                cancel_at[:] = [writes[0] + rng.randrange(1, 400), job]

    try:
        mode = "full-unmarked" if kind == "full-unmarked" else "incremental"
        outcomes = copy(stored, mode, io_size=4 * g, started=started).outcomes
    except (CopyError, StateError) as exc:
        outcomes = getattr(exc, "result", None) and exc.result.outcomes or {}
        print(f"failed {exc}".splitlines()[0], flush=True)
    checked = 0
    with quiet:
        cancel_at[0] = None
        source = session.source.read(0, size)
        for dest in stored.destinations:
            data = dest.lun.read(0, size)
            if outcomes.get(dest.name) == "ok":
                images[dest.name] = image
            if dest.state is DestState.CONSISTENT:
                checked += 1
                if data != images.get(dest.name):
                    print(f"bad: {dest.name} reads consistent, not the image at its mark")
            if dest.in_step(session):
                bitmap = session.bitmap
                lost = [
                    c for c in differs(source, data)
                    if not (bitmap.tracking(c) or bitmap.transfer(c))
                ]
                if lost:
                    print(f"bad: {dest.name} differs untracked in chunks {lost[:8]}", flush=True)
    print(f"step {step} {checked}", flush=True)
"""


def test_stress_of_writers_copies_cancels_and_failures_sigkilled_loses_nothing(
    tmp_path: Path,
) -> None:
    size = 2 << 20
    state = session_directory(tmp_path, size, G, seed=5, dests=("d0", "d1"))
    meta = json.loads((state / "session.json").read_text())
    meta["save_area"] = {"capacity": 64 * G, "path": str(tmp_path / "area")}
    (state / "session.json").write_text(json.dumps(meta))
    rng = random.Random("window-stress")
    steps = failed = consistent = 0
    kills = 8
    for kill in range(kills):
        printed = run_and_kill(state, "stress", kill, rng.randrange(4, 40), STRESS_CHILD)
        bad = [line for line in printed if line.startswith("bad")]
        assert not bad, bad
        steps += sum(line.startswith("step") for line in printed)
        consistent += sum(int(line.split()[2]) for line in printed if line.startswith("step"))
        failed += sum(line.startswith("failed") for line in printed)
        stored, _ = open_session(state)
        with stored:
            session = stored.session
            source = session.source.read(0, size)
            for dest in stored.destinations:  # rule 9
                if dest.in_step(session):
                    assert_no_lost_change(session, dest.lun)
                if dest.state is DestState.CONSISTENT and not dest.in_step(session):
                    continue  # an older image; its next copy gives it every chunk
            # One update makes every destination the source again.
            session.unmark()
            in_step = all(d.in_step(session) for d in stored.destinations)
            session.mark(full=not in_step)
            copy(stored, "incremental")
            for dest in stored.destinations:
                assert dest.state is DestState.CONSISTENT and dest.lun.read(0, size) == source
    print(
        f"\nstress: {kills} kills after {steps} steps, {failed} of them failed copies; "
        f"{consistent} destinations reported consistent checked against the image"
    )
    assert steps and failed and consistent, (steps, failed, consistent)


# -- two copies of one session at once ----------------------------------------------------------


class ParkedExtents:
    """A session's bitmap seen through a proxy whose ``extents`` (a copy listing its runs)
    waits at ``gate`` in the thread ``parked_in``."""

    def __init__(self, bitmap) -> None:
        self._bitmap = bitmap
        self.gate = Gate()
        self.parked_in: threading.Thread | None = None

    def extents(self, *args):
        if threading.current_thread() is self.parked_in:
            self.gate()
        return self._bitmap.extents(*args)

    def __getattr__(self, name):
        return getattr(self._bitmap, name)


def test_a_second_copy_of_a_session_while_one_runs_is_refused_and_changes_nothing() -> None:
    """Two copy jobs of one session on the same mark, to d0 and to d1: the one to d1 has
    checked that d1 is in step and is about to list its runs; the one to d0 sends and
    clears a run; the one to d1 then lists its runs without it and joins last. d1 would
    read CONSISTENT and in step, missing that run, none of it tracked (rules 2 and 6)."""
    rng = random.Random("two-copies")
    source = MemoryLUN(SIZE)
    fill_random(source, rng)
    d0, d1 = Destination(MemoryLUN(SIZE), "d0"), Destination(MemoryLUN(SIZE), "d1")
    session = Session(source, G, SaveArea(SIZE))
    CopyJob(session, [d0, d1]).full()
    for chunk in range(16):
        session.write(chunk * G, rng.randbytes(G))
    session.mark()
    session.bitmap = hooked = ParkedExtents(session.bitmap)
    stepped, gate = threading.Event(), Gate()

    def ran(done: int, total: int) -> None:
        stepped.set()
        gate()

    first = CopyJob(session, [d0], io_size=G, workers=1, progress=ran)
    second = CopyJob(session, [d1], io_size=G, workers=1)

    def copy_to_d1():
        hooked.parked_in = threading.current_thread()
        return second.incremental()

    def copy_to_d0():
        try:
            return first.incremental()
        finally:
            stepped.set()

    to_d1 = Worker(copy_to_d1)
    hooked.gate.wait_reached()
    to_d0 = Worker(copy_to_d0)
    assert stepped.wait(TIMEOUT)  # refused, or parked after its first run
    hooked.gate.open()
    to_d1.finish()
    gate.open()
    with pytest.raises((CopyError, StateError)) as refused:
        to_d0.finish()
    assert d1.state is DestState.CONSISTENT and d1.lun.read(0, SIZE) == source.read(0, SIZE)
    assert str(refused.value) == "another copy job is copying session; wait for that copy to end"
    # The refused copy changed nothing: d0 holds the image of the copy before, out of step
    # (the copy to d1 cleared chunks), so its next copy gives it every chunk.
    assert d0.state is DestState.CONSISTENT and not d0.in_step(session)
    session.mark()
    CopyJob(session, [d0, d1]).incremental()
    for dest in (d0, d1):
        assert dest.state is DestState.CONSISTENT and dest.lun.read(0, SIZE) == source.read(0, SIZE)


# -- a copy that fails while a checkpoint runs ----------------------------------------------------


def test_a_copy_failing_between_a_checkpoints_snapshot_and_its_flush_loses_nothing(
    tmp_path: Path,
) -> None:
    """The checkpoint's snapshot holds runs the copy sent and cleared, which the destination
    has not flushed; the copy then fails (the runs go back to tracking, after the snapshot)
    and ends its record before the checkpoint reads which destinations to flush. A crash
    of the process and a power cut at the destination then: every chunk where it differs
    from the source must be tracked (rules 2 and 9)."""
    rng = random.Random("failing-in-checkpoint")
    size = 64 * G
    state = session_directory(tmp_path, size, G, seed=7)
    stored = open_session(state, checkpoint_interval=3600)[0]
    copy(stored, "full")
    session, (dest,) = stored.session, stored.destinations
    for chunk in range(16):
        session.write(chunk * G, rng.randbytes(G))
    volatile = dest.lun = VolatileLUN(dest.lun)
    reached, fail = Gate(), threading.Event()
    ended = stored._meta_lock = EndingLock()
    write, rotate = volatile.write, stored._log.rotate

    def failing(offset: int, data) -> None:
        if offset == 9 * G:  # runs 0 to 8 are sent and cleared, not flushed
            reached()
            assert fail.wait(TIMEOUT)
            raise OSError(5, "injected failure of d0")
        write(offset, data)

    def rotating(generation) -> None:
        # The snapshot is taken: the copy fails and ends now, before the checkpoint goes on.
        fail.set()
        assert ended.ended.wait(TIMEOUT)
        rotate(generation)

    volatile.write = failing
    session.mark()
    copying = Worker(lambda: copy(stored, "incremental", io_size=G, flush_every=1 << 30))
    reached.wait_reached()
    reached.open()
    ended.watch = copying.thread
    stored._log.rotate = rotating
    stored.checkpoint()
    with pytest.raises(CopyError):
        copying.finish()
    volatile.power_cut()
    stored._stop_checkpointer()
    stored._release()  # a crash of the process: nothing more written
    with open_session(state)[0] as reopened:
        (dest,) = reopened.destinations
        assert dest.state is not DestState.CONSISTENT
        assert_no_lost_change(reopened.session, dest.lun)


class EndingLock:
    """A session's metadata lock that sets ``ended`` once the thread ``watch`` (a copy) has
    ended its record (``save``), or waits for it while another thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ended = threading.Event()
        self.watch: threading.Thread | None = None

    def acquire(self) -> bool:
        watched = threading.current_thread() is self.watch
        if watched and not self._lock.acquire(blocking=False):
            self.ended.set()  # held across the snapshot: the copy ends after the flush
            return self._lock.acquire()
        return watched or self._lock.acquire()

    def release(self) -> None:
        self._lock.release()
        if threading.current_thread() is self.watch:
            self.ended.set()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# -- a close while a copy runs ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full-unmarked", "incremental"])
def test_a_close_while_a_copy_runs_leaves_its_record_and_loses_nothing(
    tmp_path: Path, mode: str
) -> None:
    """A persistent session closed (the library's ``close``) while a copy of it runs in
    another thread: the close's checkpoint holds the copy's bitmaps half way (an unmarked
    full copy clears tracking as it begins), so the copy's record must stay for the next
    open to end it as failed (rules 2, 6, 9); and the copy's end, after the close, must
    write nothing into the state directory the close released."""
    rng = random.Random(f"close-mid-{mode}")
    size = 64 * G
    state = session_directory(tmp_path, size, G, seed=8)
    stored = open_session(state, checkpoint_interval=3600)[0]
    copy(stored, "full")
    for chunk in range(0, 64, 3):
        stored.session.write(chunk * G, rng.randbytes(G))
    if mode == "incremental":
        stored.session.mark()
    gate = Gate()
    runs = {"io_size": G, "throttle": 1e12, "started": parked(gate)}
    copying = Worker(lambda: copy(stored, mode, **runs))
    gate.wait_reached()
    stored.close()
    closed = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    gate.open()
    with pytest.raises((CopyError, StateError)):
        copying.finish()
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == closed
    with open_session(state)[0] as reopened:
        (dest,) = reopened.destinations
        assert dest.state is not DestState.CONSISTENT
        assert_no_lost_change(reopened.session, dest.lun)


# -- a region kept hot across a checkpoint, written after it, then SIGKILL -----------------------

KEPT_HOT = r"""
import sys
from isc.store import open_session

stored, _ = open_session(sys.argv[1], checkpoint_interval=3600)
region, g = stored.region_size, stored.session.granularity
stored.session.write(5 * region, b"a" * g)  # region 5 becomes hot
stored.checkpoint()  # and stays hot: written since the last checkpoint
stored.session.write(5 * region + 3 * g, b"b" * g)  # no record: the region is hot
print("written", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("machine", [False, True], ids=["process", "machine"])
def test_a_write_to_a_region_kept_hot_after_a_checkpoint_survives_a_sigkill(
    tmp_path: Path, machine: bool
) -> None:
    """The write that needed no region record (its region was kept hot by the checkpoint
    before it) is tracked after a SIGKILL: from the write log after a crash of the process,
    from the kept region's record in the new log after one of the machine, which loses
    the write logs (rule 9)."""
    state = session_directory(tmp_path, SIZE, G, seed=9)
    meta = json.loads((state / "session.json").read_text())
    meta["region_size"] = 16 * G
    (state / "session.json").write_text(json.dumps(meta))
    with open_session(state)[0] as stored:
        copy(stored, "full")
    child = python_child(KEPT_HOT, state)
    try:
        assert next_line(line_reader(child.stdout), "the writer") == "written"
    finally:
        child.kill()
        child.wait(TIMEOUT)
        child.stdin.close()
    if machine:
        for writes in state.glob("activity.*.writes"):
            writes.unlink()
    with open_session(state)[0] as reopened:
        bitmap = reopened.session.bitmap
        chunk = (5 * 16 * G + 3 * G) // G
        assert bitmap.tracking(chunk) or bitmap.transfer(chunk)
        (dest,) = reopened.destinations
        assert_no_lost_change(reopened.session, dest.lun)


# -- an unmarked full copy cut short, then a crash before the next checkpoint --------------------


@pytest.mark.parametrize("journal_fails", [False, True], ids=["checkpointed", "journal-fails"])
@pytest.mark.parametrize("failing", [("d1",), ("d0", "d1")], ids=["d1-drops", "copy-fails"])
def test_an_unmarked_full_copy_cut_short_then_a_crash_before_a_checkpoint_loses_nothing(
    tmp_path: Path, failing: tuple[str, ...], journal_fails: bool
) -> None:
    """An unmarked full copy clears tracking as it begins, and a checkpoint while it runs
    holds that; the copy then fails for ``failing`` at its first write (the others finish)
    and puts back in tracking, in memory, what it did not send them. Its end is saved and
    the process dies before the next checkpoint: every chunk where a destination in step
    differs from the source must be tracked (rules 2 and 9). The save checkpoints before
    the copy's record ends; where that checkpoint fails (the journal cannot be written),
    the copy's destinations need every chunk instead."""
    rng = random.Random(f"unmarked-cut-{failing}")
    size = 64 * G
    state = session_directory(tmp_path, size, G, seed=9, dests=("d0", "d1"))
    stored = open_session(state, checkpoint_interval=3600)[0]
    copy(stored, "full")
    for chunk in range(0, 64, 3):
        stored.session.write(chunk * G, rng.randbytes(G))
    write_journal = stored._journal.write
    checkpointed = threading.Event()

    def checkpoint_once(n: int, *_) -> None:
        if n == 1:
            stored.checkpoint()
            checkpointed.set()

    def write_or_fail(*args) -> None:
        if journal_fails and checkpointed.is_set():
            raise OSError(28, "injected: no space left for the journal")
        write_journal(*args)

    stored._journal.write = write_or_fail
    hooks = []
    for dest in stored.destinations:
        if dest.name in failing:
            dest.lun = HookLUN(dest.lun)
            dest.lun.fail_at = 1
            hooks.append(dest.lun)
    hooks[0].before_write = checkpoint_once
    try:
        copy(stored, "full-unmarked", io_size=G)
    except CopyError:
        assert failing == ("d0", "d1")
    assert checkpointed.is_set()
    stored._stop_checkpointer()
    stored._release()  # a crash of the process: nothing more written
    with open_session(state)[0] as reopened:
        for dest in reopened.destinations:
            in_step = dest.in_step(reopened.session)
            assert in_step is not journal_fails, dest
            if in_step:
                assert_no_lost_change(reopened.session, dest.lun)
