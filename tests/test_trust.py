"""What a persistent session trusts around it (rules 10 and 11): its files, its source, its paths.

Checked here, each with the files and processes a user would have:

* A state directory whose checkpoint is gone or unreadable is corrupt
  metadata: opening it raises ``CorruptMetadata`` naming the file and
  changes nothing, :func:`read_state` says what is wrong, and
  ``open_session(reset=True)`` starts again with every destination NEW and
  every chunk tracked. Never an empty bitmap.
* The source is locked while a session holds it (QEMU's image lock bytes):
  a second session on it, under any path, and a ``qemu-nbd`` that would
  write it are refused, and a session refuses a source ``qemu-nbd`` writes.
  A source written or replaced while no session held it is detected at the
  next open: everything is tracked and the destinations read inconsistent.
* The source, a destination or the save area file cannot be added as a
  destination again under another spelling (a symlink, a hard link, ``./``).
* The save area file is created by isc, never over an existing file; a
  leftover of a killed process is replaced, a foreign file is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TIMEOUT, fill_random
from test_cli import ENV, files
from test_guard import guard_missing
from test_nbd import nbdkit, run, spawn, tool

from isc import CopyJob, CorruptMetadata, DestState, FileLUN
from isc.errors import ParameterError, StateError
from isc.store import METADATA, create_session, open_session, read_state

G = 4096
SIZE = 64 * G + 1000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A random source.img and zeroed d1.img, d2.img of the same size."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(17))
    for name in ("d1", "d2"):
        FileLUN.create(tmp_path / f"{name}.img", SIZE).close()
    return tmp_path


def make_state(root: Path, **options) -> Path:
    """A session on source.img with destinations d1 and d2, consistent and in step."""
    state = root / "state"
    create_session(state, str(root / "source.img"), granularity=G, **options)
    stored, _ = open_session(state, checkpoint_interval=3600)
    with stored:
        for name in ("d1", "d2"):
            stored.add_destination(str(root / f"{name}.img"), name)
        job = CopyJob(stored.session, stored.destinations)
        job.full(marked=False)
        stored.session.mark()
        job.incremental()
        stored.save()
    return state


def tracked(stored) -> int:
    return stored.session.bitmap.tracking_count


# -- a lost checkpoint (hole 6) --------------------------------------------------------------


def _without_checkpoint(state: Path, *, keep_flag: bool) -> None:
    for path in state.glob("checkpoint.*"):
        path.unlink()
    if not keep_flag:  # a session file written before isc recorded its checkpoints
        meta = json.loads((state / METADATA).read_bytes())
        meta.pop("checkpointed", None)
        (state / METADATA).write_text(json.dumps(meta))


@pytest.mark.parametrize("keep_flag", [True, False], ids=["recorded", "by its destinations"])
def test_a_lost_checkpoint_is_corrupt_metadata_not_an_empty_bitmap(
    root: Path, keep_flag: bool
) -> None:
    state = make_state(root)
    _without_checkpoint(state, keep_flag=keep_flag)
    before = files(state)
    with pytest.raises(CorruptMetadata, match=r"checkpoint.* is missing.*--reset-destinations"):
        open_session(state)
    assert files(state) == before
    damage = read_state(state).damage
    assert damage is not None and "checkpoint" in damage and str(state) in damage


def test_logged_writes_without_a_checkpoint_are_corrupt_metadata(root: Path) -> None:
    """No destinations yet, but the activity log shows the session ran: a checkpoint was lost."""
    state = root / "state"
    create_session(state, str(root / "source.img"), granularity=G)
    stored, _ = open_session(state, checkpoint_interval=3600)
    stored.session.write(0, b"x" * G)  # logged: the region became hot
    crashed = root / "crashed"
    shutil.copytree(state, crashed, ignore=shutil.ignore_patterns(".lock"))
    stored.close()
    _without_checkpoint(crashed, keep_flag=False)
    (log,) = crashed.glob("activity.*.log")
    with pytest.raises(CorruptMetadata, match=r"checkpoint.* is missing"):
        open_session(crashed)
    assert log.name in (read_state(crashed).damage or "")


def test_an_unreadable_checkpoint_is_corrupt_metadata(root: Path) -> None:
    state = make_state(root)
    (path,) = state.glob("checkpoint.*")
    path.unlink()
    path.mkdir()  # reading it fails with an OSError, as an unreadable file would
    with pytest.raises(CorruptMetadata, match=path.name):
        open_session(state)
    assert path.name in (read_state(state).damage or "")


def test_a_reset_starts_again_with_full_copies(root: Path) -> None:
    state = make_state(root)
    _without_checkpoint(state, keep_flag=True)
    stored, _ = open_session(state, reset=True)
    with stored:
        assert tracked(stored) == stored.session.bitmap.chunks
        assert [(d.state, d.epoch) for d in stored.destinations] == [(DestState.NEW, None)] * 2
    stored, _ = open_session(state)  # the reset state opens as any other
    with stored:
        assert tracked(stored) == stored.session.bitmap.chunks
        CopyJob(stored.session, stored.destinations).full()
        source = stored.source.read(0, SIZE)
        assert all(d.lun.read(0, SIZE) == source for d in stored.destinations)


# -- the source's lock (hole 7) --------------------------------------------------------------


def test_a_second_session_on_the_same_source_is_refused(root: Path) -> None:
    state = make_state(root)
    (root / "alias.img").symlink_to(root / "source.img")
    other = root / "other"
    create_session(other, str(root / "alias.img"), granularity=G)  # the source is free now
    open_session(other)[0].close()
    stored, _ = open_session(state)
    with stored:
        with pytest.raises(StateError, match=r"source .*alias.img is in use"):
            create_session(root / "third", str(root / "alias.img"), granularity=G)
        assert not (root / "third").exists()
        before = files(other)
        with pytest.raises(StateError, match=r"source .*alias.img is in use"):
            open_session(other)
        assert files(other) == before
    stored, _ = open_session(other)  # free again once the first session closed
    stored.close()


def test_qemu_nbd_cannot_write_a_source_a_session_holds(root: Path) -> None:
    qemu_nbd = tool("qemu-nbd")
    state = make_state(root)
    stored, _ = open_session(state)
    with stored:
        done = run(qemu_nbd, "-f", "raw", "-k", root / "q.sock", root / "source.img", check=False)
        # Where the session guards its source (isc.guard, as root), qemu-nbd's open for
        # writing is refused before it reaches the image lock.
        refusal = "lock" if guard_missing() else "Operation not permitted"
        assert done.returncode != 0 and refusal in done.stderr
    args = [qemu_nbd, "-f", "raw", "-k", str(root / "q.sock"), "--persistent"]
    with spawn([*args, str(root / "source.img")], root / "q.sock") as remote:
        # qemu-nbd listens before it opens (and locks) the image: a served
        # handshake says the image is open.
        run(tool("nbdinfo"), "--size", remote.uri)
        before = files(state)
        with pytest.raises(StateError, match="in use by another isc session or a program"):
            open_session(state)
        assert files(state) == before


# -- changes outside the session (hole 7) ------------------------------------------------------


def _settle_mtime(root: Path) -> None:
    """Give the source an old mtime, so that any later write moves it whatever the clock."""
    os.utime(root / "source.img", ns=(10**18, 10**18))


def test_a_write_while_no_session_held_the_source_is_detected(root: Path) -> None:
    _settle_mtime(root)
    state = make_state(root)  # copies read the source: its mtime stays
    stored, recovery = open_session(state)
    stored.close()
    assert recovery.source_changed is None and read_state(state).source_changed is None
    with FileLUN(root / "source.img") as source:
        source.write(5 * G, b"written by another program")
    reason = read_state(state).source_changed
    assert reason is not None and "modified while no isc process held it" in reason
    stored, recovery = open_session(state)
    with stored:
        assert recovery.source_changed == reason
        assert tracked(stored) == stored.session.bitmap.chunks
        assert all(d.state is DestState.INCONSISTENT for d in stored.destinations)
        stored.session.mark()
        CopyJob(stored.session, stored.destinations).incremental()
        source = stored.source.read(0, SIZE)
        for dest in stored.destinations:
            assert dest.state is DestState.CONSISTENT and dest.lun.read(0, SIZE) == source
    stored, recovery = open_session(state)  # said once: the next open is clean again
    with stored:
        assert recovery.source_changed is None and tracked(stored) == 0


def test_a_replaced_source_is_detected(root: Path) -> None:
    state = make_state(root)
    data = (root / "source.img").read_bytes()
    (root / "new.img").write_bytes(data[:100] + b"!" + data[101:])
    os.replace(root / "new.img", root / "source.img")  # another file, same size, same path
    assert "not the file the session tracked" in (read_state(state).source_changed or "")
    stored, recovery = open_session(state)
    with stored:
        assert "not the file the session tracked" in (recovery.source_changed or "")
        assert tracked(stored) == stored.session.bitmap.chunks
        assert all(d.state is DestState.INCONSISTENT for d in stored.destinations)


def test_a_source_that_changed_size_is_refused(root: Path) -> None:
    state = make_state(root)
    os.truncate(root / "source.img", SIZE + G)
    before = files(state)
    with pytest.raises(StateError, match=rf"holds {SIZE + G} bytes.*tracks {SIZE}"):
        open_session(state)
    assert files(state) == before


def test_a_crash_is_not_taken_for_a_change_outside(root: Path) -> None:
    state = make_state(root, region_size=4 * G)
    stored, _ = open_session(state, checkpoint_interval=3600)
    stored.session.write(3 * G, b"y" * G)
    crashed = root / "crashed"
    shutil.copytree(state, crashed, ignore=shutil.ignore_patterns(".lock"))
    stored.close()
    stored, recovery = open_session(crashed)
    with stored:
        assert recovery.crashed and recovery.source_changed is None
        assert tracked(stored) < stored.session.bitmap.chunks


# -- destinations (hole 8) --------------------------------------------------------------------


def test_the_source_or_a_destination_under_another_name_is_refused(root: Path) -> None:
    state = make_state(root, save_area=(8 * G, str(root / "area")))
    (root / "alias.img").symlink_to(root / "source.img")
    os.link(root / "d1.img", root / "d1-link.img")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        stored, _ = open_session(state)
        with stored:
            before = files(state)
            for target, message in (
                ("alias.img", "is the source of state"),
                ("./source.img", "is the source of state"),
                (str(root / "d1-link.img"), "is already destination d1 of state"),
                ("d2.img", "is already destination d2 of state"),
                ("area", "is the save area of state"),
            ):
                with pytest.raises(ParameterError, match=message):
                    stored.add_destination(target, "extra")
            assert files(state) == before
            assert [d.name for d in stored.destinations] == ["d1", "d2"]
    finally:
        os.chdir(cwd)


def test_an_nbd_export_twice_is_refused(root: Path) -> None:
    state = make_state(root)
    with nbdkit(root, "memory", f"size={SIZE}") as remote:
        stored, _ = open_session(state)
        with stored:
            stored.add_destination(remote.uri, "remote")
            with pytest.raises(ParameterError, match="is already destination remote"):
                stored.add_destination(remote.uri, "again")
            assert [d.name for d in stored.destinations] == ["d1", "d2", "remote"]


# -- the save area file (hole 12) ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["source.img", "d1.img"])
def test_create_refuses_a_save_area_path_that_exists(root: Path, name: str) -> None:
    before = (root / name).read_bytes()
    with pytest.raises(ParameterError, match=rf"save area path .*{name} exists"):
        area = (8 * G, str(root / name))
        create_session(root / "state", str(root / "source.img"), granularity=G, save_area=area)
    assert not (root / "state").exists()
    assert (root / name).read_bytes() == before


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("source.img", "source.img is the source or a destination"),
        ("d1.img", "d1.img is the source or a destination"),
        ("other.img", "other.img' exists and isc did not create it"),
    ],
)
def test_a_session_file_naming_an_existing_file_as_save_area_leaves_it_alone(
    root: Path, name: str, message: str
) -> None:
    state = make_state(root)
    (root / "other.img").write_bytes(b"someone's data")
    meta = json.loads((state / METADATA).read_bytes())
    meta["save_area"] = {"capacity": 8 * G, "path": str(root / name)}
    (state / METADATA).write_text(json.dumps(meta))
    before = (root / name).read_bytes()
    with pytest.raises(ParameterError, match=message):
        open_session(state)
    assert (root / name).read_bytes() == before


CHILD = r"""
import sys
from isc.store import open_session
stored, _ = open_session(sys.argv[1])
stored.session.write(0, b"a" * 4096)
stored.session.mark()
stored.session.write(0, b"b" * 4096)  # saved first (COFW): the save area file holds it
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_save_area_left_by_a_killed_process_is_replaced(root: Path) -> None:
    area = root / "area"
    state = make_state(root, save_area=(8 * G, str(area)))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state)],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "ready\n"
        assert area.stat().st_size == G
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT)
    finally:
        child.kill()
        child.wait(TIMEOUT)
        child.stdin.close()
        child.stdout.close()
    assert area.exists()  # the leftover
    stored, recovery = open_session(state)
    with stored:
        assert recovery.crashed
        assert area.stat().st_size == 0  # a new file: the leftover was replaced
    assert not area.exists()
