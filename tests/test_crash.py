"""Crash safety with real processes (rule 9): SIGKILL a child at random points, many times.

A child process opens a persistent session and writes random data through it
(and, in the copy runs, copies while writer threads keep writing), printing a
line every few writes or copy runs. The parent reads a seeded random number
of those lines, then kills the child with SIGKILL: the kill lands wherever
the child is, in a write, a log append, a checkpoint or a copy. After each
kill the parent reopens the session and checks that every chunk where the
destination differs from the source is tracked (rule 2), that a destination
an interrupted copy touched does not read consistent (rule 6), and that one
marked incremental copy makes the destination equal the source byte for byte.

It prints (does not assert) how much the copies after the crashes sent
against what had really changed: the price of the write-intent log's
granularity and of chunks sent again.

The same is done through the real commands, ``isc update SESSION`` and ``isc
serve SESSION --every S`` (processes of the installed ``isc``), on a session
with two destinations: a file, and an NBD export that this process serves
(:class:`Tripwire`), which SIGKILLs the command at its Nth write or flush,
so the kill lands at a seeded random point inside a copy; a kill of ``isc
serve`` may also come from the test's host writer, after its Nth write
through the served export. After each kill every destination must have no
untracked difference from the source, and one that ``isc status`` or the
reopened session reports consistent must hold a point-in-time image of the
source: with no host writes since the mark, the source itself.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from helpers import TIMEOUT, assert_no_lost_change, differing_chunks, fill_random
from test_serve import Export, line_reader, next_line

import isc
from isc import DestState, FileLUN, journal
from isc.lun import ForwardingLUN
from isc.nbd import NBDLUN
from isc.store import copy, create_session, open_session, read_state

G = 4096
SIZE = 4 << 20
IO = 64 << 10
REGION = 64 << 10  # 64 activity regions
MAX_HOT = 4  # checkpoints often, so kills land in them too: the hot set grows to 8, no more
ROOT = Path(isc.__file__).resolve().parent.parent

CHILD = r"""
import random, sys, threading
from isc.store import Progress, copy, open_session

mode, state, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
stored, _ = open_session(state, checkpoint_interval=0.05)
size = stored.source.size
say_lock = threading.Lock()

def say(text):
    with say_lock:
        print(text, flush=True)

def write(rng):
    length = rng.choice((512, 4096, 4096, 4096, 5000, 65536 + 512))
    stored.session.write(rng.randrange(0, size - length), rng.randbytes(length))

def writer(seed, stop):
    rng = random.Random(seed)
    while not stop.is_set():
        write(rng)

say("open")
if mode == "write":
    rng = random.Random(seed)
    for n in range(1, 200_000):
        write(rng)
        if n % 8 == 0:
            say(f"wrote {n}")
else:
    stop = threading.Event()
    for i in range(2):
        threading.Thread(target=writer, args=(seed * 10 + i, stop), daemon=True).start()
    progress = Progress(stored, every=4 * 65536, also=lambda done, total: say(done), bar=False)
    for _ in range(100):
        if mode == "incremental":
            stored.session.mark()
        copy(stored, mode, progress=progress, io_size=65536)
    stop.set()
"""


def create_small_hot_set(state: Path, source: Path) -> None:
    """A session whose hot set fills often: kills land in its checkpoints too."""
    create_session(
        state,
        str(source),
        granularity=G,
        region_size=REGION,
        max_hot=MAX_HOT,
        hot_limit=2 * MAX_HOT,
    )


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """A session on a random 4 MiB source whose one destination is consistent and in step."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(11))
    FileLUN.create(tmp_path / "dest.img", SIZE).close()
    state = tmp_path / "state"
    create_small_hot_set(state, tmp_path / "source.img")
    stored, _ = open_session(state)
    with stored:
        stored.add_destination(str(tmp_path / "dest.img"), "dest")
        copy(stored, "full-unmarked", io_size=IO)
        stored.session.mark()
        copy(stored, "incremental", io_size=IO)
    return state


