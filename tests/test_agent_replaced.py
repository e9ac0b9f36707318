"""An agent's export whose file was replaced at its path while the agent serves it.

``isc agent DIR`` opens each file of DIR at its start and serves that descriptor
until it exits. A file renamed over ``DIR/NAME``, or ``NAME`` renamed away or
deleted, leaves it serving a file no name reaches (a deleted one is gone once the
agent exits), while the file an operator reads at ``DIR/NAME`` is another one. A
destination there must not be reported consistent (rules 6 and 12): the agent
refuses the requests an update relies on, naming the fix (restart it), and the
update fails for that destination alone (rule 13). After a restart the agent
serves the file now at that name, another identity: the next update gives it a
full copy. The agents run as processes (:func:`test_agent.agent`), the sessions
through the ``isc`` command, but for the checks of the agent's replies (in
process) and of a file replaced midway through an update (its copy's first
write replaces it, :class:`~isc.update.PeriodicUpdate` in this process).
"""

from __future__ import annotations

import errno
import json
import os
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import test_agent
from helpers import free_ports
from test_agent import (
    HOST,
    IO,
    JOURNAL,
    KIB,
    SEED,
    SIZE,
    WAIT,
    Daemon,
    ReconnectingHook,
    agent,
    cli_session,
    daemon,
    protected,
    remote_lun,
    site_of,
    states,
)
from test_cli import error_line, isc_run

from isc import Destination, DestState, FileLUN, Session
from isc.agent import HOLDER_SUFFIX, STATE_DIR, Agent
from isc.nbd import NBDLUN
from isc.remote import session_holder
from isc.store import open_session
from isc.update import PeriodicUpdate, UpdateError

HOLDER = session_holder(0x1234, "s")
RESTART = "restart the agent, so that it exports the file now at that name"


source, exports = test_agent.source, test_agent.exports
"""Its fixtures: a source file of SIZE seeded random bytes; an agent's directory of two
zero-filled exports of SIZE bytes, "disk" and "spare"."""

OTHER = random.Random(SEED + 1).randbytes(SIZE)
"""The bytes of the file renamed over an export: other than the source's in every chunk."""


def renamed_over(path: Path) -> None:
    """``mv other.img path``: another file takes the name."""
    other = path.parent.parent / "other.img"
    other.write_bytes(OTHER)
    os.replace(other, path)


def renamed_away(path: Path) -> None:
    path.rename(path.parent.parent / "moved.img")


def symlinked(path: Path) -> None:
    """The file renamed away and a symlink to it at its name: not the file served either."""
    renamed_away(path)
    path.symlink_to(path.parent.parent / "moved.img")


REPLACED: dict[str, Callable[[Path], None]] = {
    "renamed over": renamed_over,
    "renamed away": renamed_away,
    "deleted": Path.unlink,
    "symlinked": symlinked,
}
ANOTHER = "another file (device "
NOW = {"renamed over": ANOTHER, "renamed away": "missing", "deleted": "missing"}
"""What the refusal says is at the export's path now."""
NOW["symlinked"] = ANOTHER  # lstat's view: the symlink is not the file served


def host_write(tmp_path: Path, offset: int, data: bytes) -> None:
    """A host write to session ``s``'s source, through the session."""
    stored, _ = open_session(tmp_path / "s")
    with stored:
        stored.session.write(offset, data)


def assert_refusal(reason: str, path: Path, now: str) -> None:
    """``reason`` is the one line naming ``path``, what is there ``now`` and the fix."""
    assert "\n" not in reason
    assert f"{path} is {now}" in reason
    assert "not the file the agent serves as export disk (opened at its start)" in reason
    assert RESTART in reason


# -- the agent's replies ----------------------------------------------------------------------
@pytest.fixture
def served(exports: Path) -> Iterator[Agent]:
    """An agent of ``exports`` in this process, whose export "disk" HOLDER holds, protected."""
    served = Agent(exports)
    try:
        ops = served.control.ops
        assert ops["claim"]({"export": "disk", "holder": HOLDER})["ok"]
        assert ops["protect"]({"export": "disk", "holder": HOLDER})["ok"]
        yield served
    finally:
        served.close()


@pytest.mark.parametrize("how", REPLACED)
def test_the_agent_refuses_every_request_but_release_about_an_export_replaced_at_its_path(
    exports: Path, served: Agent, how: str
):
    ops = served.control.ops
    holder_record = exports / STATE_DIR / f"disk{HOLDER_SUFFIX}"
    journal = (exports / JOURNAL).read_bytes()
    REPLACED[how](exports / "disk")
    for op in ("status", "protect", "rollback", "claim", "unprotect"):
        reply = ops[op]({"export": "disk", "holder": HOLDER})
        assert reply["ok"] is False and reply["replaced"] is True, op
        assert_refusal(reply["reason"], exports / "disk", NOW[how])
    assert (exports / JOURNAL).read_bytes() == journal  # the unprotect changed nothing
    assert ops["status"]({"export": "spare"})["ok"]  # the other export is served as before
    # Release changes no data, only who holds the name: a session removed lets it go.
    assert ops["release"]({"export": "disk", "holder": HOLDER}) == {
        "ok": True,
        "info": {"holder": HOLDER},
    }
    assert not holder_record.exists()


