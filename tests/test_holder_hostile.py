"""An agent's export holder (:mod:`isc.agent`) attacked where tests/test_holder.py does not
reach: requests the agent refuses.

Rule 10: a refused request changes nothing. ``protect`` and ``rollback`` take an export no
session holds for the session that asks (a session added before holders claims at its next
update), and they took it *before* their own checks: a rollback of an export that is not
protected, refused as having no image to restore, left the asking session holding the
export (its record written, durably), and the next session's ``add-dest`` was refused as
held by a session that never copied into it.

An agent run in this process (tests/test_agent_journal.py's ``agent_here``), asked through
its control port as ``isc`` asks it (:class:`isc.remote.AgentSite`). A protect refused
because the protected image was lost did the same.

A SIGKILL of ``isc remove-dest`` (a real ``isc agent``, real commands): it saved the
session without the destination, then asked the agent to release the export. Killed in
between, the export stayed held by a session that no longer named it: a second
``remove-dest`` found no such destination, and no command of the session let it go.
It releases first now; killed before or after the release, the session still names the
destination, and ``remove-dest`` asked again lets it go.

A session's name in its holder is for messages, at most 255 characters
(:func:`isc.remote.is_holder`); ``isc create --name`` took a longer one, and the agent
refused every request of that session as naming no holder in a holder's form. It refuses
such a name now, and a session named so before is named by the first 255 in its holder.

The holder record is refused when another user may write it, but not the state directory
it lives in: a ``.isc-agent`` others may write (made before the agent, in a directory
shared with them) lets them unlink the record, which frees the export for a second
session, or put a link at the record's temp name, through which the agent writes.

Two agents of one directory (a second ``isc agent --dir DIR`` at another address, the first
still running) each read the holder record once, at their start, and keep it in memory:
a session's claim through one was unknown to the other, which let a second session claim
the same export, and both copied into it.

``isc destroy`` ended a session without letting its exports go: each stayed held by a
session that no longer existed, with no word of it, and every other session's
``add-dest`` was refused until the operator's ``isc release``. It releases each as
``remove-dest`` does now, and warns of one it could not.

``isc release`` of an export whose holder record was damaged said no session held it:
the agent's reply tells the two apart (a damaged record's holder is null, a free export's
reply names none).

A forced release during the holder's copy, another session's claim, its copy (under a
protect of its own, which keeps the protection, and an unprotect, or an ``isc copy``
without them) and its own release, all before the holder's unprotect: that unprotect
finds the export held by no session and no rollback since its image, so nothing undone,
and the holder's update reported the export consistent over the other session's copy.
At most the unprotect's reply says a later protect kept the protection; nothing says
another session held the export in between.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import wait_until
from test_agent import ENV, ISC, SIZE, WAIT
from test_agent_journal import agent_here
from test_cli import error_line, isc_run
from test_holder import exports, remote  # noqa: F401 (fixtures)
from test_nbd import sparse
from test_remote_hostile import Agent

from isc import Destination
from isc.agent import Agent as ExportAgent
from isc.errors import IscError, ParameterError
from isc.remote import AgentSite, session_holder

A, B = session_holder(0xA, "a"), session_holder(0xB, "b")
DISK = Destination(None, "disk")


def test_a_refused_rollback_takes_no_export(
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    with agent_here(exports) as (_, control, _uris):
        site = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=A)
        refused = site.rollback(DISK, WAIT)
        assert not refused.ok and "not protected" in str(refused.reason), refused
        other = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=B)
        assert other.status(DISK, WAIT).info["holder"] is None
        assert not (exports / ".isc-agent" / "disk.holder").exists()
        assert other.claim(DISK, WAIT).ok


@pytest.mark.parametrize("request_", ["protect", "rollback"])
def test_a_refused_protect_takes_no_export(
    exports: Path,  # noqa: F811 (test_holder's fixture)
    request_: str,
) -> None:
    """A protect, or a rollback, refused because the protected image was lost."""
    state = exports / ".isc-agent"
    state.mkdir(mode=0o700)
    (state / "disk.journal").write_bytes(b"not a journal's header" * 4)
    with agent_here(exports) as (_, control, _uris):
        site = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=A)
        refused = getattr(site, request_)(DISK, WAIT)
        assert not refused.ok and "protected image was lost" in str(refused.reason), refused
        other = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=B)
        assert other.status(DISK, WAIT).info["holder"] is None
        assert not (state / "disk.holder").exists()


PARK = """
import os, threading

