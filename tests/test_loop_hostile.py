"""A chain of loop devices (:func:`isc.lun.loop_backing`) attacked where
tests/test_local_hostile.py does not reach: a file under the chain that no longer has
the name the kernel kept for it.

The kernel names a loop device's file by the path it was attached through; a file
attached through a hard link that was removed since is ``LINK (deleted)`` there, though
its data lives on under the destination's name. One loop device over such a file is
still told apart from the destination by the device and inode ``LOOP_GET_STATUS64``
gives; under a loop device over it, the chain was followed by name only, stopped at
the inner device and took its node for the file, so ``isc add-dest`` took the outer
device as a second destination of the destination's file (rule 11).

Another session is kept off a destination's file by a lock on the file (OFD, through the
name the kernel keeps under a loop device): a loop device over a link removed since names
no file to lock, so a second session took it while the first held the file, and both
copied into it (rule 12: a destination is one session's at a time). Such a loop device is
refused now, as a source or a destination: the file has no name isc can lock it by.

Needs root (loop devices); a test skips naming what it lacks.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from helpers import fill_random, session_file
from test_boundary_hostile import run_isc
from test_lun import _loop_device as loop_device

from isc import FileLUN
from isc.store import copy, create_session, open_session

G = 4096
SIZE = 64 * G


def test_a_chain_of_loop_devices_over_a_removed_link_of_a_destination_is_refused(
    tmp_path: Path,
) -> None:
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(47))
    FileLUN.create(tmp_path / "d1.img", SIZE).close()
    create_session(tmp_path / "state", str(tmp_path / "source.img"), granularity=G)
    with open_session(tmp_path / "state")[0] as stored:
        stored.add_destination(str(tmp_path / "d1.img"))
        copy(stored, "full")
    link = tmp_path / "link.img"
    os.link(tmp_path / "d1.img", link)
    with loop_device(link) as inner:
        link.unlink()  # the kernel's name for the file: "link.img (deleted)"
        with loop_device(inner) as outer:
            before = session_file(tmp_path / "state")
            for device in (inner, outer):
                done = run_isc("add-dest", "state", device, "--name", "x", cwd=tmp_path, fail=True)
                assert "is already destination d1.img" in done.stderr, (device, done.stderr)
                assert session_file(tmp_path / "state") == before


def test_a_loop_device_over_a_removed_link_of_a_held_destination_is_refused_to_another_session(
    tmp_path: Path,
) -> None:
    FileLUN.create(tmp_path / "source.img", SIZE).close()
    FileLUN.create(tmp_path / "other.img", SIZE).close()
    FileLUN.create(tmp_path / "d1.img", SIZE).close()
    create_session(tmp_path / "state", str(tmp_path / "source.img"), granularity=G)
    create_session(tmp_path / "other", str(tmp_path / "other.img"), granularity=G)
    open_session(tmp_path / "other")[0].close()  # its first open fills in its file
    link = tmp_path / "link.img"
    os.link(tmp_path / "d1.img", link)
    with loop_device(link) as device, open_session(tmp_path / "state")[0] as stored:
        stored.add_destination(str(tmp_path / "d1.img"))  # held by this session now
        link.unlink()
        before = session_file(tmp_path / "other")
        done = run_isc("add-dest", "other", device, "--name", "x", cwd=tmp_path, fail=True)
        assert "has no name isc can lock it by" in done.stderr, done.stderr
        assert "link.img (deleted)" in done.stderr, done.stderr
        assert session_file(tmp_path / "other") == before


def test_a_loop_device_over_a_removed_link_is_refused_as_a_source_and_under_a_chain(
    tmp_path: Path,
) -> None:
    FileLUN.create(tmp_path / "source.img", SIZE).close()
    FileLUN.create(tmp_path / "d1.img", SIZE).close()
    create_session(tmp_path / "state", str(tmp_path / "source.img"), granularity=G)
    open_session(tmp_path / "state")[0].close()  # its first open fills in its file
    link = tmp_path / "link.img"
    os.link(tmp_path / "d1.img", link)
    with loop_device(link) as inner:
        link.unlink()
        with loop_device(inner) as outer:
            for device in (inner, outer):
                before = sorted(p.name for p in tmp_path.iterdir())
                done = run_isc("create", "s", "--source", device, cwd=tmp_path, fail=True)
                assert "has no name isc can lock it by" in done.stderr, done.stderr
                assert sorted(p.name for p in tmp_path.iterdir()) == before
            before_state = session_file(tmp_path / "state")
            done = run_isc("add-dest", "state", outer, "--name", "x", cwd=tmp_path, fail=True)
            assert "has no name isc can lock it by" in done.stderr, done.stderr
            assert session_file(tmp_path / "state") == before_state
