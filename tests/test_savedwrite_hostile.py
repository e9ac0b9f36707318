"""Hostile tests of the core's ``SavedWrite`` (isc._core), which writes a marked copy's saved
chunks over the kernel's copy of a run (``Session.copy_frozen_to``) with the interpreter
lock released, against rules 1, 2, 5, 6 and 13.

A run of a marked copy to a file destination goes in two steps: the kernel copies
the source's range (``copy_to``), then ``SavedWrite`` writes the chunks saved by
then over it, adjacent ones in one ``pwritev``, taking the save area's lock for
each write and releasing the interpreter lock for the I/O. The windows attacked:
a host write whose COFW lands before the kernel copy of its run (the copy holds
the new data, the saved chunk must go over it) or after it; a host write whose
save waits on the area's lock while a write of saved chunks runs; a save in
flight (its chunk flagged, not stored) as the copy writes its run; a mark aborted
by a full save area between two writes of saved chunks (the rest of the run is
not the point in time: the copy must not end CONSISTENT); a destination whose
writes fail (a full device) or stop short (``RLIMIT_FSIZE`` inside a write of
saved chunks) after the kernel copy; adjacent and lone saved chunks, the short
last chunk, granularities of 2 KiB and 64 KiB, memory and file save areas; and
a seeded stress of writer threads, marked full and incremental copies to two
destinations and injected failures. Every destination reported CONSISTENT must
equal the source at its mark; a failed one is INCONSISTENT and every chunk where
it differs from the source is tracked or in transfer.

A hole it found, closed in 9fa6d61: the core held the save area's lock while its
write to the destination ran, so a host write that needs a COFW waited for the
destination's I/O, and a destination whose writes hang (a paused NBD export
mounted through FUSE) stopped those host writes, against rule 13.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import TIMEOUT, Writers, assert_no_lost_change, fill_random, wait_until

import isc.copy
from isc import CopyError, CopyJob, Destination, DestState, FileLUN, SaveArea, Session


class HookSource(FileLUN):
    """A file source that calls ``before(offset, length, dest)`` ahead of each kernel copy
    and ``after(offset, length, dest)`` once it is done."""

    before = after = None

    def copy_to(self, offset: int, length: int, dest) -> bool:
        if self.before is not None:
            self.before(offset, length, dest)
        copied = super().copy_to(offset, length, dest)
        if self.after is not None:
            self.after(offset, length, dest)
        return copied


class ArmedLock:
    """A save area's lock that, once :meth:`arm` ed, runs ``hook(n)`` before its ``n``-th
    acquisition (from 1) by the thread that armed it and ``held(n)`` once it holds it;
    not again from inside either."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed = False
        self.thread = -1
        self.count = 0
        self.hook = self.held = lambda n: None

    def arm(self) -> None:
        self.thread, self.armed = threading.get_ident(), True

    def acquire(self, *args) -> bool:
        if not (self.armed and threading.get_ident() == self.thread):
            return self._lock.acquire(*args)
        self.count += 1
        self.armed = False
        try:
            self.hook(self.count)
            got = self._lock.acquire(*args)
            self.held(self.count)
        finally:
            self.armed = True
        return got

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> ArmedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def setup(tmp_path: Path, g: int, area: str, capacity: int | None = None, dests: int = 1):
    """A random file source of 24 chunks and a short one, a session with a ``SaveArea`` of
    ``area`` (memory or file) whose lock is an :class:`ArmedLock`, and file destinations
    made CONSISTENT by a full copy; runs of 4 chunks."""
    size = 24 * g + 1000
    source = HookSource.create(tmp_path / "source.img", size)
    fill_random(source, random.Random(g))
    save_area = SaveArea(capacity or size, None if area == "memory" else tmp_path / "save")
    lock = save_area._lock = ArmedLock()
    session = Session(source, g, save_area)
    luns = [FileLUN.create(tmp_path / f"d{i}.img", size) for i in range(dests)]
    destinations = [Destination(lun, f"d{i}") for i, lun in enumerate(luns)]
    CopyJob(session, destinations).full()
    return session, destinations, lock


@pytest.fixture(autouse=True)
def short_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 4 * 2048)


def close(session: Session, destinations) -> None:
    for dest in destinations:
        dest.lun.close()
    session.close()
    session.source.close()


