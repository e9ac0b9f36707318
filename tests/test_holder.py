"""Rule 12 across sites: an agent's export is the destination of one session at a time.

Two sessions (each its own state directory, its own source) given one ``isc agent``
export would each protect it, copy into it and call it consistent while it holds a mix
of both sources. The agent keeps a **holder** per export (:mod:`isc.agent`): the session
that claimed it at ``add-dest`` (or at its first protect), in ``.isc-agent/NAME.holder``.

Real ``isc agent`` processes on loopback, real ``isc`` commands, real SIGKILL; the race
of two ``add-dest`` meets at a barrier inside an agent run in this process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import wait_until
from test_agent import ENV, ISC, SIZE, WAIT, agent, site_of
from test_agent_journal import agent_here
from test_cli import error_line, isc_run
from test_nbd import sparse
from test_remote_hostile import Agent

from isc import Destination, store
from isc.remote import session_holder

SEED = 20261206
HOLDER = Path(".isc-agent") / "disk.holder"  # who holds export "disk", in the agent's directory
PARK = """
import os, threading

_replace = os.replace


def replace(src, dst, *args, **kwargs):
    # The file is written, not renamed yet: park here until SIGKILL.
    if WHEN:
        open(os.environ["ISC_TEST_PARKED"], "x").close()
        threading.Event().wait()
    return _replace(src, dst, *args, **kwargs)


