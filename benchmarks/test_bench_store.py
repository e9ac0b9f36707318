"""What crash safety costs: the write-intent log per host write, and the resend after a crash.

Host writes of 4 KiB at random aligned offsets of a sparse 1 GiB FileLUN go
through a plain Session (the peer) and through persistent sessions with the
default write-intent log (4 MiB regions, a hot set of 1024 regions that
may grow to 4096: up to 16 GiB to resend after a crash of the machine) and
one whose hot set starts at 64 regions, on tmpfs (/dev/shm) and on the disk
under the test's tmp dir; each note says how many host writes waited for a
log record and the hot set's capacity at the end. A crash is taken as a copy of
the state directory made while the writer is still running (what a SIGKILL
leaves), or is a real SIGKILL of a writing child process, over and over
(the crash loop); reopening tells how much the next incremental copy resends
compared with what differs.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from isc import store
from isc.lun import FileLUN
from isc.session import Session

SIZE = 1 << 30
WRITE = 4096
BLOCK = 2000
G = 8192


def _offsets(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, SIZE // WRITE) * WRITE for _ in range(BLOCK)]


@pytest.fixture(params=["shm", "disk"])
def where(request, tmp_path) -> Path:
    if request.param == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this machine")
        root = Path("/dev/shm") / f"isc-bench-store-{os.getpid()}"
        root.mkdir()
        yield root
        shutil.rmtree(root)
    else:
        yield tmp_path


@pytest.mark.parametrize(
    "kind", ["plain session", "persistent, 64 hot to start", "persistent, 1024 hot (default)"]
)
def test_host_write_cost(benchmark, where, kind):
    source = where / "source.img"
    FileLUN.create(source, SIZE).close()
    data = os.urandom(WRITE)
    blocks = iter([_offsets(seed) for seed in range(1000)])
    synced = []  # the log records host writes waited for
    stored = None
    if kind == "plain session":
        lun = FileLUN(source)
        write = Session(lun, G).write
        closing = lun.close
    else:
        max_hot = 64 if "64" in kind else store.DEFAULT_MAX_HOT
        store.create_session(where / "s", str(source), granularity=G, max_hot=max_hot)
        stored, _ = store.open_session(where / "s")
        append = stored._log.append
        stored._log.append = lambda first, last: (synced.append(first), append(first, last))
        write = stored.session.write
        closing = stored.close

    def one_block(offsets: list[int]) -> None:
        for offset in offsets:
            write(offset, data)

    place = "tmpfs" if str(where).startswith("/dev/shm") else "disk"
    benchmark.group = f"host write 4 KiB through a session, 1 GiB LUN on {place}"
    benchmark.extra_info.update(writes_per_round=BLOCK, where=place)
    try:
        one_block(next(blocks))  # a session that has run before: its working set is hot
        warm, synced[:] = len(synced), []
        benchmark.pedantic(one_block, setup=lambda: ((next(blocks),), {}), rounds=10)
    finally:
        closing()
    if stored is not None:
        benchmark.extra_info["note"] = (
            f"{100 * len(synced) / (10 * BLOCK):.2g}% of the host writes waited for a log "
            f"record ({warm} in the {BLOCK} writes before); hot set capacity "
            f"{stored.hot_capacity} regions"
        )


@pytest.mark.parametrize("spread", [16 << 20, SIZE])
def test_resend_after_a_crash(benchmark, tmp_path, spread):
    """Bytes the next copy resends after a crash, against the bytes written since the last copy."""
    source = tmp_path / "source.img"
    FileLUN.create(source, SIZE).close()
    store.create_session(tmp_path / "s", str(source), granularity=G)
    stored, _ = store.open_session(tmp_path / "s")
    rng = random.Random(spread)
    written: set[int] = set()
    for _ in range(20000):
        offset = rng.randrange(0, spread // WRITE) * WRITE
        stored.session.write(offset, b"x" * WRITE)
        written.add(offset // G)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "s", crashed, ignore=shutil.ignore_patterns(".lock"))
    stored.close()

    def reopen():
        reopened, recovery = store.open_session(crashed)
        count = reopened.session.bitmap.tracking_count
        reopened.close()
        return recovery, count

    benchmark.group = "recovery after a crash (reopen time; resend in extra_info)"
    recovery, tracked = benchmark.pedantic(reopen, rounds=1, iterations=1)
    benchmark.extra_info.update(
        spread_bytes=spread,
        written_chunks=len(written),
        written_bytes=len(written) * G,
        resent_bytes=tracked * G,
        resend_ratio=round(tracked / len(written), 2),
        regions_from_log=recovery.regions_resent,
    )
    print(
        f"\nwrites over {spread >> 20} MiB: {len(written) * G >> 10} KiB differ, "
        f"the next copy sends {tracked * G >> 10} KiB "
        f"({tracked / len(written):.2f}x; {recovery.regions_resent} logged regions)"
    )
    assert tracked >= len(written)  # no lost change: this is what the benchmark relies on


# -- the crash loop: a writer SIGKILLed over and over -------------------------------------------

KILLS = 15
CHILD = r"""
import random, sys
from isc.store import open_session

