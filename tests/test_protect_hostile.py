"""An update's protects (:func:`isc.update._protect_all`) attacked where tests/test_holder.py
does not reach: a destination another session holds, met by an update that is then
abandoned for another destination's refusal, and by ``isc rollback``.

A protect refused because another session holds the export (``Ack.held``: the operator's
forced ``isc release``, that session's claim and its copy) says nothing the export holds
is this session's: the destination is NEW. The update spared it and made it NEW only once
every other protect had succeeded; when another destination's protect was refused, the
update was abandoned first, and the destination stayed consistent in the session's
record (``isc status``) over the other session's data (rule 6), however many updates
failed so. ``isc rollback`` of such a destination asks its status first, which named the
other holder; it tracked what the other session's protection holds and saved the
destination inconsistent, then the agent refused the rollback as held (rule 10).

Real ``isc update --site`` against an agent run in this process, as tests/test_holder.py
steps into its requests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_agent import SIZE, WAIT
from test_agent_journal import agent_here
from test_cli import error_line, isc_run
from test_nbd import sparse

from isc.remote import session_holder

B = session_holder(0xB, "b")


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """An agent's directory with two zero-filled exports of SIZE bytes, "disk" and "other"."""
    directory = tmp_path / "exports"
    directory.mkdir()
    for name in ("disk", "other"):
        sparse(directory / name, SIZE)
    return directory


def status(tmp_path: Path) -> dict:
    """Session a as ``isc status --json`` reports it."""
    return json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)


def states(tmp_path: Path) -> dict[str, str]:
    return {d["name"]: d["state"] for d in status(tmp_path)["destinations"]}


def test_a_held_destination_is_new_though_the_update_is_abandoned(
    tmp_path: Path, exports: Path
) -> None:
    (tmp_path / "a.img").write_bytes(random.Random(3).randbytes(SIZE))
    isc_run("create", "a", "--source", "a.img", "--granularity", "16K", cwd=tmp_path)
    with agent_here(exports) as (here, control, uris):
        site = f"127.0.0.1:{control}"
        for name in ("disk", "other"):
            isc_run("add-dest", "a", uris[name], cwd=tmp_path)  # protected by --site
        update = ["update", "a", "--site", site, "--timeout", str(WAIT)]
        isc_run(*update, cwd=tmp_path)
        assert states(tmp_path) == {"disk": "consistent", "other": "consistent"}
        disk = here.exports["disk"]
        assert disk.release(None, force=True)["ok"] and disk.claim(B)["ok"]
        disk.write(0, b"b" * 4096)  # b's copy
        protect = here.control.ops["protect"]

        def refusing(request: dict) -> dict:
            if request.get("export") == "other":
                return {"ok": False, "reason": "injected: other cannot be protected now"}
            return protect(request)

        here.control.ops["protect"] = refusing
        failed = isc_run(*update, cwd=tmp_path, check=1)
    assert "cannot protect other" in failed.stderr, failed.stderr
    assert states(tmp_path) == {"disk": "new", "other": "consistent"}


def test_a_rollback_of_a_destination_another_session_holds_changes_nothing(
    tmp_path: Path, exports: Path
) -> None:
    """Rule 10: ``isc rollback`` asks the site's status first; one that says another session
    holds the export (b protected it and wrote since a forced release) refuses the rollback
    there, in one line, before anything of the session is tracked: it tracked what b's
    protection holds (a resend for nothing) and saved the destination inconsistent first."""
    (tmp_path / "a.img").write_bytes(random.Random(4).randbytes(SIZE))
    isc_run("create", "a", "--source", "a.img", "--granularity", "16K", cwd=tmp_path)
    with agent_here(exports) as (here, control, uris):
        site = f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path)
        disk = here.exports["disk"]
        assert disk.release(None, force=True)["ok"] and disk.claim(B)["ok"]
        assert disk.protect(holder=B)["ok"]
        disk.write(0, b"b" * 4096)  # b's copy, after its protect
        before = status(tmp_path)
        refused = isc_run("rollback", "a", "disk", "--timeout", str(WAIT), cwd=tmp_path, check=1)
        assert disk.holder == B and disk.journal is not None  # b's protection stands
    after = status(tmp_path)
    assert after["tracking"] == before["tracking"] == {"chunks": 0, "bytes": 0}
    assert after["destinations"] == before["destinations"]
    line = error_line(refused)
    assert "held by session b" in line and "nothing was changed" in line, line
