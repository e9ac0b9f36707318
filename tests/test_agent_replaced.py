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
through the ``isc`` command.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from test_agent import SEED, SIZE, WAIT, agent, cli_session, site_of, states
from test_cli import isc_run
from test_nbd import sparse

from isc.store import open_session

KIB = 1 << 10


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A source file of SIZE seeded random bytes."""
    path = tmp_path / "source.img"
    path.write_bytes(random.Random(SEED).randbytes(SIZE))
    return path


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """An agent's directory with one zero-filled export of SIZE bytes, "disk"."""
    directory = tmp_path / "exports"
    directory.mkdir()
    sparse(directory / "disk", SIZE)
    return directory


def renamed_over(path: Path) -> None:
    """``mv other path``: another file, of other bytes, takes the name."""
    other = path.parent.parent / "other.img"
    other.write_bytes(random.Random(SEED + 1).randbytes(SIZE))
    os.replace(other, path)


def renamed_away(path: Path) -> None:
    path.rename(path.parent.parent / "moved.img")


REPLACED: dict[str, Callable[[Path], None]] = {
    "renamed over": renamed_over,
    "renamed away": renamed_away,
    "deleted": Path.unlink,
}


def host_write(tmp_path: Path, offset: int, data: bytes) -> None:
    """A host write to session ``s``'s source, through the session."""
    stored, _ = open_session(tmp_path / "s")
    with stored:
        stored.session.write(offset, data)


@pytest.mark.xfail(
    strict=True, reason="the agent serves the file it opened at its start, which no name reaches"
)
@pytest.mark.parametrize("replace", REPLACED.values(), ids=REPLACED)
def test_an_update_does_not_report_an_export_replaced_at_its_path_consistent(
    tmp_path: Path, source: Path, exports: Path, replace: Callable[[Path], None]
):
    cli_session(tmp_path, source)
    with agent(exports, tmp_path / "agent.log") as remote:
        site = site_of(remote)
        isc_run("add-dest", "s", remote.exports["disk"], "--site", site, cwd=tmp_path)
        isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path)
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("consistent", site)}

        replace(exports / "disk")
        host_write(tmp_path, 100 * KIB, b"written after the replacement" * 100)
        done = isc_run("update", "s", "--timeout", str(WAIT), cwd=tmp_path, check=1)
        assert "disk" in done.stderr and "restart" in done.stderr
        assert states(tmp_path) == {"local": ("consistent", None), "disk": ("new", site)}
        assert (tmp_path / "local.img").read_bytes() == source.read_bytes()
