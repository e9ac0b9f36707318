"""The trust boundaries of a persistent session attacked where the other hostile tests do not
reach (rules 10, 11 and 14): names of files that mean another file in another process or
under another device, windows between isc's check of a path and its use, and state
directories others can write.

Already attacked elsewhere, and not repeated here: another spelling of the source or a
destination (a symlink, a hard link, ``./``), a save area path that exists, corrupt and
fuzzed session files, checkpoints and logs, a second session on a held source, ``qemu-nbd``
against a held source (tests/test_trust.py, tests/test_store.py); TLS and authentication of
the control faces and the NBD exports, other users' sockets and secret files
(tests/test_security_*.py, tests/test_remote_hostile.py).

Attacked here, through the real ``isc`` command where a user would go that way and with a
hook in this process where only a hook can force the window open:

* a LUN given as ``/proc/self/fd/N``, ``/dev/fd/N`` or ``/dev/stdin``: a name that means
  another file in every process, so a later ``isc copy`` wrote what it opened under that
  number (the source itself) and called the destination consistent;
* a loop device over the source (or over a destination) given as a destination, and a second
  session whose source is a loop device over a file a session holds;
* the session's own files: a save area path in the state directory (``checkpoint.journal``,
  ``.lock``), a file of the state directory (its write log, also through a hard link) given
  as a destination, and the checkpoint journal of another session put in its place;
* a destination's path that names the source by now (a hard link or a symlink put there
  since add-dest), and one swapped for a link to the source between add-dest's check of
  the path and its open;
* the source renamed and replaced between the open of its LUN and of its lock, so the
  session locked (and stamped) a file it does not write;
* another process changing the session file between an open's read of it and its lock,
  whose change the open then overwrote;
* a state directory, or an agent's directory or its journals', that others can write or
  that belongs to another user: whoever can write it chooses what isc reads and writes;
* a FIFO opened as a LUN (an open that waited for a writer forever);
* another user of the machine writing the source through ``isc serve``'s default export
  (loopback TCP without TLS, which every user reaches: it serves its own user alone);
* a program that opens the source for writing while a session holds it and takes no lock:
  refused by the guard (as root; tests/test_guard.py attacks it further); one that
  truncates it by path, which opens nothing: a hole left open, as a strict xfail naming
  the code.

Each refusal is one line naming the object and the fix, and changes nothing. A test that
needs root (loop devices, another owner) or a tool skips naming what it lacks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fill_random, session_file
from test_cli import ENV, ISC, files
from test_guard import guard_missing
from test_lun import _loop_device as loop_device
from test_security_nbd import PYTHON, another_user, isc_serve

import isc.store
from isc import FileLUN
from isc.errors import ParameterError, StateError
from isc.store import METADATA, copy, create_session, open_session

G = 4096
SIZE = 64 * G + 512
"""A short last chunk, in whole sectors: a loop device over the file has its size."""
TIMEOUT = 30.0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A random source.img, zeroed d1.img and d2.img, and a session ``state`` on source.img
    with destination d1 copied once (consistent)."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(23))
    for name in ("d1", "d2"):
        FileLUN.create(tmp_path / f"{name}.img", SIZE).close()
    create_session(tmp_path / "state", str(tmp_path / "source.img"), granularity=G)
    with open_session(tmp_path / "state")[0] as stored:
        stored.add_destination(str(tmp_path / "d1.img"))
        copy(stored, "full")
    return tmp_path


def run_isc(*args: str, cwd: Path, fail: bool = False, **options) -> subprocess.CompletedProcess:
    """Run ``isc ARGS`` in ``cwd``; it must succeed, or with ``fail`` fail with one line."""
    done = subprocess.run(
        [*ISC, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, **options
    )
    assert "Traceback" not in done.stderr, done.stderr
    if fail:
        assert done.returncode != 0, done.stdout
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("isc: error: "), done.stderr
    else:
        assert done.returncode == 0, done.stderr
    return done


# -- names that mean another file in another process -------------------------------------------


@pytest.mark.parametrize("form", ["/proc/self/fd/{n}", "/dev/fd/{n}", "/dev/stdin"])
def test_a_lun_named_by_a_descriptor_is_refused(root: Path, form: str) -> None:
    # Before, `isc add-dest state /proc/self/fd/4 4<>d1.img` was taken, and a later
    # `isc copy` wrote its full copy through its own descriptor 4 (the source) and
    # called the destination consistent while d1.img never saw a byte.
    before = session_file(root / "state")
    with open(root / "d2.img", "r+b") as d2:
        n = d2.fileno()
        target = form.format(n=n)
        run_isc(
            "add-dest",
            "state",
            target,
            "--name",
            "fd",
            cwd=root,
            fail=True,
            pass_fds=(n,),
            stdin=d2,
        )
        run_isc("create", "other", "--source", target, cwd=root, fail=True, pass_fds=(n,), stdin=d2)
    assert session_file(root / "state") == before
    assert not (root / "other").exists()


# -- loop devices over the session's files -----------------------------------------------------


@pytest.mark.parametrize("over", ["source.img", "d1.img"])
def test_a_loop_device_over_the_source_or_a_destination_is_refused_as_a_destination(
    root: Path, over: str
) -> None:
    before = session_file(root / "state")
    with loop_device(root / over) as device:
        done = run_isc("add-dest", "state", device, cwd=root, fail=True)
    refusals = ("is the source", "is already destination d1")
    if over == "source.img" and guard_missing() is None:
        # As root the guard refuses the source first: the loop device can write it.
        refusals = (f"source.img is writable through the loop device {device} over it",)
    assert any(refusal in done.stderr for refusal in refusals), done.stderr
    assert session_file(root / "state") == before


def test_a_second_session_on_a_loop_device_over_a_held_source_is_refused(root: Path) -> None:
    with loop_device(root / "source.img") as device:
        if guard_missing() is None:
            # As root the guard refuses a source a loop device can write (and, while a
            # session holds the file, losetup's open of it): no session on the file here.
            with pytest.raises(StateError, match=f"writable through the loop device {device}"):
                open_session(root / "state")
        else:
            stored, _ = open_session(root / "state")
            with stored:
                done = run_isc("create", "other", "--source", device, cwd=root, fail=True)
                assert "in use" in done.stderr
        assert not (root / "other").exists()
        # And the other way round: a session on the device holds the file too.
        run_isc("create", "other", "--source", device, "--granularity", "4K", cwd=root)
        stored, _ = open_session(root / "other")
        with stored:
            run_isc("copy", "--full", "state", cwd=root, fail=True)


# -- the session's own files as its save area ---------------------------------------------------


@pytest.mark.parametrize("name", [".lock", "checkpoint.journal", "activity.3.writes", "area"])
def test_a_save_area_in_the_session_directory_is_refused(root: Path, name: str) -> None:
    # Before, `isc create other --save-area 1M,other/checkpoint.journal` was taken, and
    # every open after the first refused the journal as a file isc did not create.
    (root / "other").mkdir(mode=0o755)
    area = f"1M,other/{name}"
    done = run_isc(
        "create", "other", "--source", "d2.img", "--save-area", area, cwd=root, fail=True
    )
    assert "lies in the session directory" in done.stderr
    assert list((root / "other").iterdir()) == []


def test_a_file_of_the_state_directory_is_refused_as_a_destination(root: Path) -> None:
    # Before, its write log was taken (a name the next open makes is easy to tell
    # beforehand), and a copy wrote the source's data into it.
    with open_session(root / "state")[0] as stored:
        writes = next(p for p in stored.directory.iterdir() if p.name.endswith(".writes"))
        os.link(writes, root / "linked.img")
        for target in (writes, root / "linked.img"):
            with pytest.raises(ParameterError, match="a file of the state directory"):
                stored.add_destination(str(target), "log")
        assert [d.name for d in stored.destinations] == ["d1.img"]
    meta = json.loads((root / "state" / METADATA).read_bytes())
    assert [d["name"] for d in meta["destinations"]] == ["d1.img"]


def test_a_file_of_another_sessions_state_directory_is_refused_as_a_destination_or_save_area(
    root: Path,
) -> None:
    # Before, another session's write log was taken as a destination (a copy would write
    # the source into it, and that session's crash recovery would read it), and a save
    # area file made there, among the names that session's files take.
    FileLUN.create(root / "other.img", SIZE).close()
    create_session(root / "other", str(root / "other.img"), granularity=G)
    open_session(root / "other")[0].close()
    writes = next(p for p in (root / "other").iterdir() if p.name.endswith(".writes"))
    other = sorted((root / "other").iterdir())
    done = run_isc("add-dest", "state", str(writes), cwd=root, fail=True)
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"lies in {root / 'other'}, the state directory of session other" in done.stderr
    area = f"64K,{root / 'other' / 'other' / '..' / 'area'}"
    done = run_isc(
        "create", "third", "--source", "d2.img", "--save-area", area, cwd=root, fail=True
    )
    assert done.stderr.count("\n") == 1, done.stderr
    assert "the state directory of session other" in done.stderr
    meta = json.loads((root / "state" / METADATA).read_bytes())
    assert [d["name"] for d in meta["destinations"]] == ["d1.img"]
    assert sorted((root / "other").iterdir()) == other and not (root / "third").exists()


# -- a destination's path that names the source by now ------------------------------------------


@pytest.mark.parametrize("link", [os.link, os.symlink])
def test_a_destination_replaced_by_a_link_to_the_source_is_refused(root: Path, link) -> None:
    # Before, `isc copy --full` wrote the source over itself through d1.img and
    # called d1 consistent; a marked copy would write saved chunks (older data)
    # over the live source.
    os.rename(root / "d1.img", root / "d1.moved")
    link(root / "source.img", root / "d1.img")
    source, meta = (root / "source.img").read_bytes(), (root / "state" / METADATA).read_bytes()
    done = run_isc("copy", "--full", "state", cwd=root, fail=True)
    assert "destination d1.img" in done.stderr and "is the file of the source" in done.stderr
    assert (root / "source.img").read_bytes() == source
    assert (root / "state" / METADATA).read_bytes() == meta


# -- windows between a check and its use ------------------------------------------------------


def test_a_source_swapped_between_its_open_and_its_lock_is_still_the_one_locked(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = isc.store.open_lun

    def open_then_swap(target: str, timeout: float | None = None, session: int | None = None):
        lun = real_open(target, timeout, session)
        if target.endswith("source.img"):
            os.rename(root / "source.img", root / "moved.img")
            FileLUN.create(root / "source.img", SIZE).close()
        return lun

    monkeypatch.setattr(isc.store, "open_lun", open_then_swap)
    try:
        stored, _ = open_session(root / "state")
    except StateError as exc:  # refusing the swapped source is right too
        assert "source" in str(exc)
        return
    monkeypatch.undo()
    # The session writes moved.img: that is the file its lock must hold.
    with stored, pytest.raises(StateError, match="in use"):
        create_session(root / "other", str(root / "moved.img"), granularity=G)


def test_a_destination_swapped_for_the_source_between_its_check_and_its_open_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = isc.store.open_lun

    def swap_then_open(target: str, timeout: float | None = None, session: int | None = None):
        if target.endswith("d2.img"):  # add_destination checked the path: swap it now
            os.rename(root / "d2.img", root / "d2.moved")
            os.symlink(root / "source.img", root / "d2.img")
        return real_open(target, timeout, session)

    stored, _ = open_session(root / "state")
    with stored:
        monkeypatch.setattr(isc.store, "open_lun", swap_then_open)
        with pytest.raises(StateError, match="is the file of the source"):
            stored.add_destination(str(root / "d2.img"))
        monkeypatch.undo()
        assert [d.name for d in stored.destinations] == ["d1.img"]


def test_a_change_to_the_session_between_the_read_of_its_file_and_its_lock_is_kept(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_lock = isc.store._lock

    def lock_after_another(directory: Path) -> int:
        run_isc("add-dest", "state", "d2.img", cwd=root)  # takes and releases the lock
        return real_lock(directory)

    monkeypatch.setattr(isc.store, "_lock", lock_after_another)
    stored, _ = open_session(root / "state")
    monkeypatch.undo()
    with stored:
        assert [d.name for d in stored.destinations] == ["d1.img", "d2.img"]
    meta = json.loads((root / "state" / METADATA).read_bytes())
    assert [d["name"] for d in meta["destinations"]] == ["d1.img", "d2.img"]


# -- another session's checkpoint journal -------------------------------------------------------


def _journal_of_another(root: Path, opens: int) -> bytes:
    """Write chunk 5 through ``state``'s session (tracked: d1 never got it), then put in
    ``state`` the journal of a session on d2.img opened ``opens`` times (3 generations each,
    as ``state``'s two opens so far); return ``state``'s session file."""
    with open_session(root / "state")[0] as stored:
        stored.session.write(5 * G, b"tracked, never sent")
    create_session(root / "other", str(root / "d2.img"), granularity=G)
    for _ in range(opens):
        open_session(root / "other")[0].close()
    shutil.copy(root / "other" / "checkpoint.journal", root / "state" / "checkpoint.journal")
    return (root / "state" / METADATA).read_bytes()


def test_a_checkpoint_journal_of_another_session_is_refused(root: Path) -> None:
    # Before, its empty bitmap was read as this session's: chunk 5 was lost, and the
    # next update called d1 consistent without it.
    before = _journal_of_another(root, opens=1)
    done = run_isc("mark", "state", cwd=root, fail=True)
    assert "checkpoint.journal ends at checkpoint 3" in done.stderr and "not this" in done.stderr
    assert (root / "state" / METADATA).read_bytes() == before
    assert "not this session's" in run_isc("status", "state", cwd=root).stdout


def test_a_checkpoint_journal_of_another_session_at_the_same_generation_is_refused(
    root: Path,
) -> None:
    before = _journal_of_another(root, opens=2)
    done = run_isc("mark", "state", cwd=root, fail=True)
    assert "checkpoint.journal holds the checkpoints of session" in done.stderr
    assert "not this session's" in done.stderr
    assert (root / "state" / METADATA).read_bytes() == before


# -- state directories others can write ------------------------------------------------------


def test_a_state_directory_others_can_write_is_refused(root: Path) -> None:
    os.chmod(root / "state", 0o777)
    before = files(root / "state")
    done = run_isc("copy", "--full", "state", cwd=root, fail=True)
    assert "chmod" in done.stderr
    assert files(root / "state") == before
    (root / "open").mkdir(mode=0o777)
    os.chmod(root / "open", 0o777)
    run_isc("create", "open", "--source", "d2.img", cwd=root, fail=True)
    assert list((root / "open").iterdir()) == []
    os.chmod(root / "state", 0o700)
    run_isc("copy", "--full", "state", cwd=root)


def test_a_state_directory_of_another_user_is_refused(root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    os.chown(root / "state", 65534, 65534)
    before = files(root / "state")
    done = run_isc("copy", "--full", "state", cwd=root, fail=True)
    assert "uid 65534" in done.stderr
    assert files(root / "state") == before


# -- other users of the machine ----------------------------------------------------------------


def test_another_user_cannot_write_the_source_through_a_default_isc_serve(tmp_path: Path) -> None:
    nobody = another_user()
    if subprocess.run([PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("python3-libnbd is not installed (the Debian package python3-libnbd)")
    os.chmod(tmp_path, 0o755)  # the other user reaches only the export, not the files
    script = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pwrite(b'x' * 512, 0)\n"
    with isc_serve(tmp_path, None) as (uri, image, data):
        done = subprocess.run(
            [*nobody, PYTHON, "-c", script, uri],
            capture_output=True,
            timeout=TIMEOUT,
        )
        assert done.returncode != 0
    assert image.read_bytes() == data


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    # Before, FileLUN(fifo, readonly=True) blocked in open() until some process
    # opened the FIFO for writing: forever.
    os.mkfifo(tmp_path / "fifo")
    code = (
        "import sys\nfrom isc import FileLUN\nfrom isc.errors import ParameterError\n"
        "try:\n    FileLUN(sys.argv[1], readonly=True)\nexcept ParameterError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "fifo")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert "is neither a regular file nor a block device" in done.stdout, done.stderr


@pytest.mark.parametrize("where", ["directory", "journals"])
def test_an_agent_directory_others_can_write_is_refused(tmp_path: Path, where: str) -> None:
    # Before, the agent exported it: another user could put in a file it then
    # exported, or a journal its next rollback wrote into an export.
    exports = tmp_path / "exports"
    (exports / ".isc-agent").mkdir(parents=True, mode=0o700)
    FileLUN.create(exports / "disk.img", SIZE).close()
    os.chmod(exports if where == "directory" else exports / ".isc-agent", 0o777)
    listen = f"unix:{tmp_path / 'agent.sock'}"
    done = run_isc("agent", "--dir", str(exports), "--listen", listen, cwd=tmp_path, fail=True)
    assert "chmod go-w" in done.stderr
    assert not (tmp_path / "agent.sock").exists()


# -- writes that bypass the session -----------------------------------------------------------


def test_a_write_by_a_program_without_a_lock_while_the_session_holds_the_source_is_refused(
    root: Path,
) -> None:
    # Before, the image locks were all: advisory, so this write went through, and the
    # stamp taken at the clean close after it made the next open see nothing.
    if guard_missing() is not None:
        pytest.skip(str(guard_missing()))
    before = (root / "source.img").read_bytes()
    stored, _ = open_session(root / "state")
    with stored:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            write = "import os, sys; os.write(os.open(sys.argv[1], int(sys.argv[2])), b'x')"
            done = subprocess.run(
                [sys.executable, "-c", write, root / "source.img", str(flags)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            assert "PermissionError: [Errno 1]" in done.stderr
    assert (root / "source.img").read_bytes() == before


@pytest.mark.xfail(
    strict=True,
    reason="isc.guard refuses opens, and truncate(2) by path opens nothing; the size the "
    "session's stamp compares is back, and the mtime is taken at the clean close",
)
def test_a_truncate_by_path_while_the_session_holds_the_source_is_seen(root: Path) -> None:
    last = SIZE // G  # the short last chunk
    stored, _ = open_session(root / "state")
    with stored:
        os.truncate(root / "source.img", last * G)  # zeroes its tail ...
        os.truncate(root / "source.img", SIZE)  # ... at the same size
    stored, recovery = open_session(root / "state")
    with stored:
        assert recovery.source_changed is not None or stored.session.bitmap.tracking(last)