def run_and_kill(state: Path, mode: str, seed: int, after: int, script: str = CHILD) -> list[str]:
    """Start a ``mode`` child and SIGKILL it after it printed ``after`` progress lines.

    Returns the lines it printed until then."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    printed = []
    child = subprocess.Popen(
        [sys.executable, "-c", script, mode, str(state), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = line_reader(child.stdout)
        for _ in range(after + 1):  # "open", then the progress lines
            printed.append(next_line(lines, f"the {mode} child"))
            if printed[-1] is None:
                child.wait(TIMEOUT)
                pytest.fail(f"the {mode} child ended early: {child.stderr.read()}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return printed


def recover_and_check(state: Path) -> tuple[bool, int, int]:
    """Reopen after a kill, check rules 2 and 6, copy once and compare.

    Returns whether a copy was running, the bytes that differed and the bytes sent.
    """
    copying = read_state(state).meta.get("copy") is not None
    stored, recovery = open_session(state)
    with stored:
        (dest,) = stored.destinations
        assert_no_lost_change(stored.session, dest.lun)
        if copying:  # the destination may hold a mix of points in time
            assert recovery.interrupted_copy and dest.state is not DestState.CONSISTENT
        source = stored.source.read(0, SIZE)
        changed = len(differing_chunks(source, dest.lun.read(0, SIZE), G)) * G
        if not stored.session.bitmap.marked:
            stored.session.mark()
        result = copy(stored, "incremental", io_size=IO)
        assert dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, SIZE) == source
    return copying, changed, result.bytes_sent


@pytest.mark.parametrize(
    ("mode", "kills"), [("write", 8), ("incremental", 6), ("full-unmarked", 4)]
)
def test_sigkill_at_random_points_loses_no_change(session: Path, mode: str, kills: int) -> None:
    rng = random.Random(f"crash-{mode}")
    interrupted = changed = sent = 0
    for kill in range(kills):
        run_and_kill(session, mode, seed=kill, after=rng.randrange(1, 40))
        cut_short, more_changed, more_sent = recover_and_check(session)
        interrupted += cut_short
        changed += more_changed
        sent += more_sent
    # The copy children print only from inside copies: most kills cut one short.
    assert (interrupted > 0) == (mode != "write")
    print(
        f"\n{mode}: {kills} kills, {interrupted} mid-copy; the copies after them sent "
        f"{sent / 2**20:.2f} MiB for {changed / 2**20:.2f} MiB that differed "
        f"({sent / max(changed, 1):.2f}x)"
    )


# A child that checkpoints a 1 TiB session at 2 KiB over and over: each checkpoint writes
# thousands of page records, in pieces it announces ("write"), so a kill after one of those
# lines lands inside a checkpoint. Its bitmap changes come in batches: chunks recorded
# directly (a batch a checkpoint did not cover is lost, as intended: nothing logged it) and
# one host write (logged); marks and unmarks in between move the bits between the bitmaps,
# so a checkpoint replayed in part would lose some.
CHECKPOINT_CHILD = r"""
import sys
import numpy as np
from isc import journal
from isc.store import open_session

state, seed = sys.argv[2], int(sys.argv[3])
journal._BUFFER = 1 << 14
write = journal._pwrite_all

def announced(fd, data, offset):
    print("write", flush=True)
    write(fd, data, offset)

journal._pwrite_all = announced
stored, _ = open_session(state, checkpoint_interval=3600)
bitmap = stored.session.bitmap
print("open", flush=True)
for n in range(1, 100_000):
    chunks = np.random.default_rng([seed, n]).integers(0, bitmap.chunks, 4096)
    stored.session.write(int(chunks[0]) * bitmap.granularity, b"w" * 4096)
    bitmap.record_writes(chunks * bitmap.granularity, np.full(4096, bitmap.granularity))
    if bitmap.marked:
        stored.session.unmark()
    elif n % 3 == 0:
        stored.session.mark()
    stored.checkpoint()
    print(f"checkpointed {n}", flush=True)
