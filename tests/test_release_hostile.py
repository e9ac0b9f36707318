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
from test_agent import SIZE, WAIT
from test_cli import isc_run
from test_holder import exports, holder_of, remote, session_id, states, two_sessions
from test_remote_hostile import Agent

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


@pytest.mark.parametrize(
    "b_stays",
    [
        pytest.param(
            False,
            marks=pytest.mark.xfail(strict=True, reason="a hold let go while idle is trusted"),
        ),
        True,
    ],
)
def test_a_hold_released_while_idle_is_not_trusted_at_the_next_update(
    tmp_path: Path, exports: Path, remote: Agent, b_stays: bool
) -> None:
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
