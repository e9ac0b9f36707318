"""Hostile tests of sparse full copies, of host TRIM/WRITE_ZEROES and of holes.

A full copy of a source that tells its holes sends only its data and zeroes
the holes at its destinations (:mod:`isc.copy`). These tests force the
windows where that can go wrong and compare the destinations byte for byte
with the image at the mark (a marked copy) or check that every difference is
tracked (rule 2):

* a host write that lands in a hole of the source between the copy's scan of
  its holes and the zeroing of that hole at the destinations;
* a host TRIM or WRITE_ZEROES of data during a marked full copy, through the
  session's export (:class:`~isc.nbd.SessionLUN`; ``qemu-io`` and libnbd over
  NBD; the real ``isc serve``), before and after the copy reached it; trims
  through ``isc serve`` that must stay tracked across its SIGKILL; a pull
  (``nbdcopy`` of the frozen export) after and during trims on the live export;
* destinations that fail part-way through their zeroing (also nbdkit's error
  filter), lack ``write_zeroes``, are NBD exports of every kind of zeroing,
  a block device, a protected one whose rollback must undo the zeroing, or
  are replaced by a wiped one between or during copies;
* sources whose holes change under the copy, whose ``SEEK_DATA`` fails, with
  holes smaller than a chunk and a short last chunk;
* cancels, failures, a mark that ends while its run still zeroes, and
  SIGKILLs of ``isc copy --full`` and ``isc serve --every`` in the middle of
  a sparse copy, then the next copy;
* a seeded stress: writer threads writing, trimming and zeroing (through the
  session's export or isc's NBD server of it) while sparse full and
  incremental copies run, fail and are cancelled.

Every wait is bounded (:data:`helpers.TIMEOUT`); randomness is seeded; a test
that needs a Debian tool skips naming its package.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import (
    TIMEOUT,
    Gate,
    HookLUN,
    Worker,
    Writers,
    assert_no_lost_change,
    chunks_touched,
    fill_random,
)

from isc import (
    CopyError,
    CopyJob,
    Destination,
    DestState,
    FileLUN,
    MemoryLUN,
    Session,
    StateError,
)
from isc.lun import ForwardingLUN
from isc.nbd import NBDLUN, NBDServer, SessionLUN

K = 1024
G = 16 * K


def sparse_file(path: Path, size: int, data: list[tuple[int, int]], rng: random.Random) -> FileLUN:
    """A plain sparse :class:`FileLUN` (the core saves its COFW data) holding random bytes in
    the ``(offset, length)`` ranges of ``data``, holes elsewhere."""
    lun = FileLUN.create(path, size)
    for offset, length in data:
        lun.write(offset, rng.randbytes(length))
    return lun


def layout(size: int, g: int) -> list[tuple[int, int]]:
    """Data at chunks 1-2, chunk 6, 4 KiB inside chunk 9 and the short last chunk's tail."""
    return [(g, 2 * g), (6 * g, g), (9 * g + 4 * K, 4 * K), (size - 300, 300)]


SIZE = 12 * G + 300
"""The size of most sources here: 12 chunks and a short one."""


@contextlib.contextmanager
def source_and_target(tmp_path: Path, seed: int, target_class=FileLUN, data=None):
    """``(rng, source, target)``: a sparse source of :data:`SIZE` bytes with ``data``
    (default :func:`layout`) and a ``target_class`` file destination holding old data,
    both closed at the end; ``rng`` seeded with ``seed``."""
    rng = random.Random(seed)
    with (
        sparse_file(tmp_path / "source.img", SIZE, data or layout(SIZE, G), rng) as source,
        target_class.create(tmp_path / "dest.img", SIZE) as target,
    ):
        old_data(target, seed + 1)
        yield rng, source, target


class ZeroHook(FileLUN):
    """A file destination that runs ``hook(offset, length)`` before each ``write_zeroes`` and
    fails its ``fail_at``-th call (1-based) after zeroing the first half of its range."""

    hook = None
    fail_at: int | None = None
    calls = 0

    def write_zeroes(self, offset: int, length: int) -> None:
        self.calls += 1
        if self.hook is not None:
            self.hook(offset, length)
        if self.calls == self.fail_at:
            super().write_zeroes(offset, length // 2)
            raise OSError(errno.EIO, f"injected write_zeroes failure at offset {offset}")
        super().write_zeroes(offset, length)


@pytest.fixture(autouse=True)
def small_runs(monkeypatch) -> None:
    """Runs of 4 chunks also where the source copies to every destination in the kernel
    (its runs are :data:`isc.copy.KERNEL_RUN` bytes): a copy of a few chunks has many runs."""
    import isc.copy

    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 4 * G)


def old_data(lun, seed: int) -> None:
    """Fill a destination with other data, so a hole the copy misses shows."""
    fill_random(lun, random.Random(seed))


def image(lun) -> bytes:
    return lun.read(0, lun.size)


def copy_and_check(job: CopyJob, step: str) -> None:
    """One copy of ``job``: ``step`` is "full", "incremental" (marked first) or
    "full-unmarked". Then each destination holds the image at the mark and is CONSISTENT
    or, unmarked, is INCONSISTENT with every difference from the source tracked."""
    session = job.session
    if step == "incremental":
        session.mark()
    at_mark = image(session.source)
    if step == "incremental":
        job.incremental()
    else:
        job.full(step == "full")
    for dest in job.destinations:
        if step == "full-unmarked":
            assert dest.state is DestState.INCONSISTENT
            assert_no_lost_change(session, dest.lun)
        else:
            assert dest.state is DestState.CONSISTENT
            assert dest.lun.read(0, len(at_mark)) == at_mark, (step, dest.name)


def catch_up(session: Session, dests: list[Destination]) -> None:
    """Mark and copy incrementally: every destination then equals the source (in the
    source's size: an NBD export may be larger)."""
    session.mark()
    CopyJob(session, dests).incremental()
    source = image(session.source)
    for dest in dests:
        assert dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, session.source.size) == source, dest.name


# -- a host write into a hole between the scan and the zeroing ------------------------------------
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_host_write_into_a_hole_before_the_copy_zeroes_it(tmp_path: Path, marked: bool):
    # The copy found chunk 4 a hole and is about to zero it at the destination
    # when a host write fills it. Marked: the image at the mark has zeros
    # there, the destination must read zeros and the write stay tracked.
    # Unmarked: the write must stay tracked.
    with source_and_target(tmp_path, 1, ZeroHook) as (rng, source, target):
        session = Session(source, G)
        at_mark = image(source)
        hole = 4 * G + 100
        written = rng.randbytes(2 * K)

        def fill(offset: int, length: int) -> None:
            if offset <= hole < offset + length and not session.bitmap.tracking(4):
                session.write(hole, written)

        target.hook = fill
        dest = Destination(target, "d")
        CopyJob(session, [dest], io_size=4 * G).full(marked)
        assert session.bitmap.tracking(4), "the write into the hole is tracked"
        assert image(source)[hole : hole + len(written)] == written
        if marked:
            assert dest.state is DestState.CONSISTENT
            assert image(target) == at_mark
        assert_no_lost_change(session, target)
        catch_up(session, [dest])


