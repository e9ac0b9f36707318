"""Pull mode under attack: races, crashes and control requests that could make a pull backup,
or a push destination beside it, differ from the image at its mark while isc says it succeeded.

The windows are forced, not waited for: a source whose reads park at a :class:`Gate`, host
writes parked inside their copy-on-first-write, real ``isc serve`` processes killed with
SIGKILL, libnbd clients (Debian's python3-libnbd, run by the system's python3). A seeded
stress loop races writer threads against a pulling client that finishes, drops or aborts at
random, checking every finished pull byte for byte against the image at its mark and, after
each abort, that every chunk where the partial backup differs from the source is tracked.

A pull beside push copies: a mark serves one kind of consumer, the first to take it
(:meth:`isc.session.Session.claim_mark`); once a push copy ran, a pull reads the image at a
mark but confirms nothing (its TRIM and ``unmark`` with ``"sent": true`` are refused, also
across a SIGKILL), and it needs a full mark; ``unmark`` with ``"sent": true`` names its mark.
A READ racing a TRIM of its own range may return the source as it is now: the NBD spec
leaves trimmed data undefined, so no test asks otherwise.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_nbd
from helpers import (
    TIMEOUT,
    Gate,
    HookLUN,
    Worker,
    Writers,
    differing_chunks,
    fill_random,
    session_directory,
)
from test_cli_analysis import ISC
from test_nbd import CMD_READ, KIB, MIB
from test_nbd_protocol import (
    CMD_TRIM,
    STATE_DIRTY,
    TYPE_ERROR,
    TYPE_OFFSET_DATA,
    client,
    session_server,
)
from test_pull import EIO, frozen, libnbd_python
from test_serve import image, isc_serve, line_reader, next_line

from isc import FileLUN, MemoryLUN, Session
from isc.copy import CopyJob, Destination, DestState
from isc.nbd import NBDLUN, SessionLUN
from isc.nbd.export import FROZEN_SUFFIX
from isc.savearea import SaveArea
from isc.serve import SessionControl
from isc.store import copy, create_session, open_session

SEED = 20261207
serve = test_nbd.serve  # the fixture: isc servers on Unix sockets in tmp_path
CONTEXT = "qemu:dirty-bitmap:state"
"""The dirty bitmap context of the session directories ``state`` these tests serve."""

PULL = '''
"""Pull the dirty extents of a frozen export into a backup file, TRIMming the first N."""
import json
import os
import sys

import nbd

uri, context, backup, trims = sys.argv[1:]
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
size, covered, dirty = h.get_size(), 0, []


def extents(name, offset, entries, error):
    global covered
    for length, flags in zip(entries[::2], entries[1::2]):
        if flags & 1:
            dirty.append((offset, length))
        offset += length
    covered = offset


while covered < size:
    h.block_status(size - covered, covered, extents)
with open(backup, "r+b") as out:
    for n, (offset, length) in enumerate(dirty):
        out.seek(offset)
        out.write(h.pread(length, offset))
        os.fdatasync(out.fileno())
        if n < int(trims):
            h.trim(length, offset)
h.shutdown()
print(json.dumps(dirty))
'''


# -- helpers --------------------------------------------------------------------------------------
def control(path: Path, op: str, **fields: object) -> dict:
    """One control request on the Unix socket ``path``; its whole reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(json.dumps({"id": 1, "op": op, **fields}).encode() + b"\n")
        return json.loads(sock.makefile("rb").readline())