"""


def test_sigkill_inside_checkpoints_loses_nothing_they_covered(tmp_path: Path) -> None:
    FileLUN.create(tmp_path / "big.img", 1 << 40).close()  # sparse
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "big.img"), granularity=2048)
    rng = random.Random("crash-checkpoint")
    covered = np.empty(0, dtype=np.int64)
    torn = 0
    for kill in range(8):
        printed = run_and_kill(state, "checkpoint", kill, rng.randrange(1, 80), CHECKPOINT_CHILD)
        done = [int(line.split()[1]) for line in printed if line.startswith("checkpointed")]
        for n in range(1, max(done, default=0) + 1):
            batch = np.random.default_rng([kill, n]).integers(0, 1 << 29, 4096)
            covered = np.union1d(covered, batch)
        torn += journal.read(state / journal.NAME).torn is not None
        stored, _ = open_session(state)
        with stored:
            bitmap = stored.session.bitmap
            assert all(bitmap.tracking(int(c)) or bitmap.transfer(int(c)) for c in covered)
    print(f"\ncheckpoint kills: 8, {torn} left a torn checkpoint")
    assert torn, "no kill landed inside a checkpoint"


def test_recovered_session_records_the_kill(session: Path) -> None:
    # A kill just after a checkpoint, before the next write, leaves nothing to resend:
    # kill again until one lands after a write (the child checkpoints every few writes).
    for seed in range(99, 109):
        run_and_kill(session, "write", seed=seed, after=20)
        stored, recovery = open_session(session)
        stored.close()
        if recovery.crashed:
            break
    assert recovery.crashed and recovery.regions_resent > 0
    # The write log holds the writes made since the last checkpoint, within those regions.
    assert 0 < recovery.bytes_resent_bound <= recovery.regions_resent * REGION
    stored, again = open_session(session)
    stored.close()
    assert not again.crashed  # the recovery was checkpointed, the close was clean


# -- the real commands: isc update and isc serve --every ------------------------------------------
_INSTALLED = shutil.which("isc", path=str(Path(sys.executable).parent))
ISC = [_INSTALLED] if _INSTALLED else [sys.executable, "-m", "isc.cli"]
"""The ``isc`` installed beside this Python (the venv's), else the package run as a module."""
KILLS = 20  # kill points each loop of the real commands reaches


class Tripwire(ForwardingLUN):
    """A destination's LUN that SIGKILLs a process at its Nth write or flush after :meth:`arm`.

    The write or flush that trips it still lands, as one in flight may.
    """

    def __init__(self, lun) -> None:
        super().__init__(lun)
        self._lock = threading.Lock()
        self._left = 0  # events to the kill; 0: disarmed
        self._pid: int | None = None
        self._known = threading.Event()

    def arm(self, events: int) -> None:
        """Kill at the ``events``-th write or flush from now; :meth:`target` names the process."""
        with self._lock:
            self._left, self._pid = events, None
            self._known.clear()

    def target(self, pid: int) -> None:
        self._pid = pid
        self._known.set()

    def disarm(self) -> None:
        with self._lock:
            self._left = 0

    def _event(self) -> None:
        with self._lock:
            if not self._left:
                return
            self._left -= 1
            if self._left:
                return
            # The process may reach its first write before the test learnt its pid.
            assert self._known.wait(TIMEOUT), "the tripwire was never told whom to kill"
            os.kill(self._pid, signal.SIGKILL)  # type: ignore[arg-type]

    def write(self, offset: int, data) -> None:
        self._event()
        self.lun.write(offset, data)

    def flush(self) -> None:
        self._event()
        self.lun.flush()


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[Path, Export]]:
    """A session on a random source with two consistent destinations: d1, a file, and d2,
    an NBD export served by this process over a :class:`Tripwire` (``export.lun``)."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(12))
    for name in ("d1.img", "d2.img"):
        FileLUN.create(tmp_path / name, SIZE).close()
    export = Export(tmp_path / "d2.sock", Tripwire(FileLUN(tmp_path / "d2.img")))
    state = tmp_path / "state"
    create_small_hot_set(state, tmp_path / "source.img")
    export.start()
    try:
        stored, _ = open_session(state)
        with stored:
            stored.add_destination(str(tmp_path / "d1.img"), "d1")
            stored.add_destination(export.uri, "d2")
            copy(stored, "full", io_size=IO)
        yield state, export
    finally:
        export.stop()
        export.lun.close()


def random_write(rng: random.Random) -> tuple[int, bytes]:
    length = rng.choice((512, 4096, 5000, 65536 + 512))
    return rng.randrange(SIZE - length), rng.randbytes(length)


def killed_by(export: Export, proc: subprocess.Popen) -> int:
    """Wait for ``proc`` to end; then let every request it sent to the export land or fail
    (a server restart is the barrier). Returns its exit status."""
    try:
        code = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        export.lun.disarm()
        export.stop()
        export.start()
    return code


def check_after_kill(state: Path, images: Callable[[], Iterator[bytearray]]) -> dict[str, str]:
    """Reopen after a kill: every destination's differences from the source are tracked, and
    one reported consistent holds one of ``images()``, the point-in-time images the source
    went through. Returns each destination's state as ``isc status`` reports it."""
    status = subprocess.run(
        [*ISC, "status", str(state), "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    reported = {d["name"]: d["state"] for d in json.loads(status.stdout)["destinations"]}
    stored, _ = open_session(state)
    with stored:
        for dest in stored.destinations:
            assert_no_lost_change(stored.session, dest.lun)
            if DestState.CONSISTENT.value in (reported[dest.name], dest.state.value):
                held = dest.lun.read(0, SIZE)
                assert any(held == image for image in images()), (
                    f"{dest.name} reads consistent but holds no point-in-time image of the source"
                )
    return reported


def test_sigkill_of_isc_update_at_random_points(replicated: tuple[Path, Export], tmp_path: Path):
    state, export = replicated
    rng = random.Random("crash-isc-update")
    runs = kills = mixed = 0
    with open(tmp_path / "isc.log", "ab") as log:
        while kills < KILLS:
            assert runs < 3 * KILLS, f"{kills} of {runs} runs were killed: pick earlier points"
            runs += 1
            stored, _ = open_session(state)
            with stored:
                for _ in range(writes := rng.randrange(4, 16)):
                    stored.session.write(*random_write(rng))
            # A kill at a write or flush of the copy, or once the update printed its result
            # (its process is saving and closing the session then).
            point = rng.randrange(1, writes + 3)
            export.lun.arm(point if point <= writes + 1 else 0)
            update = [*ISC, "update", str(state), "--json"]
            proc = subprocess.Popen(update, stdout=subprocess.PIPE, stderr=log, text=True)
            export.lun.target(proc.pid)
            try:
                printed = next_line(line_reader(proc.stdout), "isc update")
                if point > writes + 1 and printed is not None:
                    proc.kill()
            finally:
                code = killed_by(export, proc)
            assert code in (0, -signal.SIGKILL), (tmp_path / "isc.log").read_text()
            kills += code == -signal.SIGKILL
            # No host write ran since the update marked: a consistent destination is the source.
            reported = check_after_kill(state, lambda: [bytearray(read_source(state))])
            mixed += DestState.INCONSISTENT.value in reported.values()
    print(f"\nisc update: {runs} runs, {kills} killed, {mixed} left a destination inconsistent")
    assert mixed, "no kill landed inside a copy"
    subprocess.run([*ISC, "update", str(state)], capture_output=True, timeout=TIMEOUT, check=True)
    stored, _ = open_session(state)
    with stored:
        source = stored.source.read(0, SIZE)
        for dest in stored.destinations:
            assert dest.state is DestState.CONSISTENT and dest.lun.read(0, SIZE) == source


def read_source(state: Path) -> bytes:
    return (state.parent / "source.img").read_bytes()


def write_until_killed(
    uri: str, rng: random.Random, server: subprocess.Popen, after: int | None
) -> list[tuple[int, bytes]]:
    """Host writes through ``uri`` until its ``server`` dies, killed after the ``after``-th
    write if that is not None. Returns every write sent, in order (the last may not have
    landed). Its armed destination may kill it before the writer connects: none then."""
    sent: list[tuple[int, bytes]] = []
    try:
        lun = NBDLUN(uri, timeout=TIMEOUT)
    except OSError:  # killed meanwhile: the connection waiting in its backlog is reset
        return sent
    with lun:
        while len(sent) < 100_000:
            sent.append(random_write(rng))
            try:
                lun.write(*sent[-1])
            except OSError:
                return sent
            if len(sent) == after:
                server.kill()
                return sent
    pytest.fail("isc serve was never killed")


def serve_until_killed(
    serve: list[str], export: Export, log, rng: random.Random, after: int | None
) -> tuple[int, list[tuple[int, bytes]]]:
    """Start ``isc serve`` (the command ``serve`` with ``--json``, its errors to ``log``)
    for ``export``'s armed LUN to kill, and write to it until it dies
    (:func:`write_until_killed`); its exit status and every write sent.

    Its export is the one its ready record names. Its periodic updates start before that
    record and print theirs from another thread, so one may come first; in text, an
    update's line could even land inside the line of the export's URI (a print writes
    its text and its end apart), so the records are read as JSON lines, each one write."""
    proc = subprocess.Popen([*serve, "--json"], stdout=subprocess.PIPE, stderr=log, text=True)
    export.lun.target(proc.pid)
    try:
        lines = line_reader(proc.stdout)
        record: dict = {}
        while not record.get("ready"):
            line = next_line(lines, "isc serve")
            assert line is not None, Path(log.name).read_text()  # it ended, never ready
            record = json.loads(line)
        (uri,) = record["exports"].values()
        writes = write_until_killed(uri, rng, proc, after)
    finally:
        code = killed_by(export, proc)
    return code, writes


def images_newest_first(start: bytes, writes: list[tuple[int, bytes]]) -> Iterator[bytearray]:
    """The source after every write of ``writes`` made to ``start``, the last first."""
    image = bytearray(start)
    undo = []
    for offset, data in writes:
        undo.append((offset, bytes(image[offset : offset + len(data)])))
        image[offset : offset + len(data)] = data
    yield image
    for offset, old in reversed(undo):
        image[offset : offset + len(old)] = old
        yield image


def test_sigkill_of_isc_serve_every_at_random_points(
    replicated: tuple[Path, Export], tmp_path: Path
):
    state, export = replicated
    rng = random.Random("crash-isc-serve")
    mixed = refull = 0
    serve = [*ISC, "serve", str(state), "--listen", "127.0.0.1:0", "--every", "0.02"]
    with open(tmp_path / "isc.log", "ab") as log:
        for _ in range(KILLS):
            start = read_source(state)
            by_writer = rng.random() < 0.3
            export.lun.arm(0 if by_writer else rng.randrange(1, 40))
            after = rng.randrange(1, 400) if by_writer else None
            code, writes = serve_until_killed(serve, export, log, rng, after)
            assert code == -signal.SIGKILL, (tmp_path / "isc.log").read_text()
            reported = check_after_kill(state, partial(images_newest_first, start, writes))
            mixed += DestState.INCONSISTENT.value in reported.values()
            stored, _ = open_session(state)
            with stored:  # make both consistent again: the next run starts from the source
                session = stored.session
                if not session.bitmap.marked:
                    session.mark(full=not any(d.in_step(session) for d in stored.destinations))
                try:
                    copy(stored, "incremental", io_size=IO)
                except isc.StateError as exc:
                    # A kill between a checkpoint and the samples written after it (the
                    # window widens on a loaded machine) leaves older samples: the copy
                    # takes the destinations for replaced, which costs a full copy and
                    # never a change (isc.store's _record_samples).
                    assert "does not hold what the last copy wrote there" in str(exc)
                    refull += 1
                    session.unmark()
                    session.mark(full=True)
                    copy(stored, "incremental", io_size=IO)
    print(
        f"\nisc serve --every: {KILLS} killed, {mixed} left a destination inconsistent, "
        f"{refull} cost a full copy"
    )
    assert mixed, "no kill landed inside a copy"
