"""Test doubles and oracles shared by the session and copy tests.

* :class:`HookLUN` wraps a LUN to inject faults (the Nth write or a flush
  raises ``OSError``) and to run test code inside a write (a host write in the
  middle of a copy, a thread parked inside the source's data I/O).
* :class:`Writers` runs host-writer threads whose amount of work the test
  controls, so writes race the copy job without making the test slow.
* :class:`Worker` runs one call in a thread; :class:`Gate` parks a thread at a
  hook until the test lets it go.
* :func:`differing_chunks`, :func:`assert_no_lost_change` and
  :func:`chunks_touched` are the oracles for rules 2 and 3.

Every wait is bounded by :data:`TIMEOUT` and fails the test when it expires:
a hang is reported as a failure, never waited out.
"""

from __future__ import annotations

import errno
import random
import socket
import threading
from collections.abc import Callable

import numpy as np
import pytest

from isc import FileLUN, MemoryLUN

TIMEOUT = 30.0
"""Seconds any wait in these tests may take before it fails the test."""


def make_lun(kind: str, size: int, tmp_path, name: str):
    """A zero-filled LUN of ``size`` bytes: ``kind`` is "memory" or "file" (under tmp_path)."""
    if kind == "memory":
        return MemoryLUN(size)
    return FileLUN.create(tmp_path / f"{name}.img", size)


def fill_random(lun, rng: random.Random) -> bytes:
    """Fill ``lun`` with random bytes from ``rng``; return them."""
    data = rng.randbytes(lun.size)
    lun.write(0, data)
    return data


def chunks_touched(offset: int, length: int, granularity: int) -> range:
    """The chunks a write of ``length`` (> 0) bytes at ``offset`` covers."""
    return range(offset // granularity, (offset + length - 1) // granularity + 1)


def chunk_bytes(chunk: int, granularity: int, size: int) -> int:
    """Length of ``chunk`` (the last chunk of a LUN may be short)."""
    return min(granularity, size - chunk * granularity)


def differing_chunks(a: bytes, b: bytes, granularity: int) -> list[int]:
    """Chunks whose bytes differ between two images of the same size."""
    assert len(a) == len(b)
    pad = -len(a) % granularity
    x = np.frombuffer(a + bytes(pad), np.uint8).reshape(-1, granularity)
    y = np.frombuffer(b + bytes(pad), np.uint8).reshape(-1, granularity)
    return np.flatnonzero((x != y).any(axis=1)).tolist()


def assert_no_lost_change(session, lun) -> None:
    """Rule 2: every chunk where ``lun`` differs from the source is in tracking or transfer.

    Call it while no host write runs, on a destination that was copied to once.
    """
    size = session.source.size
    bitmap = session.bitmap
    lost = [
        c
        for c in differing_chunks(
            session.source.read(0, size), lun.read(0, size), bitmap.granularity
        )
        if not (bitmap.tracking(c) or bitmap.transfer(c))
    ]
    assert not lost, f"chunks differ from the source but are in neither bitmap: {lost}"


class HookLUN:
    """A LUN wrapper with fault injection and a hook run inside every write.

    ``before_write(n, offset, data)`` runs before the ``n``-th write (1-based,
    counted over the wrapper's life) reaches the LUN. ``fail_at = n`` makes
    write ``n`` raise ``OSError`` after writing nothing, or with
    ``partial=True`` after writing the first half of the data (a device that
    fails mid-transfer). ``fail_flush`` makes ``flush`` raise ``OSError``.
    ``written`` lists ``(offset, length)`` of every write that completed;
    ``flushes`` counts calls of ``flush``.
    """

    def __init__(self, lun) -> None:
        self.lun = lun
        self.size = lun.size
        self.writes = 0
        self.written: list[tuple[int, int]] = []
        self.before_write: Callable[[int, int, object], object] | None = None
        self.fail_at: int | None = None
        self.partial = False
        self.fail_flush = False
        self.flushes = 0

    @property
    def closed(self) -> bool:
        return self.lun.closed

    def read(self, offset: int, length: int) -> bytes:
        return self.lun.read(offset, length)

    def readinto(self, offset: int, buffer) -> None:
        self.lun.readinto(offset, buffer)

    def write(self, offset: int, data) -> None:
        self.writes += 1
        n = self.writes
        if self.before_write is not None:
            self.before_write(n, offset, data)
        if n == self.fail_at:
            if self.partial:
                view = memoryview(data).cast("B")
                self.lun.write(offset, view[: len(view) // 2])
            raise OSError(errno.EIO, f"injected failure of write {n} at offset {offset}")
        self.lun.write(offset, data)
        self.written.append((offset, memoryview(data).nbytes))

    def flush(self) -> None:
        self.flushes += 1
        if self.fail_flush:
            raise OSError(errno.EIO, "injected flush failure")
        self.lun.flush()

    def close(self) -> None:
        self.lun.close()


class Writers:
    """Threads that each call ``write(writer, seq, rng)`` in a loop, under the test's control.

    Writes are budgeted: ``allow(n)`` lets ``n`` more writes start, shared by
    all threads, so the test decides how much is written and roughly when
    while the threads still race the copy job. ``seq`` counts each writer's
    writes from 1; ``rng`` is the writer's own ``random.Random(seed + writer)``.
    ``started[w]`` and ``done[w]`` count writer ``w``'s writes begun and
    finished. An exception in a writer stops all of them and is re-raised by
    the next call of the test thread and on exit.
    """

    def __init__(self, write: Callable[[int, int, random.Random], object], count: int, seed: int):
        self._write = write
        self._cond = threading.Condition()
        self._budget = 0
        self._paused = False
        self._stop = False
        self._busy = 0
        self.started = [0] * count
        self.done = [0] * count
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(w, seed + w), daemon=True)
            for w in range(count)
        ]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(TIMEOUT)
            if thread.is_alive():
                pytest.fail(f"writer {thread.name} did not stop within {TIMEOUT} s")
        self._raise_errors()

    def _run(self, writer: int, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or (self._budget and not self._paused))
                if self._stop:
                    return
                self._budget -= 1
                self._busy += 1
                self.started[writer] += 1
                seq = self.started[writer]
            try:
                self._write(writer, seq, rng)
            except BaseException as exc:
                with self._cond:
                    self._errors.append(exc)
                    self._stop = True
                    self._busy -= 1
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy -= 1
                self.done[writer] += 1
                self._cond.notify_all()

    def _raise_errors(self) -> None:
        if self._errors:
            raise AssertionError(f"a writer thread failed: {self._errors[0]!r}") from self._errors[
                0
            ]

    def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._errors or predicate(), TIMEOUT)
        self._raise_errors()
        if not ok:
            pytest.fail(f"timed out after {TIMEOUT} s waiting for {what}")

    @property
    def total_done(self) -> int:
        with self._cond:
            return sum(self.done)

    def allow(self, n: int) -> None:
        """Let ``n`` more writes start (returns at once)."""
        with self._cond:
            self._budget += n
            self._cond.notify_all()
        self._raise_errors()

    def limit(self, n: int) -> None:
        """Let at most ``n`` more writes start from now on."""
        with self._cond:
            self._budget = min(self._budget, n)

    def wait_done(self, total: int) -> None:
        """Wait until at least ``total`` writes have finished."""
        self._wait(lambda: sum(self.done) >= total, f"{total} finished writes")

    def settle(self) -> None:
        """Wait until the budget is spent and no write runs: the source is quiet."""
        self._wait(lambda: not self._budget and not self._busy, "the writers to settle")

    def pause(self) -> None:
        """Return once no write runs and none starts before ``resume``."""
        with self._cond:
            self._paused = True
        self._wait(lambda: not self._busy, "the writers to pause")

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        self._raise_errors()


