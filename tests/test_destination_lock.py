"""Rule 12: one local destination file, one session, through the real commands.

A session holds isc's own lock (:data:`isc.store._SESSION_BYTE`) on each
local destination it has open and on its source: a second session naming
that file (under a hard link or through a loop device over it) as a
destination or its source is refused in one line naming the file and the
holding process, and nothing changes. The lock leaves QEMU's image locks
free: ``qemu-img info`` and ``qemu-nbd -r`` read a held destination, and so
does ``qemu-io`` write it (the session takes none of QEMU's bytes there).
It goes at the holder's close and at its SIGKILL (an OFD lock dies with the
last descriptor of its open).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import TIMEOUT, fill_random, session_file, wait_until
from test_cli import error_line, isc_run
from test_cli_analysis import ISC
from test_lun import _loop_device as loop_device

import isc.store
from isc import FileLUN
from isc.nbd import NBDLUN
from isc.store import create_session, open_session

SIZE = 1 << 20
REFUSED = "is in use by another isc session"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Sessions a (on a.img, destination d.img) and b (on b.img, none yet), made in process."""
    for seed, name in enumerate(("a", "b")):
        with FileLUN.create(tmp_path / f"{name}.img", SIZE) as lun:
            fill_random(lun, random.Random(seed))
        create_session(tmp_path / name, str(tmp_path / f"{name}.img"), granularity=8192)
    FileLUN.create(tmp_path / "d.img", SIZE).close()
    with open_session(tmp_path / "a")[0] as stored:
        stored.add_destination(str(tmp_path / "d.img"), "d")
    open_session(tmp_path / "b")[0].close()  # its session file as a refused command leaves it
    return tmp_path


@pytest.fixture(params=["guard", "no guard"])
def guard(request, monkeypatch) -> str:
    """With isc.guard (as root) and without it, in this process's sessions."""
    if request.param == "no guard":
        monkeypatch.setattr(isc.store, "guard_source", lambda *args: None)
    return request.param


def refused(work: Path, *args: str) -> str:
    """The one error line of ``isc ARGS`` in ``work``, which changes neither session."""
    before = {s: session_file(work / s) for s in ("a", "b")}
    line = error_line(isc_run(*args, cwd=work, check=1))
    assert {s: session_file(work / s) for s in ("a", "b")} == before
    return line


def test_two_sessions_cannot_share_a_destination(work: Path) -> None:
    os.link(work / "d.img", work / "hard.img")
    with open_session(work / "a")[0]:
        line = refused(work, "add-dest", "b", "hard.img", "--name", "d")
        assert f"destination d at {work / 'hard.img'} {REFUSED} (process {os.getpid()}:" in line
        assert "isc remove-dest" in line
    isc_run("add-dest", "b", "hard.img", "--name", "d", cwd=work)  # a closed: its lock went
    with open_session(work / "b")[0]:
        for verb in (("copy", "--full"), ("update",)):
            line = refused(work, verb[0], "a", *verb[1:])
            assert f"destination d at {work / 'd.img'} {REFUSED}" in line
    isc_run("copy", "a", "--full", cwd=work)
    assert (work / "d.img").read_bytes() == (work / "a.img").read_bytes()


def test_a_source_and_another_sessions_destination_are_one_file_at_a_time(
    work: Path, guard: str
) -> None:
    with open_session(work / "a")[0]:  # holds a.img as its source
        line = refused(work, "add-dest", "b", "a.img")
        assert "a.img is in use by another isc" in line
    with open_session(work / "a")[0]:  # holds d.img as a destination
        line = refused(work, "create", "c", "--source", "d.img")
        assert f"the source {work / 'd.img'} {REFUSED} (process {os.getpid()}:" in line
        assert not (work / "c").exists()


def test_qemu_tools_read_a_destination_a_session_holds(work: Path) -> None:
    tools = {t: shutil.which(t) for t in ("qemu-img", "qemu-nbd", "qemu-io")}
    if None in tools.values():
        pytest.skip("qemu-img, qemu-nbd and qemu-io (qemu-utils) are needed")
    isc_run("copy", "a", "--full", cwd=work)
    image = (work / "d.img").read_bytes()
    with open_session(work / "a")[0]:
        info = subprocess.run(
            [tools["qemu-img"], "info", "--output=json", "d.img"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == SIZE
        socket = work / "nbd.sock"
        served = subprocess.Popen(
            [tools["qemu-nbd"], "-r", "-f", "raw", "-k", str(socket), str(work / "d.img")],
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(socket.exists, served, "qemu-nbd's socket")
            with NBDLUN(f"nbd+unix:///?socket={socket}") as lun:
                assert lun.read(0, SIZE) == image
        finally:
            served.terminate()
            served.communicate(timeout=TIMEOUT)
        # isc takes none of QEMU's bytes on a destination: QEMU's locks let it write.
        written = subprocess.run(
            [tools["qemu-io"], "-f", "raw", "-c", "write -P 0x5a 0 4096", "d.img"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert written.returncode == 0, written.stderr
    assert (work / "d.img").read_bytes()[:4096] == b"\x5a" * 4096


def test_the_lock_dies_with_its_holder(work: Path) -> None:
    holder = subprocess.Popen(
        [*ISC, "serve", "a", "--listen", "127.0.0.1:0", "--json"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert json.loads(holder.stdout.readline())["ready"]
        line = refused(work, "add-dest", "b", "d.img")
        assert f"{REFUSED} (process {holder.pid}: " in line and " serve a " in line
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(TIMEOUT)
        holder.stdout.close()
    isc_run("add-dest", "b", "d.img", cwd=work)


def test_a_loop_device_over_a_held_destination_is_refused(work: Path) -> None:
    with loop_device(work / "d.img") as device:
        with open_session(work / "a")[0]:
            line = refused(work, "add-dest", "b", device, "--name", "d")
            assert f"destination d at {device} {REFUSED}" in line
        isc_run("add-dest", "b", device, "--name", "d", cwd=work)
        with open_session(work / "b")[0]:  # holds the device, and d.img under it
            line = refused(work, "copy", "a", "--full")
            assert f"destination d at {work / 'd.img'} {REFUSED}" in line
        isc_run("remove-dest", "b", "d", cwd=work)