# -- host TRIM / WRITE_ZEROES through the session during a marked full copy -----------------------
@pytest.mark.parametrize("how", ["trim", "zero-fill"])
def test_trims_and_zeroes_through_the_export_during_a_marked_full_copy(tmp_path: Path, how: str):
    # The copy is parked after its first run (chunks 0-3 sent). Host zeroes then
    # hit data chunks sent (1, 2: no COFW needed) and not sent yet (6, 9 and the
    # tail: saved first); the destination must get the data at the mark.
    with source_and_target(tmp_path, 3) as (_, source, target):
        size = SIZE
        session = Session(source, G)
        export = SessionLUN(session)
        at_mark = image(source)
        ranges = [(G + 10, 2 * G), (6 * G, G), (9 * G, G), (size - 2 * G, 2 * G)]

        def zero_out(done: int, total: int) -> None:
            if done != 4 * G:
                return
            for offset, length in ranges:
                if how == "trim":  # punched through the source's write_zeroes
                    export.write_zeroes(offset, length)
                else:  # zeros written as data
                    export.write(offset, bytes(length))

        dest = Destination(target, "d")
        result = CopyJob(session, [dest], io_size=4 * G, progress=zero_out).full()
        assert result.cofw_chunks == 5  # chunks 6, 9, 10, 11 and 12: not sent when zeroed
        assert dest.state is DestState.CONSISTENT
        assert image(target) == at_mark
        zeroed = {c for offset, length in ranges for c in chunks_touched(offset, length, G)}
        assert {c for c in range(13) if session.bitmap.tracking(c)} == zeroed
        catch_up(session, [dest])


LIBNBD_ZEROES = """
import sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
for op, offset, length in (("trim", 6, 1), ("zero", 9, 1), ("fast-zero", 10, 2)):
    g = int(sys.argv[2])
    if op == "trim":
        h.trim(length * g, offset * g)
    elif op == "zero":
        h.zero(length * g, offset * g)
    else:
        h.zero(length * g, offset * g, nbd.CMD_FLAG_FAST_ZERO)
h.flush()
h.shutdown()
"""


@pytest.mark.parametrize("client", ["qemu-io", "libnbd"])
def test_nbd_trims_and_zeroes_on_the_live_export_during_a_marked_full_copy(
    tmp_path: Path, client: str
):
    # Real NBD clients discard and zero data of the source over isc's live
    # export while a marked full copy is parked after its first run; the
    # destination gets the data at the mark, the zeroes stay tracked.
    from test_nbd import run, tool
    from test_pull import libnbd_python

    program = tool("qemu-io") if client == "qemu-io" else libnbd_python()
    with source_and_target(tmp_path, 5) as (_, source, target):
        size = SIZE
        session = Session(source, G, name="vol")
        at_mark = image(source)
        parked = Gate()
        dest = Destination(target, "d")
        with NBDServer(SessionLUN(session), name="vol") as server:
            server.start_unix(tmp_path / "vol.sock")
            job = CopyJob(session, [dest], io_size=4 * G, progress=parked)
            copying = Worker(job.full)
            parked.wait_reached()  # chunks 0-3 sent
            if client == "qemu-io":
                commands = [f"discard {G} {G}", f"write -z {6 * G} {G}", f"write -z -u {9 * G} 4k"]
                commands.append(f"discard {size - 300} 300")
                run(program, "-f", "raw", *(a for c in commands for a in ("-c", c)), server.uri)
                zeroed = {1, 6, 9, 12}
            else:
                (tmp_path / "zero.py").write_text(LIBNBD_ZEROES)
                run(program, tmp_path / "zero.py", server.uri, str(G))
                zeroed = {6, 9, 10, 11}
            parked.open()
            result = copying.finish()
        assert dest.state is DestState.CONSISTENT
        assert image(target) == at_mark
        assert result.cofw_chunks == len(zeroed - {1})  # chunk 1 was sent already
        assert {c for c in range(13) if session.bitmap.tracking(c)} == zeroed
        catch_up(session, [dest])


# -- destinations replaced, failing part-way, without write_zeroes, on a block device ------------
def fresh_nbdkit(tmp_path: Path, kept: bool = False):
    """``nbdkit`` of :data:`SIZE` bytes on ``tmp_path/nbdkit.sock``, also where one was
    killed: its ``memory`` plugin (started again: a wiped destination under the same URI)
    or, ``kept``, its ``file`` plugin on ``tmp_path/nbdkit.img`` (the same destination)."""
    from test_nbd import nbdkit, sparse

    (tmp_path / "nbdkit.sock").unlink(missing_ok=True)
    if not kept:
        return nbdkit(tmp_path, "memory", f"size={SIZE}")
    backing = tmp_path / "nbdkit.img"
    if not backing.exists():
        sparse(backing, SIZE)
    return nbdkit(tmp_path, "file", str(backing))


@contextlib.contextmanager
def session_and_nbd_destination(tmp_path: Path, seed: int):
    """``(session, dest)``: a session on a sparse source and a destination on
    :func:`fresh_nbdkit`'s URI, reconnected on demand as a session directory's is."""
    from isc.lun import ReconnectingLUN

    uri = f"nbd+unix:///?socket={tmp_path / 'nbdkit.sock'}"
    lun = ReconnectingLUN(lambda: NBDLUN(uri, timeout=TIMEOUT), SIZE, "d")
    rng = random.Random(seed)
    with sparse_file(tmp_path / "source.img", SIZE, layout(SIZE, G), rng) as source, lun:
        yield Session(source, G), Destination(lun, "d")


def copied_again(session: Session, dest: Destination, kept: bool) -> None:
    """An incremental copy of the marked ``session`` to ``dest``, restarted. One a wiped
    volume replaced: it may be refused or fail, or leave ``dest`` inconsistent, never call
    it CONSISTENT unless it holds the source. One ``kept``: it sends what ``dest`` missed
    and calls it CONSISTENT (rule 13). Then the next copy (a full one if ``dest`` fell out
    of step) makes it the source."""
    try:
        CopyJob(session, [dest]).incremental()
    except (CopyError, StateError):  # it may be found replaced
        assert not kept
    assert dest.state is not DestState.CONSISTENT or image(dest.lun) == image(session.source)
    assert not kept or dest.state is DestState.CONSISTENT
    session.unmark()
    session.mark(full=not dest.in_step(session))
    CopyJob(session, [dest]).incremental()
    assert dest.state is DestState.CONSISTENT and image(dest.lun) == image(session.source)


