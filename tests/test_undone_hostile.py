"""What an update takes from an agent's answers after its copy (rules 2, 6 and 12 across
sites): :func:`isc.update._undone` asks the export's status when its unprotect was not
answered, and a status is an answer even when it says the export is another session's.

Attacked here, through the real ``isc update`` against an agent run in this process (so a
test can step into its requests, as tests/test_holder.py does):

* the operator's forced ``isc release`` during the holder's copy, another session's claim
  and its write into the export, then an unprotect of the holder that fails (the agent
  could not carry it out): the status asked instead says the export is held by the other
  session, and the update took its empty ``undone`` for "nothing undone" and reported the
  destination consistent over the other session's data. The same status after a copy that
  failed left the destination in step over it.
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

from test_agent import SIZE, WAIT
from test_agent_journal import agent_here
from test_cli import isc_run
from test_holder import exports  # noqa: F401 (a fixture)

from isc.remote import session_holder
from isc.store import open_session

SEED = 20261207
B = session_holder(0xB, "b")
"""The other session, as the agent knows it."""


def session_a(tmp_path: Path) -> Path:
    """Session "a" in ``tmp_path`` on a source of seeded random bytes."""
    source = tmp_path / "a.img"
    source.write_bytes(random.Random(SEED).randbytes(SIZE))
    isc_run("create", "a", "--source", str(source), "--granularity", "16K", cwd=tmp_path)
    return source


def states(tmp_path: Path) -> dict[str, str]:
    """Each destination of session a's state, as ``isc status --json`` prints them."""
    report = json.loads(isc_run("status", "a", "--json", cwd=tmp_path).stdout)
    return {d["name"]: d["state"] for d in report["destinations"]}


def b_takes_it_over(export) -> None:
    """The operator's forced release, session b's claim and a write of b's into the export."""
    assert export.release(None, force=True)["ok"]
    assert export.claim(B)["ok"]
    export.write(0, b"b" * 4096)


def test_a_status_naming_another_holder_after_a_failed_unprotect_is_never_consistent(
    tmp_path: Path,
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    """Rule 6: a's copy succeeded; b took the export over (a forced release, its claim, its
    write) and a's unprotect failed at the agent. The status a's update asks instead names
    b as the holder: the destination is b's now, and a's update fails for it."""
    session_a(tmp_path)
    with agent_here(exports) as (here, control, uris):
        export, site = here.exports["disk"], f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)

        def failing(request: dict) -> dict:
            b_takes_it_over(export)
            raise OSError(errno.EIO, "the agent's journal could not be dropped")

        here.control.ops["unprotect"] = failing
        done = isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path, check=None)
    assert (exports / "disk").read_bytes()[:4096] == b"b" * 4096  # b's data, not a's
    assert done.returncode == 1, done.stderr
    assert "held by session b" in done.stderr, done.stderr
    assert states(tmp_path) == {"disk": "new"}


def test_a_status_naming_another_holder_after_a_failed_copy_leaves_nothing_untracked(
    tmp_path: Path,
    exports: Path,  # noqa: F811 (test_holder's fixture)
) -> None:
    """Rules 2 and 6: a's destination is consistent; b takes the export over during a's next
    copy (which then fails at the export) and lets it go before a's update after. That
    update must not call the destination consistent while it holds b's write."""
    source = session_a(tmp_path)
    with agent_here(exports) as (here, control, uris):
        export, site = here.exports["disk"], f"127.0.0.1:{control}"
        isc_run("add-dest", "a", uris["disk"], "--site", site, cwd=tmp_path)
        isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path)
        assert states(tmp_path) == {"disk": "consistent"}
        with open_session(tmp_path / "a")[0] as stored:
            stored.session.write(SIZE // 2, b"a" * 4096)
        write = export.write

        def failing(offset: int, data) -> None:
            del export.write  # the class's again, for b's write and after
            b_takes_it_over(export)
            raise OSError(errno.EIO, "the export's disk failed")

        export.write = failing
        isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path, check=1)
        assert export.write == write
        assert export.release(B)["ok"]  # b is done with it
        isc_run("update", "a", "--timeout", str(WAIT), cwd=tmp_path, check=None)
    assert states(tmp_path) == {"disk": "consistent"}
    assert (exports / "disk").read_bytes() == source.read_bytes()
