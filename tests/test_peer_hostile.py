"""The remote paths between isc and its peers, attacked where the last fixes opened windows.

What tests/test_remote_hostile.py attacked is not repeated; its machinery is
reused: real ``isc agent`` processes at fixed ports (killed with SIGKILL at its
fault points, started again, or replaced by an agent of another directory at
the same address), its :class:`~test_remote_hostile.Impostor` control ports.
Updates run in this process through :class:`~isc.update.PeriodicUpdate`, so a
test can wrap the site and act between a request and the next step:

* a reply that is valid JSON nested too deep for the decoder: one clear line
  naming the agent, never a traceback (the identity check asks without the
  update's guard);
* ``isc update`` SIGKILLed once its protect was answered, before it recorded
  it: the destination is honest (it reads inconsistent), and a rollback and
  the next update go through;
* an update's unprotect that reaches the agent late, after the next update
  kept the protection and failed under it: the protection stays, and the
  rollback gives back its image;
* a write of a connection the fence cut, held at the agent, and a write of a
  connection opened during the fence: both land before the protect's answer,
  and a rollback gives back exactly the image holding both;
* clients stopped mid-handshake and clients dripping a WRITE's payload, many
  at once: the fence cuts them at once and none of their bytes lands;
* an agent restarted under an :class:`~isc.nbd.NBDLUN` destination, in
  plaintext and over mutual TLS: the reconnect after the protect serves the
  next update;
* an agent replaced at its address by one whose export of the same name has
  another size: the reconnect refuses it, and the update fails for that
  destination alone, leaving the session unmarked with every change tracked;
* an agent replaced by one serving another file of the same size, between the
  identity check and the protect (a file the samples cannot tell), and between
  the protect's answer and the reconnect (an NBDLUN and a reconnecting LUN):
  the destination is never reported CONSISTENT holding anything but the image;
* an agent replaced between a rollback's status and its request: the rollback
  of the other file is refused, and the destination keeps its state;
* a lying agent (a proxy in front of a real one that rewrites its replies):
  it hides the fence, claims a protect and a fence it never made, names
  another file at each status or another image than the one protected; no
  update reports the destination CONSISTENT, and every difference is tracked;
* a bounded stress loop (seeded): writer threads racing each copy, the agent
  SIGKILLed after a protect or mid-copy and started again, copies cancelled
  at a seeded run, rollbacks after failures; every destination reported
  CONSISTENT must equal the source's image at its mark, and every chunk where
  it differs from the source must be tracked (rules 1, 2, 6).

A test that finds a hole in the current code is marked ``xfail(strict=True)``
with the reason, naming the code; none is left: each hole found here is mended
(the commit that mends it names the test). The TLS certificates come from
Debian's openssl (tests/certs.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_agent
import test_remote_hostile
from helpers import Gate, Worker, Writers, assert_no_lost_change, wait_until
from test_agent import HOST, IO, SIZE, WAIT, lun_of, remote_lun
from test_agent_journal import agent_here, write_randomly
from test_nbd import CMD_WRITE, Raw
from test_remote_hostile import (
    Agent,
    G,
    Impostor,
    Listener,
    Replica,
    ask_impostor,
    recorded,
    release,
    secured,
    unchanged_but_the_generation,
)
from test_security_control import secret_file
from test_security_nbd import with_tls

from isc import Destination, DestState
from isc.auth import Credentials, read_line
from isc.nbd import NBDLUN
from isc.nbd.server import FENCE_SECONDS
from isc.remote import Ack, AgentSite, RemoteSite, RequestSite
from isc.session import Session
from isc.update import PeriodicUpdate, UpdateError, check_identities, rollback

SEED = 20261206
source, session, exports = test_agent.source, test_agent.session, test_agent.exports
env, local, replica = (
    test_remote_hostile.env,
    test_remote_hostile.local,
    test_remote_hostile.replica,
)


# -- hostile agents ---------------------------------------------------------------------------
def nested(request: dict) -> bytes:
    """A reply of valid JSON, well under the line limit, nested deeper than a decoder goes."""
    return b"[" * 200_000 + b"]" * 200_000 + b"\n"


def test_a_reply_nested_too_deep_fails_protect_in_one_line_naming_the_agent(local: Path, env):
    before = recorded(local)
    with Impostor(nested) as impostor:
        line = ask_impostor(local, env, impostor, "update", "s")
    assert line.startswith("isc: error: cannot protect local: ")
    assert f"the agent at {impostor.site} answered protect local with something" in line
    unchanged_but_the_generation(local, before, impostor.site)


def test_a_reply_nested_too_deep_to_the_identity_check_is_no_identity():
    dest = Destination(None, name="disk")
    identities = {"disk": "machine:1:2"}
    with Impostor(nested) as impostor:
        site = AgentSite(HOST, impostor.port, timeout=WAIT)
        assert check_identities(site, [dest], identities, {"disk"}) == []
        ack = site.status(dest)
    assert not ack.ok and ack.outcome_unknown and "is not an isc agent's reply" in ack.reason
    assert identities == {"disk": "machine:1:2"} and dest.state is DestState.NEW


# -- between a protect's answer and what isc update records ---------------------------------
KILL_AFTER_PROTECT_ACK = """
if _FAULTS:
    _reconnect = update._reconnect

    def _protected(dests, acks):
        \"\"\"isc update dies once its N-th protect was answered, before anything else.\"\"\"
        _reconnect(dests, acks)
        if any(ack.ok for ack in acks) and _event("kill_after_protect_ack"):
            _die()

    update._reconnect = _protected
