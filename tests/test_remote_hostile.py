"""Hostile remote sites: the windows between a site's action and its answer, and trust.

Real processes throughout: ``isc agent``, ``isc update`` and ``isc rollback``
as the ``isc`` command runs them, killed with SIGKILL at forced points. A
``sitecustomize`` module (written under ``tmp_path``, first on
``PYTHONPATH`` of the processes a test starts) installs the points; the JSON
file ``ISC_TEST_FAULTS`` names arms them (:func:`arm`), read at each event,
so a running agent is armed without a restart; a point counts its events
from when it is armed:

========================  ==========================================================
``kill_after_protect=N``  the agent dies once its N-th protect is durable, unanswered
``kill_after_saves=N``    the agent dies after its N-th journal append (mid-copy)
``kill_mid_rollback=N``   the agent dies once a rollback wrote back N chunks
``hold_first_write=F``    the agent holds the next write to its export until the
                          test opens the FIFO ``F`` (``F.reached``: held), once per ``F``
``fence_started=F``       the agent creates the file ``F`` as it starts a fence
``fence_seconds=S``       the agent's fences wait ``S`` seconds for what they cut
``kill_after_unprotect``  ``isc update`` dies once the agent acknowledged its N-th
``=N``                    unprotect, before the update's outcome is saved
``kill_at_run=N``         ``isc update`` dies at the N-th run its copy sent
========================  ==========================================================

After each kill the session is opened again and checked byte for byte: a
destination reported CONSISTENT equals the source's image at its last mark,
and every chunk where a destination differs from the source is tracked
(rule 2). Rollbacks: killed mid-way at the agent and run again, refused in
states that do not allow them, racing an update (in this process, and from
another client of the agent).

Hostile peers: listeners that answer the control protocol wrongly (a reply
dripped a byte at a time, one too long, one for another request, status and
rollback replies of the wrong shape or with ranges that make no sense), an
NBD export that drips its greeting, answers a write for no request in
flight, or drops what it acknowledges (nbdkit's null plugin), another agent
at the address of the first, and peers with certificates that must not pass
(self-signed, of the other role, expired, of another CA, either end),
plaintext on TLS faces, a client that asks for TLS offered none (a
downgrade), and a challenge-response overheard and replayed. Each must end
within a bound with one clear error line and change nothing.

A test that found a hole in the current code is marked ``xfail(strict=True)``
with the reason, naming the code: it passes once the hole is mended.
The tools come from Debian's openssl and nbdkit packages.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_agent
from helpers import Gate, HookLUN, Worker, assert_no_lost_change, free_ports, wait_until
from test_agent import HOST, IO, JOURNAL, SIZE, WAIT, lun_of
from test_agent_journal import agent_here, write_randomly
from test_cli import state_of
from test_nbd import CMD_WRITE, Raw, nbdkit
from test_security_nbd import ReceivingServer, with_tls

from isc import Destination, DestState, MemoryLUN
from isc.agent import HEAD_SIZE, HEADER_SIZE
from isc.auth import Credentials
from isc.nbd import NBDLUN, NBDServer, proto
from isc.nbd import server as nbd_server
from isc.remote import PROTECT_GRANULARITY, AgentSite, LocalSite
from isc.store import copy as store_copy
from isc.store import open_session, read_state
from isc.update import PeriodicUpdate, UpdateBusy, UpdateError, rollback

SEED = 20261206
G = 16 << 10  # the session's granularity
SLOT = HEAD_SIZE + PROTECT_GRANULARITY
"""One record of an agent's journal: a saved chunk."""

source, session, exports = test_agent.source, test_agent.session, test_agent.exports

SITECUSTOMIZE = '''
"""Fault points of tests/test_remote_hostile.py, armed by the file ISC_TEST_FAULTS names."""
import json
import os
import signal
import threading

_FAULTS = os.environ.get("ISC_TEST_FAULTS")
_counts = {}
_lock = threading.Lock()


def _armed(name):
    """The setting of fault point ``name``, read at each event: None while it is not armed."""
    try:
        with open(_FAULTS) as faults:
            return json.load(faults).get(name)
    except FileNotFoundError:
        return None


def _event(name):
    """Count an event of fault point ``name`` while it is armed; True at its armed count."""
    wanted = _armed(name)
    if wanted is None:
        return False
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        return _counts[name] == int(wanted)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


if _FAULTS:
    from isc import agent, store, update
    from isc.nbd import server

    def _kill_after(point, function):
        """``function``, then death at the armed count of fault point ``point``."""

        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            if _event(point):
                _die()
            return result

        return wrapper

    class _Dying:
        """A journal's LUN whose writes count towards kill_mid_rollback."""

        def __init__(self, lun):
            self.lun, self.size = lun, lun.size
            self.flush, self.readinto = lun.flush, lun.readinto
            self.write = _kill_after("kill_mid_rollback", lun.write)

    _rollback, _write, _ask = agent.Journal.rollback, agent.Export.write, update._ask
    _fence = server.NBDServer.fence
    _held = set()  # the FIFOs of hold_first_write that held a write

    def rollback(self, *args, **kwargs):
        lun, self.lun = self.lun, _Dying(self.lun)
        try:
            return _rollback(self, *args, **kwargs)
        finally:
            self.lun = lun

    def write(self, *args, **kwargs):
        fifo = _armed("hold_first_write")
        with _lock:
            first = fifo is not None and fifo not in _held
            _held.add(fifo)
        if first:
            open(fifo + ".reached", "w").close()
            with open(fifo):  # a FIFO: open blocks until the test opens it to write
                pass
        _write(self, *args, **kwargs)

    def fence(self, timeout=None):
        started, seconds = _armed("fence_started"), _armed("fence_seconds")
        if started is not None:
            open(started, "w").close()
        return _fence(self, timeout if seconds is None else float(seconds))

    def ask(site, request, *args, **kwargs):
        ack = _ask(site, request, *args, **kwargs)
        if request == "unprotect" and ack.ok and _event("kill_after_unprotect"):
            _die()
        return ack

    agent.Export.protect = _kill_after("kill_after_protect", agent.Export.protect)
    agent.Journal._append = _kill_after("kill_after_saves", agent.Journal._append)
    store.Progress.__call__ = _kill_after("kill_at_run", store.Progress.__call__)
    agent.Journal.rollback, agent.Export.write, update._ask = rollback, write, ask
    server.NBDServer.fence = fence
'''