import isc.remote, isc.store


def park(self, *args, **kwargs):
    open(os.environ["ISC_TEST_PARKED"], "x").close()
    threading.Event().wait()


if os.environ["ISC_TEST_PARK"] == "release":  # the agent is not asked yet
    isc.remote.AgentSite.release = park
else:  # released, the session not saved without the destination yet
    isc.store.PersistentSession.remove_destination = park
"""
"""A ``sitecustomize`` that parks ``isc remove-dest`` at ``ISC_TEST_PARK``, until SIGKILL."""


@pytest.mark.parametrize("park", ["release", "removal"])
def test_remove_dest_killed_at_any_point_leaves_no_export_held_the_session_does_not_name(
    tmp_path: Path,
    remote: Agent,  # noqa: F811 (test_holder's fixture: an isc agent of "disk")
    park: str,
) -> None:
    """Killed before the agent's release or after it, before the session is saved without
    the destination: the session still names it. Its update claims it again (killed after
    the release), and a remove-dest asked again lets it go."""
    for name in "ab":
        sparse(tmp_path / f"{name}.img", SIZE)
        isc_run("create", name, "--source", f"{name}.img", cwd=tmp_path)
    hooks, parked = tmp_path / "hooks", tmp_path / "parked"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PARK)
    env = {**ENV, "PYTHONPATH": f"{hooks}{os.pathsep}{ENV['PYTHONPATH']}"}
    env["ISC_TEST_PARKED"], env["ISC_TEST_PARK"] = str(parked), park
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    remove = subprocess.Popen(
        [*ISC, "remove-dest", "a", "disk"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(parked.exists, remove, f"the {park}")
    finally:
        remove.kill()
        remove.wait(WAIT)
    listed = json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)
    assert [d["name"] for d in listed["destinations"]] == ["disk"]
    if park == "removal":  # released: a's update takes it again, and b's add-dest is refused
        isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path)
        refused = isc_run(
            "add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path, check=None
        )
        assert refused.returncode == 1 and "held by session a" in refused.stderr, refused.stderr
    done = isc_run("remove-dest", "a", "disk", "--json", cwd=tmp_path)  # asked again
    assert json.loads(done.stdout)["released"] is True, done.stderr
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)


def test_a_name_over_255_characters_is_refused_and_one_made_before_holds_its_export(
    tmp_path: Path,
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    """``isc create --name`` refuses the name in one line, making nothing; a session of
    such a name made before is named by its first 255 characters in its holder (its id
    tells it from any other), and adds and updates an agent's export."""
    sparse(tmp_path / "a.img", SIZE)
    refused = isc_run(
        "create", "a", "--source", "a.img", "--name", "n" * 256, cwd=tmp_path, check=1
    )
    assert "name is 256 characters long: at most 255" in error_line(refused)
    assert not (tmp_path / "a").exists()
    isc_run("create", "a", "--source", "a.img", "--name", "n" * 255, cwd=tmp_path)
    made = tmp_path / "a" / "session.json"
    made.write_text(made.read_text().replace("n" * 255, "n" * 300))  # as made before
    with agent_here(exports) as (_, control, uris):
        site = f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path)
        holder = AgentSite.at(("127.0.0.1", control), timeout=WAIT).status(DISK, WAIT)
        assert holder.info["holder"]["name"] == "n" * 255, holder
    listed = json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)
    assert listed["name"] == "n" * 300, listed


