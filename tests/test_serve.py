"""``isc serve`` of a session directory: its periodic updates and its destinations' outages.

The server runs in this process (:func:`isc.serve.run_serve` in a thread) so
that a test holds a destination's NBD export in its hands: an isc
:class:`NBDServer` on a Unix socket in ``tmp_path``, over a file the test
reads back, which the test stops, restarts, or parks at a write with a
:class:`Gate`. Host writes reach the served session through its NBD export,
control requests through its control port. One test runs the real ``isc
serve`` process. Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import TIMEOUT, Gate, HookLUN, Worker
from test_cli_analysis import ISC

from isc import DestState, FileLUN
from isc import lun as lun_module
from isc.errors import StateError
from isc.nbd import NBDLUN, NBDServer
from isc.serve import run_serve
from isc.store import copy, create_session, open_session, read_state
from isc.update import DEFAULT_TIMEOUT

SEED = 20261201
KIB = 1 << 10
MIB = 1 << 20
SIZE = 2 * MIB
G = 16 * KIB
HOST = "127.0.0.1"


class Export:
    """A destination's NBD server on a Unix socket, which the test stops and starts again."""

    def __init__(self, path: Path, lun) -> None:
        self.path = path
        self.lun = lun
        self.server: NBDServer | None = None
        self.uri = f"nbd+unix:///?socket={path}"

    def start(self) -> None:
        self.server = NBDServer(self.lun)
        self.server.start_unix(self.path)

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A random source file and two zeroed destination files."""
    (tmp_path / "source.img").write_bytes(random.Random(SEED).randbytes(SIZE))
    for name in ("d1.img", "d2.img"):
        FileLUN.create(tmp_path / name, SIZE).close()
    return tmp_path


@pytest.fixture
def export(work: Path) -> Iterator[Export]:
    """d2.img exported over NBD (its LUN a HookLUN, to park or count writes), running."""
    export = Export(work / "d2.sock", HookLUN(FileLUN(work / "d2.img")))
    export.start()
    yield export
    export.stop()
    export.lun.close()


@pytest.fixture
def state(work: Path, export: Export) -> Path:
    """A session on source.img with d1 (the file d1.img) and d2 (the export), both consistent."""
    directory = work / "state"
    create_session(directory, str(work / "source.img"), granularity=G)
    stored, _ = open_session(directory)
    with stored:
        stored.add_destination(str(work / "d1.img"), "d1")
        stored.add_destination(export.uri, "d2")
        copy(stored, "full")
    return directory


def host_writes_offline(state: Path, seed: int, count: int = 8) -> None:
    """Tracked host writes made before the server starts (it then has something to copy)."""
    rng = random.Random(seed)
    stored, _ = open_session(state)
    with stored:
        for _ in range(count):
            stored.session.write(rng.randrange(SIZE - G), rng.randbytes(G))


def host_writes(uri: str, seed: int, count: int = 8) -> None:
    """Tracked host writes through the served export."""
    rng = random.Random(seed)
    with NBDLUN(uri, timeout=TIMEOUT) as lun:
        for _ in range(count):
            lun.write(rng.randrange(SIZE - G), rng.randbytes(G))
        lun.flush()


@dataclass
class Served:
    uri: str
    control: int

    def ask(self, op: str, **fields: object) -> dict:
        """One control request; its reply."""
        with socket.create_connection((HOST, self.control), timeout=TIMEOUT) as sock:
            sock.sendall(json.dumps({"id": 1, "op": op, **fields}).encode() + b"\n")
            reply = sock.makefile("rb").readline()
        assert reply.endswith(b"\n"), f"no reply to {op}"
        return json.loads(reply)

    def destinations(self) -> dict[str, dict]:
        status = self.ask("status")
        assert status["ok"], status
        return {d["name"]: d for d in status["info"]["destinations"]}


@contextmanager
def served(state: Path, every: float | None = None) -> Iterator[Served]:
    """``run_serve`` of ``state`` in a thread, with a control port, until the block ends."""
    stop = threading.Event()
    ready = threading.Event()
    where: list[Served] = []

    def on_ready(session, uri: str, control_port: int | None) -> None:
        assert control_port is not None
        where.append(Served(uri, control_port))
        ready.set()

    def main() -> None:
        try:
            run_serve(
                str(state), HOST, 0, every=every, control=(HOST, 0), ready=on_ready, stop=stop
            )
        finally:
            ready.set()  # also when it failed to start

    worker = Worker(main)
    try:
        if not ready.wait(TIMEOUT):
            pytest.fail(f"isc serve of {state} was not ready within {TIMEOUT} s")
        if not where:
            worker.finish()  # raises why it did not start
        yield where[0]
    finally:
        stop.set()
        worker.finish()


def image(path: Path) -> bytes:
    return path.read_bytes()


def line_reader(stream) -> queue.Queue:
    """A process's output lines (then None), read by a thread: the test waits with a timeout.

    The thread closes ``stream`` at its end; the caller must not close it, which
    would pull the pipe from under the thread while it still reads.
    """
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        with stream:
            for line in stream:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def next_line(lines: queue.Queue, what: str) -> str | None:
    """The next line of ``lines`` (None at EOF); fails the test after TIMEOUT seconds."""
    try:
        line = lines.get(timeout=TIMEOUT)
    except queue.Empty:
        pytest.fail(f"{what} printed nothing for {TIMEOUT} s")
    return line if line is None else line.strip()


# -- hole 5: every copy of a persistent session is recorded --------------------------------------
def test_a_periodic_update_is_recorded_in_the_session_directory_while_it_runs(
    work: Path, export: Export, state: Path
):
    host_writes_offline(state, SEED + 1)
    gate = Gate()
    export.lun.before_write = gate
    with served(state, every=0.01):
        try:
            gate.wait_reached()  # the first periodic update is writing to d2
            meta = read_state(state).meta
        finally:
            export.lun.before_write = None
            gate.open()
    # A crash while it wrote must not have found these destinations consistent.
    assert meta.get("copy") == {"mode": "incremental", "destinations": ["d1", "d2"]}
    assert {d["name"]: d["state"] for d in meta["destinations"]} == {
        "d1": "inconsistent",
        "d2": "inconsistent",
    }
    meta = read_state(state).meta
    assert "copy" not in meta
    assert [d["state"] for d in meta["destinations"]] == ["consistent", "consistent"]
    assert image(work / "d1.img") == image(work / "d2.img") == image(work / "source.img")


class Heard(logging.Handler):
    """Sets ``event`` when ``logger`` logs a message holding any of ``words``."""

    def __init__(self, logger: str, *words: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(logger)
        self.words = words
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if any(word in record.getMessage() for word in self.words):
            self.event.set()

    def __enter__(self) -> threading.Event:
        self.logger.addHandler(self)
        return self.event

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)


def test_a_periodic_update_never_overwrites_the_record_of_a_running_copy(
    export: Export, state: Path
):
    gate = Gate()
    export.lun.before_write = gate
    tick = Heard("isc", "periodic update is skipped", "an update is already running")
    with tick as ticked, served(state, every=0.3) as serve:
        copying = Worker(lambda: serve.ask("copy", mode="full-unmarked"))
        try:
            gate.wait_reached()  # the copy writes d2; the first periodic update is due
            assert ticked.wait(TIMEOUT), "no periodic update came while the copy ran"
            meta = read_state(state).meta
        finally:
            export.lun.before_write = None
            gate.open()
        assert copying.finish()["ok"]
    # A crash in an unmarked full copy must find its record: it resends everything.
    assert meta.get("copy") == {"mode": "full-unmarked", "destinations": ["d1", "d2"]}


def test_periodic_updates_need_a_destination(tmp_path: Path, work: Path):
    create_session(tmp_path / "bare", str(work / "source.img"), granularity=G)
    with pytest.raises(StateError, match="bare has no destinations; add one with isc add-dest"):
        run_serve(str(tmp_path / "bare"), HOST, 0, every=1.0, stop=threading.Event())
    open_session(tmp_path / "bare")[0].close()  # it was closed cleanly


# -- hole 10: a destination's outage stops no host write and does not last ---------------------
@pytest.fixture
def no_backoff(monkeypatch) -> None:
    """Reconnect at every use: these tests are about reconnecting, not about waiting."""
    monkeypatch.setattr(lun_module, "RECONNECT_BACKOFF", (0.0, 0.0))


def test_serve_starts_while_a_destination_is_unreachable_and_copies_once_it_is_back(
    work: Path, export: Export, state: Path, no_backoff
):
    export.stop()
    with served(state) as serve:
        dests = serve.destinations()
        assert dests["d1"]["reachable"] is True and dests["d1"]["problem"] is None
        assert dests["d2"]["reachable"] is False
        assert f"destination d2 at {export.uri} is unreachable" in dests["d2"]["problem"]
        host_writes(serve.uri, SEED + 2)  # the host writes while a replica is down
        assert serve.ask("mark")["ok"]
        failed = serve.ask("copy")
        assert "is unreachable" in failed["info"]["outcomes"]["d2"], failed
        export.start()
        assert serve.ask("mark")["ok"]
        done = serve.ask("copy")
        assert done["ok"], done
        dests = serve.destinations()
        assert [(d["state"], d["reachable"]) for d in dests.values()] == [
            ("consistent", True),
            ("consistent", True),
        ]
    assert image(work / "d1.img") == image(work / "d2.img") == image(work / "source.img")


def test_serve_reconnects_to_a_destination_whose_server_restarted(
    work: Path, export: Export, state: Path, no_backoff
):
    with served(state) as serve:
        host_writes(serve.uri, SEED + 3)
        assert serve.ask("mark")["ok"] and serve.ask("copy")["ok"]
        export.stop()
        export.start()  # every connection to it is gone
        host_writes(serve.uri, SEED + 4)
        # The first use of d2 finds its connection lost (the copy's check of the
        # destination, or its first write); the next one reconnects.
        outcomes = []
        while len(outcomes) < 2 and outcomes[-1:] != ["ok"]:
            assert serve.ask("mark")["ok"]
            outcomes.append(serve.ask("copy")["info"]["outcomes"]["d2"])
        assert outcomes[-1] == "ok", outcomes
        assert all(d["reachable"] for d in serve.destinations().values())
    assert image(work / "d1.img") == image(work / "d2.img") == image(work / "source.img")
    stored, _ = open_session(state)
    with stored:
        assert [d.state for d in stored.destinations] == [DestState.CONSISTENT] * 2


def test_the_isc_serve_process_starts_with_a_destination_down(
    work: Path, export: Export, state: Path
):
    export.stop()
    log = work / "serve.log"
    command = [*ISC, "serve", str(state), "--listen", f"{HOST}:0"]
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [*command, "--every", "0.05"], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        output = line_reader(proc.stdout)
        printed = [next_line(output, "isc serve")]
        while printed[-1] not in ("ready", None):
            printed.append(next_line(output, "isc serve"))
        assert printed[-1] == "ready", log.read_text()
        host_writes(printed[0].split()[-1], SEED + 5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
    assert f"destination d2 at {export.uri} is unreachable" in log.read_text()
    stored, recovery = open_session(state)
    with stored:
        assert not recovery.crashed and stored.session.bitmap.tracking_count > 0


@contextmanager
def isc_serve(cwd: Path, *args: str) -> Iterator[tuple[dict, queue.Queue]]:
    """The real ``isc serve ARGS --json`` run in ``cwd``, ready: its ready line (its export's
    URI added as ``uri``) and its next output lines; at the end SIGTERM stops it cleanly."""
    with open(cwd / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [*ISC, "serve", *args, "--json"], cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        output = line_reader(proc.stdout)
        ready = json.loads(next_line(output, "isc serve") or "null")
        assert ready is not None and ready["ready"], (cwd / "serve.log").read_text()
        (ready["uri"],) = ready["exports"].values()
        yield ready, output
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, (cwd / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)


def test_isc_serve_every_prints_a_json_line_per_update(work: Path, export: Export, state: Path):
    with isc_serve(work, str(state), "--listen", f"{HOST}:0", "--every", "0.05") as served:
        ready, output = served
        assert ready["control"] is None
        host_writes(ready["uri"], SEED + 6)
        sent = 0
        for _ in range(100):  # one line per update, those with nothing to send too
            update = json.loads(next_line(output, "isc serve") or "null")
            assert update["ok"] and update["session"] == "state", update
            assert update["time"].endswith("Z") and update["mode"] == "incremental"
            sent += update["chunks_sent"]
            # An update that began between the host writes leaves the later ones
            # to the next: the writes are all sent once the images agree.
            if sent and image(work / "d1.img") == image(work / "source.img"):
                break
        else:
            pytest.fail("100 updates did not send the host writes")
        assert {d["name"]: d["state"] for d in update["destinations"]} == {
            "d1": "consistent",
            "d2": "consistent",
        }


def isc_status(state: Path, *options: str) -> str:
    """What the real ``isc status`` of ``state`` prints (it reads while a server holds it)."""
    done = subprocess.run(
        [*ISC, "status", str(state), *options],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return done.stdout


def test_isc_status_shows_which_destinations_are_reachable(export: Export, state: Path, no_backoff):
    export.stop()
    with served(state) as serve:
        # Saved after the server's first try of each destination.
        dests = json.loads(isc_status(state, "--json"))["destinations"]
        assert [(d["name"], d["reachable"]) for d in dests] == [("d1", True), ("d2", False)]
        down = f"destination d2 at {export.uri} is unreachable"
        assert dests[0]["problem"] is None and down in dests[1]["problem"]
        assert f"    not reachable when last tried: {down}" in isc_status(state)
        export.start()
        assert serve.ask("mark")["ok"] and serve.ask("copy")["ok"]
        dests = json.loads(isc_status(state, "--json"))["destinations"]
        assert [(d["reachable"], d["problem"]) for d in dests] == [(True, None), (True, None)]
    assert "not reachable" not in isc_status(state)


# -- hole 7: a source file served on its own is locked as a session directory's is -------------
def test_serving_a_source_file_locks_it_against_other_sessions(work: Path):
    source = work / "source.img"
    (work / "link.img").symlink_to(source)
    with served(source):
        for spelling in (source, work / "link.img"):  # the same file under another name
            with pytest.raises(StateError, match=f"the source {spelling} is in use by another"):
                create_session(work / "other", str(spelling))
        assert not (work / "other").exists()
    create_session(work / "other", str(source))  # free once the server stopped
    stored, _ = open_session(work / "other")
    with stored, pytest.raises(StateError, match=f"the source {source} is in use by another"):
        run_serve(str(source), HOST, 0, stop=threading.Event())


def test_a_served_source_file_swapped_between_its_open_and_its_lock_is_the_one_locked(
    work: Path, monkeypatch
):
    # The served file is renamed and another put at its path between the LUN's
    # open and the lock's: the lock must hold the file the session writes.
    import isc.store

    source, moved = work / "source.img", work / "moved.img"
    real_open = isc.store.open_lun

    def open_then_swap(target: str, timeout: float | None = None):
        lun = real_open(target, timeout)
        if target == str(source):
            source.rename(moved)
            FileLUN.create(source, 1 << 20).close()
        return lun

    monkeypatch.setattr(isc.store, "open_lun", open_then_swap)
    with served(source):
        monkeypatch.undo()
        with pytest.raises(StateError, match="is in use by another"):
            create_session(work / "other", str(moved))
    create_session(work / "other", str(moved))  # free once the server stopped


# -- the interpreter's switch interval: the commands set it, run_serve does not ----------------
@pytest.mark.parametrize("daemon", ["serve", "agent"])
@pytest.mark.parametrize("given", [None, "0.2"])
def test_isc_serve_and_agent_set_the_switch_interval_and_run_serve_leaves_it(
    work: Path, monkeypatch, daemon, given
):
    import sys

    import isc.agent
    import isc.cli
    import isc.serve

    seen: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", seen.append)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the test's handlers stay
    monkeypatch.setattr(isc.serve, "run_serve", lambda *args, **kwargs: None)
    monkeypatch.setattr(isc.agent, "run_agent", lambda *args, **kwargs: None)
    where = (
        ["serve", str(work / "source.img")] if daemon == "serve" else ["agent", "--dir", str(work)]
    )
    listen = ["--listen", "127.0.0.1:0"]
    option = [] if given is None else ["--switch-interval", given]
    assert isc.cli.main([*where, *listen, *option]) == 0
    assert seen == [0.0002 if given else 0.0005]


def test_run_serve_leaves_the_switch_interval_of_its_process_alone(work: Path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "setswitchinterval", lambda seconds: pytest.fail("set"))
    stop = threading.Event()
    stop.set()
    run_serve(str(work / "source.img"), HOST, 0, stop=stop)


def test_a_switch_interval_that_is_not_positive_is_refused(work: Path):
    for value in ("0", "-1", "fast"):
        done = subprocess.run(
            [*ISC, "serve", str(work / "source.img"), "--switch-interval", value],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 2
        assert f"argument --switch-interval: {value!r}" in done.stderr.splitlines()[-1]


# -- a copy asked of the server waits for the agents as long as the asker said -------------------
class StallingAgent:
    """An isc agent's control port on a Unix socket that answers status requests until
    :meth:`stall`, then reads each request and never answers, noting when the asker hung up.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stalled = threading.Event()
        self.hung_up = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen()
        self._worker = Worker(self._serve)

    def stall(self) -> None:
        self.stalled.set()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the test ended
                return
            with conn, conn.makefile("rb") as lines:
                request = json.loads(lines.readline())
                if not self.stalled.is_set():
                    reply = {"id": request["id"], "ok": True, "info": {"identity": "d2"}}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                elif lines.readline() == b"":  # the asker gave up waiting
                    self.hung_up.set()

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._worker.finish()