# -- processes --------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of the processes a test starts: the fault points importable, and
    armed by ``tmp_path/faults.json`` (:func:`arm`)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(hooks), test_agent.ENV["PYTHONPATH"]])
    return {**test_agent.ENV, "PYTHONPATH": path, "ISC_TEST_FAULTS": str(tmp_path / "faults.json")}


def arm(env: dict[str, str], **faults: object) -> None:
    """Arm the fault points ``faults`` (name: setting) of every process started with
    ``env``, running ones too, and disarm the others."""
    Path(env["ISC_TEST_FAULTS"]).write_text(json.dumps(faults))


def answers(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=WAIT).close()
    except OSError:
        return False
    return True


class Agent:
    """An ``isc agent`` of ``directory`` at fixed ports, so that it can be killed and started
    again at the same address."""

    def __init__(
        self, directory: Path, env: dict[str, str], logs: Path, options: tuple[str, ...] = ()
    ) -> None:
        self.directory, self.env, self.logs, self.options = directory, env, logs, options
        self.control, self.nbd = free_ports(2)
        self.site = f"{HOST}:{self.control}"
        self.uri = f"nbd://{HOST}:{self.nbd}/disk"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = logs / "agent-0.log"
        self._starts = 0

    def start(self) -> None:
        """Start it; return once its control port answers (its exports listen before)."""
        assert self.proc is None or self.proc.poll() is not None, "the agent runs already"
        self._starts += 1
        self.log = self.logs / f"agent-{self._starts}.log"
        args = ["--listen", self.site, "--nbd-port", str(self.nbd), "--dir", str(self.directory)]
        with open(self.log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "isc.cli", "-v", "agent", *args, *self.options],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self.env,
            )
        try:
            wait_until(lambda: answers(self.control), self.proc, "its control port", self.log)
        except BaseException:
            self.end()
            raise

    def stop(self) -> None:
        """SIGTERM, as an operator would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(WAIT) == 0, self.log.read_text()

    def killed(self) -> bool:
        """Whether it died of SIGKILL (a fault point); waits for it to end."""
        assert self.proc is not None
        return self.proc.wait(WAIT) == -signal.SIGKILL

    def end(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(WAIT)

    def site_of(self) -> AgentSite:
        return AgentSite(HOST, self.control, timeout=WAIT)

    def in_its_place(self, directory: Path) -> Agent:
        """Another agent, of ``directory``, at this one's address (not started)."""
        other = copy.copy(self)
        other.directory, other.proc = directory, None
        return other


