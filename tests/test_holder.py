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
import random
from pathlib import Path

import pytest
from test_agent import SIZE, agent, site_of
from test_cli import error_line, isc_run
from test_nbd import sparse

SEED = 20261206


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


@pytest.mark.xfail(strict=True, reason="an agent does not yet hold its exports for one session")
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
