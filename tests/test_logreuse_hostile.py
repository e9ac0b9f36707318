"""Hostile tests of the reuse of an obsolete generation's log files (isc.activity) against
rules 2 and 9.

A checkpoint takes the next generation's files from the spare (the files of a
generation a newer checkpoint on disk made obsolete, kept open): it cuts the
region log to the kept records, rewrites the write log's head in its mapping
and renames both; once the journal holds it, the generation it ended becomes
the spare (two renames) and any other obsolete one is deleted. So a reused
file holds the records of an older generation until the cut, and the names
move without a sync of the directory after the renames to the spare.

The tests crash at every system call of the checkpoints that reuse the spare,
after host writes to a kept and a cold region made just before it: a crash of
the process (the kernel keeps every page), and one of the machine that loses
the write logs, the renames not yet synced and the cut of a reused region log
no sync followed yet (whose old records then lie beyond the new ones). After
each, every chunk where the destination differs from the source must be
tracked or in transfer, and one update must make them equal; after a clean
close whose checkpoint kept no region, a crash of the machine must leave a
mark in force. A process whose writer threads race checkpoints that reuse the
spare is SIGKILLed right after it announces one of those system calls, and the
same holds after each kill. Then the failures of the renames and
deletes that retire the obsolete generations: a rename that fails there costs no
later checkpoint nor the close, and leaves no files piling up; a delete that fails
there leaves no closed generation to become the spare, so no later checkpoint cuts
the file that took its descriptor number.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from pathlib import Path

import pytest
from test_activity_hostile import Crashes, Image, check, hold_checkpoints, write_in
from test_crash import recover_and_check, run_and_kill, session  # noqa: F401 (a fixture)
from test_store import HOT_REGIONS, hot_session, opened

import isc.activity
from isc._core import IO_FDATASYNC, IO_FSYNC, IO_FTRUNCATE, IO_PWRITE, IO_RENAME, run_io
from isc.store import open_session

STEPS = ("ftruncate", "pwrite", "fdatasync", "rename", "fsync", "unlink")
"""The system calls of ``isc.activity`` a crash comes before."""


def stepwise(os_like) -> object:
    """Stands for ``isc.activity.run_io``: runs each step alone through ``os_like``'s call
    of its name, so a test can act between the steps of one core call (the core's own
    steps are test_core_io's)."""

    def run(steps) -> None:
        for kind, fd, *rest in steps:
            if kind == IO_FTRUNCATE:
                os_like.ftruncate(fd, *rest)
            elif kind == IO_PWRITE:
                os_like.pwrite(fd, *rest)
            elif kind in (IO_FDATASYNC, IO_FSYNC):
                getattr(os_like, "fdatasync" if kind == IO_FDATASYNC else "fsync")(fd)
            else:
                assert kind == IO_RENAME
                old, new = map(os.fsdecode, rest)
                os_like.rename(old, new, src_dir_fd=fd, dst_dir_fd=fd)

    return run


def through(patch: pytest.MonkeyPatch, os_like) -> None:
    """Route ``isc.activity``'s system calls through ``os_like`` (``os``: back to the real)."""
    patch.setattr(isc.activity, "os", os_like)
    patch.setattr(isc.activity, "run_io", run_io if os_like is os else stepwise(os_like))


@pytest.fixture(autouse=True)
def small_write_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write logs of 1 MiB: each crash image copies them whole."""
    monkeypatch.setattr(isc.activity, "WRITES_BYTES", 1 << 20)


class Stepping:
    """Stands for ``os`` in ``isc.activity``: calls ``before(name)`` ahead of each of its
    :data:`STEPS` while ``armed`` (not again from inside ``before``), and remembers the
    renames since the last sync of a directory and the content a region log had before
    each cut (``ftruncate``) that no sync followed yet, by inode."""

    def __init__(self, before) -> None:
        self._before = before
        self.armed = False
        self.renames: list[tuple[str, str]] = []
        self.before_cut: dict[int, bytes] = {}
        self.cuts = 0

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name not in STEPS:
            return real

        def call(*args, **kwargs):
            if self.armed:
                self.armed = False
                try:
                    self._before(name)
                finally:
                    self.armed = True
            if name == "ftruncate":
                st = os.fstat(args[0])
                self.before_cut[st.st_ino] = os.pread(args[0], st.st_size, 0)
                self.cuts += 1
            result = real(*args, **kwargs)
            if name == "rename":
                self.renames.append((args[0], args[1]))
            elif name == "fsync":
                self.renames.clear()
            if name in ("fsync", "fdatasync"):  # a cut synced since stays cut
                self.before_cut.pop(os.fstat(args[0]).st_ino, None)
            return result

        return call


def machine_image(image: Image, stepping: Stepping, inodes: dict[str, int]) -> None:
    """Make the process crash ``image`` one of the machine: the write logs lost, the renames
    not synced undone, and each reused region log holding its old records past its new
    ones (its cut never reached the disk). ``inodes``: each region log's inode in the
    running session's directory, by name."""
    for writes in image.state.glob("activity*.writes"):
        writes.unlink()
    for log in image.state.glob("activity*.log"):
        old = stepping.before_cut.get(inodes.get(log.name, -1))
        now = log.read_bytes()
        if old is not None and len(old) > len(now):
            log.write_bytes(now + old[len(now) :])
    for old, new in reversed(stepping.renames):
        if (image.state / new).exists():
            os.rename(image.state / new, image.state / old)
    image.kind = "machine"


def test_crashes_at_each_system_call_of_checkpoints_that_reuse_the_spare_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints that take the spare's files (one keeping no region, whose cut no sync
    follows, and ones keeping regions): before each of their system calls a host write
    to a kept region and one to a cold region, then a crash of the process and one of
    the machine. Each loses nothing."""
    state = hot_session(tmp_path, max_hot=4, hot_limit=16)
    crashes = Crashes(tmp_path)
    rng = random.Random("reuse")

    def crash(name: str) -> None:
        hot = sorted(stored.session.bitmap.hot_regions().tolist())
        cold = sorted(set(range(HOT_REGIONS)) - set(hot))
        for region in (rng.choice(hot) if hot else 0, rng.choice(cold)):
            write_in(stored, region, rng)
        inodes = {log.name: log.stat().st_ino for log in state.glob("activity*.log")}
        crashes.take(state, "process")
        machine_image(crashes.take(state, "process"), stepping, inodes)

    stepping = Stepping(crash)
    with opened(state) as stored:
        hold_checkpoints(stored)
        through(monkeypatch, stepping)
        for round_ in range(4):
            for region in rng.sample(range(HOT_REGIONS), 6):
                write_in(stored, region, rng)
            if round_ == 1:
                stored._closing.set()  # a checkpoint that keeps no region
            stepping.armed = round_ >= 1  # from the second on, the spare is taken
            stored.checkpoint()
            stepping.armed = False
            stored._closing.clear()
        through(monkeypatch, os)
        assert (state / "activity-spare.log").exists()
    assert len(crashes.images) > 30
    for image in crashes.images:
        check(image)
        shutil.rmtree(image.state)


def test_a_clean_close_that_reuses_the_spare_keeps_a_mark_across_a_crash_of_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close's checkpoint keeps no region: it takes the spare, whose region log holds an
    older generation's records, and cuts it to nothing. A crash of the machine after the
    close loses whatever was not synced; the cut must not be among it, or the next open
    reads the old records as the new generation's, resends their regions and ends the
    mark that survived the close (a pull in progress loses it for no reason)."""
    crashes, stepping = Crashes(tmp_path), Stepping(lambda name: None)
    state, stored = with_a_spare(tmp_path, random.Random("close"))
    try:
        stored.session.mark()
        through(monkeypatch, stepping)
    finally:
        stored.close()
    through(monkeypatch, os)
    assert stepping.cuts, "the close did not reuse the spare"
    inodes = {log.name: log.stat().st_ino for log in state.glob("activity*.log")}
    image = crashes.take(state, "process")
    machine_image(image, stepping, inodes)
    stored, recovery = open_session_held(image.state)  # the LUNs are as the close left them
    with stored:
        assert not recovery.crashed, recovery
        assert stored.session.bitmap.marked


