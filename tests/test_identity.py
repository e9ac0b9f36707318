"""Rule 12 (and rule 11's source stamp) against a file recreated at the inode of the one
it replaced: ext4, xfs and tmpfs give a deleted file's inode number to a later file, so
device and inode repeat; the inode's generation and birth time (:func:`isc.lun.file_birth`)
tell the two apart. And the earlier format (identities and stamps without them) keeps
working: compared on the fields it has, then recorded in the new form.

Real files on the test's directory (ext4 here) and on tmpfs (``/dev/shm``), a real
``isc agent`` process stopped and started again, real ``isc copy`` runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import threading
from pathlib import Path

import pytest
from helpers import TIMEOUT
from test_cli import (
    SIZE,
    assert_copied_in_full_to_disk,
    at_agent,
    isc_run,
    read_state,
    session,
    status,
    work,
    write_source,
)

from isc import Destination, DestState
from isc.lun import file_birth
from isc.remote import AgentSite, same_export
from isc.store import METADATA, create_session, open_session

__all__ = ["at_agent", "session", "work"]  # fixtures of test_cli used here

TRIES = 4096
"""Empty files created before giving up on the inode number repeating (other programs
free and take inodes of the same file system meanwhile)."""


def recreate_at_same_inode(path: Path, data: bytes) -> None:
    """Delete ``path`` and create a file of ``data`` there, until it gets the deleted
    file's inode number again (files of other inodes are kept aside meanwhile, so they
    are not handed out again). Skips where the file system does not repeat it."""
    inode = path.stat().st_ino
    aside = path.parent / ".aside"
    aside.mkdir()
    try:
        path.unlink()
        for n in range(TRIES):
            path.touch(exist_ok=False)
            if path.stat().st_ino == inode:
                path.write_bytes(data)
                return
            path.rename(aside / str(n))
        pytest.skip(f"{path.parent}'s file system gave inode {inode} to none of {TRIES} files")
    finally:
        shutil.rmtree(aside)


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_a_file_recreated_at_its_inode_has_another_birth(tmp_path: Path, where: str) -> None:
    directory = tmp_path if where == "tmp_path" else Path(where)
    if not directory.is_dir():
        pytest.skip(f"no {where} here")
    path = directory / f"isc-identity-{os.getpid()}"
    try:
        path.write_bytes(b"first")
        with open(path, "rb") as file:
            first = file_birth(file.fileno())
            again = file_birth(file.fileno())
        assert first == again and "btime_ns" in first  # ext4 and tmpfs keep birth times
        try:
            recreate_at_same_inode(path, b"first")
        except pytest.skip.Exception:
            if where == "/dev/shm":  # tmpfs numbers inodes afresh: the birth time suffices
                return
            raise
        with open(path, "rb") as file:
            assert file_birth(file.fileno()) != first
    finally:
        path.unlink(missing_ok=True)


def test_an_identity_of_the_earlier_format_compares_on_the_fields_it_has() -> None:
    new = "m1:2049:12/gen=7/btime_ns=99"
    assert same_export("m1:2049:12", new) and same_export(new, "m1:2049:12")
    assert same_export(new, "m1:2049:12/btime_ns=99")  # one field fewer: no generation
    assert not same_export(new, "m1:2049:12/gen=8/btime_ns=99")  # recreated at the inode
    assert not same_export(new, "m1:2049:12/gen=7/btime_ns=100")
    assert not same_export("m1:2049:12", "m1:2049:13/gen=7")
    assert not same_export("m1:2049:12", "m2:2049:12")


def test_an_agent_export_recreated_at_its_inode_gets_a_full_copy(session: Path, at_agent) -> None:
    work = session
    isc_run("copy", "s", "--full", cwd=work)
    known = read_state(work / "s").meta["destinations"][2]["identity"]
    assert "/gen=" in known or "/btime_ns=" in known
    at_agent.end()
    disk = at_agent.directory / "disk"
    recreate_at_same_inode(disk, disk.read_bytes())  # a restore from a backup, say
    at_agent.start()
    write_source(work, 0, b"changed")
    isc_run("mark", "s", cwd=work)
    done = isc_run("copy", "s", "--json", cwd=work)
    assert_copied_in_full_to_disk(done, disk, work)
    assert read_state(work / "s").meta["destinations"][2]["identity"] not in (known, None)


def test_a_session_of_the_earlier_format_keeps_its_destinations_consistent(
    session: Path, at_agent
) -> None:
    work = session
    isc_run("copy", "s", "--full", cwd=work)
    isc_run("mark", "s", cwd=work)
    isc_run("copy", "s", cwd=work)
    path = work / "s" / METADATA
    meta = json.loads(path.read_text())
    new_identity = meta["destinations"][2]["identity"]
    new_stamp = meta["source_stamp"]
    # As an earlier isc wrote it: an agent's identity "machine:dev:ino", a stamp without
    # the inode's generation and birth time.
    meta["destinations"][2]["identity"] = new_identity.split("/")[0]
    meta["source_stamp"] = {k: v for k, v in new_stamp.items() if k not in ("gen", "btime_ns")}
    assert meta["source_stamp"] != new_stamp
    path.write_text(json.dumps(meta))
    assert read_state(work / "s").source_changed is None
    write_source(work, 0, b"changed")
    isc_run("mark", "s", cwd=work)
    done = isc_run("copy", "s", "--json", cwd=work)
    assert "not the export it was" not in done.stderr
    result = json.loads(done.stdout)
    assert result["outcomes"] == {"d1": "ok", "d2": "ok", "disk": "ok"}
    assert result["bytes_seeded"] + result["bytes_sent"] < SIZE  # incremental for all
    assert [d["state"] for d in status(work)["destinations"]] == ["consistent"] * 3
    meta = json.loads(path.read_text())  # recorded in the new form
    assert meta["destinations"][2]["identity"] == new_identity
    assert meta["source_stamp"].keys() == new_stamp.keys()


def test_a_source_recreated_at_its_inode_is_another_source(session: Path) -> None:
    # Same bytes, same size, same mtime, same inode: only the generation or birth time
    # tells the file a backup put back from the one the session tracked.
    work = session
    isc_run("copy", "s", "--full", cwd=work)
    isc_run("mark", "s", cwd=work)
    isc_run("copy", "s", cwd=work)
    source = work / "source.img"
    mtime = source.stat().st_mtime_ns
    assert read_state(work / "s").source_changed is None
    recreate_at_same_inode(source, source.read_bytes())
    os.utime(source, ns=(mtime, mtime))
    stored, recovery = open_session(work / "s")
    with stored:
        assert "not the file the session tracked" in (recovery.source_changed or "")
        assert all(d.state is DestState.INCONSISTENT for d in stored.destinations)


@pytest.mark.parametrize(
    ("at_protect", "refused"),
    [("m1:2049:12/gen=7/btime_ns=99", False), ("m1:2049:12/gen=8/btime_ns=100", True)],
    ids=["agent upgraded", "file recreated"],
)
def test_a_protect_naming_the_file_its_status_named_in_the_earlier_form_is_taken(
    tmp_path: Path, at_protect: str, refused: bool
) -> None:
    # An agent upgraded between an update's identity check (an earlier agent: no
    # generation or birth time) and its protect names the same file in the new form;
    # a file recreated at the inode since names another.
    identities = iter(["m1:2049:12/btime_ns=99", at_protect])
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "agent.sock"))
        server.listen()

        def agent() -> None:
            for identity in identities:
                connection, _ = server.accept()
                with connection, connection.makefile("rwb") as stream:
                    request = json.loads(stream.readline())
                    info = {"identity": identity, "image": "i1", "lease": "l1"}
                    reply = {"id": request["id"], "ok": True, "info": info}
                    stream.write(json.dumps(reply).encode() + b"\n")

        thread = threading.Thread(target=agent)
        thread.start()
        try:
            site = AgentSite(unix=tmp_path / "agent.sock", timeout=TIMEOUT)
            dest = Destination(None, "disk")
            assert site.status(dest).ok
            ack = site.protect(dest)
        finally:
            thread.join()
    assert ack.ok is not refused
    assert ("now serves another file as disk" in (ack.reason or "")) is refused


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_status_sees_a_source_recreated_at_its_inode_as_the_next_open_does(
    tmp_path: Path, where: str
) -> None:
    # Same bytes, size, mtime and inode, a clean close before: what isc status says of
    # the source is what the session's next open finds.
    directory = tmp_path if where == "tmp_path" else Path(where) / f"isc-status-{os.getpid()}"
    if not directory.parent.is_dir():
        pytest.skip(f"no {where} here")
    directory.mkdir(exist_ok=True)
    try:
        source = directory / "source.img"
        source.write_bytes(random.Random(11).randbytes(SIZE))
        create_session(tmp_path / "s", str(source), granularity=8192)
        open_session(tmp_path / "s")[0].close()
        mtime = source.stat().st_mtime_ns
        assert status(tmp_path)["source_changed"] is None
        recreate_at_same_inode(source, source.read_bytes())
        os.utime(source, ns=(mtime, mtime))
        changed = status(tmp_path)["source_changed"]
        assert changed == (
            f"{source} is not the file the session tracked: it was replaced or renamed"
        )
        stored, recovery = open_session(tmp_path / "s")
        with stored:
            assert recovery.source_changed == changed
    finally:
        if directory != tmp_path:
            shutil.rmtree(directory)