"""


def test_isc_update_killed_between_the_protect_ack_and_its_record(replica: Replica):
    hooks = Path(replica.env["PYTHONPATH"].split(os.pathsep)[0]) / "sitecustomize.py"
    hooks.write_text(hooks.read_text() + KILL_AFTER_PROTECT_ACK)
    replica.host_writes(random.Random(SEED + 8))
    replica.arm(kill_after_protect_ack=1)
    assert replica.update().returncode == -signal.SIGKILL
    replica.arm()
    # The agent protects disk, whose image is still the last update's; isc update
    # recorded its copy as begun (so disk reads inconsistent), nothing of the protect.
    assert replica.protected() and replica.check() == "inconsistent"
    done = replica.isc("rollback", "s", "disk")
    assert done.returncode == 0, done.stderr
    assert replica.check() in ("consistent", "inconsistent")
    assert replica.update().returncode == 0
    assert replica.check() == "consistent" and not replica.protected()
    assert replica.export.read_bytes() == replica.source.read_bytes()


# -- a stale unprotect -------------------------------------------------------------------------
def test_an_unprotect_that_lands_late_keeps_the_protection_a_later_update_kept(
    tmp_path: Path, session: Session
):
    directory = tmp_path / "exports"
    directory.mkdir()
    (directory / "disk").write_bytes(bytes(SIZE))
    with agent_here(directory) as (agent, control, uris), NBDLUN(uris["disk"]) as lun:
        dest = Destination(lun, name="disk")
        PeriodicUpdate(session, [dest], AgentSite(HOST, control, timeout=WAIT)).run()
        image = session.source.read(0, SIZE)
        # The first update's unprotect is held on its way (the network, a busy agent):
        # the update gives up on its answer, and the next one keeps the protection.
        late, landed = Gate(), threading.Event()
        unprotect = agent.control.ops["unprotect"]

        def delayed(request: dict) -> dict:
            late()
            try:
                return unprotect(request)
            finally:
                landed.set()

        agent.control.ops["unprotect"] = delayed
        write_randomly(session, random.Random(SEED + 9), 20)
        PeriodicUpdate(session, [dest], AgentSite(HOST, control), timeout=0.3).run()
        late.wait_reached()
        write_randomly(session, random.Random(SEED + 10), 20)
        second = AgentSite(HOST, control, timeout=WAIT)
        with pytest.raises(UpdateError):
            PeriodicUpdate(session, [dest], second, io_size=IO, progress=cancel_at(2)).run()
        late.open()  # the first update's unprotect lands, amid the second's protection
        assert landed.wait(WAIT)
        rollback(session, dest, second, WAIT)
        # Back to the image the second update's protect kept: the one before the first's
        # copy (whose unprotect never came back), every difference from the source tracked.
        assert dest.state is DestState.CONSISTENT
        assert (directory / "disk").read_bytes() == image
        with lun_of(directory / "disk") as held:
            assert_no_lost_change(session, held)


# -- an agent replaced at its address ---------------------------------------------------------
@pytest.fixture(params=["plaintext"])
def remote(request, tmp_path: Path, env) -> Iterator[Agent]:
    """An ``isc agent`` of ``tmp_path/exports`` (one export, ``disk``, zeros) at fixed ports;
    with the parameter "tls", with mutual TLS on its control port and export, and a shared
    secret (its clients: :func:`uri_of`, :func:`site_of`)."""
    directory = tmp_path / "exports"
    directory.mkdir()
    (directory / "disk").write_bytes(bytes(SIZE))
    logs = tmp_path / "logs"
    logs.mkdir()
    options: tuple[str, ...] = ()
    client = None
    if request.param == "tls":
        good, secret = request.getfixturevalue("credentials")["good"], secret_file(tmp_path)
        options = secured(request.getfixturevalue("credentials"), good, secret)
        client = Credentials("client", tls_creds=good, secret_file=secret)
    agent = Agent(directory, env, logs, options)
    agent.client = client  # type: ignore[attr-defined]
    try:
        agent.start()
        yield agent
    finally:
        agent.end()


def uri_of(agent: Agent) -> str:
    """The URI of ``agent``'s export ``disk``, with TLS when the agent requires it."""
    client = agent.client  # type: ignore[attr-defined]
    return agent.uri if client is None else with_tls(agent.uri, client.tls_creds)


