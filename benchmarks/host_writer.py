"""A neutral host writer for side-by-side benchmarks: a pipelined NBD client on libnbd.

The benchmark that sets isc beside QEMU's incremental backup must drive both
systems' NBD exports with the same host writes, from code that is neither's.
This file is that writer, in two roles.

Run as a script, by an interpreter that can ``import nbd`` (the Python
bindings of libnbd, Debian package python3-libnbd), it is the writer process.
It connects to an NBD URI and writes B-byte blocks at B-aligned offsets,
keeping up to N writes in flight (the queue depth), in one of two modes:

``host_writer.py URI changes --fraction F [--block B] [--qd N] [--seed S]``
    Writes ``round(size * F / B)`` distinct blocks, chosen at random among the
    ``size // B`` whole blocks of the export, then flushes, prints one JSON
    line and exits 0. B defaults to 64 KiB. The line holds the ``writes``,
    their ``bytes``, the ``seconds`` from the first submission until the flush
    completed, ``rate`` (writes / seconds), the write latencies in µs ``p50``,
    ``p99`` and ``max`` (None for no writes), and the export's ``size``.

``host_writer.py URI load [--block B] [--qd N] [--seed S]``
    Prints ``ready`` once connected, then obeys commands read from stdin, one
    a line. B defaults to 4 KiB.

    =========  ====================================================  ==============
    command    does                                                  replies
    =========  ====================================================  ==============
    ``run``    keeps N writes to random blocks in flight             ``running``
    ``pause``  stops submitting, waits for the writes in flight      window stats
    ``quit``   waits for the writes in flight, disconnects, exits 0  nothing
    =========  ====================================================  ==============

    End of input is a ``quit``. The window stats are one JSON line about the
    window from ``run`` to ``pause``: the ``writes`` that completed in it, their
    ``bytes``, the window's length in ``seconds``, ``rate`` (writes / seconds),
    the latency of those writes from submission to completion in µs: ``p50``
    and ``p99`` (nearest rank) and ``max`` (all None for a window without
    writes), ``max_gap_us``, the longest time in the window without any
    completion (from ``run`` to the first, between two, from the last to
    ``pause``): the worst stall a host saw, and ``drained``, the writes still
    in flight at ``pause``, which complete before the reply but count for no
    window.

Any NBD failure (a write answered with an error, the server gone), and a
command out of place (``pause`` while paused ...), prints ``{"error": "..."}``
and exits 1; bad arguments exit 2 with argparse's usage message.

Imported, by any Python (this role needs no ``nbd``), it is the harness side:
:func:`writer_python`, :func:`make_changes` and :class:`HostWriter` run the
writer process, and bound every wait on it.

The writer's own cost per write caps what it can measure, so a write
allocates next to nothing: its data come from a pool of seeded random
buffers made up front (random, so that every write changes what the image
held), each queue slot owns a ready-made completion callback, timestamps go
into ``array`` s, and percentiles are computed at ``pause`` only. Seeded runs
repeat: the same seed writes the same data at the same offsets, so a second
``changes`` run with the seed of the first changes nothing; use a new seed for
each round.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import importlib.util
import json
import math
import operator
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from array import array
from typing import Any

FALLBACK_PYTHON = "/usr/bin/python3"
"""Debian's interpreter, where the package python3-libnbd installs ``nbd``."""
PACKAGE = "python3-libnbd"
POOL_BUFFERS = 64
"""Distinct data buffers the writes rotate through ..."""
POOL_BYTES = 64 << 20
"""... holding no more than this many bytes in all."""
FAILED = 1
"""The writer's exit status after an NBD failure (argparse exits 2 for bad arguments)."""
STDIN = 0


class WriterError(RuntimeError):
    """The writer process failed, or answered outside its protocol; the message says how.

    The message carries the writer's exit status and what it wrote to stderr.
    """


class LibnbdMissing(RuntimeError):
    """No interpreter at hand can ``import nbd``."""


