"""QEMU's incremental backup, driven from Python: a QMP client and a storage-daemon driver.

The peer that ``compare_qemu.py`` measures isc against is QEMU's own answer to
the same problem: a dirty bitmap on the source node records the host writes,
and a ``blockdev-backup`` job copies to a destination what the bitmap says,
while its copy-before-write filter saves each chunk a host write is about to
overwrite before the job has copied it, so the destination ends up holding
the source as it was when the job started. Here it all runs in
``qemu-storage-daemon`` (Debian package qemu-system-common): the source image
is the node :attr:`StorageDaemon.node`, exported writable over NBD for the
host writes, and the daemon is steered over QMP.

Standard library only, single-threaded: one thread at a time may use a
:class:`QMP` or a :class:`StorageDaemon`.

Learned from QEMU 7.2 and relied on here:

* ``qemu-storage-daemon --daemonize`` returns only once every option has been
  acted on (nodes open, NBD server and QMP socket listening), so its exit is
  the readiness signal. Its stderr carries the reason when it fails.
* The NBD server accepts an inherited listening socket (``addr.type=fd``), so
  the TCP port is bound here, on port 0, and there is no window in which
  another process could take it.
* A job's events come before the reply to the command that made it
  (``JOB_STATUS_CHANGE`` "created" and "running"), and a job dismisses itself
  when it ends, so the only trace of its end is the event: hence every event
  is kept until someone asks for it.

Learned from QEMU 7.2, for reading the benchmark's figures (raw files, the
default ``aio=threads``):

* The background copy goes in 1 MiB requests (a read and a write each, up
  to 64 at once); ``x-perf`` ``max-chunk`` makes them smaller. With
  ``use-copy-range`` it is ``copy_file_range`` instead (off by default).
* Ranges that block status says read as zeros (holes in the source) are
  not read; they are written as zeros to the destination, which allocates
  them (``fallocate`` ZERO_RANGE; on tmpfs, punch hole then allocate).
* The copy-before-write filter copies whole 64 KiB clusters: a 4 KiB host
  write into a cluster not yet copied first costs a 64 KiB read and write.
* An incremental backup copies the bitmap's marks rounded out to 64 KiB
  clusters, whatever the bitmap's granularity (default 64 KiB).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 30.0  # seconds any wait on the daemon gets unless told otherwise
_MISSING = object()


class QMPError(Exception):
    """QEMU refused a QMP command: ``error_class`` and ``desc`` are QEMU's own words."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QemuJobError(RuntimeError):
    """A block job ended without doing its work (it failed or was cancelled)."""

    def __init__(self, job_id: str, reason: str, event: dict[str, Any]) -> None:
        super().__init__(f"block job {job_id!r} {reason}")
        self.job_id = job_id
        self.event = event