stored, _ = open_session(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
size = stored.source.size
print("open", flush=True)
for n in range(1, 1 << 30):
    length = rng.choice((512, 4096, 4096, 4096, 5000, 65536 + 512))
    stored.session.write(rng.randrange(0, size - length), rng.randbytes(length))
    if n % 64 == 0:
        print(n, flush=True)
"""


def _differing(source: FileLUN, dest: FileLUN) -> int:
    """Chunks where ``dest`` differs from ``source``."""
    import numpy as np

    step, count = 64 << 20, 0
    for offset in range(0, source.size, step):
        a = np.frombuffer(source.read(offset, step), np.uint8).reshape(-1, G)
        b = np.frombuffer(dest.read(offset, step), np.uint8).reshape(-1, G)
        count += int((a != b).any(axis=1).sum())
    return count


def test_resend_after_kills(benchmark, where):
    """The crash loop of tests/test_crash.py on a 1 GiB source at 8 KiB chunks, default log:
    a child writes 512 B to 64 KiB at random offsets until SIGKILLed after a seeded random
    number of writes (64 to 4096); each reopen is timed and its resend (the bits the next
    copy sends) set against the chunks that really differ, before a copy brings the
    destination back in step. Also the share of host writes that waited for a log record."""
    import signal
    import subprocess
    import sys

    from isc.store import copy

    with FileLUN.create(where / "source.img", SIZE), FileLUN.create(where / "dest.img", SIZE):
        pass
    state = where / "state"
    store.create_session(state, str(where / "source.img"), granularity=G)
    stored, _ = store.open_session(state)
    with stored:
        stored.add_destination(str(where / "dest.img"), "dest")
        copy(stored, "full-unmarked")
        stored.session.mark()
        copy(stored, "incremental")
    rng = random.Random("crash loop")
    rows = []

    def one_kill(kill: int) -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), str(kill)], stdout=subprocess.PIPE, text=True
        )
        lines = rng.randrange(1, 65)
        for _ in range(lines + 1):
            assert child.stdout.readline(), "the child ended early"
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        reopened, _ = store.open_session(state)
        with reopened:
            (dest,) = reopened.destinations
            differ = _differing(reopened.source, dest.lun)
            bitmap = reopened.session.bitmap
            resend = bitmap.tracking_count + bitmap.transfer_count
            rows.append((64 * lines, differ, resend))
            if not bitmap.marked:
                reopened.session.mark()
            copy(reopened, "incremental")

    place = "tmpfs" if str(where).startswith("/dev/shm") else "disk"
    benchmark.group = f"crash loop: {KILLS} SIGKILLs of a writer, state on {place}"
    kills = iter(range(KILLS))
    benchmark.pedantic(lambda: one_kill(next(kills)), rounds=KILLS, iterations=1)
    differ = sum(r[1] for r in rows)
    resend = sum(r[2] for r in rows)
    worst = max(r[2] / max(r[1], 1) for r in rows)
    note = (
        f"{KILLS} kills after {sum(r[0] for r in rows)} writes: resent {resend * G >> 20} MiB "
        f"for {differ * G >> 20} MiB that differed ({resend / max(differ, 1):.2f}x, "
        f"worst kill {worst:.1f}x)"
    )
    benchmark.extra_info.update(impl="isc, default log", note=note)
    print(f"\n{place}: {note}")