def test_a_file_put_back_at_its_name_is_served_again(exports: Path, served: Agent):
    ops = served.control.ops
    before = ops["status"]({"export": "disk"})
    renamed_away(exports / "disk")
    assert ops["status"]({"export": "disk"})["replaced"] is True
    (exports.parent / "moved.img").rename(exports / "disk")
    assert ops["status"]({"export": "disk"}) == before
    assert ops["unprotect"]({"export": "disk", "holder": HOLDER})["ok"]


def test_a_file_recreated_at_the_inode_of_the_one_served_is_another(exports: Path):
    """Device and inode alone would not tell it: the agent keeps the file it serves open,
    so its inode number is not given again on a local file system, but a file system that
    gives it (a network one) makes the birth time the judge."""
    served = Agent(exports)
    try:
        export = served.exports["disk"]
        if "btime_ns" not in export._birth:
            pytest.skip(f"the file system of {exports} keeps no birth time")
        # The file at the name as a recreated one would be: its birth time is another.
        export._birth = {**export._birth, "btime_ns": export._birth["btime_ns"] + 1}
        reply = served.control.ops["status"]({"export": "disk"})
        assert reply["replaced"] is True
        assert_refusal(reply["reason"], exports / "disk", "another file (its birth time differs)")
    finally:
        served.close()


# -- through the isc command ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["renamed over", "deleted"])  # the others: the agent alone, above
def test_an_update_does_not_report_an_export_replaced_at_its_path_consistent(
    tmp_path: Path, source: Path, exports: Path, how: str
):
    cli_session(tmp_path, source)
    with agent(exports, tmp_path / "agent.log") as remote:
        site = site_of(remote)
        isc_run("add-dest", "s", remote.exports["disk"], "--site", site, cwd=tmp_path)
        isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path)
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}

        REPLACED[how](exports / "disk")
        host_write(tmp_path, 100 * KIB, b"written after the replacement" * 100)
        done = isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path, check=1)
        checked, failed = done.stderr.splitlines()
        assert checked.startswith(f"isc: the agent at {site}: ")
        assert checked.endswith(f"{RESTART}; its next copy is a full one")
        assert failed.startswith(f"isc: error: update failed: s: the agent at {site}: ")
        assert_refusal(failed, exports / "disk", NOW[how])
        # The other destination got its copy; this one is out of step.
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("new", site)}
        assert (tmp_path / "local.img").read_bytes() == source.read_bytes()

        # No new NBD connection reaches the file served either.
        with pytest.raises(OSError) as refused:
            NBDLUN(remote.exports["disk"], timeout=WAIT)
        assert refused.value.errno == errno.ENOENT
        assert_refusal(str(refused.value), exports / "disk", NOW[how])


def test_copy_leaves_a_replaced_export_out_and_rollback_changes_nothing(
    tmp_path: Path, source: Path, exports: Path
):
    cli_session(tmp_path, source)
    with agent(exports, tmp_path / "agent.log") as remote:
        site = site_of(remote)
        isc_run("add-dest", "s", remote.exports["disk"], "--site", site, cwd=tmp_path)
        isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path)
        renamed_over(exports / "disk")

        done = isc_run("rollback", "s", "disk", "--timeout", str(WAIT), cwd=tmp_path, check=1)
        line = error_line(done)
        assert line.startswith(f"isc: error: rollback of disk failed: the agent at {site}: ")
        assert line.endswith(f"{RESTART}; nothing was changed")
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}

        host_write(tmp_path, 0, b"written after the replacement")
        done = isc_run("copy", "s", "--full", "--json", "--timeout", str(WAIT), cwd=tmp_path)
        assert json.loads(done.stdout)["outcomes"] == {"local": "ok"}
        assert done.stderr.endswith(f"{RESTART}; its next copy is a full one\n")
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("new", site)}
        assert (tmp_path / "local.img").read_bytes() == source.read_bytes()
        assert (exports / "disk").read_bytes() == OTHER