def isc(work: Path, env: dict[str, str], *args: str, limit: float = 3 * WAIT):
    """Run ``isc ARGS`` in ``work``; its completed process. It fails the test when the
    command runs longer than ``limit`` seconds."""
    done = subprocess.run(
        [*test_agent.ISC, *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=limit,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def recorded(work: Path) -> dict:
    """What ``isc status --json`` reports of ``work/s`` but the time and whether each
    destination answered at its last use: what a refused command must leave as it was."""
    report = state_of(work)
    for dest in report["destinations"]:
        del dest["problem"], dest["reachable"]
    return report


def one_error(done: subprocess.CompletedProcess) -> str:
    """The one error line a failed command printed (exit status 1), its last line (notes
    of what it found may come before it)."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("isc: error: ")]
    assert errors == lines[-1:], done.stderr
    return errors[0]


@dataclass
class Replica:
    """A session ``work/s`` on ``source`` with one destination, ``disk``, an export of
    ``agent`` at its own site, and the image ``consistent`` it holds since the last
    update that succeeded."""

    work: Path
    source: Path
    export: Path
    agent: Agent
    env: dict[str, str]
    consistent: bytes = b""

    def isc(self, *args: str, limit: float = 3 * WAIT) -> subprocess.CompletedProcess:
        return isc(self.work, self.env, *args, limit=limit)

    def arm(self, **faults: object) -> None:
        arm(self.env, **faults)

    def start_update(self, *options: str) -> tuple[subprocess.Popen[bytes], Path]:
        """``isc update s`` started in the background; the process and its log."""
        log = self.agent.logs / "update.log"
        with open(log, "wb") as stderr:
            proc = subprocess.Popen(
                [*test_agent.ISC, "update", "s", "--timeout", str(WAIT), *options],
                cwd=self.work,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        return proc, log

    def update(self) -> subprocess.CompletedProcess:
        done = self.isc("update", "s", "--timeout", str(WAIT))
        if done.returncode == 0:
            self.consistent = self.source.read_bytes()
        return done

    def host_writes(self, rng: random.Random, count: int = 30) -> None:
        stored, _ = open_session(self.work / "s")
        with stored:
            write_randomly(stored.session, rng, count)

    def slots(self) -> int:
        """The records (saved chunks) in ``disk``'s journal at the agent; 0 without one."""
        try:
            size = (self.export.parent / JOURNAL).stat().st_size
        except FileNotFoundError:
            return 0
        return (size - HEADER_SIZE) // SLOT

    def state(self) -> str:
        (dest,) = read_state(self.work / "s").meta["destinations"]
        return dest["state"]

    def protected(self) -> bool:
        ack = self.agent.site_of().status(Destination(None, name="disk"))
        assert ack.ok, ack.reason
        return ack.info["protected"]

    def check(self) -> str:
        """Open the session again: what ``disk`` holds is honest (the module docstring).
        Returns its state."""
        held = self.export.read_bytes()
        stored, _ = open_session(self.work / "s")
        with stored, lun_of(self.export) as lun:
            (dest,) = stored.destinations
            assert_no_lost_change(stored.session, lun)
            if dest.state is DestState.CONSISTENT:
                assert held == self.consistent, "disk reads consistent but is not the image"
            return dest.state.value


@pytest.fixture
def replica(tmp_path: Path, source: Path, exports: Path, env) -> Iterator[Replica]:
    """A :class:`Replica` after its first update (full), with its agent running."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (exports / "spare").unlink()  # one export, one NBD port: the agent's only other one
    remote = Agent(exports, env, logs)
    replica = None
    try:
        remote.start()
        stored, _ = open_session(create(tmp_path / "s", source))
        with stored:
            stored.add_destination(remote.uri, "disk", remote.site)
        replica = Replica(tmp_path, source, exports / "disk", remote, env)
        assert replica.update().returncode == 0
        assert replica.export.read_bytes() == replica.consistent
        yield replica
    finally:
        remote.end()
        if replica is not None:
            replica.agent.end()  # another agent may have taken its place


def create(state: Path, source: Path) -> Path:
    from isc.store import create_session

    create_session(state, str(source), granularity=G)
    return state


# -- between a remote action and its acknowledgement ----------------------------------------
def test_an_agent_killed_between_a_durable_protect_and_its_answer(replica: Replica):
    rng = random.Random(SEED)
    replica.host_writes(rng)
    replica.arm(kill_after_protect=1)
    done = replica.update()
    assert "cannot protect disk" in one_error(done) and "the update was abandoned" in done.stderr
    assert replica.agent.killed()
    assert replica.export.read_bytes() == replica.consistent  # nothing was copied
    assert replica.check() == "consistent"  # it holds the last update's image
    replica.arm()
    replica.agent.start()
    assert replica.protected()  # the protect did happen: its answer was lost
    # The same update again: the agent keeps the protection it has (the same image).
    assert replica.update().returncode == 0
    assert replica.export.read_bytes() == replica.source.read_bytes()
    assert replica.check() == "consistent" and not replica.protected()


def test_isc_update_killed_between_the_unprotect_ack_and_saving_its_outcome(replica: Replica):
    rng = random.Random(SEED + 1)
    replica.host_writes(rng)
    before = replica.source.read_bytes()
    replica.arm(kill_after_unprotect=1)
    done = replica.update()
    assert done.returncode == -signal.SIGKILL, done.stderr
    replica.arm()
    assert not replica.protected()  # the agent did drop the protection
    assert replica.export.read_bytes() == before  # and the copy was whole
    replica.consistent = before
    state = replica.check()
    # Nothing to roll back now, and asking changes nothing.
    saved = recorded(replica.work)
    refused = one_error(replica.isc("rollback", "s", "disk"))
    assert "disk is not protected: there is no image to restore" in refused
    assert "nothing was changed" in refused
    assert replica.export.read_bytes() == before
    assert replica.check() == state and recorded(replica.work) == saved
    assert replica.update().returncode == 0
    assert replica.check() == "consistent"
    assert replica.export.read_bytes() == replica.source.read_bytes()


ROUNDS = 2
"""Kill-and-recover rounds of a loop: seeded, a few each."""


def test_the_agent_killed_mid_copy_then_mid_rollback_and_the_rollback_run_again(
    replica: Replica,
):
    rng = random.Random(SEED + 2)
    for _ in range(ROUNDS):
        replica.host_writes(rng)
        replica.arm(kill_after_saves=rng.randrange(1, 4))
        assert "disk" in one_error(replica.update())  # the copy lost its destination
        assert replica.agent.killed()
        assert replica.check() == "inconsistent"
        # Each chunk is saved once: a rollback writes back as many chunks as there are slots.
        replica.arm(kill_mid_rollback=rng.randrange(1, replica.slots() + 1))
        replica.agent.start()
        lost = one_error(replica.isc("rollback", "s", "disk"))
        assert "it may have happened: disk is inconsistent" in lost
        assert replica.agent.killed()
        assert replica.check() == "inconsistent"  # a mix of both images, all of it tracked
        replica.arm()
        replica.agent.start()
        assert replica.isc("rollback", "s", "disk").returncode == 0
        assert replica.export.read_bytes() == replica.consistent
        assert replica.check() == "consistent"  # what it was when it was protected
    assert replica.update().returncode == 0
    assert replica.export.read_bytes() == replica.source.read_bytes()
    assert replica.check() == "consistent" and not replica.protected()


def test_a_rollback_the_state_does_not_allow_is_refused_and_changes_nothing(replica: Replica):
    before = recorded(replica.work)
    image = replica.export.read_bytes()

    def refused(*args: str) -> str:
        line = one_error(replica.isc("rollback", "s", *args))
        assert recorded(replica.work) == before
        assert replica.export.read_bytes() == image
        return line

    assert "disk is not protected: there is no image to restore" in refused("disk")
    assert replica.isc("mark", "s").returncode == 0
    before = recorded(replica.work)
    assert refused("disk").endswith("s is marked; unmark it before a rollback")
    assert replica.isc("unmark", "s").returncode == 0
    # An update running (slowly: 1 KiB/s) holds the session: a rollback must wait for it.
    replica.host_writes(random.Random(SEED + 3))
    update, log = replica.start_update("--throttle", "1K")
    try:
        wait_until(lambda: replica.slots() > 0 and replica.export.read_bytes() != image,
                   update, "the update's first run", log)  # fmt: skip
        image = replica.export.read_bytes()
        before = recorded(replica.work)
        assert "in use by another isc process" in refused("disk")
        assert replica.protected()  # the update's protection is untouched
    finally:
        update.kill()
        update.wait(WAIT)
    assert replica.check() == "inconsistent"


def test_a_rollback_of_an_unknown_destination_names_it(replica: Replica):
    done = replica.isc("rollback", "s", "nosuch")
    assert "has no destination 'nosuch'" in one_error(done)


@contextmanager
def update_after_its_first_run(
    session, exports: Path, seed: int
) -> Iterator[tuple[AgentSite, Destination, Worker]]:
    """An agent of ``exports`` in this process, an update of ``session`` to its export
    ``disk``, host writes, and a second update parked after its first run (marked,
    protected, one run sent): yields the site, the destination and the update's thread.
    At the end the update goes on, and has finished when the block is left."""
    with agent_here(exports) as (_, port, uris):
        site = AgentSite(HOST, port, timeout=WAIT)
        dest = Destination(test_agent.remote_lun(uris["disk"]), name="disk")
        PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO).run()
        write_randomly(session, random.Random(seed), 30)
        gate = Gate()
        update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO, progress=gate)
        running = Worker(update.run)
        try:
            gate.wait_reached()
            yield site, dest, running
        finally:
            gate.open()
            assert running.done.wait(WAIT), "the update did not finish"
            dest.lun.close()


def test_rollback_racing_an_update_in_this_process_is_refused(source: Path, session, exports: Path):
    with update_after_its_first_run(session, exports, SEED + 4) as (site, dest, running):
        pending = session.bitmap.transfer_count
        with pytest.raises(UpdateBusy, match="already running"):
            rollback(session, dest, site, timeout=WAIT)
        assert session.bitmap.transfer_count == pending and site.status(dest).info["protected"]
    (result,) = running.finish()
    assert result.outcomes == {"disk": "ok"} and dest.state is DestState.CONSISTENT
    assert (exports / "disk").read_bytes() == source.read_bytes()


def test_a_rollback_from_another_client_racing_an_update_leaves_no_false_consistent(
    source: Path, session, exports: Path
):
    with update_after_its_first_run(session, exports, SEED + 5) as (site, dest, running):
        # Another client of the agent (an operator, another session's isc rollback).
        assert AgentSite(*site.address, timeout=WAIT).rollback(dest).ok
    with contextlib.suppress(UpdateError):  # it may fail, or succeed: either, honestly
        running.finish()
    with lun_of(exports / "disk") as held:
        assert_no_lost_change(session, held)
    if dest.state is DestState.CONSISTENT:
        assert (exports / "disk").read_bytes() == source.read_bytes()


# -- a site replaced under isc --------------------------------------------------------------
def another_volume(replica: Replica, seed: int) -> Path:
    """A directory whose export ``disk`` is another volume: random bytes of the same size."""
    directory = replica.work / "elsewhere"
    directory.mkdir()
    (directory / "disk").write_bytes(random.Random(seed).randbytes(SIZE))
    return directory


def replaced(replica: Replica, seed: int) -> bytes:
    """Stop the agent and start another one at its address, with another volume as
    ``disk``; returns what that volume holds."""
    replica.agent.end()
    replica.agent = replica.agent.in_its_place(another_volume(replica, seed))
    replica.export = replica.agent.directory / "disk"
    replica.agent.start()
    return replica.export.read_bytes()


def assert_no_false_consistent(replica: Replica) -> None:
    """After the next update: ``disk`` is the source, or does not read consistent."""
    done = replica.update()
    if replica.state() == "consistent":
        assert replica.export.read_bytes() == replica.source.read_bytes(), done.stderr


def test_another_agent_at_the_address_of_one_whose_copy_failed_is_not_trusted(
    replica: Replica,
):
    replica.host_writes(random.Random(SEED + 6))
    replica.arm(kill_after_saves=2)
    one_error(replica.update())  # the agent died mid-copy; isc update saved the outcome
    assert replica.agent.killed()
    replica.arm()
    image = replaced(replica, SEED + 7)
    before = recorded(replica.work)
    # The protection lives with the first agent: the new one has nothing to restore.
    refused = one_error(replica.isc("rollback", "s", "disk"))
    assert "disk is not protected: there is no image to restore" in refused
    assert recorded(replica.work) == before and replica.export.read_bytes() == image
    assert_no_false_consistent(replica)
    assert replica.state() == "consistent"


def test_an_export_replaced_at_its_path_under_a_protection_is_refused_in_one_line(
    replica: Replica,
):
    replica.host_writes(random.Random(SEED + 12))
    replica.arm(kill_after_saves=2)
    one_error(replica.update())  # the agent died mid-copy: disk stays protected
    assert replica.agent.killed()
    replica.arm()
    # Another volume at the export's path: another inode, which its journal does not name.
    volume = replica.export.with_name("new")
    volume.write_bytes(random.Random(SEED + 13).randbytes(SIZE))
    volume.replace(replica.export)
    image = replica.export.read_bytes()
    replica.agent.start()
    before = recorded(replica.work)
    refused = one_error(replica.isc("rollback", "s", "disk"))
    assert "the export was replaced; unprotect it" in refused and "nothing was changed" in refused
    assert recorded(replica.work) == before
    refused = one_error(replica.update())
    assert "cannot protect disk" in refused and "its protected image was lost" in refused
    # Its samples told the update it is another volume (rule 12): its next copy is full.
    assert replica.state() == "new" and replica.check() == "new"
    assert replica.export.read_bytes() == image


def test_another_agent_at_the_address_after_isc_update_was_killed_is_not_trusted(
    replica: Replica,
):
    replica.host_writes(random.Random(SEED + 8))
    replica.arm(kill_at_run=2)
    assert replica.update().returncode == -signal.SIGKILL
    replica.arm()
    replaced(replica, SEED + 9)
    assert_no_false_consistent(replica)


# -- hostile agents ---------------------------------------------------------------------------
class Listener:
    """A loopback listener whose thread hands each connection, one at a time, to
    :meth:`handle` until :meth:`close`; at ``port`` (0: any free one)."""

    def __init__(self, port: int = 0) -> None:
        self._stop = threading.Event()
        self._server = socket.create_server((HOST, port))
        self._server.settimeout(0.05)
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self._server.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(ConnectionError):  # a client may give up on it
                conn.settimeout(WAIT)
                self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class Impostor(Listener):
    """A control port that speaks the protocol wrongly: ``reply(request)`` gives the bytes
    it answers each request line with, sent at once or, with ``drip``, a byte every
    ``drip`` seconds. ``requests`` records what was asked."""

    def __init__(self, reply: Callable[[dict], bytes], drip: float | None = None) -> None:
        self.reply, self.drip = reply, drip
        self.requests: list[dict] = []
        super().__init__()
        self.site = f"{HOST}:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        with conn.makefile("rb") as lines:
            self.requests.append(json.loads(lines.readline()))
        answer = self.reply(self.requests[-1])
        if self.drip is None:
            conn.sendall(answer)
            return
        for byte in answer:
            if self._stop.wait(self.drip):
                return
            conn.sendall(bytes([byte]))


def reply(request: dict, **fields: object) -> bytes:
    return json.dumps({"id": request["id"], "ok": True, **fields}).encode() + b"\n"


@pytest.fixture
def local(tmp_path: Path, source: Path) -> Path:
    """``tmp_path/s`` on ``source`` with the destination ``local`` (a file), copied in full
    and consistent; it has no site of its own, so update and rollback take ``--site``."""
    (tmp_path / "local.img").write_bytes(bytes(SIZE))
    stored, _ = open_session(create(tmp_path / "s", source))
    with stored:
        stored.add_destination(str(tmp_path / "local.img"), "local")
        store_copy(stored, "full")
    return tmp_path


def ask_impostor(work: Path, env, impostor: Impostor, *command: str) -> str:
    """Run ``isc COMMAND --site IMPOSTOR --timeout 0.5``; its error line (it must end: a
    command that waits on a stalled reply for good meets :func:`isc`'s deadline)."""
    done = isc(work, env, *command, "--site", impostor.site, "--timeout", "0.5")
    return one_error(done)


def unchanged_but_the_generation(work: Path, before: dict, site: str | None = None) -> None:
    """An update marks before it asks the site, and names the agent ``site`` (``--site``)
    before it asks it to protect (the protect may hold the export for the session):
    refused, it leaves a generation more and ``site`` in each destination's ``held_at``."""
    after = recorded(work)
    assert after.pop("generation") == before.pop("generation") + 1
    for dest in after["destinations"]:
        assert dest.pop("held_at") == ([] if site is None else [site])
    for dest in before["destinations"]:
        assert dest.pop("held_at") == []
    assert after == before


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (lambda r: b"x" * (2 << 20), "with something that is not an isc agent's reply"),
        (lambda r: reply({"id": r["id"] + 1}), "with a reply for another request"),
        (lambda r: reply(r, extents="nonsense"), "with a reply of the wrong shape"),
    ],
    ids=["oversized", "another request", "bad extents"],
)
def test_an_agent_answering_protect_wrongly_abandons_the_update(local: Path, env, answer, why: str):
    before, image = recorded(local), (local / "local.img").read_bytes()
    with Impostor(answer) as impostor:
        line = ask_impostor(local, env, impostor, "update", "s")
    assert line.startswith("isc: error: cannot protect local: ") and why in line
    assert [r["op"] for r in impostor.requests] == ["protect"]
    unchanged_but_the_generation(local, before, impostor.site)
    assert (local / "local.img").read_bytes() == image


def test_an_agent_that_drips_its_reply_is_given_up_on_within_the_timeout(local: Path, env):
    before = recorded(local)
    with Impostor(lambda r: b" " * (1 << 20), drip=0.05) as impostor:
        line = ask_impostor(local, env, impostor, "update", "s")
    assert "did not answer protect local within 0.5 s" in line
    unchanged_but_the_generation(local, before, impostor.site)


def status(extents: object) -> Callable[[dict], bytes]:
    """An agent whose status says ``local`` is protected, holding ``extents``, and whose
    rollback claims it rewrote ``extents`` (whether it wrote anything or not)."""

    def answer(request: dict) -> bytes:
        if request["op"] == "status":
            info = {"protected": True, "intact": True, "extents": extents}
            return reply(request, info=info)
        return reply(request, extents=extents)

    return answer


@pytest.mark.parametrize(
    "extents",
    [[[-1, 1 << 16]], [[SIZE - 4096, 1 << 30]], "everything", None],
    ids=["negative", "past the end", "not a list", "none"],
)
def test_a_rollback_of_ranges_that_make_no_sense_tracks_the_whole_source(local: Path, env, extents):
    image = (local / "local.img").read_bytes()
    with Impostor(status(extents)) as impostor:
        done = isc(local, env, "rollback", "s", "local", "--site", impostor.site)
    assert [r["op"] for r in impostor.requests] == ["status", "rollback"]
    if done.returncode:  # a reply it cannot read: the rollback may have happened
        assert "it may have happened: local is inconsistent" in one_error(done)
    stored, _ = open_session(local / "s")
    with stored:
        (dest,) = stored.destinations
        # Whatever the site rewrote is tracked, and nothing says the destination is whole.
        assert dest.state is DestState.INCONSISTENT
        bitmap = stored.session.bitmap
        if extents == [[SIZE - 4096, 1 << 30]]:
            assert bitmap.tracking(bitmap.chunks - 1)
        else:
            assert bitmap.tracking_count == bitmap.chunks
    assert (local / "local.img").read_bytes() == image  # the impostor wrote nothing


def test_a_status_reply_of_the_wrong_shape_refuses_the_rollback_in_one_line(local: Path, env):
    before, image = recorded(local), (local / "local.img").read_bytes()
    with Impostor(lambda r: reply(r, info=["protected"])) as impostor:
        line = ask_impostor(local, env, impostor, "rollback", "s", "local")
    assert "nothing was changed" in line
    assert [r["op"] for r in impostor.requests] == ["status"]
    assert recorded(local) == before and (local / "local.img").read_bytes() == image


# -- authentication ---------------------------------------------------------------------------
def self_signed(base: Path, good: Path, role: str) -> Path:
    """A credentials directory like ``good`` whose ``role`` certificate signed itself."""
    from certs import EXTENSIONS, _key, _openssl

    directory = base / f"self-signed-{role}"
    shutil.copytree(good, directory)
    config = base / "self-signed.cnf"
    config.write_text("[req]\ndistinguished_name = dn\n[dn]\n" + EXTENSIONS)
    key = _key(directory / f"{role}-key.pem")
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", directory / f"{role}-cert.pem",
        "-days", "2", "-subj", f"/CN=isc test {role}", "-config", config, "-extensions", role,
    )  # fmt: skip
    return directory