# -- failures while a checkpoint retires the obsolete generations ---------------------------------


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def failing(name: str, when) -> object:
    """Stands for ``os`` in ``isc.activity``: its ``name`` call fails (EIO) when ``when(*args)``."""

    class Failing:
        def __getattr__(self, attr: str):
            real = getattr(os, attr)
            if attr != name:
                return real

            def call(*args, **kwargs):
                if when(*args):
                    raise OSError(errno.EIO, f"injected: {name} fails")
                return real(*args, **kwargs)

            return call

    return Failing()


def test_a_rename_to_the_spare_that_fails_costs_no_later_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's journal write is on disk when the rename of the generation it made
    obsolete to the spare fails halfway (the region log renamed, the write log not): that
    checkpoint may fail, but the next ones and the close work, the obsolete files do not
    pile up, and a crash of the machine after them loses nothing."""
    crashes, rng = Crashes(tmp_path), random.Random("rename")
    state, stored = with_a_spare(tmp_path, rng)
    try:
        write_in(stored, 5, rng)
        with monkeypatch.context() as patch:
            through(patch, failing("rename", to_the_spare_writes))
            with pytest.raises(OSError, match="injected"):
                stored.checkpoint()
        write_in(stored, 6, rng)
        stored.checkpoint()
        descriptors = _open_descriptors()  # the current generation's files and a spare's
        for region in (7, 8, 9):
            write_in(stored, region, rng)
            stored.checkpoint()
        crashes.take(state, "machine")
        assert _open_descriptors() <= descriptors
        assert len(list(state.glob("activity.*.log"))) == 1
    finally:
        stored.close()
    check(crashes.images[0])


@pytest.mark.parametrize("failing", range(6))
def test_a_step_of_the_spare_taking_core_call_that_fails_leaves_the_checkpoint_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """The core call that takes the spare for the next generation (cut, kept records,
    sync, two renames, sync of the directory) fails at each of its steps, the steps
    before it done by the real core: the checkpoint raises, the generation in force and
    the checkpoint before stay, host writes go on, the next checkpoint and the close
    work, and crashes of the process and of the machine right after the failure lose
    nothing."""
    crashes, rng = Crashes(tmp_path), random.Random(failing)
    calls = []

    def fails_at_a_step(steps) -> None:
        calls.append(steps)
        if len(steps) == 6 and any(step[0] == IO_FTRUNCATE for step in steps):
            run_io(steps[:failing])
            raise OSError(errno.EIO, f"injected: step {failing} fails")
        run_io(steps)

    state, stored = with_a_spare(tmp_path, rng)
    try:
        generation = stored._log.generation
        write_in(stored, 5, rng)
        with monkeypatch.context() as patch:
            patch.setattr(isc.activity, "run_io", fails_at_a_step)
            with pytest.raises(OSError, match=f"step {failing} fails"):
                stored.checkpoint()
        assert stored._log.generation == generation
        write_in(stored, 6, rng)
        crashes.take(state, "process")
        crashes.take(state, "machine")
        write_in(stored, 7, rng)
        stored.checkpoint()
        assert stored._log.generation > generation
    finally:
        stored.close()
    assert any(len(steps) == 6 for steps in calls), "no checkpoint took the spare"
    for image in crashes.images:
        check(image)


def to_the_spare_writes(old: str, new: str) -> bool:
    return new == "activity-spare.writes"


def open_session_held(state: Path):
    """``open_session`` with the checkpoints the test's (:func:`hold_checkpoints`)."""
    stored, recovery = open_session(state, checkpoint_interval=3600)
    hold_checkpoints(stored)
    return stored, recovery