@pytest.mark.parametrize("restart", ["wiped", "kept"])
@pytest.mark.parametrize("when", ["between-copies", "mid-copy"])
def test_a_restarted_destination_is_told_from_a_wiped_one(tmp_path: Path, when: str, restart: str):
    # The export is restarted wiped. Between two copies: the check's read of
    # its samples fails on the dead connection, and the copy's first write
    # would reconnect to the wiped export. While a full copy to it is parked
    # after two flushed runs: the destination drops out, and the next copy
    # would send only what it missed since the last flush. Either way it must
    # be told from the destination it was; restarted with its data kept, it
    # is that one, and the next incremental copy makes it consistent.
    kept = restart == "kept"
    parked = Gate()

    def park_third_run(done: int, total: int) -> None:
        if when == "mid-copy" and done == 8 * G:
            parked(done, total)

    with session_and_nbd_destination(tmp_path, 7) as (session, dest):
        with fresh_nbdkit(tmp_path, kept):
            job = CopyJob(
                session, [dest], io_size=4 * G, flush_every=4 * G, progress=park_third_run
            )
            copying = Worker(job.full)
            if when == "mid-copy":
                parked.wait_reached()  # two runs sent and flushed
            else:
                copying.finish()
                assert dest.state is DestState.CONSISTENT and dest.samples
        with fresh_nbdkit(tmp_path, kept):
            if when == "mid-copy":
                parked.open()
                with pytest.raises(CopyError, match="lost its connection"):
                    copying.finish()
                assert dest.state is DestState.INCONSISTENT
            else:
                session.write(0, b"new")
            session.mark()
            copied_again(session, dest, kept)


@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-another"])
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_destination_whose_zeroing_fails_part_way_loses_nothing(
    tmp_path: Path, marked: bool, others: int
):
    # Its second write_zeroes zeroes half its range, then fails: alone, the copy
    # fails; beside a good destination, it drops out. Either way what it lacks
    # is tracked and the next copy mends it.
    rng = random.Random(9)
    size = SIZE
    with (
        sparse_file(tmp_path / "source.img", size, layout(size, G), rng) as source,
        ZeroHook.create(tmp_path / "bad.img", size) as bad_lun,
        FileLUN.create(tmp_path / "good.img", size) as good_lun,
    ):
        for n, lun in enumerate((bad_lun, good_lun)):
            old_data(lun, 10 + n)
        bad_lun.fail_at = 2
        session = Session(source, G)
        dests = [Destination(bad_lun, "bad"), Destination(good_lun, "good")][: 1 + others]
        job = CopyJob(session, dests, io_size=4 * G)
        if others:
            result = job.full(marked)
            assert "injected write_zeroes failure" in result.outcomes["bad"]
            assert image(good_lun) == image(source)
        else:
            with pytest.raises(CopyError, match="injected write_zeroes failure"):
                job.full(marked)
            assert not session.bitmap.marked
        assert dests[0].state is DestState.INCONSISTENT
        for dest in dests:
            assert_no_lost_change(session, dest.lun)
        catch_up(session, dests)


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_sparse_copy_cancelled_part_way_then_copied_again(tmp_path: Path, marked: bool):
    with (
        source_and_target(tmp_path, 11) as (_, source, target),
        SessionLUN(Session(source, G)) as export,
    ):
        session = export.session
        dest = Destination(target, "d")

        def cancel_after_two_runs(done: int, total: int) -> None:
            export.write_zeroes(G, G)  # a trim of data the copy sent (and, marked, saved)
            session.write(8 * G + 5, b"late")  # a write into a hole it has not reached
            if done == 8 * G:
                job.cancel("stop here")

        job = CopyJob(session, [dest], io_size=4 * G, progress=cancel_after_two_runs)
        with pytest.raises(CopyError, match="stop here"):
            job.full(marked)
        assert dest.state is DestState.INCONSISTENT and not session.bitmap.marked
        assert_no_lost_change(session, target)
        job.progress = None
        if marked:  # a full copy again: the image at its mark
            at_mark = image(source)
            job.full()
            assert image(target) == at_mark
        catch_up(session, [dest])


NBD_DESTINATIONS = {
    "qemu-nbd-unmap": ("qemu-nbd", ["--discard=unmap"]),  # WRITE_ZEROES punched in its file
    "qemu-nbd-ignore": ("qemu-nbd", ["--discard=ignore", "--detect-zeroes=off"]),  # zeros written
    "nbdkit-emulated": ("nbdkit", ["--filter=nozero", "memory", "zeromode=emulate"]),
    "nbdkit-no-fast-zero": ("nbdkit", ["--filter=nozero", "memory", "fastzeromode=none"]),
    "nbdkit-no-zeroes": ("nbdkit", ["--filter=nozero", "memory", "zeromode=none"]),
    "nbdkit-4k-blocks": (  # partial blocks read, patched and written back
        "nbdkit",
        [
            "--filter=blocksize-policy",
            "memory",
            "blocksize-minimum=4096",
            "blocksize-error-policy=error",
        ],
    ),
}


@pytest.mark.parametrize("server", sorted(NBD_DESTINATIONS))
def test_sparse_copies_to_nbd_destinations_of_every_kind_of_zeroing(tmp_path: Path, server: str):
    # A marked full copy, host writes, trims and zero writes, an incremental
    # copy, an unmarked full copy over old data, another incremental: the NBD
    # destination equals the image at each mark.
    from test_nbd import nbdkit, qemu_nbd

    rng = random.Random(13)
    g = 4 * K
    size = 60 * g + 1000
    kind, options = NBD_DESTINATIONS[server]
    if kind == "qemu-nbd":
        serving = qemu_nbd(tmp_path, *options, size=size)
    else:
        # Larger than the source, in whole 4 KiB blocks: a server of 4 KiB blocks has no
        # partial last block (the NBD spec wants the size a multiple of the minimum).
        serving = nbdkit(tmp_path, *options, f"size={-(-size // 4096) * 4096}")
    data = [(3 * g + 100, 5000), (20 * g, 9 * g), (40 * g, 200), (size - 1000, 1000)]
    with (
        sparse_file(tmp_path / "source.img", size, data, rng) as source,
        serving as remote,
        NBDLUN(remote.uri, timeout=TIMEOUT) as target,
        SessionLUN(Session(source, g)) as export,
    ):
        old_data(target, 14)
        session = export.session
        dest = Destination(target, "d")
        job = CopyJob(session, [dest], io_size=8 * g)
        for step in ("full", "incremental", "full-unmarked", "incremental"):
            copy_and_check(job, step)
            export.write_zeroes(21 * g + 7, 3 * g)
            export.write(41 * g, bytes(2 * g))
            session.write(10 * g + 1, rng.randbytes(100))


