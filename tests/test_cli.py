"""The session commands of ``isc``, run as a user runs them: the installed ``isc`` in a subprocess.

Checked: the whole flow (create, add-dest, unmarked full copy, mark,
incremental copy, update, status) with ``--json`` parsed back and the
destinations compared with the source; every error path ends in one line on
stderr (``isc: error: ...``, exit 1; argparse's usage error, exit 2), no
traceback, and changes nothing (rule 10); a progress bar only on a terminal;
``update --every`` stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import random
import shutil
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from helpers import TIMEOUT, fill_random, wait_until
from test_cli_analysis import ISC
from test_serve import isc_serve, next_line

import isc
from isc import FileLUN, MemoryLUN
from isc.commands import status_report
from isc.nbd import NBDLUN, NBDServer, parse_uri
from isc.store import METADATA, create_session, open_session, read_state
from isc.tls import ServerTLS

if TYPE_CHECKING:  # test_remote_hostile imports this module: imported where it is used
    from test_remote_hostile import Agent

SIZE = 3 << 20
ROOT = Path(isc.__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def isc_run(*args: str, cwd: Path, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``isc ARGS`` in ``cwd``; with ``check``, assert the exit status."""
    done = subprocess.run(
        [*ISC, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert "Traceback" not in done.stderr, done.stderr
    if check is not None:
        assert done.returncode == check, done.stderr
    return done


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one line an error printed (status 1), or argparse's error line after its usage (2)."""
    lines = done.stderr.strip().splitlines()
    if done.returncode == 1:
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("isc: error: ")
    else:
        assert done.returncode == 2 and lines[0].startswith("usage: isc")
        assert ": error: " in lines[-1]
    assert done.stdout == ""
    return lines[-1]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with a random source.img and zeroed d1.img, d2.img and small.img."""
    with FileLUN.create(tmp_path / "source.img", SIZE) as source:
        fill_random(source, random.Random(3))
    for name, size in (("d1", SIZE), ("d2", SIZE), ("small", SIZE // 2)):
        FileLUN.create(tmp_path / f"{name}.img", size).close()
    return tmp_path


@pytest.fixture
def session(work: Path) -> Path:
    """``s``: a session on source.img at 8K with destinations d1 and d2 (made as isc does)."""
    create_session(work / "s", str(work / "source.img"), granularity=8192)
    stored, _ = open_session(work / "s")
    with stored:
        for name in ("d1", "d2"):
            stored.add_destination(str(work / f"{name}.img"), name)
    return work


def status(work: Path) -> dict:
    return json.loads(isc_run("status", "s", "--json", cwd=work).stdout)


def state_of(work: Path) -> dict:
    """What ``isc status --json`` would print, read in this process (faster), but the time."""
    report = status_report(str(work / "s"), read_state(work / "s"))
    del report["as_of"]
    return report


def write_source(work: Path, offset: int, data: bytes) -> None:
    """A host write through the session (the way isc serve would make it)."""
    stored, _ = open_session(work / "s")
    with stored:
        stored.session.write(offset, data)


def test_full_flow_create_copy_mark_copy_status(session: Path) -> None:
    work = session
    report = status(work)
    assert report["granularity"] == 8192 and report["state"] == "unmarked"
    assert report["source"] == str(work / "source.img")
    assert [(d["name"], d["state"], d["in_step"]) for d in report["destinations"]] == [
        ("d1", "new", False),
        ("d2", "new", False),
    ]

    full = isc_run("copy", "s", "--full", "--unmarked", "--json", cwd=work)
    assert full.stderr == ""  # no progress bar off a terminal
    result = json.loads(full.stdout)
    assert result["mode"] == "full-unmarked" and result["bytes_sent"] == SIZE
    assert result["outcomes"] == {"d1": "ok", "d2": "ok"}
    assert [d["state"] for d in status(work)["destinations"]] == ["inconsistent"] * 2

    write_source(work, 12345, b"\xab" * 20000)
    assert "marked s: generation 1" in isc_run("mark", "s", cwd=work).stdout
    assert status(work)["state"] == "marked"
    result = json.loads(isc_run("copy", "s", "--json", cwd=work).stdout)
    assert result["mode"] == "incremental" and result["chunks_sent"] == 3
    assert [d["state"] for d in result["destinations"]] == ["consistent"] * 2

    write_source(work, SIZE - 100, b"\xcd" * 100)
    update = isc_run("update", "s", "--json", cwd=work)
    (line,) = update.stdout.splitlines()
    assert json.loads(line)["chunks_sent"] == 1

    report = status(work)
    assert report["state"] == "unmarked" and report["generation"] == 2
    assert report["tracking"] == {"chunks": 0, "bytes": 0}
    assert all(d["state"] == "consistent" and d["in_step"] for d in report["destinations"])
    source = (work / "source.img").read_bytes()
    assert (work / "d1.img").read_bytes() == source == (work / "d2.img").read_bytes()
    text = isc_run("status", "s", cwd=work).stdout
    assert "state        unmarked, generation 2" in text and "d2  consistent" in text


def test_status_counts_the_short_last_chunk(work: Path) -> None:
    (work / "odd.img").write_bytes(bytes(SIZE - 1000))
    isc_run("create", "s", "--source", "odd.img", "--granularity", "4K", cwd=work)
    write_source(work, SIZE - 1500, b"x" * 500)
    report = status(work)
    assert report["tracking"] == {"chunks": 1, "bytes": 4096 - 1000}


def test_save_area_with_a_path_and_sizes_with_units(work: Path) -> None:
    isc_run(
        "create", "s", "--source", "source.img", "--granularity", "2K", "--save-area",
        "1.5M,area.bin", cwd=work,
    )  # fmt: skip
    report = status(work)
    assert report["save_area"] == {"capacity": 3 << 19, "path": str(work / "area.bin")}
    assert report["granularity"] == 2048


def test_a_progress_bar_shows_on_a_terminal(session: Path) -> None:
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(
            [*ISC, "copy", "s", "--full"],
            cwd=session,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=TIMEOUT,
        )
    finally:
        os.close(terminal)
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except OSError:  # EIO: the terminal's other end is closed and drained
        pass
    finally:
        os.close(master)
    assert done.returncode == 0
    assert b"100%" in shown and b"3.00M" in shown


def test_update_every_stops_cleanly_on_sigterm(session: Path) -> None:
    isc_run("copy", "s", "--full", cwd=session)
    child = subprocess.Popen(
        [*ISC, "update", "s", "--every", "60", "--json"],
        cwd=session,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = child.stdout.readline()  # the first update runs at once
        assert json.loads(first)["outcomes"] == {"d1": "ok", "d2": "ok"}
        child.send_signal(signal.SIGTERM)
        assert child.wait(TIMEOUT) == 0
    finally:
        child.kill()
        child.wait(TIMEOUT)
        child.stdout.close()
        child.stderr.close()
    report = status(session)
    assert not report["in_use"] and report["recovery_pending"] is None


# -- errors --------------------------------------------------------------------------------


def test_missing_session(work: Path) -> None:
    for command in (["status", "nowhere"], ["mark", "nowhere"], ["copy", "nowhere"]):
        line = error_line(isc_run(*command, cwd=work, check=1))
        assert "nowhere holds no isc session" in line
    assert not (work / "nowhere").exists()


@pytest.mark.parametrize(
    ("steps", "last", "message"),
    [
        ([], ["copy", "s"], "s is unmarked: an incremental copy sends a marked point in time"),
        ([["mark", "s"]], ["mark", "s"], "s is already marked (generation 1)"),
        (
            [["mark", "s"], ["copy", "s", "--full"], ["mark", "s"], ["write"]],
            ["copy", "s", "--full"],
            "s is marked (generation 3) and 1 chunk(s) were written since: a full copy of that "
            "mark cannot be made; unmark it (isc unmark)",
        ),
        ([["mark", "s"]], ["update", "s"], "s is already marked"),
        ([["mark", "s"]], ["copy", "s"], "d1, d2 of s are new, replaced or missed an earlier copy"),
    ],
    ids=[
        "copy unmarked",
        "mark twice",
        "full copy of a mark written since",
        "update while marked",
        "incremental to new destinations",
    ],
)
def test_wrong_state_is_one_line_and_changes_nothing(
    session: Path, steps: list, last: list, message: str
) -> None:
    for step in steps:
        if step == ["write"]:  # a chunk outside the mark's transfer bitmap
            write_source(session, 0, b"w")
        else:
            isc_run(*step, cwd=session)
    before = state_of(session)
    assert message in error_line(isc_run(*last, cwd=session, check=1))
    assert state_of(session) == before


def test_unmark_of_an_unmarked_session_changes_nothing_and_succeeds(session: Path) -> None:
    # As Session.unmark(): a caller can unmark to be sure without asking first.
    before = state_of(session)
    done = isc_run("unmark", "s", cwd=session)
    assert done.stdout == "s is not marked; there was nothing to unmark\n"
    record = json.loads(isc_run("unmark", "s", "--json", cwd=session).stdout)
    assert record == {"session": "s", "generation": 0, "returned_chunks": 0}
    assert state_of(session) == before


@pytest.mark.parametrize("command", [["rollback", "s", "d1"], ["update", "s"]])
def test_an_unreachable_site(session: Path, command: list) -> None:
    isc_run("copy", "s", "--full", cwd=session)
    before = state_of(session)
    args = [*command, "--site", "127.0.0.1:1", "--timeout", "2"]
    line = error_line(isc_run(*args, cwd=session, check=1))
    assert "the agent at 127.0.0.1:1 refused the connection (is `isc agent` running" in line
    assert "d1" in line and "Errno" not in line
    after = state_of(session)
    # An update through the agent marked, then unmarked when protection failed.
    assert after.pop("generation") - before.pop("generation") == (line.count("protect") > 0)
    assert after == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--granularity", "3K"], "granularity '3K' must be a power of two from 2K to 64K"),
        (["--granularity", "128K"], "must be a power of two from 2K to 64K"),
        (["--granularity", "lots"], "'lots' is not a size"),
        (["--save-area", "12Q"], "'12Q' is not a size"),
        (["--save-area", "0"], "must be more than 0 bytes"),
        (["--save-area", "1.5"], "not a whole number of bytes"),
        (["--save-area", ",area.bin"], "'' is not a size"),
    ],
)
def test_create_refuses_bad_sizes_as_usage_errors(work: Path, args: list, message: str) -> None:
    done = isc_run("create", "s", "--source", "source.img", *args, cwd=work, check=2)
    assert message in error_line(done)
    assert not (work / "s").exists()


def test_create_refuses_a_missing_source_and_an_existing_session(work: Path) -> None:
    line = error_line(isc_run("create", "s", "--source", "nope.img", cwd=work, check=1))
    assert f"cannot open the source at {work / 'nope.img'}: No such file" in line
    assert not (work / "s").exists()
    isc_run("create", "s", "--source", "source.img", cwd=work)
    before = files(work / "s")
    line = error_line(isc_run("create", "s", "--source", "source.img", cwd=work, check=1))
    assert "already holds an isc session" in line
    assert files(work / "s") == before


@pytest.mark.parametrize("area", ["60K", "60K,area.bin"])
def test_create_refuses_a_save_area_smaller_than_one_chunk(work: Path, area: str) -> None:
    # It could hold no COFW save: every marked copy that met a host write would fail.
    done = isc_run("create", "s", "--source", "source.img", "--save-area", area, cwd=work, check=1)
    line = error_line(done)
    assert "save area of 61440 bytes cannot hold one chunk of 65536 bytes (granularity 64K)" in line
    assert line.endswith("give a save area of at least 64K (isc create --save-area)")
    assert not (work / "s").exists() and not (work / "area.bin").exists()


def test_create_refuses_a_state_directory_inside_another_sessions(session: Path) -> None:
    # Before, it was taken: named as a file the outer session makes at its open, it stopped
    # every open of that session ("s/checkpoint.journal cannot be read: Is a directory").
    work = session
    create_session(work / "new", str(work / "small.img"))  # not opened: no journal yet
    (work / "link").symlink_to("new")
    outer = os.path.realpath(work / "new")
    for inner in ("new/checkpoint.journal", "link/sub", "s/../new/x/y"):
        line = error_line(isc_run("create", inner, "--source", "d2.img", cwd=work, check=1))
        assert f"{inner} lies in {outer}, the state directory of session new" in line
    assert sorted(p.name for p in (work / "new").iterdir()) == ["session.json"]
    open_session(work / "new")[0].close()


def test_create_refuses_a_state_directory_around_another_sessions(session: Path) -> None:
    work = session
    (work / "outer" / "x").mkdir(parents=True)
    create_session(work / "outer" / "x" / "inner", str(work / "small.img"))
    line = error_line(isc_run("create", "outer", "--source", "d2.img", cwd=work, check=1))
    inner = os.path.realpath(work / "outer" / "x" / "inner")
    assert f"outer holds {inner}, the state directory of session inner" in line
    assert sorted(p.name for p in (work / "outer").iterdir()) == ["x"]
    # The working directory itself holds the sessions s and inner.
    line = error_line(isc_run("create", ".", "--source", "d2.img", cwd=work, check=1))
    assert "the state directory of session" in line and not (work / "session.json").exists()


def test_unreachable_destinations(session: Path) -> None:
    before = state_of(session)
    for target, message in (
        ("missing.img", "cannot open the destination at"),
        ("small.img", "less than the source's"),
        ("nbd+unix:///x?socket=no-such.sock", "cannot open the destination at nbd+unix"),
    ):
        line = error_line(isc_run("add-dest", "s", target, cwd=session, check=1))
        assert message in line
    assert state_of(session) == before
    (session / "d2.img").unlink()
    before = files(session / "s")
    line = error_line(isc_run("copy", "s", "--full", cwd=session, check=1))
    assert f"cannot open destination d2 at {session / 'd2.img'}" in line
    assert files(session / "s") == before


def test_a_copy_with_no_destination(work: Path) -> None:
    isc_run("create", "s", "--source", "source.img", cwd=work)
    line = error_line(isc_run("copy", "s", "--full", cwd=work, check=1))
    assert "s has no destinations; add one with isc add-dest" in line


def test_corrupt_session_file(session: Path) -> None:
    meta = session / "s" / METADATA
    meta.write_text(meta.read_text()[:-20])
    before = files(session / "s")
    for command in (["status", "s"], ["mark", "s"]):
        line = error_line(isc_run(*command, cwd=session, check=1))
        assert "s/session.json is not valid JSON" in line
    assert files(session / "s") == before


def test_a_session_file_without_sites_reads_as_before_and_a_bad_site_is_refused(
    session: Path,
) -> None:
    path = session / "s" / METADATA
    meta = json.loads(path.read_text())
    for dest in meta["destinations"]:
        del dest["site"]  # as isc wrote it before add-dest --site
    path.write_text(json.dumps(meta))
    assert [d["site"] for d in status(session)["destinations"]] == [None, None]
    assert "    site none of its own: " in isc_run("status", "s", cwd=session).stdout
    isc_run("update", "s", cwd=session)
    assert [(d["state"], d["site"]) for d in status(session)["destinations"]] == [
        ("consistent", None)
    ] * 2
    meta = json.loads(path.read_text())
    meta["destinations"][0]["site"] = "nowhere"
    path.write_text(json.dumps(meta))
    before = files(session / "s")
    line = error_line(isc_run("update", "s", cwd=session, check=1))
    assert "s/session.json: destination" in line and "is not {name, target, site," in line
    assert files(session / "s") == before


def test_a_session_in_use(session: Path) -> None:
    stored, _ = open_session(session / "s")
    with stored:
        line = error_line(isc_run("mark", "s", cwd=session, check=1))
        assert "s is in use by another isc process" in line
        assert status(session)["in_use"]  # status reads without the lock


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["copy", "s", "--unmarked"], "--unmarked needs --full"),
        (["rollback", "s", "d1"], "rollback needs --site HOST:PORT"),
        (["update", "s", "--site", "nowhere"], "'nowhere' is not HOST:PORT"),
        (["rollback", "s", "d1", "--site", "unix:"], "unix:PATH needs a path"),
        (["update", "s", "--every", "-1"], "must be a finite number > 0"),
        (["copy", "s", "--throttle", "fast"], "'fast' is not a size"),
        (["copy", "s", "--throttle", "0.0001"], "'0.0001' bytes per second is too slow: give "),
        (["update", "s", "--throttle", "1"], "'1' bytes per second is too slow: give at least 1K"),
        (["update", "s", "--every", "1e300"], "'1e300' is out of range: give a number from"),
        (["update", "s", "--timeout", "1e-300"], "out of range: give a number from 1e-06 to 1e+09"),
        (["serve", "s", "--every", "nan"], "'nan' must be a finite number > 0"),
    ],
)
def test_usage_errors(session: Path, args: list, message: str) -> None:
    before = files(session / "s")
    assert message in error_line(isc_run(*args, cwd=session, check=2))
    assert files(session / "s") == before


# -- what a session trusts around it (rules 10, 11) ------------------------------------------


def test_create_refuses_a_save_area_that_names_the_source(work: Path) -> None:
    source = (work / "source.img").read_bytes()
    args = ["create", "s", "--source", "source.img", "--save-area", f"8M,{work}/source.img"]
    line = error_line(isc_run(*args, cwd=work, check=1))
    assert f"save area path {work / 'source.img'} exists" in line
    assert not (work / "s").exists()
    assert (work / "source.img").read_bytes() == source


def test_an_nbd_uri_is_stored_with_the_paths_of_its_query_made_absolute(
    work: Path, credentials
) -> None:
    # A destination on a Unix socket, over TLS, both named relative to where
    # add-dest runs; the session is then copied from another directory.
    (work / "run").mkdir()
    (work / "elsewhere").mkdir()
    served = MemoryLUN(SIZE)
    server = NBDServer(served, name="d", tls=ServerTLS(credentials["good"]))
    server.start_unix(work / "run" / "d.sock")
    try:
        creds = quote(os.path.relpath(credentials["good"], work / "run"), safe="/")
        uri = f"nbds+unix:///d?socket=d.sock&tls-certificates={creds}&tls-verify-peer=true"
        isc_run("create", "s", "--source", "source.img", cwd=work)
        isc_run("add-dest", "../s", uri, cwd=work / "run")
        (target,) = [d["target"] for d in state_of(work)["destinations"]]
        stored = parse_uri(target)
        assert isinstance(stored.address, str) and os.path.isabs(stored.address)
        assert Path(stored.address).samefile(work / "run" / "d.sock")
        assert stored.tls is not None and stored.tls.certificates is not None
        assert os.path.isabs(stored.tls.certificates)
        assert Path(stored.tls.certificates).samefile(credentials["good"])
        assert target.endswith("&tls-verify-peer=true")  # the rest as given
        isc_run("copy", "../s", "--full", cwd=work / "elsewhere")
        assert served.read(0, SIZE) == (work / "source.img").read_bytes()
    finally:
        server.close()


def test_create_and_add_dest_refuse_the_source_under_another_name(session: Path) -> None:
    (session / "alias.img").symlink_to(session / "source.img")
    before = state_of(session)
    line = error_line(isc_run("add-dest", "s", "./alias.img", cwd=session, check=1))
    assert f"{session / 'alias.img'} is the source of s" in line
    assert state_of(session) == before
    stored, _ = open_session(session / "s")
    with stored:  # holds the source's lock
        line = error_line(isc_run("create", "t", "--source", "alias.img", cwd=session, check=1))
        assert "alias.img is in use by another isc session" in line
    assert not (session / "t").exists()


def test_a_lost_checkpoint_is_reported_and_recover_starts_again(session: Path) -> None:
    isc_run("copy", "s", "--full", cwd=session)
    for path in (session / "s").glob("checkpoint.*"):
        path.unlink()
    text = isc_run("status", "s", cwd=session).stdout
    assert "damaged      the checkpoint" in text and "is missing" in text
    assert f"isc recover {session / 's'} --reset-destinations" in text
    assert status(session)["damage"] is not None
    before = files(session / "s")
    line = error_line(isc_run("mark", "s", cwd=session, check=1))
    assert "is missing" in line and "--reset-destinations" in line
    assert "--reset-destinations" in error_line(isc_run("recover", "s", cwd=session, check=2))
    assert files(session / "s") == before
    done = isc_run("recover", "s", "--reset-destinations", cwd=session)
    assert "every destination NEW (d1, d2)" in done.stdout
    report = status(session)
    assert report["damage"] is None and report["tracking"]["chunks"] == report["chunks"]
    assert [d["state"] for d in report["destinations"]] == ["new", "new"]
    isc_run("copy", "s", "--full", cwd=session)
    source = (session / "source.img").read_bytes()
    assert (session / "d1.img").read_bytes() == source == (session / "d2.img").read_bytes()


def test_a_write_outside_the_session_is_reported(session: Path) -> None:
    isc_run("copy", "s", "--full", cwd=session)  # reads the source: its mtime stays
    os.utime(session / "source.img", ns=(10**18, 10**18))
    open_session(session / "s")[0].close()  # a clean close: the stamp takes that mtime
    assert status(session)["source_changed"] is None
    with FileLUN(session / "source.img") as source:
        source.write(4096, b"not through the session")
    text = isc_run("status", "s", cwd=session).stdout
    assert "changed      " in text and "modified while no isc process held it" in text
    done = isc_run("mark", "s", cwd=session)
    assert "modified while no isc process held it" in done.stderr
    assert "every chunk of s will be copied again" in done.stderr
    report = status(session)
    assert report["source_changed"] is None and report["transfer"]["chunks"] == report["chunks"]
    assert [d["state"] for d in report["destinations"]] == ["inconsistent"] * 2


# -- the output options, and a report from every verb ----------------------------------------


def test_version_and_the_output_options_before_or_after_the_verb(session: Path) -> None:
    assert isc_run("--version", cwd=session).stdout == f"isc {isc.__version__}\n"
    before, after = (
        json.loads(isc_run(*args, cwd=session).stdout)
        for args in (["--json", "status", "s"], ["status", "s", "--json"])
    )
    assert before["destinations"] == after["destinations"]
    for args in (["-v", "mark", "s"], ["mark", "s", "--verbose"]):
        done = isc_run(*args, cwd=session)
        assert "isc.session: s: marked" in done.stderr  # the log, on stderr
        isc_run("unmark", "s", "-q", cwd=session)
    quiet = isc_run("-q", "copy", "s", "--full", cwd=session)
    assert quiet.stdout == "" and quiet.stderr == ""
    assert [d["state"] for d in state_of(session)["destinations"]] == ["consistent"] * 2
    before = files(session / "s")
    for args, message in (
        (["--json", "demo"], "this verb prints no JSON; drop --json"),
        (["status", "s", "-q", "--json"], "--quiet contradicts --verbose and --json"),
        (["-q", "-v", "mark", "s"], "--quiet contradicts --verbose"),
    ):
        assert message in error_line(isc_run(*args, cwd=session, check=2))
    assert files(session / "s") == before


def test_every_verb_that_reports_prints_json(work: Path) -> None:
    def run(*args: str) -> dict:
        done = isc_run(*args, "--json", cwd=work)
        (line,) = done.stdout.splitlines()
        return json.loads(line)

    made = run("create", "s", "--source", "source.img", "--granularity", "8K")
    assert made == {
        "session": str(work / "s"),
        "name": "s",
        "source": str(work / "source.img"),
        "granularity": 8192,
    }
    added = run("add-dest", "s", "d1.img")
    assert added["destination"] == "d1.img" and added["state"] == "new"
    assert added["size"] == SIZE and not added["created"]
    assert run("copy", "s", "--full")["outcomes"] == {"d1.img": "ok"}
    write_source(work, 0, b"x" * 9000)
    marked = run("mark", "s")
    assert marked["generation"] == 2 and marked["transfer_chunks"] == 2
    assert run("unmark", "s")["returned_chunks"] == 2
    update = run("update", "s")
    assert update["ok"] and update["chunks_sent"] == 2 and "T" in update["time"]
    assert run("recover", "s", "--reset-destinations")["destinations_new"] == ["d1.img"]
    removed = run("remove-dest", "s", "d1.img")
    # A file is held by no site: nothing was let go there, and the reply says none.
    assert removed["removed"] == "d1.img" and removed["released"] is None
    assert run("destroy", "s")["destroyed"] == str(work / "s")


def test_status_lists_the_destinations_and_when_its_figures_were_taken(session: Path) -> None:
    text = isc_run("status", "s", cwd=session).stdout
    assert "None" not in text and "<" not in text
    assert "  d1  new  never copied  first copy is full" in text
    assert f"    {session / 'd2.img'}" in text
    stamp = text.split("as of        ")[1][:20]
    assert re_timestamp(stamp)
    report = status(session)
    assert [(d["name"], d["target"]) for d in report["destinations"]] == [
        ("d1", str(session / "d1.img")),
        ("d2", str(session / "d2.img")),
    ]
    assert re_timestamp(report["as_of"])


def re_timestamp(text: str) -> bool:
    """Whether ``text`` is an ISO 8601 UTC time to the second, within a day of now."""
    import datetime

    when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 86400


def test_update_prints_one_timestamped_line_per_update(session: Path) -> None:
    isc_run("copy", "s", "--full", cwd=session)
    write_source(session, 0, b"y")
    (line,) = isc_run("update", "s", cwd=session).stdout.splitlines()
    stamp, text = line.split(" ", 1)
    assert re_timestamp(stamp)
    assert text.startswith("update of s: 8.00 KiB sent in 1 run(s)")
    assert text.endswith("d1 consistent, d2 consistent")


# -- remove-dest and destroy ---------------------------------------------------------------


def test_remove_dest_leaves_its_data_and_refuses_an_unknown_name(session: Path) -> None:
    isc_run("copy", "s", "--full", cwd=session)
    before = state_of(session)
    line = error_line(isc_run("remove-dest", "s", "d3", cwd=session, check=1))
    assert "s has no destination 'd3' (it has d1, d2)" in line
    assert state_of(session) == before
    data = (session / "d2.img").read_bytes()
    done = isc_run("remove-dest", "s", "d2", cwd=session)
    assert done.stdout == "removed destination d2 from s; its data stays as it is\n"
    assert [d["name"] for d in state_of(session)["destinations"]] == ["d1"]
    assert (session / "d2.img").read_bytes() == data
    write_source(session, 0, b"z")
    isc_run("update", "s", cwd=session)  # d2 is not copied to any more
    assert (session / "d2.img").read_bytes() == data


def test_remove_dest_is_refused_while_a_copy_holds_it(session: Path) -> None:
    stored, _ = open_session(session / "s")
    with stored:
        line = error_line(isc_run("remove-dest", "s", "d1", cwd=session, check=1))
        assert "s is in use by another isc process" in line
        stored.begin_copy(stored.destinations, "incremental")
        with pytest.raises(isc.StateError, match="a copy to destination d1 of s is running"):
            stored.remove_destination("d1")
        stored.save()
        stored.remove_destination("d1")  # the copy ended
    assert [d["name"] for d in state_of(session)["destinations"]] == ["d2"]


def test_destroy_removes_the_session_and_nothing_else(session: Path) -> None:
    isc_run("copy", "s", "--full", cwd=session)
    around = files(session)
    done = isc_run("destroy", "s", cwd=session)
    assert done.stdout.startswith("destroyed s: ") and not (session / "s").exists()
    assert files(session) == around  # source and destinations untouched


def test_destroy_refuses_what_is_not_a_session(session: Path) -> None:
    (session / "empty").mkdir()
    (session / "foreign").mkdir()
    (session / "foreign" / METADATA).write_text('{"format": "something-else"}')
    (session / "link").symlink_to(session / "s")
    for target, message in (
        ("source.img", "source.img is not an isc session directory; nothing removed"),
        ("empty", "empty is not an isc session directory"),
        ("foreign", "foreign/session.json is not an isc session file; nothing removed"),
        ("link", "link is a symbolic link; give the session directory itself"),
    ):
        around = files(session)
        line = error_line(isc_run("destroy", target, cwd=session, check=1))
        assert message in line
        assert files(session) == around
    assert (session / "foreign" / METADATA).exists() and (session / "s" / METADATA).exists()


def test_destroy_refuses_a_held_session_and_one_holding_other_files(session: Path) -> None:
    stored, _ = open_session(session / "s")
    with stored:
        before = files(session / "s")
        line = error_line(isc_run("destroy", "s", cwd=session, check=1))
        assert "s is in use by another isc process" in line
        assert files(session / "s") == before
    # A symlink in it points out of it: never followed, and the session stays whole.
    (session / "s" / "notes").symlink_to(session / "d1.img")
    (session / "s" / "sub").mkdir()
    before, around = files(session / "s"), files(session)
    line = error_line(isc_run("destroy", "s", cwd=session, check=1))
    assert "s holds files isc did not make (notes, sub): move them out" in line
    assert files(session / "s") == before and files(session) == around
    (session / "s" / "notes").unlink()
    (session / "s" / "sub").rmdir()
    isc_run("destroy", "s", cwd=session)
    assert not (session / "s").exists()


def test_a_killed_nbd_destination_is_named_by_its_uri_without_reprs_or_errnos(work: Path) -> None:
    from test_nbd import spawn, tool

    sock = work / "qemu.sock"
    args = [tool("qemu-nbd"), "-f", "raw", "-k", str(sock), "--persistent", str(work / "d1.img")]
    with spawn(args, sock) as remote:
        isc_run("create", "s", "--source", "source.img", cwd=work)
        isc_run("add-dest", "s", remote.uri, cwd=work)
        copy = subprocess.Popen(
            [*ISC, "copy", "s", "--full", "--throttle", "1M"],
            cwd=work,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        with copy:
            wait_until(lambda: any((work / "d1.img").read_bytes()), copy, "data at qemu-nbd")
            remote.proc.kill()
            _, stderr = copy.communicate(timeout=TIMEOUT)
    assert copy.returncode == 1, stderr
    (line,) = stderr.strip().splitlines()
    assert f"lost its connection: the NBD server at {remote.uri!r} closed the connection" in line
    assert "<" not in line and "Errno" not in line, line


# -- add-dest --create and a full copy of a mark ---------------------------------------------


def test_add_dest_create_makes_a_sparse_file_of_the_sources_size(session: Path) -> None:
    done = isc_run("add-dest", "s", "new.img", "--create", cwd=session)
    assert done.stdout == "added destination new.img (created) (3.00 MiB): its first copy is full\n"
    made = (session / "new.img").stat()
    assert made.st_size == SIZE and made.st_blocks == 0
    isc_run("copy", "s", "--full", cwd=session)
    assert (session / "new.img").read_bytes() == (session / "source.img").read_bytes()


def test_add_dest_create_never_overwrites_and_cleans_up_after_itself(session: Path) -> None:
    before = state_of(session)
    around = files(session)
    for target, message in (
        ("d1.img", "d1.img exists: --create never overwrites a file; to copy to it as it is, "
         "run add-dest without --create"),
        ("small.img", f"small.img exists (it holds {SIZE // 2} bytes, the source {SIZE})"),
        ("nbd://localhost/x", "--create makes a file, and nbd://localhost/x is a URI"),
    ):  # fmt: skip
        assert message in error_line(
            isc_run("add-dest", "s", target, "--create", cwd=session, check=1)
        )
    line = error_line(isc_run("add-dest", "s", "d9.img", "--create", "--name", "d1",
                              cwd=session, check=1))  # fmt: skip
    assert "s already has a destination named d1" in line
    assert files(session) == around and not (session / "d9.img").exists()
    assert state_of(session) == before


def test_a_full_copy_of_a_marked_session_copies_that_mark(session: Path) -> None:
    isc_run("copy", "s", "--full", "--unmarked", cwd=session)
    write_source(session, 0, b"m" * 100)
    assert "marked s: generation 1" in isc_run("mark", "s", cwd=session).stdout
    result = json.loads(isc_run("copy", "s", "--full", "--json", cwd=session).stdout)
    assert result["mode"] == "full" and result["bytes_sent"] == SIZE
    assert [d["state"] for d in result["destinations"]] == ["consistent"] * 2
    report = state_of(session)
    assert report["state"] == "unmarked" and report["tracking"]["chunks"] == 0
    source = (session / "source.img").read_bytes()
    assert (session / "d1.img").read_bytes() == source == (session / "d2.img").read_bytes()


# -- no Python internals in what a user reads ------------------------------------------------


def test_a_file_given_as_a_session_is_named_as_such(work: Path) -> None:
    for command in (["status", "source.img"], ["mark", "source.img"], ["destroy", "source.img"]):
        line = error_line(isc_run(*command, cwd=work, check=1))
        assert "source.img is not an isc session directory" in line
        assert "Errno" not in line and "'" not in line
    line = error_line(isc_run("create", "source.img/s", "--source", "d1.img", cwd=work, check=1))
    assert line == "isc: error: source.img/s: a part of this path is a file, not a directory"


def test_an_os_error_is_printed_without_pythons_errno_prefix() -> None:
    from isc.cli import describe

    assert describe(OSError(108, "the NBD server closed the connection")) == (
        "the NBD server closed the connection"
    )
    assert describe(FileNotFoundError(2, "No such file or directory", "x.img")) == (
        "x.img: No such file or directory"
    )
    assert describe(ConnectionError("lost")) == "lost"


# -- a session isc serve holds ---------------------------------------------------------------


def test_mark_copy_and_status_talk_to_the_server_that_holds_the_session(session: Path) -> None:
    isc_run("copy", "s", "--full", cwd=session)
    control = session / "ctl.sock"
    serve = ["s", "--listen", "127.0.0.1:0", "--control", f"unix:{control}"]
    with isc_serve(session, *serve) as (served, _):
        with NBDLUN(served["uri"], timeout=TIMEOUT) as lun:
            lun.write(SIZE - 10, b"served")
            lun.flush()
        report = status(session)
        assert report["live"] and report["served_by"]["control"] == f"unix:{control}"
        assert report["tracking"] == {"chunks": 1, "bytes": 8192}
        assert re_timestamp(report["as_of"])
        text = isc_run("status", "s", cwd=session).stdout
        assert f"control port unix:{control}; figures taken live from it" in text
        assert "marked s: generation 2, 1 chunk(s)" in isc_run("mark", "s", cwd=session).stdout
        result = json.loads(isc_run("copy", "s", "--json", cwd=session).stdout)
        assert result["mode"] == "incremental" and result["chunks_sent"] == 1
        assert [d["state"] for d in result["destinations"]] == ["consistent"] * 2
        done = isc_run("unmark", "s", cwd=session)
        assert done.stdout == "s is not marked; there was nothing to unmark\n"
        isc_run("mark", "s", cwd=session)
        done = isc_run("unmark", "s", "--json", cwd=session)
        assert json.loads(done.stdout) == {"session": "s", "generation": 3, "returned_chunks": 0}
        line = error_line(isc_run("copy", "s", cwd=session, check=1))
        pid = report["served_by"]["pid"]
        assert line.startswith(
            f"isc: error: s is held by isc serve (pid {pid}), which refused copy"
        )
        line = error_line(isc_run("remove-dest", "s", "d1", cwd=session, check=1))
        assert f"stop it (SIGTERM) to remove-dest here; its control port unix:{control}" in line
    source = (session / "source.img").read_bytes()
    assert (session / "d1.img").read_bytes() == source == (session / "d2.img").read_bytes()
    assert not (session / "s" / "serve.json").exists()
    assert status(session)["served_by"] is None


def test_a_server_without_a_control_port_is_named_with_the_way_to_reach_it(session: Path) -> None:
    with isc_serve(session, "s", "--listen", "127.0.0.1:0"):
        before = files(session / "s")
        line = error_line(isc_run("mark", "s", cwd=session, check=1))
        assert "which has no control port: stop it to mark here, or serve it with " in line
        assert "--control unix:PATH and isc mark asks it" in line
        text = isc_run("status", "s", cwd=session).stdout
        assert "control port none; figures as of its last checkpoint" in text
        assert files(session / "s") == before


# -- shell completion and the man page --------------------------------------------------------


def complete(script: str, *words: str, cwd: Path) -> list[str]:
    """What the completion ``script`` offers for ``isc WORDS`` (the last word being typed)."""
    line = " ".join(f"'{word}'" for word in ("isc", *words))
    ask = f'COMP_WORDS=({line}); COMP_CWORD={len(words)}; _isc; printf "%s\\n" "${{COMPREPLY[@]}}"'
    done = subprocess.run(
        ["bash", "--norc", "-c", f"{script}\n{ask}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout.split()


def test_completion_and_the_man_page_name_every_verb(work: Path) -> None:
    from isc.cli import build_parser, verbs

    names = list(verbs(build_parser()))
    assert {"remove-dest", "destroy", "completion", "man", "bench write-path"} <= set(names)
    script = isc_run("completion", "bash", cwd=work).stdout
    assert set(complete(script, "", cwd=work)) >= {name.split()[0] for name in names}
    assert complete(script, "rem", cwd=work) == ["remove-dest"]
    assert "--create" in complete(script, "add-dest", "s", "--cr", cwd=work)
    assert complete(script, "serve", "s", "--tls", "", cwd=work) == ["off", "on", "require"]
    assert complete(script, "--json", "sta", cwd=work) == [
        "status"
    ]  # past an option before the verb
    assert "write-path" in complete(script, "bench", "", cwd=work)
    assert "source.img" in complete(script, "create", "s", "--source", "sour", cwd=work)
    zsh = isc_run("completion", "zsh", cwd=work).stdout
    assert zsh == "autoload -U +X bashcompinit && bashcompinit\n" + script.replace("bash", "zsh", 2)
    page = isc_run("man", cwd=work).stdout
    assert page.startswith(".TH ISC 1")
    for name in names:
        assert f"\n.SS {name.replace('-', chr(92) + '-')}\n" in page, name
    if shutil.which("groff") is None:
        pytest.skip("groff (Debian package groff-base) is not installed: the page is not rendered")
    shown = subprocess.run(
        ["groff", "-man", "-Tascii", "-ww"], input=page, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert "isc mark [-h] [--json] [-v] [-q] SESSION\n" in shown.stdout


# -- isc copy and the agents of its destinations ---------------------------------------------


@pytest.fixture
def at_agent(session: Path) -> Iterator[Agent]:
    """The ``session`` with a third destination, ``disk``: the export of an ``isc agent``
    of ``exports/`` at its own site (a test_remote_hostile.Agent, which can start again
    at its address)."""
    from test_remote_hostile import Agent

    exports, logs = session / "exports", session / "logs"
    for directory in (exports, logs):
        directory.mkdir()
    (exports / "disk").write_bytes(bytes(SIZE))
    agent = Agent(exports, ENV, logs)
    try:
        agent.start()
        isc_run("add-dest", "s", agent.uri, "--site", agent.site, cwd=session)
        yield agent
    finally:
        agent.end()


def assert_copied_in_full_to_disk(done: subprocess.CompletedProcess, disk: Path, work: Path):
    """``done``, an ``isc copy --json`` of ``work``'s session, found that the agent of its
    destination ``disk`` serves another file, and gave that file every chunk."""
    assert "isc: disk is not the export it was (its agent names another file" in done.stderr
    result = json.loads(done.stdout)
    assert result["outcomes"] == {"d1": "ok", "d2": "ok", "disk": "ok"}
    assert result["bytes_seeded"] + result["bytes_sent"] == SIZE  # every chunk to disk
    assert disk.read_bytes() == (work / "source.img").read_bytes()


@pytest.mark.parametrize("served", [False, True], ids=["alone", "asking-isc-serve"])
def test_copy_checks_what_file_a_destinations_agent_serves_before_relying_on_it(
    session: Path, at_agent, served: bool
) -> None:
    # Rule 12 at an agent, as isc update checks it: another file at the export (here a
    # copy of the same bytes, which its samples cannot tell) gets every chunk, whether
    # isc copy runs the copy or asks the isc serve that holds the session for it.
    work = session
    moved = _another_file_behind(at_agent, work)
    write_source(work, 0, b"changed")
    isc_run("mark", "s", cwd=work)
    with contextlib.ExitStack() as serving:
        if served:
            control = ["--control", f"unix:{work / 'ctl.sock'}"]
            serving.enter_context(isc_serve(work, "s", "--listen", "127.0.0.1:0", *control))
        done = isc_run("copy", "s", "--json", cwd=work)
    assert_copied_in_full_to_disk(done, moved, work)
    assert {d["name"]: d["state"] for d in status(work)["destinations"]}["disk"] == "consistent"


def test_isc_serve_every_checks_what_file_a_destinations_agent_serves(
    session: Path, at_agent
) -> None:
    work = session
    moved = _another_file_behind(at_agent, work)
    write_source(work, 0, b"changed")
    with isc_serve(work, "s", "--listen", "127.0.0.1:0", "--every", "0.05") as (_, output):
        update = json.loads(next_line(output, "isc serve") or "null")
    assert update["ok"] and update["outcomes"] == {"d1": "ok", "d2": "ok", "disk": "ok"}
    assert update["bytes_seeded"] + update["bytes_sent"] == SIZE  # every chunk to disk
    assert moved.read_bytes() == (work / "source.img").read_bytes()
    assert (
        "disk is not the export it was (its agent names another file"
        in (work / "serve.log").read_text()
    )


def _another_file_behind(agent: Agent, work: Path) -> Path:
    """After a full copy of ``work``'s session: another file with the same bytes behind
    ``agent``'s export (which its samples cannot tell), from another agent at its address;
    its path."""
    isc_run("copy", "s", "--full", cwd=work)
    assert read_state(work / "s").meta["destinations"][2]["identity"]
    agent.end()
    moved = work / "elsewhere" / "disk"
    moved.parent.mkdir()
    shutil.copyfile(agent.directory / "disk", moved)
    agent.directory = moved.parent
    agent.start()
    return moved


def test_copy_refuses_credentials_no_agent_would_get(session: Path) -> None:
    secret = session / "secret"
    secret.write_text(random.Random(8).randbytes(32).hex())
    secret.chmod(0o600)
    before = files(session / "s")
    done = isc_run("copy", "s", "--full", "--secret-file", "secret", cwd=session, check=1)
    line = error_line(done)
    assert line.endswith(
        "--tls-creds and --secret-file are for a site: give the destinations their sites "
        "(add-dest --site)"
    )
    assert files(session / "s") == before


def test_unprotect_drops_a_protection_whose_image_was_lost_and_updates_go_on(
    session: Path, at_agent
) -> None:
    from isc import Destination
    from isc.remote import session_holder

    work, agent = session, at_agent
    exports = agent.directory
    isc_run("update", "s", cwd=work)
    # A protection kept from a failed update, then another file at the export's path.
    site = agent.site_of()
    site.holder = session_holder(read_state(work / "s").meta["id"], "s")  # the session's own
    assert site.protect(Destination(None, name="disk")).ok
    agent.end()
    other = exports / "other"
    other.write_bytes(random.Random(4).randbytes(SIZE))
    other.replace(exports / "disk")
    agent.start()
    write_source(work, 0, b"changed")
    for verb in ("update", "rollback"):
        before = state_of(work)
        args = [verb, "s", "disk"] if verb == "rollback" else [verb, "s"]
        done = isc_run(*args, cwd=work, check=1)
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("isc: error: ") and "protected image was lost" in last
        assert "the export was replaced; unprotect it (isc unprotect SESSION disk)" in last
    assert state_of(work) == before  # the rollback changed nothing

    line = error_line(isc_run("unprotect", "s", "nosuch", cwd=work, check=1))
    assert "s has no destination 'nosuch' (it has d1, d2, disk)" in line
    line = error_line(isc_run("unprotect", "s", "d1", cwd=work, check=2))
    assert "unprotect needs --site HOST:PORT" in line
    assert state_of(work) == before
    assert agent.site_of().status(Destination(None, name="disk")).info["protected"]

    done = isc_run("unprotect", "s", "disk", "--json", cwd=work)
    assert json.loads(done.stdout) == {"session": "s", "destination": "disk", "reason": None}
    ack = agent.site_of().status(Destination(None, name="disk"))
    assert ack.ok and not ack.info["protected"]
    assert not (exports / ".isc-agent" / "disk.journal").exists()
    text = isc_run("unprotect", "s", "disk", cwd=work).stdout  # again: nothing to drop
    assert text.startswith("unprotected disk (not protected): it holds what it holds")
    isc_run("update", "s", cwd=work)
    states = {d["name"]: d["state"] for d in status(work)["destinations"]}
    assert states == {"d1": "consistent", "d2": "consistent", "disk": "consistent"}
    assert (exports / "disk").read_bytes() == (work / "source.img").read_bytes()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ({"ok": False, "reason": "no export named 'd1'"}, "no export named 'd1'; nothing was"),
        ({"id": -1, "ok": True}, "with a reply for another request; it may have been done: isc"),
    ],
    ids=["refused", "unknown"],
)
def test_unprotect_says_whether_a_site_that_failed_it_may_have_done_it(
    session: Path, answer: dict, said: str
) -> None:
    from test_remote_hostile import Impostor

    def reply(request: dict) -> bytes:
        return json.dumps({"id": request["id"], **answer}).encode() + b"\n"

    before = state_of(session)
    with Impostor(reply) as site:
        done = isc_run("unprotect", "s", "d1", "--site", site.site, cwd=session, check=1)
        assert [request["op"] for request in site.requests] == ["unprotect"]
    line = error_line(done)
    assert line.startswith("isc: error: unprotect of d1 failed: ") and said in line
    assert state_of(session) == before


def test_lines_printed_from_two_threads_never_land_inside_each_other(capfd) -> None:
    """``isc serve --every`` prints its updates' lines from another thread than its ready
    lines: each line must come out whole."""
    from isc.commands import print_lines

    lines = {t: [f"thread {t} line {i} " + "x" * 200 for i in range(500)] for t in (0, 1)}
    start = threading.Barrier(2)

    def printer(t: int) -> None:
        start.wait()
        for i in range(0, len(lines[t]), 2):
            print_lines(*lines[t][i : i + 2])

    threads = [threading.Thread(target=printer, args=(t,)) for t in lines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out = capfd.readouterr().out.splitlines()
    assert sorted(out) == sorted(lines[0] + lines[1])
    for t in lines:  # each thread's lines in its order
        assert [line for line in out if line.startswith(f"thread {t} ")] == lines[t]