def run_pull(tmp_path: Path, uri: str, backup: Path, trims: int) -> subprocess.CompletedProcess:
    """The libnbd pull script run on :data:`CONTEXT` to its end, TRIMming ``trims`` extents."""
    script = tmp_path / "pull.py"
    script.write_text(PULL)
    return subprocess.run(
        [libnbd_python(), script, uri, CONTEXT, backup, str(trims)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def pull(tmp_path: Path, uri: str, backup: Path, trims: int = 1 << 30) -> list:
    """:func:`run_pull`, which must succeed; the dirty extents it copied."""
    done = run_pull(tmp_path, uri, backup, trims)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def refused_pull(tmp_path: Path, uri: str, backup: Path, trims: int) -> str:
    """:func:`run_pull`, which must fail; its stderr."""
    done = run_pull(tmp_path, uri, backup, trims)
    assert done.returncode != 0, done.stdout
    return done.stderr


def isc(*args: str) -> subprocess.CompletedProcess[str]:
    """``isc ARGS`` run to its end; it must succeed."""
    done = subprocess.run([*ISC, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done


def serve_args(tmp_path: Path, source: Path) -> tuple[list[str], Path]:
    """``isc serve`` arguments for ``source`` on Unix sockets in a private directory; the
    control socket's path."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    ctl = run_dir / "ctl.sock"
    listen = f"unix:{run_dir / 'nbd.sock'}"
    return [str(source), "--listen", listen, "--control", f"unix:{ctl}"], ctl


class ParkingLUN:
    """A MemoryLUN behind a wrapper (so the server reads it in its worker threads, never on
    its event loop) whose next ``readinto`` calls ``hook`` after reading."""

    def __init__(self, size: int) -> None:
        self.lun = MemoryLUN(size)
        self.size = size
        self.hook = None

    def read(self, offset: int, length: int) -> bytes:
        return self.lun.read(offset, length)

    def readinto(self, offset: int, buffer) -> None:
        hook, self.hook = self.hook, None
        self.lun.readinto(offset, buffer)
        if hook is not None:
            hook()

    def write(self, offset: int, data) -> None:
        self.lun.write(offset, data)

    def flush(self) -> None:
        pass


# -- a pull beside push destinations -------------------------------------------------------------
@contextmanager
def pushed_and_pulled(tmp_path: Path, g: int) -> Iterator[tuple[Path, Path, str, Path]]:
    """A session directory ``state`` whose destination d0 got a full copy, served, a full
    pull's backup of it taken, then chunk 3 written: (state, backup, live URI, control)."""
    state = session_directory(tmp_path, 2 * MIB, g, SEED)
    isc("copy", str(state), "--full")  # d0 consistent
    args, ctl = serve_args(tmp_path, state)
    backup = tmp_path / "backup.img"
    FileLUN.create(backup, 2 * MIB).close()
    with isc_serve(tmp_path, *args) as (ready, _):
        # The copy moved the epoch past any pull: a backup pulls a full mark, whole,
        # and confirms nothing (the destination did not get what it read).
        assert control(ctl, "mark", full=True)["ok"]
        pull(tmp_path, frozen_uri(ready["uri"]), backup, trims=0)
        assert control(ctl, "unmark")["ok"]
        with NBDLUN(ready["uri"], timeout=TIMEOUT) as live:
            live.write(3 * g, b"\x5a" * g)
            live.flush()
        yield state, backup, ready["uri"], ctl


def test_a_pull_backup_leaves_the_push_destinations_of_the_session_to_be_sent_to(tmp_path):
    g = 64 * KIB
    with pushed_and_pulled(tmp_path, g) as (state, backup, uri, ctl):
        generation = control(ctl, "mark", full=True)["info"]["generation"]
        assert "not permitted" in refused_pull(tmp_path, frozen_uri(uri), backup, trims=1)
        dropped = control(ctl, "unmark", sent=True, generation=generation)
        assert not dropped["ok"] and "push destinations" in dropped["reason"], dropped
        assert control(ctl, "unmark")["ok"]
        isc("mark", str(state))
        copied = json.loads(isc("copy", str(state), "--json").stdout)
        assert [d["state"] for d in copied["destinations"]] == ["consistent"]
    # The destination said consistent must hold the source, chunk 3 with it.
    assert differing_chunks(image(tmp_path / "d0.img"), image(tmp_path / "source.img"), g) == []


def test_a_push_copy_never_takes_the_changes_a_pull_backup_still_needs(tmp_path):
    g = 64 * KIB
    with pushed_and_pulled(tmp_path, g) as (state, backup, uri, ctl):
        assert control(ctl, "mark")["ok"]  # the backup tool's, for a pull
        isc("copy", str(state))  # takes the mark first: chunk 3 reaches d0 only
        marked = control(ctl, "mark")  # the backup tool marks again
        assert "push copy" in marked["info"]["pull_behind"], marked
        assert "block-status" in refused_pull(tmp_path, frozen_uri(uri), backup, trims=0)
        assert control(ctl, "unmark")["ok"]
        assert control(ctl, "mark", full=True)["ok"]  # what the tool does then
        pull(tmp_path, frozen_uri(uri), backup, trims=0)
        assert control(ctl, "unmark")["ok"]
    assert differing_chunks(image(backup), image(tmp_path / "source.img"), g) == []


def test_unmark_sent_leaves_the_push_destinations_of_the_session_to_be_sent_to():
    g = 16 * KIB
    source = MemoryLUN(16 * g)
    dest = Destination(MemoryLUN(16 * g), "d0")
    with Session(source, g) as session:
        session.write(0, b"\1" * (16 * g))
        CopyJob(session, [dest]).full()
        session.write(5 * g, b"\2" * g)
        controls = SessionControl(session)
        generation = controls.mark({"full": True})["info"]["generation"]
        dropped = controls.unmark({"sent": True, "generation": generation})
        assert not dropped["ok"] and "push destinations" in dropped["reason"], dropped
        assert session.bitmap.marked and session.bitmap.transfer_count == 16
        assert controls.unmark({})["ok"]
        session.mark()
        CopyJob(session, [dest]).incremental()
        assert dest.state is DestState.CONSISTENT
        assert differing_chunks(source.read(0, 16 * g), dest.lun.read(0, 16 * g), g) == []


def test_a_frozen_client_cannot_confirm_chunks_of_a_push_copys_mark(serve):
    g = 16 * KIB
    size = 8 * g
    source = MemoryLUN(size)
    parked = HookLUN(MemoryLUN(size))
    dest = Destination(parked, "d0")
    session, server = session_server(serve, source, granularity=g)
    session.write(0, b"\1" * size)
    CopyJob(session, [dest], workers=1).full()
    session.write(2 * g, b"\2" * g)
    session.write(5 * g, b"\2" * g)
    session.mark()
    at_mark = source.read(0, size)
    session.write(5 * g, b"\3" * g)  # after the mark: saved first
    gate = Gate()
    parked.before_write = gate  # the copy parks at its first destination write (chunk 2)
    copying = Worker(CopyJob(session, [dest], workers=1).incremental)
    gate.wait_reached()
    with client(server) as c:
        frozen(c)
        c.request(CMD_TRIM, 0, size)  # refused, or confirms what the copy has yet to send
        c.error()
    gate.open()
    copying.finish()
    assert dest.state is DestState.CONSISTENT
    assert differing_chunks(parked.read(0, size), at_mark, g) == []


def test_a_late_unmark_sent_never_drops_the_chunks_of_a_later_mark():
    g = 16 * KIB
    with Session(MemoryLUN(16 * g), g) as session:
        controls = SessionControl(session)
        first = controls.mark({})["info"]["generation"]
        assert controls.unmark({"sent": True, "generation": first})["ok"]
        session.write(5 * g, b"\2" * g)
        assert controls.mark({})["ok"]
        late = controls.unmark({"sent": True, "generation": first})  # a retry of the first
        assert not late["ok"] and session.bitmap.transfer(5), late


# -- host writes racing a pull's READ and TRIM of their chunk --------------------------------------
@pytest.mark.parametrize("parked", ["the read", "the host write"])
def test_a_host_write_racing_a_frozen_read_of_its_chunk_never_shows_in_it(serve, parked):
    g = 64 * KIB
    lun = HookLUN(ParkingLUN(4 * g))
    session, server = session_server(serve, lun, granularity=g)
    session.write(0, b"\1" * g)
    session.mark()
    gate = Gate()
    with client(server) as c:
        frozen(c)
        if parked == "the read":  # it read the source: the write saves, then lands
            lun.lun.hook = gate
            c.request(CMD_READ, 0, g)
            gate.wait_reached()
            session.write(0, b"\2" * g)
            gate.open()
            data = read_or_fail(c, g)
        else:  # the write saved the chunk and waits to land: the read runs meanwhile
            lun.before_write = gate
            writing = Worker(lambda: session.write(0, b"\2" * g))
            gate.wait_reached()
            c.request(CMD_READ, 0, g)
            data = read_or_fail(c, g)
            gate.open()
            writing.finish()
    assert data == b"\1" * g
    assert lun.read(0, g) == b"\2" * g


def test_a_trim_racing_a_host_writes_save_of_its_chunk_keeps_it_tracked_and_frees_it(serve):
    g = 64 * KIB
    lun = ParkingLUN(4 * g)
    session, server = session_server(serve, lun, granularity=g)
    session.write(0, b"\1" * (2 * g))
    session.mark()
    gate = Gate()
    lun.hook = gate  # the host write parks inside its save, holding the saves' lock
    writing = Worker(lambda: session.write(g - 1, b"\2" * 2))  # chunks 0 and 1
    gate.wait_reached()
    with client(server) as c:
        frozen(c)
        c.request(CMD_TRIM, 0, g)  # waits for the save, then frees what it stored
        gate.open()
        writing.finish()
        assert c.error() == 0
        c.request(CMD_READ, g, g)
        assert read_or_fail(c, g) == b"\1" * g  # chunk 1 still reads as at the mark
    bitmap = session.bitmap
    assert [bitmap.transfer(c) for c in (0, 1)] == [False, True]
    assert session.save_area.used == g and not session.save_area.get(0)
    session.unmark()
    assert [bitmap.tracking(c) for c in (0, 1)] == [True, True]  # the write is not lost


# -- isc serve killed mid-pull, and its periodic updates during one ------------------------------
def frozen_uri(uri: str, name: str = "state") -> str:
    """The frozen export's URI beside the live export ``uri`` of session ``name``."""
    return uri.replace(f"///{name}?", f"///{name}{FROZEN_SUFFIX}?")


def live_writes(uri: str, rng: random.Random, size: int, count: int) -> None:
    """``count`` random host writes through the live export, flushed."""
    with NBDLUN(uri, timeout=TIMEOUT) as live:
        for _ in range(count):
            live.write(rng.randrange(size - 20 * KIB), rng.randbytes(rng.randrange(1, 20 * KIB)))
        live.flush()


def checkpoints_after(uri: str, rng: random.Random, journal: Path, count: int) -> None:
    """Host writes through the live export until ``count`` checkpoints of the server changed
    ``journal`` (each write to a cold region of a session whose hot set holds two wakes its
    checkpointer), the first begun after this call: the last holds every confirm before it."""
    seen, left = journal.stat(), count + 1
    with NBDLUN(uri, timeout=TIMEOUT) as live:
        for _ in range(5000):
            live.write(rng.randrange(live.size - KIB), rng.randbytes(KIB))
            now = journal.stat()
            if (now.st_size, now.st_mtime_ns) != (seen.st_size, seen.st_mtime_ns):
                seen, left = now, left - 1
                if not left:
                    return
    pytest.fail(f"{count} checkpoints did not come within 5000 host writes")


@contextmanager
def killed_at_the_end(tmp_path: Path, args: list[str]) -> Iterator[str]:
    """The real ``isc serve ARGS``, ready: its export's URI; SIGKILLed when the block ends."""
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            [*ISC, "serve", *args, "--json"], stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        ready = json.loads(next_line(line_reader(proc.stdout), "isc serve") or "null")
        assert ready is not None, (tmp_path / "killed.log").read_text()
        (uri,) = ready["exports"].values()
        yield uri
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def checkpointed_state(tmp_path: Path, size: int, g: int, rng: random.Random, dests=()) -> Path:
    """A session directory ``state`` on a random ``source.img`` whose hot set holds two
    regions of one chunk (host writes keep the checkpoints coming), with a file destination
    per name in ``dests``, copied to in full."""
    source, state = tmp_path / "source.img", tmp_path / "state"
    source.write_bytes(rng.randbytes(size))
    create_session(state, str(source), granularity=g, region_size=g, max_hot=2, hot_limit=2)
    with open_session(state)[0] as stored:
        for name in dests:
            FileLUN.create(tmp_path / f"{name}.img", size).close()
            stored.add_destination(str(tmp_path / f"{name}.img"), name)
        if dests:
            copy(stored, "full")
    return state


def test_isc_serve_killed_mid_pull_resends_every_chunk_the_backup_lacks(tmp_path: Path):
    size, g = 2 * MIB, 16 * KIB
    rng = random.Random(SEED)
    state = checkpointed_state(tmp_path, size, g, rng)
    source, backup = tmp_path / "source.img", tmp_path / "backup.img"
    FileLUN.create(backup, size).close()
    args, ctl = serve_args(tmp_path, state)
    with killed_at_the_end(tmp_path, args) as uri:
        assert control(ctl, "mark", full=True)["ok"]
        pull(tmp_path, frozen_uri(uri), backup)
        assert control(ctl, "unmark")["ok"]
        assert image(backup) == image(source)  # the last completed backup
        live_writes(uri, rng, size, 24)
        assert control(ctl, "mark")["ok"]
        dirty = pull(tmp_path, frozen_uri(uri), backup, trims=6)
        assert len(dirty) > 6
        live_writes(uri, rng, size, 24)  # over TRIMmed, untrimmed and clean chunks
        # The TRIMs are in a checkpoint, and the host writes since in the write log only.
        checkpoints_after(uri, rng, state / "checkpoint.journal", 2)
    with isc_serve(tmp_path, *args) as (ready, _):
        info = control(ctl, "status")["info"]
        assert info["state"] == "unmarked", info
        assert control(ctl, "mark")["ok"]
        pull(tmp_path, frozen_uri(ready["uri"]), backup)
        assert control(ctl, "unmark")["info"]["returned_chunks"] == 0
    missed = differing_chunks(image(backup), image(source), g)
    assert not missed, f"chunks the next backup did not send: {missed}"


def test_a_pull_killed_midway_leaves_the_push_destinations_every_chunk_to_send(tmp_path: Path):
    size, g = 2 * MIB, 16 * KIB
    rng = random.Random(SEED + 2)
    state = checkpointed_state(tmp_path, size, g, rng, dests=("d0",))
    backup = tmp_path / "backup.img"
    backup.write_bytes(image(tmp_path / "source.img"))
    args, ctl = serve_args(tmp_path, state)
    with killed_at_the_end(tmp_path, args) as uri:
        live_writes(uri, rng, size, 8)
        assert control(ctl, "mark", full=True)["ok"]  # the copy moved the epoch past pulls
        assert "not permitted" in refused_pull(tmp_path, frozen_uri(uri), backup, trims=3)
        checkpoints_after(uri, rng, state / "checkpoint.journal", 2)
    with isc_serve(tmp_path, *args):
        isc("unmark", str(state))  # the pull's mark, if it outlived the kill
        isc("mark", str(state))
        copied = json.loads(isc("copy", str(state), "--json").stdout)
        assert [d["state"] for d in copied["destinations"]] == ["consistent"]
    assert differing_chunks(image(tmp_path / "d0.img"), image(tmp_path / "source.img"), g) == []


def test_periodic_updates_during_a_pull_leave_its_mark_and_send_what_it_returns(tmp_path: Path):
    size, g = 2 * MIB, 64 * KIB
    rng = random.Random(SEED + 1)
    state = session_directory(tmp_path, size, g, SEED + 1)
    isc("copy", str(state), "--full")
    source, backup = tmp_path / "source.img", tmp_path / "backup.img"
    FileLUN.create(backup, size).close()
    args, ctl = serve_args(tmp_path, state)
    with isc_serve(tmp_path, *args, "--every", "0.02") as (ready, updates):
        for _ in range(100):  # a mark asked for while an update runs is refused: ask again
            marked = control(ctl, "mark", full=True)
            if marked["ok"]:
                break
            assert "already running" in marked["reason"], marked
            next_line(updates, "isc serve --every")
        at_mark = source.read_bytes()
        live_writes(ready["uri"], rng, size, 16)  # saved for the pull, tracked for the next
        refused = 0
        while refused < 3:  # updates come during the pull, and fail without touching it
            update = json.loads(next_line(updates, "isc serve --every") or "null")
            # Refused for the mark, or for the lock a control request holds a moment.
            assert not update["ok"], update
            assert "already marked" in update["reason"] or "already running" in update["reason"]
            assert [d["state"] for d in update["destinations"]] == ["consistent"]
            refused += 1
        pull(tmp_path, frozen_uri(ready["uri"]), backup, trims=0)
        assert backup.read_bytes() == at_mark
        assert control(ctl, "unmark")["info"]["returned_chunks"] == size // g
        for _ in range(100):  # what the pull did not confirm reaches the destination
            update = json.loads(next_line(updates, "isc serve --every") or "null")
            if update["ok"] and update["chunks_sent"]:
                break
    assert update["chunks_sent"] == size // g
    assert (tmp_path / "d0.img").read_bytes() == source.read_bytes()


# -- stress: writers, a pulling client, random finishes and aborts ---------------------------------
def dirty_pieces(c, ids: dict[str, int], size: int, piece: int) -> list[tuple[int, int]]:
    """The frozen export's dirty extents, asked until the end, cut in pieces of at most
    ``piece`` bytes: (offset, length) of each."""
    dirty, at = [], 0
    while at < size:
        for length, flags in c.status(at, size - at)[ids["qemu:dirty-bitmap:disk"]]:
            if flags & STATE_DIRTY:
                dirty += [(o, min(piece, at + length - o)) for o in range(at, at + length, piece)]
            at += length
    return dirty


def read_or_fail(c, length: int) -> bytes | None:
    """The answer to the READ just sent: its data, or None when it failed with EIO (a
    structured reply may send some of the data before its error chunk)."""
    answer = c.answer()
    errors = [payload for kind, _, payload in answer if kind == TYPE_ERROR]
    if answer[0][0] == 0:  # a simple reply: only an error comes so
        assert answer[0][1] == EIO, answer
        return None
    if errors:
        assert struct.unpack(">I", errors[0][:4])[0] == EIO, errors
        return None
    data = b"".join(payload[8:] for kind, _, payload in answer if kind == TYPE_OFFSET_DATA)
    assert len(data) == length, answer
    return data


def test_stress_pulls_that_finish_drop_or_abort_while_host_writes_race(
    serve, tmp_path: Path, busy_switching
):
    g, chunks = 16 * KIB, 64
    size = g * chunks
    rng = random.Random(SEED)
    lun = FileLUN.create(tmp_path / "source.img", size)
    fill_random(lun, rng)
    # A save area of 16 chunks: some marks end in a COFW that finds it full (rule 5).
    session = Session(lun, g, SaveArea(16 * g), name="disk")
    server = serve(SessionLUN(session))
    controls = SessionControl(session, pull=server.frozen)

    def host_write(writer: int, seq: int, r: random.Random) -> None:
        offset = r.randrange(size - 1)
        session.write(offset, r.randbytes(r.randrange(1, min(2 * g, size - offset) + 1)))

    backup = bytearray(size)  # the destination a pull writes into, in place
    outcomes = {"finished": 0, "aborted": 0, "full": 0}
    with Writers(host_write, 3, SEED) as writers:
        for turn in range(150):
            writers.pause()
            generation = controls.mark({"full": turn == 0})["info"]["generation"]
            at_mark = lun.read(0, size)
            plan = rng.choice(["finish", "finish-sent", "abort", "abort-mid-request"])
            with client(server) as c:
                ids = frozen(c)
                dirty = dirty_pieces(c, ids, size, 4 * g)
                writers.resume()
                writers.allow(rng.randrange(4, 24))
                stop = rng.randrange(len(dirty) + 1) if plan.startswith("abort") else -1
                untrimmed = 0
                for n, (offset, length) in enumerate(dirty):
                    c.request(CMD_READ, offset, length)
                    if n == stop and plan == "abort-mid-request":
                        controls.unmark({})  # races the READ
                    data = read_or_fail(c, length)
                    if data is None:
                        assert session.abort_reason(generation) or n >= stop >= 0, (turn, n)
                        break
                    assert data == at_mark[offset : offset + length], (turn, plan, offset)
                    backup[offset : offset + length] = data
                    if plan == "finish-sent" and rng.random() < 0.3:
                        untrimmed += length // g
                        continue
                    c.request(CMD_TRIM, offset, length)
                    if n == stop:
                        controls.unmark({})  # races the TRIM
                    error = c.error()
                    ended = n == stop or session.abort_reason(generation)
                    assert error in ((0, EIO) if ended else (0,)), (turn, plan, error)
            writers.pause()
            if session.abort_reason(generation):
                outcomes["full"] += 1
                controls.unmark({})  # what a client does after its requests failed
            elif plan.startswith("finish"):
                if not untrimmed:  # every chunk confirmed: no saved copy may be left
                    assert session.save_area.used == 0, (turn, session.bitmap.saved_count)
                done = controls.unmark({"sent": plan == "finish-sent", "generation": generation})
                done = done["info"]
                assert done["returned_chunks"] == 0 and done["dropped_chunks"] == untrimmed
                assert bytes(backup) == at_mark, (turn, plan)
                outcomes["finished"] += 1
            else:
                controls.unmark({})  # ended already, unless the last request came first
                outcomes["aborted"] += 1
            assert session.save_area.used == 0
            # Rule 2 against the backup: every chunk where it differs from the source is tracked.
            bitmap = session.bitmap
            lost = [
                chunk
                for chunk in differing_chunks(bytes(backup), lun.read(0, size), g)
                if not bitmap.tracking(chunk)
            ]
            assert not lost, (turn, plan, lost)
            writers.resume()
        writers.limit(0)
    assert outcomes["finished"] >= 20 and outcomes["aborted"] >= 20, outcomes
    assert outcomes["full"] >= 3, outcomes