os.replace = replace
"""
"""A ``sitecustomize`` that parks a process's atomic write (WHEN: of which ``src`` to ``dst``)
between its temp file and rename."""


def parking(tmp_path: Path, when: str) -> tuple[dict[str, str], Path]:
    """The environment of a process that parks at its first ``os.replace`` for which
    ``when`` (an expression of ``src`` and ``dst``) holds, until SIGKILL; and the file
    made once it parked."""
    hooks, parked = tmp_path / "hooks", tmp_path / "parked"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PARK.replace("WHEN", when))
    path = f"{hooks}{os.pathsep}{ENV['PYTHONPATH']}"
    return {**ENV, "PYTHONPATH": path, "ISC_TEST_PARKED": str(parked)}, parked


def started(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """``isc ARGS`` started in ``tmp_path`` with ``env`` (:func:`parking`'s), its output
    dropped: a process to park and kill."""
    return subprocess.Popen(
        [*ISC, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """An agent's directory with one zero-filled export of SIZE bytes, "disk"."""
    directory = tmp_path / "exports"
    directory.mkdir()
    sparse(directory / "disk", SIZE)
    return directory


def two_sessions(tmp_path: Path) -> tuple[Path, Path]:
    """Sessions "a" and "b" in ``tmp_path``, each on a source of its own seeded random bytes."""
    made = []
    for k, name in enumerate("ab"):
        source = tmp_path / f"{name}.img"
        source.write_bytes(random.Random(SEED + k).randbytes(SIZE))
        isc_run("create", name, "--source", str(source), "--granularity", "16K", cwd=tmp_path)
        made.append(source)
    return made[0], made[1]


def states(tmp_path: Path, session: str) -> dict[str, str]:
    """Each destination's state, as ``isc status --json`` prints them."""
    report = json.loads(isc_run("status", session, "--json", cwd=tmp_path).stdout)
    return {d["name"]: d["state"] for d in report["destinations"]}


def test_two_sessions_given_one_export_the_second_add_dest_is_refused(
    tmp_path: Path, exports: Path
) -> None:
    """The hole: both sessions added the export, both updates protected it ("already
    protected", kept), copied into it and called it consistent; it held a mix."""
    a_source, _ = two_sessions(tmp_path)
    with agent(exports, tmp_path / "agent.log") as remote:
        site, uri = site_of(remote), remote.exports["disk"]
        isc_run("add-dest", "a", uri, "--site", site, cwd=tmp_path)
        refused = isc_run("add-dest", "b", uri, "--site", site, cwd=tmp_path, check=1)
        line = error_line(refused)
        assert "held by session a" in line and f"isc release {site} disk" in line, line
        assert states(tmp_path, "b") == {}
        done = isc_run("update", "a", "--json", "--timeout", "10", cwd=tmp_path)
        assert json.loads(done.stdout)["outcomes"] == {"disk": "ok"}
        assert states(tmp_path, "a") == {"disk": "consistent"}
        assert (exports / "disk").read_bytes() == a_source.read_bytes()


def session_id(tmp_path: Path, name: str) -> str:
    """Session ``name``'s id as its agents know it (:func:`isc.remote.session_holder`)."""
    meta = json.loads((tmp_path / name / "session.json").read_text())
    return session_holder(meta["id"], name)["id"]


def holder_of(exports: Path) -> str | None:
    """The id of the session the agent's record says holds "disk", None when none."""
    path = exports / HOLDER
    return json.loads(path.read_text())["id"] if path.exists() else None


@pytest.fixture
def remote(tmp_path: Path, exports: Path):
    """An ``isc agent`` of ``exports`` at fixed ports (it can start again at its address)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Agent(exports, ENV, logs)
    started.start()
    try:
        yield started
    finally:
        started.end()


def test_two_add_dest_at_once_one_holds_the_export_and_the_other_is_refused(
    tmp_path: Path, exports: Path
) -> None:
    """Both sessions asked the agent's status (the export free) before either claimed: the
    claims meet at a barrier in the agent, and the first to take the export's lock wins."""
    two_sessions(tmp_path)
    barrier = threading.Barrier(2, timeout=WAIT)
    with agent_here(exports) as (here, control, uris):
        carry_out = here.control.ops["claim"]

        def met(request: dict) -> dict:
            barrier.wait()  # both claims are in the agent before either is carried out
            return carry_out(request)

        here.control.ops["claim"] = met
        site = f"127.0.0.1:{control}"
        adds = [
            subprocess.Popen(
                [*ISC, "add-dest", name, uris["disk"], "--site", site],
                cwd=tmp_path,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in "ab"
        ]
        said = [proc.communicate(timeout=WAIT) for proc in adds]
    codes = sorted(proc.returncode for proc in adds)
    assert codes == [0, 1], said
    winner = "ab"[[proc.returncode for proc in adds].index(0)]
    loser = "ba"["ab".index(winner)]
    assert holder_of(exports) == session_id(tmp_path, winner)
    (line,) = said["ab".index(loser)][1].strip().splitlines()
    assert f"held by session {winner} on " in line and f"isc release {site} disk" in line
    assert states(tmp_path, loser) == {}
    assert states(tmp_path, winner) == {"disk": "new"}


def test_an_agent_killed_between_the_holder_record_and_its_rename_holds_the_old_one(
    tmp_path: Path, exports: Path
) -> None:
    """SIGKILL after the temp file of the new holder record was written and synced, before
    its rename: the agent started again finds the record as it was (no holder), and its
    temp file is never read as one; the next claim holds it."""
    two_sessions(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    env, parked = parking(tmp_path, 'os.fspath(dst).endswith(".holder")')
    parking_agent = Agent(exports, env, logs)
    parking_agent.start()
    try:
        add = subprocess.Popen(
            [*ISC, "add-dest", "a", parking_agent.uri, "--site", parking_agent.site],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(parked.exists, parking_agent.proc, "the holder write", parking_agent.log)
            assert (exports / ".isc-agent" / ".disk.holder.tmp").exists()
            parking_agent.proc.kill()
            assert parking_agent.killed()
            _, err = add.communicate(timeout=WAIT)
        finally:
            if add.poll() is None:
                add.kill()
                add.wait(WAIT)
    finally:
        parking_agent.end()
    assert add.returncode == 1 and "cannot add disk" in err, err
    assert states(tmp_path, "a") == {}
    assert holder_of(exports) is None  # the old record: none, never a torn or empty one

    (tmp_path / "logs-again").mkdir()
    again = Agent(exports, ENV, tmp_path / "logs-again")  # without the hook
    again.start()
    try:
        isc_run("add-dest", "a", again.uri, "--site", again.site, cwd=tmp_path)
        assert holder_of(exports) == session_id(tmp_path, "a")
        refused = isc_run("add-dest", "b", again.uri, "--site", again.site, cwd=tmp_path, check=1)
        assert "held by session a" in error_line(refused)
    finally:
        again.end()


def test_a_session_made_again_under_its_name_is_another_and_isc_release_lets_it_in(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """The holder is the session's id, not its name: a state directory lost and made again
    is another session. The agent keeps the holder across a restart. ``isc release``
    (the operator's, the holding session being gone) lets the export go."""
    a_source, _ = two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    old = session_id(tmp_path, "a")
    shutil.rmtree(tmp_path / "a")  # lost: nothing let its export go (isc destroy does)
    isc_run("create", "a", "--source", str(a_source), "--granularity", "16K", cwd=tmp_path)
    assert session_id(tmp_path, "a") != old
    remote.stop()
    remote.start()
    refused = isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path, check=1)
    line = error_line(refused)
    assert "held by session a on " in line and f"(id {old})" in line, line
    assert f"isc release {remote.site} disk" in line
    assert holder_of(exports) == old

    done = isc_run("release", remote.site, "disk", "--json", cwd=tmp_path)
    assert json.loads(done.stdout)["released"]["id"] == old
    assert holder_of(exports) is None
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert holder_of(exports) == session_id(tmp_path, "a")
    done = isc_run("update", "a", "--json", "--timeout", str(WAIT), cwd=tmp_path)
    assert json.loads(done.stdout)["outcomes"] == {"disk": "ok"}
    assert (exports / "disk").read_bytes() == a_source.read_bytes()


def test_the_losing_sessions_update_fails_that_destination_and_copies_the_others(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """Session a held the export, the operator released it and b added it: a's update
    copies its local destination, fails the export (held by b) and never calls it
    consistent; b's copies stay whole in it."""
    a_source, b_source = two_sessions(tmp_path)
    sparse(tmp_path / "local.img", SIZE)
    isc_run("add-dest", "a", "local.img", "--name", "local", cwd=tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    done = isc_run("update", "a", "--json", "--timeout", str(WAIT), cwd=tmp_path)
    assert json.loads(done.stdout)["outcomes"] == {"local": "ok", "disk": "ok"}
    isc_run("release", remote.site, "disk", cwd=tmp_path)
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    isc_run("update", "b", "--timeout", str(WAIT), cwd=tmp_path)
    assert states(tmp_path, "b") == {"disk": "consistent"}

    failed = isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path, check=1)
    assert "held by session b on " in failed.stderr, failed.stderr
    assert states(tmp_path, "a") == {"local": "consistent", "disk": "new"}
    assert (tmp_path / "local.img").read_bytes() == a_source.read_bytes()
    assert (exports / "disk").read_bytes() == b_source.read_bytes()
    assert holder_of(exports) == session_id(tmp_path, "b")
    again = isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path, check=1)
    assert "held by session b" in again.stderr
    assert states(tmp_path, "a")["disk"] == "new"
    # isc copy protects nothing: the agent's status tells, and the copy leaves it out.
    copied = isc_run("copy", "a", "--full", "--json", "--timeout", str(WAIT), cwd=tmp_path)
    assert "held by session b" in copied.stderr
    assert json.loads(copied.stdout)["outcomes"] == {"local": "ok"}
    assert (exports / "disk").read_bytes() == b_source.read_bytes()


def test_a_damaged_holder_record_is_refused_until_released(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """Rule 10: a holder record the agent cannot read is not taken as "no holder"."""
    a_source, _ = two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    remote.stop()
    (exports / HOLDER).write_bytes(b'{"id": "0123')
    remote.start()
    failed = isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path, check=1)
    assert "disk.holder is damaged" in failed.stderr, failed.stderr
    assert "record at the agent None" not in failed.stderr  # the status names its problem
    assert f"isc release {remote.site} disk" in failed.stderr
    refused = isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path, check=1)
    assert "is damaged" in error_line(refused)
    isc_run("release", remote.site, "disk", cwd=tmp_path)
    assert not (exports / HOLDER).exists()
    isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path)  # a claims it at its protect
    assert holder_of(exports) == session_id(tmp_path, "a")
    assert (exports / "disk").read_bytes() == a_source.read_bytes()


def test_a_request_that_names_no_session_is_refused_on_a_held_export(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """An older client cannot prove it holds the export: its protect, rollback and
    unprotect are refused once a session holds it; its status is answered."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    old = remote.site_of()  # an AgentSite with no holder: an older client's requests
    disk = Destination(None, name="disk")
    for ack in (old.protect(disk), old.rollback(disk), old.unprotect(disk)):
        assert not ack.ok and ack.held and "held by session a" in (ack.reason or "")
    assert old.status(disk).ok
    assert not old.status(disk).info["protected"]
    # Rule 10: a holder that is not one is refused, changing nothing.
    old.holder = {"id": "not hex", "name": "b", "machine": "m"}
    for ack in (old.protect(disk), old.claim(disk), old.release(disk)):
        assert not ack.ok and not ack.held and (ack.reason or "").startswith("a holder is {")
    assert holder_of(exports) == session_id(tmp_path, "a")
    assert not old.status(disk).info["protected"]


def test_remove_dest_releases_the_export_and_warns_when_the_agent_is_down(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
    assert json.loads(done.stdout)["released"] is True
    assert holder_of(exports) is None
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    remote.stop()
    done = isc_run("remove-dest", "b", "disk", "--timeout", "2", cwd=tmp_path)
    (warning,) = done.stderr.strip().splitlines()
    assert warning.startswith("isc: warning: disk stays held for b (the agent at ")
    assert warning.endswith(f"isc release {remote.site} disk")
    assert states(tmp_path, "b") == {}
    assert holder_of(exports) == session_id(tmp_path, "b")


def test_a_session_of_before_holders_claims_its_export_at_its_next_update(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """An agent's state of before this change has no holder records: the session's next
    protect holds the export."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    remote.stop()
    (exports / HOLDER).unlink()
    remote.start()
    isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path)
    assert holder_of(exports) == session_id(tmp_path, "a")


def test_sessions_protected_by_the_site_on_the_command_line_hold_its_exports_too(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """Destinations added without a site of their own, protected by ``update --site``:
    the first session's protect holds the export, the other's update fails for it."""
    a_source, _ = two_sessions(tmp_path)
    for name in "ab":
        isc_run("add-dest", name, remote.uri, cwd=tmp_path)  # no --site: nothing claimed
    assert holder_of(exports) is None
    isc_run("update", "a", "--site", remote.site, "--timeout", str(WAIT), cwd=tmp_path)
    assert holder_of(exports) == session_id(tmp_path, "a")
    update = ["update", "b", "--site", remote.site, "--timeout", str(WAIT)]
    failed = isc_run(*update, cwd=tmp_path, check=1)
    assert "held by session a on " in failed.stderr
    assert states(tmp_path, "b") == {"disk": "new"}
    assert (exports / "disk").read_bytes() == a_source.read_bytes()


def b_takes_it_over(export) -> None:
    """The operator's forced release while session a copies, then session b's claim and a
    write of b's (its copy) into the export: a window of a's update."""
    export.release(None, force=True)
    b = session_holder(0xB, "b")
    assert export.claim(b)["ok"]
    export.write(0, b"b" * 4096)


@pytest.mark.parametrize("window", ["after its protect", "before its unprotect"])
def test_a_forced_release_during_the_holders_update_is_never_reported_consistent(
    tmp_path: Path, exports: Path, window: str
) -> None:
    """Rule 6: ``isc release`` (forced) while the holder's update copies, and another
    session claims the export and writes into it, between a's protect and its copy or
    between its copy and its unprotect: a's unprotect is refused (held by b), and a's
    update fails for the export and never calls it consistent; it gets a full copy once
    it is a's again."""
    two_sessions(tmp_path)
    with agent_here(exports) as (here, control, uris):
        export, site = here.exports["disk"], f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        op = "protect" if window == "after its protect" else "unprotect"
        carry_out = here.control.ops[op]

        def taken_over(request: dict) -> dict:
            if op == "protect":
                reply = carry_out(request)
                b_takes_it_over(export)
                return reply
            b_takes_it_over(export)
            return carry_out(request)

        here.control.ops[op] = taken_over
        failed = isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path, check=1)
    assert "disk at 127.0.0.1:" in failed.stderr and "held by session b" in failed.stderr
    assert states(tmp_path, "a") == {"disk": "new"}
    assert holder_of(exports) == f"{0xB:016x}"


@pytest.mark.parametrize("mode", [0o646, 0o620])
def test_a_holder_record_other_users_may_write_is_not_trusted(
    tmp_path: Path, exports: Path, remote: Agent, mode: int
) -> None:
    """A holder record another user may write (as :func:`isc.auth.others_may_change`
    tells of credentials) may name whoever that user likes: here session b, which never
    claimed the export. The agent refuses it as it does a damaged record, until released."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    remote.stop()
    b = session_holder(int(session_id(tmp_path, "b"), 16), "b")
    (exports / HOLDER).write_text(json.dumps(b))
    (exports / HOLDER).chmod(mode)
    remote.start()
    refused = isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path, check=1)
    line = error_line(refused)
    assert f"disk.holder has mode {mode:04o}" in line and f"isc release {remote.site} disk" in line
    assert states(tmp_path, "b") == {}
    isc_run("release", remote.site, "disk", cwd=tmp_path)
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert holder_of(exports) == session_id(tmp_path, "b")
    assert (exports / HOLDER).stat().st_mode & 0o777 == 0o600


def test_a_holder_record_that_is_a_fifo_is_refused_and_stalls_nothing(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """A FIFO where the holder record goes: opening it to read would wait for a writer
    and stall the agent's start; it is refused as not a regular file, until released."""
    two_sessions(tmp_path)
    remote.stop()
    (exports / HOLDER).parent.mkdir(mode=0o700)
    os.mkfifo(exports / HOLDER, 0o600)
    remote.start()
    refused = isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path, check=1)
    line = error_line(refused)
    assert "disk.holder is not a regular file" in line, line
    assert f"isc release {remote.site} disk" in line
    isc_run("release", remote.site, "disk", cwd=tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert holder_of(exports) == session_id(tmp_path, "a")


def test_add_dest_killed_between_its_claim_and_its_save_is_asked_again_and_holds_it(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """SIGKILL of ``isc add-dest`` after the agent recorded its claim, before the
    session's ``session.json`` was saved, then a restart of the agent: the session lists
    no destination, the agent holds the export for it. A retry of add-dest claims it
    again (the same session id) and adds it; another session is still refused."""
    two_sessions(tmp_path)
    # Park at the save that records the destination (its URI), not at an earlier one.
    env, parked = parking(tmp_path, 'b"nbd://" in open(src, "rb").read()')
    add = started(tmp_path, env, "add-dest", "a", remote.uri, "--site", remote.site)
    try:
        wait_until(parked.exists, add, "the save of session.json", remote.log)
        assert holder_of(exports) == session_id(tmp_path, "a")  # claimed, not yet saved
    finally:
        add.kill()
        add.wait(WAIT)
    remote.stop()
    remote.start()
    assert states(tmp_path, "a") == {}
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert states(tmp_path, "a") == {"disk": "new"}
    assert holder_of(exports) == session_id(tmp_path, "a")
    refused = isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path, check=1)
    assert "held by session a on " in error_line(refused)


@pytest.mark.parametrize("name", ["nosuch", "../disk", "sub/disk", ".isc-agent", ".hidden"])
def test_isc_release_of_no_export_is_one_line_and_changes_nothing(
    tmp_path: Path, exports: Path, remote: Agent, name: str
) -> None:
    """Rule 10: ``isc release`` of a name the agent exports not (none such, a path, the
    agent's state directory, a dotfile it never serves) is refused in one line naming
    it, and the holder and the directory stay as they were."""
    two_sessions(tmp_path)
    (exports / ".hidden").write_bytes(b"")
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    before = sorted(p.name for p in exports.rglob("*"))
    refused = isc_run("release", remote.site, name, cwd=tmp_path, check=1)
    line = error_line(refused)
    assert line.startswith(f"isc: error: release of {name} at {remote.site} failed: ") and (
        f"no export named {name!r}" in line and "nothing changed" in line
    ), line
    assert holder_of(exports) == session_id(tmp_path, "a")
    assert sorted(p.name for p in exports.rglob("*")) == before


def test_a_claim_racing_a_release_leaves_one_holder_or_none(tmp_path: Path, exports: Path) -> None:
    """a's remove-dest (its release) and b's add-dest (its claim) meet at a barrier in the
    agent: whichever takes the export's lock first, b holds the export exactly when its
    add-dest succeeded, and a never holds it again."""
    two_sessions(tmp_path)
    barrier = threading.Barrier(2, timeout=WAIT)
    with agent_here(exports) as (here, control, uris):
        site = f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        for op in ("claim", "release"):
            carry_out = here.control.ops[op]

            def met(request: dict, carry_out=carry_out) -> dict:
                barrier.wait()  # both are in the agent before either is carried out
                return carry_out(request)

            here.control.ops[op] = met
        commands = [["remove-dest", "a", "disk"], ["add-dest", "b", uris["disk"], "--site", site]]
        runs = [
            subprocess.Popen(
                [*ISC, *command],
                cwd=tmp_path,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command in commands
        ]
        said = [proc.communicate(timeout=WAIT) for proc in runs]
    removed, added = runs
    assert removed.returncode == 0 and not said[0][1], said
    assert states(tmp_path, "a") == {}
    if added.returncode == 0:
        assert holder_of(exports) == session_id(tmp_path, "b")
        assert states(tmp_path, "b") == {"disk": "new"}
    else:
        assert "held by session a on " in said[1][1], said
        assert holder_of(exports) is None and states(tmp_path, "b") == {}


def test_a_state_directory_copied_from_another_agent_holds_for_its_session(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """The agent's state directory copied from another agent's: its holder record names a
    session that never asked this agent. Another session is refused naming that one and
    the fix, as for any holder that is gone; isc release lets it in."""
    two_sessions(tmp_path)
    other = tmp_path / "other"
    (other / ".isc-agent").mkdir(parents=True, mode=0o700)
    c = session_holder(0xC, "c")
    (other / HOLDER).write_text(json.dumps(c))
    (other / HOLDER).chmod(0o600)
    remote.stop()
    (exports / ".isc-agent").mkdir(mode=0o700)
    (exports / HOLDER).write_bytes((other / HOLDER).read_bytes())
    (exports / HOLDER).chmod(0o600)
    remote.start()
    refused = isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path, check=1)
    line = error_line(refused)
    assert f"held by session c on {c['machine']} (id {0xC:016x})" in line, line
    assert f"isc release {remote.site} disk" in line
    assert states(tmp_path, "a") == {}
    isc_run("release", remote.site, "disk", cwd=tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert holder_of(exports) == session_id(tmp_path, "a")


def held_by_agent(remote: Agent) -> str | None:
    """The id of the session holding "disk" as the agent's status names it, None when none."""
    holder = remote.site_of().status(Destination(None, name="disk")).info["holder"]
    return None if holder is None else holder["id"]


def test_remove_dest_releases_an_export_held_through_update_site(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """A destination added without a site, protected by ``update --site`` (its protect holds
    the export for the session): remove-dest lets it go there, and another session adds it."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)  # no --site: nothing claimed
    isc_run("update", "a", "--site", remote.site, "--timeout", str(WAIT), cwd=tmp_path)
    assert held_by_agent(remote) == session_id(tmp_path, "a")
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
    assert not done.stderr, done.stderr
    assert json.loads(done.stdout)["released"] is True
    assert held_by_agent(remote) is None
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert held_by_agent(remote) == session_id(tmp_path, "b")


def held_at(tmp_path: Path, session: str) -> list[str]:
    """The agents ``session``'s file names as maybe holding "disk" besides its own site."""
    meta = json.loads((tmp_path / session / "session.json").read_text())
    (disk,) = (d for d in meta["destinations"] if d["name"] == "disk")
    return disk["held_at"]


def test_update_site_killed_after_its_protect_before_its_save_is_released_by_remove_dest(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """SIGKILL of ``isc update --site`` once the agent's protect held the export for the
    session, at the session's next save: the session file named the agent before the
    protect was sent, so remove-dest (after the crash's recovery) releases it there."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
    holder = str(exports / HOLDER)
    # Park at the first write of session.json once the agent holds the export.
    when = f'os.fspath(dst).endswith("session.json") and os.path.exists({holder!r})'
    env, parked = parking(tmp_path, when)
    update = started(tmp_path, env, "update", "a", "--site", remote.site, "--timeout", str(WAIT))
    try:
        wait_until(parked.exists, update, "the save after the protect", remote.log)
        assert held_by_agent(remote) == session_id(tmp_path, "a")
        assert held_at(tmp_path, "a") == [remote.site]  # saved before the protect
    finally:
        update.kill()
        update.wait(WAIT)
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
    assert "not closed cleanly (a crash)" in done.stderr and "warning" not in done.stderr
    assert json.loads(done.stdout)["released"] is True
    assert held_by_agent(remote) is None
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert held_by_agent(remote) == session_id(tmp_path, "b")


def test_remove_dest_of_an_export_held_through_update_site_warns_when_its_agent_is_down(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
    isc_run("update", "a", "--site", remote.site, "--timeout", str(WAIT), cwd=tmp_path)
    remote.stop()
    done = isc_run("remove-dest", "a", "disk", "--json", "--timeout", "2", cwd=tmp_path)
    (warning,) = done.stderr.strip().splitlines()
    assert warning.startswith("isc: warning: disk stays held for a (the agent at "), warning
    assert warning.endswith(f"isc release {remote.site} disk")
    assert json.loads(done.stdout)["released"] is False
    assert states(tmp_path, "a") == {}
    assert holder_of(exports) == session_id(tmp_path, "a")


def test_an_export_protected_through_two_agents_is_released_at_both(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """``update --site`` named another agent than the update before: the session file names
    both (each before its first protect), and remove-dest releases the export at both."""
    two_sessions(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    sparse(other / "disk", SIZE)
    (tmp_path / "other-logs").mkdir()
    second = Agent(other, ENV, tmp_path / "other-logs")
    second.start()
    try:
        isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
        for agent in (remote, second, remote):
            isc_run("update", "a", "--site", agent.site, "--timeout", str(WAIT), cwd=tmp_path)
        assert held_at(tmp_path, "a") == [remote.site, second.site]
        assert holder_of(exports) == holder_of(other) == session_id(tmp_path, "a")
        report = json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)
        assert report["destinations"][0]["held_at"] == [remote.site, second.site]
        text = isc_run("status", "a", cwd=tmp_path).stdout
        assert f"may be held at {remote.site}, {second.site} until remove-dest" in text
        done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
        assert not done.stderr, done.stderr
        assert json.loads(done.stdout)["released"] is True
        assert holder_of(exports) is None and holder_of(other) is None
    finally:
        second.end()


def test_a_session_file_of_before_held_at_opens_and_names_the_agent_at_its_next_update(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """A destination's record written before ``held_at`` existed opens as before (nothing
    held that isc knows: remove-dest says null); its next ``update --site`` names the agent."""
    two_sessions(tmp_path)
    path = tmp_path / "a" / "session.json"

    def without_held_at() -> None:
        meta = json.loads(path.read_text())
        for dest in meta["destinations"]:
            del dest["held_at"]
        path.write_text(json.dumps(meta))

    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
    without_held_at()
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
    assert json.loads(done.stdout)["released"] is None and not done.stderr
    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
    without_held_at()
    assert (
        json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)["destinations"][0][
            "held_at"
        ]
        == []
    )
    isc_run("update", "a", "--site", remote.site, "--timeout", str(WAIT), cwd=tmp_path)
    assert held_at(tmp_path, "a") == [remote.site]
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
    assert json.loads(done.stdout)["released"] is True
    assert holder_of(exports) is None


@pytest.mark.parametrize("value", ["127.0.0.1:1", ["not an agent"], [7], None])
def test_a_held_at_that_is_not_a_list_of_agents_is_refused_and_changes_nothing(
    tmp_path: Path, exports: Path, value: object
) -> None:
    """Rule 10: a damaged ``held_at`` would leave a hold remove-dest does not release."""
    two_sessions(tmp_path)
    sparse(tmp_path / "disk", SIZE)
    isc_run("add-dest", "a", "disk", cwd=tmp_path)
    path = tmp_path / "a" / "session.json"
    meta = json.loads(path.read_text())
    meta["destinations"][0]["held_at"] = value
    path.write_text(json.dumps(meta))
    before = path.read_bytes()
    refused = isc_run("remove-dest", "a", "disk", cwd=tmp_path, check=1)
    assert "is not {name, target, site, held_at," in error_line(refused)
    assert path.read_bytes() == before


def test_a_protect_whose_agent_the_session_cannot_record_is_not_sent(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """Record before acting: when the session file cannot name the agent first (here the
    session is closed), the protect fails without reaching the agent, which holds nothing."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
    stored, _ = store.open_session(tmp_path / "a")
    site = stored.site(remote.site_of())
    (disk,) = stored.destinations
    stored.close()
    ack = site.protect(disk, WAIT)
    assert not ack.ok and not ack.outcome_unknown
    assert ack.reason == f"the agent at {remote.site} was not asked to protect disk: " + (
        "a is closed; open it again to protect"
    )
    assert held_by_agent(remote) is None
    assert held_at(tmp_path, "a") == []


def test_a_rollback_through_site_names_the_agent_before_it_asks(
    tmp_path: Path, exports: Path
) -> None:
    """A session file of before ``held_at``, whose update --site left its export protected
    (and held: the agent refused the unprotect): ``rollback --site`` names the agent before
    its rollback goes out, and remove-dest then releases the export there."""
    two_sessions(tmp_path)
    with agent_here(exports) as (here, control, uris):
        site = f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], cwd=tmp_path)
        here.control.ops["unprotect"] = lambda request: {"ok": False, "reason": "not today"}
        isc_run("update", "a", "--site", site, "--timeout", str(WAIT), cwd=tmp_path)
        assert (
            held_at(tmp_path, "a") == [site] and here.exports["disk"].status()["info"]["protected"]
        )
        path = tmp_path / "a" / "session.json"
        meta = json.loads(path.read_text())
        del meta["destinations"][0]["held_at"]  # as an isc of before wrote it
        path.write_text(json.dumps(meta))
        isc_run("rollback", "a", "disk", "--site", site, "--timeout", str(WAIT), cwd=tmp_path)
        assert held_at(tmp_path, "a") == [site]
        done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
        assert json.loads(done.stdout)["released"] is True and not done.stderr, done.stderr
        assert holder_of(exports) is None


def test_remove_dest_after_another_session_took_the_export_leaves_that_hold_alone(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """a's export released by the operator and claimed by b: a's remove-dest finds nothing of
    a's held there (no warning, no advice to release b's hold), and b keeps it."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    isc_run("release", remote.site, "disk", cwd=tmp_path)
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
    assert not done.stderr, done.stderr
    assert json.loads(done.stdout)["released"] is True
    assert holder_of(exports) == session_id(tmp_path, "b")


def test_isc_serve_every_site_names_its_agent_and_remove_dest_releases_it(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """``isc serve --every --site``'s updates protect through the session's site too: the
    served session's file names the agent, and remove-dest after the server releases it."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
    listen = f"unix:{tmp_path / 'a.sock'}"
    serve = subprocess.Popen(
        [*ISC, "serve", "a", "--listen", listen, "--every", "0.2", "--site", remote.site, "--json"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        assert json.loads(serve.stdout.readline())["ready"]
        first = json.loads(serve.stdout.readline())  # the first update
        assert first["ok"], first
        assert held_at(tmp_path, "a") == [remote.site]
        assert held_by_agent(remote) == session_id(tmp_path, "a")
    finally:
        serve.terminate()
        serve.communicate(timeout=WAIT)
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)
    assert json.loads(done.stdout)["released"] is True and not done.stderr, done.stderr
    assert held_by_agent(remote) is None