def test_after_a_restart_the_file_at_the_name_gets_a_full_copy(
    tmp_path: Path, source: Path, exports: Path
):
    control, nbd = free_ports(2)
    (exports / "spare").unlink()  # "disk" alone, at the one NBD port asked for

    def started(log: str) -> AbstractContextManager[Daemon]:
        args = ("--listen", f"{HOST}:{control}", "--nbd-port", str(nbd), "--dir", str(exports))
        return daemon(tmp_path / log, "agent", *args)

    cli_session(tmp_path, source)
    site = f"{HOST}:{control}"
    with started("agent.log") as remote:
        isc_run("add-dest", "s", remote.exports["disk"], "--site", site, cwd=tmp_path)
        isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path)
        renamed_over(exports / "disk")
        host_write(tmp_path, 100 * KIB, b"written after the replacement" * 100)
        isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path, check=1)
        remote.stop()
    with started("agent-again.log"):
        done = isc_run("update", "s", "--json", "--timeout", str(WAIT), cwd=tmp_path)
        assert json.loads(done.stdout)["outcomes"] == {"local": "ok", "disk": "ok"}
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}
        # Every chunk of the file now at the name was written: it held other bytes in each.
        assert (exports / "disk").read_bytes() == source.read_bytes()
        done = isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path)
        assert done.stderr == ""  # the identity recorded is the new file's: no line again


# -- a file replaced during an update ---------------------------------------------------------
@pytest.mark.parametrize("how", ["renamed over", "deleted"])
@pytest.mark.parametrize("when", ["before its protect", "at its first write"])
def test_a_file_replaced_during_an_update_fails_it_for_that_destination_alone(
    tmp_path: Path, source: Path, exports: Path, how: str, when: str
):
    """Replaced after the identity check (an update in this process asks none), the
    protect is refused and the destination left out. Replaced after the protect, the
    copy's writes go over the connection opened after it, to the file the agent serves
    (no name reaches it): the unprotect is refused. Either way the destination is out
    of step, and the other one is consistent."""
    with FileLUN(source) as lun, agent(exports, tmp_path / "agent.log") as remote:
        session = Session(lun, 16 * KIB, name="source")
        site = remote.site()
        hook = ReconnectingHook(remote_lun(remote.exports["disk"]))
        disk = Destination(hook, name="disk")
        spare = Destination(remote_lun(remote.exports["spare"]), name="spare")
        update = PeriodicUpdate(session, [disk, spare], site, timeout=WAIT, io_size=IO)
        update.run()
        session.write(0, b"written before the update" * 1000)
        before = hook.writes
        if when == "before its protect":
            REPLACED[how](exports / "disk")
        else:
            hook.before_write = lambda n, *_: n == before + 1 and REPLACED[how](exports / "disk")
        with pytest.raises(UpdateError) as failed:
            update.run()
        assert str(failed.value).startswith("update failed: source: the agent at ")
        assert_refusal(str(failed.value), exports / "disk", NOW[how])
        assert (hook.writes > before) is (when == "at its first write")
        assert disk.state is DestState.NEW and not disk.in_step(session)
        assert spare.state is DestState.CONSISTENT
        assert (exports / "spare").read_bytes() == source.read_bytes()
        assert not protected(site, spare)
        if how == "renamed over":
            assert (exports / "disk").read_bytes() == OTHER  # the file there got nothing
        hook.close()
        spare.lun.close()


def test_after_a_restart_the_protection_of_the_file_replaced_midway_is_dropped_by_unprotect(
    tmp_path: Path, source: Path, exports: Path
):
    """The unprotect refused, the protection stays on the file that was served; after the
    restart its journal names another file than the one exported: every protect is
    refused, naming ``isc unprotect``, which drops it; then the file gets a full copy."""
    with FileLUN(source) as lun:
        session = Session(lun, 16 * KIB, name="source")
        with agent(exports, tmp_path / "agent.log") as remote:
            hook = ReconnectingHook(remote_lun(remote.exports["disk"]))
            disk = Destination(hook, name="disk")
            update = PeriodicUpdate(session, [disk], remote.site(), timeout=WAIT, io_size=IO)
            update.run()
            session.write(0, b"written before the update" * 1000)
            before = hook.writes
            hook.before_write = lambda n, *_: n == before + 1 and renamed_over(exports / "disk")
            with pytest.raises(UpdateError, match=RESTART):
                update.run()
            hook.close()
        assert (exports / JOURNAL).exists()
        with agent(exports, tmp_path / "agent-again.log") as remote:
            disk.lun = remote_lun(remote.exports["disk"])
            site = remote.site()
            update = PeriodicUpdate(session, [disk], site, timeout=WAIT, io_size=IO)
            with pytest.raises(UpdateError, match=r"protects another file .* \(isc unprotect "):
                update.run()
            assert site.unprotect(disk).ok
            update.run()
            assert disk.state is DestState.CONSISTENT
            assert (exports / "disk").read_bytes() == source.read_bytes()
            disk.lun.close()