def site_of(agent: Agent) -> AgentSite:
    """``agent``'s site, with its clients' credentials when it requires them."""
    client = agent.client  # type: ignore[attr-defined]
    return AgentSite(HOST, agent.control, timeout=WAIT, credentials=client)


def in_place(agent: Agent, content: bytes) -> Agent:
    """Kill ``agent`` and start another at its address, whose ``disk`` is another file,
    holding ``content``."""
    agent.end()
    directory = Path(tempfile.mkdtemp(prefix="elsewhere-", dir=agent.directory.parent))
    (directory / "disk").write_bytes(content)
    other = agent.in_its_place(directory)
    other.start()
    return other


def first_update(
    session: Session, agent: Agent, reconnecting: bool = False
) -> tuple[Destination, PeriodicUpdate]:
    """``disk`` of ``agent`` as an NBDLUN destination of ``session`` (``reconnecting``: as
    isc's commands open it, :class:`~isc.lun.ReconnectingLUN`), copied in full."""
    uri = uri_of(agent)
    lun = remote_lun(uri) if reconnecting else NBDLUN(uri, timeout=WAIT)
    dest = Destination(lun, name="disk")
    update = PeriodicUpdate(session, [dest], site_of(agent), timeout=WAIT)
    update.run()
    assert dest.state is DestState.CONSISTENT
    return dest, update


def assert_honest(session: Session, dest: Destination, export: Path, image: bytes) -> None:
    """Rules 2 and 6 for ``dest``, whose export's file is ``export``: unmarked, every
    difference tracked, and CONSISTENT only holding ``image``."""
    assert not session.bitmap.marked
    with lun_of(export) as lun:
        assert_no_lost_change(session, lun)
    if dest.state is DestState.CONSISTENT:
        assert export.read_bytes() == image, "disk reads consistent but is not the image"


