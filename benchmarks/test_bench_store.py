"""What crash safety costs: the write-intent log per host write, and the resend after a crash.

Host writes of 4 KiB at random aligned offsets of a sparse 1 GiB FileLUN go
through a plain Session (the peer) and through persistent sessions with the
default write-intent log (4 MiB regions, 1024 hot regions: up to 4 GiB to
resend after a crash) and a small one (64 hot regions), on tmpfs (/dev/shm)
and on the disk under the test's tmp dir. A crash is taken as a copy of the
state directory made while the writer is still running (what a SIGKILL
leaves); reopening the copy tells how much the next incremental copy
resends compared with what was written.
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
    "kind", ["plain session", "persistent, 64 hot", "persistent, 1024 hot (default)"]
)
def test_host_write_cost(benchmark, where, kind):
    source = where / "source.img"
    FileLUN.create(source, SIZE).close()
    data = os.urandom(WRITE)
    blocks = iter([_offsets(seed) for seed in range(1000)])
    if kind == "plain session":
        lun = FileLUN(source)
        write = Session(lun, G).write
        closing = lun.close
    else:
        max_hot = 64 if "64" in kind else store.DEFAULT_MAX_HOT
        store.create_session(where / "s", str(source), granularity=G, max_hot=max_hot)
        stored, _ = store.open_session(where / "s")
        write = stored.session.write
        closing = stored.close

    def one_block(offsets: list[int]) -> None:
        for offset in offsets:
            write(offset, data)

    place = "tmpfs" if str(where).startswith("/dev/shm") else "disk"
    benchmark.group = f"host write 4 KiB through a session, 1 GiB LUN on {place}"
    benchmark.extra_info.update(writes_per_round=BLOCK, where=place)
    try:
        benchmark.pedantic(one_block, setup=lambda: ((next(blocks),), {}), rounds=10)
    finally:
        closing()


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

    recovery, tracked = benchmark.pedantic(reopen, rounds=1, iterations=1)
    benchmark.group = "recovery after a crash (reopen time; resend in extra_info)"
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
