"""A destination replaced after a crash mid-copy is not trusted (rules 6 and 12).

A plain NBD destination (``qemu-nbd``: no isc agent that could name the file
it serves) is known only by its fingerprint samples (:mod:`isc.fingerprint`).
``isc update`` and ``isc serve --every`` are killed with SIGKILL at forced
points of a copy; then the export is replaced, at the same socket, by a
wiped one, and the next ``isc update`` must not report it CONSISTENT unless
it holds the source. The points, installed by a ``sitecustomize`` module
first on ``PYTHONPATH`` of the processes started and armed by the JSON file
``ISC_TEST_FAULTS`` names:

===================  ==========================================================
``flush_every=N``    every copy flushes its destinations each N bytes sent
``io_size=N``        and sends runs of at most N bytes
``checkpoint=N``     and checkpoints each N bytes sent (:class:`isc.store.Progress`)
``kill_at_run=N``    the process dies once its copy sent its N-th run
``kill_at_flush=N``  the process dies once its copy made its N-th flush
``kill_at_end=1``    the process dies as it records the end of its copy, after
                     the copy's last flush and samples
===================  ==========================================================

qemu-nbd comes from Debian's qemu-utils package.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from test_agent import ENV
from test_cli_analysis import ISC
from test_nbd import spawn, tool

from isc import FileLUN
from isc.store import create_session, open_session, read_state

SIZE = 4 << 20
G = 16 << 10
WAIT = 30.0
"""Seconds any command a test runs may take."""

SITECUSTOMIZE = '''
"""Fault points of tests/test_samples_hostile.py, armed by the file ISC_TEST_FAULTS names."""
import functools
import json
import os
import signal

_FAULTS = os.environ.get("ISC_TEST_FAULTS")
_counts = {}


def _armed(name):
    with open(_FAULTS) as faults:
        return json.load(faults).get(name)


def _at(point):
    """Count an event of ``point``; die at its armed count."""
    wanted = _armed(point)
    _counts[point] = _counts.get(point, 0) + 1
    if wanted is not None and _counts[point] == int(wanted):
        os.kill(os.getpid(), signal.SIGKILL)


def _after(point, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        _at(point)
        return result

    return wrapper


if _FAULTS:
    from isc import copy, store

    _job, _progress = copy.CopyJob.__init__, store.Progress.__init__
    _save = store.PersistentSession.save

    def job(self, *args, **kwargs):
        io = {"io_size": _armed("io_size")} if _armed("io_size") else {}
        _job(self, *args, **{**kwargs, **io, "flush_every": _armed("flush_every") or (1 << 40)})

    def progress(self, *args, **kwargs):
        _progress(self, *args, **{**kwargs, "every": _armed("checkpoint") or (1 << 40)})

    def save(self):
        if self._receiving:
            _at("kill_at_end")
        _save(self)

    copy.CopyJob.__init__, store.Progress.__init__ = job, progress
    store.PersistentSession.save = save
    copy.CopyJob._flush = _after("kill_at_flush", copy.CopyJob._flush)
    store.Progress.__call__ = _after("kill_at_run", store.Progress.__call__)
'''


class Replica:
    """A session ``work/s`` on a random source with one destination ``d``: ``qemu-nbd``
    serving ``d.img`` on the Unix socket ``d.sock``, which :meth:`wipe` replaces."""

    def __init__(self, work: Path, stack: ExitStack) -> None:
        self.work, self.stack = work, stack
        hooks = work / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.faults = work / "faults.json"
        self.faults.write_text("{}")
        path = os.pathsep.join([str(hooks), ENV["PYTHONPATH"]])
        self.env = {**ENV, "PYTHONPATH": path, "ISC_TEST_FAULTS": str(self.faults)}
        self.source = work / "source.img"
        FileLUN.create(self.source, SIZE).close()  # zeros: only the chunks written hold data
        self.sock = work / "d.sock"
        self.uri = self.serve(work / "d.img")
        create_session(work / "s", str(self.source), granularity=G)
        stored, _ = open_session(work / "s")
        with stored:
            stored.add_destination(self.uri, "d")

    def serve(self, backing: Path) -> str:
        """Serve a new sparse ``backing`` of SIZE bytes at ``d.sock``; return its URI."""
        with open(backing, "wb") as image:
            image.truncate(SIZE)
        args = [tool("qemu-nbd"), "-f", "raw", "-k", str(self.sock), "--persistent", str(backing)]
        self.server = self.stack.enter_context(spawn(args, self.sock, backing))
        return self.server.uri

    def wipe(self) -> None:
        """Another, zeroed volume at the destination's address."""
        assert self.server.proc is not None
        self.server.proc.kill()
        self.server.proc.wait(WAIT)
        self.sock.unlink()
        assert self.serve(self.work / "wiped.img") == self.uri

    def host_writes(self, rng: random.Random, chunks) -> None:
        """A write of 4 KiB of random data into each of ``chunks``, through the session."""
        stored, _ = open_session(self.work / "s")
        with stored:
            for chunk in chunks:
                stored.session.write(chunk * G + rng.randrange(G - 4096), rng.randbytes(4096))

    def run(self, *args: str, **faults: object) -> subprocess.CompletedProcess[str]:
        self.faults.write_text(json.dumps(faults))
        return subprocess.run(
            [*ISC, *args], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=WAIT
        )

    def killed_serving(self, **faults: object) -> None:
        """``isc serve s --every`` until a fault point kills it in its first update."""
        self.faults.write_text(json.dumps(faults))
        sock = self.work / "serve.sock"
        serve = [*ISC, "serve", "s", "--listen", f"unix:{sock}", "--every", "0.01"]
        proc = subprocess.run(serve, cwd=self.work, env=self.env, capture_output=True, timeout=WAIT)
        assert proc.returncode == -signal.SIGKILL, proc.stderr

    def state(self) -> str:
        (dest,) = read_state(self.work / "s").meta["destinations"]
        return dest["state"]

    def holds_the_source(self) -> bool:
        assert self.server.backing is not None
        return self.server.backing.read_bytes() == self.source.read_bytes()


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    with ExitStack() as stack:
        yield Replica(tmp_path, stack)