def chunks_of(offset: int, length: int, g: int) -> range:
    return range(offset // g, -(-(offset + length) // g))


# -- COFWs around the kernel copy ------------------------------------------------------------------


@pytest.mark.parametrize("area", ["memory", "file"])
@pytest.mark.parametrize("g", [2048, 65536])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_cofw_before_or_after_the_kernel_copy_of_its_run_leaves_the_point_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, area: str, g: int, when: str
) -> None:
    """Chunks saved before the copy (adjacent ones, a lone one, the short last one), and in
    each run host writes to its chunks 1 and 3 (and the short last chunk) just before the
    kernel copies the run (which then holds their new data) or just after: the saved
    chunks written over it make each run the image at the mark, and the core wrote them."""
    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 4 * g)
    session, (dest,), _ = setup(tmp_path, g, area)
    source, size, rng = session.source, session.source.size, random.Random(when)
    try:
        session.mark(full=True)
        image = source.read(0, size)
        for chunk in (2, 3, 4, 9, 24):
            session.write(chunk * g, rng.randbytes(min(g, size - chunk * g) // 2 + 1))

        def overwrite(offset: int, length: int, lun) -> None:
            for chunk in chunks_of(offset, length, g):
                if chunk % 4 in (1, 3) or chunk == 24:
                    at = chunk * g
                    session.write(at, rng.randbytes(min(g, size - at)))

        setattr(source, when, overwrite)
        CopyJob(session, [dest], io_size=2 * g, workers=1).incremental()
        assert dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, size) == image
        assert session._write_saved.chunks >= 5
    finally:
        close(session, [dest])


@pytest.mark.parametrize("area", ["memory", "file"])
def test_host_saves_waiting_on_the_area_lock_during_a_write_of_saved_chunks_stay_in_time(
    tmp_path: Path, area: str
) -> None:
    """While the core holds the save area's lock for a write of saved chunks (the
    interpreter lock released), host writes COFW chunks of the same run and of later runs
    from another thread: their saves wait for the lock, the copy is the image at the
    mark."""
    g = 2048
    session, (dest,), lock = setup(tmp_path, g, area)
    source, size = session.source, session.source.size
    rng = random.Random("waiting")
    threads: list[threading.Thread] = []
    try:
        session.mark(full=True)
        image = source.read(0, size)
        for chunk in (0, 2, 5, 6, 13):
            session.write(chunk * g, b"\x11" * 100)

        def writer(chunks: list[int]) -> None:
            for chunk in chunks:
                session.write(chunk * g + 7, rng.randbytes(300))

        def during(n: int) -> None:
            # The core holds the lock for its next write: the writer's saves wait for it.
            if n in (1, 4):
                thread = threading.Thread(target=writer, args=([1, 3, 7, 12, 20, 24],))
                threads.append(thread)
                thread.start()

        def arm(offset: int, length: int, lun) -> None:
            lock.arm()

        lock.held, source.after = during, arm
        CopyJob(session, [dest], io_size=2 * g, workers=1).incremental()
        for thread in threads:
            thread.join(TIMEOUT)
        lock.armed = False
        assert threads and dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, size) == image
    finally:
        lock.armed = False
        close(session, [dest])


@pytest.mark.parametrize("area", ["memory", "file"])
@pytest.mark.parametrize("g", [2048, 65536])
def test_a_cofw_save_in_flight_when_the_copy_reaches_its_chunk_leaves_the_point_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, area: str, g: int
) -> None:
    """A host write to chunk 1 (between saved chunks 0 and 2) flags it saved and its COFW
    save stops before it takes the save area's lock, the chunk neither stored nor
    overwritten yet, as the copy of the chunk's run begins; the copy copies the run and
    writes the run's saved chunks around it (the chunk not held: the kernel's copy
    stands). Only then, as the copy confirms the run (which waits for saves in flight),
    the save goes on and the write lands: the copy is the image at the mark, and the
    core wrote the saved chunks."""
    monkeypatch.setattr(isc.copy, "KERNEL_RUN", 4 * g)
    session, (dest,), lock = setup(tmp_path, g, area)
    source, size = session.source, session.source.size
    rng = random.Random(g)
    blocked, go = threading.Event(), threading.Event()
    writer = None
    try:
        session.mark(full=True)
        image = source.read(0, size)
        for chunk in (0, 2):
            session.write(chunk * g, rng.randbytes(g))

        def stop_the_save(n: int) -> None:
            blocked.set()
            assert go.wait(TIMEOUT), "the copy never reached the chunk's run"

        def write_chunk_1() -> None:
            lock.hook = stop_the_save
            lock.arm()
            session.write(g, rng.randbytes(g))

        def start_the_write(offset: int, length: int, lun) -> None:
            if offset == 0:
                writer.start()
                assert blocked.wait(TIMEOUT), "the save never began"
                assert session.bitmap.saved_in(1, 1).tolist() == [1]
                assert 1 not in session.save_area._index

        def confirm_sent(first: int, count: int, generation: int) -> int:
            if first == 0:  # the chunk's run was copied, its saved chunks written
                assert dest.lun.read(0, 4 * g) == image[: 4 * g]
                assert session._write_saved.chunks == 2
                go.set()
                assert writer is not None
                writer.join(TIMEOUT)
                assert not writer.is_alive(), "the host write did not finish"
                assert source.read(g, g) != image[g : 2 * g]
            return confirm(first, count, generation)

        writer = threading.Thread(target=write_chunk_1)
        source.before = start_the_write
        confirm, session.confirm_sent = session.confirm_sent, confirm_sent
        CopyJob(session, [dest], io_size=2 * g, workers=1).incremental()
        assert go.is_set() and dest.state is DestState.CONSISTENT
        assert dest.lun.read(0, size) == image
    finally:
        go.set()
        lock.armed = False
        if writer is not None and writer.ident is not None:
            writer.join(TIMEOUT)
        close(session, [dest])