def of_the_other_role(base: Path, good: Path, role: str) -> Path:
    """``good`` whose ``role`` certificate and key are those of the other role."""
    other = "server" if role == "client" else "client"
    directory = base / f"{other}-as-{role}"
    shutil.copytree(good, directory)
    for suffix in ("cert", "key"):
        shutil.copy(good / f"{other}-{suffix}.pem", directory / f"{role}-{suffix}.pem")
    return directory


def secured(credentials: dict[str, Path], server: Path, secret: Path) -> tuple[str, ...]:
    """An agent's options: mutual TLS with ``server``'s credentials on its control port and
    its exports, and the shared ``secret``."""
    tls = ("--tls-creds", str(server), "--tls=require", "--tls-verify-peer")
    return (*tls, "--secret-file", str(secret))


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    from test_security_control import secret_file

    return secret_file(tmp_path)


def test_certificates_that_must_not_pass_are_refused_and_change_nothing(
    tmp_path: Path, source: Path, exports: Path, env, credentials, secret: Path
):
    good = credentials["good"]
    bad = {
        "self-signed": self_signed(tmp_path, good, "client"),
        "a server's": of_the_other_role(tmp_path, good, "client"),
        "expired": credentials["expired"],
        "of another CA": credentials["other-ca"],
    }
    (exports / "spare").unlink()
    remote = Agent(exports, env, tmp_path, secured(credentials, good, secret))
    remote.start()
    disk = Destination(None, name="disk")
    try:
        for what, directory in bad.items():
            client = Credentials("client", tls_creds=directory, secret_file=secret)
            ack = AgentSite(HOST, remote.control, timeout=WAIT, credentials=client).protect(disk)
            assert not ack.ok and not ack.outcome_unknown, what  # the request never went out
            assert "\n" not in ack.reason, ack.reason
            # TLS 1.3: the agent's refusal of a certificate comes after the handshake.
            why = "is not trusted" if what == "of another CA" else "refused this client's"
            assert why in ack.reason, (what, ack.reason)
        # A plaintext client on the TLS control port, and on the TLS export.
        ack = AgentSite(HOST, remote.control, timeout=WAIT).protect(disk)
        assert not ack.ok and "give its --tls-creds or --secret-file" in ack.reason
        with pytest.raises(PermissionError, match="TLS is required"):
            NBDLUN(remote.uri, timeout=WAIT)
        # Through the command: one line, and the session as it was but for its mark.
        client = Credentials("client", tls_creds=good, secret_file=secret)
        uri = with_tls(remote.uri, good)
        stored, _ = open_session(create(tmp_path / "s", source))
        with stored:
            stored.add_destination(uri, "disk", remote.site, client)
            store_copy(stored, "full")
        before = recorded(tmp_path)
        wrong = ("--tls-creds", str(bad["self-signed"]), "--secret-file", str(secret))
        done = isc(tmp_path, env, "update", "s", "--timeout", str(WAIT), *wrong)
        assert "refused this client's credentials" in one_error(done)
        unchanged_but_the_generation(tmp_path, before)
        status = AgentSite(HOST, remote.control, timeout=WAIT, credentials=client).status(disk)
        assert status.ok and not status.info["protected"]
        remote.stop()
    finally:
        remote.end()
    assert (exports / "disk").read_bytes() == source.read_bytes()  # the full copy, no more
    said = remote.log.read_text()
    assert "status disk" in said and "protect disk" not in said
    assert not (exports / JOURNAL).exists()  # its holder record alone (isc add-dest's claim)