SMALL = {"flush_every": 2 * G, "checkpoint": 2 * G, "io_size": 4 * G}
"""A copy of a few chunks flushes and checkpoints between its runs."""

POINTS = {
    "before-the-first-flush": {"kill_at_run": 2},
    "between-flushes": {**SMALL, "kill_at_flush": 2},
    "after-the-last-flush": {**SMALL, "kill_at_end": 1},
}


@pytest.mark.parametrize(
    ("command", "point"), [*(("update", point) for point in POINTS), ("serve", "between-flushes")]
)
def test_a_destination_wiped_after_a_kill_mid_copy_is_not_trusted(
    replica: Replica, command: str, point: str
):
    rng = random.Random(point)
    assert replica.run("update", "s").returncode == 0  # the first, full copy
    # Data in chunks 0 and 1 alone: the update's samples take both (data first), and
    # the copy's read-back of chunks it did not write rarely falls in either.
    replica.host_writes(rng, [0, 1])
    assert replica.run("update", "s").returncode == 0
    replica.host_writes(rng, rng.sample(range(2, SIZE // G), 8))
    if command == "update":
        assert replica.run("update", "s", **POINTS[point]).returncode == -signal.SIGKILL
    else:
        replica.killed_serving(**POINTS[point])
    assert replica.state() == "inconsistent"  # the killed copy had written to it
    replica.wipe()
    done = replica.run("update", "s")
    assert done.returncode == 0, done.stderr
    # Its samples of chunks 0 and 1 told it is another volume: it got every chunk.
    assert replica.state() == "consistent" and replica.holds_the_source()


def test_a_destination_wiped_after_its_first_full_copy_was_killed_gets_a_full_copy(
    replica: Replica,
):
    replica.host_writes(random.Random(5), range(0, SIZE // G, 16))
    assert replica.run("update", "s", **SMALL, kill_at_flush=3).returncode == -signal.SIGKILL
    assert replica.state() == "inconsistent"
    replica.wipe()
    assert replica.run("update", "s").returncode == 0
    assert replica.state() == "consistent" and replica.holds_the_source()