# -- failures during the rewrite -------------------------------------------------------------------


@pytest.mark.parametrize("area", ["memory", "file"])
def test_a_mark_aborted_between_two_writes_of_saved_chunks_ends_no_destination_consistent(
    tmp_path: Path, area: str
) -> None:
    """A run whose saved chunks go in two writes (1 and 3); between them host writes fill
    the save area and abort the mark, which empties the area: chunk 3 is no longer held,
    the run keeps the kernel's copy of it (new data). The copy fails, the destination is
    INCONSISTENT, and every chunk where it differs from the source is tracked (rule 2)."""
    g = 2048
    session, (dest,), lock = setup(tmp_path, g, area, capacity=3 * g)
    source, size = session.source, session.source.size
    try:
        session.mark(full=True)
        for chunk in (1, 3):  # saved, in the first run, not adjacent
            session.write(chunk * g, b"\x22" * g)

        def abort(n: int) -> None:
            if n == 2:  # between the first write of saved chunks and the second
                for chunk in (9, 13):
                    session.write(chunk * g, b"\x33" * 100)
                assert not session.bitmap.marked, "the save area did not fill"

        def arm(offset: int, length: int, lun) -> None:
            if offset == 0:
                lock.arm()

        lock.hook, source.after = abort, arm
        image = session.read_frozen(0, size)
        with pytest.raises(CopyError, match="save area full"):
            CopyJob(session, [dest], io_size=2 * g, workers=1).incremental()
        lock.armed = False
        assert dest.state is DestState.INCONSISTENT
        assert dest.lun.read(g, g) == image[g : 2 * g]  # written before the abort
        assert dest.lun.read(3 * g, g) == b"\x22" * g  # the run's new data: no point in time
        assert_no_lost_change(session, dest.lun)
    finally:
        lock.armed = False
        close(session, [dest])


def full_device(lun: FileLUN) -> None:
    """Make ``lun``'s descriptor a full device: every write fails with ENOSPC."""
    full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(full, lun._write_fd)
    os.close(full)


def restore(lun: FileLUN) -> None:
    """Give ``lun`` its file again."""
    fd = os.open(lun.path, os.O_RDWR | os.O_CLOEXEC)
    os.dup2(fd, lun._write_fd)
    os.close(fd)