def check_options(*, block: int, qd: int, fraction: float | None = None) -> None:
    """Raise ``ValueError`` naming the bad option unless ``block >= 1``, ``qd >= 1`` and
    ``0 <= fraction <= 1`` (when given)."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block is a whole number of bytes >= 1, got {block!r}")
    if not isinstance(qd, int) or qd < 1:
        raise ValueError(f"qd (queue depth) is a whole number >= 1, got {qd!r}")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
        raise ValueError(f"fraction is a number from 0 to 1, got {fraction!r}")


# -- the writer process ------------------------------------------------------------------------
class _Failure(Exception):
    """An NBD failure the writer process reports as its error line."""


class _Pipeline:
    """Up to ``qd`` timed writes in flight on one connected libnbd handle.

    The slots in :attr:`free` are the queue slots with no write in flight; a
    write takes one, its completion gives it back. Each slot owns its
    completion callback and records, so a write allocates only its two
    timestamps. Latencies (ns) and completion times (``perf_counter_ns``)
    accumulate until :meth:`take`. Only the thread that owns the handle may
    drive it: libnbd runs the callbacks inside :meth:`wait`.
    """

    def __init__(self, nbd: Any, handle: Any, block: int, qd: int, rng: random.Random) -> None:
        self._nbd = nbd
        self._handle = handle
        self._fd = handle.aio_get_fd()
        self.block = block
        count = max(1, min(POOL_BUFFERS, POOL_BYTES // block))
        self._pool = [nbd.Buffer.from_bytearray(rng.randbytes(block)) for _ in range(count)]
        self._turn = 0
        self.free = list(range(qd))
        self._submitted = [0] * qd
        self._offsets = [0] * qd
        self._callbacks = [functools.partial(self._completed, slot) for slot in range(qd)]
        self._failure: str | None = None
        self.latencies = array("q")
        self.completions = array("q")

    @property
    def in_flight(self) -> int:
        """How many writes are submitted and not yet completed."""
        return len(self._submitted) - len(self.free)

    def submit(self, offset: int) -> None:
        """Start a write of one pool buffer at ``offset``; a slot must be free."""
        slot = self.free.pop()
        buffer = self._pool[self._turn]
        self._turn = (self._turn + 1) % len(self._pool)
        self._offsets[slot] = offset
        self._submitted[slot] = time.perf_counter_ns()
        self._handle.aio_pwrite(buffer, offset, completion=self._callbacks[slot])

    def _completed(self, slot: int, error: Any) -> int:
        now = time.perf_counter_ns()
        self.latencies.append(now - self._submitted[slot])
        self.completions.append(now)
        self.free.append(slot)
        # libnbd would print and swallow an exception raised here, so the
        # failure is kept for wait() to raise.
        if error.value and self._failure is None:
            self._failure = (
                f"the write of {self.block} bytes at offset {self._offsets[slot]} failed: "
                f"{os.strerror(error.value)}"
            )
        return 1  # retire the command: nothing asks aio_command_completed about it

    def wait(self, *others: int) -> list[int]:
        """Block until the connection or one of the file descriptors ``others`` is ready.

        Moves the connection on (running the completion callbacks) and
        returns those of ``others`` that are readable. Raises ``_Failure`` when
        a write failed or the server closed the connection, ``nbd.Error`` when
        the connection broke.
        """
        handle, fd = self._handle, self._fd
        direction = handle.aio_get_direction()
        readers = list(others)
        if direction & self._nbd.AIO_DIRECTION_READ:
            readers.append(fd)
        writers = [fd] if direction & self._nbd.AIO_DIRECTION_WRITE else []
        readable, writable, _ = select.select(readers, writers, [])
        # With both ready, read only: a reply may change what the connection
        # still has to send (libnbd's advice for aio_get_direction).
        if fd in readable:
            handle.aio_notify_read()
        elif writable:
            handle.aio_notify_write()
        if self._failure is not None:
            raise _Failure(self._failure)
        if handle.aio_is_closed() or handle.aio_is_dead():
            raise _Failure("the server closed the connection")
        return [ready for ready in readable if ready != fd]

    def drain(self) -> None:
        """Return once no write is in flight."""
        while self.in_flight:
            self.wait()

    def take(self) -> tuple[array[int], array[int]]:
        """The latencies and completion times recorded so far; the records start afresh."""
        taken = self.latencies, self.completions
        self.latencies, self.completions = array("q"), array("q")
        return taken


def _latency_stats(latencies: array[int]) -> dict[str, float | None]:
    """p50, p99 (nearest rank) and max of ``latencies`` (ns), in µs; None when there are none."""
    ordered = sorted(latencies)

    def rank(q: float) -> float | None:
        return ordered[math.ceil(q * len(ordered)) - 1] / 1000 if ordered else None

    return {"p50": rank(0.5), "p99": rank(0.99), "max": rank(1.0)}


def _window(pipeline: _Pipeline, start: int, end: int) -> dict[str, Any]:
    """The window stats (see the module docstring) of the writes that completed from ``start``
    to ``end`` (``perf_counter_ns``); the records start afresh."""
    latencies, completions = pipeline.take()
    # The writes in flight at the pause complete before the reply but count
    # for no window, since the pause itself can make them late: with the
    # client suddenly idle, a server that leaves Nagle's algorithm on holds
    # its last reply until the client's delayed ACK, 40 ms on Linux. QEMU's
    # NBD server over TCP does so before QEMU 8.0 (commit bd2cd4a441).
    counted = bisect.bisect_right(completions, end)
    latencies = latencies[:counted]
    points = [start, *completions[:counted], end]
    seconds = (end - start) / 1e9
    return {
        "writes": counted,
        "bytes": counted * pipeline.block,
        "seconds": seconds,
        "rate": counted / seconds,
        **_latency_stats(latencies),
        "max_gap_us": max(map(operator.sub, points[1:], points)) / 1000,
        "drained": len(completions) - counted,
    }


def _whole_blocks(handle: Any, block: int) -> tuple[int, int]:
    """The export's size and how many whole ``block`` s it holds; ``_Failure`` when none."""
    size = handle.get_size()
    if size < block:
        raise _Failure(f"the export of {size} bytes holds no whole block of {block} bytes")
    return size, size // block