@pytest.mark.parametrize("make", [self_signed, of_the_other_role], ids=["self-signed", "client's"])
def test_an_agent_whose_certificate_must_not_pass_is_refused(
    tmp_path: Path, exports: Path, env, credentials, secret: Path, make
):
    good = credentials["good"]
    (exports / "spare").unlink()
    remote = Agent(
        exports, env, tmp_path, secured(credentials, make(tmp_path, good, "server"), secret)
    )
    remote.start()
    try:
        client = Credentials("client", tls_creds=good, secret_file=secret)
        site = AgentSite(HOST, remote.control, timeout=WAIT, credentials=client)
        ack = site.protect(Destination(None, name="disk"))
        assert not ack.ok and not ack.outcome_unknown
        assert "its certificate is not trusted" in ack.reason, ack.reason
    finally:
        remote.end()
    assert "protect disk" not in remote.log.read_text()
    assert not (exports / ".isc-agent").exists()


class Recorder(Listener):
    """A TCP proxy to the control port ``upstream`` that keeps what each client sent, as
    an eavesdropper on the wire would."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sent: list[bytes] = []
        super().__init__()

    def handle(self, client: socket.socket) -> None:
        heard = bytearray()
        with socket.create_connection((HOST, self.upstream), WAIT) as agent:
            ends = {client: agent, agent: client}
            while ends:
                ready, _, _ = select.select(list(ends), [], [], WAIT)
                if not ready:
                    break
                for end in ready:
                    data = end.recv(65536)
                    if not data:
                        ends.clear()
                        break
                    ends[end].sendall(data)
                    if end is client:
                        heard += data
        self.sent.append(bytes(heard))


def test_a_replayed_authentication_and_a_downgrade_are_refused_and_change_nothing(
    tmp_path: Path, exports: Path, env, secret: Path, credentials
):
    (exports / "spare").unlink()
    remote = Agent(exports, env, tmp_path, ("--secret-file", str(secret)))
    remote.start()
    recorder = Recorder(remote.control)
    disk = Destination(None, name="disk")
    try:
        client = Credentials("client", secret_file=secret)
        overheard = AgentSite(HOST, recorder.port, timeout=WAIT, credentials=client)
        direct = AgentSite(HOST, remote.control, timeout=WAIT, credentials=client)
        assert overheard.protect(disk).ok and overheard.unprotect(disk).ok
        assert direct.protect(disk).ok  # as an update does before it copies
        for conversation in recorder.sent:  # a protect, then an unprotect, word for word
            assert b'"op": "' in conversation and b'"proof": "' in conversation
            with socket.create_connection((HOST, remote.control), timeout=WAIT) as replay:
                replay.sendall(conversation)
                with replay.makefile("rb") as replies:
                    answers = [json.loads(line) for line in replies]
            assert [a.get("ok") for a in answers] == [False, False], answers
            assert "authentication failed" in answers[-1]["reason"]
        # A client that asks for TLS never falls back to plaintext with an agent that has none.
        wants_tls = Credentials("client", tls_creds=credentials["good"], secret_file=secret)
        ack = AgentSite(HOST, remote.control, timeout=WAIT, credentials=wants_tls).unprotect(disk)
        assert not ack.ok and not ack.outcome_unknown and "TLS with" in ack.reason, ack.reason
        status = direct.status(disk)
        assert status.ok and status.info["protected"]  # no unprotect but the first did a thing
        remote.stop()
    finally:
        recorder.close()
        remote.end()
    said = remote.log.read_text()
    assert said.count(": unprotect disk:") == 1 and said.count(": protect disk:") == 2, said


# -- a write of a dead update -----------------------------------------------------------------
def rewrite_chunk(replica: Replica, chunk: int, seed: int) -> None:
    stored, _ = open_session(replica.work / "s")
    with stored:
        stored.session.write(chunk * G, random.Random(seed).randbytes(G))


def killed_holding_a_write(replica: Replica, name: str) -> Path:
    """``isc update s`` killed while the agent holds its first write (received, not carried
    out); the FIFO that lets that write land (:func:`release`)."""
    fifo = replica.work / name
    os.mkfifo(fifo)
    replica.arm(hold_first_write=str(fifo))
    first, log = replica.start_update()
    try:
        held = Path(f"{fifo}.reached")
        wait_until(held.exists, first, "the agent holding the update's write", log)
    finally:
        first.kill()
        first.wait(WAIT)
    return fifo


def release(fifo: Path) -> None:
    """The write the agent holds at ``fifo`` lands now."""
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def update_releasing_within_the_fence(replica: Replica, fifo: Path) -> None:
    """``isc update s``, letting the held write land while the agent fences at its protect:
    the update then succeeds."""
    fencing = Path(f"{fifo}.fencing")
    replica.arm(fence_started=str(fencing))
    following, log = replica.start_update()
    try:
        wait_until(fencing.exists, following, "the agent fencing at the protect", log)
        release(fifo)
        assert following.wait(3 * WAIT) == 0, log.read_text()
    finally:
        following.kill()
        following.wait(WAIT)
    replica.consistent = replica.source.read_bytes()


def update_refused_by_the_fence(replica: Replica, fifo: Path) -> None:
    """``isc update s`` while the agent holds a write past its fence: the protect is
    refused, in one line, and nothing changes; the write lands after."""
    before = recorded(replica.work)
    replica.arm(fence_seconds=0.3)
    error = one_error(replica.isc("update", "s", "--timeout", str(WAIT)))
    assert error.startswith(
        "isc: error: cannot protect disk: disk's NBD server could not fence the clients "
        "connected before: 1 request(s) of the connections cut still ran after 0.3 s"
    ), error
    assert error.endswith(
        "nothing was changed; ask again once the file answers; the update was abandoned"
    )
    after = recorded(replica.work)
    assert after.pop("generation") == before.pop("generation") + 1  # marked, then unmarked
    assert after == before
    release(fifo)


def test_a_write_of_a_killed_update_that_lands_after_the_next_update_is_not_missed(
    replica: Replica,
):
    rewrite_chunk(replica, 5, SEED + 10)  # the one chunk the first update sends
    fifo = killed_holding_a_write(replica, "hold")
    rewrite_chunk(replica, 5, SEED + 11)  # after the kill: the next update sends this
    # The agent holds the dead update's write through the next protect's fence:
    # the protect is refused, not answered while that write may still land.
    update_refused_by_the_fence(replica, fifo)
    assert replica.update().returncode == 0
    assert replica.state() == "consistent"
    replica.agent.stop()
    assert replica.check() == "consistent"


def test_a_write_of_a_killed_update_landing_within_the_fence_is_copied_over(replica: Replica):
    rewrite_chunk(replica, 5, SEED + 20)
    fifo = killed_holding_a_write(replica, "hold")
    rewrite_chunk(replica, 5, SEED + 21)
    update_releasing_within_the_fence(replica, fifo)  # it lands before the protect
    assert replica.state() == "consistent"
    assert replica.check() == "consistent"


def test_updates_killed_with_a_write_held_again_and_again_leave_no_false_consistent(
    replica: Replica,
):
    rng = random.Random(SEED + 30)
    for step in range(3):  # the held write lands within the fence, after it, within it
        replica.host_writes(rng)
        fifo = killed_holding_a_write(replica, f"hold-{step}")
        assert replica.check() != "consistent"
        replica.host_writes(rng)
        if step % 2 == 0:
            update_releasing_within_the_fence(replica, fifo)
        else:
            update_refused_by_the_fence(replica, fifo)
            assert replica.update().returncode == 0
        assert replica.check() == "consistent"
    replica.agent.stop()
    assert replica.check() == "consistent"


class Handing(concurrent.futures.ThreadPoolExecutor):
    """An NBD server's thread pool of one thread that tells each request handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="isc-nbd")
        self.handed = threading.Semaphore(0)

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        self.handed.release()
        return future

    def wait_handed(self, count: int) -> None:
        for _ in range(count):
            assert self.handed.acquire(timeout=WAIT), "a request never reached the thread pool"