class DaemonStartError(RuntimeError):
    """``qemu-storage-daemon`` did not come up; ``stderr`` is what it said."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(f"{message}: {stderr.strip() or '(no output)'}")
        self.stderr = stderr


def _contains(data: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return all(data.get(key, _MISSING) == value for key, value in wanted.items())


class QMP:
    """A QMP client on the Unix socket at ``path``, in command mode once constructed.

    Each command carries an ``id`` and its reply is found by it, so the late
    reply to a command whose wait timed out is recognised and dropped. Events
    that arrive while waiting for something else are kept, in order, until
    :meth:`wait_event` takes them: none is lost, and the buffer grows by every
    event nobody asks for.

    Every wait is bounded: by its ``timeout`` argument, else by the
    ``timeout`` given here (seconds). Running out raises ``TimeoutError``
    naming what was awaited; the connection stays usable. A connection the
    daemon closed (or that :meth:`close` closed) raises ``ConnectionError``.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._received = bytearray()
        self._events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(os.fspath(path))
            greeting = self._receive(self._deadline(None), "the QMP greeting")
            if "QMP" not in greeting:
                raise ConnectionError(f"{os.fspath(path)} does not speak QMP: {greeting!r}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run ``command`` and return its ``return`` value; ``QMPError`` if QEMU refuses it."""
        deadline = self._deadline(timeout)
        ident = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        what = f"the reply to {command}"
        self._send(json.dumps(message).encode() + b"\n", deadline, what)
        while True:
            reply = self._receive(deadline, what)
            if "event" in reply:
                self._events.append(reply)
            elif reply.get("id") == ident:
                if "error" in reply:
                    error = reply["error"]
                    raise QMPError(command, error.get("class", "?"), error.get("desc", "?"))
                return reply["return"]

    def wait_event(
        self,
        name: str | Iterable[str],
        *,
        data: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The first event called ``name`` whose ``data`` holds all of ``data``'s items.

        ``name`` may also be several names, any of which will do. The event
        is the oldest such one already received, else the next to arrive; it
        is taken out of the buffer. Other events that arrive meanwhile are
        kept. The whole event is returned (``event``, ``data``, ``timestamp``).
        """
        names = {name} if isinstance(name, str) else set(name)
        wanted = data or {}

        def sought(event: dict[str, Any]) -> bool:
            return event["event"] in names and _contains(event.get("data", {}), wanted)

        for index, event in enumerate(self._events):
            if sought(event):
                del self._events[index]
                return event
        deadline = self._deadline(timeout)
        what = f"event {' or '.join(sorted(names))}" + (f" with {wanted}" if wanted else "")
        while True:
            message = self._receive(deadline, what)
            if "event" not in message:
                continue  # the late reply to a command whose wait timed out
            if sought(message):
                return message
            self._events.append(message)

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise ``ConnectionError``."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        bound = self.timeout if timeout is None else timeout
        return time.monotonic() + bound, bound

    def _connected(self, what: str) -> socket.socket:
        if self._sock is None:
            raise ConnectionError(f"QMP connection is closed; cannot wait for {what}")
        return self._sock

    def _armed(self, deadline: tuple[float, float], what: str, late: str) -> socket.socket:
        """The socket, its timeout set to what is left of ``deadline``; else TimeoutError."""
        sock = self._connected(what)
        remaining = deadline[0] - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(late)
        sock.settimeout(remaining)
        return sock

    def _send(self, payload: bytes, deadline: tuple[float, float], what: str) -> None:
        sock = self._armed(deadline, what, f"QMP: no time left to send a command ({what})")
        try:
            sock.sendall(payload)
        except TimeoutError:
            raise TimeoutError(f"QMP: no room to send within {deadline[1]} s ({what})") from None

    def _receive(self, deadline: tuple[float, float], what: str) -> dict[str, Any]:
        """The next message, however the stream happens to be cut into reads."""
        while True:
            end = self._received.find(b"\n")
            if end >= 0:
                line = bytes(self._received[:end])
                del self._received[: end + 1]
                if line.strip():
                    message: dict[str, Any] = json.loads(line)
                    return message
                continue
            sock = self._armed(deadline, what, f"QMP: no {what} within {deadline[1]} s")
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError(f"QMP: no {what} within {deadline[1]} s") from None
            if not chunk:
                raise ConnectionError(f"QMP: the daemon closed the connection; no {what}")
            self._received += chunk


class StorageDaemon:
    """``qemu-storage-daemon`` serving the raw image ``source`` over NBD and steered over QMP.

    The image is the node :attr:`node` (raw, over the ``file`` node
    :attr:`file_node`), exported writable as ``export`` by an NBD server on
    127.0.0.1, or with ``listen`` on that Unix socket instead (:attr:`uri`). The
    QMP monitor listens on ``qmp.sock`` in ``workdir`` (made if missing),
    where the pid file goes too; :attr:`qmp` is connected to it.
    ``file_options`` are merged into every ``file`` node, the source's and
    each target's, e.g.
    ``{"aio": "io_uring", "cache": {"direct": True}}``. ``timeout`` (seconds)
    bounds every wait unless a call is given its own.

    :meth:`start` (or entering the ``with`` block) runs the daemon and sets
    :attr:`pid`, :attr:`port` (None on a Unix socket), :attr:`uri` and
    :attr:`qmp`; :meth:`stop` (or leaving the block) ends it.
    """

    node = "src"  # node name of the source image
    file_node = f"{node}-file"  # node name of the ``file`` node under it

    pid: int
    port: int | None
    uri: str
    qmp: QMP

    def __init__(
        self,
        source: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        *,
        export: str = "src",
        listen: str | os.PathLike[str] | None = None,
        file_options: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        program: str = "qemu-storage-daemon",
    ) -> None:
        self.source = Path(source).absolute()
        self.workdir = Path(workdir).absolute()
        self.export = export
        self.listen = None if listen is None else Path(listen).absolute()
        self.file_options = dict(file_options or {})
        self.timeout = timeout
        self.program = program
        self._pidfd: int | None = None

    def start(self) -> None:
        """Run the daemon; return once it serves NBD and QMP. ``DaemonStartError`` if it fails."""
        if self._pidfd is not None:
            raise RuntimeError(f"qemu-storage-daemon for {self.source} is already running")
        socket_path = self.workdir / "qmp.sock"
        pidfile = self.workdir / "qemu-storage-daemon.pid"
        self.workdir.mkdir(parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
        with contextlib.ExitStack() as stack:
            if self.listen is None:
                listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                listener.bind(("127.0.0.1", 0))
                listener.listen()
                port, fds = listener.getsockname()[1], (listener.fileno(),)
                nbd = {"addr": {"type": "fd", "str": str(listener.fileno())}}
                uri = f"nbd://127.0.0.1:{port}/{self.export}"
            else:
                port, fds = None, ()
                nbd = {"addr": {"type": "unix", "path": os.fspath(self.listen)}}
                uri = f"nbd+unix:///{self.export}?socket={self.listen}"
            self._daemonize(nbd, fds, socket_path, pidfile)
        self.pid = int(pidfile.read_text())
        pidfd = os.pidfd_open(self.pid)
        try:
            self.qmp = QMP(socket_path, timeout=self.timeout)
        except BaseException:
            _signal_and_wait(pidfd, signal.SIGKILL, self.timeout)
            os.close(pidfd)
            raise
        self._pidfd = pidfd
        self.port = port
        self.uri = uri

    def stop(self, timeout: float | None = None) -> None:
        """End the daemon (idempotent): SIGTERM, then SIGKILL if it is not gone within ``timeout``.

        Returns once the process has exited. Not being our child once it has
        daemonized, it is reaped by init, and until then ``/proc/PID`` may
        show it as a zombie. ``TimeoutError`` if not even SIGKILL ends it.
        """
        if self._pidfd is None:
            return
        self.qmp.close()
        bound = self.timeout if timeout is None else timeout
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if _signal_and_wait(self._pidfd, signum, bound):
                os.close(self._pidfd)
                self._pidfd = None
                return
        raise TimeoutError(f"qemu-storage-daemon (pid {self.pid}) outlived SIGKILL by {bound} s")

    def __enter__(self) -> StorageDaemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_target(self, node: str, path: str | os.PathLike[str]) -> None:
        """Open the existing raw file ``path`` as the node ``node``, over a ``file`` node.

        The ``file`` node is called ``node-file``. A backup needs its target
        to be exactly as long as the source.
        """
        self.qmp.execute("blockdev-add", self._raw_node(node, Path(path).absolute()))

    def remove_target(self, node: str) -> None:
        """Close the target node ``node`` and its ``file`` node, flushing what they hold."""
        self.qmp.execute("blockdev-del", {"node-name": node})

    def start_backup(
        self,
        target: str,
        *,
        sync: str,
        bitmap: str | None = None,
        granularity: int | None = None,
        perf: Mapping[str, Any] | None = None,
        job_id: str | None = None,
    ) -> str:
        """Start a backup of the source node to the node ``target``; return its job id.

        ``sync="full"`` copies everything; given a ``bitmap`` name, it also
        creates that dirty bitmap on the source (``granularity`` bytes a bit,
        QEMU's choice if None) in the same transaction, so the bitmap records
        exactly the writes that come after the backup's point in time.
        ``sync="incremental"`` copies what the existing ``bitmap`` records;
        if the job succeeds the bitmap then records only the writes since
        the job started, else it also keeps what it had. ``perf`` is passed
        as ``x-perf`` (QEMU 7.2: ``max-workers``, default 64; ``max-chunk``
        in bytes, default 0 = unlimited; ``use-copy-range``, default False).
        ``job_id`` defaults to ``target``.

        Returns once QMP has replied: the point in time is then fixed, the
        copy-before-write filter being in place. ``ValueError`` for a
        combination that cannot work (raised before anything is sent),
        ``QMPError`` if QEMU refuses (and then nothing was created).
        """
        if sync not in ("full", "incremental"):
            raise ValueError(f"sync must be 'full' or 'incremental', not {sync!r}")
        if sync == "incremental" and bitmap is None:
            raise ValueError("an incremental backup needs the bitmap to copy from")
        if granularity is not None and (bitmap is None or sync != "full"):
            raise ValueError("a granularity is for the bitmap a full backup creates")
        job_id = target if job_id is None else job_id
        backup: dict[str, Any] = {
            "job-id": job_id,
            "device": self.node,
            "target": target,
            "sync": sync,
        }
        if sync == "incremental":
            backup["bitmap"] = bitmap
        if perf is not None:
            backup["x-perf"] = dict(perf)
        if sync == "incremental" or bitmap is None:
            self.qmp.execute("blockdev-backup", backup)
            return job_id
        add: dict[str, Any] = {"node": self.node, "name": bitmap}
        if granularity is not None:
            add["granularity"] = granularity
        actions = [
            {"type": "block-dirty-bitmap-add", "data": add},
            {"type": "blockdev-backup", "data": backup},
        ]
        self.qmp.execute("transaction", {"actions": actions})
        return job_id

    def wait_job(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the block job ``job_id`` to end; return its ``BLOCK_JOB_COMPLETED`` data.

        The data says how much the job copied: ``len`` bytes were to be
        copied (for an incremental backup, what the bitmap marks, rounded
        out to the job's 64 KiB clusters) and ``offset`` of them were. An end that came before
        this call is found too. ``QemuJobError`` if the job failed (the
        error is in the message) or was cancelled.
        """
        event = self.qmp.wait_event(
            ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
            data={"device": job_id},
            timeout=timeout,
        )
        if event["event"] == "BLOCK_JOB_CANCELLED":
            raise QemuJobError(job_id, "was cancelled", event)
        if "error" in event["data"]:
            raise QemuJobError(job_id, f"failed: {event['data']['error']}", event)
        data: dict[str, Any] = event["data"]
        return data

    def bitmap_count(self, name: str) -> int:
        """How many bytes the source's dirty bitmap ``name`` marks (whole bitmap granules)."""
        for node in self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if node["node-name"] == self.node:
                for found in node.get("dirty-bitmaps", []):
                    if found["name"] == name:
                        count: int = found["count"]
                        return count
        raise KeyError(f"node {self.node!r} has no dirty bitmap {name!r}")

    def remove_bitmap(self, name: str) -> None:
        """Delete the source's dirty bitmap ``name``."""
        self.qmp.execute("block-dirty-bitmap-remove", {"node": self.node, "name": name})

    def _raw_node(self, node: str, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The options of a raw node ``node`` over a ``file`` node ``node-file`` on ``path``."""
        file = {"driver": "file", "node-name": f"{node}-file", "filename": os.fspath(path)}
        return {"driver": "raw", "node-name": node, "file": {**file, **self.file_options}}

    def _daemonize(
        self, nbd: dict[str, Any], fds: tuple[int, ...], socket_path: Path, pidfile: Path
    ) -> None:
        export = {
            "type": "nbd",
            "id": "export",
            "node-name": self.node,
            "name": self.export,
            "writable": True,
        }
        # QemuOpts syntax (no JSON form for these two): a comma is written twice.
        chardev = f"socket,id=qmp,path={str(socket_path).replace(',', ',,')},server=on,wait=off"
        args = [
            self.program,
            *("--blockdev", json.dumps(self._raw_node(self.node, self.source))),
            *("--nbd-server", json.dumps(nbd)),
            *("--export", json.dumps(export)),
            *("--chardev", chardev),
            *("--monitor", "chardev=qmp"),
            "--daemonize",
            *("--pidfile", str(pidfile)),
        ]
        try:
            done = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                pass_fds=fds,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            # The daemon may be up and only slow to report: it must not outlive the failure.
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            raise DaemonStartError(
                f"qemu-storage-daemon did not start within {self.timeout} s", stderr
            ) from None
        if done.returncode:
            raise DaemonStartError(
                f"qemu-storage-daemon for {self.source} exited {done.returncode}", done.stderr
            )


def _signal_and_wait(pidfd: int, signum: signal.Signals, timeout: float) -> bool:
    """Send ``signum`` to the process behind ``pidfd``; True if it exits within ``timeout`` s."""
    # Through the pidfd, the signal cannot reach another process that was given a recycled pid.
    with contextlib.suppress(ProcessLookupError):  # it has exited already
        signal.pidfd_send_signal(pidfd, signum)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))