@pytest.mark.parametrize("remote", ["plaintext", "tls"], indirect=True)
def test_an_nbdlun_destination_reconnects_after_its_agent_restarted(
    session: Session, remote: Agent
):
    dest, update = first_update(session, remote)
    with dest.lun:
        remote.end()
        remote.start()
        write_randomly(session, random.Random(SEED), 20)
        image = session.source.read(0, SIZE)
        update.run()
        assert dest.state is DestState.CONSISTENT
        assert_honest(session, dest, remote.directory / "disk", image)


def test_a_write_on_a_connection_opened_during_the_fence_is_in_the_protected_image(
    tmp_path: Path, remote: Agent
):
    """The fence waits for a write of a connection it cut (held at the agent); meanwhile a
    client connects anew and writes. Both land before the protect's answer: the image it
    protects holds both, and a rollback after later writes gives back exactly that."""
    rng = random.Random(SEED + 6)
    fifo, fencing = tmp_path / "held", tmp_path / "fencing"
    os.mkfifo(fifo)
    test_remote_hostile.arm(remote.env, hold_first_write=str(fifo), fence_started=str(fencing))
    disk, site = Destination(None, name="disk"), site_of(remote)
    with NBDLUN(uri_of(remote), timeout=WAIT) as first:
        held = Worker(lambda: first.write(0, rng.randbytes(4 * G)))  # the pool's: fenced
        wait_until(Path(f"{fifo}.reached").exists, remote.proc, "the write held", remote.log)
        protect = Worker(lambda: site.protect(disk))
        wait_until(fencing.exists, remote.proc, "the agent fencing", remote.log)
        with NBDLUN(uri_of(remote), timeout=WAIT) as newcomer:
            newcomer.write(2 * G, rng.randbytes(4 * G))  # served at once, over the held one
        release(fifo)
        ack = protect.finish()
        assert ack.ok and ack.fenced and not ack.kept, ack
        with pytest.raises(OSError):  # landed, but its answer was cut off with the connection
            held.finish()
    image = (remote.directory / "disk").read_bytes()
    assert image[: 2 * G] != bytes(2 * G) and image[2 * G : 6 * G] != bytes(4 * G)
    with NBDLUN(uri_of(remote), timeout=WAIT) as later:
        later.write(0, rng.randbytes(8 * G))
    assert (remote.directory / "disk").read_bytes() != image
    assert site.rollback(disk).ok
    assert (remote.directory / "disk").read_bytes() == image


def test_half_open_and_slow_clients_neither_hold_a_fence_open_nor_write(remote: Agent):
    """Clients that stop mid-handshake, and clients dripping a WRITE's payload (a slow
    loris), many at once: the protect's fence cuts them all at once, none of their bytes
    is written, and a client after the answer is served."""
    export = remote.directory / "disk"
    before = export.read_bytes()
    site, disk = site_of(remote), Destination(None, name="disk")
    with contextlib.ExitStack() as opened:
        clients = []
        for k in range(8):
            raw = Raw(opened.enter_context(socket.create_connection((HOST, remote.nbd), WAIT)))
            if k % 2:  # in transmission, half of a 256 KiB WRITE's payload sent
                raw.go()
                raw.request(CMD_WRITE, k * G, 16 * G, payload=bytes([k]) * (8 * G))
            else:  # greeted, and silent since
                raw.recv(18)
            clients.append(raw)
        started = time.monotonic()
        ack = site.protect(disk)
        took = time.monotonic() - started
        assert ack.ok and ack.fenced and took < FENCE_SECONDS / 2, (ack, took)
        assert all(raw.dropped() for raw in clients)
    assert export.read_bytes() == before
    with NBDLUN(uri_of(remote), timeout=WAIT) as after:
        after.write(0, b"after")
    status = site.status(disk)
    assert status.info["saved_chunks"] == 1 and export.read_bytes()[:5] == b"after"