@contextmanager
def fencing(lun) -> Iterator[ReceivingServer]:
    """A server of ``lun`` as "disk" whose pool runs one request at a time (:class:`Handing`)."""
    server = ReceivingServer(lun, name="disk", workers=1)
    server._executor.shutdown()
    server._executor = Handing()
    with server:
        server.start(HOST, 0)
        yield server


def test_a_fence_waits_for_the_write_running_drops_the_one_queued_and_serves_a_newcomer():
    lun = HookLUN(MemoryLUN(SIZE))
    lun.before_write = gate = Gate()
    rng = random.Random(SEED + 40)
    running, queued, later = (rng.randbytes(G) for _ in range(3))
    with (
        fencing(lun) as server,
        NBDLUN(server.uri, timeout=WAIT) as a,
        NBDLUN(server.uri, timeout=WAIT) as b,
    ):
        first = Worker(lambda: a.write(0, running))
        gate.wait_reached()
        second = Worker(lambda: b.write(G, queued))
        server._executor.wait_handed(2)  # received and queued behind the first
        fence = Worker(server.fence)
        for cut in (first, second):  # each client sees its connection lost, no answer
            with pytest.raises(ConnectionError):
                cut.finish()
        with NBDLUN(server.uri, timeout=WAIT) as newcomer:  # connected during the fence
            assert not fence.done.is_set()  # it waits for the write running
            gate.open()
            assert fence.finish() is None
            newcomer.write(2 * G, later)
    assert lun.written == [(0, G), (2 * G, G)]  # the queued write never ran
    assert lun.lun.read(0, 3 * G) == running + bytes(G) + later