def _changes(nbd: Any, handle: Any, fraction: float, block: int, qd: int, seed: int) -> dict:
    """Mode ``changes``; returns its result (keys in the module docstring)."""
    size, blocks = _whole_blocks(handle, block)
    count = round(size * fraction / block)
    if count > blocks:
        raise _Failure(
            f"{fraction} of {size} bytes is {count} blocks of {block} bytes, "
            f"but the export holds only {blocks} whole ones"
        )
    rng = random.Random(seed)
    pipeline = _Pipeline(nbd, handle, block, qd, rng)
    offsets = [index * block for index in rng.sample(range(blocks), count)]
    start = time.perf_counter_ns()
    for offset in offsets:
        while not pipeline.free:
            pipeline.wait()
        pipeline.submit(offset)
    pipeline.drain()
    handle.flush()
    seconds = (time.perf_counter_ns() - start) / 1e9
    latencies, _ = pipeline.take()
    return {
        "writes": count,
        "bytes": count * block,
        "seconds": seconds,
        "rate": count / seconds,
        **_latency_stats(latencies),
        "size": size,
    }


def _load(nbd: Any, handle: Any, block: int, qd: int, seed: int) -> None:
    """Mode ``load``: obey the commands on stdin until ``quit`` or end of input."""
    _, blocks = _whole_blocks(handle, block)
    rng = random.Random(seed)
    pipeline = _Pipeline(nbd, handle, block, qd, rng)
    start: int | None = None  # perf_counter_ns of the last run, None while paused

    def fill() -> None:
        while pipeline.free:
            pipeline.submit(rng.randrange(blocks) * block)

    _say("ready")
    pending = b""
    while True:
        if start is not None:
            fill()
        # Waiting on stdin and the connection together answers a command at
        # once, even while the one write in flight at qd 1 is slow.
        if not pipeline.wait(STDIN):
            continue
        chunk = os.read(STDIN, 4096)
        if chunk:
            *lines, pending = (pending + chunk).split(b"\n")
        else:
            lines = [b"quit"]
        for line in lines:
            command = line.strip()
            if command == b"run" and start is None:
                start = time.perf_counter_ns()
                fill()
                _say("running")
            elif command == b"pause" and start is not None:
                end = time.perf_counter_ns()
                pipeline.drain()
                _say(json.dumps(_window(pipeline, start, end)))
                start = None
            elif command == b"quit":
                pipeline.drain()
                handle.shutdown()
                return
            else:
                state = "paused" if start is None else "running"
                raise _Failure(
                    f"unexpected command {line.decode(errors='replace')!r} while {state}"
                )


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--qd", type=int, default=1, help="writes kept in flight (default 1)")
    common.add_argument("--seed", type=int, default=0, help="seeds the offsets and the data")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uri", help="the NBD URI of the export to write to")
    modes = parser.add_subparsers(dest="mode", required=True)
    changes = modes.add_parser("changes", parents=[common], help="write a fraction, then exit")
    changes.add_argument("--fraction", type=float, required=True, help="of the export, 0 to 1")
    changes.add_argument("--block", type=int, default=64 << 10, help="bytes (default 64 KiB)")
    load = modes.add_parser("load", parents=[common], help="write while told to, via stdin")
    load.add_argument("--block", type=int, default=4 << 10, help="bytes (default 4 KiB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The writer process: run one mode on ``argv``; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_options(block=args.block, qd=args.qd, fraction=getattr(args, "fraction", None))
    except ValueError as exc:
        parser.error(str(exc))
    try:
        # Only this role needs libnbd: the harness imports this file without it.
        import nbd
    except ImportError:
        _say(json.dumps({"error": f"{sys.executable} cannot import nbd; install {PACKAGE}"}))
        return FAILED
    try:
        handle = nbd.NBD()
        # The URI comes from the harness: its tls-certificates= may name a directory.
        handle.set_uri_allow_local_file(True)
        handle.connect_uri(args.uri)
        if args.mode == "changes":
            result = _changes(nbd, handle, args.fraction, args.block, args.qd, args.seed)
            _say(json.dumps(result))
        else:
            _load(nbd, handle, args.block, args.qd, args.seed)
    except (nbd.Error, _Failure) as exc:
        _say(json.dumps({"error": str(exc)}))
        return FAILED
    return 0


# -- the harness side --------------------------------------------------------------------------
@functools.cache
def writer_python() -> str:
    """The path of an interpreter that can ``import nbd``: this one if it can, else
    :data:`FALLBACK_PYTHON`; raises :class:`LibnbdMissing` naming the package when neither can."""
    if importlib.util.find_spec("nbd") is not None:
        return sys.executable
    try:
        probe = subprocess.run(
            [FALLBACK_PYTHON, "-c", "import nbd"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode:
        raise LibnbdMissing(
            f"neither {sys.executable} nor {FALLBACK_PYTHON} can import nbd (libnbd's Python "
            f"bindings); install the Debian package {PACKAGE}"
        )
    return FALLBACK_PYTHON


def _command(uri: str, mode: str, *, block: int, qd: int, seed: int) -> list[str]:
    return [
        writer_python(),
        os.path.abspath(__file__),
        uri,
        mode,
        *("--block", str(block), "--qd", str(qd), "--seed", str(seed)),
    ]


def _with_stderr(message: str, stderr: bytes | str | None) -> str:
    """``message`` followed by what the writer wrote to stderr, if anything."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    stderr = (stderr or "").strip()
    return f"{message}; its stderr:\n{stderr}" if stderr else message


def _error_of(line: str) -> str | None:
    """The message of an error line, else None."""
    try:
        reply = json.loads(line)
    except ValueError:
        return None
    return reply.get("error") if isinstance(reply, dict) else None


def make_changes(
    uri: str,
    fraction: float,
    *,
    block: int = 64 << 10,
    qd: int = 8,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Write ``fraction`` of the export at ``uri`` in distinct random ``block``-byte blocks,
    ``qd`` in flight, then flush (mode ``changes``); return the writer's result (keys in the
    module docstring).

    Raises ``ValueError`` for bad options before starting anything,
    :class:`WriterError` (with the writer's stderr) when it fails, and
    ``TimeoutError`` when it has not finished within ``timeout`` seconds
    (it is killed then).
    """
    check_options(block=block, qd=qd, fraction=fraction)
    args = [
        *_command(uri, "changes", block=block, qd=qd, seed=seed),
        "--fraction",
        str(float(fraction)),
    ]
    try:
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        message = f"the writer was killed: writing to {uri} took over {timeout} s"
        raise TimeoutError(_with_stderr(message, exc.stderr)) from None
    last = done.stdout.strip().rpartition("\n")[2]
    error = _error_of(last)
    if done.returncode or error is not None:
        message = f"writing to {uri} failed: {error or repr(last)} (exit status {done.returncode})"
        raise WriterError(_with_stderr(message, done.stderr))
    return json.loads(last)


class HostWriter:
    """A writer process in mode ``load`` on the export at ``uri``: host writes on demand.

    Writes ``block`` bytes at a time to random ``block``-aligned offsets,
    ``qd`` in flight, between :meth:`run` and :meth:`pause`. Starting it
    returns once the writer has connected. Every call waits at most
    ``timeout`` seconds for the writer. Failures end the writer and raise:
    ``ValueError`` for bad options (before starting anything),
    :class:`WriterError` (with the writer's stderr) when it fails or exits,
    ``TimeoutError`` when it does not answer in time, ``RuntimeError`` for a
    call out of order (:meth:`pause` while paused ...). A context manager:
    leaving it closes the writer.
    """

    def __init__(
        self, uri: str, *, qd: int, block: int = 4 << 10, seed: int = 0, timeout: float = 60.0
    ) -> None:
        check_options(block=block, qd=qd)
        self.uri = uri
        self.qd = qd
        self.block = block
        self.timeout = timeout
        self.running = False
        """Whether :meth:`run` was called last, rather than :meth:`pause`."""
        command = _command(uri, "load", block=block, qd=qd, seed=seed)
        # A file, not a pipe, takes the writer's stderr: nothing reads it until
        # the writer fails, and a full pipe would stall the writer. It lives as
        # long as the writer; _release closes it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
            )
        except BaseException:
            self._stderr.close()
            raise
        self._pending = b""
        try:
            self._expect("ready")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<HostWriter {self.uri} qd={self.qd} block={self.block} pid={self._proc.pid}>"

    @property
    def returncode(self) -> int | None:
        """The writer's exit status once it has ended, else None."""
        return self._proc.poll()

    def run(self) -> None:
        """Start writing; return once the first ``qd`` writes are submitted."""
        self._check_state(running=False)
        self._send("run")
        self._expect("running")
        self.running = True

    def pause(self) -> dict[str, Any]:
        """Stop writing; return once the writes in flight completed, with the stats of the
        window from :meth:`run` to now (keys and units in the module docstring)."""
        self._check_state(running=True)
        self._send("pause")
        line = self._line()
        try:
            stats = json.loads(line)
        except ValueError:
            stats = None
        if not isinstance(stats, dict) or "writes" not in stats:
            raise self._fail(
                f"the writer answered {line!r} to pause instead of its stats", exiting=False
            )
        self.running = False
        return stats

    def close(self) -> None:
        """Tell the writer to quit (it finishes the writes in flight and disconnects); kill it if
        it has not exited within ``timeout``. Idempotent; does not raise for a writer that
        failed already."""
        proc = self._proc
        if proc.poll() is None:
            self._send("quit")
            try:
                proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._release()

    def __enter__(self) -> HostWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_state(self, *, running: bool) -> None:
        if self._proc.returncode is not None:
            raise RuntimeError(f"{self!r} has ended; start a new HostWriter")
        if self.running != running:
            state, fix = ("running", "pause") if self.running else ("paused", "run")
            raise RuntimeError(f"{self!r} is {state} already; {fix} it first")

    def _send(self, command: str) -> None:
        assert self._proc.stdin is not None
        # A writer that has exited closed the pipe: reading its output tells why.
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.write(command.encode() + b"\n")

    def _expect(self, word: str) -> None:
        line = self._line()
        if line != word:
            raise self._fail(f"the writer answered {line!r} instead of {word!r}", exiting=False)

    def _line(self) -> str:
        """The writer's next line; raises when it reports an error, has exited or has not
        answered in time."""
        assert self._proc.stdout is not None
        out = self._proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(
                    f"the writer did not answer within {self.timeout} s",
                    TimeoutError,
                    exiting=False,
                )
            if select.select([out], [], [], left)[0]:
                chunk = os.read(out, 65536)
                if not chunk:
                    raise self._fail("the writer exited without answering")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        text = line.decode(errors="replace")
        error = _error_of(text)
        if error is not None:
            raise self._fail(f"the writer failed: {error}")
        return text

    def _fail(
        self, message: str, kind: type[Exception] = WriterError, *, exiting: bool = True
    ) -> Exception:
        """End the writer; return the exception to raise: ``message`` with the writer's exit
        status and stderr.

        A writer ``exiting`` (it reported an error or closed its output) gets
        ``timeout`` seconds to finish, so that its own exit status and last
        words are kept; any other is killed at once.
        """
        if exiting:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(self.timeout)
        self._proc.kill()  # does nothing to a writer that has exited and been waited for
        self._proc.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read()
        self._release()
        return kind(_with_stderr(f"{message} (exit status {self._proc.returncode})", stderr))

    def _release(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


if __name__ == "__main__":
    sys.exit(main())
