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
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import TIMEOUT, assert_no_lost_change, differing_chunks, fill_random

import isc
from isc import DestState, FileLUN
from isc.store import copy, create_session, open_session, read_state

G = 4096
SIZE = 4 << 20
IO = 64 << 10
REGION = 64 << 10  # 64 activity regions
MAX_HOT = 4  # checkpoints often, so kills land in them too
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
    progress = Progress(
        stored, stored.destinations, every=4 * 65536, also=lambda done, total: say(done), bar=False
    )
    for _ in range(100):
        if mode == "incremental":
            stored.session.mark()
        copy(stored, mode, progress=progress, io_size=65536)
    stop.set()
"""


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """A session on a random 4 MiB source whose one destination is consistent and in step."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(11))
    FileLUN.create(tmp_path / "dest.img", SIZE).close()
    state = tmp_path / "state"
    create_session(
        state, str(tmp_path / "source.img"), granularity=G, region_size=REGION, max_hot=MAX_HOT
    )
    stored, _ = open_session(state)
    with stored:
        stored.add_destination(str(tmp_path / "dest.img"), "dest")
        copy(stored, "full-unmarked", io_size=IO)
        stored.session.mark()
        copy(stored, "incremental", io_size=IO)
    return state


def _lines(stream) -> queue.Queue:
    """The child's stdout lines, read by a thread so the parent can wait with a timeout."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def run_and_kill(state: Path, mode: str, seed: int, after: int) -> None:
    """Start a ``mode`` child and SIGKILL it after it printed ``after`` progress lines."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(state), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = _lines(child.stdout)
        for _ in range(after + 1):  # "open", then the progress lines
            try:
                line = lines.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"the {mode} child printed nothing for {TIMEOUT} s")
            if line is None:
                child.wait(TIMEOUT)
                pytest.fail(f"the {mode} child ended early: {child.stderr.read()}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


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


def test_recovered_session_records_the_kill(session: Path) -> None:
    run_and_kill(session, "write", seed=99, after=20)
    stored, recovery = open_session(session)
    stored.close()
    assert recovery.crashed and recovery.regions_resent > 0
    assert recovery.bytes_resent_bound == recovery.regions_resent * REGION
    stored, again = open_session(session)
    stored.close()
    assert not again.crashed  # the recovery was checkpointed, the close was clean