def test_a_fence_that_a_hung_write_outlasts_says_so_and_the_next_one_waits_for_it():
    lun = HookLUN(MemoryLUN(SIZE))
    lun.before_write = gate = Gate()
    with fencing(lun) as server, NBDLUN(server.uri, timeout=WAIT) as client:
        hung = Worker(lambda: client.write(0, bytes(range(256)) * (G // 256)))
        gate.wait_reached()
        assert server.fence(timeout=0.05) == (
            "1 request(s) of the connections cut still ran after 0.05 s (its LUN does not "
            "answer) and may still land"
        )
        with pytest.raises(ConnectionError):
            hung.finish()
        again = Worker(server.fence)  # its connection is gone; its write still runs
        gate.open()
        assert again.finish() is None
    assert lun.written == [(0, G)]


def test_a_protect_whose_fence_cuts_a_write_mid_payload_writes_none_of_it(exports: Path):
    payload = random.Random(SEED + 41).randbytes(IO)
    agent = test_agent.Agent(exports)
    try:
        export = agent.exports["disk"]
        with ReceivingServer(export, name="disk") as server:
            export.server = server
            server.start(HOST, 0)
            with socket.create_connection(server.address, timeout=WAIT) as sock:
                client = Raw(sock)
                client.go()
                before = server.received
                client.request(CMD_WRITE, 0, IO, payload=payload[: IO // 2])
                half = before + proto.REQUEST.size + IO // 2
                server.wait_for(lambda: server.received >= half, "half the payload")
                assert export.protect() == {"ok": True, "fenced": True}
                with contextlib.suppress(OSError):  # the rest, on a connection cut
                    sock.sendall(payload[IO // 2 :])
                assert client.dropped()
            assert server.held == 0
    finally:
        agent.close()
    assert (exports / "disk").read_bytes() == bytes(SIZE)
    assert (exports / JOURNAL).stat().st_size == HEADER_SIZE  # protected, nothing saved


def saved(exports: Path) -> bytes | None:
    """What the journal of export "disk" holds; None while it has none."""
    path = exports / JOURNAL
    return path.read_bytes() if path.exists() else None


def test_a_protect_or_rollback_whose_fence_times_out_is_refused_and_changes_nothing(
    exports: Path, monkeypatch
):
    monkeypatch.setattr(nbd_server, "FENCE_SECONDS", 0.05)
    rng = random.Random(SEED + 42)
    before, after = rng.randbytes(G), rng.randbytes(G)
    refused = (
        "disk's NBD server could not fence the clients connected before: 1 request(s) of the "
        "connections cut still ran after 0.05 s (its LUN does not answer) and may still land; "
        "nothing was changed; ask again once the file answers"
    )
    agent = test_agent.Agent(exports)
    try:
        export = agent.exports["disk"]
        export.lun = hooked = HookLUN(export.lun)
        with NBDServer(export, name="disk") as server:
            export.server = server
            server.start(HOST, 0)
            for data, request in ((before, export.protect), (after, export.rollback)):
                hooked.before_write = gate = Gate()
                with NBDLUN(server.uri, timeout=WAIT) as client:
                    hung = Worker(lambda data=data, client=client: client.write(0, data))
                    gate.wait_reached()
                    journal = saved(exports)
                    assert request() == {"ok": False, "reason": refused}
                    assert saved(exports) == journal
                    with pytest.raises(ConnectionError):
                        hung.finish()
                gate.open()
                assert server.fence(timeout=WAIT) is None  # the write landed
                assert request()["ok"]
    finally:
        agent.close()
    # Protected once the first write had landed; the second, saved first, rolled back.
    assert (exports / "disk").read_bytes() == before + bytes(SIZE - G)


class Dripper(Listener):
    """A listener that sends each client ``data`` a byte every ``every`` seconds, takes
    whatever it sends, and holds the connection until the client hangs up (``hung_up``:
    the bytes each client had been sent then) or the listener is closed."""

    def __init__(self, port: int, data: bytes, every: float) -> None:
        self.data, self.every = data, every
        self.hung_up: list[int] = []
        self._taken = 0
        self._changed = threading.Condition()
        super().__init__(port)

    def handle(self, conn: socket.socket) -> None:
        with self._changed:
            self._taken += 1
        sent = 0
        try:
            while not self._stop.is_set():
                if select.select([conn], [], [], self.every)[0]:
                    if not conn.recv(1 << 16):
                        break
                elif sent < len(self.data):
                    conn.sendall(self.data[sent : sent + 1])
                    sent += 1
            else:
                return
        except ConnectionError:
            pass  # a client that hung up on bytes it had not read resets the connection
        with self._changed:
            self.hung_up.append(sent)
            self._changed.notify_all()

    def wait_hung_up(self) -> list[int]:
        """Once every client it took hung up (a hang fails the test after ``WAIT``
        seconds), the bytes each had been sent."""
        with self._changed:
            done = self._changed.wait_for(lambda: 0 < self._taken == len(self.hung_up), WAIT)
            assert done, f"{self._taken} clients, {len(self.hung_up)} hung up"
            return list(self.hung_up)


def test_an_export_that_drips_its_greeting_is_given_up_on_within_the_timeout(replica: Replica):
    replica.agent.stop()
    before = recorded(replica.work)
    greeting = b"NBDMAGIC" + b"IHAVEOPT" + bytes(2)
    with Dripper(replica.agent.nbd, greeting, every=0.4) as dripper:
        done = replica.isc("update", "s", "--timeout", "0.5")
        # Given up on at the 0.5 s the handshake may take, not a 0.5 s wait per byte,
        # which a byte every 0.4 s never runs out: each client left before the greeting
        # ended (its 18 bytes take 7 s), however long the loaded machine took to start isc.
        assert max(dripper.wait_hung_up()) < len(greeting)
    assert done.returncode == 1
    assert recorded(replica.work)["destinations"] == before["destinations"]


def test_an_export_that_acknowledges_writes_it_never_made_is_not_reported_consistent(
    tmp_path: Path, source: Path, session
):
    # nbdkit's null plugin: every write succeeds and is thrown away; reads return zeros.
    with nbdkit(tmp_path, "null", f"size={SIZE}") as liar, NBDLUN(liar.uri, timeout=WAIT) as lun:
        dest = Destination(lun, name="liar")
        with contextlib.suppress(UpdateError):
            PeriodicUpdate(session, [dest], LocalSite(), timeout=WAIT, io_size=IO).run()
        if dest.state is DestState.CONSISTENT:
            assert lun.read(0, SIZE) == source.read_bytes(), "it reads consistent, holds zeros"


def exactly(conn: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        part = conn.recv(length - len(data))
        if not part:
            raise ConnectionError("the client left")
        data += part
    return bytes(data)


class HostileExport(Listener):
    """An NBD server of ``size`` bytes in ``image`` (simple replies only) that answers its
    ``wrong``-th write with the handle of no request in flight."""

    def __init__(self, size: int, wrong: int) -> None:
        self.image, self.wrong, self.writes = MemoryLUN(size), wrong, 0
        super().__init__()
        self.uri = f"nbd://{HOST}:{self.port}/disk"

    def handle(self, conn: socket.socket) -> None:
        flags = proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
        conn.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, flags))
        exactly(conn, 4)  # the client's flags
        while True:
            _, option, length = proto.OPTION.unpack(exactly(conn, proto.OPTION.size))
            exactly(conn, length)
            if option != proto.OPT_GO:
                conn.sendall(proto.option_reply(option, proto.REP_ERR_UNSUP))
                continue
            served = proto.TransmissionFlag.HAS_FLAGS | proto.TransmissionFlag.SEND_FLUSH
            info = proto.INFO_EXPORT_DATA.pack(proto.INFO_EXPORT, self.image.size, served)
            conn.sendall(proto.option_reply(option, proto.REP_INFO, info))
            conn.sendall(proto.option_reply(option, proto.REP_ACK))
            break
        while True:
            request = exactly(conn, proto.REQUEST.size)
            _, _, command, handle, offset, length = proto.REQUEST.unpack(request)
            if command == proto.CMD_DISC:
                return
            if command == proto.CMD_READ:
                conn.sendall(proto.simple_reply(handle) + self.image.read(offset, length))
                continue
            if command == proto.CMD_WRITE:
                self.image.write(offset, exactly(conn, length))
                self.writes += 1
                if self.writes == self.wrong:
                    handle ^= 1 << 40
            conn.sendall(proto.simple_reply(handle))


def test_an_export_answering_a_write_for_no_request_is_dropped_not_trusted(source: Path, session):
    with HostileExport(SIZE, wrong=3) as server, NBDLUN(server.uri, timeout=WAIT) as lun:
        dest = Destination(lun, name="disk")
        with pytest.raises(UpdateError, match="broke the protocol"):
            PeriodicUpdate(session, [dest], LocalSite(), timeout=WAIT, io_size=IO).run()
        assert dest.state is not DestState.CONSISTENT
        assert_no_lost_change(session, server.image)  # what it did write is all tracked
    assert session.source.read(0, SIZE) == source.read_bytes()