@contextlib.contextmanager
def file_size_limit():
    """``RLIMIT_FSIZE`` as the test sets it (``set(bytes)``), restored after."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)


@pytest.mark.parametrize("fault", ["full device", "short write"])
@pytest.mark.parametrize("dests", [1, 2])
def test_a_destination_failing_inside_a_write_of_saved_chunks_drops_out_inconsistent(
    tmp_path: Path, fault: str, dests: int
) -> None:
    """After the kernel copy of the second run, the first destination's writes fail
    (ENOSPC), or stop short inside the first write of three adjacent saved chunks (a file
    size limit in the middle of the second): it drops out INCONSISTENT with every chunk
    where it differs tracked; the copy fails if it was alone, else the other ends
    CONSISTENT with the image at the mark."""
    g = 2048
    session, destinations, _ = setup(tmp_path, g, "memory", dests=dests)
    source, size = session.source, session.source.size
    victim = destinations[0].lun
    try:
        with file_size_limit() as limit:
            session.mark(full=True)
            image = source.read(0, size)
            for chunk in (1, 4, 5, 6, 11, 24):
                session.write(chunk * g, b"\x55" * 200)

            def fail(offset: int, length: int, lun) -> None:
                if lun is victim and offset == 4 * g:
                    if fault == "full device":
                        full_device(victim)
                    else:
                        limit(5 * g + g // 2)

            def lift(offset: int, length: int, lun) -> None:
                if lun is not victim:  # the limit is the process's: the other one writes
                    limit(resource.RLIM_INFINITY)

            source.before, source.after = lift, fail
            job = CopyJob(session, destinations, io_size=2 * g, workers=1)
            if dests == 1:
                with pytest.raises(CopyError) as failure:
                    job.incremental()
                outcomes = failure.value.result.outcomes
            else:
                outcomes = job.incremental().outcomes
        if fault == "full device":
            restore(victim)
        assert outcomes["d0"].startswith("failed")
        assert destinations[0].state is DestState.INCONSISTENT
        if fault == "short write":
            assert victim.read(4 * g, g) == image[4 * g : 5 * g]  # the write began
        assert_no_lost_change(session, victim)
        if dests == 2:
            assert destinations[1].state is DestState.CONSISTENT
            assert destinations[1].lun.read(0, size) == image
    finally:
        close(session, destinations)


# -- a seeded stress ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(2))
def test_writers_marked_copies_and_injected_failures_keep_every_consistent_copy_in_time(
    tmp_path: Path, seed: int
) -> None:
    """Two writer threads race marked full and incremental copies to two destinations in runs
    of 4 chunks, split between two copy threads, with a save area of 8 chunks (some marks
    abort); now and then a destination's device fills after a kernel copy. After each
    copy: a destination CONSISTENT equals the source at the mark; every destination
    differs from the source only in chunks tracked or in transfer. A last full copy meets
    a COFW made before it runs."""
    g = 2048
    rng = random.Random(f"stress-{seed}")
    session, destinations, _ = setup(tmp_path, g, "memory", capacity=8 * g, dests=2)
    source, size = session.source, session.source.size
    failed = consistent = aborted = 0
    held = {dest.name: source.read(0, size) for dest in destinations}
    """The image each destination holds while it reads CONSISTENT: its last copy's mark."""

    def write(writer: int, seq: int, wrng: random.Random) -> None:
        length = wrng.randrange(1, 3 * g)
        session.write(wrng.randrange(0, size - length + 1), wrng.randbytes(length))

    racing = 3  # host writes let go at each run of a copy

    def progress(done: int, total: int) -> None:
        writers.allow(racing)

    try:
        with Writers(write, 2, seed=seed) as writers:
            for _ in range(12):
                writers.settle()
                full = rng.random() < 0.3 or not all(d.in_step(session) for d in destinations)
                session.mark(full=full)
                image = source.read(0, size)
                # A full mark's COFW can take the whole save area: fewer writes race it,
                # or a destination out of step would see every full copy aborted.
                racing = 1 if full else 3
                writers.allow(rng.randrange(0, 4 if full else 12))
                victim = rng.choice([None, None, *destinations])
                at = rng.randrange(0, 24) * g

                def fail(offset: int, length: int, lun, victim=victim, at=at) -> None:
                    if victim is not None and lun is victim.lun and offset <= at < offset + length:
                        full_device(victim.lun)

                source.after = fail
                job = CopyJob(session, destinations, io_size=2 * g, workers=2, progress=progress)
                try:
                    outcomes = job.incremental().outcomes
                except CopyError as exc:
                    aborted += "aborted" in str(exc)
                    outcomes = exc.result.outcomes
                for dest in destinations:
                    if outcomes.get(dest.name) == "ok":
                        held[dest.name] = image
                writers.settle()
                source.after = None
                if victim is not None:
                    restore(victim.lun)
                for dest in destinations:
                    if dest.state is DestState.CONSISTENT:
                        assert dest.lun.read(0, size) == held[dest.name], f"{dest.name}: no image"
                        consistent += 1
                    else:
                        failed += 1
                    assert_no_lost_change(session, dest.lun)
            # Whether the racing writes above met a chunk before the copy did is up to
            # the scheduler: one last full copy meets a COFW for certain, so the copy's
            # write of saved chunks is always among the paths checked.
            writers.settle()
            racing = 0
            session.mark(full=True)
            image = source.read(0, size)
            session.write(5 * g, b"\x5a" * g)
            job = CopyJob(session, destinations, io_size=2 * g, workers=2, progress=progress)
            assert set(job.incremental().outcomes.values()) == {"ok"}
            assert session._write_saved.chunks
            for dest in destinations:
                assert dest.state is DestState.CONSISTENT
                assert dest.lun.read(0, size) == image
                assert_no_lost_change(session, dest.lun)
    finally:
        close(session, destinations)
    assert consistent and failed
    print(f"\n{consistent} copies consistent, {failed} not; {aborted} marks aborted")


