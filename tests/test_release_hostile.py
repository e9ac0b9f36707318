"""Rule 12 across sites: a hold let go while its session was idle.

Session a holds an ``isc agent`` export and no update runs. The operator's ``isc release``
(forced, believing a gone) lets it go; session b claims it, copies its own source into it,
and is removed again (or stays). a's next update must not trust the export: its protect
takes it again (no session holds it), and without knowing the hold was broken a would
copy only the chunks it tracked and call it consistent while it holds b's data.

Real ``isc agent`` processes on loopback and real ``isc`` commands (:mod:`test_holder`'s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import wait_until
from test_agent import SIZE, WAIT
from test_agent_journal import agent_here
from test_cli import isc_run
from test_holder import (
    HOLDER,
    exports,
    holder_of,
    parking,
    remote,
    session_id,
    started,
    states,
    two_sessions,
)
from test_remote_hostile import Agent

from isc.remote import session_holder

__all__ = ["exports", "remote"]  # fixtures of test_holder's, used here by name
CHUNK = 16 * 1024  # the granularity of test_holder's sessions


def update(tmp_path: Path, session: str, *args: str, check: int = 0):
    """``isc update SESSION --json`` (and ``args``); its outcome."""
    return isc_run(
        "update", session, "--json", "--timeout", str(WAIT), *args, cwd=tmp_path, check=check
    )


def unsampled(tmp_path: Path) -> int:
    """A chunk of session a's "disk" that none of its fingerprint samples reads."""
    meta = json.loads((tmp_path / "a" / "session.json").read_text())
    (disk,) = meta["destinations"]
    sampled = {chunk for chunk, _ in disk["samples"]}
    return next(chunk for chunk in range(SIZE // CHUNK) if chunk not in sampled)


def sent(done) -> int:
    """The bytes an update sent, as its JSON line says."""
    return json.loads(done.stdout)["bytes_sent"]


@pytest.mark.parametrize("b_stays", [False, True])
def test_a_hold_released_while_idle_is_not_trusted_at_the_next_update(
    tmp_path: Path, exports: Path, remote: Agent, b_stays: bool
) -> None:
    """a's update after b's copy (b removed again, or holding the export still) never
    calls the export consistent unless it holds a's source: a's session file says its
    agent's claim named a, and the status now names no holder (or b)."""
    a_source, b_source = two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    update(tmp_path, "a")
    assert states(tmp_path, "a") == {"disk": "consistent"}
    # b's data differs from a's in one chunk a's fingerprint samples do not read (they
    # are a guard against replacement, not a scrub: isc.fingerprint).
    b_source.write_bytes(a_source.read_bytes())
    with b_source.open("r+b") as file:
        file.seek(unsampled(tmp_path) * CHUNK)
        file.write(b"b" * CHUNK)
    isc_run("release", remote.site, "disk", cwd=tmp_path)  # a is idle, believed gone
    isc_run("add-dest", "b", remote.uri, "--site", remote.site, cwd=tmp_path)
    update(tmp_path, "b")
    assert (exports / "disk").read_bytes() == b_source.read_bytes()
    if not b_stays:
        isc_run("remove-dest", "b", "disk", cwd=tmp_path)
    done = update(tmp_path, "a", check=1 if b_stays else 0)
    if states(tmp_path, "a") == {"disk": "consistent"}:
        assert (exports / "disk").read_bytes() == a_source.read_bytes()
    if not b_stays:  # the export was a's to take again: it got a full copy, and says why
        assert "though this session held it" in done.stderr, done.stderr
        assert sent(done) == len(a_source.read_bytes())
        assert holder_of(exports) == session_id(tmp_path, "a")
        assert claimed(tmp_path)  # its protect's answer named a: a later release is found


def strip_claimed(tmp_path: Path) -> None:
    """Session a's file as an isc of before the flag wrote it: no ``claimed``."""
    path = tmp_path / "a" / "session.json"
    meta = json.loads(path.read_text())
    for dest in meta["destinations"]:
        del dest["claimed"]
    path.write_text(json.dumps(meta))


def claimed(tmp_path: Path) -> bool:
    """Whether session a's file says it holds "disk" at its agent."""
    (disk,) = json.loads((tmp_path / "a" / "session.json").read_text())["destinations"]
    return disk["claimed"]


def test_the_first_update_site_of_a_destination_is_no_full_copy_the_next_time(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """No site of its own: ``update --site`` names the agent (held_at) before its protect
    takes the export; no claim was made. The next update sends nothing."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, cwd=tmp_path)
    update(tmp_path, "a", "--site", remote.site)
    done = update(tmp_path, "a", "--site", remote.site)
    assert (sent(done), done.stderr, states(tmp_path, "a")) == (0, "", {"disk": "consistent"})


def test_a_session_file_of_before_the_flag_is_no_full_copy_and_holds_it_again(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    update(tmp_path, "a")
    assert claimed(tmp_path)
    strip_claimed(tmp_path)
    done = update(tmp_path, "a")
    assert (sent(done), done.stderr, states(tmp_path, "a")) == (0, "", {"disk": "consistent"})
    assert claimed(tmp_path)  # its status named a


def test_an_add_dest_whose_claim_answer_named_no_holder_is_no_full_copy(
    tmp_path: Path, exports: Path
) -> None:
    """The agent carried out the claim, its answer did not say so (as one lost would
    not): the next status names the session, whose updates go on as before."""
    two_sessions(tmp_path)
    with agent_here(exports) as (here, control, uris):
        site, carry_out = f"127.0.0.1:{control}", here.control.ops["claim"]
        here.control.ops["claim"] = lambda request: {**carry_out(request), "info": {}}
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        assert not claimed(tmp_path)
        update(tmp_path, "a")
        done = update(tmp_path, "a")
    assert (sent(done), done.stderr, states(tmp_path, "a")) == (0, "", {"disk": "consistent"})
    assert claimed(tmp_path)


def test_a_crash_between_the_protect_that_took_it_and_the_save_is_no_full_copy(
    tmp_path: Path, exports: Path, remote: Agent
) -> None:
    """A session of before the flag whose agent has no holder record (an agent of before
    holders): the update's protect takes the export, SIGKILL at the save after it. The
    next update finds the session holding it, and sends nothing more than a crash does."""
    two_sessions(tmp_path)
    isc_run("add-dest", "a", remote.uri, "--site", remote.site, cwd=tmp_path)
    update(tmp_path, "a")
    remote.stop()
    (exports / HOLDER).unlink()
    strip_claimed(tmp_path)
    remote.start()
    holder = str(exports / HOLDER)
    when = f'os.fspath(dst).endswith("session.json") and os.path.exists({holder!r})'
    env, parked = parking(tmp_path, when)
    killed = started(tmp_path, env, "update", "a", "--timeout", str(WAIT))
    try:
        wait_until(parked.exists, killed, "the save after the protect", remote.log)
    finally:
        killed.kill()
        killed.wait(WAIT)
    assert not claimed(tmp_path) and holder_of(exports) == session_id(tmp_path, "a")
    done = update(tmp_path, "a")
    assert "though this session held it" not in done.stderr
    assert (sent(done), states(tmp_path, "a")) == (0, {"disk": "consistent"})


def test_a_release_during_the_copy_is_named_in_the_updates_failure(
    tmp_path: Path, exports: Path
) -> None:
    """The operator's forced release while a's update copies, another session's claim,
    write and release: a's unprotect is told the whole export undone, and the failure
    says it may be a rollback or the hold let go, not a rollback alone. a's next update
    gives it a full copy."""
    a_source, _ = two_sessions(tmp_path)
    with agent_here(exports) as (here, control, uris):
        export, site = here.exports["disk"], f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        carry_out = here.control.ops["unprotect"]

        def taken_over(request: dict) -> dict:
            assert export.release(None, force=True)["ok"]
            b = session_holder(0xB, "b")
            assert export.claim(b)["ok"]
            export.write(0, b"b" * CHUNK)
            assert export.release(b)["ok"]
            return carry_out(request)

        here.control.ops["unprotect"] = taken_over
        failed = update(tmp_path, "a", check=1)
        here.control.ops["unprotect"] = carry_out
        line = failed.stderr.strip().splitlines()[-1]
        undone = "disk was rolled back by another client of its site, or its hold there let go,"
        assert f"{undone} during the copy" in line, line
        assert states(tmp_path, "a") == {"disk": "inconsistent"}
        done = update(tmp_path, "a")
    assert "though this session held it" in done.stderr, done.stderr
    assert states(tmp_path, "a") == {"disk": "consistent"}
    assert (exports / "disk").read_bytes() == a_source.read_bytes()
