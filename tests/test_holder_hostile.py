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
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_agent import SIZE, WAIT
from test_agent_journal import agent_here
from test_nbd import sparse

from isc import Destination
from isc.remote import AgentSite, session_holder

A, B = session_holder(0xA, "a"), session_holder(0xB, "b")
DISK = Destination(None, "disk")


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """An agent's directory with one zero-filled export of SIZE bytes, "disk"."""
    directory = tmp_path / "exports"
    directory.mkdir()
    sparse(directory / "disk", SIZE)
    return directory


@pytest.mark.xfail(
    strict=True,
    reason="a rollback refused as not protected takes the export for its session first",
)
def test_a_refused_rollback_takes_no_export(exports: Path) -> None:
    with agent_here(exports) as (_, control, _uris):
        site = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=A)
        refused = site.rollback(DISK, WAIT)
        assert not refused.ok and "not protected" in str(refused.reason), refused
        other = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=B)
        assert other.status(DISK, WAIT).info["holder"] is None
        assert not (exports / ".isc-agent" / "disk.holder").exists()
        assert other.claim(DISK, WAIT).ok


@pytest.mark.xfail(
    strict=True,
    reason="a protect refused for a lost protected image takes the export for its session first",
)
def test_a_refused_protect_takes_no_export(exports: Path) -> None:
    state = exports / ".isc-agent"
    state.mkdir(mode=0o700)
    (state / "disk.journal").write_bytes(b"not a journal's header" * 4)
    with agent_here(exports) as (_, control, _uris):
        site = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=A)
        refused = site.protect(DISK, WAIT)
        assert not refused.ok and "protected image was lost" in str(refused.reason), refused
        other = AgentSite.at(("127.0.0.1", control), timeout=WAIT, holder=B)
        assert other.status(DISK, WAIT).info["holder"] is None
        assert not (state / "disk.holder").exists()