def with_a_spare(root: Path, rng: random.Random):
    """:func:`test_store.hot_session` in ``root``, open with the checkpoints the test's,
    after writes to regions 1, 2 and 3 and two checkpoints: the generation holding their
    records is the spare. Returns the state directory and the open session."""
    state = hot_session(root, max_hot=4, hot_limit=16)
    stored, _ = open_session_held(state)
    try:
        for region in (1, 2, 3):
            write_in(stored, region, rng)
        stored.checkpoint()
        stored.checkpoint()
    except BaseException:
        stored.close()
        raise
    return state, stored


def test_a_delete_that_fails_as_a_checkpoint_retires_a_generation_truncates_no_other_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose journal write fails leaves two ended generations; the next
    checkpoint turns one into the spare and deletes the other, and that delete fails.
    The descriptors it closed are free: a file the process opens afterwards (a LUN, a
    connection's) may get their numbers, and no later checkpoint may write, cut or close
    it."""
    from isc import journal

    state, rng = tmp_path / "hot", random.Random("unlink")
    hot_session(tmp_path, max_hot=4, hot_limit=16)
    bystander = tmp_path / "bystander.img"
    bystander.write_bytes(b"\xa5" * 8192)
    stored, _ = open_session_held(state)
    held = []
    try:
        for region in (1, 2, 3):
            write_in(stored, region, rng)
        stored.checkpoint()
        stored.checkpoint()
        with monkeypatch.context() as patch:
            patch.setattr(journal.Journal, "write", failing_call)
            with pytest.raises(OSError, match="injected"):
                stored.checkpoint()
        numbers = [g.fd for g in (*stored._log._ended, stored._log._current)]
        with monkeypatch.context() as patch:
            through(patch, failing("unlink", lambda *args: True))
            with pytest.raises(OSError, match="injected"):
                stored.checkpoint()
        # The process opens files again: they take the lowest free descriptor numbers.
        for number in [n for n in numbers if not fd_open(n)]:
            fd = os.open(bystander, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(fd, number)
            os.close(fd)
            held.append(number)
        errors = []
        for region in (6, 7, 8):
            write_in(stored, region, rng)
            try:
                stored.checkpoint()
            except (OSError, TypeError) as exc:
                errors.append(exc)
        assert bystander.read_bytes() == b"\xa5" * 8192, "a checkpoint cut another file"
        assert not errors
    finally:
        stored.close()
        for number in held:
            with contextlib.suppress(OSError):
                os.close(number)


def failing_call(*args) -> None:
    raise OSError(errno.EIO, "injected: the journal write fails")


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- SIGKILL of a process whose writer threads race checkpoints that reuse the spare --------------

REUSE_CHILD = r"""
import os, random, sys, threading
import isc.activity
from isc._core import IO_FDATASYNC, IO_FSYNC, IO_FTRUNCATE, IO_PWRITE, IO_RENAME, run_io
from isc.store import open_session

state, seed = sys.argv[2], int(sys.argv[3])
say_lock = threading.Lock()

def say(text):
    with say_lock:
        print(text, flush=True)

from isc._core import run_io
NAMES = ("ftruncate", "pwrite", "fdatasync", "fsync", "rename")

class Announcing:
    def __getattr__(self, name):
        real = getattr(os, name)
        if name != "unlink":
            return real
        def call(*args, **kwargs):
            say(f"step {name}")
            return real(*args, **kwargs)
        return call

def announced(steps):
    # Each step of the core call alone, through the core, after its announcement.
    for step in steps:
        if NAMES[step[0]] in ("ftruncate", "rename", "fsync"):
            say(f"step {NAMES[step[0]]}")
        run_io([step])

stored, _ = open_session(state, checkpoint_interval=0.01)
# From here on: the kills land in the checkpoints beside the writers, not in the open's.
isc.activity.os = Announcing()
isc.activity.run_io = announced
size = stored.source.size
stop = threading.Event()

def writer(seed):
    rng = random.Random(seed)
    while not stop.is_set():
        length = rng.choice((512, 4096, 5000, 65536 + 512))
        stored.session.write(rng.randrange(0, size - length), rng.randbytes(length))

say("open")
for i in range(2):
    threading.Thread(target=writer, args=(seed * 10 + i,), daemon=True).start()
for n in range(100_000):
    stored.checkpoint()
"""


def test_sigkill_at_a_system_call_of_checkpoints_that_reuse_the_spare_while_writers_race(
    session: Path,  # noqa: F811 (test_crash's fixture: a random source, one destination)
) -> None:
    """A process checkpoints over and over (and its checkpointer every 10 ms) while two
    writer threads write through the session; it is killed right after announcing a cut,
    rename, sync or delete of its activity logs, most of them of a checkpoint that reuses
    the spare. After each kill (every other time with the write logs lost, as a crash of
    the machine leaves them), the destination has no untracked difference from the
    source, and one copy makes them equal."""
    rng = random.Random("reuse-kill")
    steps = []
    for kill in range(6):
        printed = run_and_kill(session, "reuse", kill, rng.randrange(8, 80), REUSE_CHILD)
        steps.append(printed[-1])
        if kill % 2:
            for writes in session.glob("activity*.writes"):
                writes.unlink()
        recover_and_check(session)
    assert all(step.startswith("step") for step in steps), steps
