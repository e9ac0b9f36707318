"""The Python API as a user meets it: clear errors, context managers, unmark, the reference.

Sessions, copy jobs and LUNs close at the end of a ``with`` block; a path
given where a LUN belongs is refused with the fix; ``Session.unmark`` of an
unmarked session is a no-op; and the API reference builds from the
docstrings with the command ``docs/api.md`` gives (pdoc, the ``docs`` extra).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TIMEOUT, Gate, Worker

from isc import CopyJob, Destination, FileLUN, MemoryLUN, Session
from isc.errors import CopyError, StateError

ROOT = Path(__file__).resolve().parent.parent
G = 4096  # granularity of every session here
SIZE = 16 * G
NOT_YET = 0.2  # seconds a wait that should not end is observed


# -- Session ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["volume.img", Path("volume.img"), b"volume.img"])
def test_a_path_for_the_source_says_to_open_it_as_a_lun(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError) as error:
        Session(source)
    assert str(error.value) == (
        f"source must be a LUN (e.g. FileLUN(path)), got {type(source).__name__} {source!r}"
    )
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_leaving_a_session_block_unmarks_it_and_closes_its_save_area(tmp_path):
    with FileLUN.create(tmp_path / "volume.img", SIZE) as lun:
        with Session(lun, G) as session:
            session.write(0, b"x" * G)
            session.mark()
            session.write(0, b"y" * G)  # chunk 0 saved first (COFW)
            area = session.save_area
            assert area.used == G
        assert session.closed
        assert area.closed
        assert not session.bitmap.marked
        assert session.bitmap.tracking(0)  # unsent: back in tracking (rule 2)
        assert not lun.closed  # the source is the caller's
        with pytest.raises(StateError, match=r"^session is closed; open a new session to mark$"):
            session.mark()
        session.close()  # idempotent
        session.write(G, b"z")  # writes still reach the source, tracked
        assert session.bitmap.tracking(1)
        assert lun.read(G, 1) == b"z"
    assert lun.closed


def test_an_exception_in_a_session_block_still_closes_it():
    lun = MemoryLUN(SIZE)
    with pytest.raises(KeyError), Session(lun, G) as session:
        session.mark()
        raise KeyError("boom")
    assert session.closed
    assert not session.bitmap.marked


def test_unmark_returns_the_unsent_chunks_and_is_a_no_op_when_unmarked():
    session = Session(MemoryLUN(SIZE), G)
    session.write(0, bytes(3 * G))
    before = session.bitmap.to_bytes()
    assert session.unmark() == 0
    assert session.bitmap.to_bytes() == before
    session.mark()
    session.confirm_sent(0, 1, session.generation)
    assert session.unmark() == 2
    assert session.bitmap.chunks_of("tracking").tolist() == [1, 2]
    assert session.unmark() == 0


# -- CopyJob ------------------------------------------------------------------------------


def copy_setup(progress=None) -> tuple[Session, MemoryLUN, CopyJob]:
    session = Session(MemoryLUN(SIZE), G)
    replica = MemoryLUN(SIZE)
    job = CopyJob(session, [Destination(replica, "replica")], io_size=G, progress=progress)
    return session, replica, job


def test_leaving_a_copy_job_block_refuses_later_copies_and_changes_nothing():
    session, replica, job = copy_setup()
    with job:
        job.full()
    session.write(0, b"x")
    with pytest.raises(StateError, match=r"^the copy job of session is closed; make a new"):
        job.incremental()
    with pytest.raises(StateError, match="is closed"):
        job.full()
    assert not session.bitmap.marked
    assert session.bitmap.chunks_of("tracking").tolist() == [0]
    assert replica.read(0, 1) == b"\0"
    job.close()  # idempotent
    assert not replica.closed  # the destinations are the caller's


def test_closing_a_copy_job_stops_its_copy_in_another_thread_and_waits_for_it():
    gate = Gate()  # parks the copy after its first run
    session, _, job = copy_setup(progress=gate)
    copy = Worker(job.full)
    gate.wait_reached()
    closer = Worker(job.close)
    assert not closer.done.wait(NOT_YET)  # the copy still runs: close waits for it
    gate.open()
    closer.finish()
    assert copy.done.is_set()
    with pytest.raises(CopyError, match="the copy job of session was closed"):
        copy.finish()
    # Rule 2: the copy failed, so every chunk it owed is back in tracking.
    assert not session.bitmap.marked
    assert session.bitmap.tracking_count == SIZE // G


def test_a_second_copy_of_a_job_while_one_runs_is_refused():
    gate = Gate()
    session, replica, job = copy_setup(progress=gate)
    session.write(0, b"x" * SIZE)
    copy = Worker(lambda: job.full(marked=False))
    gate.wait_reached()
    with pytest.raises(StateError, match=r"^this job is copying session already; wait"):
        job.incremental()
    gate.open()
    assert copy.finish().bytes_sent == SIZE
    assert replica.read(0, SIZE) == b"x" * SIZE


# -- the API reference --------------------------------------------------------------------


def test_the_api_reference_builds_with_the_documented_command(tmp_path):
    pytest.importorskip("pdoc", reason="pdoc is not installed: pip install -e '.[docs]'")
    (block,) = re.findall(r"^```sh\n(.*?)^```$", (ROOT / "docs/api.md").read_text(), re.M | re.S)
    (command,) = [line for line in block.splitlines() if "pdoc -o" in line]
    argv = shlex.split(command)
    assert argv[:3] == [".venv/bin/pdoc", "-o", "build/api"]
    done = subprocess.run(
        [sys.executable, "-m", "pdoc", "-o", str(tmp_path), *argv[3:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Warn" not in done.stderr, done.stderr
    package = (tmp_path / "isc.html").read_text()
    for name in (
        "DeltaBitmap",
        "DeltaBitmap.record_write",
        "DeltaBitmap.chunks_of",
        "Session",
        "Session.close",
        "CopyJob",
        "CopyJob.close",
        "FileLUN",
        "SaveArea",
        "IscError",
    ):
        assert f'id="{name}"' in package, f"{name} is not in the reference of isc"
    for module in argv[4:]:
        assert (tmp_path / (module.replace(".", "/") + ".html")).is_file(), module