def test_a_state_directory_others_may_write_is_refused(
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    state = exports / ".isc-agent"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(ParameterError, match=f"{state} has mode 0777"):
        ExportAgent(exports).close()
    assert sorted(p.name for p in state.iterdir()) == []


def test_a_second_agent_of_one_directory_lets_no_second_session_claim(
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    with agent_here(exports) as (_, first, _uris):
        try:
            second = ExportAgent(exports)  # started while the first runs, before a's claim
        except IscError:
            return  # refused: one agent to a directory
        try:
            claimed = AgentSite.at(("127.0.0.1", first), timeout=WAIT, holder=A).claim(DISK, WAIT)
            assert claimed.ok, claimed
            assert not second.exports["disk"].claim(B)["ok"]
        finally:
            second.close()


def test_a_second_isc_agent_is_refused_naming_the_first_and_a_killed_ones_restart_serves(
    tmp_path: Path,
    remote: Agent,  # noqa: F811 (test_holder's fixture: an isc agent of "disk")
) -> None:
    assert remote.proc is not None
    args = ["--listen", "127.0.0.1:0", "--nbd-port", "0", "--dir", str(remote.directory)]
    line = error_line(isc_run("agent", *args, cwd=tmp_path, check=1))
    assert f"is served by another isc agent (process {remote.proc.pid})" in line, line
    site = AgentSite.at(("127.0.0.1", remote.control), timeout=WAIT, holder=A)
    assert site.claim(DISK, WAIT).ok  # the first one serves on
    remote.proc.kill()
    assert remote.killed()
    remote.start()  # its lock went with it
    assert site.status(DISK, WAIT).info["holder"] == A


def test_isc_destroy_lets_the_sessions_exports_go(
    tmp_path: Path,
    remote: Agent,  # noqa: F811 (test_holder's fixture: an isc agent of "disk")
) -> None:
    """And an agent that cannot be asked keeps it held: the session goes all the same, a
    warning names the fix, and --json says so."""
    for name in "abc":
        sparse(tmp_path / f"{name}.img", SIZE)
        isc_run("create", name, "--source", f"{name}.img", cwd=tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    done = json.loads(isc_run("destroy", "a", "--json", cwd=tmp_path).stdout)
    assert done["released"] is True and done["still_held"] == [], done
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    remote.stop()
    done = isc_run("destroy", "b", "--json", "--timeout", "2", cwd=tmp_path)
    (warning,) = done.stderr.strip().splitlines()
    assert warning.startswith("isc: warning: disk stays held for b (the agent at "), warning
    assert warning.endswith(f"isc release {remote.site} disk"), warning
    report = json.loads(done.stdout)
    assert report["released"] is False and report["still_held"] == [warning[14:]], report
    assert not (tmp_path / "b").exists()
    remote.start()
    refused = isc_run("add-dest", "c", remote.uri, "--site", remote.site, cwd=tmp_path, check=1)
    assert "held by session b" in refused.stderr, refused.stderr
    isc_run("release", remote.site, "disk", cwd=tmp_path)  # the fix the warning named
    isc_run("add-dest", "c", remote.uri, "--site", remote.site, cwd=tmp_path)
    assert json.loads(isc_run("destroy", "c", "--json", cwd=tmp_path).stdout)["released"]


@pytest.mark.parametrize("protected", [True, False], ids=["b-protects", "b-copies-only"])
def test_another_sessions_copy_between_a_forced_release_and_the_holders_unprotect_is_seen(
    tmp_path: Path,
    exports: Path,  # noqa: F811 (test_holder's fixture)
    protected: bool,
) -> None:
    (tmp_path / "a.img").write_bytes(bytes(range(256)) * (SIZE // 256))
    isc_run("create", "a", "--source", "a.img", "--granularity", "16K", cwd=tmp_path)
    with agent_here(exports) as (here, control, uris):
        disk, site = here.exports["disk"], f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        unprotect = here.control.ops["unprotect"]

        def after_b(request: dict) -> dict:
            # b's whole update and remove-dest, between a's copy and a's unprotect.
            assert disk.release(None, force=True)["ok"] and disk.claim(B)["ok"]
            if protected:
                lease = disk.protect(named=True, holder=B)["info"]["lease"]
            disk.write(0, b"b" * 4096)
            if protected:
                assert disk.unprotect(lease=lease, holder=B)["ok"]
            assert disk.release(B)["ok"]
            return unprotect(request)

        here.control.ops["unprotect"] = after_b
        done = isc_run("update", "a", "--json", "--timeout", str(WAIT), cwd=tmp_path, check=None)
    report = json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)
    (state,) = [d["state"] for d in report["destinations"]]
    if state == "consistent":
        assert (exports / "disk").read_bytes() == (tmp_path / "a.img").read_bytes(), done


@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
@pytest.mark.parametrize("released", [False, True], ids=["held", "released"])
def test_a_release_since_a_protect_undoes_its_image_wholly_and_nothing_else_does(
    exports: Path,  # noqa: F811 (test_holder's fixture)
    released: bool,
    restarted: bool,
) -> None:
    agent = ExportAgent(exports)
    try:
        disk = agent.exports["disk"]
        image = disk.protect(named=True, holder=A)["info"]["image"]
        if released:
            assert disk.release(None, force=True)["ok"]
        if restarted:
            agent.close()
            agent = ExportAgent(exports)
            disk = agent.exports["disk"]
        undone = [[0, SIZE]] if released else []
        assert disk.status(image)["info"]["undone"] == undone
        assert disk.unprotect(image, holder=A).get("extents", []) == undone
    finally:
        agent.close()


def test_updates_with_no_release_between_are_told_nothing_undone(
    tmp_path: Path,
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    (tmp_path / "a.img").write_bytes(bytes(range(256)) * (SIZE // 256))
    isc_run("create", "a", "--source", "a.img", "--granularity", "16K", cwd=tmp_path)
    with agent_here(exports) as (here, control, uris):
        isc_run("add-dest", "a", uris["disk"], "--site", f"127.0.0.1:{control}", cwd=tmp_path)
        unprotect, replies = here.control.ops["unprotect"], []

        def kept(request: dict) -> dict:
            replies.append(unprotect(request))
            return replies[-1]

        here.control.ops["unprotect"] = kept
        sent = []
        for _ in range(3):
            done = isc_run("update", "a", "--json", "--timeout", str(WAIT), cwd=tmp_path)
            sent.append(json.loads(done.stdout)["bytes_sent"])
    assert sent[0] == SIZE and sent[1:] == [0, 0], sent
    assert len(replies) >= 2 and not any(r.get("extents") for r in replies), replies
    report = json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)
    assert [d["state"] for d in report["destinations"]] == ["consistent"]


def test_isc_release_tells_a_damaged_holder_record_from_a_free_export(
    tmp_path: Path,
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    state = exports / ".isc-agent"
    state.mkdir(mode=0o700)
    (state / "disk.holder").write_bytes(b'{"id": "0123')
    (state / "disk.holder").chmod(0o600)
    with agent_here(exports) as (_, control, _uris):
        site = f"127.0.0.1:{control}"
        done = isc_run("release", site, "disk", cwd=tmp_path)
        assert done.stdout.startswith(f"released disk at {site} (its holder record was damaged"), (
            done.stdout
        )
        assert not (state / "disk.holder").exists()
        done = isc_run("release", site, "disk", cwd=tmp_path)
        assert done.stdout.startswith(f"released disk at {site} (no session held it)")
        done = isc_run("release", site, "disk", "--json", cwd=tmp_path)
        assert json.loads(done.stdout) == {
            "site": site,
            "export": "disk",
            "released": None,
            "damaged": False,
        }
        (state / "disk.holder").write_bytes(b"[]")
        (state / "disk.holder").chmod(0o600)
    with agent_here(exports) as (_, control, _uris):
        site = f"127.0.0.1:{control}"
        done = isc_run("release", site, "disk", "--json", cwd=tmp_path)
        assert json.loads(done.stdout)["damaged"] is True, done.stdout