def test_isc_copy_asking_the_server_waits_for_an_agent_no_longer_than_its_timeout(
    work: Path, export: Export
):
    agent = StallingAgent(work / "agent.sock")
    try:
        state = work / "state"
        create_session(state, str(work / "source.img"), granularity=G)
        stored, _ = open_session(state)
        with stored:
            stored.add_destination(export.uri, "d2", f"unix:{agent.path}")
        agent.stall()
        with served(state):
            # Well within the server's own wait for an agent (DEFAULT_TIMEOUT).
            done = subprocess.run(
                [*ISC, "copy", "state", "--full", "--timeout", "0.5"],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=DEFAULT_TIMEOUT / 3,
            )
        assert done.returncode == 0, done.stderr
        assert agent.hung_up.is_set()
        assert image(work / "d2.img") == image(work / "source.img")
    finally:
        agent.close()


@pytest.mark.parametrize("timeout", ["30", -1, 0, True, 1e10, [30]])
def test_a_copy_request_with_a_bad_timeout_is_refused_and_copies_nothing(
    work: Path, state: Path, timeout: object
):
    host_writes_offline(state, SEED + 9)
    before = image(work / "d1.img")
    with served(state) as serve:
        refused = serve.ask("copy", mode="full", timeout=timeout)
        assert not refused["ok"]
        assert refused["reason"] == (
            "timeout must be a number of seconds in (0, 1e+09] (each destination's agent "
            f"may take that long to answer), got {timeout!r}"
        )
        assert serve.ask("status")["info"]["tracked_chunks"] > 0
    assert image(work / "d1.img") == before