# -- a destination that hangs inside a write of saved chunks -------------------------------------


def _fuse_missing() -> str | None:
    """Why a paused NBD export cannot be mounted as a file here, or None."""
    for tool, package in (("nbdkit", "nbdkit"), ("nbdfuse", "libnbd-bin"), ("umount", "mount")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {package})"
    if os.geteuid() != 0 or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "mounting a FUSE file system needs root and /dev/fuse"
    return None


@contextlib.contextmanager
def pausable_file(tmp_path: Path):
    """A 1 MiB file (nbdfuse over nbdkit's memory plugin and pause filter) and the control
    socket whose ``p`` makes its writes hang until ``r``."""
    sock, control, mount = tmp_path / "nbd.sock", tmp_path / "pause.sock", tmp_path / "mnt"
    mount.mkdir()
    procs = []
    connection = None
    try:
        nbdkit = ["nbdkit", "-f", "-U", str(sock), "--filter=pause", "memory", "1M"]
        procs.append(subprocess.Popen([*nbdkit, f"pause-control={control}"]))
        wait_until(lambda: sock.exists() and control.exists(), procs[0], "nbdkit's sockets")
        procs.append(subprocess.Popen(["nbdfuse", str(mount / "d.img"), "--unix", str(sock)]))
        wait_until(lambda: os.path.ismount(mount), procs[1], "the nbdfuse mount")
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(str(control))
        yield mount / "d.img", connection
    finally:
        if connection is not None:
            connection.sendall(b"r")  # whatever hangs goes on
            connection.close()
        if os.path.ismount(mount):  # lazily if a descriptor of the test still holds it
            subprocess.run(["umount", "-l", str(mount)], check=True)
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(TIMEOUT)


@pytest.mark.skipif(_fuse_missing() is not None, reason=str(_fuse_missing()))
def test_a_destination_that_hangs_inside_a_write_of_saved_chunks_stops_no_host_write(
    tmp_path: Path,
) -> None:
    """A marked incremental copy of chunks 1 and 2 (chunk 1 saved); once the kernel copied
    the run, the destination's descriptor is a file whose writes hang (a paused NBD export
    mounted through FUSE) and the core's write of chunk 1 hangs in it. A host write to
    chunk 2, which needs a COFW, must still finish (rule 13)."""
    g = 2048
    session, (dest,), lock = setup(tmp_path, g, "memory")
    source = session.source
    inside, wrote = threading.Event(), threading.Event()
    copier = None
    try:
        with pausable_file(tmp_path) as (hanging, control):
            for chunk in (1, 2):
                session.write(chunk * g, b"\x66" * 100)
            session.mark()
            session.write(g, b"\x77" * 100)  # chunk 1 saved

            def hang(offset: int, length: int, lun) -> None:
                fd = os.open(hanging, os.O_RDWR | os.O_CLOEXEC)
                os.dup2(fd, lun._write_fd)
                os.close(fd)
                control.sendall(b"p")
                assert control.recv(1) == b"P"
                lock.arm()

            lock.held = lambda n: inside.set()
            source.after = hang
            job = CopyJob(session, [dest], io_size=2 * g, workers=1)
            failed: list[CopyError] = []

            def copy() -> None:
                # The copy's writes went to the hanging file, its reads of the
                # destination do not: its read-back finds that, rightly.
                try:
                    job.incremental()
                except CopyError as exc:
                    failed.append(exc)

            copier = threading.Thread(target=copy, daemon=True)
            copier.start()
            assert inside.wait(TIMEOUT), "the core never took the save area's lock"
            threading.Thread(
                target=lambda: (session.write(2 * g + 5, b"\x88" * 10), wrote.set()), daemon=True
            ).start()
            finished = wrote.wait(2.0)  # a host write takes microseconds
            control.sendall(b"r")
            assert control.recv(1) == b"R"
            copier.join(TIMEOUT)
            assert wrote.wait(TIMEOUT)
            restore(dest.lun)
        assert finished, "a host write waited for the destination's hung write"
        assert dest.state is not DestState.CONSISTENT and "read back does not hold" in str(failed)
    finally:
        lock.armed = False
        if copier is not None:
            copier.join(TIMEOUT)
        close(session, [dest])
