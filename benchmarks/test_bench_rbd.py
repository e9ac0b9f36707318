"""RBD destinations: what an update to a Ceph image costs, and what its snapshots cost.

Two sets of tables (pytest-benchmark groups), on one single-node cluster started
for the module (``tests/ceph.py``: one monitor, one OSD keeping its objects in
memory, the monitor committing its maps at once), three rounds each:

``incremental update, 1% of 1 GiB``
    1% of a 1 GiB source (``/dev/shm`` when it has room) changed by 64 KiB
    writes at seeded random offsets through a session (untimed), then one
    ``PeriodicUpdate.run()`` (timed) to one destination: an RBD image
    (``RBDSite``: an RBD snapshot before the copy, removed after, through a
    ``qemu-nbd`` of the destination's own), a local file in the same place as
    the source, and ``nbdkit memory`` over a Unix socket (both protected in
    this process, ``LocalSite``: COFW into memory). The note splits the
    median into protect, copy and unprotect (each the median of its rounds).
``RBD snapshot costs``
    On images of 256 MiB and 4 GiB written whole (``rbd bench``): ``protect``
    (``rbd snap ls`` and ``rbd snap create``), ``unprotect`` after 1% of the
    image was rewritten since the protect, in whole 4 MiB objects at random
    (``rbd snap ls``, ``rbd snap rm``), and ``rollback`` of that 1% (``rbd
    snap ls``, ``rbd lock ls``, ``rbd diff``, ``rbd snap rollback``), each
    through ``RBDSite``.

After each update the destination is compared with the source (``qemu-img
compare`` for the RBD image). Nothing here asserts on time; ``python
benchmarks/report.py RESULTS.json`` prints the tables.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from datapath import SEED, place, scratch, write_random

from isc import Destination, FileLUN, Session
from isc.nbd import NBDLUN
from isc.rbd import RBDLUN, RBDSite
from isc.remote import LocalSite
from isc.update import PeriodicUpdate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ceph import Cluster, missing  # the tests' cluster
from test_nbd import nbdkit

GIB = 1 << 30
MIB = 1 << 20
SIZE = GIB
G = 65536
WRITE = 64 << 10
ROUNDS = 3
RBD_TIMEOUT = 120.0  # seconds an rbd command may take on a busy OSD


@pytest.fixture(scope="module")
def ceph(tmp_path_factory) -> Iterator[Cluster]:
    why = missing()
    if why is not None:
        pytest.skip(why)
    with Cluster(tmp_path_factory.mktemp("ceph"), memstore_bytes=16 * GIB) as cluster:
        yield cluster


class TimedSite:
    """A site that times each protect and unprotect of the site it wraps."""

    def __init__(self, site) -> None:
        self.site = site
        self.seconds: dict[str, list[float]] = {"protect": [], "unprotect": []}

    def _timed(self, request: str, dest, timeout):
        start = time.perf_counter()
        ack = getattr(self.site, request)(dest, timeout)
        self.seconds[request].append(time.perf_counter() - start)
        return ack

    def protect(self, dest, timeout=None):
        return self._timed("protect", dest, timeout)

    def unprotect(self, dest, timeout=None):
        return self._timed("unprotect", dest, timeout)


@pytest.mark.parametrize("kind", ["rbd image", "local file", "nbdkit memory"])
def test_incremental_update(benchmark, ceph: Cluster, kind: str) -> None:
    with scratch(2 * SIZE) as where:
        write_random(where / "source.img", SIZE)
        with FileLUN(where / "source.img") as source:
            session = Session(source, G, name="bench")
            with _destination(ceph, where, kind, session) as (dest, site, same):
                timed = TimedSite(site)
                workflow = PeriodicUpdate(session, [dest], timed)
                workflow.run()  # the first copy is full
                timed.seconds = {"protect": [], "unprotect": []}
                rng = random.Random(SEED)
                block = random.Random(SEED).randbytes(WRITE)

                def change() -> tuple[tuple, dict]:
                    for _ in range(SIZE // 100 // WRITE):
                        session.write(rng.randrange(SIZE // WRITE) * WRITE, block)
                    return (), {}

                def check() -> None:
                    assert same(), f"the {kind} does not hold the source after the update"

                benchmark.group = "incremental update, 1% of 1 GiB"
                benchmark.pedantic(workflow.run, setup=change, teardown=check, rounds=ROUNDS)
        median = benchmark.stats.stats.median
        protect, unprotect = (sorted(timed.seconds[r])[ROUNDS // 2] for r in timed.seconds)
        copy = median - protect - unprotect
        benchmark.extra_info.update(
            impl=kind,
            where=place(where),
            note=f"protect {protect * 1e3:.0f} ms, copy {copy * 1e3:.0f} ms, "
            f"unprotect {unprotect * 1e3:.0f} ms",
        )


@contextmanager
def _destination(ceph: Cluster, where: Path, kind: str, session: Session):
    """``(destination, its site, a check that it holds the source)`` for ``kind``."""
    source = session.source
    if kind == "rbd image":
        uri = ceph.create_image("update", SIZE)
        site = RBDSite()
        site.add(kind, uri, session)
        with RBDLUN(uri) as lun:

            def same() -> bool:
                compare = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source.path)]
                done = subprocess.run([*compare, ceph.qemu_uri("update")], capture_output=True)
                return done.returncode == 0

            yield Destination(lun, kind), site, same
    elif kind == "local file":
        with FileLUN.create(where / "dest.img", SIZE) as lun:
            yield Destination(lun, kind), LocalSite(), lambda: _same(lun, source)
    else:
        with nbdkit(where, "memory", f"size={SIZE}") as remote, NBDLUN(remote.uri) as lun:
            yield Destination(lun, kind), LocalSite(), lambda: _same(lun, source)


def _same(lun, source: FileLUN) -> bool:
    for offset in range(0, SIZE, 64 * MIB):
        if lun.read(offset, 64 * MIB) != source.read(offset, 64 * MIB):
            return False
    return True


@pytest.fixture(scope="module", params=[256 * MIB, 4 * GIB], ids=["256 MiB", "4 GiB"])
def image(request, ceph: Cluster) -> Iterator[tuple[str, int]]:
    """An image written whole, shared by the three requests: ``(name, size)``."""
    size = request.param
    name = f"snapshots-{size >> 20}"
    ceph.create_image(name, size)
    ceph.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-total", str(size), name)
    yield name, size
    ceph.rbd("rm", "--no-progress", name)


@pytest.mark.parametrize("request_", ["protect", "unprotect", "rollback"])
def test_snapshot_cost(benchmark, ceph: Cluster, image: tuple[str, int], request_: str) -> None:
    name, size = image
    site = RBDSite(timeout=RBD_TIMEOUT)
    site.add(name, ceph.uri(name), _Label(name))
    dest = Destination(None, name)  # the site knows it by name: no I/O here
    # Whole objects: memstore copies each 4 MiB object a snapshot shares on its first
    # write (BlueStore would share the unchanged extents), so scattered small writes
    # would fill the OSD's memory round after round while snapshots are trimmed.
    rewrite = ["bench", "--io-type", "write", "--io-pattern", "rand", "--io-size", "4M"]
    rewrite += ["--io-total", str(size // 100), name]

    def setup() -> tuple[tuple, dict]:
        if request_ != "protect":
            assert site.protect(dest).ok
            ceph.rbd(*rewrite)
        return (), {}

    def run() -> None:
        ack = getattr(site, request_)(dest)
        assert ack.ok, ack.reason

    def teardown() -> None:
        assert site.unprotect(dest).ok

    benchmark.group = f"RBD snapshot costs, {size >> 20} MiB image"
    benchmark.extra_info.update(impl=request_, bytes=size)
    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=ROUNDS)


class _Label:
    """What an RBDSite needs of a session: a name and a generation."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = 1