class Worker:
    """Run ``fn`` in a daemon thread and keep its result or exception.

    ``finish()`` waits (bounded) and returns the result or re-raises.
    """

    def __init__(self, fn: Callable[[], object]) -> None:
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def finish(self) -> object:
        if not self.done.wait(TIMEOUT):
            pytest.fail(f"the thread did not finish within {TIMEOUT} s")
        self.thread.join(TIMEOUT)
        if self.error is not None:
            raise self.error
        return self.result


class Gate:
    """A hook that parks the first thread to call it until the test opens the gate.

    Use it as a progress hook, a ``before_write`` hook or a site hook (it
    returns None). ``wait_reached()`` returns once a thread is parked.
    """

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._opened = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *args: object) -> None:
        with self._lock:
            if self.reached.is_set():
                return
            self.reached.set()
        if not self._opened.wait(TIMEOUT):
            raise AssertionError(f"the gate was not opened within {TIMEOUT} s")

    def wait_reached(self) -> None:
        if not self.reached.wait(TIMEOUT):
            pytest.fail(f"no thread reached the gate within {TIMEOUT} s")

    def open(self) -> None:
        self._opened.set()


def session_directory(tmp_path, size: int, granularity: int, seed: int, dests=("d0",)):
    """A persistent session in ``tmp_path/state`` on a random file source, with a
    NEW zero-filled file destination per name in ``dests``; its path."""
    from isc.store import create_session, open_session

    source = FileLUN.create(tmp_path / "source.img", size)
    fill_random(source, random.Random(seed))
    source.close()
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "source.img"), granularity=granularity)
    with open_session(state)[0] as stored:
        for name in dests:
            FileLUN.create(tmp_path / f"{name}.img", size).close()
            stored.add_destination(str(tmp_path / f"{name}.img"), name)
    return state


def wait_until(condition, proc, what: str, log=None) -> None:
    """Poll ``condition`` while the external process ``proc`` works (bounded by
    :data:`TIMEOUT`); fail, with ``log``'s text if given, if it ends first."""
    deadline = threading.Event()
    timer = threading.Timer(TIMEOUT, deadline.set)
    timer.start()

    def said() -> str:
        return "" if log is None else f": {log.read_text()}"

    try:
        while not condition():
            if proc.poll() is not None:
                pytest.fail(f"{proc.args} exited {proc.returncode} before {what}{said()}")
            if deadline.wait(0.001):
                pytest.fail(f"no {what} within {TIMEOUT} s{said()}")
    finally:
        timer.cancel()


def free_ports(count: int) -> list[int]:
    """``count`` different ports free on the loopback now, all bound at once so no two
    are the same (a port may still be taken again before its user binds it)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def session_file(state) -> dict:
    """``state``'s session file but the generation of its newest checkpoint, which every
    close of the session moves (``checkpoint``, see isc.store), as a refused command's does."""
    import json

    from isc.store import METADATA

    meta = json.loads((state / METADATA).read_bytes())
    meta.pop("checkpoint", None)
    return meta
