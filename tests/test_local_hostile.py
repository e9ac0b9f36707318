"""The local data path of a persistent session attacked on one machine where the other hostile
tests do not reach (rules 6, 10 and 11): names of a destination that reach its file through
more than one device, and what the user can give isc that it must not act on.

Already attacked elsewhere, and not repeated here: a loop device straight over the source or
a destination, descriptors as names, the session's own files, links put in place of a
destination, state directories others can write (tests/test_boundary_hostile.py); one
destination file for one session (tests/test_destination_lock.py); corrupt and foreign
session files, checkpoints and logs (tests/test_trust.py, tests/test_store.py,
tests/test_window_hostile.py).

Attacked here, through the real ``isc`` command:

* a loop device over a loop device over a destination file (``losetup`` of ``/dev/loopN``):
  one level of ``LOOP_GET_STATUS64`` names only the inner device's node, so it was taken
  as a second destination (or by a second session); with an offset on the outer device a
  copy wrote the file twice, at two offsets, and reported the outer one consistent over
  data that was not the source's. A writable loop device over the loop device a session
  takes as its source is refused at the open (as root), through the chain too.

Bad input that changes nothing (rule 10):

* an empty ``checkpoint.journal`` (truncated to nothing): refused as a lost checkpoint
  should be, but the line said ``holds no whole checkpoint: None``.

Each refusal is one line naming the object and the fix, and changes nothing. A test that
needs root (loop devices) skips naming what it lacks.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers import fill_random, session_file
from test_boundary_hostile import run_isc
from test_cli import files
from test_guard import needs_guard
from test_lun import _loop_device as loop_device

from isc import FileLUN
from isc.errors import StateError
from isc.store import copy, create_session, open_session

G = 4096
SIZE = 64 * G


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A random source.img, a d1.img twice its size and a zeroed d2.img, and a session
    ``state`` on source.img with destination d1 copied once (consistent)."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(41))
    FileLUN.create(tmp_path / "d1.img", 2 * SIZE).close()
    FileLUN.create(tmp_path / "d2.img", SIZE).close()
    create_session(tmp_path / "state", str(tmp_path / "source.img"), granularity=G)
    with open_session(tmp_path / "state")[0] as stored:
        stored.add_destination(str(tmp_path / "d1.img"))
        copy(stored, "full")
    return tmp_path


# -- a destination reached through a chain of loop devices -------------------------------------


def test_a_loop_device_over_a_loop_device_over_a_destination_is_refused(root: Path) -> None:
    # Before, `isc add-dest state /dev/loopB` (loopB over loopA over d1.img) was taken;
    # with `losetup --offset` on loopB a copy wrote d1.img at two offsets and reported
    # loopB consistent while a direct read of it held the source shifted.
    with loop_device(root / "d1.img") as inner, loop_device(inner) as outer:
        before = session_file(root / "state")
        done = run_isc("add-dest", "state", outer, "--name", "outer", cwd=root, fail=True)
        assert "is already destination d1.img" in done.stderr, done.stderr
        assert session_file(root / "state") == before
        # Another session naming it while this one holds d1.img is refused too.
        run_isc("create", "other", "--source", "d2.img", "--granularity", "4K", cwd=root)
        open_session(root / "other")[0].close()  # its first open fills in its file
        other = session_file(root / "other")
        with open_session(root / "state")[0]:
            done = run_isc("add-dest", "other", outer, "--name", "outer", cwd=root, fail=True)
        assert "in use by another isc session" in done.stderr, done.stderr
        assert session_file(root / "other") == other


@needs_guard
def test_a_writable_loop_device_over_the_loop_device_source_is_refused(root: Path) -> None:
    with loop_device(root / "source.img") as device:
        create_session(root / "on-device", device, granularity=G)
        before = session_file(root / "on-device")
        with (
            loop_device(device) as outer,
            pytest.raises(StateError, match=f"writable through the loop device {outer}"),
        ):
            open_session(root / "on-device")
        assert session_file(root / "on-device") == before


# -- bad input: files of the state directory -----------------------------------------------------


def test_an_empty_checkpoint_journal_is_refused_in_one_line_saying_so(root: Path) -> None:
    journal = root / "state" / "checkpoint.journal"
    journal.write_bytes(b"")
    before = files(root / "state")
    for verb in ("mark", "copy", "unmark", "remove-dest"):
        done = run_isc(
            verb, "state", *(["d1.img"] if verb == "remove-dest" else []), cwd=root, fail=True
        )
        assert f"{journal.relative_to(root)} is empty" in done.stderr, done.stderr
        assert "isc recover state --reset-destinations" in done.stderr, done.stderr
        assert files(root / "state") == before