def test_a_sparse_copy_to_a_block_device_over_old_data(tmp_path: Path):
    from test_copy import loop_device

    rng = random.Random(16)
    size = 64 * G  # a loop device's size is whole 512-byte sectors
    backing = tmp_path / "backing.img"
    with FileLUN.create(backing, size) as lun:
        old_data(lun, 17)
    data = [(G + 512, 3 * K), (10 * G, 5 * G), (size - 4 * K, 4 * K)]
    with (
        sparse_file(tmp_path / "source.img", size, data, rng) as source,
        loop_device(backing) as device,
        FileLUN(device) as target,
    ):
        session = Session(source, G)
        dest = Destination(target, "d")
        for marked in (True, False):
            at_start = image(source)
            CopyJob(session, [dest], io_size=8 * G).full(marked)
            assert image(target) == at_start
            session.write(30 * G, rng.randbytes(G))
            SessionLUN(session).write_zeroes(10 * G + 100, G)
        catch_up(session, [dest])


# -- sources whose holes change or cannot be told --------------------------------------------------
@pytest.mark.parametrize("error", [errno.EINVAL, errno.EIO], ids=["EINVAL", "EIO"])
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_source_whose_seek_data_fails_mid_copy(tmp_path: Path, monkeypatch, marked, error):
    # From the copy's third run on, SEEK_DATA fails. EINVAL means "holes
    # unknown": the rest goes as data, the copy succeeds. EIO fails the copy:
    # nothing is lost and the next copy mends the destination.
    real_lseek = os.lseek
    asked: list[int] = []

    def lseek(fd: int, offset: int, how: int) -> int:
        if how == os.SEEK_DATA and fd == source._fd:
            asked.append(offset)
            if offset >= 8 * G:
                raise OSError(error, os.strerror(error))
        return real_lseek(fd, offset, how)

    with source_and_target(tmp_path, 18) as (_, source, target):
        session = Session(source, G)
        dest = Destination(target, "d")
        at_start = image(source)
        monkeypatch.setattr(os, "lseek", lseek)
        job = CopyJob(session, [dest], io_size=4 * G)
        if error == errno.EINVAL:
            job.full(marked)
            assert image(target) == at_start
        else:
            with pytest.raises(CopyError, match="Input/output error"):
                job.full(marked)
            assert dest.state is DestState.INCONSISTENT
            assert_no_lost_change(session, target)
        assert max(asked) >= 8 * G
        monkeypatch.undo()
        catch_up(session, [dest])


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_holes_punched_by_another_writer_under_the_copy_leave_no_untracked_difference(
    tmp_path: Path, marked: bool
):
    # Someone else punches holes in the source (not through the session) while
    # the copy runs, before and after each run's scan. The session cannot see
    # those writes; still, no chunk may differ from the source without being
    # tracked, where the copy read it after the punch.
    with (
        source_and_target(tmp_path, 20, data=[(0, SIZE)]) as (_, source, target),
        FileLUN(tmp_path / "source.img") as other,  # the other writer's own descriptor
    ):
        session = Session(source, G)
        real = source.data_extents
        punched: set[int] = set()

        def punching_around_the_scan(offset: int, length: int) -> list[tuple[int, int]]:
            if length < 4 * G:  # the short last run: left alone
                return real(offset, length)
            other.write_zeroes(offset + G, G // 2)  # before: the scan sees a half hole
            extents = real(offset, length)
            other.write_zeroes(offset + 2 * G + 4 * K, 4 * K)  # after: the scan said data
            punched.update((offset // G + 1, offset // G + 2))
            return extents

        source.data_extents = punching_around_the_scan
        CopyJob(session, [Destination(target, "d")], io_size=4 * G).full(marked)
        assert punched == {1, 2, 5, 6, 9, 10}
        assert image(target) == image(source)  # every punch came before the copy read it


def random_layout(rng: random.Random, size: int) -> list[tuple[int, int]]:
    """Data ranges of random sizes, from a few bytes to several chunks, at random offsets:
    holes smaller than a chunk and than a file system block among them, and often data
    in the short last chunk."""
    ranges = []
    for _ in range(rng.randrange(3, 12)):
        length = min(rng.choice((1, 700, 4 * K, 5000, 3 * 64 * K + 11)), size // 2)
        ranges.append((rng.randrange(size - length), length))
    if rng.random() < 0.6:
        ranges.append((size - 17, 17))
    return ranges


def host_changes(export: SessionLUN, rng: random.Random, count: int) -> None:
    """Random host writes, zero writes and trims through the session's export."""
    size = export.size
    for _ in range(count):
        length = min(rng.choice((1, 512, 4 * K, 9000, 64 * K + 3)), size // 2)
        offset = rng.randrange(size - length)
        kind = rng.randrange(3)
        if kind == 0:
            export.write(offset, rng.randbytes(length))
        elif kind == 1:
            export.write(offset, bytes(length))
        else:
            export.write_zeroes(offset, length)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("granularity", [2 * K, 8 * K, 64 * K])
def test_random_sparse_layouts_reach_every_destination_exactly(
    tmp_path: Path, granularity: int, seed: int
):
    rng = random.Random(f"layout-{granularity}-{seed}")
    size = rng.randrange(20, 40) * granularity + rng.randrange(1, granularity)
    with (
        sparse_file(tmp_path / "source.img", size, random_layout(rng, size), rng) as source,
        FileLUN.create(tmp_path / "dest.img", size) as punched,
        SessionLUN(Session(source, granularity)) as export,
    ):
        written = MemoryLUN(size)  # no write_zeroes: zeros go as data
        for n, lun in enumerate((punched, written)):
            old_data(lun, seed + n)
        session = export.session
        dests = [Destination(punched, "punched"), Destination(written, "written")]
        job = CopyJob(session, dests, io_size=4 * granularity)
        for step in ("full", "incremental", "full-unmarked", "incremental", "full"):
            copy_and_check(job, step)
            host_changes(export, rng, 6)


# -- SIGKILL of isc copy --full and isc serve --every in the middle of a sparse copy ---------------
KILLED = {
    "copy-full": ["copy", "--full"],
    "copy-full-unmarked": ["copy", "--full", "--unmarked"],
    "serve-every": ["serve", "--listen", "127.0.0.1:0", "--every", "0.02"],
}


@pytest.mark.parametrize("command", sorted(KILLED))
def test_sigkill_in_the_middle_of_a_sparse_copy_then_the_next_copy(tmp_path: Path, command: str):
    # Two destinations holding old data: d1 a file, d2 an NBD export this
    # process serves over a Tripwire that SIGKILLs the command at a seeded
    # write of its zeroing or of its data. ``isc copy --full`` copies to
    # destinations in step with the session; ``isc serve --every`` gives new
    # ones their first, full, copy. After each kill no destination in step has
    # an untracked difference and none reads consistent unless it is the
    # source; then host trims and writes, and ``isc update`` makes both the source.
    from test_crash import ISC, Tripwire, killed_by
    from test_serve import Export

    from isc.store import copy, create_session, open_session

    rng = random.Random(command)
    size = 24 * G + 300
    data = [(G, 3 * G), (7 * G + 100, 900), (12 * G, 6 * G), (size - 300, 300)]
    sparse_file(tmp_path / "source.img", size, data, rng).close()
    for name in ("d1.img", "d2.img"):
        with FileLUN.create(tmp_path / name, size) as lun:
            old_data(lun, len(name))
    export = Export(tmp_path / "d2.sock", Tripwire(FileLUN(tmp_path / "d2.img")))
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "source.img"), granularity=G)
    export.start()
    try:
        with open_session(state)[0] as stored, SessionLUN(stored.session) as host:
            stored.add_destination(str(tmp_path / "d1.img"), "d1")
            stored.add_destination(export.uri, "d2")
            if command.startswith("copy"):
                copy(stored, "full")
                host_changes(host, rng, 4)
        for kill_at in (rng.randrange(1, 4), rng.randrange(4, 12)):
            export.lun.arm(kill_at)
            with open(tmp_path / "isc.log", "ab") as log:
                proc = subprocess.Popen(
                    [*ISC, KILLED[command][0], str(state), *KILLED[command][1:]],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            export.lun.target(proc.pid)
            assert killed_by(export, proc) == -signal.SIGKILL, (tmp_path / "isc.log").read_text()
            stored, recovery = open_session(state)
            with stored, SessionLUN(stored.session) as host:
                assert recovery.crashed
                source = image(stored.source)
                for dest in stored.destinations:
                    # ``isc copy`` ran on destinations in step: every difference is tracked.
                    if command.startswith("copy") or dest.in_step(stored.session):
                        assert_no_lost_change(stored.session, dest.lun)
                    if dest.state is DestState.CONSISTENT:
                        assert dest.lun.read(0, size) == source, dest.name
                host_changes(host, rng, 4)
        subprocess.run(
            [*ISC, "update", str(state)], capture_output=True, timeout=TIMEOUT, check=True
        )
        with open_session(state)[0] as stored:
            source = image(stored.source)
            for dest in stored.destinations:
                assert dest.state is DestState.CONSISTENT
                assert dest.lun.read(0, size) == source, dest.name
    finally:
        export.stop()
        export.lun.close()


# -- the real isc serve: trims and zeroes over its live export during its marked full copy ---------
def test_isc_serve_copies_the_image_at_the_mark_while_qemu_io_discards_and_zeroes(tmp_path: Path):
    # ``isc serve`` of a session directory runs a marked full copy (control
    # port) to an NBD destination this process serves, parked at its third
    # write; qemu-io discards and zeroes data on the live export meanwhile.
    # The destination must end with the image at the mark, then catch up.
    from test_nbd import run, tool
    from test_pull import ask
    from test_serve import Export, isc_serve

    from isc.store import create_session, open_session

    qemu_io = tool("qemu-io")
    rng = random.Random(24)
    size = 24 * G + 300
    data = [(0, 5 * G), (9 * G + 100, 900), (12 * G, 8 * G), (size - 300, 300)]
    sparse_file(tmp_path / "source.img", size, data, rng).close()
    at_mark = (tmp_path / "source.img").read_bytes()
    with FileLUN.create(tmp_path / "dest.img", size) as lun:
        old_data(lun, 25)
    parked = Gate()
    target = HookLUN(FileLUN(tmp_path / "dest.img"))
    target.before_write = lambda n, offset, data: parked() if n == 3 else None
    export = Export(tmp_path / "dest.sock", target)
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "source.img"), granularity=G)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    control = run_dir / "ctl.sock"
    export.start()
    try:
        with open_session(state)[0] as stored:
            stored.add_destination(export.uri, "d")
        listen = ["--listen", f"unix:{run_dir / 'nbd.sock'}", "--control", f"unix:{control}"]
        with isc_serve(tmp_path, str(state), *listen) as (ready, _):
            copying = Worker(lambda: ask(control, "copy", mode="full"))
            parked.wait_reached()
            commands = [f"discard {G} {2 * G}", f"write -z {13 * G} {3 * G}"]
            commands += [f"write -z -u {size - 300} 300", f"write -P 7 {6 * G} 4k"]
            run(qemu_io, "-f", "raw", *(a for c in commands for a in ("-c", c)), ready["uri"])
            parked.open()
            copied = copying.finish()
            assert copied["outcomes"] == {"d": "ok"} and copied["cofw_chunks"] > 0
            assert target.read(0, size) == at_mark
            assert ask(control, "status")["tracked_chunks"] == 2 + 3 + 1 + 1
            ask(control, "mark")
            ask(control, "copy")
            assert target.read(0, size) == (tmp_path / "source.img").read_bytes()
    finally:
        export.stop()
        target.close()


# -- a seeded stress: writers write, trim and zero while copies run, fail and are cancelled --------
STRESS_STEPS = 150
"""Copies per stress run: marked full, incremental or unmarked full, a fault in some."""


@contextlib.contextmanager
def host_path(server: NBDServer, sock: Path, path: str):
    """Where host writes go: ``server``'s session export itself ("session"), or an NBD
    connection to ``server`` started on ``sock`` ("nbd")."""
    server.start_unix(sock)
    if path == "session":
        yield server.lun
        return
    with NBDLUN(server.uri, timeout=TIMEOUT) as lun:
        yield lun


@pytest.mark.parametrize(
    ("seed", "area", "path"),
    [(27, "memory", "session"), (28, "memory", "nbd"), (29, "file", "nbd")],
)
def test_stress_writers_trims_and_zeroes_against_sparse_and_incremental_copies(
    tmp_path: Path, monkeypatch, busy_switching, seed: int, area: str, path: str
):
    # Writers reach the session through its export, or through isc's NBD
    # server of it (WRITE, WRITE_ZEROES that punch) on one shared connection.
    import isc.copy
    from isc import SaveArea

    monkeypatch.setattr(isc.copy, "SPLIT_MIN", G)  # worker threads split the quiet runs
    rng = random.Random(seed)
    chunks = 40
    size = chunks * G + 300
    data = random_layout(rng, size)
    with (
        sparse_file(tmp_path / "source.img", size, data, rng) as source,
        ZeroHook.create(tmp_path / "file.img", size) as punched,
        SaveArea(8 * G, tmp_path / "save.area" if area == "file" else None) as saves,
        SessionLUN(Session(source, G, saves)) as export,
        NBDServer(export, name="vol") as server,
        host_path(server, tmp_path / "vol.sock", path) as host,
    ):
        written = HookLUN(MemoryLUN(size))
        twin = MemoryLUN(size)  # the source, written in the same order under ``order``
        twin.write(0, image(source))
        order = threading.Lock()
        session = export.session
        dests = [Destination(punched, "punched"), Destination(written, "written")]
        held = {dest.name: None for dest in dests}  # the image each CONSISTENT one must hold

        def write(writer: int, seq: int, wrng: random.Random) -> None:
            length = wrng.choice((1, 700, 4 * K, G, 2 * G + 5))
            offset = wrng.randrange(size - length)
            kind = wrng.randrange(3)
            with order:
                if kind == 0:
                    payload = wrng.randbytes(length)
                    host.write(offset, payload)
                elif kind == 1:
                    payload = bytes(length)
                    host.write(offset, payload)
                else:
                    payload = bytes(length)
                    host.write_zeroes(offset, length)
                twin.write(offset, payload)

        runs_left = [0]

        def progress(done: int, total: int) -> None:
            runs_left[0] -= 1
            if runs_left[0] == 0:
                job.cancel("stress cancel")
            finished = writers.total_done
            writers.allow(2)
            writers.wait_done(finished + 1)

        job = CopyJob(session, dests, io_size=4 * G, progress=progress, workers=2)
        outcomes: dict[str, int] = {}
        with Writers(write, 2, seed=seed) as writers:
            for step in range(STRESS_STEPS):
                kind = "full" if step == 0 else rng.choice(("full", "incremental", "unmarked"))
                fault = rng.choice(("none", "none", "cancel", "zeroes", "write"))
                runs_left[0] = rng.randrange(1, 6) if fault == "cancel" else -1
                punched.fail_at = punched.calls + rng.randrange(1, 4) if fault == "zeroes" else None
                written.fail_at = written.writes + rng.randrange(1, 6) if fault == "write" else None
                writers.settle()
                at_mark = None
                with order:
                    if kind != "unmarked":
                        session.mark(full=kind == "full")
                        at_mark = twin.read(0, size)
                try:
                    if kind == "unmarked":
                        job.full(False)
                    else:
                        job.incremental()
                    outcome = "ok"
                except StateError:  # a destination out of step and no donor: unmark, full next
                    session.unmark()
                    outcome = "refused"
                except CopyError:
                    outcome = "failed"
                outcomes[f"{kind}-{outcome}"] = outcomes.get(f"{kind}-{outcome}", 0) + 1
                writers.settle()
                for dest in dests:
                    if dest.state is DestState.CONSISTENT:
                        if outcome == "ok" and dest.epoch == session.epoch and at_mark:
                            held[dest.name] = at_mark
                        assert dest.lun.read(0, size) == held[dest.name], (step, kind, dest.name)
                    else:
                        held[dest.name] = None
                    if dest.in_step(session):
                        assert_no_lost_change(session, dest.lun)
                assert image(source) == twin.read(0, size)
            punched.fail_at = written.fail_at = None
            job.progress = None  # the source stays as it is: the last copy catches up
            writers.settle()
            session.mark(full=not all(d.in_step(session) for d in dests))
            job.incremental()
        for dest in dests:
            assert dest.lun.read(0, size) == image(source)
        print(f"\nstress seed {seed}: {sorted(outcomes.items())}")
        assert outcomes.get("full-ok") and outcomes.get("incremental-ok"), outcomes
        assert sum(n for k, n in outcomes.items() if k.endswith("failed")), outcomes


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_an_nbd_destination_whose_write_zeroes_starts_failing_mid_copy(tmp_path: Path, marked):
    # nbdkit's error filter fails every WRITE_ZEROES once a trigger file exists;
    # the test makes it after the copy's first run. Beside it a file
    # destination ends as the source; the NBD one drops out, what it lacks is
    # tracked, and the next copy mends it once the server zeroes again.
    from test_nbd import nbdkit

    rng = random.Random(30)
    size = 16 * G
    trigger = tmp_path / "fail-zeroes"
    data = [(G, G), (5 * G + 100, 100), (10 * G, 2 * G)]
    errors = ["error-zero=EIO", "error-zero-rate=1", f"error-zero-file={trigger}"]
    serving = nbdkit(tmp_path, "--filter=error", "memory", f"size={size}", *errors)
    with (
        sparse_file(tmp_path / "source.img", size, data, rng) as source,
        FileLUN.create(tmp_path / "good.img", size) as good_lun,
        serving as remote,
        NBDLUN(remote.uri, timeout=TIMEOUT) as bad_lun,
    ):
        for n, lun in enumerate((good_lun, bad_lun)):
            old_data(lun, 31 + n)
        session = Session(source, G)
        good, bad = Destination(good_lun, "good"), Destination(bad_lun, "bad")

        def fail_zeroes_after_the_first_run(done: int, total: int) -> None:
            trigger.touch()

        job = CopyJob(session, [good, bad], io_size=4 * G, progress=fail_zeroes_after_the_first_run)
        at_start = image(source)
        result = job.full(marked)
        assert "Input/output error" in result.outcomes["bad"]
        assert good_lun.read(0, size) == at_start and bad.state is DestState.INCONSISTENT
        assert_no_lost_change(session, bad_lun)
        trigger.unlink()
        catch_up(session, [good, bad])


# -- a mark that ends while a run of its copy is still zeroing -------------------------------------
def test_a_run_zeroing_after_its_mark_ended_and_another_copy_ran_loses_nothing(tmp_path: Path):
    # Copy A is zeroing chunk 5 (a hole at its mark) when its mark is aborted
    # (the save area overflows), a host write fills chunk 5, and copy B of a
    # new mark sends it. A's zeroing then lands over B's data and A fails:
    # chunk 5 differs from the source and must be tracked.
    from isc import SaveArea

    rng = random.Random(32)
    size = 12 * G
    with (
        sparse_file(tmp_path / "source.img", size, [(0, 4 * G), (8 * G, 4 * G)], rng) as source,
        ZeroHook.create(tmp_path / "dest.img", size) as target,
    ):
        session = Session(source, G, SaveArea(G))
        dest = Destination(target, "d")
        CopyJob(session, [dest]).full()

        def abort_and_copy_again(offset: int, length: int) -> None:
            if not offset <= 5 * G < offset + length or not session.bitmap.marked:
                return
            session.write(8 * G, b"a")  # saved: the save area is full now
            session.write(9 * G, b"b")  # cannot be saved: the mark is aborted
            session.write(5 * G, b"filled")
            session.mark()
            CopyJob(session, [dest]).incremental()

        target.hook = abort_and_copy_again
        with pytest.raises(CopyError, match="save area full"):
            CopyJob(session, [dest], io_size=4 * G).full()
        assert_no_lost_change(session, target)


def test_a_zeroing_beyond_the_save_area_while_marked_ends_the_mark_and_loses_nothing(
    tmp_path: Path,
):
    # A whole-volume TRIM during a marked full copy needs more COFW than the
    # save area holds: it goes in sections, the mark ends (rule 5), the host's
    # zeroing lands whole, and every chunk stays tracked.
    from isc import SaveArea

    rng = random.Random(41)
    size = 64 * G
    with sparse_file(tmp_path / "source.img", size, [(0, size)], rng) as source:
        session = Session(source, G, SaveArea(4 * G))
        generation = session.mark(full=True)
        SessionLUN(session).write_zeroes(0, size)
        assert image(source) == bytes(size)
        assert not session.bitmap.marked and "save area" in session.abort_reason(generation)
        assert session.bitmap.tracking_count == session.bitmap.chunks


# -- a sparse incremental copy to a protected destination, failed and rolled back ------------------
def test_a_whole_volume_trim_goes_sparse_through_a_protection_and_rolls_back(tmp_path: Path):
    # A host trims the whole volume and writes a little: every chunk is in the
    # transfer bitmap, so the update's incremental copy is a sparse one, whose
    # zeroing goes through the destination's protection. It fails part-way;
    # the rollback must restore the last consistent image, byte for byte.
    from isc.remote import LocalSite
    from isc.update import PeriodicUpdate, UpdateError, rollback

    rng = random.Random(33)
    size = SIZE
    with (
        sparse_file(tmp_path / "source.img", size, [(0, size)], rng) as source,
        SessionLUN(Session(source, G)) as export,
    ):
        session = export.session
        target = HookLUN(MemoryLUN(size))
        dest = Destination(target, "d")
        site = LocalSite()
        PeriodicUpdate(session, [dest], site).run()
        consistent = image(target)
        assert consistent == image(source) and dest.state is DestState.CONSISTENT
        export.write_zeroes(0, size)
        export.write(5 * G + 7, b"kept")
        target.fail_at = target.writes + 6  # part-way through the zeroing of the holes
        with pytest.raises(UpdateError, match="injected failure"):
            PeriodicUpdate(session, [dest], site, io_size=4 * G).run()
        assert dest.state is DestState.INCONSISTENT and target.read(0, size) != consistent
        rollback(session, dest, site)
        assert dest.state is DestState.CONSISTENT and target.read(0, size) == consistent
        assert_no_lost_change(session, target)
        target.fail_at = None
        target.written.clear()
        PeriodicUpdate(session, [dest], site).run()
        assert dest.state is DestState.CONSISTENT and target.read(0, size) == image(source)
        assert (0, 5 * G) in target.written  # sparse: chunks 0-4 went as one write of zeros


# -- host trims through the real isc serve, then SIGKILL: still tracked ----------------------------
def test_trims_and_zeroes_through_isc_serve_survive_its_sigkill(tmp_path: Path):
    # An NBD client trims and zeroes data (and writes) through ``isc serve``
    # of a session directory whose destination is consistent, then the server
    # is SIGKILLed before it checkpoints again. Reopened, every chunk the
    # trims changed is tracked, and an incremental copy makes the destination
    # the source.
    from test_crash import ISC
    from test_serve import line_reader, next_line

    from isc.store import copy, create_session, open_session

    rng = random.Random(34)
    size = 24 * G + 300
    sparse_file(tmp_path / "source.img", size, [(0, size)], rng).close()
    FileLUN.create(tmp_path / "dest.img", size).close()
    state = tmp_path / "state"
    create_session(state, str(tmp_path / "source.img"), granularity=G)
    with open_session(state)[0] as stored:
        stored.add_destination(str(tmp_path / "dest.img"), "d")
        copy(stored, "full")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    serve = [*ISC, "serve", str(state), "--listen", f"unix:{run_dir / 'nbd.sock'}"]
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        lines = line_reader(proc.stdout)
        uri = str(next_line(lines, "isc serve")).split()[-1]
        assert next_line(lines, "isc serve") == "ready", (tmp_path / "serve.log").read_text()
        with NBDLUN(uri, timeout=TIMEOUT) as host:
            host.write_zeroes(2 * G + 100, 3 * G)  # a trim: punched in the source
            host.write_zeroes(10 * G, G)
            host.write(15 * G + 5, bytes(10))  # zeros written as data
            host.write(size - 10, b"tail-write")
            host.flush()
        proc.kill()
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    stored, recovery = open_session(state)
    with stored:
        assert recovery.crashed
        (dest,) = stored.destinations
        tracked = {
            c for c in range(stored.session.bitmap.chunks) if stored.session.bitmap.tracking(c)
        }
        assert {2, 3, 4, 5, 10, 15, 24} <= tracked
        assert_no_lost_change(stored.session, dest.lun)
        stored.session.mark()
        copy(stored, "incremental")
        assert dest.state is DestState.CONSISTENT and image(dest.lun) == image(stored.source)


# -- a pull of the frozen export after trims on the live one ---------------------------------------
def test_nbdcopy_pulls_the_image_at_the_mark_after_trims_and_fills_on_the_live_export(
    tmp_path: Path,
):
    # After the mark, a client trims data chunks and fills a hole on the live
    # export. nbdcopy, which skips what base:allocation calls a hole, pulls
    # ``NAME@frozen`` over a file of old data: it must hold the image at the mark.
    from test_nbd import run, tool

    nbdcopy = tool("nbdcopy")
    rng = random.Random(35)
    size = 24 * G + 300
    data = [(0, 3 * G), (8 * G + 100, 900), (12 * G, 6 * G), (size - 300, 300)]
    with sparse_file(tmp_path / "source.img", size, data, rng) as source:
        session = Session(source, G, name="vol")
        with FileLUN.create(tmp_path / "backup.img", size) as backup:
            old_data(backup, 36)
        with NBDServer(SessionLUN(session), name="vol") as server:
            server.start_unix(tmp_path / "vol.sock")
            session.mark(full=True)
            at_mark = image(source)
            with NBDLUN(server.uri, timeout=TIMEOUT) as live:
                live.write_zeroes(G, 2 * G)  # data at the mark, a hole now
                live.write_zeroes(13 * G, 4 * G)
                live.write(5 * G, rng.randbytes(G))  # a hole at the mark, data now
                live.write_zeroes(size - 300, 300)
            frozen = f"nbd+unix:///vol@frozen?socket={tmp_path / 'vol.sock'}"
            run(nbdcopy, frozen, tmp_path / "backup.img")
            session.unmark()
        assert (tmp_path / "backup.img").read_bytes() == at_mark


class ZeroesFailAt(ForwardingLUN):
    """A destination's LUN passed through, ``write_zeroes`` too, whose ``fail_at``-th
    ``write_zeroes`` (1-based) zeroes the first half of its range, then fails."""

    fail_at: int | None = None
    calls = 0

    def write_zeroes(self, offset: int, length: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            self.lun.write_zeroes(offset, length // 2)
            raise OSError(errno.EIO, f"injected write_zeroes failure at offset {offset}")
        self.lun.write_zeroes(offset, length)


def test_an_agents_protection_holds_a_sparse_copys_write_zeroes_for_the_rollback(tmp_path: Path):
    # The real ``isc agent`` protects its export with a journal. A whole-volume
    # trim makes the update's copy a sparse one, whose holes reach the export as
    # NBD WRITE_ZEROES; it fails part-way. The rollback must restore the last
    # consistent image: the zeroing went through the journal, not around it.
    from test_agent import WAIT, agent

    from isc.update import PeriodicUpdate, UpdateError, rollback

    exports = tmp_path / "exports"
    exports.mkdir()
    with FileLUN.create(exports / "disk", SIZE) as lun:
        old_data(lun, 37)
    with (
        source_and_target(tmp_path, 38, data=[(0, SIZE)]) as (_, source, _target),
        SessionLUN(Session(source, G)) as export,
        agent(exports, tmp_path / "agent.log") as remote,
        ZeroesFailAt(NBDLUN(remote.exports["disk"], timeout=WAIT)) as target,
    ):
        session = export.session
        site = remote.site()
        dest = Destination(target, "disk")
        update = PeriodicUpdate(session, [dest], site, timeout=WAIT, io_size=4 * G)
        update.run()
        consistent = (exports / "disk").read_bytes()
        assert consistent == image(source)
        export.write_zeroes(0, SIZE)
        export.write(5 * G + 7, b"kept")
        target.fail_at = target.calls + 2
        with pytest.raises(UpdateError, match="injected write_zeroes failure"):
            update.run()
        assert (exports / "disk").read_bytes() != consistent  # zeroes landed
        rollback(session, dest, site, timeout=WAIT)
        assert dest.state is DestState.CONSISTENT
        assert (exports / "disk").read_bytes() == consistent
        target.fail_at = None
        update.run()
        assert (exports / "disk").read_bytes() == image(source)


# -- rule 4: a host WRITE_ZEROES lands wholly before or wholly after a mark ------------------------
@pytest.mark.parametrize("how", ["trim", "no-hole"])
def test_a_mark_never_splits_a_host_write_zeroes(tmp_path: Path, monkeypatch, how: str):
    # A client zeroes 3 MiB of data (a TRIM: punched; NO_HOLE: zeros written,
    # a piece at a time). Another thread marks the session once the first
    # piece is done and the zeroing gives it time to: the image at the mark
    # must hold the range all old or all zeros.
    from isc.lun import ZERO_PIECE
    from isc.nbd.export import LUNExport

    rng = random.Random(39)
    size = 4 * ZERO_PIECE
    with sparse_file(tmp_path / "source.img", size, [(0, size)], rng) as source:
        session = Session(source, 64 * K)
        before = image(source)
        marked = threading.Event()
        marking: list[Worker] = []
        piece = source.write_zeroes if how == "trim" else source.write

        def piece_then_a_mark(*args) -> None:
            piece(*args)
            if not marking:
                marking.append(Worker(lambda: (session.mark(full=True), marked.set())))
                # Time for the mark to land before the next piece, which it
                # must not: it waits for the whole zeroing.
                assert not marked.wait(0.5)

        setattr(source, "write_zeroes" if how == "trim" else "write", piece_then_a_mark)
        live = LUNExport(SessionLUN(session), "vol", readonly=False)
        live.write_zeroes(ZERO_PIECE // 2, 3 * ZERO_PIECE, may_trim=how == "trim", fast=False)
        marking[0].finish()
        assert marked.is_set()
        frozen = session.read_frozen(ZERO_PIECE // 2, 3 * ZERO_PIECE)
        old = before[ZERO_PIECE // 2 : 7 * ZERO_PIECE // 2]
        assert frozen in (old, bytes(len(old))), "the image at the mark holds it half done"


def test_nbdcopy_pulls_the_image_at_the_mark_while_a_client_trims_and_writes_the_live_export(
    tmp_path: Path,
):
    # The same pull while a client keeps trimming, zeroing and writing the
    # live export until it is done: whatever the interleaving, the backup
    # holds the image at the mark.
    from test_nbd import tool

    nbdcopy = tool("nbdcopy")
    rng = random.Random(40)
    g = 64 * K
    size = 384 * g + 300
    data = [(offset, 8 * g) for offset in range(0, size - 8 * g, 24 * g)]  # a third data
    with sparse_file(tmp_path / "source.img", size, data, rng) as source:
        session = Session(source, g, name="vol")
        with FileLUN.create(tmp_path / "backup.img", size) as backup:
            old_data(backup, 41)
        with NBDServer(SessionLUN(session), name="vol") as server:
            server.start_unix(tmp_path / "vol.sock")
            session.mark(full=True)
            at_mark = image(source)
            frozen = f"nbd+unix:///vol@frozen?socket={tmp_path / 'vol.sock'}"
            pulling = subprocess.Popen(
                [nbdcopy, frozen, str(tmp_path / "backup.img")],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            changes = 0
            with NBDLUN(server.uri, timeout=TIMEOUT) as live:
                # Bounded: the pull ends, or the test fails at the wait below.
                while (pulling.poll() is None or not changes) and changes < 20_000:
                    length = rng.choice((512, 4 * K, g, 3 * g + 1))
                    offset = rng.randrange(size - length)
                    if rng.random() < 0.5:
                        live.write_zeroes(offset, length)
                    else:
                        live.write(offset, rng.randbytes(length))
                    changes += 1
            assert pulling.wait(TIMEOUT) == 0, pulling.stderr.read()
            pulling.stderr.close()
            print(f"\n{changes} host changes during the pull")
            session.unmark()
        assert (tmp_path / "backup.img").read_bytes() == at_mark


# -- a destination file truncated (wiped) under its LUN --------------------------------------------
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_destination_file_truncated_under_its_lun_is_not_reported_consistent_short(
    tmp_path: Path, marked: bool
):
    # Someone wipes the destination file (truncates it to nothing) while isc
    # holds it open; the source ends in a hole. After a full copy (and, if
    # unmarked, the incremental copy that follows) the destination must read
    # as the source wherever it is called CONSISTENT.
    with source_and_target(tmp_path, 42, data=[(G, 2 * G)]) as (_, source, target):
        os.truncate(tmp_path / "dest.img", 0)
        session = Session(source, G)
        dest = Destination(target, "d")
        CopyJob(session, [dest], io_size=4 * G).full(marked)
        if not marked:
            session.mark()
            CopyJob(session, [dest]).incremental()
        held = (tmp_path / "dest.img").read_bytes()
        assert dest.state is not DestState.CONSISTENT or held == image(source), len(held)


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_source_file_that_shrank_under_its_lun_fails_a_sparse_copy(tmp_path: Path, marked: bool):
    # Someone truncates the source file (outside the session) while isc holds
    # it open. A copy that reads past the new end fails, saying the file
    # shrank; a sparse copy must not take the missing part for a hole.
    with source_and_target(tmp_path, 43, data=[(0, SIZE)]) as (_, source, target):
        os.truncate(tmp_path / "source.img", 4 * G)
        dest = Destination(target, "d")
        with pytest.raises(CopyError, match="shrank below the LUN size"):
            CopyJob(Session(source, G), [dest], io_size=4 * G).full(marked)
        assert dest.state is not DestState.CONSISTENT