def test_an_export_of_another_size_at_the_reconnect_fails_that_destination_alone(
    session: Session, remote: Agent
):
    dest, update = first_update(session, remote)
    image, epoch = session.source.read(0, SIZE), dest.epoch
    try:
        other = in_place(remote, bytes(2 * SIZE))
        # A site that knows no file of the agent yet (no identity check): the protect
        # passes, and the reconnect is what meets the other export.
        update.site = site_of(other)
        try:
            write_randomly(session, random.Random(SEED), 20)
            with pytest.raises(UpdateError) as failed:
                update.run()
            assert "disk" in str(failed.value)
            # Nothing reached either file: disk holds the image of its last copy.
            assert dest.state is not DestState.CONSISTENT or dest.epoch == epoch
            assert other.directory.joinpath("disk").read_bytes() == bytes(2 * SIZE)
            assert_honest(session, dest, remote.directory / "disk", image)
        finally:
            other.end()
    finally:
        dest.lun.close()


def test_another_file_behind_the_agent_between_the_identity_check_and_the_protect(
    session: Session, remote: Agent
):
    dest, update = first_update(session, remote)
    epoch = dest.epoch
    with dest.lun:
        identities: dict[str, str] = {}
        assert check_identities(update.site, update.destinations, identities, {"disk"}) == []
        # Another file that differs from the export in one chunk no sample reads, so the
        # samples cannot tell it (an older copy of the volume, put back meanwhile).
        sampled = {chunk for chunk, _ in dest.samples}
        stale, fresh = [c for c in range(SIZE // G) if c not in sampled][:2]
        content = bytearray((remote.directory / "disk").read_bytes())
        content[stale * G : (stale + 1) * G] = random.Random(SEED).randbytes(G)
        other = in_place(remote, bytes(content))
        try:
            session.write(fresh * G, random.Random(SEED + 1).randbytes(G))
            image = session.source.read(0, SIZE)
            with pytest.raises(UpdateError) as failed:
                update.run()
            assert "serves another file as disk" in str(failed.value)
            # Nothing was copied: disk keeps the image of its last copy, in the first file.
            assert dest.epoch == epoch and not session.bitmap.marked
            assert other.directory.joinpath("disk").read_bytes() == content
            # The next update's identity check finds it out: a full copy.
            (found,) = check_identities(update.site, update.destinations, identities, {"disk"})
            assert "disk is not the export it was" in found and dest.state is DestState.NEW
            update.run()
            assert_honest(session, dest, other.directory / "disk", image)
            assert dest.state is DestState.CONSISTENT
        finally:
            other.end()


class After(RequestSite):
    """``site``, but ``then()`` runs once its first ``request`` ("protect", "status" ...)
    answered, before the caller goes on."""

    def __init__(self, site: RemoteSite, request: str, then: Callable[[], object]) -> None:
        self.site, self.request, self.then = site, request, then

    def _request(self, op: str, dest: Destination, timeout: float | None) -> Ack:
        ack = getattr(self.site, op)(dest, timeout)
        if op == self.request:
            then, self.then = self.then, lambda: None
            then()
        return ack


@pytest.mark.parametrize("reconnecting", [False, True], ids=["NBDLUN", "ReconnectingLUN"])
def test_another_file_behind_the_agent_between_the_protect_and_the_reconnect(
    session: Session, remote: Agent, reconnecting: bool
):
    dest, update = first_update(session, remote, reconnecting)
    agents: list[Agent] = []
    update.site = After(
        update.site, "protect", lambda: agents.append(in_place(remote, bytes(SIZE)))
    )
    with dest.lun:
        try:
            write_randomly(session, random.Random(SEED + 2), 20)
            image = session.source.read(0, SIZE)
            with pytest.raises(UpdateError):
                update.run()
            (other,) = agents
            assert dest.state is not DestState.CONSISTENT
            # What the other agent's file got is tracked: the rest is the source's.
            assert_honest(session, dest, other.directory / "disk", image)
        finally:
            for agent in agents:
                agent.end()


def test_another_file_behind_the_agent_between_the_rollbacks_status_and_its_request(
    session: Session, remote: Agent
):
    dest, update = first_update(session, remote)
    with dest.lun:
        write_randomly(session, random.Random(SEED + 7), 20)
        update.copy_options["progress"] = cancel_at(1)
        with pytest.raises(UpdateError):
            update.run()  # disk stays protected, inconsistent
        assert dest.state is DestState.INCONSISTENT
        agents: list[Agent] = []

        def replace() -> None:
            """Another agent at the address, whose disk is protected and written since."""
            other = in_place(remote, bytes(SIZE))
            agents.append(other)
            assert site_of(other).protect(Destination(None, name="disk")).ok
            with NBDLUN(uri_of(other), timeout=WAIT) as lun:
                lun.write(0, b"written since")

        try:
            with pytest.raises(UpdateError) as failed:
                rollback(session, dest, After(update.site, "status", replace))
            assert "serves another file as disk" in str(failed.value)
            assert dest.state is DestState.INCONSISTENT
        finally:
            for agent in agents:
                agent.end()


class Liar(Listener):
    """A control port in front of ``agent``'s: it forwards each request and answers with
    ``lie(request, reply)`` (the agent's reply, as a dict, altered), or without asking
    the agent when ``lie`` is given no reply (``reply`` None: ``forward`` said no)."""

    def __init__(
        self,
        agent: Agent,
        lie: Callable[[dict, dict | None], dict],
        forward: Callable[[dict], bool] = lambda request: True,
    ) -> None:
        self.agent, self.lie, self.forward = agent, lie, forward
        super().__init__()
        self.site = AgentSite(HOST, self.port, timeout=WAIT)

    def handle(self, conn: socket.socket) -> None:
        with conn.makefile("rb") as lines:
            line = lines.readline()
        request = json.loads(line)
        reply = None
        if self.forward(request):
            with socket.create_connection((HOST, self.agent.control), WAIT) as agent:
                agent.sendall(line)
                reply = json.loads(read_line(agent, None, 1 << 20))
        conn.sendall(json.dumps(self.lie(request, reply)).encode() + b"\n")


def hides_the_fence(request: dict, reply: dict | None) -> dict:
    assert reply is not None
    reply.pop("fenced", None)
    return reply


def fences_nothing(request: dict, reply: dict | None) -> dict:
    """Says a protect was done, fenced, of a new image: it never reached the agent."""
    if reply is None:
        image = random.Random(request["id"]).randbytes(8).hex()
        return {"id": request["id"], "ok": True, "fenced": True, "info": {"image": image}}
    return reply


def new_identities(request: dict, reply: dict | None) -> dict:
    """Names another file in every status."""
    assert reply is not None
    if request["op"] == "status":
        reply["info"]["identity"] = f"elsewhere:{request['id']}"
    return reply


def another_image(request: dict, reply: dict | None) -> dict:
    """Names another image than the one protected."""
    assert reply is not None
    if request["op"] == "protect":
        reply["info"]["image"] = f"{request['id']:016x}"
    return reply


@pytest.mark.parametrize(
    ("lie", "forward"),
    [
        (hides_the_fence, lambda request: True),
        (fences_nothing, lambda request: request["op"] != "protect"),
        (new_identities, lambda request: True),
        (another_image, lambda request: True),
    ],
    ids=["hides the fence", "fences nothing", "new identities", "another image"],
)
def test_an_agent_that_lies_in_its_replies_gets_no_destination_reported_falsely_consistent(
    session: Session, remote: Agent, lie, forward
):
    rng = random.Random(SEED + 5)
    export = remote.directory / "disk"
    identities: dict[str, str] = {}
    with Liar(remote, lie, forward) as liar, NBDLUN(remote.uri, timeout=WAIT) as lun:
        dest = Destination(lun, name="disk")
        update = PeriodicUpdate(session, [dest], liar.site, timeout=WAIT, io_size=IO)
        for _ in range(3):
            write_randomly(session, rng, 20)
            check_identities(update.site, update.destinations, identities, {"disk"})
            # Each lie fails the update or leaves disk inconsistent: never a false
            # CONSISTENT (a connection cut unseen, an image never protected or not
            # the one unprotected, a file that is never the one protected).
            with contextlib.suppress(UpdateError):
                update.run()
            assert dest.state is not DestState.CONSISTENT and not session.bitmap.marked
            if dest.in_step(session):
                with lun_of(export) as held:
                    assert_no_lost_change(session, held)


# -- stress -----------------------------------------------------------------------------------
ROUNDS = 18
"""Updates of the stress test; each meets one seeded fault, or none."""


class Cancelled(Exception):
    """A copy cancelled by its progress hook."""


def cancel_at(run: int) -> Callable[[int, int], None]:
    """A progress hook that cancels the copy at its ``run``-th run."""
    runs = iter(range(run - 1, -1, -1))

    def progress(done: int, total: int) -> None:
        if next(runs, 0) == 0:
            raise Cancelled(f"cancelled at run {run}")

    return progress


def alive(agent: Agent) -> None:
    """Start ``agent`` again when a fault point killed it."""
    test_remote_hostile.arm(agent.env)
    if not test_remote_hostile.answers(agent.control):
        agent.end()
        agent.start()


def test_writers_agent_kills_cancels_and_rollbacks_leave_no_false_consistent(
    session: Session, remote: Agent
):
    rng = random.Random(SEED + 3)
    export = remote.directory / "disk"
    dest = Destination(NBDLUN(uri_of(remote), timeout=WAIT), name="disk")
    site = site_of(remote)
    consistent = None  # the image of the last update that succeeded
    faults = {"none": 0, "kill_after_protect": 0, "kill_after_saves": 0, "cancel": 0}

    def write(writer: int, seq: int, rng: random.Random) -> None:
        length = rng.randrange(1, 3 * G)
        session.write(rng.randrange(0, SIZE - length + 1), rng.randbytes(length))

    with dest.lun, Writers(write, 3, SEED + 4) as writers:
        for _ in range(ROUNDS):
            alive(remote)
            writers.allow(rng.randrange(5, 30))  # before the mark
            writers.settle()
            image = session.source.read(0, SIZE)
            fault = rng.choice(sorted(faults))
            faults[fault] += 1
            if fault == "kill_after_protect":  # each update protects once
                test_remote_hostile.arm(remote.env, kill_after_protect=1)
            elif fault == "kill_after_saves":
                test_remote_hostile.arm(remote.env, kill_after_saves=rng.randint(1, 3))
            hook = cancel_at(rng.randint(1, 6)) if fault == "cancel" else None
            update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=IO, progress=hook)
            # Host writes race the copy, from the protect on (after the mark).
            update.site = After(site, "protect", functools.partial(writers.allow, 20))
            try:
                update.run()
                consistent = image
            except UpdateError:
                writers.settle()
                alive(remote)
                if rng.random() < 0.5:
                    with contextlib.suppress(UpdateError):
                        rollback(session, dest, site, WAIT)
            writers.settle()
            assert not session.bitmap.marked
            if dest.state is DestState.CONSISTENT:
                assert export.read_bytes() == consistent, "disk reads consistent but is not"
            if dest.in_step(session):
                with lun_of(export) as lun:
                    assert_no_lost_change(session, lun)
        assert all(faults.values()), faults  # the seed meets every fault
        alive(remote)
        PeriodicUpdate(session, [dest], site, timeout=WAIT).run()
        assert dest.state is DestState.CONSISTENT
        assert export.read_bytes() == session.source.read(0, SIZE)
